"""Small helpers shared by the demos (as dolfinx-external-operator's ``demo/utilities.py``).

Only what several demos would otherwise copy lives here: global norms, boundary dofs,
timing across ranks, rank-0 printing and the output folder. Anything a user would reuse in
their own simulation belongs in the package instead.

A demo in a subfolder puts ``demos/`` on the module search path before importing it,
after its other imports (``dolfinx_mno`` first, as everywhere)::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demos/: utilities.py
    from utilities import log
"""

from __future__ import annotations

from pathlib import Path

from mpi4py import MPI

import numpy as np
from dolfinx import fem, mesh


def log(*message: object, comm: MPI.Comm = MPI.COMM_WORLD) -> None:
    """Print on rank 0 only, flushed (so that the lines of a long run appear as it goes)."""
    if comm.rank == 0:
        print(*message, flush=True)


def output_folder(name: str, root: Path | None = None, comm: MPI.Comm = MPI.COMM_WORLD) -> Path:
    """The folder ``root/name`` (``root``: ``demos/output``), created by rank 0 for all."""
    folder = (root or Path(__file__).resolve().parent / "output") / name
    if comm.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    comm.Barrier()
    return folder


def boundary_dofs(V: fem.FunctionSpace) -> np.ndarray:
    """Degrees of freedom of V on the whole boundary."""
    msh = V.mesh
    msh.topology.create_connectivity(msh.topology.dim - 1, msh.topology.dim)
    facets = mesh.exterior_facet_indices(msh.topology)
    return fem.locate_dofs_topological(V, msh.topology.dim - 1, facets)
