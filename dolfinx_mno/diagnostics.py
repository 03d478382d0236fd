"""Turbulence diagnostics: vorticity correlation, decorrelation time, box spectra.

The metrics of Kochkov et al. 2021 ("Machine learning–accelerated computational fluid
dynamics", https://arxiv.org/abs/2102.01010) for comparing a coarse simulation with a
filtered reference, adapted to finite elements on a free-slip box ``[0, Lx] × [0, Ly]``
(``ω = 0`` and ``ψ = 0`` on the boundary):

* :func:`correlation` (and :class:`Correlation`, its compiled, reusable form): the L2(Ω)
  Pearson correlation of two fields on one mesh. Collective; the same value on every rank.
* :func:`decorrelation_time`: the first time a correlation history falls below a threshold
  (0.95 in Kochkov et al.). Pure NumPy.
* :func:`box_spectra`: energy and enstrophy spectra from a vorticity sampled on a uniform
  grid of the box, through the sine series that a field vanishing on the boundary has.
  Pure NumPy, run on the rank that holds the grid; :func:`sample_on_box_grid` samples a
  field on that grid and gathers it there (collective).

A time loop::

    import dolfinx_mno as mno

    rho = mno.Correlation(omega_coarse, omega_reference)  # forms compiled once
    for step in range(num_steps):
        ...  # advance both
        correlations.append(rho())  # collective
    t_decorrelated = mno.decorrelation_time(times, correlations, threshold=0.95)

    grid = mno.sample_on_box_grid(omega_coarse, mesh, 128)  # (129, 129) on rank 0
    if grid is not None:
        spectra = mno.box_spectra(grid, (Lx, Ly))
"""

from __future__ import annotations

import math
import numbers
import typing
from collections.abc import Sequence
from dataclasses import dataclass

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import scipy.fft
import ufl
from dolfinx import fem, la
from dolfinx.mesh import Mesh
from ufl.algorithms import extract_coefficients
from ufl.algorithms.analysis import extract_constants

from dolfinx_mno.grid import grid_over_mesh
from dolfinx_mno.grid_gather import GriddedSampler
from dolfinx_mno.validation import check_integer

__all__ = [
    "Correlation",
    "Spectra",
    "box_spectra",
    "correlation",
    "decorrelation_time",
    "sample_on_box_grid",
]

#: A field of :class:`Correlation`: a function or a scalar UFL expression.
FieldLike = fem.Function | ufl.core.expr.Expr

#: A field whose variance is below this multiple of the rounding of its mean is constant;
#: one whose root mean square on a partial measure is below this multiple of eps times its
#: root mean square over the cells is zero there.
_ROUNDING_FACTOR = 16.0


def _field_domain(
    fields: Sequence[ufl.core.expr.Expr], dx: ufl.Measure | None
) -> ufl.AbstractDomain:
    """The one UFL mesh of the fields (and of ``dx``, if it has one), or a ValueError."""
    domains: set[ufl.AbstractDomain] = set()
    for field in fields:
        domains.update(ufl.domain.extract_domains(field))
    if dx is not None and dx.ufl_domain() is not None:
        domains.add(dx.ufl_domain())
    if len(domains) != 1:
        raise ValueError(
            "A correlation needs two fields on one mesh (and a measure on that mesh), but "
            f"they live on {len(domains)} meshes; interpolate or restrict one field to the "
            "other's mesh first (dolfinx_mno.data.restrict)."
        )
    return domains.pop()


def _real_dtype(fields: Sequence[ufl.core.expr.Expr], domain: ufl.AbstractDomain) -> np.dtype:
    """The one real scalar type of the fields' functions and constants (else the mesh's)."""
    dtypes = {
        np.dtype(c.dtype)
        for field in fields
        for c in (*extract_coefficients(field), *extract_constants(field))
        if hasattr(c, "dtype")
    }
    if not dtypes:
        dtypes = {np.dtype(typing.cast(typing.Any, domain).ufl_cargo().geometry.x.dtype)}
    if len(dtypes) > 1 or not np.issubdtype(next(iter(dtypes)), np.floating):
        raise TypeError(
            f"A correlation needs real fields of one scalar type, got {sorted(map(str, dtypes))}."
        )
    return dtypes.pop()


class Correlation:
    r"""The L2(Ω) Pearson correlation of two fields on one mesh, compiled once.

    .. math::

        \rho(a, b) = \frac{\int_\Omega (a - \bar a)(b - \bar b)}
        {\sqrt{\int_\Omega (a - \bar a)^2 \int_\Omega (b - \bar b)^2}},
        \qquad \bar a = \frac{1}{|\Omega|}\int_\Omega a,

    the "vorticity correlation" of Kochkov et al. 2021 (https://arxiv.org/abs/2102.01010)
    when ``a`` and ``b`` are the vorticities of a model and of the filtered reference on
    the model's mesh. Uncentered (``centered=False``): ``∫ab / sqrt(∫a² ∫b²)``.

    The forms are compiled at construction; each call assembles them with the current
    values of the fields' coefficients. Centred, a call is two passes: the means ``∫a``
    and ``∫b`` first, then the centred second moments, so that a large mean does not cancel
    digits of the fluctuations. The integrals are summed cell by cell in float64 (also
    for float32 fields), so that the means are exact to rounding and a constant field
    is recognised as one on any mesh; the local integrals (owned cells only) are gathered
    on every rank and summed in rank order, so every rank returns the same value. It does
    not depend on the partition beyond rounding (about 1e-15).

    Args:
        a: A :class:`dolfinx.fem.Function` or scalar UFL expression (``u``,
            ``ufl.curl(u)``, ``x[0] * u``); real, float32 or float64.
        b: The same kind, on the same mesh and of the same scalar type.
        centered: Remove the domain means first (Pearson correlation); else uncentered.
        dx: The measure of the integrals (e.g. ``ufl.Measure("dx", domain=mesh,
            metadata={"quadrature_degree": 6})``); by default ``ufl.dx`` on the fields'
            mesh, with UFL's estimated degree. The means are over this measure too. Any
            measure on the mesh: ``ufl.ds``, ``ufl.dS``, a subdomain. On a measure over
            part of the mesh, a field is also compared with itself over the whole mesh
            (``∫a² dx`` over every cell, with the quadrature metadata of ``dx``, two more
            forms): a field that vanishes there up to rounding is refused as zero.

    Attributes:
        centered: Whether the means are removed.
        dtype: The scalar type of the forms.
        area: ``∫ 1 dx``, what the means are taken over (computed once).
        whole_mesh: Whether ``dx`` is the cell measure over the whole mesh.

    Raises:
        ValueError: A field that is not scalar, fields on several meshes (or none), a
            measure over no cells.
        TypeError: Complex fields, or fields of different scalar types.

    Example:
        >>> rho = Correlation(omega_h, omega_ref)
        >>> rho()  # collective: a float in [-1, 1], the same on every rank
        0.9987
    """

    def __init__(
        self,
        a: FieldLike,
        b: FieldLike,
        *,
        centered: bool = True,
        dx: ufl.Measure | None = None,
    ):
        """Check the fields and compile the forms (collective: JIT compilation).

        See the class docstring for the arguments.
        """
        fields = (ufl.as_ufl(a), ufl.as_ufl(b))
        for name, field in zip("ab", fields, strict=True):
            if field.ufl_shape != ():
                raise ValueError(
                    f"A correlation needs scalar fields, but {name} has shape "
                    f"{field.ufl_shape}; pass one component (e.g. {name}[0])."
                )
        if dx is not None and not isinstance(dx, ufl.Measure):
            raise TypeError(f"dx must be a ufl.Measure, got {type(dx).__name__}.")
        domain = _field_domain(fields, dx)
        dtype = _real_dtype(fields, domain)
        measure = dx if dx is not None else ufl.Measure("dx", domain=domain)
        if measure.ufl_domain() is None:  # ufl.dx: a constant integrand needs the mesh
            measure = measure.reconstruct(domain=domain)
        self.centered = bool(centered)
        self.dtype = dtype

        # The integrals are assembled per cell (against the cells' indicators, a DG0 test
        # function) and the cells' values summed in float64: assemble_scalar would sum
        # them in the forms' scalar type, whose rounding (~ number of cells × eps in
        # float32) would make the means too inexact to tell a constant field from one
        # that varies.
        mesh = Mesh(typing.cast(typing.Any, domain).ufl_cargo(), typing.cast(ufl.Mesh, domain))
        indicators = ufl.TestFunction(fem.functionspace(mesh, ("DG", 0)))
        cells = ufl.avg(indicators) if measure.integral_type() == "interior_facet" else indicators

        def compile_forms(
            integrands: Sequence[ufl.core.expr.Expr], over: ufl.Measure = measure
        ) -> list[fem.Form]:
            test = cells if over is measure else indicators
            return [fem.form(integrand * test * over, dtype=dtype) for integrand in integrands]

        fa, fb = fields
        one = ufl.as_ufl(dtype.type(1.0))
        # A measure over part of the mesh (facets, a subdomain) needs the fields' scale over
        # the cells to tell a field that is zero there up to rounding (sin(πx) on x = 1).
        self.whole_mesh = (
            measure.integral_type() == "cell" and measure.subdomain_id() == "everywhere"
        )
        # Collective from here on (JIT compilation).
        (self._area_form,) = compile_forms([one])
        self._comm: MPI.Comm = mesh.comm
        if self.centered:
            self._mean_a = fem.Constant(domain, dtype.type(0.0))
            self._mean_b = fem.Constant(domain, dtype.type(0.0))
            fa, fb = fa - self._mean_a, fb - self._mean_b
            self._mean_forms = compile_forms(fields)
        self._moment_forms = compile_forms([fa * fa, fb * fb, fa * fb])
        mesh_cells = ufl.Measure("dx", domain=domain, metadata=measure.metadata())
        if not self.whole_mesh:
            a, b = fields
            self._moment_forms += compile_forms([a * a, b * b], over=mesh_cells)
        areas = self._sum(
            [self._area_form] + ([] if self.whole_mesh else compile_forms([one], mesh_cells))
        )
        area = areas[0]
        if not area > 0.0:  # global: the same on every rank
            raise ValueError(
                f"The measure of the correlation covers no part of the mesh (its area is "
                f"{area}); pass a measure over the cells to correlate on."
            )
        self.area = float(area)
        self._mesh_area = float(areas[-1])

    def _sum(self, forms: Sequence[fem.Form]) -> np.ndarray:
        """The global integrals of ``forms``, summed in rank order (collective)."""
        local = np.zeros(len(forms), dtype=np.float64)
        for index, form in enumerate(forms):
            if not form.function_spaces:  # an integrand UFL simplified to zero
                continue
            vector = fem.assemble_vector(form)
            vector.scatter_reverse(la.InsertMode.add)  # interior facets add to ghost cells
            owned = vector.index_map.size_local
            local[index] = np.sum(vector.array[:owned], dtype=np.float64)
        everyone = np.empty((self._comm.size, len(forms)), dtype=np.float64)
        self._comm.Allgather(local, everyone)
        total = np.zeros(len(forms))
        for row in everyone:  # rank order: every rank adds the same numbers the same way
            total += row
        return total

    def _check_varies(self, name: str, squares: float, scale: float) -> None:
        """Refuse field ``name`` if ``squares``, ``∫(a - ā)²``, is rounding (rank-local).

        ``scale`` is the larger of ``ā²`` and the field's mean square over the mesh's
        cells: a constant ``c`` leaves ``(a - ā)² ~ (eps c)²``, and a field evaluated where
        it vanishes (``sin(πx)`` at ``x = 1``) leaves values of about eps times its size.
        The integrals are global, summed in rank order: every rank decides the same.
        """
        eps = float(np.finfo(self.dtype).eps)
        threshold = (_ROUNDING_FACTOR * eps) ** 2 * scale * abs(self.area)
        # NaN or Inf (a blown-up field) is no rounding: the call returns NaN, as documented.
        if not (math.isfinite(squares) and squares <= threshold):
            return
        what = "constant (zero after removing its mean)" if self.centered else "zero"
        where = ""
        if not self.whole_mesh:
            deviation = "deviation from its mean" if self.centered else "root mean square"
            where = (
                f" on the measure of the correlation, to rounding (its {deviation} there is "
                f"at most {_ROUNDING_FACTOR:g} eps times its root mean square over the mesh's "
                "cells)"
            )
        raise ValueError(
            f"Field {name} of the correlation is {what}{where}: the correlation is 0/0. "
            "Correlate fields that vary"
            + (", or pass centered=False to keep the mean." if self.centered else ".")
        )

    def __call__(self) -> float:
        """The correlation of the fields' current values (collective).

        Returns:
            The correlation, in ``[-1, 1]`` up to rounding; the same value on every rank.
            NaN if a field is not finite (a blown-up simulation).

        Raises:
            ValueError: On every rank, if a field is zero (uncentered) or constant
                (centred): the correlation is 0/0. Zero and constant are to rounding:
                ``∫(a - ā)² ≤ (16 eps)² max(ā², ⟨a²⟩) ∫1``, with ``ā`` the mean over
                ``dx`` (0 uncentred) and ``⟨a²⟩`` the mean square of ``a`` over the
                mesh's cells, so that a field evaluated where it vanishes (``sin(πx)`` on
                ``x = 1`` with ``dx=ufl.ds``, ~1e-16 there) is refused on every number of
                ranks instead of giving noise; on the whole mesh, only exact zeros and
                constants to the rounding of their mean. The integrals are global, so
                every rank decides the same before any further collective call.
        """
        if self.centered:
            integral_a, integral_b = self._sum(self._mean_forms)
            means = (integral_a / self.area, integral_b / self.area)
            self._mean_a.value = means[0]
            self._mean_b.value = means[1]
        else:
            means = (0.0, 0.0)
        moments = self._sum(self._moment_forms)
        squares_a, squares_b, product = moments[:3]
        if self.whole_mesh:  # the mean squares over the mesh: ∫(a - ā)² / |Ω| + ā²
            mesh_squares = [squares_a / self.area + means[0] ** 2,
                            squares_b / self.area + means[1] ** 2]  # fmt: skip
        else:
            mesh_squares = [moment / self._mesh_area for moment in moments[3:]]
        for name, squares, mean, scale in zip(
            "ab", (squares_a, squares_b), means, mesh_squares, strict=True
        ):
            self._check_varies(name, squares, max(mean**2, scale))
        # Two roots, not the root of the product: squares_a * squares_b overflows (or
        # underflows) for fields of magnitude ~1e±77, whose correlation is still 1.
        return float(product / (math.sqrt(squares_a) * math.sqrt(squares_b)))


def correlation(
    a: FieldLike,
    b: FieldLike,
    *,
    centered: bool = True,
    dx: ufl.Measure | None = None,
) -> float:
    """The L2(Ω) Pearson correlation of two fields on one mesh (collective).

    ``∫(a-ā)(b-b̄) / sqrt(∫(a-ā)² ∫(b-b̄)²)`` with ``ā`` the domain mean: Kochkov et al.
    2021's vorticity correlation (https://arxiv.org/abs/2102.01010); uncentered
    (``∫ab / sqrt(∫a² ∫b²)``) if ``centered=False``. This compiles the forms on every
    call: in a time loop, build a :class:`Correlation` once and call it.

    Args:
        a: A :class:`dolfinx.fem.Function` or scalar UFL expression.
        b: The same kind, on the same mesh.
        centered: Remove the domain means first.
        dx: The measure of the integrals; by default ``ufl.dx`` on the fields' mesh.

    Returns:
        The correlation, the same on every rank; NaN if a field is not finite.

    Raises:
        ValueError: Fields not scalar or not on one mesh; a zero (or, centred, constant)
            field, on every rank.
        TypeError: Complex fields, or fields of different scalar types.

    Example:
        >>> correlation(omega_h, omega_ref)
        0.9987
    """
    return Correlation(a, b, centered=centered, dx=dx)()


def decorrelation_time(
    times: npt.ArrayLike, correlations: npt.ArrayLike, threshold: float = 0.95
) -> float:
    """The first time a correlation history falls below ``threshold``.

    Kochkov et al. 2021's "time until the vorticity correlation falls below 0.95". The
    crossing is linearly interpolated between the last sample at or above the threshold
    and the first one below it. Special cases:

    * never below the threshold: ``math.inf`` (the run stayed correlated throughout; the
      caller decides how to report a time longer than the run);
    * already below at the first sample: ``times[0]``;
    * a non-finite correlation (a blown-up run) counts as decorrelated at its sample's
      time, without interpolation (if no earlier sample fell below the threshold).

    Args:
        times: Sample times, shape ``(num_samples,)``, finite and strictly increasing.
        correlations: Correlations at those times, shape ``(num_samples,)``.
        threshold: In ``(0, 1]``.

    Returns:
        The decorrelation time, or ``math.inf``.

    Raises:
        ValueError: Arrays that are not 1-D, are empty, differ in length; times not finite
            or not strictly increasing; a threshold outside ``(0, 1]``.

    Example:
        >>> decorrelation_time([0.0, 1.0, 2.0], [1.0, 0.75, 0.25], threshold=0.5)
        1.5
    """
    t = np.asarray(times, dtype=np.float64)
    c = np.asarray(correlations, dtype=np.float64)
    if t.ndim != 1 or c.ndim != 1:
        raise ValueError(f"times and correlations must be 1-D, got shapes {t.shape} and {c.shape}.")
    if len(t) != len(c):
        raise ValueError(
            f"times and correlations must have the same length, got {len(t)} and {len(c)}."
        )
    if len(t) == 0:
        raise ValueError("times and correlations are empty: there is nothing to measure.")
    if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
        raise ValueError("times must be finite and strictly increasing.")
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not 0.0 < float(threshold) <= 1.0
    ):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
    below = ~(c >= threshold)  # NaN counts as below
    if not np.any(below):
        return math.inf
    first = int(np.argmax(below))
    if first == 0 or not np.isfinite(c[first]):
        return float(t[first])
    c0, c1 = c[first - 1], c[first]
    return float(t[first - 1] + (c0 - threshold) / (c0 - c1) * (t[first] - t[first - 1]))


@dataclass(frozen=True, eq=False)
class Spectra:
    """Energy and enstrophy spectra in shells of wavenumber magnitude.

    Attributes:
        k: Shell wavenumbers ``m Δ`` for ``m = 1, 2, ..., num_shells``, shape
            ``(num_shells,)``; ``Δ = k[0]`` is the shell width.
        energy: Kinetic energy per shell, shape ``(num_shells,)``; sums to ``½∫|u|²``.
            Divide by ``Δ`` for a spectral density ``E(k)``.
        enstrophy: Enstrophy per shell, shape ``(num_shells,)``; sums to ``½∫ω²``.
    """

    k: np.ndarray
    energy: np.ndarray
    enstrophy: np.ndarray

    def __post_init__(self):
        shapes = {np.shape(self.k), np.shape(self.energy), np.shape(self.enstrophy)}
        if len(shapes) != 1 or len(shapes.pop()) != 1:
            raise ValueError("Spectra k, energy and enstrophy must be 1-D of one length.")


# The dataclass's generated __init__ has no docstring; help() would show object's.
Spectra.__init__.__doc__ = "Create the spectra; see the class docstring for the fields."


def box_spectra(vorticity: npt.ArrayLike, lengths: tuple[float, float]) -> Spectra:
    r"""Energy and enstrophy spectra of a vorticity on a free-slip box (not collective).

    The vorticity of a free-slip box ``[0, Lx] × [0, Ly]`` vanishes on the boundary, and
    so does the streamfunction (``-Δψ = ω``); both are sine series,

    .. math::

        \omega = \sum_{k, l \ge 1} a_{kl} \sin\frac{k\pi x}{L_x} \sin\frac{l\pi y}{L_y},
        \qquad \psi = \sum_{k, l \ge 1} \frac{a_{kl}}{|\kappa|^2}
        \sin\frac{k\pi x}{L_x} \sin\frac{l\pi y}{L_y},
        \qquad |\kappa|^2 = \Big(\frac{k\pi}{L_x}\Big)^2 + \Big(\frac{l\pi}{L_y}\Big)^2.

    The coefficients of the samples' sine interpolant, ``k < nx`` and ``l < ny``, are a
    DST-I of the interior points (``scipy.fft.dstn``); the boundary rows and columns are
    not read (they should be 0). Each mode goes to the shell ``m = round(|κ| / Δ)`` of
    width ``Δ = min(π/Lx, π/Ly)``, with

    * ``enstrophy[m - 1] = Σ ½ a² Lx Ly / 4`` (Parseval: ``Σ enstrophy = ½∫ω²`` of the
      interpolant, exactly ``½ Δx Δy Σ ω²`` of the samples);
    * ``energy[m - 1] = Σ ½ a² / |κ|² Lx Ly / 4`` (``Σ energy = ½∫|∇ψ|² = ½∫|u|²``).

    On a mesh distributed over ranks, sample and gather the vorticity on the root with
    :func:`sample_on_box_grid` (or a :class:`~dolfinx_mno.data.GriddedSampler` kept for
    repeated use), then compute the spectra there::

        omega_grid = sample_on_box_grid(omega_h, mesh, 256)  # collective
        if omega_grid is not None:  # on rank 0
            spectra = box_spectra(omega_grid, (Lx, Ly))
            plt.loglog(spectra.k, spectra.energy / spectra.k[0])

    Args:
        vorticity: Samples ``vorticity[j, i] = ω(i Lx / nx, j Ly / ny)``, shape
            ``(ny + 1, nx + 1)`` with ``nx, ny ≥ 2`` (boundary points included; ``y`` is
            the first axis, as in an image). Note that a :class:`GriddedSampler`'s grid is
            indexed ``[ix, iy]``, the transpose; :func:`sample_on_box_grid` transposes it.
        lengths: ``(Lx, Ly)``, the box's side lengths.

    Returns:
        The spectra, ``num_shells = round(max |κ| / Δ)`` shells, empty shells included.

    Raises:
        ValueError: ``vorticity`` not 2-D, too small or not finite; lengths not positive.

    Example:
        >>> x, y = np.linspace(0, 2, 33), np.linspace(0, 1, 17)
        >>> omega = np.sin(3 * np.pi * x / 2)[None, :] * np.sin(2 * np.pi * y)[:, None]
        >>> spectra = box_spectra(omega, (2.0, 1.0))  # |κ| = 5 Δ: shell 5
        >>> int(np.argmax(spectra.enstrophy)) + 1
        5
    """
    omega = np.asarray(vorticity)
    if omega.ndim != 2 or min(omega.shape) < 3:
        raise ValueError(
            "vorticity must be a 2-D array of shape (ny + 1, nx + 1) with nx, ny ≥ 2 "
            f"(boundary points included), got shape {omega.shape}."
        )
    if not np.issubdtype(omega.dtype, np.floating) and not np.issubdtype(omega.dtype, np.integer):
        raise ValueError(f"vorticity must be real, got dtype {omega.dtype}.")
    if not np.all(np.isfinite(omega)):
        raise ValueError("vorticity has NaN or Inf values: a spectrum of them is meaningless.")
    if (
        len(lengths) != 2
        or not all(isinstance(length, numbers.Real) for length in lengths)
        or not all(0 < float(length) < math.inf for length in lengths)
    ):
        raise ValueError(f"lengths must be two positive side lengths (Lx, Ly), got {lengths}.")
    lx, ly = float(lengths[0]), float(lengths[1])
    ny, nx = omega.shape[0] - 1, omega.shape[1] - 1
    # DST-I: y = 2 Σ x sin(...) per axis, so the sine coefficients are y / (N + 1).
    coefficients = scipy.fft.dstn(omega[1:-1, 1:-1].astype(np.float64), type=1) / (nx * ny)
    kappa_x = np.arange(1, nx) * math.pi / lx
    kappa_y = np.arange(1, ny) * math.pi / ly
    kappa_squared = kappa_y[:, None] ** 2 + kappa_x[None, :] ** 2  # (ny - 1, nx - 1)
    width = min(math.pi / lx, math.pi / ly)
    shells = np.floor(np.sqrt(kappa_squared) / width + 0.5).astype(np.int64)
    num_shells = int(shells.max())
    enstrophy_per_mode = 0.5 * coefficients**2 * (lx * ly / 4.0)
    enstrophy = np.bincount(shells.ravel() - 1, enstrophy_per_mode.ravel(), num_shells)
    energy = np.bincount(
        shells.ravel() - 1, (enstrophy_per_mode / kappa_squared).ravel(), num_shells
    )
    return Spectra(k=width * np.arange(1, num_shells + 1), energy=energy, enstrophy=enstrophy)


def sample_on_box_grid(
    expression: FieldLike, mesh: Mesh, n: int | tuple[int, int]
) -> np.ndarray | None:
    """A scalar field on a uniform grid of a box mesh, on rank 0 (collective).

    The grid spans the mesh's bounding box with ``nx`` × ``ny`` intervals (boundary points
    included), in the layout that :func:`box_spectra` reads. Each call builds a
    :class:`~dolfinx_mno.data.GriddedSampler` (bounding-box tree, point ownership); to
    sample often, keep one and transpose its output yourself::

        from dolfinx_mno.data import GriddedSampler
        from dolfinx_mno.grid import grid_over_mesh

        sampler = GriddedSampler([omega_h], grid_over_mesh(mesh, (nx + 1, ny + 1)))
        values = sampler()  # (1, nx + 1, ny + 1) on rank 0, None elsewhere
        omega_grid = None if values is None else values[0].T

    Args:
        expression: A :class:`dolfinx.fem.Function` or scalar UFL expression on ``mesh``.
        mesh: A 2-D mesh of the box.
        n: Intervals per direction, ``n`` for both or ``(nx, ny)``; each at least 2.

    Returns:
        On rank 0, ``grid[j, i] = expression(x0 + i Lx / nx, y0 + j Ly / ny)``, shape
        ``(ny + 1, nx + 1)``, in the mesh's dtype (values of the expression's interpolant
        into a discontinuous Lagrange space of its coefficients' degree); ``None``
        elsewhere.

    Raises:
        ValueError: A non-scalar expression, a mesh that is not 2-D, or bad ``n`` (also
            ``TypeError`` for a non-integer ``n``); the same on every rank.
    """
    counts = (n, n) if isinstance(n, numbers.Integral) and not isinstance(n, bool) else n
    if not isinstance(counts, Sequence) or len(counts) != 2:
        raise ValueError(f"n must be an integer or a pair (nx, ny), got {n!r}.")
    nx, ny = (check_integer(count, "n", minimum=2) for count in counts)
    field = ufl.as_ufl(expression)
    if field.ufl_shape != ():
        raise ValueError(f"sample_on_box_grid needs a scalar field, got shape {field.ufl_shape}.")
    if mesh.geometry.dim != 2 or mesh.topology.dim != 2:
        raise ValueError(
            "sample_on_box_grid needs a 2-D mesh of a box, got topological dimension "
            f"{mesh.topology.dim} and geometric dimension {mesh.geometry.dim}."
        )
    grid = grid_over_mesh(mesh, (nx + 1, ny + 1))  # collective from here on
    values = GriddedSampler([field], grid, mesh=mesh)()
    if values is None:
        return None
    return typing.cast(np.ndarray, np.ascontiguousarray(values[0].T))
