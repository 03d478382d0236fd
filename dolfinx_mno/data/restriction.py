"""Restriction (filtering) of fine fields onto a coarse space on another mesh.

A learned closure is trained on *filtered* fine simulations: the fine field
``u_f ∈ V_f`` (fine mesh) is restricted to the resolved space ``V_c`` (coarse mesh). The
meshes need not be partitioned alike under MPI. Three restrictions are offered; all are
linear, reproduce every function of ``V_c`` exactly, and keep the data they need (point
ownership, mass matrix, solver, compiled forms) between calls:

* :class:`Interpolation`: ``I u_f``, the interpolant of ``u_f`` in ``V_c``, by evaluating
  ``u_f`` at the interpolation points of ``V_c``
  (:meth:`dolfinx.fem.Function.interpolate_nonmatching`). Cheap, local, and it sees the
  fine field only at a few points per coarse cell: the small scales alias.
* :class:`L2Projection`: ``P u_f ∈ V_c`` with ``(P u_f, φ) = (u_f, φ)`` for all
  ``φ ∈ V_c``: the best approximation in L², a true average over each coarse cell. The
  fine field is brought to the points of a degree-``q`` quadrature rule on the coarse mesh
  (non-matching interpolation into a quadrature space), and ``M a = b`` is solved with
  ``M`` and ``b`` integrated by that rule (PETSc, conjugate gradients).
* :class:`CellAverage`: ``(R w)_K = |K|⁻¹ ∫_K w dx`` onto a DG0 space, exactly, for a
  fine mesh *nested* in the coarse one: the integrals over the fine cells (an assembled
  linear form) are summed per coarse cell. Takes any function or UFL expression on the
  fine mesh, e.g. a flux ``a * ufl.grad(u_f)`` that jumps many times within a coarse cell.

See ``docs/data.md`` for when to use which and their accuracy.
"""

from __future__ import annotations

import collections
import itertools
import typing
from collections.abc import Sequence

from mpi4py import MPI

import basix.ufl
import numpy as np
import numpy.typing as npt
import ufl
from dolfinx import common, fem, la
from dolfinx import cpp as _cpp
from dolfinx import mesh as _mesh
from ufl.algorithms import estimate_total_polynomial_degree, extract_arguments
from ufl.algorithms.renumbering import renumber_indices

from dolfinx_mno._mpi import agree_on, rank_local
from dolfinx_mno.grid_gather import relocate_in_curved_cells
from dolfinx_mno.quadrature import composite_quadrature, measure, quadrature_space
from dolfinx_mno.validation import check_integer

__all__ = ["CellAverage", "Interpolation", "L2Projection", "Restriction", "restrict"]


@typing.runtime_checkable
class Restriction(typing.Protocol):
    """A linear map from functions on any (fine) mesh to functions in :attr:`space`."""

    #: Short name of the method, stored in training-data files.
    method: str

    @property
    def space(self) -> fem.FunctionSpace:
        """The (coarse) space restricted to."""
        ...

    def __call__(self, u: fem.Function, out: fem.Function | None = None) -> fem.Function:
        """Restrict ``u``; write into ``out`` (a new function by default) and return it."""
        ...


def _same_communicator(a: MPI.Comm, b: MPI.Comm) -> bool:
    return MPI.Comm.Compare(a, b) in (MPI.IDENT, MPI.CONGRUENT)


class _NonmatchingTransfer:
    """Point evaluation of functions from any source space at a target space's points.

    The point-ownership data (which rank and cell of the source mesh holds each
    interpolation point of ``target``) are computed once per source space and kept.

    Args:
        target: Space whose interpolation points are evaluated (on its owned cells).
        padding: Absolute padding of the source cells' bounding boxes when locating points;
            by default √ε of the geometry dtype (1.5e-8 in float64, 3.5e-4 in float32).
    """

    def __init__(self, target: fem.FunctionSpace, padding: float | None):
        mesh = target.mesh
        self.target = target
        if padding is None:
            padding = float(np.sqrt(np.finfo(mesh.geometry.x.dtype).eps))
        self.padding = float(padding)
        num_cells = mesh.topology.index_map(mesh.topology.dim).size_local
        self.cells = np.arange(num_cells, dtype=np.int32)
        # Keyed by id(source); the space is kept alive with its data so the id stays unique.
        self._data: dict[int, tuple[fem.FunctionSpace, typing.Any]] = {}

    def check(self, u: fem.Function, out: fem.Function) -> None:
        """Local checks of a transfer ``u → out`` (no communication)."""
        if not isinstance(u, fem.Function):
            raise TypeError(f"Expected a dolfinx.fem.Function to restrict, got {type(u).__name__}.")
        source, target = u.function_space, self.target
        if tuple(source.value_shape) != tuple(target.value_shape):
            raise ValueError(
                f"Cannot restrict a field of value shape {tuple(source.value_shape)} to a space "
                f"of value shape {tuple(target.value_shape)}."
            )
        if source.mesh.geometry.dim != target.mesh.geometry.dim:
            raise ValueError(
                f"The fine mesh is {source.mesh.geometry.dim}-dimensional and the coarse mesh "
                f"{target.mesh.geometry.dim}-dimensional."
            )
        if not _same_communicator(source.mesh.comm, target.mesh.comm):
            raise ValueError("The fine and coarse meshes must share one MPI communicator.")
        if np.dtype(u.dtype) != np.dtype(out.dtype):
            raise TypeError(
                f"The field has dtype {np.dtype(u.dtype)} but the output has dtype "
                f"{np.dtype(out.dtype)}; cast explicitly if that is intended."
            )

    def data(self, source: fem.FunctionSpace) -> typing.Any:
        """Point-ownership data for ``source`` (collective the first time).

        Raises:
            ValueError: On all ranks, if some points of the target lie outside the source
                mesh (they would silently get the value zero): the number on the first
                rank that has such points, and one of them.
        """
        entry = self._data.get(id(source))
        if entry is not None:
            return entry[1]
        data = fem.create_interpolation_data(self.target, source, self.cells, self.padding)
        mesh = self.target.mesh
        with rank_local(mesh.comm, "Locating the coarse space's points in the fine mesh"):
            missing = np.flatnonzero(np.asarray(data.src_owner) < 0)
            if missing.size:
                points = _cpp.fem.interpolation_coords(
                    self.target.element._cpp_object, mesh.geometry._cpp_object, self.cells
                )
                example = tuple(float(c) for c in points[: mesh.geometry.dim, missing[0]])
                raise ValueError(
                    f"{missing.size} interpolation point(s) of the coarse space lie outside "
                    f"the fine mesh (for example {example}). Both meshes must cover the same "
                    f"domain; increase padding (now {self.padding:g}) for boundaries that "
                    "differ by round-off."
                )
            data = _in_containing_cells(source.mesh, data, "fine")
        self._data[id(source)] = (source, data)
        return data

    def transfer(self, u: fem.Function, out: fem.Function) -> None:
        """Evaluate ``u`` at the target's points into ``out`` (collective)."""
        data = self.data(u.function_space)
        u.x.scatter_forward()  # the owner of each point evaluates u with its ghosts
        out.interpolate_nonmatching(u, self.cells, data)
        out.x.scatter_forward()


def _in_containing_cells(source: _mesh.Mesh, data: typing.Any, which: str) -> typing.Any:
    """``data`` with each point in a cell of ``source`` that contains it (rank-local).

    On curved meshes DOLFINx's point location may choose a neighbour of the cell that
    contains a point (:func:`~dolfinx_mno.grid_gather.relocate_in_curved_cells`): the
    point would take the neighbour's value, extrapolated. Such points move to a cell of
    this rank that contains them.

    Raises:
        ValueError: Some point lies in no cell of this rank, owned or ghost (its cell is on
            another rank: a mesh without ghost cells).
    """
    points = np.asarray(data.dest_points).reshape(-1, 3)
    cells = np.asarray(data.dest_cells)
    corrected, lost = relocate_in_curved_cells(source, points, cells)
    if lost:
        raise ValueError(
            f"{lost} point(s) lie in curved cells of the {which} mesh that DOLFINx's point "
            "location did not find (it tests the convex hull of a cell's nodes, not the "
            "curved cell), and in no cell, owned or ghost, of the rank it chose. Give the "
            f"{which} mesh ghost cells (create_mesh(..., partitioner="
            "dolfinx.mesh.create_cell_partitioner(GhostMode.shared_facet, 2))), whose "
            "containing cell is then a ghost of that rank, or straight cells (degree-1 "
            "geometry)."
        )
    if corrected is cells:
        return data
    inner = data._cpp_object
    arrays = [
        np.array(inner.src_owner, dtype=np.int32),
        np.array(inner.dest_owners, dtype=np.int32),
        np.array(inner.dest_points, dtype=points.dtype).reshape(-1),
        np.array(corrected, dtype=np.int32),
    ]
    for array in arrays:
        array.flags.writeable = False  # the binding takes read-only arrays
    return type(data)(type(inner)(*arrays))


def _output(space: fem.FunctionSpace, u: fem.Function, out: fem.Function | None) -> fem.Function:
    if out is None:
        return fem.Function(space, dtype=u.dtype)
    if not isinstance(out, fem.Function) or out.function_space != space:
        raise ValueError("out must be a dolfinx.fem.Function on the restriction's space.")
    return out


class Interpolation:
    """Restriction by interpolation between non-matching meshes: ``I u_f ∈ V_c``.

    ``u_f`` is evaluated at the interpolation points of ``V_c`` (the vertices, edge and
    interior points of a Lagrange space) wherever they lie in the fine mesh, on whichever
    rank owns them. Exact for every ``u_f ∈ V_c``; for smooth fields the error is that of
    interpolation, ``‖u − I u‖ = O(h_c^{k+1})`` in L² for degree ``k``, plus the fine error.
    It does not average: fine-scale oscillations alias onto the coarse space.

    Args:
        space: The coarse space ``V_c``.
        padding: Absolute padding of the fine cells' bounding boxes when locating points;
            by default √ε of the geometry dtype (1.5e-8 in float64). Raise it if the two
            meshes' boundaries differ by more than round-off.

    Example:
        >>> restriction = Interpolation(V_coarse)
        >>> u_c = restriction(u_fine)  # a new fem.Function on V_coarse
        >>> restriction(u_fine, out=u_c)  # or in place, reusing the point data
    """

    method = "interpolation"

    def __init__(self, space: fem.FunctionSpace, *, padding: float | None = None):
        """Set up the interpolation; see the class docstring for the arguments."""
        self._space = space
        self._transfer = _NonmatchingTransfer(space, padding)

    @property
    def space(self) -> fem.FunctionSpace:
        """The coarse space ``V_c``."""
        return self._space

    def __call__(self, u: fem.Function, out: fem.Function | None = None) -> fem.Function:
        """Interpolate ``u`` (any mesh, same value shape) into :attr:`space`.

        Collective. The point data for ``u``'s space are computed at the first call and
        kept.

        Args:
            u: The fine function.
            out: Function on :attr:`space` to write into (same dtype as ``u``); by default
                a new one.

        Returns:
            ``out``, ghosts updated.
        """
        out = _output(self._space, u, out)
        self._transfer.check(u, out)
        self._transfer.transfer(u, out)
        return out


_solver_ids = itertools.count()

#: Default PETSc options of the mass-matrix solve: CG with Jacobi preconditioning. A mass
#: matrix preconditioned by its diagonal has a condition number bounded independently of
#: the mesh size, so a few tens of iterations reach round-off.
MASS_SOLVER_OPTIONS: dict[str, typing.Any] = {
    "ksp_type": "cg",
    "pc_type": "jacobi",
    "ksp_rtol": 1e-14,
    "ksp_atol": 1e-300,
    "ksp_max_it": 1000,
}


class MassSolver:
    """Solve ``M a = b`` for the mass matrix ``M`` of a space, assembled once (PETSc).

    Args:
        space: The space; its dtype must be PETSc's scalar type.
        dx: The measure the mass matrix is integrated with.
        petsc_options: Options overriding :data:`MASS_SOLVER_OPTIONS`.
        bcs: Dirichlet conditions: the solution takes their values on their dofs, and
            the equations of the other dofs are tested with functions vanishing there
            (rows and columns of the constrained dofs are eliminated, with lifting).
    """

    def __init__(
        self,
        space: fem.FunctionSpace,
        dx: ufl.Measure,
        petsc_options: dict[str, typing.Any] | None = None,
        bcs: Sequence[fem.DirichletBC] = (),
    ):
        """Assemble the mass matrix and set up its solver (collective).

        See the class docstring for the arguments.
        """
        from petsc4py import PETSc

        import dolfinx.fem.petsc as fem_petsc

        scalar = np.dtype(PETSc.ScalarType)  # type: ignore[attr-defined]
        if np.dtype(space.mesh.geometry.x.dtype) != np.finfo(scalar).dtype:
            raise TypeError(
                f"Mass-matrix solves use PETSc, whose scalar type is {scalar}; the mesh "
                f"geometry is {space.mesh.geometry.x.dtype}. Use Interpolation instead."
            )
        options = {**MASS_SOLVER_OPTIONS, **(petsc_options or {})}
        self._petsc = PETSc
        self._fem_petsc = fem_petsc
        self.space = space
        self.dtype = scalar
        self.bcs = list(bcs)
        trial, test = ufl.TrialFunction(space), ufl.TestFunction(space)
        self._mass = fem.form(ufl.inner(trial, test) * dx, dtype=scalar)
        self._matrix = fem_petsc.assemble_matrix(self._mass, bcs=self.bcs)
        self._matrix.assemble()
        self._rhs = fem_petsc.create_vector(space)
        self._ksp = PETSc.KSP().create(space.mesh.comm)  # type: ignore[attr-defined]
        self._ksp.setOperators(self._matrix)
        prefix = f"dolfinx_mno_mass_{next(_solver_ids)}_"
        self._ksp.setOptionsPrefix(prefix)
        database: typing.Any = PETSc.Options()  # type: ignore[attr-defined]
        for key, value in options.items():
            database[prefix + key] = value
        self._ksp.setFromOptions()
        for key in options:
            del database[prefix + key]

    @property
    def ksp(self) -> typing.Any:
        """The PETSc KSP (its iteration count and residual norm describe the last solve)."""
        return self._ksp

    def solve(self, rhs: fem.Form, out: fem.Function) -> None:
        """Assemble ``b = rhs`` and solve ``M a = b`` into ``out`` (collective).

        Raises:
            RuntimeError: On all ranks, if the solver did not converge.
        """
        PETSc = self._petsc
        with self._rhs.localForm() as local:
            local.set(0.0)
        self._fem_petsc.assemble_vector(self._rhs, rhs)  # type: ignore[arg-type]
        if self.bcs:
            self._fem_petsc.apply_lifting(self._rhs, [self._mass], bcs=[self.bcs])
        self._rhs.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        if self.bcs:
            self._fem_petsc.set_bc(self._rhs, self.bcs)
        self._ksp.solve(self._rhs, out.x.petsc_vec)
        reason: typing.Any = self._ksp.getConvergedReason()
        if reason <= 0:
            raise RuntimeError(
                f"The mass-matrix solve did not converge (PETSc reason {reason}, "
                f"{self._ksp.getIterationNumber()} iterations, residual norm "
                f"{self._ksp.getResidualNorm():.3e})."
            )
        out.x.scatter_forward()

    def __del__(self):
        """Destroy the PETSc objects."""
        for name in ("_ksp", "_matrix", "_rhs"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.destroy()


def _degree(space: fem.FunctionSpace) -> int:
    return int(space.ufl_element().embedded_superdegree)


class L2Projection:
    """Restriction by L² projection onto a space on another mesh: ``P u_f ∈ V_c``.

    ``P u_f`` solves ``(P u_f, φ) = (u_f, φ)`` for all ``φ ∈ V_c``. Both sides are
    integrated with Basix's default degree-``q`` rule on the coarse cells: ``u_f`` is
    evaluated at those points by non-matching interpolation into a quadrature space, and
    the mass matrix uses the same rule, so ``P`` is the exact L² projection of any field
    that agrees with ``u_f`` at the quadrature points. Hence:

    * every ``u_f ∈ V_c`` is reproduced exactly (to the solver tolerance);
    * the result equals the exact L² projection of ``u_f`` when ``u_f · φ`` is a polynomial
      of degree ``≤ q`` on each coarse cell (e.g. piecewise constants ``V_c`` and a field
      polynomial of degree ``≤ q``);
    * for a smooth field ``u`` resolved by ``u_f``, the quadrature error is
      ``O(h_c^{q+1-k})`` for ``V_c`` of degree ``k``, beyond the projection error
      ``O(h_c^{k+1})`` for the default ``q = 2k + 2``; the fine error enters as
      ``max |u_f − u|`` at the points.

    The fine field is seen at all ``num_cells × num_points`` quadrature points of the coarse
    mesh, not only at ``V_c``'s interpolation points; so fine scales are averaged, and
    ``‖u − P u‖ ≤ ‖u − I u‖`` in L² (up to quadrature error).

    **Nested meshes** (``subdivisions = m``): the rule is Basix's degree-``q`` rule on each
    of the ``m^d`` sub-cells of a uniform subdivision of every coarse cell
    (:func:`dolfinx_mno.quadrature.composite_quadrature`; triangles split into ``m²`` by
    red refinement). If the fine mesh refines the coarse one uniformly by the factor ``m``,
    the sub-cells are the fine cells and the projection is exact for any fine field with
    ``u_f · φ`` of degree ``≤ q`` on each fine cell: shocks, kinks and jumps between fine
    cells are integrated exactly, not aliased. Such meshes are ``create_interval(comm,
    m * n, ...)`` inside ``(comm, n, ...)``, and the same for ``create_rectangle``,
    ``create_box`` and the unit square and cube with quadrilaterals, hexahedra, or
    triangles with the diagonal ``"right"`` (the default) or ``"left"`` on both meshes.
    Not: the diagonals ``"crossed"``, ``"left_right"`` and ``"right_left"`` (their fine
    cells are not the red sub-triangles of the coarse ones), :func:`dolfinx.mesh.refine`
    (which splits triangles differently), a fine mesh refined by another factor than
    ``m``, or meshes that are not nested. At the first call for each fine mesh the
    projection checks, collectively, that the rule integrates a field that is linear on
    each fine cell (with values that look random) exactly to 1e-10 relative, and raises
    otherwise; for such meshes use ``subdivisions=1`` with a higher ``quadrature_degree``
    (an approximate projection). The check costs about one projection, once.

    **Boundary conditions** (``bcs``): the projection onto the functions of ``V_c`` that
    take the conditions' values on their dofs, tested with the functions vanishing there.
    With ``u = 0`` on a wall, for example, the unconstrained projection of a fine field
    with a boundary layer is far from zero at the wall; the constrained one is zero there,
    like the coarse solution, and ``(P u_f, φ) = (u_f, φ)`` still holds for every ``φ`` of
    ``V_c`` vanishing on the wall, so the time derivative of the filtered fine solution is
    the filtered fine tendency in the coarse weak form.

    Args:
        space: The coarse space ``V_c`` (real, PETSc's scalar type).
        quadrature_degree: ``q``, at least ``2k`` so that the mass matrix is exact; by
            default ``2k + 2``.
        subdivisions: Split each coarse cell into ``subdivisions`` pieces per direction
            for the rule (interval, triangle, quadrilateral, hexahedron cells); the fine
            meshes must then refine the coarse one uniformly by this factor (above).
        bcs: Dirichlet conditions on ``V_c`` the projection satisfies.
        petsc_options: Options of the mass solve, overriding :data:`MASS_SOLVER_OPTIONS`
            (CG, Jacobi, relative tolerance 1e-14).
        padding: Absolute padding of the fine cells' bounding boxes when locating points;
            by default √ε of the geometry dtype (1.5e-8 in float64).

    Example:
        >>> projection = L2Projection(V_coarse)
        >>> u_c = projection(u_fine)
    """

    method = "l2_projection"

    def __init__(
        self,
        space: fem.FunctionSpace,
        *,
        quadrature_degree: int | None = None,
        subdivisions: int = 1,
        bcs: Sequence[fem.DirichletBC] = (),
        petsc_options: dict[str, typing.Any] | None = None,
        padding: float | None = None,
    ):
        """Set up the projection (collective); see the class docstring for the arguments."""
        degree = _degree(space)
        if quadrature_degree is None:
            quadrature_degree = 2 * degree + 2
        if check_integer(quadrature_degree, "quadrature_degree") < 2 * degree:
            raise ValueError(
                f"quadrature_degree must be an integer ≥ 2 × (degree of the space) = "
                f"{2 * degree} for an exact mass matrix, got {quadrature_degree!r}."
            )
        check_integer(subdivisions, "subdivisions", minimum=1)
        bcs = list(bcs)
        for bc in bcs:
            if not isinstance(bc, fem.DirichletBC) or bc.function_space not in (
                space,
                space._cpp_object,
            ):
                raise ValueError("bcs must be Dirichlet conditions on the projection's space.")
        self._space = space
        self.quadrature_degree = int(quadrature_degree)
        self.subdivisions = int(subdivisions)
        mesh = space.mesh
        value_shape = tuple(space.value_shape)
        # Fine meshes on which the composite rule was found exact, by id (kept alive).
        self._exact_on: dict[int, _mesh.Mesh] = {}
        self._composite: _CompositeRule | None = None
        if self.subdivisions == 1:
            dx = measure(mesh, self.quadrature_degree)
            quadrature = quadrature_space(mesh, self.quadrature_degree, value_shape)
        else:
            cell = mesh.basix_cell().name
            points, weights = composite_quadrature(cell, self.quadrature_degree, self.subdivisions)
            metadata = {
                "quadrature_rule": "custom",
                "quadrature_points": points,
                "quadrature_weights": weights,
            }
            dx = ufl.Measure("dx", domain=mesh, metadata=metadata)
            element = basix.ufl.quadrature_element(
                cell, value_shape, scheme="custom", points=points, weights=weights
            )
            quadrature = fem.functionspace(mesh, element)
            self._composite = _CompositeRule(cell, points, weights, dx)
        self._solver = MassSolver(space, dx, petsc_options, bcs=bcs)
        #: The fine field at the coarse quadrature points, ``(num_cells, num_points, *shape)``.
        self.quadrature_values = fem.Function(quadrature, dtype=self._solver.dtype)
        self._rhs = fem.form(
            ufl.inner(self.quadrature_values, ufl.TestFunction(space)) * dx,
            dtype=self._solver.dtype,
        )
        self._transfer = _NonmatchingTransfer(quadrature, padding)

    @property
    def space(self) -> fem.FunctionSpace:
        """The coarse space ``V_c``."""
        return self._space

    @property
    def ksp(self) -> typing.Any:
        """The PETSc KSP of the mass solve."""
        return self._solver.ksp

    def __call__(self, u: fem.Function, out: fem.Function | None = None) -> fem.Function:
        """Project ``u`` (any mesh, same value shape) onto :attr:`space`.

        Collective. The point data for ``u``'s space are computed at the first call and
        kept; the mass matrix and solver were set up at construction.

        Args:
            u: The fine function.
            out: Function on :attr:`space` to write into; by default a new one.

        Returns:
            ``out``, ghosts updated.

        Raises:
            ValueError: On all ranks, with ``subdivisions > 1``, if the composite rule is
                not exact on ``u``'s mesh (its cells are not the sub-cells of the rule),
                or if some quadrature points lie outside ``u``'s mesh.
            RuntimeError: On all ranks, if the mass solve did not converge.
        """
        out = _output(self._space, u, out)
        self._transfer.check(u, out)
        if np.dtype(u.dtype) != self._solver.dtype:
            raise TypeError(f"L2Projection needs {self._solver.dtype} fields, got {u.dtype}.")
        if self._composite is not None:
            self._check_composite_rule(u.function_space)
        self._transfer.transfer(u, self.quadrature_values)
        self._solver.solve(self._rhs, out)
        return out

    def _check_composite_rule(self, source: fem.FunctionSpace) -> None:
        """Check that the composite rule is exact on ``source``'s mesh (collective, once).

        Raises:
            ValueError: On all ranks, if the rule does not integrate a field that is
                linear on each fine cell exactly.
        """
        fine_mesh = source.mesh
        if id(fine_mesh) in self._exact_on:
            return
        assert self._composite is not None
        data = self._transfer.data(source)  # the points' owners, reused by the check
        mismatch = _composite_rule_mismatch(
            self._composite,
            self._space.mesh,
            self._transfer.cells,
            data,
            fine_mesh,
            self.quadrature_degree,
        )
        if not mismatch <= _COMPOSITE_TOLERANCE:  # the same number on every rank
            m, tdim = self.subdivisions, self._space.mesh.topology.dim
            raise ValueError(
                f"L2Projection(subdivisions={m}) is not exact on this fine mesh: its cells "
                f"are not the {m}^{tdim} = {m**tdim} sub-cells of each coarse cell that the "
                f"composite rule assumes (a field linear on each fine cell is integrated "
                f"with relative error {mismatch:.2e} > {_COMPOSITE_TOLERANCE:.0e}). The "
                f"rule is exact when the fine mesh refines the coarse one uniformly by "
                f"{m}: create_interval, create_rectangle, create_box or "
                f"create_unit_square/cube with {m}·n cells per direction inside n, with "
                "quadrilaterals, hexahedra, or triangles with diagonal 'right' or 'left' "
                "(as the coarse mesh); not diagonal 'crossed', 'left_right' or "
                "'right_left', and not dolfinx.mesh.refine, which splits triangles "
                "differently. Pass the refinement factor as subdivisions, or use "
                "subdivisions=1 with a higher quadrature_degree for an approximate "
                "projection."
            )
        self._exact_on[id(fine_mesh)] = fine_mesh


#: Largest relative error of the composite rule on a field linear on each fine cell for
#: which :class:`L2Projection` accepts a fine mesh (round-off is ~1e-14 on 10⁵ cells).
_COMPOSITE_TOLERANCE = 1e-10


class _CompositeRule(typing.NamedTuple):
    """The composite rule of an :class:`L2Projection` on its reference cell."""

    cell: str
    points: npt.NDArray[np.float64]
    weights: npt.NDArray[np.float64]
    dx: ufl.Measure


def _pseudo_random(points: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """Values in ``[0, 1)`` that look random, a function of the points ``(n, 3)`` alone."""
    waves = np.sin(points @ np.array([12.9898, 78.233, 37.719])) * 43758.5453
    return typing.cast(npt.NDArray[np.float64], waves - np.floor(waves))


def _composite_rule_mismatch(
    rule: _CompositeRule,
    coarse_mesh: _mesh.Mesh,
    coarse_cells: npt.NDArray[np.int32],
    data: typing.Any,
    fine_mesh: _mesh.Mesh,
    quadrature_degree: int,
) -> float:
    """Relative error of the composite rule on a field that is linear on each fine cell.

    The field ``w`` (DG1 on the fine mesh; DG0 for a rule of degree < 2) takes values in
    ``[1, 2]`` that look random and are a function of each dof's position and its cell's
    midpoint alone, so ``w`` jumps across every fine facet and does not depend on the
    partition. ``w`` is evaluated at the rule's points on the coarse cells with the
    point-ownership ``data`` of the projection's transfer, and ``∫ w`` by the rule is
    compared with ``∫ w`` integrated exactly on the fine cells. The two agree to round-off
    if every sub-cell of the rule lies inside one fine cell; a sub-cell that straddles a
    fine facet integrates a jump with a rule made for polynomials.

    Collective; the same value on every rank (sums in rank order).
    """
    dtype = np.dtype(fine_mesh.geometry.x.dtype)
    comm = fine_mesh.comm
    tdim = fine_mesh.topology.dim
    cells = fine_mesh.topology.index_map(tdim)
    degree = 1 if quadrature_degree >= 2 else 0
    fine_space = fem.functionspace(fine_mesh, ("DG", degree))
    w = fem.Function(fine_space, dtype=dtype)
    # Coordinates scaled to the mesh's bounding box, so the values vary at any size.
    x = fine_mesh.geometry.x
    lower, upper = np.min(x, axis=0, initial=np.inf), np.max(x, axis=0, initial=-np.inf)
    comm.Allreduce(MPI.IN_PLACE, lower, op=MPI.MIN)
    comm.Allreduce(MPI.IN_PLACE, upper, op=MPI.MAX)
    extent = np.where(upper > lower, upper - lower, 1.0)
    all_cells = np.arange(cells.size_local + cells.num_ghosts, dtype=np.int32)
    midpoints = _mesh.compute_midpoints(fine_mesh, tdim, all_cells)
    cell_dofs = fine_space.dofmap.list[all_cells]
    positions = 0.7 * fine_space.tabulate_dof_coordinates()[cell_dofs]
    positions += 0.3 * midpoints[:, None, :]
    w.x.array[cell_dofs] = 1.0 + _pseudo_random((positions - lower) / extent)

    quadrature = fem.functionspace(
        coarse_mesh,
        basix.ufl.quadrature_element(
            rule.cell, (), scheme="custom", points=rule.points, weights=rule.weights
        ),
    )
    at_points = fem.Function(quadrature, dtype=dtype)
    at_points.interpolate_nonmatching(w, coarse_cells, data)
    composite = fem.assemble_scalar(fem.form(at_points * rule.dx, dtype=dtype))
    exact = fem.assemble_scalar(fem.form(w * ufl.dx(domain=fine_mesh), dtype=dtype))
    local = np.array([composite, exact], dtype=np.float64)
    everyone = np.empty((comm.size, 2), dtype=np.float64)
    comm.Allgather(local, everyone)
    composite, exact = np.sum(everyone, axis=0)  # rank order: bitwise the same everywhere
    return float(abs(composite - exact) / abs(exact))


def _coordinate_degree(msh: _mesh.Mesh) -> int:
    """Polynomial degree of the coordinate element (1 for affine simplices, 2 for Q1)."""
    domain = typing.cast(typing.Any, msh.ufl_domain())
    return int(domain.ufl_coordinate_element().embedded_superdegree)


#: The MPI tag DOLFINx uses to build index maps (``dolfinx::MPI::tag::consensus_nbx``).
_INDEX_MAP_TAG = 1201


class _CompiledAverage(typing.NamedTuple):
    """One input of :class:`CellAverage`: its form, coefficients and assembly buffer."""

    form: fem.Form
    coefficients: tuple[fem.Function, ...]
    buffer: npt.NDArray[np.floating]
    quadrature_degree: int


def _check_cell_average_arguments(
    space: fem.FunctionSpace, fine_mesh: _mesh.Mesh, quadrature_degree: int | None
) -> None:
    """:class:`CellAverage`'s argument checks (rank-local, before any collective call)."""
    coarse = space.mesh
    value_shape = tuple(int(n) for n in space.value_shape)
    if space.dofmap.list.shape[1] != 1 or _degree(space) != 0:
        raise ValueError(
            "CellAverage restricts to a DG0 space (one degree of freedom per cell), got "
            f"{space.ufl_element()}."
        )
    if space.dofmap.bs != int(np.prod(value_shape, dtype=int)):
        raise ValueError("CellAverage does not support symmetric tensor spaces.")
    if not isinstance(fine_mesh, _mesh.Mesh):
        raise TypeError(f"fine_mesh must be a dolfinx.mesh.Mesh, got {type(fine_mesh)}.")
    if not _same_communicator(coarse.comm, fine_mesh.comm):
        raise ValueError("The fine and coarse meshes must share one MPI communicator.")
    tdim = coarse.topology.dim
    if fine_mesh.topology.dim != tdim or fine_mesh.geometry.dim != coarse.geometry.dim:
        raise ValueError(
            f"The coarse mesh has topological/geometric dimension {tdim}/"
            f"{coarse.geometry.dim}, the fine mesh {fine_mesh.topology.dim}/"
            f"{fine_mesh.geometry.dim}."
        )
    dtype = np.dtype(coarse.geometry.x.dtype)
    if np.dtype(fine_mesh.geometry.x.dtype) != dtype:
        raise TypeError("The fine and coarse mesh geometries have different dtypes.")
    if quadrature_degree is not None:
        check_integer(quadrature_degree, "quadrature_degree")
    coarse_cells = coarse.topology.index_map(tdim)
    if dtype == np.float32 and coarse_cells.size_global >= 2**24:
        raise ValueError("float32 meshes are limited to 2**24 coarse cells.")


class CellAverage:
    """Restriction by exact averages over the cells of a coarse mesh: ``(R w)_K``.

    For a fine mesh *nested* in the coarse one (every fine cell inside one coarse cell),
    ``(R w)_K = |K|⁻¹ ∫_K w dx = |K|⁻¹ Σ_{k ⊂ K} ∫_k w dx`` over the fine cells ``k`` in
    each coarse cell ``K``: a DG0 function on the coarse mesh. ``w`` is a
    :class:`dolfinx.fem.Function` of any space on the fine mesh or a UFL expression of
    such functions (e.g. the flux ``a * ufl.grad(u_f)`` or ``u_f**2 / 2 - ν * u_f.dx(0)``).
    The fine-cell integrals are the entries of the assembled linear form ``∫ w · q dx``
    over the test functions ``q`` of the fine DG0 space, exact when the quadrature rule
    integrates ``w`` exactly on each fine cell (any polynomial ``w`` with the default
    degree). They are summed over the fine cells of each coarse cell, across ranks: each
    rank adds up its fine cells per coarse cell and sends one value per coarse cell it
    touches to the rank that owns that coarse cell (a :class:`dolfinx.la.Vector` on an
    index map whose ghosts are those coarse cells, ``scatter_reverse``). The two meshes
    may be partitioned independently.

    Unlike :class:`L2Projection`, which evaluates ``w`` at a quadrature rule's points on
    the coarse cells, this sees every fine cell: it is exact for fields that jump many
    times within a coarse cell, the fields a closure is about. It needs nested meshes.

    The set-up (collective, at construction) finds the coarse cell of each fine cell's
    midpoint (non-matching interpolation of the coarse cell indices) and checks that the
    meshes are nested: per coarse cell, the volumes and centroids of its fine cells must
    add up to its own (relative ``tolerance``). One form is compiled per distinct input
    expression (and dtype), at its first call, and kept (the last 32).

    Args:
        space: The coarse DG0 space, any value shape (scalar, vector, tensor; not
            symmetric tensors).
        fine_mesh: The fine mesh; each of its cells must lie inside one coarse cell.
        quadrature_degree: Degree of the rule on the fine cells; by default the
            estimated polynomial degree of each input (UFL's estimate, as for ``dx``).
        tolerance: Relative tolerance of the nesting check (volume per coarse cell, and
            centroid relative to ``|K|^{1/d}``).
        padding: Absolute padding of the coarse cells' bounding boxes when locating the
            fine midpoints; by default √ε of the geometry dtype.

    Raises:
        ValueError: On all ranks, if ``space`` is not DG0, the meshes are incompatible, or
            the fine mesh is not nested in the coarse one.

    Example:
        >>> average = CellAverage(fem.functionspace(coarse, ("DG", 0, (2,))), fine)
        >>> flux = average(a * ufl.grad(u_fine))  # coarse DG0 vector function
        >>> average(ufl.as_vector([u_fine.dx(0), u_fine]), out=flux)  # another input: another form
    """

    method = "cell_average"

    def __init__(
        self,
        space: fem.FunctionSpace,
        fine_mesh: _mesh.Mesh,
        *,
        quadrature_degree: int | None = None,
        tolerance: float = 1e-10,
        padding: float | None = None,
    ):
        """Set up the averaging (collective); see the class docstring for the arguments."""
        _check_cell_average_arguments(space, fine_mesh, quadrature_degree)
        coarse = space.mesh
        tdim = coarse.topology.dim
        dtype = np.dtype(coarse.geometry.x.dtype)
        value_shape = tuple(int(n) for n in space.value_shape)
        coarse_cells = coarse.topology.index_map(tdim)

        self._space = space
        self._fine_mesh = fine_mesh
        self._comm = coarse.comm
        self._dtype = dtype  # of the geometry, hence of every function on these meshes
        self._value_shape = value_shape
        self._bs = space.dofmap.bs
        self.quadrature_degree = None if quadrature_degree is None else int(quadrature_degree)
        self.tolerance = float(tolerance)
        if padding is None:
            padding = float(np.sqrt(np.finfo(dtype).eps))
        self._num_coarse = coarse_cells.size_local
        self._coarse_dofs = space.dofmap.list[: self._num_coarse, 0]
        self._num_fine = fine_mesh.topology.index_map(tdim).size_local
        self._fine_space = fem.functionspace(fine_mesh, ("DG", 0, value_shape))
        self._fine_dofs = self._fine_space.dofmap.list[: self._num_fine, 0]
        self._forms: collections.OrderedDict[typing.Any, _CompiledAverage] = (
            collections.OrderedDict()
        )
        self._vectors: dict[int, la.Vector] = {}

        # Collective from here on.
        self._map_parents(padding)
        self._check_nesting()

    def _map_parents(self, padding: float) -> None:
        """The parent coarse cell of each owned fine cell, and the map that sums into it.

        The parent (its global index) is the coarse DG0 function of global cell indices,
        evaluated at the fine cells' midpoints (collective).
        """
        coarse, fine_mesh, dtype = self._space.mesh, self._fine_mesh, self._dtype
        coarse_cells = coarse.topology.index_map(coarse.topology.dim)
        scalar_coarse = fem.functionspace(coarse, ("DG", 0))
        scalar_fine = fem.functionspace(fine_mesh, ("DG", 0))
        offset = coarse_cells.local_range[0]
        index = fem.Function(scalar_coarse, dtype=dtype)
        index.x.array[scalar_coarse.dofmap.list[: self._num_coarse, 0]] = offset + np.arange(
            self._num_coarse
        )
        index.x.scatter_forward()
        fine_cells = np.arange(self._num_fine, dtype=np.int32)
        data = fem.create_interpolation_data(scalar_fine, scalar_coarse, fine_cells, padding)
        owners = np.asarray(data.src_owner, dtype=np.int32)
        outside = self._comm.allreduce(int(np.count_nonzero(owners < 0)), op=MPI.SUM)
        if outside:
            raise ValueError(
                f"The fine mesh is not nested in the coarse mesh: the midpoints of {outside} "
                "fine cell(s) lie outside the coarse mesh."
            )
        parent_values = fem.Function(scalar_fine, dtype=dtype)
        parent_values.interpolate_nonmatching(index, fine_cells, data)
        parents = np.rint(
            parent_values.x.array[scalar_fine.dofmap.list[: self._num_fine, 0]]
        ).astype(np.int64)

        # An index map of the coarse cells owned here, with the coarse cells of other ranks
        # that hold fine cells of this rank as ghosts: scatter_reverse adds their sums.
        remote = owners != self._comm.rank
        ghosts, first, inverse = np.unique(parents[remote], return_index=True, return_inverse=True)
        local = np.empty(self._num_fine, dtype=np.int64)
        local[~remote] = parents[~remote] - offset
        local[remote] = self._num_coarse + inverse.reshape(-1)
        self._index_map = common.IndexMap(
            self._comm,
            self._num_coarse,
            ghosts.astype(np.int64),
            owners[remote][first].astype(np.int32),
            _INDEX_MAP_TAG,
        )
        self._order = np.argsort(local, kind="stable")
        sorted_local = local[self._order]
        self._starts = np.flatnonzero(np.diff(sorted_local, prepend=-1))
        self._targets = sorted_local[self._starts]

    def _check_nesting(self) -> None:
        """Per coarse cell, the fine cells' volumes and first moments must add up (collective)."""
        coarse, fine_mesh, dtype = self._space.mesh, self._fine_mesh, self._dtype
        tdim = coarse.topology.dim
        x_fine, x_coarse = ufl.SpatialCoordinate(fine_mesh), ufl.SpatialCoordinate(coarse)
        moment_degree = 2 * max(_coordinate_degree(coarse), _coordinate_degree(fine_mesh))
        width = 1 + coarse.geometry.dim

        def moments(msh, x, num_cells):
            V = fem.functionspace(msh, ("DG", 0, (width,)))
            integrand = ufl.inner(ufl.as_vector([1.0, *x]), ufl.TestFunction(V))
            dx = ufl.dx(domain=msh, metadata={"quadrature_degree": moment_degree})
            vector = fem.assemble_vector(fem.form(integrand * dx, dtype=dtype))
            return vector.array.reshape(-1, width)[V.dofmap.list[:num_cells, 0]]

        summed = self._sum(moments(fine_mesh, x_fine, self._num_fine))
        own = moments(coarse, x_coarse, self._num_coarse)
        volume = own[:, 0]
        self._volume = summed[:, 0].copy()
        volume_error = np.abs(summed[:, 0] - volume) / volume
        with np.errstate(divide="ignore", invalid="ignore"):
            centroids = summed[:, 1:] / summed[:, :1]
        centroid_error = np.linalg.norm(centroids - own[:, 1:] / own[:, :1], axis=1) / (
            volume ** (1.0 / tdim)
        )
        worst = np.nan_to_num(np.maximum(volume_error, centroid_error), nan=np.inf)
        worst_error = self._comm.allreduce(float(np.max(worst, initial=0.0)), op=MPI.MAX)
        if not worst_error <= self.tolerance:
            raise ValueError(
                "The fine mesh is not nested in the coarse mesh: the fine cells whose "
                "midpoints lie in a coarse cell do not tile it (relative mismatch of volume "
                f"or centroid up to {worst_error:.2e} > tolerance {self.tolerance:.1e}). "
                "Refine the coarse mesh uniformly, or use L2Projection."
            )

    @property
    def space(self) -> fem.FunctionSpace:
        """The coarse DG0 space."""
        return self._space

    @property
    def fine_mesh(self) -> _mesh.Mesh:
        """The fine mesh whose functions and expressions are averaged."""
        return self._fine_mesh

    @property
    def volumes(self) -> npt.NDArray[np.floating]:
        """Volume of each owned coarse cell, the sum of its fine cells', ``(num_cells,)``."""
        return self._volume

    def _vector(self, width: int) -> la.Vector:
        vector = self._vectors.get(width)
        if vector is None:
            vector = la.vector(self._index_map, width, self._dtype)
            self._vectors[width] = vector
        return vector

    def _sum(self, values: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
        """Sums of ``values`` ``(num_fine_cells, width)`` per owned coarse cell (collective).

        Returns:
            A view ``(num_coarse_cells, width)`` of an internal buffer.
        """
        width = values.shape[1]
        vector = self._vector(width)
        array = vector.array.reshape(-1, width)
        array[:] = 0.0
        if self._starts.size:
            array[self._targets] = np.add.reduceat(values[self._order], self._starts, axis=0)
        vector.scatter_reverse(la.InsertMode.add)
        return array[: self._num_coarse]

    def _compiled(self, w: typing.Any, dtype: np.dtype) -> tuple[typing.Any, int, bool]:
        """Local checks of an input; returns (cache key, quadrature degree, cached?)."""
        expression = ufl.as_ufl(w)
        fine_domain = self._fine_mesh.ufl_domain()
        if any(d != fine_domain for d in ufl.domain.extract_domains(expression)):
            raise ValueError("The input must be a function or expression on the fine mesh.")
        if extract_arguments(expression):
            raise ValueError("The input must not contain test or trial functions.")
        if expression.ufl_free_indices:
            raise ValueError("The input must not have free indices.")
        if tuple(expression.ufl_shape) != self._value_shape:
            raise ValueError(
                f"Cannot average a field of value shape {tuple(expression.ufl_shape)} into a "
                f"space of value shape {self._value_shape}."
            )
        degree = self.quadrature_degree
        if degree is None:  # UFL's estimate for dx
            coordinate_degree = _coordinate_degree(self._fine_mesh)
            degree = int(estimate_total_polynomial_degree(expression, coordinate_degree))
        key = (renumber_indices(expression), degree, dtype.str)
        return key, degree, key in self._forms

    def __call__(
        self, u: fem.Function | ufl.core.expr.Expr, out: fem.Function | None = None
    ) -> fem.Function:
        """Average ``u`` over the coarse cells into :attr:`space` (collective).

        Every rank checks its input first, and all ranks raise if one finds a problem.

        Args:
            u: A function of any space on the fine mesh, or a UFL expression on the fine
                mesh, of the value shape of :attr:`space`. Ghost values of the functions in
                it are updated (``scatter_forward``).
            out: Function on :attr:`space` to write into; by default a new one (of ``u``'s
                dtype for a function, the geometry's otherwise).

        Returns:
            ``out``, ghosts updated.

        Raises:
            TypeError, ValueError: On all ranks, for an input or ``out`` that does not fit.
        """
        error: Exception | None = None
        key = degree = None
        cached = True
        dtype = self._dtype
        try:
            if isinstance(u, fem.Function):
                if u.function_space.mesh is not self._fine_mesh:
                    raise ValueError("The function to average lives on another mesh.")
                dtype = np.dtype(u.dtype)
            elif not isinstance(u, ufl.core.expr.Expr):
                raise TypeError(
                    f"Expected a dolfinx.fem.Function or a UFL expression, got {type(u).__name__}."
                )
            if out is not None and (
                not isinstance(out, fem.Function) or out.function_space != self._space
            ):
                raise ValueError("out must be a dolfinx.fem.Function on the restriction's space.")
            if out is not None and np.dtype(out.dtype) != dtype:
                raise TypeError(
                    f"The input has dtype {dtype} but the output has dtype "
                    f"{np.dtype(out.dtype)}; cast explicitly if that is intended."
                )
            key, degree, cached = self._compiled(u, dtype)
        except Exception as caught:  # agreed on below, before any collective
            error = caught
        # One agreement: all ranks raise, or all compile if any rank lacks the form.
        cached_everywhere = agree_on(
            self._comm, cached, "Averaging over the coarse cells", cause=error
        )
        assert key is not None and degree is not None
        if out is None:  # collective: a new vector's scatterer
            out = fem.Function(self._space, dtype=dtype)
        if not all(cached_everywhere):
            self._forms[key] = self._compile(key[0], degree, dtype)
            while len(self._forms) > 32:
                self._forms.popitem(last=False)
        compiled = self._forms[key]
        self._forms.move_to_end(key)
        for coefficient in compiled.coefficients:
            coefficient.x.scatter_forward()
        compiled.buffer[:] = 0.0
        fem.assemble_vector(compiled.buffer, compiled.form)  # type: ignore[arg-type]
        integrals = compiled.buffer.reshape(-1, self._bs)[self._fine_dofs]
        sums = self._sum(integrals)
        values = out.x.array.reshape(-1, self._bs)
        values[self._coarse_dofs] = sums / self._volume[:, None]
        out.x.scatter_forward()
        return out

    def _compile(self, expression: typing.Any, degree: int, dtype: np.dtype) -> _CompiledAverage:
        """The form ``∫ w · q dx`` on the fine mesh (collective: JIT compilation)."""
        q = ufl.TestFunction(self._fine_space)
        dx = ufl.dx(domain=self._fine_mesh, metadata={"quadrature_degree": degree})
        ufl_form = ufl.inner(expression, q) * dx
        form = fem.form(ufl_form, dtype=dtype)
        coefficients = tuple(c for c in ufl_form.coefficients() if isinstance(c, fem.Function))
        size = self._fine_space.dofmap.index_map.size_local
        size += self._fine_space.dofmap.index_map.num_ghosts
        buffer = np.zeros(size * self._bs, dtype=dtype)
        return _CompiledAverage(form, coefficients, buffer, degree)


def restrict(
    u: fem.Function,
    space: fem.FunctionSpace,
    method: str = "l2_projection",
    out: fem.Function | None = None,
    **kwargs: typing.Any,
) -> fem.Function:
    """Restrict ``u`` to ``space`` once (build a restriction object to reuse its set-up).

    Args:
        u: The fine function.
        space: The coarse space.
        method: ``"l2_projection"`` (:class:`L2Projection`), ``"interpolation"``
            (:class:`Interpolation`) or ``"cell_average"`` (:class:`CellAverage`; its
            ``fine_mesh`` is ``u``'s mesh unless given).
        out: Function on ``space`` to write into; by default a new one.
        kwargs: Passed to the restriction's constructor.

    Returns:
        The restricted function.
    """
    if method == "cell_average" and isinstance(u, fem.Function):
        kwargs.setdefault("fine_mesh", u.function_space.mesh)
    return make_restriction(space, method, **kwargs)(u, out)


#: The restrictions by method name (their ``method`` attribute).
RESTRICTIONS: dict[str, type] = {
    cls.method: cls for cls in (CellAverage, Interpolation, L2Projection)
}


def make_restriction(space: fem.FunctionSpace, method: str, **kwargs: typing.Any) -> Restriction:
    """Build the restriction named ``method`` (a key of :data:`RESTRICTIONS`).

    Args:
        space: The coarse space.
        method: ``"cell_average"``, ``"interpolation"`` or ``"l2_projection"``.
        kwargs: Passed to the constructor (``CellAverage`` needs ``fine_mesh``).
    """
    if method not in RESTRICTIONS:
        raise ValueError(
            f"Unknown restriction method {method!r}; choose from {sorted(RESTRICTIONS)}."
        )
    return typing.cast(Restriction, RESTRICTIONS[method](space, **kwargs))
