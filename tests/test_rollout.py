"""Differentiable rollouts: Taylor tests, rank invariance, the a-priori limit, checkpoints."""

import re

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from problems import (
    DIRECT,
    DT,
    Cubic,
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
    mlp,
    owned_values,
    parameter_remainders,
    parameters_of,
    random_directions,
    rates,
    state_slope,
    stepper_and_rollout_states,
)

import dolfinx_mno as mno
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.quadrature import quadrature_points
from dolfinx_mno.rollout import Rollout, allreduce_gradients, rollout_loss
from dolfinx_mno.timestepping import IMEXStepper, ImplicitStepper, SSPRK3Stepper

NUM_STEPS = 5


def initial(x):
    return np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]) + 0.5 * x[0]


def target(t):
    return lambda x: (1 - t) * np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]) + 0.3 * x[1]


def direction(x):
    return np.cos(2 * x[0]) + x[1] ** 2


def heat(
    msh,
    degree=1,
    closures=("scalar",),
    bcs=True,
    nonlinear=False,
    prefix="rollout_",
    model_dtype=torch.float64,
):
    """An IMEX heat step with closures in the linear form: its stepper and closures.

    ``"scalar"``: a source ``dt q(u_n, ∇u_n) v``; ``"flux"``: ``-dt q(u_n, ∇u_n)·∇v``.
    """
    u_n, uh = heat_functions(msh, degree, initial)
    v = ufl.TestFunction(u_n.function_space)
    explicit = [-DT * u_n**3 * v * ufl.dx] if nonlinear else []
    made = []
    for seed, kind in enumerate(closures):
        shape = () if kind == "scalar" else (2,)
        model = mlp(3, 1 if kind == "scalar" else 2, seed).to(model_dtype)
        closure = mno.Closure(
            model, [u_n, ufl.grad(u_n)], shape, 2 * degree, device="cpu", name=kind
        )
        term = closure * v if kind == "scalar" else -ufl.inner(closure, ufl.grad(v))
        explicit.append(DT * term * closure.dx)
        made.append(closure)
    return imex_heat(u_n, uh, sum(explicit), prefix, bcs), made


def targets(rollout, num_steps=NUM_STEPS):
    """Owned values of the analytic targets at t_1, ..., t_k (rank-independent)."""
    return interpolated_targets(rollout, target, num_steps)


def taylor_parameters(rollout, closures, u0, data, older=None):
    """Remainders |J(θ+εδ) − J(θ) − ε dJ·δ| at ε = 1e-2·2^-k, k = 0..4 (``older``: the
    initial older states of a stepper that keeps them)."""
    result = rollout.gradient(u0, data, closures=closures, older=older)
    parameters = parameters_of(closures)
    return parameter_remainders(
        rollout, u0, data, result, parameters, random_directions(parameters), older=older
    )


@pytest.mark.mpi
@pytest.mark.parametrize("degree", [1, 2])
@pytest.mark.parametrize("kind", ["scalar", "flux"])
def test_taylor_parameters(degree, kind):
    """Second-order Taylor remainders in θ over 5 IMEX steps, P1 and P2, scalar and flux."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, closures = heat(msh, degree, (kind,), prefix=f"taylor{degree}{kind}_")
    rollout = Rollout(stepper)
    u0 = rollout.initial_state()
    remainders = taylor_parameters(rollout, closures, u0, targets(rollout))
    assert remainders[0] > 1e-9  # the closure matters
    assert min(rates(remainders)) >= 1.9


@pytest.mark.mpi
@pytest.mark.parametrize("degree", [1, 2])
def test_taylor_initial_state(degree):
    """Second-order Taylor remainders in u_0 (closures and the linear form read u_n)."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, _ = heat(msh, degree, ("scalar", "flux"), prefix=f"taylor_u0_{degree}_")
    rollout = Rollout(stepper)
    u0, data = rollout.initial_state(), targets(rollout)
    result = rollout.gradient(u0, data, closures=[], initial_state=True)
    assert result.parameters == []
    remainders = initial_state_remainders(rollout, u0, data, result.initial_state, direction)
    assert remainders[0] > 1e-9
    assert min(rates(remainders)) >= 1.9


@pytest.mark.mpi
def test_taylor_linear_form_nonlinear_in_the_state():
    """L with -dt u_n³ v: the Jacobians are assembled at each step's state in backward."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, closures = heat(msh, 1, ("scalar",), nonlinear=True, prefix="taylor_nl_")
    rollout = Rollout(stepper)
    assert not rollout._step_adjoint.affine
    u0 = rollout.initial_state()
    remainders = taylor_parameters(rollout, closures, u0, targets(rollout))
    assert remainders[0] > 1e-9
    assert min(rates(remainders)) >= 1.9
    # Checkpointed: the recomputed steps' Jacobians at the forward's states, the same gradient.
    reference = flat_gradient(rollout.gradient(u0, targets(rollout)))
    for keep_states in (True, False):
        checkpointed = Rollout(stepper, checkpoint_every=2, keep_states=keep_states)
        flat = flat_gradient(checkpointed.gradient(u0, targets(checkpointed)))
        assert np.linalg.norm(flat - reference) <= 1e-12 * np.linalg.norm(reference)


@pytest.mark.mpi
def test_rollout_states_are_the_steppers():
    """The rollout's forward pass is the IMEX stepper's time loop (to round-off)."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 5, 5)
    stepper, _ = heat(msh, 1, ("scalar", "flux"), prefix="forward_")
    rollout = Rollout(stepper)
    state, expected = stepper_and_rollout_states(rollout, rollout.initial_state(), NUM_STEPS)
    scale, error = global_max(msh.comm, expected), global_max(msh.comm, state - expected)
    assert scale > 0.04
    assert error <= 1e-13 * scale


def _serial_and_parallel_gradients(cells, checkpoint_every=None):
    results = []
    for comm in (MPI.COMM_SELF, MPI.COMM_WORLD):
        msh = mesh.create_unit_square(comm, *cells)
        stepper, closures = heat(msh, 1, ("scalar", "flux"), bcs=False, prefix=f"ranks{comm.size}_")
        rollout = Rollout(stepper, checkpoint_every=checkpoint_every)
        result = rollout.gradient(rollout.initial_state(), targets(rollout), initial_state=True)
        slope = state_slope(rollout, result.initial_state, owned_values(rollout, direction))
        results.append((result.loss, flat_gradient(result), slope))
        assert len(closures) == len(result.parameters) == 2
    return results


@pytest.mark.mpi
@pytest.mark.parametrize("cells", [(1, 1), (6, 5)])
def test_gradients_do_not_depend_on_ranks(cells):
    """COMM_WORLD against COMM_SELF on the same cells; (1, 1) on 3 ranks: a rank owns none."""
    assert_rank_invariant(*_serial_and_parallel_gradients(cells))


@pytest.mark.mpi
def test_checkpointed_gradient_equals_the_full_graph():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, _ = heat(msh, 1, ("scalar", "flux"), prefix="checkpoint_")
    u0 = Rollout(stepper).initial_state()
    results = []
    for every, keep_states in ((None, True), (2, True), (3, True), (2, False), (3, False)):
        rollout = Rollout(stepper, checkpoint_every=every, keep_states=keep_states)
        results.append(rollout.gradient(u0, targets(rollout), initial_state=True))
    reference = results[0]
    for result in results[1:]:
        assert result.loss == pytest.approx(reference.loss, rel=1e-12)
        for group, expected in zip(result.parameters, reference.parameters, strict=True):
            assert_same_gradient(group, expected)
        difference = float((result.initial_state - reference.initial_state).norm())
        assert difference <= 1e-12 * float(reference.initial_state.norm()) + 1e-300


@pytest.mark.mpi
@pytest.mark.parametrize("frozen", [False, True])
def test_checkpointed_initial_state_gradient_alone(frozen):
    """``closures=[]``, ``initial_state=True``, with trainable or frozen models: a checkpointed
    segment then differentiates with respect to its input state alone (frozen: its only
    input that requires grad), and gives the full graph's ``∂loss/∂u_0``."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, closures = heat(msh, 1, ("scalar", "flux"), prefix=f"checkpoint_u0_{frozen}_")
    for closure in closures if frozen else []:
        closure.model.requires_grad_(False)
    u0 = Rollout(stepper).initial_state()
    gradients = []
    for every in (None, 2):
        rollout = Rollout(stepper, checkpoint_every=every)
        result = rollout.gradient(u0, targets(rollout), closures=[], initial_state=True)
        assert result.parameters == []
        gradients.append(result.initial_state)
    assert float(gradients[0].norm()) > 1e-3
    difference = float((gradients[1] - gradients[0]).norm())
    assert difference <= 1e-12 * float(gradients[0].norm())


@pytest.mark.mpi
def test_targets_every_few_steps():
    """``target_interval=2``: the loss compares the states after 2, 4, 6 steps; its gradient
    equals autograd's of that loss (parameters and initial state), the same on every rank."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, (closure,) = heat(msh, 1, ("flux",), prefix="interval_")
    rollout = Rollout(stepper)
    u0 = rollout.initial_state()
    data = targets(rollout, 6)[1::2]  # t_2, t_4, t_6
    result = rollout.gradient(u0, data, target_interval=2, initial_state=True)
    start = u0.clone().requires_grad_(True)
    parameters = list(closure.model.parameters())
    expected_loss = rollout_loss(rollout.run(start, 6)[1::2], data, rollout.comm)
    *expected, expected_initial = torch.autograd.grad(expected_loss, [*parameters, start])
    allreduce_gradients(expected, rollout.comm)
    assert result.loss == pytest.approx(float(expected_loss.detach()), rel=1e-14)
    # NumPy targets (as docs/adjoint.md writes them) give the same loss and gradient.
    arrays = [np.asarray(t) for t in data]
    assert not isinstance(arrays[0], torch.Tensor)
    numpy_loss = rollout_loss(rollout.run(start, 6)[1::2], arrays, rollout.comm)
    assert float(numpy_loss.detach()) == float(expected_loss.detach())
    (numpy_initial,) = torch.autograd.grad(numpy_loss, [start])
    assert torch.equal(numpy_initial, expected_initial)
    for g, e in zip(result.parameters[0], expected, strict=True):
        assert float((g - e).norm()) <= 1e-13 * float(e.norm())
    assert float((result.initial_state - expected_initial).norm()) <= 1e-13 * float(
        expected_initial.norm()
    )
    with pytest.raises(ValueError, match="not a multiple of target_interval = 2"):
        rollout.gradient(u0, data, target_interval=2, num_steps=5)
    with pytest.raises(ValueError, match="longer than the 3 target states every 2 steps"):
        rollout.gradient(u0, data, target_interval=2, num_steps=8)
    with pytest.raises(ValueError, match="target_interval must be a positive integer"):
        rollout.gradient(u0, data, target_interval=0)


@pytest.mark.mpi
def test_one_step_gradient_equals_the_a_priori_gradient():
    """DG0 with a mass matrix: one step is u_1 = u_0 + q(u_0, x) cell by cell, exactly.

    With ``a = u v dx`` and ``L = (u_0 + q) v dx`` on DG0 and a one-point rule, the step
    solves ``|K| u_1 = |K| (u_0 + q)`` on each cell ``K``, so ``u_1 - t = q - (t - u_0)``:
    the one-step rollout loss ``Σ (u_1 - t)²`` is the a-priori loss ``Σ (q(x_0) - q*)²``
    with closure targets ``q* = t - u_0`` at the operands ``x_0 = (u_0, x)`` of the cells,
    and so are their gradients with respect to θ.
    """
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 3)
    V = fem.functionspace(msh, ("DG", 0))
    u_n, uh = fem.Function(V), fem.Function(V)
    u_n.interpolate(lambda x: np.sin(3 * x[0]) + x[1])
    x = ufl.SpatialCoordinate(msh)
    closure = mno.Closure(mlp(3, 1, seed=3), [u_n, x], quadrature_degree=1, device="cpu")
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    problem = LinearProblem(
        u * v * ufl.dx,
        u_n * v * ufl.dx + closure * v * closure.dx,
        u=uh,
        petsc_options=DIRECT,
        petsc_options_prefix="a_priori_",
    )
    rollout = Rollout(IMEXStepper(problem, uh, u_n, dt=1.0))
    goal = fem.Function(V)
    goal.interpolate(lambda x: np.cos(2 * x[0]) * x[1])
    num_owned = rollout.num_owned
    t = torch.from_numpy(goal.x.array[:num_owned].copy())
    result = rollout.gradient(rollout.initial_state(), [t])

    # The a-priori gradient: the operands from fem.Expression, the targets t - u_0.
    num_cells = msh.topology.index_map(2).size_local
    operands = fem.Expression(ufl.as_vector([u_n, x[0], x[1]]), quadrature_points(msh, 1))
    inputs = torch.from_numpy(operands.eval(msh, np.arange(num_cells, dtype=np.int32)))
    dofs = V.dofmap.list[:num_cells, 0]  # the cell's DG0 dof, owned with the cell
    closure_targets = torch.from_numpy(goal.x.array[dofs] - u_n.x.array[dofs])
    model = closure.model
    a_priori = ((model(inputs.reshape(num_cells, 3)).reshape(-1) - closure_targets) ** 2).sum()
    gradients = list(torch.autograd.grad(a_priori, list(model.parameters())))
    allreduce_gradients(gradients, msh.comm)
    expected_loss = msh.comm.allreduce(float(a_priori.detach()), op=MPI.SUM)
    assert result.loss == pytest.approx(expected_loss, rel=1e-12)
    for rollout_gradient, expected in zip(result.parameters[0], gradients, strict=True):
        assert float(expected.norm()) > 1e-3
        assert float((rollout_gradient - expected).norm()) <= 1e-12 * float(expected.norm())


def _raises(error, message, call):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        call()


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("where", "checkpoint_every", "last_rank"),
    [("forward", None, True), ("backward", None, False), ("backward", 2, True)],
)
def test_a_model_failing_on_one_rank_fails_on_every_rank(where, checkpoint_every, last_rank):
    """A model that raises on one rank only, in its forward pass or in its VJP inside
    torch's backward pass (where the other ranks go on to the next collective stage):
    every rank raises the same error, none is left waiting; the rollout still works
    afterwards and gives the gradient it gave before.
    """
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, 4, 4)
    u_n, uh = heat_functions(msh, 1, initial)
    model = FailsOnOneRank(mlp(3, 1), comm.size - 1 if last_rank else 0, where)
    closure = mno.Closure(model, [u_n, ufl.grad(u_n)], (), 2, device="cpu", name="scalar")
    v = ufl.TestFunction(u_n.function_space)
    prefix = f"fail_{where}_{checkpoint_every}_{last_rank}_"
    stepper = imex_heat(u_n, uh, DT * closure * v * closure.dx, prefix)
    rollout = Rollout(stepper, checkpoint_every=checkpoint_every)
    u0, data = rollout.initial_state(), targets(rollout, 4)
    before = flat_gradient(rollout.gradient(u0, data))
    what = "The backward pass of the rollout"
    what = "The model of closure 'scalar'" if where == "forward" else what
    assert_fails_on_every_rank(comm, what, model, lambda: rollout.gradient(u0, data))
    after = flat_gradient(rollout.gradient(u0, data))
    np.testing.assert_array_equal(after, before)


@pytest.mark.mpi
def test_bad_input_raises_the_same_error_on_every_rank(tiny_square):
    stepper, _ = heat(tiny_square, 1, ("scalar",), prefix="bad_")
    rollout = Rollout(stepper)
    u0, data = rollout.initial_state(), targets(rollout, 3)
    _raises(
        ValueError,
        "The horizon of 5 steps is longer than the 3 target states; give at least 5 targets "
        "or a shorter num_steps.",
        lambda: rollout.gradient(u0, data, num_steps=5),
    )
    V = stepper.u.function_space
    outsider = mno.Closure(mlp(1, 1), [stepper.u_previous], device="cpu", name="outsider")
    _raises(
        ValueError,
        "Closure 'outsider' is not in the step's linear form; the rollout differentiates its "
        "closures ['scalar'].",
        lambda: rollout.gradient(u0, data, closures=[outsider]),
    )
    _raises(
        ValueError,
        "Nothing to differentiate: give closures or initial_state=True.",
        lambda: rollout.gradient(u0, data, closures=[]),
    )
    _raises(
        ValueError,
        "u0 must be a float64 tensor on the CPU, got torch.float32 on cpu.",
        lambda: rollout.run(u0.float(), 2),
    )
    _raises(
        ValueError,
        "num_steps must be a positive integer, got 0.",
        lambda: rollout.run(u0, 0),
    )
    # A NumPy u0 is refused before the ranks' agreement on the arguments, not after it.
    _raises(
        TypeError,
        "u0 must be a torch.Tensor, got ndarray.",
        lambda: rollout.gradient(u0.numpy(), data),
    )
    # rollout_loss: a target that would broadcast against its state (the message quotes the
    # first failing rank's numbers of dofs).
    states = rollout.run(u0, 3)
    with pytest.raises(
        ValueError, match=r"Target 1 has shape \(\d+, 1\) but its state has \(\d+,\) \(this"
    ):
        rollout_loss(states, [data[0], data[1][:, None], data[2]], rollout.comm)
    _raises(
        ValueError,
        "checkpoint_every must be None or a positive integer, got 0.",
        lambda: Rollout(stepper, checkpoint_every=0),
    )
    _raises(
        ValueError,
        "keep_states must be True or False, got 'no'.",
        lambda: Rollout(stepper, checkpoint_every=2, keep_states="no"),  # type: ignore[arg-type]
    )
    # A model without parameters, when θ-gradients are asked for.
    u_n = stepper.u_previous
    cubic = mno.Closure(Cubic().double(), [u_n], quadrature_degree=2, device="cpu", name="cubic")
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = u * v * ufl.dx
    problem = LinearProblem(
        a,
        u_n * v * ufl.dx - DT * cubic * v * cubic.dx,
        u=stepper.u,
        petsc_options=DIRECT,
        petsc_options_prefix="bad_cubic_",
    )
    frozen = Rollout(IMEXStepper(problem, stepper.u, u_n, dt=DT))
    _raises(
        ValueError,
        "The model of closure 'cubic' has no trainable parameters; leave it out of closures= "
        "(closures=[] with initial_state=True differentiates with respect to the initial "
        "state only).",
        lambda: frozen.gradient(u0, data),
    )
    assert frozen.gradient(u0, data, closures=[], initial_state=True).initial_state is not None
    # Steppers and forms a rollout does not support.
    _raises(
        ValueError,
        "Rollout needs closure_interval=1 (closures updated every step), got 2.",
        lambda: Rollout(IMEXStepper(problem, stepper.u, u_n, dt=DT, closure_interval=2)),
    )
    reads_u_n = LinearProblem(
        (1 + u_n**2) * u * v * ufl.dx,
        u_n * v * ufl.dx,
        u=stepper.u,
        petsc_options=DIRECT,
        petsc_options_prefix="bad_a_",
    )
    _raises(
        ValueError,
        "The bilinear form reads u_previous ('u_n'): a rollout reuses one constant matrix. "
        "Move the term to the linear form (explicit).",
        lambda: Rollout(IMEXStepper(reads_u_n, stepper.u, u_n, dt=DT)),
    )
    square = mno.Closure(mlp(1, 1), [u_n**2], quadrature_degree=2, device="cpu", name="square")
    nonaffine = LinearProblem(
        a,
        u_n * v * ufl.dx + square * v * square.dx,
        u=stepper.u,
        petsc_options=DIRECT,
        petsc_options_prefix="bad_square_",
    )
    with pytest.raises(ValueError, match=r"^Closure 'square': a rollout needs operands affine"):
        Rollout(IMEXStepper(nonaffine, stepper.u, u_n, dt=DT))
    _raises(
        TypeError,
        "Rollout needs an IMEXStepper or an ImplicitStepper, got LinearProblem.",
        lambda: Rollout(problem),
    )
    # Implicit steps: closures of the unknown only, with their tangents in the Jacobian.
    uh = stepper.u
    explicit = mno.Closure(mlp(1, 1), [u_n], quadrature_degree=2, device="cpu", name="explicit")
    reads_previous = NonlinearProblem(
        (uh - u_n) * v * ufl.dx + explicit * v * explicit.dx,
        uh,
        petsc_options_prefix="bad_implicit_",
    )
    _raises(
        ValueError,
        "Closure 'explicit' of the implicit step reads u_previous; a rollout of the implicit "
        "stepper supports closures of the unknown u only.",
        lambda: Rollout(ImplicitStepper(reads_previous, uh, u_n, dt=DT)),
    )
    own = mno.Closure(mlp(1, 1), [uh], quadrature_degree=2, device="cpu", name="own")
    F = (uh - u_n) * v * ufl.dx + own * v * own.dx
    frozen_jacobian = NonlinearProblem(
        F,
        uh,
        J=ufl.derivative(F, uh),
        frozen_closures=True,
        petsc_options_prefix="bad_frozen_",
    )
    _raises(
        ValueError,
        "The implicit step's Jacobian misses closure tangents (frozen closures): the adjoint "
        "needs the exact Jacobian. Build the problem with the default J "
        "(dolfinx_mno.derivative(F, u)).",
        lambda: Rollout(ImplicitStepper(frozen_jacobian, uh, u_n, dt=DT)),
    )


def implicit_flux_heat(msh, degree=1, prefix="implicit_"):
    """Backward Euler with a flux closure q(u, ∇u) of the new state (Newton, exact J)."""
    u_n, uh = heat_functions(msh, degree, initial)
    v = ufl.TestFunction(u_n.function_space)
    model = mlp(3, 2, seed=4)
    with torch.no_grad():  # a mild closure: Newton converges in a few iterations
        model[2].weight.mul_(0.2)
    closure = mno.Closure(model, [uh, ufl.grad(uh)], (2,), 2 * degree, device="cpu", name="q")
    flux = DT * ufl.inner(closure, ufl.grad(v)) * closure.dx
    return implicit_heat(u_n, uh, flux, prefix), [closure]


@pytest.mark.mpi
@pytest.mark.parametrize("degree", [1, 2])
def test_taylor_implicit_parameters(degree):
    """Second-order Taylor remainders in θ through 5 Newton-converged implicit steps."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, closures = implicit_flux_heat(msh, degree, prefix=f"implicit_taylor{degree}_")
    rollout = Rollout(stepper)
    u0 = rollout.initial_state()
    remainders = taylor_parameters(rollout, closures, u0, targets(rollout))
    assert remainders[0] > 1e-9
    assert min(rates(remainders)) >= 1.9


@pytest.mark.mpi
def test_taylor_implicit_initial_state_and_checkpoints():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, _ = implicit_flux_heat(msh, 1, prefix="implicit_u0_")
    rollout = Rollout(stepper)
    u0, data = rollout.initial_state(), targets(rollout)
    result = rollout.gradient(u0, data, initial_state=True)
    remainders = initial_state_remainders(rollout, u0, data, result.initial_state, direction)
    assert remainders[0] > 1e-9
    assert min(rates(remainders)) >= 1.9
    # The implicit rollout's states are the stepper's.
    state, expected = stepper_and_rollout_states(rollout, u0, NUM_STEPS)
    assert global_max(msh.comm, state - expected) <= 1e-11
    # Checkpointed, with the forward's states or solving again: the same gradient.
    for keep_states in (True, False):
        checkpointed = Rollout(stepper, checkpoint_every=2, keep_states=keep_states)
        again = checkpointed.gradient(u0, data, initial_state=True)
        for group, expected in zip(again.parameters, result.parameters, strict=True):
            assert_same_gradient(group, expected)
        difference = float((again.initial_state - result.initial_state).norm())
        assert difference <= 1e-12 * float(result.initial_state.norm())


@pytest.mark.mpi
def test_implicit_gradients_do_not_depend_on_ranks(tiny_square):
    """Implicit steps on 2 cells (a rank without cells on 3 ranks) against COMM_SELF."""
    flat = []
    for msh in (mesh.create_unit_square(MPI.COMM_SELF, 1, 1), tiny_square):
        stepper, _ = implicit_flux_heat(msh, 2, prefix=f"implicit_ranks{msh.comm.size}_")
        rollout = Rollout(stepper)
        flat.append(flat_gradient(rollout.gradient(rollout.initial_state(), targets(rollout))))
    assert np.linalg.norm(flat[0]) > 1e-4
    assert np.linalg.norm(flat[1] - flat[0]) <= 1e-10 * np.linalg.norm(flat[0])


@pytest.mark.mpi
def test_a_float32_model_runs_in_its_own_dtype():
    """The model's dtype is its own: float32 weights give the float64 gradient to ~1e-5."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    gradients = []
    for dtype in (torch.float64, torch.float32):
        prefix = f"dtype_{dtype}_".replace(".", "")
        stepper, (closure,) = heat(msh, 1, ("scalar",), prefix=prefix, model_dtype=dtype)
        assert closure.model_dtype == dtype
        rollout = Rollout(stepper)
        result = rollout.gradient(rollout.initial_state(), targets(rollout), initial_state=True)
        assert all(g.dtype == dtype for g in result.parameters[0])
        assert result.initial_state.dtype == torch.float64
        gradients.append(torch.cat([g.double().reshape(-1) for g in result.parameters[0]]))
    error = float((gradients[1] - gradients[0]).norm() / gradients[0].norm())
    assert error <= 1e-5


@pytest.mark.mpi
def test_allreduce_gradients_sums_real_and_complex_tensors():
    """Complex gradients (a Fourier layer's weights) keep their imaginary parts when summed
    over ranks; every dtype is written back in place."""
    comm = MPI.COMM_WORLD
    rank = comm.rank + 1
    real = torch.tensor([1.0, -2.0], dtype=torch.float32) * rank
    spectral = torch.tensor([[1 + 2j, -3j]], dtype=torch.complex64) * rank
    double = torch.full((2, 2), 0.5, dtype=torch.float64) * rank
    allreduce_gradients([real, spectral, double], comm)
    total = comm.size * (comm.size + 1) / 2
    assert real.dtype == torch.float32 and spectral.dtype == torch.complex64
    np.testing.assert_array_equal(real.numpy(), total * np.array([1.0, -2.0]))
    np.testing.assert_array_equal(spectral.numpy(), total * np.array([[1 + 2j, -3j]]))
    np.testing.assert_array_equal(double.numpy(), np.full((2, 2), 0.5 * total))


def _count_solves(rollout: Rollout) -> list[int]:
    """Count the rollout's solves (IMEX solves or Newton solves) from now on."""
    count = [0]
    step = rollout._step_adjoint
    solve = step.solve

    def counted(*args, **kwargs):
        count[0] += 1
        return solve(*args, **kwargs)

    step.solve = counted  # type: ignore[method-assign]
    return count


@pytest.mark.mpi
@pytest.mark.parametrize("keep_states", [True, False])
@pytest.mark.parametrize(("every", "recomputed"), [(2, 4), (3, 3), (5, 0), (8, 0)])
def test_checkpoints_recompute_all_but_the_last_segment(every, recomputed, keep_states):
    """Backward recomputes every segment but the last, whose graph the forward kept; the
    recomputed steps solve again only without ``keep_states``; the gradient is the full
    graph's. The hook runs again for each recomputed step and before each step's adjoint."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, _ = heat(msh, 1, ("scalar",), prefix=f"recompute{every}{keep_states}_")
    times = []
    full = Rollout(stepper)
    u0 = full.initial_state()
    reference = full.gradient(u0, targets(full))
    rollout = Rollout(
        stepper,
        checkpoint_every=every,
        keep_states=keep_states,
        before_step=lambda _, t: times.append(t),
    )
    solves = _count_solves(rollout)
    result = rollout.gradient(u0, targets(rollout))
    # The hook: at each step of the forward, of the recomputation (the first steps, again)
    # and before each step's adjoint (every step: its data, restored).
    assert len(times) == 2 * NUM_STEPS + recomputed
    assert sorted(times[NUM_STEPS:]) == sorted(times[:NUM_STEPS] + times[:recomputed])
    assert solves[0] == NUM_STEPS + (0 if keep_states else recomputed)
    assert result.loss == pytest.approx(reference.loss, rel=1e-12)
    assert_same_gradient(result.parameters[0], reference.parameters[0])


@pytest.mark.mpi
def test_checkpointed_segments_run_without_a_graph_until_backward():
    """The first pass of a checkpointed segment evaluates the model without a graph (it
    costs a forward rollout); backward evaluates it again with one, once per recomputed
    step; the last segment keeps its graph. The parameter gradient with ``u0`` constant is
    the full graph's (the parameters reach the segment as its inputs)."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, closures = heat(msh, 1, ("scalar",), prefix="nograph_")
    full = Rollout(stepper)
    u0, data = full.initial_state(), targets(full)
    reference = full.gradient(u0, data)
    modes: list[bool] = []
    hook = closures[0].model.register_forward_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    try:
        rollout = Rollout(stepper, checkpoint_every=2)
        states = rollout.run(u0, NUM_STEPS)  # 5 steps: segments of 2, 2 and 1
        assert modes == [False] * 4 + [True]
        assert all(s.requires_grad for s in states)
        modes.clear()
        result = rollout.gradient(u0, data)
    finally:
        hook.remove()
    assert modes == [False] * 4 + [True] + [True] * 4
    assert_same_gradient(result.parameters[0], reference.parameters[0])


@pytest.mark.mpi
@pytest.mark.parametrize("keep_states", [True, False])
def test_checkpointed_implicit_steps_are_not_solved_again(keep_states):
    """A checkpointed implicit rollout runs Newton once a step with ``keep_states`` (the
    backward rebuilds the model's graph only), once more for each recomputed step without;
    the gradient is the full graph's."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    stepper, _ = implicit_flux_heat(msh, 1, prefix=f"implicit_keep{keep_states}_")
    full = Rollout(stepper)
    u0, data = full.initial_state(), targets(full)
    reference = full.gradient(u0, data)
    rollout = Rollout(stepper, checkpoint_every=2, keep_states=keep_states)
    solves = _count_solves(rollout)
    result = rollout.gradient(u0, data)
    recomputed = NUM_STEPS - (NUM_STEPS - 1) % 2 - 1
    assert recomputed > 0
    assert solves[0] == NUM_STEPS + (0 if keep_states else recomputed)
    assert result.loss == pytest.approx(reference.loss, rel=1e-12)
    assert_same_gradient(result.parameters[0], reference.parameters[0])


def use_tanh_kernel(closures, kernel, gemm="torch"):
    """Make each closure's fused MLP pass (updates and rollouts) use ``kernel``'s tanh and
    ``gemm``'s BLAS."""
    for closure in closures:
        mlp_pass = closure._evaluator.kernel._mlp
        assert mlp_pass is not None and mlp_pass.has_tanh
        mlp_pass.use_tanh_kernel(kernel, closure.model_dtype, closure.device)
        mlp_pass.use_gemm_kernel(gemm, closure.model_dtype, closure.device)
        plan = closure.evaluation_plan
        assert (plan["tanh_kernel"], plan["gemm_kernel"]) == (kernel, gemm)


@pytest.mark.mpi
@pytest.mark.parametrize("gemm", ["torch", "numpy"])
@pytest.mark.parametrize("case", ["imex", "imex, tiny square", "implicit"])
def test_rollouts_run_the_numpy_tanh_the_updates_chose(case, gemm, monkeypatch, tiny_square):
    """A closure whose updates use NumPy's tanh (and torch's or NumPy's BLAS) runs them in
    rollouts and their gradients: second-order Taylor remainders over 5 steps (IMEX,
    scalar and flux closures, also on the two-cell square, P2 without boundary conditions,
    where on 3 ranks one owns no cells; implicit, a flux of the new state), and the loss
    and gradients of torch's tanh and BLAS to round-off."""
    from dolfinx_mno import mlp_kernel

    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    if case == "implicit":
        stepper, closures = implicit_flux_heat(msh, 1, prefix="numpy_tanh_implicit_")
    elif case == "imex":
        stepper, closures = heat(msh, 1, ("scalar", "flux"), prefix="numpy_tanh_imex_")
    else:
        stepper, closures = heat(
            tiny_square, 2, ("scalar", "flux"), bcs=False, prefix="numpy_tanh_tiny_"
        )
    rollout = Rollout(stepper, checkpoint_every=2)
    u0, data = rollout.initial_state(), targets(rollout)
    calls = []  # the fused MLP function's calls with NumPy's tanh
    original = mlp_kernel.MLPFunction.forward

    def spy(ctx, layers, numpy_tanh, numpy_gemm, *args):
        calls.extend([(numpy_tanh, numpy_gemm)] if numpy_tanh or numpy_gemm else [])
        return original(ctx, layers, numpy_tanh, numpy_gemm, *args)

    monkeypatch.setattr(mlp_kernel.MLPFunction, "forward", spy)
    use_tanh_kernel(closures, "numpy", gemm)
    remainders = taylor_parameters(rollout, closures, u0, data)
    assert calls and set(calls) == {(True, gemm == "numpy")}  # NumPy's kernels ran
    assert remainders[0] > 1e-9
    assert min(rates(remainders)) >= 1.9
    with_numpy = rollout.gradient(u0, data, closures=closures, initial_state=True)
    use_tanh_kernel(closures, "torch")
    calls.clear()
    with_torch = rollout.gradient(u0, data, closures=closures, initial_state=True)
    assert not calls
    assert with_numpy.loss == pytest.approx(with_torch.loss, rel=1e-13)
    for group, expected in zip(with_numpy.parameters, with_torch.parameters, strict=True):
        assert_same_gradient(group, expected, rtol=1e-12)
    difference = float((with_numpy.initial_state - with_torch.initial_state).norm())
    assert difference <= 1e-12 * float(with_torch.initial_state.norm())


@pytest.mark.mpi
def test_arguments_that_differ_between_ranks_raise_instead_of_hanging(tiny_square):
    """Each rank checks its own arguments; a horizon (or a set of inputs) that differs
    between ranks used to leave the ranks in different collectives. Also a model put
    back in training mode (dropout: a random gradient), or recast, is refused as update()
    refuses it.
    """
    stepper, (closure,) = heat(tiny_square, 1, ("scalar",), prefix="ranks_differ_")
    rollout = Rollout(stepper)
    comm = tiny_square.comm
    u0, data = rollout.initial_state(), targets(rollout, 3)
    before = flat_gradient(rollout.gradient(u0, data))
    if comm.size > 1:
        mine = data[: 3 if comm.rank == 0 else 2]
        counts = [3] + [2] * (comm.size - 1)
        _raises(
            ValueError,
            "Preparing the rollout gradient: every rank must pass the same arguments, but "
            f"they differ (num_steps: {counts} on ranks 0..{comm.size - 1}). Give each rank "
            "the same number of steps and targets (each rank's targets hold its own owned "
            "dofs).",
            lambda: rollout.gradient(u0, mine),
        )
        with pytest.raises(ValueError, match=r"\(initial_state: \[True, False"):
            rollout.gradient(u0, data, initial_state=comm.rank == 0)
        with pytest.raises(ValueError, match=r"^Starting the rollout: every rank must pass"):
            rollout.run(u0, 2 + comm.rank)
    _raises(
        ValueError,
        "num_steps must be a positive integer, got 2.0.",
        lambda: rollout.gradient(u0, data, num_steps=2.0),
    )
    # NumPy integers are integers (as fit and fit_rollout take them; they were refused
    # as "not a positive integer, got np.int64(3)"); a bool is not.
    gradient = rollout.gradient(u0, data, num_steps=np.int64(3), target_interval=np.int64(1))
    np.testing.assert_array_equal(flat_gradient(gradient), before)
    for state, expected in zip(rollout.run(u0, np.int64(3)), rollout.run(u0, 3), strict=True):
        assert torch.equal(state.detach(), expected.detach())
    assert Rollout(stepper, checkpoint_every=np.int64(2)).checkpoint_every == 2
    _raises(
        ValueError,
        "checkpoint_every must be None or a positive integer, got True.",
        lambda: Rollout(stepper, checkpoint_every=True),
    )
    closure.model.train()
    with pytest.raises(RuntimeError, match=r"Closure 'scalar': the model is in training mode"):
        rollout.gradient(u0, data)
    closure.model.eval()
    # Recast after construction: was torch's bare "mat1 and mat2 must have the same dtype".
    closure.model.float()
    with pytest.raises(RuntimeError, match=r"^Closure 'scalar': the model's tensors changed "):
        rollout.gradient(u0, data)
    closure.model.double()
    np.testing.assert_array_equal(flat_gradient(rollout.gradient(u0, data)), before)
    # A mesh moved after the rollout was built: its operand maps were silently stale.
    geometry = tiny_square.geometry.x
    geometry[:, 0] *= 1.25
    moved = "The mesh moved since the rollout was built (its maps from dofs to the closures'"
    with pytest.raises(RuntimeError, match=re.escape(moved)):
        rollout.gradient(u0, data)
    geometry[:, 0] /= 1.25
    np.testing.assert_array_equal(flat_gradient(rollout.gradient(u0, data)), before)


class Masked(torch.nn.Module):
    """``model`` of the first three inputs where ``y > x`` (inputs 4 and 3), zero elsewhere."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x[:, :3]) * (x[:, 4:5] > x[:, 3:4])


def _restricted_step(msh, implicit, restricted, normalized=False):
    """A heat step whose closure acts above the diagonal only: by ``cells=`` or a mask.

    ``normalized``: the model is a :class:`~dolfinx_mno.NormalizedModel` (as ``fit``
    returns), and the boundary is free (the tiny square has no interior vertex).
    """
    u_n, uh = heat_functions(msh, 1, initial)
    state = uh if implicit else u_n
    model = mlp(3, 2 if implicit else 1, seed=5)
    if normalized:
        width = 2 if implicit else 1
        model = mno.NormalizedModel(
            model,
            mno.AffineNormalization(0.5, 2.0, width=3),
            mno.AffineNormalization(0.1, 0.5, width=width),
        )
    operands = [state, ufl.grad(state)]
    if restricted:
        cells = mesh.locate_entities(msh, 2, lambda x: x[1] >= x[0] - 1e-12)
        closure = mno.Closure(model, operands, (2,) if implicit else (), 2, cells=cells)
    else:
        operands.append(ufl.SpatialCoordinate(msh))
        closure = mno.Closure(Masked(model), operands, (2,) if implicit else (), 2)
    v = ufl.TestFunction(u_n.function_space)
    prefix = f"restricted{int(implicit)}{int(restricted)}_"
    if implicit:
        with torch.no_grad():  # a mild closure: Newton converges in a few iterations
            (model.model if normalized else model)[2].weight.mul_(0.2)
        flux = DT * ufl.inner(closure, ufl.grad(v)) * closure.dx
        return implicit_heat(u_n, uh, flux, prefix, bcs=not normalized), [closure]
    explicit = DT * closure * v * closure.dx
    return imex_heat(u_n, uh, explicit, prefix, bcs=not normalized), [closure]


@pytest.mark.mpi
@pytest.mark.parametrize("implicit", [False, True])
def test_restricted_closure_gradients(implicit):
    """A closure on half the cells (``cells=``): the gradient of the same model masked.

    The masked model reads ``x`` too and is zero below the diagonal, where the restricted
    one is not run; the two gradients agree to round-off, and the restricted one passes
    the Taylor test.
    """
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    flat = []
    for restricted in (True, False):
        stepper, closures = _restricted_step(msh, implicit, restricted)
        rollout = Rollout(stepper)
        u0 = rollout.initial_state()
        flat.append(flat_gradient(rollout.gradient(u0, targets(rollout), closures=closures)))
        if restricted and not implicit:
            remainders = taylor_parameters(rollout, closures, u0, targets(rollout))
            assert remainders[0] > 1e-9
            assert min(rates(remainders)) >= 1.9
    assert np.linalg.norm(flat[1]) > 1e-4
    assert np.linalg.norm(flat[0] - flat[1]) <= 1e-12 * np.linalg.norm(flat[1])


@pytest.mark.mpi
@pytest.mark.parametrize("implicit", [False, True])
def test_restricted_normalized_closure_on_a_rank_without_its_cells(implicit, tiny_square):
    """A fitted (normalised) model on one cell of two: a rank that owns none of it.

    On 2 and 3 ranks some rank has no point of the closure; the normalised model's output
    of an empty batch reshaped by ``-1`` failed there (``cannot reshape tensor of 0
    elements``). The gradient is that of the masked model on every cell.
    """
    flat = []
    for restricted in (True, False):
        stepper, closures = _restricted_step(tiny_square, implicit, restricted, normalized=True)
        rollout = Rollout(stepper)
        u0 = rollout.initial_state()
        flat.append(flat_gradient(rollout.gradient(u0, targets(rollout), closures=closures)))
    assert np.linalg.norm(flat[1]) > 1e-4
    assert np.linalg.norm(flat[0] - flat[1]) <= 1e-12 * np.linalg.norm(flat[1])


# -- SSP-RK3: three IMEX stages per step ------------------------------------------------


def _ssprk3(stepper: IMEXStepper, hold: bool = False) -> SSPRK3Stepper:
    """The same IMEX problem stepped by SSP-RK3 (``hold``: ``hold_closures``)."""
    return SSPRK3Stepper(
        stepper.problem, stepper.u, stepper.u_previous, stepper.dt, hold_closures=hold
    )


@pytest.mark.mpi
@pytest.mark.parametrize("hold", [False, True])
def test_ssprk3_rollout_states_are_the_steppers(hold):
    """The rollout of an SSP-RK3 stepper follows its three stages: its states are the
    stepper's (to round-off), and differ from IMEX Euler's. With ``hold_closures`` too
    (the closures' values at uⁿ in every stage)."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 5, 5)
    euler, _ = heat(msh, 1, ("scalar", "flux"), nonlinear=True, prefix=f"rk3_forward{hold}_")
    rollout = Rollout(_ssprk3(euler, hold))
    u0 = rollout.initial_state()
    state, expected = stepper_and_rollout_states(rollout, u0, NUM_STEPS)
    expected = expected.copy()  # a view of the stepper's u, which the Euler run reuses
    scale, error = global_max(msh.comm, expected), global_max(msh.comm, state - expected)
    assert scale > 0.04 and error <= 1e-13 * scale, (scale, error)
    euler_state, _ = stepper_and_rollout_states(Rollout(euler), u0, NUM_STEPS)
    assert global_max(msh.comm, euler_state - expected) > 1e-4 * scale


@pytest.mark.mpi
@pytest.mark.parametrize(("degree", "hold"), [(1, False), (2, False), (1, True)])
def test_taylor_ssprk3(degree, hold):
    """Second-order Taylor remainders in θ and in u_0 through 5 SSP-RK3 steps, with a
    right-hand side nonlinear in the state (its Jacobian at each stage's state); with
    ``hold_closures``, the closures' values at uⁿ feed all three stages."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    euler, closures = heat(
        msh, degree, ("scalar", "flux"), nonlinear=True, prefix=f"rk3_t{degree}{hold}_"
    )
    rollout = Rollout(_ssprk3(euler, hold))
    u0, data = rollout.initial_state(), targets(rollout)
    remainders = taylor_parameters(rollout, closures, u0, data)
    assert remainders[0] > 1e-9 and min(rates(remainders)) >= 1.9, remainders
    result = rollout.gradient(u0, data, closures=[], initial_state=True)
    remainders = initial_state_remainders(rollout, u0, data, result.initial_state, direction)
    assert remainders[0] > 1e-9 and min(rates(remainders)) >= 1.9, remainders


@pytest.mark.mpi
@pytest.mark.parametrize(("cells", "hold"), [((1, 1), False), ((6, 5), False), ((1, 1), True)])
def test_ssprk3_gradients_do_not_depend_on_ranks_or_checkpoints(cells, hold):
    """COMM_WORLD against COMM_SELF ((1, 1) on 3 ranks: a rank owns no cell), and the
    checkpointed gradient (stages solved again) against the full graph; with
    ``hold_closures`` too."""
    results = []
    for comm in (MPI.COMM_SELF, MPI.COMM_WORLD):
        msh = mesh.create_unit_square(comm, *cells)
        prefix = f"rk3_ranks{comm.size}{hold}_"
        euler, _ = heat(msh, 1, ("scalar", "flux"), bcs=False, prefix=prefix)
        stepper = _ssprk3(euler, hold)
        rollout = Rollout(stepper)
        u0 = rollout.initial_state()
        result = rollout.gradient(u0, targets(rollout), initial_state=True)
        slope = state_slope(rollout, result.initial_state, owned_values(rollout, direction))
        results.append((result.loss, flat_gradient(result), slope))
        for keep_states in (True, False) if comm.size > 1 or cells == (6, 5) else ():
            checkpointed = Rollout(stepper, checkpoint_every=2, keep_states=keep_states)
            again = checkpointed.gradient(u0, targets(checkpointed), initial_state=True)
            assert again.loss == pytest.approx(result.loss, rel=1e-12)
            difference = np.linalg.norm(flat_gradient(again) - results[-1][1])
            assert difference <= 1e-12 * np.linalg.norm(results[-1][1])
    assert_rank_invariant(*results)
