"""Solvers with closures: Newton iteration counts, convergence rates and IMEX steps."""

import gc
import re
import subprocess
import sys
import weakref
from pathlib import Path

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np
import pytest
import torch
import ufl
from analytic import FluxModel, flux_ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.timestepping import IMEXStepper, ImplicitStepper

MPIRUN = Path(sys.executable).parent / "mpirun"
DESTROY_JOB = Path(__file__).with_name("destroy_order_job.py")
DIRECT = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}


def _boundary_bc(V):
    msh = V.mesh
    msh.topology.create_connectivity(msh.topology.dim - 1, msh.topology.dim)
    facets = mesh.exterior_facet_indices(msh.topology)
    dofs = fem.locate_dofs_topological(V, msh.topology.dim - 1, facets)
    return fem.dirichletbc(0.0, dofs, V)


def _l2(expr, msh, degree=8):
    form = fem.form(ufl.inner(expr, expr) * ufl.dx(metadata={"quadrature_degree": degree}))
    return np.sqrt(msh.comm.allreduce(fem.assemble_scalar(form), op=MPI.SUM))


class Source(torch.nn.Module):
    """f(x) = 2π² sin(πx) sin(πy): the source of u = sin(πx) sin(πy) for -Δu = f."""

    def forward(self, x):
        return 2 * np.pi**2 * torch.sin(np.pi * x[:, 0]) * torch.sin(np.pi * x[:, 1])


@pytest.mark.mpi
@pytest.mark.parametrize("degree,rate", [(1, 2.0), (2, 3.0)])
def test_manufactured_source_converges_at_fe_rate(degree, rate):
    """-Δu = closure(x) with the closure as the only source: L2 rate ≈ degree + 1."""
    errors = []
    sizes = [8, 16, 32]
    for n in sizes:
        msh = mesh.create_unit_square(MPI.COMM_WORLD, n, n)
        V = fem.functionspace(msh, ("Lagrange", degree))
        x = ufl.SpatialCoordinate(msh)
        closure = mno.Closure(Source().double(), [x], mesh=msh, quadrature_degree=2 * degree + 2)
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        a = ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
        L = ufl.inner(closure, v) * closure.dx
        problem = LinearProblem(
            a, L, bcs=[_boundary_bc(V)], petsc_options=DIRECT, petsc_options_prefix="mms_"
        )
        uh = problem.solve()
        exact = ufl.sin(ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1])
        errors.append(_l2(uh - exact, msh))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert rates[-1] == pytest.approx(rate, abs=0.1), (errors, rates)


def _nonlinear_diffusion(n, use_closure, model=None, degree=1, msh=None):
    """-div q(u, ∇u) = f on the unit square, u = 0 on the boundary, solved by Newton.

    The flux is integrated with the degree-``2 degree`` rule; ``msh`` replaces the
    ``n × n`` mesh.
    """
    msh = msh or mesh.create_unit_square(MPI.COMM_WORLD, n, n)
    V = fem.functionspace(msh, ("Lagrange", degree))
    q = 2 * degree
    u = fem.Function(V)
    v = ufl.TestFunction(V)
    x = ufl.SpatialCoordinate(msh)
    f = 10 * ufl.sin(ufl.pi * x[0]) * ufl.sin(2 * ufl.pi * x[1]) + 5.0
    opts = {
        "snes_type": "newtonls",
        "snes_linesearch_type": "none",
        "snes_rtol": 1e-12,
        "snes_atol": 1e-13,
        "snes_max_it": 30,
        **DIRECT,
    }
    if use_closure:
        closure = mno.Closure(model or FluxModel().double(), [u, ufl.grad(u)], (2,), q)
        F = ufl.inner(closure, ufl.grad(v)) * closure.dx - f * v * ufl.dx
        problem = NonlinearProblem(
            F, u, bcs=[_boundary_bc(V)], petsc_options=opts, petsc_options_prefix="nl_closure_"
        )
    else:
        dx = ufl.dx(metadata={"quadrature_degree": q})
        F = ufl.inner(flux_ufl(u), ufl.grad(v)) * dx - f * v * ufl.dx
        problem = NonlinearProblem(
            F, u, bcs=[_boundary_bc(V)], petsc_options=opts, petsc_options_prefix="nl_ufl_"
        )
    history = []
    problem.solver.setMonitor(lambda snes, it, norm: history.append(norm))
    problem.solve()
    assert problem.solver.getConvergedReason() > 0
    return u, problem.solver.getIterationNumber(), history


@pytest.mark.mpi
def test_newton_matches_pure_ufl():
    """Same iteration count and solution as the pure-UFL problem; quadratic convergence."""
    u_c, its_c, hist_c = _nonlinear_diffusion(16, True)
    u_u, its_u, hist_u = _nonlinear_diffusion(16, False)
    assert its_c == its_u
    assert its_c >= 4  # a genuinely nonlinear solve
    comm = u_c.function_space.mesh.comm
    diff = comm.allreduce(np.max(np.abs(u_c.x.array - u_u.x.array)), op=MPI.MAX)
    scale = comm.allreduce(np.max(np.abs(u_u.x.array)), op=MPI.MAX)
    assert diff <= 1e-10 * scale
    # Quadratic convergence: the estimated order log(r_{k+1}/r_k) / log(r_k/r_{k-1}) ≈ 2
    # for the iterates above round-off.
    r = np.array(hist_c)
    orders = [
        np.log(r[k + 1] / r[k]) / np.log(r[k] / r[k - 1])
        for k in range(1, len(r) - 1)
        if r[k + 1] > 1e-12
    ]
    assert len(orders) >= 2 and min(orders[-2:]) > 1.8, (r, orders)
    np.testing.assert_allclose(hist_c, hist_u, rtol=1e-6, atol=1e-13)


@pytest.mark.mpi
def test_newton_on_a_rank_without_cells(tiny_square):
    """Newton with a closure where (on 3 ranks) a rank owns no cells: as pure UFL."""
    u_c, its_c, hist_c = _nonlinear_diffusion(1, True, degree=3, msh=tiny_square)
    u_u, its_u, hist_u = _nonlinear_diffusion(1, False, degree=3, msh=tiny_square)
    assert its_c == its_u
    assert its_c >= 3  # a genuinely nonlinear solve
    comm = tiny_square.comm
    diff = comm.allreduce(np.max(np.abs(u_c.x.array - u_u.x.array), initial=0.0), op=MPI.MAX)
    scale = comm.allreduce(np.max(np.abs(u_u.x.array), initial=0.0), op=MPI.MAX)
    assert scale > 0.1
    assert diff <= 1e-12 * scale
    np.testing.assert_allclose(hist_c, hist_u, rtol=1e-8, atol=1e-13)


@pytest.mark.mpi
def test_newton_reevaluates_closure_every_iterate():
    """The closure is updated once per residual evaluation (Newton iterate)."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    v = ufl.TestFunction(V)
    closure = mno.Closure(FluxModel().double(), [u, ufl.grad(u)], (2,), 2)
    F = ufl.inner(closure, ufl.grad(v)) * closure.dx - 10.0 * v * ufl.dx
    problem = NonlinearProblem(
        F,
        u,
        bcs=[_boundary_bc(V)],
        petsc_options_prefix="count_",
        petsc_options={"snes_linesearch_type": "none", **DIRECT},
    )
    problem.solve()
    its = problem.solver.getIterationNumber()
    assert problem.solver.getConvergedReason() > 0
    assert closure.update_count == its + 1  # one residual per iterate plus the initial one
    assert problem.closures == [closure]


class Cubic(torch.nn.Module):
    """r(u) = u³."""

    def forward(self, x):
        return x[:, 0] ** 3


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
            bcs=[_boundary_bc(V)],
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
            bcs=[_boundary_bc(V)],
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


def test_reuse_matrix_refuses_closures_in_matrix():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n = fem.Function(V)
    closure = mno.Closure(Cubic().double(), [u_n], quadrature_degree=2)
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = (1 + closure) * u * v * closure.dx
    with pytest.raises(ValueError, match="without closures"):
        LinearProblem(a, u_n * v * ufl.dx, reuse_matrix=True, petsc_options_prefix="r_")


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
        F, uh, bcs=[_boundary_bc(V)], petsc_options=options, petsc_options_prefix=prefix
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


@pytest.mark.skipif(not MPIRUN.exists(), reason="needs mpirun next to the Python executable")
@pytest.mark.parametrize("ranks", [2, 3])
def test_rank_dependent_drop_order_does_not_deadlock(ranks):
    """Problems finalised in a different order on each rank (as the GC may) do not hang."""
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("starts its own MPI job; run it from the serial session")
    command = [str(MPIRUN), "-n", str(ranks), sys.executable, str(DESTROY_JOB)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done") == ranks  # lines of ranks may interleave
    # The garbage queue per rank: the dropped problems' solvers and vectors, then none
    # after the next problem's construction, which cleans it up collectively.
    queued = [int(n) for n in re.findall(r"Total entries: (\d+)", result.stdout)]
    assert len(queued) == 2 * ranks, result.stdout
    assert min(queued[:ranks]) > 0 and queued[ranks:] == ranks * [0], queued


@pytest.mark.mpi
def test_dropped_problems_are_freed():
    """No reference cycle keeps a problem alive: the SNES callbacks do not hold it."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    V = fem.functionspace(msh, ("Lagrange", 1))
    w, v = fem.Function(V), ufl.TestFunction(V)
    closure = mno.Closure(Cubic().double(), [w], quadrature_degree=2)
    F = (closure + w - 1.0) * v * closure.dx
    nonlinear = NonlinearProblem(F, w, petsc_options_prefix="freed_nl_", petsc_options=DIRECT)
    nonlinear.solve()
    u = ufl.TrialFunction(V)
    linear = LinearProblem(
        u * v * ufl.dx, closure * v * closure.dx, petsc_options_prefix="freed_l_"
    )
    linear.solve()
    references = [weakref.ref(nonlinear), weakref.ref(linear)]
    del nonlinear, linear
    gc.collect()
    assert [r() for r in references] == [None, None]
