"""The measuring parts of ``demo_turbulence_2d.py``: the check of the closure data, coarse
runs against a reference (:class:`Comparison`), the resolution factor and a-posteriori
training (the outputs, VTX, figures and ``summary.json``, are :mod:`report`'s).

Everything here reads the flows of :mod:`flow` and the package's public API; the demo
imports it so that its own text stays about the workflow.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ufl
from dolfinx import fem
from flow import VorticityFlow, wall_projection
from utilities import log, relative_l2_error

import dolfinx_mno as mno
from dolfinx_mno.data import ClosureSampler
from dolfinx_mno.rollout import Rollout, rollout_loss
from dolfinx_mno.training import fit_rollout
from dolfinx_mno.training.aposteriori import RolloutObjective
from dolfinx_mno.training.trajectories import TrajectoryWindows, Window, split_windows


@dataclasses.dataclass
class Run:
    """What :func:`compare` records of one coarse model."""

    times: np.ndarray
    """Sampling times of the test horizon, ``(num_samples,)``."""
    correlations: np.ndarray
    """Vorticity correlation with the reference at those times (NaN once blown up)."""
    decorrelation_time: float
    """Time after the start until the correlation falls below 0.95 (inf: never)."""
    seconds_per_time_unit: float
    """Wall time of the steps per simulated time unit, over the test horizon."""
    energies: np.ndarray
    """``(num_records, 2)``: time and kinetic energy, over the long run."""
    states: list[np.ndarray]
    """The coarse vorticity (dof values on the coarse space) at the sampling times."""


def steps_between(interval: float, dt: float) -> int:
    """The number of time steps ``dt`` in ``interval``, which must hold a whole number.

    Raises:
        ValueError: ``interval`` is not a positive multiple of ``dt`` (a run would then be
            compared with reference samples of other times).
    """
    count = round(interval / dt)
    if count < 1 or abs(count * dt - interval) > 1e-9 * interval:
        raise ValueError(
            f"The sampling interval {interval} is not a whole number of time steps {dt}: "
            "choose sample_every as a multiple of every model's time step."
        )
    return count


def compare(
    flow: VorticityFlow,
    start: fem.Function,
    reference: Sequence[np.ndarray],
    to_coarse: Callable[[fem.Function], fem.Function],
    correlation: mno.Correlation,
    pair: tuple[fem.Function, fem.Function],
    t0: float,
    sample_every: float,
    long_end: float | None = None,
) -> Run:
    """Run ``flow`` from ``start`` over the test horizon of ``reference``, then to ``long_end``.

    Args:
        flow: The model.
        start: Its initial vorticity (P1 on ``flow.V``).
        reference: The filtered DNS vorticity at ``t0, t0 + sample_every, ...`` (dof
            values on the coarse space).
        to_coarse: The filter of the model's vorticity onto the coarse space (identity for
            the coarse mesh).
        correlation: The compiled correlation of the two functions of ``pair``.
        pair: ``(model, reference)`` functions on the coarse space that ``correlation`` reads.
        t0: Start time.
        sample_every: Time between samples; a multiple of ``flow.dt``.
        long_end: Continue to this time for the stability check (energy only).
    """
    every = steps_between(sample_every, flow.dt)
    times, correlations, energies, states = [], [], [], []
    model_values, reference_values = pair

    def record(t: float) -> None:
        index = round((t - t0) / sample_every)
        omega = to_coarse(flow.omega)
        model_values.x.array[:] = omega.x.array
        reference_values.x.array[:] = reference[index]
        energy = flow.energy()
        times.append(t)
        correlations.append(correlation() if np.isfinite(energy) else np.nan)
        states.append(omega.x.array.copy())
        energies.append((t, energy))

    flow.set_vorticity(start)
    t1 = t0 + (len(reference) - 1) * sample_every
    seconds = flow.run(t0, t1, record, every=every)
    if long_end is not None and long_end > t1 + 1e-9:
        flow.run(t1, long_end, lambda t: energies.append((t, flow.energy())), every=every)
    missing = len(reference) - len(times)  # a blown-up run stops early
    times += [t0 + (len(times) + i) * sample_every for i in range(missing)]
    correlations += [np.nan] * missing
    rho = np.asarray(correlations)
    return Run(
        np.asarray(times),
        rho,
        mno.decorrelation_time(np.asarray(times) - t0, np.nan_to_num(rho, nan=-1.0)),
        seconds / (t1 - t0),
        np.asarray(energies),
        states,
    )


def resolution_factor(ladder: dict[int, Run], coarse: int, run: Run) -> tuple[float, float, bool]:
    """The no-closure mesh a model matches in decorrelation time, and the cost there.

    The ladder's decorrelation times are interpolated linearly in ``log n`` (made
    monotone by a running maximum); a run that never decorrelates counts as
    decorrelating at the end of the horizon (a lower bound). Returns ``(factor, wall-time
    ratio, capped)``: the matched ``n / coarse``; the ladder's wall time per time unit at
    that ``n`` (interpolated in log-log) over the model's; ``capped`` if the model lasts
    at least as long as the finest mesh of the ladder (the factor is then a lower bound).
    """
    sizes = sorted(ladder)
    horizon = float(run.times[-1] - run.times[0])
    times = np.minimum([ladder[n].decorrelation_time for n in sizes], horizon)
    times = np.maximum.accumulate(times)
    log_n = np.log([float(n) for n in sizes])
    t = min(run.decorrelation_time, horizon)
    capped = bool(t >= times[-1]) and len(sizes) > 1
    matched = float(np.interp(t, times, log_n)) if times[-1] > times[0] else log_n[0]
    cost = np.interp(matched, log_n, np.log([ladder[n].seconds_per_time_unit for n in sizes]))
    ratio = float(np.exp(cost) / run.seconds_per_time_unit)
    return float(np.exp(matched) / coarse), ratio, capped


@dataclasses.dataclass
class APosteriori:
    """What :func:`train_a_posteriori` returns."""

    held_out_before: float
    held_out_after: float
    epochs: int
    seconds: float
    held_out_no_closure: float = float("nan")
    """The same held-out windows' loss of the coarse model without closure: what the
    closure has to beat."""


def _rollout(flow: VorticityFlow) -> Rollout:
    """A differentiable rollout of ``flow``'s coarse step (a stepper of its own scheme)."""
    return Rollout(flow.stepper(closure_interval=1))


def train_a_posteriori(
    flow: VorticityFlow,
    trajectories: list[list[np.ndarray]],
    every: int,
    window: int,
    epochs: int,
    learning_rate: float,
    stride: int = 1,
    progress: bool = False,
    plain: VorticityFlow | None = None,
    validation: list[list[np.ndarray]] | None = None,
) -> APosteriori:
    """Train ``flow``'s closure in place through its solver with ``fit_rollout``.

    ``trajectories``: per training seed, the owned dofs of the filtered coarse state
    ``w = (ω̄, ψ̄)`` every ``every`` coarse steps. Windows of ``window`` states; a seeded
    fifth of them is held out (early stopping) and their rollout loss measured before and
    after, or with ``validation`` (trajectories of other seeds, the same format) the
    windows of those. A flow with ``memory`` needs ``every = 1``: its windows start from
    two states. ``progress``: a progress bar over the epochs on rank 0. ``plain``: the
    coarse model without closure (on the same mesh), whose loss on the held-out windows is
    recorded too.
    """
    rollout = _rollout(flow)
    windows = TrajectoryWindows(
        trajectories if validation is None else validation, horizon=window, stride=stride,
        num_owned=rollout.num_owned, num_older=rollout.num_older,
        what="training" if validation is None else "validation",
    ).windows  # fmt: skip
    # fit_rollout's own split, or the validation trajectories' windows
    held_out = split_windows(windows, 0.2, seed=0)[1] if validation is None else windows
    closure = typing.cast(mno.Closure, flow.closure)
    objective = RolloutObjective(rollout, closure, horizon=window, scale=1.0, target_interval=every)
    before = objective.rollout_loss(held_out)
    no_closure = rollout_loss_without_closure(plain, held_out, window, every) if plain else np.nan
    tic = time.perf_counter()
    result = fit_rollout(
        rollout,
        trajectories,
        horizon=window,
        target_interval=every,
        stride=stride,
        validation=validation,
        validation_fraction=0.2 if validation is None else None,
        epochs=epochs,
        batch_size=4,
        learning_rate=learning_rate,
        patience=4,
        progress=progress,
    )
    seconds = time.perf_counter() - tic
    after = objective.rollout_loss(held_out)
    return APosteriori(before, after, result.history.epochs, seconds, no_closure)


def rollout_loss_without_closure(
    plain: VorticityFlow, windows: Sequence[Window], window: int, every: int
) -> float:
    """The mean rollout loss of ``plain`` (a flow without closure) over ``windows``.

    The loss of :class:`~dolfinx_mno.training.aposteriori.RolloutObjective`: the squared
    error of the states every ``every`` steps against the window's ``window`` targets,
    summed over the dofs and the targets. (The flow's forcing does not depend on time, so
    the window's start time does not matter.)
    """
    rollout = _rollout(plain)
    total = 0.0
    for w in windows:
        older = list(w.older) if w.older else None
        states = rollout.run(w.initial, window * every, older=older)[every - 1 :: every]
        total += float(rollout_loss(states, list(w.targets), rollout.comm))
    return total / len(windows)


def smagorinsky_constant(inputs: np.ndarray, targets: np.ndarray, h: float, comm) -> float:
    """``C_s²`` of the least-squares fit ``τ ≈ −C_s² h² |S| ∇ω̄`` to closure samples.

    ``inputs`` ``(num_points, 6)``: ``∇ω̄`` and ``∇ū`` (row-major) at the points, this
    rank's; ``targets`` ``(num_points, 2)``: ``τ``. Closed form ``C_s² = −Σ τ·g / Σ g·g``
    with ``g = h² |S| ∇ω̄``, summed over ranks. Negative if backscatter dominates.
    """
    from mpi4py import MPI

    gradient_u = inputs[:, 2:].reshape(-1, 2, 2)
    strain = 0.5 * (gradient_u + gradient_u.transpose(0, 2, 1))
    rate = np.sqrt(2 * np.einsum("pij,pij->p", strain, strain))
    g = h**2 * rate[:, None] * inputs[:, :2]
    sums = comm.allreduce(np.array([-np.sum(targets * g), np.sum(g * g)]), op=MPI.SUM)
    return float(sums[0] / sums[1])


def step_error(check: VorticityFlow, start: fem.Function, reference: fem.Function) -> float:
    """Relative L² error of one step's tendency ``(ω¹ − ω⁰)/Δt`` of ``check`` from ``start``."""
    check.set_vorticity(start)
    check.run(0.0, check.dt)
    return relative_l2_error((check.omega.x.array - start.x.array) / check.dt, reference)


def tendency_check(
    dns: VorticityFlow,
    start: fem.Function,
    coarse: int,
    sampler: ClosureSampler,
    fine_flux: Any,
    tau_exact: Any,
) -> dict[str, float]:
    """A check of the closure data: one DNS step against coarse steps with the exact ``τ``.

    From the DNS state, one DNS step gives the filtered DNS tendency ``(R ω¹ − ω̄)/Δt``
    (``R``: the sampler's filter); coarse steps of the DNS time step from ``ω̄`` with the
    exact ``τ`` (sampled at this state, interpolated in the sampler's tendency space) and
    with no closure give theirs. The DNS state is restored afterwards.

    Args:
        dns: The DNS, at the state to check.
        start: ``ω̄``, its filtered vorticity, which the sampler's operands read too.
        coarse: Cells per side of the coarse mesh, ``start``'s.
        sampler: The closure sampler, its filter onto ``start``'s space.
        fine_flux: The fine flux the sampler filters (UFL, on the DNS state).
        tau_exact: The exact closure ``τ`` of the sampler's last sample (UFL).

    Returns:
        The relative L² error of the coarse tendency, by ``"exact tau"`` and
        ``"no closure"``.
    """
    saved = dns.w.x.array.copy(), dns.w_previous.x.array.copy()
    sampler.sample(dns.omega, fine_flux)
    space = sampler.filtered_tendency.function_space
    tau = fem.Function(space, name="tau")
    tau.interpolate(fem.Expression(tau_exact, space.element.interpolation_points))
    dns.run(0.0, dns.dt)
    tendency_dns = fem.Function(start.function_space)
    tendency_dns.x.array[:] = (sampler.restriction(dns.omega).x.array - start.x.array) / dns.dt
    dns.w.x.array[:], dns.w_previous.x.array[:] = saved
    closures = {"exact tau": lambda omega_n, velocity_n: (tau, ufl.dx), "no closure": None}
    domain = start.function_space.mesh
    return {
        label: step_error(
            VorticityFlow(coarse, dns.dt, dns.nu, closure, domain=domain), start, tendency_dns
        )
        for label, closure in closures.items()
    }


class Comparison:
    """Runs against one reference trajectory with one compiled correlation: :func:`compare`.

    Args:
        space: The coarse P1 space of the reference.
        reference: The filtered DNS vorticity at ``0, sample_every, ...`` (dof values on
            ``space``).
        sample_every: Time between samples; a multiple of the time steps of the runs.
        long_end: The end of the long run (stability) of the runs on the coarse mesh.
    """

    def __init__(
        self,
        space: fem.FunctionSpace,
        reference: Sequence[np.ndarray],
        sample_every: float,
        long_end: float,
    ):
        self.space, self.reference = space, reference
        self.sample_every, self.long_end = sample_every, long_end
        self.pair = fem.Function(space), fem.Function(space)
        self.correlation = mno.Correlation(*self.pair)

    def run(
        self,
        flow: VorticityFlow,
        start: fem.Function,
        to_coarse: Callable[[fem.Function], fem.Function] | None = None,
    ) -> Run:
        """:func:`compare` of ``flow`` from ``start`` at time 0.

        ``to_coarse``: the filter of a finer flow's vorticity onto the coarse space; None
        for a flow on the coarse mesh, which then runs on to ``long_end``.
        """
        long_end = self.long_end if to_coarse is None else None
        return compare(
            flow,
            start,
            self.reference,
            to_coarse if to_coarse is not None else (lambda f: f),
            self.correlation,
            self.pair,
            0.0,
            self.sample_every,
            long_end,
        )

    def ladder(
        self,
        sizes: Sequence[int],
        coarse: VorticityFlow,
        time_step: Callable[[int], float],
        start: fem.Function,
        fine: int,
    ) -> dict[int, Run]:
        """The runs without closure on the meshes of ``sizes``, by cells per side.

        Args:
            sizes: Cells per side, multiples of ``coarse.n`` that divide ``fine``.
            coarse: The coarse flow without closure, the one run on the coarse mesh.
            time_step: The time step of a mesh of ``n`` cells per side.
            start: The DNS vorticity at the start, filtered onto each mesh.
            fine: Cells per side of the DNS mesh.
        """
        runs = {}
        for n in sizes:
            if n == coarse.n:
                flow = coarse
            else:
                flow = VorticityFlow(n, time_step(n), coarse.nu, name=f"ladder{n}")
            to_flow = wall_projection(flow.V, subdivisions=fine // n)
            to_coarse = None
            if n != coarse.n:
                to_coarse = wall_projection(self.space, subdivisions=n // coarse.n)
            runs[n] = self.run(flow, to_flow(start), to_coarse)
        return runs


def headline(runs: dict[str, Run], ladder: dict[int, Run], coarse: int) -> dict[str, dict]:
    """The table of the demo: per model, the metrics and the resolution factor (printed)."""
    table = {}
    for label, run in runs.items():
        factor, speed_up, capped = resolution_factor(ladder, coarse, run)
        energies = run.energies[:, 1]
        table[label] = {
            "decorrelation_time": run.decorrelation_time,
            "correlation_start": float(run.correlations[0]),
            "correlation_end": float(run.correlations[-1]),
            "resolution_factor": factor,
            "factor_is_lower_bound": capped,
            "wall_time_ratio": speed_up,
            "seconds_per_time_unit": run.seconds_per_time_unit,
            "long_run_end": float(run.energies[-1, 0]),
            "max_energy": float(np.max(energies)),
            "finite": bool(np.all(np.isfinite(energies))),
        }
    log(f"{'model':>26} | t(ρ<0.95) | resolution factor | wall-time ratio | s / time unit")
    for label, row in table.items():
        bound = "≥" if row["factor_is_lower_bound"] else " "
        factor = row["resolution_factor"]
        log(
            f"{label:>26} | {row['decorrelation_time']:9.3f} | {bound}{factor:16.2f}"
            f" | {row['wall_time_ratio']:15.2f} | {row['seconds_per_time_unit']:.3f}"
        )
    return table
