"""Small pieces shared by the solver tests: solvers, boundary conditions, models, rollouts.

The rollout helpers serve the Taylor and rank-invariance tests of ``test_rollout.py``,
``test_rollout_nonlocal.py`` and ``test_nonlocal_distributed_solve.py``: a backward-Euler heat
step (IMEX, closures in the linear form; or implicit, closures of the unknown), targets and
directions interpolated into the state space, and the loss, slopes and remainders of
``J(x + ε δ) − J(x) − ε dJ·δ``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh

from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.rollout import Rollout, RolloutGradient, rollout_loss
from dolfinx_mno.timestepping import IMEXStepper, ImplicitStepper

#: A direct solver for KSP (and SNES's KSP) options.
DIRECT = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}

#: Newton with a direct solver, converged to round-off: a rollout's adjoint is that of the
#: converged step. With a non-local closure (frozen in the Jacobian by design) it is Picard
#: for that closure, hence the 50 iterations.
NEWTON = {
    **DIRECT,
    "snes_type": "newtonls",
    "snes_linesearch_type": "none",
    "snes_atol": 1e-13,
    "snes_rtol": 1e-13,
    "snes_stol": 0.0,
    "snes_max_it": 50,
}

#: The time step of the rollout tests' heat problems.
DT = 0.05

#: ε = 1e-2·2^-k, k = 0..4: the steps of the Taylor tests.
TAYLOR_STEPS = 1e-2 * 2.0 ** -np.arange(5)

PointFunction = Callable[[np.ndarray], np.ndarray]


def boundary_dofs(V: fem.FunctionSpace):
    """The dofs of ``V`` on the exterior facets of its mesh."""
    msh = V.mesh
    msh.topology.create_connectivity(msh.topology.dim - 1, msh.topology.dim)
    facets = mesh.exterior_facet_indices(msh.topology)
    return fem.locate_dofs_topological(V, msh.topology.dim - 1, facets)


def boundary_bc(V: fem.FunctionSpace, value: float | fem.Function = 0.0) -> fem.DirichletBC:
    """``u = value`` on the whole boundary."""
    if isinstance(value, fem.Function):
        return fem.dirichletbc(value, boundary_dofs(V))
    return fem.dirichletbc(value, boundary_dofs(V), V)


class Cubic(torch.nn.Module):
    """r(u) = u³."""

    def forward(self, x):
        return x[:, 0] ** 3


def mlp(num_inputs: int, num_outputs: int, seed: int = 0, width: int = 8) -> torch.nn.Module:
    """A small float64 tanh MLP, the same on every rank (seeded)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(num_inputs, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, num_outputs),
    ).double()


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, message):
        ctx.message = message
        return x.clone()

    @staticmethod
    def backward(ctx, gradient):
        if ctx.message is not None:
            raise ValueError(ctx.message)
        return gradient, None


class FailsOnOneRank(torch.nn.Module):
    """``model``, raising ``ValueError`` on ``rank`` alone once :attr:`armed`.

    ``where="forward"``: in the forward pass; ``"backward"``: in its vector-Jacobian
    product, inside torch's autograd engine, where the other ranks go on.
    """

    def __init__(self, model: torch.nn.Module, rank: int, where: str):
        super().__init__()
        self.model, self.rank, self.where, self.armed = model, rank, where, False

    def message(self) -> str:
        return f"the model's {self.where} pass failed on rank {self.rank}"

    def forward(self, x):
        armed = self.armed and MPI.COMM_WORLD.rank == self.rank
        if armed and self.where == "forward":
            raise ValueError(self.message())
        fails = armed and self.where == "backward"
        return _FailInBackward.apply(self.model(x), self.message() if fails else None)


def assert_fails_on_every_rank(comm: MPI.Comm, what: str, model: FailsOnOneRank, call) -> None:
    """``call()`` raises the same ``ValueError`` on every rank, naming ``model``'s rank.

    On one rank, the model's own error unchanged. ``model`` is disarmed afterwards.
    """
    import re

    import pytest

    message = model.message()
    if comm.size > 1:
        message = (
            f"{what} failed on rank(s) [{model.rank}] (1 of {comm.size} ranks); on rank "
            f"{model.rank}: ValueError: {message}."
        )
    model.armed = True
    try:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call()
    finally:
        model.armed = False


# -- heat steps --------------------------------------------------------------------------


def heat_functions(
    msh: mesh.Mesh, degree: int, initial: PointFunction
) -> tuple[fem.Function, fem.Function]:
    """``u_n`` (interpolating ``initial``) and the unknown ``u`` (zero) in P``degree``."""
    V = fem.functionspace(msh, ("Lagrange", degree))
    u_n = fem.Function(V, name="u_n")
    u_n.interpolate(initial)
    return u_n, fem.Function(V, name="u")


def imex_heat(
    u_n: fem.Function,
    uh: fem.Function,
    explicit: ufl.Form,
    prefix: str,
    bcs: bool = True,
    older: Sequence[fem.Function] = (),
) -> IMEXStepper:
    """The IMEX step ``(u − u_n, v) + dt (∇u, ∇v) = explicit(v)``, LU-solved.

    Args:
        u_n: The previous state.
        uh: The unknown, in the space of ``u_n``.
        explicit: The linear form's terms beyond ``(u_n, v)`` (closures of ``u_n``), in the
            test function ``ufl.TestFunction(V)``.
        prefix: The PETSc options prefix (unique per test).
        bcs: ``u = 0`` on the boundary, or no boundary condition.
        older: The stepper's older states (``u_{n-1}, ...``), if ``explicit`` reads them.
    """
    V = uh.function_space
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = (u * v + DT * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
    problem = LinearProblem(
        a,
        u_n * v * ufl.dx + explicit,
        u=uh,
        bcs=[boundary_bc(V)] if bcs else [],
        petsc_options=DIRECT,
        petsc_options_prefix=prefix,
    )
    return IMEXStepper(problem, uh, u_n, dt=DT, older=older)


def implicit_heat(
    u_n: fem.Function,
    uh: fem.Function,
    implicit: ufl.Form,
    prefix: str,
    bcs: bool = True,
    options: dict | None = None,
) -> ImplicitStepper:
    """Backward Euler ``(u − u_n, v) + dt (∇u, ∇v) + implicit(u; v) = 0`` by Newton.

    Args:
        u_n: The previous state; the unknown ``uh`` starts from it.
        uh: The unknown, in the space of ``u_n``.
        implicit: The residual's terms beyond the heat equation's (closures of ``uh``), in
            the test function ``ufl.TestFunction(V)``.
        prefix: The PETSc options prefix (unique per test).
        bcs: ``u = 0`` on the boundary, or no boundary condition.
        options: PETSc options; default :data:`NEWTON`.
    """
    V = uh.function_space
    uh.x.array[:] = u_n.x.array
    v = ufl.TestFunction(V)
    F = ((uh - u_n) * v + DT * ufl.inner(ufl.grad(uh), ufl.grad(v))) * ufl.dx + implicit
    problem = NonlinearProblem(
        F,
        uh,
        bcs=[boundary_bc(V)] if bcs else [],
        petsc_options=NEWTON if options is None else options,
        petsc_options_prefix=prefix,
    )
    return ImplicitStepper(problem, uh, u_n, dt=DT)


# -- rollout data ------------------------------------------------------------------------


def owned_values(rollout: Rollout, f: PointFunction) -> torch.Tensor:
    """``f`` interpolated into the state space: its owned values, ``(num_owned,)`` float64."""
    g = fem.Function(rollout.stepper.u.function_space)
    g.interpolate(f)
    return torch.from_numpy(g.x.array[: rollout.num_owned].copy())


def interpolated_targets(
    rollout: Rollout, target: Callable[[float], PointFunction], num_steps: int
) -> list[torch.Tensor]:
    """Owned values of ``target(t)`` at ``t = dt, 2 dt, ..., num_steps dt``."""
    return [owned_values(rollout, target(n * DT)) for n in range(1, num_steps + 1)]


def stepper_and_rollout_states(
    rollout: Rollout, u0: torch.Tensor, num_steps: int, older: Sequence[torch.Tensor] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """The owned final state of ``rollout.run`` and of the stepper's own loop from ``u0``
    (and the older states ``older``).

    The stepper's unknown starts from ``u0`` too (Newton's initial guess; an LU solve
    ignores it).
    """
    with torch.no_grad():
        states = rollout.run(u0, num_steps, older=list(older) if older else None)
    stepper = rollout.stepper
    for function, values in zip([stepper.u_previous, *stepper.older], [u0, *older], strict=True):
        function.x.array[: rollout.num_owned] = values.numpy()
        function.x.scatter_forward()
    stepper.u.x.array[:] = stepper.u_previous.x.array
    stepper.run(num_steps, progress=False)
    return states[-1].numpy(), stepper.u.x.array[: rollout.num_owned]


def global_max(comm: MPI.Comm, values: np.ndarray) -> float:
    """``max |values|`` over all ranks (0 where no rank holds any)."""
    return comm.allreduce(float(np.abs(values).max(initial=0.0)), op=MPI.MAX)


# -- losses, slopes, remainders ----------------------------------------------------------


def loss(
    rollout: Rollout,
    u0: torch.Tensor,
    data: Sequence[torch.Tensor],
    older: Sequence[torch.Tensor] | None = None,
) -> float:
    """The rollout loss of ``len(data)`` steps from ``u0`` (and ``older``), without a graph."""
    with torch.no_grad():
        states = rollout.run(u0, len(data), older=older)
        return float(rollout_loss(states, data, rollout.comm))


def loss_at(
    rollout: Rollout,
    u0: torch.Tensor,
    data: Sequence[torch.Tensor],
    parameters: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    eps: float,
    older: Sequence[torch.Tensor] | None = None,
) -> float:
    """The loss at ``θ + ε δ`` (``θ``: ``parameters``, restored after)."""
    base = [p.detach().clone() for p in parameters]
    with torch.no_grad():
        for p, p0, d in zip(parameters, base, directions, strict=True):
            p.copy_(p0 + eps * d)
    try:
        return loss(rollout, u0, data, older)
    finally:
        with torch.no_grad():
            for p, p0 in zip(parameters, base, strict=True):
                p.copy_(p0)


def parameters_of(closures: Sequence) -> list[torch.Tensor]:
    """The closures' model parameters, in the order of ``RolloutGradient.parameters``."""
    return [p for closure in closures for p in closure.model.parameters()]


def random_directions(parameters: Sequence[torch.Tensor], seed: int = 7) -> list[torch.Tensor]:
    """Standard normal directions ``δ`` in the parameters' shapes and dtypes (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in parameters]


def parameter_slope(result: RolloutGradient, directions: Sequence[torch.Tensor]) -> float:
    """``dJ·δ = Re Σ conj(g) δ`` over all closures' gradients (complex weights included)."""
    gradients = [g for group in result.parameters for g in group]
    return sum(
        float(torch.real((g.conj() * d).sum())) for g, d in zip(gradients, directions, strict=True)
    )


def state_slope(rollout: Rollout, gradient: torch.Tensor, delta: torch.Tensor) -> float:
    """``dJ/du_0 · δ`` summed over ranks (both ``(num_owned,)``)."""
    return rollout.comm.allreduce(float((gradient * delta).sum()), op=MPI.SUM)


def flat_gradient(result: RolloutGradient) -> np.ndarray:
    """All parameter gradients in one real vector (complex ones as (re, im) pairs)."""
    return torch.cat(
        [
            torch.view_as_real(g.resolve_conj()).reshape(-1) if g.is_complex() else g.reshape(-1)
            for group in result.parameters
            for g in group
        ]
    ).numpy()


def remainders(perturbed_loss: Callable[[float], float], J0: float, slope: float) -> np.ndarray:
    """``|J(ε) − J0 − ε slope|`` at the :data:`TAYLOR_STEPS` ``ε``."""
    return np.array([abs(perturbed_loss(eps) - J0 - eps * slope) for eps in TAYLOR_STEPS])


def rates(values: np.ndarray) -> np.ndarray:
    """The convergence rates ``log2(r_k / r_{k+1})`` of remainders halving ``ε``."""
    values = np.asarray(values)
    return np.log2(values[:-1] / values[1:])


def parameter_remainders(
    rollout: Rollout,
    u0: torch.Tensor,
    data: Sequence[torch.Tensor],
    result: RolloutGradient,
    parameters: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    rel: float = 1e-14,
    older: Sequence[torch.Tensor] | None = None,
) -> np.ndarray:
    """Taylor remainders in ``θ`` of the gradient ``result`` (its loss checked to ``rel``)."""
    J0 = loss(rollout, u0, data, older)
    assert J0 == pytest.approx(result.loss, rel=rel)
    slope = parameter_slope(result, directions)
    return remainders(
        lambda eps: loss_at(rollout, u0, data, parameters, directions, eps, older), J0, slope
    )


def initial_state_remainders(
    rollout: Rollout,
    u0: torch.Tensor,
    data: Sequence[torch.Tensor],
    gradient: torch.Tensor,
    direction: PointFunction,
    older: Sequence[torch.Tensor] | None = None,
) -> np.ndarray:
    """Taylor remainders in ``u_0`` along ``direction`` (interpolated) of ``dJ/du_0``."""
    delta = owned_values(rollout, direction)
    slope = state_slope(rollout, gradient, delta)
    J0 = loss(rollout, u0, data, older)
    return remainders(lambda eps: loss(rollout, u0 + eps * delta, data, older), J0, slope)


def assert_same_gradient(
    gradient: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], rtol: float = 1e-12
) -> None:
    """``gradient`` equals ``expected`` (one closure's parameter gradients) to ``rtol``.

    Relative to the closure's whole gradient: a parameter whose gradient is zero but for
    round-off (1e-16) has no relative digits to compare, and another order of the same
    operations (a recomputed segment, another rank count) changes it.
    """
    scale = float(torch.cat([e.reshape(-1) for e in expected]).norm())
    assert scale > 0
    for g, e in zip(gradient, expected, strict=True):
        assert float((g - e).norm()) <= rtol * scale


def assert_rank_invariant(
    serial: tuple[float, np.ndarray, float], parallel: tuple[float, np.ndarray, float]
) -> None:
    """``(loss, flat gradient, slope)`` on COMM_SELF and COMM_WORLD agree (1e-12, 1e-10),
    and every rank holds the same parameter gradient."""
    (loss_1, grad_1, slope_1), (loss_p, grad_p, slope_p) = serial, parallel
    assert loss_1 > 1e-3 and np.linalg.norm(grad_1) > 1e-3 and abs(slope_1) > 1e-3
    assert loss_p == pytest.approx(loss_1, rel=1e-12)
    assert np.linalg.norm(grad_p - grad_1) <= 1e-10 * np.linalg.norm(grad_1)
    assert slope_p == pytest.approx(slope_1, rel=1e-10)
    gathered = MPI.COMM_WORLD.allgather(grad_p)
    assert all(np.array_equal(g, gathered[0]) for g in gathered)
