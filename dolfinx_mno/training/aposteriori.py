"""A-posteriori ("solver in the loop") training: a closure fitted through rollouts.

A-priori training (:func:`~dolfinx_mno.training.fit`) fits a closure to the filtered fine
solution one state at a time: the closure never sees its own errors accumulate, which is
the main reason learned closures lose accuracy and stability when they run (Kochkov et
al. 2021, https://arxiv.org/abs/2102.01010; Um et al. 2020, "solver in the loop",
https://arxiv.org/abs/2007.00016; Frezat et al. 2022, JAMES). :func:`fit_rollout` trains
the closure's model through ``horizon`` steps of the coarse solver instead, with the
gradients of :class:`~dolfinx_mno.rollout.Rollout` (the discrete adjoint of the steps).

The stages, in the order the data flows:

* :mod:`~dolfinx_mno.training.trajectories`: the data, one rank's checked trajectories
  and their windows (a window is a start ``s`` of one trajectory: the initial state
  ``traj[s]`` and the targets ``traj[s+1], ..., traj[s+k]``, ``k`` the horizon), and the
  split.
* :class:`APrioriLoss`: the optional a-priori term on samples at quadrature points.
* :class:`RolloutObjective`: the loss of a minibatch of windows (plus the a-priori term)
  and its gradient, summed over ranks.
* :class:`RolloutTrainer`: the epochs (an :class:`~dolfinx_mno.training.loop.EpochLoop`:
  validation, schedule, early stopping, checkpoints and progress as in ``fit``).
* :func:`fit_rollout`: the entry point (checks on every rank, then the run).

The model stays in eval mode throughout: the rollout calls it directly (closures refuse a
model in training mode), and models with dropout or batch normalisation are out of scope.
See ``docs/training.md``, section "A-posteriori training: through the solver".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from mpi4py import MPI

import numpy as np
import torch

from dolfinx_mno._mpi import agree_on, rank_local
from dolfinx_mno.closure import Closure
from dolfinx_mno.io import _check_json, architecture_config
from dolfinx_mno.rollout import Rollout, allreduce_gradients, squared_distance
from dolfinx_mno.spec import metadata_with_spec
from dolfinx_mno.training import optim
from dolfinx_mno.training.checkpoint import Checkpoints
from dolfinx_mno.training.fitting import FitResult
from dolfinx_mno.training.loop import EpochLoop, EpochSettings, epoch_seed
from dolfinx_mno.training.parallel import broadcast_weights
from dolfinx_mno.training.samples import LocalSamples
from dolfinx_mno.training.state import TrainingHistory, check_min_delta
from dolfinx_mno.training.trajectories import (
    Trajectory,
    TrajectoryWindows,
    Window,
    split_windows,
)
from dolfinx_mno.validation import check_integer

__all__ = [
    "APrioriLoss",
    "RolloutObjective",
    "RolloutSettings",
    "RolloutTrainer",
    "fit_rollout",
]


class APrioriLoss:
    r"""The a-priori loss ``Σ ‖m(x_i) − y_i‖² / Σ ‖y_i‖²`` over every rank's samples.

    The samples are pairs (operands, closure value) at quadrature points, as
    :func:`~dolfinx_mno.training.fit` takes them (each rank its own, any number,
    none included). The loss is relative to the targets' squared norm, so that it is of
    order one like the rollout loss.

    Args:
        closure: The closure whose model is trained; its input width and value size are
            the samples'.
        inputs: This rank's inputs, ``(num_local_samples, num_inputs)``.
        targets: This rank's targets, ``(num_local_samples, *value_shape)`` or
            ``(num_local_samples, prod(value_shape))``.
        comm: The communicator.

    Raises:
        TypeError, ValueError: Samples that are not real and finite, of other widths than
            the closure's, or of different numbers (local checks).
    """

    def __init__(self, closure: Closure, inputs: Any, targets: Any, comm: MPI.Comm):
        model = closure.model
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else np.shape(inputs)
        if len(shape) != 2 or shape[1] != closure.num_inputs:
            raise ValueError(
                f"The a-priori inputs have shape {shape}; closure '{closure.name}' takes "
                f"(num_samples, {closure.num_inputs}) (its model inputs)."
            )
        # Checks values and counts, and the targets' width against the model's outputs.
        samples = LocalSamples(model, inputs, targets, grid=False, groups=None, comm=comm)
        self.model, self.comm = model, comm
        self.inputs = torch.from_numpy(samples.x).to(closure.model_dtype).to(closure.device)
        self.targets = torch.from_numpy(samples.y).to(closure.model_dtype).to(closure.device)
        self.num_samples = samples.x.shape[0]
        #: ``Σ ‖y_i‖²`` over every rank's samples (set by :meth:`set_scale`).
        self.scale = float("nan")

    def local_squared_norm(self) -> float:
        """``Σ ‖y_i‖²`` over this rank's samples."""
        return float((self.targets.double() ** 2).sum())

    def set_scale(self, squared_norm: float) -> None:
        """Set the global ``Σ ‖y_i‖²`` (the same on every rank)."""
        self.scale = squared_norm

    def _local_loss(self) -> torch.Tensor:
        prediction = self.model(self.inputs).reshape(self.num_samples, -1)
        return ((prediction - self.targets) ** 2).sum().double() / self.scale

    def loss_and_gradient(self, parameters: Sequence[torch.Tensor]) -> tuple[float, list[Any]]:
        """The loss and its gradient with respect to ``parameters``, summed over ranks.

        Collective: one ``Allreduce`` of the local loss and gradients, so the result is
        the same on every rank and, up to rounding, on any spread of the samples.

        Returns:
            The loss and one gradient per parameter (its shape, dtype and device).
        """
        with rank_local(self.comm, "The a-priori term's gradient"):
            local = self._local_loss()
            gradients = list(torch.autograd.grad(local, list(parameters), materialize_grads=True))
        summed = [*gradients, local.detach().reshape(1)]
        allreduce_gradients(summed, self.comm)
        return float(summed[-1]), gradients


# -- the objective ---------------------------------------------------------------------------


class RolloutObjective:
    r"""The a-posteriori loss of a minibatch of windows, and its gradient (collective).

    For a minibatch ``B`` of windows ``w`` with initial state ``t_0^w`` and targets
    ``t_1^w .. t_k^w``, and ``u_n^w(θ)`` the rollout's states from ``t_0^w``::

        J(θ) = 1/|B| Σ_{w ∈ B} Σ_{n=1}^{k} ‖u_n^w(θ) − t_n^w‖² / S  +  λ J_prior(θ)

    with ``‖·‖`` the Euclidean norm of the dofs (over all ranks), ``S`` the mean over the
    training windows of ``Σ_n ‖t_n^w‖²`` (one constant, so the loss is relative and of
    order one), and ``λ J_prior`` the optional a-priori term (:class:`APrioriLoss`).

    Args:
        rollout: The rollout that contains ``closure``.
        closure: The closure whose model is trained.
        horizon: The number of target states ``k`` of a window.
        scale: ``S``, the same on every rank.
        a_priori: The a-priori term, or ``None``.
        a_priori_weight: ``λ``.
        target_interval: Coarse steps between consecutive states of a trajectory.
    """

    def __init__(
        self,
        rollout: Rollout,
        closure: Closure,
        *,
        horizon: int,
        scale: float,
        a_priori: APrioriLoss | None = None,
        a_priori_weight: float = 0.0,
        target_interval: int = 1,
    ):
        self.rollout, self.closure, self.horizon, self.scale = rollout, closure, horizon, scale
        self.target_interval = target_interval
        self.a_priori, self.a_priori_weight = a_priori, a_priori_weight
        self.parameters = [p for p in closure.model.parameters() if p.requires_grad]
        stepper = rollout.stepper
        self.t0, self.dt = float(stepper.t), float(stepper.dt)

    @contextlib.contextmanager
    def _at_start_of(self, window: Window) -> Iterator[None]:
        """The stepper at the window's start time ``t0 + s m dt``, restored afterwards.

        ``t0`` is the window's trajectory's start time if it has one, else the stepper's
        time when the objective was built.
        """
        stepper = self.rollout.stepper
        saved = stepper.t
        origin = self.t0 if window.origin is None else window.origin
        stepper.t = origin + window.start * self.target_interval * self.dt
        try:
            yield
        finally:
            stepper.t = saved
            if stepper.time is not None:
                stepper.time.value = saved  # type: ignore[assignment]

    def window_loss(self, window: Window) -> float:
        """``Σ_n ‖u_n − t_n‖² / S`` of one window, without gradients (collective)."""
        with self._at_start_of(window), torch.no_grad():
            m = self.target_interval
            older = list(window.older) if window.older else None
            states = self.rollout.run(window.initial, self.horizon * m, older=older)[m - 1 :: m]
            distance = squared_distance(states, list(window.targets), self.rollout.comm)
            return float(distance) / self.scale

    def rollout_loss(self, windows: Sequence[Window]) -> float:
        """The rollout part of ``J``: the mean of :meth:`window_loss` (collective)."""
        return sum(self.window_loss(w) for w in windows) / len(windows)

    def gradient(self, windows: Sequence[Window]) -> tuple[float, float, list[torch.Tensor]]:
        """``J`` on a minibatch and ``∂J/∂θ``, the same on every rank (collective).

        Returns:
            The rollout part of ``J``, the a-priori loss ``J_prior`` (``0.0`` without one;
            ``J`` is the first plus ``λ`` times the second), and the gradient of ``J``
            for each trained parameter.
        """
        total = [torch.zeros_like(p) for p in self.parameters]
        rollout_part = 0.0
        for window in windows:
            with self._at_start_of(window):
                result = self.rollout.gradient(
                    window.initial,
                    list(window.targets),
                    num_steps=self.horizon * self.target_interval,
                    closures=[self.closure],
                    target_interval=self.target_interval,
                    older=list(window.older) if window.older else None,
                )
            weight = 1.0 / (self.scale * len(windows))
            rollout_part += result.loss * weight
            for summed, gradient in zip(total, result.parameters[0], strict=True):
                summed.add_(gradient, alpha=weight)
        a_priori_part = 0.0
        if self.a_priori is not None:
            a_priori_part, gradients = self.a_priori.loss_and_gradient(self.parameters)
            for summed, gradient in zip(total, gradients, strict=True):
                summed.add_(gradient, alpha=self.a_priori_weight)
        return rollout_part, a_priori_part, total


# -- the loop --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutSettings(EpochSettings):
    """:class:`~dolfinx_mno.training.loop.EpochSettings` and the minibatch size.

    Attributes:
        batch_size: Windows per optimiser step (the last batch of an epoch may be smaller).
    """

    batch_size: int


class RolloutTrainer(EpochLoop):
    """Epochs of minibatches of windows through the solver (collective).

    Each epoch visits the training windows in an order that depends only on
    ``(seed, epoch)``; each minibatch is one optimiser step with the gradient of
    :class:`RolloutObjective` (already the same on every rank). The validation loss is the
    rollout part of the objective on the validation windows.

    Args:
        objective: The loss and its gradient.
        train: The training windows.
        val: The validation windows.
        optimizer: The optimiser of the objective's parameters.
        scheduler: Its schedule, or ``None``.
        settings: Epochs, minibatches, early stopping, seed.
        comm: The communicator.
        checkpoints: Where to write checkpoints, or ``None``.
        progress: Show a tqdm progress bar on rank 0.
        callback: ``callback(epoch, history)`` after every epoch, on every rank.
    """

    description = "fit_rollout"
    settings: RolloutSettings

    def __init__(
        self,
        objective: RolloutObjective,
        train: Sequence[Window],
        val: Sequence[Window],
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: optim.Scheduler | None,
        settings: RolloutSettings,
        comm: MPI.Comm,
        checkpoints: Checkpoints | None = None,
        progress: bool = True,
        callback: Callable[[int, TrainingHistory], None] | None = None,
    ):
        super().__init__(
            objective.closure.model,
            optimizer=optimizer,
            scheduler=scheduler,
            settings=settings,
            comm=comm,
            checkpoints=checkpoints,
            progress=progress,
            callback=callback,
        )
        self.objective, self.train_windows, self.val_windows = objective, list(train), list(val)

    def train_one_epoch(self, epoch: int) -> float:
        """One pass over the training windows in the epoch's seeded order (collective).

        Returns:
            The objective ``J`` averaged over the epoch's windows, each minibatch's as it
            was seen (before its step).
        """
        seed, batch_size = self.settings.seed, self.settings.batch_size
        torch.manual_seed(epoch_seed(seed, epoch))
        num_train = len(self.train_windows)
        order = np.random.default_rng([seed, epoch]).permutation(num_train)
        total = 0.0
        for b0 in range(0, num_train, batch_size):
            batch = [self.train_windows[i] for i in order[b0 : b0 + batch_size]]
            total += self.train_one_batch(batch) * len(batch)
        return total / num_train

    def train_one_batch(self, windows: Sequence[Window]) -> float:
        """One optimiser step on a minibatch of windows (collective); returns its ``J``."""
        objective = self.objective
        self.optimizer.zero_grad(set_to_none=True)
        rollout_part, a_priori_part, gradients = objective.gradient(windows)
        for parameter, gradient in zip(objective.parameters, gradients, strict=True):
            parameter.grad = gradient
        self.optimizer.step()
        return rollout_part + objective.a_priori_weight * a_priori_part

    def validate(self) -> float:
        """The rollout loss on the validation windows (collective)."""
        return self.objective.rollout_loss(self.val_windows)


# -- the entry point -------------------------------------------------------------------------


def _settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings (JSON; compared on resume), checked (local)."""
    settings: dict[str, Any] = {
        "batch_size": check_integer(options["batch_size"], "batch_size", minimum=1),
        "horizon": check_integer(options["horizon"], "horizon", minimum=1),
        "min_delta": check_min_delta(options["min_delta"]),
        "patience": check_integer(options["patience"], "patience", minimum=1),
        "seed": check_integer(options["seed"], "seed"),
        "stride": check_integer(options["stride"], "stride", minimum=1),
        "target_interval": check_integer(options["target_interval"], "target_interval", minimum=1),
    }
    settings.update(optim.default_settings(options))
    check_integer(options["epochs"], "epochs")
    check_integer(options["checkpoint_every"], "checkpoint_every", minimum=1)
    fraction = options["validation_fraction"]
    if options["validation"] is None and options["validation_start_times"] is not None:
        raise ValueError(
            "validation_start_times are the start times of validation trajectories, but none "
            "were given: pass validation=..., or leave validation_start_times out."
        )
    if options["validation"] is not None and fraction is not None:
        raise ValueError(
            "validation_fraction splits the training windows, but validation trajectories "
            "were given: leave validation_fraction out."
        )
    if options["validation"] is None:
        fraction = 0.2 if fraction is None else float(fraction)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {options['validation_fraction']}."
            )
        settings["validation_fraction"] = fraction
    weight = options["a_priori_weight"]
    if options["a_priori"] is None and weight is not None:
        raise ValueError("a_priori_weight was given without a_priori samples: give both.")
    if options["a_priori"] is not None:
        weight = 1.0 if weight is None else float(weight)
        if not (np.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"a_priori_weight must be finite and ≥ 0, got {weight}.")
        settings["a_priori_weight"] = weight
    if options["resume"] and options["checkpoint_dir"] is None:
        raise ValueError("resume=True needs a checkpoint_dir.")
    return settings


@dataclasses.dataclass
class _Run:
    """What one rank checked before any collective: settings, data, optimiser."""

    settings: dict[str, Any]
    closure: Closure
    train: TrajectoryWindows
    val: TrajectoryWindows | None
    a_priori: APrioriLoss | None
    optimizer: torch.optim.Optimizer
    scheduler: optim.Scheduler | None
    metadata: dict[str, Any]

    @classmethod
    def check(cls, rollout: Rollout, trajectories: Any, options: Mapping[str, Any]) -> _Run:
        """Check ``fit_rollout``'s arguments on this rank and build the optimiser (local)."""
        if not isinstance(rollout, Rollout):
            raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}.")
        settings = _settings(options)
        closure = options["closure"]
        names = [c.name for c in rollout.closures]
        if closure is None:
            if len(rollout.closures) != 1:
                raise ValueError(
                    f"The rollout has the closures {names}: choose the one to train with closure=."
                )
            closure = rollout.closures[0]
        elif not any(closure is c for c in rollout.closures):
            raise ValueError(
                f"Closure '{getattr(closure, 'name', closure)}' is not in the rollout's step; "
                f"train one of its closures {names}."
            )
        parameters = [p for p in closure.model.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError(
                f"The model of closure '{closure.name}' has no trainable parameters: nothing "
                "to train (set requires_grad on its parameters, or train another closure)."
            )
        metadata = _check_json(metadata_with_spec(options["metadata"], closure.spec), "metadata")
        if options["checkpoint_dir"] is not None:
            architecture_config(closure.model)  # a checkpoint is a model file: it must be savable
        if rollout.num_older and settings["target_interval"] != 1:
            raise ValueError(
                f"The rollout's stepper keeps {rollout.num_older} older state(s) u_(n-1), ...: "
                "a window starts from the trajectory's states one coarse step apart, so the "
                f"trajectories must hold every coarse step (target_interval=1, got "
                f"{settings['target_interval']})."
            )
        windows = {
            "horizon": settings["horizon"],
            "stride": settings["stride"],
            "num_owned": rollout.num_owned,
            "num_older": rollout.num_older,
        }
        train = TrajectoryWindows(
            trajectories, what="trajectory", start_times=options["start_times"], **windows
        )
        val = None
        if options["validation"] is not None:
            val = TrajectoryWindows(
                options["validation"],
                what="validation trajectory",
                start_times=options["validation_start_times"],
                **windows,
            )
        a_priori = None
        if options["a_priori"] is not None:
            pair = options["a_priori"]
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise TypeError("a_priori must be a pair (inputs, targets) of this rank's samples.")
            a_priori = APrioriLoss(closure, pair[0], pair[1], rollout.comm)
        built = optim.build_from_options(parameters, options, settings)
        return cls(settings, closure, train, val, a_priori, *built, metadata=metadata)

    def fit(self, rollout: Rollout, options: Mapping[str, Any], comm: MPI.Comm) -> FitResult:
        """Split, scale and train (collective; the checks are done and agreed)."""
        settings = self.settings
        if self.val is None:
            train, val = split_windows(
                self.train.windows, settings["validation_fraction"], settings["seed"]
            )
        else:
            train, val = self.train.windows, self.val.windows
        scale = _scales(self, train, comm)
        settings = _recorded_settings(self, settings, scale, comm)
        model = self.closure.model
        model.eval()
        with torch.random.fork_rng(devices=[]), _stepper_state_kept(rollout):
            broadcast_weights(model, comm)  # the same starting weights everywhere: rank 0's
            objective = RolloutObjective(
                rollout,
                self.closure,
                horizon=settings["horizon"],
                scale=scale,
                a_priori=self.a_priori,
                a_priori_weight=settings.get("a_priori_weight", 0.0),
                target_interval=settings["target_interval"],
            )
            loop = RolloutSettings(
                epochs=int(options["epochs"]),
                **{k: settings[k] for k in ("patience", "min_delta", "seed", "batch_size")},
            )
            trainer = RolloutTrainer(
                objective,
                train,
                val,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                settings=loop,
                comm=comm,
                checkpoints=Checkpoints.from_options(
                    options,
                    settings=settings,
                    metadata=self.metadata,
                    comm=comm,
                    data=self.fingerprint(options, comm),
                ),
                progress=options["progress"],
                callback=options["callback"],
            )
            return FitResult(model, trainer.resume_and_train(options["resume"]).history)

    def fingerprint(
        self, options: Mapping[str, Any], comm: MPI.Comm
    ) -> dict[str, dict[str, Any]] | None:
        """What a checkpoint records of the data, compared on resume (collective).

        ``None`` without checkpoints. The trajectories (those the validation windows are
        split from, too) and the validation trajectories, if given.
        """
        if options["checkpoint_dir"] is None:
            return None
        data = {"trajectories": self.train.fingerprint(comm)}
        if self.val is not None:
            data["validation trajectories"] = self.val.fingerprint(comm)
        return data

    def layout(self) -> tuple[list[int], list[int] | None, bool]:
        """What every rank must agree on: the trajectory lengths, and a-priori or not."""
        val = None if self.val is None else self.val.lengths
        return self.train.lengths, val, self.a_priori is not None


@contextlib.contextmanager
def _stepper_state_kept(rollout: Rollout) -> Iterator[None]:
    """The stepper's states, time and closure values as they were, whatever happens inside.

    Training runs the stepper from every window's start: without this, a simulation
    continued after ``fit_rollout`` would start from the last window's state.
    """
    stepper = rollout.stepper
    functions = [stepper.u, stepper.u_previous, *stepper.older]
    for closure in rollout.closures:
        functions.append(closure)
        if isinstance(closure, Closure) and closure._tangent is not None:
            functions.append(closure._tangent)
    arrays = [function.x.array.copy() for function in functions]
    t = stepper.t
    time = None if stepper.time is None else float(stepper.time.value)
    try:
        yield
    finally:
        for function, array in zip(functions, arrays, strict=True):
            function.x.array[:] = array
        stepper.t = t
        if stepper.time is not None:
            stepper.time.value = time  # type: ignore[assignment]


def _scales(run: _Run, train: list[Window], comm: MPI.Comm) -> float:
    """``S`` of the training windows (and the a-priori scale) over all ranks (collective)."""
    local = np.array(
        [
            sum(float((w.targets**2).sum()) for w in train),
            0.0 if run.a_priori is None else run.a_priori.local_squared_norm(),
        ]
    )
    summed = np.empty_like(local)
    comm.Allreduce(local, summed, op=MPI.SUM)
    scale = float(summed[0]) / len(train)
    if scale == 0.0:
        raise ValueError(
            "The targets of the training windows are all zero: the relative loss is "
            "undefined. Check the trajectories."
        )
    if run.a_priori is not None:
        if summed[1] == 0.0:
            raise ValueError(
                "The a-priori targets are all zero (or there are none): the relative a-priori "
                "loss is undefined."
            )
        run.a_priori.set_scale(float(summed[1]))
    return scale


def _recorded_settings(
    run: _Run, settings: dict[str, Any], scale: float, comm: MPI.Comm
) -> dict[str, Any]:
    """The settings a checkpoint records (collective: counts the a-priori samples).

    A resumed run must match them: the data's layout, the scale of the targets and the
    a-priori samples, besides the options. Sorted by key.
    """
    settings = dict(settings)
    settings.update(
        closure=run.closure.name,
        trajectories=run.train.lengths,
        target_scale=f"{scale:.10e}",
    )
    if run.train.start_times is not None:
        settings["start_times"] = run.train.start_times
    if run.val is not None:
        settings["validation_trajectories"] = run.val.lengths
        if run.val.start_times is not None:
            settings["validation_start_times"] = run.val.start_times
    if run.a_priori is not None:
        count = comm.allreduce(run.a_priori.num_samples, op=MPI.SUM)
        settings.update(a_priori_samples=count, a_priori_scale=f"{run.a_priori.scale:.10e}")
    return dict(sorted(settings.items()))


def _communicator(rollout: Rollout) -> MPI.Comm:
    """The rollout's communicator; a ``TypeError`` for anything else.

    Raised before any collective: there is no communicator to agree on, and the ranks that
    share one make the same mistake.
    """
    if not isinstance(rollout, Rollout):
        raise TypeError(
            f"rollout must be a dolfinx_mno.rollout.Rollout, got {type(rollout).__name__} "
            "(wrap the stepper: Rollout(stepper))."
        )
    return rollout.comm


@torch.inference_mode(False)
@torch.enable_grad()  # training needs gradients whatever the caller's torch mode
def fit_rollout(
    rollout: Rollout,
    trajectories: Sequence[Trajectory],
    *,
    horizon: int,
    closure: Closure | None = None,
    validation: Sequence[Trajectory] | None = None,
    validation_fraction: float | None = None,
    start_times: Sequence[float] | None = None,
    validation_start_times: Sequence[float] | None = None,
    stride: int = 1,
    target_interval: int = 1,
    a_priori: tuple[Any, Any] | None = None,
    a_priori_weight: float | None = None,
    epochs: int = 100,
    batch_size: int = 8,
    optimizer: optim.OptimizerFactory | None = None,
    scheduler: optim.SchedulerFactory | None = None,
    learning_rate: float | None = None,
    weight_decay: float | None = None,
    lr_factor: float | None = None,
    lr_patience: int | None = None,
    min_learning_rate: float | None = None,
    patience: int = 20,
    min_delta: float = 0.0,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
    callback: Callable[[int, TrainingHistory], None] | None = None,
) -> FitResult:
    r"""Train a closure's model through ``horizon`` steps of the solver (collective).

    The objective is the rollout error against filtered fine trajectories
    (:class:`RolloutObjective`): for a minibatch of windows,
    ``J = mean_w Σ_{n=1}^{k} ‖u_n^w − t_n^w‖² / S + λ J_prior``, with ``S`` the mean over
    the training windows of ``Σ_n ‖t_n^w‖²`` and ``J_prior`` the optional relative
    a-priori loss ``Σ ‖m(x) − y‖² / Σ ‖y‖²``. Its gradient comes from :meth:`Rollout.gradient
    <dolfinx_mno.rollout.Rollout.gradient>` (the discrete adjoint of the steps), summed over
    ranks, so the weights are the same on any number of ranks (to rounding). The model is
    trained in place. A window of a trajectory starts at ``t0 + s dt`` (``t0``: the
    stepper's time when ``fit_rollout`` is called, or the trajectory's start time); the
    stepper's time is set to it for the window and restored, so that data set by the
    rollout's ``before_step`` hook follow.

    Args:
        rollout: The differentiable rollout of the coarse solver, the closure in its step.
        trajectories: The filtered fine solution at the coarse steps ``t0, t0 + dt, ...``,
            per trajectory a list of states ``(num_owned,)`` (this rank's owned dofs of
            ``u``; :func:`owned_states` makes them) or an array ``(num_states,
            num_owned)``, with at least ``horizon + 1 + rollout.num_older`` states; the
            same numbers of states on every rank.
        horizon: The number of steps ``k`` of a window.
        closure: The closure to train; by default the rollout's only closure.
        validation: Held-out trajectories (the same format); default: a seeded split.
        validation_fraction: Without ``validation``, the fraction of the windows held out
            (0.2); ``0``: validate on the training windows.
        start_times: The time of each trajectory's first state (default: ``t0``).
        validation_start_times: The same for the ``validation`` trajectories.
        stride: Distance between the starts of a trajectory's windows.
        target_interval: Coarse steps ``m`` between consecutive states of a trajectory: a
            window runs ``horizon × m`` steps and compares the states after ``m, 2m, ...``.
            1 for a stepper with older states: a window at state ``s ≥ num_older`` starts
            from the older states ``s-1, s-2, ...``.
        a_priori: ``(inputs, targets)``, this rank's a-priori samples as
            :func:`~dolfinx_mno.training.fit` takes them (on every rank or on none).
        a_priori_weight: ``λ`` (default 1 with ``a_priori``).
        epochs: Maximum number of passes over the training windows.
        batch_size: Windows per optimiser step (their gradients are averaged).
        optimizer: As for :func:`~dolfinx_mno.training.fit`; default Adam
            (:mod:`~dolfinx_mno.training.optim` documents the defaults and their options).
        scheduler: As for ``fit``; default ``ReduceLROnPlateau`` on the validation loss.
        learning_rate: Of the default Adam (1e-3).
        weight_decay: Of the default Adam (0).
        lr_factor: Of the default schedule (0.5).
        lr_patience: Of the default schedule (10).
        min_learning_rate: Of the default schedule (1e-6).
        patience: Epochs without a validation loss below ``best * (1 - min_delta)`` before
            stopping; the best weights are restored, the starting ones if no epoch beats them.
        min_delta: Relative improvement that counts for early stopping, in ``[0, 1)``.
        seed: Seeds the split, the order of the windows and torch's random state in each
            epoch (the caller's is restored on return).
        checkpoint_dir: As for ``fit`` (:mod:`~dolfinx_mno.training.checkpoint`).
        checkpoint_every: Epochs between checkpoints.
        resume: Continue from the newest complete checkpoint.
        metadata: JSON dict stored in the checkpoint model files, with the closure's spec.
        progress: Show a tqdm progress bar on rank 0.
        callback: ``callback(epoch, history)`` after every epoch, on every rank.

    Returns:
        The closure's model (with the best weights, see ``patience``; eval mode), the history.

    Raises:
        TypeError, ValueError: Bad input, on every rank, before any collective call (short
            or misshapen trajectories, no window on one side of the split, a closure not
            in the rollout or without trainable parameters, a checkpoint of other data).
        FileExistsError, PermissionError: A fresh run in a ``checkpoint_dir`` holding
            checkpoints, or one not writable (on every rank, before training).
        FloatingPointError: NaN or Inf losses (on every rank); the model is left with
            the best weights so far, as after any error or interrupt during training.
        RuntimeError: A linear solve of the rollout did not converge.
    """
    comm = _communicator(rollout)
    options = dict(locals())
    return _checked_run(rollout, trajectories, options, comm).fit(rollout, options, comm)


def _checked_run(
    rollout: Rollout, trajectories: Sequence[Trajectory], options: dict[str, Any], comm: MPI.Comm
) -> _Run:
    """:meth:`_Run.check` on every rank, its verdicts and data layouts agreed (collective)."""
    run: _Run | None = None
    cause: Exception | None = None
    try:
        run = _Run.check(rollout, trajectories, options)
    except Exception as err:  # the factories and the model may raise anything
        cause = err
    layouts = agree_on(
        comm, None if run is None else run.layout(), "fit_rollout: checking the input", cause=cause
    )
    assert run is not None
    if any(layout != layouts[0] for layout in layouts):
        raise ValueError(
            "fit_rollout: the ranks passed different data (trajectory lengths, validation "
            f"lengths, a-priori samples or not): {layouts}. Every rank passes its owned "
            "dofs of the same trajectories, and a_priori on every rank or on none."
        )
    return run
