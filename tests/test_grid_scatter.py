"""Scatter → interpolate (dolfinx_mno.grid_scatter): exact blocks, exact interpolation, MPI.

Multilinear fields are interpolated exactly; each rank receives exactly its sub-block of
the root's grid; gather then scatter back to the grid points is the identity. On 1, 2 and
3 ranks, including ``tiny_square`` (a rank without cells, hence without points, on 3).
"""

from mpi4py import MPI

import numpy as np
import pytest
import ufl
from dolfinx import fem, mesh

from dolfinx_mno.grid import Grid
from dolfinx_mno.grid_gather import GriddedSampler
from dolfinx_mno.grid_scatter import GridInterpolator, GridScatter

COMM = MPI.COMM_WORLD


def bilinear(points):
    """Two multilinear fields of (x, y), shape ``(2, len(points))``."""
    x, y = points[:, 0], points[:, 1]
    return np.stack([1 + 2 * x - 3 * y + 0.5 * x * y, -x + 4 * x * y])


def grid_values(grid, field):
    """``field`` at the points of ``grid``, shape ``(channels, *grid.shape)``."""
    values = field(grid.points())
    return values.reshape(len(values), *grid.shape)


def test_multilinear_fields_are_interpolated_exactly():
    rng = np.random.default_rng(0)
    grid = Grid((-1.0, 0.0), (2.0, 1.0), (7, 5))
    points = rng.uniform([-1.0, 0.0], [2.0, 1.0], size=(50, 2))
    points = np.vstack([points, [[2.0, 1.0], [-1.0, 0.0]]])  # the corners too
    interpolator = GridInterpolator(grid, points, num_channels=2)
    block = grid_values(grid, bilinear)[(slice(None), *interpolator.block_slices())]
    values = interpolator.interpolate(np.ascontiguousarray(block))
    np.testing.assert_allclose(values, bilinear(points).T, rtol=0, atol=1e-14)

    def trilinear(p):
        return (1 + p[:, 0] - p[:, 1] + 2 * p[:, 2] + p[:, 0] * p[:, 1] * p[:, 2])[None]

    grid3 = Grid((0.0, 0.0, 0.0), (1.0, 2.0, 1.0), (4, 3, 5))
    points3 = rng.uniform([0.0, 0.0, 0.0], [1.0, 2.0, 1.0], size=(30, 3))
    interpolator3 = GridInterpolator(grid3, points3)
    block3 = grid_values(grid3, trilinear)[(slice(None), *interpolator3.block_slices())]
    values3 = interpolator3.interpolate(np.ascontiguousarray(block3))
    np.testing.assert_allclose(values3[:, 0], trilinear(points3)[0], rtol=0, atol=1e-14)


def test_the_block_is_the_box_of_the_cells_the_points_touch():
    grid = Grid((0.0, 0.0), (1.0, 1.0), (11, 11))  # spacing 0.1
    interpolator = GridInterpolator(grid, np.array([[0.25, 0.55], [0.42, 0.31]]))
    np.testing.assert_array_equal(interpolator.block_lower, [2, 3])
    assert interpolator.block_shape == (4, 4)  # cells 2..4 and 3..5: 3 cells, 4 points
    assert interpolator.block_slices() == (slice(2, 6), slice(3, 7))
    assert interpolator.block_size == 16
    none = GridInterpolator(grid, np.empty((0, 2)), num_channels=3)
    assert none.block_shape == (0, 0)
    assert none.interpolate(np.empty((3, 0, 0))).shape == (0, 3)


def test_interpolate_checks_its_buffers():
    grid = Grid((0.0, 0.0), (1.0, 1.0), (3, 3))
    interpolator = GridInterpolator(grid, np.array([[0.2, 0.7]]))
    with pytest.raises(TypeError) as info:
        interpolator.interpolate(np.zeros((1, 2, 3)))
    assert str(info.value) == (
        "block must have shape (1, 2, 2) and dtype float64, got (1, 2, 3) and float64."
    )
    with pytest.raises(TypeError) as info:
        interpolator.interpolate(np.zeros((1, 2, 2)), out=np.empty((1, 1), dtype=np.float32))
    assert str(info.value) == (
        "out must have shape (1, 1) and dtype float64, got (1, 1) and float32."
    )


@pytest.fixture(params=["tiny_square", "unit_square_6x5"])
def square(request):
    if request.param == "tiny_square":
        return request.getfixturevalue("tiny_square")
    return mesh.create_unit_square(COMM, 6, 5)


def _owned_midpoints(msh):
    """Midpoints of the owned cells, shape ``(num_owned_cells, 2)``."""
    num_cells = msh.topology.index_map(2).size_local
    nodes = msh.geometry.x[msh.geometry.dofmaps[0][:num_cells]]
    return nodes.mean(axis=1)[:, :2].reshape(-1, 2)


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_rank_receives_its_block_and_interpolates_exactly(square, dtype):
    grid = Grid((0.0, 0.0), (1.0, 1.0), (9, 7))
    points = _owned_midpoints(square)
    scatter = GridScatter(grid, points, 2, dtype, COMM)
    field = grid_values(grid, bilinear)
    if COMM.rank == 0:
        scatter.pack(field)
    scatter.scatter()
    # Bitwise the root's field on this rank's block, in the scatter's dtype.
    expected_block = field[(slice(None), *scatter.block_slices())].astype(dtype)
    np.testing.assert_array_equal(scatter.block, expected_block)
    values = scatter.interpolate()
    assert values.shape == (len(points), 2) and values.dtype == np.float64
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(values, bilinear(points).T, rtol=0, atol=40 * eps)
    # The bytes the root sends: every other rank's block.
    sizes = COMM.allgather(2 * int(np.prod([s.stop - s.start for s in scatter.block_slices()])))
    assert scatter.scatter_bytes == (sum(sizes) - sizes[0]) * np.dtype(dtype).itemsize
    if square.topology.index_map(2).size_local == 0:
        assert scatter.num_points == 0 and values.shape == (0, 2)


@pytest.mark.mpi
def test_gather_then_scatter_back_to_the_grid_points_is_the_identity(square):
    """Samples of a nonlinear field, gathered on the root and scattered back to their points."""
    u = fem.Function(fem.functionspace(square, ("Lagrange", 2)))
    u.interpolate(lambda x: np.sin(3 * x[0]) * np.exp(x[1]) + x[0] ** 2)
    grid = Grid((0.0, 0.0), (1.0, 1.0), (17, 13))
    sampler = GriddedSampler([u, ufl.grad(u)], grid)
    samples = sampler.sample().copy()
    gathered = sampler.gather()
    scatter = GridScatter(grid, grid.points()[sampler.indices], 3, np.float64, COMM)
    if COMM.rank == 0:
        scatter.pack(gathered)
    scatter.scatter()
    back = scatter.interpolate()
    # At a grid point the weights are 1 and 0, up to the rounding of (x - lower) / spacing.
    scale = COMM.allreduce(np.max(np.abs(samples), initial=0.0), op=MPI.MAX)
    assert scale > 1
    np.testing.assert_allclose(back, samples, rtol=0, atol=8 * np.finfo(float).eps * scale)
    assert COMM.allreduce(len(back)) == grid.num_points


@pytest.mark.mpi
def test_bad_arguments_are_refused(tiny_square):
    grid = Grid((0.0, 0.0), (1.0, 1.0), (3, 3))
    points = np.empty((0, 2))
    with pytest.raises(ValueError) as info:
        GridScatter(grid, points, 1, np.float64, COMM, root=COMM.size)
    assert str(info.value) == f"root must be a rank of the communicator, got {COMM.size}."
    with pytest.raises(TypeError) as info:
        GridScatter(grid, points, 1, np.int64, COMM)
    assert str(info.value) == "Unsupported dtype int64: use real float32 or float64."
    root = COMM.size - 1
    scatter = GridScatter(grid, points, 2, np.float64, COMM, root=root)
    if COMM.rank == root:
        with pytest.raises(ValueError) as info:
            scatter.pack(np.zeros((1, 3, 3)))
        assert str(info.value) == (
            "The grid field must have shape (2, 3, 3) or (2, 9), got (1, 3, 3)."
        )
        scatter.pack(np.zeros((2, 9)))  # flat grid points are accepted
    else:
        with pytest.raises(RuntimeError) as info:
            scatter.pack(np.zeros((2, 3, 3)))
        assert str(info.value) == f"Only the root (rank {root}) packs the grid field."
    scatter.scatter()


@pytest.mark.mpi
def test_scatter_adjoint_is_the_transpose_of_scatter_and_interpolate(square):
    """⟨W S(Y), c⟩ summed over ranks equals ⟨Y, scatter_adjoint(c)⟩ on the root."""
    grid = Grid((0.0, 0.0), (1.0, 1.0), (9, 7))
    points = _owned_midpoints(square)
    scatter = GridScatter(grid, points, 2, np.float64, COMM)
    field = np.random.default_rng(3).standard_normal((2, grid.num_points))
    if COMM.rank == 0:
        scatter.pack(field)
    scatter.scatter()
    values = scatter.interpolate()
    cotangent = np.random.default_rng(5 + COMM.rank).standard_normal(values.shape)
    pulled = scatter.scatter_adjoint(cotangent)
    forward = COMM.allreduce(float((values * cotangent).sum()), op=MPI.SUM)
    assert (pulled is None) == (COMM.rank != 0)
    backward = COMM.bcast(None if pulled is None else float((field * pulled).sum()), root=0)
    assert abs(forward) > 1e-3
    assert backward == pytest.approx(forward, rel=1e-13)
    with pytest.raises(TypeError, match=r"^cotangent must have shape"):
        scatter.scatter_adjoint(cotangent.astype(np.float32))
