"""Fit closure models to data: reproducible, resumable and data-parallel over MPI.

:func:`fit` trains a pointwise model on ``(inputs, targets)`` samples, e.g. operands and
closure values collected at quadrature points, and returns a
:class:`~dolfinx_mno.NormalizedModel` that a :class:`~dolfinx_mno.Closure` evaluates in
physical units. With ``grid=True`` a sample is a field, ``(channels, *grid)``, and the
model a neural operator, ``(batch, in_channels, *grid) → (batch, out_channels, *grid)``
(the contract of :class:`~dolfinx_mno.NonlocalClosure`). The samples are arrays on each
rank, or a data file (:class:`~dolfinx_mno.data.ClosureDataReader`,
:class:`~dolfinx_mno.data.GriddedDataReader`). See ``docs/training.md``.

The package, in the order a run uses it:

* :mod:`~dolfinx_mno.training.fitting`: :func:`fit`, the entry point.
* :mod:`~dolfinx_mno.training.samples`: checks of the samples, the seeded split (by
  sample or by group), the normalisation statistics of the training split.
* :mod:`~dolfinx_mno.training.optim`: the optimiser and schedule (injectable factories;
  Adam and ``ReduceLROnPlateau`` by default).
* :mod:`~dolfinx_mno.training.loop`: :class:`~dolfinx_mno.training.loop.Trainer`, epochs
  of minibatch steps, validation, early stopping.
* :mod:`~dolfinx_mno.training.parallel`: data parallelism over MPI without
  ``torch.distributed``: shards, row exchange, gradients summed in a rank-independent
  order (the weights are the same, bit for bit, on any number of ranks).
* :mod:`~dolfinx_mno.training.checkpoint`: checkpoints (model file + training state) and
  resume.
* :mod:`~dolfinx_mno.training.state`: the history and early-stopping state.
* :mod:`~dolfinx_mno.training.aposteriori`: :func:`fit_rollout`, a-posteriori ("solver in
  the loop") training of a closure through rollouts of the solver, with the same loop,
  optimisers, checkpoints and guarantees; its data (trajectories and their windows) in
  :mod:`~dolfinx_mno.training.trajectories`.
"""

import typing

from dolfinx_mno.training.fitting import FitResult, fit
from dolfinx_mno.training.parallel import read_shard, shard
from dolfinx_mno.training.samples import split_samples as _split  # noqa: F401 (tests)
from dolfinx_mno.training.state import TrainingHistory
from dolfinx_mno.training.trajectories import owned_states

if typing.TYPE_CHECKING:
    from dolfinx_mno.training.aposteriori import fit_rollout


def __getattr__(name: str) -> typing.Any:
    """``fit_rollout`` on first use: it imports the rollouts, hence petsc4py.

    ``import dolfinx_mno`` (which imports :func:`fit`) then needs no petsc4py, as
    DOLFINx needs none without ``dolfinx.fem.petsc``.
    """
    if name == "fit_rollout":
        from dolfinx_mno.training.aposteriori import fit_rollout

        return fit_rollout
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FitResult",
    "TrainingHistory",
    "fit",
    "fit_rollout",
    "owned_states",
    "read_shard",
    "shard",
]
