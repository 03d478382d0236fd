"""What the Burgers experiments read from the demo's outputs, in one place.

``demos/burgers/demo_burgers.py`` writes ``summary.json``, ``reference.npz`` and its model
files to ``demos/output/burgers/``; ``burgers_results.py`` and ``burgers_aposteriori.py``
read them with :func:`read_demo_output` and rebuild the demo's closures with
:func:`local_closure` and :func:`operator_closure`.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import dolfinx_mno as mno

REPOSITORY = Path(__file__).resolve().parents[1]
FILES = ("summary.json", "reference.npz", "local_closure.pt", "mno_closure.pt")


def add_demo_output_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--demo-output`` option (default: ``demos/output/burgers``)."""
    parser.add_argument(
        "--demo-output",
        type=Path,
        default=REPOSITORY / "demos" / "output" / "burgers",
        help="the folder the Burgers demo wrote (default: demos/output/burgers)",
    )


def read_demo_output(folder: Path) -> tuple[dict, dict, dict[float, np.ndarray]]:
    """The demo's summary, its ``reference.npz`` and the filtered fine states by time.

    Exits with a message naming the missing files if the demo has not run.
    """
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        sys.exit(f"{folder} has no {', '.join(missing)}: run the Burgers demo first")
    demo = json.loads((folder / "summary.json").read_text())
    reference = dict(np.load(folder / "reference.npz"))
    filtered = {
        round(float(t), 9): v for t, v in zip(reference["times"], reference["states"], strict=True)
    }
    return demo, reference, filtered


def local_closure(un, path: Path):
    """The demo's local closure ``τ(u, u_x)`` from a model file, and its measure."""
    closure = mno.Closure(str(path), mno.Operands({"u": un, "u_x": un.dx(0)}))
    return closure, closure.dx


def operator_closure(un, path: Path, grid: dict):
    """The demo's MNO closure from a model file on the demo's ``grid``, and its measure."""
    closure = mno.NonlocalClosure(
        str(path),
        mno.Operands({"u": un, "u_x": un.dx(0)}),
        value_shape=(),
        quadrature_degree=2,
        grid_shape=tuple(grid["shape"]),
        bounding_box=(np.array(grid["lower"]), np.array(grid["upper"])),
        mask_channel=False,
    )
    return closure, closure.dx
