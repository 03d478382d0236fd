"""Grid transfers of the distributed mode: samples → slabs, and slabs → points (collective).

In the distributed mode of a :class:`~dolfinx_mno.NonlocalClosure` no rank holds the whole
grid: rank ``r`` holds the rows ``rows.block(r)`` of the first grid axis (a slab), on which
:class:`~dolfinx_mno.distributed_operator.DistributedFNO` runs. The two transfers replace
the gathered mode's gather and scatter, with the same stages:

* :class:`SlabGather` (sample → slab): every rank sends each of its grid samples to the
  rank whose slab holds the point (one ``MPI.Alltoallv``; a sample already in its own slab
  stays), and writes the samples it receives, the extension value and the mask into its
  slab.
* :class:`SlabSampler` (sample → slab, for training data): a
  :class:`~dolfinx_mno.grid_gather.GriddedSampler` that sends its samples to the slabs
  instead of gathering them, so that inputs on a grid no rank could hold are made the
  way a distributed closure sees them.
* :class:`SlabScatter` (slab → points): every rank needs the sub-block of the output grid
  around its points (:class:`~dolfinx_mno.grid_scatter.GridInterpolator`); each slab owner
  sends the part of that block in its rows (one ``MPI.Alltoallv``), so only the block's
  rows outside a rank's own slab, the halo, travel.

Every index and buffer is computed and allocated once; a transfer allocates no large array.
"""

from __future__ import annotations

import math

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
from dolfinx.mesh import Mesh

from dolfinx_mno.distributed_fft import SlabPartition
from dolfinx_mno.grid import Grid
from dolfinx_mno.grid_gather import GriddedSampler
from dolfinx_mno.grid_scatter import GridInterpolator
from dolfinx_mno.operands import OperandsLike
from dolfinx_mno.slab_alignment import rows_following_samples

__all__ = ["SlabGather", "SlabSampler", "SlabScatter"]


def _displacements(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _mpi_type(dtype: np.dtype) -> MPI.Datatype:
    return MPI.DOUBLE if dtype == np.float64 else MPI.FLOAT


class SlabGather:
    """Send grid samples to the ranks whose slabs hold them (collective).

    Args:
        grid: The grid.
        rows: The rows of axis 0 per rank.
        indices: Flat grid indices of this rank's samples, ``(num_local,)``.
        inside: Whether each grid point lies in the mesh, ``(grid.num_points,)``.
        num_channels: Channels of the samples (without the mask).
        dtype: Their scalar type (``float32`` or ``float64``).
        comm: The ranks.

    Attributes:
        local_shape: This rank's slab, ``(rows, n_1, ...)``.
        exchange_bytes: Bytes this rank sends to other ranks per transfer.
        remote_count: Samples (grid points) this rank sends to other ranks per transfer:
            those sampled in a cell of this rank outside its slab's rows.
    """

    def __init__(
        self,
        grid: Grid,
        rows: SlabPartition,
        indices: np.ndarray,
        inside: np.ndarray,
        num_channels: int,
        dtype: npt.DTypeLike,
        comm: MPI.Comm,
    ):
        """Route the samples (collective); see the class docstring for the arguments."""
        self.dtype = np.dtype(dtype)
        self.num_channels = int(num_channels)
        self._comm = comm
        row_size = math.prod(grid.shape[1:])
        offsets = np.array(rows.offsets)
        owner = np.searchsorted(offsets[1:], np.asarray(indices) // row_size, side="right")
        self._order = np.argsort(owner, kind="stable")
        send = np.bincount(owner, minlength=comm.size).astype(np.int64)
        receive = np.array(comm.alltoall(send.tolist()), dtype=np.int64)
        received = np.empty(int(receive.sum()), dtype=np.int64)
        comm.Alltoallv(
            [
                np.ascontiguousarray(indices[self._order], dtype=np.int64),
                (send, _displacements(send)),
                MPI.INT64_T,
            ],
            [received, (receive, _displacements(receive)), MPI.INT64_T],
        )
        first = int(offsets[comm.rank]) * row_size
        self.local_shape = (rows.counts[comm.rank], *grid.shape[1:])
        self._slab_indices = received - first
        self._inside = np.asarray(inside)[first : first + math.prod(self.local_shape)]
        channels = self.num_channels
        self._send_buffer = np.empty((len(self._order), channels), dtype=self.dtype)
        self._receive_buffer = np.empty((len(received), channels), dtype=self.dtype)
        mpi_type = _mpi_type(self.dtype)
        self._send = [
            self._send_buffer,
            (send * channels, _displacements(send * channels)),
            mpi_type,
        ]
        self._receive = [
            self._receive_buffer,
            (receive * channels, _displacements(receive * channels)),
            mpi_type,
        ]
        others = np.arange(comm.size) != comm.rank
        self.remote_count = int(send[others].sum())
        self.exchange_bytes = self.remote_count * channels * self.dtype.itemsize

    def prepare(self, out: np.ndarray, extension_value: float, mask_channel: bool) -> None:
        """The extension value everywhere, then the mask (1 inside the mesh, 0 outside).

        Args:
            out: This rank's slab input, ``(num_channels + mask_channel, prod(local_shape))``.
            extension_value: The value of every channel outside the mesh.
            mask_channel: Whether ``out``'s last channel is the mask.
        """
        out[...] = extension_value
        if mask_channel:
            out[-1] = self._inside

    def gather(self, samples: np.ndarray, out: np.ndarray) -> None:
        """Send ``samples`` to the slab owners and write the received ones into ``out``.

        Args:
            samples: This rank's ``(num_local, num_channels)``.
            out: This rank's slab, ``(channels, prod(local_shape))``, from :meth:`prepare`;
                its first ``num_channels`` channels are overwritten at the points inside.
        """
        np.take(samples, self._order, axis=0, out=self._send_buffer)
        self._comm.Alltoallv(self._send, self._receive)
        out[: self.num_channels, self._slab_indices] = self._receive_buffer.T

    def gather_adjoint(self, cotangent: np.ndarray) -> np.ndarray:
        """The transpose of :meth:`gather`: a slab's cotangent back to the samples (collective).

        The cotangent at the slab points each rank received goes back to the rank that
        sampled them (the reverse ``MPI.Alltoallv``); the extension values and the mask
        are constants, so their cotangent is dropped.

        Args:
            cotangent: This rank's ``(channels, prod(local_shape))`` (mask included, ignored).

        Returns:
            A new ``(num_local, num_channels)`` array of the gather's ``dtype``.
        """
        self._receive_buffer[...] = cotangent[: self.num_channels, self._slab_indices].T
        self._comm.Alltoallv(self._receive, self._send)
        samples = np.empty_like(self._send_buffer)
        samples[self._order] = self._send_buffer
        return samples


class SlabSampler:
    """Sample UFL expressions on a grid into each rank's slab of rows (collective).

    The distributed twin of :class:`~dolfinx_mno.grid_gather.GriddedSampler`'s
    ``__call__``: the same samples, extension value and mask, but rank ``r`` gets the rows
    ``rows.block(r)`` of the first grid axis and no rank holds the whole grid.

    Args:
        expressions: As for :class:`~dolfinx_mno.grid_gather.GriddedSampler`.
        grid: The grid.
        extension_value: Value of every channel outside the mesh.
        mask_channel: Append the inside/outside mask as the last channel.
        sampling_degree: As for :class:`~dolfinx_mno.grid_gather.GriddedSampler`.
        mesh: The mesh; by default that of the expressions.
        rows: Rows of axis 0 per rank; default (``None`` or ``"balanced"``) the
            balanced partition, which :class:`~dolfinx_mno.DistributedFNO` uses too;
            ``"mesh"``: rows that follow
            the mesh partition where they can
            (:func:`~dolfinx_mno.slab_alignment.rows_following_samples`), as a distributed
            :class:`~dolfinx_mno.NonlocalClosure` takes by default.

    Attributes:
        rows: The partition.
        local_shape: This rank's slab, ``(rows, n_1, ...)``.
        channels: Channels of the slab, mask included.

    Raises:
        ValueError: Fewer grid rows than ranks, or ``rows`` another string (on every
            rank), or what :class:`~dolfinx_mno.grid_gather.GriddedSampler` raises.

    Example:
        >>> slabs = SlabSampler([u, ufl.grad(u)], closure.grid, mask_channel=True)
        >>> x = slabs()  # (4, *slabs.local_shape) on every rank
    """

    def __init__(
        self,
        expressions: OperandsLike,
        grid: Grid,
        *,
        extension_value: float = 0.0,
        mask_channel: bool = False,
        sampling_degree: int | None = None,
        mesh: Mesh | None = None,
        rows: SlabPartition | str | None = None,
    ):
        """Set up the sampling and the routing (collective); see the class docstring."""
        if isinstance(rows, str) and rows not in ("mesh", "balanced"):
            raise ValueError(f"rows must be a SlabPartition, 'balanced' or 'mesh', got {rows!r}.")
        self._sampler = GriddedSampler(
            expressions,
            grid,
            extension_value=extension_value,
            mask_channel=mask_channel,
            sampling_degree=sampling_degree,
            mesh=mesh,
            gather=False,
        )
        comm = self._sampler.operands.mesh.comm
        if not isinstance(rows, SlabPartition):
            if grid.shape[0] < comm.size:
                raise ValueError(
                    f"The grid {grid.shape} has {grid.shape[0]} rows along axis 0, fewer than "
                    f"the {comm.size} ranks: use a finer grid or fewer ranks."
                )
            if rows == "mesh":
                rows = rows_following_samples(grid.shape, self._sampler.indices, comm)
            else:
                rows = SlabPartition.balanced(grid.shape[0], comm.size)
        self.rows = rows
        dtype = self._sampler.operands.dtype
        channels = self._sampler.num_channels
        self._gather = SlabGather(
            grid, rows, self._sampler.indices, self._sampler.inside, channels, dtype, comm
        )
        self.local_shape = self._gather.local_shape
        self.channels = self._sampler.channels
        self._extension_value = float(extension_value)
        self._mask_channel = bool(mask_channel)

    def __call__(self) -> np.ndarray:
        """Sample and send to the slabs (collective).

        Returns:
            A new array ``(channels, *local_shape)`` in the mesh's dtype.
        """
        samples = self._sampler.sample()
        out = np.empty((self.channels, math.prod(self.local_shape)), dtype=samples.dtype)
        self._gather.prepare(out, self._extension_value, self._mask_channel)
        self._gather.gather(samples, out)
        return out.reshape(self.channels, *self.local_shape)


class SlabScatter:
    """Bring every rank the sub-block of a slab-distributed grid field around its points.

    Args:
        grid: The grid.
        rows: The rows of axis 0 per rank.
        points: This rank's physical points, ``(num_points, gdim)``, inside the grid's box.
        num_channels: Channels of the grid field.
        dtype: Scalar type sent (``float32`` or ``float64``).
        comm: The ranks.

    Attributes:
        num_points: This rank's points.
        local_shape: This rank's slab, ``(rows, n_1, ...)``.
        value_dtype: Scalar type of the interpolated values.
        exchange_bytes: Bytes this rank sends to other ranks per transfer (the halo).
        remote_count: Grid points this rank sends to other ranks per transfer (the halo
            rows of their blocks in its slab).
    """

    def __init__(
        self,
        grid: Grid,
        rows: SlabPartition,
        points: np.ndarray,
        num_channels: int,
        dtype: npt.DTypeLike,
        comm: MPI.Comm,
    ):
        """Work out who sends which rows of whose block (collective)."""
        self.dtype = np.dtype(dtype)
        self.num_channels = int(num_channels)
        self._comm = comm
        self._interpolator = GridInterpolator(grid, points, self.num_channels, self.dtype)
        self.local_shape = (rows.counts[comm.rank], *grid.shape[1:])
        self.num_points = self._interpolator.num_points
        self.value_dtype = self._interpolator.value_dtype
        blocks = comm.allgather(self._interpolator.block_slices())
        mine = rows.block(comm.rank)
        # What this rank sends to rank r: the rows of r's block in this rank's slab.
        self._parts: list[tuple[slice, ...]] = []
        send = np.zeros(comm.size, dtype=np.int64)
        for rank, block in enumerate(blocks):
            start, stop = max(block[0].start, mine.start), min(block[0].stop, mine.stop)
            part = (slice(start - mine.start, max(start, stop) - mine.start), *block[1:])
            self._parts.append(part)
            send[rank] = math.prod(s.stop - s.start for s in part) * self.num_channels
        # What this rank receives from rank r: the rows of its block in r's slab.
        block = blocks[comm.rank]
        receive = np.zeros(comm.size, dtype=np.int64)
        for rank in range(comm.size):
            theirs = rows.block(rank)
            start, stop = max(block[0].start, theirs.start), min(block[0].stop, theirs.stop)
            rest = math.prod(s.stop - s.start for s in block[1:])
            receive[rank] = max(0, stop - start) * rest * self.num_channels
        self._send_buffer = np.empty(int(send.sum()), dtype=self.dtype)
        self._send_views = [
            self._send_buffer[offset : offset + count]
            for offset, count in zip(_displacements(send), send, strict=True)
        ]
        # The received rows, in order of rank and so of rows, are the block stored
        # channel-last: the layout the interpolation reads in place.
        shape = self._interpolator.block_shape
        self._receive_buffer = np.empty(int(receive.sum()), dtype=self.dtype)
        self._block = np.moveaxis(self._receive_buffer.reshape(*shape, self.num_channels), -1, 0)
        mpi_type = _mpi_type(self.dtype)
        self._send = [self._send_buffer, (send, _displacements(send)), mpi_type]
        self._receive = [self._receive_buffer, (receive, _displacements(receive)), mpi_type]
        others = np.arange(comm.size) != comm.rank
        self.remote_count = int(send[others].sum()) // self.num_channels
        self.exchange_bytes = self.remote_count * self.num_channels * self.dtype.itemsize

    def scatter(self, slab: np.ndarray) -> None:
        """Send every rank its rows of the block it needs (collective).

        Args:
            slab: This rank's slab of the grid field, ``(num_channels, *local_shape)``.
        """
        for part, view in zip(self._parts, self._send_views, strict=True):
            if view.size:  # rows-first, channels last: the layout the receiver concatenates
                view.reshape(*(s.stop - s.start for s in part), self.num_channels)[...] = (
                    np.moveaxis(slab[(slice(None), *part)], 0, -1)
                )
        self._comm.Alltoallv(self._send, self._receive)

    def interpolate(self, out: np.ndarray | None = None) -> np.ndarray:
        """Interpolate the last block received at this rank's points (local).

        Args:
            out: ``(num_points, num_channels)`` of :attr:`value_dtype`, or ``None``.

        Returns:
            The values, ``(num_points, num_channels)``.
        """
        return self._interpolator.interpolate(self._block, out=out)

    def scatter_adjoint(self, cotangent: np.ndarray) -> np.ndarray:
        """The transpose of :meth:`scatter` and :meth:`interpolate` (collective).

        Each rank spreads its points' cotangent onto its block
        (:meth:`~dolfinx_mno.grid_scatter.GridInterpolator.interpolate_adjoint`), sends
        each slab owner the block's rows in its slab (the reverse ``MPI.Alltoallv``), and
        every slab owner sums the parts it receives where blocks overlap.

        Args:
            cotangent: This rank's ``(num_points, num_channels)``, float64.

        Returns:
            A new ``(num_channels, *local_shape)`` array of the scatter's ``dtype``: the
            cotangent of this rank's slab.
        """
        self._block[...] = self._interpolator.interpolate_adjoint(cotangent)
        self._comm.Alltoallv(self._receive, self._send)
        slab = np.zeros((self.num_channels, *self.local_shape), dtype=self.dtype)
        for part, view in zip(self._parts, self._send_views, strict=True):
            if view.size:
                shape = (*(s.stop - s.start for s in part), self.num_channels)
                slab[(slice(None), *part)] += np.moveaxis(view.reshape(shape), -1, 0)
        return slab
