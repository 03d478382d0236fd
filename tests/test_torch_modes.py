"""The caller's torch modes and model changes: closures, rollouts and fits behave the same.

A user's script may build or solve inside ``torch.no_grad()`` or ``torch.inference_mode()``
(common around "evaluation" code), export a model with ``torch.export``, or cast the model
after building its closure. Each case gives the same numbers as normal mode, or a clear
error on every rank with the previous values kept.
"""

from __future__ import annotations

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno.rollout import Rollout
from dolfinx_mno.training import fit
from tests.problems import NEWTON, Cubic, heat_functions, imex_heat, mlp

MODES = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


def _square(n: int = 4) -> mesh.Mesh:
    return mesh.create_unit_square(MPI.COMM_WORLD, n, n)


def _operand(msh: mesh.Mesh) -> fem.Function:
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    u.interpolate(lambda x: np.sin(3 * x[0]) + x[1] ** 2)
    return u


def _max(values: np.ndarray) -> float:
    """The largest ``|values|`` over every rank (so that every rank asserts the same)."""
    return MPI.COMM_WORLD.allreduce(float(np.abs(values).max(initial=0.0)), op=MPI.MAX)


def _reference(model: torch.nn.Module, u: fem.Function) -> np.ndarray:
    """The values of a closure of ``model`` built and updated in torch's normal mode."""
    closure = mno.Closure(model, [u], quadrature_degree=2, device="cpu", name="reference")
    closure.update()
    return closure.x.array.copy()


@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES)
def test_a_closure_built_in_a_torch_mode_updates_outside_it(mode):
    """Built inside the mode, updated outside it and inside it: the model's values."""
    u = _operand(_square())
    model = mlp(1, 1)
    with MODES[mode]():
        closure = mno.Closure(model, [u], quadrature_degree=2, device="cpu", name="built")
        closure.update()
    # (Two closures may pick different fast paths, timed at construction: round-off apart.)
    assert _max(closure.x.array - _reference(model, u)) <= 1e-14
    u.x.array[:] *= 0.5
    closure.update()
    assert _max(closure.x.array - _reference(model, u)) <= 1e-14
    with MODES[mode]():
        closure.update(tangent=True)
    # d/du of the MLP at the points, against central differences of its values.
    h = 1e-6
    values = []
    for shift in (h, -h):
        u.x.array[:] += shift
        values.append(_reference(model, u))
        u.x.array[:] -= shift
    slope = (values[0] - values[1]) / (2 * h)
    assert _max(closure.tangent.x.array - slope) <= 1e-8


@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", ["cubic", "mlp"])
def test_newton_with_a_closure_tangent_in_a_torch_mode(mode, model):
    """Newton with the autograd tangent of a closure, solved inside the caller's mode:
    the same iterations and the same solution as in normal mode."""

    def solve(context):
        msh = _square(6)
        u_n, uh = heat_functions(msh, 1, lambda x: np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]))
        uh.x.array[:] = u_n.x.array
        net = Cubic().double() if model == "cubic" else mlp(1, 1)
        closure = mno.Closure(net, [uh], quadrature_degree=2, device="cpu", name="r")
        v = ufl.TestFunction(uh.function_space)
        F = ((uh - u_n) * v + 0.05 * ufl.inner(ufl.grad(uh), ufl.grad(v))) * ufl.dx
        F += 0.05 * closure * v * closure.dx
        problem = mno.petsc.NonlinearProblem(
            F, uh, J=mno.derivative(F, uh), petsc_options=NEWTON,
            petsc_options_prefix=f"modes_{mode}_{model}_",
        )  # fmt: skip
        with context():
            problem.solve()
        return problem.solver.getIterationNumber(), uh.x.array.copy()

    iterations, expected = solve(torch.enable_grad)
    found_iterations, found = solve(MODES[mode])
    assert found_iterations == iterations
    assert _max(found - expected) <= 1e-13


@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES)
def test_rollout_gradient_in_a_torch_mode(mode):
    """``Rollout.gradient`` is a gradient function: inside the caller's no_grad or
    inference mode it returns the same loss and gradients as outside."""
    msh = _square()
    u_n, uh = heat_functions(msh, 1, lambda x: x[0] * (1 - x[0]) * x[1])
    V = uh.function_space
    closure = mno.Closure(mlp(1, 1), [u_n], quadrature_degree=2, device="cpu", name="q")
    stepper = imex_heat(
        u_n, uh, -0.05 * closure * ufl.TestFunction(V) * closure.dx, prefix=f"modes_{mode}_"
    )
    rollout = Rollout(stepper)
    u0 = rollout.initial_state()
    targets = [0.9 * u0, 0.8 * u0, 0.7 * u0]
    expected = rollout.gradient(u0, targets, initial_state=True)
    with MODES[mode]():
        found = rollout.gradient(u0, targets, initial_state=True)
    assert found.loss == expected.loss
    for g, e in zip(found.parameters[0], expected.parameters[0], strict=True):
        assert torch.equal(g, e)
    assert torch.equal(found.initial_state, expected.initial_state)
    assert torch.is_grad_enabled()  # the caller's mode is back


@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES)
def test_fit_in_a_torch_mode(mode):
    """``fit`` inside the caller's no_grad or inference mode trains as outside it."""
    rng = np.random.default_rng(MPI.COMM_WORLD.rank)
    x = rng.uniform(-1, 1, (40, 2))
    y = np.sin(x[:, :1]) * x[:, 1:]
    options = dict(epochs=3, batch_size=16, progress=False, seed=1, comm=MPI.COMM_WORLD)
    expected = fit(mno.MLP(2, 1, [8], seed=0).double(), x, y, **options)
    model = mno.MLP(2, 1, [8], seed=0).double()  # built outside: torch cannot train
    with MODES[mode]():  # parameters created in inference mode
        found = fit(model, x, y, **options)
    assert found.history.train_loss == expected.history.train_loss
    for p, q in zip(found.model.parameters(), expected.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_an_exported_program_module_is_refused_clearly():
    """``ExportedProgram.module()`` cannot be put in eval mode: a TypeError naming the fix."""
    u = _operand(_square(2))
    model = mlp(1, 1)
    program = torch.export.export(model, (torch.ones(4, 1, dtype=torch.float64),))
    with pytest.raises(TypeError, match=r"torch\.export program .* pass the original"):
        mno.Closure(program.module(), [u], quadrature_degree=2, device="cpu")


@pytest.mark.mpi
@pytest.mark.parametrize("cast", ["float", "half"])  # to torch.float32, torch.float16
@pytest.mark.parametrize("kind", ["mlp", "formula"])
def test_a_model_cast_after_construction_is_refused(cast, kind):
    """``model.float()`` after the closure was built: every update raises on every rank
    with the reason, and the values are kept (before, an MLP failed with torch's dtype
    error blamed on the model, and a formula silently mixed precisions)."""
    u = _operand(_square())
    if kind == "mlp":
        model = mlp(1, 1)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(1, 1)).double()
    closure = mno.Closure(model, [u], quadrature_degree=2, device="cpu", name="cast")
    closure.update()
    before = closure.x.array.copy()
    getattr(model, cast)()
    u.x.array[:] *= 2.0
    with pytest.raises(mno.ClosureEvaluationError, match=(
        rf"on rank 0: the model's tensors changed from torch.float64 on cpu to "
        rf"{ {'float': torch.float32, 'half': torch.float16}[cast]} on cpu since the closure "
        r"was built .* build a new closure for the model\. The previous closure values"
    )):  # fmt: skip
        closure.update()
    assert _max(closure.x.array - before) == 0.0
    model.double()  # back to the closure's precision: it works again
    closure.update()
    assert _max(closure.x.array - _reference(model, u)) <= 1e-14
