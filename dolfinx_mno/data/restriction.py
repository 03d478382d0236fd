"""Restriction (filtering) of fine fields onto a coarse space on another mesh.

A learned closure is trained on *filtered* fine simulations: the fine field
``u_f ∈ V_f`` (fine mesh) is restricted to the resolved space ``V_c`` (coarse mesh). The
two meshes need not be nested, nor partitioned alike under MPI. Two restrictions are
offered; both are linear, reproduce every function of ``V_c`` exactly, and keep the data
they need (point ownership, mass matrix, solver) between calls:

* :class:`Interpolation`: ``I u_f``, the interpolant of ``u_f`` in ``V_c``, by evaluating
  ``u_f`` at the interpolation points of ``V_c``
  (:meth:`dolfinx.fem.Function.interpolate_nonmatching`). Cheap, local, and it sees the
  fine field only at a few points per coarse cell: the small scales alias.
* :class:`L2Projection`: ``P u_f ∈ V_c`` with ``(P u_f, φ) = (u_f, φ)`` for all
  ``φ ∈ V_c``: the best approximation in L², a true average over each coarse cell. The
  fine field is brought to the points of a degree-``q`` quadrature rule on the coarse mesh
  (non-matching interpolation into a quadrature space), and ``M a = b`` is solved with
  ``M`` and ``b`` integrated by that rule (PETSc, conjugate gradients).

See ``docs/data.md`` for when to use which and their accuracy.
"""

from __future__ import annotations

import itertools
import typing

from mpi4py import MPI

import numpy as np
import ufl
from dolfinx import cpp as _cpp
from dolfinx import fem

from dolfinx_mno.quadrature import measure, quadrature_space

__all__ = ["Interpolation", "L2Projection", "Restriction", "restrict"]


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
                mesh (they would silently get the value zero).
        """
        entry = self._data.get(id(source))
        if entry is not None:
            return entry[1]
        data = fem.create_interpolation_data(self.target, source, self.cells, self.padding)
        missing = np.flatnonzero(np.asarray(data.src_owner) < 0)
        first = None
        if missing.size:
            mesh = self.target.mesh
            points = _cpp.fem.interpolation_coords(
                self.target.element._cpp_object, mesh.geometry._cpp_object, self.cells
            )
            first = tuple(float(c) for c in points[: mesh.geometry.dim, missing[0]])
        report = self.target.mesh.comm.allgather((int(missing.size), first))
        total = sum(count for count, _ in report)
        if total:
            example = next(point for _, point in report if point is not None)
            raise ValueError(
                f"{total} interpolation point(s) of the coarse space lie outside the fine mesh "
                f"(for example {example}). Both meshes must cover the same domain; increase "
                f"padding (now {self.padding:g}) for boundaries that differ by round-off."
            )
        self._data[id(source)] = (source, data)
        return data

    def transfer(self, u: fem.Function, out: fem.Function) -> None:
        """Evaluate ``u`` at the target's points into ``out`` (collective)."""
        data = self.data(u.function_space)
        u.x.scatter_forward()  # the owner of each point evaluates u with its ghosts
        out.interpolate_nonmatching(u, self.cells, data)
        out.x.scatter_forward()


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
    """

    def __init__(
        self,
        space: fem.FunctionSpace,
        dx: ufl.Measure,
        petsc_options: dict[str, typing.Any] | None = None,
    ):
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
        trial, test = ufl.TrialFunction(space), ufl.TestFunction(space)
        self._matrix = fem_petsc.assemble_matrix(
            fem.form(ufl.inner(trial, test) * dx, dtype=scalar)
        )
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
        self._rhs.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
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

    Args:
        space: The coarse space ``V_c`` (real, PETSc's scalar type).
        quadrature_degree: ``q``, at least ``2k`` so that the mass matrix is exact; by
            default ``2k + 2``.
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
        petsc_options: dict[str, typing.Any] | None = None,
        padding: float | None = None,
    ):
        degree = _degree(space)
        if quadrature_degree is None:
            quadrature_degree = 2 * degree + 2
        if not isinstance(quadrature_degree, int | np.integer) or quadrature_degree < 2 * degree:
            raise ValueError(
                f"quadrature_degree must be an integer ≥ 2 × (degree of the space) = "
                f"{2 * degree} for an exact mass matrix, got {quadrature_degree!r}."
            )
        self._space = space
        self.quadrature_degree = int(quadrature_degree)
        mesh = space.mesh
        dx = measure(mesh, self.quadrature_degree)
        quadrature = quadrature_space(mesh, self.quadrature_degree, tuple(space.value_shape))
        self._solver = MassSolver(space, dx, petsc_options)
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
            RuntimeError: On all ranks, if the mass solve did not converge.
        """
        out = _output(self._space, u, out)
        self._transfer.check(u, out)
        if np.dtype(u.dtype) != self._solver.dtype:
            raise TypeError(f"L2Projection needs {self._solver.dtype} fields, got {u.dtype}.")
        self._transfer.transfer(u, self.quadrature_values)
        self._solver.solve(self._rhs, out)
        return out


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
        method: ``"l2_projection"`` (:class:`L2Projection`) or ``"interpolation"``
            (:class:`Interpolation`).
        out: Function on ``space`` to write into; by default a new one.
        kwargs: Passed to the restriction's constructor.

    Returns:
        The restricted function.
    """
    return make_restriction(space, method, **kwargs)(u, out)


def make_restriction(space: fem.FunctionSpace, method: str, **kwargs: typing.Any) -> Restriction:
    """Build the restriction named ``method`` (``"l2_projection"`` or ``"interpolation"``)."""
    methods: dict[str, typing.Any] = {"l2_projection": L2Projection, "interpolation": Interpolation}
    if method not in methods:
        raise ValueError(f"Unknown restriction method {method!r}; choose from {sorted(methods)}.")
    return typing.cast(Restriction, methods[method](space, **kwargs))
