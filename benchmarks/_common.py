"""What the benchmark scripts share: machine description, number formatting, rank runs."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from mpi4py import MPI

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


def positive_int(text: str) -> int:
    """An ``argparse`` type: a positive integer (0 and negatives refused, not run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_size(text: str) -> float:
    """An ``argparse`` type: a positive number of points or dofs, ``1e5`` accepted."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value >= 1 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number (>= 1), got {text}")
    return value


def existing_file(text: str) -> Path:
    """An ``argparse`` type: the path of a file that exists (a result file to read)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def device_name(text: str) -> str:
    """An ``argparse`` type: ``auto``, ``cpu`` or a CUDA device this machine has.

    Checked by :func:`dolfinx_mno.resolve_device` before any work: ``--device cuda``
    on a machine without a GPU is refused here, not by torch minutes into the run.
    """
    if text == "auto":
        return text
    try:
        mno.resolve_device(text, MPI.COMM_SELF)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def refuse_quick_overrides(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]
) -> None:
    """``parser.error`` if ``--quick`` is given with options it sets itself.

    ``--quick`` replaces these options' values; given together, the explicit values would
    be dropped without a word.
    """
    if not args.quick:
        return
    given = [name for name in names if getattr(args, name) != parser.get_default(name)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        parser.error(f"--quick sets {flags} itself: drop --quick, or drop {flags}")


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
