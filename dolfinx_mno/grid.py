"""Transfer between finite-element fields and a structured grid, under MPI.

Non-local closures run a neural operator on a structured grid over the mesh's bounding
box. This module moves data both ways:

* :class:`Grid`: a vertex-centred tensor grid ``lower + index * spacing`` (endpoints
  included), with points in row-major order of ``(ix, iy[, iz])``.
* :class:`GridSampler`: evaluates a discontinuous Lagrange function at the grid points.
  Each grid point is evaluated by exactly one rank, in exactly one cell: among the cells
  that contain it, the one with the smallest *original* (input) cell index, agreed on with
  one ``MPI.MIN`` reduction at set-up. The choice therefore does not depend on the
  partition, which matters where a discontinuous operand (``grad u``) jumps across a facet
  that a grid point lies on. Points in no cell are *outside* the domain.
* :class:`GridInterpolator`: multilinear interpolation of a grid field at a rank's points.
  It knows the index box of grid cells that the rank's points touch, so a rank needs only
  that sub-block of the grid.

All tabulations (reference coordinates, basis values, interpolation weights) are computed
once; a transfer is then a gather and a weighted sum.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
from dolfinx import fem, geometry
from dolfinx.mesh import CellType, Mesh

__all__ = ["Grid", "GridInterpolator", "GridSampler"]


@dataclass(frozen=True)
class Grid:
    """A vertex-centred structured grid.

    Attributes:
        lower: Lower corner, shape ``(gdim,)``.
        upper: Upper corner, shape ``(gdim,)``.
        shape: Number of points per direction (at least 2 each).
    """

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    shape: tuple[int, ...]

    def __post_init__(self):
        if not (len(self.lower) == len(self.upper) == len(self.shape)):
            raise ValueError("Grid lower, upper and shape must have the same length.")
        if any(n < 2 for n in self.shape):
            raise ValueError(f"A grid needs at least 2 points per direction, got {self.shape}.")
        if any(hi <= lo for lo, hi in zip(self.lower, self.upper, strict=True)):
            raise ValueError(f"Grid upper {self.upper} must exceed lower {self.lower}.")

    @property
    def dim(self) -> int:
        """Number of directions."""
        return len(self.shape)

    @property
    def num_points(self) -> int:
        """Total number of points."""
        return math.prod(self.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Point spacing per direction, shape ``(dim,)``."""
        return (np.array(self.upper) - np.array(self.lower)) / (np.array(self.shape) - 1)

    def points(self) -> np.ndarray:
        """All points, shape ``(num_points, 3)`` (zero-padded), row-major in ``(ix, iy, iz)``."""
        axes = [
            np.linspace(lo, hi, n)
            for lo, hi, n in zip(self.lower, self.upper, self.shape, strict=True)
        ]
        mesh_axes = np.meshgrid(*axes, indexing="ij")
        points = np.zeros((self.num_points, 3))
        for d, axis in enumerate(mesh_axes):
            points[:, d] = axis.reshape(-1)
        return points

    def covers(self, lower: npt.ArrayLike, upper: npt.ArrayLike, rtol: float = 1e-12) -> bool:
        """Whether the box ``[lower, upper]`` lies inside the grid (up to ``rtol``)."""
        tol = rtol * float(np.max(np.array(self.upper) - np.array(self.lower)))
        return bool(
            np.all(np.asarray(lower) >= np.array(self.lower) - tol)
            and np.all(np.asarray(upper) <= np.array(self.upper) + tol)
        )


def mesh_bounding_box(mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """Global bounding box of the mesh geometry (collective), two arrays of shape ``(gdim,)``."""
    gdim = mesh.geometry.dim
    x = mesh.geometry.x[:, :gdim]
    lower = x.min(axis=0) if x.size else np.full(gdim, np.inf)
    upper = x.max(axis=0) if x.size else np.full(gdim, -np.inf)
    global_lower = np.empty(gdim)
    global_upper = np.empty(gdim)
    mesh.comm.Allreduce(np.asarray(lower, dtype=np.float64), global_lower, op=MPI.MIN)
    mesh.comm.Allreduce(np.asarray(upper, dtype=np.float64), global_upper, op=MPI.MAX)
    return global_lower, global_upper


def _reference_coordinates(mesh: Mesh, cells: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Reference coordinates of ``points`` (shape ``(n, 3)``) in their ``cells``."""
    tdim = mesh.topology.dim
    gdim = mesh.geometry.dim
    nodes = mesh.geometry.x[mesh.geometry.dofmaps[0][cells]][:, :, :gdim]  # (n, nodes, gdim)
    simplex = mesh.topology.cell_type in (
        CellType.interval,
        CellType.triangle,
        CellType.tetrahedron,
    )
    if simplex and mesh.geometry.cmaps[0].degree == 1 and gdim == tdim:
        # Affine map x = x0 + J ξ with J's columns x_k - x0: one batched solve.
        x0 = nodes[:, 0, :]
        jacobian = np.stack([nodes[:, k + 1, :] - x0 for k in range(tdim)], axis=2)
        return np.linalg.solve(jacobian, (points[:, :gdim] - x0)[:, :, None])[:, :, 0]
    # General (non-affine) cells: Newton pull-back, one point at a time (set-up only).
    cmap = mesh.geometry.cmaps[0]
    reference = np.empty((len(cells), tdim))
    for i in range(len(cells)):
        reference[i] = cmap.pull_back(points[i : i + 1, :gdim], nodes[i])[0]
    return reference


class GridSampler:
    """Evaluate a vector DG function at the points of a grid, each on exactly one rank.

    Args:
        grid: The grid.
        space: A blocked discontinuous Lagrange space on the mesh, value shape
            ``(num_channels,)``; :meth:`sample` takes functions of this space.

    Attributes:
        indices: Flat grid indices this rank evaluates, shape ``(num_local,)``.
        inside: On every rank, a boolean mask of shape ``(num_points,)``: ``True`` where the
            grid point lies in a cell of the mesh.
    """

    def __init__(self, grid: Grid, space: fem.FunctionSpace):
        mesh = space.mesh
        comm = mesh.comm
        tdim = mesh.topology.dim
        num_owned = mesh.topology.index_map(tdim).size_local
        points = grid.points()
        owned = np.arange(num_owned, dtype=np.int32)
        tree = geometry.bb_tree(mesh, tdim, entities=owned)
        candidates = geometry.compute_collisions_points(tree, points)
        colliding = geometry.compute_colliding_cells(mesh, candidates, points)
        offsets = colliding.offsets
        links = colliding.array
        counts = np.diff(offsets)
        original = np.asarray(mesh.topology.original_cell_index, dtype=np.int64)
        sentinel = np.iinfo(np.int64).max
        local_best = np.full(grid.num_points, sentinel, dtype=np.int64)
        local_cell = np.full(grid.num_points, -1, dtype=np.int32)
        has = counts > 0
        if links.size:
            keys = original[links]
            starts = offsets[:-1][has]
            local_best[has] = np.minimum.reduceat(keys, starts)
            # The local cell holding the minimum original index, for each point found here.
            point_of_link = np.repeat(np.arange(grid.num_points), counts)
            is_best = keys == local_best[point_of_link]
            first = np.unique(point_of_link[is_best], return_index=True)
            local_cell[first[0]] = links[is_best][first[1]]
        best = np.empty_like(local_best)
        comm.Allreduce(local_best, best, op=MPI.MIN)
        mine = (local_best == best) & (best != sentinel)
        self.grid = grid
        self.space = space
        self.inside = best != sentinel
        self.indices = np.flatnonzero(mine)
        self.cells = local_cell[self.indices]

        element = space.ufl_element()
        scalar = element.sub_elements[0] if element.num_sub_elements else element
        reference = _reference_coordinates(mesh, self.cells, points[self.indices])
        table = scalar.tabulate(0, reference)  # (1, num_local, num_dofs)
        self._basis = np.ascontiguousarray(table[0])
        self._dofs = space.dofmap.list[self.cells]  # (num_local, num_dofs)
        self.num_channels = space.dofmap.bs

    @property
    def num_local(self) -> int:
        """Number of grid points this rank evaluates."""
        return len(self.indices)

    def sample(self, function: fem.Function, out: np.ndarray | None = None) -> np.ndarray:
        """Values of ``function`` at this rank's grid points, shape ``(num_local, channels)``."""
        values = function.x.array.reshape(-1, self.num_channels)
        result = np.einsum("pj,pjc->pc", self._basis, values[self._dofs], optimize=True)
        if out is None:
            return typing.cast(np.ndarray, result)
        out[...] = result
        return out


class GridInterpolator:
    """Multilinear interpolation from a grid to fixed points.

    Args:
        grid: The grid.
        points: Physical points, shape ``(num_points, gdim)``, inside the grid's box.

    Attributes:
        block_lower: First grid index per direction of the sub-block this rank needs.
        block_shape: Shape of that sub-block (empty if the rank has no points).
    """

    def __init__(self, grid: Grid, points: np.ndarray):
        d = grid.dim
        points = np.asarray(points)[:, :d]
        scaled = (points - np.array(grid.lower)) / grid.spacing
        cell = np.clip(np.floor(scaled).astype(np.int64), 0, np.array(grid.shape) - 2)
        t = np.clip(scaled - cell, 0.0, 1.0)
        if len(points):
            self.block_lower = cell.min(axis=0)
            self.block_shape = tuple(int(n) for n in cell.max(axis=0) - self.block_lower + 2)
        else:
            self.block_lower = np.zeros(d, dtype=np.int64)
            self.block_shape = tuple(0 for _ in range(d))
        local = cell - self.block_lower
        corners = np.array(np.meshgrid(*([[0, 1]] * d), indexing="ij")).reshape(d, -1).T
        num_corners = len(corners)
        self._indices = np.empty((len(points), num_corners), dtype=np.int64)
        self._weights = np.empty((len(points), num_corners))
        for k, corner in enumerate(corners):
            index = local + corner
            self._indices[:, k] = (
                np.ravel_multi_index(index.T, self.block_shape) if len(points) else 0
            )
            self._weights[:, k] = np.prod(np.where(corner == 1, t, 1.0 - t), axis=1)
        self.grid = grid

    @property
    def block_size(self) -> int:
        """Number of grid points in this rank's sub-block."""
        return math.prod(self.block_shape)

    def block_slices(self) -> tuple[slice, ...]:
        """Slices of the full grid array selecting this rank's sub-block."""
        return tuple(
            slice(int(lo), int(lo) + n)
            for lo, n in zip(self.block_lower, self.block_shape, strict=True)
        )

    def interpolate(self, block: np.ndarray) -> np.ndarray:
        """Interpolate ``block``, shape ``(channels, *block_shape)``.

        Returns:
            Values at the points, shape ``(num_points, channels)``.
        """
        flat = block.reshape(block.shape[0], -1)
        values = flat[:, self._indices]  # (channels, num_points, corners)
        return np.einsum("cpk,pk->pc", values, self._weights, optimize=True)
