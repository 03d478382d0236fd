"""Scatter → interpolate: a grid on the root, back to every rank's points (collective).

The last two stages of a non-local closure's update, the mirror of
:mod:`dolfinx_mno.grid_gather` (the grid itself is in :mod:`dolfinx_mno.grid`):

* :class:`GridScatter` (the stage): ``MPI.Scatterv`` sends each rank, from the root, only
  the sub-block of the grid around its points, then interpolates it there with a
  :class:`GridInterpolator`.
* :class:`GridInterpolator` (rank-local): multilinear interpolation of a grid field at
  fixed points. It knows the index box of grid cells that its points touch, so a rank
  needs only that sub-block of the grid.

All interpolation weights and the workspaces (the received block, the corner values, the
root's send buffer) are computed and allocated once; a transfer allocates no large array.
"""

from __future__ import annotations

import math

from mpi4py import MPI

import numpy as np
import numpy.typing as npt

from dolfinx_mno.grid import Grid
from dolfinx_mno.validation import check_array, check_integer, output_array

__all__ = ["GridInterpolator", "GridScatter"]


class GridInterpolator:
    """Multilinear interpolation from a grid to fixed points.

    Args:
        grid: The grid.
        points: Physical points, shape ``(num_points, gdim)``, inside the grid's box.
        num_channels: Channels of the interpolated fields.
        dtype: Scalar type of the interpolated fields. The workspace of an interpolation,
            the ``(num_points, 2**dim, num_channels)`` corner values, is allocated once in
            this type and reused.

    Attributes:
        block_lower: First grid index per direction of the sub-block this rank needs.
        block_shape: Shape of that sub-block (empty if the rank has no points).
    """

    def __init__(
        self,
        grid: Grid,
        points: np.ndarray,
        num_channels: int = 1,
        dtype: npt.DTypeLike = np.float64,
    ):
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
        self.num_points = len(points)
        self.num_channels = int(num_channels)
        self.dtype = np.dtype(dtype)
        self._corner_values = np.empty(
            (self.num_points, num_corners, self.num_channels), dtype=self.dtype
        )

    @property
    def block_size(self) -> int:
        """Number of grid points in this rank's sub-block."""
        return math.prod(self.block_shape)

    @property
    def value_dtype(self) -> np.dtype:
        """Scalar type of the interpolated values (the weights are float64)."""
        return np.result_type(self.dtype, self._weights)

    def block_slices(self) -> tuple[slice, ...]:
        """Slices of the full grid array selecting this rank's sub-block."""
        return tuple(
            slice(int(lo), int(lo) + n)
            for lo, n in zip(self.block_lower, self.block_shape, strict=True)
        )

    def interpolate(self, block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Interpolate a field given on this rank's sub-block of the grid.

        Args:
            block: Shape ``(num_channels, *block_shape)``, of the interpolator's ``dtype``.
                Stored channel-last (``np.moveaxis`` of a ``(*block_shape, num_channels)``
                array), it is read in place; otherwise NumPy copies it once per call.
            out: Result buffer, shape ``(num_points, num_channels)``, of dtype
                :attr:`value_dtype` (e.g. a view of a function's array); allocated if not
                given.

        Returns:
            Values at the points, shape ``(num_points, num_channels)`` (``out`` if given).
        """
        check_array(block, (self.num_channels, *self.block_shape), self.dtype, "block")
        out = output_array(out, (self.num_points, self.num_channels), self.value_dtype)
        # Gather the corner values, (num_points, corners, channels): the memory layout of
        # block[:, indices] too. mode="clip" (the indices are valid) writes into the
        # workspace; "raise" would buffer it.
        flat = block.reshape(self.num_channels, -1)
        np.take(flat.T, self._indices, axis=0, out=self._corner_values, mode="clip")
        # Σ_k weights[p, k] corners[p, k, c] as the batched matmul that
        # np.einsum("cpk,pk->pc", block[:, indices], weights, optimize=True) performs (the
        # same bits: the kernel depends on the layout), straight into out.
        np.matmul(self._weights[:, None, :], self._corner_values, out=out[:, None, :])
        return out

    def interpolate_adjoint(self, cotangent: np.ndarray) -> np.ndarray:
        """The transpose of :meth:`interpolate`: values at the points → the sub-block.

        Args:
            cotangent: Shape ``(num_points, num_channels)``, float64.

        Returns:
            A new float64 array ``(num_channels, *block_shape)``: each point's value spread
            onto its cell's corners with the interpolation weights, and summed.
        """
        check_array(cotangent, (self.num_points, self.num_channels), np.float64, "cotangent")
        block = np.zeros((self.block_size, self.num_channels))
        spread = self._weights[:, :, None] * cotangent[:, None, :]
        np.add.at(block, self._indices.reshape(-1), spread.reshape(-1, self.num_channels))
        return np.ascontiguousarray(block.T).reshape(self.num_channels, *self.block_shape)


class GridScatter:
    """Send each rank its sub-block of a grid field on the root, and interpolate it (collective).

    The mirror of :class:`~dolfinx_mno.grid_gather.GriddedSampler`: that one brings every
    rank's samples to the root's grid, this one brings the root's grid back to every rank's
    points. A transfer has three steps, so that nothing rank-local can fail inside a
    collective call:

    1. :meth:`pack` (root only, local): copy each rank's sub-block of the grid field into
       the send buffer; it checks its argument and may raise;
    2. :meth:`scatter` (collective): ``MPI.Scatterv`` of the sub-blocks;
    3. :meth:`interpolate` (local): multilinear interpolation of the received sub-block at
       this rank's points (:class:`GridInterpolator`).

    Every buffer is allocated at construction: a transfer allocates no array.

    Args:
        grid: The grid.
        points: This rank's physical points, shape ``(num_points, gdim)`` (or
            ``(num_points, 3)``), inside the grid's box.
        num_channels: Channels of the grid field.
        dtype: Scalar type sent and received (``float32`` or ``float64``); :meth:`pack`
            casts the root's field to it.
        comm: The communicator of the ranks.
        root: The rank that holds the grid field.

    Attributes:
        num_points: Number of this rank's points.
        value_dtype: Scalar type of the interpolated values
            (:attr:`GridInterpolator.value_dtype`).
        scatter_bytes: Bytes sent by the root per scatter (its own share excluded), the
            same on every rank.

    Raises:
        ValueError: An invalid root.
        TypeError: A dtype other than ``float32`` or ``float64``.

    Example:
        >>> scatter = GridScatter(grid, points, 2, np.float64, comm)
        >>> if comm.rank == 0:
        ...     scatter.pack(field)  # (2, *grid.shape) on the root
        >>> scatter.scatter()
        >>> values = scatter.interpolate()  # (num_points, 2) on every rank
    """

    def __init__(
        self,
        grid: Grid,
        points: np.ndarray,
        num_channels: int,
        dtype: npt.DTypeLike,
        comm: MPI.Comm,
        *,
        root: int = 0,
    ):
        """Set up the interpolation and the scatter (collective).

        See the class docstring for the arguments.
        """
        if not 0 <= check_integer(root, "root") < comm.size:
            raise ValueError(f"root must be a rank of the communicator, got {root}.")
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"Unsupported dtype {dtype}: use real float32 or float64.")
        self.grid = grid
        self.root = root
        self.num_channels = int(num_channels)
        self.dtype = dtype
        self._comm = comm
        self._is_root = comm.rank == root
        self._interpolator = GridInterpolator(grid, points, self.num_channels, dtype)
        self.num_points = self._interpolator.num_points
        self.value_dtype = self._interpolator.value_dtype
        # This rank's sub-block, stored channel-last: the layout that the interpolation
        # gathers corner values from without a copy.
        self._block_buffer = np.empty(
            (*self._interpolator.block_shape, self.num_channels), dtype=dtype
        )
        self._block = np.moveaxis(self._block_buffer, -1, 0)  # (num_channels, *block_shape)
        blocks = comm.gather(self._interpolator.block_slices(), root=root)
        scatter_bytes = None
        if self._is_root:
            assert blocks is not None
            sizes = [self.num_channels * math.prod(s.stop - s.start for s in b) for b in blocks]
            counts = np.array(sizes, dtype=np.int64)
            displacements = np.concatenate([[0], np.cumsum(counts)[:-1]])
            self._send_buffer = np.empty(int(counts.sum()), dtype=dtype)
            mpi_type = MPI.DOUBLE if dtype == np.float64 else MPI.FLOAT
            self._send = [self._send_buffer, (counts, displacements), mpi_type]
            # Each rank's sub-block: where it lies in the grid, and its part of the send
            # buffer, viewed channel-first like the grid field.
            self._parts = []
            for block, offset, count in zip(blocks, displacements, counts, strict=True):
                shape = (*(b.stop - b.start for b in block), self.num_channels)
                part = self._send_buffer[offset : offset + count].reshape(shape)
                self._parts.append(((slice(None), *block), np.moveaxis(part, -1, 0)))
            scatter_bytes = int(counts.sum() - counts[root]) * dtype.itemsize
        self.scatter_bytes: int = comm.bcast(scatter_bytes, root=root)

    @property
    def block(self) -> np.ndarray:
        """The last sub-block received, shape ``(num_channels, *block_shape)`` (a view)."""
        return self._block

    def block_slices(self) -> tuple[slice, ...]:
        """Slices of the full grid array selecting this rank's sub-block."""
        return self._interpolator.block_slices()

    def pack(self, values: np.ndarray) -> None:
        """Copy every rank's sub-block of ``values`` into the send buffer (root only, local).

        Args:
            values: The grid field, shape ``(num_channels, *grid.shape)`` or
                ``(num_channels, num_points)`` (grid points in row-major order), of any
                real dtype; it is cast to :attr:`dtype` (``same_kind``).

        Raises:
            RuntimeError: On a rank other than the root.
            ValueError: ``values`` has another shape.
        """
        if not self._is_root:
            raise RuntimeError(f"Only the root (rank {self.root}) packs the grid field.")
        grid_shape = (self.num_channels, *self.grid.shape)
        if values.shape not in (grid_shape, (self.num_channels, self.grid.num_points)):
            raise ValueError(
                f"The grid field must have shape {grid_shape} or "
                f"{(self.num_channels, self.grid.num_points)}, got {values.shape}."
            )
        field = values.reshape(grid_shape)
        for block, part in self._parts:
            np.copyto(part, field[block], casting="same_kind")

    def scatter(self) -> None:
        """Send each rank its sub-block of the last packed field (collective)."""
        send = self._send if self._is_root else None
        self._comm.Scatterv(send, self._block_buffer.reshape(-1), root=self.root)

    def scatter_adjoint(self, cotangent: np.ndarray) -> np.ndarray | None:
        """The transpose of :meth:`scatter` and :meth:`interpolate` (collective).

        Each rank spreads its points' cotangent onto its sub-block
        (:meth:`GridInterpolator.interpolate_adjoint`), ``MPI.Gatherv`` brings the
        sub-blocks to the root (the reverse of the scatter's ``Scatterv``), and the root
        sums them where they overlap.

        Args:
            cotangent: This rank's ``(num_points, num_channels)``.

        Returns:
            On the root, a new ``(num_channels, num_points)`` array of the scatter's
            ``dtype`` (grid points in row-major order); ``None`` elsewhere.
        """
        self._block[...] = self._interpolator.interpolate_adjoint(cotangent)
        receive = self._send if self._is_root else None
        self._comm.Gatherv(self._block_buffer.reshape(-1), receive, root=self.root)
        if not self._is_root:
            return None
        field = np.zeros((self.num_channels, *self.grid.shape), dtype=self.dtype)
        for block, part in self._parts:
            field[block] += part
        return field.reshape(self.num_channels, -1)

    def interpolate(self, out: np.ndarray | None = None) -> np.ndarray:
        """Interpolate the last sub-block received at this rank's points (local).

        Args:
            out: Result buffer, shape ``(num_points, num_channels)``, of dtype
                :attr:`value_dtype` (e.g. a view of a function's array); allocated if not
                given.

        Returns:
            The values, shape ``(num_points, num_channels)`` (``out`` if given).
        """
        return self._interpolator.interpolate(self._block, out=out)
