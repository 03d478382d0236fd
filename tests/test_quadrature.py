"""Quadrature spaces and form checks: closures are integrated with their own rule only."""

from types import SimpleNamespace

from mpi4py import MPI

import numpy as np
import pytest
import ufl
from analytic import ScalarModel
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno import quadrature
from dolfinx_mno.petsc import LinearProblem


@pytest.mark.mpi
def test_plain_measure_is_refused_and_closure_dx_keeps_other_terms_exact():
    """A closure on a plain dx would drag every other plain-dx term onto its rule."""
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, 4, 4)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    u.interpolate(lambda x: 1.0 + x[0] + 2.0 * x[1])
    closure = mno.Closure(ScalarModel().double(), [u, ufl.grad(u)], quadrature_degree=1)
    closure.update()

    def integral(form):
        return comm.allreduce(fem.assemble_scalar(fem.form(form)), op=MPI.SUM)

    # ∫(1 + x + 2y)⁴ over the unit square, exactly.
    exact = (4**6 - 2**6 - 3**6 + 1) / 60.0
    reference = integral(u**4 * ufl.dx)
    assert reference == pytest.approx(exact, rel=1e-12)
    closure_part = integral(closure * closure.dx)

    # With closure.dx the u⁴ term keeps its own (exact) rule.
    assert integral(u**4 * ufl.dx + closure * closure.dx) == pytest.approx(
        reference + closure_part, rel=1e-12
    )
    # The plain dx that check_form refuses really is wrong: UFL merges the two integrals
    # and FFCx integrates u⁴ with the closure's degree-1 rule (a few % off).
    merged = integral(u**4 * ufl.dx + closure * ufl.dx) - closure_part
    assert abs(merged - reference) > 1e-2 * reference

    v = ufl.TestFunction(V)
    du = ufl.TrialFunction(V)
    plain = u**4 * v * ufl.dx + closure * v * ufl.dx
    message = r"'closure' \(degree 1\) are integrated with a plain measure.*closure\.dx"
    with pytest.raises(ValueError, match=message):
        mno.check_form(plain)
    with pytest.raises(ValueError, match=message):
        mno.form(plain)
    with pytest.raises(ValueError, match=message):
        LinearProblem(du * v * ufl.dx, plain, petsc_options_prefix="plain_dx_")
    mno.check_form(u**4 * v * ufl.dx + closure * v * closure.dx)
    mno.check_form(closure * v * ufl.dx(degree=1))


def test_quadrature_points_match_the_space():
    msh = mesh.create_unit_square(MPI.COMM_SELF, 1, 1)
    points = mno.quadrature.quadrature_points(msh, 2)
    space = mno.quadrature_space(msh, 2, (2,))
    assert points.shape == (3, 2)
    assert space.dofmap.bs == 2
    assert space.dofmap.list.shape == (2, 3)
    np.testing.assert_allclose(points.sum(axis=0), [1.0, 1.0], rtol=1e-14)


@pytest.mark.mpi
@pytest.mark.parametrize("value_shape", [(), (2,), (2, 2)])
def test_owned_dofs_select_the_owned_cells_values_in_cell_point_order(value_shape):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 2)
    space = mno.quadrature_space(msh, 2, value_shape)
    num_cells = msh.topology.index_map(2).size_local
    dofs = quadrature.owned_dofs(space, num_cells)
    bs = space.dofmap.bs
    expected = (space.dofmap.list[:num_cells].reshape(-1, 1) * bs + np.arange(bs)).reshape(-1)
    np.testing.assert_array_equal(np.arange(space.dofmap.index_map.size_local * bs)[dofs], expected)
    num_points = quadrature.quadrature_points(msh, 2).shape[0]
    assert expected.size == num_cells * num_points * int(np.prod(value_shape, dtype=int))
    assert isinstance(dofs, slice)  # quadrature dofs of owned cells are contiguous


def test_owned_dofs_gather_where_the_dofs_are_not_contiguous():
    dofmap = SimpleNamespace(bs=2, list=np.array([[2, 3], [0, 1], [4, 5]], dtype=np.int32))
    dofs = quadrature.owned_dofs(SimpleNamespace(dofmap=dofmap), 2)
    np.testing.assert_array_equal(dofs, [4, 5, 6, 7, 0, 1, 2, 3])
