"""The NumPy/torch boundary: models run for inference, tangents need autograd."""

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno.petsc import NonlinearProblem


@pytest.fixture
def u():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    u.interpolate(lambda x: x[0] + 2 * x[1])
    return u


class Dropped(torch.nn.Module):
    """A linear map behind a dropout layer (p = 0.5)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1).double()
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(self.linear(x))


@pytest.mark.mpi
def test_dropout_is_off_and_training_mode_is_refused(u):
    model = Dropped()
    assert model.training  # a fresh module is in training mode
    closure = mno.Closure(model, [u, ufl.grad(u)], device="cpu")
    assert not any(m.training for m in model.modules())
    closure.update()
    first = closure.x.array.copy()
    closure.update()
    np.testing.assert_array_equal(closure.x.array, first)
    # Without dropout the values are the linear map itself.
    x = closure._evaluator.inputs
    expected = model.linear(torch.from_numpy(x)).detach().numpy().reshape(-1)
    np.testing.assert_allclose(closure._evaluator.outputs.reshape(-1), expected, rtol=1e-14)

    model.train()
    with pytest.raises(mno.ClosureEvaluationError, match=r"training mode.*model\.eval\(\)"):
        closure.update()
    np.testing.assert_array_equal(closure.x.array, first)  # values kept
    model.eval()
    closure.update()
    np.testing.assert_array_equal(closure.x.array, first)


@pytest.mark.mpi
def test_batch_norm_statistics_are_not_touched_by_construction(u):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
    mean = model[1].running_mean.clone()
    mno.Closure(model, [u, ufl.grad(u)], value_shape=(4,), device="cpu").update()
    torch.testing.assert_close(model[1].running_mean, mean, rtol=0, atol=0)
    assert int(model[1].num_batches_tracked) == 0


class NoGrad(torch.nn.Module):
    """q = x₀² computed under no_grad: right values, no autograd graph."""

    def forward(self, x):
        with torch.no_grad():
            return x[:, :1] ** 2


class Detached(torch.nn.Module):
    def forward(self, x):
        return (x[:, :1] ** 2).detach()


class Constant(torch.nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 1), 3.0, dtype=x.dtype)


@pytest.mark.mpi
@pytest.mark.parametrize("model", [NoGrad(), Detached()], ids=["no_grad", "detach"])
def test_tangent_of_a_model_without_autograd_fails_loudly(u, model):
    closure = mno.Closure(model, [u], device="cpu")
    closure.update()  # values alone are fine
    np.testing.assert_allclose(
        closure._evaluator.outputs[:, 0], closure._evaluator.inputs[:, 0] ** 2, rtol=1e-14
    )
    values = closure.x.array.copy()
    message = r"depends on its inputs but carries no autograd graph.*no_grad"
    with pytest.raises(mno.ClosureEvaluationError, match=message):
        closure.update(tangent=True)
    np.testing.assert_array_equal(closure.x.array, values)
    # Newton reports it rather than converging slowly on a zero tangent.
    v = ufl.TestFunction(u.function_space)
    F = u * v * ufl.dx - closure * v * closure.dx
    problem = NonlinearProblem(F, u, petsc_options_prefix="nograd_")
    with pytest.raises(mno.ClosureEvaluationError, match="no autograd graph"):
        problem.solve()


@pytest.mark.mpi
def test_constant_model_has_zero_tangent(u):
    closure = mno.Closure(Constant(), [u], device="cpu", tangent=True)
    closure.update()
    assert np.all(closure.x.array == 3.0)
    assert np.all(closure.tangent.x.array == 0.0)
