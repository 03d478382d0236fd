"""Differentiable rollouts with a NonlocalClosure: Taylor test, the stepper, rank invariance."""

import re

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from problems import DIRECT, boundary_bc

import dolfinx_mno as mno
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.rollout import Rollout, rollout_loss
from dolfinx_mno.timestepping import IMEXStepper, ImplicitStepper

DT = 0.05
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


def heat(msh, degree=1, bcs=True, prefix="nonlocal_", local=False):
    """An IMEX heat step with a non-local source dt c(u_n, ∂u_n/∂x) v in the linear form.

    ``local``: also a local flux closure ``-dt q(u_n) ∂v/∂x`` (an MLP).
    """
    V = fem.functionspace(msh, ("Lagrange", degree))
    u_n = fem.Function(V, name="u_n")
    u_n.interpolate(initial)
    uh = fem.Function(V, name="u")
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = (u * v + DT * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
    closure = mno.NonlocalClosure(
        conv_model(3), [u_n, u_n.dx(0)], (), 2 * degree, grid_shape=(9,), device="cpu"
    )
    L = u_n * v * ufl.dx + DT * closure * v * closure.dx
    if local:
        torch.manual_seed(1)
        mlp = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
        flux = mno.Closure(mlp.double(), [u_n], (), 2 * degree, device="cpu", name="q")
        L -= DT * flux * v.dx(0) * flux.dx
    problem = LinearProblem(
        a,
        L,
        u=uh,
        bcs=[boundary_bc(V)] if bcs else [],
        petsc_options=DIRECT,
        petsc_options_prefix=prefix,
    )
    stepper = IMEXStepper(problem, uh, u_n, dt=DT)
    return (stepper, [closure, flux]) if local else (stepper, closure)


def targets(rollout, num_steps=NUM_STEPS):
    V = rollout.stepper.u.function_space
    result = []
    for n in range(1, num_steps + 1):
        f = fem.Function(V)
        f.interpolate(target(n * DT))
        result.append(torch.from_numpy(f.x.array[: rollout.num_owned].copy()))
    return result


def loss(rollout, u0, data):
    with torch.no_grad():
        return float(rollout_loss(rollout.run(u0, len(data)), data, rollout.comm))


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
    parameters = [p for closure in closures for p in closure.model.parameters()]
    gradients = [g for group in result.parameters for g in group]
    generator = torch.Generator().manual_seed(7)
    directions = [torch.randn(p.shape, generator=generator).double() for p in parameters]
    slope = sum(float((g * d).sum()) for g, d in zip(gradients, directions, strict=True))
    base = [p.detach().clone() for p in parameters]
    J0 = loss(rollout, u0, data)
    assert J0 == pytest.approx(result.loss, rel=1e-14)
    remainders = []
    for k in range(5):
        eps = 1e-2 * 2.0**-k
        with torch.no_grad():
            for p, p0, d in zip(parameters, base, directions, strict=True):
                p.copy_(p0 + eps * d)
        remainders.append(abs(loss(rollout, u0, data) - J0 - eps * slope))
    with torch.no_grad():
        for p, p0 in zip(parameters, base, strict=True):
            p.copy_(p0)
    remainders = np.asarray(remainders)
    assert remainders[0] > 1e-9  # the closure matters
    assert min(np.log2(remainders[:-1] / remainders[1:])) >= 1.9


@pytest.mark.mpi
def test_taylor_initial_state():
    """Second-order Taylor remainders in u_0: through the sampling, gather and scatter."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 8)
    stepper, _ = heat(msh, 1, prefix="nl_taylor_u0_")
    rollout = Rollout(stepper)
    u0, data = rollout.initial_state(), targets(rollout)
    result = rollout.gradient(u0, data, closures=[], initial_state=True)
    direction = fem.Function(stepper.u.function_space)
    direction.interpolate(lambda x: np.cos(2 * x[0]) + x[0] ** 2)
    delta = torch.from_numpy(direction.x.array[: rollout.num_owned].copy())
    slope = rollout.comm.allreduce(float((result.initial_state * delta).sum()), op=MPI.SUM)
    J0 = loss(rollout, u0, data)
    remainders = np.array(
        [
            abs(loss(rollout, u0 + eps * delta, data) - J0 - eps * slope)
            for eps in 1e-2 * 2.0 ** -np.arange(5)
        ]
    )
    assert remainders[0] > 1e-9
    assert min(np.log2(remainders[:-1] / remainders[1:])) >= 1.9


@pytest.mark.mpi
def test_rollout_states_are_the_steppers():
    """The rollout's forward pass is the IMEX stepper's loop with closure.update()."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 8)
    stepper, _ = heat(msh, 1, prefix="nl_forward_")
    rollout = Rollout(stepper)
    u0 = rollout.initial_state()
    with torch.no_grad():
        states = rollout.run(u0, NUM_STEPS)
    stepper.u_previous.x.array[: rollout.num_owned] = u0.numpy()
    stepper.u_previous.x.scatter_forward()
    stepper.run(NUM_STEPS, progress=False)
    expected = stepper.u.x.array[: rollout.num_owned]
    scale = msh.comm.allreduce(np.abs(expected).max(initial=0.0), op=MPI.MAX)
    error = msh.comm.allreduce(np.abs(states[-1].numpy() - expected).max(initial=0.0), op=MPI.MAX)
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
        direction = fem.Function(stepper.u.function_space)
        direction.interpolate(lambda x: np.cos(2 * x[0]) + x[0] ** 2)
        weights = torch.from_numpy(direction.x.array[: rollout.num_owned].copy())
        slope = comm.allreduce(float((result.initial_state * weights).sum()), op=MPI.SUM)
        flat = torch.cat([g.reshape(-1) for g in result.parameters[0]]).numpy()
        results.append((result.loss, flat, slope))
    (loss_1, grad_1, slope_1), (loss_p, grad_p, slope_p) = results
    assert loss_1 > 1e-3 and np.linalg.norm(grad_1) > 1e-3 and abs(slope_1) > 1e-3
    assert loss_p == pytest.approx(loss_1, rel=1e-12)
    assert np.linalg.norm(grad_p - grad_1) <= 1e-10 * np.linalg.norm(grad_1)
    assert slope_p == pytest.approx(slope_1, rel=1e-10)
    gathered = MPI.COMM_WORLD.allgather(grad_p)
    assert all(np.array_equal(g, gathered[0]) for g in gathered)


@pytest.mark.mpi
def test_checkpointed_gradient_equals_the_full_graph():
    """Segments recomputed in backward (the model on the root only) give the same gradient."""
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 6)
    stepper, _ = heat(msh, 1, prefix="nl_checkpoint_")
    u0 = Rollout(stepper).initial_state()  # a rollout leaves u_previous at its last state
    gradients = []
    for checkpoint_every in (None, 2, 3):
        rollout = Rollout(stepper, checkpoint_every=checkpoint_every)
        result = rollout.gradient(u0, targets(rollout))
        gradients.append(torch.cat([g.reshape(-1) for g in result.parameters[0]]).numpy())
    assert np.linalg.norm(gradients[0]) > 1e-3
    for gradient in gradients[1:]:
        assert np.linalg.norm(gradient - gradients[0]) <= 1e-12 * np.linalg.norm(gradients[0])


@pytest.mark.mpi
def test_implicit_step_with_a_nonlocal_closure_raises_on_every_rank():
    msh = mesh.create_unit_interval(MPI.COMM_WORLD, 4)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n, uh = fem.Function(V), fem.Function(V)
    closure = mno.NonlocalClosure(conv_model(3), [uh, uh.dx(0)], (), 2, device="cpu", name="c")
    v = ufl.TestFunction(V)
    F = (uh - u_n) * v * ufl.dx + DT * ufl.inner(ufl.grad(uh), ufl.grad(v)) * ufl.dx
    F -= DT * closure * v * closure.dx
    problem = NonlinearProblem(F, uh, petsc_options=DIRECT, petsc_options_prefix="nl_implicit_")
    stepper = ImplicitStepper(problem, uh, u_n, dt=DT)
    message = (
        "Rollouts of the implicit stepper support local closures only; ['c'] are non-local "
        "(use the IMEX stepper, with the closure in the linear form)."
    )
    with pytest.raises(NotImplementedError, match=f"^{re.escape(message)}$"):
        Rollout(stepper)
