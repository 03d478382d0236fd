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

import pytest
from test_demos import _child_environment

EXPERIMENT_DIR = Path(__file__).resolve().parent.parent / "experiments"
# Listed, not globbed: an experiment is in here once its --help is cheap.
EXPERIMENTS = [
    "checkerboard_cell_problems.py",
    "multiscale_diffusion_results.py",
    "transient_diffusion_results.py",
    "turbulence_2d_data_scaling.py",
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
