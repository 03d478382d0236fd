"""The NumPy/torch boundary: models run for inference, tangents need autograd."""

import tracemalloc

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno.petsc import NonlinearProblem
from dolfinx_mno.torch_bridge import GridEvaluator, PointwiseEvaluator


@pytest.fixture
def u():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    u.interpolate(lambda x: x[0] + 2 * x[1])
    return u


class Dropped(torch.nn.Module):
    """A linear map behind a dropout layer (p = 0.5)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1).double()
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(self.linear(x))


@pytest.mark.mpi
def test_dropout_is_off_and_training_mode_is_refused(u):
    model = Dropped()
    assert model.training  # a fresh module is in training mode
    closure = mno.Closure(model, [u, ufl.grad(u)], device="cpu")
    assert not any(m.training for m in model.modules())
    closure.update()
    first = closure.x.array.copy()
    closure.update()
    np.testing.assert_array_equal(closure.x.array, first)
    # Without dropout the values are the linear map itself.
    x = closure._evaluator.inputs
    expected = model.linear(torch.from_numpy(x)).detach().numpy().reshape(-1)
    np.testing.assert_allclose(closure._evaluator.outputs.reshape(-1), expected, rtol=1e-14)

    model.train()
    with pytest.raises(mno.ClosureEvaluationError, match=r"training mode.*model\.eval\(\)"):
        closure.update()
    np.testing.assert_array_equal(closure.x.array, first)  # values kept
    model.eval()
    closure.update()
    np.testing.assert_array_equal(closure.x.array, first)


@pytest.mark.mpi
def test_batch_norm_statistics_are_not_touched_by_construction(u):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
    mean = model[1].running_mean.clone()
    mno.Closure(model, [u, ufl.grad(u)], value_shape=(4,), device="cpu").update()
    torch.testing.assert_close(model[1].running_mean, mean, rtol=0, atol=0)
    assert int(model[1].num_batches_tracked) == 0


class NoGrad(torch.nn.Module):
    """q = x₀² computed under no_grad: right values, no autograd graph."""

    def forward(self, x):
        with torch.no_grad():
            return x[:, :1] ** 2


class Detached(torch.nn.Module):
    def forward(self, x):
        return (x[:, :1] ** 2).detach()


class Constant(torch.nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 1), 3.0, dtype=x.dtype)


@pytest.mark.mpi
@pytest.mark.parametrize("model", [NoGrad(), Detached()], ids=["no_grad", "detach"])
def test_tangent_of_a_model_without_autograd_fails_loudly(u, model):
    closure = mno.Closure(model, [u], device="cpu")
    closure.update()  # values alone are fine
    np.testing.assert_allclose(
        closure._evaluator.outputs[:, 0], closure._evaluator.inputs[:, 0] ** 2, rtol=1e-14
    )
    values = closure.x.array.copy()
    message = r"depends on its inputs but carries no autograd graph.*no_grad"
    with pytest.raises(mno.ClosureEvaluationError, match=message):
        closure.update(tangent=True)
    np.testing.assert_array_equal(closure.x.array, values)
    # Newton reports it rather than converging slowly on a zero tangent.
    v = ufl.TestFunction(u.function_space)
    F = u * v * ufl.dx - closure * v * closure.dx
    problem = NonlinearProblem(F, u, petsc_options_prefix="nograd_")
    with pytest.raises(mno.ClosureEvaluationError, match="no autograd graph"):
        problem.solve()


@pytest.mark.mpi
def test_constant_model_has_zero_tangent(u):
    closure = mno.Closure(Constant(), [u], device="cpu", tangent=True)
    closure.update()
    assert np.all(closure.x.array == 3.0)
    assert np.all(closure.tangent.x.array == 0.0)


# -- GridEvaluator: the torch boundary of non-local closures ------------------------------


class Affine(torch.nn.Module):
    """y = scale · x₀ − x₁ on a grid, scale = 2 a parameter that gives the dtype."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0, dtype=dtype))

    def forward(self, x):
        return self.scale * x[:, :1] - x[:, 1:2]


class Channels(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.channels = list(channels)

    def forward(self, x):
        return x[:, self.channels]


def _grid_evaluator(model, out_channels=1, host_dtype=np.float64):
    """An evaluator of ``model.eval()`` for 2 input channels on a 5 x 4 grid."""
    return GridEvaluator(model.eval(), 2, out_channels, (5, 4), host_dtype, torch.device("cpu"))


def test_grid_evaluator_runs_the_model_in_its_own_dtype():
    rng = np.random.default_rng(0)
    field = rng.standard_normal((2, 20))
    for dtype in (torch.float64, torch.float32):
        evaluator = _grid_evaluator(Affine(dtype))
        assert evaluator.dtype == dtype and evaluator.device == torch.device("cpu")
        assert evaluator.inputs.shape == (2, 20) and evaluator.inputs.dtype == np.float64
        assert evaluator.outputs.shape == (1, 20) and evaluator.outputs.dtype == np.float64
        evaluator.inputs[:] = field
        evaluator.evaluate()
        # The float32 model computes in float32 (its input cast once), then widens.
        x = field.astype(torch.empty((), dtype=dtype).numpy().dtype)
        np.testing.assert_array_equal(evaluator.outputs[0], 2 * x[0] - x[1])
        assert evaluator.check_finite() is None
    # A model without tensors runs in the DOLFINx dtype; a Fourier layer's complex weights
    # do not decide it.
    assert _grid_evaluator(Channels([0]), host_dtype=np.float32).dtype == torch.float32
    spectral = torch.nn.Module()
    spectral.weights = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    spectral.lift = torch.nn.Linear(2, 2)
    assert _grid_evaluator(spectral).dtype == torch.float32
    with pytest.raises(TypeError, match=r"Unsupported DOLFINx dtype int64"):
        _grid_evaluator(Affine(), host_dtype=np.int64)


class NoTensor(torch.nn.Module):
    def forward(self, x):
        return (x,)


class Raises(torch.nn.Module):
    def __init__(self, in_channels=None):
        super().__init__()
        if in_channels is not None:
            self.in_channels = in_channels

    def forward(self, x):
        raise RuntimeError("boom")


def test_grid_evaluator_probe_says_what_does_not_fit():
    cases = [
        (
            Channels([0, 1]),
            "The model returns the wrong number of output channels: for input "
            "(1, 2, *(5, 4)) it returned (1, 2, 5, 4), expected (1, 1, 5, 4) "
            "(1 output channel).",
        ),
        (
            torch.nn.AvgPool2d(2),
            "The model changes the grid shape: for input (1, 2, *(5, 4)) it returned "
            "(1, 2, 2, 2), expected (1, 1, 5, 4) (1 output channel).",
        ),
        (
            NoTensor(),
            "The model must return a tensor: for input (1, 2, *(5, 4)) it returned a "
            "tuple, expected shape (1, 1, 5, 4) (1 output channel).",
        ),
        (
            Raises(in_channels=3),
            "Channel mismatch: the model has in_channels=3, but it is given 2 input channels.",
        ),
        (
            Raises(),
            "The model failed on a probe input of 2 input channels on the (5, 4) grid: "
            "RuntimeError: boom",
        ),
    ]
    for model, message in cases:
        with pytest.raises(ValueError) as info:
            _grid_evaluator(model).probe()
        assert str(info.value) == message
    _grid_evaluator(Channels([0])).probe(outputs="value_shape ()")  # it fits: no error
    with pytest.raises(ValueError) as info:
        _grid_evaluator(Channels([0]), 2).probe(inputs="x", outputs="value_shape (2,)")
    assert str(info.value).endswith("expected (1, 2, 5, 4) (value_shape (2,)).")


def test_grid_evaluator_counts_grid_points_with_nan_or_inf_and_refuses_training_mode():
    evaluator = _grid_evaluator(Channels([0, 1]), out_channels=2)
    evaluator.inputs[:] = 1.0
    evaluator.inputs[0, [3, 7]] = np.nan  # two points, one of them bad in both channels
    evaluator.inputs[1, 7] = np.inf
    evaluator.evaluate()
    assert evaluator.check_finite() == "the model returned NaN/Inf at 2 of 20 grid points"
    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    evaluator = _grid_evaluator(model, out_channels=2)
    model.train()
    with pytest.raises(
        RuntimeError, match=r"the model is in training mode \(Sequential, 0\).*\.eval\(\)"
    ):
        evaluator.evaluate()


class GridDropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(x[:, :1])


@pytest.mark.mpi
def test_nonlocal_closure_refuses_a_model_put_back_in_training_mode(u):
    model = GridDropout()
    closure = mno.NonlocalClosure(model, [u], grid_shape=(5, 5), name="c", device="cpu")
    assert not model.training
    closure.update()
    first = closure.x.array.copy()
    model.train()
    size = u.function_space.mesh.comm.size
    with pytest.raises(mno.ClosureEvaluationError) as info:
        closure.update()
    assert str(info.value) == (
        f"Update 2 of non-local closure 'c' failed on rank(s) [0] (1 of {size} "
        f"{'rank' if size == 1 else 'ranks'}); on rank 0: "
        "the model is in training mode (GridDropout, dropout): dropout and batch norm "
        "would make the closure values random and dependent on the number of ranks; call "
        "model.eval() (closure.model.eval()) before updating the closure. The previous "
        "closure values were kept."
    )
    np.testing.assert_array_equal(closure.x.array, first)


@pytest.mark.mpi
@pytest.mark.parametrize("gemm", ["torch", "numpy"])
def test_updates_reuse_their_buffers_and_allocate_nothing_that_grows_with_the_mesh(gemm):
    """Every per-update buffer is allocated at construction; the model's own temporaries
    are those of one chunk (bounded memory), whatever the number of points; with either
    BLAS in the fused MLP pass."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 128, 128)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: np.sin(x[0]) + x[1] ** 2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    closure = mno.Closure(
        model.double(), [u, ufl.grad(u)], device="cpu", batch_size=512, tangent=True
    )
    evaluator = closure._evaluator
    assert evaluator.kernel._mlp is not None
    evaluator.kernel._mlp.use_gemm_kernel(gemm, torch.float64, torch.device("cpu"))
    closure.update()
    first = (closure.x.array.copy(), closure.tangent.x.array.copy())
    buffers = [
        evaluator._inputs,
        evaluator._outputs,
        evaluator._tangents,
        torch.from_numpy(closure._operand_evaluator._packed),
    ]
    addresses = [b.data_ptr() for b in buffers]
    tracemalloc.start()
    closure.update()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profile:
        closure.update()
    np.testing.assert_array_equal(closure.x.array, first[0])
    np.testing.assert_array_equal(closure.tangent.x.array, first[1])
    assert [b.data_ptr() for b in buffers] == addresses
    # NumPy: a few kB (measured: 33 kB serially), against 2.4 MB of operands on one rank.
    assert peak < 64_000, peak
    # torch: the largest single allocation is a chunk's activations (512 × 16 doubles).
    largest = max((e.cpu_memory_usage for e in profile.events()), default=0)
    assert largest <= 512 * 16 * 8, largest
    if evaluator.num_points > 8 * 512:
        assert evaluator.inputs.nbytes > 8 * largest


class RootOfRamp(torch.nn.Module):
    """sqrt(x₀) where x₀ > 0, else 0: finite values, but reverse mode's tangent is NaN
    where x₀ < 0 (the unselected branch's gradient, 0 · NaN)."""

    def forward(self, x):
        u = x[:, :1]
        return torch.where(u > 0, torch.sqrt(u), 0.0)


@pytest.mark.mpi
def test_nan_in_the_tangent_alone_is_caught(u):
    """The evaluator sums the tangents chunk by chunk; a NaN there fails the update."""
    closure = mno.Closure(RootOfRamp(), [u], device="cpu", tangent=True)
    assert closure.evaluation_plan["tangent_mode"] == "reverse"  # the rule, few points
    closure.update()  # u = x + 2y >= 0: finite tangent except where u == 0 exactly
    u.x.array[:] -= 1.5  # now u < 0 on part of the mesh
    values = closure.x.array.copy()
    tangent = closure.tangent.x.array.copy()
    closure.update(tangent=False)  # values alone are fine: sqrt(0) = 0
    with pytest.raises(mno.ClosureEvaluationError, match=r"NaN/Inf values or tangents at \d+"):
        closure.update()
    np.testing.assert_array_equal(closure.tangent.x.array, tangent)
    assert not np.array_equal(closure.x.array, values)  # the values-only update went through


class Truncating(torch.nn.Module):
    """``x[:, :1]``, or ``x[: n - rows, :columns]`` once those are set."""

    def __init__(self):
        super().__init__()
        self.rows, self.columns = 0, 1

    def forward(self, x):
        return x[: x.shape[0] - self.rows, : self.columns]


@pytest.mark.parametrize(
    "rows, columns, shape", [(1, 1, "(349, 1)"), (0, 2, "(350, 2)"), (0, 0, "(350, 0)")]
)
def test_values_of_the_wrong_shape_after_construction_are_refused(rows, columns, shape):
    """The values pass takes the usual ``(n, num_outputs)`` output as it is; any other
    shape is checked, also when it turns up after construction (the probe saw a good
    one): a ValueError naming it, not values broadcast over the components."""
    model = Truncating().eval()
    ev = PointwiseEvaluator(model, 3, 1, 1000, np.float64, torch.device("cpu"), batch_size=350)
    ev.inputs[:] = np.arange(3000.0).reshape(1000, 3)
    ev.evaluate()
    np.testing.assert_array_equal(ev.outputs, ev.inputs[:, :1])
    model.rows, model.columns = rows, columns
    expected = rf"returned shape \{shape[:-1]}\) for a chunk of 350 point"
    with pytest.raises(ValueError, match=expected):
        ev.evaluate()
