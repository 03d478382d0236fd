"""The coarse + MNO solve with a distributed FNO closure: states and gradients.

An IMEX heat step with a non-local source ``dt c(u_n, ∇u_n) v`` whose model is a
neuraloperator FNO, run once with ``NonlocalClosure(distributed=True)`` and once in the
gathered mode with the same weights: the states of the time loop and the gradients of a
differentiable rollout (:class:`~dolfinx_mno.rollout.Rollout`) agree to round-off. Run
serially and with ``mpirun -n 2``, ``-n 3`` (the 2-cell square leaves a rank without cells,
which still holds a slab of the grid and its share of the model's gradient).
"""

from __future__ import annotations

import contextlib
import copy

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from neuralop_reference import widened_spectral_buffer
from problems import DIRECT, boundary_bc

import dolfinx_mno as mno
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.rollout import Rollout, rollout_loss
from dolfinx_mno.timestepping import IMEXStepper, ImplicitStepper

neuralop = pytest.importorskip("neuralop")

DT = 0.05
GRID = (8, 6)


@pytest.fixture(scope="module")
def fno() -> torch.nn.Module:
    """A small float64 FNO: ``(1, 4, *GRID)`` (u, ∇u, mask) → ``(1, 1, *GRID)``."""
    torch.manual_seed(5)
    model = neuralop.models.FNO(
        n_modes=(6, 4), in_channels=4, out_channels=1, hidden_channels=4, n_layers=2
    )
    return mno.to_precision(model, torch.float64).eval()


def initial(x):
    return np.sin(np.pi * x[0]) * np.cos(np.pi * x[1]) + 0.5 * x[0]


def heat(msh, model, distributed, prefix, bcs=False):
    """An IMEX heat step with a non-local FNO source in the linear form (a copy of model)."""
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n = fem.Function(V, name="u_n")
    u_n.interpolate(initial)
    uh = fem.Function(V, name="u")
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = (u * v + DT * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
    closure = mno.NonlocalClosure(
        copy.deepcopy(model),
        [u_n, ufl.grad(u_n)],
        (),
        2,
        grid_shape=GRID,
        extension_value=0.5,
        device="cpu",
        distributed=distributed,
        name=f"c{int(distributed)}",
    )
    L = u_n * v * ufl.dx + DT * closure * v * closure.dx
    problem = LinearProblem(
        a,
        L,
        u=uh,
        bcs=[boundary_bc(V)] if bcs else [],
        petsc_options=DIRECT,
        petsc_options_prefix=f"{prefix}{int(distributed)}_",
    )
    return IMEXStepper(problem, uh, u_n, dt=DT), closure


def reference(distributed: bool) -> contextlib.AbstractContextManager[None]:
    """The gathered mode's FNO (neuraloperator's forward) in float64 throughout."""
    return contextlib.nullcontext() if distributed else widened_spectral_buffer()


def targets(rollout, num_steps):
    V = rollout.stepper.u.function_space
    result = []
    for n in range(1, num_steps + 1):
        f = fem.Function(V)
        f.interpolate(lambda x, t=n * DT: (1 - t) * np.sin(np.pi * x[0]) + 0.3 * x[1] ** 2)
        result.append(torch.from_numpy(f.x.array[: rollout.num_owned].copy()))
    return result


def _max(comm, value):
    return comm.allreduce(float(value), op=MPI.MAX)


@pytest.mark.mpi
@pytest.mark.parametrize("cells", [(1, 1), (4, 3)])
def test_time_loop_distributed_equals_gathered(fno, cells):
    """Three IMEX steps: the same states in both modes; (1, 1): a rank without cells on 3."""
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, *cells)
    states, values = [], []
    for distributed in (False, True):
        stepper, closure = heat(msh, fno, distributed, f"solve{cells[0]}_")
        assert (closure.slab_stage is not None) == distributed
        with reference(distributed):
            stepper.run(3, progress=False)
        states.append(stepper.u.x.array.copy())
        values.append(closure.x.array.copy())
    scale = _max(comm, np.abs(states[0]).max(initial=0.0))
    closure_scale = _max(comm, np.abs(values[0]).max(initial=0.0))
    assert scale > 0.1 and closure_scale > 0.01  # the closure is not negligible
    assert _max(comm, np.abs(states[1] - states[0]).max(initial=0.0)) <= 1e-12 * scale
    assert _max(comm, np.abs(values[1] - values[0]).max(initial=0.0)) <= 1e-12 * closure_scale


def _flat(gradients):
    return torch.cat([g.reshape(-1) for g in gradients]).numpy()


@pytest.mark.mpi
@pytest.mark.parametrize(("cells", "checkpoint_every"), [((1, 1), None), ((4, 3), 2)])
def test_rollout_gradients_distributed_equal_gathered(fno, cells, checkpoint_every):
    """Five steps: loss, parameter and initial-state gradients equal in both modes.

    Each rank's DistributedFNO gradient is its slab's share; the rollout sums them once.
    """
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, *cells)
    results = []
    for distributed in (False, True):
        stepper, _ = heat(msh, fno, distributed, f"grad{cells[0]}_", bcs=cells != (1, 1))
        rollout = Rollout(stepper, checkpoint_every=checkpoint_every)
        with reference(distributed):
            result = rollout.gradient(
                rollout.initial_state(), targets(rollout, 5), initial_state=True
            )
        results.append(result)
    gathered, distributed_ = results
    expected = _flat(gathered.parameters[0])
    assert np.linalg.norm(expected) > 1e-4 and gathered.loss > 1e-3
    assert distributed_.loss == pytest.approx(gathered.loss, rel=1e-12)
    error = np.linalg.norm(_flat(distributed_.parameters[0]) - expected)
    assert error <= 1e-10 * np.linalg.norm(expected)
    # Summed over ranks exactly once: the same gradient on every rank.
    every = comm.allgather(_flat(distributed_.parameters[0]))
    assert all(np.array_equal(g, every[0]) for g in every)
    initial = gathered.initial_state.numpy()
    initial_error = np.abs(distributed_.initial_state.numpy() - initial).max(initial=0.0)
    initial_scale = _max(comm, np.abs(initial).max(initial=0.0))
    assert initial_scale > 1e-4
    assert _max(comm, initial_error) <= 1e-10 * initial_scale


def _loss(rollout, u0, data):
    with torch.no_grad():
        return float(rollout_loss(rollout.run(u0, len(data)), data, rollout.comm))


@pytest.mark.mpi
def test_taylor_distributed_rollout(fno):
    """Second-order Taylor remainders in θ over 5 IMEX steps with a distributed FNO."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    stepper, closure = heat(msh, fno, True, "taylor_", bcs=True)
    rollout = Rollout(stepper)
    u0, data = rollout.initial_state(), targets(rollout, 5)
    result = rollout.gradient(u0, data)
    parameters = list(closure.model.parameters())
    generator = torch.Generator().manual_seed(7)
    directions = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in parameters]
    slope = sum(
        float((g.conj() * d).real.sum()) if g.is_complex() else float((g * d).sum())
        for g, d in zip(result.parameters[0], directions, strict=True)
    )
    base = [p.detach().clone() for p in parameters]
    J0 = _loss(rollout, u0, data)
    assert J0 == pytest.approx(result.loss, rel=1e-13)
    remainders = []
    for k in range(5):
        eps = 1e-2 * 2.0**-k
        with torch.no_grad():
            for p, p0, d in zip(parameters, base, directions, strict=True):
                p.copy_(p0 + eps * d)
        remainders.append(abs(_loss(rollout, u0, data) - J0 - eps * slope))
    with torch.no_grad():
        for p, p0 in zip(parameters, base, strict=True):
            p.copy_(p0)
    remainders = np.asarray(remainders)
    assert remainders[0] > 1e-9  # the closure matters
    assert min(np.log2(remainders[:-1] / remainders[1:])) >= 1.9


#: Newton with the non-local closure frozen in the Jacobian (Picard for it), converged
#: tightly: the adjoint is that of the converged step.
PICARD = {
    **DIRECT,
    "snes_type": "newtonls",
    "snes_linesearch_type": "none",
    "snes_atol": 1e-13,
    "snes_rtol": 1e-13,
    "snes_stol": 0.0,
    "snes_max_it": 50,
}


def implicit_heat(msh, model, distributed):
    """Backward Euler with a non-local FNO source ``dt c(u, ∇u) v`` of the new state."""
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n = fem.Function(V, name="u_n")
    u_n.interpolate(initial)
    uh = fem.Function(V, name="u")
    uh.x.array[:] = u_n.x.array
    v = ufl.TestFunction(V)
    closure = mno.NonlocalClosure(
        copy.deepcopy(model),
        [uh, ufl.grad(uh)],
        (),
        2,
        grid_shape=GRID,
        extension_value=0.5,
        device="cpu",
        distributed=distributed,
        name=f"c{int(distributed)}",
    )
    F = ((uh - u_n) * v + DT * ufl.inner(ufl.grad(uh), ufl.grad(v))) * ufl.dx
    F -= DT * closure * v * closure.dx
    problem = NonlinearProblem(
        F,
        uh,
        bcs=[boundary_bc(V)],
        petsc_options=PICARD,
        petsc_options_prefix=f"dist_implicit{int(distributed)}_",
    )
    return ImplicitStepper(problem, uh, u_n, dt=DT)


@pytest.mark.mpi
def test_implicit_rollout_gradients_distributed_equal_gathered(fno):
    """Implicit steps (the adjoint's GMRES runs the distributed stages' VJPs) give the
    gathered mode's loss and gradients: to the Newton tolerance's noise (measured 3e-11
    in the loss and 1e-9 in ∂J/∂θ, on 1 and 3 ranks)."""
    results = []
    for distributed in (False, True):
        msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 3)
        rollout = Rollout(implicit_heat(msh, fno, distributed))
        u0 = rollout.initial_state()
        data = [state.detach() * 0.9 for state in rollout.run(u0, 3)]
        result = rollout.gradient(u0, data, initial_state=True)
        flat = torch.cat([g.reshape(-1) for g in result.parameters[0]]).numpy()
        results.append((result.loss, flat, result.initial_state.numpy()))
    (loss_g, grad_g, initial_g), (loss_d, grad_d, initial_d) = results
    assert loss_g > 1e-4 and np.linalg.norm(grad_g) > 1e-3
    assert loss_d == pytest.approx(loss_g, rel=1e-9)
    assert np.linalg.norm(grad_d - grad_g) <= 1e-7 * np.linalg.norm(grad_g)
    assert np.linalg.norm(initial_d - initial_g) <= 1e-7 * np.linalg.norm(initial_g)
    gathered = MPI.COMM_WORLD.allgather(grad_d)
    assert all(np.allclose(g, gathered[0], rtol=0, atol=1e-14) for g in gathered)
