"""PETSc solver glue for forms with closures.

Thin subclasses of :mod:`dolfinx.fem.petsc` problems that update the closures a form
contains at the right moment:

* :class:`NonlinearProblem` (implicit coupling) re-evaluates every closure, with its
  tangent, at each Newton iterate, and builds the exact Jacobian with
  :func:`dolfinx_mno.derivative` when none is given.
* :class:`LinearProblem` (explicit/IMEX coupling) evaluates the closures once, at the
  current (previous-step) state of their operands, before assembling and solving.

Both check that closures are integrated with their own quadrature rule
(:func:`dolfinx_mno.check_form`) before compiling anything. DOLFINx's own problems never
update closures; importing :mod:`dolfinx_mno` makes them refuse forms with closures and
name these classes instead (:mod:`dolfinx_mno.guard`).

**Jacobians.** A Jacobian given to :class:`NonlinearProblem` must hold the tangent of
every closure that supports one and whose operands depend on ``u``, as
:func:`dolfinx_mno.derivative` builds it: ``ufl.derivative(F, u)`` treats a closure as a
coefficient independent of ``u``, and Newton's method then converges linearly, to a looser
tolerance, without a word. Such a ``J`` raises :class:`ValueError` unless
``frozen_closures=True`` says that a Picard (frozen-closure) Jacobian is meant. Closures
without a tangent (:class:`dolfinx_mno.NonlocalClosure`) are frozen in every Jacobian by
design: Picard, or the preconditioner of a matrix-free ``-snes_mf_operator`` solve.

**Updates.** :meth:`LinearProblem.solve` refuses to assemble a closure that has never
been updated (``update_closures=False`` at the first solve, or a closure left out of
``closures=``), which holds no model output yet.

**Destruction.** Destroying a parallel PETSc object is collective (MUMPS, for one, frees
its factors collectively). DOLFINx's problems destroy their objects in ``__del__``, and
the garbage collector may finalise problems in a different order on different ranks (at
exit, or when it collects reference cycles): two ranks then wait in two different
destroys forever. These subclasses do not destroy in ``__del__``; the dropped petsc4py
objects go to PETSc's queue of delayed destruction on their communicator, which
:mod:`dolfinx_mno.petsc_garbage` empties collectively (it destroys what is queued on every
rank). Constructing a problem is collective, so each constructor empties the queues of the
problems dropped before, on their meshes' communicators too: a loop that creates and drops
problems, on one mesh or on new ones, accumulates neither their solvers and factors nor
MPI communicators. ``PetscFinalize`` empties the rest.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

from mpi4py import MPI
from petsc4py import PETSc

import dolfinx.fem.petsc as _fem_petsc
import dolfinx.la.petsc as _la_petsc
import numpy as np
import numpy.typing as npt
import ufl
from dolfinx import fem

from dolfinx_mno import petsc_garbage
from dolfinx_mno.base import ClosureBase
from dolfinx_mno.closure import Closure, derivative
from dolfinx_mno.guard import closures_in, forms_in
from dolfinx_mno.quadrature import check_form

__all__ = ["LinearProblem", "NonlinearProblem", "check_jacobian"]


def _check_updated(in_forms: Sequence[ClosureBase], updated: Sequence[ClosureBase]) -> None:
    """Raise if a closure of the forms is never updated by the solve and never was before.

    Update counts are the same on every rank, so every rank raises, before any collective.
    """
    counts = {c.count() for c in updated}
    stale = [c for c in in_forms if c.update_count == 0 and c.count() not in counts]
    if stale:
        raise RuntimeError(
            f"Closure(s) {_names(stale)} have never been updated and are not in this "
            "problem's closures, so the solve would assemble them without the model's "
            "values. Call closure.update() first, or leave closures=None so that the "
            "problem updates every closure of its forms."
        )


def check_petsc_dtype(forms: typing.Any) -> None:
    """Raise ``TypeError`` for forms on a mesh whose dtype is not PETSc's real type.

    PETSc has one scalar type per build (float64 for the ``dolfinx-solver-real`` wheel);
    DOLFINx compiles the forms of its PETSc problems in it, and a float32 mesh then fails
    deep in the form constructor with a list of nanobind signatures. Closures and their
    models run in float32 all the same: it is the PETSc solve that needs float64.

    Args:
        forms: A form or a (nested) sequence of forms; ``None`` entries are skipped.
    """
    petsc_dtype = np.dtype(PETSc.RealType)
    for form in forms_in(forms):
        for domain in form.ufl_domains():
            geometry = getattr(domain.ufl_cargo(), "geometry", None)
            dtype = getattr(getattr(geometry, "x", None), "dtype", petsc_dtype)
            if np.dtype(dtype) != petsc_dtype:
                raise TypeError(
                    f"The form is on a {np.dtype(dtype)} mesh, but PETSc's scalar type is "
                    f"{petsc_dtype}: dolfinx_mno.petsc problems (like dolfinx.fem.petsc's) "
                    f"assemble in PETSc's type. Build the mesh and the functions in "
                    f"{petsc_dtype} (create_unit_square(..., dtype=np.{petsc_dtype})); a "
                    "closure's model may still run in float32."
                )


def _petsc_objects(problem: typing.Any) -> list[typing.Any]:
    """A DOLFINx problem's PETSc objects, the blocks of nested vectors included.

    Their communicators differ: matrices and solver on the mesh's, vectors on their index
    maps' (:func:`dolfinx_mno.petsc_garbage.track` keeps a handle on each).
    """
    objects = [problem.solver, problem.A, problem.P_mat]
    for vector in (problem.b, problem.x):
        objects.append(vector)
        if vector.getType() == PETSc.Vec.Type.NEST:  # type: ignore[attr-defined]
            objects.extend(vector.getNestSubVecs())
    return objects


def _names(closures: Sequence[ClosureBase]) -> str:
    return ", ".join(f"'{closure.name}'" for closure in closures)


def check_jacobian(F: ufl.Form, J: typing.Any, u: typing.Any) -> None:
    """Raise if ``J`` misses the tangent of a closure of ``F`` that depends on ``u``.

    Pure UFL (no collective): every rank reaches the same verdict. Used by
    :class:`NonlinearProblem` and by :class:`dolfinx_mno.rollout.Rollout`, whose adjoint
    needs the exact Jacobian.

    Args:
        F: The residual.
        J: The Jacobian form(s).
        u: The unknown (or a sequence of unknowns).

    Raises:
        ValueError: ``J`` lacks the tangent of a closure whose operands depend on ``u``.
    """
    unknowns = list(u) if isinstance(u, Sequence) else [u]
    in_jacobian = {c.count() for form in forms_in(J) for c in form.coefficients()}
    missing = []
    for closure in closures_in(F, tangents=False):  # a tangent in F: its J is the user's
        if not (isinstance(closure, Closure) and closure.supports_tangent):
            continue  # frozen in the Jacobian by design
        if not any(closure.depends_on(unknown) for unknown in unknowns):
            continue
        try:
            tangent = closure.tangent
        except RuntimeError:  # never enabled, so no Jacobian holds it
            missing.append(closure)
            continue
        if tangent.count() not in in_jacobian:
            missing.append(closure)
    if missing:
        if len(unknowns) == 1:
            names = f"the unknown '{unknowns[0].name}'"
        else:  # by position too: unknowns often keep DOLFINx's default name 'f'
            used = [i for i, w in enumerate(unknowns) if any(c.depends_on(w) for c in missing)]
            names = "the unknowns " + ", ".join(f"u[{i}] ('{unknowns[i].name}')" for i in used)
        raise ValueError(
            f"The Jacobian J misses the tangent of closure(s) {_names(missing)}, whose "
            f"operands depend on {names}: Newton's method would converge "
            "slowly, to a looser tolerance. Build J with dolfinx_mno.derivative(F, u) "
            "(or leave J=None), or pass frozen_closures=True if a Picard (frozen-closure) "
            "Jacobian is meant."
        )


class FormData:
    """What some forms read but for the unknowns: constants, coefficients, mesh geometry.

    A matrix assembled once from such forms stays valid only while these values do not
    change; a time constant and a ``before_step`` hook may change them from one step to the
    next (a time-dependent coefficient, a step size in a ``fem.Constant``, a moved mesh).
    :meth:`changed` compares them with the values at the last :meth:`save`. Used by
    :class:`LinearProblem` (``reuse_matrix=True``) and by the rollouts' steps
    (:mod:`dolfinx_mno.step_adjoint`).

    Args:
        forms: UFL forms (``None`` and empty forms read nothing).
        unknowns: Functions whose values are not data (the state, the closures).
        comm: The communicator on which :meth:`changed` agrees.
    """

    def __init__(
        self, forms: Sequence[ufl.Form | None], unknowns: Sequence[typing.Any], comm: typing.Any
    ):
        excluded = {id(w) for w in unknowns}
        constants: dict[int, typing.Any] = {}
        functions: dict[int, typing.Any] = {}
        meshes: dict[int, typing.Any] = {}
        for form in forms:
            if form is None or form.empty():
                continue
            for domain in form.ufl_domains():
                meshes.setdefault(id(domain.ufl_cargo()), domain.ufl_cargo())
            for constant in ufl.algorithms.analysis.extract_constants(form):
                constants.setdefault(id(constant), constant)
            for coefficient in form.coefficients():
                if id(coefficient) not in excluded:
                    functions.setdefault(id(coefficient), coefficient)
        self._constants = list(constants.values())
        self._functions = list(functions.values())
        self._geometries = [mesh.geometry for mesh in meshes.values()]
        self._comm = comm
        self._saved = self._values()

    def _values(self) -> list[npt.NDArray[typing.Any]]:
        return [np.array(c.value, copy=True) for c in self._constants] + [
            w.copy() for w in self._arrays()
        ]

    def _arrays(self) -> list[npt.NDArray[typing.Any]]:
        return [f.x.array for f in self._functions] + [g.x for g in self._geometries]

    def save(self) -> None:
        """Remember the current values."""
        self._saved = self._values()

    def changed(self) -> bool:
        """Whether any value differs from the saved one on any rank (collective)."""
        if not self._constants and not self._functions and not self._geometries:
            return False  # alike on every rank: nothing to agree on
        current = [c.value for c in self._constants] + self._arrays()
        local = any(
            not np.array_equal(now, then) for now, then in zip(current, self._saved, strict=True)
        )
        # A flag in a buffer, not a pickled object: this runs at every step of a stepper
        # with reuse_matrix=True (the geometry is always compared, so never skipped).
        flag = np.array([local], dtype=np.int32)
        self._comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
        return bool(flag[0])


class NonlinearProblem(_fem_petsc.NonlinearProblem):
    """Nonlinear problem ``F(u) = 0`` whose residual contains closures, solved by SNES.

    At every residual evaluation the closures are updated at the current iterate (values
    and tangents), so Newton's method sees the exact residual and, with the default
    Jacobian, the exact linearisation.

    Tangents are computed at the updates of the closures that have one (made by
    :func:`dolfinx_mno.derivative`, or ``tangent=True``); a closure frozen in the Jacobian
    computes values only.

    Args:
        F: Residual form containing closures, or a list of them (a block residual, with
            ``kind="mpi"`` or ``"nest"`` as in :class:`dolfinx.fem.petsc.NonlinearProblem`).
        u: The unknown, or a list of unknowns (one per form of a block residual).
        petsc_options_prefix: Prefix of the SNES options (mandatory, non-empty).
        bcs: Dirichlet conditions.
        J: Jacobian; by default ``dolfinx_mno.derivative(F, u)``, which includes the
            closure tangents (for a block residual, the block Jacobian: a list of lists).
            A given ``J`` must include them too (see ``frozen_closures``).
        closures: The closures to update; by default all closures in ``F`` and ``J``.
        frozen_closures: Accept a ``J`` without the tangents of closures that depend on
            ``u`` (e.g. ``ufl.derivative(F, u)``): a Picard linearisation of the closure
            terms, which converges linearly. By default such a ``J`` raises.
        kwargs: Passed to :class:`dolfinx.fem.petsc.NonlinearProblem`
            (``petsc_options``, ``P``, ``form_compiler_options``, ``jit_options``, ...).

    Raises:
        ValueError: A given ``J`` misses the tangent of a closure whose operands depend on
            ``u`` and ``frozen_closures`` is false; or a closure is not integrated with
            its own quadrature rule. Raised on every rank before any collective call.

    Example:
        >>> problem = NonlinearProblem(F, u, petsc_options_prefix="heat_",
        ...                            petsc_options={"snes_rtol": 1e-10})
        >>> problem.solve()
    """

    _mno_updates_closures = True  # see dolfinx_mno.guard

    def __init__(
        self,
        F: ufl.Form,
        u: fem.Function,
        *,
        petsc_options_prefix: str,
        bcs: Sequence[fem.DirichletBC] | None = None,
        J: ufl.Form | None = None,
        closures: Sequence[ClosureBase] | None = None,
        frozen_closures: bool = False,
        **kwargs: typing.Any,
    ):
        """Set up the problem (collective); see the class docstring for the arguments."""
        if J is None:
            J = derivative(F, u)
        elif not frozen_closures:
            check_jacobian(F, J, u)
        preconditioner = kwargs.get("P")
        check_petsc_dtype([F, J, preconditioner])
        check_form(F)
        check_form(J)
        if preconditioner is not None:
            check_form(preconditioner)
        self._form_closures = closures_in([F, J, preconditioner])
        closures_ = list(self._form_closures if closures is None else closures)
        self._ufl_forms = (F, J)
        self._bcs = list(bcs or [])
        unknown = u if isinstance(u, fem.Function) else u[0]  # u may be a list (blocks)
        comm = unknown.function_space.mesh.comm
        petsc_garbage.collect(comm)  # see the module notes
        super().__init__(F, u, petsc_options_prefix=petsc_options_prefix, bcs=bcs, J=J, **kwargs)
        # The SNES keeps its callbacks alive; they must not refer to the problem, or the
        # problem could never be freed (a reference cycle through C that Python's garbage
        # collector cannot see). They live in a separate object.
        self._callbacks = _NewtonCallbacks(closures_, u, self.x.duplicate())
        residual_ctx: dict[str, typing.Any] = {
            "u": u,
            "residual": self.F,
            "jacobian": self.J,
            "bcs": bcs or [],
        }
        if (blocks := self.b.getAttr("_blocks")) is not None:  # a block residual's layout
            residual_ctx["_blocks"] = blocks
        jacobian_ctx = {
            "u": u,
            "jacobian": self.J,
            "preconditioner": self.preconditioner,
            "bcs": bcs or [],
        }
        self.solver.setFunction(self._callbacks.residual, self.b, kargs=residual_ctx)
        self.solver.setJacobian(self._callbacks.jacobian, self.A, self.P_mat, kargs=jacobian_ctx)
        petsc_garbage.track(self, comm, *_petsc_objects(self), self._callbacks.state)

    @property
    def closures(self) -> list[ClosureBase]:
        """The closures updated at every iterate."""
        return list(self._callbacks.closures)

    @property
    def ufl_forms(self) -> tuple[ufl.Form, ufl.Form]:
        """The UFL residual and Jacobian ``(F, J)`` the problem was built from."""
        return self._ufl_forms

    @property
    def bcs(self) -> list[fem.DirichletBC]:
        """The Dirichlet conditions."""
        return list(self._bcs)

    def solve(self) -> fem.Function:
        """Solve; returns ``u``. Check ``self.solver.getConvergedReason() > 0``.

        Raises:
            RuntimeError: A closure of the forms is not among :attr:`closures` and has
                never been updated (raised on every rank before any collective call;
                nothing is changed).
            ClosureEvaluationError: Newton did not converge and a closure update had
                failed on the way (raised on every rank; ``u`` holds the last iterate).
                An update that fails at a trial point of the line search only shortens
                the step. Or the update at the solution failed (below).

        After a converged solve the closures hold their values (and tangents) at the
        solution ``u``: where SNES stopped without evaluating the residual there
        (``snes_type: ksponly``), they are updated once more.
        """
        _check_updated(self._form_closures, self._callbacks.closures)
        self._callbacks.state_valid = False
        self._callbacks.error = None
        u = typing.cast(fem.Function, super().solve())
        error, self._callbacks.error = self._callbacks.error, None
        reason: int = self.solver.getConvergedReason()  # type: ignore[assignment]
        converged = reason > 0
        if error is not None and not converged:
            raise error
        # SNES may stop after its last update without evaluating the residual there
        # (ksponly, say): leave the closures at the solution, as u is.
        if converged and not self._callbacks.same_state(self.x):
            self._callbacks.update(self.x)
        return u

    def __del__(self):
        """Leave the PETSc objects to petsc4py's delayed destruction (see module notes)."""


class _NewtonCallbacks:
    """SNES residual and Jacobian callbacks that update the closures at each iterate.

    Holds what the callbacks need (the closures, the unknown, the last iterate at which
    the closures were updated, the last error) and nothing that holds the SNES.
    """

    def __init__(self, closures: list[ClosureBase], u: fem.Function, state: PETSc.Vec):  # type: ignore[name-defined]
        self.closures = closures
        self.u = u
        self.state = state  # the iterate of the last closure update
        self.state_valid = False
        self.error: Exception | None = None  # the last failed closure update

    def update(self, x: PETSc.Vec) -> None:  # type: ignore[name-defined]
        """Bring ``u`` and the closures to the iterate ``x``."""
        _la_petsc._ghost_update(x, PETSc.InsertMode.INSERT, PETSc.ScatterMode.FORWARD)  # type: ignore
        _fem_petsc.assign(x, self.u)  # type: ignore[arg-type]
        for closure in self.closures:
            closure.update()  # with its tangent whenever it has one
        x.copy(self.state)
        self.state_valid = True

    def same_state(self, x: PETSc.Vec) -> bool:  # type: ignore[name-defined]
        """Whether the closures were last updated at ``x``."""
        if not self.state_valid:
            return False
        self.state.axpy(-1.0, x)
        same = self.state.norm(PETSc.NormType.NORM_INFINITY) == 0.0  # type: ignore
        x.copy(self.state)
        return bool(same)

    def residual(self, snes, x, b, **ctx) -> None:
        """Update the closures at ``x``, then assemble the residual into ``b``."""
        try:
            self.update(x)
        except Exception as err:
            # An exception raised through PETSc becomes a bare error code and leaves
            # PETSc objects locked. A NaN residual instead makes SNES reject the iterate
            # (a line search may try a shorter step) or stop; solve() raises the error if
            # SNES did not converge after all.
            self.error = err
            b.set(float("nan"))
            return
        _fem_petsc.assemble_residual(snes, x, b, **ctx)

    def jacobian(self, snes, x, A, P, **ctx) -> None:
        """Assemble the Jacobian at ``x`` (updating the closures if SNES moved)."""
        # SNES normally evaluates the residual at x just before; re-evaluate otherwise
        # (e.g. after a line search that ended on another point).
        if not self.same_state(x):
            try:
                self.update(x)
            except Exception as err:  # the closures keep their last values
                self.error = err
        if A.getType() == PETSc.Mat.Type.MFFD:  # type: ignore[attr-defined]
            # -snes_mf_operator: the Jacobian action is matrix-free (differences of the
            # residual, which re-evaluates every closure); the assembled Jacobian, with
            # closures that have no tangent frozen, preconditions it.
            A.assemble()
            _fem_petsc.assemble_jacobian(snes, x, P, None, **ctx)  # type: ignore[arg-type]
            return
        _fem_petsc.assemble_jacobian(snes, x, A, P, **ctx)


class LinearProblem(_fem_petsc.LinearProblem):
    """Linear problem ``a(u, v) = L(v)`` with closures evaluated before each solve.

    This is the explicit/IMEX coupling: closures see the current state of their operands
    (typically the previous time step), are updated once, and enter the right-hand side
    (or the matrix) as known coefficients.

    Args:
        a: Bilinear form.
        L: Linear form containing closures.
        petsc_options_prefix: Prefix of the KSP options (mandatory, non-empty).
        closures: The closures to update; by default all closures in ``a`` and ``L``.
        reuse_matrix: Assemble the matrix (and let PETSc factorise or set up the
            preconditioner) at the first solve only, and again only when a constant or
            coefficient of ``a`` (or ``P``) changed or the mesh moved since (a step size in a
            ``fem.Constant``, say). For IMEX steps, whose matrix does not change, this
            saves a matrix assembly and, with a direct solver, a factorisation per step.
            Requires ``a`` without closures.
        kwargs: Passed to :class:`dolfinx.fem.petsc.LinearProblem` (``bcs``, ``u``,
            ``petsc_options``, ...).
    """

    _mno_updates_closures = True  # see dolfinx_mno.guard

    def __init__(
        self,
        a: ufl.Form,
        L: ufl.Form,
        *,
        petsc_options_prefix: str,
        closures: Sequence[ClosureBase] | None = None,
        reuse_matrix: bool = False,
        **kwargs: typing.Any,
    ):
        """Set up the problem (collective); see the class docstring for the arguments."""
        preconditioner = kwargs.get("P")
        check_petsc_dtype([a, L, preconditioner])
        check_form(a)
        check_form(L)
        if preconditioner is not None:
            check_form(preconditioner)
        if reuse_matrix and closures_in([a, preconditioner]):
            raise ValueError(
                "reuse_matrix=True needs bilinear forms without closures: closures in `a` "
                "(or `P`) change at every solve."
            )
        if reuse_matrix and not isinstance(a, ufl.Form):
            raise ValueError("reuse_matrix=True supports a single bilinear form only.")
        self._form_closures = closures_in([a, L, preconditioner])
        self._closures = list(self._form_closures if closures is None else closures)
        self._reuse_matrix = reuse_matrix
        self._matrix_ready = False
        self._ufl_forms = (a, L)
        super().__init__(a, L, petsc_options_prefix=petsc_options_prefix, **kwargs)
        comm = self.A.getComm().tompi4py()
        # What the reused matrix reads: a change (dt in a Constant) reassembles it.
        self._matrix_data = FormData([a, preconditioner], [], comm) if reuse_matrix else None
        petsc_garbage.collect(comm)  # see the module notes
        petsc_garbage.track(self, comm, *_petsc_objects(self))

    @property
    def closures(self) -> list[ClosureBase]:
        """The closures updated before every solve."""
        return list(self._closures)

    @property
    def ufl_forms(self) -> tuple[ufl.Form, ufl.Form]:
        """The UFL forms ``(a, L)`` the problem was built from."""
        return self._ufl_forms

    def _check_updated(self, update_closures: bool) -> None:
        """Raise if a closure that this solve would assemble has never been updated."""
        if update_closures:
            _check_updated(self._form_closures, self._closures)
            return
        stale = [c for c in self._form_closures if c.update_count == 0]
        if not stale:
            return
        raise RuntimeError(
            f"Closure(s) {_names(stale)} have never been updated, so "
            "solve(update_closures=False) would assemble them without the model's values. "
            "Call solve() (update_closures=True, the default) for the first solve, or "
            "closure.update() before."
        )

    def __del__(self):
        """Leave the PETSc objects to petsc4py's delayed destruction (see module notes)."""

    def solve(self, update_closures: bool = True) -> fem.Function:
        """Update the closures, assemble and solve; returns the solution.

        Args:
            update_closures: Update the closures first. ``False`` keeps their values from
                the last update (e.g. a closure updated every few time steps).

        Raises:
            RuntimeError: A closure in the forms has never been updated and this solve
                would not update it either (``update_closures=False``, or a closure not
                in ``closures``). Raised on every rank before any collective call
                (update counts agree across ranks); nothing is changed.
        """
        self._check_updated(update_closures)
        if update_closures:
            for closure in self._closures:
                closure.update()
        data = self._matrix_data
        if data is None or not self._matrix_ready or data.changed():
            self._matrix_ready = True
            if data is not None:
                data.save()
            return typing.cast(fem.Function, super().solve())
        # Right-hand side only; the operator, and its factorisation, are kept.
        self.assemble_rhs()
        self.solver.solve(self.b, self.x)
        self.x.ghostUpdate(addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)  # type: ignore
        _fem_petsc.assign(self.x, self.u)  # type: ignore[arg-type]
        return typing.cast(fem.Function, self.u)

    def assemble_rhs(self) -> None:
        """Assemble ``b`` from ``L`` with the Dirichlet conditions (lifting, then their values).

        Collective. The closures keep the values they hold; the matrix is not touched. Used
        by :meth:`solve` when the matrix is reused, and by :mod:`dolfinx_mno.rollout`.
        """
        bcs = list(self.bcs or [])
        with self.b.localForm() as b_local:
            b_local.set(0.0)
        _fem_petsc.assemble_vector(self.b, self.L)  # type: ignore[arg-type]
        _fem_petsc.apply_lifting(self.b, [self.a], bcs=[bcs])  # type: ignore[arg-type]
        self.b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)  # type: ignore
        _fem_petsc.set_bc(self.b, bcs)

    def assemble_operator(self) -> None:
        """Assemble the matrix (and the preconditioner's) with the Dirichlet conditions.

        Collective. A later :meth:`solve` with ``reuse_matrix=True`` keeps it (and the
        solver keeps its factorisation). Used by :mod:`dolfinx_mno.rollout`, whose steps and
        transposed solves all use this one matrix.
        """
        bcs = list(self.bcs or [])
        self.A.zeroEntries()
        _fem_petsc.assemble_matrix(self.A, self.a, bcs=bcs)  # type: ignore[arg-type, misc]
        self.A.assemble()
        if self.P_mat is not None:
            self.P_mat.zeroEntries()
            _fem_petsc.assemble_matrix(self.P_mat, self.preconditioner, bcs=bcs)  # type: ignore[arg-type, misc]
            self.P_mat.assemble()
        self._matrix_ready = True
        if self._matrix_data is not None:
            self._matrix_data.save()
