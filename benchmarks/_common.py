"""What the benchmark scripts share: machine description, number formatting, rank runs."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

import dolfinx_mno as mno  # before dolfinx: it makes the wheel's MPI library visible


def machine(device: torch.device) -> dict[str, object]:
    """A description of the machine and the software versions."""
    import dolfinx

    model_name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dolfinx": dolfinx.__version__,
        "dolfinx_mno": mno.__version__,
        "numpy": np.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def ms(seconds: float) -> str:
    """Seconds as milliseconds with three significant digits (no exponent notation)."""
    rounded = float(f"{1e3 * seconds:.3g}")
    return f"{rounded:,.0f}" if rounded >= 1000 else f"{rounded:.3g}"


def result_tag(tag: str | None, ranks: int, quick: bool) -> str:
    """The tag of a result file: ``tag``, else ``np{ranks}``, with ``_quick`` for a smoke
    test, so that a ``--quick`` run never overwrites a measurement."""
    return tag or f"np{ranks}{'_quick' if quick else ''}"


def shared_cases(
    first: Mapping[Hashable, object], second: Mapping[Hashable, object], names: Sequence[str]
) -> set[Hashable]:
    """The case keys two result files share; SystemExit naming both files' cases if none.

    A comparison of runs with different ``--sizes`` (or closures, or kinds) would otherwise
    print an empty table and write an empty result without a word.
    """
    shared = set(first) & set(second)
    if not shared:
        raise SystemExit(
            f"{names[0]} and {names[1]} share no case to compare: {sorted(map(str, first))} "
            f"against {sorted(map(str, second))}. Compare runs of the same sizes and cases."
        )
    return shared


def run_serial_and_parallel(
    script: str, forwarded: Sequence[str], tag: str | None, ranks: int, mpirun: str | None
) -> tuple[str, str]:
    """Run ``script`` on 1 rank and under ``mpirun -n ranks``; returns the two result tags."""
    mpirun = mpirun or shutil.which("mpirun", path=str(Path(sys.executable).parent))
    mpirun = mpirun or shutil.which("mpirun") or "mpirun"
    prefix = f"{tag}_" if tag else ""
    tags = (f"{prefix}np1", f"{prefix}np{ranks}")
    subprocess.run([sys.executable, script, "--tag", tags[0], *forwarded], check=True)
    subprocess.run(
        [mpirun, "-n", str(ranks), sys.executable, script, "--tag", tags[1], *forwarded],
        check=True,
    )
    return tags
