"""Slabs that follow the mesh partition (dolfinx_mno.slab_alignment).

Run serially and with ``mpirun -n 2``, ``-n 3``: the slab partitioner puts every cell in
its slab (on 3 ranks the 2-cell square leaves a rank without cells), no grid sample
travels when the mesh's vertices miss the grid's rows, the closure values do not change,
and bad input raises the same error on every rank.
"""

from __future__ import annotations

import re

from mpi4py import MPI

import basix.ufl
import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh

import dolfinx_mno  # noqa: F401  (before dolfinx)
from dolfinx_mno.distributed_fft import SlabPartition
from dolfinx_mno.grid import Grid, grid_over_mesh
from dolfinx_mno.grid_gather import GriddedSampler, GridPointSampler
from dolfinx_mno.grid_slabs import SlabGather, SlabSampler
from dolfinx_mno.nonlocal_closure import NonlocalClosure
from dolfinx_mno.slab_alignment import (
    redistribute_to_slabs,
    rows_following_samples,
    slab_of_coordinates,
    slab_partitioner,
)
from dolfinx_mno.torch_bridge import to_precision

neuralop = pytest.importorskip("neuralop")


def _vertex_means(msh: mesh.Mesh) -> np.ndarray:
    """Mean of the vertices' first coordinate of each owned cell, ``(num_cells,)``."""
    num_cells = msh.topology.index_map(msh.topology.dim).size_local
    nodes = msh.geometry.dofmaps[0][:num_cells]
    return msh.geometry.x[nodes, 0].mean(axis=1)


def _remote_samples(msh: mesh.Mesh, grid: Grid, rows: SlabPartition) -> int:
    """Grid samples sent to other ranks by a SlabGather, summed over ranks (collective)."""
    sampler = GridPointSampler(grid, fem.functionspace(msh, ("DG", 1)))
    gather = SlabGather(grid, rows, sampler.indices, sampler.inside, 1, np.float64, msh.comm)
    return msh.comm.allreduce(gather.remote_count)


@pytest.mark.mpi
@pytest.mark.parametrize(("cells", "grid_shape"), [((12, 12), (8, 8)), ((1, 1), (8, 5))])
def test_partitioner_puts_each_cell_in_its_slab(cells, grid_shape):
    comm = MPI.COMM_WORLD
    original = mesh.create_unit_square(comm, *cells)
    grid = grid_over_mesh(original, grid_shape)
    msh = redistribute_to_slabs(original, grid)
    rows = SlabPartition.balanced(grid.shape[0], comm.size)
    means = _vertex_means(msh)
    # Rank r's band: from half a spacing below its first row to half below the next's.
    h = 1.0 / (grid_shape[0] - 1)
    block = rows.block(comm.rank)
    lower = -np.inf if comm.rank == 0 else (block.start - 0.5) * h
    upper = np.inf if comm.rank == comm.size - 1 else (block.stop - 0.5) * h
    assert np.all((means >= lower) & (means < upper))
    assert np.array_equal(slab_of_coordinates(grid, rows, means), np.full(len(means), comm.rank))
    # The same mesh: every cell once, the same area.
    tdim = msh.topology.dim
    assert msh.topology.index_map(tdim).size_global == 2 * cells[0] * cells[1]
    area = fem.assemble_scalar(fem.form(fem.Constant(msh, 1.0) * ufl.dx))
    assert comm.allreduce(area) == pytest.approx(1.0, rel=1e-14)
    if cells == (1, 1) and comm.size == 3:  # the triangles' means: 1/3 → row 2, 2/3 → row 5
        assert comm.allgather(len(means)) == [1, 1, 0]


@pytest.mark.mpi
def test_partitioner_in_create_mesh():
    """The partitioner given to create_mesh, the quadrilaterals and their nodes on rank 0."""
    comm = MPI.COMM_WORLD
    nx, ny = 9, 4
    x = np.empty((0, 2))
    cells = np.empty((0, 4), dtype=np.int64)
    if comm.rank == 0:
        ix, iy = np.meshgrid(np.arange(nx + 1), np.arange(ny + 1), indexing="xy")
        x = np.column_stack([ix.ravel() / nx, iy.ravel() / ny])
        i, j = np.meshgrid(np.arange(nx), np.arange(ny), indexing="xy")
        first = (j * (nx + 1) + i).ravel()
        cells = np.column_stack([first, first + 1, first + nx + 1, first + nx + 2])
    grid = Grid((0.0, 0.0), (1.0, 1.0), (7, 5))
    element = basix.ufl.element("Lagrange", "quadrilateral", 1, shape=(2,))
    msh = mesh.create_mesh(comm, cells, element, x, partitioner=slab_partitioner(comm, grid, x))
    rows = SlabPartition.balanced(7, comm.size)
    means = _vertex_means(msh)
    assert comm.allreduce(len(means)) == nx * ny
    assert np.array_equal(slab_of_coordinates(grid, rows, means), np.full(len(means), comm.rank))
    # Column i of cells (centre (i + 1/2) / 9) goes to the slab of row rint(6 (i + 1/2) / 9):
    # rows (4, 3) on 2 ranks, (3, 2, 2) on 3.
    columns = sorted(set(np.rint(means * nx - 0.5).astype(int).tolist()))
    expected = {1: [list(range(9))], 2: [[0, 1, 2, 3, 4], [5, 6, 7, 8]]}
    expected[3] = [[0, 1, 2, 3], [4, 5, 6], [7, 8]]
    assert columns == expected[comm.size][comm.rank]


@pytest.mark.mpi
def test_no_sample_travels_when_the_mesh_follows_the_slabs():
    """12² squares, an 8² grid: no mesh vertex on an inner grid row, so nothing is shared."""
    comm = MPI.COMM_WORLD
    original = mesh.create_unit_square(comm, 12, 12)
    grid = grid_over_mesh(original, (8, 8))
    aligned = redistribute_to_slabs(original, grid)
    balanced = SlabPartition.balanced(8, comm.size)
    assert _remote_samples(aligned, grid, balanced) == 0
    sampler = GridPointSampler(grid, fem.functionspace(aligned, ("DG", 1)))
    assert rows_following_samples(grid.shape, sampler.indices, comm) == balanced
    # The default partitioner splits the square otherwise: samples do travel.
    if comm.size > 1:
        assert _remote_samples(original, grid, balanced) > 8


@pytest.mark.mpi
def test_rows_following_samples_fit_ordered_ranks():
    """Uneven ordered samples give uneven rows; interleaved or missing ones the balanced rows."""
    comm = MPI.COMM_WORLD
    size, rank = comm.size, comm.rank
    shape = (12, 3)
    starts = {1: [0, 12], 2: [0, 7, 12], 3: [0, 2, 7, 12]}[size]
    block = np.arange(starts[rank] * 3, starts[rank + 1] * 3)
    expected = SlabPartition(tuple(np.diff(starts).tolist()))
    assert rows_following_samples(shape, block, comm) == expected
    # A rank that also samples one point of the next rank's first row: that row stays.
    extra = [starts[rank + 1] * 3] if rank < size - 1 else []
    assert rows_following_samples(shape, np.concatenate([block, extra]), comm) == expected
    balanced = SlabPartition.balanced(12, size)
    if size > 1:
        reversed_block = np.arange(starts[size - 1 - rank] * 3, starts[size - rank] * 3)
        assert rows_following_samples(shape, reversed_block, comm) == balanced
        empty = block if rank else np.arange(0)
        assert rows_following_samples(shape, empty, comm) == balanced
        assert rows_following_samples(shape, block, comm, max_imbalance=1.0) == balanced
    with pytest.raises(ValueError, match=r"max_imbalance must be at least 1, got 0\.5\."):
        rows_following_samples(shape, block, comm, max_imbalance=0.5)
    with pytest.raises(ValueError, match=rf"has 0 rows along axis 0, fewer than the {size}"):
        rows_following_samples((0, 3), block, comm)


@pytest.mark.mpi
@pytest.mark.parametrize(("grid_points", "shared_rows"), [(12, False), (17, True)])
def test_only_cut_rows_travel(grid_points, shared_rows):
    """16² squares split into slabs: only rows next to a cut travel.

    With 12 rows (11 and 16 coprime) no mesh vertex lies on an inner row: no sample
    travels. With 17 rows
    every row lies on vertices, so a cut's row is shared by cells of both ranks (a
    tie-break, the smallest original cell index, picks the rank that samples each of its
    points): at most that row's samples travel. Either way the quadrature points next to
    a cut need the row on its other side: the halo is one row each way per cut.
    """
    comm = MPI.COMM_WORLD
    original = mesh.create_unit_square(comm, 16, 16)
    grid_shape = (grid_points, grid_points)
    aligned = redistribute_to_slabs(original, grid_over_mesh(original, grid_shape))
    closure = _closure(aligned, "balanced", grid_shape)
    counts = closure.slab_stage.remote_counts
    cuts = comm.size - 1
    assert counts["halo"] == 2 * grid_points * cuts
    if shared_rows:
        assert counts["slab"] <= grid_points * cuts
    else:
        assert counts["slab"] == 0


def _closure(msh: mesh.Mesh, slabs: str, grid_shape: tuple[int, int] = (9, 8)) -> NonlocalClosure:
    """A distributed closure of a P1 ``u`` (continuous: its samples do not depend on cells)."""
    x = ufl.SpatialCoordinate(msh)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(
        fem.Expression(
            ufl.sin(3 * x[0]) + x[0] * x[1], u.function_space.element.interpolation_points
        )
    )
    torch.manual_seed(5)
    model = neuralop.models.FNO(
        n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=4, n_layers=2
    )
    closure = NonlocalClosure(
        to_precision(model, torch.float64).eval(),
        [u],
        quadrature_degree=1,
        grid_shape=grid_shape,
        distributed=True,
        slabs=slabs,
    )
    closure.update()
    return closure


def _values_by_cell(closure: NonlocalClosure) -> np.ndarray:
    """Every cell's ``(midpoint x, midpoint y, value)``, sorted, on every rank (collective)."""
    msh = closure.function_space.mesh
    num_cells = msh.topology.index_map(2).size_local
    midpoints = msh.geometry.x[msh.geometry.dofmaps[0][:num_cells], :2].mean(axis=1)
    rows = np.column_stack([midpoints, closure.x.array[:num_cells]])
    table = np.concatenate(msh.comm.allgather(rows))
    return table[np.lexsort((table[:, 1], table[:, 0]))]


@pytest.mark.mpi
@pytest.mark.parametrize("cells", [(6, 5), (1, 1)])
def test_closure_values_do_not_depend_on_the_slabs(cells):
    comm = MPI.COMM_WORLD
    original = mesh.create_unit_square(comm, *cells)
    aligned = redistribute_to_slabs(original, grid_over_mesh(original, (9, 8)))
    reference = _closure(original, "balanced")
    values = _values_by_cell(reference)
    assert np.abs(values[:, 2]).max() > 1e-3
    for msh in (original, aligned):
        for slabs in ("balanced", "mesh"):
            closure = _closure(msh, slabs)
            assert np.abs(_values_by_cell(closure) - values).max() <= 1e-12


@pytest.mark.mpi
def test_bad_input_raises_on_every_rank():
    comm = MPI.COMM_WORLD
    grid = Grid((0.0, 0.0), (1.0, 1.0), (4, 4))
    x = np.zeros((3, 2))
    size = comm.size
    wrong = SlabPartition((4, *([0] * (size - 1)))) if size > 1 else SlabPartition((3,))
    message = (
        f"rows={wrong.counts} must give each of the {size} ranks at least one of the 4 rows "
        "of axis 0 of the grid (4, 4)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        slab_partitioner(comm, grid, x, wrong)
    with pytest.raises(ValueError, match=re.escape(message)):
        redistribute_to_slabs(mesh.create_unit_square(comm, 2, 2), grid, wrong)
    # A wrong x on rank 0 only: the same error on every rank.
    bad = np.zeros((3, 3)) if comm.rank == 0 else x
    reason = "x must be the (3, 2) node coordinates passed to create_mesh, got shape (3, 3)."
    prefix = "" if comm.size == 1 else "Building a slab partitioner failed on rank(s) [0] "
    with pytest.raises(ValueError, match=re.escape(prefix) + ".*" + re.escape(reason[:-1])):
        slab_partitioner(comm, grid, bad)
    msh = mesh.create_unit_square(comm, 2, 2)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    with pytest.raises(ValueError, match=r"slabs must be 'mesh' or 'balanced', got 'rows'\."):
        NonlocalClosure(torch.nn.Identity(), [u], grid_shape=(4, 4), distributed=True, slabs="rows")


@pytest.mark.mpi
def test_slab_sampler_with_rows_following_the_mesh():
    """Training inputs in slabs that follow a slab-partitioned mesh: each rank's rows."""
    comm = MPI.COMM_WORLD
    original = mesh.create_unit_square(comm, 12, 12)
    grid = grid_over_mesh(original, (8, 6))
    uneven = SlabPartition({1: (8,), 2: (5, 3), 3: (2, 3, 3)}[comm.size])
    aligned = redistribute_to_slabs(original, grid, uneven)
    x = ufl.SpatialCoordinate(aligned)
    operands = [ufl.sin(3 * x[0]) + x[1]]
    gathered = comm.bcast(GriddedSampler(operands, grid, mesh=aligned)(), root=0)
    slabs = SlabSampler(operands, grid, mesh=aligned, rows="mesh")
    assert slabs.rows == uneven  # the partitioner's rows, found from the samples
    assert np.array_equal(slabs(), gathered[:, slabs.rows.block(comm.rank)])
    balanced = SlabSampler(operands, grid, mesh=aligned, rows="balanced")
    assert balanced.rows == SlabPartition.balanced(8, comm.size)
    with pytest.raises(
        ValueError, match=r"rows must be a SlabPartition, 'balanced' or 'mesh', got 'slabs'\."
    ):
        SlabSampler(operands, grid, mesh=aligned, rows="slabs")
