"""Small helpers shared by the demos (as dolfinx-external-operator's ``demo/utilities.py``).

Only what several demos would otherwise copy lives here: global norms, boundary dofs,
timing across ranks, the demos' time loop (:func:`march`), rank-0 printing and the output
folder. Anything a user would reuse in
their own simulation belongs in the package instead.

A demo in a subfolder puts ``demos/`` on the module search path before importing it,
after its other imports (``dolfinx_mno`` first, as everywhere)::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demos/: utilities.py
    from utilities import log
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mpi4py import MPI

import numpy as np
import ufl
from dolfinx import fem, mesh
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from dolfinx_mno.timestepping import IMEXStepper

#: Where the demos write their outputs, one folder per demo (``demos/output``).
OUTPUT = Path(__file__).resolve().parent / "output"


def log(*message: object, comm: MPI.Comm = MPI.COMM_WORLD, **kwargs: object) -> None:
    """``print`` on rank 0 of `comm` only, flushed (the lines of a long run appear as it goes)."""
    if comm.rank == 0:
        print(*message, **kwargs, flush=True)  # type: ignore[call-overload]


def positive_int(text: str) -> int:
    """An ``argparse`` type: a positive integer (0 and negatives are refused, not defaulted)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def output_folder(
    name: str,
    comm: MPI.Comm = MPI.COMM_WORLD,
    root: Path | None = None,
    written_last: Sequence[str] = (),
) -> Path:
    """The folder ``root / name`` (``root``: ``demos/output``), created if need be.

    Collective: rank 0 creates it and tells the others whether that worked, so that a
    folder it cannot create (a file in the way, no permission) raises on every rank
    instead of leaving the others waiting.

    Args:
        written_last: Files of the folder that the run writes after the others (a summary
            of the model files it saves first). Rank 0 removes them from an earlier run
            here, so that a run stopped before its end leaves no old summary beside new
            model files for a later script to read as one.
    """
    folder = (root or OUTPUT) / name
    error = None
    if comm.rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            error = f"Cannot create the output folder {folder}: {err}"
        for stale in written_last if error is None else ():
            try:
                (folder / stale).unlink(missing_ok=True)
            except OSError as err:
                error = f"Cannot remove {stale} of an earlier run from {folder}: {err}"
                break
    error = comm.bcast(error, root=0)
    if error is not None:
        raise OSError(error)
    return folder


def unit_square(comm: MPI.Comm, n: int) -> mesh.Mesh:
    """The unit square as n x n quadrilaterals."""
    return mesh.create_unit_square(comm, n, n, mesh.CellType.quadrilateral)


def boundary_dofs(V: fem.FunctionSpace) -> np.ndarray:
    """The dofs of V (a space or a sub-space) on the whole boundary of its mesh (local indices)."""
    msh = V.mesh
    msh.topology.create_connectivity(msh.topology.dim - 1, msh.topology.dim)
    facets = mesh.exterior_facet_indices(msh.topology)
    return fem.locate_dofs_topological(V, msh.topology.dim - 1, facets)


def l2_norm(u: fem.Function) -> float:
    """The L² norm of u over the whole mesh, on every rank (collective)."""
    local = fem.assemble_scalar(fem.form(ufl.inner(u, u) * ufl.dx))
    return float(np.sqrt(u.function_space.mesh.comm.allreduce(local, op=MPI.SUM)))


def relative_l2_error(values: np.ndarray, reference: fem.Function) -> float:
    """‖u - reference‖ / ‖reference‖ (collective).

    ``u`` is the function of `reference`'s space with dof values `values` (local, with
    ghosts).
    """
    difference = fem.Function(reference.function_space)
    difference.x.array[:] = values - reference.x.array
    return l2_norm(difference) / l2_norm(reference)


def timed(function: Callable[[], object], comm: MPI.Comm, repeats: int = 1) -> float:
    """The best, over `repeats` calls, of the slowest rank's wall time of `function()`."""
    best = np.inf
    for _ in range(repeats):
        comm.Barrier()
        tic = time.perf_counter()
        function()
        best = min(best, comm.allreduce(time.perf_counter() - tic, op=MPI.MAX))
    return best


def assemble_global(form: fem.Form) -> float:
    """The value of a compiled scalar form over the whole mesh (collective).

    Each rank assembles over the cells it owns and ``allreduce`` sums, so the value is the
    same on every rank and for any number of ranks.

    Args:
        form: A compiled scalar form (``dolfinx.fem.form(...)``).
    """
    return form.mesh.comm.allreduce(fem.assemble_scalar(form), op=MPI.SUM)


def march(
    stepper: IMEXStepper,
    num_steps: int,
    callback: Callable[[float], None] | None = None,
    every: int = 1,
    progress: str | None = None,
) -> float:
    """Take ``num_steps`` steps of `stepper`, stopping early if its state blows up (collective).

    After each step every rank checks that ``stepper.u`` is finite on all ranks; if not,
    the loop stops there (the caller sees the missing records, and ``stepper.u`` holds the
    non-finite state).

    Args:
        stepper: The time loop, at its start time ``stepper.t``.
        num_steps: The most steps to take.
        callback: Called as ``callback(t)`` at the start time and after every ``every``
            steps, ``t`` the stepper's time (output, diagnostics).
        every: Steps between two calls of ``callback``.
        progress: The label of a progress bar on rank 0, or None for none.

    Returns:
        The wall time of the steps (closure updates included, callbacks and the finiteness
        checks excluded), the slowest rank's.
    """
    comm = stepper.u.function_space.mesh.comm
    if callback is not None:
        callback(stepper.t)
    seconds = 0.0
    hide = comm.rank != 0 or progress is None
    for step in tqdm(range(num_steps), desc=progress, disable=hide):
        tic = time.perf_counter()
        stepper.step()
        seconds += time.perf_counter() - tic
        if not comm.allreduce(bool(np.isfinite(stepper.u.x.array).all()), op=MPI.LAND):
            break  # blown up
        if callback is not None and (step + 1) % every == 0:
            callback(stepper.t)
    return comm.allreduce(seconds, op=MPI.MAX)
