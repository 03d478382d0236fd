"""Smoke test of the experiments behind ``docs/results.md``: each one starts.

A full run takes minutes (the commands are in ``docs/results.md``, beside the numbers);
``--help`` exits after the imports and the option parsing, so a renamed or moved piece of
``demos/multiscale_diffusion/problem.py`` or ``demos/utilities.py``, which the experiments
import, fails here and not at the next results run. A few seconds per experiment.
"""

import subprocess
import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
from test_demos import _child_environment

EXPERIMENT_DIR = Path(__file__).resolve().parent.parent / "experiments"
# Listed, not globbed: an experiment is in here once its --help is cheap.
EXPERIMENTS = [
    "checkerboard_cell_problems.py",
    "multiscale_diffusion_results.py",
    "transient_diffusion_results.py",
    "turbulence_2d_data_scaling.py",
    "turbulence_2d_mirror_check.py",
    "turbulence_2d_skill.py",
]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_starts(experiment: str):
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("experiment tests start their own processes; run them serially")
    command = [sys.executable, str(EXPERIMENT_DIR / experiment), "--help"]
    result = subprocess.run(
        command, env=_child_environment(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.startswith("usage:"), result.stdout


def test_over_seeds_statistics():
    """The decorrelation over several test seeds (``turbulence_2d_step_correction.py
    --test-seeds``): per-seed times, their spread, and the seed-averaged correlation's."""
    demos = EXPERIMENT_DIR.parent / "demos"
    sys.path[:0] = [str(demos), str(demos / "turbulence_2d"), str(EXPERIMENT_DIR)]
    try:
        from turbulence_2d_data import over_seeds
    finally:
        del sys.path[:3]
    # Seed 1 crosses 0.95 halfway from t = 0.5 (0.97) to 1 (0.93), linearly:
    # 0.5 + 0.5 · 0.02 / 0.04 = 0.75; seed 2 never does (counted as the horizon, 1.5).
    stats = over_seeds([[1.0, 0.97, 0.93, 0.90], [1.0, 0.99, 0.98, 0.96]], 0.5)
    assert stats["times"] == [pytest.approx(0.75), None] and stats["never"] == 1
    assert stats["mean"] == pytest.approx(1.125) and stats["std"] == pytest.approx(0.75 / 2**0.5)
    assert (stats["min"], stats["max"]) == (pytest.approx(0.75), 1.5)
    # The average [1, 0.98, 0.955, 0.93] crosses at 1 + 0.5 · 0.005 / 0.025 = 1.1.
    assert stats["mean_correlation"] == pytest.approx([1.0, 0.98, 0.955, 0.93])
    assert stats["averaged_time"] == pytest.approx(1.1)
    assert stats["capped_times"] == [pytest.approx(0.75), 1.5]
    # Paired with a baseline from the same seeds: seed 1's crosses at 0.5 + 0.5 · 0.02 / 0.07
    # (= 0.75 − 3 / 28), seed 2's never; the gains are 3/28 and 0, the standard error of
    # their mean |3/28 − 0| / 2.
    paired = over_seeds(
        [[1.0, 0.97, 0.93, 0.90], [1.0, 0.99, 0.98, 0.96]],
        0.5,
        baseline=[[1.0, 0.97, 0.90, 0.90], [1.0, 0.99, 0.98, 0.96]],
    )
    assert paired["gain_over_baseline"] == pytest.approx(3 / 56)
    assert paired["gain_standard_error"] == pytest.approx(3 / 56)
    assert paired["beats_baseline"] == 1
    # A blown-up run (NaN) counts as ρ = −1 from that sample on, as in the runs' own times:
    # 1 → −1 crosses 0.95 at 0.5 · 0.05 / 2 = 0.0125.
    blown = over_seeds([[1.0, np.nan, 0.99, 0.99]], 0.5)
    assert blown["times"] == [pytest.approx(0.0125)] and blown["std"] == 0.0
    assert blown["averaged_time"] == pytest.approx(0.0125)
    assert over_seeds([[1.0, 0.99]], 0.5)["averaged_time"] is None
    for bad in ([], [[1.0]], [1.0, 0.9]):
        with pytest.raises(ValueError, match="correlations"):
            over_seeds(bad, 0.5)


def test_shared_module_run_as_a_script_says_what_to_run(capsys):
    """``python experiments/turbulence_2d_data.py`` (a module, found by a learning user
    beside the scripts) ended in ``ModuleNotFoundError: No module named 'flow'``."""
    import runpy

    with pytest.raises(SystemExit, match=r"run turbulence_2d_limits\.py or turbulence_2d_step"):
        runpy.run_path(str(EXPERIMENT_DIR / "turbulence_2d_data.py"), run_name="__main__")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "argument --seeds: expected a positive integer, got 0"),
        (["--test-seeds", "-1"], "--test-seeds must be 0 or more, got -1"),
    ],
)
def test_data_scaling_refuses_impossible_counts(argv, message, monkeypatch, capsys):
    """Counts no run can have: a parser error, not "missing summaries" naming files such
    as ``summary_medium_0seeds_...json`` that no run writes."""
    import runpy

    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts demos/ first
    monkeypatch.setattr(sys, "argv", ["turbulence_2d_data_scaling.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXPERIMENT_DIR / "turbulence_2d_data_scaling.py"), run_name="__main__")
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("bound", ["-1", "0", "inf"])
def test_step_correction_refuses_a_bound_before_the_dns(bound, monkeypatch, capsys):
    """``--bound -1`` failed in ``Bounded`` after the DNS and the a-priori fits (about a
    minute with ``--quick``); the parser refuses it now, before any work."""
    import runpy

    script = EXPERIMENT_DIR / "turbulence_2d_step_correction.py"
    monkeypatch.setattr(sys, "path", [str(EXPERIMENT_DIR), *sys.path])  # as python script.py
    monkeypatch.setattr(sys, "argv", [script.name, "--quick", "--bound", bound])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 2
    assert f"--bound must be positive and finite, got {float(bound)}" in capsys.readouterr().err


@pytest.mark.parametrize(("factor", "message"), [("3", "3 neither divides"), ("0", "got 0")])
def test_time_scheme_refuses_a_step_off_the_reference_samples(factor, message, monkeypatch, capsys):
    """A coarse step of 3× the demo's falls between the reference's samples (every 2 coarse
    steps): the runs would be compared with the reference at other times. Refused before
    any work."""
    import runpy

    script = EXPERIMENT_DIR / "turbulence_2d_time_scheme.py"
    monkeypatch.setattr(sys, "path", [str(EXPERIMENT_DIR), *sys.path])  # as python script.py
    monkeypatch.setattr(sys, "argv", [script.name, "--quick", "--dt-factors", "1", factor])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--compare", "{missing}"], "--compare: no file {missing}"),
        (["--mirror"], "--mirror needs --train-seeds"),
        (["--train-seeds", "2", "--trajectory-split"], "--trajectory-split needs --train-seeds 3"),
        (["--fno-rank", "0.2"], "--fno-rank needs --fno-factorization"),
        (["--fno-factorization", "cp", "--fno-rank", "0"], "--fno-rank: a fraction in (0, 1]"),
        (["--fno-factorization", "qr"], "invalid choice: 'qr'"),
        (["--weight-decay=-1e-4"], "--weight-decay: at least 0, got -0.0001"),
        (["--weight-decay", "nan"], "--weight-decay: at least 0, got nan"),
        (["--from", "{missing}"], "--from needs --train-seeds"),
        (["--train-seeds", "3", "--from", "{missing}"], "--from: no file {missing}"),
        (
            ["--train-seeds", "3", "--fno-modes", "4", "8", "--from", "{missing}"],
            "--from: one --fno-modes, the file's, got [4, 8]",
        ),
        (
            ["--train-seeds", "3", "--mirror", "--a-posteriori", "1", "--mirror-rollouts"],
            "--mirror-rollouts needs --mirror, --checkerboard",
        ),
        # --quick leaves out its test seed, 3: the training seeds are 1, 2 and 4.
        (
            ["--train-seeds", "3", "--test-seed", "4"],
            "--test-seed 4 is one of the training seeds [1, 2, 4]",
        ),
        (["--test-seed", "0"], "--test-seed: expected a positive integer, got 0"),
    ],
)
def test_in_sample_refuses_bad_options(options, message, monkeypatch, capsys, tmp_path):
    """``--compare`` names a file that does not exist, ``--mirror`` has no training data to
    mirror, ``--trajectory-split`` too few trajectories to hold a fifth out, a rank without a
    factorisation or outside (0, 1], a negative weight decay, a test seed among the training
    seeds: refused before the DNS (which takes minutes at the default settings), not after
    it."""
    import runpy

    script = EXPERIMENT_DIR / "turbulence_2d_in_sample.py"
    missing = str(tmp_path / "none.pt")
    options = [option.format(missing=missing) for option in options]
    monkeypatch.setattr(sys, "path", [str(EXPERIMENT_DIR), *sys.path])  # as python script.py
    monkeypatch.setattr(sys, "argv", [script.name, "--quick", *options])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 2
    assert message.format(missing=missing) in capsys.readouterr().err


def _turbulence_2d_modules():
    """``turbulence_2d_data`` and the demo's ``flow``, imported as the experiments do."""
    demos = EXPERIMENT_DIR.parent / "demos"
    sys.path[:0] = [str(demos), str(demos / "turbulence_2d"), str(EXPERIMENT_DIR)]
    try:
        import flow
        import turbulence_2d_data
    finally:
        del sys.path[:3]
    return turbulence_2d_data, flow


def test_in_sample_from_refuses_another_operator(monkeypatch, capsys, tmp_path):
    """``--from`` reads an MNO instead of fitting it, and labels it by ``--fno-modes`` and
    ``--fno-width``: a file holding another FNO (4 modes, not 8) is refused before the DNS,
    with the architecture it holds; so is a file that is not a model file."""
    import runpy

    from dolfinx_mno.io import save_model
    from dolfinx_mno.normalization import AffineNormalization, NormalizedModel

    data, _ = _turbulence_2d_modules()
    monkeypatch.setattr(sys, "path", [str(EXPERIMENT_DIR), *sys.path])  # as python script.py
    path = tmp_path / "mno4w16.pt"
    normalized = NormalizedModel(data.fno(4, 16), AffineNormalization(width=3, axis=1),
                                 AffineNormalization(width=2, axis=1))  # fmt: skip
    save_model(path, normalized)
    not_a_model = tmp_path / "notes.pt"
    not_a_model.write_text("not a model")
    script = EXPERIMENT_DIR / "turbulence_2d_in_sample.py"
    for file, message in [
        (path, "holds another operator than the FNO of --fno-modes 8, --fno-width 16"),
        (not_a_model, "--from: "),
    ]:
        argv = [script.name, "--quick", "--train-seeds", "3", "--from", str(file)]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(script), run_name="__main__")
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_mirror_is_the_box_symmetry():
    """``mirror`` (``turbulence_2d_in_sample.py --mirror``) maps the gridded ``(ω, u)`` and
    flux ``uω`` of a flow to those of its mirror image ``ψ'(x, y) = −ψ(x, L − y)``."""
    demos = EXPERIMENT_DIR.parent / "demos"
    sys.path[:0] = [str(demos), str(demos / "turbulence_2d"), str(EXPERIMENT_DIR)]
    try:
        from flow import length
        from turbulence_2d_data import MIRROR_SIGNS, closure_grid, mirror
    finally:
        del sys.path[:3]
    grid = closure_grid(16)
    x, y = grid.points()[:, 0], grid.points()[:, 1]

    def fields(sign: float, reflect: bool) -> tuple[np.ndarray, np.ndarray]:
        """(ω, u_x, u_y) and uω of ``sign ψ(x, y)`` (``ψ(x, L − y)`` with ``reflect``), with
        ψ = sin(x/2) sin(y) + ½ sin(3x/2) sin(y/2), no symmetry of its own in y."""
        t, dt = (length - y, -1.0) if reflect else (y, 1.0)  # dt = dt/dy
        psi_x = 0.5 * np.cos(x / 2) * np.sin(t) + 0.75 * np.cos(1.5 * x) * np.sin(t / 2)
        psi_y = dt * (np.sin(x / 2) * np.cos(t) + 0.25 * np.sin(1.5 * x) * np.cos(t / 2))
        omega = 1.25 * (np.sin(x / 2) * np.sin(t) + np.sin(1.5 * x) * np.sin(t / 2))  # −Δψ
        u = sign * np.stack([psi_y, -psi_x])
        omega = sign * omega
        shape = (-1, *grid.shape)
        return np.stack([omega, *u]).reshape(shape), (u * omega).reshape(shape)

    inputs, flux = fields(1.0, reflect=False)
    expected_inputs, expected_flux = fields(-1.0, reflect=True)
    assert np.abs(inputs - expected_inputs).max() > 0.5  # not symmetric already
    [mirrored_inputs] = mirror([inputs], MIRROR_SIGNS[0])
    [mirrored_flux] = mirror([flux], MIRROR_SIGNS[1])
    np.testing.assert_allclose(mirrored_inputs, expected_inputs, atol=1e-12)
    np.testing.assert_allclose(mirrored_flux, expected_flux, atol=1e-12)
    # The mirror of the mirror is the identity.
    [twice] = mirror(mirror([inputs], MIRROR_SIGNS[0]), MIRROR_SIGNS[0])
    np.testing.assert_array_equal(twice, inputs)


@pytest.mark.mpi
def test_held_out_groups_are_the_fits_validation(tmp_path, monkeypatch):
    """``held_out_groups`` names the trajectories ``fit_grid_operator`` validates on, which
    ``turbulence_2d_in_sample.py --trajectory-split --a-posteriori`` holds out of the
    training through the solver: the same whole groups, a fifth of them, on every rank."""
    data, _ = _turbulence_2d_modules()
    import dolfinx_mno.training.fitting as fitting

    comm = MPI.COMM_WORLD
    groups = np.repeat(np.arange(10), 3)  # ten trajectories of three samples
    rng = np.random.default_rng(0)
    grid = data.closure_grid(2)
    fields_x = list(rng.standard_normal((groups.size, 3, *grid.shape)))
    fields_y = list(rng.standard_normal((groups.size, 2, *grid.shape)))
    splits = []
    fitting_split = fitting.split_samples

    def recording_split(*args):
        splits.append(fitting_split(*args))
        return splits[-1]

    monkeypatch.setattr(fitting, "split_samples", recording_split)
    path = comm.bcast(str(tmp_path / "fno.pt"), root=0)
    data.fit_grid_operator(
        data.fno(2, 4), fields_x, fields_y, epochs=1, spec=data.grid_spec(grid),
        path=path, comm=comm, groups=groups,
    )  # fmt: skip
    [(train_index, val_index)] = splits
    held = data.held_out_groups(groups)
    assert held.size == 2  # a fifth of ten
    np.testing.assert_array_equal(np.unique(groups[val_index]), held)
    assert not np.isin(groups[train_index], held).any()  # whole trajectories
    assert np.isin(groups[val_index], held).all()
    assert comm.allgather(held.tolist()) == [held.tolist()] * comm.size


@pytest.mark.mpi
def test_state_mirror_commutes_with_the_step():
    """``StateMirror`` (``turbulence_2d_in_sample.py --mirror-rollouts``): on a checkerboard
    mesh, three SSP-RK3 steps (forcing, viscosity, drag) of the mirror image of a random
    state are the mirror image of its three steps, to round-off; the mirror twice is the
    identity; the default mesh, which the mirror does not map onto itself, is refused on
    every rank. On 1, 2 and 3 ranks: a dof's image may be another rank's."""
    data, flow_module = _turbulence_2d_modules()
    VorticityFlow, initial_vorticity = flow_module.VorticityFlow, flow_module.initial_vorticity

    comm = MPI.COMM_WORLD
    flow = VorticityFlow(8, 0.02, data.NU, checkerboard=2, scheme="ssprk3", name="mirrored")
    mirror = data.StateMirror(flow.W)
    flow.set_vorticity(initial_vorticity(3))
    n = mirror.num_owned
    start = flow.w.x.array[:n].copy()

    def three_steps(state: np.ndarray) -> np.ndarray:
        for function in (flow.w, flow.w_previous):
            function.x.array[:n] = state
            function.x.scatter_forward()
        flow.run(0.0, 3 * flow.dt)
        return flow.w.x.array[:n].copy()

    def largest(values: np.ndarray) -> float:
        return comm.allreduce(float(np.abs(values).max(initial=0.0)), op=MPI.MAX)

    stepped = three_steps(start)
    assert largest(stepped - start) > 1e-2 * largest(start)  # the steps change the state
    assert largest(mirror(start) - start) > 0.5 * largest(start)  # not a symmetric state
    assert largest(three_steps(mirror(start)) - mirror(stepped)) < 1e-10 * largest(stepped)
    np.testing.assert_array_equal(mirror(mirror(start)), start)
    with pytest.raises(ValueError, match="no mirror image"):
        data.StateMirror(VorticityFlow(8, 0.02, data.NU, name="default").W)


def _skill_summary(path: Path, seed: int, factors: dict, explained: float, **config) -> Path:
    """A summary of ``turbulence_2d_in_sample.py`` with only what the skill plot reads."""
    import json

    runs = {"no closure, 16²": {"resolution_factor": 1.0, "factor_is_lower_bound": False}}
    for name, (factor, bound) in factors.items():
        runs[name] = {"resolution_factor": factor, "factor_is_lower_bound": bound}
    summary = {
        "quick": False,
        "config": {"test_seed": seed, "coarse": 16} | config,
        "runs": runs,
        "variance_explained": {"MNO": explained},
    }
    path.write_text(json.dumps(summary))
    return path


def _run_skill(argv: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(EXPERIMENT_DIR / "turbulence_2d_skill.py"), *argv]
    return subprocess.run(
        command, env=_child_environment(), capture_output=True, text=True, timeout=300
    )


def test_skill_averages_the_factors_over_test_seeds(tmp_path):
    """``turbulence_2d_skill.py``: per share of τ explained, the mean resolution factor over
    the test seeds and its standard error; the exact τ counts as a share of 1, a factor
    beyond the ladder is kept as 4 and flagged; the learned closure gets its mean share."""
    import json

    if MPI.COMM_WORLD.size > 1:
        pytest.skip("experiment tests start their own processes; run them serially")
    half, exact = "oracle τ, 0.5 of its variance", "oracle τ"
    first = _skill_summary(
        tmp_path / "a.json", 5, {half: (1.1, False), exact: (4.0, True), "MNO": (1.05, False)}, 0.4
    )
    second = _skill_summary(
        tmp_path / "b.json",
        101,
        {half: (1.3, False), exact: (3.0, False), "MNO": (1.15, False)},
        0.5,
    )
    result = _run_skill([str(first), str(second), "--output-dir", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr
    skill = json.loads((tmp_path / "out" / "skill.json").read_text())
    assert skill["test_seeds"] == [5, 101]
    (a, b) = skill["oracle"]
    assert a["fraction_explained"] == 0.5 and a["mean_factor"] == pytest.approx(1.2)
    # The standard error of two values is |x − y| / 2.
    assert a["factor_standard_error"] == pytest.approx(0.1) and a["lower_bounds"] == [False, False]
    assert b["fraction_explained"] == 1.0 and b["mean_factor"] == pytest.approx(3.5)
    assert b["lower_bounds"] == [True, False]
    (mno,) = skill["learned"]
    assert mno["mean_fraction_explained"] == pytest.approx(0.45)
    assert mno["mean_factor"] == pytest.approx(1.1) and mno[
        "factor_standard_error"
    ] == pytest.approx(0.05)
    assert (tmp_path / "out" / "skill.png").stat().st_size > 10_000
    assert "≥ on 1 of 2 seeds" in result.stdout


def test_skill_refuses_summaries_that_do_not_compare(tmp_path):
    """The same test seed twice, or runs with other settings, are refused by name."""
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("experiment tests start their own processes; run them serially")
    runs = {"oracle τ": (4.0, True)}
    first = _skill_summary(tmp_path / "a.json", 5, runs, 0.4, fno_modes=[32])
    again = _skill_summary(tmp_path / "b.json", 5, runs, 0.4, fno_modes=[32])
    other = _skill_summary(tmp_path / "c.json", 101, runs, 0.4, fno_modes=[64])
    plain = _skill_summary(tmp_path / "d.json", 102, {}, 0.4, fno_modes=[32])
    for argv, message in [
        ([first, again], "each summary must be a different test seed, got test seeds [5, 5]"),
        ([first, other], "c.json differs from a.json in ['fno_modes']"),
        ([first, plain], "no oracle run common to every summary"),
        ([first, tmp_path / "none.json"], "missing summaries"),
    ]:
        result = _run_skill([str(p) for p in argv] + ["--output-dir", str(tmp_path / "out")])
        assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
