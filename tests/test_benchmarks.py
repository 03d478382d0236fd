"""Smoke tests of the benchmark scripts: sane output on tiny cases, no timing assertions."""

import importlib.util
import json
import math
import sys
from pathlib import Path

from mpi4py import MPI

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    """Import ``benchmarks/<name>.py`` (with ``benchmarks/`` on the path for ``_common``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["coarse", "coarse+MNO", "fine"])
def test_turbulence_scaling_case_and_comparison(kind, tmp_path):
    bench = _module("turbulence_scaling")
    args = bench.parse_args(["--quick", "--modes", "4", "--hidden", "4", "--layers", "1"])
    comm = MPI.COMM_WORLD
    case = bench.measure(comm, kind, 8, args)
    if comm.rank != 0:
        assert case == {}
        return
    assert case["kind"] == kind and case["n"] == 8 and case["finite"]
    # (ω P1 + ψ P2) on 8 × 8 squares: 9² + 17² dofs; 2 · 8² cells.
    assert case["dofs"] == 9**2 + 17**2 and case["cells"] == 2 * 8**2
    times = [
        case[k]
        for k in ("step", "fe", "assemble_rhs", "solve_alone", "step_cpu", "step_min", "step_max")
    ]
    times += list(case["setup"].values())
    assert all(math.isfinite(t) and t > 0 for t in times), case
    assert case["step_min"] <= case["step"] <= case["step_max"]
    assert case["step_cpu"] <= case["step_cpu_total"]
    assert math.isfinite(case["solve"])  # the step less closure and assembly: may be noise
    assert case["closure"] > 0 if kind == "coarse+MNO" else case["closure"] == 0
    if kind == "coarse+MNO":
        assert set(case["closure_stages"]) == set(bench.STAGES)
        assert case["grid_points"] == (2 * 8 + 1) ** 2
    for key in ("peak_rss_gib", "rss_before_gib", "rss_after_gib", "mumps_factorisation_mib"):
        assert len(case[key]) == comm.size and all(v > 0 for v in case[key]), key
    assert sum(case["owned_dofs"]) == case["dofs"]

    # The comparison of two rounds against one: the best round, the ratios, every round.
    slower = {**case, "step": 2 * case["step"]}
    paths = []
    for name, cases in (("a", [case]), ("b", [slower]), ("c", [slower])):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"load_average": {"before": [0.0]}, "cases": cases}))
    result = bench.compare_files(paths[1:], paths[:1], ranks=2)
    (row,) = result["rows"]
    assert row["step"] == [2 * case["step"], case["step"]]
    assert row["speedup"] == pytest.approx(2.0) and row["efficiency"] == pytest.approx(1.0)
    assert row["round_steps"] == [[2 * case["step"]] * 2, [case["step"]]]
    assert len(result["rounds"]["1"]) == 2 and len(result["rounds"]["2"]) == 1


def _check_rollout_gradient_rows(rows: list[dict]) -> None:
    """Rows of ``rollout_gradient.py``: 3 steps on 4 × 4 squares, without and with
    checkpoints every 2 steps; finite times, the same loss, the solving-again variant timed
    only with checkpoints."""
    assert [row["checkpoint_every"] for row in rows] == [None, 2]
    for row in rows:
        assert row["k"] == 3 and row["dofs"] == 25 and row["points"] == 3 * 2 * 4**2
        assert row["forward_s"] > 0 and row["gradient_s"] > 0 and math.isfinite(row["ratio"])
        assert row["first_pass_cpu_s"] > 0 and math.isfinite(row["ratio_first_pass"])
        assert row["loss"] > 0
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-12)  # checkpoints: same
    assert "ratio_solve_again" not in rows[0]
    assert rows[1]["gradient_solve_again_s"] > 0 and math.isfinite(rows[1]["ratio_solve_again"])


def test_rollout_gradient_smoke():
    """The whole script (its workers in their own processes, times and memory), on tiny
    rollouts with two time levels: the table, and the rows finite and consistent."""
    import subprocess

    tag = "smoke_test_memory"
    command = [sys.executable, str(BENCHMARKS / "rollout_gradient.py"), "--memory", "--steps",
               "3", "--cells", "4", "--every", "2", "--repeats", "1", "--tag", tag]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    assert "two time levels" in output
    path = BENCHMARKS / "results" / f"rollout_gradient_{tag}.json"
    rows = json.loads(path.read_text())["rows"]
    path.unlink()
    _check_rollout_gradient_rows(rows)


def test_rollout_gradient_implicit_rows(capsys):
    """The implicit (Newton) configuration's rows, from the script's worker run in this
    process (the script runs it in a process of its own, which the peak memory needs)."""
    import torch

    bench = _module("rollout_gradient")
    threads = torch.get_num_threads()
    rows = []
    try:
        for checkpoint in ([], ["--checkpoint"]):
            row = {}
            for measure in ("time", "memory"):
                argv = ["--worker", "--implicit", "--k=3", "--cells=4", "--every=2",
                        "--repeats=1", f"--measure={measure}", *checkpoint]  # fmt: skip
                bench.worker(bench.parse_args(argv))
                row.update(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    assert all(row["implicit"] for row in rows)
    _check_rollout_gradient_rows(rows)


def test_gpu_checks_smoke(tmp_path):
    """The GPU session's prepared script, on the CPU: every check runs, its rows are sane."""
    import subprocess

    command = [sys.executable, str(BENCHMARKS / "gpu_checks.py"), "--quick", "--device", "cpu",
               "--output-dir", str(tmp_path), "--tag", "smoke"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=BENCHMARKS)
    report = json.loads((tmp_path / "gpu_checks_smoke.json").read_text())
    assert report["args"]["device"] == "cpu" and "gpu" not in report["machine"]
    (transfer,) = report["transfers"]
    assert transfer["points"] > 0 and transfer["update"] > 0 and transfer["assembly"] > 0
    assert all(transfer[f"stage_{s}"] >= 0 for s in ("operands", "h2d", "model", "d2h"))
    assert [row["setting"] for row in report["cuda_graphs"]] == ["eager"]
    cases = {row["case"]: row for row in report["rollout_gradients"]}
    assert set(cases) == {"burgers_1d", "turbulence_2d"}
    for row in cases.values():
        assert row["steps"] == 3 and row["parameters"] > 0 and math.isfinite(row["cpu_loss"])
        assert row["cpu_forward_s"] > 0 and row["cpu_gradient_s"] > 0
        assert row["relative_difference"] == 0.0  # the same device twice: the same gradient


def test_chunk_sizes_smoke():
    """The chunk-size benchmark on a small mesh: every closure's row, the given sizes kept,
    the bounded choice within the cache, finite times and ratios."""
    import subprocess

    from dolfinx_mno._cache import cache_bytes_per_core
    from dolfinx_mno.pointwise_kernel import CHUNK_CANDIDATES

    command = [sys.executable, str(BENCHMARKS / "chunk_sizes.py"), "--cells", "48",
               "--rounds", "1", "--repeats", "1", "--tag", "smoke_test"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=BENCHMARKS)
    path = BENCHMARKS / "results" / "chunk_sizes_smoke_test.json"
    result = json.loads(path.read_text())
    path.unlink()
    rows = {row["closure"]: row for row in result["rows"]}
    assert result["num_points"] == 6 * 48**2
    assert list(rows) == ["chosen", "chosen, unbounded"] + [
        f"batch_size={size}" for size in CHUNK_CANDIDATES
    ]
    for size in CHUNK_CANDIDATES:
        row = rows[f"batch_size={size}"]
        assert row["batch_size"] == size
        assert row["tangent_batch_size"] == min(size, result["num_points"])
    for row in rows.values():
        assert row["values_ms"] > 0 and row["tangent_ms"] > 0
        assert math.isfinite(row["values_ratio"]) and math.isfinite(row["tangent_ratio"])
    assert rows["chosen"]["values_ratio"] == 1.0 and rows["chosen"]["tangent_ratio"] == 1.0
    cache = cache_bytes_per_core()
    if cache is not None:  # 1,040 bytes a point of float32 tangent buffers (3-64-64-1)
        assert rows["chosen"]["tangent_batch_size"] <= max(2048, cache // 1040)


def test_tangent_modes_models_evaluate():
    """The tangent-mode study's models go through the evaluator, values and tangents. (The
    benchmark failed at its first evaluation on every run: its models were left in
    training mode, which the evaluator refuses.)"""
    import numpy as np
    import torch

    from dolfinx_mno.torch_bridge import PointwiseEvaluator

    bench = _module("tangent_modes")
    for name, model in bench.models().items():
        num_inputs = 3 if name == "mlp" else 2
        evaluator = PointwiseEvaluator(model, num_inputs, 2, 20, np.float64, torch.device("cpu"))
        evaluator.inputs[:] = np.linspace(-1, 1, 20 * num_inputs).reshape(20, num_inputs)
        evaluator.evaluate(tangent=True)
        with torch.no_grad():
            values = model(torch.from_numpy(evaluator.inputs.copy())).numpy()
        assert np.allclose(evaluator.outputs, values, rtol=1e-14, atol=1e-15), name
        assert evaluator.tangents.shape == (20, 2, num_inputs)
        assert np.isfinite(evaluator.tangents).all() and np.abs(evaluator.tangents).max() > 0
        # The normalised linear map has one Jacobian everywhere; the MLP's varies.
        constant = np.allclose(evaluator.tangents, evaluator.tangents[0], rtol=1e-14)
        assert constant == (name == "linear"), name


def test_rollout_model_paths_smoke():
    """The five ways of running the model in a rollout, on a tiny problem: every way's
    row, finite times, and 'model' against itself exactly 1."""
    import subprocess

    command = [sys.executable, str(BENCHMARKS / "rollout_model_paths.py"), "--steps", "3",
               "--cells", "4", "--every", "2", "--rounds", "1", "--repeats", "1",
               "--tag", "smoke_test"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=BENCHMARKS)
    path = BENCHMARKS / "results" / "rollout_model_paths_smoke_test.json"
    result = json.loads(path.read_text())
    path.unlink()
    rows = {row["way"]: row for row in result["rows"]}
    assert list(rows) == [
        "model",
        "numpy tanh per op",
        "fused",
        "fused, numpy gemm",
        "the same, buffers without a graph",
    ]
    assert result["points"] == 96  # too few to time: torch's kernels
    assert (result["tanh_kernel"], result["gemm_kernel"]) == ("torch", "torch")
    for row in rows.values():
        assert row["forward_cpu_s"] > 0 and row["gradient_cpu_s"] > 0
        assert math.isfinite(row["ratio"]) and len(row["rounds"]["gradient"]) == 1
    assert rows["model"]["gradient_against_model"] == 1.0


# The cases run on 3 ranks too: a rank without cells, explicit and implicit steps. (The
# others take ~2 minutes there on 2 cores, and run on 1 and 2 ranks.)
THREE_RANK_CASES = ("two cells", "implicit, two cells")


@pytest.mark.mpi
@pytest.mark.parametrize(
    "case",
    ["square", "two cells", "square, MLP", "implicit", "implicit, two cells", "implicit, MLP"],
)
def test_rollout_gradient_equals_dolfinx_adjoints(case, tiny_square):
    """Our discrete adjoint (``Rollout.gradient``) against dolfinx-adjoint (pyadjoint), an
    independent implementation: the same loss and gradient over 5 steps, to round-off, on
    any number of ranks (two cells on 3 ranks: a rank without cells), with zero Dirichlet
    data or natural conditions; for a closure with three parameters, and for a tanh MLP
    3-2-2-2 (its 20 weights; pyadjoint's written out in UFL); IMEX steps (closure of the
    old state), and backward Euler by Newton (closure of the new state: ours the adjoint
    of the converged step with the closure's tangent, pyadjoint's from UFL's Jacobian)."""
    if MPI.COMM_WORLD.size > 2 and case not in THREE_RANK_CASES:
        pytest.skip(f"on 1 and 2 ranks; on 3, the cases {THREE_RANK_CASES}")
    import numpy as np
    from dolfinx import mesh

    bench = _module("adjoint_routes")
    implicit = case.startswith("implicit")
    if case.endswith("two cells"):  # every vertex is on the boundary: natural conditions
        routes = bench.build(
            tiny_square, 5, bcs=False, start_state=lambda x: 1 + x[0] + x[1] ** 2,
            implicit=implicit,
        )  # fmt: skip
    else:
        width = 2 if case.endswith("MLP") else None
        msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
        routes = bench.build(msh, 5, width=width, implicit=implicit)
    loss, ours = routes.ours_gradient()
    pyadjoint_loss, theirs = routes.pyadjoint_gradient()
    # Every parameter counts, but the MLP's last bias: a constant flux meets ∇v with v = 0
    # on the boundary, its gradient is round-off.
    assert loss > 1e-6 and np.count_nonzero(np.abs(theirs) > 1e-9) >= theirs.size - 2
    assert abs(loss - pyadjoint_loss) <= 1e-12 * loss
    assert bench.relative_difference(ours, theirs) <= 1e-10, (ours, theirs)
    # pyadjoint's derivative again on the same tape; ours again from the same state (to
    # an ulp, not bitwise: MUMPS's parallel solves may sum in another order).
    # Relative to the largest entry: the MLP's last bias has a gradient of round-off.
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(routes.pyadjoint_derivative(), theirs, atol=1e-12 * scale)
    np.testing.assert_allclose(routes.ours_gradient()[1], ours, atol=1e-12 * scale)
    bench.pyadjoint.get_working_tape().clear_tape()


@pytest.mark.mpi
def test_adjoint_routes_smoke():
    """The benchmark's measurement and table on a tiny case: every time positive, ratios
    consistent with the times, the two gradients the same."""
    if MPI.COMM_WORLD.size > 2:
        pytest.skip("the benchmark runs on 1 and 2 ranks; 3 ranks: the gradients above")
    bench = _module("adjoint_routes")
    case = bench.measure(MPI.COMM_WORLD, 4, 3, 1)
    times = case["times"]
    assert set(times) == {"ours_forward", "ours_gradient", "pyadjoint_forward",
                          "pyadjoint_gradient", "pyadjoint_derivative"}  # fmt: skip
    assert all(math.isfinite(t) and t > 0 for t in times.values())
    assert case["gradient_over_forward"]["ours"] == times["ours_gradient"] / times["ours_forward"]
    assert case["dofs"] == 25 and case["gradient_difference"] <= 1e-10
    result = {"machine": {"cpu": "test"}, "ranks": 1, "steps": 3, "repeats": 1, "width": None}
    result["cases"] = [case]
    assert bench.table(result).count("\n") == 4


def test_smoke_runs_do_not_overwrite_measurements():
    """``--quick`` without ``--tag`` writes ``..._np{n}_quick.json``: an audit found a smoke
    run replacing the measured ``closure_overhead_np1.json`` silently."""
    common = _module("_common")
    assert common.result_tag(None, 1, quick=False) == "np1"
    assert common.result_tag(None, 2, quick=True) == "np2_quick"
    assert common.result_tag("mine", 2, quick=True) == "mine"


@pytest.mark.parametrize("script", ["closure_overhead", "nonlocal_scaling"])
def test_comparison_of_disjoint_runs_says_so(script, tmp_path, capsys):
    """Two result files with no case in common: an error naming both files' cases, not an
    empty table (an audit found ``--compare`` printing only a header)."""
    bench = _module(script)
    key = "n" if script == "nonlocal_scaling" else "points"
    paths = []
    for ranks, size in ((1, 1000), (2, 8000)):
        case = {key: size, "closure": "mlp", "update": 1.0, "assembly": 1.0}
        paths.append(tmp_path / f"np{ranks}.json")
        paths[-1].write_text(json.dumps({"config": {"ranks": ranks}, "cases": [case]}))
    with pytest.raises(SystemExit, match=r"np1\.json and np2\.json share no case to compare"):
        bench.compare_files(*paths)
    assert capsys.readouterr().out == ""  # nothing printed before the error
    turbulence = _module("turbulence_scaling")
    for path, n in zip(paths, (8, 16), strict=True):
        case = {"kind": "coarse", "n": n, "step": 1.0}
        path.write_text(json.dumps({"load_average": {"before": [0.0]}, "cases": [case]}))
    with pytest.raises(SystemExit, match=r"\('coarse', 8\)"):
        turbulence.compare_files(paths[:1], paths[1:], ranks=2)


# Arguments a benchmark cannot run with: each is refused by the parser (exit status 2, the
# option named), not minutes later by a traceback deep in the package, a table of NaNs, or
# a silent run of other sizes. An audit found each of these running.
BAD_ARGUMENTS = [
    ("adjoint_routes", ["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    ("adjoint_routes", ["--repeats", "0"], "argument --repeats: expected a positive integer"),
    ("adjoint_routes", ["--quick", "--sizes", "16"], "--quick sets --sizes itself"),
    ("chunk_sizes", ["--cells", "-1"], "argument --cells: expected a positive integer, got -1"),
    ("chunk_sizes", ["--rounds", "0"], "argument --rounds: expected a positive integer, got 0"),
    ("closure_overhead", ["--device", "cuda:7"], "argument --device: device='cuda:7' was"),
    ("closure_overhead", ["--compare", "none1.json", "none2.json"], "no such file: none1.json"),
    ("closure_vs_external_operator", ["--sizes", "-10"], "expected a positive number (>= 1)"),
    ("closure_vs_external_operator", ["--markdown", "none.json"], "no such file: none.json"),
    ("distributed_operator", ["--grid", "0", "0"], "argument --grid: expected a positive"),
    ("distributed_operator", ["--quick", "--repeats", "9"], "--quick sets --repeats itself"),
    ("gpu_checks", ["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    ("gpu_checks", ["--device", "gpu"], "argument --device: Expected one of cpu, cuda"),
    ("nonlocal_scaling", ["--repeats", "0"], "argument --repeats: expected a positive integer"),
    ("rollout_gradient", ["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    ("rollout_model_paths", ["--steps", "0"], "argument --steps: expected a positive integer"),
    ("tangent_modes", ["--sizes", "nan"], "argument --sizes: expected a positive number"),
    ("turbulence_scaling", ["--quick", "--steps", "5"], "--quick sets --steps itself"),
    ("turbulence_scaling", ["--breakdown", "0"], "argument --breakdown: expected a positive"),
]


@pytest.mark.parametrize(("script", "argv", "message"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_by_the_parser(script, argv, message, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    bench = _module(script)
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
