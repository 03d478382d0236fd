"""The structured grid of a non-local closure: its geometry, and where it lies on a mesh.

Non-local closures run a neural operator on a structured grid over the mesh's bounding
box. The data path of one update is split into stages, one module each:

* **grid geometry** (this module): :class:`Grid`, a vertex-centred tensor grid
  ``lower + index * spacing`` (endpoints included) whose points are in row-major order of
  ``(ix, iy[, iz])``; :func:`grid_over_mesh` builds the grid of a closure over a mesh.
* **sample → gather** (:mod:`dolfinx_mno.grid_gather`): :class:`GridPointSampler`
  evaluates a finite-element field at the grid points a rank owns;
  :class:`GriddedSampler` samples UFL expressions there and gathers the grid on the root.
* **model** (:mod:`dolfinx_mno.torch_bridge`): :class:`~dolfinx_mno.torch_bridge.GridEvaluator`
  runs the model on the gathered grid, on the root.
* **scatter → interpolate** (:mod:`dolfinx_mno.grid_scatter`): :class:`GridScatter` sends
  each rank the sub-block of the output grid around its points and interpolates it there
  with :class:`GridInterpolator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
from dolfinx.mesh import Mesh

__all__ = ["Grid", "grid_over_mesh", "mesh_bounding_box"]


@dataclass(frozen=True)
class Grid:
    """A vertex-centred structured grid.

    Attributes:
        lower: Lower corner, shape ``(gdim,)``, finite.
        upper: Upper corner, shape ``(gdim,)``, finite and above ``lower``.
        shape: Number of points per direction (at least 2 each).

    Raises:
        ValueError: Corners and shape of different lengths, a corner that is not finite
            (an infinite or NaN corner gives NaN points), an upper corner not above the
            lower one, or fewer than 2 points in a direction.
    """

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    shape: tuple[int, ...]

    def __post_init__(self):
        if not (len(self.lower) == len(self.upper) == len(self.shape)):
            raise ValueError("Grid lower, upper and shape must have the same length.")
        if not all(math.isfinite(x) for x in (*self.lower, *self.upper)):
            raise ValueError(
                f"Grid corners must be finite numbers, got lower {self.lower}, upper {self.upper}."
            )
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


# The dataclass's generated __init__ has no docstring; help() would show object's.
Grid.__init__.__doc__ = "Create the grid and check it; see the class docstring for the fields."


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


def grid_over_mesh(
    mesh: Mesh,
    shape: Sequence[int] | None = None,
    bounding_box: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
) -> Grid:
    """The grid of a non-local closure on ``mesh`` (collective; the same on every rank).

    Args:
        mesh: The mesh, whose geometric and topological dimensions must agree.
        shape: Points per direction. Default: one point per mean cell size,
            ``ceil(extent / h) + 1`` with ``h = (volume / num_cells)^(1/tdim)``, the volume
            being that of the mesh's bounding box.
        bounding_box: ``(lower, upper)`` corners of the grid, each of shape ``(gdim,)``;
            default the mesh's bounding box (:func:`mesh_bounding_box`).

    Returns:
        The grid.

    Raises:
        ValueError: The grid box does not cover the mesh's bounding box (the same on every
            rank: both boxes are global).
    """
    lower, upper = mesh_bounding_box(mesh)
    if bounding_box is None:
        box_lower, box_upper = lower, upper
    else:
        box_lower = np.asarray(bounding_box[0], dtype=np.float64)
        box_upper = np.asarray(bounding_box[1], dtype=np.float64)
    if shape is None:
        tdim = mesh.topology.dim
        num_cells = mesh.comm.allreduce(mesh.topology.index_map(tdim).size_local)
        h = (np.prod(upper - lower) / num_cells) ** (1.0 / tdim)
        shape = [math.ceil((hi - lo) / h) + 1 for lo, hi in zip(box_lower, box_upper, strict=True)]
    grid = Grid(
        tuple(float(x) for x in box_lower),
        tuple(float(x) for x in box_upper),
        tuple(int(n) for n in shape),
    )
    if not grid.covers(lower, upper):
        raise ValueError(
            f"The grid box [{grid.lower}, {grid.upper}] does not cover the mesh's "
            f"bounding box [{tuple(lower.tolist())}, {tuple(upper.tolist())}]."
        )
    return grid
