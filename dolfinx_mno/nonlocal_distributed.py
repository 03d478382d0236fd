"""The distributed mode of a non-local closure: slab → model → halo, no rank holds the grid.

A :class:`~dolfinx_mno.NonlocalClosure` built with ``distributed=True`` replaces its gather,
root model and scatter stages with :class:`SlabModelStage`:

1. **sample → slab** (:class:`~dolfinx_mno.grid_slabs.SlabGather`): each rank's grid
   samples go to the rank whose slab of rows holds them (``MPI.Alltoallv``);
2. **model** (:class:`~dolfinx_mno.distributed_operator.DistributedFNO`): every rank runs
   the neural operator on its slab; the spectral convolutions exchange only the kept
   Fourier modes (``torch.distributed`` all-to-all);
3. **halo → points** (:class:`~dolfinx_mno.grid_slabs.SlabScatter`): each rank receives
   the rows of the output block around its quadrature points that other ranks hold, and
   interpolates.

The slabs are rows of the first grid axis, at least one per rank (one that owns no cells
included), so the grid needs at least as many points along its first axis as there are
ranks. By default they are the balanced rows; the closure passes rows that follow the mesh
partition where it can (:func:`~dolfinx_mno.slab_alignment.rows_following_samples`), so
that fewer samples travel in stage 1.
"""

from __future__ import annotations

import math

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import torch

from dolfinx_mno._mpi import agree
from dolfinx_mno.closure import ClosureEvaluationError
from dolfinx_mno.distributed_fft import SlabPartition, process_group_backend
from dolfinx_mno.distributed_operator import DistributedFNO, check_supported
from dolfinx_mno.grid import Grid
from dolfinx_mno.grid_slabs import SlabGather, SlabScatter
from dolfinx_mno.torch_bridge import Placement, training_mode_error

__all__ = ["SlabModelStage"]


class SlabModelStage:
    """Slab gather, distributed model and halo scatter of one closure update (collective).

    Args:
        model: A ``neuralop.models.FNO``/``TFNO`` mapping ``(1, in_channels, *grid.shape)``
            to ``(1, out_channels, *grid.shape)``, on the device wanted.
        grid: The grid.
        indices: Flat grid indices of this rank's samples, ``(num_local,)``.
        inside: Whether each grid point lies in the mesh, ``(grid.num_points,)``.
        points: This rank's quadrature points, ``(num_points, gdim)``.
        num_inputs: Sampled channels (without the mask).
        mask_channel: Whether the model's last input channel is the mask.
        extension_value: The inputs outside the mesh.
        out_channels: The model's output channels.
        dtype: The mesh's scalar type.
        comm: The mesh's communicator.
        rows: Rows of axis 0 per rank; default the balanced partition.

    Attributes:
        distributed: The :class:`DistributedFNO`.
        device: The model's device.
        model_dtype: The model's floating-point dtype.
        out_channels: The model's output channels.
        rows: The rows of axis 0 per rank.
        local_shape: This rank's slab, ``(rows, n_1, ...)``.
        communication: Bytes sent per update, summed over ranks: ``{"slab": ..., "halo":
            ...}`` (the all-to-alls of the model are in its own counts).
        remote_counts: Grid points sent to other ranks per update, summed over ranks:
            ``{"slab": samples, "halo": output points}``.

    Raises:
        ValueError: On every rank, the model cannot be distributed (see
            :class:`DistributedFNO`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        grid: Grid,
        indices: np.ndarray,
        inside: np.ndarray,
        points: np.ndarray,
        num_inputs: int,
        mask_channel: bool,
        extension_value: float,
        out_channels: int,
        dtype: npt.DTypeLike,
        comm: MPI.Comm,
        rows: SlabPartition | None = None,
    ):
        """Set up the three stages (collective); the arguments are in the class docstring."""
        # The same model on every rank: each raises alike, before the first collective.
        # First whether it is an FNO DistributedFNO can run (a Sequential got the channel
        # message), then its channels.
        check_supported(model)
        channels = num_inputs + int(mask_channel)
        found = (getattr(model, "in_channels", channels), getattr(model, "out_channels", None))
        if found != (channels, out_channels):
            mask = " and the mask" if mask_channel else ""
            raise ValueError(
                f"The FNO maps {found[0]} channels to {found[1]}, but the closure gives it "
                f"{channels} (the operands' {num_inputs} components{mask}) and needs "
                f"{out_channels} (its value shape): build it with in_channels={channels}, "
                f"out_channels={out_channels}."
            )
        device = next(model.parameters()).device
        self.distributed = DistributedFNO(
            model, grid.shape, comm, rows=rows, backend=process_group_backend(device)
        )
        rows = self.rows = self.distributed.rows
        self.comm = comm
        self._gather = SlabGather(grid, rows, indices, inside, num_inputs, dtype, comm)
        self._scatter = SlabScatter(grid, rows, points, out_channels, dtype, comm)
        self.num_points = self._scatter.num_points
        self.value_dtype = self._scatter.value_dtype
        local_shape = self.distributed.local_shape
        channels = num_inputs + int(mask_channel)
        self._inputs = torch.empty((channels, math.prod(local_shape)), dtype=torch.float64)
        self._gather.prepare(self._inputs.numpy(), extension_value, mask_channel)
        self._extension_value = float(extension_value)
        self._mask_channel = bool(mask_channel)
        self.model_dtype = next(
            (t.dtype for t in model.parameters() if t.is_floating_point()), torch.float64
        )
        self._placement = Placement(model)
        self.device = device
        self.local_shape = local_shape
        self.out_channels = int(out_channels)
        self._outputs = np.empty((out_channels, *local_shape), dtype=np.dtype(dtype))
        self.communication = {
            "slab": comm.allreduce(self._gather.exchange_bytes),
            "halo": comm.allreduce(self._scatter.exchange_bytes),
        }
        self.remote_counts = {
            "slab": comm.allreduce(self._gather.remote_count),
            "halo": comm.allreduce(self._scatter.remote_count),
        }

    def gather(self, samples: np.ndarray) -> None:
        """Send this rank's ``(num_local, num_inputs)`` samples to the slabs (collective)."""
        self._gather.gather(samples, self._inputs.numpy())

    def state_error(self) -> str | None:
        """Why the model must not run now (training mode, recast or moved), or ``None``."""
        return training_mode_error(self.distributed.model) or self._placement.error()

    def evaluate(self, what: str) -> None:
        """Run the model on the slabs (collective).

        Args:
            what: The subject of an error message, e.g. ``"Update 3 of closure 'q'"``.

        Raises:
            ClosureEvaluationError: On every rank: the model is in training mode, or it
                returned NaN/Inf on some rank's slab (the values are then not sent).
        """
        note = "The previous closure values were kept."
        agree(self.comm, self.state_error(), what, ClosureEvaluationError, note=note)
        field = self._inputs.view(1, -1, *self.local_shape)
        field = field.to(device=self.device, dtype=self.model_dtype)
        with torch.inference_mode():
            output = self.distributed(field)[0]
        self._outputs[...] = output.cpu().numpy()
        bad = int(np.count_nonzero(~np.isfinite(self._outputs)))
        reason = f"the model returned NaN/Inf at {bad} values of this rank's slab" if bad else None
        agree(self.comm, reason, what, ClosureEvaluationError, note=note)

    def scatter(self) -> None:
        """Send each rank the halo rows of its block of the output (collective)."""
        self._scatter.scatter(self._outputs)

    def interpolate(self, out: np.ndarray | None = None) -> np.ndarray:
        """The output at this rank's quadrature points, ``(num_points, out_channels)``."""
        return self._scatter.interpolate(out=out)

    # -- the stages as new arrays, and their transposes (nonlocal_adjoint) ---------------

    def slab_inputs(self, samples: np.ndarray) -> np.ndarray:
        """A new slab input from this rank's samples (collective; the transfer of :meth:`gather`).

        Args:
            samples: This rank's ``(num_local, num_inputs)``.

        Returns:
            ``(channels, prod(local_shape))`` float64: the extension value, the mask and the
            samples received.
        """
        inputs = np.empty(self._inputs.shape, dtype=np.float64)
        self._gather.prepare(inputs, self._extension_value, self._mask_channel)
        self._gather.gather(samples, inputs)
        return inputs

    def slab_inputs_adjoint(self, cotangent: np.ndarray) -> np.ndarray:
        """The transpose of :meth:`slab_inputs` (collective).

        Args:
            cotangent: ``(channels, prod(local_shape))``.

        Returns:
            A new ``(num_local, num_inputs)`` float64 array.
        """
        return self._gather.gather_adjoint(cotangent).astype(np.float64, copy=False)

    def values(self, outputs: np.ndarray) -> np.ndarray:
        """The closure values from this rank's slab of the output (collective).

        Args:
            outputs: ``(out_channels, *local_shape)``.

        Returns:
            A new ``(num_points, out_channels)`` array of :attr:`value_dtype`.
        """
        self._outputs[...] = outputs
        self._scatter.scatter(self._outputs)
        return self._scatter.interpolate()

    def values_adjoint(self, cotangent: np.ndarray) -> np.ndarray:
        """The transpose of :meth:`values` (collective).

        Args:
            cotangent: ``(num_points, out_channels)`` float64.

        Returns:
            A new ``(out_channels, *local_shape)`` float64 array.
        """
        return self._scatter.scatter_adjoint(cotangent).astype(np.float64, copy=False)
