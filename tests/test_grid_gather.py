"""Sample → gather (dolfinx_mno.grid_gather): exact samples, one owner per grid point, MPI.

The grid points are those of grids larger than the mesh (points outside get the extension
value) and of grids whose points lie on facets (where the owning cell matters); the meshes
include ``tiny_square``, which leaves a rank without cells on 3 ranks.
"""

from mpi4py import MPI

import basix.ufl
import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, geometry, mesh

from dolfinx_mno.cell_order import midpoint_keys
from dolfinx_mno.grid import Grid
from dolfinx_mno.grid_gather import GriddedSampler, GridPointSampler

COMM = MPI.COMM_WORLD


def smooth(x):
    return np.sin(np.pi * x[0]) * np.cos(1.5 * x[1]) + 0.5 * x[0] * x[1]


def _inside_unit_square(points, tol=1e-12):
    return np.all((points[:, :2] >= -tol) & (points[:, :2] <= 1 + tol), axis=1)


@pytest.fixture(params=["tiny_square", "unit_square_5x3"])
def square(request):
    if request.param == "tiny_square":
        return request.getfixturevalue("tiny_square")
    return mesh.create_unit_square(COMM, 5, 3)


@pytest.mark.mpi
def test_each_grid_point_inside_is_owned_by_exactly_one_rank(square):
    grid = Grid((-0.25, -0.5), (1.25, 1.0), (13, 7))
    space = fem.functionspace(square, ("Discontinuous Lagrange", 1, (2,)))
    sampler = GridPointSampler(grid, space)
    inside = _inside_unit_square(grid.points())
    np.testing.assert_array_equal(sampler.inside, inside)
    owned = np.concatenate(COMM.allgather(sampler.indices))
    assert len(owned) == len(np.unique(owned))  # no point on two ranks
    np.testing.assert_array_equal(np.sort(owned), np.flatnonzero(inside))
    if square.topology.index_map(2).size_local == 0:
        assert sampler.num_local == 0


@pytest.mark.mpi
def test_samples_of_a_linear_field_are_exact(square):
    grid = Grid((0.0, 0.0), (1.0, 1.0), (9, 5))
    space = fem.functionspace(square, ("Discontinuous Lagrange", 1, (2,)))
    f = fem.Function(space)
    f.interpolate(lambda x: np.stack([1 + x[0] + 2 * x[1], 3 * x[0] - x[1]]))
    sampler = GridPointSampler(grid, space)
    x = grid.points()[sampler.indices]
    expected = np.stack([1 + x[:, 0] + 2 * x[:, 1], 3 * x[:, 0] - x[:, 1]], axis=1)
    out = np.empty((sampler.num_local, 2))
    assert sampler.sample(f, out=out) is out
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-15)
    assert COMM.allreduce(sampler.num_local) == grid.num_points


def test_sampling_an_expression_equals_sampling_its_interpolant():
    """GridPointSampler.sample_expression gives bitwise the values of sample(interpolant)."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 12, 10)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 2)))
    u.interpolate(smooth)
    expression = ufl.as_vector([u, u.dx(0), u.dx(1) * u])
    dg = fem.functionspace(msh, ("Discontinuous Lagrange", 2, (3,)))
    compiled = fem.Expression(expression, dg.element.interpolation_points)
    interpolant = fem.Function(dg)
    interpolant.interpolate(compiled)
    sampler = GridPointSampler(Grid((0.0, 0.0), (1.0, 1.0), (23, 19)), dg)
    out = np.empty((sampler.num_local, 3))
    assert sampler.sample_expression(compiled, out=out) is out
    np.testing.assert_array_equal(out, sampler.sample(interpolant))
    with pytest.raises(TypeError, match="out must have shape"):
        sampler.sample(interpolant, out=np.empty((sampler.num_local, 2)))


@pytest.mark.mpi
def test_gridded_sampler_on_a_rank_without_cells(tiny_square):
    """Where (on 3 ranks) a rank owns no cells: exact grid samples of a linear u."""
    V = fem.functionspace(tiny_square, ("Lagrange", 1))
    u = fem.Function(V)
    u.interpolate(lambda x: 1 + x[0] + 2 * x[1])
    grid = Grid((0.0, 0.0), (1.0, 1.0), (5, 4))
    values = GriddedSampler([u, ufl.grad(u)], grid, mask_channel=True)()
    if tiny_square.comm.rank == 0:
        X, Y = np.meshgrid(np.linspace(0, 1, 5), np.linspace(0, 1, 4), indexing="ij")
        ones = np.ones_like(X)
        expected = np.stack([1 + X + 2 * Y, ones, 2 * ones, ones])
        assert values.shape == (4, 5, 4)
        np.testing.assert_allclose(values, expected, rtol=0, atol=1e-14)
    else:
        assert values is None


def _curved_square(comm, n=4, amplitude=0.1, ghost_mode=mesh.GhostMode.none):
    """The unit square in 2 n² triangles with a degree-2 geometry, curved inside.

    The nodes of a straight P2 mesh are moved by ``amplitude sin(πx) sin(πy) (1, 1)``,
    which keeps the boundary in place (det of the map's Jacobian >= 1 - 0.1π > 0).
    """
    element = basix.ufl.element("Lagrange", "triangle", 2, shape=(2,))
    partitioner = mesh.create_cell_partitioner(ghost_mode, 2)
    if comm.rank != 0:
        return mesh.create_mesh(
            comm, np.empty((0, 6), np.int64), element, np.empty((0, 2)), partitioner
        )
    m = 2 * n + 1  # nodes per lattice row
    i, j = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    lattice = np.stack([i.reshape(-1), j.reshape(-1)], axis=1) / (2 * n)
    bump = amplitude * np.sin(np.pi * lattice[:, 0]) * np.sin(np.pi * lattice[:, 1])

    def node(p, q):  # the lattice node midway between lattice nodes p and q
        return (p[0] + q[0]) // 2 * m + (p[1] + q[1]) // 2

    cells = []
    for a in range(0, 2 * n, 2):
        for b in range(0, 2 * n, 2):
            for v0, v1, v2 in [
                ((a, b), (a + 2, b), (a + 2, b + 2)),
                ((a, b), (a + 2, b + 2), (a, b + 2)),
            ]:
                # DOLFINx's P2 triangle: the vertices, then the midpoints of the edges
                # opposite vertex 0, 1 and 2.
                vertices = [node(v, v) for v in (v0, v1, v2)]
                cells.append([*vertices, node(v1, v2), node(v0, v2), node(v0, v1)])
    return mesh.create_mesh(
        comm, np.array(cells, np.int64), element, lattice + bump[:, None], partitioner
    )


@pytest.mark.mpi
def test_x_is_sampled_exactly_on_a_curved_mesh():
    """x is of degree 2 in each cell of a P2-geometry mesh: the default sampling degree
    includes the geometry's (it was the coefficients' only, 1 here, off by 1e-2)."""
    msh = _curved_square(COMM)
    assert msh.geometry.cmaps[0].degree == 2
    area = COMM.allreduce(fem.assemble_scalar(fem.form(1.0 * ufl.dx(domain=msh))))
    assert area == pytest.approx(1.0, rel=0, abs=1e-13)  # the map keeps the square
    grid = Grid((0.0, 0.0), (1.0, 1.0), (13, 11))
    x = ufl.SpatialCoordinate(msh)
    errors = []
    for degree in (None, 2, 1):
        sampler = GriddedSampler([x], grid, mask_channel=True, sampling_degree=degree, mesh=msh)
        values = sampler()
        if COMM.rank == 0:
            assert values.shape == (3, 13, 11)
            np.testing.assert_array_equal(values[2], 1.0)  # every point is inside
            points = grid.points()[:, :2].T.reshape(2, *grid.shape)
            errors.append(float(np.abs(values[:2] - points).max()))
    default, quadratic, linear = COMM.bcast(errors, root=0)
    # Observed 5.6e-14 (DOLFINx's Newton pull-back to the curved cells), 1.4e-2 in DG1.
    assert default == quadratic <= 1e-13
    assert linear > 1e-2


def _cell_labels(msh):
    """A DG0 function holding a label of each cell made from its midpoint (the same cell
    gets the same label on any partition; different cells get different labels)."""
    tdim = msh.topology.dim
    f = fem.Function(fem.functionspace(msh, ("Discontinuous Lagrange", 0)))
    index_map = msh.topology.index_map(tdim)
    cells = np.arange(index_map.size_local + index_map.num_ghosts, dtype=np.int32)
    midpoints = mesh.compute_midpoints(msh, tdim, cells)
    f.x.array[f.function_space.dofmap.list[cells, 0]] = _label(midpoints)
    return f


def _label(midpoints):
    return midpoints[:, 0] + np.pi * midpoints[:, 1]


@pytest.mark.mpi
@pytest.mark.parametrize("refined", [0, 2, 3], ids=["unit square", "refined 2", "refined 3"])
def test_the_owning_cell_does_not_depend_on_the_partition(refined):
    """On facets and vertices, the cell with the lexicographically smallest midpoint, on any
    partition. Before, the smallest original cell index: on a mesh made by
    ``dolfinx.mesh.refine`` that numbering follows the partition, and grid points on facets
    took other cells' values on 2 and 3 ranks (an audit: a test integral 23 % off)."""

    def square(comm):
        if not refined:
            return mesh.create_unit_square(comm, 4, 4)
        coarse = mesh.create_unit_square(comm, refined, refined)
        coarse.topology.create_entities(1)
        return mesh.refine(coarse)[0]

    n = 2 * refined or 4
    grid = Grid((0.0, 0.0), (1.0, 1.0), (2 * n + 1,) * 2)  # on vertices and facets
    serial, parallel = (
        GriddedSampler([_cell_labels(square(comm))], grid)() for comm in (MPI.COMM_SELF, COMM)
    )
    if COMM.rank == 0:
        # The same cells; the values to rounding (a cell's node order depends on the
        # partition), far below the difference of two labels.
        np.testing.assert_allclose(parallel, serial, rtol=0, atol=1e-13)
        msh = square(MPI.COMM_SELF)
        points = grid.points()
        tree = geometry.bb_tree(msh, 2)
        cells = geometry.compute_colliding_cells(
            msh, geometry.compute_collisions_points(tree, points), points
        )
        owned = np.arange(msh.topology.index_map(2).size_local, dtype=np.int32)
        midpoints = mesh.compute_midpoints(msh, 2, owned)
        keys = midpoint_keys(msh, owned)  # the midpoints rounded below round-off

        def chosen(i, pick):
            candidates = cells.links(i)
            order = np.lexsort(keys[candidates].T[::-1])  # x first, then y
            return _label(midpoints[candidates[order[pick]]][None, :])[0]

        smallest = [chosen(i, 0) for i in range(grid.num_points)]
        largest = [chosen(i, -1) for i in range(grid.num_points)]
        np.testing.assert_allclose(parallel.reshape(-1), smallest, rtol=0, atol=1e-13)
        # The other choice would differ: the choice is tested where it matters.
        assert np.count_nonzero(np.array(smallest) != np.array(largest)) > 2 * n**2


@pytest.mark.mpi
def test_gather_assembles_the_grid_with_extension_and_mask_on_the_root(square):
    u = fem.Function(fem.functionspace(square, ("Lagrange", 1)))
    u.interpolate(lambda x: 1 + x[0] + 2 * x[1])
    grid = Grid((-0.5, 0.0), (1.5, 1.0), (9, 4))
    sampler = GriddedSampler([u, ufl.grad(u)], grid, extension_value=-3.0, mask_channel=True)
    assert (sampler.num_channels, sampler.channels) == (3, 4)
    # The local samples: exact, in the sampler's own buffer.
    x = grid.points()[sampler.indices]
    samples = sampler.sample()
    assert samples is sampler.sample()
    expected = np.stack([1 + x[:, 0] + 2 * x[:, 1], np.ones(len(x)), np.full(len(x), 2.0)])
    np.testing.assert_allclose(samples, expected.T, rtol=0, atol=1e-14)
    # Bytes sent to the root: its own share is not sent.
    inside = COMM.allreduce(sampler.num_local)
    root_share = COMM.bcast(sampler.num_local, root=0)
    assert sampler.gather_bytes == (inside - root_share) * 3 * 8
    # The gathered grid, new, and into a target of another dtype, prepared once.
    values = sampler()
    target = np.empty((4, grid.num_points), dtype=np.float32)
    sampler.prepare(target)
    gathered = sampler.gather(out=target)
    with pytest.raises(ValueError) as info:
        sampler.prepare(np.empty((3, grid.num_points)))
    assert str(info.value) == "A gather target must have shape (4, 36), got (3, 36)."
    if COMM.rank != 0:
        assert values is None and gathered is None
        return
    X, Y = np.meshgrid(np.linspace(-0.5, 1.5, 9), np.linspace(0, 1, 4), indexing="ij")
    mask = (X >= 0) & (X <= 1)
    ones = np.ones_like(X)
    expected = np.stack([1 + X + 2 * Y, ones, 2 * ones, ones])
    expected[:3, ~mask] = -3.0
    expected[3, ~mask] = 0.0
    assert values.shape == (4, 9, 4)
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-14)
    assert gathered is target
    np.testing.assert_allclose(target, expected.reshape(4, -1), rtol=1e-7, atol=0)


@pytest.mark.mpi
def test_sample_matrix_and_gather_adjoint(square):
    """The samples are G dofs + s₀ (bitwise up to round-off); gather_adjoint is gatherᵀ."""
    V = fem.functionspace(square, ("Lagrange", 2))
    u = fem.Function(V)
    u.interpolate(smooth)
    x = ufl.SpatialCoordinate(square)
    grid = Grid((-0.25, -0.5), (1.25, 1.0), (13, 7))
    sampler = GriddedSampler([u, ufl.grad(u), 2 * u + x[1]], grid, mask_channel=True)
    samples = sampler.sample().copy()
    operator = sampler.sample_matrix()
    assert operator.coefficients == (u,)
    assert operator.offset.shape == (sampler.num_local, 4)
    affine = operator.matrix @ torch.from_numpy(u.x.array) + torch.from_numpy(
        operator.offset
    ).reshape(-1)
    assert np.abs(samples).max(initial=0.0) <= 10  # the tolerance's scale
    np.testing.assert_allclose(affine.numpy().reshape(samples.shape), samples, atol=1e-13)
    # ⟨gather(s), X̄⟩ on the root equals Σ_ranks ⟨s, gather_adjoint(X̄)⟩.
    gathered = sampler.gather(samples=samples)
    cotangent = np.random.default_rng(2).standard_normal((sampler.channels, grid.num_points))
    share = sampler.gather_adjoint(cotangent if COMM.rank == 0 else None)
    assert share.shape == (sampler.num_local, 4)
    backward = COMM.allreduce(float((samples * share).sum()), op=MPI.SUM)
    if COMM.rank == 0:
        gathered = np.asarray(gathered)
        mask = gathered[4]  # the extension value outside is a constant: no cotangent
        forward = float((gathered[:4] * mask * cotangent[:4]).sum())
        assert abs(forward) > 1e-3
        assert backward == pytest.approx(forward, rel=1e-13)


def _l_shape(comm):
    """The L-shaped submesh of the unit square's 4 x 4 mesh (no original cell indices)."""
    square = mesh.create_unit_square(comm, 4, 4)
    cells = mesh.locate_entities(square, 2, lambda x: (x[0] <= 0.5 + 1e-12) | (x[1] <= 0.5 + 1e-12))
    return mesh.create_submesh(square, 2, cells)[0]


@pytest.mark.mpi
def test_a_submesh_is_sampled_with_its_owning_cells_chosen_by_geometry():
    """A submesh has no original cell indices (DOLFINx raised "Mixed topology
    unsupported"): on shared facets the cell with the smallest midpoint wins, on any
    partition. A DG0 field of the cells' midpoints shows which cell was taken."""
    grid = Grid((0.0, 0.0), (1.0, 1.0), (9, 9))  # points on the vertices and facets
    samples = []
    for comm in (MPI.COMM_SELF, COMM):
        msh = _l_shape(comm)
        cell_field = fem.Function(fem.functionspace(msh, ("Discontinuous Lagrange", 0)))
        cell_field.interpolate(lambda x: 10 * x[0] + x[1])  # at the midpoints
        sampler = GriddedSampler([cell_field], grid, mask_channel=True)
        samples.append(sampler())
    if COMM.rank == 0:
        serial, parallel = samples
        np.testing.assert_array_equal(parallel[-1], serial[-1])  # the mask
        points = grid.points()
        in_l = (points[:, 0] <= 0.5 + 1e-12) | (points[:, 1] <= 0.5 + 1e-12)
        np.testing.assert_array_equal(serial[-1].reshape(-1) == 1.0, in_l)
        np.testing.assert_allclose(parallel[0], serial[0], rtol=0, atol=1e-13)
        msh = _l_shape(MPI.COMM_SELF)
        tree = geometry.bb_tree(msh, 2)
        cells = geometry.compute_colliding_cells(
            msh, geometry.compute_collisions_points(tree, points), points
        )
        owned = np.arange(msh.topology.index_map(2).size_local, dtype=np.int32)
        midpoints = mesh.compute_midpoints(msh, 2, owned)
        keys = midpoint_keys(msh, owned)  # the midpoints rounded below round-off
        expected = np.zeros(grid.num_points)
        for i in np.flatnonzero(in_l):
            chosen = midpoints[min(cells.links(i), key=lambda c: tuple(keys[c]))]
            expected[i] = 10 * chosen[0] + chosen[1]
        np.testing.assert_allclose(serial[0].reshape(-1)[in_l], expected[in_l], atol=1e-13)


@pytest.mark.mpi
@pytest.mark.parametrize("amplitude", [0.1, 0.2])
def test_each_grid_point_is_evaluated_in_a_cell_that_contains_it_on_a_curved_mesh(amplitude):
    """On a P2-geometry mesh DOLFINx's collision test takes the convex hull of a cell's
    nodes, not the curved cell: 5 and 15 of the 1,517 grid points took the value of a
    neighbour that does not contain them (here a DG0 field of labels: off by up to 0.9).
    Each point now goes to a cell whose pull-back puts it inside the reference cell."""
    msh = _curved_square(COMM, amplitude=amplitude)
    labels = _cell_labels(msh)
    grid = Grid((0.0, 0.0), (1.0, 1.0), (41, 37))
    values = COMM.bcast(GriddedSampler([labels], grid, mask_channel=True)(), root=0)
    np.testing.assert_array_equal(values[1], 1.0)  # the map keeps the square: all inside
    # Which labels each point may take: those of the cells that contain it, found here by
    # pulling the point back into every owned cell.
    cmap = msh.geometry.cmaps[0]
    points = grid.points()[:, :2]
    num_owned = msh.topology.index_map(2).size_local
    midpoints = mesh.compute_midpoints(msh, 2, np.arange(num_owned, dtype=np.int32))
    ok = np.zeros(grid.num_points, dtype=np.int32)
    for cell in range(num_owned):
        nodes = msh.geometry.x[msh.geometry.dofmaps[0][cell], :2]
        low, high = nodes.min(axis=0) - 0.05, nodes.max(axis=0) + 0.05
        near = np.flatnonzero(np.all((points >= low) & (points <= high), axis=1))
        label = _label(midpoints[cell : cell + 1])[0]
        for i in near[np.isclose(values[0].reshape(-1)[near], label)]:
            X = cmap.pull_back(points[i : i + 1], nodes)[0]  # the label's cell: converges
            ok[i] |= X.min() >= -1e-10 and X.sum() <= 1 + 1e-10
    COMM.Allreduce(MPI.IN_PLACE, ok, op=MPI.MAX)
    assert np.count_nonzero(ok == 0) == 0
