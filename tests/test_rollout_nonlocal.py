"""Rollouts with a NonlocalClosure, IMEX and implicit: Taylor tests, the steppers, ranks."""

import gc
import re
import weakref

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from problems import (
    DT,
    NEWTON,
    FailsOnOneRank,
    assert_fails_on_every_rank,
    assert_rank_invariant,
    assert_same_gradient,
    flat_gradient,
    global_max,
    heat_functions,
    imex_heat,
    implicit_heat,
    initial_state_remainders,
    interpolated_targets,
    loss_at,
    mlp,
    owned_values,
    parameter_remainders,
    parameter_slope,
    parameters_of,
    random_directions,
    rates,
    state_slope,
    stepper_and_rollout_states,
)

import dolfinx_mno as mno
from dolfinx_mno.petsc import NonlinearProblem
from dolfinx_mno.rollout import Rollout
from dolfinx_mno.timestepping import ImplicitStepper, SSPRK3Stepper
from dolfinx_mno.torch_bridge import to_precision

try:
    import neuralop  # in CI a missing dependency is a failure, not a skip
except ImportError:  # pragma: no cover
    neuralop = pytest.importorskip("neuralop")

NUM_STEPS = 5


def conv_model(channels, seed=0):
    """A small float64 Conv1d model: (1, channels, n) -> (1, 1, n), the same on every rank."""
    torch.manual_seed(seed)
    return (
        torch.nn.Sequential(
            torch.nn.Conv1d(channels, 4, 3, padding=1),
            torch.nn.Tanh(),
            torch.nn.Conv1d(4, 1, 3, padding=1),
        )
        .double()
        .eval()
    )


def initial(x):
    return np.sin(np.pi * x[0]) + 0.5 * x[0]


def target(t):
    return lambda x: (1 - t) * np.sin(np.pi * x[0]) + 0.3 * x[0] ** 2


def direction(x):
    return np.cos(2 * x[0]) + x[0] ** 2


def heat(msh, degree=1, bcs=True, prefix="nonlocal_", local=False):
    """An IMEX heat step with a non-local source dt c(u_n, ∂u_n/∂x) v in the linear form.

    ``local``: also a local flux closure ``-dt q(u_n) ∂v/∂x`` (an MLP).
    """
    u_n, uh = heat_functions(msh, degree, initial)
    v = ufl.TestFunction(u_n.function_space)
    closure = mno.NonlocalClosure(
        conv_model(3), [u_n, u_n.dx(0)], (), 2 * degree, grid_shape=(9,), device="cpu"
    )
    explicit = DT * closure * v * closure.dx
    if local:
        flux = mno.Closure(
            mlp(1, 1, seed=1, width=6), [u_n], (), 2 * degree, device="cpu", name="q"
        )
        explicit -= DT * flux * v.dx(0) * flux.dx
    stepper = imex_heat(u_n, uh, explicit, prefix, bcs)
    return (stepper, [closure, flux]) if local else (stepper, closure)


def targets(rollout, num_steps=NUM_STEPS):
    """Owned values of the analytic targets at t_1, ..., t_k (rank-independent)."""
    return interpolated_targets(rollout, target, num_steps)


@pytest.mark.mpi
@pytest.mark.parametrize(("degree", "local"), [(1, False), (2, False), (1, True)])
def test_taylor_parameters(degree, local):
    """Second-order Taylor remainders in θ over 5 IMEX steps with a non-local closure.

    ``local``: with a local closure in the same step too, both differentiated.
    """
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 8)
    stepper, made = heat(msh, degree, prefix=f"nl_taylor{degree}{local}_", local=local)
    closures = made if local else [made]
    rollout = Rollout(stepper)
    u0, data = rollout.initial_state(), targets(rollout)
    result = rollout.gradient(u0, data, closures=closures)
    parameters = parameters_of(closures)
    directions = random_directions(parameters)
    remainders = parameter_remainders(rollout, u0, data, result, parameters, directions)
    assert remainders[0] > 1e-9  # the closure matters
    assert min(rates(remainders)) >= 1.9


@pytest.mark.mpi
def test_taylor_initial_state():
    """Second-order Taylor remainders in u_0: through the sampling, gather and scatter."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 8)
    stepper, _ = heat(msh, 1, prefix="nl_taylor_u0_")
    rollout = Rollout(stepper)
    u0, data = rollout.initial_state(), targets(rollout)
    result = rollout.gradient(u0, data, closures=[], initial_state=True)
    remainders = initial_state_remainders(rollout, u0, data, result.initial_state, direction)
    assert remainders[0] > 1e-9
    assert min(rates(remainders)) >= 1.9


@pytest.mark.mpi
def test_rollout_states_are_the_steppers():
    """The rollout's forward pass is the IMEX stepper's loop with closure.update()."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 8)
    stepper, _ = heat(msh, 1, prefix="nl_forward_")
    rollout = Rollout(stepper)
    state, expected = stepper_and_rollout_states(rollout, rollout.initial_state(), NUM_STEPS)
    scale, error = global_max(msh.comm, expected), global_max(msh.comm, state - expected)
    assert scale > 0.04
    assert error <= 1e-12 * scale


@pytest.mark.mpi
@pytest.mark.parametrize("cells", [2, 8])
def test_gradients_do_not_depend_on_ranks(cells):
    """COMM_WORLD against COMM_SELF; 2 cells on 3 ranks: a rank owns none."""
    results = []
    for comm in (MPI.COMM_SELF, MPI.COMM_WORLD):
        msh = mesh.create_unit_interval(comm, cells)
        stepper, _ = heat(msh, 1, bcs=False, prefix=f"nl_ranks{comm.size}_")
        rollout = Rollout(stepper, checkpoint_every=2)
        result = rollout.gradient(rollout.initial_state(), targets(rollout), initial_state=True)
        slope = state_slope(rollout, result.initial_state, owned_values(rollout, direction))
        results.append((result.loss, flat_gradient(result), slope))
    assert_rank_invariant(*results)


@pytest.mark.mpi
def test_checkpointed_gradient_equals_the_full_graph():
    """Segments recomputed in backward (the model on the root only) give the same gradient."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 6)
    stepper, _ = heat(msh, 1, prefix="nl_checkpoint_")
    u0 = Rollout(stepper).initial_state()  # a rollout leaves u_previous at its last state
    gradients = []
    for checkpoint_every in (None, 2, 3):
        rollout = Rollout(stepper, checkpoint_every=checkpoint_every)
        gradients.append(flat_gradient(rollout.gradient(u0, targets(rollout))))
    assert np.linalg.norm(gradients[0]) > 1e-3
    for gradient in gradients[1:]:
        assert np.linalg.norm(gradient - gradients[0]) <= 1e-12 * np.linalg.norm(gradients[0])


# -- implicit steps: the closure at the unknown u_{n+1} ------------------------------------

#: Newton with the non-local closure frozen in the Jacobian: Picard for it, to round-off.
PICARD = NEWTON
#: Matrix-free Newton: the exact Jacobian's action by differences of the residual (which
#: re-evaluates the closure), preconditioned by the frozen-closure Jacobian's LU.
MATRIX_FREE = {**PICARD, "snes_mf_operator": True, "ksp_type": "gmres", "ksp_rtol": 1e-12}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: torch's FFT of a 9-point grid takes ~3 ms with a thread pool
    (on busy cores, or several ranks per core, far more) and ~5 µs without."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fno(seed=0, in_channels=3):
    """A small float64 1-D FNO (complex spectral weights): (1, in_channels, n) -> (1, 1, n)."""
    torch.manual_seed(seed)
    model = neuralop.models.FNO(
        n_modes=(4,), in_channels=in_channels, out_channels=1, hidden_channels=4, n_layers=1
    )
    return to_precision(model, torch.float64)


def implicit_nonlocal_heat(
    msh, degree=1, bcs=True, prefix="nl_implicit_", local=False, options=PICARD
):
    """Backward Euler with a non-local FNO source dt c(u, ∂u/∂x) v of the new state u.

    ``local``: also a local flux closure ``dt q(u) ∂v/∂x`` of the new state (its tangent in
    the Jacobian).
    """
    u_n, uh = heat_functions(msh, degree, initial)
    v = ufl.TestFunction(u_n.function_space)
    closure = mno.NonlocalClosure(
        fno(), [uh, uh.dx(0)], (), 2 * degree, grid_shape=(9,), device="cpu", name="c"
    )
    implicit = -DT * closure * v * closure.dx
    closures = [closure]
    if local:
        model = mlp(1, 1, seed=1, width=6)
        flux = mno.Closure(model, [uh], (), 2 * degree, device="cpu", name="q")
        implicit += DT * flux * v.dx(0) * flux.dx
        closures.append(flux)
    return implicit_heat(u_n, uh, implicit, prefix, bcs, options), closures


@pytest.mark.mpi
@pytest.mark.parametrize(("degree", "local"), [(1, True), (2, False)])
def test_taylor_implicit_parameters(degree, local):
    """Second-order Taylor remainders in θ over 5 implicit steps with a non-local FNO closure
    of the unknown; the slope equals a central difference (which it does not without the
    closure's linearisation in the adjoint: 1.5e-3 relative then).

    ``local``: with a local closure of the unknown in the same step too, both differentiated.
    """
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 8)
    prefix = f"nl_implicit_taylor{degree}{local}_"
    stepper, closures = implicit_nonlocal_heat(msh, degree, prefix=prefix, local=local)
    rollout = Rollout(stepper)
    u0, data = rollout.initial_state(), targets(rollout)
    result = rollout.gradient(u0, data, closures=closures)
    parameters = parameters_of(closures)
    assert any(p.is_complex() for p in closures[0].model.parameters())  # spectral weights
    directions = random_directions(parameters)
    remainders = parameter_remainders(rollout, u0, data, result, parameters, directions)
    assert remainders[0] > 1e-5  # the closure matters
    assert min(rates(remainders)) >= 1.9
    slope = parameter_slope(result, directions)
    h = 3e-4
    central = (
        loss_at(rollout, u0, data, parameters, directions, h)
        - loss_at(rollout, u0, data, parameters, directions, -h)
    ) / (2 * h)
    assert abs(slope) > 0.1
    assert central == pytest.approx(slope, rel=5e-6)


@pytest.mark.mpi
def test_taylor_implicit_initial_state_and_checkpoints():
    """Second-order remainders in u_0 (through ∂c/∂u in the adjoint solve); the rollout's
    states are the stepper's; checkpointed segments give the same gradient."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 8)
    stepper, _ = implicit_nonlocal_heat(msh, 1, prefix="nl_implicit_u0_")
    rollout = Rollout(stepper)
    u0, data = rollout.initial_state(), targets(rollout)
    result = rollout.gradient(u0, data, initial_state=True)
    remainders = initial_state_remainders(rollout, u0, data, result.initial_state, direction)
    assert remainders[0] > 1e-5
    assert min(rates(remainders)) >= 1.9
    # The rollout's states are the stepper's (Newton updating the closure at each iterate).
    state, expected = stepper_and_rollout_states(rollout, u0, NUM_STEPS)
    assert global_max(msh.comm, state - expected) <= 1e-11
    # Checkpointed: the same gradient (the model recomputed on the root only).
    checkpointed = Rollout(stepper, checkpoint_every=2).gradient(u0, data, initial_state=True)
    assert_same_gradient(checkpointed.parameters[0], result.parameters[0])
    change = float((checkpointed.initial_state - result.initial_state).norm())
    assert msh.comm.allreduce(change, op=MPI.MAX) <= 1e-12 * float(result.initial_state.norm())


@pytest.mark.mpi
def test_implicit_gradient_does_not_depend_on_the_nonlinear_solver():
    """Picard (frozen closure) and matrix-free Newton forwards: the same converged steps,
    so the same adjoint gradient (≤ 1e-10)."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 8)
    results = []
    for name, options in (("picard", PICARD), ("mf", MATRIX_FREE)):
        stepper, _ = implicit_nonlocal_heat(msh, 1, prefix=f"nl_implicit_{name}_", options=options)
        rollout = Rollout(stepper)
        u0, data = rollout.initial_state(), targets(rollout)
        results.append(rollout.gradient(u0, data, initial_state=True))
    picard, matrix_free = (flat_gradient(r) for r in results)
    assert np.linalg.norm(picard) > 1e-2
    assert np.linalg.norm(matrix_free - picard) <= 1e-10 * np.linalg.norm(picard)
    difference = float((results[1].initial_state - results[0].initial_state).norm())
    scale = float(results[0].initial_state.norm())
    assert msh.comm.allreduce(difference, op=MPI.MAX) <= 1e-10 * msh.comm.allreduce(
        scale, op=MPI.MAX
    )


@pytest.mark.mpi
def test_implicit_closure_of_x_only():
    """A non-local source f_θ(x) that does not read u (∂f/∂u = 0: left out of the shell
    Jᵀ), beside the non-local and the local closure of u: its gradient equals a central
    difference."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 8)
    stepper, _ = implicit_nonlocal_heat(msh, 1, prefix="nl_implicit_x_", local=True)
    x = ufl.SpatialCoordinate(msh)
    source = mno.NonlocalClosure(
        fno(3, in_channels=2), [x[0]], (), 2, grid_shape=(9,), mesh=msh, device="cpu", name="f"
    )
    v = ufl.TestFunction(stepper.u.function_space)
    F = stepper.problem.ufl_forms[0] - DT * source * v * source.dx
    problem = NonlinearProblem(
        F, stepper.u, bcs=stepper.problem.bcs, petsc_options=PICARD, petsc_options_prefix="nl_x_"
    )
    rollout = Rollout(ImplicitStepper(problem, stepper.u, stepper.u_previous, dt=DT))
    u0, data = rollout.initial_state(), targets(rollout)
    result = rollout.gradient(u0, data, closures=[source])
    parameters = list(source.model.parameters())
    directions = random_directions(parameters, seed=3)
    slope = parameter_slope(result, directions)
    h = 3e-4
    central = (
        loss_at(rollout, u0, data, parameters, directions, h)
        - loss_at(rollout, u0, data, parameters, directions, -h)
    ) / (2 * h)
    assert abs(slope) > 0.1
    assert central == pytest.approx(slope, rel=5e-6)


@pytest.mark.mpi
@pytest.mark.parametrize("cells", [2, 8])
def test_implicit_gradients_do_not_depend_on_ranks(cells):
    """COMM_WORLD against COMM_SELF; 2 cells on 3 ranks: a rank owns no cells (it still
    joins every GMRES iteration's gather and scatter)."""
    results = []
    for comm in (MPI.COMM_SELF, MPI.COMM_WORLD):
        msh = mesh.create_unit_interval(comm, cells)
        prefix = f"nl_implicit_ranks{comm.size}_{cells}_"
        stepper, _ = implicit_nonlocal_heat(msh, 1, bcs=cells > 2, prefix=prefix)
        rollout = Rollout(stepper)
        result = rollout.gradient(rollout.initial_state(), targets(rollout), initial_state=True)
        slope = state_slope(rollout, result.initial_state, owned_values(rollout, direction))
        results.append((result.loss, flat_gradient(result), slope))
    assert_rank_invariant(*results)


@pytest.mark.mpi
@pytest.mark.parametrize(("where", "checkpoint_every"), [("forward", None), ("backward", 2)])
def test_a_model_failing_on_the_root_fails_on_every_rank(where, checkpoint_every):
    """The operator (run on the root alone) raises in its forward pass or in its VJP:
    every rank raises the same error, none waits in the scatter or the gather; the
    rollout then gives the gradient it gave before."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 8)
    u_n, uh = heat_functions(msh, 1, initial)
    model = FailsOnOneRank(conv_model(3), 0, where)
    closure = mno.NonlocalClosure(
        model, [u_n, u_n.dx(0)], (), 2, grid_shape=(9,), device="cpu", name="c"
    )
    v = ufl.TestFunction(u_n.function_space)
    prefix = f"nl_fail_{where}_{checkpoint_every}_"
    stepper = imex_heat(u_n, uh, DT * closure * v * closure.dx, prefix)
    rollout = Rollout(stepper, checkpoint_every=checkpoint_every)
    u0, data = rollout.initial_state(), targets(rollout, 4)
    before = flat_gradient(rollout.gradient(u0, data))
    what = "The model of closure 'c'" if where == "forward" else "The backward pass of the rollout"
    assert_fails_on_every_rank(msh.comm, what, model, lambda: rollout.gradient(u0, data))
    np.testing.assert_array_equal(flat_gradient(rollout.gradient(u0, data)), before)


@pytest.mark.mpi
def test_implicit_bad_input_raises_on_every_rank():
    """A non-local closure of u_previous in an implicit step, and a local closure frozen in
    the Jacobian beside a non-local one (frozen by design), are refused on every rank."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 4)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n, uh = fem.Function(V, name="u_n"), fem.Function(V, name="u")
    v = ufl.TestFunction(V)
    F = (uh - u_n) * v * ufl.dx + DT * ufl.inner(ufl.grad(uh), ufl.grad(v)) * ufl.dx
    explicit = mno.NonlocalClosure(fno(), [u_n, u_n.dx(0)], (), 2, device="cpu", name="c")
    problem = NonlinearProblem(
        F - DT * explicit * v * explicit.dx,
        uh,
        petsc_options=PICARD,
        petsc_options_prefix="nl_bad_previous_",
    )
    message = (
        "Closure 'c' of the implicit step reads u_previous; a rollout of the implicit "
        "stepper supports closures of the unknown u only."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Rollout(ImplicitStepper(problem, uh, u_n, dt=DT))

    closure = mno.NonlocalClosure(fno(), [uh, uh.dx(0)], (), 2, device="cpu", name="c")
    mlp = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    flux = mno.Closure(mlp.double(), [uh], (), 2, device="cpu", name="q")
    F = F - DT * closure * v * closure.dx + DT * flux * v.dx(0) * flux.dx
    frozen = NonlinearProblem(
        F,
        uh,
        J=ufl.derivative(F, uh),
        frozen_closures=True,
        petsc_options=PICARD,
        petsc_options_prefix="nl_bad_frozen_",
    )
    message = (
        "The implicit step's Jacobian misses closure tangents (frozen closures): the adjoint "
        "needs the exact Jacobian. Build the problem with the default J "
        "(dolfinx_mno.derivative(F, u))."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Rollout(ImplicitStepper(frozen, uh, u_n, dt=DT))


@pytest.mark.mpi
def test_a_dropped_implicit_rollout_frees_its_problem():
    """The adjoint's shell matrix refers to its step weakly. Before, the step held the
    adjoint KSP and the KSP's Python context held the step: a cycle through PETSc that
    Python's collector cannot see, so the step, its problem, its mesh and their PETSc
    objects (~8 MPI communicators a test) were never freed."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 8)
    stepper, closures = implicit_nonlocal_heat(msh, 1, prefix="nl_implicit_freed_")
    rollout = Rollout(stepper)
    result = rollout.gradient(rollout.initial_state(), targets(rollout), closures=closures)
    assert np.linalg.norm(flat_gradient(result)) > 1e-3  # the adjoint GMRES ran
    problem = weakref.ref(stepper.problem)
    del stepper, closures, rollout, result
    gc.collect()
    assert MPI.COMM_WORLD.allgather(problem() is None) == [True] * MPI.COMM_WORLD.size


@pytest.mark.mpi
@pytest.mark.parametrize("cells", [2, 8])
def test_ssprk3_nonlocal_rollout(cells):
    """SSP-RK3 with a non-local and a local closure: the rollout's states are the stepper's,
    Taylor rates ≥ 1.9 in θ, and the gradient equals on COMM_SELF and COMM_WORLD with
    checkpoints (2 cells on 3 ranks: a rank owns none)."""
    results = []
    for comm in (MPI.COMM_SELF, MPI.COMM_WORLD):
        msh = mesh.create_unit_interval(comm, cells)
        euler, closures = heat(msh, 1, bcs=False, prefix=f"nl_rk3_{cells}_{comm.size}_", local=True)
        stepper = SSPRK3Stepper(euler.problem, euler.u, euler.u_previous, euler.dt)
        rollout = Rollout(stepper, checkpoint_every=2)
        u0, data = rollout.initial_state(), targets(rollout)
        state, expected = stepper_and_rollout_states(rollout, u0, NUM_STEPS)
        scale, error = global_max(comm, expected), global_max(comm, state - expected)
        assert scale > 0.04 and error <= 1e-12 * scale, (scale, error)
        result = rollout.gradient(u0, data, initial_state=True)
        slope = state_slope(rollout, result.initial_state, owned_values(rollout, direction))
        results.append((result.loss, flat_gradient(result), slope))
        if comm.size == 1 and cells == 8:
            parameters = parameters_of(closures)
            remainders = parameter_remainders(
                rollout, u0, data, result, parameters, random_directions(parameters)
            )
            assert remainders[0] > 1e-9 and min(rates(remainders)) >= 1.9, remainders
    assert_rank_invariant(*results)
