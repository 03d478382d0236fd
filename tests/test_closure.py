"""A closure equals the same function written in UFL: residual vectors and Jacobians."""

import re

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from analytic import FluxModel, ScalarModel, StressModel, flux_ufl, scalar_ufl, stress_ufl
from dolfinx import fem, mesh
from dolfinx.fem.petsc import assemble_matrix, assemble_vector

import dolfinx_mno as mno

CELLS = {
    "triangle": lambda: mesh.create_unit_square(
        MPI.COMM_WORLD, 5, 4, mesh.CellType.triangle, ghost_mode=mesh.GhostMode.shared_facet
    ),
    "quadrilateral": lambda: mesh.create_unit_square(
        MPI.COMM_WORLD, 5, 4, mesh.CellType.quadrilateral
    ),
    "tetrahedron": lambda: mesh.create_unit_cube(
        MPI.COMM_WORLD, 3, 2, 2, mesh.CellType.tetrahedron
    ),
}


def _problem(kind, msh, degree):
    """Unknown, test function, closure model/operands/value shape, and the UFL closure."""
    d = msh.geometry.dim
    if kind == "stress":
        V = fem.functionspace(msh, ("Lagrange", degree, (d,)))
        u = fem.Function(V)
        u.interpolate(
            lambda x: np.stack([np.sin(x[i] + 0.3 * i) * x[(i + 1) % d] for i in range(d)])
        )
        return u, StressModel(d), [u, ufl.grad(u)], (d, d), stress_ufl(u)
    V = fem.functionspace(msh, ("Lagrange", degree))
    u = fem.Function(V)
    u.interpolate(lambda x: np.sin(2 * x[0]) * np.cos(x[1]) + x[d - 1] ** 2)
    if kind == "scalar":
        return u, ScalarModel(), [u, ufl.grad(u)], (), scalar_ufl(u)
    return u, FluxModel(), [u, ufl.grad(u)], (d,), flux_ufl(u)


def _residual(kind, closure_value, u, dx):
    v = ufl.TestFunction(u.function_space)
    if kind == "scalar":
        return ufl.inner(closure_value, v) * dx + ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
    return ufl.inner(closure_value, ufl.grad(v)) * dx


def _max_abs(array, comm):
    return comm.allreduce(np.max(np.abs(array)) if array.size else 0.0, op=MPI.MAX)


def _above_diagonal(x):
    """Cells above the diagonal y = x, which cell edges follow on the unit-square meshes."""
    return x[1] >= x[0] - 1e-12


def _compare(kind, msh, degree, q, bound=None, marker=None):
    """``marker``: restrict the closure to the cells it marks (``cells=``), against UFL on
    ``dx(1)`` of the same cells."""
    comm = msh.comm
    u, model, operands, value_shape, reference = _problem(kind, msh, degree)
    if bound is not None:  # y = b tanh(model / b), in UFL elementwise
        model = mno.Bounded(model, bound)
        if value_shape == ():
            reference = bound * ufl.tanh(reference / bound)
        else:
            reference = ufl.as_vector([bound * ufl.tanh(reference[i] / bound)
                                       for i in range(value_shape[0])])  # fmt: skip
    dx = ufl.dx(metadata={"quadrature_degree": q})
    cells = None
    if marker is not None:
        cells = mesh.locate_entities(msh, msh.topology.dim, marker)
        tags = mesh.meshtags(msh, msh.topology.dim, cells, np.ones_like(cells))
        dx = dx(1, subdomain_data=tags)
    closure = mno.Closure(
        model.double(),
        operands,
        value_shape,
        quadrature_degree=q,
        device="cpu",
        tangent=True,
        cells=cells,
    )
    closure.update()
    F_closure = _residual(kind, closure, u, closure.dx)
    F_ufl = _residual(kind, reference, u, dx)
    b_closure = assemble_vector(fem.form(F_closure))
    b_ufl = assemble_vector(fem.form(F_ufl))
    eps = np.finfo(np.float64).eps
    scale = _max_abs(b_ufl.array, comm)
    assert scale > 0
    assert _max_abs(b_closure.array - b_ufl.array, comm) <= 200 * eps * scale

    J_closure = mno.derivative(F_closure, u)
    J_ufl = ufl.derivative(F_ufl, u)
    A_closure = assemble_matrix(fem.form(J_closure))
    A_closure.assemble()
    A_ufl = assemble_matrix(fem.form(J_ufl))
    A_ufl.assemble()
    closure.update()  # the tangent now exists: J_closure's coefficients are current
    A_closure.zeroEntries()
    assemble_matrix(A_closure, fem.form(J_closure))
    A_closure.assemble()
    norm = A_ufl.norm()
    A_closure.axpy(-1.0, A_ufl)
    assert norm > 0
    assert A_closure.norm() <= 500 * eps * norm
    for obj in (b_closure, b_ufl, A_closure, A_ufl):
        obj.destroy()


@pytest.mark.mpi
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("degree", [1, 2])
@pytest.mark.parametrize("kind", ["scalar", "flux", "stress"])
def test_matches_ufl(cell, degree, kind):
    """Residual and Jacobian of a closure equal those of the same UFL expression."""
    _compare(kind, CELLS[cell](), degree, q=2 * degree + (1 if kind == "scalar" else 0))


@pytest.mark.mpi
def test_matches_ufl_on_a_curved_mesh():
    """A degree-2 geometry, curved inside the cells: a tensor closure of a vector field.

    (Checked once by hand, not kept for the suite's time: hexahedra, intervals, submeshes,
    meshes without ghost cells, prisms and manifolds, the three kinds and degrees 1-2.)
    """
    from test_grid_gather import _curved_square

    msh = _curved_square(MPI.COMM_WORLD, n=3, amplitude=0.15)
    assert msh.geometry.cmaps[0].degree == 2
    _compare("stress", msh, 1, q=3)


@pytest.mark.mpi
@pytest.mark.parametrize("q", [2, 3, 4, 5, 6])
def test_quadrature_degrees(q):
    """Degrees 2–6 on triangles and quadrilaterals, scalar and flux closures."""
    _compare("scalar", CELLS["triangle"](), 2, q)
    _compare("flux", CELLS["quadrilateral"](), 1, q)


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["scalar", "flux", "stress"])
def test_matches_ufl_on_a_rank_without_cells(tiny_square, kind):
    """Values and tangents where (on 3 ranks) a rank owns no cells: its update is empty.

    Residual vectors and Jacobians equal the pure-UFL ones to round-off, and the mean
    tangent of an affine closure is its matrix on every rank.
    """
    _compare(kind, tiny_square, 2, q=4 + (kind == "scalar"))
    u = fem.Function(fem.functionspace(tiny_square, ("Lagrange", 1)))
    affine = mno.Closure(Affine(), [u, ufl.grad(u)], (2,), quadrature_degree=2, tangent=True)
    affine.update()
    np.testing.assert_allclose(affine.mean_tangent(), Affine.M.numpy(), rtol=1e-14, atol=1e-15)


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["scalar", "flux"])
@pytest.mark.parametrize("cells", ["triangle", "tiny"])
def test_bounded_model_matches_ufl(kind, cells, tiny_square):
    """A closure of ``Bounded(model, b)`` equals ``b tanh(q / b)`` in UFL: residual, Jacobian.

    The bound is below the closures' largest values (the scalar one reaches 3.5, the
    flux 2.3), so the tanh bends them; on 3 ranks the tiny mesh leaves one rank without
    cells.
    """
    msh = CELLS["triangle"]() if cells == "triangle" else tiny_square
    _compare(kind, msh, 2, q=4 + (kind == "scalar"), bound=1.5)


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["scalar", "flux"])
@pytest.mark.parametrize("cells", ["triangle", "tiny"])
def test_restricted_to_cells_matches_ufl(kind, cells, tiny_square):
    """``cells=``: residual and Jacobian equal UFL's on ``dx(1)`` of the same cells.

    Half the cells of the triangle mesh, one of the tiny mesh's two (on 3 ranks a rank
    owns no cells, and on 2 one owns none of the selected ones).
    """
    msh = CELLS["triangle"]() if cells == "triangle" else tiny_square
    _compare(kind, msh, 2, q=4 + (kind == "scalar"), marker=_above_diagonal)


class BelowDiagonalFails(torch.nn.Module):
    """``u + 1``, but NaN at points below the diagonal (inputs ``(u, x, y)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x[:, 0] + 1.0
        return torch.where(x[:, 2] > x[:, 1], value, torch.full_like(value, torch.nan))


@pytest.mark.mpi
def test_restricted_model_never_runs_outside_its_cells():
    """A model undefined below the diagonal: it fails on every cell, works on its own.

    The values are NaN on the selected cells until the first update and zero elsewhere,
    ghosts included; the tangent too (its ghosts were 0 on 2 ranks); ``cells`` is
    read-only.
    """
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: x[0] + 2 * x[1])
    operands = [u, ufl.SpatialCoordinate(msh)]
    everywhere = mno.Closure(BelowDiagonalFails(), operands, (), 2, name="everywhere")
    count = "48 of 96" if msh.comm.size == 1 else r"\d+ of \d+"  # half the points
    with pytest.raises(mno.ClosureEvaluationError, match=f"returned NaN/Inf values at {count} "):
        everywhere.update()
    cells = mesh.locate_entities(msh, 2, _above_diagonal)
    closure = mno.Closure(BelowDiagonalFails(), operands, (), 2, cells=cells, tangent=True)
    owned = msh.topology.index_map(2).size_local
    assert np.array_equal(closure.cells, cells[cells < owned])
    values = closure.x.array.reshape(-1, 3)  # (cells, points), owned then ghost cells
    selected = np.zeros(values.shape[0], dtype=bool)
    selected[cells] = True
    assert np.isnan(values[selected]).all() and not values[~selected].any()
    tangent = closure.tangent.x.array.reshape(values.shape[0], 3, 3)
    assert np.isnan(tangent[selected]).all() and not tangent[~selected].any()  # ghosts too
    with pytest.raises(ValueError, match="read-only"):
        closure.cells[:] = 0  # the evaluator's own index: not to be changed
    closure.update()
    v = ufl.TestFunction(u.function_space)
    tags = mesh.meshtags(msh, 2, cells, np.ones_like(cells))
    dx = ufl.dx(1, subdomain_data=tags, metadata={"quadrature_degree": 2})
    b = assemble_vector(fem.form(ufl.inner(closure, v) * closure.dx))
    expected = assemble_vector(fem.form(ufl.inner(u + 1, v) * dx))
    assert _max_abs(b.array - expected.array, msh.comm) <= 1e-15
    assert _max_abs(expected.array, msh.comm) > 0.01
    assert not values[~selected].any()  # still zero, ghosts included
    tangent = closure.tangent.x.array.reshape(values.shape[0], 3, 3)
    assert (tangent[:owned][selected[:owned]] == [1.0, 0.0, 0.0]).all()
    assert not tangent[:owned][~selected[:owned]].any()
    total = msh.comm.allreduce(closure.cells.size)
    assert total == 16  # the 16 triangles above the diagonal of 32
    np.testing.assert_array_equal(closure.mean_tangent(), [1.0, 0.0, 0.0])
    for obj in (b, expected):
        obj.destroy()


@pytest.mark.mpi
def test_bad_cells_raise_the_same_error_on_every_rank(tiny_square):
    """Cells of the wrong kind, out of range, or given on some ranks only."""
    comm = tiny_square.comm
    u = fem.Function(fem.functionspace(tiny_square, ("Lagrange", 1)))

    def build(cells):
        return mno.Closure(ScalarModel().double(), [u, ufl.grad(u)], (), 2, cells=cells)

    with pytest.raises(TypeError, match=r"not a boolean mask; pass np\.flatnonzero\(mask\)"):
        build(np.array([True, False]))
    with pytest.raises(TypeError, match="integer local cell indices, got dtype float64"):
        build(np.array([0.0]))
    with pytest.raises(ValueError, match=r"one-dimensional .* got shape \(1, 1\)"):
        build(np.zeros((1, 1), dtype=np.int32))
    local = tiny_square.topology.index_map(2)
    total = local.size_local + local.num_ghosts
    bad = np.array([0, total] if comm.rank == 0 else [], dtype=np.int32)
    message = f"cells holds 1 index(es) outside this rank's {total} local cells"
    if comm.size > 1:
        message = "failed on rank(s) [0] (1 of"
    with pytest.raises(ValueError, match=re.escape(message)):
        build(bad)
    if comm.size > 1:  # None on rank 0, an array on the others
        with pytest.raises(ValueError, match=r"restricted_to_cells: \[False, True"):
            build(None if comm.rank == 0 else np.arange(local.size_local, dtype=np.int32))


def test_closure_is_a_coefficient():
    """The closure lives on a quadrature space of the requested shape and degree."""
    msh = CELLS["triangle"]()
    _, model, operands, value_shape, _ = _problem("flux", msh, 1)
    closure = mno.Closure(model.double(), operands, value_shape, quadrature_degree=3)
    assert closure.ufl_shape == (2,)
    assert closure.num_inputs == 3
    assert closure.operand_widths == [1, 2]
    assert closure.device == torch.device("cpu")
    num_cells = msh.topology.index_map(2).size_local
    points = mno.quadrature.quadrature_points(msh, 3).shape[0]
    assert points == 6
    assert closure.x.array[: num_cells * points * 2].shape == (num_cells * points * 2,)
    assert closure.dx.metadata() == {"quadrature_degree": 3, "quadrature_rule": "default"}
    closure.update()
    stages = {"operands", "model", "check", "write", "scatter", "total"}
    assert set(closure.timings) == stages
    assert closure.timings["total"] >= sum(closure.timings[s] for s in stages - {"total"}) * 0.99


class FirstInputOnly(torch.nn.Module):
    """q(u, ∇u) = (u², 1): no dependence on ∇u, and none at all in the second output."""

    def forward(self, x):
        return torch.stack([x[:, 0] ** 2, torch.ones_like(x[:, 0])], dim=1)


class Constant(torch.nn.Module):
    """q = (1, 2) whatever the inputs: the output does not require grad."""

    def forward(self, x):
        return torch.tensor([1.0, 2.0], dtype=x.dtype).expand(x.shape[0], 2)


@pytest.mark.mpi
@pytest.mark.parametrize("model", [FirstInputOnly(), Constant()], ids=["partial", "constant"])
def test_tangent_of_unused_inputs_is_zero(model):
    """Inputs a model ignores get exact zero tangent columns, not an autograd error."""
    msh = CELLS["triangle"]()
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: 1.0 + x[0] + 2 * x[1])
    closure = mno.Closure(model, [u, ufl.grad(u)], (2,), quadrature_degree=2, tangent=True)
    closure.update()
    values = closure.x.array.reshape(-1, 2)
    tangent = closure.tangent.x.array.reshape(-1, 2, 3)
    expected = np.zeros_like(tangent)
    if isinstance(model, FirstInputOnly):
        expected[:, 0, 0] = 2 * np.sqrt(values[:, 0])  # d(u²)/du = 2u
    second = 1.0 if isinstance(model, FirstInputOnly) else 2.0
    np.testing.assert_array_equal(values[:, 1], second)  # the values are there too
    np.testing.assert_allclose(tangent, expected, rtol=1e-14, atol=1e-14)


class Affine(torch.nn.Module):
    """q(u, ∇u) = M (u, ∇u) + c: the same tangent M at every point."""

    M = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], dtype=torch.float64)

    def forward(self, x):
        return x @ self.M.T + torch.tensor([0.1, -0.2], dtype=x.dtype)


@pytest.mark.mpi
def test_mean_tangent():
    """The mean tangent is M for an affine closure, and the point mean of 2u for u²."""
    msh = CELLS["quadrilateral"]()
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: 1.0 + x[0] + 2 * x[1])
    affine = mno.Closure(Affine(), [u, ufl.grad(u)], (2,), quadrature_degree=2, tangent=True)
    affine.update()
    np.testing.assert_allclose(affine.mean_tangent(), Affine.M.numpy(), rtol=1e-14, atol=1e-15)
    square = mno.Closure(FirstInputOnly(), [u, ufl.grad(u)], (2,), quadrature_degree=2)
    square.enable_tangent()
    square.update()
    # The points of the owned cells, each once: the reference mean of 2u over all ranks.
    num_owned = msh.topology.index_map(msh.topology.dim).size_local
    points = square.function_space.dofmap.list[:num_owned].reshape(-1)
    u_at_points = np.sqrt(square.x.array.reshape(-1, 2)[points, 0])
    comm = msh.comm
    expected = comm.allreduce(np.sum(2 * u_at_points)) / comm.allreduce(len(points))
    mean = square.mean_tangent()
    assert mean.shape == (2, 3)
    assert mean[0, 0] == pytest.approx(expected, rel=1e-13)
    assert 2.0 < expected < 8.0  # 2u with u in [1, 4]
    np.testing.assert_array_equal(mean.ravel()[1:], 0.0)


@pytest.mark.mpi
def test_closure_never_updated_is_nan_not_zero():
    """A closure that was never updated makes any form that uses it NaN, not silently 0."""
    msh = CELLS["triangle"]()
    comm = msh.comm
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: 1.0 + x[0] + 2 * x[1])
    closure = mno.Closure(Affine(), [u, ufl.grad(u)], (2,), quadrature_degree=2)
    assert np.all(np.isnan(closure.x.array))
    c = ufl.as_vector([1.0, 1.0])
    energy = fem.form(ufl.inner(closure, c) * closure.dx)
    assert np.isnan(comm.allreduce(fem.assemble_scalar(energy), op=MPI.SUM))
    with pytest.raises(RuntimeError, match=r"no tangent from its last update.*tangent=True"):
        closure.mean_tangent()  # no tangent at all yet
    closure.enable_tangent()
    assert np.all(np.isnan(closure.tangent.x.array))
    with pytest.raises(RuntimeError, match=r"no tangent from its last update.*tangent=True"):
        closure.mean_tangent()
    closure.update(tangent=False)
    # ∫ (M (u, ∇u) + b) · (1, 1) over the unit square, u = 1 + x + 2y: ū = 2.5, ∇u = (1, 2).
    M = Affine.M.numpy()
    expected = float(np.sum(M @ np.array([2.5, 1.0, 2.0])) + 0.1 - 0.2)
    total = comm.allreduce(fem.assemble_scalar(energy), op=MPI.SUM)
    assert total == pytest.approx(expected, rel=1e-12)
    with pytest.raises(RuntimeError, match="no tangent from its last update"):
        closure.mean_tangent()
    closure.update(tangent=True)
    np.testing.assert_allclose(closure.mean_tangent(), M, rtol=1e-14, atol=1e-15)
