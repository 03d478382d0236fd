"""Closure training data: restriction, commutator targets, HDF5 storage."""

import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from mpi4py import MPI

import h5py
import numpy as np
import pytest
import torch
import ufl
from data_job import NUM_CELLS, POINTS_PER_CELL, synthetic_sample, synthetic_writer
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno.data import (
    CellAverage,
    ClosureDataReader,
    ClosureDataWriter,
    ClosureSample,
    ClosureSampler,
    Interpolation,
    L2Projection,
    Tendency,
    make_restriction,
    restrict,
)

COMM = MPI.COMM_WORLD
EPS = np.finfo(np.float64).eps
JOB = Path(__file__).with_name("data_job.py")
MPIRUN = Path(sys.executable).parent / "mpirun"
METHODS = {"interpolation": Interpolation, "l2_projection": L2Projection}


def _meshes(n, comm=COMM, ratio=3):
    """A coarse triangle mesh and a non-nested fine quadrilateral mesh of the unit square."""
    coarse = mesh.create_unit_square(comm, n, n, mesh.CellType.triangle)
    fine = mesh.create_unit_square(comm, ratio * n + 1, ratio * n + 1, mesh.CellType.quadrilateral)
    return coarse, fine


def _smooth(x):
    return np.sin(2 * x[0]) * np.cos(3 * x[1]) + x[0] ** 2


def _smooth_ufl(x):
    return ufl.sin(2 * x[0]) * ufl.cos(3 * x[1]) + x[0] ** 2


def _l2(expr, msh, degree=10):
    dx = ufl.dx(domain=msh, metadata={"quadrature_degree": degree})
    return np.sqrt(msh.comm.allreduce(fem.assemble_scalar(fem.form(ufl.inner(expr, expr) * dx))))


def _max_abs(array, comm=COMM):
    return comm.allreduce(float(np.max(np.abs(array))) if array.size else 0.0, op=MPI.MAX)


def _shared_path(tmp_path, name):
    """Rank 0's temporary path on every rank (only rank 0 touches the file)."""
    return Path(COMM.bcast(str(tmp_path / name), root=0))


# -- restriction ------------------------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(
    ("family", "degree", "shape"),
    [("Lagrange", 1, ()), ("Lagrange", 2, ()), ("DG", 0, ()), ("DG", 1, ()), ("Lagrange", 1, (2,))],
)
def test_coarse_functions_are_reproduced(method, family, degree, shape):
    """A field of the coarse space, given on the fine mesh, comes back exactly."""
    coarse, fine = _meshes(4)
    V_c = fem.functionspace(coarse, (family, degree, shape))
    # Fine Q_k contains the coarse P_k polynomials; DG1 is affine per coarse cell, so the
    # fine field must be the same global polynomial: take a global polynomial of degree k.
    coefficients = [0.3, -1.2, 0.7, 0.25, -0.4, 1.1]

    def polynomial(x):
        p = coefficients[0] + coefficients[1] * x[0] + coefficients[2] * x[1]
        if degree == 2:
            p += coefficients[3] * x[0] ** 2 + coefficients[4] * x[0] * x[1] + coefficients[5]
        if degree == 0:
            p = np.full_like(x[0], coefficients[0])
        return p if shape == () else np.stack([p, 2 - p])

    V_f = fem.functionspace(fine, ("Lagrange", max(degree, 1), shape))
    u_f = fem.Function(V_f)
    u_f.interpolate(polynomial)
    expected = fem.Function(V_c)
    expected.interpolate(polynomial)
    restricted = METHODS[method](V_c)(u_f)
    scale = _max_abs(expected.x.array)
    assert scale > 0.1
    # Interpolation is exact to round-off; the projection to the CG tolerance (rtol 1e-14).
    tolerance = 100 * EPS if method == "interpolation" else 1e-12
    assert _max_abs(restricted.x.array - expected.x.array) <= tolerance * scale


@pytest.mark.mpi
@pytest.mark.parametrize(("degree", "rate"), [(1, 2.0), (2, 3.0)])
def test_restriction_convergence(degree, rate):
    """Both restrictions of a smooth field converge at O(h^{k+1}); projection is better."""
    errors = {method: [] for method in METHODS}
    for n in (4, 8, 16):
        coarse, fine = _meshes(n)
        u_f = fem.Function(fem.functionspace(fine, ("Lagrange", degree + 1)))
        u_f.interpolate(_smooth)
        V_c = fem.functionspace(coarse, ("Lagrange", degree))
        exact = _smooth_ufl(ufl.SpatialCoordinate(coarse))
        for method, cls in METHODS.items():
            errors[method].append(_l2(cls(V_c)(u_f) - exact, coarse))
    for method, values in errors.items():
        rates = np.log2(np.array(values[:-1]) / np.array(values[1:]))
        assert rates[-1] == pytest.approx(rate, abs=0.15), (method, values, rates)
    # The L2 projection is the best approximation in L2 (up to quadrature error).
    assert all(
        p <= i for p, i in zip(errors["l2_projection"], errors["interpolation"], strict=True)
    )


@pytest.mark.mpi
def test_piecewise_constant_projection_is_the_cell_mean():
    """L2 projection onto DG0 of a polynomial field gives the exact cell means."""
    coarse, fine = _meshes(3)
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 2)))
    u_f.interpolate(lambda x: x[0] ** 2 + 3 * x[0] * x[1] - x[1])
    V_c = fem.functionspace(coarse, ("DG", 0))
    projected = restrict(u_f, V_c, "l2_projection")
    x = ufl.SpatialCoordinate(coarse)
    w = ufl.TestFunction(V_c)
    means = fem.assemble_vector(fem.form((x[0] ** 2 + 3 * x[0] * x[1] - x[1]) * w * ufl.dx))
    volumes = fem.assemble_vector(fem.form(w * ufl.dx))
    owned = V_c.dofmap.index_map.size_local
    reference = means.array[:owned] / volumes.array[:owned]
    assert _max_abs(projected.x.array[:owned] - reference) <= 100 * EPS


@pytest.mark.mpi
def test_points_outside_the_fine_mesh_raise_on_all_ranks():
    coarse = mesh.create_unit_square(COMM, 4, 4)
    fine = mesh.create_rectangle(COMM, [[0.0, 0.0], [0.8, 1.0]], [8, 10])
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 1)))
    V_c = fem.functionspace(coarse, ("Lagrange", 1))
    number = r"[-+0-9.e]+"
    expected = re.compile(
        r"(Locating the coarse space's points in the fine mesh failed on rank\(s\) \[[0-9, ]+\] "
        r"\(\d of \d ranks\); on rank \d: ValueError: )?(\d+) interpolation point\(s\) of the "
        rf"coarse space lie outside the fine mesh \(for example \({number}, {number}\)\)\. "
        rf"Both meshes must cover the same domain; increase padding \(now {number}\) for "
        r"boundaries that differ by round-off\.$"
    )
    for cls in METHODS.values():
        with pytest.raises(ValueError) as info:
            cls(V_c)(u_f)
        text = str(info.value)
        assert COMM.allgather(text) == [text] * COMM.size  # the same on every rank
        match = expected.match(text)
        assert match is not None, text
        if COMM.size == 1 and cls is Interpolation:
            # The 5 P1 nodes at x = 1, counted once per cell: 12 points of the 8 cells there.
            assert match.group(2) == "12"


def _containing_labels(fine, points):
    """The DG0 label (``_label`` of its midpoint) of the fine cell containing each point,
    found by pulling every point back into every nearby owned cell, on every rank."""
    from test_grid_gather import _label

    expected = np.full(len(points), -np.inf)
    cmap = fine.geometry.cmaps[0]
    num_fine = fine.topology.index_map(2).size_local
    midpoints = mesh.compute_midpoints(fine, 2, np.arange(num_fine, dtype=np.int32))
    for cell in range(num_fine):
        nodes = fine.geometry.x[fine.geometry.dofmaps[0][cell], :2]
        low, high = nodes.min(axis=0) - 0.05, nodes.max(axis=0) + 0.05
        for i in np.flatnonzero(np.all((points[:, :2] >= low) & (points[:, :2] <= high), 1)):
            try:
                X = cmap.pull_back(points[i : i + 1, :2], nodes)[0]
            except RuntimeError:  # Newton diverges for a point far outside the cell
                continue
            if X.min() >= -1e-10 and X.sum() <= 1 + 1e-10:
                expected[i] = _label(midpoints[cell : cell + 1])[0]
    COMM.Allreduce(MPI.IN_PLACE, expected, op=MPI.MAX)
    return expected


@pytest.mark.mpi
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("ghosts", [True, False])
def test_a_curved_fine_mesh_is_evaluated_in_the_cells_that_contain_the_points(method, ghosts):
    """DOLFINx locates points in the convex hull of a cell's nodes, which is not the cell on
    a P2-geometry mesh: 7 of the 1,440 coarse midpoints took the value of a fine cell next
    to the one that contains them (a DG0 field of labels: off by up to 0.65). The
    restrictions now pull each point back into its cell and move it to a cell of the rank
    that contains it: exact on any number of ranks with ghost cells; without them, where
    the containing cell is on another rank, refused with the same message on every rank."""
    from test_grid_gather import _cell_labels, _curved_square

    ghost_mode = mesh.GhostMode.shared_facet if ghosts else mesh.GhostMode.none
    fine = _curved_square(COMM, amplitude=0.15, ghost_mode=ghost_mode)
    labels = _cell_labels(fine)
    coarse = mesh.create_unit_square(COMM, 40, 36, mesh.CellType.quadrilateral)
    V_c = fem.functionspace(coarse, ("DG", 0))
    num_coarse = coarse.topology.index_map(2).size_local
    options = {} if method == "interpolation" else {"quadrature_degree": 0}  # the midpoint
    try:
        restricted = METHODS[method](V_c, **options)(labels)
    except ValueError as error:
        text = str(error)
        assert not ghosts and COMM.size > 1, text
        assert COMM.allgather(text) == [text] * COMM.size
        assert "Give the fine mesh ghost cells" in text
        return
    values = restricted.x.array[V_c.dofmap.list[:num_coarse, 0]]
    cells = np.arange(num_coarse, dtype=np.int32)
    midpoints = np.concatenate(COMM.allgather(mesh.compute_midpoints(coarse, 2, cells)))
    expected = _containing_labels(fine, midpoints)
    offset = COMM.scan(num_coarse) - num_coarse
    np.testing.assert_allclose(values, expected[offset : offset + num_coarse], rtol=0, atol=1e-12)


def test_restriction_input_errors():
    coarse, fine = _meshes(2, MPI.COMM_SELF)
    V_c = fem.functionspace(coarse, ("Lagrange", 1))
    vector = fem.Function(fem.functionspace(fine, ("Lagrange", 1, (2,))))
    with pytest.raises(ValueError, match="value shape"):
        Interpolation(V_c)(vector)
    with pytest.raises(TypeError, match=r"dolfinx\.fem\.Function"):
        Interpolation(V_c)(np.zeros(3))
    with pytest.raises(ValueError, match="quadrature_degree"):
        L2Projection(V_c, quadrature_degree=1)
    with pytest.raises(ValueError, match="Unknown restriction"):
        restrict(vector, V_c, "spectral")
    scalar = fem.Function(fem.functionspace(fine, ("Lagrange", 1)))
    other = fem.Function(fem.functionspace(coarse, ("Lagrange", 2)))
    with pytest.raises(ValueError, match="out must be"):
        Interpolation(V_c)(scalar, out=other)


# -- cell averages ----------------------------------------------------------------------


def _nested(kind, n, ratio, comm=COMM):
    """A coarse mesh with n cells per direction and the fine one with ratio * n (nested)."""
    if kind == "interval":
        return (mesh.create_unit_interval(comm, n), mesh.create_unit_interval(comm, ratio * n))
    cell = getattr(mesh.CellType, kind)
    coarse = mesh.create_unit_square(comm, n, n, cell)
    return coarse, mesh.create_unit_square(comm, ratio * n, ratio * n, cell)


def _exact_means(coarse, f, value_shape=()):
    """Means of f (numpy, x of shape (gdim, N)) over the owned coarse cells, by a collapsed
    Gauss rule exact to degree 15 (independent of FFCx), ordered like the DG0 cell dofs."""
    tdim = coarse.topology.dim
    num_cells = coarse.topology.index_map(tdim).size_local
    vertices = coarse.geometry.x[coarse.geometry.dofmaps[0][:num_cells]][
        :, :, : coarse.geometry.dim
    ]
    s, w = np.polynomial.legendre.leggauss(8)
    s, w = (s + 1) / 2, w / 2
    if coarse.topology.cell_type == mesh.CellType.triangle:
        a, b = (g.reshape(-1) for g in np.meshgrid(s, s, indexing="ij"))
        weights = np.outer(w, w).reshape(-1) * (1 - a)
        xi = np.stack([a, b * (1 - a)])  # the Duffy map onto the reference triangle
        points = (
            vertices[:, :1, :, None]
            + xi[0] * (vertices[:, 1:2, :, None] - vertices[:, :1, :, None])
            + xi[1] * (vertices[:, 2:3, :, None] - vertices[:, :1, :, None])
        )[:, 0]
    else:  # axis-aligned boxes (intervals, rectangles)
        low, high = vertices.min(axis=1), vertices.max(axis=1)
        grids = np.meshgrid(*(tdim * [s]), indexing="ij")
        xi = np.stack([g.reshape(-1) for g in grids])
        weights = np.prod(np.meshgrid(*(tdim * [w]), indexing="ij"), axis=0).reshape(-1)
        points = low[:, :, None] + xi[None] * (high - low)[:, :, None]
    values = np.array([np.asarray(f(p)).reshape(*value_shape, -1) @ weights for p in points])
    return values.reshape(num_cells, -1) / weights.sum()


def _owned_values(u):
    """Values of a DG0 function on the owned cells, (num_cells, bs)."""
    V = u.function_space
    num_cells = V.mesh.topology.index_map(V.mesh.topology.dim).size_local
    return u.x.array.reshape(-1, V.dofmap.bs)[V.dofmap.list[:num_cells, 0]]


def _polynomial(x):
    """x⁴ − x + 1 in 1D, x³y² − 2xy + y³ + 1 in 2D (x: NumPy points or UFL coordinate)."""
    if len(x) == 1:
        return x[0] ** 4 - x[0] + 1
    return x[0] ** 3 * x[1] ** 2 - 2 * x[0] * x[1] + x[1] ** 3 + 1


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["interval", "quadrilateral", "triangle"])
@pytest.mark.parametrize("ratio", [2, 3])
def test_cell_average_of_polynomials_is_exact(kind, ratio):
    """Functions (Lagrange, containing the polynomial) and expressions: analytic means."""
    coarse, fine = _nested(kind, 3, ratio)
    average = CellAverage(fem.functionspace(coarse, ("DG", 0)), fine)
    exact = _exact_means(coarse, _polynomial)
    degree = {"interval": 4, "quadrilateral": 3, "triangle": 5}[kind]  # holds the polynomial
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", degree)))
    u_f.interpolate(lambda x: _polynomial(x[: coarse.geometry.dim]))
    x = ufl.SpatialCoordinate(fine)
    for field in (u_f, _polynomial(x)):
        result = average(field)
        assert _max_abs(_owned_values(result) - exact) <= 1e-13
    assert average.method == "cell_average"
    # The volumes are the coarse cells' (the fine cells tile them).
    assert COMM.allreduce(float(average.volumes.sum())) == pytest.approx(1.0, abs=1e-14)


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["quadrilateral", "triangle"])
def test_cell_average_of_expressions_vectors_and_tensors(kind):
    """u²/2 − ν ∂u/∂x, grad(u) into DG0 vectors and grad(u) ⊗ grad(u) into DG0 tensors."""
    coarse, fine = _nested(kind, 2, 3)
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 2)))
    u_f.interpolate(lambda x: 1 + 2 * x[0] - x[1] + 3 * x[0] * x[1] - x[1] ** 2)
    nu = fem.Constant(fine, 0.3)

    def gradient(x):
        return np.stack([2 + 3 * x[1], -1 + 3 * x[0] - 2 * x[1]])

    def u(x):
        return 1 + 2 * x[0] - x[1] + 3 * x[0] * x[1] - x[1] ** 2

    cases = [
        ((), u_f**2 / 2 - nu * u_f.dx(0), lambda x: u(x) ** 2 / 2 - 0.3 * gradient(x)[0]),
        ((2,), ufl.grad(u_f), gradient),
        (
            (2, 2),
            ufl.outer(ufl.grad(u_f), ufl.grad(u_f)),
            lambda x: gradient(x)[:, None] * gradient(x)[None, :],
        ),
    ]
    for shape, expression, f in cases:
        average = CellAverage(fem.functionspace(coarse, ("DG", 0, shape)), fine)
        out = fem.Function(average.space)
        assert average(expression, out=out) is out
        exact = _exact_means(coarse, f, shape)
        assert _max_abs(_owned_values(out) - exact) <= 1e-13 * max(1.0, _max_abs(exact))
    # The Constant is packed at each call: a new ν, the same compiled form.
    nu.value = 0.0
    average = CellAverage(fem.functionspace(coarse, ("DG", 0)), fine)
    for _ in range(2):  # equal expressions built anew, with new UFL indices, share one form
        result = average(ufl.inner(ufl.grad(u_f), ufl.grad(u_f)) - nu * u_f)
    assert len(average._forms) == 1
    exact = _exact_means(coarse, lambda x: np.sum(gradient(x) ** 2, axis=0))
    assert _max_abs(_owned_values(result) - exact) <= 1e-13 * _max_abs(exact)


@pytest.mark.mpi
def test_cell_average_of_a_laminate_is_exact_where_the_projection_aliases():
    """Stripes a = 1, 10, 10, 1 in each coarse cell: the mean is 5.5 in every cell."""
    coarse, fine = _nested("quadrilateral", 4, 4)
    a = fem.Function(fem.functionspace(fine, ("DG", 0)))
    a.interpolate(lambda x: np.where(np.mod(x[0] * 16, 4) // 1 % 3 == 0, 1.0, 10.0))
    V_c = fem.functionspace(coarse, ("DG", 0))
    assert _max_abs(_owned_values(restrict(a, V_c, "cell_average")) - 5.5) <= 1e3 * EPS
    # The 2 x 2 Gauss points of the L2 projection's rule all lie in the a = 1 stripes.
    assert _max_abs(_owned_values(L2Projection(V_c)(a)) - 1.0) <= 1e-12


@pytest.mark.mpi
def test_cell_average_in_a_sampler():
    """CellAverage is a Restriction: subgrid variance mean(u²) − mean(u)² as the target."""
    coarse, fine = _nested("triangle", 3, 3)
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 2)), name="u_f")
    u_f.interpolate(lambda x: 1 + 2 * x[0] - x[1] + 3 * x[0] * x[1] - x[1] ** 2)
    V_c = fem.functionspace(coarse, ("DG", 0))
    u_c = fem.Function(V_c, name="u_c")
    restriction = make_restriction(V_c, "cell_average", fine_mesh=fine)
    assert isinstance(restriction, CellAverage)
    sampler = ClosureSampler(
        restriction,
        u_c,
        [u_c],
        u_c**2,
        quadrature_degree=0,
        fine_tendency=Tendency(u_f**2, fem.functionspace(fine, ("Lagrange", 4))),
    )
    sample = sampler.sample(u_f)
    mean = _exact_means(coarse, lambda x: 1 + 2 * x[0] - x[1] + 3 * x[0] * x[1] - x[1] ** 2)
    square = _exact_means(
        coarse, lambda x: (1 + 2 * x[0] - x[1] + 3 * x[0] * x[1] - x[1] ** 2) ** 2
    )
    assert COMM.allreduce(float(np.min(square - mean**2, initial=np.inf)), op=MPI.MIN) > 1e-3
    assert _max_abs(sample.targets - (square - mean**2)[:, 0]) <= 1e3 * EPS
    assert sampler.metadata(fine)["restriction"] == "cell_average"


@pytest.mark.mpi
def test_cell_average_rejects_meshes_that_are_not_nested():
    V_c = fem.functionspace(mesh.create_unit_square(COMM, 4, 4), ("DG", 0))
    for fine, reason in [
        (mesh.create_unit_square(COMM, 9, 9), "do not tile it"),  # 9 / 4 cells
        (mesh.create_unit_square(COMM, 8, 8, diagonal=mesh.DiagonalType.left), "do not tile"),
        (mesh.create_rectangle(COMM, [[0, 0], [1.25, 1]], [10, 8]), "outside the coarse mesh"),
        (mesh.create_rectangle(COMM, [[0, 0], [0.5, 1]], [4, 8]), "do not tile it"),
    ]:
        with pytest.raises(ValueError, match=f"not nested.*{reason}"):
            CellAverage(V_c, fine)
    fine = mesh.create_unit_square(COMM, 8, 8)
    with pytest.raises(ValueError, match="DG0"):
        CellAverage(fem.functionspace(V_c.mesh, ("Lagrange", 1)), fine)


@pytest.mark.mpi
def test_cell_average_input_errors_raise_on_all_ranks():
    """A bad input on one rank only: every rank raises, none waits in a collective."""
    coarse, fine = _nested("triangle", 2, 2)
    V_c = fem.functionspace(coarse, ("DG", 0))
    average = CellAverage(V_c, fine)
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 1)))
    u_f.interpolate(lambda x: x[0] + x[1])
    last = COMM.rank == COMM.size - 1
    with pytest.raises(ValueError, match="value shape"):
        average(ufl.grad(u_f) if last else u_f)
    coarse_function = fem.Function(V_c)  # collective, like all function creation
    with pytest.raises(ValueError, match="another mesh"):
        average(coarse_function if last else u_f)
    wrong_out = fem.Function(fem.functionspace(coarse, ("DG", 1)))
    with pytest.raises(ValueError, match="out must be"):
        average(u_f, out=wrong_out if last else None)
    with pytest.raises(TypeError, match="UFL expression"):
        average(np.zeros(3) if last else u_f)
    with pytest.raises(ValueError, match="test or trial"):
        average(ufl.TestFunction(u_f.function_space))
    # Still usable, and consistent, afterwards.
    assert (
        _max_abs(_owned_values(average(u_f)) - _exact_means(coarse, lambda x: x[0] + x[1])) < 1e-14
    )


# -- commutator targets -----------------------------------------------------------------


def _target_norm(sampler):
    """L2 norms of the target and of the filtered fine tendency, at the quadrature points."""
    msh = sampler.coarse_state.function_space.mesh
    dx = mno.measure(msh, sampler.quadrature_degree)
    norm = msh.comm.allreduce(fem.assemble_scalar(fem.form(sampler.target**2 * dx)))
    reference = fem.assemble_scalar(fem.form(sampler.filtered_tendency**2 * dx))
    return np.sqrt(norm), np.sqrt(msh.comm.allreduce(reference))


@pytest.mark.mpi
@pytest.mark.parametrize("method", list(METHODS))
def test_linear_operator_commutes_exactly(method):
    """N(u) = λu commutes with any linear filter: the target is round-off."""
    coarse, fine = _meshes(4)
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 2)))
    u_f.interpolate(_smooth)
    V_c = fem.functionspace(coarse, ("Lagrange", 1))
    u_c = fem.Function(V_c)
    sampler = ClosureSampler(
        METHODS[method](V_c),
        u_c,
        [u_c],
        -3.0 * u_c,
        quadrature_degree=2,
        fine_tendency=Tendency(-3.0 * u_f, u_f.function_space),
    )
    sample = sampler.sample(u_f)
    assert _max_abs(sample.inputs) > 0.5
    assert _max_abs(sample.targets) <= 100 * EPS * _max_abs(sample.inputs)


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("method", "degree", "kind"),
    [
        ("l2_projection", 1, "weak"),
        ("l2_projection", 2, "pointwise"),
        ("interpolation", 2, "pointwise"),
    ],
)
def test_advection_commutes_to_discretisation_error(method, degree, kind):
    """N(u) = -a·∇u: the commutator ~ h^k vanishes with refinement (measured rate k)."""
    a = ufl.as_vector([1.0, -0.5])
    ratios = []
    norms = []
    for n in (4, 8, 16):
        coarse, fine = _meshes(n)
        V_f = fem.functionspace(fine, ("Lagrange", degree + 1))
        u_f = fem.Function(V_f)
        u_f.interpolate(_smooth)
        if kind == "weak":
            fine_tendency = Tendency(-ufl.dot(a, ufl.grad(u_f)) * ufl.TestFunction(V_f) * ufl.dx)
        else:
            gradient_space = fem.functionspace(fine, ("DG", degree))
            fine_tendency = Tendency(-ufl.dot(a, ufl.grad(u_f)), gradient_space)
        V_c = fem.functionspace(coarse, ("Lagrange", degree))
        u_c = fem.Function(V_c)
        sampler = ClosureSampler(
            METHODS[method](V_c),
            u_c,
            [u_c, ufl.grad(u_c)],
            -ufl.dot(a, ufl.grad(u_c)),
            quadrature_degree=2 * degree,
            fine_tendency=fine_tendency,
        )
        sampler.sample(u_f)
        norm, reference = _target_norm(sampler)
        norms.append(norm)
        ratios.append(norm / reference)
    rates = np.log2(np.array(norms[:-1]) / np.array(norms[1:]))
    assert rates == pytest.approx([degree, degree], abs=0.1), (norms, rates)
    assert ratios[-1] < 0.06 / degree**2


@pytest.mark.mpi
@pytest.mark.parametrize("quadrature_degree", [0, 2])
def test_square_with_piecewise_constants_gives_the_subgrid_variance(quadrature_degree):
    """N(u) = u², L2 projection onto DG0: target = mean(u²) - mean(u)² on each cell."""
    coarse, fine = _meshes(3)
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 2)), name="u_f")
    u_f.interpolate(lambda x: 1 + 2 * x[0] - x[1] + 3 * x[0] * x[1] - x[1] ** 2)
    # u_f² (degree 4) is exact in fine Q4; the coarse rule of degree 4 integrates it exactly.
    fine_tendency = Tendency(u_f**2, fem.functionspace(fine, ("Lagrange", 4)))
    V_c = fem.functionspace(coarse, ("DG", 0))
    u_c = fem.Function(V_c, name="u_c")
    x = ufl.SpatialCoordinate(coarse)
    sampler = ClosureSampler(
        L2Projection(V_c, quadrature_degree=4),
        u_c,
        [u_c, x],
        u_c**2,
        quadrature_degree=quadrature_degree,
        fine_tendency=fine_tendency,
    )
    sample = sampler.sample(u_f)

    # Exact cell means on the coarse mesh, integrated with the analytic polynomial.
    w = ufl.TestFunction(V_c)
    u = 1 + 2 * x[0] - x[1] + 3 * x[0] * x[1] - x[1] ** 2
    dx = ufl.dx(metadata={"quadrature_degree": 4})
    volume, mean, mean_square = (
        fem.assemble_vector(fem.form(f * w * dx)).array for f in (1.0, u, u**2)
    )
    num_cells = coarse.topology.index_map(2).size_local
    dofs = V_c.dofmap.list[:num_cells, 0]
    mean, mean_square = mean[dofs] / volume[dofs], mean_square[dofs] / volume[dofs]
    variance = mean_square - mean**2
    points = sampler.points_per_cell
    assert COMM.allreduce(float(variance.min(initial=np.inf)), op=MPI.MIN) > 1e-3
    assert _max_abs(sample.targets - np.repeat(variance, points)) <= 1e3 * EPS
    assert _max_abs(sample.inputs[:, 0] - np.repeat(mean, points)) <= 100 * EPS
    # The input columns: u_c, x[0], x[1]; the last matches the sample's coordinates.
    assert sampler.input_names == ["u_c", "x[0]", "x[1]"]
    assert np.array_equal(sample.inputs[:, 1:], sample.coordinates)

    # Interpolation onto DG0 samples u at the midpoint only: it cannot see the variance.
    interpolated = ClosureSampler(
        Interpolation(V_c), u_c, [u_c], u_c**2, quadrature_degree, fine_tendency=fine_tendency
    ).sample(u_f)
    assert _max_abs(interpolated.targets) <= 100 * EPS


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


@pytest.mark.mpi
@pytest.mark.parametrize("method", list(METHODS))
def test_inputs_match_a_closure_with_the_same_operands(method):
    coarse, fine = _meshes(3)
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 2, (2,))))
    u_f.interpolate(lambda x: np.stack([_smooth(x), x[0] * x[1]]))
    V_c = fem.functionspace(coarse, ("Lagrange", 2, (2,)))
    u_c = fem.Function(V_c, name="w")
    x = ufl.SpatialCoordinate(coarse)
    operands = [u_c, ufl.grad(u_c), x[0] * ufl.dot(u_c, u_c)]
    fine_tendency = Tendency(ufl.dot(u_f, u_f) * u_f, fem.functionspace(fine, ("DG", 6, (2,))))
    sampler = ClosureSampler(
        METHODS[method](V_c),
        u_c,
        operands,
        ufl.dot(u_c, u_c) * u_c,
        quadrature_degree=3,
        fine_tendency=fine_tendency,
    )
    sample = sampler.sample(u_f)
    assert sampler.num_inputs == 7
    assert sampler.input_names[:4] == ["w[0]", "w[1]", "grad(w)[0,0]", "grad(w)[0,1]"]
    closure = mno.Closure(_Identity(), operands, (7,), quadrature_degree=3, device="cpu")
    closure.update()
    num_cells = coarse.topology.index_map(2).size_local
    dofs = closure.function_space.dofmap.list[:num_cells].reshape(-1)
    values = closure.x.array.reshape(-1, 7)[dofs]
    assert sample.inputs.shape == values.shape == (num_cells * 6, 7)
    assert _max_abs(sample.inputs - values) <= 10 * EPS * _max_abs(values)
    # The target quadrature function holds the sample's targets.
    target_dofs = sampler.target.function_space.dofmap.list[:num_cells].reshape(-1)
    assert np.array_equal(sampler.target.x.array.reshape(-1, 2)[target_dofs], sample.targets)


def test_sampler_input_errors():
    coarse, fine = _meshes(2, MPI.COMM_SELF)
    V_c = fem.functionspace(coarse, ("Lagrange", 1))
    u_c = fem.Function(V_c)
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 1)))
    restriction = Interpolation(V_c)
    with pytest.raises(ValueError, match="coarse_state"):
        ClosureSampler(restriction, u_f, [u_c], u_c)
    with pytest.raises(ValueError, match=r"operand\(s\) \['f'\] belong to another mesh"):
        ClosureSampler(restriction, u_c, [u_f], u_c)
    with pytest.raises(ValueError, match="shape"):
        ClosureSampler(restriction, u_c, [u_c], ufl.grad(u_c))
    with pytest.raises(ValueError, match="linear form"):
        Tendency(ufl.TrialFunction(V_c) * ufl.TestFunction(V_c) * ufl.dx)
    with pytest.raises(ValueError, match="needs a space"):
        Tendency(u_c**2)
    sampler = ClosureSampler(restriction, u_c, [u_c], u_c**2)
    with pytest.raises(ValueError, match="No fine tendency"):
        sampler.sample(u_f)


def test_degrees_and_counts_must_be_integers():
    coarse, fine = _meshes(2, MPI.COMM_SELF)
    V_c = fem.functionspace(coarse, ("Lagrange", 1))
    u_c = fem.Function(V_c)
    restriction = Interpolation(V_c)
    for degree, error, text in [
        (True, TypeError, "got True (a bool)."),
        (2.5, TypeError, "got 2.5 (float)."),
        (-1, ValueError, "got -1."),
    ]:
        with pytest.raises(error) as info:
            ClosureSampler(restriction, u_c, [u_c], u_c, quadrature_degree=degree)
        assert str(info.value) == f"quadrature_degree must be a non-negative integer, {text}"
        with pytest.raises(error) as info:
            L2Projection(V_c, quadrature_degree=degree)
        assert str(info.value) == f"quadrature_degree must be a non-negative integer, {text}"
        with pytest.raises(error) as info:
            CellAverage(fem.functionspace(coarse, ("DG", 0)), fine, quadrature_degree=degree)
        assert str(info.value) == f"quadrature_degree must be a non-negative integer, {text}"
    with pytest.raises(TypeError) as info:
        L2Projection(V_c, subdivisions=True)
    assert str(info.value) == "subdivisions must be a positive integer, got True (a bool)."


# -- storage ----------------------------------------------------------------------------


def test_write_and_read_back(tmp_path):
    path = tmp_path / "data.h5"
    with synthetic_writer(path, mode="x") as writer:
        for i in range(3):
            assert writer.append(synthetic_sample(i), time=0.5 * i) == i + 1
    with ClosureDataReader(path) as data:
        assert data.num_samples == 3
        assert data.metadata["time_step"] == 0.5
        assert data.metadata["units"] == {"time": "s"}
        assert data.metadata["case"] == "synthetic"
        assert set(data.metadata["versions"]) >= {"dolfinx_mno", "dolfinx", "torch"}
        assert data.metadata["created"].endswith("+00:00")
        assert np.array_equal(data.cell_index, np.arange(NUM_CELLS))
        inputs, targets = data.inputs(), data.targets()
        assert inputs.shape == (3 * NUM_CELLS * POINTS_PER_CELL, 2)
        assert targets.shape == (3 * NUM_CELLS * POINTS_PER_CELL, 2)
        # Cells were given in reverse order: rows are sorted by cell, points kept in order.
        first = synthetic_sample(0)
        order = np.arange(NUM_CELLS * POINTS_PER_CELL).reshape(NUM_CELLS, -1)[::-1].reshape(-1)
        assert np.array_equal(inputs[: order.size], first.inputs[order])
        assert np.array_equal(data.inputs([2, 0]), np.concatenate([data.inputs(2), data.inputs(0)]))
        assert np.array_equal(data.times(), [0.0, 0.5, 1.0])
        tensors = data.tensors(slice(1, 3), dtype=torch.float32)
        assert tensors[0].dtype == torch.float32 and tensors[0].shape == (2 * order.size, 2)
        with pytest.raises(IndexError, match="3 complete samples"):
            data.inputs([3])
    with pytest.raises(FileExistsError):
        synthetic_writer(path, mode="x")
    with synthetic_writer(path) as writer:  # mode "a": resumes
        assert writer.num_samples == 3
        writer.append(synthetic_sample(3))
    with ClosureDataReader(path) as data:
        assert data.num_samples == 4 and np.isnan(data.times()[3])


def test_interrupted_append_keeps_complete_samples(tmp_path):
    """Rows written beyond num_complete (a crash before the bump) are ignored, then reused."""
    path = tmp_path / "data.h5"
    with synthetic_writer(path) as writer:
        writer.append(synthetic_sample(0))
        writer.append(synthetic_sample(1))
    with h5py.File(path, "r+") as file:  # a crash after writing row 2, before the bump
        for name in ("inputs", "targets", "time"):
            file[name].resize(3, axis=0)
        file["inputs"][2] = np.nan
    with ClosureDataReader(path) as data:
        assert data.num_samples == 2
        assert data.inputs().shape[0] == 2 * NUM_CELLS * POINTS_PER_CELL
        assert np.isfinite(data.inputs()).all()
    with synthetic_writer(path) as writer:
        assert writer.num_samples == 2
        writer.append(synthetic_sample(2))
    with ClosureDataReader(path) as data:
        assert data.num_samples == 3
        assert data.inputs(2).min() == 2.0


#: (where the writer is killed, after how many calls, complete samples, rows in the file)
KILLS = [
    ("flush", 4, 1, 2),  # after the data flush of sample 2, before its num_complete bump
    ("flush", 5, 2, 2),  # after the bump of sample 2, before append() returned
    ("write", 8, 2, 3),  # between writing the inputs and the targets of sample 3
]


def test_killed_writer_keeps_complete_samples(tmp_path):
    """SIGKILL in the middle of an append: every complete sample survives, file reopens."""
    jobs = []
    for where, count, complete, rows in KILLS:
        path = tmp_path / f"killed_{where}_{count}.h5"
        command = [sys.executable, str(JOB), "kill", str(path), where, str(count)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        jobs.append((process, path, complete, rows))
    for process, path, complete, rows in jobs:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == -9, stderr.decode()[-2000:]
        printed = stdout.decode().split().count("appended")
        assert printed <= complete <= printed + 1
        with h5py.File(path, "r") as file:  # the file opens; debris rows may follow
            assert file["inputs"].shape[0] in (complete, rows)
        with ClosureDataReader(path) as data:
            assert data.num_samples == complete
            for i in range(complete):
                assert np.array_equal(data.inputs(i), _sorted_rows(synthetic_sample(i).inputs))
        with synthetic_writer(path) as writer:  # resume: debris is overwritten
            assert writer.append(synthetic_sample(complete)) == complete + 1
        with ClosureDataReader(path) as data:
            assert np.array_equal(
                data.inputs(complete), _sorted_rows(synthetic_sample(complete).inputs)
            )


def test_a_truncated_file_gives_a_clear_error(tmp_path):
    """A file cut short (an interrupted copy): reading or appending names the file and what
    to do (before: h5py's bare "Unable to synchronously open file (truncated file ...)");
    mode="w" still replaces it."""
    path = tmp_path / "cut.h5"
    with synthetic_writer(path) as writer:
        for i in range(3):
            writer.append(synthetic_sample(i))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = rf"^Cannot open {re.escape(str(path))} as HDF5 \(.*\): the file is damaged or"
    with pytest.raises(OSError, match=message):
        ClosureDataReader(path)
    with pytest.raises(OSError, match=message):
        synthetic_writer(path)
    with synthetic_writer(path, mode="w") as writer:
        assert writer.append(synthetic_sample(0)) == 1


def test_a_count_beyond_the_stored_samples_is_refused(tmp_path):
    """num_complete edited to 7 on a 3-sample file: the reader said 7 samples and returned
    3 (an audit); it now refuses the file."""
    path = tmp_path / "edited.h5"
    with synthetic_writer(path) as writer:
        for i in range(3):
            writer.append(synthetic_sample(i))
    with h5py.File(path, "r+") as file:
        file.attrs["num_complete"] = 7
    message = f"{path} is damaged: it says 7 samples are complete, but its 'inputs' holds 3."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ClosureDataReader(path)


WRITING_LOCKED = (
    "Cannot open {} for writing: another process has it open (HDF5 locks the file while a "
    "ClosureDataWriter, a ClosureDataReader or any h5py program holds it). Close it there or "
    "wait for that process to finish, or write to another file."
)


def test_a_file_held_by_a_running_writer_gives_a_clear_error(tmp_path, monkeypatch):
    """A reader, or a second writer, while a writer runs: which file, why, what to do."""
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    path = tmp_path / "data.h5"
    command = [sys.executable, str(JOB), "hold", str(path)]
    holder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        size = path.stat().st_size
        with pytest.raises(BlockingIOError) as info:
            ClosureDataReader(path)
        assert str(info.value) == (
            f"Cannot read {path}: another process holds it open for writing (HDF5 locks the "
            "file while a ClosureDataWriter writes to it). Read it once the writer has closed "
            "it (ClosureDataWriter.close() or the end of its `with` block) or its process has "
            "ended."
        )
        for mode in ("a", "w"):
            with pytest.raises(BlockingIOError) as info:
                synthetic_writer(path, mode=mode)
            assert str(info.value) == WRITING_LOCKED.format(path)
        # HDF5 truncates before it locks: mode "w" must not have reached it.
        assert path.stat().st_size == size
    finally:
        holder.communicate("go\n", timeout=120)
    assert holder.returncode == 0
    with ClosureDataReader(path) as data:  # the running writer lost nothing
        assert data.num_samples == 2
        assert np.array_equal(data.inputs(1), _sorted_rows(synthetic_sample(1).inputs))


@pytest.mark.mpi
def test_a_locked_file_raises_the_same_error_on_every_rank(tmp_path, monkeypatch):
    """Rank 0 alone opens the file; every rank raises its error, before any data moves."""
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    path = _shared_path(tmp_path, "locked.h5")
    descriptor = None
    if COMM.rank == 0:
        with h5py.File(path, "w") as file:
            file["data"] = np.arange(10.0)
        # The lock HDF5 takes for a writer (flock), held here by another open file.
        descriptor = os.open(path, os.O_RDONLY)
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        for mode in ("a", "w"):
            with pytest.raises(BlockingIOError) as info:
                ClosureDataWriter(
                    path, COMM, num_inputs=1, value_shape=(), num_points=1, points_per_cell=1,
                    mode=mode,
                )  # fmt: skip
            assert str(info.value) == WRITING_LOCKED.format(path)
    finally:
        if descriptor is not None:
            os.close(descriptor)
    if COMM.rank == 0:
        with h5py.File(path, "r") as file:  # not truncated
            assert np.array_equal(file["data"][...], np.arange(10.0))
    COMM.Barrier()


def _sorted_rows(rows):
    """Rows of the synthetic sample (cells given in reverse order) in global cell order."""
    return rows.reshape(NUM_CELLS, POINTS_PER_CELL, -1)[::-1].reshape(-1, rows.shape[1])


def test_bad_input_leaves_the_file_valid(tmp_path):
    path = tmp_path / "data.h5"
    writer = synthetic_writer(path)
    writer.append(synthetic_sample(0))
    good = synthetic_sample(1)
    bad_samples = {
        "inputs have shape": ClosureSample(
            good.inputs[:, :1], good.targets, good.cell_index, MPI.COMM_SELF
        ),
        "targets have shape": ClosureSample(
            good.inputs, good.targets[:, 0], good.cell_index, MPI.COMM_SELF
        ),
        "dtype": ClosureSample(
            good.inputs.astype(np.float32), good.targets, good.cell_index, MPI.COMM_SELF
        ),
        "points per cell": ClosureSample(
            good.inputs, good.targets, good.cell_index[:-4], MPI.COMM_SELF
        ),
        "more than once": ClosureSample(
            good.inputs, good.targets, np.zeros(NUM_CELLS, dtype=np.int64), MPI.COMM_SELF
        ),
        "ClosureSample": "not a sample",
    }
    for message, sample in bad_samples.items():
        with pytest.raises(ValueError, match=message):
            writer.append(sample)
    changed_cells = ClosureSample(good.inputs, good.targets, good.cell_index + 1, MPI.COMM_SELF)
    with pytest.raises(ValueError, match=r"cells .* differ"):
        writer.append(changed_cells)
    assert writer.num_samples == 1
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.append(good)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"time_step: file has 0\.5, given 0\.25"):
        ClosureDataWriter(
            path,
            MPI.COMM_SELF,
            num_inputs=2,
            value_shape=(2,),
            num_points=NUM_CELLS * POINTS_PER_CELL,
            points_per_cell=POINTS_PER_CELL,
            time_step=0.25,
            units={"time": "s"},
            metadata={"case": "synthetic"},
        )
    assert path.read_bytes() == before
    with ClosureDataReader(path) as data:
        assert data.num_samples == 1
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as file:
        file["x"] = 1.0
    with pytest.raises(ValueError, match="not a dolfinx_mno closure data file"):
        synthetic_writer(other)
    with pytest.raises(ValueError, match="not a dolfinx_mno closure data file"):
        ClosureDataReader(other)
    with pytest.raises(ValueError, match="reserved"):
        ClosureDataWriter(
            other,
            MPI.COMM_SELF,
            num_inputs=1,
            value_shape=(),
            num_points=1,
            points_per_cell=1,
            metadata={"num_complete": 3},
        )
    # No point at all (a sampler whose cells= select none on any rank): refused before the
    # file is made, not by h5py's "Chunk shape must not be greater than data shape" after.
    empty = tmp_path / "empty.h5"
    with pytest.raises(ValueError, match=r"num_points must be positive, got 0 \(a Closure"):
        ClosureDataWriter(
            empty, MPI.COMM_SELF, num_inputs=3, value_shape=(), num_points=0, points_per_cell=3
        )
    assert not empty.exists()


def _sampler(comm, method, marker=None):
    """The closure data of a small problem: u² with an L2 projection onto P1.

    ``marker``: sample the coarse cells it marks only (``cells=``).
    """
    coarse, fine = _meshes(3, comm)
    cells = None if marker is None else mesh.locate_entities(coarse, 2, marker)
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 2)), name="u_f")
    u_f.interpolate(_smooth)
    V_c = fem.functionspace(coarse, ("Lagrange", 1))
    u_c = fem.Function(V_c, name="u_c")
    sampler = ClosureSampler(
        METHODS[method](V_c),
        u_c,
        [u_c, ufl.grad(u_c)],
        u_c**2,
        quadrature_degree=2,
        fine_tendency=Tendency(u_f**2, fem.functionspace(fine, ("Lagrange", 4))),
        cells=cells,
    )
    return sampler, u_f, fine


@pytest.mark.mpi
def test_a_sampler_on_some_cells_gives_their_rows():
    """``cells=``: the rows of the selected cells, as the sampler of every cell gives them.

    Gathered in global cell order on 1, 2 and 3 ranks; the target is zero elsewhere.
    """
    everywhere, u_f, _ = _sampler(COMM, "l2_projection")
    some, u_f_again, _ = _sampler(
        COMM, "l2_projection", marker=lambda x: x[0] + x[1] <= 1.0 + 1e-12
    )
    full, part = everywhere.sample(u_f).gather(root=0), some.sample(u_f_again).gather(root=0)
    owned = some.target.function_space.mesh.topology.index_map(2).size_local
    outside = np.ones(owned, dtype=bool)
    outside[some._cells] = False
    assert not some.target.x.array.reshape(-1, 3)[:owned][outside].any()
    assert some.num_points < everywhere.num_points
    assert "sampled_cells" not in everywhere.metadata()  # unchanged for every cell
    assert some.metadata()["sampled_cells"] == some.num_points // 3
    assert some.metadata()["coarse_cells"] == everywhere.num_points // 3 == 18
    if COMM.rank == 0:
        assert full is not None and part is not None
        selected = np.isin(full[2], part[2])
        assert selected.sum() == part[2].size == some.num_points // 3  # 3 points a cell
        rows = np.repeat(selected, 3)
        for whole, restricted in zip(full[:2], part[:2], strict=True):
            assert restricted.shape[0] == some.num_points
            np.testing.assert_array_equal(restricted, whole[rows])


@pytest.mark.mpi
@pytest.mark.parametrize("method", list(METHODS))
def test_parallel_file_equals_serial_reference(tmp_path, method):
    """Gathered in global cell order, the file holds the serial run's arrays."""
    path = _shared_path(tmp_path, f"{method}.h5")
    sampler, u_f, fine = _sampler(COMM, method)
    with ClosureDataWriter.from_sampler(
        path, sampler, fine_mesh=fine, time_step=0.1, units={"u": "m"}
    ) as writer:
        for step in range(2):
            u_f.x.array[:] *= 1.5
            writer.append(sampler.sample(u_f), time=0.1 * step)
    if COMM.rank == 0:
        serial, u_serial, _ = _sampler(MPI.COMM_SELF, method)
        references = []
        for _ in range(2):
            u_serial.x.array[:] *= 1.5
            references.append(serial.sample(u_serial).gather(root=0))
        with ClosureDataReader(path) as data:
            assert data.num_samples == 2
            assert data.metadata["coarse_mesh"]["num_cells"] == 18
            assert data.metadata["input_names"] == ["u_c", "grad(u_c)[0]", "grad(u_c)[1]"]
            assert data.metadata["restriction"] == method
            assert np.array_equal(data.cell_index, np.arange(18))
            assert np.array_equal(data.coordinates, references[0][3])
            for i, (inputs, targets, cells, _) in enumerate(references):
                assert np.array_equal(cells, np.arange(18))
                scale = np.abs(inputs).max()
                assert np.abs(data.inputs(i) - inputs).max() <= 1e2 * EPS * scale
                assert np.abs(data.targets(i) - targets).max() <= 1e2 * EPS * scale**2
                assert np.abs(targets).max() > 1e-3
    COMM.Barrier()


def _linear_samples(coarse, comm):
    """A sampler on ``coarse`` and its two samples of u = a x + 2y (a = 1, 2), t_f = 3u.

    The interpolation of these linear fields is exact, so inputs ``(u, ∂x u, ∂y u)`` and
    targets ``3u − u²`` are known at every point.
    """
    fine = mesh.create_unit_square(comm, 3, 3)
    V_f = fem.functionspace(fine, ("Lagrange", 1))
    u_f, t_f = fem.Function(V_f), fem.Function(V_f)
    V_c = fem.functionspace(coarse, ("Lagrange", 1))
    u_c = fem.Function(V_c, name="u")
    sampler = ClosureSampler(Interpolation(V_c), u_c, [u_c, ufl.grad(u_c)], u_c**2, 2)
    samples = []
    for a in (1.0, 2.0):
        u_f.interpolate(lambda x, a=a: a * x[0] + 2 * x[1])
        t_f.x.array[:] = 3 * u_f.x.array
        samples.append(sampler.sample(u_f, t_f))
    return sampler, samples


@pytest.mark.mpi
def test_sampler_and_writer_on_a_rank_without_cells(tiny_square, tmp_path):
    """Where (on 3 ranks) a rank owns no cells: exact samples and the serial file."""
    sampler, samples = _linear_samples(tiny_square, COMM)
    num_points = 2 * sampler.points_per_cell
    assert COMM.allreduce(samples[0].num_local_points) == num_points == sampler.num_points
    path = _shared_path(tmp_path, "empty_rank.h5")
    with ClosureDataWriter.from_sampler(path, sampler, mode="x") as writer:
        for k, (a, sample) in enumerate(zip((1.0, 2.0), samples, strict=True)):
            x, y = sample.coordinates.T
            u = a * x + 2 * y
            expected = np.column_stack([u, np.full_like(u, a), np.full_like(u, 2.0)])
            assert sample.inputs.shape == (sample.num_local_points, 3)
            assert _max_abs(sample.inputs - expected) <= 10 * EPS
            assert _max_abs(sample.targets - (3 * u - u**2)) <= 100 * EPS
            assert writer.append(sample, time=0.5 * k) == k + 1
    if COMM.rank == 0:
        # The file equals that of one process (same rows, same order), to round-off.
        _, reference = _linear_samples(mesh.create_unit_square(MPI.COMM_SELF, 1, 1), MPI.COMM_SELF)
        with ClosureDataReader(path) as data:
            assert data.num_samples == 2
            assert np.array_equal(data.cell_index, [0, 1])
            assert np.array_equal(data.times(), [0.0, 0.5])
            for k, sample in enumerate(reference):
                inputs, targets, cells, coordinates = sample.gather()
                assert np.array_equal(cells, data.cell_index)
                assert data.inputs(k).shape == (num_points, 3)
                assert np.abs(data.coordinates - coordinates).max() <= 4 * EPS
                assert np.abs(data.inputs(k) - inputs).max() <= 10 * EPS
                assert np.abs(data.targets(k) - targets).max() <= 100 * EPS
    COMM.Barrier()


@pytest.mark.mpi
def test_append_errors_raise_the_same_text_on_every_rank(tiny_square, tmp_path):
    """Checks on some ranks, the total, the root's gather and write: one text everywhere."""
    sampler, (good, _) = _linear_samples(tiny_square, COMM)
    path = _shared_path(tmp_path, "errors.h5")
    last = COMM.size - 1
    ranks = "rank" if COMM.size == 1 else "ranks"
    # The first rank that owns cells (on 3 ranks the last one owns none).
    holder = next(r for r, n in enumerate(COMM.allgather(good.num_local_points)) if n > 0)
    points = sampler.points_per_cell

    def replaced(**changes):
        fields = {"inputs": good.inputs, "targets": good.targets}
        fields |= {"cell_index": good.cell_index, "coordinates": good.coordinates}
        return ClosureSample(comm=COMM, **(fields | changes))

    def refused(writer, sample, text):
        with pytest.raises(ValueError) as info:
            writer.append(sample)
        assert str(info.value) == text
        assert COMM.allgather(str(info.value)) == [text] * COMM.size

    with ClosureDataWriter.from_sampler(path, sampler, mode="x") as writer:
        float32 = replaced(inputs=good.inputs.astype(np.float32))
        refused(
            writer,
            float32 if COMM.rank == last else good,
            f"Appending to {path} failed on rank(s) [{last}] (1 of {COMM.size} {ranks}); on "
            f"rank {last}: inputs have dtype float32, expected float64. Nothing was written.",
        )
        # Consistent on each rank, but one cell short in total.
        short = replaced(
            inputs=good.inputs[points:],
            targets=good.targets[points:],
            cell_index=good.cell_index[1:],
            coordinates=good.coordinates[points:],
        )
        refused(
            writer,
            short if COMM.rank == holder else good,
            f"Cannot append to {path}: the sample has {sampler.num_points - points} points "
            f"over all ranks, the file {sampler.num_points}. Nothing was written.",
        )
        # The root finds a cell given twice (while gathering) ...
        refused(
            writer,
            replaced(cell_index=np.zeros_like(good.cell_index)),
            "Cannot gather the sample: global cell index 0 occurs more than once (1 "
            "duplicates); give each owned cell once, no ghosts.",
        )
        assert writer.append(good) == 1
        # ... and cells that differ from the file's (while writing).
        refused(
            writer,
            replaced(cell_index=good.cell_index + 2),
            f"Cannot append to {path}: ValueError: the sample's cells (global cell indices) "
            "differ from those of the samples in the file (was the coarse mesh changed?). "
            "The 1 samples written before are intact.",
        )
        assert writer.append(good) == 2  # the ranks are in step
    refused(
        writer,
        good,
        f"Appending to {path} failed on rank(s) [{', '.join(map(str, range(COMM.size)))}] "
        f"({COMM.size} of {COMM.size} {ranks}); on rank 0: the writer is closed. Nothing was "
        "written.",
    )
    if COMM.rank == 0:
        with ClosureDataReader(path) as data:
            assert data.num_samples == 2
    COMM.Barrier()


@pytest.mark.skipif(not MPIRUN.exists(), reason="needs mpirun next to the Python executable")
def test_same_file_on_1_2_3_ranks(tmp_path):
    """The same run on 1, 2 and 3 ranks writes the same arrays (to round-off)."""
    import data_job

    (tmp_path / "1").mkdir()
    data_job.sample(str(tmp_path / "1"))  # this process: one rank
    for ranks in (2, 3):
        directory = tmp_path / str(ranks)
        directory.mkdir()
        result = subprocess.run(
            [str(MPIRUN), "-n", str(ranks), sys.executable, str(JOB), "sample", str(directory)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
    for method in data_job.FILES:
        files = [ClosureDataReader(tmp_path / str(n) / f"{method}.h5") for n in (1, 2, 3)]
        reference = files[0]
        assert reference.num_samples == 3
        # Targets are differences of tendencies of size max|u|²: round-off is relative to that.
        scales = {"inputs": np.abs(reference.inputs()).max()}
        scales["targets"] = np.abs(reference.inputs()[:, 0]).max() ** 2
        assert np.abs(reference.targets()).max() > 1e-2
        for data in files[1:]:
            for key, value in reference.metadata.items():
                if key != "created":
                    assert json.dumps(data.metadata[key]) == json.dumps(value), key
            assert np.array_equal(data.cell_index, reference.cell_index)
            assert np.array_equal(data.coordinates, reference.coordinates)
            assert np.array_equal(data.times(), reference.times())
            for name, scale in scales.items():
                a, b = getattr(data, name)(), getattr(reference, name)()
                assert a.shape == b.shape
                assert np.abs(a - b).max() <= 1e2 * EPS * scale, (method, name)
        for data in files:
            data.close()


@pytest.mark.mpi
def test_meshes_are_partitioned_independently():
    """Under MPI, coarse points are evaluated on other ranks' fine cells: data moves."""
    coarse, fine = _meshes(4)
    V_c = fem.functionspace(coarse, ("Lagrange", 1))
    cells = np.arange(coarse.topology.index_map(2).size_local, dtype=np.int32)
    data = fem.create_interpolation_data(V_c, fem.functionspace(fine, ("Lagrange", 1)), cells)
    remote = np.count_nonzero(np.asarray(data.src_owner) != COMM.rank)
    assert (COMM.allreduce(remote) > 0) == (COMM.size > 1)


def test_float32(tmp_path):
    """Interpolation and sampling work in float32; the PETSc projection says it cannot."""
    coarse = mesh.create_unit_square(MPI.COMM_SELF, 3, 3, dtype=np.float32)
    fine = mesh.create_unit_square(
        MPI.COMM_SELF, 7, 7, mesh.CellType.quadrilateral, dtype=np.float32
    )
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 1)), dtype=np.float32)
    u_f.interpolate(lambda x: 1 + x[0] - 2 * x[1])
    V_c = fem.functionspace(coarse, ("Lagrange", 1))
    u_c = fem.Function(V_c, dtype=np.float32)
    with pytest.raises(TypeError, match="Use Interpolation instead"):
        L2Projection(V_c)
    sampler = ClosureSampler(
        Interpolation(V_c), u_c, [u_c], -u_c, fine_tendency=Tendency(-u_f, u_f.function_space)
    )
    sample = sampler.sample(u_f)
    assert sample.inputs.dtype == np.float32
    assert np.abs(sample.targets).max() <= 10 * np.finfo(np.float32).eps
    with ClosureDataWriter.from_sampler(tmp_path / "f32.h5", sampler) as writer:
        writer.append(sample)
    with ClosureDataReader(tmp_path / "f32.h5") as data:
        assert data.inputs().dtype == np.float32
        assert data.tensors()[0].dtype == torch.float32


def _advection_sampler(comm):
    """A sampler whose weak tendencies contain free indices and a facet integral."""
    coarse, fine = _meshes(2, comm)
    a = ufl.as_vector([1.0, 0.5])

    def weak(u):
        v = ufl.TestFunction(u.function_space)
        n = ufl.FacetNormal(u.function_space.mesh)
        flux = 0.5 * u**2 * a
        return ufl.inner(flux, ufl.grad(v)) * ufl.dx - ufl.dot(flux, n) * v * ufl.ds

    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 1)), name="u_f")
    u_c = fem.Function(fem.functionspace(coarse, ("Lagrange", 1)), name="u_c")
    sampler = ClosureSampler(
        L2Projection(u_c.function_space),
        u_c,
        [u_c, ufl.as_vector([u_c, 2 * u_c])],
        Tendency(weak(u_c)),
        fine_tendency=Tendency(weak(u_f)),
    )
    return sampler, fine


def test_metadata_is_the_same_in_every_session(tmp_path):
    """Rebuilding the same sampler gives the same metadata, so a file can be resumed."""
    first, fine = _advection_sampler(MPI.COMM_SELF)
    second, _ = _advection_sampler(MPI.COMM_SELF)  # new meshes, new UFL index numbers
    assert first.metadata(fine) == second.metadata(fine)
    assert "i_0" in first.metadata()["coarse_tendency"]
    assert first.input_names == ["u_c", "[u_c, 2 * u_c][0]", "[u_c, 2 * u_c][1]"]
    ClosureDataWriter.from_sampler(tmp_path / "a.h5", first, fine_mesh=fine).close()
    with ClosureDataWriter.from_sampler(tmp_path / "a.h5", second, fine_mesh=fine) as writer:
        assert writer.num_samples == 0


@pytest.mark.mpi
def test_single_vector_operand():
    """Operands [grad(u)]: UFL folds as_vector([g[0], g[1]]) back to g; inputs still match."""
    coarse, fine = _meshes(3)
    u_f = fem.Function(fem.functionspace(fine, ("Lagrange", 2)))
    u_f.interpolate(_smooth)
    V_c = fem.functionspace(coarse, ("Lagrange", 1))
    u_c = fem.Function(V_c)
    sampler = ClosureSampler(
        METHODS["interpolation"](V_c),
        u_c,
        [ufl.grad(u_c)],
        u_c,
        quadrature_degree=2,
        fine_tendency=Tendency(u_f, fem.functionspace(fine, ("Lagrange", 2))),
    )
    sample = sampler.sample(u_f)
    closure = mno.Closure(_Identity(), [ufl.grad(u_c)], (2,), quadrature_degree=2, device="cpu")
    closure.update()
    num_cells = coarse.topology.index_map(2).size_local
    dofs = closure.function_space.dofmap.list[:num_cells].reshape(-1)
    values = closure.x.array.reshape(-1, 2)[dofs]
    assert sample.inputs.shape == values.shape
    assert _max_abs(values) > 0
    assert _max_abs(sample.inputs - values) <= 10 * EPS * _max_abs(values)


@pytest.mark.mpi
def test_a_submesh_coarse_mesh_is_sampled():
    """A submesh has no original cell indices (DOLFINx 0.11); samples are recorded by the
    cells' midpoints, so a submesh works (it was refused before the twentieth session)."""
    square = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    cells = mesh.locate_entities(square, 2, lambda x: x[0] <= 0.5 + 1e-12)
    coarse = mesh.create_submesh(square, 2, cells)[0]
    V_c = fem.functionspace(coarse, ("Lagrange", 1))
    u_c = fem.Function(V_c)
    x = ufl.SpatialCoordinate(coarse)
    u_f = fem.Function(V_c)
    u_f.interpolate(lambda x: 1 + x[0] + 2 * x[1])
    tendency = Tendency(-3.0 * u_f, V_c)
    sampler = ClosureSampler(
        Interpolation(V_c), u_c, [u_c, x[0], x[1]], -3.0 * u_c, 2, fine_tendency=tendency
    )
    sample = sampler.sample(u_f)
    # The commutator of a linear tendency with the identity filter: zero.
    assert _max_abs(sample.targets) <= 1e-12
    # Every cell once (16 of the 32), each sample exact: u at its own point.
    indices = np.concatenate(MPI.COMM_WORLD.allgather(sample.cell_index))
    assert np.array_equal(np.sort(indices), np.arange(16))
    u, px, py = sample.inputs.T
    assert _max_abs(u - (1 + px + 2 * py)) <= 1e-14
