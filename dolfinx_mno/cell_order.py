"""Orders of a mesh's cells that do not depend on its partition: by their midpoints.

DOLFINx's ``mesh.topology.original_cell_index`` is the cell's position in the mesh input:
the same on any number of ranks for meshes made by ``create_*`` or read from a file, but
not for the mesh :func:`dolfinx.mesh.refine` returns (its cells are numbered in an order
that follows the partition), and absent for a submesh. What samples are recorded by, and
which cell evaluates a grid point on a facet, must not depend on the partition: both go
by the cells' midpoints here, rounded to a fine lattice so that a last-bit difference in
how a partition computes a midpoint cannot reorder two cells.

* :func:`midpoint_keys`: the rounded midpoints, sort keys (lexicographic: x, then y, z).
* :func:`geometric_cell_index`: each owned cell's position in that order, a global index.
"""

from __future__ import annotations

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
from dolfinx.mesh import Mesh, compute_midpoints

__all__ = ["geometric_cell_index", "midpoint_keys"]

#: The lattice the midpoints are rounded to, relative to the mesh's bounding box: far
#: below any cell's size, far above round-off.
RELATIVE_RESOLUTION = 1e-9


def midpoint_keys(mesh: Mesh, cells: npt.NDArray[np.int32]) -> npt.NDArray[np.float64]:
    """The midpoints of ``cells``, ``(n, 3)``, rounded to the lattice (collective).

    The lattice spacing is :data:`RELATIVE_RESOLUTION` times the diagonal of the mesh's
    bounding box (one ``Allreduce`` of its corners).
    """
    x = mesh.geometry.x
    lower = np.min(x, axis=0, initial=np.inf)
    upper = np.max(x, axis=0, initial=-np.inf)
    mesh.comm.Allreduce(MPI.IN_PLACE, lower, op=MPI.MIN)
    mesh.comm.Allreduce(MPI.IN_PLACE, upper, op=MPI.MAX)
    spacing = RELATIVE_RESOLUTION * max(float(np.linalg.norm(upper - lower)), 1e-300)
    midpoints = compute_midpoints(mesh, mesh.topology.dim, cells)
    return np.round(midpoints / spacing) * spacing


def geometric_cell_index(mesh: Mesh) -> npt.NDArray[np.int64]:
    """Each owned cell's position among all cells ordered by :func:`midpoint_keys`.

    A global cell index, ``(num_owned,)``, the same for the same cell on any partition
    (collective: the keys are gathered on rank 0, sorted there and the positions
    scattered back; 24 bytes a cell on rank 0).
    """
    comm = mesh.comm
    num_owned = mesh.topology.index_map(mesh.topology.dim).size_local
    keys = np.ascontiguousarray(midpoint_keys(mesh, np.arange(num_owned, dtype=np.int32)))
    counts = np.array(comm.allgather(num_owned), dtype=np.int64)
    everyone = np.empty((int(counts.sum()), 3)) if comm.rank == 0 else None
    comm.Gatherv(keys, [everyone, 3 * counts] if comm.rank == 0 else None, root=0)
    positions = None
    if comm.rank == 0:
        assert everyone is not None
        order = np.lexsort(everyone.T[::-1])  # x first, then y, then z
        positions = np.empty(order.size, dtype=np.int64)
        positions[order] = np.arange(order.size, dtype=np.int64)
    index = np.empty(num_owned, dtype=np.int64)
    comm.Scatterv([positions, counts] if comm.rank == 0 else None, index, root=0)
    return index
