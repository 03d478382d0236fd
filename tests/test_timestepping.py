"""Time steppers: IMEX and implicit steps against UFL, hooks, statistics, progress."""

import io
import typing

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
from dolfinx_mno import timestepping
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.timestepping import IMEXStepper, ImplicitStepper, StepStatistics


@pytest.mark.mpi
def test_imex_step_matches_explicit_ufl():
    """IMEX heat steps with a closure r(u_n) equal the same scheme written in UFL.

    The step size, a Constant, is halved after two steps. Before: reuse_matrix=True kept
    the matrix of the first step size, 0.23 off (of 1.07) after 5 steps on one rank. And a
    before_step hook that changed stepper.dt, as the stepper's TypeError for dt advised, set
    the solve's step size but not the stepper's time (0.04 instead of 0.035); refused now."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 12, 12)
    V = fem.functionspace(msh, ("Lagrange", 1))

    def halve_dt(stepper, t_new):
        dt.value = stepper.dt = 0.005

    results = []
    for use_closure, reuse in ((True, False), (True, True), (False, False)):
        dt = fem.Constant(msh, PETSc.ScalarType(0.01))
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
        stepper = IMEXStepper(problem, uh, u_n, dt=float(dt.value), time=time)
        stepper.run(2, progress=False)
        message = r"before_step changed stepper.dt from 0.01 to 0.005 in the step to t = 0.03,"
        with pytest.raises(ValueError, match=message):
            stepper.step(halve_dt)
        assert (stepper.dt, stepper.num_steps, time.value) == (0.01, 2, pytest.approx(0.02))
        dt.value = stepper.dt = 0.005  # between steps
        t = stepper.run(3, progress=False)
        assert t == pytest.approx(0.035)
        assert time.value == pytest.approx(0.035)
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
    # A NumPy integer is an integer (it was refused as "not a positive integer, got
    # np.int64(3)"); True is not 1.
    assert IMEXStepper(problem, uh, u_n, dt=dt, closure_interval=np.int64(3)).closure_interval == 3
    with pytest.raises(ValueError) as error:
        IMEXStepper(problem, uh, u_n, dt=dt, closure_interval=True)
    assert str(error.value) == "closure_interval must be a positive integer, got True."


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
        assert [record.newton_iterations for record in stepper.history] == counts
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
    assert info.value.__notes__[1].startswith("The closures could not be evaluated at the ")
    assert stepper.num_steps == 1
    assert stepper.t == pytest.approx(0.02) and time.value == pytest.approx(0.02)
    np.testing.assert_array_equal(stepper.u_previous.x.array, state)
    np.testing.assert_array_equal(stepper.u.x.array, state)
    model.poisoned = False  # the stepper goes on from where it was
    # Newton stopped after one iteration: the closure left at that iterate was left there
    # (0.3 off its values at u_n); it is back at u_n, as u is.
    (closure,) = stepper.problem.closures
    values = closure.x.array.copy()
    stepper.problem.solver.setTolerances(max_it=1)
    with pytest.raises(RuntimeError, match=r"diverged at t = 0\.04"):
        stepper.step()
    np.testing.assert_allclose(closure.x.array, values, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(stepper.u.x.array, state)
    stepper.problem.solver.setTolerances(max_it=50)
    assert stepper.step() == pytest.approx(0.04)
    with pytest.raises(ValueError, match="time step must be positive"):
        ImplicitStepper(stepper.problem, stepper.u, stepper.u_previous, dt=0.0)
    # A step size in a fem.Constant (an audit: "UFL conditions cannot be evaluated as bool").
    constant = fem.Constant(stepper.u.function_space.mesh, 0.02)
    with pytest.raises(TypeError, match=r"dt must be a positive number, got a Constant\. "):
        ImplicitStepper(stepper.problem, stepper.u, stepper.u_previous, dt=constant)


class Identity(torch.nn.Module):
    """c(s) = s."""

    def forward(self, x):
        return x[:, 0]


def _exact(t):
    """u = t (x² + 2y²), which solves u_t - Δu = x² + 2y² - 6t; in P2 and linear in t."""
    return lambda x: t * (x[0] ** 2 + 2 * x[1] ** 2)


def _source(t):
    return lambda x: x[0] ** 2 + 2 * x[1] ** 2 - 6 * t


def _imex_heat(n, prefix, options=None):
    """IMEX heat steps on P2 whose source f(t) a closure reads from a function f_h.

    Backward Euler is exact for a solution linear in t, and P2 holds it: with the
    Dirichlet data and f_h set for t_{n+1} before each step, u_h is the exact solution.
    """
    msh = mesh.create_unit_square(MPI.COMM_WORLD, n, n)
    V = fem.functionspace(msh, ("Lagrange", 2))
    u_n, uh, g, f_h = (fem.Function(V) for _ in range(4))
    source = mno.Closure(Identity().double(), [f_h], quadrature_degree=4, name="source")
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    dt = 0.05
    a = (u * v + dt * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
    L = u_n * v * ufl.dx + dt * source * v * source.dx
    time = fem.Constant(msh, PETSc.ScalarType(0.0))
    problem = LinearProblem(
        a,
        L,
        u=uh,
        bcs=[boundary_bc(V, g)],
        petsc_options=options or DIRECT,
        petsc_options_prefix=prefix,
    )
    stepper = IMEXStepper(problem, uh, u_n, dt=dt, time=time)
    return stepper, g, f_h, source


def _max_error(u, exact):
    reference = fem.Function(u.function_space)
    reference.interpolate(exact)
    comm = u.function_space.mesh.comm
    return comm.allreduce(np.max(np.abs(u.x.array - reference.x.array), initial=0.0), op=MPI.MAX)


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 4])  # n = 1 on 3 ranks: one rank owns no cell
def test_before_step_sets_dirichlet_data_and_statistics_match_the_solver(n):
    """One-line time-dependent data give the exact solution; KSP counts are the solver's."""
    options = {"ksp_type": "cg", "pc_type": "jacobi", "ksp_rtol": 1e-14, "ksp_atol": 1e-15}
    stepper, g, f_h, source = _imex_heat(n, f"hook{n}_", options)
    seen, own = [], []

    def before_step(s, t):
        g.interpolate(_exact(t))
        f_h.interpolate(_source(t))
        seen.append((s.t, t, float(s.time.value), source.update_count))

    def after_step(s):
        own.append((s.problem.solver.getIterationNumber(), s.problem.solver.getConvergedReason()))

    t = stepper.run(3, callback=after_step, progress=False, before_step=before_step)
    dt = stepper.dt
    assert t == pytest.approx(3 * dt)
    # The hook sees the old stepper time, the new time in the constant, and runs before
    # the step's closure update.
    assert len(seen) == 3
    for k, (old, new, constant, updates) in enumerate(seen):
        assert old == pytest.approx(k * dt) and new == pytest.approx((k + 1) * dt)
        assert constant == pytest.approx(new) and updates == k
    assert _max_error(stepper.u_previous, _exact(t)) < 1e-10
    assert [s.step for s in stepper.history] == [1, 2, 3]
    assert [s.t for s in stepper.history] == pytest.approx([dt, 2 * dt, 3 * dt])
    assert [(s.linear_iterations, s.converged_reason) for s in stepper.history] == own
    assert all(s.newton_iterations is None and s.seconds > 0 for s in stepper.history)
    if n > 1:
        assert min(its for its, _ in own) > 5  # a genuine iterative solve
    # Without the hook the data stay at t = 0: far from the exact solution.
    plain, *_ = _imex_heat(n, f"nohook{n}_", options)
    plain.run(3, progress=False)
    assert _max_error(plain.u_previous, _exact(t)) > 0.05


class _RecordingBar(timestepping.tqdm):
    """A progress bar that redraws at every update and records what it shows."""

    shown: typing.ClassVar[list[tuple[int, str | None]]] = []

    def __init__(self, *args, **kwargs):
        kwargs.update(mininterval=0, miniters=1, file=io.StringIO())
        super().__init__(*args, **kwargs)

    def display(self, *args, **kwargs):
        _RecordingBar.shown.append((self.n, self.postfix))
        return super().display(*args, **kwargs)


@pytest.mark.mpi
def test_progress_bar_shows_the_step_just_taken(monkeypatch):
    """Each redraw after step k shows t_k and the step's iterations, not step k - 1's."""
    monkeypatch.setattr(timestepping, "tqdm", _RecordingBar)
    _RecordingBar.shown = []
    stepper, _, f_h, _ = _imex_heat(2, "bar_")
    stepper.run(3, before_step=lambda s, t: f_h.interpolate(_source(t)))
    if MPI.COMM_WORLD.rank != 0:
        assert _RecordingBar.shown == []  # the bar is disabled on other ranks
        return
    after_steps = [(n, postfix) for n, postfix in _RecordingBar.shown if n > 0]
    assert [n for n, _ in after_steps][:3] == [1, 2, 3]
    for n, postfix in after_steps:
        record = stepper.history[n - 1]
        assert postfix == f"t={n * stepper.dt:.4g}, ksp={record.linear_iterations}"
    assert after_steps[-1][1] == "t=0.15, ksp=1"  # preonly LU: one KSP iteration


def _implicit_dirichlet(prefix):
    """Backward Euler for u_t = div q(u, ∇u) with u = g(t) = t (1 + x y) on the boundary."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n, uh, g = fem.Function(V), fem.Function(V), fem.Function(V)
    v = ufl.TestFunction(V)
    dt = 0.1
    closure = mno.Closure(FluxModel().double(), [uh, ufl.grad(uh)], (2,), 2)
    F = (uh - u_n) / dt * v * ufl.dx + ufl.inner(closure, ufl.grad(v)) * closure.dx
    options = {
        "snes_rtol": 1e-11,
        "snes_atol": 1e-12,
        "ksp_type": "gmres",
        "pc_type": "jacobi",
        "ksp_rtol": 1e-12,
    }
    time = fem.Constant(msh, PETSc.ScalarType(0.0))
    problem = NonlinearProblem(
        F, uh, bcs=[boundary_bc(V, g)], petsc_options=options, petsc_options_prefix=prefix
    )
    return ImplicitStepper(problem, uh, u_n, dt=dt, time=time), g


def _boundary_data(t):
    return lambda x: t * (1 + x[0] * x[1])


@pytest.mark.mpi
def test_implicit_stepper_hook_equals_a_hand_written_loop():
    """The hook and statistics of ImplicitStepper reproduce a hand-written time loop."""
    stepper, g = _implicit_dirichlet("hook_implicit_")
    stepper.run(3, progress=False, before_step=lambda s, t: g.interpolate(_boundary_data(t)))

    hand, g_hand = _implicit_dirichlet("hand_implicit_")
    problem, snes = hand.problem, hand.problem.solver
    t, counts, states = 0.0, [], []
    for _ in range(3):
        t += hand.dt
        hand.time.value = t
        g_hand.interpolate(_boundary_data(t))
        problem.solve()
        assert snes.getConvergedReason() > 0
        counts.append((snes.getIterationNumber(), snes.getLinearSolveIterations()))
        hand.u_previous.x.array[:] = hand.u.x.array
    states.append(hand.u_previous.x.array)

    history = stepper.history
    assert [(s.newton_iterations, s.linear_iterations) for s in history] == counts
    assert min(its for its, _ in counts) >= 3  # genuinely nonlinear
    assert min(lin for _, lin in counts) > 3 * max(its for its, _ in counts)  # GMRES works
    assert all(s.converged_reason > 0 for s in history)
    comm = MPI.COMM_WORLD
    scale = comm.allreduce(np.max(np.abs(states[0])), op=MPI.MAX)
    diff = comm.allreduce(np.max(np.abs(stepper.u_previous.x.array - states[0])), op=MPI.MAX)
    assert scale > 0.2 and diff <= 1e-14 * scale
    assert history[-1].postfix() == {
        "t": "0.3",
        "newton": history[-1].newton_iterations,
        "ksp": history[-1].linear_iterations,
    }


@pytest.mark.mpi
def test_failing_before_step_raises_on_every_rank_and_undoes_the_step():
    """A hook raising on one rank: every rank raises, and u, u_n, t, history are kept."""
    comm = MPI.COMM_WORLD
    stepper, g, f_h, _ = _imex_heat(2, "failing_hook_")
    failing_rank = comm.size - 1

    def before_step(s, t):
        if s.num_steps == 1 and comm.rank == failing_rank:
            raise ValueError("no data for this time")
        f_h.interpolate(_source(t))
        g.interpolate(_exact(t))

    stepper.step(before_step)
    state = stepper.u_previous.x.array.copy()
    with pytest.raises(ValueError) as info:  # the failing rank's type, on every rank
        stepper.run(2, progress=False, before_step=before_step)
    if comm.size == 1:
        assert str(info.value) == "no data for this time"
    else:
        assert str(info.value) == (
            f"The before_step hook failed on rank(s) [{failing_rank}] (1 of {comm.size} "
            f"ranks); on rank {failing_rank}: ValueError: no data for this time."
        )
        assert isinstance(info.value.__cause__, ValueError) == (comm.rank == failing_rank)
    assert info.value.__notes__ == ["In the time step from t = 0.05 to t = 0.1."]
    assert stepper.num_steps == 1 and len(stepper.history) == 1
    assert stepper.t == pytest.approx(0.05) and stepper.time.value == pytest.approx(0.05)
    np.testing.assert_array_equal(stepper.u_previous.x.array, state)
    np.testing.assert_array_equal(stepper.u.x.array, state)
    stepper.step(lambda s, t: (f_h.interpolate(_source(t)), g.interpolate(_exact(t))))
    assert _max_error(stepper.u_previous, _exact(0.1)) < 1e-12
    assert isinstance(stepper.history[-1], StepStatistics) and stepper.history[-1].step == 2


class _AdamsBashforthCubic(torch.nn.Module):
    """``1.5 a³ − 0.5 b³`` of the inputs ``(a, b) = (u_n, u_{n-1})``: AB2 for ``u³``."""

    def forward(self, x):
        return 1.5 * x[:, 0] ** 3 - 0.5 * x[:, 1] ** 3


def _ab2_heat(closure: bool, prefix: str):
    """Heat with ``-u³`` by Adams–Bashforth 2 (explicit) and diffusion implicit.

    Returns the stepper and its functions ``u_n``, ``u_nm1``; ``u_{-1} = u_0``.
    """
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 7)
    V = fem.functionspace(msh, ("Lagrange", 1))
    dt = 0.02
    u_n, u_nm1, uh = fem.Function(V), fem.Function(V, name="u_nm1"), fem.Function(V)
    u_n.interpolate(lambda x: 2 * np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]))
    u_nm1.x.array[:] = u_n.x.array
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = (u * v + dt * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
    L = u_n * v * ufl.dx
    if closure:
        source = mno.Closure(_AdamsBashforthCubic().double(), [u_n, u_nm1], quadrature_degree=3)
        L -= dt * source * v * source.dx
    else:
        L -= dt * (1.5 * u_n**3 - 0.5 * u_nm1**3) * v * ufl.dx(metadata={"quadrature_degree": 3})
    problem = LinearProblem(
        a, L, u=uh, bcs=[boundary_bc(V)], petsc_options=DIRECT, petsc_options_prefix=prefix
    )
    return IMEXStepper(problem, uh, u_n, dt=dt, older=[u_nm1]), u_n, u_nm1


@pytest.mark.mpi
def test_older_states_give_a_two_level_scheme():
    """AB2 with ``older=[u_nm1]``: the stepper equals a hand-written loop (UFL and closure)."""
    stepper, u_n, u_nm1 = _ab2_heat(closure=True, prefix="ab2_closure_")
    reference, r_n, r_nm1 = _ab2_heat(closure=False, prefix="ab2_ufl_")
    comm = u_n.function_space.mesh.comm
    expected_older = []
    for _ in range(4):  # the hand-written loop: solve, then shift by hand
        reference.problem.solve()
        r_nm1.x.array[:] = r_n.x.array
        r_n.x.array[:] = reference.u.x.array
        expected_older.append(r_nm1.x.array.copy())
    states = []
    stepper.run(4, progress=False, callback=lambda s: states.append(u_nm1.x.array.copy()))
    scale = comm.allreduce(np.abs(r_n.x.array).max(initial=0.0), op=MPI.MAX)
    assert scale > 0.3
    got_all, expected_all = [*states, u_n.x.array], [*expected_older, r_n.x.array]
    for got, expected in zip(got_all, expected_all, strict=True):
        error = comm.allreduce(np.abs(got - expected).max(initial=0.0), op=MPI.MAX)
        assert error <= 1e-13 * scale
    # The two levels matter: AB2 differs from forward Euler on u³ after the first step.
    differs = comm.allreduce(np.abs(u_nm1.x.array - u_n.x.array).max(initial=0.0), op=MPI.MAX)
    assert differs > 1e-3 * scale


@pytest.mark.mpi
def test_a_failed_step_keeps_the_older_states():
    stepper, u_n, u_nm1 = _ab2_heat(closure=True, prefix="ab2_fail_")
    stepper.step()
    kept = (u_n.x.array.copy(), u_nm1.x.array.copy())
    failing_rank = MPI.COMM_WORLD.size - 1

    def before_step(s, t):
        if MPI.COMM_WORLD.rank == failing_rank:
            raise RuntimeError("no data")

    with pytest.raises(RuntimeError):
        stepper.step(before_step)
    np.testing.assert_array_equal(u_n.x.array, kept[0])
    np.testing.assert_array_equal(u_nm1.x.array, kept[1])
    assert stepper.num_steps == 1


def test_bad_older_states_raise():
    msh = mesh.create_unit_square(MPI.COMM_SELF, 2, 2)
    V = fem.functionspace(msh, ("Lagrange", 1))
    W = fem.functionspace(msh, ("Lagrange", 2))
    u_n, uh = fem.Function(V), fem.Function(V)
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    problem = LinearProblem(
        u * v * ufl.dx, u_n * v * ufl.dx, u=uh, petsc_options=DIRECT, petsc_options_prefix="bad_"
    )
    with pytest.raises(ValueError, match=r"older\[0\] \('f'\) must live on the function space"):
        IMEXStepper(problem, uh, u_n, dt=0.1, older=[fem.Function(W, name="f")])
    with pytest.raises(ValueError, match="must be distinct functions, other than u and"):
        IMEXStepper(problem, uh, u_n, dt=0.1, older=[u_n])
    older = fem.Function(V)
    with pytest.raises(ValueError, match="must be distinct functions, other than u and"):
        IMEXStepper(problem, uh, u_n, dt=0.1, older=[older, older])
    with pytest.raises(TypeError, match=r"older\[0\] must be a dolfinx.fem.Function"):
        IMEXStepper(problem, uh, u_n, dt=0.1, older=[u_n.x.array])


@pytest.mark.mpi
def test_a_stepper_refuses_a_u_that_the_solve_does_not_write(tiny_square):
    """``u`` other than ``problem.u`` (e.g. ``u=`` forgotten) used to step silently: each
    step copied a never-written function into ``u_n``. Also the wrong problem class, and
    a block problem.

    Checked before any collective, the same on every rank (also one without cells).
    """
    V = fem.functionspace(tiny_square, ("Lagrange", 1))
    u_n, uh = fem.Function(V), fem.Function(V)
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    forgotten = LinearProblem(
        u * v * ufl.dx, u_n * v * ufl.dx, petsc_options=DIRECT, petsc_options_prefix="nou_"
    )
    message = r"^u must be the problem's solution function \(problem.u\): the solve writes"
    with pytest.raises(ValueError, match=message):
        IMEXStepper(forgotten, uh, u_n, dt=0.1)
    w, w_n, other = fem.Function(V), fem.Function(V), fem.Function(V)
    F = ((w - w_n) * v + ufl.inner(ufl.grad(w), ufl.grad(v))) * ufl.dx
    nonlinear = NonlinearProblem(F, w, petsc_options=DIRECT, petsc_options_prefix="otheru_")
    with pytest.raises(ValueError, match=message + r".*Pass the same function as u=\.\.\. to "):
        ImplicitStepper(nonlinear, other, w_n, dt=0.1)
    with pytest.raises(TypeError, match=r"^ImplicitStepper takes a dolfinx_mno.petsc.Nonlinear"):
        ImplicitStepper(forgotten, forgotten.u, u_n, dt=0.1)
    with pytest.raises(TypeError, match=r"^IMEXStepper takes a dolfinx_mno.petsc.LinearProblem"):
        IMEXStepper(nonlinear, w, w_n, dt=0.1)
    # A block problem (a list of unknowns) is refused with what to do instead (it said
    # "u must be the problem's solution function" for the problem's own list).
    p, p_n, r = fem.Function(V), fem.Function(V), ufl.TestFunction(V)
    G = [F, ((p - p_n) * r + ufl.inner(ufl.grad(p), ufl.grad(r))) * ufl.dx]
    block = NonlinearProblem(G, [w, p], petsc_options=DIRECT, petsc_options_prefix="blk_")
    with pytest.raises(TypeError, match=r"^ImplicitStepper advances one unknown, a dolfinx"):
        ImplicitStepper(block, block.u, [w_n, p_n], dt=0.1)
    # The right pairs are accepted.
    IMEXStepper(forgotten, forgotten.u, u_n, dt=0.1)
    ImplicitStepper(nonlinear, w, w_n, dt=0.1)


def _cubic_decay(dt: float, closure: bool, prefix: str, cells: int = 6, hold: bool = False):
    """``M u' = −(u³, v)`` on P1 (no boundary condition), the mass matrix alone implicit,
    stepped by SSP-RK3: ``u³`` from a closure or in UFL; ``hold``: ``hold_closures``."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, cells, cells)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n, uh = fem.Function(V, name="u_n"), fem.Function(V, name="u")
    u_n.interpolate(lambda x: 1.0 + np.sin(np.pi * x[0]) * x[1])
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    L = u_n * v * ufl.dx
    made = None
    if closure:
        made = mno.Closure(Cubic().double(), [u_n], quadrature_degree=3)
        L -= dt * made * v * made.dx
    else:
        L -= dt * u_n**3 * v * ufl.dx(metadata={"quadrature_degree": 3})
    problem = LinearProblem(
        u * v * ufl.dx, L, u=uh, petsc_options=DIRECT, petsc_options_prefix=prefix,
        reuse_matrix=True,
    )  # fmt: skip
    return timestepping.SSPRK3Stepper(problem, uh, u_n, dt=dt, hold_closures=hold), made


def _global_norm(values: np.ndarray, comm: MPI.Comm) -> float:
    return float(np.sqrt(comm.allreduce(float(values @ values), op=MPI.SUM)))


@pytest.mark.mpi
def test_ssprk3_equals_a_hand_written_loop_and_is_third_order():
    """SSP-RK3 of IMEX steps: the closure's run equals the Shu–Osher combination written
    by hand in UFL (to round-off), updates its closure at every stage, and converges at
    third order in time (rates ≥ 2.8 against a 32× smaller step)."""
    stepper, closure = _cubic_decay(0.1, closure=True, prefix="rk3_closure_")
    reference, _ = _cubic_decay(0.1, closure=False, prefix="rk3_ufl_")
    comm = stepper.u.function_space.mesh.comm
    stepper.run(4, progress=False)
    assert closure is not None and closure.update_count == 12  # 3 stages × 4 steps
    u_n, uh = reference.u_previous, reference.u
    for _ in range(4):  # by hand: w1 = E(u), w2 = 3/4 u + 1/4 E(w1), u+ = 1/3 u + 2/3 E(w2)
        start = u_n.x.array.copy()
        for a, b in ((0.0, 1.0), (0.75, 0.25), (1.0 / 3.0, 2.0 / 3.0)):
            reference.problem.solve()
            u_n.x.array[:] = a * start + b * uh.x.array
    scale = comm.allreduce(np.abs(u_n.x.array).max(), op=MPI.MAX)
    error = comm.allreduce(np.abs(stepper.u.x.array - u_n.x.array).max(), op=MPI.MAX)
    assert scale > 0.5 and error <= 1e-14 * scale, (scale, error)

    def final(dt: float) -> np.ndarray:
        run, _ = _cubic_decay(dt, closure=False, prefix=f"rk3_order_{round(0.4 / dt)}_")
        run.run(round(0.4 / dt), progress=False)
        return run.u.x.array[: run.u.function_space.dofmap.index_map.size_local].copy()

    exact = final(0.1 / 32)
    errors = [_global_norm(final(dt) - exact, comm) for dt in (0.1, 0.05, 0.025)]
    rates = np.log2(np.array(errors[:-1]) / errors[1:])
    assert np.all(rates >= 2.8), (errors, rates)


@pytest.mark.mpi
def test_ssprk3_held_closures_equal_a_hand_written_loop_and_are_first_order(monkeypatch):
    """``hold_closures=True``: one closure update a step, at uⁿ, held over the three
    stages. The run equals SSP-RK3 written by hand with ``u³`` of uⁿ in every stage (to
    round-off) and converges at first order in time (the closure term's order: rates
    0.9–1.2 against the third-order UFL run at a 32× smaller step). A stage that fails
    leaves the closure at uⁿ without another update."""
    stepper, closure = _cubic_decay(0.1, closure=True, prefix="held_", hold=True)
    comm = stepper.u.function_space.mesh.comm
    stepper.run(4, progress=False)
    assert closure is not None and closure.update_count == 4  # once a step
    V = stepper.u.function_space
    u_n, held, uh = fem.Function(V), fem.Function(V), fem.Function(V)
    u_n.interpolate(lambda x: 1.0 + np.sin(np.pi * x[0]) * x[1])
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    L = (u_n - 0.1 * held**3) * v * ufl.dx(metadata={"quadrature_degree": 3})
    by_hand = LinearProblem(
        u * v * ufl.dx, L, u=uh, petsc_options=DIRECT, petsc_options_prefix="held_ufl_"
    )
    for _ in range(4):
        start = u_n.x.array.copy()
        held.x.array[:] = start
        for a, b in ((0.0, 1.0), (0.75, 0.25), (1.0 / 3.0, 2.0 / 3.0)):
            by_hand.solve()
            u_n.x.array[:] = a * start + b * uh.x.array
    scale = comm.allreduce(np.abs(u_n.x.array).max(), op=MPI.MAX)
    error = comm.allreduce(np.abs(stepper.u.x.array - u_n.x.array).max(), op=MPI.MAX)
    assert scale > 0.5 and error <= 1e-14 * scale, (scale, error)

    def final(dt: float, hold: bool) -> np.ndarray:
        run, _ = _cubic_decay(dt, closure=hold, prefix=f"held_order_{round(0.4 / dt)}_", hold=hold)
        run.run(round(0.4 / dt), progress=False)
        return run.u.x.array[: run.u.function_space.dofmap.index_map.size_local].copy()

    exact = final(0.1 / 32, hold=False)
    errors = [_global_norm(final(dt, hold=True) - exact, comm) for dt in (0.1, 0.05, 0.025)]
    rates = np.log2(np.array(errors[:-1]) / errors[1:])
    assert np.all((rates >= 0.9) & (rates <= 1.2)), (errors, rates)

    closure.update()
    at_u_n, count = closure.x.array.copy(), closure.update_count
    solve, calls = stepper.problem.solve, []

    def failing(*args, **kwargs):
        calls.append(kwargs.get("update_closures"))
        if len(calls) == 3:
            raise RuntimeError("stage failed")
        return solve(*args, **kwargs)

    monkeypatch.setattr(stepper.problem, "solve", failing)
    with pytest.raises(RuntimeError, match="stage failed"):
        stepper.step()
    assert calls == [True, False, False] and closure.update_count == count + 1
    np.testing.assert_array_equal(closure.x.array, at_u_n)


@pytest.mark.mpi
def test_ssprk3_failed_stage_keeps_the_state(monkeypatch):
    """A solve that fails in the third stage (after the closure update at w₂): u,
    u_previous, the time and the step count are those before the step, the closure holds
    its values at u_n (u³ at the quadrature points), and the next step gives what it gives
    without the failure."""
    stepper, closure = _cubic_decay(0.1, closure=True, prefix="rk3_fail_")
    stepper.step()
    kept = stepper.u_previous.x.array.copy()
    assert closure is not None
    closure.update()
    at_u_n = closure.x.array.copy()
    solve, calls = stepper.problem.solve, []

    def failing(*args, **kwargs):
        calls.append(1)
        solved = solve(*args, **kwargs)
        if len(calls) == 3:
            raise RuntimeError("stage failed")
        return solved

    monkeypatch.setattr(stepper.problem, "solve", failing)
    with pytest.raises(RuntimeError, match="stage failed"):
        stepper.step()
    np.testing.assert_array_equal(stepper.u_previous.x.array, kept)
    np.testing.assert_array_equal(stepper.u.x.array, kept)
    np.testing.assert_allclose(closure.x.array, at_u_n, rtol=1e-14, atol=1e-14)
    assert closure.update_count == 3 + 1 + 3 + 1  # step, by hand, three stages, the restore
    assert (stepper.num_steps, stepper.t) == (1, pytest.approx(0.1))
    monkeypatch.setattr(stepper.problem, "solve", solve)
    stepper.step()
    reference, _ = _cubic_decay(0.1, closure=True, prefix="rk3_fail_reference_")
    reference.run(2, progress=False)  # another factorisation: equal to round-off
    np.testing.assert_allclose(stepper.u.x.array, reference.u.x.array, rtol=1e-13, atol=1e-15)


@pytest.mark.mpi
def test_ssprk3_refuses_a_closure_interval_and_older_states():
    """So does any IMEXStepper subclass with several stages (here Heun's SSP-RK2), whose
    older states the stages would not follow."""

    class SSPRK2Stepper(IMEXStepper):
        stages = ((0.0, 1.0), (0.5, 0.5))

    stepper, _ = _cubic_decay(0.1, closure=True, prefix="rk3_bad_")
    args = (stepper.problem, stepper.u, stepper.u_previous, 0.1)
    older = fem.Function(stepper.u.function_space)
    for kind in (timestepping.SSPRK3Stepper, SSPRK2Stepper):
        for options in ({"closure_interval": 2}, {"older": [older]}):
            message = f"{kind.__name__} updates the closures at every stage and keeps one level"
            with pytest.raises(ValueError, match=message):
                kind(*args, **options)
    IMEXStepper(*args, closure_interval=2, older=[older])  # one stage: both allowed
    with pytest.raises(ValueError, match="hold_closures keeps the closures over the stages of"):
        IMEXStepper(*args, hold_closures=True)  # one stage: nothing to hold over
    with pytest.raises(TypeError, match="hold_closures must be True or False, got 1"):
        timestepping.SSPRK3Stepper(*args, hold_closures=1)  # type: ignore[arg-type]
