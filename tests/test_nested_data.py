"""Nested-mesh filters, flux commutators and grid data for neural operators.

* :func:`dolfinx_mno.quadrature.composite_quadrature` integrates piecewise polynomials on
  a uniformly refined cell exactly;
* ``L2Projection(subdivisions=m, bcs=...)`` is the exact (constrained) L² projection of a
  field of a mesh nested by the factor ``m``: Galerkin orthogonality to 1e-13;
* ``ClosureSampler(tendency_restriction=CellAverage(...))`` gives the subgrid flux whose
  weak form is the commutator of the nested Burgers flux, exactly;
* :class:`dolfinx_mno.data.GriddedSampler` gives the inputs a non-local closure feeds
  its model, bit for bit, and exact values of piecewise polynomials on the grid.
"""

import re

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno.data import (
    CellAverage,
    ClosureSampler,
    GriddedSampler,
    L2Projection,
    Tendency,
    restriction,
)
from dolfinx_mno.grid import Grid
from dolfinx_mno.quadrature import composite_quadrature, measure


@pytest.mark.parametrize("cell", ["interval", "triangle", "quadrilateral", "hexahedron"])
def test_composite_quadrature_weights_and_exactness(cell):
    points, weights = composite_quadrature(cell, 2, 4)
    volume = 0.5 if cell == "triangle" else 1.0
    assert weights.sum() == pytest.approx(volume, rel=1e-14)
    assert np.all(weights > 0)
    # |x - 1/2| is linear on each sub-cell of a 4-fold subdivision: integrated exactly.
    value = np.sum(weights * np.abs(points[:, 0] - 0.5))
    exact = {"interval": 0.25, "triangle": 0.125, "quadrilateral": 0.25, "hexahedron": 0.25}
    assert value == pytest.approx(exact[cell], rel=1e-14)
    # A single rule of comparable size aliases the kink.
    import basix

    single_points, single_weights = basix.make_quadrature(getattr(basix.CellType, cell), 8)
    single = np.sum(single_weights * np.abs(single_points[:, 0] - 0.5))
    assert abs(single - exact[cell]) > 1e-4


def test_composite_quadrature_rejects_bad_input():
    with pytest.raises(ValueError, match="tetrahedron"):
        composite_quadrature("tetrahedron", 2, 2)
    with pytest.raises(ValueError, match="subdivisions"):
        composite_quadrature("interval", 2, 0)
    with pytest.raises(ValueError, match="degree"):
        composite_quadrature("interval", -1, 2)


def _nested(kind, n, m):
    comm = MPI.COMM_WORLD
    if kind == "interval":
        return (
            mesh.create_interval(comm, n, [0.0, 1.0]),
            mesh.create_interval(comm, m * n, [0.0, 1.0]),
        )
    cell = mesh.CellType.quadrilateral if kind == "quadrilateral" else mesh.CellType.triangle
    return (
        mesh.create_unit_square(comm, n, n, cell),
        mesh.create_unit_square(comm, m * n, m * n, cell),
    )


def _wall_bc(V):
    tdim = V.mesh.topology.dim
    V.mesh.topology.create_connectivity(tdim - 1, tdim)
    facets = mesh.exterior_facet_indices(V.mesh.topology)
    return fem.dirichletbc(0.0, fem.locate_dofs_topological(V, tdim - 1, facets), V)


def _rough_fine_field(Vf):
    """A fine P1 field with a kink in every fine cell: random nodal values (seeded by x)."""
    u = fem.Function(Vf)
    x = Vf.tabulate_dof_coordinates()
    u.x.array[:] = np.sin(1e3 * x[:, 0] + 7e2 * x[:, 1]) + x[:, 0]
    return u


def _galerkin_residual(projected, u_f, bcs=()):
    """max |(P u_f − u_f, φ)| / (‖u_f‖ ‖φ‖) over a few smooth coarse φ, on the fine mesh.

    Every coarse function is a fine function when the meshes are nested: it is interpolated
    into the fine space exactly, and the residual is integrated exactly on the fine cells.
    φ vanishes on the dofs of ``bcs``.
    """
    Vc, Vf = projected.function_space, u_f.function_space
    fine = Vf.mesh
    cells = np.arange(fine.topology.index_map(fine.topology.dim).size_local, dtype=np.int32)
    transfer = fem.create_interpolation_data(Vf, Vc, cells)

    def on_fine(w):
        out = fem.Function(Vf)
        out.interpolate_nonmatching(w, cells, transfer)
        out.x.scatter_forward()
        return out

    def integral(form):
        return fine.comm.allreduce(fem.assemble_scalar(fem.form(form)))

    rng = np.random.default_rng(0)
    norm = np.sqrt(integral(u_f**2 * ufl.dx))
    projected_f = on_fine(projected)
    worst = 0.0
    for _ in range(3):
        phi = fem.Function(Vc)
        x = Vc.tabulate_dof_coordinates()
        phi.x.array[:] = np.cos(rng.uniform(1, 9) * x[:, 0] + rng.uniform(1, 9) * x[:, 1])
        for bc in bcs:
            bc.set(phi.x.array)
        phi_f = on_fine(phi)
        residual = abs(integral((projected_f - u_f) * phi_f * ufl.dx))
        worst = max(worst, residual / (norm * np.sqrt(integral(phi_f**2 * ufl.dx))))
    return worst


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["interval", "quadrilateral", "triangle"])
@pytest.mark.parametrize("constrained", [False, True])
def test_nested_l2_projection_is_exact(kind, constrained):
    """(P u_f − u_f, φ) = 0 for coarse φ (vanishing on the walls if constrained)."""
    n, m = (8, 8) if kind == "interval" else (4, 4)
    coarse, fine = _nested(kind, n, m)
    Vc = fem.functionspace(coarse, ("Lagrange", 1))
    Vf = fem.functionspace(fine, ("Lagrange", 1))
    u_f = _rough_fine_field(Vf)
    bcs = [_wall_bc(Vc)] if constrained else []
    exact = L2Projection(Vc, subdivisions=m, bcs=bcs)(u_f)
    aliased = L2Projection(Vc, bcs=bcs)(u_f)
    assert _galerkin_residual(exact, u_f, bcs) < 1e-12
    assert _galerkin_residual(aliased, u_f, bcs) > 1e-4  # the default rule sees few fine cells
    if constrained:
        values = exact.x.array[bcs[0].dof_indices()[0]]
        assert np.all(values == 0.0)


def _square(n, cell=mesh.CellType.triangle, diagonal=mesh.DiagonalType.right):
    return mesh.create_unit_square(MPI.COMM_WORLD, n, n, cell, diagonal=diagonal)


def _refined(n):
    """``create_unit_square(n, n)`` refined once by dolfinx.mesh.refine (Plaza's method)."""
    msh = _square(n)
    msh.topology.create_entities(1)
    return mesh.refine(msh)[0]


# (coarse mesh, fine mesh, subdivisions) on which the composite rule is exact.
EXACT_PAIRS = {
    "left diagonal": lambda: (
        _square(3, diagonal=mesh.DiagonalType.left),
        _square(6, diagonal=mesh.DiagonalType.left),
        2,
    ),
    "rectangle of quadrilaterals": lambda: (
        mesh.create_rectangle(
            MPI.COMM_WORLD, [[0.0, 0.0], [2.0, 1.0]], [2, 1], mesh.CellType.quadrilateral
        ),
        mesh.create_rectangle(
            MPI.COMM_WORLD, [[0.0, 0.0], [2.0, 1.0]], [6, 3], mesh.CellType.quadrilateral
        ),
        3,
    ),
    "hexahedra": lambda: (
        mesh.create_unit_cube(MPI.COMM_WORLD, 1, 1, 1, mesh.CellType.hexahedron),
        mesh.create_unit_cube(MPI.COMM_WORLD, 2, 2, 2, mesh.CellType.hexahedron),
        2,
    ),
    # Sub-cells inside the fine cells are fine too: a finer rule than needed is exact.
    "twice the refinement": lambda: (_square(2), _square(4), 4),
    # Two coarse cells: on 3 ranks one rank owns none.
    "fine mesh is the coarse mesh": lambda: (_square(1), _square(1), 3),
}


@pytest.mark.mpi
@pytest.mark.parametrize("pair", EXACT_PAIRS)
def test_composite_rule_check_accepts_exact_pairs(pair, monkeypatch):
    """The check passes where the composite rule is exact, once per fine mesh."""
    coarse, fine, m = EXACT_PAIRS[pair]()
    Vc = fem.functionspace(coarse, ("Lagrange", 1))
    u_f = _rough_fine_field(fem.functionspace(fine, ("Lagrange", 1)))
    checks = []
    check = restriction._composite_rule_mismatch
    monkeypatch.setattr(
        restriction,
        "_composite_rule_mismatch",
        lambda *args: checks.append(check(*args)) or checks[-1],
    )
    projection = L2Projection(Vc, subdivisions=m)
    projected = projection(u_f)
    assert _galerkin_residual(projected, u_f) < 1e-12
    projection(u_f, out=projected)
    projection(_rough_fine_field(fem.functionspace(fine, ("Lagrange", 2))))
    assert len(checks) == 1 and checks[0] < 1e-13, checks


# (coarse mesh, fine mesh, subdivisions) on which the composite rule is not exact.
INEXACT_PAIRS = {
    "crossed diagonals": lambda: (
        _square(3, diagonal=mesh.DiagonalType.crossed),
        _square(6, diagonal=mesh.DiagonalType.crossed),
        2,
    ),
    "left_right diagonals": lambda: (
        _square(3, diagonal=mesh.DiagonalType.left_right),
        _square(6, diagonal=mesh.DiagonalType.left_right),
        2,
    ),
    "left inside right": lambda: (_square(3, diagonal=mesh.DiagonalType.left), _square(6), 2),
    "dolfinx.mesh.refine": lambda: (_square(3), _refined(3), 2),
    "wrong count": lambda: (_square(3), _square(12), 2),
    "not nested": lambda: (_square(4), _square(7), 2),
    "quadrilaterals not nested": lambda: (
        _square(3, mesh.CellType.quadrilateral),
        _square(7, mesh.CellType.quadrilateral),
        2,
    ),
    "intervals, wrong count": lambda: (
        mesh.create_interval(MPI.COMM_WORLD, 4, [0.0, 1.0]),
        mesh.create_interval(MPI.COMM_WORLD, 12, [0.0, 1.0]),
        2,
    ),
}


def _inexact_message(m, tdim):
    """The error for a fine mesh the composite rule is not exact on (a pattern)."""
    text = (
        f"L2Projection(subdivisions={m}) is not exact on this fine mesh: its cells are not "
        f"the {m}^{tdim} = {m**tdim} sub-cells of each coarse cell that the composite rule "
        "assumes (a field linear on each fine cell is integrated with relative error "
        "MISMATCH > 1e-10). The rule is exact when the fine mesh refines the coarse one "
        f"uniformly by {m}: create_interval, create_rectangle, create_box or "
        f"create_unit_square/cube with {m}·n cells per direction inside n, with "
        "quadrilaterals, hexahedra, or triangles with diagonal 'right' or 'left' (as the "
        "coarse mesh); not diagonal 'crossed', 'left_right' or 'right_left', and not "
        "dolfinx.mesh.refine, which splits triangles differently. Pass the refinement "
        "factor as subdivisions, or use subdivisions=1 with a higher quadrature_degree for "
        "an approximate projection."
    )
    return re.escape(text).replace("MISMATCH", r"(\d\.\d\de[-+]\d\d)")


@pytest.mark.mpi
@pytest.mark.parametrize("pair", INEXACT_PAIRS)
def test_composite_rule_check_refuses_inexact_pairs(pair):
    """Every rank raises the same error, at every call, rather than project inexactly."""
    coarse, fine, m = INEXACT_PAIRS[pair]()
    Vc = fem.functionspace(coarse, ("Lagrange", 1))
    u_f = _rough_fine_field(fem.functionspace(fine, ("Lagrange", 1)))
    projection = L2Projection(Vc, subdivisions=m)
    pattern = _inexact_message(m, coarse.topology.dim)
    for _ in range(2):
        with pytest.raises(ValueError) as error:
            projection(u_f)
        match = re.fullmatch(pattern, str(error.value))
        assert match is not None, str(error.value)
        assert float(match.group(1)) > 1e-5  # far above round-off (~1e-15)
        texts = coarse.comm.allgather(str(error.value))
        assert texts == [texts[0]] * coarse.comm.size


def test_l2_projection_rejects_bad_options():
    coarse, _ = _nested("interval", 4, 2)
    Vc = fem.functionspace(coarse, ("Lagrange", 1))
    other = fem.functionspace(coarse, ("Lagrange", 2))
    with pytest.raises(ValueError, match="subdivisions"):
        L2Projection(Vc, subdivisions=0)
    with pytest.raises(ValueError, match="bcs"):
        L2Projection(Vc, bcs=[_wall_bc(other)])


@pytest.mark.mpi
def test_flux_commutator_with_cell_average_is_exact():
    """(τ, v_x) = (½u² − νu_x, v_x)_fine − (½ū² − νū_x, v_x)_coarse for coarse v in V_c0."""
    nu = 1e-3
    coarse, fine = _nested("interval", 16, 8)
    Vc = fem.functionspace(coarse, ("Lagrange", 1))
    Vf = fem.functionspace(fine, ("Lagrange", 1))
    u_f = _rough_fine_field(Vf)
    bcs = [_wall_bc(Vc)]
    u_bar = fem.Function(Vc)
    Wc = fem.functionspace(coarse, ("Discontinuous Lagrange", 0))
    q = ufl.TestFunction(Wc)
    coarse_flux = Tendency((0.5 * u_bar**2 - nu * u_bar.dx(0)) * q * ufl.dx)
    sampler = ClosureSampler(
        L2Projection(Vc, subdivisions=8, bcs=bcs),
        u_bar,
        [u_bar, u_bar.dx(0)],
        coarse_flux,
        quadrature_degree=2,
        tendency_restriction=CellAverage(Wc, fine),
    )
    fine_flux = 0.5 * u_f**2 - nu * u_f.dx(0)
    sample = sampler.sample(u_f, fine_flux)
    assert sample.inputs.shape[1] == 2
    assert sampler.metadata()["tendency_restriction"] == "cell_average"

    cells = np.arange(fine.topology.index_map(1).size_local, dtype=np.int32)
    transfer = fem.create_interpolation_data(Vf, Vc, cells)
    v = fem.Function(Vc)
    v.x.array[:] = np.sin(5.0 * Vc.tabulate_dof_coordinates()[:, 0] ** 2)
    bcs[0].set(v.x.array)
    v_f = fem.Function(Vf)
    v_f.interpolate_nonmatching(v, cells, transfer)
    v_f.x.scatter_forward()
    comm = coarse.comm

    def integral(form):
        return comm.allreduce(fem.assemble_scalar(fem.form(form)))

    closure_term = integral(sampler.target * v.dx(0) * measure(coarse, 2))
    commutator = integral(fine_flux * v_f.dx(0) * ufl.dx) - integral(
        (0.5 * u_bar**2 - nu * u_bar.dx(0)) * v.dx(0) * ufl.dx
    )
    scale = integral(abs(fine_flux * v_f.dx(0)) * ufl.dx)
    assert abs(commutator) > 1e-3 * scale  # a real subgrid flux
    assert closure_term == pytest.approx(commutator, abs=1e-12 * scale)
    # The target is constant on each coarse cell (both Gauss points agree).
    targets = sample.targets.reshape(-1, 2)
    assert np.allclose(targets[:, 0], targets[:, 1], rtol=0, atol=1e-14 * scale)


def test_sampler_refuses_expression_tendency_without_cell_average():
    coarse, fine = _nested("interval", 4, 2)
    Vc = fem.functionspace(coarse, ("Lagrange", 1))
    Vf = fem.functionspace(fine, ("Lagrange", 1))
    u_bar, u_f = fem.Function(Vc), fem.Function(Vf)
    sampler = ClosureSampler(L2Projection(Vc), u_bar, [u_bar], u_bar**2, quadrature_degree=2)
    with pytest.raises(TypeError, match="CellAverage"):
        sampler.sample(u_f, u_f**2)
    with pytest.raises(TypeError, match="tendency_restriction"):
        ClosureSampler(L2Projection(Vc), u_bar, [u_bar], u_bar**2, tendency_restriction=object())


class _Sum(torch.nn.Module):
    """Grid model: the sum of the input channels (one output channel)."""

    def forward(self, x):
        return x.sum(dim=1, keepdim=True)


@pytest.mark.mpi
def test_gridded_sampler_matches_closure_inputs_and_is_exact():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 7, 5)
    V = fem.functionspace(msh, ("Lagrange", 2))
    u = fem.Function(V)
    u.interpolate(lambda x: x[0] ** 2 + 3 * x[0] * x[1])
    grid = Grid((-0.1, 0.0), (1.1, 1.0), (13, 9))
    closure = mno.NonlocalClosure(
        _Sum().double(),
        [u, ufl.grad(u)],
        grid_shape=grid.shape,
        bounding_box=(grid.lower, grid.upper),
        extension_value=-2.0,
    )
    closure.update()
    sampler = GriddedSampler([u, ufl.grad(u)], grid, extension_value=-2.0, mask_channel=True)
    values = sampler()
    expected = closure.gridded_inputs()
    if msh.comm.rank == 0:
        assert values.shape == (4, 13, 9)
        np.testing.assert_array_equal(values, expected)
        x, y = np.meshgrid(
            *[
                np.linspace(lo, hi, n)
                for lo, hi, n in zip(grid.lower, grid.upper, grid.shape, strict=True)
            ],
            indexing="ij",
        )
        inside = (x >= -1e-12) & (x <= 1 + 1e-12)
        np.testing.assert_allclose(values[0][inside], (x**2 + 3 * x * y)[inside], atol=1e-13)
        np.testing.assert_allclose(values[1][inside], (2 * x + 3 * y)[inside], atol=1e-12)
        np.testing.assert_allclose(values[2][inside], (3 * x)[inside], atol=1e-12)
        assert np.all(values[:3][:, ~inside] == -2.0)
        np.testing.assert_array_equal(values[3], inside.astype(float))
    else:
        assert values is None and expected is None


def test_gridded_sampler_rejects_bad_input():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 2, 2)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    with pytest.raises(ValueError, match="dimensional"):
        GriddedSampler([u], Grid((0.0,), (1.0,), (4,)))
    with pytest.raises(ValueError, match="root"):
        GriddedSampler([u], Grid((0.0, 0.0), (1.0, 1.0), (4, 4)), root=msh.comm.size)
    with pytest.raises(TypeError, match="Grid"):
        GriddedSampler([u], ((0, 0), (1, 1), (4, 4)))
    with pytest.raises(ValueError, match="at least one"):
        GriddedSampler([], Grid((0.0, 0.0), (1.0, 1.0), (4, 4)))
