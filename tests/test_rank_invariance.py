"""Results do not depend on the number of MPI ranks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).with_name("rank_invariance_job.py")
MPIRUN = Path(sys.executable).parent / "mpirun"


def _run(ranks):
    completed = subprocess.run(
        [str(MPIRUN), "-n", str(ranks), sys.executable, str(JOB)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not MPIRUN.exists(), reason="needs mpirun next to the Python executable")
def test_same_results_on_1_2_3_ranks():
    results = [_run(n) for n in (1, 2, 3)]
    reference = results[0]
    assert reference["newton_iterations"] >= 3
    for result in results[1:]:
        assert result["newton_iterations"] == reference["newton_iterations"]
        for key, value in reference.items():
            if key in ("ranks", "newton_iterations"):
                continue
            assert abs(value) > 1e-8, key  # the quantity is not trivially zero
            assert result[key] == pytest.approx(value, rel=1e-12, abs=0), (key, result["ranks"])
