"""The time schemes of the 2D turbulence demo's flow solver (``demos/turbulence_2d/flow.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest

import dolfinx_mno  # noqa: F401  (before dolfinx)

DEMO = Path(__file__).parents[1] / "demos"
sys.path[:0] = [str(DEMO), str(DEMO / "turbulence_2d")]
from flow import VorticityFlow, initial_vorticity  # noqa: E402

COMM = MPI.COMM_WORLD


def _vorticity_at(scheme: str, dt: float, end: float = 0.4) -> np.ndarray:
    """The owned vorticity dofs of an 8² run from a smooth state to ``end``."""
    flow = VorticityFlow(8, dt, 1e-3, scheme=scheme, name=f"{scheme}_{round(end / dt)}")
    flow.set_vorticity(initial_vorticity(1, peak=2.0))
    flow.run(0.0, end)
    omega = flow.omega
    return omega.x.array[: omega.function_space.dofmap.index_map.size_local].copy()


def _norm(values: np.ndarray) -> float:
    return float(np.sqrt(COMM.allreduce(float(values @ values), op=MPI.SUM)))


@pytest.mark.mpi
@pytest.mark.parametrize("scheme, low, high", [("ssprk3", 2.8, 3.2), ("euler", 0.6, 1.2)])
def test_time_scheme_order(scheme: str, low: float, high: float):
    """Errors against a run with a 32× smaller step fall as Δt³ for SSP-RK3 and as Δt for
    IMEX Euler with the Taylor–Galerkin term (first order: the velocity of the correction
    is frozen over the step), on any number of ranks. At the coarsest step SSP-RK3's error
    is also two orders of magnitude below Euler's (measured 0.030 against 4.4)."""
    reference = _vorticity_at("ssprk3", 0.05 / 32)
    errors = [_norm(_vorticity_at(scheme, dt) - reference) for dt in (0.05, 0.025, 0.0125)]
    rates = np.log2(np.array(errors[:-1]) / errors[1:])
    assert np.all((rates > low) & (rates < high)), (errors, rates)
    if scheme == "ssprk3":
        assert errors[0] < 0.05 * _norm(_vorticity_at("euler", 0.05) - reference), errors


@pytest.mark.mpi
@pytest.mark.parametrize(
    "options, message",
    [
        ({"scheme": "rk4"}, r"scheme must be one of \('euler', 'ssprk3'\), got 'rk4'"),
        ({"scheme": "ssprk3", "memory": True}, "takes neither memory nor a closure_interval"),
        ({"scheme": "ssprk3", "closure_interval": 2}, "takes neither memory"),
        ({"hold_closures": True}, "hold_closures needs several stages: scheme='euler' has one"),
    ],
)
def test_bad_scheme_options_are_refused(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        VorticityFlow(4, 0.1, 1e-3, **options)


def _triangles(msh, n: int) -> set[tuple]:
    """Every rank's owned triangles of the ``n × n`` box mesh ``msh``, on all ranks, as
    sorted vertex indices ``(a, b)`` (the vertex at ``(a, b) L / n``)."""
    from flow import length

    num_owned = msh.topology.index_map(2).size_local
    corners = np.rint(msh.geometry.x[msh.geometry.dofmaps[0][:num_owned], :2] * n / length)
    local = {tuple(sorted(map(tuple, triangle.astype(int).tolist()))) for triangle in corners}
    return set().union(*COMM.allgather(local))


@pytest.mark.mpi
def test_checkerboard_box_is_mirror_symmetric_and_nested():
    """``box(n, checkerboard=m)``: DOLFINx's ``"left_right"`` mesh for ``n = m``; mapped onto
    itself by the mirror ``y → L − y`` (unlike the default mesh); and the red refinement of
    the ``m × m`` one, so that ``L2Projection(subdivisions=n // m)`` reproduces a coarse
    P1 field exactly from the finer mesh, where DOLFINx's ``"left_right"`` ``n × n`` mesh
    is refused. On any number of ranks (rank 0 builds the mesh, ``create_mesh`` shares it)."""
    from dolfinx import fem, mesh
    from flow import box, length

    from dolfinx_mno.data import L2Projection

    coarse, fine = box(COMM, 4, checkerboard=4), box(COMM, 8, checkerboard=4)
    alternating = mesh.create_rectangle(
        COMM, [[0.0, 0.0], [length, length]], [4, 4], diagonal=mesh.DiagonalType.left_right
    )
    assert _triangles(coarse, 4) == _triangles(alternating, 4)
    for msh, symmetric in ((fine, True), (box(COMM, 8), False)):
        triangles = _triangles(msh, 8)
        mirrored = {tuple(sorted((a, 8 - b) for a, b in triangle)) for triangle in triangles}
        assert len(triangles) == 2 * 8**2 and (mirrored == triangles) == symmetric

    V = fem.functionspace(coarse, ("Lagrange", 1))
    exact = fem.Function(V)
    exact.interpolate(lambda x: np.sin(x[0]) * np.cos(0.5 * x[1]) + 0.1 * x[0] * x[1])
    to_coarse = L2Projection(V, subdivisions=2)
    fine_field = fem.Function(fem.functionspace(fine, ("Lagrange", 1)))
    cells = np.arange(fine.topology.index_map(2).size_local, dtype=np.int32)
    data = fem.create_interpolation_data(fine_field.function_space, V, cells, padding=1e-10)
    fine_field.interpolate_nonmatching(exact, cells, data)  # exact: the meshes are nested
    projected = to_coarse(fine_field)
    num_owned = V.dofmap.index_map.size_local
    error = COMM.allreduce(
        float(np.max(np.abs(projected.x.array[:num_owned] - exact.x.array[:num_owned]))),
        op=MPI.MAX,
    )
    assert error < 1e-12, error
    other = fem.Function(fem.functionspace(mesh.create_rectangle(
        COMM, [[0.0, 0.0], [length, length]], [8, 8], diagonal=mesh.DiagonalType.left_right),
        ("Lagrange", 1)))  # fmt: skip
    with pytest.raises(ValueError, match=r"L2Projection\(subdivisions=2\) is not exact"):
        to_coarse(other)


@pytest.mark.mpi
@pytest.mark.parametrize(
    "n, checkerboard, domain, message",
    [
        (8, 3, False, "checkerboard must divide n = 8, got 3"),
        (8, 0, False, "checkerboard must divide n = 8, got 0"),
        (8, 4, True, "a given domain has its own"),
    ],
)
def test_bad_checkerboard_is_refused(n: int, checkerboard: int, domain: bool, message: str):
    from flow import box

    with pytest.raises(ValueError, match=message):
        VorticityFlow(n, 0.01, 1e-3, domain=box(COMM, n) if domain else None,
                      checkerboard=checkerboard)  # fmt: skip


@pytest.mark.mpi
def test_checkerboard_box_keeps_the_mirror_at_the_cell_scale():
    """A cell-wise field (``τ`` is one) sampled on the MNO's closure grid commutes with the
    mirror ``y → L − y`` on ``box(16, checkerboard=16)`` to round-off, at every grid point
    (those on the diagonals included); on the default mesh it differs at a quarter of
    them, the diagonals' pattern that made mirrored training samples look like another
    mesh's (``experiments/turbulence_2d_mirror_check.py``)."""
    from dolfinx import fem
    from flow import box, length

    from dolfinx_mno.grid_gather import GriddedSampler

    sys.path.insert(0, str(DEMO.parent / "experiments"))
    try:
        from turbulence_2d_data import closure_grid
    finally:
        del sys.path[0]
    grid = closure_grid(16)

    def field(x, y):  # no symmetry of its own in y
        return np.sin(x / 2) * np.sin(y) + 0.5 * np.sin(1.5 * x) * np.sin(y / 2) + 0.1 * y

    for checkerboard, differing in ((16, 0.0), (None, 0.25)):
        V = fem.functionspace(box(COMM, 16, checkerboard=checkerboard), ("DG", 0))
        flow, mirrored = fem.Function(V), fem.Function(V)
        flow.interpolate(lambda x: field(x[0], x[1]))
        mirrored.interpolate(lambda x: field(x[0], length - x[1]))
        samples = [GriddedSampler([f], grid, mask_channel=False)() for f in (flow, mirrored)]
        if COMM.rank == 0:
            flow_grid, mirrored_grid = (np.asarray(s).reshape(grid.shape) for s in samples)
            mismatch = np.abs(flow_grid[:, ::-1] - mirrored_grid) > 1e-12
            assert mismatch.mean() == differing, (checkerboard, mismatch.mean())
