"""The operand stage of a closure update: operands at the quadrature points of the owned cells.

A closure evaluates its fused operand vector (``[u, grad(u), ...]``) at the points of its
quadrature rule on every owned cell, once per update. :meth:`fem.Expression.eval` does
this in three steps: it packs the coefficients' cell dofs into a new
``(num_cells, num_cell_dofs)`` array, packs the constants, and runs the generated kernel
(which recomputes the geometry) on every cell. :class:`OperandEvaluator` does the same
with less work per update, in one of four modes chosen at construction (``mode``):

``"packed"``
    The generated kernel on coefficients gathered into a buffer allocated once, with a
    dof index computed once (no allocation per update). Used when every coefficient's
    element needs no dof transformations (Lagrange elements, blocked or not) and the
    gathered buffer equals DOLFINx's own packing at construction.
``"matrix"``
    For operands that are *affine in the coefficients* on a fixed mesh (``u``,
    ``grad(u)``, ``x``, other coefficients, sums of them with numbers; no
    :class:`dolfinx.fem.Constant`, whose value may change), the map from the cell dofs to
    the operand values at the points is a constant matrix per cell, ``values[c] =
    B[c] @ dofs[c] + offset[c]``. It is built once, by running the kernel on unit dof
    vectors (the local element tabulation with the geometry), then applied as a batched
    product. It is kept only if it measures faster than ``"packed"`` at construction, and
    only when its blocks take at most ``max_matrix_bytes``. If the mesh geometry changes
    afterwards (a moving mesh), the evaluator notices at the next update (the geometry is
    compared with a copy) and falls back to ``"packed"`` for good.
``"compiled"``
    Only with ``compile=True`` (``Closure(..., compile=True)``): the matrix's blocks,
    applied together with the gathering of the dofs by one loop compiled by
    :func:`torch.compile` (:mod:`dolfinx_mno.operand_compiled`).
    Built when the matrix applies, and kept only if it measures faster than ``"packed"``
    and ``"matrix"``; a moving mesh drops it as it drops the matrix. If compilation fails,
    the plan says why and the other modes are used.
``"expression"``
    :meth:`fem.Expression.eval` itself (the fallback for elements with dof
    transformations).

All modes give the same values up to round-off (the matrix sums the same products in
another order). Whatever the mode, :meth:`OperandEvaluator.matrix` builds the global
sparse form of the map on request for affine operands: its transpose maps sensitivities at
the quadrature points back to the dofs (a-posteriori training).

On this repository's 2-core benchmark machine (``docs/benchmarks.md``), for P1
``[u, grad(u)]`` at 10⁶ points, ``"packed"`` takes 8.2–8.5 ms where
:meth:`fem.Expression.eval` takes 9.6–10.5 ms (1.15–1.25×; up to 1.6× on a loaded machine,
where fresh allocations cost page faults): the generated kernel, which both run, is most of
the stage. ``"matrix"`` loses (16.6 ms): its blocks hold 27 numbers per cell where the
kernel reads 9 vertex coordinates, and the stage is bound by memory traffic, not
arithmetic. ``"compiled"`` reads the same blocks but makes one pass over memory instead
of three (``docs/benchmarks.md``, seventh session).
"""

from __future__ import annotations

import dataclasses
import typing
import warnings

import numpy as np
import torch
import ufl
from dolfinx import cpp as _cpp
from dolfinx import fem
from dolfinx.mesh import Mesh
from ufl.algorithms import expand_derivatives, extract_coefficients
from ufl.algorithms.analysis import extract_constants

from dolfinx_mno._mpi import describe
from dolfinx_mno._timing import best_times
from dolfinx_mno.operand_compiled import CompiledAffineMap

__all__ = ["OPERAND_MODES", "OperandEvaluator", "OperandMatrix", "is_affine_in_coefficients"]

#: The operand evaluation modes.
OPERAND_MODES = ("packed", "matrix", "compiled", "expression")


def is_affine_in_coefficients(expression: ufl.core.expr.Expr) -> bool:
    """Whether ``expression`` is affine in its coefficients, with no ``fem.Constant``.

    Affine: every Gateaux derivative with respect to a coefficient is free of
    coefficients. ``u``, ``grad(u)``, ``2 * u + x[0]`` are; ``u**2``, ``u * w``,
    ``sin(u)``, ``c * u`` with a :class:`dolfinx.fem.Constant` ``c`` are not.
    """
    if extract_constants(expression):
        return False
    for coefficient in extract_coefficients(expression):
        argument = ufl.Argument(coefficient.ufl_function_space(), 0)
        variation = expand_derivatives(ufl.derivative(expression, coefficient, argument))
        if extract_coefficients(variation) or extract_constants(variation):
            return False
    return True


@dataclasses.dataclass(frozen=True)
class OperandMatrix:
    """The affine map from coefficient dofs to operand values at the quadrature points.

    ``operands.reshape(-1) = matrix @ dofs + offset.reshape(-1)`` on one rank, where
    ``dofs`` concatenates ``coefficient.x.array`` (owned and ghost entries) of every
    coefficient in :attr:`coefficients`, and ``operands`` is the closure's
    ``(num_cells * num_points, num_inputs)`` model input (its cells, cell after cell,
    point after point). The matrix's transpose maps sensitivities at the points back to
    the dofs (sum the ghost entries into their owners with ``scatter_reverse``).

    Attributes:
        matrix: ``torch.sparse_csr_tensor`` of shape
            ``(num_cells * num_points * num_inputs, sum of the coefficients' array sizes)``
            in the DOLFINx dtype, on the CPU.
        offset: ``(num_cells * num_points, num_inputs)``: the operands with every
            coefficient zero (``x`` for a ``SpatialCoordinate`` operand, else zeros).
        coefficients: The coefficients, in the order of the matrix's column blocks.
        column_offsets: First column of each coefficient's block, and the total.
    """

    matrix: torch.Tensor
    offset: np.ndarray
    coefficients: tuple[fem.Function, ...]
    column_offsets: tuple[int, ...]


class OperandEvaluator:
    """Evaluate a fused operand expression on the owned cells into a caller's buffer.

    Args:
        expression: The compiled fused operand vector (value shape ``(num_inputs,)``).
        mesh: The mesh.
        cells: Number of owned cells (cells ``0 .. cells - 1``), or the local indices of
            the owned cells to evaluate on, in order (``num_cells`` of them).
        values: The buffer to write, ``(num_cells, num_points, num_inputs)`` in the
            expression's dtype, C-contiguous; it is written by every :meth:`evaluate`.
        mode: ``None`` (the default) chooses as described in the module docstring;
            ``"packed"``, ``"matrix"``, ``"compiled"`` or ``"expression"`` forces that
            mode.
        max_matrix_bytes: Largest size of the matrix blocks to try; by default four times
            the size of ``values``.
        compile: Also try the ``"compiled"`` mode (it is forced by ``mode="compiled"``).

    Raises:
        ValueError: A forced mode that does not apply (``"matrix"`` for operands that are
            not affine, ``"packed"``/``"matrix"`` for elements with dof transformations),
            or ``"compiled"`` where :func:`torch.compile` fails.

    Attributes:
        mode: ``"packed"``, ``"matrix"``, ``"compiled"`` or ``"expression"`` (see the
            module docstring).
        plan: Why: the mode, the reason for a fallback, and the seconds measured.
    """

    def __init__(
        self,
        expression: fem.Expression,
        mesh: Mesh,
        cells: int | np.ndarray,
        values: np.ndarray,
        *,
        mode: str | None = None,
        max_matrix_bytes: int | None = None,
        compile: bool = False,
    ):
        if mode not in (None, *OPERAND_MODES):
            raise ValueError(f"mode must be None or one of {OPERAND_MODES}, got {mode!r}.")
        self._expression = expression
        self._cpp_expression = expression._cpp_object
        self._mesh = mesh
        if isinstance(cells, int | np.integer):
            cells = np.arange(cells, dtype=np.int32)
        self._cells = np.ascontiguousarray(cells, dtype=np.int32)
        num_cells = self.num_cells = self._cells.size
        self._values = values
        self.plan: dict[str, typing.Any] = {}
        self._coefficients = self._ordered_coefficients()
        self._constants = extract_constants(expression.ufl_expression)
        self._packed, self._indices, self._column_offsets = self._packing()
        self._constant_values = np.zeros(
            sum(int(np.size(c.value)) for c in self._constants), dtype=expression.dtype
        )
        self.mode = "packed" if self._packing_matches() else "expression"
        self._blocks: np.ndarray | None = None
        self._offset: np.ndarray | None = None
        self._geometry: torch.Tensor | None = None
        self._compiled_map: CompiledAffineMap | None = None
        self.affine = is_affine_in_coefficients(expression.ufl_expression)
        if mode in ("packed", "matrix", "compiled") and self.mode == "expression":
            raise ValueError(f"Operand mode {mode!r} does not apply: {self.plan['fallback']}.")
        if mode in ("matrix", "compiled") and not self.affine:
            raise ValueError(
                f"Operand mode {mode!r} needs operands affine in the coefficients, without "
                "fem.Constant."
            )
        if mode == "expression":
            self.mode = "expression"
        elif mode in ("matrix", "compiled"):
            self._use_matrix()
            if mode == "compiled" and num_cells > 0:
                self._use_compiled(raise_errors=True)
                self._blocks = self._offset = None  # the compiled map holds what it needs
            self.mode = mode
        elif mode is None and self.mode == "packed" and num_cells > 0:
            self._try_matrix(max_matrix_bytes or 4 * values.nbytes, compile)
        self.plan["mode"] = self.mode

    # -- set-up -----------------------------------------------------------------------

    def _ordered_coefficients(self) -> list[fem.Function]:
        """The coefficients in the order of the compiled expression's packing."""
        original = extract_coefficients(self._expression.ufl_expression)
        positions = self._expression._ufcx_expression.original_coefficient_positions
        count = self._expression._ufcx_expression.num_coefficients
        return [original[positions[i]] for i in range(count)]

    def _packing(self) -> tuple[np.ndarray, list[np.ndarray], tuple[int, ...]]:
        """The packed-coefficient buffer, each coefficient's gather index and column offsets.

        The index of a coefficient is ``(num_cells, num_cell_dofs * block_size)``: its cell
        dofs, each unrolled over the block, as DOLFINx packs them.
        """
        indices = []
        offsets = [0]
        for coefficient in self._coefficients:
            dofmap = coefficient.function_space.dofmap
            bs = dofmap.bs
            cell_dofs = dofmap.list[self._cells].astype(np.int64)
            width = cell_dofs.shape[1] * bs  # explicit: a rank may own no cells
            unrolled = (cell_dofs[:, :, None] * bs + np.arange(bs)).reshape(self.num_cells, width)
            indices.append(unrolled)
            offsets.append(offsets[-1] + unrolled.shape[1])
        packed = np.zeros((self.num_cells, offsets[-1]), dtype=self._expression.dtype)
        return packed, indices, tuple(offsets)

    def _packing_matches(self) -> bool:
        """Whether the gathered buffer is DOLFINx's packing (no dof transformations)."""
        for coefficient in self._coefficients:
            if coefficient.function_space.element.needs_dof_transformations:
                self.plan["fallback"] = "an element needs dof transformations"
                return False
        self._pack()
        reference = _cpp.fem.pack_coefficients(
            self._cpp_expression, self._mesh._cpp_object, self._cells
        )
        constants = _cpp.fem.pack_constants(self._cpp_expression)
        if not np.array_equal(reference.reshape(self._packed.shape), self._packed):
            self.plan["fallback"] = "the gathered dofs differ from DOLFINx's packing"
            return False
        if not np.array_equal(constants, self._constant_values):
            self.plan["fallback"] = "the gathered constants differ from DOLFINx's packing"
            return False
        return True

    def _pack(self) -> None:
        """Gather the coefficients' cell dofs and the constants into their buffers."""
        for coefficient, index, start, stop in zip(
            self._coefficients,
            self._indices,
            self._column_offsets[:-1],
            self._column_offsets[1:],
            strict=True,
        ):
            np.take(coefficient.x.array, index, out=self._packed[:, start:stop], mode="clip")
        position = 0
        for constant in self._constants:
            size = int(np.size(constant.value))
            self._constant_values[position : position + size] = np.ravel(constant.value)
            position += size

    def _tabulate(self, packed: np.ndarray) -> None:
        """Run the generated kernel on ``packed`` coefficients into the value buffer."""
        _cpp.fem.tabulate_expression(
            self._values,
            self._cpp_expression,
            self._constant_values,
            packed,
            self._mesh._cpp_object,
            self._cells,
        )

    def _tabulate_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """The per-cell matrix ``(num_cells, rows, num_cell_dofs)`` and the offset.

        Column ``k`` is the kernel run on the ``k``-th unit vector of packed dofs, minus
        the offset (the kernel on zero dofs). Overwrites the value buffer.
        """
        rows = int(np.prod(self._values.shape[1:]))  # also on a rank without cells
        unit = np.zeros_like(self._packed)
        self._tabulate(unit)
        offset = self._values.reshape(self.num_cells, rows).copy()
        blocks = np.empty((self.num_cells, rows, unit.shape[1]), dtype=self._values.dtype)
        for k in range(unit.shape[1]):
            unit[:, k] = 1.0
            self._tabulate(unit)
            unit[:, k] = 0.0
            np.subtract(self._values.reshape(self.num_cells, rows), offset, out=blocks[:, :, k])
        return blocks, offset

    def _try_matrix(self, max_bytes: int, compile: bool) -> None:
        """Build the matrix (and compiled) modes if they apply; keep the fastest mode."""
        if not self.affine:
            self.plan["matrix"] = "not tried: the operands are not affine in the coefficients"
            return
        size = self._values.nbytes * self._packed.shape[1]
        if size > max_bytes:
            self.plan["matrix"] = f"not tried: its blocks would take {size} bytes"
            return
        self._use_matrix()
        candidates = {"packed": self._evaluate_packed, "matrix": self._evaluate_matrix}
        if compile and not self._coefficients:  # x alone, constants folded: nothing to gather
            self.plan["compiled"] = "not tried: the operands read no coefficient"
        elif compile and self._use_compiled(raise_errors=False):
            assert self._compiled_map is not None
            candidates["compiled"] = self._compiled_map
        seconds = best_times(candidates)
        self.plan["seconds"] = seconds
        self.mode = min(seconds, key=seconds.__getitem__)  # ties: the first, packed
        for other in ("matrix", "compiled"):
            if other in seconds and self.mode != other:
                self.plan[other] = f"built, slower than {self.mode}"
        if self.mode != "compiled":
            self._compiled_map = None
        else:
            self._blocks = self._offset = None  # the compiled map holds what it needs
        if self.mode == "packed":
            self._blocks = self._offset = self._geometry = None

    def _use_compiled(self, raise_errors: bool) -> bool:
        """Build the compiled map from the matrix's blocks; whether it could be built."""
        assert self._blocks is not None
        try:
            self._compiled_map = CompiledAffineMap(
                self._blocks,
                self._offset,
                [c.x.array for c in self._coefficients],
                self._indices,
                self._values,
            )
        except Exception as err:
            if raise_errors:
                raise
            self.plan["compiled"] = f"failed: {describe(err, first_line=True)}"
            return False
        self.mode = "compiled"
        return True

    def _use_matrix(self) -> None:
        """Build the per-cell matrix and switch to the matrix mode."""
        self._blocks, offset = self._tabulate_blocks()
        self._offset = offset if np.any(offset) else None
        self._geometry = torch.from_numpy(self._mesh.geometry.x.copy())
        self.mode = "matrix"

    # -- evaluation -------------------------------------------------------------------

    def evaluate(self) -> None:
        """Write the operands at the points of the owned cells into the value buffer."""
        if self.num_cells == 0:
            return
        if self.mode in ("matrix", "compiled"):
            assert self._geometry is not None
            if torch.equal(torch.from_numpy(self._mesh.geometry.x), self._geometry):
                if self._compiled_map is not None:
                    self._compiled_map()
                else:
                    self._evaluate_matrix()
                return
            self.plan[self.mode] = "dropped: the mesh geometry changed"
            self.mode = self.plan["mode"] = "packed"  # the mesh moved: for good
            self._blocks = self._offset = self._geometry = self._compiled_map = None
        if self.mode == "packed":
            self._evaluate_packed()
        else:
            self._expression.eval(self._mesh, self._cells, values=self._values)

    def _evaluate_packed(self) -> None:
        self._pack()
        self._tabulate(self._packed)

    def _evaluate_matrix(self) -> None:
        assert self._blocks is not None
        self._pack()
        products = self._values.reshape(self.num_cells, -1, 1)
        np.matmul(self._blocks, self._packed[:, :, None], out=products)
        if self._offset is not None:
            products[:, :, 0] += self._offset

    # -- the matrix -------------------------------------------------------------------

    def matrix(self) -> OperandMatrix:
        """The map from coefficient dofs to operands as a sparse matrix (affine operands).

        Built from the current geometry on every call (it does not change the mode).

        Raises:
            ValueError: The operands are not affine in the coefficients, or contain a
                :class:`dolfinx.fem.Constant`, or an element needs dof transformations.
        """
        if not self.affine:
            raise ValueError(
                "The operands are not affine in the coefficients (or contain a "
                "fem.Constant), so no constant matrix maps the dofs to them."
            )
        if self.mode == "expression":
            raise ValueError("The operands' elements need dof transformations; no operand matrix.")
        saved = self._values.copy()
        blocks, offset = self._tabulate_blocks()
        self._values[...] = saved
        rows, width = blocks.shape[1], blocks.shape[2]
        sizes = [c.x.array.size for c in self._coefficients]
        array_offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        # Column of packed dof k of cell c: its index in the concatenated coefficient arrays.
        columns = np.zeros((self.num_cells, width), dtype=np.int64)
        for index, start, stop, shift in zip(
            self._indices,
            self._column_offsets[:-1],
            self._column_offsets[1:],
            array_offsets[:-1],
            strict=True,
        ):
            columns[:, start:stop] = index + shift
        every_row = np.repeat(columns[:, None, :], rows, axis=1)  # writable, also when empty
        crow = width * np.arange(self.num_cells * rows + 1, dtype=np.int64)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            matrix = torch.sparse_csr_tensor(
                torch.from_numpy(crow),
                torch.from_numpy(every_row.reshape(-1)),
                torch.from_numpy(blocks.reshape(-1)),
                size=(self.num_cells * rows, int(array_offsets[-1])),
                check_invariants=False,  # built here, sorted and in range by construction
            )
        num_inputs = self._values.shape[-1] if self._values.ndim == 3 else 1
        return OperandMatrix(
            matrix=matrix,
            offset=offset.reshape(-1, num_inputs),
            coefficients=tuple(self._coefficients),
            column_offsets=tuple(int(o) for o in array_offsets),
        )
