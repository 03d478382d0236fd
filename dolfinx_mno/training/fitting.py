"""The entry point :func:`fit`: check, split, normalise, then run the training loop."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from mpi4py import MPI

import numpy.typing as npt
import torch

from dolfinx_mno.io import _check_json, architecture_config
from dolfinx_mno.spec import ClosureSpec, metadata_with_spec
from dolfinx_mno.training import optim
from dolfinx_mno.training.checkpoint import Checkpoints
from dolfinx_mno.training.loop import LoopSettings, Trainer
from dolfinx_mno.training.parallel import broadcast_weights
from dolfinx_mno.training.samples import (
    LocalSamples,
    SampleLayout,
    agree_on_samples,
    data_checksum,
    groups_digest,
    prepare_rows,
    split_fingerprint,
    split_samples,
)
from dolfinx_mno.training.state import TrainingHistory, check_min_delta
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
        "min_delta": check_min_delta(options["min_delta"]),
        "normalize": bool(options["normalize"]),
        "patience": check_integer(options["patience"], "patience", minimum=1),
        "seed": check_integer(options["seed"], "seed"),
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
        if not params:
            raise ValueError(
                f"The model ({type(model).__name__}) has no trainable parameters (none "
                "requires grad): there is nothing to fit."
            )
        if options["checkpoint_dir"] is not None:
            architecture_config(model)  # a checkpoint is a model file: it must be savable
        built = optim.build_from_options(params, options, settings)
        return cls(settings, samples, *built, metadata=metadata)

    def train(
        self,
        model: torch.nn.Module,
        layout: SampleLayout,
        options: Mapping[str, Any],
        comm: MPI.Comm,
    ) -> FitResult:
        """Split, normalise and train (collective; the checks are done and agreed)."""
        settings, samples = self.settings, self.samples
        if layout.groups is not None:
            settings["groups_sha256"] = groups_digest(layout.groups)
        normalize_targets = settings.get("normalize_targets", settings["normalize"])
        if options["checkpoint_dir"] is not None and not (
            settings["normalize"] and normalize_targets
        ):
            # Without both statistics (checked on resume) other data could resume silently.
            offset = int(layout.offsets[comm.rank])
            settings["data_checksum"] = data_checksum(samples.x, samples.y, offset, comm)
        split = split_samples(
            layout.num_samples, settings["validation_fraction"], settings["seed"], layout.groups
        )
        data = None
        if options["checkpoint_dir"] is not None:
            # Compared on resume: the best loss and early stopping belong to these data.
            offset = int(layout.offsets[comm.rank])
            data = split_fingerprint(samples.x, samples.y, offset, split, comm)
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
        trained, rows = prepare_rows(
            model,
            samples,
            split,
            layout.offsets,
            normalize_inputs=settings["normalize"],
            normalize_targets=settings.get("normalize_targets", settings["normalize"]),
            comm=comm,
        )
        loop = LoopSettings(
            epochs=int(options["epochs"]),
            **{
                k: settings[k]
                for k in ("batch_size", "chunk_size", "patience", "min_delta", "seed")
            },
        )
        trainer = Trainer(
            model,
            trained,
            rows,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            settings=loop,
            comm=comm,
            checkpoints=Checkpoints.from_options(
                options, settings=settings, metadata=self.metadata, comm=comm, data=data
            ),
            progress=options["progress"],
            callback=options["callback"],
        )
        return FitResult(trained, trainer.resume_and_train(options["resume"]).history)


def _agree(
    error: str | None, run: _Run | None, options: Mapping[str, Any], comm: MPI.Comm
) -> SampleLayout:
    """Every rank's verdict, samples and settings (collective; see :func:`agree_on_samples`).

    The settings compared are the run's and what a resume may change but the ranks must
    share (epochs, checkpoints).
    """
    if run is None:
        return agree_on_samples(error, None, comm)
    shared = {k: options[k] for k in ("epochs", "checkpoint_every", "resume")}
    return agree_on_samples(error, run.samples, comm, settings={**run.settings, **shared})


@torch.inference_mode(False)
@torch.enable_grad()  # training needs gradients whatever the caller's torch mode
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

    Collective on ``comm``. Each rank passes its own samples; the global data set is the
    concatenation of the ranks' samples in rank order (:func:`shard` cuts an array every
    rank holds into such blocks). Or every rank passes the same data file, a
    :class:`~dolfinx_mno.data.ClosureDataReader` (points) or
    :class:`~dolfinx_mno.data.GriddedDataReader` (fields), and reads its block of it
    (:func:`read_shard`). The result depends on the global data and the settings only,
    not on the number of ranks or how the samples are spread over them.

    Args:
        model: Maps ``(batch, num_inputs)`` to ``(batch, num_outputs)`` or
            ``(batch, *value_shape)``; with ``grid=True``, ``(batch, in_channels, *grid)``
            to ``(batch, out_channels, *grid)``. Trained in place, in its dtype and on its
            device, from rank 0's weights. It must be deterministic and act on each sample
            separately (no dropout, no batch norm) for rank-invariant results.
        inputs: This rank's samples ``(num_local_samples, num_inputs)`` (NumPy or torch,
            real; other sample shapes are flattened); with ``grid=True``, fields
            ``(num_local_samples, in_channels, *grid)``. Or a data reader (then no
            ``targets``): all complete samples of its file.
        targets: ``(num_local_samples, num_outputs)`` or ``(num_local_samples,
            *value_shape)``; with ``grid=True``, ``(num_local_samples, out_channels, *grid)``.
        comm: Communicator; default ``MPI.COMM_WORLD``.
        epochs: Maximum number of passes over the training split.
        batch_size: Samples per optimiser step (the last batch may be smaller).
        chunk_size: Samples per backward pass, the unit of work shared among ranks and of
            the fixed-order gradient sum (the result depends on it at rounding level).
        optimizer: Factory ``params -> torch.optim.Optimizer``; default Adam
            (:mod:`~dolfinx_mno.training.optim` documents the defaults and their options).
        scheduler: Factory ``optimizer -> LRScheduler`` or ``None``, stepped once per epoch
            after validation; default ``ReduceLROnPlateau`` on the validation loss.
        learning_rate: Of the default Adam (1e-3).
        weight_decay: Of the default Adam (0).
        lr_factor: Of the default schedule (0.5).
        lr_patience: Of the default schedule (10).
        min_learning_rate: Of the default schedule (1e-6).
        patience: Stop after this many epochs without a validation loss below
            ``best * (1 - min_delta)``; the best epoch's weights are restored, or the
            starting weights (their validation loss is measured first) if none beat them.
        min_delta: Relative improvement that counts for early stopping, in ``[0, 1)``.
        validation_fraction: Fraction of the global samples held out for validation.
        seed: Seeds the split, the epoch orders and torch's random state in each epoch
            (the caller's random state is restored on return).
        normalize: Wrap the model in a :class:`~dolfinx_mno.NormalizedModel` with the mean
            and standard deviation of the training split per input component (per input
            channel, pooled over the grid, with ``grid=True``).
        normalize_targets: Normalise the targets likewise (the loss is then the MSE of
            normalised targets); default: ``normalize``.
        grid: Samples are fields on a grid; default: true for gridded data only.
        groups: This rank's group id of each sample (with a reader, one per stored
            sample, the same on every rank), e.g. its trajectory: the split sends whole
            groups to validation.
        checkpoint_dir: Folder for checkpoints (see :mod:`~dolfinx_mno.training.checkpoint`
            for these four options and what a resumed run must keep).
        checkpoint_every: Epochs between checkpoints.
        resume: Continue from the newest complete checkpoint.
        metadata: JSON dict stored in the checkpoint model files.
        spec: The closure the model is trained for, stored in the checkpoint model files.
        progress: Show a tqdm progress bar (rank 0 only).
        callback: ``callback(epoch, history)`` after every epoch, on every rank.

    Returns:
        The trained model and the history.

    Raises:
        ValueError: Bad data or settings (on every rank, whichever rank found it), or a
            checkpoint written with other data or settings.
        ModelFileError: An unreadable checkpoint.
        FileExistsError, PermissionError: A fresh run in a ``checkpoint_dir`` holding
            checkpoints, or one not writable (on every rank, before training).
        FloatingPointError: NaN or Inf losses (on every rank); the model is left with
            the best weights so far, as after any error or interrupt during training.
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
    layout = _agree(error, run, options, comm)
    assert run is not None
    # The same global data and settings on every rank: all ranks raise here together.
    with torch.random.fork_rng(devices=[]):
        broadcast_weights(model, comm)  # the same starting weights everywhere: rank 0's
        return run.train(model, layout, options, comm)
