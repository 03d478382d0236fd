"""The forced viscous Burgers problem of ``demo_burgers.py``: parameters, solver, comparisons.

The demo imports it, and so does ``experiments/burgers_results.py``, which measures the
demo's closures further: one definition of the problem, importable without running the
demo. :func:`write_outputs` writes the files the experiments read (their reader is
``experiments/burgers_outputs.py``). Everything here is plain DOLFINx; the closures enter
through the ``closure`` argument of :class:`Burgers`. Like the demos, it needs ``demos/``
on ``sys.path`` for ``utilities``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from mpi4py import MPI

import numpy as np
import ufl
from dolfinx import fem, io, mesh
from utilities import boundary_dofs, march

import dolfinx_mno as mno
from dolfinx_mno.petsc import LinearProblem
from dolfinx_mno.timestepping import IMEXStepper

nu = 1e-3
"""Viscosity."""
amplitude = 4.0
"""Amplitude of each forcing mode."""
wavenumbers = np.arange(1, 5)
_rng = np.random.default_rng(2022)
phases = _rng.uniform(0.0, 2.0 * np.pi, wavenumbers.size)
"""Phases of the forcing modes, seeded."""
frequencies = 2.0 * np.pi * _rng.uniform(0.5, 2.0, wavenumbers.size)
"""Angular frequencies of the forcing modes, seeded."""


class Burgers:
    """IMEX Euler for viscous Burgers on ``num_cells`` P1 cells, with an optional closure.

    ``closure(u_previous)`` returns ``(tau, measure)``: a UFL flux (or a closure) and the
    measure to integrate ``dt * tau * v.dx(0)`` with. Models on the same mesh share
    ``domain``. The learned closures are updated every ``closure_interval`` steps.
    """

    def __init__(
        self,
        num_cells: int,
        dt: float,
        closure: Callable[[fem.Function], tuple[Any, ufl.Measure]] | None = None,
        name: str = "u",
        domain: mesh.Mesh | None = None,
        closure_interval: int = 1,
        comm: MPI.Comm = MPI.COMM_WORLD,
    ):
        self.comm = comm
        self.mesh = domain or mesh.create_interval(comm, num_cells, [0.0, 1.0])
        self.V = fem.functionspace(self.mesh, ("Lagrange", 1))
        self.dt = dt
        self.closure_interval = closure_interval
        self.u = fem.Function(self.V, name=name)
        self.u_previous = fem.Function(self.V, name=f"{name}_previous")
        self.time = fem.Constant(self.mesh, 0.0)
        x = ufl.SpatialCoordinate(self.mesh)
        self.forcing = amplitude * sum(
            ufl.sin(2 * np.pi * k * x[0] + phi + omega * self.time)
            for k, phi, omega in zip(wavenumbers, phases, frequencies, strict=True)
        )
        u, v = ufl.TrialFunction(self.V), ufl.TestFunction(self.V)
        un = self.u_previous
        a = (u * v + dt * nu * u.dx(0) * v.dx(0)) * ufl.dx
        L = (un * v - dt * un * un.dx(0) * v + dt * self.forcing * v) * ufl.dx
        self.closure = None
        if closure is not None:
            tau, measure = closure(un)
            L += dt * tau * v.dx(0) * measure
            self.closure = tau if isinstance(tau, mno.ClosureBase) else None
        self.bcs = [fem.dirichletbc(0.0, boundary_dofs(self.V), self.V)]
        self.problem = LinearProblem(
            a,
            L,
            u=self.u,
            bcs=self.bcs,
            reuse_matrix=True,
            petsc_options_prefix=f"burgers_{name}_",
            petsc_options={"ksp_type": "preonly", "pc_type": "lu"},
        )

    def run(
        self,
        u0: fem.Function,
        t0: float,
        t1: float,
        callback: Callable[[float], None] | None = None,
        every: int = 1,
        progress: str | None = None,
    ) -> float:
        """March from the state ``u0`` (a function on V) at ``t0`` to ``t1``.

        ``callback(t)`` is called at ``t0`` and every ``every`` steps. The run stops early
        (with a NaN state) if the solution blows up. ``progress``: the label of a progress
        bar on rank 0, or None for none.

        Returns:
            The wall time of the steps (closure updates included, set-up and callbacks
            excluded), the slowest rank's.
        """
        self.u_previous.x.array[:] = u0.x.array
        self.u.x.array[:] = u0.x.array
        stepper = IMEXStepper(
            self.problem, self.u, self.u_previous, self.dt, t0, self.time, self.closure_interval
        )
        return march(stepper, round((t1 - t0) / self.dt), callback, every, progress)


def smagorinsky(constant: fem.Constant, h: float):
    """The closure callback of Smagorinsky's flux ``-(C_s h)² |u_x| u_x`` (plain UFL)."""

    def closure(un):
        return -((constant * h) ** 2) * abs(un.dx(0)) * un.dx(0), ufl.dx

    return closure


def nodal(u: fem.Function) -> np.ndarray:
    """Nodal values of a P1 function on an interval, gathered on every rank in order of x."""
    V, comm = u.function_space, u.function_space.mesh.comm
    owned = V.dofmap.index_map.size_local
    x = V.tabulate_dof_coordinates()[:owned, 0]
    xs = np.concatenate(comm.allgather(x))
    values = np.concatenate(comm.allgather(u.x.array[:owned]))
    return values[np.argsort(xs, kind="stable")]


def set_nodal(u: fem.Function, values: np.ndarray) -> fem.Function:
    """The inverse of :func:`nodal` on a uniform P1 mesh of (0, 1): set u from its nodal values.

    Every rank sets its owned and ghost dofs, so no scatter is needed. Returns u.
    """
    x = u.function_space.tabulate_dof_coordinates()[:, 0]
    u.x.array[:] = values[np.rint(x * (values.size - 1)).astype(np.int64)]
    return u


def relative_error(run: dict[float, np.ndarray], reference: dict[float, np.ndarray]) -> float:
    """Relative L² error over a horizon (nodal values of a uniform P1 mesh, by time).

    Infinite if the run misses a time of the reference (it blew up).
    """
    keys = sorted(reference)
    if any(k not in run for k in keys):
        return float("inf")
    a = np.array([run[k] for k in keys])
    b = np.array([reference[k] for k in keys])
    return float(np.sqrt(np.sum((a - b) ** 2) / np.sum(b**2)))


class CoarseRun(NamedTuple):
    """What :func:`coarse_run` records."""

    states: dict[float, np.ndarray]
    """Nodal values at the sampling times after the start, by time (rounded to 1e-9)."""
    energies: np.ndarray
    """``(num_records, 2)``: time and mean of the squared nodal values, start included."""
    seconds: float
    """Wall time of the steps."""


def coarse_run(
    model: Burgers, start: fem.Function, t0: float, t1: float, sample_every: float
) -> CoarseRun:
    """Run ``model`` from ``start`` at ``t0`` to ``t1``, recording every ``sample_every``."""
    states, energies = {}, []

    def callback(t):
        values = nodal(model.u)
        energies.append((t, float(np.mean(values**2))))
        if t > t0 + 1e-9:
            states[round(t, 9)] = values

    every = round(sample_every / model.dt)
    seconds = model.run(start, t0, t1, callback=callback, every=every)
    return CoarseRun(states, np.array(energies), seconds)


def write_vtx(path: Path, filtered_fine: np.ndarray, models: Iterable[Burgers], t: float) -> None:
    """A VTX file of the coarse states at time ``t`` (collective).

    Args:
        path: The ``.bp`` folder.
        filtered_fine: The dof values of the filtered fine state on the models' space.
        models: Coarse models on one mesh with the same space, each written as its
            ``u.name``.
        t: The time of the states.
    """
    models = list(models)
    space = models[0].V  # the same mesh and dof layout for every model
    states = [fem.Function(space, name="fine_filtered")]
    states[0].x.array[:] = filtered_fine
    for model in models:
        states.append(fem.Function(space, name=model.u.name))
        states[-1].x.array[:] = model.u.x.array
    with io.VTXWriter(space.mesh.comm, path, states, engine="BP4") as vtx:
        vtx.write(t)


def write_outputs(
    folder: Path, summary: dict, filtered: dict[float, np.ndarray], fine_state_test: fem.Function
) -> None:
    """Write ``summary.json`` and ``reference.npz`` into ``folder`` on rank 0 (collective).

    What ``experiments/burgers_outputs.py`` reads. ``reference.npz`` holds ``times`` and
    ``states``, the filtered fine states (nodal values in order of x) by time, and
    ``fine_state_test``, the nodal values of the fine state ``fine_state_test``.
    """
    fine_nodal = nodal(fine_state_test)
    if fine_state_test.function_space.mesh.comm.rank == 0:
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        np.savez(
            folder / "reference.npz",
            times=np.array(sorted(filtered)),
            states=np.array([filtered[t] for t in sorted(filtered)]),
            fine_state_test=fine_nodal,
        )
