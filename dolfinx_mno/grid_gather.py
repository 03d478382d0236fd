"""Sample → gather: finite-element fields on a grid, gathered on the root (collective).

The first two stages of a non-local closure's update (the grid itself is in
:mod:`dolfinx_mno.grid`; the way back, scatter → interpolate, in
:mod:`dolfinx_mno.grid_scatter`):

* :class:`GridPointSampler` (rank-local after set-up): evaluates a discontinuous Lagrange
  function at the grid points this rank owns. Each grid point is owned by exactly one
  rank and evaluated in exactly one cell: among the cells that contain it, the one whose
  midpoint is lexicographically smallest, agreed on with ``MPI.MIN`` reductions at
  set-up. The choice therefore does not depend on the partition, which matters where a
  discontinuous operand (``grad u``) jumps across a facet that a grid point lies on.
  Points in no cell are *outside* the domain.
* :class:`GriddedSampler` (the stage): samples UFL expressions at every rank's grid
  points through a :class:`GridPointSampler`, then ``MPI.Gatherv`` assembles the grid on
  the root, with ``extension_value`` outside the domain and an optional mask channel. It
  feeds a :class:`~dolfinx_mno.NonlocalClosure`'s model, and makes training data for it.

All tabulations (reference coordinates, basis values) and the workspaces of the transfers
are computed and allocated once; a transfer is then a gather into a workspace and a
weighted sum into a caller's buffer, with no large temporary (fresh arrays of hundreds of
MB on large grids cost more in page faults than in arithmetic).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import torch
import ufl
from dolfinx import fem, geometry
from dolfinx.mesh import CellType, Mesh

from dolfinx_mno.cell_order import midpoint_keys
from dolfinx_mno.grid import Grid
from dolfinx_mno.operand_map import OperandEvaluator, OperandMatrix
from dolfinx_mno.operands import Operands, OperandsLike
from dolfinx_mno.validation import check_integer, output_array

__all__ = ["GridPointSampler", "GriddedSampler"]


#: Distance from a reference cell below which a pulled-back point counts as inside it.
REFERENCE_TOLERANCE = 1e-10


def _is_affine(mesh: Mesh) -> bool:
    """Whether the cells are straight simplices (an affine map from the reference cell)."""
    simplex = mesh.topology.cell_type in (
        CellType.interval,
        CellType.triangle,
        CellType.tetrahedron,
    )
    return simplex and mesh.geometry.cmaps[0].degree == 1 and mesh.geometry.dim == mesh.topology.dim


def _is_its_hull(mesh: Mesh) -> bool:
    """Whether each cell is the hull of its geometry nodes: DOLFINx's collision test exact.

    Straight simplices and degree-1 quadrilaterals.
    """
    straight = (CellType.interval, CellType.triangle, CellType.tetrahedron, CellType.quadrilateral)
    return mesh.geometry.cmaps[0].degree == 1 and mesh.topology.cell_type in straight


def _in_reference_cell(cell_type: CellType, X: np.ndarray) -> np.ndarray:
    """Whether each reference point ``X`` ``(n, tdim)`` lies in the reference cell."""
    tol = REFERENCE_TOLERANCE
    above = np.all(X >= -tol, axis=1)
    if cell_type in (CellType.triangle, CellType.tetrahedron):
        return above & (X.sum(axis=1) <= 1 + tol)
    if cell_type == CellType.prism:
        return above & (X[:, 0] + X[:, 1] <= 1 + tol) & (X[:, 2] <= 1 + tol)
    if cell_type == CellType.pyramid:
        return above & (X[:, 0] + X[:, 2] <= 1 + tol) & (X[:, 1] + X[:, 2] <= 1 + tol)
    return above & np.all(X <= 1 + tol, axis=1)  # interval, quadrilateral, hexahedron


def _containing_cells(
    mesh: Mesh, owned: np.ndarray, points: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each point, the owned cells that contain it: CSR ``(offsets, links)``.

    DOLFINx's collision test (:func:`dolfinx.geometry.compute_colliding_cells`) measures
    the distance to the convex hull of a cell's geometry nodes, which is the cell only for
    straight cells: a curved (P2-geometry) cell bulges out of its hull and its hull covers
    parts of its neighbours, so grid points went to neighbours that do not contain them
    (a DG0 field sampled there took the neighbour's value; a hexahedron with
    non-planar faces is not its hull either). For such meshes the
    candidates of a padded bounding-box search are pulled back into each cell instead
    (Newton), and a cell contains a point if its reference coordinates lie in the
    reference cell (to :data:`REFERENCE_TOLERANCE`).
    """
    tdim = mesh.topology.dim
    if _is_its_hull(mesh):  # exact
        tree = geometry.bb_tree(mesh, tdim, entities=owned)
        candidates = geometry.compute_collisions_points(tree, points)
        colliding = geometry.compute_colliding_cells(mesh, candidates, points)
        return colliding.offsets, colliding.array
    gdim = mesh.geometry.dim
    sizes = mesh.h(tdim, owned) if owned.size else np.zeros(1)
    tree = geometry.bb_tree(mesh, tdim, entities=owned, padding=0.25 * float(sizes.max()))
    candidates = geometry.compute_collisions_points(tree, points)
    counts = np.diff(candidates.offsets)
    point_of = np.repeat(np.arange(len(points)), counts)
    cell_of = candidates.array
    keep = np.zeros(cell_of.size, dtype=bool)
    cmap = mesh.geometry.cmaps[0]
    dofmap = mesh.geometry.dofmaps[0]
    order = np.argsort(cell_of, kind="stable")
    starts = np.flatnonzero(np.diff(cell_of[order], prepend=-1) != 0)  # each cell's pairs
    for start, stop in zip(starts, [*starts[1:], order.size], strict=True):
        pairs = order[start:stop]
        nodes = mesh.geometry.x[dofmap[cell_of[pairs[0]]], :gdim]
        keep[pairs] = _pull_back_inside(
            cmap, mesh.topology.cell_type, points[point_of[pairs], :gdim], nodes
        )
    point_of, cell_of = point_of[keep], cell_of[keep]  # still sorted by point
    offsets = np.zeros(len(points) + 1, dtype=np.int32)
    np.cumsum(np.bincount(point_of, minlength=len(points)), out=offsets[1:])
    return offsets, cell_of.astype(np.int32)


def relocate_in_curved_cells(
    mesh: Mesh, points: np.ndarray, cells: np.ndarray
) -> tuple[np.ndarray, int]:
    """Local cells that contain ``points``, correcting DOLFINx's choice on curved meshes.

    DOLFINx's point location (:func:`dolfinx.fem.create_interpolation_data`, and so
    ``interpolate_nonmatching``) tests the convex hull of a cell's nodes too (see
    :func:`_containing_cells`). On a mesh whose cells are not all straight, each point is
    pulled back into its cell; one that lies outside it moves to a local cell (owned or
    ghost) that contains it. Rank-local.

    Args:
        mesh: The mesh the points were located in.
        points: ``(n, 3)`` physical points.
        cells: ``(n,)`` the local cells DOLFINx chose.

    Returns:
        The corrected cells (``cells`` itself where nothing changes), and the number of
        points that no local cell contains (left in DOLFINx's cell).
    """
    if len(cells) == 0 or _is_its_hull(mesh):
        return cells, 0
    gdim = mesh.geometry.dim
    cmap, dofmap = mesh.geometry.cmaps[0], mesh.geometry.dofmaps[0]
    inside = np.zeros(len(cells), dtype=bool)
    order = np.argsort(cells, kind="stable")
    starts = np.flatnonzero(np.diff(cells[order], prepend=-1) != 0)
    for start, stop in zip(starts, [*starts[1:], order.size], strict=True):
        chosen = order[start:stop]
        nodes = mesh.geometry.x[dofmap[cells[chosen[0]]], :gdim]
        inside[chosen] = _pull_back_inside(
            cmap, mesh.topology.cell_type, points[chosen, :gdim], nodes
        )
    wrong = np.flatnonzero(~inside)
    if wrong.size == 0:
        return cells, 0
    index_map = mesh.topology.index_map(mesh.topology.dim)
    local = np.arange(index_map.size_local + index_map.num_ghosts, dtype=np.int32)
    offsets, links = _containing_cells(mesh, local, points[wrong])
    corrected = np.array(cells, dtype=np.int32)
    found = np.diff(offsets) > 0
    corrected[wrong[found]] = links[offsets[:-1][found]]
    return corrected, int(np.count_nonzero(~found))


def _pull_back_inside(
    cmap: typing.Any, cell_type: CellType, points: np.ndarray, nodes: np.ndarray
) -> np.ndarray:
    """Whether each point pulls back into the reference cell of the cell of ``nodes``.

    A point whose Newton pull-back does not converge (far from a distorted cell) is not
    in the cell.
    """
    try:
        return _in_reference_cell(cell_type, cmap.pull_back(points, nodes))
    except RuntimeError:  # some point did not converge: one at a time
        inside = np.zeros(len(points), dtype=bool)
        for i in range(len(points)):
            try:
                X = cmap.pull_back(points[i : i + 1], nodes)
            except RuntimeError:
                continue
            inside[i] = _in_reference_cell(cell_type, X)[0]
        return inside


def _reference_coordinates(mesh: Mesh, cells: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Reference coordinates of ``points`` (shape ``(n, 3)``) in their ``cells``."""
    tdim = mesh.topology.dim
    gdim = mesh.geometry.dim
    nodes = mesh.geometry.x[mesh.geometry.dofmaps[0][cells]][:, :, :gdim]  # (n, nodes, gdim)
    if _is_affine(mesh):
        # Affine map x = x0 + J ξ with J's columns x_k - x0: one batched solve.
        x0 = nodes[:, 0, :]
        jacobian = np.stack([nodes[:, k + 1, :] - x0 for k in range(tdim)], axis=2)
        return np.linalg.solve(jacobian, (points[:, :gdim] - x0)[:, :, None])[:, :, 0]
    # General (non-affine) cells: Newton pull-back, one point at a time (set-up only).
    cmap = mesh.geometry.cmaps[0]
    reference = np.empty((len(cells), tdim))
    for i in range(len(cells)):
        reference[i] = cmap.pull_back(points[i : i + 1, :gdim], nodes[i])[0]
    return reference


def _owners_by_midpoints(
    mesh: Mesh, owned: np.ndarray, num_points: int, offsets: np.ndarray, links: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each grid point's owning rank and cell.

    Of the cells containing a point (several where it lies on a shared facet), the one whose
    midpoint is the lexicographically smallest wins
    (:func:`~dolfinx_mno.cell_order.midpoint_keys`): a choice by geometry, the same on any
    number of ranks, made with three ``Allreduce`` of the coordinates. (The smallest
    *original* cell index, used before, is not: a submesh has none, and the mesh that
    ``dolfinx.mesh.refine`` returns numbers its cells in an order that follows the
    partition, so grid points on facets took other cells' values on other rank counts.)

    Returns:
        ``(indices, cells, inside)``: the flat grid indices this rank evaluates, their
        local cells, and on every rank whether each grid point lies in the mesh.
    """
    comm = mesh.comm
    counts = np.diff(offsets)
    midpoints = midpoint_keys(mesh, owned)
    best = np.full((num_points, 3), np.inf)
    local_cell = np.full(num_points, -1, dtype=np.int32)
    if links.size:
        point_of_link = np.repeat(np.arange(num_points), counts)
        keys = midpoints[links]
        order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0], point_of_link))
        first = order[np.unique(point_of_link[order], return_index=True)[1]]
        best[point_of_link[first]] = keys[first]
        local_cell[point_of_link[first]] = links[first]
    candidate = np.ones(num_points, dtype=bool)
    for axis in range(3):
        mine = np.where(candidate, best[:, axis], np.inf)
        smallest = np.empty_like(mine)
        comm.Allreduce(mine, smallest, op=MPI.MIN)
        candidate &= mine == smallest
    inside = np.isfinite(smallest)
    indices = np.flatnonzero(candidate & inside)
    return indices, local_cell[indices], inside


class GridPointSampler:
    """Evaluate a vector DG function at the grid points this rank owns (the point layer).

    Set-up (collective) decides which rank owns each grid point, and in which cell (see
    the module docstring), and tabulates the basis there; :meth:`sample` and
    :meth:`sample_expression` are then rank-local and allocate nothing. Gathering the
    points on one rank is :class:`GriddedSampler`'s job.

    Args:
        grid: The grid.
        space: A blocked discontinuous Lagrange space on the mesh, value shape
            ``(num_channels,)``; :meth:`sample` takes functions of this space.
        dtype: Scalar type of the sampled functions and expressions. The workspace of a
            transfer, the ``(num_local, num_dofs, num_channels)`` values of the cells that
            hold this rank's grid points, is allocated once in this type and reused.

    Attributes:
        indices: Flat grid indices this rank evaluates, shape ``(num_local,)``.
        inside: On every rank, a boolean mask of shape ``(num_points,)``: ``True`` where the
            grid point lies in a cell of the mesh.
    """

    def __init__(self, grid: Grid, space: fem.FunctionSpace, dtype: npt.DTypeLike = np.float64):
        mesh = space.mesh
        tdim = mesh.topology.dim
        num_owned = mesh.topology.index_map(tdim).size_local
        points = grid.points()
        owned = np.arange(num_owned, dtype=np.int32)
        offsets, links = _containing_cells(mesh, owned, points)
        self.indices, self.cells, self.inside = _owners_by_midpoints(
            mesh, owned, grid.num_points, offsets, links
        )
        self._finish(grid, space, points, dtype)

    def _finish(
        self, grid: Grid, space: fem.FunctionSpace, points: np.ndarray, dtype: npt.DTypeLike
    ) -> None:
        """The basis at this rank's points, once ``indices`` and ``cells`` are chosen."""
        mesh = space.mesh
        self.grid = grid
        self.space = space
        element = space.ufl_element()
        scalar = element.sub_elements[0] if element.num_sub_elements else element
        if self.num_local:
            reference = _reference_coordinates(mesh, self.cells, points[self.indices])
            table = scalar.tabulate(0, reference)  # (1, num_local, num_dofs)
            self._basis = np.ascontiguousarray(table[0])
        else:  # Basix cannot tabulate at no points (a rank that owns no cells, say)
            self._basis = np.zeros((0, scalar.dim))
        self._dofs = space.dofmap.list[self.cells]  # (num_local, num_dofs)
        self.num_channels = space.dofmap.bs
        self.dtype = np.dtype(dtype)
        # The cells' nodal values, in point order: the workspace of every transfer.
        self._cell_values = np.empty(
            (self.num_local, self._basis.shape[1], self.num_channels), dtype=self.dtype
        )
        # The basis is float64: a float32 sum goes through a float64 buffer, as NumPy would.
        self._sums = (
            None
            if np.result_type(self._basis, self.dtype) == self.dtype
            else np.empty((self.num_local, self.num_channels), dtype=self._basis.dtype)
        )
        # Lagrange: the dofs are the values at the interpolation points, untransformed, so
        # an expression evaluated there needs no interpolation into the space.
        element = space.element
        self._nodal = bool(element.interpolation_ident) and not element.needs_dof_transformations

    @property
    def num_local(self) -> int:
        """Number of grid points this rank evaluates."""
        return len(self.indices)

    def contraction(self, num_cells: int) -> torch.Tensor:
        """The sampling as a matrix from nodal values on the owned cells to the points.

        Args:
            num_cells: Number of owned cells.

        Returns:
            A float64 sparse COO tensor of shape ``(num_local * num_channels,
            num_cells * num_dofs * num_channels)``: row ``p * num_channels + c`` holds
            ``basis[p, j]`` at column ``(cells[p] * num_dofs + j) * num_channels + c``, the
            layout of an expression's values ``(num_cells, num_dofs, num_channels)``.
        """
        channels = self.num_channels
        num_dofs = self._basis.shape[1]
        point, dof, channel = np.meshgrid(
            np.arange(self.num_local), np.arange(num_dofs), np.arange(channels), indexing="ij"
        )
        rows = point * channels + channel
        columns = (self.cells[point].astype(np.int64) * num_dofs + dof) * channels + channel
        values = np.broadcast_to(self._basis[:, :, None], rows.shape)
        return torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows.reshape(-1), columns.reshape(-1)])),
            torch.from_numpy(np.array(values, dtype=np.float64).reshape(-1)),  # a writable copy
            size=(self.num_local * channels, num_cells * num_dofs * channels),
            check_invariants=True,
        )

    def sample(self, function: fem.Function, out: np.ndarray | None = None) -> np.ndarray:
        """Values of ``function`` at this rank's grid points.

        Args:
            function: A function of the sampler's space and ``dtype``.
            out: Result buffer, shape ``(num_local, num_channels)``, of the sampler's
                ``dtype``; allocated if not given.

        Returns:
            The values, shape ``(num_local, num_channels)`` (``out`` if given).
        """
        values = function.x.array.reshape(-1, self.num_channels)
        if values.dtype != self.dtype:
            raise TypeError(f"Expected a function of dtype {self.dtype}, got {values.dtype}.")
        # mode="clip" (the indices are valid) writes into out; "raise" would buffer it.
        np.take(values, self._dofs, axis=0, out=self._cell_values, mode="clip")
        return self._contract(out)

    def sample_expression(
        self, expression: fem.Expression, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Values at this rank's grid points of the interpolant of ``expression``.

        Bitwise the values of :meth:`sample` applied to ``expression`` interpolated into the
        sampler's space, but for a Lagrange space the expression is evaluated only on the
        cells that hold this rank's grid points, straight into the sampler's workspace.

        Args:
            expression: An expression of the sampler's ``dtype`` and value shape
                ``(num_channels,)``, at the points ``space.element.interpolation_points``.
            out: Result buffer, shape ``(num_local, num_channels)``, of the sampler's
                ``dtype``; allocated if not given.

        Returns:
            The values, shape ``(num_local, num_channels)`` (``out`` if given).
        """
        if not self._nodal:
            function = fem.Function(self.space, dtype=self.dtype)
            function.interpolate(expression)
            return self.sample(function, out)
        expression.eval(self.space.mesh, self.cells, values=self._cell_values)
        return self._contract(out)

    def _contract(self, out: np.ndarray | None) -> np.ndarray:
        """The workspace's nodal values weighted by the basis: the values at the points."""
        out = output_array(out, (self.num_local, self.num_channels), self.dtype)
        # Σ_j basis[p, j] values[p, j, c] as the batched matmul that
        # np.einsum("pj,pjc->pc", ..., optimize=True) performs (same bits), without its
        # temporary result.
        sums = out if self._sums is None else self._sums
        np.matmul(
            self._cell_values.transpose(0, 2, 1), self._basis[:, :, None], out=sums[:, :, None]
        )
        if sums is not out:
            np.copyto(out, sums, casting="same_kind")
        return out


def _degree_of(expressions: Sequence[ufl.core.expr.Expr]) -> int:
    """Degree of the DG space expressions are sampled through.

    The highest degree of their coefficients and of their meshes' coordinate elements, at
    least 1. The interpolation into it of ``u`` of a Lagrange ``u``, of piecewise
    constants, and of ``x`` (which is of the geometry's degree in each cell, 2 on a curved
    P2 mesh) is exact; that of ``grad(u)`` only on affine cells (on other quadrilaterals,
    hexahedra and curved cells it is rational in each cell: see ``docs/nonlocal.md``).
    """
    degrees = [
        c.function_space.ufl_element().embedded_superdegree
        for e in expressions
        for c in ufl.algorithms.extract_coefficients(e)
        if hasattr(c, "function_space")
    ]
    geometry_degrees = [
        domain.ufl_coordinate_element().embedded_superdegree
        for e in expressions
        for domain in ufl.domain.extract_domains(e)
        if isinstance(domain, ufl.Mesh)
    ]
    return max([1, *degrees, *geometry_degrees])


class GriddedSampler:
    """Sample UFL expressions on a grid and gather them on the root rank (collective).

    This is how a :class:`~dolfinx_mno.NonlocalClosure` feeds its operands to its model,
    and how training data for such a model should be made, so that it sees in training
    exactly what it sees in the simulation. Each expression's components, expression after
    expression (row-major), form the channels. The values at the grid points are those of
    the interpolants of the expressions into a discontinuous Lagrange space of degree
    ``sampling_degree`` (default: the highest degree of their coefficients and of the
    mesh's geometry; exact for ``u``, ``x`` and piecewise constants, and for ``grad(u)`` on
    affine cells; raise it on distorted quadrilaterals and hexahedra and on curved cells,
    where ``grad(u)`` is not a polynomial), each
    point evaluated on exactly one rank
    (:class:`GridPointSampler`). Points outside the mesh get ``extension_value``;
    ``mask_channel`` appends a channel that is 1 inside and 0 outside.

    Every buffer is allocated at construction: :meth:`sample` and :meth:`gather` allocate
    nothing (:meth:`__call__` returns a new array).

    Args:
        expressions: UFL expressions (or functions) on one mesh: an
            :class:`~dolfinx_mno.Operands`, a dict ``{name: expression}`` or a list.
        grid: The grid, e.g. the ``grid`` attribute of a non-local closure.
        extension_value: Value of every channel at grid points outside the mesh.
        mask_channel: Append the inside/outside mask as the last channel.
        sampling_degree: Degree of the discontinuous Lagrange space of the interpolants.
        mesh: The mesh; by default that of the expressions.
        root: The rank that receives the grid.
        gather: Set up the gather to the root; ``False`` for sampling only (the
            distributed mode of a non-local closure, whose samples go to slabs instead):
            the root then allocates no grid-sized buffer, and :meth:`gather` and
            :meth:`gather_adjoint` raise.

    Attributes:
        operands: The expressions, as :class:`~dolfinx_mno.Operands`.
        num_channels: Channels of the expressions (without the mask).
        num_local: Grid points this rank evaluates.
        gather_bytes: Bytes sent to the root per gather (the root's own share excluded).

    Example:
        >>> inputs = GriddedSampler([u, u.dx(0)], closure.grid, mask_channel=False)
        >>> x = inputs()  # on the root: (2, *closure.grid.shape); elsewhere None

    Raises:
        ValueError: No expressions, expressions on several meshes, an invalid root or
            degree, or a grid of another dimension than the mesh.
        TypeError: A grid that is not a :class:`Grid`, or complex expressions.
    """

    def __init__(
        self,
        expressions: OperandsLike,
        grid: Grid,
        *,
        extension_value: float = 0.0,
        mask_channel: bool = False,
        sampling_degree: int | None = None,
        mesh: Mesh | None = None,
        root: int = 0,
        gather: bool = True,
    ):
        """Set up the sampling and the gather (collective).

        See the class docstring for the arguments.
        """
        operands = Operands(expressions, mesh=mesh)
        mesh = operands.mesh
        if not isinstance(grid, Grid):
            raise TypeError(f"grid must be a dolfinx_mno.grid.Grid, got {type(grid).__name__}.")
        if grid.dim != mesh.geometry.dim:
            raise ValueError(
                f"The grid is {grid.dim}-dimensional and the mesh {mesh.geometry.dim}-dimensional."
            )
        comm = mesh.comm
        if not 0 <= check_integer(root, "root") < comm.size:
            raise ValueError(f"root must be a rank of the mesh communicator, got {root}.")
        dtype = operands.dtype
        if sampling_degree is not None:
            check_integer(sampling_degree, "sampling_degree")

        # Collective from here on.
        self.operands = operands
        self.num_channels = operands.num_inputs
        degree = sampling_degree if sampling_degree is not None else _degree_of(operands)
        space = fem.functionspace(
            mesh, ("Discontinuous Lagrange", int(degree), (self.num_channels,))
        )
        self._expression = operands.expression(space.element.interpolation_points)
        self._sampler = GridPointSampler(grid, space, dtype)
        self._local = np.empty((self._sampler.num_local, self.num_channels), dtype=dtype)
        self.grid = grid
        self.root = root
        self.mask_channel = bool(mask_channel)
        self.extension_value = float(extension_value)
        self._comm = comm
        self._is_root = comm.rank == root
        self._gathers = bool(gather)
        self.gather_bytes: int = 0
        if not self._gathers:
            self._is_root = False  # no rank holds the grid
            return
        counts = comm.gather(self._sampler.num_local, root=root)
        indices = comm.gather(self._sampler.indices, root=root)
        gather_bytes = None
        if self._is_root:
            assert counts is not None and indices is not None
            counts_array = np.asarray(counts, dtype=np.int64) * self.num_channels
            displacements = np.concatenate([[0], np.cumsum(counts_array)[:-1]])
            self._indices = np.concatenate(indices)
            self._buffer = np.empty(int(counts_array.sum()), dtype=dtype)
            mpi_type = MPI.DOUBLE if dtype == np.float64 else MPI.FLOAT
            self._receive = [self._buffer, (counts_array, displacements), mpi_type]
            self._inside = self._sampler.inside.copy()
            gather_bytes = int(counts_array.sum() - counts_array[root]) * dtype.itemsize
        self.gather_bytes = comm.bcast(gather_bytes, root=root)

    @property
    def num_local(self) -> int:
        """Grid points this rank evaluates."""
        return self._sampler.num_local

    @property
    def channels(self) -> int:
        """Channels of the gathered grid, mask included."""
        return self.num_channels + int(self.mask_channel)

    def empty(self, dtype: npt.DTypeLike = np.float64) -> np.ndarray:
        """A new ``(channels, num_points)`` array, prepared by :meth:`prepare`."""
        values = np.empty((self.channels, self.grid.num_points), dtype=dtype)
        self.prepare(values)
        return values

    def prepare(self, out: np.ndarray) -> None:
        """Prepare a gather target: the extension value everywhere, then the mask.

        :meth:`gather` overwrites only the entries of grid points inside the mesh, so this
        is done once per target.

        Args:
            out: Shape ``(channels, num_points)``, any real dtype. On the root the mask
                channel (if any) gets 1 inside the mesh and 0 outside; elsewhere it gets the
                extension value (the other ranks do not know the mask).

        Raises:
            ValueError: ``out`` has another shape.
        """
        shape = (self.channels, self.grid.num_points)
        if out.shape != shape:
            raise ValueError(f"A gather target must have shape {shape}, got {out.shape}.")
        out[...] = self.extension_value
        if self.mask_channel and self._is_root:
            out[-1] = self._inside

    @property
    def indices(self) -> np.ndarray:
        """Flat grid indices of the points this rank evaluates, shape ``(num_local,)``."""
        return self._sampler.indices

    @property
    def inside(self) -> np.ndarray:
        """Whether each grid point lies in the mesh, ``(grid.num_points,)`` (every rank)."""
        return self._sampler.inside

    def sample(self) -> np.ndarray:
        """Evaluate the expressions at this rank's grid points (local, no communication).

        Returns:
            This rank's samples, shape ``(num_local, num_channels)``, in the mesh's dtype:
            the sampler's own buffer, which the next call overwrites.
        """
        return self._sampler.sample_expression(self._expression, out=self._local)

    def gather(
        self, out: np.ndarray | None = None, samples: np.ndarray | None = None
    ) -> np.ndarray | None:
        """Send the last samples to the root and write them into ``out`` there (collective).

        Args:
            out: On the root, a ``(channels, num_points)`` array (e.g. from :meth:`empty`)
                whose grid-point entries inside the mesh are overwritten; the extension
                values and the mask are left as they are. Default: a new :meth:`empty`.
            samples: This rank's samples to send instead of the last ones, shape
                ``(num_local, num_channels)`` (e.g. from :meth:`sample_matrix`).

        Returns:
            ``out`` on the root, ``None`` elsewhere.
        """
        self._check_gathers()
        if samples is not None:
            np.copyto(self._local, samples.reshape(self._local.shape), casting="same_kind")
        receive = self._receive if self._is_root else None
        self._comm.Gatherv(self._local.reshape(-1), receive, root=self.root)
        if not self._is_root:
            return None
        if out is None:
            out = self.empty(self._buffer.dtype)
        samples = self._buffer.reshape(-1, self.num_channels)
        out[: self.num_channels, self._indices] = samples.T
        return out

    def gather_adjoint(self, cotangent: np.ndarray | None) -> np.ndarray:
        """The transpose of :meth:`gather`: the root's grid cotangent back to the samples.

        Collective (``MPI.Scatterv``, the reverse of the gather's ``Gatherv``).

        Args:
            cotangent: On the root, ``(channels, num_points)`` (mask included, ignored);
                ignored elsewhere.

        Returns:
            This rank's share, ``(num_local, num_channels)``, a new array in the mesh's
            dtype: the cotangent at the grid points this rank samples.
        """
        self._check_gathers()
        if self._is_root:
            assert cotangent is not None
            samples = self._buffer.reshape(-1, self.num_channels)
            samples[...] = cotangent[: self.num_channels, self._indices].T
        send = self._receive if self._is_root else None
        share = np.empty_like(self._local)
        self._comm.Scatterv(send, share.reshape(-1), root=self.root)
        return share

    def _check_gathers(self) -> None:
        if not self._gathers:
            raise RuntimeError(
                "This GriddedSampler was built with gather=False (sampling only); build it "
                "with gather=True to gather the grid on the root."
            )

    def sample_matrix(self) -> OperandMatrix:
        """The constant map from coefficient dofs to this rank's samples (affine operands).

        The sampled values are those of the expressions' interpolants at the grid points,
        ``samples = S E``, with ``E`` the expressions at the nodes of the owned cells and
        ``S`` the basis weights (:meth:`GridPointSampler.contraction`); for expressions
        affine in their coefficients ``E = M dofs + e₀``
        (:meth:`~dolfinx_mno.operand_map.OperandEvaluator.matrix`), so
        ``samples = (S M) dofs + S e₀``.

        Returns:
            An :class:`~dolfinx_mno.operand_map.OperandMatrix` whose rows are this rank's
            samples: ``matrix`` of shape ``(num_local * num_channels, num_columns)`` and
            ``offset`` of shape ``(num_local, num_channels)``.

        Raises:
            ValueError: The expressions are not affine in their coefficients (or contain a
                :class:`dolfinx.fem.Constant`), or an element needs dof transformations.
        """
        space = self._sampler.space
        mesh = space.mesh
        num_cells = mesh.topology.index_map(mesh.topology.dim).size_local
        num_dofs = space.dofmap.list.shape[1]
        nodal = np.empty((num_cells, num_dofs, self.num_channels), dtype=self._local.dtype)
        # "packed": no timing of the modes (only the matrix is wanted); it raises, like
        # matrix(), for elements with dof transformations.
        evaluator = OperandEvaluator(self._expression, mesh, num_cells, nodal, mode="packed")
        nodal_map = evaluator.matrix()
        contraction = self._sampler.contraction(num_cells)
        product = torch.sparse.mm(contraction, nodal_map.matrix.to_sparse_coo().coalesce())
        offset = torch.sparse.mm(
            contraction, torch.from_numpy(nodal_map.offset.reshape(-1, 1).astype(np.float64))
        )
        return OperandMatrix(
            matrix=product.coalesce().to_sparse_csr(),
            offset=offset.numpy().reshape(self.num_local, self.num_channels),
            coefficients=nodal_map.coefficients,
            column_offsets=nodal_map.column_offsets,
        )

    def __call__(self) -> np.ndarray | None:
        """Sample and gather (collective).

        Returns:
            On the root, a new array ``(channels, *grid.shape)`` in the mesh's dtype; on the
            other ranks ``None``.
        """
        self.sample()
        values = self.gather()
        if values is None:
            return None
        return values.reshape(self.channels, *self.grid.shape)
