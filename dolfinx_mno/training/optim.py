"""The optimiser and the learning-rate schedule of a training run, injectable.

:func:`~dolfinx_mno.training.fit` takes factories, as neuraloperator's ``Trainer`` takes
objects: ``optimizer(params) -> torch.optim.Optimizer`` and
``scheduler(optimizer) -> LRScheduler`` (or ``None`` for a constant rate). The defaults
are Adam and :class:`~torch.optim.lr_scheduler.ReduceLROnPlateau` on the validation loss
(:func:`adam`, :func:`reduce_on_plateau`). The schedule is stepped once per epoch, after
validation (:func:`step_scheduler`).

The options of the defaults, the same in ``fit`` and ``fit_rollout`` (:func:`default_settings`;
giving one of them together with an injected factory is an error):

* ``learning_rate``: the initial rate of the default Adam (default 1e-3);
* ``weight_decay``: its weight decay (L2, default 0);
* ``lr_factor``: the default schedule multiplies the rate by this factor (default 0.5)
  when the validation loss has not improved (relative threshold 1e-4) for
  ``lr_patience`` epochs (default 10);
* ``min_learning_rate``: the default schedule's lower bound (default 1e-6).

A checkpoint stores both ``state_dict``; :func:`describe` records the class and
configuration of injected ones among the run's settings, so that resuming with another
optimiser or schedule is refused rather than silently mixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from dolfinx_mno.validation import check_integer

__all__ = [
    "DEFAULT_SETTINGS",
    "OptimizerFactory",
    "Scheduler",
    "SchedulerFactory",
    "adam",
    "build",
    "build_from_options",
    "default_settings",
    "describe",
    "reduce_on_plateau",
    "step_scheduler",
]

#: A learning-rate schedule: any torch scheduler (``ReduceLROnPlateau`` included).
Scheduler = LRScheduler | ReduceLROnPlateau
#: ``params -> optimizer``: builds the optimiser over the trained parameters.
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
#: ``optimizer -> scheduler``: builds the schedule of that optimiser (``None``: constant).
SchedulerFactory = Callable[[torch.optim.Optimizer], Scheduler | None]


def adam(learning_rate: float = 1e-3, weight_decay: float = 0.0) -> OptimizerFactory:
    """The default optimiser: :class:`torch.optim.Adam` with these settings."""

    def factory(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)

    return factory


def reduce_on_plateau(
    factor: float = 0.5, patience: int = 10, min_learning_rate: float = 1e-6
) -> SchedulerFactory:
    """The default schedule: :class:`~torch.optim.lr_scheduler.ReduceLROnPlateau`.

    On the validation loss (``mode="min"``, relative threshold 1e-4). A plateau schedule
    needs no total number of epochs, so a resumed run may raise ``epochs`` and early
    stopping may end a run at any epoch.
    """

    def factory(optimizer: torch.optim.Optimizer) -> Scheduler:
        return ReduceLROnPlateau(
            optimizer, mode="min", factor=factor, patience=patience, min_lr=min_learning_rate
        )

    return factory


def build(
    params: list[torch.nn.Parameter],
    optimizer: OptimizerFactory,
    scheduler: SchedulerFactory,
) -> tuple[torch.optim.Optimizer, Scheduler | None]:
    """Call the factories and check what they return (local).

    Raises:
        TypeError: The optimiser is not a :class:`torch.optim.Optimizer`, or the schedule
            not a torch scheduler of that optimiser.
        ValueError: The optimiser holds a tensor that is not one of ``params``.
    """
    built = optimizer(params)
    if not isinstance(built, torch.optim.Optimizer):
        raise TypeError(
            "optimizer must be a factory params -> torch.optim.Optimizer, e.g. "
            f"lambda params: torch.optim.SGD(params, lr=0.1); it returned {type(built).__name__}."
        )
    given = {id(p) for p in params}
    if any(id(p) not in given for group in built.param_groups for p in group["params"]):
        raise ValueError(
            "The optimizer factory built an optimiser over tensors it was not given; build "
            "it over the parameters passed to the factory."
        )
    schedule = scheduler(built)
    if schedule is not None and not isinstance(schedule, LRScheduler | ReduceLROnPlateau):
        raise TypeError(
            "scheduler must be a factory optimizer -> torch.optim.lr_scheduler.LRScheduler "
            f"(or None), e.g. lambda opt: StepLR(opt, 10); it returned {type(schedule).__name__}."
        )
    if schedule is not None and schedule.optimizer is not built:
        raise ValueError(
            "The scheduler factory built a schedule of another optimiser; build it on the "
            "optimiser passed to the factory."
        )
    return built, schedule


#: The settings of the default optimiser (:func:`adam`) and schedule
#: (:func:`reduce_on_plateau`) a training entry point takes, with their default values.
DEFAULT_SETTINGS: dict[str, dict[str, float | int]] = {
    "optimizer": {"learning_rate": 1e-3, "weight_decay": 0.0},
    "scheduler": {"lr_factor": 0.5, "lr_patience": 10, "min_learning_rate": 1e-6},
}


def default_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of the default optimiser and schedule that a run uses (local).

    Args:
        options: The entry point's arguments: ``optimizer`` and ``scheduler`` (a factory
            or ``None``) and every key of :data:`DEFAULT_SETTINGS` (a value, or ``None``
            for the default).

    Returns:
        ``{key: value}`` for the settings of the default optimiser if no ``optimizer``
        factory was given, and of the default schedule if no ``scheduler`` factory was
        given (an injected one is recorded by :func:`build_from_options`).

    Raises:
        ValueError: A setting of the default optimiser or schedule given together with an
            injected one (set it in the factory instead), a bad integer, or a NaN or Inf.
        TypeError: A non-integer ``lr_patience``.
    """
    settings: dict[str, Any] = {}
    for name, values in DEFAULT_SETTINGS.items():
        factory = options[name]
        given = sorted(k for k in values if options[k] is not None)
        if factory is not None and given:
            raise ValueError(
                f"{', '.join(given)} set(s) the default {name}, but {name}= was given: "
                f"set {'it' if len(given) == 1 else 'them'} in your {name} factory instead."
            )
        if factory is None:
            for key, default in values.items():
                value = default if options[key] is None else options[key]
                if isinstance(default, int):
                    settings[key] = check_integer(value, key)
                else:
                    settings[key] = type(default)(value)
                    if not math.isfinite(settings[key]):
                        # torch takes lr_factor=nan and then never lowers the rate.
                        raise ValueError(f"{key} must be a finite number, got {value}.")
    return settings


def build_from_options(
    params: list[torch.nn.Parameter], options: Mapping[str, Any], settings: dict[str, Any]
) -> tuple[torch.optim.Optimizer, Scheduler | None]:
    """The run's optimiser and schedule: the injected factories, or the defaults (local).

    Args:
        params: The trained parameters.
        options: As for :func:`default_settings`.
        settings: The run's settings, with those of :func:`default_settings`; an injected
            optimiser or schedule is recorded in it under ``"optimizer"`` or
            ``"scheduler"`` (:func:`describe`), so that resuming with another is refused.

    Raises:
        TypeError, ValueError: See :func:`build`.
    """
    optimizer, scheduler = options["optimizer"], options["scheduler"]
    if optimizer is None:
        optimizer = adam(settings["learning_rate"], settings["weight_decay"])
    if scheduler is None:
        scheduler = reduce_on_plateau(
            settings["lr_factor"], settings["lr_patience"], settings["min_learning_rate"]
        )
    built = build(params, optimizer, scheduler)
    for name, obj in zip(("optimizer", "scheduler"), built, strict=True):
        if options[name] is not None:
            settings[name] = describe(obj)
    return built


def step_scheduler(scheduler: Scheduler | None, val_loss: float) -> None:
    """Advance the schedule by one epoch (a plateau schedule sees the validation loss)."""
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()


def describe(obj: torch.optim.Optimizer | Scheduler | None) -> dict[str, Any]:
    """JSON description of an optimiser or schedule: its class and configuration.

    An optimiser is described by its ``defaults``; a schedule by its ``state_dict`` as
    built (before any step). Values JSON cannot hold are described by their type name.
    """
    if obj is None:
        return {"class": None}
    kind = type(obj)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(obj, torch.optim.Optimizer):
        return {"class": name, "defaults": _jsonable(obj.defaults)}
    return {"class": name, "state": _jsonable(obj.state_dict())}


def _jsonable(value: Any) -> Any:
    """``value`` as JSON data: non-finite floats as text, tensors as lists, others by type."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [_jsonable(v) for v in value]
    kind = type(value)
    return f"<{kind.__module__}.{getattr(value, '__qualname__', kind.__qualname__)}>"
