"""What every closure shares: a quadrature function that updates itself.

:class:`ClosureBase` is the common base of the local :class:`dolfinx_mno.Closure` and the
non-local :class:`dolfinx_mno.NonlocalClosure`. Solver glue (:mod:`dolfinx_mno.petsc`) and
form checks (:func:`dolfinx_mno.check_form`) rely only on this interface.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import typing
import weakref
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
import ufl
from dolfinx import fem

from dolfinx_mno.io import read_model_file
from dolfinx_mno.operands import Operands, WithOperands, operand_comm
from dolfinx_mno.quadrature import measure
from dolfinx_mno.spec import ClosureSpec
from dolfinx_mno.torch_bridge import training_mode_error
from dolfinx_mno.validation import check_integer, check_value_shape

__all__ = ["ClosureBase", "ModelArguments", "operand_comm", "validate_arguments"]


#: Every live closure by the ``id`` of its C++ function, for :func:`closure_of_cpp_function`.
_LIVE_CLOSURES: weakref.WeakValueDictionary[int, ClosureBase] = weakref.WeakValueDictionary()
#: Every live closure by the ``id`` of its tangent's C++ function (see :func:`register_tangent`).
_LIVE_TANGENTS: weakref.WeakValueDictionary[int, ClosureBase] = weakref.WeakValueDictionary()


def register_tangent(closure: ClosureBase, tangent: fem.Function) -> None:
    """Let :func:`closure_of_cpp_function` find ``closure`` from its tangent's C++ function."""
    _LIVE_TANGENTS[id(tangent._cpp_object)] = closure


def closure_of_tangent(function: typing.Any) -> ClosureBase | None:
    """The closure whose :attr:`~dolfinx_mno.Closure.tangent` is ``function``, if any.

    A tangent holds a weak reference to its closure (``_mno_tangent_of``), set when the
    closure allocates it.
    """
    owner = getattr(function, "_mno_tangent_of", None)
    return owner() if owner is not None else None


def closure_of_cpp_function(function: typing.Any) -> ClosureBase | None:
    """The closure whose C++ function, or its tangent's, is ``function``.

    ``function`` is a compiled form's coefficient: such a form holds the C++ functions
    only (a hand-compiled Jacobian holds the tangent's).
    """
    closure = _LIVE_CLOSURES.get(id(function))
    if closure is not None and closure._cpp_object is function:
        return closure
    owner = _LIVE_TANGENTS.get(id(function))
    tangent = getattr(owner, "_tangent", None)
    return owner if tangent is not None and tangent._cpp_object is function else None


class ClosureBase(fem.Function, WithOperands):
    """A :class:`dolfinx.fem.Function` on a quadrature space whose values a model computes.

    Subclasses set ``_mno_quadrature_degree``, ``_operands`` (an
    :class:`~dolfinx_mno.Operands`), ``_model``, ``_value_dofs``, ``timings`` and
    ``total_timings``, and implement :meth:`update`.
    """

    #: Whether :meth:`update` can compute ``∂closure/∂operands`` for an exact Jacobian.
    supports_tangent: bool = False
    _mno_quadrature_degree: int
    _model: torch.nn.Module
    _value_dofs: slice | np.ndarray
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
        # Compiled forms hold the C++ function only; the guard finds the closure from it.
        _LIVE_CLOSURES[id(self._cpp_object)] = self

    def update(self, tangent: bool | None = None) -> None:
        """Evaluate the model at the current operands and store the values (collective)."""
        raise NotImplementedError

    @property
    def owned_value_dofs(self) -> slice | np.ndarray:
        """The entries of ``x.array`` that updates write, in (cell, point) order.

        The owned cells' (a local closure's ``cells``, if given), as
        :func:`~dolfinx_mno.quadrature.owned_dofs` gives them.
        """
        return self._value_dofs

    def _not_copyable_message(self, action: str) -> str:
        """Why this closure cannot be ``action`` (``"copied"``, ...), and what to do instead.

        A closure holds its mesh, function space and compiled operand expression (C++
        objects), its model's buffers and, for a non-local closure, communication plans:
        none of them can be copied or pickled, and a shallow copy would share the C++
        function (and the UFL identity) of the original.
        """
        kind = type(self).__name__
        return (
            f"{kind} '{self.name}' cannot be {action}: it holds DOLFINx objects (its function "
            "space and compiled operand expression), which cannot be copied or pickled. Build "
            f"a new {kind} from the same model and operands instead; to store the model, "
            "write it with dolfinx_mno.save_model(path, closure.model, spec=closure.spec) "
            f"and build {kind}(path, operands) from the file. closure.copy() returns a "
            "dolfinx.fem.Function holding a copy of the current values."
        )

    def __copy__(self) -> typing.NoReturn:
        """Refuse :func:`copy.copy`: see :meth:`_not_copyable_message`."""
        raise TypeError(self._not_copyable_message("copied (copy.copy)"))

    def __deepcopy__(self, memo: dict[int, typing.Any]) -> typing.NoReturn:
        """Refuse :func:`copy.deepcopy`: see :meth:`_not_copyable_message`."""
        raise TypeError(self._not_copyable_message("deep-copied (copy.deepcopy)"))

    def __reduce_ex__(self, protocol: typing.SupportsIndex) -> typing.NoReturn:
        """Refuse :mod:`pickle` (and ``mpi4py``'s pickled sends): see above."""
        raise TypeError(self._not_copyable_message("pickled"))

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
    def quadrature_degree(self) -> int:
        """Degree of the quadrature rule carrying the values."""
        return self._mno_quadrature_degree

    @property
    def value_shape(self) -> tuple[int, ...]:
        """Shape of the closure value at one point."""
        return tuple(self.ufl_shape)

    @property
    def model(self) -> torch.nn.Module:
        """The torch model (a non-local closure runs it on its root rank only)."""
        return self._model

    @property
    def spec(self) -> ClosureSpec:
        """What this closure's model is for; store it with ``save_model(..., spec=...)``."""
        return ClosureSpec.from_operands(self._operands, self.value_shape, self.quadrature_degree)

    @property
    def dx(self) -> ufl.Measure:
        """The cell measure with this closure's quadrature rule."""
        return measure(self.function_space.mesh, self.quadrature_degree)

    def model_state_error(self) -> str | None:
        """Why the model must not be run now, or ``None`` (rank-local).

        Training mode, and for subclasses a dtype or device changed since construction
        (``model.float()``, ``model.to(...)``): :meth:`update` refuses such a model, and
        so do the rollouts, which run it through :meth:`~dolfinx_mno.Closure.model_outputs`.
        """
        return training_mode_error(self.model)

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


@dataclasses.dataclass(frozen=True)
class ModelArguments:
    """The model of a closure and the settings it runs with, checked.

    Attributes:
        model: The model, in evaluation mode.
        value_shape: As given, else the model file's, else ``()``.
        quadrature_degree: As given, else the model file's, else 2.
        trained: The spec in the model file, already checked against the arguments;
            ``None`` for a model object, or a file without a spec.
    """

    model: torch.nn.Module
    value_shape: tuple[int, ...]
    quadrature_degree: int
    trained: ClosureSpec | None


def validate_arguments(
    model: torch.nn.Module | str | os.PathLike[str],
    operands: Operands,
    value_shape: Sequence[int] | None,
    quadrature_degree: int | None,
    *,
    nonlocal_closure: bool = False,
    grid_shape: Sequence[int] | None = None,
    mask_channel: bool | None = None,
) -> ModelArguments:
    """Check the model and settings every closure takes, without any collective call.

    A path for ``model`` is read with :func:`dolfinx_mno.io.read_model_file` (every rank
    reads the file). If the file holds a :class:`~dolfinx_mno.spec.ClosureSpec`, the
    operands and every setting given (not ``None``) must match it
    (:meth:`ClosureSpec.check <dolfinx_mno.spec.ClosureSpec.check>`), and the settings not
    given are taken from it. The model is put in evaluation mode (``model.eval()``).

    Args:
        model: The model, or the path of a model file.
        operands: The closure's operands (checked by :class:`~dolfinx_mno.Operands`).
        value_shape: The value shape, or ``None`` for the file's (default ``()``).
        quadrature_degree: The quadrature degree, or ``None`` for the file's (default 2).
        nonlocal_closure: Whether the closure is non-local: the file's model must be too.
        grid_shape: A non-local closure's grid shape, if given, compared with the file's.
        mask_channel: A non-local closure's mask channel, if given, compared with the
            file's.

    Raises:
        TypeError: A model that is not a ``torch.nn.Module``, a value shape that is not a
            tuple of integers (``2`` for ``(2,)``, ``(2.5,)``) or a degree that is not an
            integer (``2.5``, ``True``); see :mod:`dolfinx_mno.validation`.
        ValueError: A value shape with entries below 1, a negative degree, or operands
            or settings that differ from the spec in the model file.
        FileNotFoundError, ModelFileError: An unreadable model file.
    """
    shape = check_value_shape(value_shape) if value_shape is not None else None
    degree = None
    if quadrature_degree is not None:
        degree = check_integer(quadrature_degree, "quadrature_degree")
    trained = None
    if isinstance(model, str | os.PathLike):
        contents = read_model_file(model)
        trained = contents.spec
        if trained is not None:
            trained.check(
                operands,
                value_shape=shape,
                quadrature_degree=degree,
                nonlocal_closure=nonlocal_closure,
                grid_shape=grid_shape,
                mask_channel=mask_channel,
                source=repr(os.fspath(model)),
            )
        model = contents.build()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t.is_meta]  # fmt: skip
    if meta:
        raise ValueError(
            f"The model's tensors {meta[:3]}{' ...' if len(meta) > 3 else ''} are on the meta "
            "device: they have shapes but no values. Load its weights first (e.g. "
            "model.load_state_dict(state, assign=True), or dolfinx_mno.load_model)."
        )
    if shape is None:
        shape = trained.value_shape if trained is not None else ()
    if degree is None:
        degree = trained.quadrature_degree if trained is not None else 2
    # A closure evaluates the model for inference: dropout off, batch-norm statistics
    # frozen (the probe at construction must not update them, or results would depend on
    # the number of ranks). The closures refuse to update a model put back in training mode.
    try:
        model.eval()
    except NotImplementedError as error:  # torch.export's ExportedProgram.module()
        raise TypeError(
            f"The model cannot be put in evaluation mode ({error}); a closure evaluates "
            "models for inference and needs model.eval(). The module of a torch.export "
            "program (ExportedProgram.module()) cannot: pass the original torch.nn.Module, "
            "or torch.jit.script(model), or torch.compile it with compile=True."
        ) from error
    return ModelArguments(model, shape, degree, trained)
