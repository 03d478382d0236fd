"""Slabs that follow the mesh partition: fewer grid samples travel between ranks.

In the distributed mode (:mod:`dolfinx_mno.nonlocal_distributed`) rank ``r`` holds the rows
``rows.block(r)`` of the first grid axis. A grid sample travels to another rank
(:class:`~dolfinx_mno.grid_slabs.SlabGather`) whenever the cell it was sampled in is owned
by a rank other than its row's. Two ways make the slabs and the mesh partition agree:

* **the mesh follows the slabs**: :func:`slab_partitioner` is a DOLFINx cell partitioner
  (the ``partitioner=`` of :func:`dolfinx.mesh.create_mesh`) that gives each cell to the
  rank whose slab holds the grid row nearest to the cell's vertex midpoint along axis 0;
  :func:`redistribute_to_slabs` applies it to a mesh already built (by
  :func:`dolfinx.mesh.create_rectangle`, :func:`dolfinx.mesh.create_box` or read from a
  file). A grid point then lies in a cell of its slab's rank, except on a cut between
  two slabs that passes through grid points, where the point is shared;
* **the slabs follow the mesh**: :func:`rows_following_samples` sets the slab boundaries
  where the ranks' samples change hands, when the ranks' sampled rows are ordered along
  axis 0 (rank ``r``'s all at or below rank ``r + 1``'s), and falls back to the balanced
  rows otherwise. It also moves a shared row to the rank that samples most of it.

Balance matters as much as locality: the distributed FNO's time and memory on a rank are
proportional to its rows, and the slowest rank sets the pace. So
:func:`rows_following_samples` accepts the mesh's rows only within ``max_imbalance``
(default 1.25) of the mean ``n_0 / P`` (and a row for every rank); the cell partitioner
starts from balanced rows, so the two together move at most a row or two per cut.
"""

from __future__ import annotations

import itertools
import math
import typing
from collections.abc import Callable, Sequence

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import ufl
from dolfinx import cpp as _cpp
from dolfinx.mesh import Mesh, create_mesh

from dolfinx_mno._mpi import rank_local
from dolfinx_mno.distributed_fft import SlabPartition
from dolfinx_mno.grid import Grid

__all__ = [
    "redistribute_to_slabs",
    "rows_following_samples",
    "slab_of_coordinates",
    "slab_partitioner",
]


def _check_rows(grid: Grid, rows: SlabPartition | None, num_ranks: int) -> SlabPartition:
    """``rows`` or the balanced partition, checked against the grid (the same on every rank)."""
    if rows is None:
        rows = SlabPartition.balanced(grid.shape[0], num_ranks)
    if len(rows.counts) != num_ranks or rows.size != grid.shape[0] or min(rows.counts) < 1:
        raise ValueError(
            f"rows={rows.counts} must give each of the {num_ranks} ranks at least one of the "
            f"{grid.shape[0]} rows of axis 0 of the grid {grid.shape}."
        )
    return rows


def slab_of_coordinates(grid: Grid, rows: SlabPartition, coordinates: np.ndarray) -> np.ndarray:
    """The rank whose slab holds the grid row nearest to each coordinate along axis 0.

    Rank ``r``'s band is ``[x_{o_r} - h / 2, x_{o_{r+1}} - h / 2)`` with ``x_i`` the rows'
    coordinates, ``o`` the :attr:`~SlabPartition.offsets` and ``h`` the spacing: each row
    lies in the middle of its band, so that the cells around a row go to its rank.
    Coordinates beyond the grid go to the first or last rank.

    Args:
        grid: The grid.
        rows: Rows of axis 0 per rank.
        coordinates: Coordinates along axis 0, ``(num,)``.

    Returns:
        The ranks, ``(num,)`` int32.
    """
    spacing = float(grid.spacing[0])
    nearest = np.floor((np.asarray(coordinates) - grid.lower[0]) / spacing + 0.5)
    nearest = np.clip(nearest, 0, grid.shape[0] - 1).astype(np.int64)
    ends = np.array(rows.offsets[1:-1], dtype=np.int64)
    return np.searchsorted(ends, nearest, side="right").astype(np.int32)


def _node_values(comm: MPI.Comm, values: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """``values`` at global ``nodes``, the values being split in rank order (collective).

    Args:
        comm: The ranks.
        values: This rank's block of the global array, ``(num_local,)`` float64.
        nodes: Global indices wanted here, ``(num,)``.

    Returns:
        ``(num,)`` float64.
    """
    if comm.size == 1:
        return values[nodes]
    offsets = np.concatenate([[0], np.cumsum(comm.allgather(len(values)))]).astype(np.int64)
    owner = np.searchsorted(offsets[1:], nodes, side="right")
    order = np.argsort(owner, kind="stable")
    send = np.bincount(owner, minlength=comm.size).astype(np.int64)
    receive = np.array(comm.alltoall(send.tolist()), dtype=np.int64)
    send_offsets = np.concatenate([[0], np.cumsum(send)[:-1]])
    receive_offsets = np.concatenate([[0], np.cumsum(receive)[:-1]])
    asked = np.empty(int(receive.sum()), dtype=np.int64)
    comm.Alltoallv(
        [np.ascontiguousarray(nodes[order], dtype=np.int64), (send, send_offsets), MPI.INT64_T],
        [asked, (receive, receive_offsets), MPI.INT64_T],
    )
    answers = np.ascontiguousarray(values[asked - offsets[comm.rank]], dtype=np.float64)
    replies = np.empty(len(nodes), dtype=np.float64)
    comm.Alltoallv(
        [answers, (receive, receive_offsets), MPI.DOUBLE],
        [replies, (send, send_offsets), MPI.DOUBLE],
    )
    out = np.empty(len(nodes), dtype=np.float64)
    out[order] = replies
    return out


def slab_partitioner(
    comm: MPI.Comm,
    grid: Grid,
    x: npt.ArrayLike,
    rows: SlabPartition | None = None,
) -> Callable[..., typing.Any]:
    """A DOLFINx cell partitioner that splits the mesh into the grid's slabs (collective).

    Each cell goes to the rank whose slab holds the grid row nearest to the mean of its
    vertices' coordinates along axis 0 (:func:`slab_of_coordinates`). (The mean, rather
    than the middle of the cell's extent, splits the triangles of a column that a cut
    crosses between the two ranks, which measured fewer shared grid points on a grid
    through the mesh's vertices: 2 instead of 11 on 2 ranks, 16² squares, 17² grid.) The partitioner
    makes no ghost cells (``GhostMode.none``), which is what closures need.

    Args:
        comm: The communicator of the mesh to be made.
        grid: The grid of the closure (e.g. ``grid_over_mesh`` of a first mesh, or a
            :class:`~dolfinx_mno.grid.Grid` over the domain's bounding box).
        x: The node coordinates this rank passes to :func:`dolfinx.mesh.create_mesh`,
            ``(num_nodes, gdim)`` with ``gdim == grid.dim``; the cells' node indices refer
            to these blocks concatenated in rank order.
        rows: Rows of axis 0 per rank; default the balanced partition
            (:meth:`SlabPartition.balanced`), which the distributed closure uses too.

    Returns:
        ``partitioner(comm, num_parts, cell_types, cells) -> AdjacencyList_int32``, to pass
        as ``create_mesh(..., partitioner=...)``.

    Raises:
        ValueError: On every rank: ``rows`` do not cover the grid's rows with one or more
            per rank, or ``x`` on some rank is not ``(num_nodes, grid.dim)``.

    Example:
        >>> grid = Grid((0.0, 0.0), (1.0, 1.0), (65, 65))
        >>> partitioner = slab_partitioner(comm, grid, x)
        >>> msh = dolfinx.mesh.create_mesh(comm, cells, element, x, partitioner=partitioner)
    """
    rows = _check_rows(grid, rows, comm.size)
    with rank_local(comm, "Building a slab partitioner", ValueError):
        coordinates = np.asarray(x)
        if coordinates.ndim != 2 or coordinates.shape[1] != grid.dim:
            raise ValueError(
                f"x must be the ({coordinates.shape[0] if coordinates.ndim else 0}, "
                f"{grid.dim}) node coordinates passed to create_mesh, got shape "
                f"{coordinates.shape}."
            )
    first_axis = np.ascontiguousarray(coordinates[:, 0], dtype=np.float64)

    def partition(
        part_comm: MPI.Comm,
        num_parts: int,
        cell_types: Sequence[typing.Any],
        cells: Sequence[np.ndarray],
    ) -> typing.Any:
        if num_parts != len(rows.counts) or len(cell_types) != 1:
            raise ValueError(
                f"The slab partitioner was made for {len(rows.counts)} ranks and one cell "
                f"type, but is asked for {num_parts} parts of {len(cell_types)} cell types."
            )
        num_vertices = _cpp.mesh.cell_num_vertices(cell_types[0])
        vertices = np.asarray(cells[0], dtype=np.int64)
        along = _node_values(part_comm, first_axis, vertices).reshape(-1, num_vertices)
        destinations = slab_of_coordinates(grid, rows, along.mean(axis=1))
        return _cpp.graph.AdjacencyList_int32(destinations)

    return partition


def redistribute_to_slabs(mesh: Mesh, grid: Grid, rows: SlabPartition | None = None) -> Mesh:
    """The same mesh, partitioned into the grid's slabs by :func:`slab_partitioner` (collective).

    For meshes made by DOLFINx's own generators or read from a file: their owned cells
    and nodes go through :func:`dolfinx.mesh.create_mesh` again. The cells, the nodes and
    their coordinates are the same; the cells' order (``original_cell_index``) is that of
    the old ranks' owned cells in rank order, and the new mesh has no ghost cells.
    Functions on the old mesh must be made again on the new one.

    Args:
        mesh: The mesh, of one cell type, with ``gdim == grid.dim``.
        grid: The grid of the closure, e.g. ``grid_over_mesh(mesh, grid_shape)``.
        rows: As for :func:`slab_partitioner`.

    Returns:
        The new mesh.

    Raises:
        ValueError: On every rank: as for :func:`slab_partitioner`.

    Example:
        >>> msh = dolfinx.mesh.create_unit_square(comm, 64, 64)
        >>> grid = grid_over_mesh(msh, (65, 65))
        >>> msh = redistribute_to_slabs(msh, grid)
        >>> closure = NonlocalClosure(model, [u], grid_shape=(65, 65), distributed=True)
    """
    tdim, gdim = mesh.topology.dim, mesh.geometry.dim
    num_cells = mesh.topology.index_map(tdim).size_local
    nodes = mesh.geometry.index_map()
    dofmap = mesh.geometry.dofmaps[0][:num_cells]
    cells = nodes.local_to_global(dofmap.reshape(-1).astype(np.int32)).reshape(dofmap.shape)
    x = mesh.geometry.x[: nodes.size_local, :gdim]
    partitioner = slab_partitioner(mesh.comm, grid, x, rows)
    domain = mesh.ufl_domain()
    assert domain is not None
    element = ufl.Mesh(domain.ufl_coordinate_element())
    return create_mesh(mesh.comm, cells, element, x, partitioner=partitioner)


def rows_following_samples(
    grid_shape: Sequence[int],
    indices: np.ndarray,
    comm: MPI.Comm,
    max_imbalance: float = 1.25,
) -> SlabPartition:
    """Rows of axis 0 per rank that follow where the ranks sample the grid (collective).

    If every rank samples some grid points and the rows rank ``r`` samples all lie at or
    below those of rank ``r + 1``, rank ``r``'s slab starts at its first sampled row, so no
    sample travels in :class:`~dolfinx_mno.grid_slabs.SlabGather` except on a row two ranks
    share; such a row goes to the rank that samples more of it. The result is kept if
    every rank gets a row and none gets more than
    ``max(ceil(n_0 / P), floor(max_imbalance * n_0 / P))``;
    otherwise (ranks interleaved along axis 0, a rank without cells, too uneven a split)
    the balanced rows are returned. The decision is the same on every rank.

    Args:
        grid_shape: The grid, ``(n_0, ...)``.
        indices: Flat (row-major) grid indices this rank samples, ``(num_local,)``, e.g.
            :attr:`~dolfinx_mno.grid_gather.GriddedSampler.indices`.
        comm: The ranks.
        max_imbalance: The most rows a rank may get, as a multiple of the mean
            ``n_0 / P`` (rounded down, and never below the balanced ``ceil(n_0 / P)``);
            at least 1.

    Returns:
        The rows per rank.

    Raises:
        ValueError: ``max_imbalance < 1`` or fewer rows than ranks (on every rank: both
            are global arguments).
    """
    size = int(grid_shape[0])
    if not max_imbalance >= 1.0:
        raise ValueError(f"max_imbalance must be at least 1, got {max_imbalance}.")
    if size < comm.size:
        raise ValueError(
            f"The grid {tuple(grid_shape)} has {size} rows along axis 0, fewer than the "
            f"{comm.size} ranks: use a finer grid or fewer ranks."
        )
    balanced = SlabPartition.balanced(size, comm.size)
    limit = max(max(balanced.counts), math.floor(max_imbalance * size / comm.size))
    sampled = np.asarray(indices, dtype=np.int64) // math.prod(int(n) for n in grid_shape[1:])
    # Each rank's histogram of sampled rows, from its first sampled row; None if it samples
    # nothing or spans more rows than two slabs may hold (then ranks cannot be ordered).
    histogram = None
    if sampled.size and int(sampled.max() - sampled.min()) < 2 * limit:
        first = int(sampled.min())
        histogram = (first, np.bincount(sampled - first).astype(np.int64))
    histograms = comm.allgather(histogram)
    if any(h is None for h in histograms):
        return balanced
    starts = [0]
    for below, above in itertools.pairwise(histograms):
        assert below is not None and above is not None
        boundary = _cheapest_boundary(below, above, starts[-1] + 1)
        if boundary is None:
            return balanced
        starts.append(boundary)
    counts = np.diff([*starts, size])
    if counts.min() < 1 or counts.max() > limit:
        return balanced
    return SlabPartition(tuple(int(c) for c in counts))


def _cheapest_boundary(
    below: tuple[int, np.ndarray], above: tuple[int, np.ndarray], earliest: int
) -> int | None:
    """The first row of the upper of two ranks, moving the fewest samples.

    Args:
        below: The lower rank's first sampled row and its histogram of sampled rows.
        above: The same for the upper rank.
        earliest: The smallest boundary allowed.

    Returns:
        The row, or ``None`` if the upper rank's samples do not start after ``earliest``
        and at or before the lower rank's end (the ranks are not ordered along axis 0).
    """
    (low, counts_below), (high, counts_above) = below, above
    end = low + len(counts_below)  # one past the lower rank's last sampled row
    candidates = np.arange(max(earliest, min(high, end)), end + 1)
    if candidates.size == 0 or high + len(counts_above) <= candidates[0]:
        return None
    # Samples moved at boundary b: the lower rank's at rows >= b, the upper's below b.
    above_b = np.concatenate([np.cumsum(counts_below[::-1])[::-1], [0]])
    moved_down = above_b[np.clip(candidates - low, 0, len(counts_below))]
    cumulative = np.concatenate([[0], np.cumsum(counts_above)])
    moved_up = cumulative[np.clip(candidates - high, 0, len(counts_above))]
    return int(candidates[np.argmin(moved_down + moved_up)])
