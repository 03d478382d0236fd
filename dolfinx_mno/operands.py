"""Operands: the UFL expressions a model reads, as one object.

A local closure, a non-local closure and the samplers that make their training data all
read the same thing: UFL expressions on one mesh (``u``, ``grad(u)``, ``x``, other
coefficients) whose scalar components, operand after operand and each in row-major (C)
order, are the model's input columns (or grid channels). :class:`Operands` holds them with
everything derived from them::

    operands = Operands({"u": u, "grad_u": ufl.grad(u)})  # or Operands([u, ufl.grad(u)])
    operands.widths           # (1, 2): components per operand
    operands.component_names  # ['u', 'grad_u[0]', 'grad_u[1]']: the input columns
    operands.num_inputs       # 3
    operands.mesh, operands.dtype, operands.comm
    expression = operands.expression(points)  # one fused fem.Expression (collective)

Without names, an operand is named by its UFL text (``u``, ``grad(u)``), free indices
renumbered so that the same script gives the same names in every run (:func:`describe`).
The names are what a model file records about its operands
(:class:`dolfinx_mno.spec.ClosureSpec`), and what a closure loaded from the file is
checked against.

Construction only inspects UFL and is deterministic: with the same arguments every rank
raises the same error, and nothing is communicated, so it may run inside a
:func:`dolfinx_mno._mpi.rank_local` block before a closure's first collective call.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping, Sequence

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import ufl
from dolfinx import fem
from dolfinx.mesh import Mesh
from ufl.algorithms import extract_arguments, extract_coefficients
from ufl.algorithms.analysis import extract_constants
from ufl.algorithms.renumbering import renumber_indices
from ufl.corealg.traversal import unique_pre_traversal
from ufl.restriction import Restricted

from dolfinx_mno.torch_bridge import NUMPY_TO_TORCH

__all__ = [
    "Operands",
    "OperandsLike",
    "WithOperands",
    "describe",
    "flatten_operands",
    "operand_comm",
    "operand_components",
]


def describe(definition: ufl.Form | ufl.core.expr.Expr) -> str:
    """A text of a UFL expression or form that does not depend on the session.

    Free indices are renumbered from 0 and integrals are listed by type and subdomain
    (without UFL's mesh counter), so the same script writes the same text every time:
    the metadata of a resumed data file then match, and so do operand names.
    """
    if isinstance(definition, ufl.Form):
        parts = []
        for integral in definition.integrals():
            metadata = integral.metadata()
            where = f"{integral.integral_type()}({integral.subdomain_id()})"
            where += f"{metadata}" if metadata else ""
            parts.append(f"{where}: {renumber_indices(integral.integrand())}")
        return " + ".join(parts)
    return str(renumber_indices(ufl.as_ufl(definition)))


def _components(expression: ufl.core.expr.Expr) -> list[ufl.core.expr.Expr]:
    """Scalar components of a UFL expression, in row-major (C) order."""
    shape = expression.ufl_shape
    if shape == ():
        return [expression]
    return [expression[index] for index in np.ndindex(shape)]


def operand_components(
    operands: Sequence[ufl.core.expr.Expr],
) -> tuple[list[ufl.core.expr.Expr], list[int]]:
    """The scalar components of all operands, operand after operand, each row-major.

    Unlike :class:`Operands`, this checks nothing: it also splits expressions that live
    on no mesh, such as the (possibly zero) Gateaux derivatives of operands.

    Returns:
        The list of components and the number of components of each operand.
    """
    components: list[ufl.core.expr.Expr] = []
    widths = []
    for operand in operands:
        parts = _components(ufl.as_ufl(operand))
        components.extend(parts)
        widths.append(len(parts))
    return components, widths


def flatten_operands(
    operands: Sequence[ufl.core.expr.Expr],
) -> tuple[ufl.core.expr.Expr, list[int]]:
    """Stack the components of all operands into one UFL vector.

    UFL simplifies ``as_vector([g[0], g[1]])`` back to ``g``, so the vector's
    ``ufl_operands`` are not the components; use :func:`operand_components` for those.

    Args:
        operands: UFL expressions of any shapes.

    Returns:
        The vector of all components, operand after operand, each in row-major order, and
        the number of components of each operand.
    """
    components, widths = operand_components(operands)
    return ufl.as_vector(components), widths


def _component_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """Column names of an operand's components, row-major: ``u``, ``grad(u)[0]``, ..."""
    if shape == ():
        return [name]
    return [f"{name}[{','.join(map(str, index))}]" for index in np.ndindex(shape)]


class Operands(Sequence[ufl.core.expr.Expr]):
    """UFL operands on one mesh, with their names, widths, mesh and scalar type.

    A sequence of the UFL expressions (``len``, indexing and iteration give them, in input
    order), so it stands wherever a list of operands did.

    Args:
        operands: A dict ``{name: expression}`` (insertion order is input order), a
            sequence of UFL expressions or :class:`dolfinx.fem.Function` objects, a single
            expression, or another :class:`Operands` (whose names are kept).
        names: One name per operand, when ``operands`` is not a dict. Default: the UFL
            text of each operand (:func:`describe`), e.g. ``u`` and ``grad(u)``.
        mesh: The mesh the operands must live on; by default the one they live on (found
            through their :class:`~dolfinx.fem.Function` coefficients).

    Attributes:
        expressions: The operands, shape-preserving UFL expressions.
        names: One name per operand.
        shapes: The UFL shape of each operand.
        widths: The number of scalar components of each operand (``prod(shape)``).
        mesh: The mesh.
        dtype: The scalar type of the operands' coefficients (or, without coefficients,
            of the mesh geometry): ``float32`` or ``float64``.

    Raises:
        ValueError: No operands; names that are not one per operand or repeat; operands
            on several meshes, on none that can be found, or on another mesh than
            ``mesh``.
        TypeError: An operand that is not a UFL expression; a name that is not a
            non-empty string; names given twice (dict keys and ``names``); operands of
            mixed or unsupported (complex) scalar types.

    Example:
        >>> operands = Operands([u, ufl.grad(u)], names=["u", "grad_u"])
        >>> operands.component_names
        ['u', 'grad_u[0]', 'grad_u[1]']
    """

    expressions: tuple[ufl.core.expr.Expr, ...]
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    widths: tuple[int, ...]
    mesh: Mesh
    dtype: np.dtype

    def __init__(
        self,
        operands: OperandsLike,
        names: Sequence[str] | None = None,
        *,
        mesh: Mesh | None = None,
    ):
        """Check the operands (rank-local); see the class docstring for the arguments."""
        given_names: Sequence[str] | None = names
        if isinstance(operands, Operands):
            expressions: list[typing.Any] = list(operands.expressions)
            if given_names is None:
                given_names = operands.names
        elif isinstance(operands, Mapping):
            if given_names is not None:
                raise TypeError(
                    "Give operand names either as the keys of a dict or as names=, not both."
                )
            given_names = list(operands.keys())
            expressions = list(operands.values())
        elif isinstance(operands, ufl.core.expr.Expr):
            expressions = [operands]
        elif isinstance(operands, Sequence) and not isinstance(operands, str | bytes):
            expressions = list(operands)
        else:
            raise TypeError(
                "operands must be UFL expressions (a list, a dict {name: expression} or "
                f"dolfinx_mno.Operands), got {type(operands).__name__}."
            )
        if not expressions:
            raise ValueError("A closure needs at least one operand.")
        self.expressions = tuple(_as_expression(e, i) for i, e in enumerate(expressions))
        self.names = _check_names(given_names, self.expressions)
        self.shapes = tuple(tuple(int(n) for n in e.ufl_shape) for e in self.expressions)
        self.widths = tuple(int(np.prod(shape, dtype=int)) for shape in self.shapes)
        self.mesh = _operand_mesh(self.expressions, self.names, mesh)
        self.dtype = _scalar_dtype(self.expressions, self.mesh)

    # -- the sequence of expressions ------------------------------------------------------

    def __len__(self) -> int:
        """Number of operands."""
        return len(self.expressions)

    @typing.overload
    def __getitem__(self, index: int) -> ufl.core.expr.Expr: ...

    @typing.overload
    def __getitem__(self, index: slice) -> tuple[ufl.core.expr.Expr, ...]: ...

    def __getitem__(
        self, index: int | slice
    ) -> ufl.core.expr.Expr | tuple[ufl.core.expr.Expr, ...]:
        """The operand(s) at ``index``, as UFL expressions."""
        return self.expressions[index]

    def __iter__(self) -> Iterator[ufl.core.expr.Expr]:
        """The UFL expressions, in input order."""
        return iter(self.expressions)

    def __repr__(self) -> str:
        """``Operands(u: 1, grad(u): 2)``: names and widths."""
        parts = ", ".join(f"{n}: {w}" for n, w in zip(self.names, self.widths, strict=True))
        return f"Operands({parts})"

    # -- derived quantities --------------------------------------------------------------

    @property
    def comm(self) -> MPI.Comm:
        """The mesh communicator: what a closure of these operands is collective on."""
        return typing.cast(MPI.Comm, self.mesh.comm)

    @property
    def num_inputs(self) -> int:
        """Total number of scalar components: the model's input width (or channels)."""
        return sum(self.widths)

    @property
    def component_names(self) -> list[str]:
        """Name of each input column: ``u``, ``grad(u)[0]``, ``grad(u)[1]``, ..."""
        return [
            column
            for name, shape in zip(self.names, self.shapes, strict=True)
            for column in _component_names(name, shape)
        ]

    @property
    def components(self) -> list[ufl.core.expr.Expr]:
        """The ``num_inputs`` scalar components, operand after operand, each row-major."""
        return operand_components(self.expressions)[0]

    @property
    def vector(self) -> ufl.core.expr.Expr:
        """The fused UFL vector of all components, shape ``(num_inputs,)``."""
        return ufl.as_vector(self.components)

    def expression(self, points: npt.NDArray[np.floating]) -> fem.Expression:
        """The fused vector as one :class:`dolfinx.fem.Expression` (collective: JIT).

        Args:
            points: Reference-cell points, shape ``(num_points, tdim)``.

        Returns:
            An expression in :attr:`dtype`; evaluated on ``num_cells`` cells it gives
            ``(num_cells, num_points, num_inputs)`` values.
        """
        return fem.Expression(self.vector, points, dtype=self.dtype)


class WithOperands:
    """The operand accessors of an object built on :class:`Operands`.

    Closures and :class:`~dolfinx_mno.data.ClosureSampler` set ``_operands``; this gives
    them the same read-only view of it.
    """

    _operands: Operands

    @property
    def operands(self) -> Operands:
        """The operands, in input order (a sequence of UFL expressions, with names)."""
        return self._operands

    @property
    def operand_widths(self) -> list[int]:
        """Number of input components (columns, channels) of each operand."""
        return list(self._operands.widths)

    @property
    def input_names(self) -> list[str]:
        """Name of each input column: ``u``, ``grad(u)[0]``, ``grad(u)[1]``, ..."""
        return self._operands.component_names


#: What every constructor taking operands accepts: an :class:`Operands`, a dict of named
#: expressions, a sequence of expressions (or functions), or a single expression.
type OperandsLike = (
    Operands
    | Mapping[str, ufl.core.expr.Expr | fem.Function]
    | Sequence[ufl.core.expr.Expr | fem.Function]
    | ufl.core.expr.Expr
)


def operand_comm(operands: OperandsLike, mesh: Mesh | None) -> MPI.Comm:
    """The communicator that objects built on these operands are collective on; never raises.

    That of ``mesh``, or of the operands' mesh. It is known before anything is validated,
    so that every rank-local check (:class:`Operands` among them) can run inside one
    agreement on it (:func:`dolfinx_mno._mpi.rank_local`). Where it cannot be told
    (operands on several meshes or on none, or not UFL at all), :class:`Operands` rejects
    the arguments identically on every rank, and ``MPI.COMM_SELF`` is returned.
    """
    try:
        if mesh is not None:
            return typing.cast(MPI.Comm, mesh.comm)
        if isinstance(operands, Operands):
            return operands.comm
        if isinstance(operands, Mapping):
            operands = list(operands.values())
        elif isinstance(operands, ufl.core.expr.Expr):
            operands = [operands]
        expressions = [ufl.as_ufl(op) for op in operands]
        names = [str(i) for i in range(len(expressions))]
        return typing.cast(MPI.Comm, _operand_mesh(expressions, names, None).comm)
    except Exception:  # bad arguments: Operands says why, on every rank
        return MPI.COMM_SELF


def _as_expression(operand: typing.Any, index: int) -> ufl.core.expr.Expr:
    """``operand`` as a UFL expression (numbers become constants); refuses anything else.

    Refuses trial and test functions too: an operand is evaluated at the quadrature points
    from dof values, and an argument has none (``fem.Expression`` would tabulate it as a
    basis, one value per basis function, which overruns the operand buffer).
    """
    try:
        expression = typing.cast(ufl.core.expr.Expr, ufl.as_ufl(operand))
    except Exception:
        raise TypeError(
            f"Operand {index} must be a UFL expression or a fem.Function, got "
            f"{type(operand).__name__}."
        ) from None
    arguments = extract_arguments(expression)
    if arguments:
        kind = "a TestFunction" if arguments[0].number() == 0 else "a TrialFunction"
        raise TypeError(
            f"Operand {index} ({expression}) contains {kind}: a closure reads coefficients "
            "(fem.Function, fem.Constant, SpatialCoordinate), not form arguments. Pass the "
            "function holding the state (e.g. the previous step's u_n, or the Newton "
            "iterate u_h); mno.derivative(F, u_h) linearises the closure through it."
        )
    if any(isinstance(node, Restricted) for node in unique_pre_traversal(expression)):
        raise ValueError(
            f"Operand {index} ({expression}) is restricted to a side of a facet (avg, jump, "
            "u('+')): a closure's operands are evaluated at points inside the cells, where "
            "a facet has no sides, so its values would be meaningless. Pass the unrestricted "
            "expression (e.g. u, ufl.grad(u))."
        )
    # Closures and closure tangents carry their quadrature degree (quadrature._closure_degree;
    # not imported: quadrature imports this module).
    nested = [
        c.name
        for c in extract_coefficients(expression)
        if getattr(c, "_mno_quadrature_degree", None) is not None
    ]
    if nested:
        raise TypeError(
            f"Operand {index} ({expression}) reads the closure values {nested}: a closure of "
            "a closure is neither updated by the problems (they update the closures of their "
            "forms, not of the closures' operands) nor linearised by mno.derivative (the "
            "chain rule through the inner closure is missing), so its values and Jacobian "
            "would be silently wrong. Compose the two models into one torch.nn.Module that "
            "reads the inner closure's operands instead."
        )
    return expression


def _check_names(
    names: Sequence[str] | None, expressions: Sequence[ufl.core.expr.Expr]
) -> tuple[str, ...]:
    """The given names, checked, or the UFL text of each expression."""
    if names is None:
        return tuple(describe(e) for e in expressions)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a list of strings, one per operand, got {names!r}.")
    names = list(names)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"Operand names must be non-empty strings, got {name!r}.")
    if len(names) != len(expressions):
        raise ValueError(
            f"{len(names)} operand name(s) {names} were given for {len(expressions)} operand(s)."
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"Operand names must be unique, but {repeated} repeat.")
    return tuple(names)


def _operand_mesh(
    operands: Sequence[ufl.core.expr.Expr], names: Sequence[str], mesh: Mesh | None
) -> Mesh:
    """The mesh all operands live on; raises if they live on several or on another one."""
    if mesh is not None:
        strangers = [
            name
            for name, operand in zip(names, operands, strict=True)
            if any(d != mesh.ufl_domain() for d in ufl.domain.extract_domains(operand))
        ]
        if strangers:
            raise ValueError(
                f"Operands must live on the mesh they are used on, but operand(s) {strangers} "
                "belong to another mesh; build them from functions on that mesh."
            )
        return mesh
    domains: set[ufl.AbstractDomain] = set()
    for operand in operands:
        domains.update(ufl.domain.extract_domains(operand))
    if len(domains) != 1:
        raise ValueError(
            "Operands must live on exactly one mesh, but they live on "
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
    """The scalar dtype of the operand functions and constants (or of the mesh), checked.

    A DOLFINx expression needs one scalar type: a float32 ``fem.Constant`` in a float64
    operand would only fail in the (collective) compilation, with a binding error.
    """
    dtypes = {
        np.dtype(c.dtype)
        for op in operands
        for c in (*extract_coefficients(op), *extract_constants(op))
        if hasattr(c, "dtype")
    }
    if not dtypes:
        dtypes = {np.dtype(mesh.geometry.x.dtype)}
    if len(dtypes) > 1:
        raise TypeError(
            f"Operands mix scalar types {sorted(map(str, dtypes))}; build their functions "
            "and constants in one scalar type."
        )
    dtype = dtypes.pop()
    if dtype not in NUMPY_TO_TORCH:
        raise TypeError(
            f"Unsupported dtype {dtype}: closures support real float32 and float64 DOLFINx "
            "problems."
        )
    return dtype
