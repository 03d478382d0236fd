"""Finite-element fields on a structured grid, gathered on one rank: data for grid models.

A :class:`~dolfinx_mno.NonlocalClosure` feeds its neural operator the operands sampled on
a grid. To train that operator, the training inputs must be sampled *exactly* as the
closure will sample them, and the targets on the same grid. :class:`GriddedSampler` does
both: it evaluates UFL expressions at the grid points (each point on exactly one rank, in
the cell with the smallest original index, as the closure does), gathers them on the root
rank and fills points outside the mesh with ``extension_value`` (plus an optional mask
channel), giving ``(channels, *grid.shape)`` arrays ready for
:func:`dolfinx_mno.training.fit`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ufl
from dolfinx import fem
from dolfinx.mesh import Mesh

from dolfinx_mno.grid import Grid, GridSampler
from dolfinx_mno.quadrature import flatten_operands
from dolfinx_mno.torch_bridge import NUMPY_TO_TORCH

__all__ = ["GriddedSampler"]


def _expression_mesh(expressions: Sequence[ufl.core.expr.Expr]) -> Mesh:
    meshes = {
        id(c.function_space.mesh): c.function_space.mesh
        for e in expressions
        for c in ufl.algorithms.extract_coefficients(e)
        if isinstance(c, fem.Function)
    }
    if len(meshes) != 1:
        raise ValueError(
            f"The expressions must depend on functions of exactly one mesh, found "
            f"{len(meshes)}; pass mesh= for expressions without functions."
        )
    return next(iter(meshes.values()))


def _coefficient_degree(expressions: Sequence[ufl.core.expr.Expr]) -> int:
    """The highest degree of the coefficients: the interpolation of ``u``, ``grad u`` is exact."""
    degrees = [
        c.ufl_element().embedded_superdegree
        for e in expressions
        for c in ufl.algorithms.extract_coefficients(e)
    ]
    return max([1, *degrees])


class GriddedSampler:
    """Sample UFL expressions on a grid and gather them on the root rank (collective).

    Each expression's components, expression after expression (row-major), form the
    channels. The values at the grid points are those of the interpolants of the
    expressions into a discontinuous Lagrange space of degree ``sampling_degree`` (by
    default the highest degree of their coefficients, as for
    :class:`~dolfinx_mno.NonlocalClosure`; exact for ``u`` and ``grad(u)`` of a Lagrange
    ``u`` and for piecewise-constant fields), each point evaluated on exactly one rank.

    Args:
        expressions: UFL expressions (or functions) on one mesh.
        grid: The grid, e.g. the ``grid`` attribute of a non-local closure.
        extension_value: Value of every channel at grid points outside the mesh.
        mask_channel: Append a channel that is 1 inside the mesh and 0 outside (as
            :class:`~dolfinx_mno.NonlocalClosure` does with ``mask_channel=True``).
        sampling_degree: Degree of the discontinuous Lagrange space of the interpolants.
        mesh: The mesh; by default that of the expressions.
        root: The rank that receives the grid.

    Example:
        >>> inputs = GriddedSampler([u, u.dx(0)], closure.grid, mask_channel=False)
        >>> x = inputs()  # on the root: (2, *closure.grid.shape); elsewhere None

    Raises:
        ValueError: Expressions on several meshes, an invalid root, or a grid of another
            dimension than the mesh.
        TypeError: A complex mesh dtype.
    """

    def __init__(
        self,
        expressions: Sequence[ufl.core.expr.Expr | fem.Function],
        grid: Grid,
        *,
        extension_value: float = 0.0,
        mask_channel: bool = False,
        sampling_degree: int | None = None,
        mesh: Mesh | None = None,
        root: int = 0,
    ):
        if isinstance(expressions, ufl.core.expr.Expr):
            expressions = [expressions]
        expression_list = [ufl.as_ufl(e) for e in expressions]
        if not expression_list:
            raise ValueError("GriddedSampler needs at least one expression.")
        mesh = mesh if mesh is not None else _expression_mesh(expression_list)
        if not isinstance(grid, Grid):
            raise TypeError(f"grid must be a dolfinx_mno.grid.Grid, got {type(grid).__name__}.")
        if grid.dim != mesh.geometry.dim:
            raise ValueError(
                f"The grid is {grid.dim}-dimensional and the mesh {mesh.geometry.dim}-dimensional."
            )
        comm = mesh.comm
        if not 0 <= root < comm.size:
            raise ValueError(f"root must be a rank of the mesh communicator, got {root}.")
        dtype = np.dtype(mesh.geometry.x.dtype)
        if dtype not in NUMPY_TO_TORCH:
            raise TypeError(f"Unsupported dtype {dtype}: use real float32 or float64.")
        if sampling_degree is not None and (
            not isinstance(sampling_degree, int | np.integer) or sampling_degree < 0
        ):
            raise ValueError(
                f"sampling_degree must be a non-negative integer, got {sampling_degree!r}."
            )

        # Collective from here on.
        vector, widths = flatten_operands(expression_list)
        self.num_channels = sum(widths)
        degree = (
            _coefficient_degree(expression_list) if sampling_degree is None else sampling_degree
        )
        family = "Discontinuous Lagrange"
        space = fem.functionspace(mesh, (family, int(degree), (self.num_channels,)))
        self._expression = fem.Expression(vector, space.element.interpolation_points, dtype=dtype)
        self._sampler = GridSampler(grid, space, dtype=dtype)
        self._local = np.empty((self._sampler.num_local, self.num_channels), dtype=dtype)
        self.grid = grid
        self.root = root
        self.mask_channel = bool(mask_channel)
        self.extension_value = float(extension_value)
        self._comm = comm
        counts = comm.gather(self._sampler.num_local, root=root)
        indices = comm.gather(self._sampler.indices, root=root)
        if comm.rank == root:
            assert counts is not None and indices is not None
            self._counts = np.asarray(counts, dtype=np.int64) * self.num_channels
            self._indices = np.concatenate(indices)
            self._receive = np.empty(int(self._counts.sum()), dtype=dtype)
            self._inside = self._sampler.inside.copy()

    @property
    def channels(self) -> int:
        """Channels of the gathered grid, mask included."""
        return self.num_channels + int(self.mask_channel)

    def __call__(self) -> np.ndarray | None:
        """Evaluate and gather (collective).

        Returns:
            On the root, a new array ``(channels, *grid.shape)`` in the mesh's dtype; on the
            other ranks ``None``.
        """
        self._sampler.sample_expression(self._expression, out=self._local)
        is_root = self._comm.rank == self.root
        receive = (self._receive, self._counts) if is_root else None
        self._comm.Gatherv(self._local.reshape(-1), receive, root=self.root)
        if not is_root:
            return None
        values = np.full(
            (self.channels, self.grid.num_points), self.extension_value, dtype=self._receive.dtype
        )
        gathered = self._receive.reshape(-1, self.num_channels)
        values[: self.num_channels, self._indices] = gathered.T
        if self.mask_channel:
            values[-1] = self._inside
        return values.reshape(self.channels, *self.grid.shape)
