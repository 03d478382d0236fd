"""Slab-decomposed, truncated FFTs of grid fields over ``torch.distributed``.

A grid field of shape ``(batch, channels, n_0, n_1, ..., n_{d-1})`` is split along its first
spatial axis: rank ``r`` holds ``SlabPartition.counts[r]`` consecutive rows of ``n_0``. A
Fourier layer needs only a few modes of the field. :class:`SlabSpectralTransform` computes
them without ever assembling the field on one rank:

1. a local ``rfft`` along the last axis and ``fft`` along the middle axes, each truncated to
   the kept modes (local work, no communication);
2. one all-to-all transpose, in which only the truncated modes travel: each rank sends
   its rows of every chunk of the modes of axis 1 to the chunk's owner, so that axis 0
   becomes local and the modes of axis 1 are distributed;
3. an ``fft`` along axis 0, truncated to its kept modes.

The inverse runs the same steps backwards (zero-fill, ``ifft`` along axis 0, the transpose
back, zero-fill and ``ifft``/``irfft`` along the other axes). Gradients flow through both:
the all-to-all is an autograd function whose backward is the reverse all-to-all, so a
backward pass is collective, like the forward.

The process group comes from the MPI communicator (:func:`process_group`); the transform
runs on the CPU with gloo and on CUDA devices with NCCL.

References:
    Grady, T. J. et al. "Model-Parallel Fourier Neural Operators as Learned Surrogates for
    Large-Scale Parametric PDEs" (2023). Computers & Geosciences,
    https://arxiv.org/abs/2204.01205 (the transpose-based distributed FNO).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import socket
import typing
from collections.abc import Sequence

from mpi4py import MPI

import torch
import torch.distributed as dist

from dolfinx_mno._mpi import rank_local

__all__ = [
    "SlabPartition",
    "SlabSpectralTransform",
    "all_to_all",
    "process_group",
    "process_group_backend",
]


@dataclasses.dataclass(frozen=True)
class SlabPartition:
    """Consecutive blocks of ``size`` items, one per rank.

    Attributes:
        counts: Items per rank, ``(num_ranks,)``.
    """

    counts: tuple[int, ...]

    @classmethod
    def balanced(cls, size: int, num_ranks: int) -> SlabPartition:
        """``size`` items in ``num_ranks`` blocks whose sizes differ by at most one.

        The first ``size % num_ranks`` ranks get one item more.
        """
        base, extra = divmod(int(size), int(num_ranks))
        return cls(tuple(base + (rank < extra) for rank in range(num_ranks)))

    @property
    def size(self) -> int:
        """Total number of items."""
        return sum(self.counts)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First item of each rank, ``(num_ranks + 1,)``; the last entry is :attr:`size`."""
        offsets = [0]
        for count in self.counts:
            offsets.append(offsets[-1] + count)
        return tuple(offsets)

    def block(self, rank: int) -> slice:
        """The items of ``rank``."""
        offsets = self.offsets
        return slice(offsets[rank], offsets[rank + 1])


def _free_port() -> int:
    """A TCP port that is free on this host now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def process_group_backend(device: torch.device | None = None) -> str:
    """The ``torch.distributed`` backend for tensors on ``device``.

    Args:
        device: The device of the tensors exchanged; ``None``: a CUDA device if CUDA is
            available, else the CPU.

    Returns:
        ``"nccl"`` for CUDA devices, ``"gloo"`` for the CPU.

    Raises:
        RuntimeError: A CUDA device, but torch was built without NCCL.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type != "cuda":
        return "gloo"
    if not dist.is_nccl_available():
        raise RuntimeError(
            "The distributed mode on CUDA devices needs NCCL, which this torch build lacks: "
            "run the model on the CPU (device='cpu') or install a torch with NCCL."
        )
    return "nccl"


def process_group(comm: MPI.Comm, backend: str | None = None) -> dist.ProcessGroup:
    """The ``torch.distributed`` process group of ``comm``'s ranks (collective).

    Initialises torch's default process group from ``comm`` unless it is initialised
    already (by an earlier call or by ``torchrun``), in which case it is reused if its
    size and this process's rank match ``comm``'s. The rendezvous is
    ``tcp://{address}:{port}``: ``address`` is the environment variable ``MASTER_ADDR`` of
    rank 0 if set, else ``127.0.0.1`` (all ranks on one host); ``port`` is ``MASTER_PORT``
    of rank 0 if set, else a free port picked by rank 0. Both are broadcast from rank 0.
    Across several nodes, set ``MASTER_ADDR`` to an address of rank 0's node that the
    other nodes reach (and ``MASTER_PORT`` to a port open there).

    Args:
        comm: The ranks that share the grid; ``comm.size`` must be the size of the
            torch world (``MPI.COMM_WORLD`` in practice).
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors); by default
            :func:`process_group_backend` ``()``: ``"nccl"`` if CUDA is available, else
            ``"gloo"``.

    Returns:
        The default process group.

    Raises:
        RuntimeError: On every rank: the ranks span several hosts and ``MASTER_ADDR`` is
            not set on rank 0, torch's default group is initialised with another size or
            rank, or rank 0 cannot open the rendezvous (its port is in use: another job's,
            or another communicator's with the same ``MASTER_PORT``).
    """
    if dist.is_initialized():
        sizes = comm.allgather((dist.get_world_size(), dist.get_rank()))
        if any(size != comm.size or rank != r for r, (size, rank) in enumerate(sizes)):
            raise RuntimeError(
                f"torch.distributed is initialised with world size {sizes[0][0]}, but the "
                f"communicator has {comm.size} ranks (or another rank order); use a "
                "communicator that spans the torch world (MPI.COMM_WORLD)."
            )
        return typing.cast(dist.ProcessGroup, dist.group.WORLD)
    if backend is None:
        backend = process_group_backend()
    hosts = comm.allgather(MPI.Get_processor_name())
    address = None
    if comm.rank == 0:
        address = os.environ.get("MASTER_ADDR")
        if address is None and len(set(hosts)) == 1:
            address = "127.0.0.1"
        port = int(os.environ.get("MASTER_PORT", 0)) or _free_port()
    address, port = comm.bcast((address, port if comm.rank == 0 else None), root=0)
    if address is None:
        raise RuntimeError(
            f"The {comm.size} ranks run on {len(set(hosts))} hosts: set MASTER_ADDR (and "
            "MASTER_PORT) on rank 0 to an address of its host that the other hosts reach."
        )
    # Rank 0 opens the rendezvous first and the ranks agree on it: a port in use would
    # otherwise fail rank 0 alone and leave the others connecting to it forever.
    timeout = datetime.timedelta(minutes=5)
    store: dist.TCPStore | None = None
    note = (
        f"Is port {port} in use? Unset MASTER_PORT to let rank 0 pick a free port, or give "
        "each communicator that starts torch.distributed a port of its own."
    )
    with rank_local(comm, "Opening torch.distributed's rendezvous", RuntimeError, note=note):
        if comm.rank == 0:
            store = dist.TCPStore(
                address, port, comm.size, is_master=True, timeout=timeout, wait_for_workers=False
            )
    if comm.rank != 0:
        store = dist.TCPStore(address, port, comm.size, is_master=False, timeout=timeout)
    dist.init_process_group(
        backend, store=store, rank=comm.rank, world_size=comm.size, timeout=timeout
    )
    return typing.cast(dist.ProcessGroup, dist.group.WORLD)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of a 1-D real tensor; its backward is the reverse exchange."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: typing.Any,
        values: torch.Tensor,
        send_counts: list[int],
        receive_counts: list[int],
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        ctx.counts = (send_counts, receive_counts)
        ctx.group = group
        received = values.new_empty(sum(receive_counts))
        dist.all_to_all_single(
            received, values.contiguous(), receive_counts, send_counts, group=group
        )
        return received

    @staticmethod
    def backward(ctx: typing.Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        send_counts, receive_counts = ctx.counts
        returned = grad.new_empty(sum(send_counts))
        dist.all_to_all_single(
            returned, grad.contiguous(), send_counts, receive_counts, group=ctx.group
        )
        return returned, None, None, None


def all_to_all(
    blocks: Sequence[torch.Tensor],
    receive_shapes: Sequence[Sequence[int]],
    group: dist.ProcessGroup,
) -> list[torch.Tensor]:
    """Send ``blocks[r]`` to rank ``r``; receive one block of ``receive_shapes[r]`` from each.

    Collective and differentiable: one ``all_to_all_single``. Complex blocks travel as
    their real and imaginary parts (``torch.view_as_real``).

    Args:
        blocks: One tensor per rank, all of one dtype and device (empty ones allowed).
        receive_shapes: The shape of the block each rank sends to this one.
        group: The process group.

    Returns:
        The received blocks, one per rank, of ``receive_shapes``.
    """
    is_complex = blocks[0].is_complex()
    parts = [torch.view_as_real(b) if is_complex else b for b in blocks]
    trailing = (2,) if is_complex else ()
    send_counts = [part.numel() for part in parts]
    receive_counts = [math.prod(shape) * math.prod(trailing) for shape in receive_shapes]
    flat = torch.cat([part.reshape(-1) for part in parts])
    received = _AllToAll.apply(flat, send_counts, receive_counts, group)
    out = []
    for piece, shape in zip(torch.split(received, receive_counts), receive_shapes, strict=True):
        piece = piece.view(*shape, *trailing)
        out.append(torch.view_as_complex(piece) if is_complex else piece)
    return out


def _embed(modes: torch.Tensor, dim: int, index: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros of ``length`` along ``dim`` with ``modes`` written at ``index`` (differentiable)."""
    shape = list(modes.shape)
    shape[dim] = length
    return modes.new_zeros(shape).index_copy(dim, index, modes)


def _empty_like(source: torch.Tensor, shape: Sequence[int], complex: bool) -> torch.Tensor:
    """An empty tensor of ``shape`` in ``source``'s autograd graph.

    A rank without rows still takes part in the all-to-alls of the backward pass, which
    autograd runs only if its output depends on their input.
    """
    real = source.real if source.is_complex() else source
    dtype = real.dtype
    if complex:
        dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    return real.new_zeros(shape, dtype=dtype) + real.sum() * 0


def _fft_rows(modes: torch.Tensor, inverse: bool) -> torch.Tensor:
    """``fft``/``ifft`` along axis 0 of the grid (dim 2); a rank without modes skips it."""
    if modes.numel() == 0:  # more ranks than modes of axis 1 (MKL refuses empty FFTs)
        return modes
    transform = torch.fft.ifft if inverse else torch.fft.fft
    return transform(modes, dim=2, norm="forward")


class SlabSpectralTransform:
    """Truncated forward and inverse FFT of a real field split along its first axis.

    The field has global shape ``(batch, channels, *grid_shape)``; a rank holds the
    ``rows.counts[rank]`` rows ``rows.block(rank)`` of axis 0. The kept modes of axis ``a``
    are given as indices into the full FFT of that axis: ``modes_in[a]`` are read by
    :meth:`forward`, in the order of the mode axis of its result, and :meth:`inverse`
    writes its mode ``i`` to index ``modes_out[a][i]`` (usually ``modes_in[a]``). Along the
    last axis the FFT is real (``n_{d-1} // 2 + 1`` frequencies). Both transforms use
    ``norm="forward"``: the forward one divides by ``prod(grid_shape)``.

    In mode space the result has shape ``(batch, channels, k_0, k_1_local, k_2, ...)``:
    axis 0 complete, the modes of axis 1 split among ranks in :attr:`mode_chunks`.

    dtype and device rules: real fields in float32/float64 give complex64/complex128
    modes; the index tensors move to the field's device on first use.

    Args:
        grid_shape: The global grid, ``(n_0, ..., n_{d-1})``, ``d >= 2``.
        rows: The rows of axis 0 per rank.
        modes_in: Kept modes per axis, ``d`` sequences of FFT indices.
        modes_out: Where the inverse writes them; default ``modes_in``.
        group: The process group of ``rows``' ranks.
        rank: This rank in ``group``.

    Raises:
        ValueError: ``d < 2``, a mode index outside its axis, or ``rows`` of another
            total or number of ranks (the same on every rank, before any collective).
    """

    def __init__(
        self,
        grid_shape: Sequence[int],
        rows: SlabPartition,
        modes_in: Sequence[Sequence[int]],
        group: dist.ProcessGroup,
        rank: int,
        modes_out: Sequence[Sequence[int]] | None = None,
    ):
        self.grid_shape = tuple(int(n) for n in grid_shape)
        dim = len(self.grid_shape)
        if dim < 2:
            raise ValueError(
                f"A slab-decomposed FFT needs at least 2 grid axes, got grid {self.grid_shape}."
            )
        if rows.size != self.grid_shape[0]:
            raise ValueError(
                f"The row partition {rows.counts} covers {rows.size} rows, but axis 0 of the "
                f"grid {self.grid_shape} has {self.grid_shape[0]}."
            )
        modes_out = modes_in if modes_out is None else modes_out
        lengths = [*self.grid_shape[:-1], self.grid_shape[-1] // 2 + 1]
        for what, modes in (("modes_in", modes_in), ("modes_out", modes_out)):
            for axis, (indices, length) in enumerate(zip(modes, lengths, strict=True)):
                if any(not 0 <= i < length for i in indices):
                    raise ValueError(
                        f"{what}[{axis}] has indices outside 0..{length - 1}, the FFT of "
                        f"axis {axis} of the grid {self.grid_shape}."
                    )
        self.rows = rows
        self.group = group
        self.rank = int(rank)
        self.lengths = tuple(lengths)
        self.kept = tuple(len(m) for m in modes_in)
        self.mode_chunks = SlabPartition.balanced(self.kept[1], len(rows.counts))
        self._modes_in = [torch.tensor(list(m), dtype=torch.long) for m in modes_in]
        self._modes_out = [torch.tensor(list(m), dtype=torch.long) for m in modes_out]

    def _index(self, which: list[torch.Tensor], axis: int, device: torch.device) -> torch.Tensor:
        if which[axis].device != device:
            which[axis] = which[axis].to(device)
        return which[axis]

    def mode_shape(self, batch: int, channels: int) -> tuple[int, ...]:
        """This rank's shape in mode space, ``(batch, channels, k_0, k_1_local, ...)``."""
        chunk = self.mode_chunks.counts[self.rank]
        return (batch, channels, self.kept[0], chunk, *self.kept[2:])

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        """The kept modes of ``field`` (collective).

        Args:
            field: This rank's rows, ``(batch, channels, rows.counts[rank], n_1, ...)``,
                real.

        Returns:
            ``(batch, channels, k_0, k_1_local, k_2, ..., k_{d-1})``, complex.
        """
        dim = len(self.grid_shape)
        device = field.device
        batch, channels = field.shape[:2]
        if field.shape[2] == 0:  # a rank without rows (MKL refuses empty FFTs)
            modes = _empty_like(field, (batch, channels, 0, *self.kept[1:]), complex=True)
        else:
            modes = torch.fft.rfft(field, dim=-1, norm="forward")
            modes = modes.index_select(-1, self._index(self._modes_in, dim - 1, device))
            for axis in range(1, dim - 1):
                modes = torch.fft.fft(modes, dim=axis + 2, norm="forward")
                modes = modes.index_select(axis + 2, self._index(self._modes_in, axis, device))
        # The transpose: the chunk of axis-1 modes of rank r goes to rank r.
        blocks = list(torch.split(modes, list(self.mode_chunks.counts), dim=3))
        chunk = self.mode_chunks.counts[self.rank]
        receive = [(batch, channels, rows, chunk, *self.kept[2:]) for rows in self.rows.counts]
        modes = torch.cat(all_to_all(blocks, receive, self.group), dim=2)
        modes = _fft_rows(modes, inverse=False)
        return modes.index_select(2, self._index(self._modes_in, 0, device))

    def inverse(self, modes: torch.Tensor) -> torch.Tensor:
        """The real field of ``modes``, zero elsewhere (collective).

        Args:
            modes: ``(batch, channels, k_0, k_1_local, ..., k_{d-1})``, complex, as
                returned by :meth:`forward` (the channel count may differ).

        Returns:
            This rank's rows, ``(batch, channels, rows.counts[rank], n_1, ..., n_{d-1})``.
        """
        dim = len(self.grid_shape)
        device = modes.device
        index = self._index(self._modes_out, 0, device)
        field = _fft_rows(_embed(modes, 2, index, self.grid_shape[0]), inverse=True)
        batch, channels = field.shape[:2]
        blocks = list(torch.split(field, list(self.rows.counts), dim=2))
        rows = self.rows.counts[self.rank]
        receive = [
            (batch, channels, rows, chunk, *self.kept[2:]) for chunk in self.mode_chunks.counts
        ]
        field = torch.cat(all_to_all(blocks, receive, self.group), dim=3)
        if rows == 0:  # a rank without rows (MKL refuses empty FFTs)
            return _empty_like(field, (batch, channels, 0, *self.grid_shape[1:]), complex=False)
        for axis in range(dim - 2, 0, -1):
            index = self._index(self._modes_out, axis, device)
            embedded = _embed(field, axis + 2, index, self.grid_shape[axis])
            field = torch.fft.ifft(embedded, dim=axis + 2, norm="forward")
        index = self._index(self._modes_out, dim - 1, device)
        embedded = _embed(field, dim + 1, index, self.lengths[-1])
        return torch.fft.irfft(embedded, n=self.grid_shape[-1], dim=-1, norm="forward")
