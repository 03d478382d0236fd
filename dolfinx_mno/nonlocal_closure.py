"""Non-local closures: a neural operator on a grid, coupled to finite-element fields.

The multiscale neural operator (MNO) learns the closure with a neural operator, e.g. a
Fourier neural operator, so that the closure sees the whole resolved field, is
grid-independent and costs O(N log N). :class:`NonlocalClosure` is used in UFL forms exactly
like a local :class:`~dolfinx_mno.Closure` (``closure.dx``, ``update()``,
:mod:`dolfinx_mno.petsc`), but its model maps gridded fields to gridded fields:

``(1, num_inputs [+ 1 mask], *grid.shape)  →  (1, prod(value_shape), *grid.shape)``

One update:

1. **sample**: the operands are evaluated at the nodes of a discontinuous Lagrange space,
   on the cells that hold grid points, and interpolated to the grid points, each point on
   exactly one rank (see :class:`~dolfinx_mno.grid.GriddedSampler`, which also makes
   training data on the same grid);
2. **gather**: ``MPI.Gatherv`` to the root rank, which assembles the input grid, with a
   mask channel (1 inside the domain, 0 outside) and ``extension_value`` outside;
3. **model**: one call on the root rank, on its device; the other ranks wait for its
   verdict asleep (a nonblocking broadcast tested with growing pauses), so that their
   cores are free for it;
4. **scatter**: each rank receives only the sub-block of the output grid around its own
   quadrature points (``MPI.Scatterv``);
5. **interpolate**: multilinear interpolation to the quadrature points of the owned cells,
   then ``scatter_forward`` for the ghosts.

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
import typing
from collections.abc import Sequence

from mpi4py import MPI

import numpy as np
import torch
import ufl
from dolfinx import fem
from dolfinx.mesh import Mesh

from dolfinx_mno._mpi import describe, failure_message, rank_local
from dolfinx_mno.base import ClosureBase, validate_arguments
from dolfinx_mno.closure import ClosureEvaluationError
from dolfinx_mno.grid import Grid, GriddedSampler, GridInterpolator, mesh_bounding_box
from dolfinx_mno.operands import Operands, OperandsLike, operand_comm
from dolfinx_mno.quadrature import owned_dofs, quadrature_points, quadrature_space
from dolfinx_mno.spec import ClosureSpec
from dolfinx_mno.torch_bridge import model_device, resolve_device, training_mode_error
from dolfinx_mno.validation import check_integer

__all__ = ["NonlocalClosure"]


def _wait_passively(request: MPI.Request, shortest: float = 50e-6, longest: float = 1e-3) -> None:
    """Complete ``request``, sleeping between tests instead of spinning in MPI.

    ``Request.Wait`` polls: a rank waiting for another rank's long computation (the model
    on the root) would occupy a core that the computation could use. Here the pause
    between tests grows with the time waited (2 % of it, from ``shortest`` to
    ``longest`` seconds), so the extra latency stays small for short waits.

    Args:
        request: A nonblocking MPI request.
        shortest: First pause, in seconds.
        longest: Longest pause, in seconds.
    """
    start = time.perf_counter()
    while not request.Test():
        waited = time.perf_counter() - start
        time.sleep(min(longest, max(shortest, 0.02 * waited)))


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
            ``h = (volume / num_cells)^(1/tdim)``.
        bounding_box: ``(lower, upper)`` of the grid; default the mesh's bounding box. It
            must contain the mesh.
        mask_channel: Append a channel that is 1 at grid points inside the domain and 0
            outside (always 1 on a box-shaped domain); default the model file's spec,
            else ``True``.
        extension_value: Value of every input channel at grid points outside the domain.
        sampling_degree: Degree of the discontinuous Lagrange space the operands are
            interpolated into before point evaluation; default the highest degree of the
            operand coefficients (exact for ``u`` and ``grad u`` of a Lagrange ``u``).
        mesh: The mesh; by default the mesh of the operands.
        device: Device of the model on the root rank (``"auto"``: CUDA if available).
        root: Rank that runs the model.
        name: Name of the function.

    Shapes:
        ``self.x.array`` holds ``(num_cells, num_points, *value_shape)`` values, like a
        local closure. The model input has ``num_inputs + mask_channel`` channels; grid
        axes are in ``(x, y, z)`` order.

    Attributes:
        communication: Bytes sent per update: ``{"gather": ..., "scatter": ...}`` summed
            over ranks (excluding the root's own share), set at construction.
        timings: Seconds per stage of the last update: ``sample``, ``gather``, ``model``
            (root only), ``wait`` (non-root ranks waiting, asleep, for the root's model),
            ``scatter``, ``interpolate`` and ``total``.
    """

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
            if not 0 <= check_integer(root, "root") < comm.size:
                raise ValueError(f"root must be a rank of the mesh communicator, got {root}.")
            if sampling_degree is not None:
                check_integer(sampling_degree, "sampling_degree")
            gdim = mesh.geometry.dim
            tdim = mesh.topology.dim
            if gdim != tdim:
                raise ValueError("Non-local closures need a mesh whose gdim equals its tdim.")
            if grid_shape is not None:
                if isinstance(grid_shape, int | np.integer) or len(grid_shape) != gdim:
                    raise ValueError(
                        f"grid_shape must give at least 2 points in each of {gdim} directions, "
                        f"e.g. {(16,) * gdim}, got {grid_shape!r}."
                    )
                grid_shape = [check_integer(n, "Each entry of grid_shape", 2) for n in grid_shape]
            if bounding_box is not None:
                box_lower = np.asarray(bounding_box[0], dtype=np.float64)
                box_upper = np.asarray(bounding_box[1], dtype=np.float64)
                if box_lower.shape != (gdim,) or box_upper.shape != (gdim,):
                    raise ValueError(f"bounding_box corners must have {gdim} coordinates.")

        # Collective from here on; every decision below is identical on all ranks.
        lower, upper = mesh_bounding_box(mesh)
        if bounding_box is None:
            box_lower, box_upper = lower, upper
        if grid_shape is None:
            num_cells = comm.allreduce(mesh.topology.index_map(tdim).size_local)
            h = (np.prod(upper - lower) / num_cells) ** (1.0 / tdim)
            grid_shape = [
                math.ceil((hi - lo) / h) + 1 for lo, hi in zip(box_lower, box_upper, strict=True)
            ]
        grid = Grid(tuple(box_lower), tuple(box_upper), tuple(int(n) for n in grid_shape))
        if not grid.covers(lower, upper):
            raise ValueError(
                f"The grid box [{grid.lower}, {grid.upper}] does not cover the mesh's "
                f"bounding box [{tuple(lower)}, {tuple(upper)}]."
            )

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
        self._update_count = 0
        self.timings: dict[str, float] = {}
        self.total_timings: dict[str, float] = {}

        # Sampling: operands → DG space → grid points owned by this rank → the root.
        self._gridded = GriddedSampler(
            operand_list,
            grid,
            extension_value=self.extension_value,
            mask_channel=self.mask_channel,
            sampling_degree=sampling_degree,
            mesh=mesh,
            root=root,
        )
        # Every buffer of an update is allocated here and reused: fresh arrays of hundreds
        # of MB on large grids cost more in page faults than their arithmetic.
        mpi_type = MPI.DOUBLE if dtype == np.float64 else MPI.FLOAT
        self._status = np.zeros(1, dtype=np.int32)  # the root's verdict on the model call
        self._is_root = comm.rank == root
        if self._is_root:
            self._grid_input = self._gridded.empty(np.float64)
            self._grid_output = np.empty((self.num_outputs, grid.num_points))
            self._finite = np.empty((self.num_outputs, grid.num_points), dtype=bool)
            self._finite_points = np.empty(grid.num_points, dtype=bool)

        # Quadrature points of the owned cells, and their interpolation from the grid.
        tdim_cells = mesh.topology.index_map(tdim).size_local
        points = quadrature_points(mesh, int(quadrature_degree))
        x = ufl.SpatialCoordinate(mesh)
        coordinates = fem.Expression(x, points, dtype=dtype).eval(
            mesh, np.arange(tdim_cells, dtype=np.int32)
        )
        self._interpolator = GridInterpolator(
            grid, coordinates.reshape(-1, gdim), self.num_outputs, dtype
        )
        self._value_dofs = owned_dofs(space, tdim_cells)
        # This rank's sub-block of the output grid, stored channel-last: the layout that the
        # interpolation gathers corner values from without a copy.
        self._block_buffer = np.empty(
            (*self._interpolator.block_shape, self.num_outputs), dtype=dtype
        )
        self._block = np.moveaxis(self._block_buffer, -1, 0)  # (num_outputs, *block_shape)
        # The interpolation writes straight into x.array where the owned values are one
        # contiguous range of its dtype; otherwise through this buffer.
        direct = (
            isinstance(self._value_dofs, slice)
            and self._interpolator.value_dtype == self.x.array.dtype
        )
        self._quadrature_values = (
            None
            if direct
            else np.empty(
                (self._interpolator.num_points, self.num_outputs),
                dtype=self._interpolator.value_dtype,
            )
        )
        blocks = comm.gather(self._interpolator.block_slices(), root=root)
        if self._is_root:
            assert blocks is not None
            self._scatter_slices = blocks
            self._scatter_counts = np.array(
                [self.num_outputs * math.prod(s.stop - s.start for s in b) for b in blocks]
            )
            self._scatter_displs = np.concatenate([[0], np.cumsum(self._scatter_counts)[:-1]])
            self._scatter_buffer = np.empty(int(self._scatter_counts.sum()), dtype=dtype)
            self._scatter_send = [
                self._scatter_buffer,
                (self._scatter_counts, self._scatter_displs),
                mpi_type,
            ]
            # Each rank's part of the buffer, viewed as its sub-block of the output grid.
            self._scatter_parts = []
            for block, offset, count in zip(
                blocks, self._scatter_displs, self._scatter_counts, strict=True
            ):
                shape = (*(b.stop - b.start for b in block), self.num_outputs)
                part = self._scatter_buffer[offset : offset + count].reshape(shape)
                self._scatter_parts.append(np.moveaxis(part, -1, 0))
            root_share_out = self._scatter_counts[root]
            self.communication = {
                "gather": self._gridded.gather_bytes,
                "scatter": int(self._scatter_counts.sum() - root_share_out) * dtype.itemsize,
            }
        self.communication = comm.bcast(getattr(self, "communication", None), root=root)

        # The model lives on the root rank; probe it once with the real grid shape. The
        # root's verdict (placing the model on its device may fail too) reaches every rank.
        with rank_local(comm, what):
            if self._is_root:
                self._place_model(device)
                problem = self._probe()
                if problem is not None:
                    raise ValueError(problem)
        self._fill_not_updated()

    # -- model on the root ------------------------------------------------------------

    def _place_model(self, device: str | torch.device | None) -> None:
        """Move the model to its device and allocate its input and output (root only)."""
        target = resolve_device(device, MPI.COMM_SELF) if device is not None else None
        if target is not None:
            self._model.to(target)
        self._device = model_device(self._model) or target or torch.device("cpu")
        self._model_dtype = next(
            (
                t.dtype
                for t in (*self._model.parameters(), *self._model.buffers())
                if t.is_floating_point()
            ),
            torch.float64 if self.dtype == np.float64 else torch.float32,
        )
        # The model input: the gridded inputs themselves where dtype and device agree,
        # else a tensor on the model's device that every update copies (and casts) into.
        channels = self.num_inputs + int(self.mask_channel)
        self._grid_input_tensor = torch.from_numpy(self._grid_input).view(
            1, channels, *self.grid.shape
        )
        if self._model_dtype == torch.float64 and self._device.type == "cpu":
            self._model_input = self._grid_input_tensor
        else:
            self._model_input = torch.empty(
                self._grid_input_tensor.shape, dtype=self._model_dtype, device=self._device
            )
        self._grid_output_tensor = torch.from_numpy(self._grid_output)

    def _run_model(self) -> torch.Tensor:
        if self._model_input is not self._grid_input_tensor:
            self._model_input.copy_(self._grid_input_tensor)
        with torch.inference_mode():
            return typing.cast(torch.Tensor, self._model(self._model_input))

    def _evaluate_model(self) -> tuple[str | None, Exception | None]:
        """Fill the model input, run the model and pack the scatter buffer (root only).

        Returns:
            ``(None, None)``, or why the model call failed (it raised or returned NaN/Inf)
            and the exception it raised, if any; the scatter buffer is then incomplete.
        """
        if (reason := training_mode_error(self._model)) is not None:
            return reason, None
        try:
            output = self._run_model()
            gridded = output[0].reshape(self.num_outputs, self.grid.num_points)
            self._grid_output_tensor.copy_(gridded)  # to the CPU, in float64
        except Exception as err:  # reported collectively by the caller
            return f"the model raised {describe(err)}", err
        np.isfinite(self._grid_output, out=self._finite)
        np.logical_and.reduce(self._finite, axis=0, out=self._finite_points)
        bad = self.grid.num_points - int(np.count_nonzero(self._finite_points))
        if bad:
            reason = f"the model returned NaN/Inf at {bad} of {self.grid.num_points} grid points"
            return reason, None
        values = self._grid_output.reshape(self.num_outputs, *self.grid.shape)
        for part, block in zip(self._scatter_parts, self._scatter_slices, strict=True):
            np.copyto(part, values[(slice(None), *block)], casting="same_kind")
        return None, None

    def _probe(self) -> str | None:
        channels = self.num_inputs + int(self.mask_channel)
        try:
            y = self._run_model()
        except Exception as err:
            expected = getattr(self._model, "in_channels", None)
            given = (
                f"{channels} input channels ({self.num_inputs} operand components"
                f"{' + 1 mask' if self.mask_channel else ''})"
            )
            if expected is not None and expected != channels:
                return (
                    f"Channel mismatch: the model has in_channels={expected}, but the closure "
                    f"gives it {given}."
                )
            return (
                f"The model failed on a probe input of {given} on the {self.grid.shape} grid: "
                f"{type(err).__name__}: {err}"
            )
        expected_shape = (1, self.num_outputs, *self.grid.shape)
        if tuple(y.shape) != expected_shape:
            if tuple(y.shape[2:]) != self.grid.shape:
                what = "changes the grid shape"
            else:
                what = "returns the wrong number of output channels"
            return (
                f"The model {what}: for input (1, {channels}, *{self.grid.shape}) it returned "
                f"{tuple(y.shape)}, expected {expected_shape} (value_shape {self.value_shape})."
            )
        return None

    # -- update ------------------------------------------------------------------------

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

    def update(self, tangent: bool | None = None) -> None:
        """Sample, gather, run the model, scatter and interpolate (collective).

        Args:
            tangent: Must be falsy: non-local closures provide no pointwise tangent.

        Raises:
            ClosureEvaluationError: If the model raised or returned NaN/Inf, on every rank,
                with the root's reason (``"... failed on rank(s) [0] (1 of 4 ranks); on
                rank 0: the model returned NaN/Inf at 12 of 289 grid points. ..."``); the
                values are left unchanged on every rank.
        """
        if tangent:
            raise ValueError("Non-local closures have no pointwise tangent; see the docs.")
        comm = self.function_space.mesh.comm
        attempt = self._update_count + 1
        t0 = time.perf_counter()
        self._gridded.sample()
        t1 = time.perf_counter()
        self._gridded.gather(out=self._grid_input if self._is_root else None)
        t2 = time.perf_counter()
        error: str | None = None
        cause: Exception | None = None
        if self._is_root:
            error, cause = self._evaluate_model()
            self._status[0] = error is not None
        t3 = time.perf_counter()
        # The root's verdict: the other ranks wait here for its model without spinning on
        # a core (a passive wait on a nonblocking broadcast), and learn why it failed
        # only if it did, so that a successful update costs no further collective.
        _wait_passively(comm.Ibcast(self._status, root=self.root))
        if self._status[0]:
            error = comm.bcast(error, root=self.root)
            reasons: list[str | None] = [None] * comm.size
            reasons[self.root] = error
            raise ClosureEvaluationError(
                failure_message(
                    f"Update {attempt} of non-local closure '{self.name}'",
                    reasons,
                    "The previous closure values were kept.",
                )
            ) from cause
        t3_wait = time.perf_counter()
        send = self._scatter_send if self._is_root else None
        comm.Scatterv(send, self._block_buffer.reshape(-1), root=self.root)
        t4 = time.perf_counter()
        if self._quadrature_values is None:
            assert isinstance(self._value_dofs, slice)
            owned = self.x.array[self._value_dofs].reshape(-1, self.num_outputs)
            self._interpolator.interpolate(self._block, out=owned)
        else:
            self._interpolator.interpolate(self._block, out=self._quadrature_values)
            self.x.array[self._value_dofs] = self._quadrature_values.reshape(-1)
        self.x.scatter_forward()
        t5 = time.perf_counter()
        timings = {
            "sample": t1 - t0,
            "gather": t2 - t1,
            "model": t3 - t2,
            "wait": t3_wait - t3,
            "scatter": t4 - t3_wait,
            "interpolate": t5 - t4,
            "total": t5 - t0,
        }
        self.timings = timings
        for stage, seconds in timings.items():
            self.total_timings[stage] = self.total_timings.get(stage, 0.0) + seconds
        self._update_count = attempt

    def gridded_inputs(self) -> np.ndarray | None:
        """The last model input on the root, shape ``(channels, *grid.shape)``; else ``None``."""
        if not self._is_root:
            return None
        return self._grid_input.reshape(-1, *self.grid.shape).copy()
