"""Grid geometry (dolfinx_mno.grid): points, spacing, the mesh's box, a closure's grid."""

from mpi4py import MPI

import numpy as np
import pytest
from dolfinx import mesh

from dolfinx_mno.grid import Grid, grid_over_mesh, mesh_bounding_box


def test_points_are_row_major_and_include_the_endpoints():
    grid = Grid((0.0, -1.0), (2.0, 1.0), (3, 5))
    assert grid.dim == 2 and grid.num_points == 15
    np.testing.assert_array_equal(grid.spacing, [1.0, 0.5])
    points = grid.points()
    assert points.shape == (15, 3)
    # Flat index ix * 5 + iy holds (ix * 1.0, -1 + iy * 0.5, 0).
    np.testing.assert_array_equal(points[0], [0.0, -1.0, 0.0])
    np.testing.assert_array_equal(points[1], [0.0, -0.5, 0.0])
    np.testing.assert_array_equal(points[5], [1.0, -1.0, 0.0])
    np.testing.assert_array_equal(points[-1], [2.0, 1.0, 0.0])
    ix, iy = np.unravel_index(np.arange(15), grid.shape)
    np.testing.assert_allclose(points[:, 0], ix * 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(points[:, 1], -1.0 + iy * 0.5, rtol=0, atol=1e-15)


def test_covers_up_to_a_relative_tolerance():
    grid = Grid((0.0, 0.0), (1.0, 2.0), (3, 3))
    assert grid.covers([0.0, 0.0], [1.0, 2.0])
    assert grid.covers([-1e-13, 0.0], [1.0, 2.0 + 1e-12])  # 2e-12 is the tolerance
    assert not grid.covers([-1e-11, 0.0], [1.0, 2.0])
    assert not grid.covers([0.0, 0.0], [1.0, 2.01])


def test_bad_grids_are_refused():
    with pytest.raises(ValueError) as info:
        Grid((0.0,), (1.0, 1.0), (2, 2))
    assert str(info.value) == "Grid lower, upper and shape must have the same length."
    with pytest.raises(ValueError) as info:
        Grid((0.0, 0.0), (1.0, 1.0), (1, 3))
    assert str(info.value) == "A grid needs at least 2 points per direction, got (1, 3)."
    with pytest.raises(ValueError) as info:
        Grid((0.0, 1.0), (1.0, 1.0), (2, 2))
    assert str(info.value) == "Grid upper (1.0, 1.0) must exceed lower (0.0, 1.0)."
    # An infinite or NaN corner passed the comparison above and gave NaN points.
    for lower in ((-np.inf, 0.0), (np.nan, 0.0)):
        with pytest.raises(ValueError) as info:
            Grid(lower, (1.0, 1.0), (2, 2))
        assert str(info.value) == (
            f"Grid corners must be finite numbers, got lower {lower}, upper (1.0, 1.0)."
        )
    with pytest.raises(ValueError) as info:
        Grid((0.0, 0.0), (1.0, np.inf), (2, 2))
    assert str(info.value) == (
        "Grid corners must be finite numbers, got lower (0.0, 0.0), upper (1.0, inf)."
    )


@pytest.mark.mpi
def test_mesh_bounding_box_on_every_rank_including_one_without_cells(tiny_square):
    lower, upper = mesh_bounding_box(tiny_square)
    np.testing.assert_array_equal(lower, [0.0, 0.0])
    np.testing.assert_array_equal(upper, [1.0, 1.0])
    rectangle = mesh.create_rectangle(MPI.COMM_WORLD, [[-1.0, 0.5], [2.0, 1.0]], [6, 3])
    lower, upper = mesh_bounding_box(rectangle)
    np.testing.assert_array_equal(lower, [-1.0, 0.5])
    np.testing.assert_array_equal(upper, [2.0, 1.0])


@pytest.mark.mpi
def test_default_grid_has_one_point_per_mean_cell_size(tiny_square):
    rectangle = mesh.create_rectangle(MPI.COMM_WORLD, [[0, 0], [2, 1]], [20, 10])
    # h = sqrt(2 / 400) = 0.0707: 2/h + 1 = 29.3 and 1/h + 1 = 15.1 points, rounded up.
    assert grid_over_mesh(rectangle) == Grid((0.0, 0.0), (2.0, 1.0), (30, 16))
    # Two cells of area 1/2: h = 0.707, 1/h + 1 = 2.4 → 3 points, on every rank.
    assert grid_over_mesh(tiny_square) == Grid((0.0, 0.0), (1.0, 1.0), (3, 3))
    grid = grid_over_mesh(tiny_square, (5, 4), ([-0.5, 0.0], [1.5, 1.0]))
    assert grid == Grid((-0.5, 0.0), (1.5, 1.0), (5, 4))
    assert all(type(x) is float for x in (*grid.lower, *grid.upper))


@pytest.mark.mpi
def test_a_grid_that_does_not_cover_the_mesh_is_refused_on_every_rank(tiny_square):
    with pytest.raises(ValueError) as info:
        grid_over_mesh(tiny_square, None, ([0.1, 0.0], [1.0, 1.0]))
    assert str(info.value) == (
        "The grid box [(0.1, 0.0), (1.0, 1.0)] does not cover the mesh's bounding box "
        "[(0.0, 0.0), (1.0, 1.0)]."
    )
