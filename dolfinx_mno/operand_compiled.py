"""The affine operand map applied by one compiled loop (the ``"compiled"`` operand mode).

For operands affine in the coefficients on a fixed mesh, :mod:`dolfinx_mno.operand_map`
builds the per-cell blocks ``B[c]`` with ``values[c] = B[c] @ dofs[c] + offset[c]``.
Applied as a batched NumPy product (the ``"matrix"`` mode) they lose to the generated
kernel: NumPy gathers the dofs into one array, runs a batched product of tiny matrices
with a loop per cell, and writes the result, three passes over memory. Here gathering
the cell dofs from the coefficients' arrays, the products and the writes into the
operand buffer are one loop over the cells, compiled by :func:`torch.compile` (inductor),
which writes every operand value once, straight into the buffer, and allocates nothing.

The blocks are stored ``(num_cells, num_cell_dofs, rows)``, so that the loop over the rows
is innermost and contiguous (inductor vectorises the innermost loop). Compact forms that
store a row shared by every cell once (the values of a coefficient at the points) were
measured and dropped: inductor then assembles the rows of a cell in a temporary buffer
and copies it (with one allocation per call), or runs a masked loop per row, 1.5-5x
slower.

Dynamo compiles :func:`_apply` once per operand layout (shapes). Past
``torch._dynamo.config.recompile_limit`` layouts in one process it runs further ones
eagerly (the same values, with temporaries); such a map then loses the timing at
construction and is not kept.

:class:`CompiledAffineMap` is only used with ``Closure(..., compile=True)``, and only kept
where it measures faster than the other modes (see
:class:`~dolfinx_mno.operand_map.OperandEvaluator`).
"""

from __future__ import annotations

import typing

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["CompiledAffineMap"]


def _apply(
    arrays: tuple[torch.Tensor, ...],
    indices: tuple[torch.Tensor, ...],
    blocks: torch.Tensor,
    offset: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """``out[c, r] = sum_k blocks[c, k, r] dofs[c, k] (+ offset[c, r])``, one loop."""
    if not arrays:  # operands without coefficients (x alone): the offset is everything
        out.copy_(offset) if offset is not None else out.zero_()
        return
    dofs = torch.cat([array[index] for array, index in zip(arrays, indices, strict=True)], 1)
    values = (blocks * dofs[:, :, None]).sum(1)
    out.copy_(values if offset is None else values + offset)


class CompiledAffineMap:
    """``values[c] = B[c] @ dofs[c] + offset[c]`` on every cell by one compiled loop.

    Args:
        blocks: ``(num_cells, rows, width)``, the per-cell matrices (at least one cell).
        offset: ``(num_cells, rows)``, or ``None`` for zero.
        arrays: The coefficients' arrays (``coefficient.x.array``, owned and ghost
            entries), in packing order: views on memory that DOLFINx never reallocates,
            read at every call. The caller keeps the coefficients alive.
        indices: For each array, its ``(num_cells, columns)`` gather index (the packing's).
        values: The buffer to write, ``(num_cells, ...)`` with ``rows`` entries per cell,
            C-contiguous.
        compile: Compile the loop with :func:`torch.compile` (``False``: run the same
            function eagerly, for tests).

    Raises:
        Exception: Whatever :func:`torch.compile` raises on the first call, made here
            (the caller falls back to another mode).
    """

    def __init__(
        self,
        blocks: npt.NDArray[np.floating],
        offset: npt.NDArray[np.floating] | None,
        arrays: typing.Sequence[npt.NDArray[np.floating]],
        indices: typing.Sequence[npt.NDArray[np.integer]],
        values: npt.NDArray[np.floating],
        compile: bool = True,
    ):
        num_cells = blocks.shape[0]
        self._blocks = torch.from_numpy(blocks).transpose(1, 2).contiguous()
        self._offset = None if offset is None else torch.from_numpy(offset)
        self._arrays = tuple(torch.from_numpy(a) for a in arrays)
        self._indices = tuple(torch.from_numpy(i.astype(np.int32)) for i in indices)
        self._out = torch.from_numpy(values).view(num_cells, -1)
        self._function = torch.compile(_apply, dynamic=False) if compile else _apply
        self()  # compiles now (a failure raises here, not in an update)

    def __call__(self) -> None:
        """Write the operands of the current coefficient values into the buffer."""
        self._function(self._arrays, self._indices, self._blocks, self._offset, self._out)
