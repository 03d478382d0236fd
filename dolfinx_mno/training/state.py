"""What a training run carries from epoch to epoch: the history and the early-stopping state.

:class:`TrainingState` is everything a checkpoint must hold besides the weights and the
optimiser's and scheduler's ``state_dict``: restoring it continues a run exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

__all__ = ["TrainingHistory", "TrainingState", "clone_state"]


@dataclasses.dataclass
class TrainingHistory:
    """Per-epoch record of a :func:`~dolfinx_mno.training.fit` run (epochs counted from 0).

    Attributes:
        train_loss: Mean squared error of the normalised training targets, averaged over
            the epoch's minibatches as they were seen (before each step).
        val_loss: Mean squared error of the normalised validation targets after the
            epoch.
        learning_rate: Learning rate used in the epoch (of the optimiser's first
            parameter group).
        best_epoch: The epoch whose weights the run returns: the last epoch whose
            validation loss was below ``best * (1 - min_delta)``, ``best`` being the
            loss of the best epoch before it (or ``initial_val_loss``). With
            ``min_delta=0`` (the default) the epoch of the lowest validation loss (the
            first, on ties); with ``min_delta > 0`` a later epoch may have a lower loss
            that did not improve by enough to count. -1: no epoch beat the starting
            weights (their loss is ``initial_val_loss``), so they are the best.
        best_val_loss: The validation loss of ``best_epoch``.
        initial_val_loss: Validation loss of the weights the run started from, measured
            before the first epoch (``inf`` if it was NaN or Inf); ``None`` for a run
            restored from a checkpoint written before it existed.
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
    initial_val_loss: float | None = None

    @property
    def epochs(self) -> int:
        """Number of epochs run (restored ones included)."""
        return len(self.val_loss)


@dataclasses.dataclass
class TrainingState:
    """The state of a run between two epochs, besides weights, optimiser and scheduler.

    Attributes:
        history: The losses so far; ``history.epochs`` is the number of epochs done.
        best_state: CPU copy of the trained model's ``state_dict`` at the best epoch.
        bad_epochs: Epochs since the last improvement of the validation loss.
    """

    history: TrainingHistory
    best_state: dict[str, torch.Tensor]
    bad_epochs: int = 0

    def record(
        self, train_loss: float, val_loss: float, learning_rate: float, min_delta: float
    ) -> bool:
        """Append an epoch's losses; returns whether it is the best epoch so far.

        An epoch is the best if its validation loss is below ``best * (1 - min_delta)``;
        otherwise ``bad_epochs`` counts it.
        """
        history = self.history
        epoch = history.epochs
        history.learning_rate.append(learning_rate)
        history.train_loss.append(train_loss)
        history.val_loss.append(val_loss)
        if val_loss < history.best_val_loss * (1.0 - min_delta):
            history.best_val_loss, history.best_epoch = val_loss, epoch
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the tensors of ``model.state_dict()``."""
    return {
        k: v.detach().cpu().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }


def check_min_delta(value: Any) -> float:
    """``min_delta`` as a float in ``[0, 1)``.

    A NaN, a value of 1 or more (no loss is below ``best * (1 - min_delta)``) or a negative
    one (a worse loss counts as an improvement) would make early stopping silently keep
    the starting weights, or the worst ones.

    Raises:
        ValueError: ``value`` is not a number in ``[0, 1)``.
    """
    delta = float(value)
    if not (math.isfinite(delta) and 0.0 <= delta < 1.0):
        raise ValueError(
            f"min_delta must be in [0, 1) (a relative improvement), got {value}: with it "
            "no epoch, or every epoch, would count as an improvement."
        )
    return delta
