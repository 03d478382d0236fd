"""Quadrature spaces, their owned dofs, and form checks for closures.

A local closure stores its values at the quadrature points of a cell quadrature rule,
in a ``basix.ufl.quadrature_element`` function space. FFCx integrates a form containing
such a coefficient with the element's own points and weights, whatever the
``quadrature_degree`` in the measure's metadata says, so a form that asks for another
degree would silently be integrated with the closure's rule, and so would every term that
UFL merges with the closure term on a plain ``dx``. :func:`check_form` refuses such forms
with a clear error; :func:`measure` (``closure.dx``) hands out the matching measure.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence

import basix
import basix.ufl
import numpy as np
import numpy.typing as npt
import ufl
from dolfinx import fem
from dolfinx.mesh import Mesh
from ufl.algorithms import extract_coefficients

# Operand flattening lives with the operands; these names stay importable from here.
from dolfinx_mno.operands import flatten_operands, operand_components

__all__ = [
    "check_form",
    "composite_quadrature",
    "flatten_operands",
    "form",
    "measure",
    "operand_components",
    "owned_dofs",
    "quadrature_points",
    "quadrature_space",
    "selected_cells",
]


def quadrature_space(
    mesh: Mesh, quadrature_degree: int, value_shape: tuple[int, ...] = ()
) -> fem.FunctionSpace:
    """Create a function space of values at the points of a cell quadrature rule.

    Args:
        mesh: The mesh.
        quadrature_degree: Degree of Basix's default quadrature rule on the mesh's cell.
        value_shape: Shape of the value at each point.

    Returns:
        The space; its dofs for cell ``c`` are ``(num_points, *value_shape)`` values.
    """
    element = basix.ufl.quadrature_element(
        mesh.basix_cell(), value_shape=value_shape, degree=quadrature_degree
    )
    return fem.functionspace(mesh, element)


def quadrature_points(mesh: Mesh, quadrature_degree: int) -> np.ndarray:
    """Reference-cell points of the default rule, shape ``(num_points, tdim)``."""
    element = basix.ufl.quadrature_element(mesh.basix_cell(), degree=quadrature_degree)
    return typing.cast(np.ndarray, element.custom_quadrature()[0])


def measure(mesh: Mesh, quadrature_degree: int, **kwargs: typing.Any) -> ufl.Measure:
    """Return the cell measure ``dx`` with the closure's quadrature rule.

    Args:
        mesh: The mesh.
        quadrature_degree: The quadrature degree.
        kwargs: Passed to :class:`ufl.Measure` (``subdomain_data``, ``subdomain_id``).
    """
    metadata = {"quadrature_degree": quadrature_degree, "quadrature_rule": "default"}
    return ufl.Measure("dx", domain=mesh, metadata=metadata, **kwargs)


def owned_dofs(space: fem.FunctionSpace, cells: int | np.ndarray) -> slice | np.ndarray:
    """Indices of ``x.array`` holding the given cells' values, in (cell, point) order.

    Quadrature dofs are cell-local, so for owned cells they are normally numbered
    contiguously; a slice then avoids a gather on every write.

    Args:
        space: A quadrature space (:func:`quadrature_space`), of any value shape.
        cells: Number of owned cells (``index_map(tdim).size_local``: cells ``0 .. cells -
            1``), or the local indices of the cells, in the order wanted.

    Returns:
        ``slice(0, n)`` or an index array, selecting ``num_cells * num_points *
        prod(value_shape)`` entries: ``x.array[owned_dofs(...)]`` reshaped to
        ``(num_cells, num_points, *value_shape)``.
    """
    bs = space.dofmap.bs
    selection = slice(0, cells) if isinstance(cells, int | np.integer) else np.asarray(cells)
    cell_dofs = space.dofmap.list[selection].reshape(-1)
    if np.array_equal(cell_dofs, np.arange(cell_dofs.size)):
        return slice(0, cell_dofs.size * bs)
    return (cell_dofs[:, None] * bs + np.arange(bs)).reshape(-1)


def selected_cells(cells: npt.ArrayLike | None, mesh: Mesh) -> np.ndarray | None:
    """The owned cells among ``cells``, sorted and once each (rank-local).

    Args:
        cells: Local cell indices on this rank, as :func:`dolfinx.mesh.locate_entities`
            or :meth:`dolfinx.mesh.MeshTags.find` return them (ghost cells may be among
            them; they are left to their owners), or ``None``.
        mesh: The mesh.

    Returns:
        ``None`` for ``None``, else the owned cells, ``int32``, possibly none.

    Raises:
        TypeError: ``cells`` is not integers (a boolean mask: pass
            ``np.flatnonzero(mask)``).
        ValueError: ``cells`` is not one-dimensional, or holds indices outside this rank's
            cells (owned and ghost).
    """
    if cells is None:
        return None
    array = np.asarray(cells)
    if array.dtype == np.bool_:
        raise TypeError(
            "cells must be local cell indices, not a boolean mask; pass np.flatnonzero(mask)."
        )
    if array.size == 0:  # [] reads as float64
        array = array.astype(np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"cells must be integer local cell indices, got dtype {array.dtype}.")
    if array.ndim != 1:
        raise ValueError(
            f"cells must be a one-dimensional array of local cell indices, got shape {array.shape}."
        )
    index_map = mesh.topology.index_map(mesh.topology.dim)
    total = index_map.size_local + index_map.num_ghosts
    outside = array[(array < 0) | (array >= total)]
    if outside.size:
        raise ValueError(
            f"cells holds {outside.size} index(es) outside this rank's {total} local cells "
            f"(owned and ghost), e.g. {int(outside[0])}."
        )
    owned = np.unique(array)
    return owned[owned < index_map.size_local].astype(np.int32)


def _closure_degree(coefficient: typing.Any) -> int | None:
    return getattr(coefficient, "_mno_quadrature_degree", None)


def check_form(form: ufl.Form | Iterable[ufl.Form]) -> None:
    """Check that every integral containing a closure uses the closure's quadrature rule.

    An integral containing a closure must say which degree it is integrated with (use
    :attr:`ClosureBase.dx <dolfinx_mno.ClosureBase.dx>` or :func:`measure`): on a plain
    ``dx`` UFL would merge the closure term with every other plain-``dx`` term of the form
    into one integral that FFCx integrates with the closure's (often low-degree) rule.

    Args:
        form: A UFL form, or a (nested) sequence of forms.

    Raises:
        TypeError: If a form is a compiled :class:`dolfinx.fem.Form`.
        ValueError: If an integral containing a closure is not a cell integral, has no
            quadrature degree (a plain ``dx``), asks for a quadrature degree or rule other
            than the closure's, or mixes closures of different quadrature degrees.
    """
    if isinstance(form, fem.Form):
        raise TypeError(
            "Closure forms must be given as UFL forms (dolfinx_mno's problems compile them, "
            "as dolfinx.fem.petsc's problems do): got a compiled dolfinx.fem.Form, whose "
            "integrals cannot be checked. Pass the UFL form instead of fem.form(...)."
        )
    if not isinstance(form, ufl.Form):
        for item in form:
            if item is not None:
                check_form(item)
        return
    for integral in form.integrals():
        closures = {
            c: d
            for c in extract_coefficients(integral.integrand())
            if (d := _closure_degree(c)) is not None
        }
        if not closures:
            continue
        names = ", ".join(sorted(f"'{c.name}' (degree {d})" for c, d in closures.items()))
        degrees = set(closures.values())
        if len(degrees) > 1:
            raise ValueError(
                f"One integral mixes closures with different quadrature degrees: {names}. "
                "Give them the same quadrature_degree or integrate them separately."
            )
        degree = degrees.pop()
        if integral.integral_type() != "cell":
            raise ValueError(
                f"Closure(s) {names} hold values at cell quadrature points and cannot be "
                f"integrated over '{integral.integral_type()}' entities; use closure.dx."
            )
        metadata = integral.metadata()
        requested = metadata.get("quadrature_degree")
        rule = metadata.get("quadrature_rule", "default")
        if requested is None:
            # UFL sums every integral of a form over the same plain measure into one, and
            # FFCx integrates it all with the closure's rule: the other terms would silently
            # lose accuracy (∫u⁴ next to a degree-1 closure is a few % off).
            raise ValueError(
                f"Closure(s) {names} are integrated with a plain measure (no quadrature "
                "degree). UFL would merge every other term of the form on that measure into "
                f"this integral and FFCx would integrate all of it with the closures' "
                f"degree-{degree} rule. Integrate the closure term with closure.dx, e.g. "
                "ufl.inner(closure, v) * closure.dx, and keep plain dx for the other terms."
            )
        if requested != degree or rule not in ("default", None):
            raise ValueError(
                f"Quadrature mismatch: an integral containing closure(s) {names} asks for "
                f"quadrature degree {requested} (rule '{rule}'), but closure values live at "
                f"the points of the degree-{degree} default rule. Integrate with closure.dx "
                f"(or dx(metadata={{'quadrature_degree': {degree}}}))."
            )


def form(form: ufl.Form | Sequence[ufl.Form], **kwargs: typing.Any) -> typing.Any:
    """:func:`dolfinx.fem.form` after :func:`check_form`: compile a form with closures.

    Args:
        form: The UFL form(s).
        kwargs: Passed to :func:`dolfinx.fem.form` (``dtype``, ``jit_options``, ...).
    """
    check_form(form)
    return fem.form(form, **kwargs)


def composite_quadrature(
    cell: str, degree: int, subdivisions: int
) -> tuple[np.ndarray, np.ndarray]:
    """Basix's degree-``degree`` rule on each sub-cell of a uniformly subdivided cell.

    The reference cell is split into ``subdivisions`` pieces per direction (``m^tdim``
    sub-cells; a triangle into ``m²`` triangles, as red refinement does), and the default
    rule is mapped onto each. On a mesh nested in a coarse mesh by uniform refinement by a
    factor ``m`` whose cells are these sub-cells (e.g. ``create_unit_square(comm, m * n,
    m * n)`` inside ``(n, n)``, both with the diagonal ``"right"`` or both ``"left"``; not
    ``"crossed"`` or ``"left_right"``, nor :func:`dolfinx.mesh.refine`), the rule on a
    coarse cell integrates exactly every field that is a polynomial of degree ``≤ degree``
    on each fine cell: fine fields with kinks or jumps between fine cells, which a single
    high-degree rule would alias.

    Args:
        cell: ``"interval"``, ``"triangle"``, ``"quadrilateral"`` or ``"hexahedron"``.
        degree: Degree of the rule on each sub-cell.
        subdivisions: ``m ≥ 1``; 1 gives Basix's default rule.

    Returns:
        Points ``(num_points, tdim)`` on the reference cell and weights ``(num_points,)``
        summing to the reference cell's volume.

    Raises:
        ValueError: Unsupported cell (tetrahedra do not split into similar tetrahedra),
            or a degree or number of subdivisions out of range.
    """
    if not isinstance(subdivisions, int | np.integer) or subdivisions < 1:
        raise ValueError(f"subdivisions must be a positive integer, got {subdivisions!r}.")
    if not isinstance(degree, int | np.integer) or degree < 0:
        raise ValueError(f"degree must be a non-negative integer, got {degree!r}.")
    supported = ("interval", "triangle", "quadrilateral", "hexahedron")
    if cell not in supported:
        raise ValueError(f"Composite rules support the cells {supported}, not {cell!r}.")
    rule = basix.make_quadrature(getattr(basix.CellType, cell), int(degree))
    points = np.asarray(rule[0], dtype=np.float64)
    weights = np.asarray(rule[1], dtype=np.float64)
    m = int(subdivisions)
    tdim = points.shape[1]
    if cell == "triangle":
        # Each sub-triangle is x0 + J p: m² triangles, upright and upside down.
        corners = []
        for i in range(m):
            for j in range(m - i):
                corners.append(((i, j), (i + 1, j), (i, j + 1)))
                if i + j < m - 1:
                    corners.append(((i + 1, j + 1), (i, j + 1), (i + 1, j)))
        vertices = np.array(corners, dtype=np.float64) / m  # (num_sub, 3, 2)
        origin = vertices[:, 0]
        jacobian = np.stack([vertices[:, 1] - origin, vertices[:, 2] - origin], axis=-1)
        mapped = origin[:, None, :] + np.einsum("sij,pj->spi", jacobian, points)
        scale = np.abs(np.linalg.det(jacobian))[:, None] * weights[None, :]
        return mapped.reshape(-1, 2), scale.reshape(-1)
    # Intervals and tensor-product cells: shift the scaled rule to every sub-box.
    offsets = np.stack(np.meshgrid(*[np.arange(m)] * tdim, indexing="ij"), axis=-1).reshape(
        -1, tdim
    )
    mapped = (offsets[:, None, :] + points[None, :, :]) / m
    scaled = np.broadcast_to(weights / m**tdim, (len(offsets), len(weights)))
    return mapped.reshape(-1, tdim), np.ascontiguousarray(scaled).reshape(-1)
