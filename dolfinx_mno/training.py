"""Fit closure models to data: reproducible, resumable and data-parallel over MPI.

:func:`fit` trains a pointwise model on ``(inputs, targets)`` samples, e.g. operands and
closure values collected at quadrature points, and returns a
:class:`~dolfinx_mno.NormalizedModel` that a :class:`~dolfinx_mno.Closure` evaluates in
physical units. With ``grid=True`` a sample is a field, ``(channels, *grid)``, and the
model a neural operator, ``(batch, in_channels, *grid) → (batch, out_channels, *grid)``
(the contract of :class:`~dolfinx_mno.NonlocalClosure`).

Recipe (see ``docs/training.md``):

* **Split.** A permutation seeded by ``seed`` picks ``validation_fraction`` of the global
  samples for validation, or, with ``groups``, of the groups (e.g. trajectories), so
  that no group is on both sides; the rest train.
* **Normalisation.** :meth:`~dolfinx_mno.AffineNormalization.from_data` on the training
  split (inputs and targets; per component, or per channel pooled over the grid points
  with ``grid=True``); the loss is the mean squared error of normalised targets.
* **Optimiser.** Adam with :class:`torch.optim.lr_scheduler.ReduceLROnPlateau` on the
  validation loss (a plateau schedule needs no total number of epochs, so ``epochs``
  can be raised on resume), and early stopping after ``patience`` epochs without
  improvement; the returned model has the weights of the best validation epoch.
* **Data parallelism over MPI (mpi4py).** Every minibatch of the global, seeded epoch
  order is cut into chunks of ``chunk_size`` samples. The chunks are shared out among
  the ranks, each rank back-propagates its chunks one by one, and the per-chunk
  gradients are gathered (``Allgatherv``) and summed on every rank in chunk order. The
  chunks and the order of the sum do not depend on the number of ranks, so the weights
  after any number of epochs are the same, bit for bit, on 1, 2 or 3 ranks. (An
  ``Allreduce`` of per-rank sums adds in an order that depends on the number of ranks:
  regrouping the sum changed the weights by 1.8e-15 after 80 epochs in our test problem,
  and such differences can grow in long runs.)
* **Checkpoints.** Every ``checkpoint_every`` epochs, a model file
  (:func:`dolfinx_mno.io.save_model`) and a training-state file (optimiser, scheduler,
  early-stopping state, history; tensors and plain containers, loadable with
  ``weights_only=True``) are written atomically by rank 0; ``resume=True`` continues
  from the newest complete pair and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import torch
from tqdm.auto import tqdm

from dolfinx_mno.io import (
    ModelFileError,
    _check_json,
    atomic_torch_save,
    on_rank_zero,
    read_model_file,
    save_model,
)
from dolfinx_mno.normalization import AffineNormalization, NormalizedModel
from dolfinx_mno.spec import ClosureSpec, metadata_with_spec
from dolfinx_mno.torch_bridge import model_device, model_dtype
from dolfinx_mno.validation import check_integer

__all__ = ["FitResult", "TrainingHistory", "fit", "shard"]

#: Identifies a training-state file and its layout version.
STATE_FORMAT = "dolfinx_mno.training_state"
STATE_FORMAT_VERSION = 1
_CHECKPOINT = re.compile(r"^checkpoint-(\d{6,})\.state\.pt$")


@dataclasses.dataclass
class TrainingHistory:
    """Per-epoch record of a :func:`fit` run (epochs counted from 0).

    Attributes:
        train_loss: Mean squared error of the normalised training targets, averaged over
            the epoch's minibatches as they were seen (before each step).
        val_loss: Mean squared error of the normalised validation targets after the
            epoch.
        learning_rate: Learning rate used in the epoch.
        best_epoch: Epoch of the lowest validation loss (-1 before the first epoch).
        best_val_loss: That loss.
        stopped_early: Whether early stopping ended the run.
        resumed_from: Number of epochs restored from a checkpoint, or ``None``.
    """

    train_loss: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    learning_rate: list[float] = dataclasses.field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = float("inf")
    stopped_early: bool = False
    resumed_from: int | None = None

    @property
    def epochs(self) -> int:
        """Number of epochs run (restored ones included)."""
        return len(self.val_loss)


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: The trained model with the weights of the best validation epoch, in eval
            mode: a :class:`~dolfinx_mno.NormalizedModel` around the given model if
            ``normalize`` or ``normalize_targets`` was true, else the given model itself.
        history: The losses per epoch.
    """

    model: torch.nn.Module
    history: TrainingHistory


def shard(data: npt.ArrayLike | torch.Tensor, comm: MPI.Comm) -> npt.NDArray[Any]:
    """This rank's contiguous block of the rows of ``data``, which every rank holds.

    Rank ``r`` of ``p`` gets rows ``[n r // p, n (r + 1) // p)``: the blocks, in rank
    order, are ``data`` again, which is what :func:`fit` expects of local samples.

    Args:
        data: Array of shape ``(num_samples, ...)``, the same on every rank.
        comm: The communicator.

    Returns:
        A view of shape ``(num_local_samples, ...)``.
    """
    array = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    n = array.shape[0]
    return array[n * comm.rank // comm.size : n * (comm.rank + 1) // comm.size]


# -- validation ---------------------------------------------------------------------------


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


def _as_groups(groups: npt.ArrayLike | torch.Tensor, num_samples: int) -> npt.NDArray[np.int64]:
    """``groups`` as an int64 vector of ``num_samples`` ids."""
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    array = np.asarray(groups)
    if array.ndim != 1 or array.shape[0] != num_samples:
        raise ValueError(
            f"groups must have shape ({num_samples},), one id per local sample, got {array.shape}."
        )
    if array.dtype.kind not in "iu" and array.size > 0:
        raise TypeError(f"groups must be integer ids, got dtype {array.dtype}.")
    return array.astype(np.int64)


class _Local:
    """One rank's checked data: flattened samples and the shapes the model sees."""

    def __init__(
        self,
        model: torch.nn.Module,
        inputs: Any,
        targets: Any,
        grid: bool,
        groups: Any,
    ):
        self.x, self.input_shape = _as_samples(inputs, "inputs", grid)
        self.y, self.target_shape = _as_samples(targets, "targets", grid)
        num_x, num_y = self.x.shape[0], self.y.shape[0]
        if num_x != num_y:
            raise ValueError(f"inputs have {num_x} samples but targets have {num_y}.")
        if grid and self.input_shape[1:] != self.target_shape[1:]:
            raise ValueError(
                f"inputs are fields on a grid of shape {self.input_shape[1:]} but targets "
                f"on {self.target_shape[1:]}; a grid model maps a field to a field on the "
                "same grid."
            )
        self.groups = None if groups is None else _as_groups(groups, num_x)
        # Probe with zeros, so that a rank without samples checks the model too.
        dtype = model_dtype(model, torch.float64)
        probe = torch.zeros(2, *self.input_shape, dtype=dtype, device=model_device(model))
        with torch.no_grad():
            output = model(probe)
        if grid and tuple(output.shape) != (2, *self.target_shape):
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


def _split(
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


# -- MPI helpers -------------------------------------------------------------------------


def _fetch_rows(
    local: npt.NDArray[np.float64],
    offsets: npt.NDArray[np.int64],
    needed: Sequence[npt.NDArray[np.int64]],
    comm: MPI.Comm,
) -> npt.NDArray[np.float64]:
    """Rows ``needed[comm.rank]`` of the global array, in that order.

    The global array is the concatenation of every rank's ``local`` rows in rank order
    (rank ``r`` owns rows ``offsets[r]:offsets[r + 1]``); ``needed`` is the same on every
    rank. One ``Alltoallv``; collective.
    """
    rank, size = comm.rank, comm.size
    if size == 1:
        return local[needed[0]]
    width = local.shape[1]
    lo, hi = offsets[rank], offsets[rank + 1]
    parts = []
    for indices in needed:
        mine = indices[(indices >= lo) & (indices < hi)]
        parts.append(local[mine - lo])
    send = np.ascontiguousarray(np.concatenate(parts).reshape(-1, width))
    send_counts = np.array([p.shape[0] * width for p in parts], dtype=np.int64)
    wanted = needed[rank]
    owners = np.searchsorted(offsets, wanted, side="right") - 1
    recv_counts = np.bincount(owners, minlength=size).astype(np.int64) * width
    received = np.empty((wanted.size, width), dtype=local.dtype)
    comm.Alltoallv(
        [send, (send_counts, _displacements(send_counts))],
        [received, (recv_counts, _displacements(recv_counts))],
    )
    # Rows arrive grouped by owner, each group in the requested order.
    rows = np.empty_like(received)
    rows[np.argsort(owners, kind="stable")] = received
    return rows


def _displacements(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _gather_chunks(
    local: npt.NDArray[np.float64], chunks_per_rank: Sequence[int], comm: MPI.Comm
) -> npt.NDArray[np.float64]:
    """Stack every rank's ``(chunks, width)`` rows in rank order, on every rank."""
    if comm.size == 1:
        return local
    width = local.shape[1]
    counts = np.asarray(chunks_per_rank, dtype=np.int64) * width
    out = np.empty((int(sum(chunks_per_rank)), width), dtype=np.float64)
    comm.Allgatherv(local, [out, (counts, _displacements(counts))])
    return out


def _split_chunks(start: int, stop: int, chunk_size: int, size: int) -> list[list[tuple[int, int]]]:
    """Chunks of positions ``[start, stop)`` shared among ranks in contiguous blocks."""
    chunks = [(s, min(s + chunk_size, stop)) for s in range(start, stop, chunk_size)]
    k = len(chunks)
    return [chunks[k * r // size : k * (r + 1) // size] for r in range(size)]


def _agree(error: str | None, comm: MPI.Comm, what: str) -> None:
    """Raise on every rank if ``error`` is set on any rank (collective)."""
    errors = comm.allgather(error)
    failed = [r for r, e in enumerate(errors) if e is not None]
    if failed:
        raise ValueError(
            f"{what} failed on rank(s) {failed}; on rank {failed[0]}: {errors[failed[0]]}"
        )


# -- parameters and gradients ------------------------------------------------------------


def _flat_size(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() * (2 if p.is_complex() else 1) for p in params)


def _write_grads(params: Sequence[torch.Tensor], out: npt.NDArray[np.float64]) -> None:
    """Copy the gradients into ``out`` (float64; complex as (real, imaginary) pairs)."""
    flat = torch.from_numpy(out)  # shares memory with out
    offset = 0
    for p in params:
        n = p.numel() * (2 if p.is_complex() else 1)
        if p.grad is None:
            flat[offset : offset + n] = 0.0
        else:
            g = torch.view_as_real(p.grad) if p.grad.is_complex() else p.grad
            flat[offset : offset + n].copy_(g.detach().reshape(-1))
        offset += n


def _read_grads(params: Sequence[torch.Tensor], flat: npt.NDArray[np.float64]) -> None:
    """Set the gradients from ``flat`` (the layout of :func:`_write_grads`)."""
    offset = 0
    for p in params:
        n = p.numel() * (2 if p.is_complex() else 1)
        g = torch.from_numpy(flat[offset : offset + n])
        if p.is_complex():
            g = torch.view_as_complex(g.reshape(*p.shape, 2))
        p.grad = g.reshape(p.shape).to(dtype=p.dtype, device=p.device)
        offset += n


def _clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


# -- checkpoints -------------------------------------------------------------------------


def _checkpoint_paths(directory: Path, epochs_done: int) -> tuple[Path, Path]:
    stem = directory / f"checkpoint-{epochs_done:06d}"
    return Path(f"{stem}.model.pt"), Path(f"{stem}.state.pt")


def _latest_checkpoint(directory: Path) -> tuple[int, dict[str, Any]] | None:
    """The newest complete (model, state) pair: ``(epochs done, state)``, or ``None``.

    A pair is complete when the model file's digest is the one the state recorded; a
    model file written just before an interruption, without its state, is skipped.
    """
    if not directory.is_dir():
        return None
    found = sorted(
        (int(m.group(1)) for f in directory.iterdir() if (m := _CHECKPOINT.match(f.name))),
        reverse=True,
    )
    for epochs_done in found:
        model_path, state_path = _checkpoint_paths(directory, epochs_done)
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ModelFileError(
                f"Could not read the training state {os.fspath(state_path)!r}: "
                f"{type(err).__name__}: {err}"
            ) from err
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ModelFileError(f"{os.fspath(state_path)!r} is not a training-state file.")
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise ModelFileError(
                f"{os.fspath(state_path)!r} has format version "
                f"{state.get('format_version')!r}; this dolfinx_mno reads "
                f"{STATE_FORMAT_VERSION}."
            )
        if model_path.is_file() and read_model_file(model_path).sha256 == state["model_sha256"]:
            return epochs_done, state
    return None


# -- training ----------------------------------------------------------------------------


def fit(
    model: torch.nn.Module,
    inputs: npt.ArrayLike | torch.Tensor,
    targets: npt.ArrayLike | torch.Tensor,
    *,
    comm: MPI.Comm | None = None,
    epochs: int = 500,
    batch_size: int = 256,
    chunk_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    lr_factor: float = 0.5,
    lr_patience: int = 10,
    min_learning_rate: float = 1e-6,
    patience: int = 30,
    min_delta: float = 0.0,
    validation_fraction: float = 0.2,
    seed: int = 0,
    normalize: bool = True,
    normalize_targets: bool | None = None,
    grid: bool = False,
    groups: npt.ArrayLike | torch.Tensor | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    metadata: Mapping[str, Any] | None = None,
    spec: ClosureSpec | None = None,
    progress: bool = True,
    callback: Callable[[int, TrainingHistory], None] | None = None,
) -> FitResult:
    """Train ``model`` to map ``inputs`` to ``targets`` (mean squared error).

    Collective on ``comm``. Each rank passes its own samples; the global data set is
    the concatenation of the ranks' samples in rank order (:func:`shard` cuts an array
    every rank holds into such blocks). The result depends on the global data and the
    settings only, not on the number of ranks or how the samples are spread over them.

    Args:
        model: Maps ``(batch, num_inputs)`` to ``(batch, num_outputs)`` or
            ``(batch, *value_shape)``; with ``grid=True``, ``(batch, in_channels, *grid)``
            to ``(batch, out_channels, *grid)``. Trained in its dtype, on its device. Rank
            0's initial weights are used on all ranks. It is trained in place (wrapped in
            a :class:`~dolfinx_mno.NormalizedModel` if ``normalize`` or
            ``normalize_targets``). For rank-invariant results it must be deterministic
            (no dropout) and act on each sample of a batch separately (no batch norm).
        inputs: This rank's samples, shape ``(num_local_samples, num_inputs)`` (NumPy or
            torch, real; a vector is one column; other sample shapes are flattened); with
            ``grid=True``, fields ``(num_local_samples, in_channels, *grid)``, passed to
            the model in that shape.
        targets: Shape ``(num_local_samples, num_outputs)`` or
            ``(num_local_samples, *value_shape)``; with ``grid=True``,
            ``(num_local_samples, out_channels, *grid)`` on the grid of the inputs.
        comm: Communicator; default ``MPI.COMM_WORLD``.
        epochs: Maximum number of epochs (passes over the training split).
        batch_size: Samples per optimiser step (the last batch of an epoch may be
            smaller).
        chunk_size: Samples per backward pass: the unit of work shared among ranks and
            of the fixed-order gradient sum. The result depends on it (at rounding level)
            but not on the number of ranks; at most ``ceil(batch_size / chunk_size)``
            ranks have work in a step.
        learning_rate: Initial Adam learning rate.
        weight_decay: Adam weight decay (L2).
        lr_factor: ReduceLROnPlateau factor applied when the validation loss has not
            improved (relative threshold 1e-4) for ``lr_patience`` epochs.
        lr_patience: See ``lr_factor``.
        min_learning_rate: Lower bound of the learning rate.
        patience: Stop after this many epochs without a validation loss below
            ``best * (1 - min_delta)``.
        min_delta: Relative improvement that counts for early stopping.
        validation_fraction: Fraction of the global samples held out for validation
            (at least one sample each for training and validation).
        seed: Seeds the split, the epoch orders and torch's random state in each epoch.
            The caller's random state is restored on return.
        normalize: Wrap the model in a :class:`~dolfinx_mno.NormalizedModel` with
            the statistics of the training split: mean and standard deviation (unbiased)
            per input component, or with ``grid=True`` per input channel pooled over the
            samples and grid points (``axis=1`` normalisations: the model still runs on
            any grid, and a translation-invariant model stays so).
        normalize_targets: Normalise the targets the same way (the loss is then the MSE
            of normalised targets, and the model's outputs are mapped back). ``None``
            (the default): the value of ``normalize``. Either option alone gives a
            :class:`~dolfinx_mno.NormalizedModel` whose other normalisation is the
            identity.
        grid: Samples are fields on a grid (see ``model``, ``inputs``), not points.
        groups: This rank's group id of each sample, integers of shape
            ``(num_local_samples,)``, e.g. the trajectory a snapshot comes from. The split
            then sends whole groups to validation (``round(validation_fraction *
            num_groups)`` of the distinct ids, seeded), so that no group is on both sides.
            A group's samples may be spread over ranks.
        checkpoint_dir: Folder for checkpoints (created by rank 0); ``None`` for none.
        checkpoint_every: Write a checkpoint every this many epochs, and at the end.
        resume: Continue from the newest complete checkpoint in ``checkpoint_dir`` (if
            there is none, start afresh). The data and every setting but ``epochs``,
            ``checkpoint_every``, ``metadata``, ``spec``, ``progress`` and ``callback`` must be
            those of the interrupted run: other settings, another number of samples,
            other groups or (with ``normalize``) other statistics of the training split
            are refused.
        metadata: JSON dict stored in the checkpoint model files.
        spec: The closure the model is trained for (e.g. ``sampler.spec``), stored in the
            checkpoint model files as :func:`~dolfinx_mno.io.save_model` stores it.
        progress: Show a tqdm progress bar (rank 0 only).
        callback: ``callback(epoch, history)`` after every epoch, on every rank.

    Returns:
        The trained model and the history.

    Raises:
        ValueError: Bad data or settings (on every rank, whichever rank found it), or a
            checkpoint written with other data or settings.
        ModelFileError: An unreadable checkpoint.
        FloatingPointError: NaN or Inf losses (on every rank).
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    # Local checks first; every rank learns of a failure on any rank (one allgather).
    error: str | None = None
    local: _Local | None = None
    settings: dict[str, Any] = {}
    try:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        settings = {
            "batch_size": check_integer(batch_size, "batch_size", minimum=1),
            "chunk_size": check_integer(chunk_size, "chunk_size", minimum=1),
            "learning_rate": float(learning_rate),
            "lr_factor": float(lr_factor),
            "lr_patience": check_integer(lr_patience, "lr_patience"),
            "min_delta": float(min_delta),
            "min_learning_rate": float(min_learning_rate),
            "normalize": bool(normalize),
            "patience": check_integer(patience, "patience", minimum=1),
            "seed": int(seed),
            "validation_fraction": float(validation_fraction),
            "weight_decay": float(weight_decay),
        }
        # Only options away from their defaults enter the settings, so that checkpoints
        # of runs without them still resume.
        if normalize_targets is not None and bool(normalize_targets) != settings["normalize"]:
            settings["normalize_targets"] = bool(normalize_targets)
        if grid:
            settings["grid"] = True
        check_integer(epochs, "epochs")
        check_integer(checkpoint_every, "checkpoint_every", minimum=1)
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir.")
        metadata = metadata_with_spec(metadata, spec)
        _check_json(metadata, "metadata")
        local = _Local(model, inputs, targets, bool(grid), groups)
    except Exception as err:  # the model's probe may raise anything
        error = f"{type(err).__name__}: {err}"
    reports = comm.allgather(
        (error, None)
        if local is None
        else (None, (local.x.shape[0], local.input_shape, local.target_shape, local.groups))
    )
    failed = [r for r, (e, _) in enumerate(reports) if e is not None]
    if failed:
        raise ValueError(
            f"fit: bad input on rank(s) {failed}; on rank {failed[0]}: {reports[failed[0]][0]}"
        )
    assert local is not None
    shapes = {(report[1], report[2]) for _, report in reports}
    if len(shapes) > 1:
        raise ValueError(
            f"fit: the ranks' samples have different shapes (inputs, targets): {sorted(shapes)}."
        )
    counts = np.array([report[0] for _, report in reports], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    num_samples = int(offsets[-1])
    with_groups = [r for r, (_, report) in enumerate(reports) if report[3] is not None]
    if 0 < len(with_groups) < comm.size:
        raise ValueError(
            f"fit: groups were given on rank(s) {with_groups} only; pass them on every rank "
            "(an empty array where a rank holds no sample)."
        )
    global_groups = None
    if with_groups:
        global_groups = np.concatenate([report[3] for _, report in reports])
        digest = hashlib.sha256(global_groups.astype("<i8").tobytes()).hexdigest()
        settings["groups_sha256"] = digest
    # The same global data and settings on every rank: all ranks raise here together.
    train_index, val_index = _split(
        num_samples, settings["validation_fraction"], settings["seed"], global_groups
    )
    num_inputs, num_outputs = local.x.shape[1], local.y.shape[1]
    settings.update(num_samples=num_samples, num_inputs=num_inputs, num_outputs=num_outputs)
    if grid:
        settings.update(input_shape=list(local.input_shape), target_shape=list(local.target_shape))

    with torch.random.fork_rng(devices=[]):
        return _fit(
            model,
            local,
            offsets,
            train_index,
            val_index,
            comm,
            settings,
            int(epochs),
            checkpoint_dir,
            int(checkpoint_every),
            resume,
            metadata,
            progress,
            callback,
        )


def _fit(
    model: torch.nn.Module,
    samples: _Local,
    offsets: npt.NDArray[np.int64],
    train_index: npt.NDArray[np.int64],
    val_index: npt.NDArray[np.int64],
    comm: MPI.Comm,
    settings: dict[str, Any],
    epochs: int,
    checkpoint_dir: str | os.PathLike[str] | None,
    checkpoint_every: int,
    resume: bool,
    metadata: Mapping[str, Any] | None,
    progress: bool,
    callback: Callable[[int, TrainingHistory], None] | None,
) -> FitResult:
    """The body of :func:`fit`, after validation (collective)."""
    rank, size = comm.rank, comm.size
    seed = settings["seed"]
    num_inputs, num_outputs = settings["num_inputs"], settings["num_outputs"]
    dtype = model_dtype(model, torch.float64)
    device = model_device(model) or torch.device("cpu")

    # Same starting weights everywhere: rank 0's.
    if size > 1:
        model.load_state_dict(comm.bcast(_clone_state(model) if rank == 0 else None), strict=False)

    # The split (made by fit) and the statistics depend on the global data only.
    num_val, num_train = len(val_index), len(train_index)
    # The model sees (batch, num_inputs) samples, or (batch, *input_shape) fields.
    input_shape, target_shape = samples.input_shape, samples.target_shape
    local = np.concatenate([samples.x, samples.y], axis=1)
    normalize_inputs = settings["normalize"]
    normalize_targets = settings.get("normalize_targets", normalize_inputs)
    if normalize_inputs or normalize_targets:
        # Pointwise: per component of the flattened sample; grid: per channel (axis 1).
        axis = 1 if settings.get("grid", False) else None
        empty = np.zeros(0, dtype=np.int64)
        needed = [np.sort(train_index)] + [empty] * (size - 1)
        rows = _fetch_rows(local, offsets, needed, comm)
        statistics = None
        if rank == 0:
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
        normalized = NormalizedModel(model, *normalizations).to(device)
        # Normalise once, in the model's dtype as at inference; float64 carries it exactly.
        with torch.no_grad():
            t = torch.from_numpy(local).to(dtype=dtype, device=device)
            count = t.shape[0]
            x_n = normalized.input_normalization(t[:, :num_inputs].reshape(-1, *input_shape))
            y_n = normalized.output_normalization(t[:, num_inputs:].reshape(-1, *target_shape))
            both = torch.cat([x_n.reshape(count, num_inputs), y_n.reshape(count, num_outputs)], 1)
            local = both.to(torch.float64).cpu().numpy()
        trained: torch.nn.Module = normalized
    else:
        trained = model
    # With normalisation the inner model learns normalised data; otherwise the model is
    # trained as given (a user's NormalizedModel included) on the raw data.
    network = model

    params = [p for p in network.parameters() if p.requires_grad]
    num_params = _flat_size(params)
    optimizer = torch.optim.Adam(
        params, lr=settings["learning_rate"], weight_decay=settings["weight_decay"]
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=settings["lr_factor"],
        patience=settings["lr_patience"],
        min_lr=settings["min_learning_rate"],
    )
    history = TrainingHistory()
    best_state = _clone_state(trained)
    bad_epochs, start = 0, 0

    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if directory is not None and rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if resume:
        assert directory is not None
        restored = _restore(directory, trained, optimizer, scheduler, settings, comm)
        if restored is not None:
            start, history, best_state, bad_epochs = restored

    # Validation rows are fetched once: fixed chunks, shared among ranks.
    val_chunks = _split_chunks(0, num_val, settings["chunk_size"], size)
    val_positions = [
        np.concatenate([np.arange(a, b) for a, b in chunks] or [np.zeros(0, np.int64)])
        for chunks in val_chunks
    ]
    val_rows = torch.from_numpy(
        _fetch_rows(local, offsets, [val_index[p] for p in val_positions], comm)
    ).to(dtype=dtype, device=device)
    num_val_chunks = [len(c) for c in val_chunks]

    bar = tqdm(
        total=epochs,
        initial=min(start, epochs),
        desc="fit",
        unit="epoch",
        disable=not progress or rank != 0,
        leave=False,
    )
    try:
        for epoch in range(start, epochs):
            if history.stopped_early:
                break
            torch.manual_seed(_epoch_seed(seed, epoch))
            shuffle = np.random.default_rng([seed, epoch]).permutation(num_train)
            batches = [
                (b0, min(b0 + settings["batch_size"], num_train))
                for b0 in range(0, num_train, settings["batch_size"])
            ]
            plans = [_split_chunks(b0, b1, settings["chunk_size"], size) for b0, b1 in batches]
            positions = [
                np.concatenate(
                    [np.arange(a, b) for plan in plans for a, b in plan[r]]
                    or [np.zeros(0, np.int64)]
                )
                for r in range(size)
            ]
            epoch_order = train_index[shuffle]
            rows = _fetch_rows(local, offsets, [epoch_order[p] for p in positions], comm)
            data = torch.from_numpy(rows).to(dtype=dtype, device=device)
            network.train()
            losses: list[npt.NDArray[np.float64]] = []
            row = 0
            for (b0, b1), plan in zip(batches, plans, strict=True):
                mine = plan[rank]
                grads = np.zeros((len(mine), num_params + 1))
                for i, (a, b) in enumerate(mine):
                    chunk = data[row : row + b - a]
                    row += b - a
                    optimizer.zero_grad(set_to_none=True)
                    prediction = network(chunk[:, :num_inputs].reshape(-1, *input_shape))
                    prediction = prediction.reshape(b - a, -1)
                    squared = ((prediction - chunk[:, num_inputs:]) ** 2).sum()
                    (squared / ((b1 - b0) * num_outputs)).backward()
                    _write_grads(params, grads[i, :num_params])
                    grads[i, num_params] = squared.item()
                every = _gather_chunks(grads, [len(c) for c in plan], comm)
                _read_grads(params, every[:, :num_params].sum(axis=0))
                optimizer.step()
                losses.append(every[:, num_params])
            train_loss = float(np.concatenate(losses).sum()) / (num_train * num_outputs)

            network.eval()
            with torch.no_grad():
                sums = np.zeros((num_val_chunks[rank], 1))
                row = 0
                for i, (a, b) in enumerate(val_chunks[rank]):
                    chunk = val_rows[row : row + b - a]
                    row += b - a
                    prediction = network(chunk[:, :num_inputs].reshape(-1, *input_shape))
                    prediction = prediction.reshape(b - a, -1)
                    sums[i, 0] = ((prediction - chunk[:, num_inputs:]) ** 2).sum().item()
            val_loss = float(_gather_chunks(sums, num_val_chunks, comm).sum()) / (
                num_val * num_outputs
            )

            # Every rank holds the same losses: all raise together.
            if not np.isfinite(train_loss) or not np.isfinite(val_loss):
                raise FloatingPointError(
                    f"Training diverged in epoch {epoch}: training loss {train_loss}, "
                    f"validation loss {val_loss}. Lower the learning rate, or check the data."
                )
            history.learning_rate.append(float(optimizer.param_groups[0]["lr"]))
            history.train_loss.append(train_loss)
            history.val_loss.append(val_loss)
            scheduler.step(val_loss)
            if val_loss < history.best_val_loss * (1.0 - settings["min_delta"]):
                history.best_val_loss, history.best_epoch = val_loss, epoch
                best_state = _clone_state(trained)
                bad_epochs = 0
            else:
                bad_epochs += 1
            history.stopped_early = bad_epochs >= settings["patience"]
            done = history.stopped_early or epoch + 1 == epochs
            if directory is not None and ((epoch + 1) % checkpoint_every == 0 or done):
                _checkpoint(
                    directory,
                    epoch + 1,
                    trained,
                    optimizer,
                    scheduler,
                    settings,
                    history,
                    best_state,
                    bad_epochs,
                    metadata,
                    comm,
                )
            bar.update(1)
            lr = history.learning_rate[-1]
            bar.set_postfix(train=f"{train_loss:.3e}", val=f"{val_loss:.3e}", lr=f"{lr:.1e}")
            if callback is not None:
                callback(epoch, history)
    finally:
        bar.close()

    trained.load_state_dict(best_state)
    trained.eval()
    return FitResult(trained, history)


def _checkpoint(
    directory: Path,
    epochs_done: int,
    trained: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    settings: Mapping[str, Any],
    history: TrainingHistory,
    best_state: Mapping[str, torch.Tensor],
    bad_epochs: int,
    metadata: Mapping[str, Any] | None,
    comm: MPI.Comm,
) -> None:
    """Write the (model, state) pair of ``epochs_done``, then remove older pairs."""
    model_path, state_path = _checkpoint_paths(directory, epochs_done)
    info = {"training": {"epochs": epochs_done, "settings": dict(settings)}}
    digest = save_model(model_path, trained, metadata={**(metadata or {}), **info}, comm=comm)
    state = {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "epochs_done": epochs_done,
        "settings": json.dumps(dict(settings), sort_keys=True),
        "model_sha256": digest,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": dataclasses.asdict(history),
        "best_state": dict(best_state),
        "bad_epochs": bad_epochs,
    }

    def write() -> None:
        atomic_torch_save(state, state_path)
        for old in directory.iterdir():
            match = _CHECKPOINT.match(old.name)
            if match and int(match.group(1)) < epochs_done:
                for path in _checkpoint_paths(directory, int(match.group(1))):
                    path.unlink(missing_ok=True)

    on_rank_zero(comm, write, f"the checkpoint {os.fspath(state_path)!r}")


def _restore(
    directory: Path,
    trained: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    settings: Mapping[str, Any],
    comm: MPI.Comm,
) -> tuple[int, TrainingHistory, dict[str, torch.Tensor], int] | None:
    """Load the newest complete checkpoint into the training objects (collective)."""
    # Rank 0 chooses, so that every rank restores the same pair.
    choice: int | str | None = None
    if comm.rank == 0:
        try:
            latest = _latest_checkpoint(directory)
            choice = None if latest is None else latest[0]
        except ModelFileError as err:
            choice = str(err)
    choice = comm.bcast(choice, root=0)
    if isinstance(choice, str):
        raise ModelFileError(choice)
    if choice is None:
        return None
    error: str | None = None
    state: dict[str, Any] = {}
    try:
        model_path, state_path = _checkpoint_paths(directory, choice)
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        saved = json.loads(state["settings"])
        if saved != dict(settings):
            differ = ", ".join(
                f"{k}: {saved.get(k)!r} then, {settings.get(k)!r} now"
                for k in sorted(saved.keys() | settings.keys())
                if saved.get(k) != settings.get(k)
            )
            raise ValueError(
                f"The checkpoint {os.fspath(state_path)!r} was written with other data or "
                f"settings ({differ}); resume with the same ones, or start afresh in "
                "another folder."
            )
        weights = read_model_file(model_path).state_dict
        current = trained.state_dict()
        statistics = [k for k in current if "_normalization." in k and k in weights]
        if any(not torch.equal(weights[k], current[k].cpu()) for k in statistics):
            raise ValueError(
                f"The checkpoint {os.fspath(model_path)!r} was trained on other data: the "
                "statistics of the training split differ. Resume with the same data, or "
                "start afresh in another folder."
            )
        trained.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, OSError, RuntimeError, KeyError) as err:
        error = f"{type(err).__name__}: {err}"
    _agree(error, comm, "Resuming from the checkpoint")
    history = TrainingHistory(**state["history"])
    history.resumed_from = choice
    best_state = {k: v.clone() for k, v in state["best_state"].items()}
    return choice, history, best_state, int(state["bad_epochs"])
