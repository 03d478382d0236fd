"""What a model was trained for: the closure spec that a model file carries.

A closure's model is only right for the operands it was trained on, in the same order,
and for the closure's value shape (and, for a non-local closure, for its grid and mask
channel). :class:`ClosureSpec` records these; :func:`dolfinx_mno.save_model` stores it in
the model file (``save_model(path, model, spec=closure.spec)``), and a closure built from
the file (``Closure(path, operands)``) takes the value shape and quadrature degree from it
and refuses operands or settings that differ (a non-local closure also a grid of another
spacing, :meth:`ClosureSpec.check_grid`)::

    spec = closure.spec                     # or sampler.spec, or ClosureSpec(...)
    save_model("closure.pt", model, spec=spec)
    closure = Closure("closure.pt", [u, ufl.grad(u)])  # value_shape, degree from the file

The spec is stored in the file's metadata under :data:`SPEC_KEY` as JSON
(:meth:`ClosureSpec.to_dict`), so files without one (written before it existed, or
without ``spec=``) still load, unchecked.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from dolfinx_mno.grid import Grid
from dolfinx_mno.operands import Operands, OperandsLike
from dolfinx_mno.validation import check_integer, check_value_shape

__all__ = [
    "SPACING_RTOL",
    "SPEC_KEY",
    "SPEC_VERSION",
    "ClosureSpec",
    "metadata_with_spec",
    "spec_from_metadata",
]

#: The metadata key of a model file that holds the spec.
SPEC_KEY = "closure_spec"
#: Version of the layout of :meth:`ClosureSpec.to_dict`; other versions are refused.
SPEC_VERSION = 1
#: Relative difference up to which a non-local closure's grid spacing is the trained one
#: (:meth:`ClosureSpec.check_grid`): round-off of mesh coordinates, not a change of grid.
SPACING_RTOL = 1e-9

_REQUIRED = ("version", "operands", "operand_widths", "value_shape", "quadrature_degree")
_GRID_KEYS = ("grid", "mask_channel")


@dataclasses.dataclass(frozen=True)
class ClosureSpec:
    """The closure a model was trained for: operands, value shape, quadrature, grid.

    Attributes:
        operand_names: One name per operand, in input order (:attr:`Operands.names`).
        operand_widths: Number of scalar components of each operand.
        value_shape: Shape of the closure value at a point.
        quadrature_degree: Degree of the quadrature rule carrying the closure values.
        grid: For a non-local closure, the grid its model ran on; ``None`` for a local
            (pointwise) closure.
        mask_channel: For a non-local closure, whether the model input ends with the
            inside/outside mask channel; ``None`` for a local closure.

    Raises:
        TypeError: A field of the wrong type (names that are not strings, a grid that is
            not a :class:`~dolfinx_mno.Grid`, a mask channel that is not a bool).
        ValueError: No operands, widths that are not one positive integer per name, a
            mask channel without a grid or a grid without one; bad ``value_shape`` or
            ``quadrature_degree`` (see :mod:`dolfinx_mno.validation`).

    Example:
        >>> spec = ClosureSpec(("u", "grad(u)"), (1, 2), value_shape=(2,))
        >>> ClosureSpec.from_dict(spec.to_dict()) == spec
        True
    """

    operand_names: tuple[str, ...]
    operand_widths: tuple[int, ...]
    value_shape: tuple[int, ...] = ()
    quadrature_degree: int = 2
    grid: Grid | None = None
    mask_channel: bool | None = None

    def __post_init__(self) -> None:
        """Check the fields and store sequences as tuples of ``int`` and ``str``."""
        names = self.operand_names
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise TypeError(f"operand_names must be a sequence of strings, got {names!r}.")
        for name in names:
            if not isinstance(name, str) or not name:
                raise TypeError(f"Operand names must be non-empty strings, got {name!r}.")
        if not names:
            raise ValueError("A closure spec needs at least one operand.")
        widths = self.operand_widths
        if isinstance(widths, str) or not isinstance(widths, Sequence):
            raise TypeError(f"operand_widths must be a sequence of integers, got {widths!r}.")
        if len(widths) != len(names):
            raise ValueError(
                f"A closure spec needs one width per operand: {len(names)} name(s) "
                f"{list(names)}, {len(widths)} width(s) {list(widths)}."
            )
        widths = tuple(check_integer(w, "Each operand width", minimum=1) for w in widths)
        if (self.grid is None) != (self.mask_channel is None):
            raise ValueError(
                "A non-local closure spec needs both a grid and mask_channel, a local one "
                f"neither; got grid={self.grid!r}, mask_channel={self.mask_channel!r}."
            )
        if self.grid is not None and not isinstance(self.grid, Grid):
            raise TypeError(f"grid must be a dolfinx_mno.Grid, got {type(self.grid).__name__}.")
        if self.mask_channel is not None and not isinstance(self.mask_channel, bool):
            raise TypeError(f"mask_channel must be a bool, got {self.mask_channel!r}.")
        object.__setattr__(self, "operand_names", tuple(names))
        object.__setattr__(self, "operand_widths", widths)
        object.__setattr__(self, "value_shape", check_value_shape(self.value_shape))
        degree = check_integer(self.quadrature_degree, "quadrature_degree")
        object.__setattr__(self, "quadrature_degree", degree)

    @classmethod
    def from_operands(
        cls,
        operands: OperandsLike,
        value_shape: Sequence[int] = (),
        quadrature_degree: int = 2,
        *,
        grid: Grid | None = None,
        mask_channel: bool | None = None,
    ) -> ClosureSpec:
        """The spec of a closure of these operands (rank-local).

        Args:
            operands: The operands (anything :class:`~dolfinx_mno.Operands` takes).
            value_shape: Shape of the closure value at a point.
            quadrature_degree: Degree of the quadrature rule of the closure values.
            grid: The grid of a non-local closure.
            mask_channel: Whether a non-local closure's input has the mask channel.
        """
        operands = Operands(operands)
        return cls(
            operands.names,
            operands.widths,
            tuple(value_shape),
            quadrature_degree,
            grid=grid,
            mask_channel=mask_channel,
        )

    @property
    def num_inputs(self) -> int:
        """Number of scalar inputs (operand components) per point or grid point."""
        return sum(self.operand_widths)

    @property
    def is_nonlocal(self) -> bool:
        """Whether the model is a non-local (grid) model."""
        return self.grid is not None

    def to_dict(self) -> dict[str, typing.Any]:
        """The spec as a JSON dict (the layout :meth:`from_dict` reads).

        Returns:
            ``{"version": 1, "operands": [names], "operand_widths": [...],
            "value_shape": [...], "quadrature_degree": q}``, and for a non-local closure
            ``"grid": {"lower": [...], "upper": [...], "shape": [...]}`` and
            ``"mask_channel": bool``.
        """
        data: dict[str, typing.Any] = {
            "version": SPEC_VERSION,
            "operands": list(self.operand_names),
            "operand_widths": list(self.operand_widths),
            "value_shape": list(self.value_shape),
            "quadrature_degree": self.quadrature_degree,
        }
        if self.grid is not None:
            data["grid"] = {
                "lower": [float(x) for x in self.grid.lower],
                "upper": [float(x) for x in self.grid.upper],
                "shape": [int(n) for n in self.grid.shape],
            }
            data["mask_channel"] = self.mask_channel
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, typing.Any]) -> ClosureSpec:
        """Rebuild a spec from :meth:`to_dict`'s layout.

        Raises:
            ValueError: Not a dict, another version, missing or unknown keys, or fields
                that :class:`ClosureSpec` refuses (its ``TypeError`` too, as a
                ``ValueError``: the data is malformed).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"A closure spec is a dict, got {type(data).__name__}.")
        missing = [key for key in _REQUIRED if key not in data]
        unknown = sorted(set(data) - {*_REQUIRED, *_GRID_KEYS})
        if missing or unknown:
            raise ValueError(
                f"A closure spec has the keys {list(_REQUIRED)} (and {list(_GRID_KEYS)} for "
                f"a non-local closure); missing {missing}, unknown {unknown}."
            )
        if data["version"] != SPEC_VERSION:
            raise ValueError(
                f"Closure spec version {data['version']!r}: this dolfinx_mno reads version "
                f"{SPEC_VERSION}."
            )
        try:
            grid = None
            if data.get("grid") is not None:
                layout = data["grid"]
                if not isinstance(layout, Mapping) or set(layout) != {"lower", "upper", "shape"}:
                    raise ValueError(
                        f"The grid of a closure spec is {{lower, upper, shape}}, got {layout!r}."
                    )
                grid = Grid(
                    tuple(float(x) for x in layout["lower"]),
                    tuple(float(x) for x in layout["upper"]),
                    tuple(check_integer(n, "Each grid size", 2) for n in layout["shape"]),
                )
            return cls(
                data["operands"],
                data["operand_widths"],
                data["value_shape"],
                data["quadrature_degree"],
                grid=grid,
                mask_channel=data.get("mask_channel"),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"Malformed closure spec {dict(data)!r}: {err}") from err

    def check(
        self,
        operands: Operands,
        *,
        value_shape: tuple[int, ...] | None = None,
        quadrature_degree: int | None = None,
        nonlocal_closure: bool = False,
        grid_shape: Sequence[int] | None = None,
        mask_channel: bool | None = None,
        source: str = "the model file",
    ) -> None:
        """Refuse a closure whose operands or settings differ from this spec (rank-local).

        Operand names and widths must be equal, in order. ``value_shape``,
        ``quadrature_degree``, ``grid_shape`` and ``mask_channel`` are compared where
        given (``None``: the caller takes the spec's). The grid's spacing needs the mesh
        and is checked once the grid is built (:meth:`check_grid`).

        Args:
            operands: The closure's operands.
            value_shape: The closure's value shape, if given.
            quadrature_degree: The closure's quadrature degree, if given.
            nonlocal_closure: Whether the closure is non-local.
            grid_shape: A non-local closure's grid shape, if given.
            mask_channel: A non-local closure's mask channel, if given.
            source: Where the spec comes from, for the message (e.g. ``"'model.pt'"``).

        Raises:
            ValueError: A local model for a non-local closure or the reverse, or a
                difference; the message lists every difference and the fix.
        """
        if nonlocal_closure != self.is_nonlocal:
            if self.grid is not None:
                raise ValueError(
                    f"The model in {source} is a non-local (grid) model, trained on a "
                    f"{self.grid.shape} grid: build a dolfinx_mno.NonlocalClosure from it, "
                    "not a Closure."
                )
            raise ValueError(
                f"The model in {source} is a local (pointwise) model: build a "
                "dolfinx_mno.Closure from it, not a NonlocalClosure."
            )
        differences = []
        fixes = []
        trained = list(zip(self.operand_names, self.operand_widths, strict=True))
        given = list(zip(operands.names, operands.widths, strict=True))
        if trained != given:
            differences.append(f"the operands {_listing(trained)}, not {_listing(given)}")
            example = ", ".join(f"{name!r}: ..." for name in self.operand_names)
            fixes.append(
                "Pass the operands it was trained on, in that order and under those names "
                f"(e.g. dolfinx_mno.Operands({{{example}}}))."
            )
        settings: dict[str, tuple[typing.Any, typing.Any]] = {
            "value_shape": (value_shape, self.value_shape)
        }
        settings["quadrature_degree"] = (quadrature_degree, self.quadrature_degree)
        if self.grid is not None:
            settings["grid_shape"] = (_shape_or_none(grid_shape), self.grid.shape)
            settings["mask_channel"] = (mask_channel, self.mask_channel)
        changed = [
            name
            for name, (value, stored) in settings.items()
            if value is not None and value != stored
        ]
        for name in changed:
            value, stored = settings[name]
            differences.append(f"{name}={stored!r}, not {value!r}")
        if changed:
            fixes.append(f"Leave out {', '.join(changed)} to take them from the file.")
        if differences:
            raise ValueError(
                f"The model in {source} was trained with {'; '.join(differences)}. "
                + " ".join(fixes)
            )

    def check_grid(
        self,
        grid: Grid,
        mesh_box: tuple[npt.ArrayLike, npt.ArrayLike],
        *,
        bounding_box_given: bool = False,
        source: str = "the model file",
    ) -> None:
        """Refuse a non-local closure's grid whose spacing is not the trained one (rank-local).

        A grid model is only right at the spacing it was trained at (a finite-difference
        stencil, a convolution, an FNO's modes per unit length). Its grid shape is already
        the trained one (:meth:`check`), so the grid must have the trained extent too: the
        trained grid, moved anywhere, but not stretched. Spacings agree if they differ by at
        most :data:`SPACING_RTOL` relative to the trained one, in every direction. A local
        spec has no grid: nothing to check.

        Args:
            grid: The closure's grid.
            mesh_box: ``(lower, upper)`` of the mesh's bounding box, each ``(gdim,)``, to
                suggest a box of the trained extent that contains the mesh.
            bounding_box_given: Whether the grid's box was given (``bounding_box=``)
                rather than the mesh's bounding box.
            source: Where the spec comes from, for the message (e.g. ``"'model.pt'"``).

        Raises:
            ValueError: Another spacing: the message gives the trained and the new spacing
                and extent, and what to pass (a ``bounding_box`` of the trained extent that
                contains the mesh, where one does).
        """
        if self.grid is None:
            return
        trained = self.grid.spacing
        spacing = grid.spacing
        if np.all(np.abs(spacing - trained) <= SPACING_RTOL * trained):
            return
        extent = np.array(self.grid.upper) - np.array(self.grid.lower)
        mesh_lower, mesh_upper = (np.asarray(corner, dtype=np.float64) for corner in mesh_box)
        where = "the bounding_box given" if bounding_box_given else "this mesh's bounding box"
        message = (
            f"The model in {source} was trained on a {self.grid.shape} grid of spacing "
            f"{_numbers(trained)} over the extent {_numbers(extent)}; on {where} "
            f"[{_numbers(grid.lower)}, {_numbers(grid.upper)}] it would run with spacing "
            f"{_numbers(spacing)} over the extent {_numbers(np.array(grid.upper) - grid.lower)}"
            ", which it was not trained for."
        )
        tolerance = SPACING_RTOL * extent
        if self.grid.covers(mesh_lower, mesh_upper):
            box = (self.grid.lower, self.grid.upper)
            fix = f"Pass bounding_box={_box(box)}, the trained grid's box, which contains the mesh."
        elif np.all(mesh_upper - mesh_lower <= extent + tolerance):
            box = (tuple(mesh_lower.tolist()), tuple((mesh_lower + extent).tolist()))
            fix = (
                f"Pass bounding_box={_box(box)}, a box of the trained extent that contains "
                "the mesh."
            )
        else:
            wider = np.flatnonzero(mesh_upper - mesh_lower > extent + tolerance).tolist()
            axes = f"axis {wider[0]}" if len(wider) == 1 else f"axes {', '.join(map(str, wider))}"
            fix = f"No grid of the trained extent contains this mesh: it is wider along {axes}."
        raise ValueError(
            f"{message} {fix} To run the model on another grid all the same, pass the model "
            "itself, dolfinx_mno.load_model(path), which is not checked against the file's "
            "spec."
        )


def _numbers(values: npt.ArrayLike) -> tuple[float, ...]:
    """``values`` as a tuple of floats to 12 significant digits, for messages."""
    return tuple(float(f"{float(v):.12g}") for v in np.asarray(values).reshape(-1))


def _box(box: tuple[Sequence[float], Sequence[float]]) -> str:
    """``((0.0, 0.0), (1.0, 1.0))``: a bounding box to pass, exactly."""
    lower, upper = (tuple(float(x) for x in corner) for corner in box)
    return f"({lower}, {upper})"


def _listing(operands: Sequence[tuple[str, int]]) -> str:
    """``['u' (1 component), 'grad(u)' (2 components)]``."""
    parts = [f"{n!r} ({w} component{'' if w == 1 else 's'})" for n, w in operands]
    return f"[{', '.join(parts)}]"


def _shape_or_none(shape: typing.Any) -> tuple[typing.Any, ...] | None:
    """``shape`` as a tuple to compare, or ``None`` where it is no sequence of integers.

    A malformed shape is left to the closure's own check, which names the fix.
    """
    if shape is None or isinstance(shape, str) or not isinstance(shape, Sequence):
        return None
    if not all(isinstance(n, numbers.Integral) for n in shape):
        return None
    return tuple(int(n) for n in shape)


def metadata_with_spec(
    metadata: Mapping[str, typing.Any] | None, spec: ClosureSpec | None
) -> dict[str, typing.Any]:
    """``metadata`` with ``spec`` stored under :data:`SPEC_KEY` (a new dict).

    A spec already in ``metadata`` (e.g. metadata copied from another model file) is kept
    if no ``spec`` is given, after checking that it is well formed.

    Raises:
        TypeError: ``spec`` is not a :class:`ClosureSpec`.
        ValueError: ``metadata`` holds a spec and ``spec`` is given too, or holds a
            malformed one.
    """
    result = dict(metadata) if metadata is not None else {}
    if spec is None:
        spec_from_metadata(result)  # a spec in the metadata must be well formed
        return result
    if not isinstance(spec, ClosureSpec):
        raise TypeError(f"spec must be a dolfinx_mno.ClosureSpec, got {type(spec).__name__}.")
    if SPEC_KEY in result:
        raise ValueError(
            f"Give the closure spec once: as spec= or as metadata[{SPEC_KEY!r}], not both."
        )
    result[SPEC_KEY] = spec.to_dict()
    return result


def spec_from_metadata(metadata: Mapping[str, typing.Any]) -> ClosureSpec | None:
    """The spec stored in a model file's metadata, or ``None`` if it holds none.

    Raises:
        ValueError: A malformed spec.
    """
    if SPEC_KEY not in metadata:
        return None
    return ClosureSpec.from_dict(metadata[SPEC_KEY])


# Help shows this instead of the dataclass's generated __init__ without a docstring.
ClosureSpec.__init__.__doc__ = "Create the spec and check it; see the class docstring."
