"""NonlocalClosure(distributed=True): the same quadrature values as the gathered mode.

Run serially and with ``mpirun -n 2``, ``-n 3`` (on 3 ranks the 2-cell square leaves a
rank without cells, which still holds a slab of the grid and runs its part of the model).
"""

from __future__ import annotations

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from neuralop_reference import widened_spectral_buffer

import dolfinx_mno  # noqa: F401  (before dolfinx)
from dolfinx_mno.closure import ClosureEvaluationError
from dolfinx_mno.grid import grid_over_mesh
from dolfinx_mno.grid_gather import GriddedSampler
from dolfinx_mno.grid_slabs import SlabSampler
from dolfinx_mno.nonlocal_closure import NonlocalClosure
from dolfinx_mno.torch_bridge import to_precision

neuralop = pytest.importorskip("neuralop")


def _fno(in_channels: int, out_channels: int, **options) -> torch.nn.Module:
    torch.manual_seed(11)
    model = neuralop.models.FNO(
        n_modes=(6, 4),
        in_channels=in_channels,
        out_channels=out_channels,
        hidden_channels=4,
        n_layers=2,
        **options,
    )
    return to_precision(model, torch.float64).eval()


def _closures(msh, grid_shape, value_shape=(), **options):
    """The same closure of ``[u, grad u]`` in the gathered and the distributed mode."""
    x = ufl.SpatialCoordinate(msh)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(
        fem.Expression(
            ufl.sin(3 * x[0]) + x[0] * x[1] ** 2, u.function_space.element.interpolation_points
        )
    )
    operands = [u, ufl.grad(u)]
    model = _fno(4, int(np.prod(value_shape)), **options)
    built = [
        NonlocalClosure(
            model,
            operands,
            value_shape,
            quadrature_degree=2,
            grid_shape=grid_shape,
            extension_value=0.5,
            distributed=distributed,
            name=f"q{int(distributed)}",
        )
        for distributed in (False, True)
    ]
    return built


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("cells", "grid_shape", "value_shape"),
    [((1, 1), (9, 8), ()), ((5, 3), (10, 7), (2,))],
)
def test_distributed_mode_equals_gathered_mode(cells, grid_shape, value_shape):
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, *cells)
    gathered, distributed = _closures(msh, grid_shape, value_shape)
    with widened_spectral_buffer():  # the gathered mode's FNO in float64 throughout
        gathered.update()
    distributed.update()
    assert distributed.slab_stage is not None and gathered.slab_stage is None
    difference = np.abs(distributed.x.array - gathered.x.array).max(initial=0.0)
    assert comm.allreduce(difference, op=MPI.MAX) <= 1e-12
    scale = comm.allreduce(np.abs(gathered.x.array).max(initial=0.0), op=MPI.MAX)
    assert scale > 0.05
    assert set(distributed.timings) >= {"sample", "gather", "model", "scatter", "interpolate"}
    # Only the halo rows travel back: at most the block of each rank's points.
    if comm.size == 1:
        assert distributed.communication == {"slab": 0, "halo": 0}


@pytest.mark.mpi
def test_rank_without_cells(tiny_square):
    """On 3 ranks one rank owns no cells: it holds a slab, runs the model, sends its halo."""
    comm = tiny_square.comm
    gathered, distributed = _closures(tiny_square, (8, 6))
    with widened_spectral_buffer():
        gathered.update()
    distributed.update()
    assert distributed.slab_stage.distributed.local_shape[0] >= 1
    difference = np.abs(distributed.x.array - gathered.x.array).max(initial=0.0)
    assert comm.allreduce(difference, op=MPI.MAX) <= 1e-12


@pytest.mark.mpi
def test_distributed_mode_errors_on_every_rank():
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, 2, 2)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    with pytest.raises(
        ValueError,
        match=r"DistributedFNO cannot distribute this model: "
        r"domain_padding=0\.25",
    ):
        NonlocalClosure(_fno(2, 1, domain_padding=0.25), [u], grid_shape=(8, 8), distributed=True)
    closure = NonlocalClosure(_fno(2, 1), [u], grid_shape=(8, 8), distributed=True)
    with torch.no_grad():
        closure.model.projection.fcs[-1].bias.fill_(float("nan"))
    with pytest.raises(
        ClosureEvaluationError,
        match=r"Update 1 of non-local closure 'nonlocal_closure' failed on rank\(s\) \[0",
    ):
        closure.update()
    with pytest.raises(RuntimeError, match="has no root scatter"):
        _ = closure.grid_scatter
    # No rank allocates the gathered grid: the sampler only samples.
    assert closure.gridded_sampler.gather_bytes == 0
    with pytest.raises(RuntimeError, match=r"built with gather=False \(sampling only\)"):
        closure.gridded_sampler.gather()


@pytest.mark.mpi
def test_slab_sampler_gives_each_rank_its_rows_of_the_gathered_grid(tiny_square):
    """Training inputs without the gather: each rank's slab equals its rows of the grid."""
    comm = tiny_square.comm
    x = ufl.SpatialCoordinate(tiny_square)
    operands = [ufl.sin(3 * x[0]) + x[1], ufl.as_vector((x[0] * x[1], x[1] ** 2))]
    grid = grid_over_mesh(tiny_square, (7, 5), ((-0.2, 0.0), (1.0, 1.1)))  # some outside
    options = {"extension_value": -2.0, "mask_channel": True, "mesh": tiny_square}
    gathered = comm.bcast(GriddedSampler(operands, grid, **options)(), root=0)
    slabs = SlabSampler(operands, grid, **options)
    local = slabs()
    assert local.shape == (4, *slabs.local_shape)
    assert np.array_equal(local, gathered[:, slabs.rows.block(comm.rank)])
    assert (gathered[-1] == 0).any() and (gathered[0] == -2.0).any()  # points outside


@pytest.mark.mpi
@pytest.mark.parametrize("cells", [(1, 1), (5, 3)])
def test_slab_transfers_adjoint(cells):
    """⟨A s, w⟩ = ⟨s, Aᵀ w⟩ for the slab gather and the halo scatter (summed over ranks)."""
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, *cells)
    _, closure = _closures(msh, (9, 7))
    stage = closure.slab_stage
    rng = np.random.default_rng(3 + comm.rank)
    num_local = closure.gridded_sampler.num_local
    samples = rng.standard_normal((num_local, closure.num_inputs))
    slab_weights = rng.standard_normal((closure.num_inputs + 1, np.prod(stage.local_shape)))
    inputs = stage.slab_inputs(samples)
    baseline = stage.slab_inputs(np.zeros_like(samples))  # the extension value and the mask
    forward = comm.allreduce(float(((inputs - baseline) * slab_weights).sum()))
    transposed = comm.allreduce(float((samples * stage.slab_inputs_adjoint(slab_weights)).sum()))
    assert comm.allreduce(num_local) > 0
    assert transposed == pytest.approx(forward, rel=1e-13)

    slab = rng.standard_normal((1, *stage.local_shape))
    weights = rng.standard_normal((stage.num_points, 1))
    forward = comm.allreduce(float((stage.values(slab) * weights).sum()))
    transposed = comm.allreduce(float((slab * stage.values_adjoint(weights)).sum()))
    assert abs(forward) > 1e-3
    assert transposed == pytest.approx(forward, rel=1e-13)


@pytest.mark.mpi
def test_models_that_cannot_run_are_refused_at_construction():
    """As the gathered mode's probe refuses them: a ``model.double()`` FNO (its complex
    weights stay complex64, the first update then failed in a collective, a hang on a rank
    without modes) and channel counts that do not fit the operands or the value shape."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    mixed = neuralop.models.FNO(
        n_modes=(4, 2), in_channels=2, out_channels=1, hidden_channels=4, n_layers=1
    ).double()
    with pytest.raises(ValueError, match=r"parameters of mixed precision \['complex64', 'float6"):
        NonlocalClosure(mixed, [u], grid_shape=(8, 8), distributed=True)
    for in_channels, out_channels in ((3, 1), (2, 2)):
        model = _fno(in_channels, out_channels)
        with pytest.raises(ValueError, match=rf"^The FNO maps {in_channels} channels to "):
            NonlocalClosure(model, [u], grid_shape=(8, 8), distributed=True)
    NonlocalClosure(_fno(2, 1), [u], grid_shape=(8, 8), distributed=True).update()


@pytest.mark.mpi
def test_a_model_that_is_no_fno_is_refused_as_such():
    """A Sequential got the channel message ("maps 2 channels to None"), a bare Conv2d the
    type message: all get the type message, on every rank, a model without parameters too
    (not StopIteration)."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    convolution = torch.nn.Conv2d(2, 1, 3, padding=1).double()
    models = [torch.nn.Sequential(convolution), convolution, torch.nn.Identity()]
    for model, name in zip(models, ["Sequential", "Conv2d", "Identity"], strict=True):
        with pytest.raises(ValueError) as info:
            NonlocalClosure(model, [u], grid_shape=(5, 5), distributed=True)
        assert str(info.value) == (
            f"DistributedFNO cannot distribute this model: the model is a {name}, not a "
            "neuralop.models.FNO or TFNO."
        )
    NonlocalClosure(_fno(2, 1), [u], grid_shape=(8, 8), distributed=True).update()
