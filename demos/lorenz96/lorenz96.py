"""The two-level Lorenz 96 system of ``demo_lorenz96.py``: model, reference data, closures.

The demo imports it, and so do ``experiments/lorenz96_results.py`` and
``experiments/lorenz96_runtime.py``, which measure the demo's closures further: one
definition of the system, importable without running the demo. States are float64 torch
tensors with the slow variables on the last axis, ``(..., K)``; a *closure* is any function
from ``(batch, K)`` to ``(batch, K)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from mpi4py import MPI

import numpy as np
import torch

from dolfinx_mno.training import shard

h, b, c, F = 0.5, 10.0, 8.0, 20.0
"""Coupling, amplitude ratio, time-scale ratio, forcing."""
dt = 0.005
"""The time step of the reference and of the coarse model."""
dtype = torch.float64

Closure = Callable[[torch.Tensor], torch.Tensor]

RK4_STAGES = [(1 / 6, 0.5), (1 / 3, 0.5), (1 / 3, 1.0), (1 / 6, None)]
"""The classical RK4 scheme: for each stage, its weight in the update and the time offset
(in steps) of the next stage's state."""


def resolved_tendency(x: torch.Tensor) -> torch.Tensor:
    """X_{k-1} (X_{k+1} - X_{k-2}) - X_k + F for x of shape (..., K)."""
    return torch.roll(x, 1, -1) * (torch.roll(x, -1, -1) - torch.roll(x, 2, -1)) - x + F


class TwoLevelLorenz96:
    """The two-level Lorenz 96 model, advanced by RK4 steps of ``dt``.

    The stage state of the fast variables lives in one buffer with a periodic *halo*: one
    copy of Y_{J-1,k} before each block and copies of Y_{0,k}, Y_{1,k} after it, so that
    Y_{j-1,k}, Y_{j+1,k} and Y_{j+2,k} are slices of the same buffer. Every operation
    writes into preallocated arrays: one step needs five arrays of the size of Y (state,
    next state, stage state with halo, stage tendency, one work array), 2 GiB each at
    K = J = 2^14 in float64.

    Args:
        x: Slow variables, shape ``(batch, K)``.
        y: Fast variables, shape ``(batch, K, J)``, same dtype. The model takes ownership
            of both tensors: they are advanced in place (or swapped with its buffers).

    Attributes:
        x, y: The current state.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        batch, num_slow, num_fast = y.shape
        assert x.shape == (batch, num_slow) and x.dtype == y.dtype
        self.x, self.y = x, y
        self.y_next = torch.empty_like(y)
        self.y_stage = torch.empty(batch, num_slow, num_fast + 3, dtype=y.dtype)  # with halo
        self.y_rate = torch.empty_like(y)
        self.work = torch.empty_like(y)

    def subgrid_tendency(self) -> torch.Tensor:
        """U_k = -(hc/b) sum_j Y_{j,k} of the current state, shape (batch, K)."""
        return self.y.sum(-1).mul_(-h * c / b)

    def _stage_rates(self, x_stage: torch.Tensor) -> torch.Tensor:
        """Tendencies at the stage state (``x_stage``, ``self.y_stage``).

        Writes dY/dt to ``self.y_rate`` and returns dX/dt, shape (batch, K).
        """
        ys, num_fast = self.y_stage, self.y_stage.shape[-1] - 3
        ys[..., 0] = ys[..., num_fast]  # halo: Y_{-1} = Y_{J-1}, Y_J = Y_0, Y_{J+1} = Y_1
        ys[..., num_fast + 1 :] = ys[..., 1:3]
        y = ys[..., 1 : num_fast + 1]
        torch.sub(ys[..., 3:], ys[..., :num_fast], out=self.work)  # Y_{j+2} - Y_{j-1}
        torch.mul(ys[..., 2 : num_fast + 2], self.work, out=self.y_rate)  # times Y_{j+1}
        self.y_rate.mul_(-c * b).add_(y, alpha=-c).add_(x_stage.unsqueeze(-1), alpha=h * c / b)
        return resolved_tendency(x_stage) - (h * c / b) * y.sum(-1)

    def step(self) -> None:
        """Advance the state by one RK4 step."""
        x, y = self.x, self.y
        y_stage = self.y_stage[..., 1:-2]
        y_stage.copy_(y)
        x_stage, x_next = x, x.clone()
        for stage, (weight, next_offset) in enumerate(RK4_STAGES):
            x_rate = self._stage_rates(x_stage)
            if stage == 0:
                torch.add(y, self.y_rate, alpha=weight * dt, out=self.y_next)
            else:
                self.y_next.add_(self.y_rate, alpha=weight * dt)
            x_next += weight * dt * x_rate
            if next_offset is not None:
                torch.add(y, self.y_rate, alpha=next_offset * dt, out=y_stage)
                x_stage = x + next_offset * dt * x_rate
        self.x = x_next
        self.y, self.y_next = self.y_next, self.y


def coarse_step(x: torch.Tensor, closure: Closure) -> torch.Tensor:
    """One RK4 step of dX/dt = resolved_tendency(X) + U, with U = closure(X^n) held fixed."""
    closure_values = closure(x)
    x_stage, x_next = x, x.clone()
    for weight, next_offset in RK4_STAGES:
        rate = resolved_tendency(x_stage) + closure_values
        x_next += weight * dt * rate
        if next_offset is not None:
            x_stage = x + next_offset * dt * rate
    return x_next


def random_states(num_states: int, num_slow: int, num_fast: int, seed: int):
    """Seeded random states: x ``(num_states, K)`` uniform in [-F/2, F/2] and y
    ``(num_states, K, J)`` uniform in [-0.05, 0.05]."""
    generator = torch.Generator().manual_seed(seed)
    x = F * (torch.rand(num_states, num_slow, generator=generator, dtype=dtype) - 0.5)
    y = 0.1 * (torch.rand(num_states, num_slow, num_fast, generator=generator, dtype=dtype) - 0.5)
    return x, y


class Trajectories(NamedTuple):
    """Reference trajectories, the same on every rank."""

    x: torch.Tensor
    """Slow variables, ``(num_records, num_trajectories, K)``."""
    u: torch.Tensor
    """Subgrid tendencies U, same shape."""


def simulate(
    num_trajectories: int,
    num_slow: int,
    num_steps: int,
    record_every: int,
    seed: int,
    spin_up_steps: int,
    comm: MPI.Comm = MPI.COMM_WORLD,
) -> Trajectories:
    """Reference trajectories of the two-level model with K = J = ``num_slow`` (collective).

    The initial states (:func:`random_states`) are drawn on every rank from one seeded
    generator; each rank runs its contiguous block of them (``shard``) for
    ``spin_up_steps`` steps onto the attractor and then ``num_steps`` steps, recording every
    ``record_every`` steps (``num_steps // record_every + 1`` records, the state after
    spin-up first). The blocks are gathered in rank order, so every rank holds the same
    global trajectories whatever the number of ranks.
    """
    x0, y0 = random_states(num_trajectories, num_slow, num_slow, seed)
    model = TwoLevelLorenz96(
        torch.from_numpy(shard(x0, comm).copy()), torch.from_numpy(shard(y0, comm).copy())
    )
    for _ in range(spin_up_steps):
        model.step()
    x_records, u_records = [model.x.clone()], [model.subgrid_tendency()]
    for step in range(1, num_steps + 1):
        model.step()
        if step % record_every == 0:
            x_records.append(model.x.clone())
            u_records.append(model.subgrid_tendency())
    local = torch.stack(x_records).numpy(), torch.stack(u_records).numpy()
    blocks = comm.allgather(local)  # in rank order: the global trajectories, in order
    x, u = (np.concatenate([block[i] for block in blocks], axis=1) for i in (0, 1))
    return Trajectories(torch.from_numpy(x), torch.from_numpy(u))


def polynomial_closure(coefficients: Sequence[float]) -> Closure:
    """U_k = sum_i a_i X_k^i (Horner), the same polynomial for every k."""

    def closure(x):
        values = torch.full_like(x, coefficients[-1])
        for a in coefficients[-2::-1]:
            values = values * x + a
        return values

    return closure


def stencil(x: torch.Tensor, half_width: int) -> torch.Tensor:
    """(X_{k-w}, ..., X_{k+w}) for every k: shape (..., K, 2w + 1) from x of shape (..., K)."""
    return torch.stack([torch.roll(x, -s, -1) for s in range(-half_width, half_width + 1)], -1)


def pointwise_closure(model: torch.nn.Module, half_width: int) -> Closure:
    """The closure that applies a pointwise model to the stencil of every k."""

    def closure(x):
        features = stencil(x, half_width)
        return model(features.reshape(-1, features.shape[-1])).reshape(x.shape)

    return closure


def field_closure(model: torch.nn.Module) -> Closure:
    """The closure (batch, K) -> (batch, K), float64, of a float32 model of (batch, 1, K)."""

    def closure(x):
        return model(x.to(torch.float32).unsqueeze(1)).squeeze(1).to(x.dtype)

    return closure


class Rollout(NamedTuple):
    """A free-running rollout of the coarse model, compared with the reference."""

    squared_error: np.ndarray
    """``(num_steps, num_trajectories)``: mean over k of (X - X_ref)² after each step."""
    first_trajectory: np.ndarray
    """``(num_steps + 1, K)``: the states of the first trajectory, the start included."""


def rollout(closure: Closure, x_reference: torch.Tensor) -> Rollout:
    """Run the coarse model from ``x_reference[0]`` for ``len(x_reference) - 1`` steps.

    Args:
        closure: The closure of the coarse model.
        x_reference: Reference states, ``(num_steps + 1, num_trajectories, K)``.
    """
    num_steps = x_reference.shape[0] - 1
    x = x_reference[0]
    squared_error = np.zeros((num_steps, x.shape[0]))
    states = [x[:1]]
    with torch.inference_mode():
        for n in range(num_steps):
            x = coarse_step(x, closure)
            squared_error[n] = ((x - x_reference[n + 1]) ** 2).mean(-1).numpy()
            states.append(x[:1])
    return Rollout(squared_error, torch.cat(states).numpy())
