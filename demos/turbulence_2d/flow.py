"""Forced 2D turbulence in a free-slip box: the plain DOLFINx parts of ``demo_turbulence_2d.py``.

Vorticity–streamfunction form on the box ``Ω = (0, L)²``, ``L = 2π``:

    ω_t + u·∇ω = ν Δω − α ω + f,    −Δψ = ω,    u = curl ψ = (ψ_y, −ψ_x),

with Kolmogorov forcing ``f = n sin(n y)`` (the curl of the body force ``(cos(n y), 0)``),
linear drag ``α`` (as in Kochkov et al. 2021) and free-slip walls: ``ψ = 0`` (no flow
through the walls) and ``ω = 0`` (no tangential stress) on ``∂Ω``. DOLFINx has no periodic
constraints on this stack (``dolfinx_mpc`` is not installable from pip), hence the box.

**Discretisation.** ``ω`` in P1 and ``ψ`` in P2 on a uniform ``n × n`` triangle mesh, one
mixed unknown ``w = (ω, ψ)``. P2 for ψ gives a piecewise-linear velocity, so that the
velocity gradient (what a Smagorinsky or a learned closure reads) is a cell-wise constant
rather than zero, and ``u = curl ψ`` is exactly divergence-free with ``u·n = 0`` on the
walls: advection in flux form conserves enstrophy in space. IMEX Euler, with diffusion,
drag and the streamfunction implicit and advection, forcing and closure explicit:

    ((ω − ωⁿ)/Δt, v) + ν(∇ω, ∇v) + α(ω, v)
        = (uⁿ ωⁿ, ∇v) − ½Δt (uⁿ·∇ωⁿ, uⁿ·∇v) + (f, v) + (τⁿ, ∇v)
    (∇ψ, ∇q) − (ω, q) = 0

The ``½Δt`` term is the Taylor–Galerkin (Lax–Wendroff) correction of explicit advection
(Donea 1984): forward Euler on the skew-symmetric Galerkin advection amplifies every
resolved mode, and at coarse resolutions faster than viscosity damps it (measured: a 32²
run blows up within 2 time units); with the correction the explicit part is second order
in time and stable under a CFL condition, and it stays a one-step scheme (the
differentiable rollouts of :mod:`dolfinx_mno.rollout` also take two-level ones, through
the stepper's ``older`` states, as ``memory=True`` uses).

The matrix of a step is constant (block lower-triangular), factorised once by MUMPS and
reused, so a step is one right-hand side assembly and one pair of triangular solves.

**A third-order alternative** (``scheme="ssprk3"``, with
:class:`dolfinx_mno.timestepping.SSPRK3Stepper`; ``experiments/turbulence_2d_time_scheme.py``
measures what the time scheme costs the coarse models). The forward Euler step ``E`` of
every term but the streamfunction (which stays implicit: the same block matrix, now with
the mass matrix alone in the vorticity block), taken as the stage of Shu and Osher's
SSP-RK3:

    w⁽¹⁾ = E(wⁿ),   w⁽²⁾ = ¾ wⁿ + ¼ E(w⁽¹⁾),   wⁿ⁺¹ = ⅓ wⁿ + ⅔ E(w⁽²⁾)

Three right-hand sides and solves per step, with one constant matrix; third order in time,
and stable on the imaginary axis up to ``|λΔt| = √3`` (advection) and on the negative real
axis up to 2.5 (viscosity and drag: explicit viscosity needs ``ν Δt / h² ≲ 0.2``, which
the meshes here satisfy by a factor of 20 or more). Closures are updated at every stage,
and a differentiable rollout (:mod:`dolfinx_mno.rollout`) follows the three stages.

**The closure ``τ`` (a vector: a subgrid vorticity flux).** Testing the fine equations with
a coarse ``v`` (nested meshes: the coarse P1 space lies in the fine one) and writing ``ω̄``
for the L² projection of the fine ``ω`` onto the coarse P1 functions that vanish on the
walls gives the coarse equations above with, on each coarse cell ``K``,

    τ = avg_K(u ω − ν∇ω) − avg_K(ū ω̄ − ν∇ω̄),

``ū`` the coarse velocity of ``ω̄`` (``∇v`` is constant on ``K``, so only cell averages
matter). This is the commutator of filter and coarse operator in flux form.

Like the demos, this module needs ``demos/`` on ``sys.path`` for ``utilities``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mpi4py import MPI

import basix.ufl
import numpy as np
import ufl
from dolfinx import fem, mesh
from utilities import boundary_dofs, march

import dolfinx_mno as mno
from dolfinx_mno.data import L2Projection
from dolfinx_mno.petsc import LinearProblem
from dolfinx_mno.timestepping import IMEXStepper, SSPRK3Stepper

length = 2.0 * np.pi
"""Side of the box."""
forcing_wavenumber = 4
"""Kolmogorov forcing ``n sin(n y)``."""
drag = 0.1
"""Linear drag ``α``."""

schemes = ("euler", "ssprk3")
"""The time schemes of :class:`VorticityFlow`."""

#: ``closure(omega_n, velocity_n) -> (tau, measure)``: a UFL vector (or a closure) and the
#: measure of ``dt * inner(tau, grad(v))``.
ClosureCallback = Callable[[Any, Any], tuple[Any, ufl.Measure]]


def box(comm: MPI.Comm, n: int, checkerboard: int | None = None) -> mesh.Mesh:
    """The uniform ``n × n`` triangle mesh of the box (nested for meshes ``n`` divides).

    By default every square is split along the same diagonal (DOLFINx's ``"right"``), so
    the mesh is not symmetric under the flow's mirror ``y → L − y``. With
    ``checkerboard=m`` (``n`` a multiple of ``m``), the squares inside square ``(I, J)`` of
    an ``m × m`` partition take the diagonal ``/`` where ``I + J`` is even and ``\\``
    where it is odd (DOLFINx's alternating ``"left_right"`` pattern for ``n = m``). For
    even ``m`` the mirror maps the mesh onto itself, and for every ``n`` it is the uniform
    red refinement of the ``m × m`` one: the nested-mesh restrictions
    (``L2Projection(subdivisions=...)``, ``CellAverage``) stay exact between such meshes
    of the same ``m``.

    Raises:
        ValueError: ``checkerboard`` is not a positive divisor of ``n``.
    """
    if checkerboard is None:
        return mesh.create_rectangle(comm, [[0.0, 0.0], [length, length]], [n, n])
    if not (0 < checkerboard <= n and n % checkerboard == 0):
        raise ValueError(f"checkerboard must divide n = {n}, got {checkerboard}.")
    cells, x = np.empty((0, 3), dtype=np.int64), np.empty((0, 2))
    if comm.rank == 0:  # rank 0 builds the mesh, create_mesh distributes it
        coordinates = np.linspace(0.0, length, n + 1)
        x = np.stack(np.meshgrid(coordinates, coordinates, indexing="ij"), -1).reshape(-1, 2)
        i, j = (index.ravel() for index in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
        v00 = i * (n + 1) + j  # the corners of square (i, j): vertex (a, b) is a (n + 1) + b
        v10, v01, v11 = v00 + n + 1, v00 + 1, v00 + n + 2
        block = n // checkerboard
        rising = ((i // block + j // block) % 2 == 0)[:, None]  # diagonal v00–v11, else v10–v01
        cells = np.concatenate([
            np.where(rising, np.stack([v00, v10, v11], 1), np.stack([v00, v10, v01], 1)),
            np.where(rising, np.stack([v00, v11, v01], 1), np.stack([v10, v11, v01], 1)),
        ]).astype(np.int64)  # fmt: skip
    element = basix.ufl.element("Lagrange", "triangle", 1, shape=(2,))
    # ghosted as create_rectangle's (its default partitioner on several ranks)
    partitioner = mesh.create_cell_partitioner(mesh.GhostMode.shared_facet, 2)
    return mesh.create_mesh(comm, cells, element, x, partitioner=partitioner)


def velocity(psi: Any) -> Any:
    """``u = curl ψ = (ψ_y, −ψ_x)`` as a UFL vector."""
    return ufl.as_vector((psi.dx(1), -psi.dx(0)))


def initial_vorticity(
    seed: int, amplitude: float = 4.0, peak: float = 6.0
) -> Callable[[np.ndarray], np.ndarray]:
    """A random vorticity ``Σ a_kl sin(kπx/L) sin(lπy/L)`` (``ω = 0`` on the walls).

    The amplitudes are Gaussian with an envelope peaked at ``|κ| L/π = peak`` and scaled
    so that the root mean square of ``ω`` is ``amplitude``; ``seed`` picks the draw.
    Returns a function of the coordinates ``(3, N)`` for ``fem.Function.interpolate``.
    """
    modes = np.arange(1, 4 * int(peak) + 1)
    k, m = np.meshgrid(modes, modes, indexing="ij")
    radius = np.hypot(k, m)
    envelope = radius**4 * np.exp(-2.0 * (radius / peak) ** 2)
    coefficients = np.random.default_rng(seed).standard_normal(k.shape) * np.sqrt(envelope)
    coefficients *= amplitude / np.sqrt(np.sum(coefficients**2) / 4.0)

    def omega(x: np.ndarray) -> np.ndarray:
        sx = np.sin(np.pi * np.outer(modes, x[0]) / length)  # (modes, N)
        sy = np.sin(np.pi * np.outer(modes, x[1]) / length)
        return np.einsum("kl,kn,ln->n", coefficients, sx, sy)

    return omega


class VorticityFlow:
    """IMEX Euler for the vorticity–streamfunction equations on an ``n × n`` box mesh.

    Args:
        n: Cells per side.
        dt: Time step.
        nu: Viscosity.
        closure: Optional ``closure(omega_n, velocity_n) -> (tau, measure)``; ``tau`` enters
            as ``+ dt * inner(tau, grad(v)) * measure``. Closures of type
            :class:`dolfinx_mno.ClosureBase` are updated by the solver.
        closure_interval: Update the learned closures every this many steps.
        source: Optional ``source(omega_n, velocity_n) -> (s, measure)``, a scalar
            vorticity source entering as ``+ dt * s * v * measure`` (a correction of the
            whole step, not only of the flux). At most one of ``closure`` and ``source``
            may be a :class:`dolfinx_mno.ClosureBase`.
        source_damping: Optional rate ``α`` (a constant the caller sets at every step) of a
            term ``- dt * α * omega_n * v * dx`` beside the source: a caller that sets
            ``α = max(0, (s, ω̄)) / (ω̄, ω̄)`` removes the enstrophy the source would inject.
        scheme: ``"euler"`` (IMEX Euler with the Taylor–Galerkin correction) or
            ``"ssprk3"`` (three explicit Euler stages combined as SSP-RK3, the
            streamfunction implicit; see the module docstring), which takes neither
            ``memory`` nor a ``closure_interval``.
        hold_closures: With ``"ssprk3"``: update the closures once per step, at ``wⁿ``,
            and keep them over the three stages (a third of their cost; the closure term
            first order in time), as the exact-τ oracles do.
        memory: Keep the vorticity of the step before too (``w_older``, ``older=`` of the
            stepper), and call ``source(omega_n, velocity_n, previous=omega_older)``: a
            source with memory of the last step, which a rollout differentiates through
            both time levels.
        domain: The mesh to use (else :func:`box` of ``n``), so that models share one.
        checkerboard: Without ``domain``, :func:`box`'s: a mesh symmetric under the mirror
            ``y → L − y``.
        name: Prefix of the PETSc options and function names.
        comm: Communicator.
    """

    def __init__(
        self,
        n: int,
        dt: float,
        nu: float,
        closure: ClosureCallback | None = None,
        closure_interval: int = 1,
        domain: mesh.Mesh | None = None,
        name: str = "flow",
        comm: MPI.Comm = MPI.COMM_WORLD,
        source: ClosureCallback | None = None,
        source_damping: fem.Constant | None = None,
        memory: bool = False,
        scheme: str = "euler",
        hold_closures: bool = False,
        checkerboard: int | None = None,
    ):
        if scheme not in schemes:
            raise ValueError(f"scheme must be one of {schemes}, got {scheme!r}.")
        if scheme != "euler" and (memory or closure_interval != 1):
            raise ValueError(f"scheme={scheme!r} takes neither memory nor a closure_interval.")
        if hold_closures and scheme != "ssprk3":
            raise ValueError(f"hold_closures needs several stages: scheme={scheme!r} has one.")
        self.scheme, self.hold_closures = scheme, hold_closures
        self.comm, self.n, self.dt, self.nu = comm, n, dt, nu
        self.closure_interval = closure_interval
        if domain is not None and checkerboard is not None:
            raise ValueError("checkerboard shapes the mesh of n; a given domain has its own.")
        self.mesh = domain if domain is not None else box(comm, n, checkerboard)
        cell = self.mesh.basix_cell()
        P1, P2 = basix.ufl.element("Lagrange", cell, 1), basix.ufl.element("Lagrange", cell, 2)
        self.W = fem.functionspace(self.mesh, basix.ufl.mixed_element([P1, P2]))
        self.V, self.V_to_W = self.W.sub(0).collapse()
        self.Q, self.Q_to_W = self.W.sub(1).collapse()
        self.w = fem.Function(self.W, name=f"{name}_w")
        self.w_previous = fem.Function(self.W, name=f"{name}_w_previous")
        self.omega_n, self.psi_n = ufl.split(self.w_previous)
        #: ``[w_{n-1}]`` with ``memory``, else ``[]``: the stepper's older states.
        self.older = [fem.Function(self.W, name=f"{name}_w_older")] if memory else []
        self.velocity_n = velocity(self.psi_n)
        self.time = fem.Constant(self.mesh, 0.0)

        x = ufl.SpatialCoordinate(self.mesh)
        self.forcing = forcing_wavenumber * ufl.sin(forcing_wavenumber * x[1])
        omega, psi = ufl.TrialFunctions(self.W)
        v, q = ufl.TestFunctions(self.W)
        dot, grad, dx = ufl.inner, ufl.grad, ufl.dx
        a = omega * v * dx + (dot(grad(psi), grad(q)) - omega * q) * dx
        L = (
            self.omega_n * v
            + dt * self.omega_n * dot(self.velocity_n, grad(v))
            + dt * self.forcing * v
        ) * dx
        if scheme == "euler":  # viscosity and drag implicit; Taylor–Galerkin advection
            a += (dt * nu * dot(grad(omega), grad(v)) + dt * drag * omega * v) * dx
            advection = dot(self.velocity_n, grad(self.omega_n))
            L -= 0.5 * dt**2 * advection * dot(self.velocity_n, grad(v)) * dx
        else:  # every term explicit but the streamfunction
            L -= (dt * nu * dot(grad(self.omega_n), grad(v)) + dt * drag * self.omega_n * v) * dx
        learned = []
        if closure is not None:
            tau, measure = closure(self.omega_n, self.velocity_n)
            L += dt * dot(tau, grad(v)) * measure
            learned.append(tau)
        if source is not None:
            if memory:
                previous = ufl.split(self.older[0])[0]
                s, measure = source(self.omega_n, self.velocity_n, previous=previous)
            else:
                s, measure = source(self.omega_n, self.velocity_n)
            L += dt * s * v * measure
            learned.append(s)
        if source_damping is not None:
            L -= dt * source_damping * self.omega_n * v * dx
        learned = [c for c in learned if isinstance(c, mno.ClosureBase)]
        if len(learned) > 1:
            raise ValueError("At most one of closure and source may be a learned closure.")
        self.closure = learned[0] if learned else None
        #: The forms of a step, ``a(w, (v, q)) = L((v, q))`` (UFL, before the conditions).
        self.a, self.L = a, L
        self.bcs = [
            fem.dirichletbc(0.0, boundary_dofs(self.W.sub(i)), self.W.sub(i)) for i in (0, 1)
        ]
        self.problem = LinearProblem(
            a,
            L,
            u=self.w,
            bcs=self.bcs,
            reuse_matrix=True,
            petsc_options_prefix=f"{name}_",
            petsc_options={
                "ksp_type": "preonly",
                "pc_type": "lu",
                "pc_factor_mat_solver_type": "mumps",
            },
        )
        self._poisson: LinearProblem | None = None
        self._energy: fem.Form | None = None

    @property
    def omega(self) -> fem.Function:
        """The current vorticity as a P1 function (a copy)."""
        out = fem.Function(self.V, name="vorticity")
        out.x.array[:] = self.w.x.array[self.V_to_W]
        return out

    def set_vorticity(
        self,
        omega: fem.Function | Callable[[np.ndarray], np.ndarray],
        previous: fem.Function | None = None,
    ) -> None:
        """Set the state from a vorticity: ``ω`` interpolated in P1, ``ψ`` solved for.

        ``omega``: a P1 function on this mesh or a function of the coordinates. ``ψ`` is
        the discrete streamfunction of ``ω`` (``(∇ψ, ∇q) = (ω, q)``, ``ψ = 0`` on the
        walls), so that a step starting here is the same as a step of the run.
        ``previous``: with ``memory``, the vorticity of the step before (P1 function);
        default ``omega`` (no change over the last step).
        """
        levels = [(omega, (self.w, self.w_previous))]
        if self.older:
            levels.append((omega if previous is None else previous, (self.older[0],)))
        for vorticity, targets in levels:
            source = fem.Function(self.V)
            if isinstance(vorticity, fem.Function):
                source.x.array[:] = vorticity.x.array
            else:
                source.interpolate(vorticity)
            psi = self._solve_streamfunction(source)
            for target in targets:
                target.x.array[self.V_to_W] = source.x.array
                target.x.array[self.Q_to_W] = psi.x.array
                target.x.scatter_forward()

    def _solve_streamfunction(self, omega: fem.Function) -> fem.Function:
        if self._poisson is None:
            self._source = fem.Function(self.V)
            psi, q = ufl.TrialFunction(self.Q), ufl.TestFunction(self.Q)
            bc = fem.dirichletbc(0.0, boundary_dofs(self.Q), self.Q)
            self._poisson = LinearProblem(
                ufl.inner(ufl.grad(psi), ufl.grad(q)) * ufl.dx,
                self._source * q * ufl.dx,
                bcs=[bc],
                reuse_matrix=True,
                petsc_options_prefix=f"{self.problem.solver.getOptionsPrefix()}poisson_",
                petsc_options={
                    "ksp_type": "preonly",
                    "pc_type": "lu",
                    "pc_factor_mat_solver_type": "mumps",
                },
            )
        self._source.x.array[:] = omega.x.array
        return self._poisson.solve()

    def run(
        self,
        t0: float,
        t1: float,
        callback: Callable[[float], None] | None = None,
        every: int = 1,
        progress: str | None = None,
    ) -> float:
        """March the current state from ``t0`` to ``t1``.

        ``callback(t)`` is called at ``t0`` and every ``every`` steps. The run stops early
        if the state is no longer finite (the caller sees the missing records).
        ``progress``: the label of a progress bar on rank 0, or None.

        Returns:
            The wall time of the steps (closure updates included), the slowest rank's.
        """
        return march(self.stepper(t0), round((t1 - t0) / self.dt), callback, every, progress)

    def stepper(self, t0: float = 0.0, closure_interval: int | None = None) -> IMEXStepper:
        """The time loop of this flow's scheme from ``t0``.

        ``closure_interval``: instead of the flow's (a rollout needs 1: the closures of
        every step are differentiated).
        """
        if self.scheme == "ssprk3":
            return SSPRK3Stepper(
                self.problem, self.w, self.w_previous, self.dt, t0, self.time,
                hold_closures=self.hold_closures,
            )  # fmt: skip
        interval = self.closure_interval if closure_interval is None else closure_interval
        return IMEXStepper(
            self.problem, self.w, self.w_previous, self.dt, t0, self.time, interval,
            older=self.older,
        )  # fmt: skip

    def energy(self) -> float:
        """Kinetic energy ``½∫|u|²`` of the current state (collective)."""
        if self._energy is None:  # compiled once: energy() is called in time loops
            u = velocity(ufl.split(self.w)[1])
            self._energy = fem.form(0.5 * ufl.inner(u, u) * ufl.dx)
        return self.comm.allreduce(fem.assemble_scalar(self._energy), op=MPI.SUM)


def spin_up(
    flow: VorticityFlow,
    seed: int,
    duration: float,
    cheap: VorticityFlow | None = None,
    fine_duration: float = 0.0,
) -> None:
    """Run ``flow`` from :func:`initial_vorticity` of ``seed`` over ``duration``.

    With ``cheap``, a flow on a coarser mesh that ``flow``'s refines, the ``duration`` runs
    there; its vorticity is then projected onto ``flow``'s (exactly: the coarse P1 space
    lies in the fine one), which runs ``fine_duration`` more to grow its small scales.
    """
    first = cheap if cheap is not None else flow
    first.set_vorticity(initial_vorticity(seed))
    first.run(0.0, duration, progress=f"spin-up {seed}, {first.n}²")
    if cheap is not None:
        flow.set_vorticity(wall_projection(flow.V)(cheap.omega))
        flow.run(0.0, fine_duration, progress=f"spin-up {seed}, {flow.n}²")


def wall_projection(V: fem.FunctionSpace, subdivisions: int = 1) -> L2Projection:
    """The filter onto V: the L² projection onto its functions that vanish on the walls.

    ``subdivisions``: the fine cells per side of a cell of V, for an exact projection of
    a function on a nested finer mesh (see :class:`~dolfinx_mno.data.L2Projection`).
    """
    bc = fem.dirichletbc(0.0, boundary_dofs(V), V)
    return L2Projection(V, subdivisions=subdivisions, bcs=[bc])


def smagorinsky(constant: fem.Constant, h: float) -> ClosureCallback:
    """Smagorinsky's eddy viscosity in vorticity form, ``τ = (C_s h)² |S| ∇ω`` (plain UFL).

    ``|S| = sqrt(2 S:S)`` with ``S`` the symmetric velocity gradient; the eddy viscosity
    diffuses vorticity, so ``τ`` enters ``(τ, ∇v)`` with the sign of ``−ν_t Δω``.
    """

    def closure(omega_n: Any, velocity_n: Any) -> tuple[Any, ufl.Measure]:
        strain = ufl.sym(ufl.grad(velocity_n))
        rate = ufl.sqrt(2.0 * ufl.inner(strain, strain) + 1e-30)
        return -((constant * h) ** 2) * rate * ufl.grad(omega_n), ufl.dx

    return closure
