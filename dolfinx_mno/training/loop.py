"""The training loop: epochs of data-parallel minibatch steps, validation, early stopping.

:class:`EpochLoop` is the loop every training run shares, split as neuraloperator's
``Trainer`` is: :meth:`EpochLoop.train` runs the epochs, and :meth:`EpochLoop.end_epoch`
does the bookkeeping (history, schedule, best weights, early stopping, checkpoint,
progress, callback). Its subclasses say what an epoch is: :meth:`train_one_epoch` (one
pass over the training split, in optimiser steps of ``train_one_batch``) and
:meth:`validate` (the validation loss). :class:`Trainer` runs on rows prepared by
:func:`~dolfinx_mno.training.samples.prepare_rows` (a-priori, :func:`~dolfinx_mno.training.fit`);
:class:`~dolfinx_mno.training.aposteriori.RolloutTrainer` on windows of trajectories
(a-posteriori, :func:`~dolfinx_mno.training.fit_rollout`).

Each minibatch is cut into chunks of ``chunk_size`` samples, shared out among the ranks;
each chunk's gradient is computed on its own and the gradients are summed in chunk order
on every rank (:class:`~dolfinx_mno.training.parallel.ChunkGradients`), so the weights
do not depend on the number of ranks. Every epoch's order and torch random state depend
only on ``(seed, epoch)``, so a resumed run needs no saved random state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import torch
from tqdm.auto import tqdm

from dolfinx_mno._mpi import rank_local
from dolfinx_mno.torch_bridge import model_device, model_dtype
from dolfinx_mno.training.checkpoint import Checkpoints
from dolfinx_mno.training.optim import Scheduler, step_scheduler
from dolfinx_mno.training.parallel import (
    ChunkGradients,
    Chunks,
    chunk_positions,
    fetch_rows,
    gather_chunks,
    split_chunks,
)
from dolfinx_mno.training.samples import TrainingRows
from dolfinx_mno.training.state import TrainingHistory, TrainingState, clone_state

__all__ = ["EpochLoop", "EpochSettings", "LoopSettings", "Trainer", "epoch_seed"]


@dataclasses.dataclass(frozen=True)
class EpochSettings:
    """How long to train, when to stop, and the seed.

    Attributes:
        epochs: Maximum number of epochs (counted from 0, restored ones included).
        patience: Stop after this many epochs without improvement.
        min_delta: Relative improvement of the validation loss that counts.
        seed: Seeds each epoch's order and torch random state.
    """

    epochs: int
    patience: int
    min_delta: float
    seed: int


@dataclasses.dataclass(frozen=True)
class LoopSettings(EpochSettings):
    """:class:`EpochSettings` and the steps of :class:`Trainer`.

    Attributes:
        batch_size: Samples per optimiser step (the last batch of an epoch may be smaller).
        chunk_size: Samples per backward pass: the unit of work shared among ranks.
    """

    batch_size: int
    chunk_size: int


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch seed of ``epoch``: depends on ``(seed, epoch)`` only."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


class EpochLoop:
    """The epochs of a training run (collective): train, validate, record, stop, checkpoint.

    A subclass defines :meth:`train_one_epoch` and :meth:`validate`. Both must return the
    same losses on every rank, so that every rank takes the same decisions.

    Args:
        model: The module that is returned and checkpointed.
        optimizer: The optimiser of its trained parameters.
        scheduler: Its schedule, stepped once per epoch after validation, or ``None``.
        settings: Epochs, early stopping, seed.
        comm: The communicator.
        checkpoints: Where to write checkpoints, or ``None``.
        progress: Show a tqdm progress bar on rank 0.
        callback: ``callback(epoch, history)`` after every epoch, on every rank.
    """

    #: The progress bar's label.
    description = "fit"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: Scheduler | None,
        settings: EpochSettings,
        comm: MPI.Comm,
        checkpoints: Checkpoints | None = None,
        progress: bool = True,
        callback: Callable[[int, TrainingHistory], None] | None = None,
    ):
        self.model = model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.settings, self.comm = settings, comm
        self.checkpoints, self.progress, self.callback = checkpoints, progress, callback

    def resume_and_train(self, resume: bool) -> TrainingState:
        """:meth:`train`, from the newest checkpoint if ``resume`` (collective).

        Raises:
            ValueError: ``resume`` without checkpoints.
        """
        state = None
        if resume:
            if self.checkpoints is None:
                raise ValueError("resume=True needs a checkpoint folder (checkpoint_dir).")
            state = self.checkpoints.resume(
                model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
            )
        return self.train(state)

    def train(self, state: TrainingState | None = None) -> TrainingState:
        """Run the epochs from ``state`` (a fresh run by default) to the end (collective).

        Returns:
            The final state; the model holds the weights of the best epoch (or, if no
            epoch beat them, the starting weights), in eval mode.
        """
        if state is None:
            state = self.start()
        epochs, start = self.settings.epochs, state.history.epochs
        bar = tqdm(
            total=epochs,
            initial=min(start, epochs),
            desc=self.description,
            unit="epoch",
            disable=not self.progress or self.comm.rank != 0,
            leave=False,
        )
        try:
            for epoch in range(start, epochs):
                if state.history.stopped_early:
                    break
                train_loss = self.train_one_epoch(epoch)
                self.end_epoch(epoch, train_loss, self.validate(), state)
                bar.update(1)
                history = state.history
                bar.set_postfix(
                    train=f"{history.train_loss[-1]:.3e}",
                    val=f"{history.val_loss[-1]:.3e}",
                    lr=f"{history.learning_rate[-1]:.1e}",
                )
                if self.callback is not None:
                    # A callback that raises on some ranks only must not leave the others
                    # in the next epoch's collectives.
                    with rank_local(self.comm, f"The callback after epoch {epoch}"):
                        self.callback(epoch, history)
        except BaseException:
            # A diverged loss, a failing callback or Ctrl-C: leave the model with the best
            # weights so far (finite ones), not those of a half-done or diverged step.
            self.model.load_state_dict(state.best_state)
            self.model.eval()
            raise
        finally:
            bar.close()
        self.model.load_state_dict(state.best_state)
        self.model.eval()
        return state

    def start(self) -> TrainingState:
        """A fresh run's state: the starting weights are the best until an epoch beats them.

        Their validation loss is measured first (collective), so that training that only
        makes a model worse (a fine-tuning run with too large a step, say) returns the
        model it was given, not its first epoch. A NaN or Inf loss counts as ``inf``.
        """
        history = TrainingHistory()
        initial = float(self.validate())
        history.initial_val_loss = initial if np.isfinite(initial) else float("inf")
        history.best_val_loss = history.initial_val_loss
        return TrainingState(history, clone_state(self.model))

    def train_one_epoch(self, epoch: int) -> float:
        """One pass over the training split (collective); returns its training loss."""
        raise NotImplementedError

    def validate(self) -> float:
        """The validation loss (collective), the same on every rank."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, train_loss: float, val_loss: float, state: TrainingState):
        """Record the epoch, step the schedule, keep the best weights, checkpoint.

        Every rank holds the same losses, so every rank takes the same decisions.

        Raises:
            FloatingPointError: A loss is NaN or Inf (on every rank).
        """
        if not np.isfinite(train_loss) or not np.isfinite(val_loss):
            best = state.history.best_epoch
            kept = f"those of epoch {best}" if best >= 0 else "its starting ones"
            raise FloatingPointError(
                f"Training diverged in epoch {epoch}: training loss {train_loss}, "
                f"validation loss {val_loss}. Lower the learning rate, or check the data. "
                f"The model's weights were restored to {kept} (the best so far)."
            )
        learning_rate = float(self.optimizer.param_groups[0]["lr"])
        best = state.record(train_loss, val_loss, learning_rate, self.settings.min_delta)
        step_scheduler(self.scheduler, val_loss)
        if best:
            state.best_state = clone_state(self.model)
        state.history.stopped_early = state.bad_epochs >= self.settings.patience
        last = state.history.stopped_early or epoch + 1 == self.settings.epochs
        if self.checkpoints is not None and self.checkpoints.due(epoch + 1, last):
            self.checkpoints.save(
                epoch + 1,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                state=state,
            )


class Trainer(EpochLoop):
    """Train ``network`` on ``rows`` with an optimiser and a schedule (collective).

    Args:
        network: The module whose parameters are trained; it maps the rows' inputs (as
            ``(chunk, *rows.input_shape)``) to their targets.
        model: The module that is returned and checkpointed: ``network`` itself, or a
            :class:`~dolfinx_mno.NormalizedModel` around it.
        rows: The rows and the split (the same split on every rank).
        optimizer: The optimiser of ``network``'s trainable parameters.
        scheduler: Its schedule, stepped once per epoch, or ``None``.
        settings: Epochs, batches, early stopping, seed.
        comm: The communicator.
        checkpoints: Where to write checkpoints, or ``None``.
        progress: Show a tqdm progress bar on rank 0.
        callback: ``callback(epoch, history)`` after every epoch, on every rank.
    """

    settings: LoopSettings

    def __init__(
        self,
        network: torch.nn.Module,
        model: torch.nn.Module,
        rows: TrainingRows,
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: Scheduler | None,
        settings: LoopSettings,
        comm: MPI.Comm,
        checkpoints: Checkpoints | None = None,
        progress: bool = True,
        callback: Callable[[int, TrainingHistory], None] | None = None,
    ):
        super().__init__(
            model,
            optimizer=optimizer,
            scheduler=scheduler,
            settings=settings,
            comm=comm,
            checkpoints=checkpoints,
            progress=progress,
            callback=callback,
        )
        self.network, self.rows = network, rows
        self.dtype = model_dtype(network, torch.float64)
        self.device = model_device(network) or torch.device("cpu")
        self.gradients = ChunkGradients([p for p in network.parameters() if p.requires_grad])
        # Validation rows are fetched once: fixed chunks, shared among ranks.
        self.val_chunks = split_chunks(0, len(rows.val_index), settings.chunk_size, comm.size)
        self.val_rows = self._fetch([rows.val_index[chunk_positions([c])] for c in self.val_chunks])

    def _fetch(self, needed: list[npt.NDArray[np.int64]]) -> torch.Tensor:
        """Rows ``needed[rank]`` (global indices) as a tensor for the network (collective)."""
        rows = fetch_rows(self.rows.local, self.rows.offsets, needed, self.comm)
        return torch.from_numpy(rows).to(dtype=self.dtype, device=self.device)

    def _squared_error(self, chunk: torch.Tensor) -> torch.Tensor:
        """Sum of squared errors of the network on a chunk of rows."""
        num_inputs = self.rows.num_inputs
        prediction = self.network(chunk[:, :num_inputs].reshape(-1, *self.rows.input_shape))
        prediction = prediction.reshape(chunk.shape[0], -1)
        return ((prediction - chunk[:, num_inputs:]) ** 2).sum()

    def train_one_epoch(self, epoch: int) -> float:
        """One pass over the training split in the epoch's seeded order (collective).

        Returns:
            The mean squared error over the epoch's minibatches, as they were seen.
        """
        settings, rank, size = self.settings, self.comm.rank, self.comm.size
        torch.manual_seed(epoch_seed(settings.seed, epoch))
        num_train = len(self.rows.train_index)
        shuffle = np.random.default_rng([settings.seed, epoch]).permutation(num_train)
        batches = [
            (b0, min(b0 + settings.batch_size, num_train))
            for b0 in range(0, num_train, settings.batch_size)
        ]
        plans = [split_chunks(b0, b1, settings.chunk_size, size) for b0, b1 in batches]
        epoch_order = self.rows.train_index[shuffle]
        data = self._fetch(
            [epoch_order[chunk_positions([plan[r] for plan in plans])] for r in range(size)]
        )
        self.network.train()
        losses = []
        row = 0
        for (b0, b1), plan in zip(batches, plans, strict=True):
            count = sum(b - a for a, b in plan[rank])
            losses.append(self.train_one_batch(data[row : row + count], plan, b1 - b0))
            row += count
        return float(np.concatenate(losses).sum()) / (num_train * self.rows.num_outputs)

    def train_one_batch(
        self, rows: torch.Tensor, plan: list[Chunks], batch_size: int
    ) -> npt.NDArray[np.float64]:
        """One optimiser step on a minibatch (collective).

        Args:
            rows: This rank's rows of the minibatch, its chunks one after another.
            plan: The minibatch's chunks ``(a, b)`` of each rank.
            batch_size: Samples in the minibatch.

        Returns:
            The sum of squared errors of every chunk (all ranks'), in chunk order.
        """
        mine = plan[self.comm.rank]
        buffer = self.gradients.buffer(len(mine))
        row = 0
        # The model runs on this rank's chunks only: agree before the gradients' sum, so
        # that a model raising on one rank (batch norm on a one-row chunk) raises on all.
        with rank_local(self.comm, "Training on a minibatch"):
            for i, (a, b) in enumerate(mine):
                chunk = rows[row : row + b - a]
                row += b - a
                self.optimizer.zero_grad(set_to_none=True)
                squared = self._squared_error(chunk)
                (squared / (batch_size * self.rows.num_outputs)).backward()
                self.gradients.record(buffer[i], squared.item())
        losses = self.gradients.sum(buffer, [len(c) for c in plan], self.comm)
        self.optimizer.step()
        return losses

    def validate(self) -> float:
        """Mean squared error on the validation split (collective)."""
        self.network.eval()
        mine = self.val_chunks[self.comm.rank]
        sums = np.zeros((len(mine), 1))
        with torch.no_grad(), rank_local(self.comm, "Validating"):
            row = 0
            for i, (a, b) in enumerate(mine):
                sums[i, 0] = self._squared_error(self.val_rows[row : row + b - a]).item()
                row += b - a
        total = gather_chunks(sums, [len(c) for c in self.val_chunks], self.comm).sum()
        return float(total) / (len(self.rows.val_index) * self.rows.num_outputs)
