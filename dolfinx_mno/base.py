"""What every closure shares: a quadrature function that updates itself.

:class:`ClosureBase` is the common base of the local :class:`dolfinx_mno.Closure` and the
non-local :class:`dolfinx_mno.NonlocalClosure`. Solver glue (:mod:`dolfinx_mno.petsc`) and
form checks (:func:`dolfinx_mno.check_form`) rely only on this interface.
"""

from __future__ import annotations

import ufl
from dolfinx import fem

from dolfinx_mno.quadrature import measure

__all__ = ["ClosureBase"]


class ClosureBase(fem.Function):
    """A :class:`dolfinx.fem.Function` on a quadrature space whose values a model computes.

    Subclasses set ``_mno_quadrature_degree`` and implement :meth:`update`.
    """

    #: Whether :meth:`update` can compute ``∂closure/∂operands`` for an exact Jacobian.
    supports_tangent: bool = False
    _mno_quadrature_degree: int
    _update_count: int = 0

    def update(self, tangent: bool | None = None) -> None:
        """Evaluate the model at the current operands and store the values (collective)."""
        raise NotImplementedError

    @property
    def quadrature_degree(self) -> int:
        """Degree of the quadrature rule carrying the values."""
        return self._mno_quadrature_degree

    @property
    def dx(self) -> ufl.Measure:
        """The cell measure with this closure's quadrature rule."""
        return measure(self.function_space.mesh, self.quadrature_degree)

    @property
    def update_count(self) -> int:
        """Number of successful updates."""
        return self._update_count

    def linearization(
        self, coefficient: fem.Function, argument: ufl.Argument
    ) -> ufl.core.expr.Expr | None:
        """``δclosure`` in the direction ``argument``, or ``None`` if it is not available.

        The base class returns ``None``: the closure is frozen in the Jacobian (a Picard
        linearisation of the closure term).
        """
        return None
