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

    # Coarse functions are fine functions (nested): interpolate them exactly.
    cells = np.arange(fine.topology.index_map(fine.topology.dim).size_local, dtype=np.int32)
    transfer = fem.create_interpolation_data(Vf, Vc, cells)

    def on_fine(w):
        out = fem.Function(Vf)
        out.interpolate_nonmatching(w, cells, transfer)
        out.x.scatter_forward()
        return out

    rng = np.random.default_rng(0)
    norm = np.sqrt(fine.comm.allreduce(fem.assemble_scalar(fem.form(u_f**2 * ufl.dx))))
    worst = {"exact": 0.0, "aliased": 0.0}
    for _ in range(3):
        phi = fem.Function(Vc)
        x = Vc.tabulate_dof_coordinates()
        phi.x.array[:] = np.cos(rng.uniform(1, 9) * x[:, 0] + rng.uniform(1, 9) * x[:, 1])
        if constrained:
            bcs[0].set(phi.x.array)
        phi_f = on_fine(phi)
        phi_norm = np.sqrt(fine.comm.allreduce(fem.assemble_scalar(fem.form(phi_f**2 * ufl.dx))))
        for label, projected in (("exact", exact), ("aliased", aliased)):
            residual = fem.form((on_fine(projected) - u_f) * phi_f * ufl.dx)
            value = abs(fine.comm.allreduce(fem.assemble_scalar(residual)))
            worst[label] = max(worst[label], value / (norm * phi_norm))
    assert worst["exact"] < 1e-12, worst
    assert worst["aliased"] > 1e-4, worst  # the default rule sees only a few fine cells
    if constrained:
        values = exact.x.array[bcs[0].dof_indices()[0]]
        assert np.all(values == 0.0)


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
