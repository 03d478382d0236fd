"""The entry point :func:`fit`: check, split, normalise, then run the training loop."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from mpi4py import MPI

import numpy.typing as npt
import torch

from dolfinx_mno.io import _check_json
from dolfinx_mno.spec import ClosureSpec, metadata_with_spec
from dolfinx_mno.training import optim
from dolfinx_mno.training.checkpoint import Checkpoints
from dolfinx_mno.training.loop import LoopSettings, Trainer
from dolfinx_mno.training.parallel import broadcast_weights
from dolfinx_mno.training.samples import (
    LocalSamples,
    agree_on_samples,
    groups_digest,
    prepare_rows,
    split_samples,
)
from dolfinx_mno.training.state import TrainingHistory
from dolfinx_mno.validation import check_integer

if TYPE_CHECKING:
    from dolfinx_mno.data.storage import ClosureDataReader, GriddedDataReader

__all__ = ["FitResult", "fit"]


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` and :func:`~dolfinx_mno.training.fit_rollout` return.

    Attributes:
        model: The trained model with the weights of the best validation epoch, in eval
            mode. For ``fit``: a :class:`~dolfinx_mno.NormalizedModel` around the given
            model if ``normalize`` or ``normalize_targets`` was true, else the given model
            itself; for ``fit_rollout``: the closure's model, trained in place.
        history: The losses per epoch.
    """

    model: torch.nn.Module
    history: TrainingHistory


def _settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings (JSON; compared on resume) from ``fit``'s arguments.

    The settings of the default optimiser and schedule are recorded only when those are
    used (injected ones are described by :meth:`_Run.check`). Options away from their
    defaults only enter the settings, so that checkpoints of runs without them still
    resume.

    Raises:
        ValueError: Settings of the default optimiser or schedule given with an injected
            one, or out-of-range values.
    """
    settings: dict[str, Any] = {
        "batch_size": check_integer(options["batch_size"], "batch_size", minimum=1),
        "chunk_size": check_integer(options["chunk_size"], "chunk_size", minimum=1),
        "min_delta": float(options["min_delta"]),
        "normalize": bool(options["normalize"]),
        "patience": check_integer(options["patience"], "patience", minimum=1),
        "seed": int(options["seed"]),
        "validation_fraction": float(options["validation_fraction"]),
    }
    settings.update(optim.default_settings(options))
    check_integer(options["epochs"], "epochs")
    check_integer(options["checkpoint_every"], "checkpoint_every", minimum=1)
    if not 0.0 < settings["validation_fraction"] < 1.0:
        raise ValueError(
            f"validation_fraction must be in (0, 1), got {options['validation_fraction']}."
        )
    normalize_targets = options["normalize_targets"]
    if normalize_targets is not None and bool(normalize_targets) != settings["normalize"]:
        settings["normalize_targets"] = bool(normalize_targets)
    return dict(sorted(settings.items()))


@dataclasses.dataclass
class _Run:
    """What one rank checked before any collective: settings, samples, optimiser."""

    settings: dict[str, Any]
    samples: LocalSamples
    optimizer: torch.optim.Optimizer
    scheduler: optim.Scheduler | None
    metadata: dict[str, Any]  # of the checkpoint model files, the spec included

    @classmethod
    def check(
        cls, model: torch.nn.Module, inputs: Any, targets: Any, options: Mapping[str, Any]
    ) -> _Run:
        """Check ``fit``'s arguments on this rank, read its samples, build the optimiser."""
        settings = _settings(options)
        if options["resume"] and options["checkpoint_dir"] is None:
            raise ValueError("resume=True needs a checkpoint_dir.")
        metadata = metadata_with_spec(options["metadata"], options["spec"])
        _check_json(metadata, "metadata")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        samples = LocalSamples(
            model,
            inputs,
            targets,
            grid=options["grid"],
            groups=options["groups"],
            comm=options["comm"],
        )
        params = [p for p in model.parameters() if p.requires_grad]
        built = optim.build_from_options(params, options, settings)
        return cls(settings, samples, *built, metadata=metadata)


def fit(
    model: torch.nn.Module,
    inputs: npt.ArrayLike | torch.Tensor | ClosureDataReader | GriddedDataReader,
    targets: npt.ArrayLike | torch.Tensor | None = None,
    *,
    comm: MPI.Comm | None = None,
    epochs: int = 500,
    batch_size: int = 256,
    chunk_size: int = 64,
    optimizer: optim.OptimizerFactory | None = None,
    scheduler: optim.SchedulerFactory | None = None,
    learning_rate: float | None = None,
    weight_decay: float | None = None,
    lr_factor: float | None = None,
    lr_patience: int | None = None,
    min_learning_rate: float | None = None,
    patience: int = 30,
    min_delta: float = 0.0,
    validation_fraction: float = 0.2,
    seed: int = 0,
    normalize: bool = True,
    normalize_targets: bool | None = None,
    grid: bool | None = None,
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
    every rank holds into such blocks). Or every rank passes the same data file, as a
    :class:`~dolfinx_mno.data.ClosureDataReader` (points) or
    :class:`~dolfinx_mno.data.GriddedDataReader` (fields), and reads its block of the
    stored samples (:func:`read_shard`). The result depends on the global data and the
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
            the model in that shape. Or a data reader (on every rank; then no
            ``targets``): all complete samples of its file, inputs and targets.
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
        optimizer: Factory ``params -> torch.optim.Optimizer``, called with the list of
            the model's trainable parameters, e.g.
            ``lambda params: torch.optim.SGD(params, lr=0.1)``. Default: Adam with
            ``learning_rate`` and ``weight_decay``.
        scheduler: Factory ``optimizer -> LRScheduler`` (or ``None``, a constant rate),
            e.g. ``lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10)``, stepped once
            per epoch after validation (a ``ReduceLROnPlateau`` with the validation loss).
            Default: ``ReduceLROnPlateau`` with ``lr_factor``, ``lr_patience`` and
            ``min_learning_rate``.
        learning_rate: Initial learning rate of the default Adam (default 1e-3).
        weight_decay: Weight decay (L2) of the default Adam (default 0).
        lr_factor: Factor of the default schedule, applied when the validation loss has
            not improved (relative threshold 1e-4) for ``lr_patience`` epochs (default
            0.5).
        lr_patience: See ``lr_factor`` (default 10).
        min_learning_rate: Lower bound of the default schedule's rate (default 1e-6).
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
            Default: false for arrays and closure data, true for gridded data.
        groups: This rank's group id of each sample, integers of shape
            ``(num_local_samples,)``, e.g. the trajectory a snapshot comes from; with a
            reader, one id per stored sample of the file, ``(reader.num_samples,)``, the
            same on every rank. The split then sends whole groups to validation
            (``round(validation_fraction * num_groups)`` of the distinct ids, seeded), so
            that no group is on both sides. A group's samples may be spread over ranks.
        checkpoint_dir: Folder for checkpoints (created by rank 0); ``None`` for none.
        checkpoint_every: Write a checkpoint every this many epochs, and at the end.
        resume: Continue from the newest complete checkpoint in ``checkpoint_dir`` (if
            there is none, start afresh). The data and every setting but ``epochs``,
            ``checkpoint_every``, ``metadata``, ``spec``, ``progress`` and ``callback`` must be
            those of the interrupted run: other settings (injected optimisers and
            schedules by class and configuration), another number of samples, other
            groups or (with ``normalize``) other statistics of the training split are
            refused.
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
    options = dict(locals())  # the arguments, for the settings
    # Local checks first; every rank learns of a failure on any rank (one allgather).
    error: str | None = None
    run: _Run | None = None
    try:
        run = _Run.check(model, inputs, targets, options)
    except Exception as err:  # the model's probe and the factories may raise anything
        error = f"{type(err).__name__}: {err}"
    layout = agree_on_samples(error, None if run is None else run.samples, comm)
    assert run is not None
    settings, samples = run.settings, run.samples
    # The same global data and settings on every rank: all ranks raise here together.
    if layout.groups is not None:
        settings["groups_sha256"] = groups_digest(layout.groups)
    split = split_samples(
        layout.num_samples, settings["validation_fraction"], settings["seed"], layout.groups
    )
    settings.update(
        num_samples=layout.num_samples,
        num_inputs=samples.x.shape[1],
        num_outputs=samples.y.shape[1],
    )
    if samples.grid:
        settings.update(
            grid=True,
            input_shape=list(samples.input_shape),
            target_shape=list(samples.target_shape),
        )

    with torch.random.fork_rng(devices=[]):
        broadcast_weights(model, comm)  # the same starting weights everywhere: rank 0's
        trained, rows = prepare_rows(
            model,
            samples,
            split,
            layout.offsets,
            normalize_inputs=settings["normalize"],
            normalize_targets=settings.get("normalize_targets", settings["normalize"]),
            comm=comm,
        )
        checkpoints = Checkpoints.in_folder(
            checkpoint_dir,
            every=checkpoint_every,
            settings=settings,
            metadata=run.metadata,
            comm=comm,
        )
        trainer = Trainer(
            model,
            trained,
            rows,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            settings=LoopSettings(
                epochs=int(epochs),
                batch_size=settings["batch_size"],
                chunk_size=settings["chunk_size"],
                patience=settings["patience"],
                min_delta=settings["min_delta"],
                seed=settings["seed"],
            ),
            comm=comm,
            checkpoints=checkpoints,
            progress=progress,
            callback=callback,
        )
        return FitResult(trained, trainer.resume_and_train(resume).history)
