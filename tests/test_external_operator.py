"""Interoperability with dolfinx-external-operator (ufl.ExternalOperator for DOLFINx)."""

import os

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from analytic import FluxModel
from dolfinx import fem, la, mesh
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
    # Another rule of the same degree (4 Gauss-Jacobi points, not the default's 6):
    # refused as such, not by a NumPy broadcasting error.
    import basix.ufl

    jacobi = basix.ufl.quadrature_element("triangle", (2,), scheme="gauss_jacobi", degree=3)
    with pytest.raises(ValueError, match="default rule"):
        mno.Closure.from_external_operator(
            dxo.FEMExternalOperator(u, ufl.grad(u), function_space=fem.functionspace(msh, jacobi)),
            FluxModel().double(),
        )
    with pytest.raises(TypeError, match=r"^from_external_operator takes a ufl.ExternalOperator"):
        mno.Closure.from_external_operator(fem.Function(Q), FluxModel().double())


def _benchmark_module():
    """``benchmarks/closure_vs_external_operator.py``: the closures it times, both ways."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # for its `_common` and `closure_overhead` imports
    spec = importlib.util.spec_from_file_location(
        "closure_vs_external_operator", folder / "closure_vs_external_operator.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def _owned_vector(form):
    b = fem.assemble_vector(fem.form(form))
    b.scatter_reverse(la.InsertMode.add)
    return b.array[: b.index_map.size_local * b.block_size].copy()


def _owned_matrix(form):
    """The owned rows of the assembled matrix, dense (small meshes only)."""
    A = fem.assemble_matrix(fem.form(form))
    A.scatter_reverse()
    return A.to_dense()


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["analytic", "mlp", "mlp_vector"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cells", [(6, 5), (1, 1)])
def test_benchmark_closures_give_ext_ops_residual_and_jacobian(name, dtype, cells):
    """The closures the benchmark times: same residual and Jacobian both ways, to round-off.

    The MLPs run in ``dtype`` on both sides (float64 operands cast to it), with the
    tangent from ``vmap(jacfwd)`` for ext-op and from the closure's own evaluator; the
    analytic flux is float64 NumPy (hand-written derivatives) against torch (autograd).
    On (1, 1) cells and 3 ranks one rank owns no cells.
    """
    if name == "analytic" and dtype == torch.float32:
        pytest.skip("the analytic closure is float64 on both sides")
    bench = _benchmark_module()
    msh = mesh.create_unit_square(MPI.COMM_WORLD, *cells)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    u.interpolate(lambda x: np.sin(2 * x[0]) * np.cos(x[1]) + x[1] ** 2)
    pair = bench.build_pair(name, u, 2, {"device": "cpu"}, mlp_dtype=dtype)
    pair.ext_values_and_tangent()
    pair.ours_values_and_tangent()
    eps = np.finfo(np.float64 if dtype == torch.float64 else np.float32).eps
    comm = msh.comm

    def check(ours, ext):
        scale = comm.allreduce(float(np.max(np.abs(ext), initial=0.0)), op=MPI.MAX)
        error = comm.allreduce(float(np.max(np.abs(ours - ext), initial=0.0)), op=MPI.MAX)
        assert scale > 0
        assert error <= 16 * eps * scale, (error, scale)

    check(_owned_vector(pair.residual_ours), _owned_vector(pair.residual_ext))
    check(_owned_matrix(pair.jacobian_ours), _owned_matrix(pair.jacobian_ext))
    # Values alone agree too (the ext-op values step, not the one that came with the tangent).
    pair.ext_values()
    pair.ours_values()
    check(_owned_vector(pair.residual_ours), _owned_vector(pair.residual_ext))
