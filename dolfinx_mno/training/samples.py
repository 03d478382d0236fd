"""The data a training run sees: checked samples, the split, the normalisation statistics.

* :class:`LocalSamples`: one rank's samples (arrays or a block of a data file), checked and
  flattened to rows, with the shapes the model sees; the model is probed on them.
* :func:`agree_on_samples`: one collective in which the ranks learn of each other's
  errors and sample counts; every rank raises the same error.
* :func:`split_samples`: the seeded split into training and validation, by sample or by
  group.
* :func:`prepare_rows`: the statistics of the training split (rank 0), the
  :class:`~dolfinx_mno.NormalizedModel` that carries them, and the normalised rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import torch

from dolfinx_mno._mpi import agree_on
from dolfinx_mno.normalization import AffineNormalization, NormalizedModel
from dolfinx_mno.torch_bridge import call_watching_input, model_device, model_dtype
from dolfinx_mno.training.parallel import fetch_rows, read_shard, shard_range

__all__ = [
    "LocalSamples",
    "SampleLayout",
    "TrainingRows",
    "agree_on_samples",
    "groups_digest",
    "is_reader",
    "prepare_rows",
    "split_fingerprint",
    "split_samples",
]


def is_reader(data: object) -> bool:
    """Whether ``data`` is a data reader (closure data or gridded data)."""
    from dolfinx_mno.data.storage import ClosureDataReader, GriddedDataReader

    return isinstance(data, ClosureDataReader | GriddedDataReader)


def _is_gridded_reader(data: object) -> bool:
    from dolfinx_mno.data.storage import GriddedDataReader

    return isinstance(data, GriddedDataReader)


def _as_samples(
    data: npt.ArrayLike | torch.Tensor, name: str, grid: bool
) -> tuple[npt.NDArray[np.float64], tuple[int, ...]]:
    """``(num_samples, width)`` float64 copy of ``data``, and the shape of one sample.

    Pointwise (``grid=False``): any sample shape, flattened; a vector is one column. Grid:
    ``(num_samples, channels, *grid)``, at least one grid axis.
    """
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu()
        if data.is_complex():
            raise TypeError(f"{name} must be real, got {data.dtype}.")
        data = data.to(torch.float64).numpy()
    array = np.asarray(data)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {array.dtype}.")
    if array.ndim == 0:
        raise ValueError(f"{name} must have a sample axis, got a scalar.")
    if grid and array.ndim < 3:
        raise ValueError(
            f"With grid=True, {name} must have shape (num_samples, channels, *grid), got "
            f"{array.shape}."
        )
    width = int(np.prod(array.shape[1:], dtype=np.int64))
    sample_shape = tuple(int(n) for n in array.shape[1:]) if grid else (width,)
    array = np.array(array, dtype=np.float64).reshape(array.shape[0], width)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array).all(axis=1)).sum())
        raise ValueError(f"{name} has NaN or Inf in {bad} of {array.shape[0]} samples.")
    return array, sample_shape


def _as_groups(
    groups: npt.ArrayLike | torch.Tensor, num_ids: int, what: str
) -> npt.NDArray[np.int64]:
    """``groups`` as an int64 vector of ``num_ids`` ids (``what`` names one id's sample)."""
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    array = np.asarray(groups)
    if array.ndim != 1 or array.shape[0] != num_ids:
        raise ValueError(
            f"groups must have shape ({num_ids},), one id per {what}, got {array.shape}."
        )
    if array.dtype.kind not in "iu" and array.size > 0:
        raise TypeError(f"groups must be integer ids, got dtype {array.dtype}.")
    return array.astype(np.int64)


class LocalSamples:
    """One rank's checked samples: flattened rows and the shapes the model sees (local).

    Args:
        model: The model; probed with zeros of two samples, so that a rank without samples
            checks it too.
        inputs: This rank's inputs, or a data reader (every rank passes one; each reads
            its block of the stored samples with :func:`read_shard`).
        targets: This rank's targets; ``None`` with a reader.
        grid: Samples are fields; ``None``: whether ``inputs`` is a gridded data reader.
        groups: This rank's group ids (one per sample); with a reader, one per stored
            sample of the file (the same on every rank).
        comm: The communicator (a reader's block depends on the rank).

    Attributes:
        x: Inputs, ``(num_local, num_inputs)`` float64.
        y: Targets, ``(num_local, num_outputs)`` float64.
        input_shape: Shape of one input as the model sees it: ``(num_inputs,)``, or
            ``(in_channels, *grid)`` for fields.
        target_shape: Likewise for a target.
        groups: Group id of each local row, or ``None``.
        stored_samples: The reader's number of stored samples, or ``None`` for arrays.
        grid: Whether the samples are fields.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        inputs: Any,
        targets: Any,
        *,
        grid: bool | None,
        groups: Any,
        comm: MPI.Comm,
    ):
        self.stored_samples: int | None = None
        if is_reader(inputs):
            inputs, targets, groups, grid = self._read(inputs, targets, groups, grid, comm)
        elif targets is None:
            raise TypeError(
                "fit needs targets, or a ClosureDataReader or GriddedDataReader as inputs."
            )
        self.grid = bool(grid)
        self.x, self.input_shape = _as_samples(inputs, "inputs", self.grid)
        self.y, self.target_shape = _as_samples(targets, "targets", self.grid)
        num_x, num_y = self.x.shape[0], self.y.shape[0]
        if num_x != num_y:
            raise ValueError(f"inputs have {num_x} samples but targets have {num_y}.")
        if self.grid and self.input_shape[1:] != self.target_shape[1:]:
            raise ValueError(
                f"inputs are fields on a grid of shape {self.input_shape[1:]} but targets "
                f"on {self.target_shape[1:]}; a grid model maps a field to a field on the "
                "same grid."
            )
        self.groups = None if groups is None else _as_groups(groups, num_x, "local sample")
        self._probe(model)

    def _read(
        self, reader: Any, targets: Any, groups: Any, grid: bool | None, comm: MPI.Comm
    ) -> tuple[Any, Any, Any, bool]:
        """This rank's block of ``reader``'s samples, and the groups of its rows."""
        gridded = _is_gridded_reader(reader)
        if targets is not None:
            raise TypeError("With a data reader as inputs, pass no targets: the file has them.")
        if grid is not None and bool(grid) != gridded:
            kind = type(reader).__name__
            raise ValueError(
                f"grid={grid} does not fit a {kind}: gridded data are fields (grid=True), "
                "closure data are points (grid=False); leave grid out."
            )
        self.stored_samples = int(reader.num_samples)
        inputs, targets = read_shard(reader, comm)
        if groups is not None:
            ids = _as_groups(groups, self.stored_samples, "stored sample of the file")
            block = shard_range(self.stored_samples, comm)
            rows_per_sample = inputs.shape[0] // max(block.stop - block.start, 1)
            groups = np.repeat(ids[block], rows_per_sample)
        return inputs, targets, groups, gridded

    def _probe(self, model: torch.nn.Module) -> None:
        dtype = model_dtype(model, torch.float64)
        probe = torch.zeros(2, *self.input_shape, dtype=dtype, device=model_device(model))
        with torch.no_grad():
            output = call_watching_input(model, probe)
        if self.grid and tuple(output.shape) != (2, *self.target_shape):
            raise ValueError(
                f"The model maps {(2, *self.input_shape)} inputs to {tuple(output.shape)}, "
                f"but the targets are fields of shape {self.target_shape}: a grid model "
                "must map (batch, in_channels, *grid) to (batch, out_channels, *grid)."
            )
        if output.shape[0] != 2 or output[0].numel() != self.y.shape[1]:
            raise ValueError(
                f"The model maps (2, {self.x.shape[1]}) inputs to {tuple(output.shape)}, but "
                f"the targets have {self.y.shape[1]} components per sample."
            )


@dataclasses.dataclass(frozen=True)
class SampleLayout:
    """Where the global samples are: what every rank knows after :func:`agree_on_samples`.

    Attributes:
        offsets: ``(size + 1,)``: rank ``r`` holds global samples ``offsets[r]`` to
            ``offsets[r + 1]``.
        groups: Group id of every global sample, or ``None``.
    """

    offsets: npt.NDArray[np.int64]
    groups: npt.NDArray[np.int64] | None

    @property
    def num_samples(self) -> int:
        """Number of global samples."""
        return int(self.offsets[-1])


def agree_on_samples(
    error: str | None,
    samples: LocalSamples | None,
    comm: MPI.Comm,
    settings: Mapping[str, Any] | None = None,
) -> SampleLayout:
    """Share every rank's verdict and sample counts; raise the same error on every rank.

    Collective (one ``allgather``).

    Args:
        error: This rank's error, or ``None``.
        samples: This rank's samples (``None`` if ``error``).
        comm: The communicator.
        settings: This rank's settings (epochs, batch size, seed, ...), which must be the
            same on every rank: ranks that run different numbers of epochs or batches would
            wait for each other forever.

    Raises:
        ValueError: A rank failed, the ranks' sample shapes or settings differ, groups were
            given on some ranks only, or the ranks read different numbers of samples from
            their files.
    """
    report = None
    if samples is not None and error is None:
        report = (
            samples.x.shape[0],
            samples.input_shape,
            samples.target_shape,
            samples.groups,
            samples.stored_samples,
            json.dumps(settings, sort_keys=True, default=str),
        )
    reports = agree_on(comm, report, "fit: checking the input", ValueError, reason=error)
    found = [json.loads(report[5]) for report in reports]
    differing = sorted(k for k in set().union(*found) if len({str(s.get(k)) for s in found}) > 1)
    if differing:
        values = {k: [s.get(k) for s in found] for k in differing}
        raise ValueError(
            f"fit: the ranks were given different settings, by rank: {values}. Every rank "
            "of comm trains the same model on its share of the data and must pass the same "
            "settings (for independent fits per rank, pass comm=MPI.COMM_SELF)."
        )
    shapes = {(report[1], report[2]) for report in reports}
    if len(shapes) > 1:
        raise ValueError(
            f"fit: the ranks' samples have different shapes (inputs, targets): {sorted(shapes)}."
        )
    stored = {report[4] for report in reports}
    if len(stored) > 1:
        raise ValueError(
            "fit: pass a data reader on every rank or on none, on the same complete samples; "
            f"the ranks' readers hold {sorted(stored, key=str)} samples (None: arrays)."
        )
    counts = np.array([report[0] for report in reports], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    with_groups = [r for r, report in enumerate(reports) if report[3] is not None]
    if 0 < len(with_groups) < comm.size:
        raise ValueError(
            f"fit: groups were given on rank(s) {with_groups} only; pass them on every rank "
            "(an empty array where a rank holds no sample)."
        )
    groups = np.concatenate([report[3] for report in reports]) if with_groups else None
    return SampleLayout(offsets, groups)


def groups_digest(groups: npt.NDArray[np.int64]) -> str:
    """SHA-256 of the global group ids (a setting: resuming with other groups is refused)."""
    return hashlib.sha256(groups.astype("<i8").tobytes()).hexdigest()


def _row_hashes(
    inputs: npt.NDArray, targets: npt.NDArray, offset: int, chunk: int
) -> Iterator[tuple[int, npt.NDArray[np.uint64]]]:
    """``(start, hashes)`` for each chunk of rows, one chunk in memory at a time.

    Each row's hash is weighted by its global index (see :func:`data_checksum`).
    """
    width = inputs.shape[1] + targets.shape[1]
    weights = np.random.default_rng(0xC0FFEE).integers(1, 2**63, width, dtype=np.uint64)
    weights |= np.uint64(1)
    mix = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for start in range(0, inputs.shape[0], chunk):
            stop = min(start + chunk, inputs.shape[0])
            rows = np.concatenate([inputs[start:stop], targets[start:stop]], axis=1)
            words = np.ascontiguousarray(rows, dtype=np.float64).view(np.uint64)
            hashes = (words * weights).sum(axis=1, dtype=np.uint64)
            hashes ^= hashes >> np.uint64(31)
            index = np.arange(offset + start, offset + stop, dtype=np.uint64) * mix + mix
            yield start, hashes * index


def data_checksum(
    inputs: npt.NDArray, targets: npt.NDArray, offset: int, comm: MPI.Comm, chunk: int = 65536
) -> str:
    """A checksum of the global samples, the same on any number of ranks (collective).

    Each row (its inputs and targets as float64 bits) is hashed with fixed odd weights and
    weighted by its global index; the sum over all rows is taken modulo 2⁶⁴, which is
    exact and independent of how the rows are spread over ranks. Not cryptographic: it
    tells other data from the data of a checkpoint (a setting of a run without the
    training statistics, which would tell them apart otherwise).

    Args:
        inputs: This rank's input rows ``(n, ·)``.
        targets: This rank's target rows ``(n, ·)``.
        offset: The global index of this rank's first row.
        comm: The communicator.
        chunk: Rows hashed at a time (bounds the temporary memory).
    """
    chunks = _row_hashes(inputs, targets, offset, chunk)
    total = sum(int(hashes.sum(dtype=np.uint64)) for _, hashes in chunks)
    return f"{comm.allreduce(total, op=MPI.SUM) % 2**64:016x}"


def split_fingerprint(
    inputs: npt.NDArray,
    targets: npt.NDArray,
    offset: int,
    split: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
    comm: MPI.Comm,
) -> dict[str, dict[str, Any]]:
    """The sizes and checksums of the training and the validation split (collective).

    What a checkpoint records of its data
    (:class:`~dolfinx_mno.training.checkpoint.Checkpoints`): ``{"training samples":
    {"count": n, "checksum": "…"}, "validation samples": {...}}``, each checksum the
    :func:`data_checksum` of that split's rows alone (the two add up to the checksum of
    all rows, modulo 2⁶⁴), the same on any number of ranks.

    Args:
        inputs: This rank's input rows ``(n, ·)``, as given (not normalised).
        targets: This rank's target rows ``(n, ·)``.
        offset: The global index of this rank's first row.
        split: ``(train_index, val_index)``, global indices.
        comm: The communicator.
    """
    num_rows = inputs.shape[0]
    local = split[1][(split[1] >= offset) & (split[1] < offset + num_rows)] - offset
    in_validation = np.zeros(num_rows, dtype=bool)
    in_validation[local] = True
    # Unsigned sums wrap modulo 2⁶⁴, in NumPy and in MPI alike.
    totals = np.zeros(2, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start, hashes in _row_hashes(inputs, targets, offset, 65536):
            validation = in_validation[start : start + hashes.size]
            totals[0] += hashes[~validation].sum(dtype=np.uint64)
            totals[1] += hashes[validation].sum(dtype=np.uint64)
    comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
    return {
        what: {"count": len(index), "checksum": f"{int(total):016x}"}
        for what, index, total in zip(
            ("training samples", "validation samples"), split, totals, strict=True
        )
    }


def split_samples(
    num_samples: int,
    validation_fraction: float,
    seed: int,
    groups: npt.NDArray[np.int64] | None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(train_index, val_index)``: global sample indices; raises if a side is empty.

    Without groups, a seeded permutation of the samples; with ``groups`` (the global ids,
    one per sample), a seeded permutation of the sorted distinct ids sends
    ``round(validation_fraction * num_groups)`` whole groups to validation.
    """
    if groups is None:
        order = np.random.default_rng([seed, 0x5EED]).permutation(num_samples)
        num_val = round(validation_fraction * num_samples)
        num_train = num_samples - num_val
        if num_val < 1 or num_train < 1:
            raise ValueError(
                f"fit: {num_samples} samples with validation_fraction={validation_fraction} "
                f"leave {num_train} for training and {num_val} for validation; each needs one."
            )
        return order[num_val:], order[:num_val]
    ids = np.unique(groups)
    num_val_groups = round(validation_fraction * ids.size)
    if num_val_groups < 1 or num_val_groups == ids.size:
        raise ValueError(
            f"fit: {ids.size} groups with validation_fraction={validation_fraction} leave "
            f"{ids.size - num_val_groups} groups for training and {num_val_groups} for "
            "validation; each needs one."
        )
    order = np.random.default_rng([seed, 0x6209]).permutation(ids.size)
    in_validation = np.isin(groups, ids[order[:num_val_groups]])
    return np.flatnonzero(~in_validation), np.flatnonzero(in_validation)


@dataclasses.dataclass(frozen=True)
class TrainingRows:
    """The rows a training loop runs on, and where each global sample is.

    Attributes:
        local: This rank's samples, ``(num_local, num_inputs + num_outputs)`` float64:
            inputs then targets, flattened and (if asked for) normalised.
        offsets: ``(size + 1,)`` global row offsets of the ranks.
        train_index: Global indices of the training samples.
        val_index: Global indices of the validation samples.
        input_shape: Shape of one input as the model sees it.
        target_shape: Shape of one target as the model returns it.
    """

    local: npt.NDArray[np.float64]
    offsets: npt.NDArray[np.int64]
    train_index: npt.NDArray[np.int64]
    val_index: npt.NDArray[np.int64]
    input_shape: tuple[int, ...]
    target_shape: tuple[int, ...]

    @property
    def num_inputs(self) -> int:
        """Input columns of a row."""
        return int(np.prod(self.input_shape))

    @property
    def num_outputs(self) -> int:
        """Target columns of a row."""
        return self.local.shape[1] - self.num_inputs


def prepare_rows(
    model: torch.nn.Module,
    samples: LocalSamples,
    split: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
    offsets: npt.NDArray[np.int64],
    *,
    normalize_inputs: bool,
    normalize_targets: bool,
    comm: MPI.Comm,
) -> tuple[torch.nn.Module, TrainingRows]:
    """The model to train, and the rows it trains on (collective).

    With ``normalize_inputs`` or ``normalize_targets``, rank 0 computes
    :meth:`~dolfinx_mno.AffineNormalization.from_data` of the training split (per component,
    or per channel pooled over the grid points for fields) and broadcasts it; the model is
    wrapped in a :class:`~dolfinx_mno.NormalizedModel` (a normalisation that is off is the
    identity) and the rows are normalised once, in the model's dtype as at inference.

    Args:
        model: The model (its weights the same on every rank).
        samples: This rank's samples.
        split: ``(train_index, val_index)`` from :func:`split_samples`.
        offsets: ``(size + 1,)`` global row offsets.
        normalize_inputs: Normalise the inputs.
        normalize_targets: Normalise the targets.
        comm: The communicator.

    Returns:
        The trained model (``model``, or a :class:`~dolfinx_mno.NormalizedModel` around it),
        and the rows.
    """
    train_index, val_index = split
    input_shape, target_shape = samples.input_shape, samples.target_shape
    num_inputs, num_outputs = samples.x.shape[1], samples.y.shape[1]
    local = np.concatenate([samples.x, samples.y], axis=1)
    trained = model
    if normalize_inputs or normalize_targets:
        # Pointwise: per component of the flattened sample; grid: per channel (axis 1).
        axis = 1 if samples.grid else None
        empty = np.zeros(0, dtype=np.int64)
        needed = [np.sort(train_index)] + [empty] * (comm.size - 1)
        rows = fetch_rows(local, offsets, needed, comm)
        statistics = None
        if comm.rank == 0:
            parts = (
                (rows[:, :num_inputs], input_shape, normalize_inputs),
                (rows[:, num_inputs:], target_shape, normalize_targets),
            )
            statistics = [
                AffineNormalization.from_data(
                    torch.from_numpy(part.reshape(-1, *shape)), axis=axis
                ).state_dict()
                if wanted
                else None
                for part, shape, wanted in parts
            ]
        statistics = comm.bcast(statistics, root=0)
        normalizations = []
        for shape, flat_width, state in (
            (input_shape, num_inputs, statistics[0]),
            (target_shape, num_outputs, statistics[1]),
        ):
            width = shape[0] if axis is not None else flat_width
            normalization = AffineNormalization(width=width, axis=-1 if axis is None else axis)
            if state is not None:  # else the identity
                normalization.load_state_dict(state)
            normalizations.append(normalization)
        dtype = model_dtype(model, torch.float64)
        device = model_device(model) or torch.device("cpu")
        normalized = NormalizedModel(model, *normalizations).to(device)
        # Normalise once, in the model's dtype as at inference; float64 carries it exactly.
        with torch.no_grad():
            t = torch.from_numpy(local).to(dtype=dtype, device=device)
            count = t.shape[0]
            x_n = normalized.input_normalization(t[:, :num_inputs].reshape(-1, *input_shape))
            y_n = normalized.output_normalization(t[:, num_inputs:].reshape(-1, *target_shape))
            both = torch.cat([x_n.reshape(count, num_inputs), y_n.reshape(count, num_outputs)], 1)
            local = both.to(torch.float64).cpu().numpy()
        trained = normalized
    return trained, TrainingRows(local, offsets, train_index, val_index, input_shape, target_shape)
