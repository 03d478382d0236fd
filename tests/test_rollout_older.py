"""Rollouts whose state holds older levels: closures with memory and two-level schemes.

The closure reads ``u_n``, ``u_n − u_{n-1}`` and ``∇u_{n-1}``, and the linear form reads
``u_{n-1}`` itself, so a gradient that did not follow each state through the step that
reads it as ``u_{n-1}`` fails the Taylor tests.
"""

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from problems import (
    DT,
    assert_rank_invariant,
    flat_gradient,
    global_max,
    heat_functions,
    imex_heat,
    initial_state_remainders,
    interpolated_targets,
    mlp,
    owned_values,
    rates,
    state_slope,
    stepper_and_rollout_states,
)
from test_rollout import NUM_STEPS, _raises, direction, initial, targets, taylor_parameters

import dolfinx_mno as mno
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.rollout import Rollout
from dolfinx_mno.timestepping import IMEXStepper, ImplicitStepper


def before_initial(x):
    """``u_{-1}``: not ``u_0``, so that the closure's memory input is not zero."""
    return 0.8 * np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]) + 0.4 * x[0] + 0.1 * x[1]


def memory_heat(msh, degree=1, prefix="memory_", nonlinear=False, bcs=True):
    """IMEX heat whose closure and linear form read ``u_n`` and ``u_{n-1}``.

    Returns the stepper (``older=[u_nm1]``) and its closure.
    """
    u_n, uh = heat_functions(msh, degree, initial)
    u_nm1 = fem.Function(u_n.function_space, name="u_nm1")
    u_nm1.interpolate(before_initial)
    v = ufl.TestFunction(u_n.function_space)
    closure = mno.Closure(
        mlp(4, 1, seed=3),
        [u_n, u_n - u_nm1, ufl.grad(u_nm1)],
        quadrature_degree=2 * degree,
        device="cpu",
        name="memory",
    )
    explicit = DT * closure * v * closure.dx + 0.5 * DT * u_nm1 * v * ufl.dx
    if nonlinear:
        explicit -= DT * u_nm1**3 * v * ufl.dx
    return imex_heat(u_n, uh, explicit, prefix, bcs, older=[u_nm1]), closure


def nonlocal_memory_heat(msh, prefix):
    """1D IMEX heat with a NonlocalClosure of ``(u_n, u_n − u_{n-1})`` (and the mask) on a grid."""
    u_n, uh = heat_functions(msh, 1, lambda x: np.sin(np.pi * x[0]) + 0.5 * x[0])
    u_nm1 = fem.Function(u_n.function_space, name="u_nm1")
    u_nm1.interpolate(lambda x: 0.7 * np.sin(np.pi * x[0]) + 0.2 * x[0])
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(3, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv1d(4, 1, 3, padding=1)
    ).double()
    closure = mno.NonlocalClosure(model, [u_n, u_n - u_nm1], (), 2, grid_shape=(9,), device="cpu")
    v = ufl.TestFunction(u_n.function_space)
    return imex_heat(u_n, uh, DT * closure * v * closure.dx, prefix, older=[u_nm1]), closure


@pytest.mark.mpi
def test_rollout_with_older_states_is_the_steppers():
    """The forward pass equals the stepper's loop, which shifts u_n into u_{n-1}."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 5, 5)
    stepper, _ = memory_heat(msh, prefix="older_forward_")
    rollout = Rollout(stepper)
    u0, older = rollout.initial_state(), rollout.initial_older()
    assert len(older) == rollout.num_older == 1
    state, expected = stepper_and_rollout_states(rollout, u0, NUM_STEPS, older)
    scale, error = global_max(msh.comm, expected), global_max(msh.comm, state - expected)
    assert scale > 0.04
    assert error <= 1e-13 * scale


@pytest.mark.mpi
@pytest.mark.parametrize(("degree", "checkpoint_every"), [(1, None), (2, None), (1, 2)])
def test_taylor_parameters_with_older_states(degree, checkpoint_every):
    """Second-order Taylor remainders in θ over 5 steps, P1 and P2, with checkpoints."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, closure = memory_heat(msh, degree, prefix=f"older_taylor{degree}_")
    rollout = Rollout(stepper, checkpoint_every=checkpoint_every)
    u0, older, data = rollout.initial_state(), rollout.initial_older(), targets(rollout)
    remainders = taylor_parameters(rollout, [closure], u0, data, older)
    assert remainders[0] > 1e-9
    assert min(rates(remainders)) >= 1.9


@pytest.mark.mpi
@pytest.mark.parametrize("nonlinear", [False, True])
def test_taylor_initial_state_with_older_states(nonlinear):
    """In u_0 with u_{-1} held: u_0 reaches the loss through steps 1 and 2 (as u_{n-1});
    ``nonlinear``: L reads u_{n-1}³, so the Jacobians are assembled in backward."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, _ = memory_heat(msh, nonlinear=nonlinear, prefix=f"older_u0_{int(nonlinear)}_")
    rollout = Rollout(stepper)
    assert rollout._step_adjoint.affine != nonlinear
    u0, older, data = rollout.initial_state(), rollout.initial_older(), targets(rollout)
    result = rollout.gradient(u0, data, older=older, initial_state=True)
    remainders = initial_state_remainders(rollout, u0, data, result.initial_state, direction, older)
    assert remainders[0] > 1e-9
    assert min(rates(remainders)) >= 1.9


@pytest.mark.mpi
def test_checkpointed_gradient_with_older_states_equals_the_full_graph():
    """Segments of 1, 2 and 3 steps: the older level crosses every segment boundary;
    the recomputation returns the forward's states or solves again."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, _ = memory_heat(msh, prefix="older_checkpoint_")
    probe = Rollout(stepper)
    u0, older = probe.initial_state(), probe.initial_older()
    results = []
    for every, keep_states in ((None, True), (1, True), (2, True), (3, True), (2, False)):
        rollout = Rollout(stepper, checkpoint_every=every, keep_states=keep_states)
        results.append(rollout.gradient(u0, targets(rollout), older=older, initial_state=True))
    reference = flat_gradient(results[0])
    for result in results[1:]:
        assert result.loss == pytest.approx(results[0].loss, rel=1e-12)
        assert np.linalg.norm(flat_gradient(result) - reference) <= 1e-12 * np.linalg.norm(
            reference
        )
        difference = float((result.initial_state - results[0].initial_state).norm())
        assert difference <= 1e-12 * float(results[0].initial_state.norm())


@pytest.mark.mpi
@pytest.mark.parametrize("cells", [(1, 1), (6, 5)])
def test_gradients_with_older_states_do_not_depend_on_ranks(cells):
    """COMM_WORLD against COMM_SELF; (1, 1) on 3 ranks: a rank owns no cells."""
    results = []
    for comm in (MPI.COMM_SELF, MPI.COMM_WORLD):
        msh = mesh.create_unit_square(comm, *cells)
        stepper, _ = memory_heat(msh, bcs=False, prefix=f"older_ranks{comm.size}_")
        rollout = Rollout(stepper, checkpoint_every=2)
        result = rollout.gradient(
            rollout.initial_state(), targets(rollout), older=rollout.initial_older(),
            initial_state=True,
        )  # fmt: skip
        slope = state_slope(rollout, result.initial_state, owned_values(rollout, direction))
        results.append((result.loss, flat_gradient(result), slope))
    assert_rank_invariant(*results)


@pytest.mark.mpi
def test_taylor_nonlocal_closure_with_older_states():
    """A NonlocalClosure reading u_n − u_{n-1}: Taylor rates ≥ 1.9 in θ and in u_0."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 8)
    stepper, closure = nonlocal_memory_heat(msh, "older_nonlocal_")
    rollout = Rollout(stepper, checkpoint_every=2)
    u0, older = rollout.initial_state(), rollout.initial_older()
    data = interpolated_targets(rollout, lambda t: lambda x: (1 - t) * np.sin(np.pi * x[0]), 5)
    remainders = taylor_parameters(rollout, [closure], u0, data, older)
    assert remainders[0] > 1e-9 and min(rates(remainders)) >= 1.9
    result = rollout.gradient(u0, data, closures=[], older=older, initial_state=True)
    remainders = initial_state_remainders(
        rollout, u0, data, result.initial_state, lambda x: np.cos(2 * x[0]), older
    )
    assert remainders[0] > 1e-9 and min(rates(remainders)) >= 1.9


@pytest.mark.mpi
def test_bad_older_states_raise_the_same_error_on_every_rank(tiny_square):
    stepper, _ = memory_heat(tiny_square, prefix="older_bad_")
    rollout = Rollout(stepper)
    u0, data = rollout.initial_state(), targets(rollout, 2)
    _raises(
        ValueError,
        "The stepper keeps 1 older state(s) u_(n-1), ...; give their initial values, "
        "older=[u_(-1), ...] (rollout.initial_older() reads the stepper's).",
        lambda: rollout.gradient(u0, data),
    )
    _raises(
        ValueError,
        "older has 2 state(s); the stepper keeps 1 older state(s).",
        lambda: rollout.run(u0, 2, older=[u0, u0]),
    )
    _raises(
        ValueError,
        "older[0] must be a float64 tensor on the CPU, got torch.float32 on cpu.",
        lambda: rollout.run(u0, 2, older=[u0.float()]),
    )
    # A rollout without older states refuses them.
    V = stepper.u.function_space
    u_n, uh, u_nm1 = stepper.u_previous, stepper.u, stepper.older[0]
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    plain = LinearProblem(
        u * v * ufl.dx, u_n * v * ufl.dx, u=uh, petsc_options_prefix="older_bad_plain_"
    )
    _raises(
        ValueError,
        "older has 1 state(s); the stepper keeps 0 older state(s).",
        lambda: Rollout(IMEXStepper(plain, uh, u_n, dt=DT)).run(u0, 1, older=[u0]),
    )
    reads_older = LinearProblem(
        (1 + u_nm1**2) * u * v * ufl.dx,
        u_n * v * ufl.dx,
        u=uh,
        petsc_options_prefix="older_bad_a_",
    )
    _raises(
        ValueError,
        "The bilinear form reads the older state older[0] ('u_nm1'): a rollout reuses one "
        "constant matrix. Move the term to the linear form (explicit).",
        lambda: Rollout(IMEXStepper(reads_older, uh, u_n, dt=DT, older=[u_nm1])),
    )
    bdf2 = NonlinearProblem(
        (1.5 * uh - 2 * u_n + 0.5 * u_nm1) * v * ufl.dx, uh, petsc_options_prefix="older_bdf2_"
    )
    _raises(
        ValueError,
        "A rollout of the implicit stepper does not support older states (1 given): its "
        "adjoint follows u_n only. Use the IMEX stepper for closures or schemes that read "
        "u_(n-1).",
        lambda: Rollout(ImplicitStepper(bdf2, uh, u_n, dt=DT, older=[u_nm1])),
    )
