"""The data of a-posteriori training: trajectories, their windows, the split.

The counterpart of :mod:`~dolfinx_mno.training.samples` for
:func:`~dolfinx_mno.training.fit_rollout`:

* :func:`owned_states`: a trajectory of ``fem.Function`` objects as owned-dof states, the
  layout of :class:`~dolfinx_mno.rollout.Rollout` states, on any number of ranks.
* :class:`TrajectoryWindows`: one rank's trajectories, checked (local), and their
  :class:`Window` objects: a start ``s`` of a trajectory, the initial state ``traj[s]``
  and the targets ``traj[s+1], ..., traj[s+k]``.
* :func:`split_windows`: the seeded split into training and validation windows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import torch
from dolfinx import fem

__all__ = ["Trajectory", "TrajectoryWindows", "Window", "owned_states", "split_windows"]

#: A trajectory: states ``(num_owned,)`` one after another, or an array
#: ``(num_states, num_owned)``.
Trajectory = Sequence[npt.ArrayLike | torch.Tensor] | npt.ArrayLike | torch.Tensor


def owned_states(functions: Sequence[fem.Function]) -> list[npt.NDArray[np.float64]]:
    """A trajectory in the layout of rollout states: each function's owned values.

    Args:
        functions: The states at the coarse time steps, on the space of the rollout's
            ``u`` (e.g. the filtered fine solution interpolated onto it).

    Returns:
        For each function, a float64 copy of ``f.x.array[:num_owned]``, ``num_owned`` the
        owned dofs × block size: the same layout as :meth:`Rollout.run
        <dolfinx_mno.rollout.Rollout.run>`'s states, on any number of ranks.
    """
    states = []
    for function in functions:
        index_map = function.function_space.dofmap.index_map
        num_owned = index_map.size_local * function.function_space.dofmap.index_map_bs
        states.append(np.array(function.x.array[:num_owned], dtype=np.float64))
    return states


# -- data ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Window:
    """One window of a trajectory (this rank's owned dofs).

    Attributes:
        trajectory: Index of the trajectory.
        start: Index ``s`` of its initial state; the window starts at time ``t0 + s dt``.
        initial: ``traj[s]``, shape ``(num_owned,)`` float64.
        targets: ``traj[s+1 .. s+k]``, shape ``(horizon, num_owned)`` float64.
        origin: The time of the trajectory's first state, or ``None`` for the stepper's
            time when training starts.
        older: ``[traj[s-1], traj[s-2], ...]``, the window's initial older states for a
            rollout whose stepper keeps them (empty otherwise).
    """

    trajectory: int
    start: int
    initial: torch.Tensor
    targets: torch.Tensor
    origin: float | None = None
    older: tuple[torch.Tensor, ...] = ()


def _as_trajectory(trajectory: Any, index: int, num_owned: int, what: str) -> torch.Tensor:
    """``trajectory`` as a float64 tensor ``(num_states, num_owned)``; raises if malformed."""
    if isinstance(trajectory, torch.Tensor | np.ndarray):
        if trajectory.ndim != 2:
            raise ValueError(
                f"{what.capitalize()} {index} must be a list of states or an array "
                f"(num_states, num_owned), got an array with {trajectory.ndim} axes; pass "
                "[trajectory] for a single trajectory."
            )
        states = list(trajectory)
    elif isinstance(trajectory, Sequence):
        states = list(trajectory)
    else:
        raise TypeError(
            f"{what.capitalize()} {index} must be a list of states (num_owned,), got "
            f"{type(trajectory).__name__}."
        )
    rows = []
    for step, state in enumerate(states):
        if isinstance(state, torch.Tensor):
            state = state.detach().cpu().to(torch.float64).numpy()
        array = np.asarray(state)
        if array.dtype.kind not in "fiu":
            raise TypeError(f"State {step} of {what} {index} is not real (dtype {array.dtype}).")
        if array.shape != (num_owned,):
            raise ValueError(
                f"State {step} of {what} {index} has shape {array.shape}; a state on this "
                f"rank has shape ({num_owned},) (the owned dofs of u; owned_states(functions) "
                "gives them)."
            )
        rows.append(array.astype(np.float64))
    tensor = torch.from_numpy(np.array(rows, dtype=np.float64).reshape(len(rows), num_owned))
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what.capitalize()} {index} has NaN or Inf values.")
    return tensor


class TrajectoryWindows:
    """One rank's trajectories, checked, and their windows (local: no collective call).

    Args:
        trajectories: The trajectories (see :func:`fit_rollout`).
        horizon: The number of steps ``k`` of a window.
        stride: Distance between the starts of consecutive windows of a trajectory.
        num_owned: Entries of a state on this rank.
        what: What the trajectories are, for the messages (``"trajectory"``).
        start_times: The time of each trajectory's first state; ``None``: the stepper's
            time when training starts, for all.
        num_older: Older states a window starts from (a rollout's ``num_older``): the
            windows start at ``num_older`` or later, and take the states before their start
            as ``older``.

    Attributes:
        states: Each trajectory as ``(num_states, num_owned)`` float64.
        windows: Every window, by trajectory then start: starts ``num_older, num_older +
            stride, ...`` up to ``num_states - 1 - horizon``.
        start_times: The start times as floats, or ``None``.

    Raises:
        TypeError, ValueError: Not a list of trajectories, states of the wrong shape or
            dtype, NaN or Inf, a trajectory shorter than ``horizon + 1`` states, or not one
            finite start time per trajectory.
    """

    def __init__(
        self,
        trajectories: Any,
        *,
        horizon: int,
        stride: int,
        num_owned: int,
        what: str,
        start_times: Sequence[float] | None = None,
        num_older: int = 0,
    ):
        if (
            isinstance(trajectories, np.ndarray | torch.Tensor | str)
            or not isinstance(trajectories, Sequence)
            or len(trajectories) == 0
        ):
            raise TypeError(
                f"The {what} data must be a non-empty list of trajectories, each a list of "
                "states (num_owned,) or an array (num_states, num_owned); pass [trajectory] "
                "for a single one."
            )
        self.states = [_as_trajectory(t, i, num_owned, what) for i, t in enumerate(trajectories)]
        for i, states in enumerate(self.states):
            if states.shape[0] < num_older + horizon + 1:
                older = f"{num_older} older state(s), " if num_older else ""
                raise ValueError(
                    f"{what.capitalize()} {i} has {states.shape[0]} states, too few for a "
                    f"horizon of {horizon} steps (a window needs {older}horizon + 1 = "
                    f"{num_older + horizon + 1}: {older}the initial state and the targets); "
                    "give a shorter horizon or longer trajectories."
                )
        origins: list[float | None] = [None] * len(self.states)
        if start_times is not None:
            times = np.asarray(start_times, dtype=np.float64).reshape(-1)
            if times.size != len(self.states) or not np.all(np.isfinite(times)):
                raise ValueError(
                    f"Give one finite start time per {what} (the time of its first state): "
                    f"{len(self.states)} {what}(s), got {list(np.atleast_1d(start_times))}."
                )
            origins = [float(t) for t in times]
        self.start_times = None if start_times is None else origins
        self.windows = [
            Window(
                i,
                s,
                states[s],
                states[s + 1 : s + 1 + horizon],
                origins[i],
                tuple(states[s - j] for j in range(1, num_older + 1)),
            )
            for i, states in enumerate(self.states)
            for s in range(num_older, states.shape[0] - horizon, stride)
        ]

    def fingerprint(self, comm: MPI.Comm) -> dict[str, Any]:
        """``{"count": num_trajectories, "checksum": "…"}`` of the global trajectories.

        Collective. The checksum is three sums over every value ``u`` of every state and
        rank, to 11 significant digits: ``Σ u²``, ``Σ |u|`` and ``Σ (i + 1)(s + 1) u²``
        (``u`` in state ``s`` of trajectory ``i``), so other values, states in another
        order or trajectories swapped tell. Sums of positive terms rounded as the target
        scale of the settings is: sums in another order, on another number of ranks or of
        trajectories recomputed there (which differ at rounding level) agree, but for a
        sum at a rounding boundary. It is not cryptographic.
        """
        sums = np.zeros(3)
        for i, states in enumerate(self.states):
            squares = (states**2).sum(dim=1).numpy()
            weights = (i + 1) * np.arange(1, squares.size + 1, dtype=np.float64)
            sums += [squares.sum(), float(states.abs().sum()), float(weights @ squares)]
        comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        return {"count": len(self.states), "checksum": " ".join(f"{v:.10e}" for v in sums)}

    @property
    def lengths(self) -> list[int]:
        """Number of states of each trajectory."""
        return [int(states.shape[0]) for states in self.states]


def split_windows(
    windows: list[Window], fraction: float, seed: int
) -> tuple[list[Window], list[Window]]:
    """``(train, val)``: a seeded split of ``windows`` (the same on every rank).

    A permutation seeded by ``seed`` sends ``round(fraction * len(windows))`` windows to
    validation; each side keeps the windows' order. ``fraction`` 0: no split, the
    validation windows are the training windows.

    Raises:
        ValueError: A side without a window.
    """
    if fraction == 0.0:
        return windows, windows
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(windows))
    num_val = round(fraction * len(windows))
    if num_val < 1 or num_val == len(windows):
        raise ValueError(
            f"fit_rollout: {len(windows)} windows with validation_fraction={fraction} leave "
            f"{len(windows) - num_val} for training and {num_val} for validation; each needs "
            "one (give more or longer trajectories, a smaller stride, validation "
            "trajectories, or validation_fraction=0 to validate on the training windows)."
        )
    train = [windows[i] for i in sorted(order[num_val:])]
    return train, [windows[i] for i in sorted(order[:num_val])]
