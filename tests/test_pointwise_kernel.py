"""How a model is run: tangent modes, their choice, chunk sizes, compilation and its fallback."""

import copy
import functools
import math
import warnings
from unittest import mock

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from analytic import FluxModel, StressModel
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno import _cache, pointwise_kernel
from dolfinx_mno.mlp_kernel import SequentialMLP
from dolfinx_mno.pointwise_kernel import (
    CHUNK_CANDIDATES,
    MIN_TIMED_POINTS,
    TANGENT_MODES,
    PointwiseKernel,
    tangent_mode_rule,
)
from dolfinx_mno.torch_bridge import PointwiseEvaluator

CPU = torch.device("cpu")


def flux_tangent(x):
    """∂q/∂(u, ∇u) of FluxModel in 2D: (n, 2, 3)."""
    u, g = x[:, 0], x[:, 1:]
    tangent = np.zeros((x.shape[0], 2, 3))
    tangent[:, :, 0] = 2 * u[:, None] * g + 0.5
    tangent[:, 0, 1] = tangent[:, 1, 2] = 1 + u**2
    return tangent


def evaluator(model, num_inputs, num_outputs, num_points, **kwargs):
    ev = PointwiseEvaluator(
        model.eval(), num_inputs, num_outputs, num_points, np.float64, CPU, **kwargs
    )
    ev.inputs[:] = np.random.default_rng(0).random((num_points, num_inputs)) - 0.5
    return ev


@pytest.mark.parametrize("mode", [m for m in TANGENT_MODES if m != "sequential"])
@pytest.mark.parametrize("points", [1000, 10_000])
def test_every_tangent_mode_gives_the_exact_tangent(mode, points):
    ev = evaluator(FluxModel().double(), 3, 2, points)
    assert ev.prepare_tangent(mode) == mode
    ev.evaluate(tangent=True)
    x = ev.inputs
    expected = (1 + x[:, :1] ** 2) * x[:, 1:] + 0.5 * x[:, :1]
    np.testing.assert_allclose(ev.outputs, expected, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(ev.tangents, flux_tangent(x), rtol=1e-14, atol=1e-14)


class FlatFlux(torch.nn.Module):
    """FluxModel's formula through ``x.view``: needs a contiguous input."""

    def forward(self, x):
        flat = x.view(-1)
        u, g = flat[0::3].unsqueeze(1), x.view(-1, 3)[:, 1:]
        return (1.0 + u * u) * g + 0.5 * u


def test_reverse_columns_is_not_given_a_model_that_needs_a_contiguous_input():
    """A model that views its input fails in "reverse-columns": timed, the mode is skipped
    (the tangent is still exact); forced, a clear error."""
    # A chunk size given: a measured one may come out below MIN_TIMED_POINTS on a busy
    # machine, and then no mode is timed (the rule's is taken).
    ev = evaluator(FlatFlux().double(), 3, 2, 2 * MIN_TIMED_POINTS, batch_size=8192)
    mode = ev.prepare_tangent()
    assert mode != "reverse-columns"
    assert "tangent mode reverse-columns" not in ev.plan["timings"]
    assert "tangent mode reverse" in ev.plan["timings"]
    ev.evaluate(tangent=True)
    np.testing.assert_allclose(ev.tangents, flux_tangent(ev.inputs), rtol=1e-14, atol=1e-14)
    other = evaluator(FlatFlux().double(), 3, 2, 2 * MIN_TIMED_POINTS)
    with pytest.raises(ValueError, match="tangent mode 'reverse-columns' fails for this model"):
        other.prepare_tangent("reverse-columns")


def test_the_measured_tangent_mode_is_the_fastest_that_was_timed():
    """Above MIN_TIMED_POINTS every mode is timed and the fastest is recorded and used."""
    ev = evaluator(StressModel(2).double(), 6, 4, 3 * MIN_TIMED_POINTS, batch_size=8192)
    mode = ev.prepare_tangent()
    timings = {
        k.split()[-1]: v for k, v in ev.plan["timings"].items() if k.startswith("tangent mode")
    }
    assert set(timings) <= set(TANGENT_MODES) and len(timings) >= 2
    assert mode == min(timings, key=timings.get)
    assert ev.plan["tangent_mode"] == ev.tangent_mode == mode
    # Whatever was chosen, the tangent is autograd's (checked against forward mode here).
    ev.evaluate(tangent=True)
    chosen = ev.tangents.copy()
    other = evaluator(StressModel(2).double(), 6, 4, 3 * MIN_TIMED_POINTS, batch_size=8192)
    other.prepare_tangent("forward" if mode != "forward" else "reverse-loop")
    other.evaluate(tangent=True)
    np.testing.assert_allclose(chosen, other.tangents, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    ("num_inputs", "num_outputs", "expected"),
    [(3, 1, "reverse"), (3, 3, "reverse"), (1, 4, "forward")],
)
def test_small_samples_use_the_rule_on_widths(num_inputs, num_outputs, expected):
    assert tangent_mode_rule(num_inputs, num_outputs) == expected
    linear = torch.nn.Linear(num_inputs, num_outputs).double()
    ev = evaluator(linear, num_inputs, num_outputs, MIN_TIMED_POINTS // 2)
    assert ev.prepare_tangent() == expected
    assert not any(k.startswith("tangent") for k in ev.plan["timings"])
    ev.evaluate(tangent=True)
    weight = linear.weight.detach().numpy()
    np.testing.assert_allclose(ev.tangents, np.broadcast_to(weight, ev.tangents.shape), rtol=1e-15)


def test_a_model_without_autograd_graph_is_constant_or_refused():
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 1), 3.0, dtype=x.dtype)

    ev = evaluator(Constant(), 2, 1, 5000)
    assert ev.prepare_tangent() == "constant"
    ev.evaluate(tangent=True)
    assert np.all(ev.outputs == 3.0) and np.all(ev.tangents == 0.0)


@pytest.mark.parametrize("num_points", [200_000, 10_086])
def test_chunk_size_is_measured_and_recorded(num_points):
    """The chunk with the lowest time for all the points (the larger within 3 %) is kept.

    ``ceil(num_points / size)`` chunks each: the last, shorter one counts as a full one.
    """
    ev = evaluator(FluxModel().double(), 3, 2, num_points)
    plan = ev.plan
    assert plan["batch_size_source"] == "measured"
    total = {
        int(k.split()[1]): v * math.ceil(num_points / int(k.split()[1]))
        for k, v in plan["timings"].items()
        if k.startswith("chunk")
    }
    assert set(total) <= {min(c, num_points) for c in CHUNK_CANDIDATES}
    best = min(total.values())
    assert ev.batch_size == max(s for s, c in total.items() if c <= 1.03 * best)
    # The tangent's chunk is measured the same way, in the chosen mode.
    ev.prepare_tangent()
    tangent_sizes = [
        int(k.split()[-1]) for k in ev.plan["timings"] if k.startswith("tangent chunk")
    ]
    assert ev.plan["tangent_batch_size"] in tangent_sizes
    # Few points: one chunk, nothing timed; a given size or the environment wins.
    assert evaluator(FluxModel().double(), 3, 2, 100).batch_size == 100
    assert evaluator(FluxModel().double(), 3, 2, 100).plan["timings"] == {}
    given = evaluator(FluxModel().double(), 3, 2, 200_000, batch_size=777)
    assert given.batch_size == 777 and given.plan["batch_size_source"] == "argument"


def test_cache_size_is_read_per_core_from_the_last_level(tmp_path):
    """The highest-level data or unified cache, divided by the CPUs that share it."""
    caches = [
        ("Data", 1, "32K", "0"),
        ("Instruction", 1, "32K", "0"),
        ("Unified", 2, "1024K", "0"),
        ("Unified", 3, "32768K", "0-1,4-5"),
        ("Instruction", 4, "64M", "0"),  # not data: skipped
    ]
    for index, (kind, level, size, shared) in enumerate(caches):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "type").write_text(kind + "\n")
        (folder / "level").write_text(f"{level}\n")
        (folder / "size").write_text(size + "\n")
        (folder / "shared_cpu_list").write_text(shared + "\n")
    assert _cache._from_sysfs(tmp_path) == 32768 * 1024 // 4
    assert _cache._from_sysfs(tmp_path / "missing") is None
    assert _cache._parse_size("2M") == 2 << 20 and _cache._parse_size("512") == 512
    assert _cache._count_cpus("0-3,8,10-11") == 7


def test_an_mlps_chunks_are_bounded_by_the_cache(monkeypatch):
    """Sizes whose fused buffers exceed the cache per core are not timed or chosen."""
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh()
    )
    model.append(torch.nn.Linear(64, 1))
    kernel = PointwiseKernel(model.double(), 3, 1, CPU, torch.float64)
    # Activations 64 + 64 + 1 floats a point; the tangent adds 1 × (3 + 64 + 64) cotangents.
    assert kernel._mlp is not None
    assert kernel._mlp.bytes_per_point(False, torch.float64) == 129 * 8
    assert kernel._mlp.bytes_per_point(True, torch.float32) == 260 * 4
    gelu = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    gelu_pass = SequentialMLP.from_model(gelu, 3, 1)
    assert gelu_pass is not None  # GELU's outputs take a buffer of their own
    assert gelu_pass.bytes_per_point(False, torch.float64) == (64 + 64 + 1) * 8
    cache = 20_000 * 129 * 8  # room for 20,000 points of values
    monkeypatch.setattr(pointwise_kernel, "cache_bytes_per_core", lambda: cache)
    # On a loaded machine a chunk may time above the "expensive model" threshold, which
    # stops the timing after it: not what this test is about.
    monkeypatch.setattr(pointwise_kernel, "_SLOW_CALL", float("inf"))
    assert kernel.chunk_bound(False) == 20_000
    assert kernel.chunk_bound(True) == cache // (260 * 8)  # 9,923
    ev = evaluator(model.double(), 3, 1, 200_000)
    timed = [int(k.split()[1]) for k in ev.plan["timings"] if k.startswith("chunk")]
    assert sorted(timed) == [2048, 8192] and ev.batch_size in timed
    ev.prepare_tangent()
    timed = [int(k.split()[-1]) for k in ev.plan["timings"] if k.startswith("tangent chunk")]
    assert sorted(timed) == [2048, 8192] and ev.plan["tangent_batch_size"] in timed
    # A cache smaller than any candidate: the smallest is still timed, and kept.
    monkeypatch.setattr(pointwise_kernel, "cache_bytes_per_core", lambda: 1000)
    ev = evaluator(model.double(), 3, 1, 200_000)
    assert ev.batch_size == 2048
    assert [k for k in ev.plan["timings"] if k.startswith("chunk")] == ["chunk 2048"]
    # Other models, or an unknown cache: no bound.
    assert PointwiseKernel(FluxModel().double(), 3, 2, CPU, torch.float64).chunk_bound(True) is None
    monkeypatch.setattr(pointwise_kernel, "cache_bytes_per_core", lambda: None)
    assert kernel.chunk_bound(True) is None


def test_chunked_values_do_not_depend_on_the_chunk_size():
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    model = model.double()
    outputs = []
    for batch_size in (None, 1000, 7, 50_000):
        ev = evaluator(model, 3, 2, 20_000, batch_size=batch_size)
        ev.evaluate(tangent=True)
        outputs.append((ev.outputs.copy(), ev.tangents.copy()))
    for values, tangents in outputs[1:]:
        np.testing.assert_allclose(values, outputs[0][0], rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(tangents, outputs[0][1], rtol=1e-13, atol=1e-15)


def test_compile_failure_warns_and_runs_eagerly(monkeypatch):
    """No compiler, an unsupported Python, an untraceable model: same results, eagerly."""

    def unavailable(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python\nmore details")

    monkeypatch.setattr(torch, "compile", unavailable)
    eager = evaluator(FluxModel().double(), 3, 2, 3000)
    with pytest.warns(RuntimeWarning, match=r"compile=True: torch.compile .* failed .*eagerly"):
        ev = evaluator(FluxModel().double(), 3, 2, 3000, compile=True)
    plan = ev.plan
    assert plan["compile"] and not plan["compiled"]
    assert plan["compile_error"] == "RuntimeError: Dynamo is not supported on this Python"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, at construction only
        ev.prepare_tangent()
        for e in (ev, eager):
            e.evaluate(tangent=True)
    np.testing.assert_array_equal(ev.outputs, eager.outputs)
    np.testing.assert_array_equal(ev.tangents, eager.tangents)


def test_past_the_recompile_limit_the_closure_says_it_runs_eagerly(monkeypatch):
    """torch runs a function eagerly, with a log line only, once a code object has been
    compiled for too many shapes (closures of one model with other chunk sizes); the plan
    then still said "compiled". The trial run now fails there, so the fallback warns.

    torch.compile stood in for by a function that behaves as torch's does past its limit:
    it raises only when ``fail_on_recompile_limit_hit`` is set, as the trial run sets it.
    """
    from torch._dynamo.exc import FailOnRecompileLimitHit

    def past_the_limit(function, **kwargs):
        def compiled(*args):
            if torch._dynamo.config.fail_on_recompile_limit_hit:
                raise FailOnRecompileLimitHit("recompile_limit reached with fullgraph=True")
            return function(*args)  # what torch does otherwise: eagerly, silently

        return compiled

    monkeypatch.setattr(torch, "compile", past_the_limit)
    with pytest.warns(RuntimeWarning, match=r"compile=True: torch.compile .* failed .*eagerly"):
        ev = evaluator(FluxModel().double(), 3, 2, 3000, compile=True)
    assert not ev.plan["compiled"]
    assert ev.plan["compile_error"].startswith("FailOnRecompileLimitHit")
    assert not torch._dynamo.config.fail_on_recompile_limit_hit  # restored


def test_compiled_functions_write_the_points_last_tangent(monkeypatch):
    """The compiled tangent is computed points-last and written back point-major.

    ``torch.compile`` stood in for by the identity: the layout, the padding of the last
    chunk and the writer are tested without a compiler (below MIN_TIMED_POINTS nothing is
    timed and the compiled functions are kept).
    """
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: function)
    ev = evaluator(FluxModel().double(), 3, 2, 2500, compile=True, batch_size=1000)
    ev.evaluate(tangent=True)
    plan = ev.plan
    assert plan["compiled"] and plan["tangent_compiled"] and plan["values_path"] == "compiled"
    assert plan["compile_declined"] == {}
    x = ev.inputs
    expected = (1 + x[:, :1] ** 2) * x[:, 1:] + 0.5 * x[:, :1]
    np.testing.assert_allclose(ev.outputs, expected, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(ev.tangents, flux_tangent(x), rtol=1e-14, atol=1e-14)


def test_a_compiled_function_slower_than_eager_is_declined(monkeypatch):
    """On the CPU a compiled function that measures slower than the eager one is not kept.

    ``torch.compile`` stood in for by a wrapper that sleeps 20 ms a call: both functions
    are declined, the reasons recorded, and the results are the eager ones (the values
    bitwise; the tangent to round-off, as each evaluator times its own tangent mode).
    """
    import time

    def slow_compile(function, **kwargs):
        def slower(*args):
            time.sleep(0.02)
            return function(*args)

        return slower

    monkeypatch.setattr(torch, "compile", slow_compile)
    points = 3 * MIN_TIMED_POINTS
    eager = evaluator(FluxModel().double(), 3, 2, points, batch_size=8192)
    ev = evaluator(FluxModel().double(), 3, 2, points, compile=True, batch_size=8192)
    for e in (ev, eager):
        e.evaluate(tangent=True)
    plan = ev.plan
    assert plan["compile"] and plan["compile_error"] is None
    assert not plan["compiled"] and not plan["tangent_compiled"]
    assert plan["values_path"] == "model"
    assert set(plan["compile_declined"]) == {"values", "tangent"}
    assert "eager kept" in plan["compile_declined"]["tangent"]
    timings = plan["timings"]
    assert timings["values compiled"] > timings["values eager"]
    assert timings["tangent compiled"] > timings["tangent eager"]
    np.testing.assert_array_equal(ev.outputs, eager.outputs)
    np.testing.assert_allclose(ev.tangents, eager.tangents, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(ev.tangents, flux_tangent(ev.inputs), rtol=1e-14, atol=1e-14)


@pytest.mark.slow
def test_compiled_closure_equals_the_eager_one():
    """``compile=True`` (inductor on the CPU): values and tangent as eager, to round-off.

    Slow: the first compilation takes from 20 s to minutes on a busy 2-core machine.
    """
    msh = mesh.create_unit_square(MPI.COMM_SELF, 20, 20)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: np.sin(3 * x[0]) + x[1] ** 2)
    closures = [
        mno.Closure(FluxModel().double(), [u, ufl.grad(u)], (2,), device="cpu", compile=c)
        for c in (False, True)
    ]
    plan = closures[1].evaluation_plan
    if plan["compile_error"] is not None:
        pytest.skip(f"torch.compile is unavailable here: {plan['compile_error']}")
    assert plan["compiled"]
    for closure in closures:
        closure.update(tangent=True)
    assert closures[1].evaluation_plan["tangent_compiled"]
    eager, compiled = closures
    np.testing.assert_allclose(compiled.x.array, eager.x.array, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(
        compiled.tangent.x.array, eager.tangent.x.array, rtol=1e-13, atol=1e-13
    )


def test_kernel_rejects_unknown_modes():
    kernel = PointwiseKernel(torch.nn.Linear(2, 1).double(), 2, 1, CPU, torch.float64)
    with pytest.raises(ValueError, match="mode must be None or one of"):
        kernel.prepare_tangent(10, "sideways")


def plain_mlp(num_outputs, dtype=torch.float64, activation=torch.nn.Tanh):
    torch.manual_seed(3)
    layers = [torch.nn.Linear(3, 16), activation(), torch.nn.Linear(16, 16)]
    layers += [torch.nn.Sigmoid(), torch.nn.Identity(), torch.nn.Linear(16, num_outputs)]
    return torch.nn.Sequential(*layers).to(dtype)


GELUS = {
    "gelu": torch.nn.GELU,
    "gelu tanh": functools.partial(torch.nn.GELU, approximate="tanh"),
}


@pytest.mark.parametrize("activation", ["tanh", "gelu", "gelu tanh"])
@pytest.mark.parametrize("num_outputs", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_mlp_pass_gives_the_model_and_autograd(num_outputs, dtype, activation):
    """The fused pass for plain MLPs (tanh or GELU, exact or tanh-approximated, then a
    sigmoid): the model's values, autograd's tangent (round-off)."""
    points = 3000  # two chunks of 2048 with the given batch size: a shorter last chunk
    layer = GELUS.get(activation, torch.nn.Tanh)
    model = plain_mlp(num_outputs, dtype, layer)
    assert SequentialMLP.from_model(model, 3, num_outputs) is not None
    fused = evaluator(model, 3, num_outputs, points, batch_size=2048)
    assert fused.prepare_tangent("sequential") == "sequential"
    reference = evaluator(
        plain_mlp(num_outputs, dtype, layer), 3, num_outputs, points, batch_size=2048
    )
    reference.prepare_tangent("reverse-loop")
    for ev in (fused, reference):
        ev.evaluate(tangent=True)
    eps = torch.finfo(dtype).eps
    with torch.no_grad():
        x = torch.from_numpy(fused.inputs).to(dtype)
        expected = fused.model(x).double().numpy()
    np.testing.assert_allclose(fused.outputs, expected, rtol=8 * eps, atol=8 * eps)
    scale = np.abs(reference.tangents).max()
    np.testing.assert_allclose(fused.tangents, reference.tangents, rtol=0, atol=64 * eps * scale)
    # Values alone go through the fused pass too when it is not slower (recorded).
    assert fused.plan["values_path"] in ("model", "sequential")
    fused.evaluate()
    np.testing.assert_allclose(fused.outputs, expected, rtol=8 * eps, atol=8 * eps)


def tanh_mlp(num_outputs, dtype):
    """``3 → 32 → 32 → num_outputs`` with two tanh layers (the fused pass's common case)."""
    torch.manual_seed(4)
    layers = [torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(32, num_outputs)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gemm", ["torch", "numpy"])
@pytest.mark.parametrize("kernel", ["torch", "numpy"])
def test_fused_mlp_pass_with_either_tanh_kernel(kernel, gemm, dtype):
    """Torch's or NumPy's tanh, torch's or NumPy's BLAS: the model's values to a few ulps,
    and the tangent of those activations (autograd's, to round-off)."""
    model = tanh_mlp(2, dtype)
    mlp = SequentialMLP.from_model(model, 3, 2)
    assert mlp is not None and mlp.has_tanh and mlp.tanh_kernel == "torch"
    assert mlp.gemm_kernel == "torch"
    mlp.use_tanh_kernel(kernel, dtype, CPU)
    mlp.use_gemm_kernel(gemm, dtype, CPU)
    assert (mlp.tanh_kernel, mlp.gemm_kernel) == (kernel, gemm)
    x = torch.rand(1000, 3, dtype=dtype, generator=torch.Generator().manual_seed(1)) * 4 - 2
    out = torch.empty(1000, 2, 3, dtype=dtype)
    with torch.inference_mode():
        values, has_graph = mlp.values_and_tangent(x, out)
        expected = model(x)
    eps = torch.finfo(dtype).eps
    scale = float(expected.abs().max())
    assert has_graph and float((values - expected).abs().max()) <= 8 * eps * scale
    jacobian = torch.func.vmap(torch.func.jacrev(model))(x).detach()
    assert float((out - jacobian).abs().max()) <= 64 * eps * float(jacobian.abs().max())
    if kernel == "numpy":  # really another kernel: NumPy's tanh is not torch's bit for bit
        h = torch.linspace(-3, 3, 10001, dtype=dtype)
        assert not torch.equal(torch.tanh(h), torch.from_numpy(np.tanh(h.numpy())))


def test_tanh_kernel_refuses_what_it_cannot_run():
    mlp = SequentialMLP.from_model(tanh_mlp(1, torch.float64), 3, 1)
    assert mlp is not None
    with pytest.raises(ValueError, match="Unknown tanh kernel 'sleef'"):
        mlp.use_tanh_kernel("sleef", torch.float64, CPU)
    with pytest.raises(ValueError, match="float32 or float64 buffers on the CPU"):
        mlp.use_tanh_kernel("numpy", torch.bfloat16, CPU)
    with pytest.raises(ValueError, match="Unknown GEMM kernel 'mkl'"):
        mlp.use_gemm_kernel("mkl", torch.float64, CPU)
    with pytest.raises(ValueError, match="float32 or float64 buffers on the CPU"):
        mlp.use_gemm_kernel("numpy", torch.float16, CPU)
    assert (mlp.tanh_kernel, mlp.gemm_kernel) == ("torch", "torch")  # unchanged
    # Buffers of a dtype NumPy cannot hold, with NumPy's kernels chosen: torch's run.
    model = tanh_mlp(1, torch.bfloat16)
    mlp = SequentialMLP.from_model(model, 3, 1)
    assert mlp is not None
    mlp.use_tanh_kernel("numpy", torch.float32, CPU)
    mlp.use_gemm_kernel("numpy", torch.float32, CPU)
    x = torch.rand(64, 3, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(mlp.values(x), model(x))


def test_numpy_gemm_runs_at_torchs_thread_count():
    """NumPy's BLAS runs the fused pass's products with torch's thread count, and gets its
    own back afterwards, also after an error in the block."""
    from dolfinx_mno import _blas, mlp_kernel

    threads = torch.get_num_threads()
    libs = _blas._controllers()
    before = _blas.blas_threads()
    other = threads + 1
    try:
        for lib in libs:  # a BLAS built without threads keeps 1
            lib.set_num_threads(other)
        settable = [i for i, count in enumerate(_blas.blas_threads()) if count == other]
        assert settable  # NumPy's OpenBLAS at least

        def counts() -> list[int]:
            return [_blas.blas_threads()[i] for i in settable]

        seen = []
        original = np.matmul

        def spy(*args, **kwargs):
            seen.append(counts())
            return original(*args, **kwargs)

        mlp = SequentialMLP.from_model(tanh_mlp(2, torch.float64), 3, 2)
        assert mlp is not None
        mlp.use_gemm_kernel("numpy", torch.float64, CPU)
        x = torch.rand(50, 3, dtype=torch.float64)
        with mock.patch.object(mlp_kernel.np, "matmul", spy), torch.inference_mode():
            mlp.values_and_tangent(x, torch.empty(50, 2, 3, dtype=torch.float64))
        # Three products for the values, two for the tangent (the last layer's is a copy).
        assert seen == [[threads] * len(settable)] * 5
        assert counts() == [other] * len(settable)
        with pytest.raises(ZeroDivisionError), _blas.torch_threads():
            assert counts() == [threads] * len(settable)
            _ = 1 / 0
        assert counts() == [other] * len(settable)
    finally:
        for lib, count in zip(libs, before, strict=True):
            lib.set_num_threads(count)
    assert _blas.blas_threads() == before


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_faster_tanh_kernel_is_chosen_and_recorded(dtype):
    """Timed on a sample once (at construction): the plan names the kernel whose time is
    the lower, and the values (and the fused tangent) use it."""
    points = 2 * MIN_TIMED_POINTS
    ev = evaluator(tanh_mlp(1, dtype), 3, 1, points)
    plan = ev.plan
    timings = plan["timings"]
    fused = {k: v for k, v in timings.items() if k.startswith("values sequential")}
    assert sorted(fused) == [
        "values sequential",
        "values sequential numpy gemm",
        "values sequential numpy tanh",
        "values sequential numpy tanh numpy gemm",
    ]
    fastest = min(fused, key=fused.__getitem__)
    assert plan["tanh_kernel"] == ("numpy" if "numpy tanh" in fastest else "torch")
    assert plan["gemm_kernel"] == ("numpy" if "numpy gemm" in fastest else "torch")
    assert plan["values_path"] == (
        "sequential" if fused[fastest] <= timings["values model"] else "model"
    )
    assert ev.prepare_tangent("sequential") == "sequential"
    ev.evaluate(tangent=True)
    x = torch.from_numpy(ev.inputs).to(dtype)
    with torch.no_grad():
        expected = ev.model(x).double().numpy()
    eps = torch.finfo(dtype).eps
    np.testing.assert_allclose(ev.outputs, expected, rtol=8 * eps, atol=8 * eps)


def test_tanh_kernel_without_timing_or_tanh():
    """Too few points to time: torch's tanh and BLAS. No tanh layer: no tanh kernel; no
    fused pass: neither."""
    plan = evaluator(tanh_mlp(1, torch.float64), 3, 1, 100).plan
    assert (plan["tanh_kernel"], plan["gemm_kernel"]) == ("torch", "torch")
    sigmoid = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 1))
    plan = evaluator(sigmoid.double(), 3, 1, 100).plan
    assert (plan["tanh_kernel"], plan["gemm_kernel"]) == (None, "torch")
    relu = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    plan = evaluator(relu.double(), 3, 1, 100).plan
    assert (plan["tanh_kernel"], plan["gemm_kernel"]) == (None, None)


class MyLinear(torch.nn.Linear):
    pass


@pytest.mark.parametrize(
    "model",
    [
        torch.nn.Sequential(MyLinear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)),
        torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(3, 1)),
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)),
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()),
        torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Tanh(), torch.nn.Linear(4, 1)
        ),
    ],
    ids=["subclass", "activation first", "relu", "ends in tanh", "two activations"],
)
def test_fused_mlp_pass_is_only_for_plain_mlps(model):
    out = model[-1].out_features if isinstance(model[-1], torch.nn.Linear) else 4
    assert SequentialMLP.from_model(model, 3, out) is None
    ev = evaluator(model.double(), 3, out, 100)
    assert ev.plan["values_path"] == "model"
    with pytest.raises(ValueError, match="'sequential' needs a plain MLP"):
        ev.prepare_tangent("sequential")


def test_fused_mlp_pass_skips_models_with_hooks():
    model = plain_mlp(1)
    model[0].register_forward_hook(lambda module, args, output: output * 2)
    assert SequentialMLP.from_model(model, 3, 1) is None


@pytest.mark.parametrize(
    "layers",
    [
        [torch.nn.Linear(3, 2)],
        [torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)],
        [torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Linear(4, 2)],
    ],
    ids=["one linear", "two linear", "linear after linear"],
)
def test_fused_mlp_pass_handles_linear_layers_in_a_row(layers):
    torch.manual_seed(5)
    model = torch.nn.Sequential(*layers).double()
    fused = evaluator(model, 3, 2, 500)
    assert fused.prepare_tangent("sequential") == "sequential"
    fused.evaluate(tangent=True)
    reference = evaluator(model, 3, 2, 500)
    reference.prepare_tangent("reverse-loop")
    reference.evaluate(tangent=True)
    np.testing.assert_allclose(fused.tangents, reference.tangents, rtol=1e-13, atol=1e-14)


def function_mlp(kind):
    """MLPs for MLPFunction: tanh, sigmoid and identity layers; no biases; two linear
    layers in a row; a one-output last layer (its backward is a broadcast product); GELU,
    exact and tanh-approximated."""
    torch.manual_seed(5)
    if kind == "mixed":
        return plain_mlp(2)
    if kind == "no bias":
        layers = [torch.nn.Linear(3, 8, bias=False), torch.nn.Tanh()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(8, 1, bias=False)).double()
    if kind.startswith("gelu"):
        return plain_mlp(2, activation=GELUS[kind])
    layers = [torch.nn.Linear(3, 8), torch.nn.Linear(8, 8), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(8, 1)).double()


@pytest.mark.parametrize("kind", ["mixed", "no bias", "linear twice", "gelu", "gelu tanh"])
@pytest.mark.parametrize("gemm", ["torch", "numpy"])
@pytest.mark.parametrize("kernel", ["torch", "numpy"])
def test_mlp_function_gradients(kind, kernel, gemm):
    """MLPFunction's hand-written backward: gradcheck in the inputs and every weight and
    bias (float64), a frozen layer gets no gradient, and a second derivative is refused."""
    from dolfinx_mno.mlp_kernel import MLPFunction

    model = function_mlp(kind)
    mlp = SequentialMLP.from_model(model, 3, model[-1].out_features)
    assert mlp is not None
    tensors = []  # weight and bias (None without one) of each linear layer
    for linear in [m for m in model if isinstance(m, torch.nn.Linear)]:
        for p in (linear.weight, linear.bias):
            tensors.append(None if p is None else p.detach().clone().requires_grad_())
    given = [t for t in tensors if t is not None]
    x = torch.from_numpy(np.random.default_rng(3).random((40, 3)) * 2 - 1).requires_grad_()

    def function(x, *tensors):
        return MLPFunction.apply(mlp.layers, kernel == "numpy", gemm == "numpy", x, *tensors)

    assert torch.autograd.gradcheck(function, (x, *tensors))
    with torch.no_grad():  # the values are the model's
        expected = model(x)
    eps = torch.finfo(torch.float64).eps
    assert float((function(x, *tensors).detach() - expected).abs().max()) <= 8 * eps
    # Only what is asked for: a frozen first weight and x without grad.
    tensors[0].requires_grad_(False)
    y = function(x.detach(), *tensors)
    grads = torch.autograd.grad(y.sum(), given[1:])
    shapes = [g.shape for g in grads]
    assert shapes == [t.shape for t in given[1:]]
    gradient = torch.autograd.grad(function(x, *tensors).sum(), x, create_graph=False)[0]
    assert gradient.shape == x.shape
    with pytest.raises(RuntimeError, match="Second derivatives through a closure's fused MLP"):
        torch.autograd.grad(function(x, *tensors).sum(), x, create_graph=True)
    # The activations are saved as autograd saves its own: kept with retain_graph, freed
    # after a backward (a second one is refused), checked against in-place changes.
    y = function(x, *tensors).sum()
    first = torch.autograd.grad(y, x, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(y, x)[0], first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(y, x)
    y = function(x, *tensors).sum()
    with torch.no_grad():
        given[-1].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y, x)


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel", ["torch", "numpy", "numpy gemm", "numpy tanh and gemm"])
def test_differentiable_values_give_the_models_values_and_gradients(kernel, dtype, normalized):
    """The graph rollouts differentiate (MLPFunction): with torch's tanh and BLAS the
    model's values and autograd's gradients to round-off; with NumPy's tanh or BLAS the
    model's values to 8 ulp and autograd's gradients (inputs and every parameter,
    statistics included) to 64 ulp."""
    layers = [torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16)]
    layers += [torch.nn.Tanh(), torch.nn.Identity(), torch.nn.Linear(16, 2)]
    if normalized:
        model = normalized_mlp(layers, 2, dtype)
        for norm in (model.input_normalization, model.output_normalization):
            for name in ("shift", "scale"):  # trainable statistics get gradients too
                setattr(norm, name, torch.nn.Parameter(getattr(norm, name).clone()))
    else:
        torch.manual_seed(3)
        model = torch.nn.Sequential(*layers).to(dtype)
    kernel_of = PointwiseKernel(model, 3, 2, CPU, dtype)
    assert kernel_of._mlp is not None
    tanh = "numpy" if kernel in ("numpy", "numpy tanh and gemm") else "torch"
    kernel_of._mlp.use_tanh_kernel(tanh, dtype, CPU)
    kernel_of._mlp.use_gemm_kernel("numpy" if "gemm" in kernel else "torch", dtype, CPU)
    x = torch.from_numpy(np.random.default_rng(1).random((300, 3)) * 4 - 2).to(dtype)
    cotangent = torch.from_numpy(np.random.default_rng(2).random((300, 2))).to(dtype)
    parameters = list(model.parameters())
    assert len(parameters) == 6 + 4 * normalized

    def gradients(function):
        inputs = x.clone().requires_grad_()
        y = function(inputs)
        return y.detach(), torch.autograd.grad(y, [inputs, *parameters], cotangent)

    y, grads = gradients(kernel_of.differentiable_values)
    y_ref, grads_ref = gradients(model)
    eps = torch.finfo(dtype).eps
    if kernel == "torch":
        assert torch.equal(y, y_ref)
        assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref, strict=True))
        return
    if tanh == "numpy":  # the two tanh differ somewhere in the last bits
        assert not torch.equal(y, y_ref)
    assert float((y - y_ref).abs().max()) <= 8 * eps * float(y_ref.abs().max())
    for g, r in zip(grads, grads_ref, strict=True):
        assert float((g - r).abs().max()) <= 64 * eps * float(r.abs().max())


@pytest.mark.parametrize("normalized", [False, True])
def test_differentiable_values_without_a_graph_run_through_the_buffers(normalized, monkeypatch):
    """Without a graph (forward rollouts) the fused MLP runs through the updates' buffers,
    chunk by chunk: the values of the graph's pass to a few ulps, in a fresh tensor (a
    later call does not overwrite it), MLPFunction not called, the buffers unchanged."""
    from dolfinx_mno import mlp_kernel

    layers = [torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)]
    if normalized:
        model = normalized_mlp(layers, 2)
    else:
        torch.manual_seed(3)
        model = torch.nn.Sequential(*layers).double()
    kernel_of = PointwiseKernel(model, 3, 2, CPU, torch.float64)
    assert kernel_of._mlp is not None
    kernel_of._mlp.use_tanh_kernel("numpy", torch.float64, CPU)
    kernel_of.reserve(1000)
    buffers = [b.data_ptr() for b in kernel_of._mlp._activations]
    x = torch.from_numpy(np.random.default_rng(1).random((2500, 3)) * 4 - 2)
    with_graph = kernel_of.differentiable_values(x.clone().requires_grad_())
    assert with_graph.requires_grad
    calls = []
    original = mlp_kernel.MLPFunction.apply
    monkeypatch.setattr(mlp_kernel.MLPFunction, "apply", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        first = kernel_of.differentiable_values(x)
        kept = first.clone()
        second = kernel_of.differentiable_values(x[:700] + 1.0)
    assert not calls and not first.requires_grad
    assert first.shape == (2500, 2) and second.shape == (700, 2)
    assert torch.equal(first, kept)  # not a view of a buffer the second call rewrote
    eps = torch.finfo(torch.float64).eps
    with_graph = with_graph.detach()
    scale = float(with_graph.abs().max())
    assert float((first - with_graph).abs().max()) <= 8 * eps * scale
    assert [b.data_ptr() for b in kernel_of._mlp._activations] == buffers
    assert kernel_of._mlp._capacity == 1000


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "gelu", "softplus"])
def test_the_packages_mlp_runs_the_fused_pass(activation, normalized):
    """dolfinx_mno.MLP (alone or in the NormalizedModel fit returns) with a recognised
    activation runs the fused pass: the model's values and autograd's tangent; with
    another activation, the generic modes. Replacing its layers later is refused."""
    model = mno.MLP(3, 2, hidden_features=[16, 16], activation=activation, seed=2)
    if normalized:
        model = mno.NormalizedModel(
            model,
            mno.AffineNormalization(shift=[0.3, -1.0, 2.0], scale=[0.5, 2.0, 4.0], width=3),
            mno.AffineNormalization(shift=[1.0, -1.0], scale=[2.0, 0.5], width=2),
        )
    recognised = activation != "softplus"
    assert (SequentialMLP.from_model(model, 3, 2) is not None) == recognised
    fused = evaluator(model, 3, 2, 3000, batch_size=2048)
    assert fused.prepare_tangent() == ("sequential" if recognised else fused.tangent_mode)
    reference = evaluator(model, 3, 2, 3000, batch_size=2048)
    reference.kernel._mlp = None  # the generic modes
    reference.prepare_tangent("reverse-loop")
    for ev in (fused, reference):
        ev.evaluate(tangent=True)
    with torch.no_grad():
        expected = model(torch.from_numpy(fused.inputs)).numpy()
    np.testing.assert_allclose(fused.outputs, expected, rtol=1e-14, atol=1e-14)
    scale = np.abs(reference.tangents).max()
    np.testing.assert_allclose(fused.tangents, reference.tangents, rtol=0, atol=1e-13 * scale)
    if recognised:
        mlp = model.model if normalized else model
        mlp.layers = torch.nn.Sequential(*mlp.layers).eval()  # new container, same modules
        with pytest.raises(RuntimeError, match="replaced after the closure was built"):
            fused.evaluate()


def test_fused_mlp_pass_refuses_a_model_whose_layers_were_replaced():
    model = plain_mlp(1).eval()
    ev = evaluator(model, 3, 1, 100)
    assert ev.plan["values_path"] == "sequential"
    ev.evaluate()
    model[2] = torch.nn.Linear(16, 16).double().eval()  # weights the buffers do not follow
    with pytest.raises(RuntimeError, match="layers were replaced after the closure was built"):
        ev.evaluate()


@pytest.mark.parametrize("gemm", ["torch", "numpy"])
@pytest.mark.parametrize("normalized", [False, True])
def test_fused_mlp_pass_follows_parameters_replaced_between_updates(gemm, normalized):
    """The fused values pass binds each layer's weight once (its plan); a weight or bias
    replaced, given new memory or changed in place between updates is used by the next
    one: every update's values are the model's own, to round-off."""
    layers = [torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)]
    model = normalized_mlp(layers, 2) if normalized else plain_mlp(2)
    inner = model.model if normalized else model
    first, last = inner[0], inner[-1]
    ev = evaluator(model, 3, 2, 3000, batch_size=1024)  # three chunks, the last shorter
    assert ev.plan["values_path"] == "sequential"
    ev.kernel._mlp.use_gemm_kernel(gemm, torch.float64, CPU)
    generator = torch.Generator().manual_seed(5)

    def new(tensor):
        return torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) - 0.5

    other = copy.deepcopy(model)
    for parameter in other.parameters():
        parameter.data = new(parameter)
    changes = [
        lambda: setattr(first, "weight", torch.nn.Parameter(new(first.weight))),
        lambda: setattr(last, "bias", torch.nn.Parameter(new(last.bias))),
        lambda: setattr(last.weight, "data", new(last.weight)),  # new memory, same Parameter
        lambda: first.weight.data.mul_(2.0),  # in place
        lambda: model.load_state_dict(other.state_dict(), assign=True),
    ]
    x = torch.from_numpy(ev.inputs)
    for change in [lambda: None, *changes]:
        change()
        ev.evaluate()
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(ev.outputs, expected, rtol=1e-13, atol=1e-13)


def normalized_mlp(layers, num_outputs, dtype=torch.float64, scalar_output=False):
    """A plain MLP behind a pointwise NormalizedModel with non-trivial statistics."""
    torch.manual_seed(7)
    inner = torch.nn.Sequential(*layers).to(dtype)
    width = 1 if scalar_output else num_outputs
    return mno.NormalizedModel(
        inner,
        mno.AffineNormalization(shift=[0.3, -1.0, 2.0], scale=[0.5, 2.0, 4.0], width=3),
        mno.AffineNormalization(
            shift=torch.linspace(-1.0, 1.0, width),
            scale=torch.linspace(3.0, 5.0, width),
            width=width if not scalar_output else num_outputs,
        ),
    )


@pytest.mark.parametrize(
    "layers, num_outputs",
    [
        ([torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)], 2),
        (
            [
                torch.nn.Linear(3, 8),
                torch.nn.Tanh(),
                torch.nn.Linear(8, 8),
                torch.nn.Tanh(),
                torch.nn.Linear(8, 1),
            ],
            1,
        ),
        ([torch.nn.Linear(3, 2)], 2),
    ],
    ids=["one hidden", "two hidden", "one linear"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_mlp_pass_folds_a_normalized_model(layers, num_outputs, dtype):
    """NormalizedModel(Sequential): the statistics are folded into the outer linear layers;
    values equal the wrapped model's and the tangent autograd's (round-off)."""
    model = normalized_mlp(layers, num_outputs, dtype).eval()
    assert SequentialMLP.from_model(model, 3, num_outputs) is not None
    fused = evaluator(model, 3, num_outputs, 3000, batch_size=2048)
    assert fused.prepare_tangent("sequential") == "sequential"
    reference = evaluator(model, 3, num_outputs, 3000, batch_size=2048)
    reference.prepare_tangent("reverse-loop")
    for ev in (fused, reference):
        ev.evaluate(tangent=True)
    eps = torch.finfo(dtype).eps
    with torch.no_grad():
        expected = model(torch.from_numpy(fused.inputs).to(dtype)).double().numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(fused.outputs, expected, rtol=0, atol=32 * eps * scale)
    tangent_scale = np.abs(reference.tangents).max()
    np.testing.assert_allclose(
        fused.tangents, reference.tangents, rtol=0, atol=64 * eps * tangent_scale
    )
    # Statistics changed after construction (say by further training) are seen.
    with torch.no_grad():
        model.input_normalization.shift.mul_(-2.0)
        model.output_normalization.scale.mul_(0.5)
        expected = model(torch.from_numpy(fused.inputs).to(dtype)).double().numpy()
    fused.evaluate(tangent=True)
    np.testing.assert_allclose(fused.outputs, expected, rtol=0, atol=32 * eps * scale)
    # A replaced normalisation is refused, as replaced layers are.
    model.input_normalization = mno.AffineNormalization(width=3).to(dtype).eval()
    with pytest.raises(RuntimeError, match="layers or normalisations were replaced"):
        fused.evaluate(tangent=True)


def test_fused_mlp_pass_refuses_normalized_models_it_cannot_fold():
    inner = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    model = mno.NormalizedModel(
        inner.double(), mno.AffineNormalization(width=3), mno.AffineNormalization(width=1)
    )
    assert SequentialMLP.from_model(model, 3, 1) is None  # ReLU inside
    fields = mno.NormalizedModel(
        torch.nn.Sequential(torch.nn.Linear(3, 1)).double(),
        mno.AffineNormalization(width=3, axis=1),
        mno.AffineNormalization(width=1, axis=1),
    )
    assert SequentialMLP.from_model(fields, 3, 1) is None  # per-channel (grid) layout


class OpaqueSequential(torch.nn.Sequential):
    """An ``nn.Sequential`` the fused pass does not recognise: the model's own forward."""


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cells", ["timed", "tiny"])
def test_tanh_kernel_choice_per_rank_gives_the_models_values(dtype, cells, tiny_square):
    """Each rank chooses its tanh and GEMM kernels (timed where it has ≥ MIN_TIMED_POINTS
    points, torch's where it has fewer or none); on every rank the closure's values equal those of
    the same MLP run through its own forward (a subclass the fused pass skips)."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 48, 48) if cells == "timed" else tiny_square
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: np.sin(3 * x[0]) * x[1] - 0.5)
    model = tanh_mlp(1, dtype)
    fused = mno.Closure(model, [u, ufl.grad(u)], quadrature_degree=2, device="cpu")
    plain = mno.Closure(
        OpaqueSequential(*model).eval(), [u, ufl.grad(u)], quadrature_degree=2, device="cpu"
    )
    fused.update()
    plain.update()
    plan = fused.evaluation_plan
    assert plain.evaluation_plan["values_path"] == "model"
    timings = plan["timings"]
    timed = "values sequential numpy tanh" in timings
    if timed:
        passes = {k: v for k, v in timings.items() if k.startswith("values sequential")}
        assert len(passes) == 4
        fastest = min(passes, key=passes.__getitem__)
        assert plan["tanh_kernel"] == ("numpy" if "numpy tanh" in fastest else "torch")
        assert plan["gemm_kernel"] == ("numpy" if "numpy gemm" in fastest else "torch")
    else:
        assert (plan["tanh_kernel"], plan["gemm_kernel"]) == ("torch", "torch")
    # 13,824 points on one rank; 6 (two cells) on the tiny square, none on a rank without.
    if msh.comm.size == 1:
        assert timed == (cells == "timed")
    if cells == "tiny":
        assert not timed
    eps = torch.finfo(dtype).eps
    scale = MPI.COMM_WORLD.allreduce(float(np.abs(plain.x.array).max(initial=0.0)), op=MPI.MAX)
    error = float(np.abs(fused.x.array - plain.x.array).max(initial=0.0))
    assert MPI.COMM_WORLD.allreduce(error, op=MPI.MAX) <= 8 * eps * scale
    assert scale > 0.1


@pytest.mark.mpi
def test_cache_bound_per_rank_keeps_the_models_values_and_tangent(monkeypatch, tiny_square):
    """With a cache for 3,000 points of tangent buffers, every rank with points to time
    keeps chunks within it (or the smallest candidate), and its values and tangents equal
    those of the same MLP run through its own forward, on ranks with and without cells."""
    model = tanh_mlp(1, torch.float64)
    assert SequentialMLP.from_model(model, 3, 1) is not None
    per_point = SequentialMLP.from_model(model, 3, 1).bytes_per_point(True, torch.float64)
    monkeypatch.setattr(pointwise_kernel, "cache_bytes_per_core", lambda: 3000 * per_point)
    for msh in (mesh.create_unit_square(MPI.COMM_WORLD, 48, 48), tiny_square):
        u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
        u.interpolate(lambda x: np.sin(3 * x[0]) * x[1] - 0.5)
        fused = mno.Closure(model, [u, ufl.grad(u)], quadrature_degree=2, device="cpu")
        plain = mno.Closure(
            OpaqueSequential(*model).eval(), [u, ufl.grad(u)], quadrature_degree=2, device="cpu"
        )
        for closure in (fused, plain):
            closure.update(tangent=True)
        plan = fused.evaluation_plan
        if any(key.startswith("tangent chunk") for key in plan["timings"]):
            assert plan["tangent_batch_size"] == 2048  # 8,192 exceeds the bound
            assert "tangent chunk 8192" not in plan["timings"]
        for a, b in ((fused.x, plain.x), (fused.tangent.x, plain.tangent.x)):
            error = float(np.abs(a.array - b.array).max(initial=0.0))
            scale = float(np.abs(b.array).max(initial=0.0))
            assert MPI.COMM_WORLD.allreduce(error - 64 * 2.2e-16 * scale, op=MPI.MAX) <= 0


@pytest.mark.mpi
@pytest.mark.parametrize("kernels", ["numpy tanh, numpy gemm", "torch tanh, numpy gemm"])
def test_numpy_gemm_on_every_rank_gives_the_models_values_and_tangent(kernels, tiny_square):
    """With NumPy's BLAS in the fused pass on every rank (forced), updates with tangent
    equal those of the same MLP run through its own forward, on ranks with and without
    cells; NumPy's BLAS runs at torch's thread count during the update only."""
    from dolfinx_mno import _blas

    tanh = kernels.split(" tanh")[0]
    model = tanh_mlp(2, torch.float64)
    before = _blas.blas_threads()
    for msh in (mesh.create_unit_square(MPI.COMM_WORLD, 24, 24), tiny_square):
        u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
        u.interpolate(lambda x: np.sin(3 * x[0]) * x[1] - 0.5)
        fused = mno.Closure(model, [u, ufl.grad(u)], (2,), quadrature_degree=2, device="cpu")
        plain = mno.Closure(
            OpaqueSequential(*model).eval(), [u, ufl.grad(u)], (2,), 2, device="cpu"
        )
        mlp = fused._evaluator.kernel._mlp
        assert mlp is not None
        mlp.use_tanh_kernel(tanh, torch.float64, CPU)
        mlp.use_gemm_kernel("numpy", torch.float64, CPU)
        for closure in (fused, plain):
            closure.update(tangent=True)
        plan = fused.evaluation_plan
        assert (plan["tanh_kernel"], plan["gemm_kernel"]) == (tanh, "numpy")
        for a, b in ((fused.x, plain.x), (fused.tangent.x, plain.tangent.x)):
            error = float(np.abs(a.array - b.array).max(initial=0.0))
            scale = MPI.COMM_WORLD.allreduce(float(np.abs(b.array).max(initial=0.0)), op=MPI.MAX)
            assert scale > 1e-2
            assert MPI.COMM_WORLD.allreduce(error, op=MPI.MAX) <= 64 * 2.2e-16 * scale
    assert _blas.blas_threads() == before


@pytest.mark.mpi
def test_reverse_columns_on_every_rank_gives_the_exact_tangent(tiny_square):
    """The analytic flux's tangent in mode reverse-columns (forced on every rank) is the
    hand-written one, on ranks with and without cells, and equals reverse mode's."""
    for msh in (mesh.create_unit_square(MPI.COMM_WORLD, 24, 24), tiny_square):
        u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
        u.interpolate(lambda x: np.sin(3 * x[0]) * x[1] - 0.5)
        closures = {}
        for mode in ("reverse", "reverse-columns"):
            closure = mno.Closure(
                FluxModel().double(), [u, ufl.grad(u)], (2,), quadrature_degree=2, device="cpu"
            )
            assert closure._evaluator.prepare_tangent(mode) == mode
            closure.update(tangent=True)
            closures[mode] = closure
        columns = closures["reverse-columns"]
        inputs = columns._evaluator.inputs
        expected = flux_tangent(inputs).reshape(-1)
        error = float(np.abs(columns._evaluator.tangents.reshape(-1) - expected).max(initial=0))
        assert MPI.COMM_WORLD.allreduce(error, op=MPI.MAX) <= 1e-14
        difference = closures["reverse"].tangent.x.array - columns.tangent.x.array
        assert (
            MPI.COMM_WORLD.allreduce(float(np.abs(difference).max(initial=0)), op=MPI.MAX) <= 1e-15
        )
        assert columns.evaluation_plan["tangent_mode"] == "reverse-columns"
