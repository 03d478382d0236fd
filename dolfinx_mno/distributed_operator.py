"""A neuraloperator FNO evaluated on a grid split among ranks, without gathering it.

:class:`DistributedFNO` wraps an ordinary ``neuralop.models.FNO`` (or ``TFNO``) and runs
its forward on a slab of rows of the first grid axis per rank:

- the positional embedding, lifting, projection, channel MLPs and skip connections are
  pointwise and run on the local slab, with neuraloperator's own modules and weights;
- each spectral convolution is a :class:`DistributedSpectralConv`: the truncated modes of
  the local slab (:class:`~dolfinx_mno.distributed_fft.SlabSpectralTransform`, one
  all-to-all transpose in which only the kept modes travel), contracted with the kept
  weights of this rank's chunk of modes, and transformed back (one transpose back);
- the Fourier blocks are neuraloperator's ``FNOBlocks.forward``, run with the spectral
  convolutions swapped, so pre/post-activation, skips and nonlinearities are exactly its.

The weights are the wrapped model's: a model trained the ordinary way, or a state dict
loaded into it, is used unchanged, and gradients reach its parameters. Options whose
distributed forward would differ from neuraloperator's (domain padding, normalisation over
the grid, resolution scaling, complex data, reduced precision, other positional
embeddings or convolution modules, 1-D grids) are refused by name at construction.

Precision note: neuraloperator 2.0's ``SpectralConv`` allocates its spectral output as
``complex64`` whatever the input dtype, so its float64 forward is only float32-accurate in
the spectral path. The distributed convolution keeps the input's precision (complex128
for float64), and equals neuraloperator's forward computed in that precision.

References:
    Li, Z. et al. "Fourier Neural Operator for Parametric Partial Differential Equations"
    (2021). ICLR 2021, https://arxiv.org/abs/2010.08895.
    Grady, T. J. et al. "Model-Parallel Fourier Neural Operators as Learned Surrogates for
    Large-Scale Parametric PDEs" (2023), https://arxiv.org/abs/2204.01205.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Sequence

from mpi4py import MPI

import torch
import torch.distributed as dist

from dolfinx_mno._mpi import agree_on
from dolfinx_mno.distributed_fft import SlabPartition, SlabSpectralTransform, process_group

__all__ = [
    "DistributedFNO",
    "DistributedSpectralConv",
    "check_supported",
    "kept_modes",
    "unsupported_options",
]


def kept_modes(
    conv: typing.Any, grid_shape: Sequence[int]
) -> tuple[list[list[int]], list[list[int]], list[slice]]:
    r"""The FFT indices neuraloperator's ``SpectralConv`` keeps on ``grid_shape``.

    ``SpectralConv.forward`` ``fftshift``\ s the non-last axes and keeps ``k // 2`` modes
    below the zero frequency and ``k - k // 2`` from it up, ``k`` being the length of the
    (sliced) weight along that axis; along the last (real-FFT) axis it keeps ``0..k-1``.
    On the way back it ``fftshift``\ s again (not ``ifftshift``), so on an odd axis of
    length ``n`` mode ``f`` lands at index ``f - 1`` instead of ``f``; the output indices
    reproduce that, so that trained weights give neuraloperator's output.

    Args:
        conv: A ``neuralop.layers.spectral_convolution.SpectralConv``.
        grid_shape: The grid, ``(n_0, ..., n_{d-1})``.

    Returns:
        ``(modes_in, modes_out, weight_slices)``: per axis the FFT indices read, the
        indices written back, and the slice of the weight along that mode axis.

    Raises:
        ValueError: ``n_modes`` beyond the grid (neuraloperator itself would drop the
            outer modes of its weights).
    """
    dim = len(grid_shape)
    lengths = [*grid_shape[:-1], grid_shape[-1] // 2 + 1]
    starts = [
        max_modes - min(length, n_mode)
        for length, n_mode, max_modes in zip(lengths, conv.n_modes, conv.max_n_modes, strict=True)
    ]
    weight_slices = [
        slice(start // 2, -start // 2) if start else slice(None) for start in starts[:-1]
    ]
    weight_slices.append(slice(None, -starts[-1]) if starts[-1] else slice(None))
    offset = 1 if conv.separable else 2
    kept = [
        len(range(n)[s]) for n, s in zip(conv.weight.shape[offset:], weight_slices, strict=True)
    ]
    if any(n > length for n, length in zip(conv.n_modes, lengths, strict=True)):
        # neuraloperator would keep only the central modes of its weights that fit the grid.
        raise ValueError(
            f"it keeps {tuple(conv.n_modes)} modes (the last axis's n // 2 + 1 of a real "
            f"FFT), more than the grid {tuple(grid_shape)} has ({tuple(lengths)}); "
            "neuraloperator would silently drop the outer modes of its weights: use a finer "
            "grid or fewer modes."
        )
    modes_in: list[list[int]] = []
    modes_out: list[list[int]] = []
    for axis, (k, n) in enumerate(zip(kept, grid_shape, strict=True)):
        if axis == dim - 1:
            modes_in.append(list(range(k)))
            modes_out.append(list(range(k)))
            continue
        frequencies = range(-(k // 2), k - k // 2)
        modes_in.append([f % n for f in frequencies])
        modes_out.append([(f + 2 * (n // 2)) % n for f in frequencies])
    return modes_in, modes_out, weight_slices


def check_supported(model: typing.Any) -> None:
    """Refuse a model :class:`DistributedFNO` cannot distribute (rank-local).

    Raises:
        ValueError: Not a neuralop FNO/TFNO, or options it cannot distribute, each named
            (:func:`unsupported_options`).
    """
    problems = unsupported_options(model)
    if problems:
        raise ValueError(
            "DistributedFNO cannot distribute this model: " + "; ".join(problems) + "."
        )


def unsupported_options(model: typing.Any) -> list[str]:
    """The options of a neuraloperator FNO that :class:`DistributedFNO` cannot distribute.

    Returns:
        One line per option, naming it and its value, e.g. ``"domain_padding=0.25 (...)"``;
        empty if the model is supported.
    """
    from neuralop.layers.embeddings import GridEmbeddingND
    from neuralop.layers.spectral_convolution import SpectralConv
    from neuralop.models import FNO

    if not isinstance(model, FNO):
        return [f"the model is a {type(model).__name__}, not a neuralop.models.FNO or TFNO"]
    problems = []
    blocks = model.fno_blocks
    if model.n_dim < 2:
        problems.append(f"n_modes={tuple(model.n_modes)}: a 1-D FNO (the grid needs 2 axes)")
    if model.domain_padding is not None:
        problems.append(
            f"domain_padding={model.domain_padding.domain_padding} (padding changes the "
            "grid each rank holds)"
        )
    if blocks.norm is not None:
        problems.append(f"norm={type(blocks.norm[0]).__name__} (statistics over the grid)")
    if blocks.resolution_scaling_factor is not None:
        problems.append(
            f"resolution_scaling_factor={blocks.resolution_scaling_factor} (the grid changes)"
        )
    if model.complex_data:
        problems.append("complex_data=True")
    if blocks.fno_block_precision != "full":
        problems.append(f"fno_block_precision={blocks.fno_block_precision!r}")
    if model.positional_embedding is not None and type(model.positional_embedding) is not (
        GridEmbeddingND
    ):
        problems.append(
            f"positional_embedding={type(model.positional_embedding).__name__} (only "
            "'grid', a GridEmbeddingND, or None)"
        )
    for index, conv in enumerate(blocks.convs):
        if type(conv) is not SpectralConv:
            problems.append(f"conv_module={type(conv).__name__} (layer {index})")
            break
        if conv.fft_norm != "forward":
            problems.append(f"fft_norm={conv.fft_norm!r} (layer {index})")
            break
    # model.double() leaves neuraloperator's complex spectral weights in complex64: the
    # first spectral product would then fail on the ranks that hold modes, in a collective.
    real = {p.dtype for p in model.parameters() if p.is_floating_point()}
    spectral = {p.dtype for p in model.parameters() if p.is_complex()}
    expected = {torch.complex64 if t == torch.float32 else torch.complex128 for t in real}
    if len(real) > 1 or (real and spectral and spectral != expected):
        names = sorted(str(t).removeprefix("torch.") for t in real | spectral)
        problems.append(
            f"parameters of mixed precision {names} (model.double() does not convert the "
            "complex spectral weights; use dolfinx_mno.to_precision(model, torch.float64))"
        )
    return problems


class DistributedGridEmbedding(torch.nn.Module):
    """neuraloperator's ``GridEmbeddingND`` for this rank's rows of the global grid.

    Appends the coordinates of the rows ``rows`` of the global grid as in
    ``neuralop.layers.embeddings.regular_grid_nd`` (``linspace(start, stop, n + 1)[:-1]``
    per axis, in torch's default dtype, then cast), without building the global grid.

    Args:
        embedding: The model's ``GridEmbeddingND``.
        grid_shape: The global grid.
        rows: This rank's rows of axis 0.
    """

    def __init__(self, embedding: typing.Any, grid_shape: Sequence[int], rows: slice):
        """Wrap; the arguments are described in the class docstring."""
        super().__init__()
        self.boundaries = [tuple(b) for b in embedding.grid_boundaries]
        self.grid_shape = tuple(grid_shape)
        self.rows = rows

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        """``(batch, in, rows, ...)`` → ``(batch, in + d, rows, ...)``."""
        axes = [
            torch.linspace(start, stop, n + 1)[:-1]
            for n, (start, stop) in zip(self.grid_shape, self.boundaries, strict=True)
        ]
        axes[0] = axes[0][self.rows]
        grids = torch.meshgrid(*axes, indexing="ij")
        batch = field.shape[0]
        coordinates = [g.to(field.device).to(field.dtype).expand(batch, 1, *g.shape) for g in grids]
        return torch.cat((field, *coordinates), dim=1)


class DistributedSpectralConv(torch.nn.Module):
    """neuraloperator's ``SpectralConv`` on a grid split along axis 0 (collective).

    Uses the wrapped convolution's weight, bias and contraction (dense, separable or
    factorized: Tucker, CP, TT), restricted to this rank's chunk of the modes of axis 1.

    Args:
        conv: The ``SpectralConv`` (kept as a submodule; its parameters are shared).
        grid_shape: The global grid.
        rows: The rows of axis 0 per rank.
        group: The process group; ``rank`` is this process's rank in it.
        rank: This rank.

    Raises:
        ValueError: n_modes beyond the grid (the same on every rank).
    """

    def __init__(
        self,
        conv: typing.Any,
        grid_shape: Sequence[int],
        rows: SlabPartition,
        group: dist.ProcessGroup,
        rank: int,
    ):
        """Wrap; the arguments are described in the class docstring."""
        super().__init__()
        self.conv = conv
        self.grid_shape = tuple(grid_shape)
        self._n_modes = tuple(conv.n_modes)
        modes_in, modes_out, self._weight_slices = kept_modes(conv, self.grid_shape)
        self.spectral = SlabSpectralTransform(
            self.grid_shape, rows, modes_in, group, rank, modes_out=modes_out
        )

    def _local_weight(self) -> typing.Any:
        """The kept weight of this rank's chunk of axis-1 modes."""
        chunk = self.spectral.mode_chunks.block(self.spectral.rank)
        slices = list(self._weight_slices)
        first = slices[1].start or 0  # where neuraloperator's kept weight of axis 1 starts
        slices[1] = slice(first + chunk.start, first + chunk.stop)
        channels = [slice(None)] * (1 if self.conv.separable else 2)
        return self.conv.weight[tuple(channels + slices)]

    def transform(self, field: torch.Tensor, output_shape: typing.Any = None) -> torch.Tensor:
        """The identity: resolution scaling is refused (``FNOBlocks`` calls this on skips)."""
        return field

    def forward(self, field: torch.Tensor, output_shape: typing.Any = None) -> torch.Tensor:
        """``(batch, in, rows, n_1, ...)`` → ``(batch, out, rows, n_1, ...)`` (collective).

        Raises:
            RuntimeError: The model's ``n_modes`` changed since construction (the same on
                every rank, before any collective).
        """
        if tuple(self.conv.n_modes) != self._n_modes:
            raise RuntimeError(
                f"The FNO's modes changed from {self._n_modes} to {tuple(self.conv.n_modes)} "
                "since the DistributedFNO was built; build a new one."
            )
        modes = self.spectral.forward(field)
        modes = self.conv._contract(modes, self._local_weight(), separable=self.conv.separable)
        result = self.spectral.inverse(modes)
        if self.conv.bias is not None:
            result = result + self.conv.bias
        return result


class DistributedFNO(torch.nn.Module):
    """A neuraloperator FNO/TFNO evaluated on rows of the grid split among ranks.

    Rank ``r`` holds rows ``rows.block(r)`` of the first grid axis and gets the model's
    output on those rows; the output equals neuraloperator's forward on the whole grid
    (in the input's precision, see the module docstring). Forward and backward are
    collective: every rank of ``comm`` calls them, in the same order.

    dtype and device rules: the model runs in its own dtype on its own device (gloo for
    CPU tensors, NCCL for CUDA ones); the input must already be of that dtype and device.

    Args:
        model: A ``neuralop.models.FNO`` or ``TFNO`` with 2 or more grid axes, its complex
            weights in the precision wanted (:func:`~dolfinx_mno.to_precision`); kept as
            the submodule ``model``, so its weights are shared, and
            ``distributed.model.load_state_dict(...)`` loads an ordinary checkpoint.
        grid_shape: The global grid ``(n_0, ..., n_{d-1})``.
        comm: The ranks sharing the grid (spanning the ``torch.distributed`` world).
        rows: Rows of axis 0 per rank; default :meth:`SlabPartition.balanced`, which needs
            ``n_0 >= comm.size``. Every rank needs at least one row.
        backend: As for :func:`~dolfinx_mno.distributed_fft.process_group`.

    Raises:
        ValueError: An unsupported model option (named), a grid of the wrong dimension,
            fewer rows than ranks, or n_modes beyond the grid; raised on every rank
            before any collective, since every rank checks the same global arguments.

    Example:
        >>> fno = neuralop.models.FNO((8, 8), 1, 1, 16)
        >>> distributed = DistributedFNO(fno, (64, 64), MPI.COMM_WORLD)
        >>> local = field[:, :, distributed.local_rows]  # (1, 1, rows, 64)
        >>> distributed(local)  # (1, 1, rows, 64): this rank's rows of fno(field)
    """

    def __init__(
        self,
        model: typing.Any,
        grid_shape: Sequence[int],
        comm: MPI.Comm,
        rows: SlabPartition | None = None,
        backend: str | None = None,
    ):
        """Check the model and grid, then join the process group (collective)."""
        super().__init__()
        grid_shape = tuple(int(n) for n in grid_shape)
        check_supported(model)
        if len(grid_shape) != model.n_dim:
            raise ValueError(
                f"The grid {grid_shape} has {len(grid_shape)} axes, but the FNO has "
                f"{model.n_dim} (n_modes={tuple(model.n_modes)})."
            )
        if rows is None:
            if grid_shape[0] < comm.size:
                raise ValueError(
                    f"The grid {grid_shape} has {grid_shape[0]} rows along axis 0, the split "
                    f"axis, fewer than the {comm.size} ranks: use a finer grid or fewer ranks."
                )
            rows = SlabPartition.balanced(grid_shape[0], comm.size)
        if len(rows.counts) != comm.size or rows.size != grid_shape[0] or min(rows.counts) < 1:
            raise ValueError(
                f"rows={rows.counts} must give each of the {comm.size} ranks at least one of "
                f"the {grid_shape[0]} rows of axis 0."
            )
        for conv in model.fno_blocks.convs:  # raise before any collective
            try:
                kept_modes(conv, grid_shape)
            except ValueError as err:
                raise ValueError(f"The FNO's n_modes={tuple(model.n_modes)}: {err}") from None
        self.model = model
        self.grid_shape = grid_shape
        self.comm = comm
        self.rows = rows
        self.group = process_group(comm, backend)
        # Not registered as submodules: their parameters are the model's, so that the
        # state dict is the model's alone (under "model.").
        self.__dict__["convs"] = torch.nn.ModuleList(
            DistributedSpectralConv(conv, grid_shape, rows, self.group, comm.rank)
            for conv in model.fno_blocks.convs
        )
        self.embedding = (
            None
            if model.positional_embedding is None
            else DistributedGridEmbedding(
                model.positional_embedding, grid_shape, rows.block(comm.rank)
            )
        )

    @property
    def local_rows(self) -> slice:
        """This rank's rows of axis 0."""
        return self.rows.block(self.comm.rank)

    @property
    def local_shape(self) -> tuple[int, ...]:
        """This rank's part of the grid, ``(rows, n_1, ..., n_{d-1})``."""
        return (self.rows.counts[self.comm.rank], *self.grid_shape[1:])

    def _blocks(self) -> torch.nn.Module:
        """The model's ``FNOBlocks`` with the distributed convolutions (parameters shared)."""
        blocks = copy.copy(self.model.fno_blocks)
        blocks._modules = {**blocks._modules, "convs": self.convs}
        return blocks

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the model's output (collective).

        Args:
            field: This rank's rows of the input, ``(batch, in_channels, *local_shape)``.

        Returns:
            ``(batch, out_channels, *local_shape)``.

        Raises:
            ValueError: On every rank, if a rank's input has the wrong shape.
        """
        expected = (self.model.in_channels, *self.local_shape)
        reason = None
        if field.ndim != len(expected) + 1 or tuple(field.shape[1:]) != expected:
            reason = (
                f"the input has shape {tuple(field.shape)}, expected (batch, *{expected}) "
                f"(rows {self.local_rows.start}..{self.local_rows.stop - 1} of the grid "
                f"{self.grid_shape})"
            )
        batches = agree_on(
            self.comm, int(field.shape[0]), "DistributedFNO.forward", ValueError, reason=reason
        )
        if len(set(batches)) != 1:
            raise ValueError(f"The ranks' inputs have different batch sizes {batches}.")
        if self.embedding is not None:
            field = self.embedding(field)
        field = self.model.lifting(field)
        blocks = self._blocks()
        for index in range(self.model.n_layers):
            field = blocks(field, index)
        return typing.cast(torch.Tensor, self.model.projection(field))
