"""The differentiable stages of a :class:`~dolfinx_mno.NonlocalClosure` (used by :mod:`.rollout`).

A non-local closure's update, written as torch operations whose backward is the transpose
of their forward, in the order the data flows (compare :mod:`dolfinx_mno.nonlocal_closure`)::

    s   = G u_n + s₀        sample   (OperandFunction with the closure's operand_matrix:
                                      Gᵀ g, ghosts summed into their owners)
    X   = gather(s)         gather   (GatherFunction; backward MPI.Scatterv of the root's
                                      grid cotangent to the ranks' samples)
    Y   = model(X)          model    (root only; torch autograd: VJP and dθ)
    c   = W scatter(Y)      scatter → interpolate (ScatterFunction; backward Wᵀ on each
                                      rank, MPI.Gatherv of the sub-blocks, summed on the root)

``G`` (:meth:`~dolfinx_mno.grid_gather.GriddedSampler.sample_matrix`) is the sampler's
basis weights times the operands' nodal matrix, for operands affine in their coefficients;
``W`` the multilinear interpolation weights (:class:`~dolfinx_mno.grid_scatter.GridInterpolator`).

Only the root runs the model, so only the root's graph holds it. For every rank to run
the same collective stages in backward, every rank's graph must reach them: on the other
ranks :class:`GatherFunction` returns an empty tensor that :class:`ScatterFunction` takes
in place of the model output, and :class:`ScatterFunction` takes the model's parameters as
inputs on every rank (their gradient through it is zero), so that its output requires grad
wherever the root's does. It also saves a tensor on every rank, so that a checkpointed
segment is recomputed at the same stage on every rank. The parameter gradients are then
the root's (zeros elsewhere); :func:`~dolfinx_mno.rollout.allreduce_gradients` gives every
rank their sum.

A distributed closure (``distributed=True``, :mod:`dolfinx_mno.nonlocal_distributed`) has
no root: every rank runs every stage, so every rank's graph is the same without stand-ins::

    X_r = slab(s)           slab gather  (SlabGatherFunction; backward the reverse
                                          MPI.Alltoallv of the slab cotangent to the samples)
    Y_r = DistributedFNO(X_r)            (torch autograd: the all-to-alls reversed; each
                                          rank's parameter gradient is its slab's share)
    c   = W halo(Y_r)       halo scatter → interpolate (SlabScatterFunction; backward Wᵀ,
                                          the reverse MPI.Alltoallv to the slab owners)

and :func:`~dolfinx_mno.rollout.allreduce_gradients` sums the shares.

Tensors at the boundary are float64 on the CPU; the model runs in its own dtype and on its
own device.
"""

from __future__ import annotations

import typing

import numpy as np
import torch

from dolfinx_mno._mpi import BACKWARD_PASS, agree, describe, stage_entry
from dolfinx_mno.nonlocal_closure import NonlocalClosure
from dolfinx_mno.nonlocal_distributed import SlabModelStage

__all__ = [
    "GatherFunction",
    "ScatterFunction",
    "SlabGatherFunction",
    "SlabScatterFunction",
    "nonlocal_values",
]


class GatherFunction(torch.autograd.Function):
    """``(num_local, num_inputs)`` samples → the root's model input (collective).

    Forward: ``MPI.Gatherv`` (:meth:`~dolfinx_mno.grid_gather.GriddedSampler.gather`) into
    ``(1, channels, *grid.shape)`` on the root, with the extension value and the mask;
    an empty ``(0,)`` tensor elsewhere. Backward: the mask and the points outside the mesh
    dropped, ``MPI.Scatterv`` of the rest to the ranks that sampled them.
    """

    @staticmethod
    def forward(ctx, samples: torch.Tensor, closure: NonlocalClosure) -> torch.Tensor:  # type: ignore[override]
        """The stage (see the class docstring)."""
        sampler = closure.gridded_sampler
        ctx.closure = closure
        out = sampler.empty() if closure.grid_evaluator is not None else None
        gathered = sampler.gather(out=out, samples=samples.detach().numpy())
        if gathered is None:
            return torch.zeros(0, dtype=torch.float64)
        return torch.from_numpy(gathered).reshape(1, sampler.channels, *closure.grid.shape)

    @staticmethod
    def backward(ctx, cotangent: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        """Its transpose (see the class docstring)."""
        closure: NonlocalClosure = ctx.closure
        stage_entry(closure.function_space.mesh.comm, BACKWARD_PASS)
        sampler = closure.gridded_sampler
        grid = None
        if closure.grid_evaluator is not None:
            grid = cotangent.detach().reshape(sampler.channels, -1).numpy()
        return torch.from_numpy(sampler.gather_adjoint(grid)), None


class ScatterFunction(torch.autograd.Function):
    """The root's model output → the closure values at this rank's points (collective).

    Forward: ``(1, num_outputs, *grid.shape)`` on the root (the empty tensor of
    :class:`GatherFunction` elsewhere) → ``MPI.Scatterv`` of the sub-blocks → multilinear
    interpolation: ``(num_points * num_outputs,)`` float64, in the closure's owned value
    order. Backward: :meth:`~dolfinx_mno.grid_scatter.GridScatter.scatter_adjoint`. The
    trailing ``parameters`` only tie the stage to the model on every rank (see the module
    docstring); their gradient here is ``None``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, closure: NonlocalClosure, output: torch.Tensor, *parameters: torch.Tensor
    ) -> torch.Tensor:
        """The stage (see the class docstring)."""
        scatter = closure.grid_scatter
        ctx.closure = closure
        ctx.num_parameters = len(parameters)
        ctx.output_shape = output.shape
        if closure.grid_evaluator is not None:
            scatter.pack(output.detach().reshape(closure.num_outputs, -1).numpy())
        scatter.scatter()
        values = np.empty((scatter.num_points, closure.num_outputs), dtype=np.float64)
        return torch.from_numpy(scatter.interpolate(out=values).reshape(-1))

    @staticmethod
    def backward(ctx, cotangent: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        """Its transpose (see the class docstring)."""
        closure: NonlocalClosure = ctx.closure
        stage_entry(closure.function_space.mesh.comm, BACKWARD_PASS)
        scatter = closure.grid_scatter
        values = cotangent.detach().reshape(scatter.num_points, closure.num_outputs)
        field = scatter.scatter_adjoint(np.ascontiguousarray(values.numpy()))
        if field is None:
            output = torch.zeros(ctx.output_shape, dtype=torch.float64)
        else:
            output = torch.from_numpy(field.astype(np.float64, copy=False))
            output = output.reshape(ctx.output_shape)
        return None, output, *([None] * ctx.num_parameters)


class SlabGatherFunction(torch.autograd.Function):
    """``(num_local, num_inputs)`` samples → this rank's slab input (distributed mode).

    Forward: the ``MPI.Alltoallv`` of the samples to the slab owners
    (:meth:`~dolfinx_mno.nonlocal_distributed.SlabModelStage.slab_inputs`), with the
    extension value and the mask: ``(1, channels, *local_shape)`` float64. Backward: the
    mask and the extension values dropped, the reverse ``MPI.Alltoallv`` of the rest to
    the ranks that sampled them.
    """

    @staticmethod
    def forward(ctx, samples: torch.Tensor, stage: SlabModelStage) -> torch.Tensor:  # type: ignore[override]
        """The stage (see the class docstring)."""
        ctx.stage = stage
        inputs = stage.slab_inputs(samples.detach().numpy())
        return torch.from_numpy(inputs).reshape(1, -1, *stage.local_shape)

    @staticmethod
    def backward(ctx, cotangent: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        """Its transpose (see the class docstring)."""
        stage: SlabModelStage = ctx.stage
        stage_entry(stage.comm, BACKWARD_PASS)
        slab = cotangent.detach().reshape(cotangent.shape[1], -1).contiguous().numpy()
        return torch.from_numpy(stage.slab_inputs_adjoint(slab)), None


class SlabScatterFunction(torch.autograd.Function):
    """This rank's slab of the model output → the closure values at its points.

    Forward: ``(1, num_outputs, *local_shape)`` → the halo ``MPI.Alltoallv`` → multilinear
    interpolation: ``(num_points * num_outputs,)`` float64, in the closure's owned value
    order. Backward: the interpolation's transpose, the reverse ``MPI.Alltoallv`` of each
    block's rows to their slab owners, summed where blocks overlap
    (:meth:`~dolfinx_mno.nonlocal_distributed.SlabModelStage.values_adjoint`).
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, stage: SlabModelStage) -> torch.Tensor:  # type: ignore[override]
        """The stage (see the class docstring)."""
        ctx.stage = stage
        ctx.output_shape = output.shape
        values = stage.values(output.detach()[0].contiguous().numpy())
        return torch.from_numpy(values.astype(np.float64, copy=False).reshape(-1))

    @staticmethod
    def backward(ctx, cotangent: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        """Its transpose (see the class docstring)."""
        stage: SlabModelStage = ctx.stage
        stage_entry(stage.comm, BACKWARD_PASS)
        values = cotangent.detach().reshape(stage.num_points, stage.out_channels)
        output = torch.from_numpy(stage.values_adjoint(values.contiguous().numpy()))
        return output.reshape(ctx.output_shape), None


def _distributed_values(stage: SlabModelStage, samples: torch.Tensor) -> torch.Tensor:
    """Slab gather → :class:`~dolfinx_mno.DistributedFNO` → halo scatter (collective)."""
    inputs = typing.cast(torch.Tensor, SlabGatherFunction.apply(samples, stage))
    inputs = inputs.to(device=stage.device, dtype=stage.model_dtype)
    output = stage.distributed(inputs).to(device="cpu", dtype=torch.float64)
    return typing.cast(torch.Tensor, SlabScatterFunction.apply(output, stage))


def nonlocal_values(closure: NonlocalClosure, samples: torch.Tensor) -> torch.Tensor:
    """The closure values from this rank's samples: gather → model (root) → scatter.

    Collective. The differentiable form of the last four stages of
    :meth:`~dolfinx_mno.NonlocalClosure.update`.

    Args:
        closure: The closure.
        samples: ``(num_local, num_inputs)`` float64 on the CPU, the operands at the grid
            points this rank samples (:class:`~dolfinx_mno.step_adjoint.OperandFunction`).

    Returns:
        ``(num_points * num_outputs,)`` float64 on the CPU: the owned closure values.

    A distributed closure (``distributed=True``) runs its own stages instead, every one
    on every rank: :class:`SlabGatherFunction`, the
    :class:`~dolfinx_mno.DistributedFNO` (torch autograd, its all-to-alls reversed in
    backward) and :class:`SlabScatterFunction`. Each rank's parameter gradient is then its
    slab's share, and :func:`~dolfinx_mno.rollout.allreduce_gradients` sums them.
    """
    if closure.slab_stage is not None:
        return _distributed_values(closure.slab_stage, samples)
    grid = typing.cast(torch.Tensor, GatherFunction.apply(samples, closure))
    evaluator = closure.grid_evaluator
    output, failure = grid, None  # the other ranks pass on the empty stand-in
    if evaluator is not None:
        try:
            inputs = grid.to(device=evaluator.device, dtype=evaluator.dtype)
            output = closure.model(inputs).to(device="cpu", dtype=torch.float64)
        except Exception as error:
            failure = error
    # The root's verdict before the scatter, which every rank enters.
    agree(
        closure.function_space.mesh.comm,
        None if failure is None else describe(failure),
        f"The model of closure '{closure.name}'",
        cause=failure,
    )
    parameters = [p for p in closure.model.parameters() if p.requires_grad]
    return typing.cast(torch.Tensor, ScatterFunction.apply(closure, output, *parameters))
