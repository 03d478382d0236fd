"""Affine normalisation stored with the model: values, tangents and state_dict."""

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno


def test_affine_normalization_from_data():
    torch.manual_seed(0)
    data = torch.randn(1000, 3, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]) + 3.0
    norm = mno.AffineNormalization.from_data(data)
    z = norm(data)
    np.testing.assert_allclose(z.mean(dim=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(dim=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(norm.inverse(z), data, rtol=1e-12)
    constant = mno.AffineNormalization.from_data(torch.ones(10, 1))
    assert constant.scale.item() == 1.0
    with pytest.raises(ValueError, match="non-zero"):
        mno.AffineNormalization(scale=[1.0, 0.0], width=2)
    with pytest.raises(ValueError, match="Expected 2 normalisation values"):
        mno.AffineNormalization(shift=[1.0, 2.0, 3.0], width=2)


@pytest.mark.mpi
def test_normalized_closure_and_tangent_match_ufl():
    """y = so + σo·W((x - s)/σ): the closure and its Jacobian equal the UFL expression."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    u.interpolate(lambda x: 1 + x[0] ** 2 + x[1])
    linear = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        linear.weight.fill_(3.0)
    model = mno.NormalizedModel(
        torch.nn.Sequential(linear, torch.nn.Softplus()),
        mno.AffineNormalization(shift=2.0, scale=0.5, width=1),
        mno.AffineNormalization(shift=-1.0, scale=4.0, width=1),
    )
    assert {"input_normalization.shift", "output_normalization.scale"} <= set(model.state_dict())
    closure = mno.Closure(model, [u], quadrature_degree=2, tangent=True)
    closure.update()
    z = 3.0 * (u - 2.0) / 0.5
    reference = 4.0 * ufl.ln(1 + ufl.exp(z)) - 1.0
    v = ufl.TestFunction(V)
    dx = ufl.dx(metadata={"quadrature_degree": 2})
    F_closure = closure * v * closure.dx + ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
    F_ufl = reference * v * dx + ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
    from dolfinx.fem.petsc import assemble_matrix, assemble_vector

    b1, b2 = assemble_vector(fem.form(F_closure)), assemble_vector(fem.form(F_ufl))
    b1.axpy(-1.0, b2)
    assert b1.norm() <= 1e-13 * b2.norm()
    A1 = assemble_matrix(fem.form(mno.derivative(F_closure, u)))
    A1.assemble()
    A2 = assemble_matrix(fem.form(ufl.derivative(F_ufl, u)))
    A2.assemble()
    A1.axpy(-1.0, A2)
    assert A1.norm() <= 1e-13 * A2.norm()
    for obj in (b1, b2, A1, A2):
        obj.destroy()


def test_float32_model_gets_float32_statistics():
    model = mno.NormalizedModel(
        torch.nn.Linear(2, 1),
        mno.AffineNormalization(width=2),
        mno.AffineNormalization(width=1),
    )
    assert model.input_normalization.shift.dtype == torch.float32
    assert model(torch.zeros(4, 2)).dtype == torch.float32
