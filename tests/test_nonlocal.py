"""Non-local (grid) closures: transfer accuracy, grid independence, MPI, errors, coupling."""

import os
import time
import tracemalloc
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from dolfinx.fem.petsc import assemble_vector
from dolfinx.io import gmsh as gmshio

import dolfinx_mno as mno
from dolfinx_mno.nonlocal_closure import NonlocalClosure
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.torch_bridge import to_precision

if os.environ.get("CI"):
    import neuralop  # in CI a missing dependency is a failure, not a skip
else:
    neuralop = pytest.importorskip("neuralop")
MESHES = Path(__file__).resolve().parents[1] / "meshes"


class Channels(torch.nn.Module):
    """Returns the given input channels: the exact 'identity' of the grid transfer."""

    def __init__(self, channels):
        super().__init__()
        self.channels = list(channels)

    def forward(self, x):
        return x[:, self.channels]


def smooth(x):
    return np.sin(np.pi * x[0]) * np.cos(1.5 * x[1]) + 0.5 * x[0] * x[1]


def smooth_ufl(x):
    return ufl.sin(ufl.pi * x[0]) * ufl.cos(1.5 * x[1]) + 0.5 * x[0] * x[1]


def integral(expr, dx, comm):
    return comm.allreduce(fem.assemble_scalar(fem.form(expr * dx)), op=MPI.SUM)


def fno(seed=0, in_channels=2, out_channels=1, dtype=torch.float64):
    torch.manual_seed(seed)
    model = neuralop.models.FNO(
        n_modes=(12, 12),
        in_channels=in_channels,
        out_channels=out_channels,
        hidden_channels=16,
        n_layers=2,
    )
    return to_precision(model, dtype)


@pytest.mark.mpi
def test_grid_transfer_converges_at_second_order():
    """Identity on the grid: the closure equals u (P2, smooth) up to O(H²) interpolation."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 24, 24)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 2)))
    u.interpolate(smooth)
    errors = []
    for n in (17, 33, 65):
        closure = NonlocalClosure(Channels([0]), [u], quadrature_degree=4, grid_shape=(n, n))
        closure.update()
        errors.append(np.sqrt(integral((closure - u) ** 2, closure.dx, msh.comm)))
    rates = np.log2(np.array(errors[:-1]) / errors[1:])
    assert errors[-1] < 2e-4, errors
    assert rates.min() > 1.8, (errors, rates)


@pytest.mark.mpi
def test_grid_independence_of_an_fno():
    """One FNO on 64², 128², 256² grids: closures converge as the grid is refined."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 32, 32)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 2)))
    u.interpolate(smooth)
    model = fno()
    values = {}
    for n in (64, 128, 256):
        closure = NonlocalClosure(
            model, [u], quadrature_degree=2, grid_shape=(n, n), mask_channel=True
        )
        closure.update()
        values[n] = closure.x.array.copy()
    comm = msh.comm

    def l2(a):
        return np.sqrt(comm.allreduce(float(np.sum(a**2)), op=MPI.SUM))

    scale = l2(values[256])
    d64, d128 = l2(values[64] - values[256]) / scale, l2(values[128] - values[256]) / scale
    # Measured: d64 ≈ 4.1e-4, d128 ≈ 1.4e-4 (serial and parallel alike).
    assert scale > 0
    assert d128 < 0.5 * d64, (d64, d128)
    assert d128 < 5e-4


@pytest.mark.mpi
def test_structured_and_unstructured_meshes_agree():
    """The same FNO on a structured and an unstructured gmsh mesh of the unit square."""
    comm = MPI.COMM_WORLD
    structured = mesh.create_unit_square(comm, 24, 24)
    unstructured = gmshio.read_from_msh(
        str(MESHES / "unit_square_unstructured.msh"), comm, 0, gdim=2
    ).mesh
    model = fno(seed=3)
    results = []
    for msh in (structured, unstructured):
        x = ufl.SpatialCoordinate(msh)
        u = fem.Function(fem.functionspace(msh, ("Lagrange", 2)))
        u.interpolate(smooth)
        closure = NonlocalClosure(model, [u], quadrature_degree=4, grid_shape=(96, 96))
        closure.update()
        results.append(
            [
                np.sqrt(integral(closure**2, closure.dx, comm)),
                integral(closure * ufl.sin(3 * x[0]) * x[1], closure.dx, comm),
                integral(closure * smooth_ufl(x), closure.dx, comm),
            ]
        )
    structured_values, unstructured_values = np.array(results)
    # Both meshes resolve u to ~1e-4, but those differences live at the mesh scale, which
    # the FNO's 12 retained modes filter out: measured relative differences 8e-9 to 5e-8.
    np.testing.assert_allclose(unstructured_values, structured_values, rtol=1e-6)


@pytest.mark.mpi
def test_results_do_not_depend_on_ranks():
    """A float64 FNO closure on COMM_WORLD equals the same closure on COMM_SELF (≤ 1e-12)."""
    model = fno(seed=1, in_channels=4, out_channels=2)
    values = []
    for comm in (MPI.COMM_SELF, MPI.COMM_WORLD):
        msh = mesh.create_unit_square(comm, 20, 20)
        u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
        u.interpolate(smooth)
        x = ufl.SpatialCoordinate(msh)
        # grad u is discontinuous: grid points on facets test the rank-independent cell choice.
        closure = NonlocalClosure(model, [u, ufl.grad(u)], (2,), 2, grid_shape=(41, 41))
        closure.update()
        values.append(
            [
                np.sqrt(integral(ufl.inner(closure, closure), closure.dx, comm)),
                integral(closure[0] * x[1] - closure[1] * x[0] ** 2, closure.dx, comm),
            ]
        )
        if comm is MPI.COMM_WORLD and comm.size > 1:
            assert closure.communication["gather"] > 0
    np.testing.assert_allclose(values[1], values[0], rtol=1e-12, atol=0)


@pytest.mark.mpi
def test_mask_channel_and_extension_on_a_plate_with_holes():
    comm = MPI.COMM_WORLD
    msh = gmshio.read_from_msh(str(MESHES / "plate_with_holes.msh"), comm, 0, gdim=2).mesh
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: 1.0 + x[0])
    closure = NonlocalClosure(
        Channels([1]), [u], quadrature_degree=2, grid_shape=(101, 101), extension_value=-7.0
    )
    closure.update()
    inputs = closure.gridded_inputs()
    if comm.rank == 0:
        mask = inputs[1]
        hole_area = np.pi * (0.12**2 + 0.15**2)
        # The mask is the domain's indicator: its mean approximates the domain's area.
        assert mask.mean() == pytest.approx(1 - hole_area, abs=0.02)
        assert np.all(inputs[0][mask == 0] == -7.0)
        assert np.all(inputs[0][mask == 1] >= 1.0 - 1e-12)
    # The model returned the mask: 1 at quadrature points except near hole boundaries.
    mean = integral(closure, closure.dx, comm) / integral(1.0, closure.dx, comm)
    assert 0.9 < mean <= 1.0
    # Gather volume: (inside points not on the root) × 1 channel × 8 bytes.
    inside = comm.allreduce(closure._gridded.num_local, op=MPI.SUM)
    root_points = comm.bcast(closure._gridded.num_local, root=0)
    assert closure.communication["gather"] == (inside - root_points) * 8


def test_3d_and_tfno():
    """A 3D grid with a TFNO (the tensorised FNO)."""
    msh = mesh.create_unit_cube(MPI.COMM_WORLD, 4, 4, 4)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: x[0] + x[1] * x[2])
    torch.manual_seed(0)
    model = neuralop.models.TFNO(
        n_modes=(4, 4, 4),
        in_channels=2,
        out_channels=1,
        hidden_channels=4,
        n_layers=1,
        factorization="tucker",
        rank=0.5,
    )
    closure = NonlocalClosure(model, [u], quadrature_degree=1, grid_shape=(9, 9, 9))
    closure.update()
    assert closure.grid.shape == (9, 9, 9)
    assert np.all(np.isfinite(closure.x.array))
    assert np.linalg.norm(closure.x.array) > 0


def test_default_grid_from_mesh_size():
    msh = mesh.create_rectangle(MPI.COMM_WORLD, [[0, 0], [2, 1]], [20, 10])
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    closure = NonlocalClosure(Channels([0]), [u])
    # mean cell size h = sqrt(2 / 400) = 0.0707: 2/h + 1 and 1/h + 1 points, rounded up.
    assert closure.grid.shape == (30, 16)


@pytest.mark.mpi
def test_bad_input():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    with pytest.raises(ValueError, match="does not cover the mesh"):
        NonlocalClosure(Channels([0]), [u], bounding_box=([0.1, 0.0], [1.0, 1.0]))
    with pytest.raises(ValueError, match="changes the grid shape"):
        NonlocalClosure(torch.nn.AvgPool2d(2), [u], grid_shape=(16, 16))
    with pytest.raises(ValueError, match="wrong number of output channels"):
        NonlocalClosure(Channels([0, 1]), [u], grid_shape=(16, 16))
    with pytest.raises(ValueError, match=r"Channel mismatch: the model has in_channels=3"):
        NonlocalClosure(fno(in_channels=3), [u], grid_shape=(16, 16))
    with pytest.raises(ValueError, match="grid_shape must give at least 2 points"):
        NonlocalClosure(Channels([0]), [u], grid_shape=(16,))
    # An infinite or NaN corner gave NaN at every quadrature point, without an error.
    for lower, shown in (([-np.inf, 0], "(-inf, 0.0)"), ([np.nan, 0], "(nan, 0.0)")):
        with pytest.raises(ValueError) as info:
            NonlocalClosure(Channels([0]), [u], grid_shape=(5, 5), bounding_box=(lower, [1, 1]))
        assert str(info.value) == (
            f"bounding_box corners must be finite numbers, got {shown} and (1.0, 1.0): give "
            "the lower and upper corners of a box that contains the mesh, or leave "
            "bounding_box out for the mesh's bounding box."
        )


@pytest.mark.mpi
def test_model_file_on_the_root_only_raises_on_every_rank(tmp_path):
    """Only rank 0 sees the model file: every rank raises at once (no rank waits)."""
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, 4, 4)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    path = tmp_path / "model.pt"  # each rank's own folder: only rank 0's holds the file
    if comm.rank == 0:
        mno.save_model(path, mno.MLP(1, 1, [4], seed=0))
    comm.Barrier()
    if comm.size == 1:
        return  # one process sees its file; loading files is tested in test_io
    paths = comm.allgather(str(path))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        NonlocalClosure(path, [u], grid_shape=(5, 5), name="c")
    assert comm.allreduce(time.perf_counter() - start, op=MPI.MAX) < 5.0
    assert str(info.value) == (
        f"Building non-local closure 'c' failed on rank(s) {list(range(1, comm.size))} "
        f"({comm.size - 1} of {comm.size} ranks); on rank 1: FileNotFoundError: No model "
        f"file at {paths[1]!r}."
    )


@pytest.mark.mpi
def test_probe_failure_on_the_root_raises_on_every_rank():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    with pytest.raises(ValueError) as info:
        NonlocalClosure(Channels([0, 1]), [u], grid_shape=(5, 5))
    probe = (
        "The model returns the wrong number of output channels: for input (1, 2, *(5, 5)) "
        "it returned (1, 2, 5, 5), expected (1, 1, 5, 5) (value_shape ())."
    )
    if msh.comm.size == 1:
        assert str(info.value) == probe
    else:
        assert str(info.value) == (
            f"Building non-local closure 'nonlocal_closure' failed on rank(s) [0] (1 of "
            f"{msh.comm.size} ranks); on rank 0: ValueError: {probe}"
        )


@pytest.mark.mpi
def test_closure_on_a_rank_without_cells(tiny_square):
    """Where (on 3 ranks) a rank owns no cells: exact closure values.

    u = 1 + x + 2y is linear, so its grid samples (exact: tested in test_grid_gather), and
    the bilinear interpolation back to the quadrature points of the identity closure, are
    exact.
    """
    V = fem.functionspace(tiny_square, ("Lagrange", 1))
    u = fem.Function(V)
    u.interpolate(lambda x: 1 + x[0] + 2 * x[1])
    closure = NonlocalClosure(Channels([0]), [u], quadrature_degree=2, grid_shape=(5, 4))
    closure.update()
    v = ufl.TestFunction(V)
    b_closure = assemble_vector(fem.form(closure * v * closure.dx))
    b_ufl = assemble_vector(fem.form(u * v * closure.dx))
    comm = tiny_square.comm
    difference = comm.allreduce(np.max(np.abs(b_closure.array - b_ufl.array), initial=0.0))
    scale = comm.allreduce(np.max(np.abs(b_ufl.array), initial=0.0), op=MPI.MAX)
    assert scale > 0.1
    assert difference <= 1e-14
    b_closure.destroy()
    b_ufl.destroy()


class NaNAfter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        y = x[:, :1] * 2.0
        return y * torch.nan if self.armed else y


@pytest.mark.mpi
def test_nan_keeps_values_on_all_ranks():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: x[0])
    model = NaNAfter()
    closure = NonlocalClosure(model, [u], grid_shape=(17, 17))
    closure.update()
    before = closure.x.array.copy()
    model.armed = True
    with pytest.raises(mno.ClosureEvaluationError) as info:
        closure.update()
    size = msh.comm.size
    assert str(info.value) == (
        f"Update 2 of non-local closure 'nonlocal_closure' failed on rank(s) [0] (1 of {size} "
        f"{'rank' if size == 1 else 'ranks'}); on rank 0: the model returned NaN/Inf at 289 "
        "of 289 grid points. The previous closure values were kept."
    )
    np.testing.assert_array_equal(closure.x.array, before)
    assert closure.update_count == 1


class Smoothing(torch.nn.Module):
    """A linear non-local operator: c = 0.5 · (box-filtered u), periodic-free via padding."""

    def forward(self, x):
        kernel = torch.full((1, 1, 5, 5), 1 / 25, dtype=x.dtype)
        padded = torch.nn.functional.pad(x[:, :1], (2, 2, 2, 2), mode="replicate")
        return 0.5 * torch.nn.functional.conv2d(padded, kernel)


def _nonlinear(msh, opts, prefix):
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    v = ufl.TestFunction(V)
    closure = NonlocalClosure(Smoothing(), [u**2], grid_shape=(33, 33), mask_channel=False)
    F = (ufl.inner(ufl.grad(u), ufl.grad(v)) - (closure + 2.0) * v) * ufl.dx(
        metadata={"quadrature_degree": 2}
    )
    msh.topology.create_connectivity(1, 2)
    dofs = fem.locate_dofs_topological(V, 1, mesh.exterior_facet_indices(msh.topology))
    problem = NonlinearProblem(
        F, u, bcs=[fem.dirichletbc(0.0, dofs, V)], petsc_options_prefix=prefix, petsc_options=opts
    )
    problem.solve()
    assert problem.solver.getConvergedReason() > 0
    return u, problem.solver.getIterationNumber()


@pytest.mark.mpi
def test_implicit_coupling_frozen_and_matrix_free():
    """Frozen-closure (Picard) Newton and matrix-free JFNK reach the same solution."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 16, 16)
    lu = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
    base = {"snes_rtol": 1e-11, "snes_atol": 1e-12, "snes_max_it": 50}
    u_frozen, its_frozen = _nonlinear(msh, {**base, **lu}, "frozen_")
    u_mf, its_mf = _nonlinear(
        msh,
        {
            **base,
            "snes_mf_operator": True,
            "ksp_type": "gmres",
            "ksp_rtol": 1e-10,
            "pc_type": "lu",
            "pc_factor_mat_solver_type": "mumps",
        },
        "jfnk_",
    )
    comm = msh.comm
    diff = comm.allreduce(np.max(np.abs(u_frozen.x.array - u_mf.x.array)), op=MPI.MAX)
    scale = comm.allreduce(np.max(np.abs(u_mf.x.array)), op=MPI.MAX)
    assert scale > 0.05
    assert diff <= 1e-8 * scale
    assert its_mf < its_frozen, (its_mf, its_frozen)


@pytest.mark.mpi
def test_explicit_coupling_with_linear_problem():
    """A non-local closure as a source in a LinearProblem (explicit coupling)."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 16, 16)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n = fem.Function(V)
    u_n.interpolate(smooth)
    closure = NonlocalClosure(Channels([0]), [u_n], quadrature_degree=2, grid_shape=(65, 65))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    problem = LinearProblem(
        u * v * ufl.dx,
        closure * v * closure.dx,
        petsc_options_prefix="nl_lp_",
        petsc_options={"ksp_type": "preonly", "pc_type": "lu"},
    )
    uh = problem.solve()
    assert problem.closures == [closure] and closure.update_count == 1
    stages = {"sample", "gather", "model", "wait", "scatter", "interpolate"}
    assert set(closure.timings) == stages | {"total"}
    assert closure.timings["total"] == pytest.approx(sum(closure.timings[s] for s in stages))
    # L2 projection of (the grid transfer of) u_n: close to u_n.
    error = np.sqrt(integral((uh - u_n) ** 2, ufl.dx, msh.comm))
    assert error < 2e-3


class RaiseAfter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("armed")
        return x[:, :1] * 2.0


@pytest.mark.mpi
def test_model_error_raises_on_all_ranks_and_the_closure_recovers():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: x[0])
    model = RaiseAfter()
    closure = NonlocalClosure(model, [u], grid_shape=(17, 17))
    closure.update()
    before = closure.x.array.copy()
    model.armed = True
    expected = "on rank 0: the model raised RuntimeError: armed. The previous"
    with pytest.raises(mno.ClosureEvaluationError, match=expected) as info:
        closure.update()
    # The root chains the model's own exception.
    cause = RuntimeError if msh.comm.rank == closure.root else type(None)
    assert type(info.value.__cause__) is cause
    np.testing.assert_array_equal(closure.x.array, before)
    model.armed = False
    closure.update()  # the ranks are still in step
    np.testing.assert_array_equal(closure.x.array, before)
    assert closure.update_count == 2


class TwoChannels(torch.nn.Module):
    """Two output channels, so that the multi-channel buffers are exercised."""

    def forward(self, x):
        return torch.cat([2.0 * x[:, :1], x[:, 1:2] - x[:, 2:3]], dim=1)


@pytest.mark.mpi
def test_repeated_updates_reuse_buffers_and_allocate_nothing_large():
    """Every per-update buffer is allocated at construction: updates allocate no arrays."""
    comm = MPI.COMM_WORLD
    msh = mesh.create_unit_square(comm, 64, 64)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 2)))
    u.interpolate(smooth)
    closure = NonlocalClosure(TwoChannels(), [u, ufl.grad(u)], (2,), 2, grid_shape=(129, 129))
    closure.update()
    first = closure.x.array.copy()
    buffers = [
        closure._gridded._local,
        closure._gridded._sampler._cell_values,
        closure._scatter._interpolator._corner_values,
        closure._scatter._block_buffer,
    ]
    if comm.rank == closure.root:
        buffers += [
            closure._gridded._buffer,
            closure._evaluator.inputs,
            closure._evaluator.outputs,
            closure._scatter._send_buffer,
        ]
    addresses = [b.ctypes.data for b in buffers]
    tracemalloc.start()
    closure.update()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # Bitwise the same values, from the same buffers.
    np.testing.assert_array_equal(closure.x.array, first)
    assert [b.ctypes.data for b in buffers] == addresses
    # Measured: 3.7 kB of NumPy allocations in an update (serial), against workspaces of
    # 1.6 MB (corner values) and 2.4 MB (cell values) that a fresh allocation would need.
    workspace = closure._scatter._interpolator._corner_values.nbytes
    assert workspace > 500_000
    assert peak < 64_000, peak


class Sleep(torch.nn.Module):
    """An identity that takes ``seconds`` of wall time but no CPU time."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x[:, :1]


@pytest.mark.mpi
def test_ranks_waiting_for_the_model_do_not_spin(time_asleep):
    """While the root runs the model, the other ranks sleep instead of polling MPI."""
    comm = MPI.COMM_WORLD
    if comm.size == 1:
        pytest.skip("needs more than one rank")
    msh = mesh.create_unit_square(comm, 8, 8)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    seconds = 0.5
    model = Sleep(0.0)
    closure = NonlocalClosure(model, [u], grid_shape=(17, 17))
    # A first update without the sleep, so that the measured one holds the wait and the
    # update's own (small, fixed) work, not first-call costs.
    closure.update()
    model.seconds = seconds
    comm.Barrier()
    cpu = time.process_time()
    closure.update()
    cpu = time.process_time() - cpu
    if comm.rank != closure.root:
        assert closure.timings["wait"] > 0.9 * seconds
        assert time_asleep[0] > 0.9 * seconds, time_asleep[0]
        # Measured on 2 and 3 ranks: 0.008-0.011 s of CPU time in the 0.5 s wait on a quiet
        # machine, 0.064-0.068 s under CI's load. MPI's own (polling) wait took 0.14 s with 9
        # other jobs on the 2 cores, and a whole 0.5 s on a free core: this bound catches a
        # spinning wait only on a quiet machine; the share asleep above catches it on any.
        assert cpu < 0.3 * seconds, cpu
