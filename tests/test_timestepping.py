"""Time steppers: IMEX and implicit steps against the same schemes in UFL."""

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np
import pytest
import torch
import ufl
from analytic import FluxModel, flux_ufl
from dolfinx import fem, mesh
from problems import DIRECT, Cubic, boundary_bc

import dolfinx_mno as mno
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.timestepping import IMEXStepper, ImplicitStepper


@pytest.mark.mpi
def test_imex_step_matches_explicit_ufl():
    """IMEX heat steps with a closure r(u_n) equal the same scheme written in UFL."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 12, 12)
    V = fem.functionspace(msh, ("Lagrange", 1))
    dt = 0.01
    results = []
    for use_closure, reuse in ((True, False), (True, True), (False, False)):
        u_n = fem.Function(V)
        u_n.interpolate(lambda x: 2 * np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]))
        uh = fem.Function(V)
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        time = fem.Constant(msh, PETSc.ScalarType(0.0))
        f = ufl.cos(time) * 3.0
        a = (u * v + dt * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
        L = (u_n + dt * f) * v * ufl.dx
        if use_closure:
            closure = mno.Closure(Cubic().double(), [u_n], quadrature_degree=3)
            L -= dt * closure * v * closure.dx
        else:
            L -= dt * u_n**3 * v * ufl.dx(metadata={"quadrature_degree": 3})
        problem = LinearProblem(
            a,
            L,
            u=uh,
            bcs=[boundary_bc(V)],
            petsc_options=DIRECT,
            petsc_options_prefix=f"imex{int(use_closure)}{int(reuse)}_",
            reuse_matrix=reuse,
        )
        stepper = IMEXStepper(problem, uh, u_n, dt=dt, time=time)
        t = stepper.run(5, progress=False)
        assert t == pytest.approx(5 * dt)
        assert time.value == pytest.approx(5 * dt)
        results.append(u_n.x.array.copy())
        if use_closure:
            assert closure.update_count == 5
            assert closure.total_timings["total"] >= closure.timings["total"] > 0
    comm = msh.comm
    scale = comm.allreduce(np.max(np.abs(results[-1])), op=MPI.MAX)
    assert scale > 0.5
    for result in results[:-1]:
        diff = comm.allreduce(np.max(np.abs(result - results[-1])), op=MPI.MAX)
        assert diff <= 100 * np.finfo(np.float64).eps * scale


@pytest.mark.mpi
def test_imex_closure_interval_holds_values():
    """closure_interval=3: r(u) at steps 0 and 3 only, as a UFL scheme with a frozen copy."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 10, 10)
    V = fem.functionspace(msh, ("Lagrange", 1))
    dt, num_steps, interval = 0.02, 5, 3
    results = []
    for use_closure in (True, False):
        u_n = fem.Function(V)
        u_n.interpolate(lambda x: 2 * np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]))
        frozen = fem.Function(V)  # the UFL scheme's state seen by the reaction term
        uh = fem.Function(V)
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        a = (u * v + dt * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
        L = u_n * v * ufl.dx
        if use_closure:
            closure = mno.Closure(Cubic().double(), [u_n], quadrature_degree=3)
            L -= dt * closure * v * closure.dx
        else:
            L -= dt * frozen**3 * v * ufl.dx(metadata={"quadrature_degree": 3})
        problem = LinearProblem(
            a,
            L,
            u=uh,
            bcs=[boundary_bc(V)],
            petsc_options=DIRECT,
            petsc_options_prefix=f"interval{int(use_closure)}_",
        )
        if use_closure:
            stepper = IMEXStepper(problem, uh, u_n, dt=dt, closure_interval=interval)
            stepper.run(num_steps, progress=False)
            assert closure.update_count == 2  # steps 0 and 3
        else:
            stepper = IMEXStepper(problem, uh, u_n, dt=dt)
            for step in range(num_steps):
                if step % interval == 0:
                    frozen.x.array[:] = u_n.x.array
                stepper.step()
        results.append(u_n.x.array.copy())
    comm = msh.comm
    scale = comm.allreduce(np.max(np.abs(results[1])), op=MPI.MAX)
    diff = comm.allreduce(np.max(np.abs(results[0] - results[1])), op=MPI.MAX)
    assert scale > 0.2
    assert diff <= 100 * np.finfo(np.float64).eps * scale
    with pytest.raises(ValueError, match="closure_interval"):
        IMEXStepper(problem, uh, u_n, dt=dt, closure_interval=0)


class Poisoned(torch.nn.Module):
    """FluxModel that returns NaN once ``poisoned`` is set: makes Newton fail on demand."""

    def __init__(self):
        super().__init__()
        self.flux = FluxModel()
        self.poisoned = False

    def forward(self, x):
        q = self.flux(x)
        return q * torch.nan if self.poisoned else q


def _implicit_heat(V, use_closure, model=None, prefix="implicit"):
    """Backward Euler for u_t = div q(u, ∇u) + f(t), u = 0 on the boundary."""
    msh = V.mesh
    dt = 0.02
    u_n = fem.Function(V)
    u_n.interpolate(lambda x: 2 * np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]))
    uh = fem.Function(V)
    uh.x.array[:] = u_n.x.array
    v = ufl.TestFunction(V)
    time = fem.Constant(msh, PETSc.ScalarType(0.0))
    x = ufl.SpatialCoordinate(msh)
    f = 5.0 * ufl.cos(10 * time) * ufl.sin(ufl.pi * x[0]) + 2.0
    F = ((uh - u_n) / dt - f) * v * ufl.dx
    if use_closure:
        closure = mno.Closure(model or FluxModel().double(), [uh, ufl.grad(uh)], (2,), 2)
        F += ufl.inner(closure, ufl.grad(v)) * closure.dx
    else:
        F += ufl.inner(flux_ufl(uh), ufl.grad(v)) * ufl.dx(metadata={"quadrature_degree": 2})
    options = {"snes_rtol": 1e-12, "snes_atol": 1e-13, **DIRECT}
    problem = NonlinearProblem(
        F, uh, bcs=[boundary_bc(V)], petsc_options=options, petsc_options_prefix=prefix
    )
    return ImplicitStepper(problem, uh, u_n, dt=dt, time=time), time


@pytest.mark.mpi
def test_implicit_stepper_matches_pure_ufl():
    """Backward Euler with a nonlinear flux closure equals the same scheme in UFL."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 12, 12)
    V = fem.functionspace(msh, ("Lagrange", 1))
    results, iterations = [], []
    for use_closure in (True, False):
        stepper, time = _implicit_heat(V, use_closure, prefix=f"implicit{int(use_closure)}_")
        counts: list[int] = []
        t = stepper.run(
            4,
            callback=lambda s, counts=counts: counts.append(s.problem.solver.getIterationNumber()),
            progress=False,
        )
        assert t == pytest.approx(4 * stepper.dt) and time.value == pytest.approx(t)
        assert stepper.num_steps == 4
        results.append(stepper.u_previous.x.array.copy())
        iterations.append(counts)
    assert iterations[0] == iterations[1] and min(iterations[0]) >= 3  # genuinely nonlinear
    comm = msh.comm
    scale = comm.allreduce(np.max(np.abs(results[1])), op=MPI.MAX)
    diff = comm.allreduce(np.max(np.abs(results[0] - results[1])), op=MPI.MAX)
    assert scale > 0.5
    assert diff <= 1e-10 * scale


@pytest.mark.mpi
def test_implicit_stepper_failure_keeps_state():
    """A step whose Newton solve fails raises on every rank and leaves u, u_n and t alone."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    V = fem.functionspace(msh, ("Lagrange", 1))
    model = Poisoned().double()
    stepper, time = _implicit_heat(V, True, model=model, prefix="poisoned_")
    stepper.step()
    state = stepper.u_previous.x.array.copy()
    model.poisoned = True
    with pytest.raises(mno.ClosureEvaluationError, match="returned NaN/Inf") as info:
        stepper.step()
    assert "from t = 0.02 to t = 0.04" in info.value.__notes__[0]
    assert stepper.num_steps == 1
    assert stepper.t == pytest.approx(0.02) and time.value == pytest.approx(0.02)
    np.testing.assert_array_equal(stepper.u_previous.x.array, state)
    np.testing.assert_array_equal(stepper.u.x.array, state)
    model.poisoned = False  # the stepper goes on from where it was
    assert stepper.step() == pytest.approx(0.04)
    with pytest.raises(ValueError, match="time step must be positive"):
        ImplicitStepper(stepper.problem, stepper.u, stepper.u_previous, dt=0.0)
