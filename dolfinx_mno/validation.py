"""Checks of the plain arguments that many constructors share: counts, degrees, shapes.

Caller-supplied arrays are checked as DOLFINx checks them, for shape and dtype
(:func:`check_array`, :func:`output_array`).

Each check returns the value as a Python ``int`` (or a tuple of them) or raises with a
message that names the argument and the fix. Nothing is coerced silently: ``2.5`` is not
``2``, ``True`` is not ``1`` (:class:`bool` is a subclass of :class:`int`, so a plain
``isinstance`` check would let it through), and ``0`` is not "the default". The checks
are local and deterministic: with the same arguments, every rank raises the same error,
so they belong before a constructor's first collective call.
"""

from __future__ import annotations

import numbers
import typing
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "check_array",
    "check_integer",
    "check_value_shape",
    "is_integer_at_least",
    "output_array",
]


def _integer_kind(minimum: int) -> str:
    if minimum == 0:
        return "a non-negative integer"
    if minimum == 1:
        return "a positive integer"
    return f"an integer ≥ {minimum}"


def check_integer(value: typing.Any, name: str, minimum: int = 0) -> int:
    """Return ``value`` as an ``int`` after checking that it is an integer ≥ ``minimum``.

    Python and NumPy integers are accepted; ``bool``, floats (even ``2.0``) and strings
    are refused.

    Args:
        value: The argument.
        name: Its name, for the message (e.g. ``"quadrature_degree"``).
        minimum: The smallest allowed value.

    Raises:
        TypeError: ``value`` is a ``bool`` or not an integer.
        ValueError: ``value`` is below ``minimum``.

    Example:
        >>> check_integer(4, "quadrature_degree")
        4
        >>> check_integer(True, "batch_size", minimum=1)
        Traceback (most recent call last):
        ...
        TypeError: batch_size must be a positive integer, got True (a bool).
    """
    kind = _integer_kind(minimum)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {kind}, got {value!r} (a bool).")
    if not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be {kind}, got {value!r}.")
    return int(value)


def is_integer_at_least(value: typing.Any, minimum: int = 1) -> bool:
    """Whether ``value`` is a Python or NumPy integer ≥ ``minimum`` (a ``bool`` is not).

    For checks whose documented error is a ``ValueError`` whatever is wrong; elsewhere
    :func:`check_integer` raises the error itself.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return int(value) >= minimum


def check_value_shape(value_shape: typing.Any) -> tuple[int, ...]:
    """Return ``value_shape`` as a tuple of ``int`` after checking it.

    A value shape is a sequence of positive integers: ``()`` (a scalar), ``(d,)`` (a
    vector), ``(d, d)`` (a tensor), as for :func:`dolfinx.fem.functionspace`. An integer
    ``d`` is refused rather than read as ``(d,)``: the message names the tuple to write.

    Raises:
        TypeError: An integer, a string or another non-sequence, or an entry that is
            not an integer (a float such as ``2.5``, or a ``bool``).
        ValueError: An entry that is not positive.

    Example:
        >>> check_value_shape([2, 2])
        (2, 2)
    """
    if isinstance(value_shape, numbers.Integral) and not isinstance(value_shape, bool):
        raise TypeError(
            f"value_shape must be a tuple of positive integers, got the integer "
            f"{value_shape!r}; write value_shape=({int(value_shape)},) for a vector with "
            f"{int(value_shape)} components, or () for a scalar."
        )
    if isinstance(value_shape, str | bytes) or not isinstance(value_shape, Sequence | np.ndarray):
        raise TypeError(
            "value_shape must be a tuple of positive integers such as () or (2,), got "
            f"{value_shape!r} ({type(value_shape).__name__})."
        )
    entries = tuple(value_shape)
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, numbers.Integral):
            raise TypeError(
                f"value_shape must be a tuple of positive integers, got {entries!r}: the "
                f"entry {entry!r} is a {type(entry).__name__}, not an integer."
            )
    if any(entry < 1 for entry in entries):
        raise ValueError(f"value_shape must have positive entries, got {entries!r}.")
    return tuple(int(entry) for entry in entries)


def check_array(array: np.ndarray, shape: tuple[int, ...], dtype: npt.DTypeLike, name: str) -> None:
    """Check a caller-supplied array's shape and dtype.

    Args:
        array: The array.
        shape: The shape it must have.
        dtype: The dtype it must have.
        name: Its name, for the message (e.g. ``"out"``).

    Raises:
        TypeError: Another shape or dtype: ``"{name} must have shape {shape} and dtype
            {dtype}, got {array.shape} and {array.dtype}."``.
    """
    if array.shape != shape or array.dtype != dtype:
        raise TypeError(
            f"{name} must have shape {shape} and dtype {np.dtype(dtype)}, got {array.shape} "
            f"and {array.dtype}."
        )


def output_array(
    out: np.ndarray | None, shape: tuple[int, ...], dtype: npt.DTypeLike
) -> np.ndarray:
    """A result buffer: ``out`` after :func:`check_array`, or a new array if it is ``None``.

    Args:
        out: The caller's buffer, or ``None``.
        shape: The shape of the result.
        dtype: The dtype of the result.

    Returns:
        ``out``, or a new (uninitialised) array of ``shape`` and ``dtype``.

    Raises:
        TypeError: ``out`` has another shape or dtype.
    """
    if out is None:
        return np.empty(shape, dtype=dtype)
    check_array(out, shape, dtype, "out")
    return out
