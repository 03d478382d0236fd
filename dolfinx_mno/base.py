"""What every closure shares: a quadrature function that updates itself.

:class:`ClosureBase` is the common base of the local :class:`dolfinx_mno.Closure` and the
non-local :class:`dolfinx_mno.NonlocalClosure`. Solver glue (:mod:`dolfinx_mno.petsc`) and
form checks (:func:`dolfinx_mno.check_form`) rely only on this interface.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Sequence

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import torch
import ufl
from dolfinx import fem
from dolfinx.mesh import Mesh
from ufl.algorithms import extract_coefficients

from dolfinx_mno.io import load_model
from dolfinx_mno.quadrature import measure
from dolfinx_mno.torch_bridge import NUMPY_TO_TORCH
from dolfinx_mno.validation import check_integer, check_value_shape

__all__ = ["ClosureBase", "operand_comm", "validate_arguments"]


class ClosureBase(fem.Function):
    """A :class:`dolfinx.fem.Function` on a quadrature space whose values a model computes.

    Subclasses set ``_mno_quadrature_degree``, ``_model``, ``_operands``, ``timings`` and
    ``total_timings``, and implement :meth:`update`.
    """

    #: Whether :meth:`update` can compute ``∂closure/∂operands`` for an exact Jacobian.
    supports_tangent: bool = False
    _mno_quadrature_degree: int
    _model: torch.nn.Module
    _operands: tuple[ufl.core.expr.Expr, ...]
    _update_count: int = 0
    #: Seconds spent in each stage of the last successful update.
    timings: dict[str, float]
    #: Seconds spent in each stage, summed over all successful updates.
    total_timings: dict[str, float]

    def __init__(
        self, V: fem.FunctionSpace, name: str | None = None, dtype: npt.DTypeLike | None = None
    ):
        """Allocate the values on the quadrature space ``V`` (called by subclasses).

        Args:
            V: The quadrature space (:func:`dolfinx_mno.quadrature_space`).
            name: Name of the function.
            dtype: Scalar type of the values.
        """
        super().__init__(V, name=name, dtype=dtype)

    def update(self, tangent: bool | None = None) -> None:
        """Evaluate the model at the current operands and store the values (collective)."""
        raise NotImplementedError

    def _fill_not_updated(self) -> None:
        """Fill the values with NaN: a closure never updated must not enter a form as 0.

        Any form assembled with it before the first :meth:`update` gives NaN, which the
        solvers report, instead of silently dropping the closure term.
        """
        self.x.array[:] = np.nan

    def _record(self, attempt: int, **timings: float) -> None:
        """Count a successful update, number ``attempt``, and keep its stage timings."""
        self.timings = timings
        for stage, seconds in timings.items():
            self.total_timings[stage] = self.total_timings.get(stage, 0.0) + seconds
        self._update_count = attempt

    @property
    def model(self) -> torch.nn.Module:
        """The torch model (a non-local closure runs it on its root rank only)."""
        return self._model

    @property
    def operands(self) -> tuple[ufl.core.expr.Expr, ...]:
        """The UFL operands, in the order their components enter the model."""
        return self._operands

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


def validate_arguments(
    model: torch.nn.Module | str | os.PathLike[str],
    operands: Sequence[ufl.core.expr.Expr | fem.Function] | ufl.core.expr.Expr,
    value_shape: Sequence[int],
    quadrature_degree: int,
    mesh: Mesh | None,
) -> tuple[torch.nn.Module, tuple[ufl.core.expr.Expr, ...], tuple[int, ...], int, Mesh, np.dtype]:
    """Check the arguments every closure takes, without any collective call.

    A path for ``model`` is read with :func:`dolfinx_mno.io.load_model` (every rank reads
    the file). The model is put in evaluation mode (``model.eval()``). Returns the model,
    the operands as a tuple of UFL expressions, the value shape, the quadrature degree, the
    mesh and the scalar dtype.

    Raises:
        TypeError: A model that is not a ``torch.nn.Module``, unsupported dtypes, a value
            shape that is not a tuple of integers (``2`` for ``(2,)``, ``(2.5,)``) or a
            degree that is not an integer (``2.5``, ``True``); see
            :mod:`dolfinx_mno.validation`.
        ValueError: No operands, operands from another mesh, a value shape with entries
            below 1, or a negative degree.
    """
    shape = check_value_shape(value_shape)
    degree = check_integer(quadrature_degree, "quadrature_degree")
    if isinstance(model, str | os.PathLike):
        model = load_model(model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(operands, ufl.core.expr.Expr):
        operands = [operands]
    operand_list = tuple(ufl.as_ufl(op) for op in operands)
    if not operand_list:
        raise ValueError("A closure needs at least one operand.")
    mesh = _operand_mesh(operand_list, mesh)
    dtype = _scalar_dtype(operand_list, mesh)
    # A closure evaluates the model for inference: dropout off, batch-norm statistics
    # frozen (the probe at construction must not update them, or results would depend on
    # the number of ranks). The closures refuse to update a model put back in training mode.
    model.eval()
    return model, operand_list, shape, degree, mesh, dtype


def operand_comm(
    operands: Sequence[ufl.core.expr.Expr | fem.Function] | ufl.core.expr.Expr,
    mesh: Mesh | None,
) -> MPI.Comm:
    """The communicator a closure of these arguments is collective on; never raises.

    That of ``mesh``, or of the operands' mesh. It is known before anything is validated,
    so that every rank-local check (:func:`validate_arguments` among them) can run inside
    one agreement on it (:func:`dolfinx_mno._mpi.rank_local`). Where it cannot be told
    (operands on several meshes or on none), :func:`validate_arguments` rejects the
    arguments identically on every rank, and ``MPI.COMM_SELF`` is returned.
    """
    try:
        if mesh is not None:
            return typing.cast(MPI.Comm, mesh.comm)
        if isinstance(operands, ufl.core.expr.Expr):
            operands = [operands]
        return typing.cast(MPI.Comm, _operand_mesh([ufl.as_ufl(op) for op in operands], None).comm)
    except Exception:  # bad arguments: validate_arguments says why, on every rank
        return MPI.COMM_SELF


def _operand_mesh(operands: Sequence[ufl.core.expr.Expr], mesh: Mesh | None) -> Mesh:
    """The mesh all operands live on; raises if they live on several or on another one."""
    domains: set[ufl.AbstractDomain] = set()
    for operand in operands:
        domains.update(ufl.domain.extract_domains(operand))
    if mesh is not None:
        others = [d for d in domains if d != mesh.ufl_domain()]
        if others:
            raise ValueError(
                "Closure operands must live on the closure's mesh, but "
                f"{len(others)} operand domain(s) belong to another mesh."
            )
        return mesh
    if len(domains) != 1:
        raise ValueError(
            "Closure operands must live on exactly one mesh, but they live on "
            f"{len(domains)}; pass mesh= to say which, or rebuild the operands on one mesh."
        )
    for operand in operands:
        for coefficient in extract_coefficients(operand):
            if hasattr(coefficient, "function_space"):
                return typing.cast(Mesh, coefficient.function_space.mesh)
    raise ValueError(
        "Could not find the DOLFINx mesh of the operands (none of them contains a "
        "fem.Function); pass mesh= explicitly."
    )


def _scalar_dtype(operands: Sequence[ufl.core.expr.Expr], mesh: Mesh) -> np.dtype:
    """The scalar dtype of the operand functions (or of the mesh geometry), checked."""
    dtypes = {
        np.dtype(c.dtype)
        for op in operands
        for c in extract_coefficients(op)
        if hasattr(c, "dtype")
    }
    if not dtypes:
        dtypes = {np.dtype(mesh.geometry.x.dtype)}
    if len(dtypes) > 1:
        raise TypeError(f"Closure operands mix scalar types {sorted(map(str, dtypes))}.")
    dtype = dtypes.pop()
    if dtype not in NUMPY_TO_TORCH:
        raise TypeError(
            f"Unsupported dtype {dtype}: closures support real float32 and float64 DOLFINx "
            "problems."
        )
    return dtype
