"""Non-local closures: a neural operator on a grid, coupled to finite-element fields.

The multiscale neural operator (MNO) learns the closure with a neural operator, e.g. a
Fourier neural operator, so that the closure sees the whole resolved field, is
grid-independent and costs O(N log N). :class:`NonlocalClosure` is used in UFL forms exactly
like a local :class:`~dolfinx_mno.Closure` (``closure.dx``, ``update()``,
:mod:`dolfinx_mno.petsc`), but its model maps gridded fields to gridded fields:

``(1, num_inputs [+ 1 mask], *grid.shape)  →  (1, prod(value_shape), *grid.shape)``

One update runs five stages, each a class a reader finds by its module:

1. **sample** (:class:`~dolfinx_mno.grid_gather.GriddedSampler`, which uses
   :class:`~dolfinx_mno.grid_gather.GridPointSampler`): the operands are evaluated at the
   nodes of a discontinuous Lagrange space, on the cells that hold grid points, and
   interpolated to the grid points, each point on exactly one rank (the same class makes
   training data on the same grid);
2. **gather** (the same class): ``MPI.Gatherv`` to the root rank, which assembles the
   input grid, with a mask channel (1 inside the domain, 0 outside) and
   ``extension_value`` outside;
3. **model** (:class:`~dolfinx_mno.torch_bridge.GridEvaluator`): one call on the root
   rank, on its device; the other ranks wait for its verdict asleep
   (:func:`dolfinx_mno._mpi.agree_with_root`), so that their cores are free for it;
4. **scatter** (:class:`~dolfinx_mno.grid_scatter.GridScatter`): each rank receives only
   the sub-block of the output grid around its own quadrature points (``MPI.Scatterv``);
5. **interpolate** (the same class, with
   :class:`~dolfinx_mno.grid_scatter.GridInterpolator`): multilinear interpolation to the
   quadrature points of the owned cells, then ``scatter_forward`` for the ghosts.

The grid itself is a :class:`~dolfinx_mno.grid.Grid` (:mod:`dolfinx_mno.grid`).

Every buffer of an update is allocated at construction and reused: an update allocates
no large arrays (on large grids, page faults on fresh arrays cost more than their
arithmetic).

Coupling is explicit/IMEX by default: the Jacobian of a non-local operator is dense. For
implicit schemes :func:`dolfinx_mno.derivative` leaves the closure frozen (a Picard
linearisation); pass ``snes_mf_operator`` to :class:`dolfinx_mno.petsc.NonlinearProblem` to
get the exact Jacobian *action* matrix-free (PETSc differences the residual, which
re-evaluates the closure) with the frozen-closure Jacobian as preconditioner.

References:
    Lütjens et al., "Multiscale Neural Operator: Learning Fast and Grid-independent PDE
    Solvers", 2022, https://arxiv.org/abs/2207.11417.
    Li et al., "Fourier Neural Operator for Parametric Partial Differential Equations",
    ICLR 2021, https://arxiv.org/abs/2010.08895.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import torch
import ufl
from dolfinx import fem
from dolfinx.mesh import Mesh

from dolfinx_mno._mpi import agree, agree_with_root, describe, rank_local, same_everywhere
from dolfinx_mno.base import ClosureBase, validate_arguments
from dolfinx_mno.closure import ClosureEvaluationError
from dolfinx_mno.grid import grid_over_mesh, mesh_bounding_box
from dolfinx_mno.grid_gather import GriddedSampler
from dolfinx_mno.grid_scatter import GridScatter
from dolfinx_mno.nonlocal_distributed import SlabModelStage
from dolfinx_mno.operand_map import OperandMatrix
from dolfinx_mno.operands import Operands, OperandsLike, operand_comm
from dolfinx_mno.quadrature import owned_dofs, quadrature_points, quadrature_space
from dolfinx_mno.slab_alignment import rows_following_samples
from dolfinx_mno.spec import ClosureSpec
from dolfinx_mno.torch_bridge import (
    GridEvaluator,
    ModelStateError,
    resolve_device,
    resolves_collectively,
)
from dolfinx_mno.validation import check_integer

__all__ = ["NonlocalClosure"]


class NonlocalClosure(ClosureBase):
    """A closure computed by a neural operator on a structured grid.

    Args:
        model: Maps ``(1, num_inputs + mask_channel, *grid_shape)`` to
            ``(1, prod(value_shape), *grid_shape)``, e.g. ``neuralop.models.FNO`` or
            ``TFNO`` (use their ``domain_padding`` on non-periodic domains), or any
            ``torch.nn.Module`` with that grid contract, or a model file path
            (:func:`dolfinx_mno.io.load_model`). Runs on the root rank only.
        operands: UFL expressions on one mesh (an :class:`~dolfinx_mno.Operands`, a dict
            ``{name: expression}`` or a list); their components, operand after operand,
            are the input channels. With a model file holding a
            :class:`~dolfinx_mno.spec.ClosureSpec`, they must be those it was trained on.
        value_shape: Shape of the closure value at a point, a tuple of positive integers
            (``()``, ``(d,)``, ...); default the model file's spec, else ``()``.
        quadrature_degree: Degree of the quadrature rule carrying the values; default the
            model file's spec, else 2.
        grid_shape: Points per direction. Default: the model file's spec, else one point
            per mean cell size, i.e. ``ceil(extent / h) + 1`` with
            ``h = (volume / num_cells)^(1/tdim)``. With a spec in the model file it must be
            the trained one.
        bounding_box: ``(lower, upper)`` of the grid, finite; default the mesh's bounding
            box. It must contain the mesh. With a spec in the model file the grid must
            have the trained spacing (hence extent), to a relative
            :data:`~dolfinx_mno.spec.SPACING_RTOL`, anywhere in space
            (:meth:`~dolfinx_mno.spec.ClosureSpec.check_grid`): a mesh of another extent
            needs a ``bounding_box`` of the trained extent that contains it, or the model
            itself passed instead of its file (unchecked).
        mask_channel: Append a channel that is 1 at grid points inside the domain and 0
            outside (always 1 on a box-shaped domain); default the model file's spec,
            else ``True``.
        extension_value: Value of every input channel at grid points outside the domain.
        sampling_degree: Degree of the discontinuous Lagrange space the operands are
            interpolated into before point evaluation; default the highest degree of the
            operand coefficients and of the mesh geometry (exact for a Lagrange ``u`` and
            for ``x``, on curved meshes too; for ``grad u`` on affine cells only: raise it
            on distorted quadrilaterals and hexahedra and on curved cells, where ``grad u``
            is not a polynomial, see ``docs/nonlocal.md``).
        mesh: The mesh; by default the mesh of the operands.
        device: Device of the model on the root rank (``"auto"``: CUDA if available).
        root: Rank that runs the model.
        distributed: Run the model on the grid split among the ranks instead of on the
            root: each rank holds a slab of rows of the first grid axis, receives its grid
            samples there, runs a :class:`~dolfinx_mno.distributed_operator.DistributedFNO`
            of ``model`` (a ``neuralop.models.FNO``/``TFNO``; the spectral convolutions
            exchange only the kept modes) and receives from the other ranks only the halo
            rows its quadrature points need (:mod:`dolfinx_mno.nonlocal_distributed`). The
            model then runs on every rank (on ``device``, ``"auto"``: each rank's GPU).
            Needs at least ``comm.size`` grid points along the first axis.
        slabs: How the distributed mode splits the grid's rows among the ranks:
            ``"mesh"`` (default) follows the mesh partition where it can, so that fewer
            grid samples travel to other ranks, and falls back to ``"balanced"`` rows
            otherwise (:func:`~dolfinx_mno.slab_alignment.rows_following_samples`; a mesh
            made with :func:`~dolfinx_mno.slab_alignment.redistribute_to_slabs` agrees
            with the slabs); ``"balanced"``: consecutive rows in rank order, the counts
            differing by at most one.
        name: Name of the function.

    Shapes:
        ``self.x.array`` holds ``(num_cells, num_points, *value_shape)`` values, like a
        local closure. The model input has ``num_inputs + mask_channel`` channels; grid
        axes are in ``(x, y, z)`` order.

    Attributes:
        communication: Bytes sent per update, summed over ranks, set at construction:
            ``{"gather": ..., "scatter": ...}`` (excluding the root's own share), or with
            ``distributed=True`` ``{"slab": ..., "halo": ...}`` (see
            :class:`~dolfinx_mno.nonlocal_distributed.SlabModelStage`).
        timings: Seconds per stage of the last update: ``sample``, ``gather``, ``model``
            (root only), ``wait`` (non-root ranks waiting, asleep, for the root's model),
            ``scatter``, ``interpolate`` and ``total``.
    """

    @torch.inference_mode(False)  # as Closure: its buffers work in any torch mode
    def __init__(
        self,
        model: torch.nn.Module | str | os.PathLike[str],
        operands: OperandsLike,
        value_shape: tuple[int, ...] | None = None,
        quadrature_degree: int | None = None,
        *,
        grid_shape: Sequence[int] | None = None,
        bounding_box: tuple[Sequence[float], Sequence[float]] | None = None,
        mask_channel: bool | None = None,
        extension_value: float = 0.0,
        sampling_degree: int | None = None,
        mesh: Mesh | None = None,
        device: str | torch.device | None = "auto",
        root: int = 0,
        distributed: bool = False,
        slabs: str = "mesh",
        name: str = "nonlocal_closure",
    ):
        """Build the closure and its grid (collective).

        See the class docstring for the arguments.
        """
        # Every rank-local check (the model file's reading included) runs before the first
        # collective call, and the ranks agree on its outcome: an error on some ranks
        # raises on every rank.
        what = f"Building non-local closure '{name}'"
        with rank_local(operand_comm(operands, mesh), what):
            source = repr(os.fspath(model)) if isinstance(model, str | os.PathLike) else ""
            operands = operand_list = Operands(operands, mesh=mesh)  # both names used below
            arguments = validate_arguments(
                model,
                operands,
                value_shape,
                quadrature_degree,
                nonlocal_closure=True,
                grid_shape=grid_shape,
                mask_channel=mask_channel,
            )
            model, value_shape = arguments.model, arguments.value_shape
            quadrature_degree, trained = arguments.quadrature_degree, arguments.trained
            mesh, dtype = operands.mesh, operands.dtype
            # Settings not given: those the model was trained with, if the file says.
            if trained is not None and trained.grid is not None:
                grid_shape = grid_shape if grid_shape is not None else trained.grid.shape
                mask_channel = mask_channel if mask_channel is not None else trained.mask_channel
            mask_channel = True if mask_channel is None else mask_channel
            comm = mesh.comm
            grid_shape, box = _checked_grid_arguments(
                mesh, root, sampling_degree, slabs, grid_shape, bounding_box
            )

        # Collective from here on; every decision below is identical on all ranks.
        same_everywhere(
            comm,
            what,
            quadrature_degree=int(quadrature_degree),
            value_shape=value_shape,
            grid_shape=None if grid_shape is None else tuple(grid_shape),
            bounding_box=None if box is None else tuple(tuple(map(float, b)) for b in box),
            mask_channel=bool(mask_channel),
            extension_value=repr(float(extension_value)),  # repr: NaN equals NaN
            sampling_degree=sampling_degree,
            root=root,
            distributed=bool(distributed),
            slabs=slabs,
            dtype=np.dtype(dtype).name,
        )
        grid = grid_over_mesh(mesh, grid_shape, box)
        mesh_box = mesh_bounding_box(mesh)
        if trained is not None:  # the grid and the boxes are global: every rank raises alike
            trained.check_grid(grid, mesh_box, bounding_box_given=box is not None, source=source)
        space = quadrature_space(mesh, int(quadrature_degree), value_shape)
        super().__init__(space, name=name, dtype=dtype)
        self._mno_quadrature_degree = int(quadrature_degree)
        self._operands = operand_list
        self.grid = grid
        self._value_shape = value_shape
        self._num_inputs = operands.num_inputs
        self.num_outputs = math.prod(value_shape)
        self.mask_channel = bool(mask_channel)
        self.extension_value = float(extension_value)
        self.root = root
        self._model = model
        self._comm = comm
        self._is_root = comm.rank == root
        # The grid sampling and the scatter to the quadrature points are built for this
        # geometry; update() refuses a mesh that moved since.
        self._geometry = mesh.geometry.x.copy()
        self._update_count = 0
        self.timings: dict[str, float] = {}
        self.total_timings: dict[str, float] = {}

        self._build_stages(operand_list, mesh, sampling_degree, distributed, device, slabs)
        self._fill_not_updated()

    def _build_stages(
        self,
        operand_list: Operands,
        mesh: Mesh,
        sampling_degree: int | None,
        distributed: bool,
        device: str | torch.device | None,
        slabs: str,
    ) -> None:
        """Build the stages of an update (collective; see :meth:`__init__`)."""
        # The stages of an update, each with its buffers allocated here, once: fresh arrays
        # of hundreds of MB on large grids cost more in page faults than their arithmetic.
        self._gridded = GriddedSampler(  # sample → gather: operands → the root's grid
            operand_list,
            self.grid,
            extension_value=self.extension_value,
            mask_channel=self.mask_channel,
            sampling_degree=sampling_degree,
            mesh=mesh,
            root=self.root,
            gather=not distributed,  # the distributed mode sends samples to slabs instead
        )
        self.distributed = bool(distributed)
        self._evaluator: GridEvaluator | None = None
        self._slabs: SlabModelStage | None = None
        if self.distributed:  # slab → model → halo, on every rank
            self._slabs = self._slab_stage(device, slabs)
            self.communication = dict(self._slabs.communication)
            return
        self._scatter = self._owned_points_scatter()  # scatter → interpolate: grid → values
        self.communication = {
            "gather": self._gridded.gather_bytes,
            "scatter": self._scatter.scatter_bytes,
        }
        # model: on the root, probed once with the real grid shape. The root's verdict
        # (placing the model on its device may fail too) reaches every rank.
        with rank_local(self._comm, f"Building non-local closure '{self.name}'"):
            if self._is_root:
                self._evaluator = self._root_evaluator(device)

    def _owned_points(self) -> np.ndarray:
        """The owned quadrature points, ``(num_points, gdim)``, and where values go.

        Sets where :meth:`_interpolate` writes: straight into ``x.array`` where the owned
        values are one contiguous range of its dtype, otherwise through a buffer.
        """
        mesh = self.function_space.mesh
        num_cells = mesh.topology.index_map(mesh.topology.dim).size_local
        points = _quadrature_coordinates(mesh, self.quadrature_degree, num_cells, self.dtype)
        self._value_dofs = owned_dofs(self.function_space, num_cells)
        value_dtype = np.result_type(self.dtype, np.float64)  # the interpolation weights'
        shape = (len(points), self.num_outputs)
        direct = isinstance(self._value_dofs, slice) and value_dtype == self.x.array.dtype
        self._quadrature_values = None if direct else np.empty(shape, value_dtype)
        return points

    def _owned_points_scatter(self) -> GridScatter:
        """The scatter from the root's grid to the owned quadrature points (collective)."""
        points = self._owned_points()
        return GridScatter(
            self.grid, points, self.num_outputs, self.dtype, self._comm, root=self.root
        )

    def _slab_stage(self, device: str | torch.device | None, slabs: str) -> SlabModelStage:
        """The distributed mode's slab gather, model and halo scatter (collective)."""
        if device is not None:
            collective = resolves_collectively(device)
            target = resolve_device(device, self._comm) if collective else None
            with rank_local(self._comm, "Placing the non-local closure's model"):
                self._model.to(target or resolve_device(device, self._comm))
        points = self._owned_points()
        rows = None  # balanced; too few rows for the ranks: DistributedFNO says so
        if slabs == "mesh" and self.grid.shape[0] >= self._comm.size:
            rows = rows_following_samples(self.grid.shape, self._gridded.indices, self._comm)
        return SlabModelStage(
            self._model,
            self.grid,
            self._gridded.indices,
            self._gridded.inside,
            points,
            self.num_inputs,
            self.mask_channel,
            self.extension_value,
            self.num_outputs,
            self.dtype,
            self._comm,
            rows=rows,
        )

    def _root_evaluator(self, device: str | torch.device | None) -> GridEvaluator:
        """The model's evaluator on the root, its input prepared and the model probed."""
        target = resolve_device(device, MPI.COMM_SELF) if device is not None else None
        channels = self.num_inputs + int(self.mask_channel)
        evaluator = GridEvaluator(
            self._model, channels, self.num_outputs, self.grid.shape, self.dtype, target
        )
        self._gridded.prepare(evaluator.inputs)  # the extension value and the mask
        evaluator.probe(
            inputs=(
                f"{channels} input channels ({self.num_inputs} operand components"
                f"{' + 1 mask' if self.mask_channel else ''})"
            ),
            outputs=f"value_shape {self.value_shape}",
        )
        return evaluator

    # -- properties --------------------------------------------------------------------

    @property
    def value_shape(self) -> tuple[int, ...]:
        """Shape of the closure value at one point."""
        return self._value_shape

    @property
    def num_inputs(self) -> int:
        """Number of operand components (input channels without the mask)."""
        return self._num_inputs

    @property
    def spec(self) -> ClosureSpec:
        """What this closure's model is for, grid and mask channel included."""
        return ClosureSpec.from_operands(
            self._operands,
            self.value_shape,
            self.quadrature_degree,
            grid=self.grid,
            mask_channel=self.mask_channel,
        )

    @property
    def gridded_sampler(self) -> GriddedSampler:
        """The sample → gather stage (this closure's buffers: do not use during an update)."""
        return self._gridded

    @property
    def grid_scatter(self) -> GridScatter:
        """The scatter → interpolate stage, to the owned quadrature points.

        Raises:
            RuntimeError: In the distributed mode, which has no root to scatter from.
        """
        if self._slabs is not None:
            raise RuntimeError(
                "A distributed non-local closure has no root scatter; its stages are "
                "closure.slab_stage's."
            )
        return self._scatter

    @property
    def slab_stage(self) -> SlabModelStage | None:
        """The distributed mode's slab, model and halo stages; ``None`` in the gathered mode."""
        return self._slabs

    @property
    def grid_evaluator(self) -> GridEvaluator | None:
        """The model stage on the root rank (its device and dtype); ``None`` elsewhere."""
        return self._evaluator

    def operand_matrix(self) -> OperandMatrix:
        """The constant map from coefficient dofs to this rank's grid samples (affine operands).

        See :meth:`dolfinx_mno.grid_gather.GriddedSampler.sample_matrix`: rows are this
        rank's samples ``(num_local, num_inputs)``; its transpose maps sensitivities at the
        samples back to the dofs (a-posteriori training, :mod:`dolfinx_mno.nonlocal_adjoint`).
        """
        return self._gridded.sample_matrix()

    # -- update ------------------------------------------------------------------------

    @torch.inference_mode(False)
    def update(self, tangent: bool | None = None) -> None:
        """Sample, gather, run the model, scatter and interpolate (collective).

        Args:
            tangent: Must be falsy: non-local closures provide no pointwise tangent.

        Raises:
            ClosureEvaluationError: If the model raised or returned NaN/Inf, on every rank,
                with the root's reason (``"... failed on rank(s) [0] (1 of 4 ranks); on
                rank 0: the model returned NaN/Inf at 12 of 289 grid points. ..."``); the
                values are left unchanged on every rank.
            RuntimeError: If the mesh moved (its geometry changed on any rank) since the
                closure was built, on every rank, with the values unchanged: the grid
                sampling and the quadrature points are those of the old geometry.
        """
        if tangent:
            raise ValueError("Non-local closures have no pointwise tangent; see the docs.")
        attempt = self._update_count + 1
        what = f"Update {attempt} of non-local closure '{self.name}'"
        moved = not np.array_equal(self.function_space.mesh.geometry.x, self._geometry)
        reason = "the mesh geometry changed since the closure was built" if moved else None
        agree(
            self._comm,
            reason,
            what,
            RuntimeError,
            note="A NonlocalClosure samples its grid and places its values at the quadrature "
            "points of the mesh it was built on; build a new one after moving the mesh. The "
            "previous closure values were kept.",
        )
        if self._slabs is not None:
            self._update_distributed(attempt, what)
            return
        inputs = None if self._evaluator is None else self._evaluator.inputs
        t0 = time.perf_counter()
        self._gridded.sample()
        t1 = time.perf_counter()
        self._gridded.gather(out=inputs)
        t2 = time.perf_counter()
        reason, cause = self._run_model() if self._is_root else (None, None)
        t3 = time.perf_counter()
        # The other ranks wait here for the root's model without spinning on a core, and
        # learn why it failed only if it did.
        agree_with_root(
            self._comm,
            reason,
            what,
            ClosureEvaluationError,
            root=self.root,
            cause=cause,
            note="The previous closure values were kept.",
        )
        t4 = time.perf_counter()
        self._scatter.scatter()
        t5 = time.perf_counter()
        self._interpolate()
        t6 = time.perf_counter()
        self._record(
            attempt,
            sample=t1 - t0,
            gather=t2 - t1,
            model=t3 - t2,
            wait=t4 - t3,
            scatter=t5 - t4,
            interpolate=t6 - t5,
            total=t6 - t0,
        )

    def _update_distributed(self, attempt: int, what: str) -> None:
        """The update of the distributed mode: sample, slab, model, halo, interpolate."""
        assert self._slabs is not None
        t0 = time.perf_counter()
        samples = self._gridded.sample()
        t1 = time.perf_counter()
        self._slabs.gather(samples)
        t2 = time.perf_counter()
        self._slabs.evaluate(what)
        t3 = time.perf_counter()
        self._slabs.scatter()
        t4 = time.perf_counter()
        self._interpolate()
        t5 = time.perf_counter()
        self._record(
            attempt,
            sample=t1 - t0,
            gather=t2 - t1,
            model=t3 - t2,
            wait=0.0,
            scatter=t4 - t3,
            interpolate=t5 - t4,
            total=t5 - t0,
        )

    def model_state_error(self) -> str | None:
        """Why the model must not be run now, or ``None`` (see :class:`ClosureBase`).

        Rank-local: in the gathered mode only the root rank, which runs the model, checks
        its dtype and device.
        """
        stage = self._slabs if self._slabs is not None else self._evaluator
        if stage is None:
            return super().model_state_error()
        return stage.state_error()

    def _run_model(self) -> tuple[str | None, Exception | None]:
        """Run the model and pack its output for the scatter (root only, rank-local).

        Returns:
            ``(None, None)``, or why the model call failed (it raised or returned NaN/Inf)
            and the exception it raised, if any; nothing is packed then.
        """
        assert self._evaluator is not None
        try:
            self._evaluator.evaluate()
            reason = self._evaluator.check_finite()
            if reason is None:
                self._scatter.pack(self._evaluator.outputs)
        except ModelStateError as err:  # the model is not to be run now
            return str(err), err
        except Exception as err:  # reported on every rank by the caller
            return f"the model raised {describe(err)}", err
        return reason, None

    def _interpolate(self) -> None:
        """Interpolate the received block into the owned values, then update the ghosts."""
        stage = self._slabs if self._slabs is not None else self._scatter
        if self._quadrature_values is None:
            assert isinstance(self._value_dofs, slice)
            owned = self.x.array[self._value_dofs].reshape(-1, self.num_outputs)
            stage.interpolate(out=owned)
        else:
            stage.interpolate(out=self._quadrature_values)
            self.x.array[self._value_dofs] = self._quadrature_values.reshape(-1)
        self.x.scatter_forward()

    def gridded_inputs(self) -> np.ndarray | None:
        """The last model input on the root, shape ``(channels, *grid.shape)``; else ``None``."""
        if self._evaluator is None:
            return None
        return self._evaluator.inputs.reshape(-1, *self.grid.shape).copy()


def _quadrature_coordinates(
    mesh: Mesh, quadrature_degree: int, num_cells: int, dtype: npt.DTypeLike
) -> np.ndarray:
    """Physical quadrature points of the owned cells, shape ``(num_cells * num_qp, gdim)``."""
    points = quadrature_points(mesh, quadrature_degree)
    x = fem.Expression(ufl.SpatialCoordinate(mesh), points, dtype=dtype)
    coordinates = x.eval(mesh, np.arange(num_cells, dtype=np.int32))
    return coordinates.reshape(-1, mesh.geometry.dim)


def _checked_grid_arguments(
    mesh: Mesh,
    root: int,
    sampling_degree: int | None,
    slabs: str,
    grid_shape: Sequence[int] | None,
    bounding_box: tuple[Sequence[float], Sequence[float]] | None,
) -> tuple[list[int] | None, tuple[np.ndarray, np.ndarray] | None]:
    """Check :class:`NonlocalClosure`'s grid arguments (rank-local).

    Returns:
        The grid shape as a list of ints (or ``None``) and the bounding box as two float64
        arrays (or ``None``).
    """
    if not 0 <= check_integer(root, "root") < mesh.comm.size:
        raise ValueError(f"root must be a rank of the mesh communicator, got {root}.")
    if sampling_degree is not None:
        check_integer(sampling_degree, "sampling_degree")
    if slabs not in ("mesh", "balanced"):
        raise ValueError(f"slabs must be 'mesh' or 'balanced', got {slabs!r}.")
    gdim = mesh.geometry.dim
    if gdim != mesh.topology.dim:
        raise ValueError("Non-local closures need a mesh whose gdim equals its tdim.")
    shape = None
    if grid_shape is not None:
        if isinstance(grid_shape, int | np.integer) or len(grid_shape) != gdim:
            raise ValueError(
                f"grid_shape must give at least 2 points in each of {gdim} directions, "
                f"e.g. {(16,) * gdim}, got {grid_shape!r}."
            )
        shape = [check_integer(n, "Each entry of grid_shape", 2) for n in grid_shape]
    if bounding_box is None:
        return shape, None
    box_lower = np.asarray(bounding_box[0], dtype=np.float64)
    box_upper = np.asarray(bounding_box[1], dtype=np.float64)
    if box_lower.shape != (gdim,) or box_upper.shape != (gdim,):
        raise ValueError(f"bounding_box corners must have {gdim} coordinates.")
    if not (np.isfinite(box_lower).all() and np.isfinite(box_upper).all()):
        raise ValueError(
            f"bounding_box corners must be finite numbers, got {tuple(box_lower.tolist())} "
            f"and {tuple(box_upper.tolist())}: give the lower and upper corners of a box that "
            "contains the mesh, or leave bounding_box out for the mesh's bounding box."
        )
    return shape, (box_lower, box_upper)
