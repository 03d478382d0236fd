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
from dolfinx import mesh
from neuralop_reference import widened_spectral_buffer
from problems import (
    DT,
    flat_gradient,
    global_max,
    heat_functions,
    imex_heat,
    implicit_heat,
    interpolated_targets,
    parameter_remainders,
    parameters_of,
    random_directions,
    rates,
)

import dolfinx_mno as mno
from dolfinx_mno.rollout import Rollout

neuralop = pytest.importorskip("neuralop")

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


def nonlocal_closure(model, operands, distributed):
    """A non-local closure of a copy of ``model`` on the grid ``GRID``."""
    return mno.NonlocalClosure(
        copy.deepcopy(model),
        operands,
        (),
        2,
        grid_shape=GRID,
        extension_value=0.5,
        device="cpu",
        distributed=distributed,
        name=f"c{int(distributed)}",
    )


def heat(msh, model, distributed, prefix, bcs=False):
    """An IMEX heat step with a non-local FNO source in the linear form (a copy of model)."""
    u_n, uh = heat_functions(msh, 1, initial)
    v = ufl.TestFunction(u_n.function_space)
    closure = nonlocal_closure(model, [u_n, ufl.grad(u_n)], distributed)
    explicit = DT * closure * v * closure.dx
    return imex_heat(u_n, uh, explicit, f"{prefix}{int(distributed)}_", bcs), closure


def reference(distributed: bool) -> contextlib.AbstractContextManager[None]:
    """The gathered mode's FNO (neuraloperator's forward) in float64 throughout."""
    return contextlib.nullcontext() if distributed else widened_spectral_buffer()


def target(t):
    return lambda x: (1 - t) * np.sin(np.pi * x[0]) + 0.3 * x[1] ** 2


def targets(rollout, num_steps):
    """Owned values of the analytic targets at t_1, ..., t_k (rank-independent)."""
    return interpolated_targets(rollout, target, num_steps)


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
    scale, closure_scale = global_max(comm, states[0]), global_max(comm, values[0])
    assert scale > 0.1 and closure_scale > 0.01  # the closure is not negligible
    assert global_max(comm, states[1] - states[0]) <= 1e-12 * scale
    assert global_max(comm, values[1] - values[0]) <= 1e-12 * closure_scale


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
    expected = flat_gradient(gathered)
    assert np.linalg.norm(expected) > 1e-4 and gathered.loss > 1e-3
    assert distributed_.loss == pytest.approx(gathered.loss, rel=1e-12)
    error = np.linalg.norm(flat_gradient(distributed_) - expected)
    assert error <= 1e-10 * np.linalg.norm(expected)
    # Summed over ranks exactly once: the same gradient on every rank.
    every = comm.allgather(flat_gradient(distributed_))
    assert all(np.array_equal(g, every[0]) for g in every)
    initial = gathered.initial_state.numpy()
    initial_scale = global_max(comm, initial)
    assert initial_scale > 1e-4
    assert global_max(comm, distributed_.initial_state.numpy() - initial) <= 1e-10 * initial_scale


@pytest.mark.mpi
def test_taylor_distributed_rollout(fno):
    """Second-order Taylor remainders in θ over 5 IMEX steps with a distributed FNO."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    stepper, closure = heat(msh, fno, True, "taylor_", bcs=True)
    rollout = Rollout(stepper)
    u0, data = rollout.initial_state(), targets(rollout, 5)
    result = rollout.gradient(u0, data)
    parameters = parameters_of([closure])
    directions = random_directions(parameters)
    remainders = parameter_remainders(rollout, u0, data, result, parameters, directions, rel=1e-13)
    assert remainders[0] > 1e-9  # the closure matters
    assert min(rates(remainders)) >= 1.9


def implicit_nonlocal_heat(msh, model, distributed):
    """Backward Euler with a non-local FNO source ``dt c(u, ∇u) v`` of the new state.

    Newton with the non-local closure frozen in the Jacobian (Picard for it), converged
    tightly: the adjoint is that of the converged step.
    """
    u_n, uh = heat_functions(msh, 1, initial)
    v = ufl.TestFunction(u_n.function_space)
    closure = nonlocal_closure(model, [uh, ufl.grad(uh)], distributed)
    implicit = -DT * closure * v * closure.dx
    return implicit_heat(u_n, uh, implicit, f"dist_implicit{int(distributed)}_")


@pytest.mark.mpi
def test_implicit_rollout_gradients_distributed_equal_gathered(fno):
    """Implicit steps (the adjoint's GMRES runs the distributed stages' VJPs) give the
    gathered mode's loss and gradients: to the Newton tolerance's noise (measured 3e-11
    in the loss and 1e-9 in ∂J/∂θ, on 1 and 3 ranks)."""
    results = []
    for distributed in (False, True):
        msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 3)
        rollout = Rollout(implicit_nonlocal_heat(msh, fno, distributed))
        u0 = rollout.initial_state()
        data = [state.detach() * 0.9 for state in rollout.run(u0, 3)]
        result = rollout.gradient(u0, data, initial_state=True)
        # Complex weights stay complex: the atol below bounds |Δ| of each entry.
        flat = torch.cat([g.reshape(-1) for g in result.parameters[0]]).numpy()
        results.append((result.loss, flat, result.initial_state.numpy()))
    (loss_g, grad_g, initial_g), (loss_d, grad_d, initial_d) = results
    assert loss_g > 1e-4 and np.linalg.norm(grad_g) > 1e-3
    assert loss_d == pytest.approx(loss_g, rel=1e-9)
    assert np.linalg.norm(grad_d - grad_g) <= 1e-7 * np.linalg.norm(grad_g)
    assert np.linalg.norm(initial_d - initial_g) <= 1e-7 * np.linalg.norm(initial_g)
    gathered = MPI.COMM_WORLD.allgather(grad_d)
    assert all(np.allclose(g, gathered[0], rtol=0, atol=1e-14) for g in gathered)
