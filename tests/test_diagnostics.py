"""Turbulence diagnostics: correlation, decorrelation time, box spectra (analytic values)."""

import math

from mpi4py import MPI

import numpy as np
import pytest
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno.diagnostics import Correlation

# -- correlation ---------------------------------------------------------------------------


def _box(comm=MPI.COMM_WORLD, lengths=(1.0, 1.0), cells=(8, 8)):
    return mesh.create_rectangle(comm, [[0.0, 0.0], list(lengths)], list(cells))


def _modes(msh, lengths=(1.0, 1.0)):
    """φ_kl = sin(kπx/Lx) sin(lπy/Ly) as UFL expressions, and an accurate measure."""
    x = ufl.SpatialCoordinate(msh)

    def phi(k, l):  # noqa: E741
        return ufl.sin(k * ufl.pi * x[0] / lengths[0]) * ufl.sin(l * ufl.pi * x[1] / lengths[1])

    return phi, ufl.Measure("dx", domain=msh, metadata={"quadrature_degree": 12})


def test_correlation_of_sine_modes():
    msh = _box(lengths=(2.0, 1.0), cells=(8, 4))
    phi, dx = _modes(msh, (2.0, 1.0))
    tol = 1e-9  # quadrature of degree 12 on 8 × 4 cells
    for centered in (True, False):
        assert mno.correlation(phi(2, 3), phi(2, 3), dx=dx, centered=centered) == pytest.approx(
            1.0, abs=1e-14
        )
        assert mno.correlation(phi(1, 1), -phi(1, 1), dx=dx, centered=centered) == pytest.approx(
            -1.0, abs=1e-14
        )
        assert abs(mno.correlation(phi(1, 1), phi(2, 1), dx=dx, centered=centered)) < tol
    # ∫φ_kl² = LxLy/4 for every mode; φ_21 and φ_12 have mean 0, so centring changes nothing.
    mixture = phi(1, 2) + 2.0 * phi(2, 1)
    expected = 1.0 / math.sqrt(5.0)
    assert mno.correlation(phi(1, 2), mixture, dx=dx) == pytest.approx(expected, abs=tol)
    assert mno.correlation(phi(1, 2), mixture, dx=dx, centered=False) == pytest.approx(
        expected, abs=tol
    )


def test_centering_against_analytic_means():
    """φ_11 and φ_31 are orthogonal, but their means are not zero: centred, they correlate."""
    msh = _box(cells=(6, 6))
    phi, dx = _modes(msh)
    mean_11 = (2 / math.pi) ** 2  # ∫ sin(πx) dx = 2/π on the unit square, area 1
    mean_31 = (2 / (3 * math.pi)) * (2 / math.pi)
    covariance = 0.0 - mean_11 * mean_31
    expected = covariance / math.sqrt((0.25 - mean_11**2) * (0.25 - mean_31**2))
    assert expected < -0.3  # far from 0: the test can fail
    assert mno.correlation(phi(1, 1), phi(3, 1), dx=dx) == pytest.approx(expected, abs=1e-9)
    assert abs(mno.correlation(phi(1, 1), phi(3, 1), dx=dx, centered=False)) < 1e-9
    # A shift: centred, perfectly correlated; uncentred, analytic.
    shift = 0.7
    assert mno.correlation(phi(1, 1), phi(1, 1) + shift, dx=dx) == pytest.approx(1.0, abs=1e-12)
    uncentered = (0.25 + shift * mean_11) / math.sqrt(
        0.25 * (0.25 + 2 * shift * mean_11 + shift**2)
    )
    assert mno.correlation(phi(1, 1), phi(1, 1) + shift, dx=dx, centered=False) == pytest.approx(
        uncentered, abs=1e-9
    )
    # Uncentred, a constant is a field like any other: ∫φ_11 / sqrt(|Ω| ∫φ_11²) = 8/π².
    x = ufl.SpatialCoordinate(msh)
    constant = 3.0 + 0.0 * x[0]
    assert mno.correlation(constant, phi(1, 1), dx=dx, centered=False) == pytest.approx(
        8 / math.pi**2, abs=1e-9
    )


def test_correlation_of_functions_matches_pure_ufl():
    """P2 functions, default measure: the formula assembled by hand, and reuse of the forms."""
    msh = _box(cells=(5, 4))
    space = fem.functionspace(msh, ("Lagrange", 2))
    a, b = fem.Function(space), fem.Function(space)
    a.interpolate(lambda x: np.sin(np.pi * x[0]) * np.sin(2 * np.pi * x[1]) + x[0])
    b.interpolate(lambda x: x[0] * x[1] ** 2 - 0.3 * x[1])
    comm = msh.comm

    def integral(expression):
        return comm.allreduce(fem.assemble_scalar(fem.form(expression * ufl.dx)))

    area = integral(fem.Constant(msh, 1.0))
    mean_a, mean_b = integral(a) / area, integral(b) / area
    expected = integral((a - mean_a) * (b - mean_b)) / math.sqrt(
        integral((a - mean_a) ** 2) * integral((b - mean_b) ** 2)
    )
    rho = Correlation(a, b)
    assert rho() == pytest.approx(expected, abs=1e-13)
    assert rho.area == pytest.approx(1.0, abs=1e-14)
    # New values, same forms.
    b.x.array[:] = a.x.array
    assert rho() == pytest.approx(1.0, abs=1e-14)
    b.x.array[:] = -2.0 * a.x.array + 5.0
    assert rho() == pytest.approx(-1.0, abs=1e-13)


def test_correlation_float32():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4, dtype=np.float32)
    space = fem.functionspace(msh, ("Lagrange", 1))
    a, b = fem.Function(space, dtype=np.float32), fem.Function(space, dtype=np.float32)
    a.interpolate(lambda x: x[0])
    b.interpolate(lambda x: x[0] + x[1])
    # ∫(x-½)(x+y-1) = 1/12 and ∫(x+y-1)² = 1/6, on the unit square.
    expected = (1 / 12) / math.sqrt((1 / 12) * (1 / 6))
    assert mno.correlation(a, b) == pytest.approx(expected, abs=1e-5)


def test_correlation_errors():
    msh = _box(cells=(2, 2))
    other = _box(cells=(3, 3))
    phi, _ = _modes(msh)
    x = ufl.SpatialCoordinate(msh)
    with pytest.raises(ValueError, match=r"but a has shape \(2,\); pass one component"):
        mno.correlation(x, phi(1, 1))
    with pytest.raises(ValueError, match="they live on 2 meshes"):
        mno.correlation(phi(1, 1), ufl.SpatialCoordinate(other)[0])
    with pytest.raises(ValueError, match="they live on 2 meshes"):
        mno.correlation(phi(1, 1), phi(1, 1), dx=ufl.Measure("dx", domain=other))
    with pytest.raises(TypeError, match=r"dx must be a ufl\.Measure"):
        mno.correlation(phi(1, 1), phi(1, 1), dx="dx")
    cells = mesh.meshtags(msh, 2, np.array([], dtype=np.int32), np.array([], dtype=np.int32))
    nowhere = ufl.Measure("dx", domain=msh, subdomain_data=cells, subdomain_id=1)
    with pytest.raises(ValueError, match=r"covers no part of the mesh \(its area is 0\.0\)"):
        mno.correlation(phi(1, 1), x[0], dx=nowhere)
    zero = 0.0 * x[0]
    constant = 2.0 + 0.0 * x[0]
    message = (
        "Field b of the correlation is constant (zero after removing its mean): the "
        "correlation is 0/0. Correlate fields that vary, or pass centered=False to keep "
        "the mean."
    )
    with pytest.raises(ValueError) as error:
        mno.correlation(phi(1, 1), constant)
    assert str(error.value) == message
    with pytest.raises(ValueError, match="Field a of the correlation is zero: the correlation"):
        mno.correlation(zero, phi(1, 1), centered=False)


@pytest.mark.mpi
@pytest.mark.parametrize("scale", [1e80, 1e-85])
@pytest.mark.parametrize("centered", [True, False])
def test_correlation_of_huge_and_tiny_fields(scale, centered):
    """The product of the two integrals (~scale⁴) would overflow or underflow; the roots do not."""
    msh = _box(cells=(8, 8))
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: scale * (np.sin(3 * x[0]) + x[1]))
    assert mno.correlation(u, u, centered=centered) == pytest.approx(1.0, abs=1e-12)
    assert mno.correlation(u, -u, centered=centered) == pytest.approx(-1.0, abs=1e-12)


@pytest.mark.mpi
@pytest.mark.parametrize("centered", [True, False])
def test_correlation_is_rank_invariant(tiny_square, centered):
    """Two cells: on 3 ranks one rank owns none. The value of one process, on every rank."""
    comm = tiny_square.comm
    serial = mesh.create_unit_square(MPI.COMM_SELF, 1, 1)
    values = []
    for msh in (tiny_square, serial):
        space = fem.functionspace(msh, ("Lagrange", 2))
        u = fem.Function(space)
        u.interpolate(lambda x: x[0] ** 2 - x[0] * x[1] + 0.5 * x[1])
        x = ufl.SpatialCoordinate(msh)
        values.append(mno.correlation(u, ufl.sin(3 * x[0]) * x[1], centered=centered))
    parallel, reference = values
    assert parallel == pytest.approx(reference, abs=1e-14)
    assert abs(reference) > 0.1
    everyone = comm.allgather(parallel)
    assert all(value == everyone[0] for value in everyone)  # bitwise the same


@pytest.mark.mpi
def test_correlation_errors_agree_on_all_ranks(tiny_square):
    x = ufl.SpatialCoordinate(tiny_square)
    with pytest.raises(ValueError) as error:
        mno.correlation(x[0], 0.0 * x[1], centered=False)
    texts = tiny_square.comm.allgather(str(error.value))
    assert (
        texts
        == [
            "Field b of the correlation is zero: the correlation is 0/0. Correlate fields "
            "that vary."
        ]
        * tiny_square.comm.size
    )


@pytest.mark.mpi
@pytest.mark.parametrize("centered", [False, True])
def test_a_field_zero_on_the_measure_up_to_rounding_is_refused(tiny_square, centered):
    """sin(πx) sin(πy) on the boundary is ~1e-16: the correlation was noise that changed with
    the number of ranks (0.654, 0.643, 0.736 on 1, 2, 3 ranks for P2 on 8 × 8 cells)."""
    comm = tiny_square.comm
    x = ufl.SpatialCoordinate(tiny_square)
    u = fem.Function(fem.functionspace(tiny_square, ("Lagrange", 2)))
    u.interpolate(lambda x: np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]))
    boundary = comm.allreduce(np.max(np.abs(u.x.array[u.x.array < 0.5]), initial=0), MPI.MAX)
    assert 0 < boundary < 1e-15  # rounding: not exactly 0 (sin(π) = 1.2e-16)
    expression = ufl.sin(ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1])
    other = 1.0 + x[0] + x[1] ** 2
    what = "constant (zero after removing its mean)" if centered else "zero"
    deviation = "deviation from its mean" if centered else "root mean square"
    message = (
        f"Field a of the correlation is {what} on the measure of the correlation, to rounding "
        f"(its {deviation} there is at most 16 eps times its root mean square over the "
        "mesh's cells): the correlation is 0/0. Correlate fields that vary"
        + (", or pass centered=False to keep the mean." if centered else ".")
    )
    for field in (u, expression):
        with pytest.raises(ValueError) as error:
            mno.correlation(field, other, dx=ufl.ds, centered=centered)
        assert comm.allgather(str(error.value)) == [message] * comm.size
    # A small but real spread on the boundary is a field: x/1e12 dominates the rounding.
    expected = mno.correlation(x[0], other, dx=ufl.ds, centered=centered)
    assert abs(expected) > 0.1
    assert mno.correlation(
        expression + 1e-12 * x[0], other, dx=ufl.ds, centered=centered
    ) == pytest.approx(expected, abs=1e-3)


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("dtype", "cells", "element", "value"),
    [
        (np.float64, (8, 5), ("Lagrange", 2), 3.0),
        (np.float32, (64, 64), ("DG", 0), -1e5),
    ],
)
def test_a_constant_function_is_constant_on_any_mesh(dtype, cells, element, value):
    """The means were summed in the forms' scalar type, their rounding (here 21 eps and 320
    eps of the value) taken for a fluctuation: the correlation was -0.0016 (or -0.0002)."""
    msh = mesh.create_rectangle(MPI.COMM_WORLD, [[0.0, 0.0], [2.0, 1.0]], list(cells), dtype=dtype)
    space = fem.functionspace(msh, element)
    constant, varying = fem.Function(space, dtype=dtype), fem.Function(space, dtype=dtype)
    constant.x.array[:] = value
    varying.interpolate(lambda x: x[0] + x[1] ** 2)
    with pytest.raises(ValueError, match="Field b of the correlation is constant"):
        mno.correlation(varying, constant)
    # Uncentred it is a field like any other: ∫c(x + y²) / sqrt(∫c² ∫(x + y²)²).
    second_moment = 8.0 / 3.0 + 4.0 / 3.0 + 2.0 / 5.0  # ∫(x + y²)² on [0, 2] × [0, 1]
    expected = math.copysign(1.0, value) * (2.0 + 2.0 / 3.0) / math.sqrt(2.0 * second_moment)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    interpolation = 1e-4 if element[1] == 0 else 1e-12  # DG0 interpolates x + y² at midpoints
    assert mno.correlation(constant, varying, centered=False) == pytest.approx(
        expected, abs=tol + interpolation
    )


# -- decorrelation time ----------------------------------------------------------------------


def test_decorrelation_time_interpolates_the_crossing():
    times = [0.0, 1.0, 2.0, 3.0]
    assert mno.decorrelation_time(times, [1.0, 1.0, 0.75, 0.25], threshold=0.5) == 2.5
    # 0.95 crossed between 0.98 (t = 1) and 0.9 (t = 2): 1 + 0.03 / 0.08.
    assert mno.decorrelation_time(times, [1.0, 0.98, 0.9, 0.5]) == pytest.approx(1.375, abs=1e-14)
    # Falling *below*: a sample at the threshold is not below, and the crossing is there.
    assert mno.decorrelation_time(times, [1.0, 0.5, 0.4, 0.3], threshold=0.5) == 1.0
    # Only the first crossing counts.
    assert mno.decorrelation_time(times, [1.0, 0.0, 1.0, 0.0], threshold=0.5) == 0.5
    assert mno.decorrelation_time(np.array(times), np.ones(4), threshold=1.0) == math.inf
    assert mno.decorrelation_time(times, [0.99, 0.97, 0.96, 0.951]) == math.inf
    assert mno.decorrelation_time([2.0, 3.0], [0.1, 0.0]) == 2.0  # below from the start
    assert mno.decorrelation_time(times, [1.0, 0.99, math.nan, 0.1]) == 2.0  # a blow-up


@pytest.mark.parametrize(
    ("times", "correlations", "threshold", "match"),
    [
        ([0.0, 1.0], [1.0], 0.95, "must have the same length, got 2 and 1"),
        ([], [], 0.95, "are empty"),
        ([[0.0, 1.0]], [[1.0, 1.0]], 0.95, r"must be 1-D, got shapes \(1, 2\)"),
        ([0.0, 1.0, 1.0], [1.0, 1.0, 0.0], 0.95, "strictly increasing"),
        ([0.0, 2.0, 1.0], [1.0, 1.0, 0.0], 0.95, "strictly increasing"),
        ([0.0, math.nan], [1.0, 1.0], 0.95, "finite"),
        ([0.0, 1.0], [1.0, 0.0], 0.0, r"threshold must be in \(0, 1\], got 0.0"),
        ([0.0, 1.0], [1.0, 0.0], 1.5, r"threshold must be in \(0, 1\], got 1.5"),
        ([0.0, 1.0], [1.0, 0.0], math.nan, r"threshold must be in \(0, 1\]"),
        ([0.0, 1.0], [1.0, 0.0], True, r"threshold must be in \(0, 1\], got True"),
    ],
)
def test_decorrelation_time_errors(times, correlations, threshold, match):
    with pytest.raises(ValueError, match=match):
        mno.decorrelation_time(times, correlations, threshold)


# -- box spectra ------------------------------------------------------------------------------


def _grid(lengths, intervals):
    """Grid coordinates ``x (1, nx + 1)`` and ``y (ny + 1, 1)``: ``f(x, y)`` is ``[j, i]``."""
    x = np.linspace(0.0, lengths[0], intervals[0] + 1)[None, :]
    y = np.linspace(0.0, lengths[1], intervals[1] + 1)[:, None]
    return x, y


def _mode(x, y, lengths, k, l):  # noqa: E741
    return np.sin(k * np.pi * x / lengths[0]) * np.sin(l * np.pi * y / lengths[1])


def test_single_mode_lands_in_its_shell():
    lengths = (2.0, 1.0)
    x, y = _grid(lengths, (16, 8))
    amplitude = -1.7
    # |κ| = π sqrt((3/2)² + 2²) = 2.5π = 5Δ with Δ = π/2: shell 5.
    spectra = mno.box_spectra(amplitude * _mode(x, y, lengths, 3, 2), lengths)
    width = math.pi / 2
    np.testing.assert_allclose(spectra.k, width * np.arange(1, len(spectra.k) + 1), rtol=1e-15)
    # Shells up to round(max |κ| / Δ), |κ|max = π sqrt((15/2)² + 7²).
    assert len(spectra.k) == round(math.hypot(7.5, 7.0) * 2)
    enstrophy = 0.5 * amplitude**2 * lengths[0] * lengths[1] / 4
    expected_enstrophy = np.zeros(len(spectra.k))
    expected_enstrophy[4] = enstrophy
    expected_energy = expected_enstrophy / (2.5 * math.pi) ** 2
    np.testing.assert_allclose(spectra.enstrophy, expected_enstrophy, rtol=1e-13, atol=1e-28)
    np.testing.assert_allclose(spectra.energy, expected_energy, rtol=1e-13, atol=1e-28)
    # The transposed mode (k = 2, l = 3): |κ| = π sqrt(10), shell round(2 sqrt(10)) = 6.
    transposed = mno.box_spectra(amplitude * _mode(x, y, lengths, 2, 3), lengths)
    assert int(np.argmax(transposed.enstrophy)) == 5
    assert transposed.enstrophy[5] == pytest.approx(enstrophy, rel=1e-13)
    assert transposed.energy[5] == pytest.approx(enstrophy / (10 * math.pi**2), rel=1e-13)


def test_two_modes():
    lengths = (1.0, 1.0)
    x, y = _grid(lengths, (12, 12))
    omega = 2.0 * _mode(x, y, lengths, 1, 1) + 0.5 * _mode(x, y, lengths, 4, 1)
    spectra = mno.box_spectra(omega, lengths)
    # |κ|/Δ = sqrt(2) → shell 1; sqrt(17) → shell 4.
    expected = np.zeros(len(spectra.k))
    expected[0], expected[3] = 0.5 * 4.0 / 4, 0.5 * 0.25 / 4
    np.testing.assert_allclose(spectra.enstrophy, expected, rtol=1e-13, atol=1e-28)
    energy = np.zeros(len(spectra.k))
    energy[0], energy[3] = expected[0] / (2 * math.pi**2), expected[3] / (17 * math.pi**2)
    np.testing.assert_allclose(spectra.energy, energy, rtol=1e-13, atol=1e-28)


def test_parseval_on_a_smooth_field():
    """ω = x(Lx - x) y(Ly - y): Σ enstrophy = ½ Δx Δy Σ ω² exactly, and ≈ ½∫ω² (O(h⁴))."""
    lengths = (2.0, 1.0)
    x, y = _grid(lengths, (128, 64))
    omega = x * (lengths[0] - x) * y * (lengths[1] - y)
    spectra = mno.box_spectra(omega, lengths)
    cell = (lengths[0] / 128) * (lengths[1] / 64)
    assert spectra.enstrophy.sum() == pytest.approx(0.5 * cell * np.sum(omega**2), rel=1e-13)
    exact = 0.5 * lengths[0] ** 5 / 30 * lengths[1] ** 5 / 30  # ∫₀ᴸ x²(L-x)² = L⁵/30
    assert spectra.enstrophy.sum() == pytest.approx(exact, rel=1e-6)


def test_energy_equals_half_the_velocity_squared():
    """ψ = s(x)³ t(y)³, ω = -Δψ: Σ energy = ½∫|∇ψ|², by Gauss quadrature (Lx ≠ Ly)."""
    lengths = (2.0, 1.0)
    alpha, beta = math.pi / lengths[0], math.pi / lengths[1]

    def cube(z, c):  # f = sin³(cz) and its first two derivatives
        s, co = np.sin(c * z), np.cos(c * z)
        return s**3, 3 * c * s**2 * co, 3 * c**2 * s * (2 * co**2 - s**2)

    x, y = _grid(lengths, (32, 16))
    (sx, _, sxx), (ty, _, tyy) = cube(x, alpha), cube(y, beta)
    omega = -(sxx * ty + sx * tyy)
    spectra = mno.box_spectra(omega, lengths)
    nodes, weights = np.polynomial.legendre.leggauss(40)
    qx, wx = (nodes + 1) * lengths[0] / 2, weights * lengths[0] / 2
    qy, wy = (nodes + 1) * lengths[1] / 2, weights * lengths[1] / 2
    (sx, sx1, _), (ty, ty1, _) = cube(qx[None, :], alpha), cube(qy[:, None], beta)
    gradient_squared = (sx1 * ty) ** 2 + (sx * ty1) ** 2
    energy = 0.5 * np.sum(wy[:, None] * wx[None, :] * gradient_squared)
    assert spectra.energy.sum() == pytest.approx(energy, rel=1e-12)
    enstrophy = 0.5 * np.sum(
        wy[:, None]
        * wx[None, :]
        * (cube(qx[None, :], alpha)[2] * ty + sx * cube(qy[:, None], beta)[2]) ** 2
    )
    assert spectra.enstrophy.sum() == pytest.approx(enstrophy, rel=1e-12)


@pytest.mark.parametrize(
    ("vorticity", "lengths", "match"),
    [
        (np.zeros(9), (1.0, 1.0), r"2-D array of shape \(ny \+ 1, nx \+ 1\).*got shape \(9,\)"),
        (np.zeros((2, 9)), (1.0, 1.0), r"got shape \(2, 9\)"),
        (np.full((4, 4), np.nan), (1.0, 1.0), "NaN or Inf"),
        (np.zeros((4, 4), dtype=complex), (1.0, 1.0), "must be real"),
        (np.zeros((4, 4)), (1.0, 0.0), r"two positive side lengths \(Lx, Ly\), got \(1.0, 0.0\)"),
        (np.zeros((4, 4)), (1.0,), "two positive side lengths"),
        (np.zeros((4, 4)), (1.0, math.inf), "two positive side lengths"),
    ],
)
def test_box_spectra_errors(vorticity, lengths, match):
    with pytest.raises(ValueError, match=match):
        mno.box_spectra(vorticity, lengths)


def test_spectra_fields_are_checked():
    with pytest.raises(ValueError, match="1-D of one length"):
        mno.Spectra(k=np.ones(3), energy=np.ones(3), enstrophy=np.ones(2))


# -- sampling on the box grid ------------------------------------------------------------------


@pytest.mark.mpi
def test_sample_on_box_grid_layout_and_values():
    """A P2 field sampled exactly, in the [j, i] layout, on any number of ranks."""
    lengths = (2.0, 1.0)
    msh = _box(lengths=lengths, cells=(4, 3))
    space = fem.functionspace(msh, ("Lagrange", 2))
    u = fem.Function(space)

    def exact(x, y):
        return x**2 + 3 * x * y - y

    u.interpolate(lambda x: exact(x[0], x[1]))
    grid = mno.sample_on_box_grid(u, msh, (8, 6))
    if msh.comm.rank != 0:
        assert grid is None
        return
    assert grid is not None and grid.shape == (7, 9)
    x, y = _grid(lengths, (8, 6))
    np.testing.assert_allclose(grid, exact(x, y), atol=1e-13)


@pytest.mark.mpi
def test_sampled_mode_spectrum():
    """Sample → spectra: a P2 mode lands in its shell, to interpolation accuracy."""
    lengths = (2.0, 1.0)
    msh = _box(lengths=lengths, cells=(16, 8))
    space = fem.functionspace(msh, ("Lagrange", 2))
    omega = fem.Function(space)
    omega.interpolate(lambda x: np.sin(3 * np.pi * x[0] / 2) * np.sin(2 * np.pi * x[1]))
    grid = mno.sample_on_box_grid(omega, msh, (32, 16))
    if grid is None:
        return
    spectra = mno.box_spectra(grid, lengths)
    assert int(np.argmax(spectra.enstrophy)) == 4
    assert spectra.enstrophy[4] == pytest.approx(0.25, rel=1e-2)
    assert spectra.enstrophy.sum() - spectra.enstrophy[4] < 1e-3 * spectra.enstrophy[4]


def test_sample_on_box_grid_errors():
    msh = _box(cells=(2, 2))
    x = ufl.SpatialCoordinate(msh)
    with pytest.raises(ValueError, match=r"needs a scalar field, got shape \(2,\)"):
        mno.sample_on_box_grid(x, msh, 4)
    with pytest.raises(ValueError, match="n must be an integer ≥ 2, got 1"):
        mno.sample_on_box_grid(x[0], msh, 1)
    with pytest.raises(ValueError, match=r"a pair \(nx, ny\), got \(4, 4, 4\)"):
        mno.sample_on_box_grid(x[0], msh, (4, 4, 4))
    with pytest.raises(TypeError, match=r"n must be an integer ≥ 2, got 2\.5"):
        mno.sample_on_box_grid(x[0], msh, (4, 2.5))
