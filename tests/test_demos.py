"""Run every demo in ``--quick`` mode, serially and under ``mpirun -n 2``.

Each demo runs in its own process (as a user would run it), with the demo's folder as the
working directory; demos write their outputs relative to their own file, so the working
directory does not matter. The demos end with their own assertions, so a zero exit code
means they passed. After a demo's serial run, the experiments that measure its outputs
(``experiments/``) run on them, in a cheap configuration: a smoke test. These tests start
MPI jobs themselves and belong to the serial session.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest

DEMO_DIR = Path(__file__).resolve().parent.parent / "demos"
EXPERIMENT_DIR = DEMO_DIR.parent / "experiments"
# The experiments that read a demo's outputs, with their arguments for the smoke test.
EXPERIMENTS = {
    "burgers/demo_burgers.py": [["burgers_results.py"], ["burgers_aposteriori.py"]],
    "lorenz96/demo_lorenz96.py": [
        ["lorenz96_results.py"],
        ["lorenz96_runtime.py", "--min-log2-k", "9", "--max-log2-k", "9"],
    ],
    # They regenerate their own DNS (the demo writes none) with the demo's flow module;
    # ~20 s each (the step correction's DNS file, once written, is read by later runs).
    "turbulence_2d/demo_turbulence_2d.py": [
        ["turbulence_2d_limits.py", "--quick"],
        # --bound and --dissipative: the stabilised step correction's code paths; two more
        # test seeds (their DNS, the runs from them and the statistics over the seeds)
        [
            "turbulence_2d_step_correction.py",
            "--quick",
            "--bound",
            "4",
            "--dissipative",
            "--test-seeds",
            "2",
        ],
        # the CNN source, against the local MLP the run above fitted
        ["turbulence_2d_step_correction.py", "--quick", "--bound", "4", "--dissipative", "--cnn"],
        # the source with memory, against the one the run above fitted
        [
            "turbulence_2d_step_correction.py",
            "--quick",
            "--bound",
            "4",
            "--dissipative",
            "--memory",
        ],
        # the third-order time scheme: DNS, ladders, oracles, the closure trained both ways
        [
            "turbulence_2d_time_scheme.py",
            "--quick",
            "--a-posteriori",
            "1",
            "--window",
            "2",
            "--dt-factors",
            "1",
            "2",
        ],
        # the closures fitted on the test trajectory itself (two MNOs: 8 and 16 modes, also
        # fitted on another seed), and the one the run above fitted, held over the stages
        [
            "turbulence_2d_in_sample.py",
            "--quick",
            "--hold",
            "--fno-modes",
            "8",
            "16",
            "--train-seeds",
            "1",
            "--a-posteriori",
            "1",
            "--window",
            "2",
            "--compare",
            "output/turbulence_2d_time_scheme/local_closure_quick.pt",
        ],
        # out of sample only: a factorised MNO with weight decay, validated (a priori and
        # through the solver) on a whole held-out trajectory, and mirrored data
        [
            "turbulence_2d_in_sample.py",
            "--quick",
            "--hold",
            "--no-in-sample",
            "--degraded",
            "--train-seeds",
            "3",
            "--mirror",
            "--trajectory-split",
            "--fno-factorization",
            "tucker",
            "--weight-decay",
            "1e-4",
            "--a-posteriori",
            "1",
            "--window",
            "2",
        ],
    ],
}


def _check_turbulence_2d(summary: dict, num_ranks: int) -> None:
    """The numbers of the 2D turbulence demo's quick run (its summary.json)."""
    assert summary["quick"] and summary["ranks"] == num_ranks
    check = summary["tendency_check"]  # the exact subgrid flux closes the filtered DNS
    assert 0 < check["exact tau"] < 0.1 * check["no closure"], check
    assert 0.0 <= summary["smagorinsky_constant"] < 0.5, summary["smagorinsky_constant"]
    for label, row in summary["a_posteriori"].items():
        assert row["held_out_after"] < row["held_out_before"], (label, row)
    # Both closures are trained on the same windows: the same loss without closure.
    plain = [row["held_out_no_closure"] for row in summary["a_posteriori"].values()]
    assert 0 < plain[0] < np.inf and np.allclose(plain, plain[0], rtol=1e-12), plain
    models = summary["models"]
    assert {"no closure", "Smagorinsky", "MNO, a posteriori", "local MLP, a posteriori"} <= set(
        models
    )
    for label, row in models.items():
        assert row["correlation_start"] > 0.99, (label, row)
        assert row["finite"] and row["max_energy"] < 10 * summary["dns_max_energy"], (label, row)
        assert row["resolution_factor"] > 1 - 1e-9 and row["wall_time_ratio"] > 0, (label, row)
    # The coarse mesh decorrelates within the quick test horizon; the 2x finer one lasts longer.
    ladder = [row["decorrelation_time"] for label, row in models.items() if "²" in label]
    assert models["no closure"]["decorrelation_time"] < min(ladder), models


# The checks of a demo's summary.json after its quick run: demo -> (output file, check).
SUMMARY_CHECKS = {
    "turbulence_2d/demo_turbulence_2d.py": ("turbulence_2d/summary.json", _check_turbulence_2d),
}
DEMOS = sorted(
    {*DEMO_DIR.glob("**/demo_*.py"), DEMO_DIR / "quickstart.py", DEMO_DIR / "nonlocal_closure.py"}
)
MPIRUN = Path(sys.executable).parent / "mpirun"
TIMEOUT = 900  # seconds; a failing rank must not leave the test waiting forever
OUTPUT_TAIL = 6000  # characters of stdout/stderr shown on failure


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = text or ""
    return text if len(text) <= OUTPUT_TAIL else "[...]\n" + text[-OUTPUT_TAIL:]


def _child_environment() -> dict[str, str]:
    """This process's environment without the variables of its own MPI launch, if any."""
    prefixes = ("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


@pytest.mark.parametrize("num_ranks", [1, 2], ids=lambda n: f"np{n}")
# A demo's serial and 2-rank runs write the same output folder, and the experiments after
# the serial run read it: under pytest-xdist (`make test-serial`) they stay on one worker
# and run in order (tests/conftest.py); other demos and files run beside them.
@pytest.mark.parametrize("demo", DEMOS, ids=lambda path: str(path.relative_to(DEMO_DIR)))
def test_demo(demo: Path, num_ranks: int):
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("demo tests start their own MPI jobs; run them from the serial session")
    assert demo.is_file(), f"missing demo {demo}"
    command = [sys.executable, str(demo), "--quick"]
    if num_ranks > 1:
        assert MPIRUN.is_file(), f"no mpirun next to the Python interpreter ({MPIRUN})"
        command = [str(MPIRUN), "-n", str(num_ranks), *command]
    _run(command, demo.parent)
    if str(demo.relative_to(DEMO_DIR)) in SUMMARY_CHECKS:
        path, check = SUMMARY_CHECKS[str(demo.relative_to(DEMO_DIR))]
        check(json.loads((DEMO_DIR / "output" / path).read_text()), num_ranks)
    if num_ranks == 1:
        for script, *arguments in EXPERIMENTS.get(str(demo.relative_to(DEMO_DIR)), []):
            _run([sys.executable, str(EXPERIMENT_DIR / script), *arguments], EXPERIMENT_DIR)


def _run(command: list[str], cwd: Path) -> None:
    """Run ``command`` in ``cwd``; fail with the tail of its output if it fails."""
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=_child_environment(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(
            f"{' '.join(command)} timed out after {TIMEOUT} s\n"
            f"--- stdout ---\n{_tail(err.stdout)}\n--- stderr ---\n{_tail(err.stderr)}"
        )
    assert result.returncode == 0, (
        f"{' '.join(command)} exited with code {result.returncode}\n"
        f"--- stdout ---\n{_tail(result.stdout)}\n--- stderr ---\n{_tail(result.stderr)}"
    )


def test_turbulence_demo_refuses_quick_with_medium(monkeypatch, capsys):
    """``--quick --medium`` ran the quick problem without a word; the two are exclusive.
    Run in process: the parser exits before any work."""
    import runpy

    folder = DEMO_DIR / "turbulence_2d"
    monkeypatch.setattr(sys, "path", [str(folder), str(DEMO_DIR), *sys.path])
    monkeypatch.setattr(sys, "argv", ["demo_turbulence_2d.py", "--quick", "--medium"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(folder / "demo_turbulence_2d.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert "argument --medium: not allowed with argument --quick" in capsys.readouterr().err
