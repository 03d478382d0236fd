"""Interoperability with dolfinx-external-operator (ufl.ExternalOperator for DOLFINx)."""

import os

from mpi4py import MPI

import numpy as np
import pytest
import ufl
from analytic import FluxModel
from dolfinx import fem, mesh
from dolfinx.fem.petsc import assemble_vector

import dolfinx_mno as mno

if os.environ.get("CI"):
    import dolfinx_external_operator as dxo  # in CI a missing dependency is a failure
else:
    dxo = pytest.importorskip("dolfinx_external_operator")


def _numpy_flux(derivatives):
    """The FluxModel written as an external-operator callable: q = (1 + u²)∇u + u/2."""
    assert derivatives == (0, 0)

    def q(u, grad_u):
        u = u.reshape(-1, 1)
        g = grad_u.reshape(-1, 2)
        return ((1 + u**2) * g + 0.5 * u).reshape(-1)

    return q


@pytest.mark.mpi
def test_closure_from_external_operator_matches_its_evaluation():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 5)
    V = fem.functionspace(msh, ("Lagrange", 2))
    u = fem.Function(V)
    u.interpolate(lambda x: np.sin(x[0]) + x[1] ** 2)
    v = ufl.TestFunction(V)
    Q = mno.quadrature_space(msh, 3, (2,))
    N = dxo.FEMExternalOperator(u, ufl.grad(u), function_space=Q, external_function=_numpy_flux)

    # The external-operator pipeline: replace → evaluate operands → evaluate operator.
    F_ext, operators = dxo.replace_external_operators(ufl.inner(N, ufl.grad(v)) * ufl.dx)
    dxo.evaluate_external_operators(operators, dxo.evaluate_operands(operators))
    b_ext = assemble_vector(fem.form(F_ext))

    closure = mno.Closure.from_external_operator(N, FluxModel().double())
    assert closure.quadrature_degree == 3 and closure.value_shape == (2,)
    assert closure.num_inputs == 3
    closure.update()
    b_closure = assemble_vector(fem.form(ufl.inner(closure, ufl.grad(v)) * closure.dx))
    b_closure.axpy(-1.0, b_ext)
    assert b_ext.norm() > 0
    assert b_closure.norm() <= 100 * np.finfo(np.float64).eps * b_ext.norm()
    b_closure.destroy()
    b_ext.destroy()

    with pytest.raises(ValueError, match="default rule"):
        P = fem.functionspace(msh, ("Lagrange", 1, (2,)))
        mno.Closure.from_external_operator(
            dxo.FEMExternalOperator(u, ufl.grad(u), function_space=P), FluxModel().double()
        )
