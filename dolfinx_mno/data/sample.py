"""Training samples at quadrature points and their rank-independent gathering.

A :class:`ClosureSample` holds one rank's share of one snapshot: closure inputs and
targets at the quadrature points of the rank's owned cells, in ``(cell, point)`` order, and
the *global* (original, input-order) index of each of those cells. :meth:`ClosureSample.gather`
collects all ranks' rows on one rank and sorts them by ``(global cell index, local point)``,
so the gathered arrays do not depend on the number of ranks or the partition.
"""

from __future__ import annotations

import dataclasses
import typing

from mpi4py import MPI

import numpy as np
from dolfinx.mesh import Mesh

from dolfinx_mno._mpi import on_root

__all__ = ["ClosureSample", "mesh_summary"]


@dataclasses.dataclass(frozen=True)
class ClosureSample:
    """One rank's share of one training sample.

    Attributes:
        inputs: Closure inputs, ``(num_local_points, num_inputs)``; the columns are the
            operand components in the order of :class:`dolfinx_mno.Closure`.
        targets: Closure targets, ``(num_local_points, *value_shape)``.
        cell_index: Global index of each owned cell (the same on any partition; a
            :class:`ClosureSampler`'s: :func:`~dolfinx_mno.cell_order.geometric_cell_index`),
            ``(num_local_cells,)``,
            int64; ``num_local_points = num_local_cells * points_per_cell`` and the rows of
            cell ``i`` are ``i * points_per_cell, ..., (i + 1) * points_per_cell - 1``.
        comm: The communicator the sample is distributed over.
        coordinates: Physical coordinates of the points, ``(num_local_points, gdim)``, or
            ``None``.
    """

    inputs: np.ndarray
    targets: np.ndarray
    cell_index: np.ndarray
    comm: MPI.Comm
    coordinates: np.ndarray | None = None

    @property
    def num_local_points(self) -> int:
        """Number of points (rows) on this rank."""
        return int(self.inputs.shape[0])

    def check(self, num_inputs: int, value_shape: tuple[int, ...], dtype: np.dtype) -> str | None:
        """Describe why this rank's arrays do not fit, or return ``None`` (local).

        Args:
            num_inputs: Expected input width.
            value_shape: Expected target shape per point.
            dtype: Expected dtype of inputs and targets.
        """
        inputs, targets, cells = self.inputs, self.targets, self.cell_index
        if not isinstance(inputs, np.ndarray) or not isinstance(targets, np.ndarray):
            return "inputs and targets must be NumPy arrays"
        if inputs.ndim != 2 or inputs.shape[1] != num_inputs:
            return f"inputs have shape {inputs.shape}, expected (num_points, {num_inputs})"
        if targets.shape != (inputs.shape[0], *value_shape):
            return (
                f"targets have shape {targets.shape}, expected "
                f"({inputs.shape[0]}, {', '.join(map(str, value_shape))})".replace(", )", ")")
            )
        for name, array in (("inputs", inputs), ("targets", targets)):
            if array.dtype != dtype:
                return f"{name} have dtype {array.dtype}, expected {dtype}"
        cells = np.asarray(cells)
        if cells.ndim != 1 or not np.issubdtype(cells.dtype, np.integer):
            return f"cell_index must be a 1D integer array, got {cells.dtype} {cells.shape}"
        if cells.size == 0 and inputs.shape[0] != 0:
            return "there are points but no cells"
        if cells.size and inputs.shape[0] % cells.size:
            return f"{inputs.shape[0]} points cannot be split evenly over {cells.size} cells"
        if self.coordinates is not None and self.coordinates.shape[:1] != inputs.shape[:1]:
            return f"coordinates have shape {self.coordinates.shape}, expected one row per point"
        return None

    def gather(
        self, root: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None:
        """Gather all ranks' rows on ``root`` in rank-independent order (collective).

        Rows are sorted by global cell index, then by point within the cell. The arrays
        must have been checked (:meth:`check`) on every rank.

        Args:
            root: The receiving rank.

        Returns:
            On ``root``: ``(inputs, targets, cell_index, coordinates)`` with shapes
            ``(num_points, num_inputs)``, ``(num_points, *value_shape)``,
            ``(num_cells,)`` sorted, and ``(num_points, gdim)`` or ``None``. Elsewhere
            ``None``.

        Raises:
            ValueError: On all ranks, if a global cell index occurs twice (e.g. ghost cells
                were included).
        """
        return self._gather(self._pack(), root)

    def _pack(self) -> np.ndarray:
        """This rank's rows for :meth:`gather` (local; call it before agreeing to gather).

        Returns:
            ``(num_local_points, width)``: inputs, flattened targets and coordinates side
            by side, in the inputs' dtype.
        """
        num_points = self.inputs.shape[0]
        num_outputs = int(np.prod(self.targets.shape[1:], dtype=int))
        # Explicit shapes: reshape(0, -1) raises on a rank that owns no cells, after the
        # ranks agreed that the sample is valid, which would leave the others waiting.
        parts = [self.inputs, self.targets.reshape(num_points, num_outputs)]
        if self.coordinates is not None:
            parts.append(np.asarray(self.coordinates, dtype=self.inputs.dtype))
        return np.ascontiguousarray(np.hstack(parts))

    def _gather(
        self, rows: np.ndarray, root: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None:
        """:meth:`gather` of the rows :meth:`_pack` returned (collective, nothing local)."""
        comm = self.comm
        num_points, width = rows.shape
        cells = np.ascontiguousarray(self.cell_index, dtype=np.int64)

        counts = comm.gather((cells.size, num_points), root=root)
        all_cells = all_rows = None
        if comm.rank == root:
            assert counts is not None
            cell_counts = np.array([c for c, _ in counts])
            row_counts = np.array([p for _, p in counts]) * width
            all_cells = np.empty(cell_counts.sum(), dtype=np.int64)
            all_rows = np.empty(row_counts.sum(), dtype=rows.dtype)
            cell_buffer: typing.Any = [all_cells, cell_counts]
            row_buffer: typing.Any = [all_rows, row_counts]
        else:
            cell_buffer = row_buffer = None
        comm.Gatherv(cells, cell_buffer, root=root)
        comm.Gatherv(rows.reshape(-1), row_buffer, root=root)

        # The root sorts the rows and checks the cells; every rank learns of a problem.
        result: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None = None

        def sort() -> None:
            nonlocal result
            assert all_cells is not None and all_rows is not None
            result = self._sorted(all_cells, all_rows, width)

        on_root(comm, sort, "Gathering the sample", root=root)
        return result

    def _sorted(
        self, all_cells: np.ndarray, all_rows: np.ndarray, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """The gathered rows in global cell order, split into arrays (on the root).

        Raises:
            ValueError: A global cell index occurs more than once.
        """
        order = np.argsort(all_cells, kind="stable")
        sorted_cells = all_cells[order]
        duplicates = sorted_cells[1:][sorted_cells[1:] == sorted_cells[:-1]]
        if duplicates.size:
            raise ValueError(
                f"Cannot gather the sample: global cell index {int(duplicates[0])} occurs "
                f"more than once ({duplicates.size} duplicates); give each owned cell once, "
                "no ghosts."
            )
        table = all_rows.reshape(-1, width)
        if all_cells.size:
            table = table.reshape(all_cells.size, -1, width)[order].reshape(-1, width)
        num_inputs = self.inputs.shape[1]
        value_shape = self.targets.shape[1:]
        end = num_inputs + int(np.prod(value_shape, dtype=int))
        inputs = np.ascontiguousarray(table[:, :num_inputs])
        targets = np.ascontiguousarray(table[:, num_inputs:end]).reshape(-1, *value_shape)
        coordinates = np.ascontiguousarray(table[:, end:]) if self.coordinates is not None else None
        return inputs, targets, sorted_cells, coordinates


# The dataclass's generated __init__ has no docstring; help() would show object's.
ClosureSample.__init__.__doc__ = (
    "Hold one rank's share of a sample; see the class docstring for the fields."
)


def mesh_summary(mesh: Mesh) -> dict[str, typing.Any]:
    """Global size of a mesh, for metadata (collective).

    Returns:
        ``cell_type``, ``gdim``, global ``num_cells`` and ``num_vertices``, and the smallest
        and largest cell size ``hmin``/``hmax`` (:meth:`dolfinx.mesh.Mesh.h`).
    """
    tdim = mesh.topology.dim
    num_cells = mesh.topology.index_map(tdim).size_local
    mesh.topology.create_entities(0)
    sizes = mesh.h(tdim, np.arange(num_cells, dtype=np.int32))
    local_min = float(sizes.min()) if sizes.size else np.inf
    local_max = float(sizes.max()) if sizes.size else -np.inf
    return {
        "cell_type": mesh.topology.cell_name(),
        "gdim": int(mesh.geometry.dim),
        "num_cells": int(mesh.topology.index_map(tdim).size_global),
        "num_vertices": int(mesh.topology.index_map(0).size_global),
        "hmin": mesh.comm.allreduce(local_min, op=MPI.MIN),
        "hmax": mesh.comm.allreduce(local_max, op=MPI.MAX),
    }
