"""Refuse DOLFINx's own PETSc problems on forms that contain closures.

A closure is a :class:`dolfinx.fem.Function` whose values only :meth:`ClosureBase.update`
computes. :class:`dolfinx.fem.petsc.NonlinearProblem` and
:class:`dolfinx.fem.petsc.LinearProblem` (and the deprecated
:class:`dolfinx.fem.petsc.NewtonSolverNonlinearProblem`) assemble it like any coefficient
and never update it: the solve would see the closure frozen at whatever it holds and stop,
or converge to a wrong answer, without a word.
The drop-in subclasses :class:`dolfinx_mno.petsc.NonlinearProblem` and
:class:`dolfinx_mno.petsc.LinearProblem` update the closures at the right moments.

Importing :mod:`dolfinx_mno` therefore installs a guard (:func:`install_problem_guard`) on
these DOLFINx classes: constructing one of them with a form (``F``, ``J``, ``a``, ``L``,
``P``, or nested sequences of forms) that contains a closure raises :class:`TypeError`
naming the subclass to use instead. The guard

* replaces the classes' ``__new__``, so it raises before the instance exists (DOLFINx's
  ``__del__`` would otherwise run on a half-built problem);
* reads only the forms (UFL forms, or the coefficients of compiled ``fem.Form``), before
  any collective call; the verdict is the same on every rank, so every rank raises;
* changes nothing for forms without closures, nor for classes that set the class attribute
  ``_mno_updates_closures = True`` (the :mod:`dolfinx_mno.petsc` subclasses, or a user's own
  subclass that updates the closures itself);
* is idempotent: installing it again does nothing.

To assemble the values a closure holds without updating it (e.g. to project it onto a
Lagrange space for output), use ``dolfinx_mno.petsc.LinearProblem(..., closures=[])``: it
refuses closures that were never updated. Other paths (a user's own ``fem.form`` and
``assemble_*`` calls) are not guarded.
"""

from __future__ import annotations

import typing
from collections.abc import Callable

import ufl
from dolfinx import fem

from dolfinx_mno.base import ClosureBase, closure_of_cpp_function, closure_of_tangent

__all__ = ["closures_in", "compiled_forms_in", "forms_in", "install_problem_guard"]

# The DOLFINx classes guarded, and what to use instead.
_FIXES = {
    "NonlinearProblem": (
        "Use dolfinx_mno.petsc.NonlinearProblem (same arguments), which updates them at "
        "every Newton iterate."
    ),
    "NewtonSolverNonlinearProblem": (
        "Use dolfinx_mno.petsc.NonlinearProblem (with SNES in place of NewtonSolver), which "
        "updates them at every Newton iterate."
    ),
    "LinearProblem": (
        "Use dolfinx_mno.petsc.LinearProblem (same arguments), which updates them before "
        "every solve, or, with closures=[], assembles the values they hold (e.g. to "
        "project them for output)."
    ),
}


def _found_in(forms: typing.Any, kind: type) -> list:
    """The objects of type ``kind`` in ``forms`` or its (nested) lists and tuples."""
    if isinstance(forms, kind):
        return [forms]
    if isinstance(forms, list | tuple):
        return [form for item in forms for form in _found_in(item, kind)]
    return []


def forms_in(forms: typing.Any) -> list[ufl.Form]:
    """The forms of a form or (nested) list or tuple; anything else (``None``) is skipped."""
    return _found_in(forms, ufl.Form)


def compiled_forms_in(forms: typing.Any) -> list[fem.Form]:
    """The compiled forms (:class:`dolfinx.fem.Form`) of a form or (nested) list or tuple."""
    return _found_in(forms, fem.Form)


def closures_in(forms: typing.Any, tangents: bool = True) -> list[ClosureBase]:
    """The closures in a form or (nested) sequence of forms, each once, in a stable order.

    A form that holds a closure's :attr:`~dolfinx_mno.Closure.tangent` but not the closure
    itself (a linearised operator written by hand) counts as holding the closure: the
    tangent changes with it, at its updates.

    Args:
        forms: A :class:`ufl.Form` or a compiled :class:`dolfinx.fem.Form`, or a list or
            tuple (possibly nested) of them, ``None`` and other objects; anything that is
            not a form is skipped.
        tangents: Count the closures of the tangents a UFL form holds (see above).

    Returns:
        The closures, ordered by their UFL count.
    """
    found: dict[int, ClosureBase] = {}
    for form in forms_in(forms):
        for coefficient in form.coefficients():
            owner = closure_of_tangent(coefficient) if tangents else None
            closure = coefficient if isinstance(coefficient, ClosureBase) else owner
            if closure is not None:
                found[closure.count()] = closure
    for compiled in compiled_forms_in(forms):
        for function in compiled._cpp_object.coefficients:
            closure = closure_of_cpp_function(function)
            if closure is not None:
                found[closure.count()] = closure
    return [found[count] for count in sorted(found)]


def _guarded_new(base: type, original: Callable[..., typing.Any]) -> Callable[..., typing.Any]:
    """A ``__new__`` for the DOLFINx class ``base`` that refuses forms with closures."""
    fix = _FIXES[base.__name__]

    def __new__(cls: type, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
        if not getattr(cls, "_mno_updates_closures", False):
            closures = closures_in([*args, *kwargs.values()])
            if closures:
                names = ", ".join(f"'{closure.name}'" for closure in closures)
                raise TypeError(
                    f"{cls.__module__}.{cls.__qualname__} does not update closures, so "
                    f"closure(s) {names} would enter the form with whatever values they "
                    f"hold. {fix}"
                )
        if original is object.__new__:
            return object.__new__(cls)
        return original(cls, *args, **kwargs)

    return __new__


def install_problem_guard() -> None:
    """Make DOLFINx's PETSc problems refuse forms that contain closures (idempotent).

    Guards :class:`dolfinx.fem.petsc.NonlinearProblem`,
    :class:`dolfinx.fem.petsc.LinearProblem` and, where it exists,
    :class:`dolfinx.fem.petsc.NewtonSolverNonlinearProblem`. Does nothing if DOLFINx was
    built without petsc4py. Called when :mod:`dolfinx_mno` is imported.
    """
    import dolfinx

    if not dolfinx.has_petsc4py:  # pragma: no cover - PETSc-less DOLFINx
        return
    import dolfinx.fem.petsc as fem_petsc

    for name in _FIXES:
        base = getattr(fem_petsc, name, None)
        if base is None or "_mno_guarded" in base.__dict__:
            continue
        base.__new__ = staticmethod(_guarded_new(base, base.__new__))  # type: ignore[assignment]
        base._mno_guarded = True  # type: ignore[attr-defined]
