"""Differentiable rollouts: gradients through time steps that contain closures.

A rollout of ``k`` steps of an :class:`~dolfinx_mno.timestepping.IMEXStepper` or an
:class:`~dolfinx_mno.timestepping.ImplicitStepper` is built as a torch graph, so that torch
autograd gives the gradient of a scalar loss of the states with respect to the closures'
parameters ``θ`` (and the initial state) by the *discrete adjoint* of the scheme. An IMEX
step ``n`` is three stages, each with its own backward (:mod:`dolfinx_mno.step_adjoint`)::

    x_n     = P u_n + x₀         operand map   (OperandFunction: Pᵀ g, reverse scatter)
    c_n     = model(x_n)         the model     (torch autograd: VJP and dθ)
    u_{n+1} = A⁻¹ b(u_n, c_n)    the IMEX solve (IMEXStepFunction: μ = A⁻ᵀ g, then
                                                 (∂b/∂u_n)ᵀ μ and (∂b/∂c_n)ᵀ μ)

An :class:`~dolfinx_mno.timestepping.SSPRK3Stepper` takes these three stages three times
per step, each from the last one's state, and combines the solves with ``u_n``
(``w = a u_n + b A⁻¹ b(w', c(w'))``): autograd follows ``u_n`` through every sum.

A stepper that keeps older states (``IMEXStepper(..., older=[u_nm1])``: a closure with
memory of the last step, or a two-level scheme) makes the state a tuple ``(u_n, u_{n-1},
...)``: the operand map and the solve read every level, and their backward gives each
level its share (``P_jᵀ g``, ``B_jᵀ μ``), so that ``u_n`` is followed through the step that
makes it and the steps that read it as an older state.

``P`` is the closure's constant operand matrix
(:meth:`~dolfinx_mno.Closure.operand_matrix`), ``A`` the step's constant matrix, whose
factorisation (or preconditioner) the transposed solves reuse (``KSPSolveTranspose``), and
``∂b/∂u_n``, ``∂b/∂c_n`` the Jacobians of the right-hand side with its Dirichlet rows
zeroed, assembled once when the linear form is affine in ``u_n`` and the closures (else at
each step's state in backward). An implicit step is one stage
(:class:`~dolfinx_mno.step_adjoint.ImplicitStepFunction`): Newton forward, and backward the
adjoint of the converged step (``J⁻ᵀ`` with the closure tangents, then the model's VJP at
the converged operands). A :class:`~dolfinx_mno.NonlocalClosure` of an IMEX step replaces
the operand and model stages by those of its update (:mod:`dolfinx_mno.nonlocal_adjoint`:
sample, gather, the model on the root, scatter and interpolate; for ``distributed=True``:
sample, slab gather, the distributed model on every rank, halo scatter and interpolate).
In an implicit step a non-local closure (gathered or distributed) is frozen in the
assembled Jacobian, and the adjoint solve adds its linearisation matrix-free: GMRES on
``Jᵀ = Aᵀ + Dᵀ Bᵀ`` (``Dᵀ`` a torch VJP through those stages), preconditioned by the
Newton solver's preconditioner transposed. See ``docs/adjoint.md`` for the method, and
why it is not dolfinx-adjoint.

Tensors at the boundary are float64 on the CPU: a state is the **owned** dofs of ``u``
(``index_map.size_local * bs`` entries). The model runs in its own dtype and on its own
device. Each rank's graph covers its own dofs and points; the collective PETSc operations
in backward run in the same order on every rank because every rank builds the same graph.
Parameter gradients are sums over ranks (:func:`allreduce_gradients`), so they do not
depend on the number of ranks.

Example::

    stepper = IMEXStepper(problem, u_h, u_n, dt=0.01)
    rollout = Rollout(stepper, checkpoint_every=10)
    result = rollout.gradient(rollout.initial_state(), targets)   # targets: owned arrays
    for parameter, grad in zip(closure.model.parameters(), result.parameters[0]):
        parameter.grad = grad                                      # then optimiser.step()
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import torch
import ufl

from dolfinx_mno._mpi import (
    BACKWARD_PASS,
    collective_stages,
    rank_local,
    same_everywhere,
)
from dolfinx_mno.base import ClosureBase
from dolfinx_mno.closure import Closure, extract_closures
from dolfinx_mno.nonlocal_closure import NonlocalClosure
from dolfinx_mno.petsc import check_jacobian
from dolfinx_mno.step_adjoint import (
    IMEXStep,
    IMEXStepFunction,
    ImplicitStep,
    ImplicitStepFunction,
    OperandFunction,
    OperandMap,
    coefficients,
    model_values,
    owned_size,
)
from dolfinx_mno.timestepping import IMEXStepper, ImplicitStepper
from dolfinx_mno.validation import is_integer_at_least

__all__ = ["Rollout", "RolloutGradient", "allreduce_gradients", "rollout_loss"]

#: What to do when the ranks pass different step counts or targets.
_SAME_ARGUMENTS = (
    "Give each rank the same number of steps and targets (each rank's targets hold its own "
    "owned dofs)."
)

#: The steppers a rollout differentiates.
Stepper = IMEXStepper | ImplicitStepper
#: The closures a rollout differentiates.
AnyClosure = Closure | NonlocalClosure


# -- the rollout ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutGradient:
    """The loss of a rollout and its gradients, the same on every rank.

    Attributes:
        loss: The loss (:func:`rollout_loss`), summed over ranks.
        parameters: One list per differentiated closure (in the order asked for), of
            ``∂loss/∂θ`` for each of its model's trainable parameters (in
            ``model.parameters()`` order), each with the parameter's shape, dtype and
            device, summed over ranks.
        initial_state: ``∂loss/∂u_0`` on this rank's owned dofs (float64, CPU), or
            ``None`` if it was not asked for.
    """

    loss: float
    parameters: list[list[torch.Tensor]]
    initial_state: torch.Tensor | None


RolloutGradient.__init__.__doc__ = "Hold a rollout's loss and gradients; see the class docstring."


class Rollout:
    r"""Differentiable rollouts of an IMEX or implicit time stepper with closures.

    :meth:`run` advances ``k`` steps of ``stepper`` as a torch graph (see the module
    docstring); :meth:`gradient` runs it and returns the gradient of :func:`rollout_loss`.
    The stepper's time, step count and history are not changed; the problem's functions
    (``u``, ``u_previous``, the closure values, the time constant) are left at the last
    state that was computed (after a checkpointed backward: an earlier one).

    Args:
        stepper: An :class:`~dolfinx_mno.timestepping.IMEXStepper` (``closure_interval=1``;
            an :class:`~dolfinx_mno.timestepping.SSPRK3Stepper` too) or an
            :class:`~dolfinx_mno.timestepping.ImplicitStepper`. IMEX: the bilinear form
            must be constant (no ``u_previous``, no closures: the matrix and its
            factorisation serve every step and every transposed solve); the linear form
            may contain local :class:`~dolfinx_mno.Closure`\ s and
            :class:`~dolfinx_mno.NonlocalClosure`\ s that read ``u_previous`` and, if the
            stepper keeps them (``older=``), the older states ``u_{n-1}, ...``: the
            rollout's state is then all the levels, and the gradient follows each
            ``u_n`` through the steps that read it as ``u_{n-1}``, ``u_{n-2}``, ....
            Implicit: no older states; the residual's closures, local and non-local, read
            ``u`` (not ``u_previous``), and the Jacobian holds the local closures' tangents (the
            default ``J``; non-local closures are frozen in it by design, and the adjoint
            adds their linearisation matrix-free, so the Newton solver's preconditioner
            must support ``PCApplyTranspose``, as LU does). Converge the nonlinear solve
            tightly: the adjoint is that of the converged step. In both, the operands must
            be affine in their coefficients (``u``, ``grad(u)``, ``x``, other fixed
            coefficients). A form nonlinear in ``u_n`` or a closure is supported: its
            Jacobians are then assembled at each step's state in backward.
        checkpoint_every: Keep the autograd graph of only one segment of this many steps
            at a time: the other segments run without a graph, keeping only their first
            states, and backward runs each of them again with its graph when it reaches it
            (see ``keep_states``). The last segment keeps its graph from the
            forward (backward needs it first, so keeping it costs no extra memory): a
            rollout of ``k`` steps recomputes ``k - (k - 1) % checkpoint_every - 1`` of
            them, none if ``k ≤ checkpoint_every``. ``None`` (the default) keeps every
            step's. An implicit rollout keeps no model graph between its passes (backward
            rebuilds it at each converged state), so it needs no checkpointing for memory.
        keep_states: With ``checkpoint_every``, keep every state of the forward (one
            ``(num_owned,)`` tensor a step, which the loss often keeps anyway) so that the
            recomputation rebuilds only the operand and model stages of each step: a step
            recomputed in backward returns its state from the forward instead of solving
            again (for an implicit step, no Newton solve at all). ``False`` keeps only each
            segment's first state and solves the recomputed steps again; the gradient is
            the same.
        before_step: Called as ``before_step(stepper, t_new)`` before each step, as in
            :meth:`~dolfinx_mno.timestepping.IMEXStepper.step` (time-dependent data; not
            differentiated). The stepper's time constant, if any, is set first. It must set
            the data from ``t_new`` alone: backward calls it again for each step before
            that step's adjoint (and a checkpoint's recomputation before each recomputed
            step); ``stepper.t`` and ``stepper.num_steps`` are not advanced by a rollout.
            Matrices assembled once (the bilinear form's, an affine linear form's
            Jacobians) are reassembled when the data they read change.

    Raises:
        TypeError: ``stepper`` is neither stepper.
        ValueError: ``closure_interval`` other than 1, a bilinear form that reads
            ``u_previous``, an older state, a closure or the solution, a linear form that
            reads the solution, an implicit stepper with older states, an implicit closure
            that reads ``u_previous``, a local implicit
            closure frozen in the Jacobian, operands not affine in their coefficients, a
            bad ``checkpoint_every``, or a ``keep_states`` that is not a bool.

        Checked on every rank, agreed before any collective call.
    """

    def __init__(
        self,
        stepper: Stepper,
        *,
        checkpoint_every: int | None = None,
        keep_states: bool = True,
        before_step: Callable[[Stepper, float], None] | None = None,
    ):
        """Check the stepper and assemble the constant matrices (collective)."""
        if not isinstance(stepper, IMEXStepper | ImplicitStepper):
            raise TypeError(
                f"Rollout needs an IMEXStepper or an ImplicitStepper, got {type(stepper).__name__}."
            )
        comm = stepper.u.function_space.mesh.comm
        implicit = isinstance(stepper, ImplicitStepper)
        state = stepper.u if implicit else stepper.u_previous
        with rank_local(comm, "Building the rollout"):
            if not isinstance(keep_states, bool):
                raise ValueError(f"keep_states must be True or False, got {keep_states!r}.")
            closures, form = self._check(stepper, checkpoint_every)
            older = [] if implicit else stepper.older
            self._maps = [OperandMap(closure, state, older) for closure in closures]
            if isinstance(stepper, ImplicitStepper):
                self._check_implicit(stepper, closures)
        self.stepper = stepper
        self.comm = comm
        self.closures: list[AnyClosure] = closures
        self.checkpoint_every = None if checkpoint_every is None else int(checkpoint_every)
        self.keep_states = keep_states
        self.before_step = before_step
        self.num_owned = owned_size(stepper.u.function_space)
        # The operand maps are built for this geometry: run() refuses a mesh moved since.
        self._geometry = stepper.u.function_space.mesh.geometry.x.copy()
        #: Number of older levels ``u_{n-1}, ...`` of the state (the stepper's ``older``).
        self.num_older = len(stepper.older)
        self._step_adjoint: IMEXStep | ImplicitStep
        if isinstance(stepper, ImplicitStepper):
            self._step_adjoint = ImplicitStep(
                stepper.problem, stepper.u, stepper.u_previous, closures, form, self._maps
            )
        else:
            self._step_adjoint = IMEXStep(
                stepper.problem, stepper.u_previous, closures, form, stepper.older
            )

    @staticmethod
    def _check(stepper: Stepper, checkpoint_every: int | None) -> tuple[list[AnyClosure], ufl.Form]:
        """The closures and the UFL form of the step, or raise (rank-local, alike everywhere)."""
        if isinstance(stepper, IMEXStepper) and stepper.closure_interval != 1:
            raise ValueError(
                f"Rollout needs closure_interval=1 (closures updated every step), got "
                f"{stepper.closure_interval}."
            )
        if checkpoint_every is not None and not is_integer_at_least(checkpoint_every, 1):
            raise ValueError(
                f"checkpoint_every must be None or a positive integer, got {checkpoint_every!r}."
            )
        if isinstance(stepper, ImplicitStepper):
            form = stepper.problem.ufl_forms[0]
            if stepper.older:
                raise ValueError(
                    "A rollout of the implicit stepper does not support older states "
                    f"({len(stepper.older)} given): its adjoint follows u_n only. Use the "
                    "IMEX stepper for closures or schemes that read u_(n-1)."
                )
        else:
            a, form = stepper.problem.ufl_forms
            read_by_a = {id(c) for c in coefficients(a)}
            for function, what in (
                (stepper.u_previous, "u_previous"),
                (stepper.u, "the solution u"),
                *((f, f"the older state older[{j}]") for j, f in enumerate(stepper.older)),
            ):
                if id(function) in read_by_a:
                    raise ValueError(
                        f"The bilinear form reads {what} ('{function.name}'): a rollout "
                        "reuses one constant matrix. Move the term to the linear form "
                        "(explicit)."
                    )
            if extract_closures(a):
                raise ValueError(
                    "The bilinear form contains closures: a rollout reuses one constant "
                    "matrix. Put the closure terms in the linear form (IMEX)."
                )
            if any(c is stepper.u for c in coefficients(form)):
                raise ValueError(
                    f"The linear form reads the solution u ('{stepper.u.name}'); an IMEX "
                    "step reads the previous state u_previous only."
                )
        closures = extract_closures(form)
        for closure in typing.cast(list[AnyClosure], closures):
            try:
                closure.operand_matrix()
            except ValueError as err:
                raise ValueError(
                    f"Closure '{closure.name}': a rollout needs operands affine in their "
                    f"coefficients (u, grad(u), x, ...): {err}"
                ) from err
        return typing.cast(list[AnyClosure], closures), form

    def _check_implicit(self, stepper: ImplicitStepper, closures: list[AnyClosure]) -> None:
        """Implicit closures read ``u`` only, and the Jacobian holds their tangents."""
        for closure, operand_map in zip(closures, self._maps, strict=True):
            if any(c is stepper.u_previous for c in operand_map.coefficients):
                raise ValueError(
                    f"Closure '{closure.name}' of the implicit step reads u_previous; a "
                    "rollout of the implicit stepper supports closures of the unknown u only."
                )
        F, J = stepper.problem.ufl_forms
        try:
            check_jacobian(F, J, stepper.u)
        except ValueError as err:
            raise ValueError(
                "The implicit step's Jacobian misses closure tangents (frozen closures): "
                "the adjoint needs the exact Jacobian. Build the problem with the default "
                "J (dolfinx_mno.derivative(F, u))."
            ) from err

    # -- states ------------------------------------------------------------------------

    def initial_state(self) -> torch.Tensor:
        """The owned values of ``u_previous`` now, a new float64 CPU tensor."""
        return torch.from_numpy(self.stepper.u_previous.x.array[: self.num_owned].copy())

    def initial_older(self) -> list[torch.Tensor]:
        """The owned values of the stepper's older states now, ``[u_{-1}, u_{-2}, ...]``.

        New float64 CPU tensors (``[]`` for a stepper without older states). Read them,
        like :meth:`initial_state`, before a rollout: a rollout leaves the functions at
        the last state it computed.
        """
        return [torch.from_numpy(f.x.array[: self.num_owned].copy()) for f in self.stepper.older]

    def _check_older(self, older: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        """``older`` checked against the stepper's older states (rank-local)."""
        if older is None:
            if self.num_older:
                raise ValueError(
                    f"The stepper keeps {self.num_older} older state(s) u_(n-1), ...; give "
                    "their initial values, older=[u_(-1), ...] (rollout.initial_older() "
                    "reads the stepper's)."
                )
            return []
        older = list(older)
        if len(older) != self.num_older:
            raise ValueError(
                f"older has {len(older)} state(s); the stepper keeps {self.num_older} older "
                "state(s)."
            )
        for j, level in enumerate(older):
            self._check_state(level, f"older[{j}]")
        return older

    def run(
        self,
        u0: torch.Tensor,
        num_steps: int,
        *,
        older: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Advance ``num_steps`` steps from ``u0``, from the stepper's time (collective).

        Args:
            u0: The initial state, ``(num_owned,)`` float64 on the CPU; it may require
                grad.
            num_steps: The horizon ``k ≥ 1``.
            older: With a stepper that keeps older states (``older=`` of
                :class:`~dolfinx_mno.timestepping.IMEXStepper`), their initial values
                ``[u_{-1}, u_{-2}, ...]``, each like ``u0`` (e.g. from
                :meth:`initial_older`); required then, and ``None`` otherwise. The
                gradient follows them through the steps: ``u_n`` becomes the next step's
                ``u_{n-1}``.

        Returns:
            ``[u_1, ..., u_k]``, each ``(num_owned,)`` float64 on the CPU, with autograd
            history when ``u0`` or a model parameter requires grad.

        Raises:
            TypeError: ``u0`` (or an older state) is not a torch tensor (on every rank).
            ValueError: A ``u0`` of the wrong dtype, device or shape, or a bad
                ``num_steps`` (on every rank).
            RuntimeError: A linear solve did not converge; a model in training mode or
                recast since; a mesh that moved since the rollout was built (on every
                rank).
            ClosureEvaluationError: A model returned NaN/Inf values.
        """
        with rank_local(self.comm, "Starting the rollout"):
            self._check_state(u0, "u0")
            if not is_integer_at_least(num_steps, 1):
                raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
            num_steps = int(num_steps)
            levels = [u0, *self._check_older(older)]
            for closure in self.closures:
                if (reason := closure.model_state_error()) is not None:
                    raise RuntimeError(f"Closure '{closure.name}': {reason}.")
            if not np.array_equal(self.stepper.u.function_space.mesh.geometry.x, self._geometry):
                raise RuntimeError(
                    "The mesh moved since the rollout was built (its maps from dofs to the "
                    "closures' operands are built for one geometry): build a new Rollout."
                )
        same_everywhere(self.comm, "Starting the rollout", _SAME_ARGUMENTS, num_steps=num_steps)
        t0 = self.stepper.t  # each segment keeps its own: a later run may start elsewhere
        segment = self.checkpoint_every or num_steps
        checkpointed = self.checkpoint_every is not None and torch.is_grad_enabled()
        # The forward's states by step, for the recomputation (keep_states): filled by the
        # first pass of a segment, read by its second.
        known: dict[int, torch.Tensor] | None = {} if checkpointed and self.keep_states else None
        states: list[torch.Tensor] = []
        for start in range(0, num_steps, segment):
            count = min(segment, num_steps - start)
            last = start + count == num_steps  # its graph is the first one backward needs
            if checkpointed and not last:
                outputs = _CheckpointedSegment.apply(
                    self, start, count, known, t0, len(levels), *levels, *self._trainable()
                )
            else:
                outputs = self._segment(start, count, None, t0, *levels)
            states.extend(outputs)
            levels = self._shift(levels, outputs)
        return states

    def _trainable(self) -> list[torch.Tensor]:
        """The closures' trainable parameters, each once (the inputs of a segment)."""
        seen: dict[int, torch.Tensor] = {}
        for closure in self.closures:
            for parameter in closure.model.parameters():
                if parameter.requires_grad:
                    seen.setdefault(id(parameter), parameter)
        return list(seen.values())

    @staticmethod
    def _shift(levels: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The levels ``[u_n, u_{n-1}, ...]`` after the new states ``new`` (oldest first)."""
        return [*reversed(new), *levels][: len(levels)]

    def _check_state(self, state: typing.Any, name: str) -> None:
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(state).__name__}.")
        if state.dtype != torch.float64 or state.device.type != "cpu":
            raise ValueError(
                f"{name} must be a float64 tensor on the CPU, got {state.dtype} on {state.device}."
            )
        if tuple(state.shape) != (self.num_owned,):
            raise ValueError(
                f"{name} must have shape ({self.num_owned},) on this rank (its owned dofs), "
                f"got {tuple(state.shape)}."
            )

    def _segment(
        self,
        start: int,
        count: int,
        known: dict[int, torch.Tensor] | None,
        t0: float,
        *levels: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """The new states of steps ``start .. start + count - 1`` from ``[u_n, u_{n-1}, ...]``.

        ``known``: the states of the steps computed so far, filled here on a first pass and
        returned by the solve stages on a second (a checkpoint's recomputation). ``t0``:
        the time of the run's initial state.
        """
        states = []
        current = list(levels)
        for n in range(start, start + count):
            state = self._step(current, n, t0, None if known is None else known.get(n))
            if known is not None:
                known.setdefault(n, state.detach())  # shares the output's memory
            states.append(state)
            current = self._shift(current, [state])
        return tuple(states)

    def _prepare_step(self, t_new: float) -> None:
        """A step's time-dependent data: the time constant, then the hook (collective)."""
        if self.stepper.time is not None:
            self.stepper.time.value = t_new  # type: ignore[assignment]
        if self.before_step is not None:
            with rank_local(self.comm, "The before_step hook"):
                self.before_step(self.stepper, t_new)

    def _step(
        self, levels: Sequence[torch.Tensor], n: int, t0: float, known: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Step ``n`` from ``[u_n, u_{n-1}, ...]``: time and hook, then the step's stages.

        With ``known`` (the state this step gave before), the solve stage returns it
        instead of solving: the stages before it still run, with their graphs.
        """
        state = levels[0]
        t_new = t0 + (n + 1) * self.stepper.dt
        self._prepare_step(t_new)
        step = self._step_adjoint
        if isinstance(step, ImplicitStep):
            parameters = [p for c in self.closures for p in c.model.parameters() if p.requires_grad]
            prepare = self._prepare_step
            return typing.cast(
                torch.Tensor,
                ImplicitStepFunction.apply(step, t_new, known, prepare, state, *parameters),
            )
        stepper = typing.cast(IMEXStepper, self.stepper)
        if len(stepper.stages) > 1:  # each stage from the last one's state; u_n enters each sum
            known = None  # the stages' states are not kept: solve them again
        stage_state = state
        values: list[torch.Tensor] = []
        for stage, (a, b) in enumerate(stepper.stages):
            stage_levels = [stage_state, *levels[1:]]
            if stage == 0 or not stepper.hold_closures:  # else the values at u_n, held
                values = self._closure_values(stage_state, levels[1:])
            solved = typing.cast(
                torch.Tensor,
                IMEXStepFunction.apply(
                    step, t_new, known, self._prepare_step, *stage_levels, *values
                ),
            )
            stage_state = solved if (a, b) == (0.0, 1.0) else a * state + b * solved
        return stage_state

    def _closure_values(
        self, state: torch.Tensor, older: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The closures' values (graphs) at ``state``, with the older levels ``older``."""
        values = []
        for closure, operand_map in zip(self.closures, self._maps, strict=True):
            if not operand_map.reads_levels:  # the operands do not read u_n, u_(n-1), ...
                inputs = operand_map.apply(None)
            else:
                inputs = OperandFunction.apply(state, operand_map, *older)
            if isinstance(closure, NonlocalClosure):  # collective, agreed in its stages
                values.append(model_values(closure, inputs))
                continue
            with rank_local(self.comm, f"The model of closure '{closure.name}'"):
                values.append(model_values(closure, inputs))
        return values

    # -- the gradient --------------------------------------------------------------------

    # A gradient function: it differentiates whatever the caller's torch mode (no_grad).
    @torch.inference_mode(False)
    @torch.enable_grad()
    def gradient(
        self,
        u0: torch.Tensor,
        targets: Sequence[torch.Tensor | npt.ArrayLike],
        *,
        num_steps: int | None = None,
        closures: Sequence[ClosureBase] | None = None,
        initial_state: bool = False,
        target_interval: int = 1,
        older: Sequence[torch.Tensor] | None = None,
    ) -> RolloutGradient:
        """The gradient of :func:`rollout_loss` over ``num_steps`` steps (collective).

        The parameters' ``.grad`` are not touched; assign the returned gradients to them
        to take an optimiser step.

        Args:
            u0: The initial state, ``(num_owned,)`` float64 on the CPU.
            targets: Target states ``[t_1, ..., t_m]``, each ``(num_owned,)`` (this rank's
                owned dofs): ``t_j`` is the target after ``j × target_interval`` steps.
            num_steps: The horizon in steps, a multiple of ``target_interval``; by default
                ``len(targets) × target_interval``.
            closures: The closures whose model parameters to differentiate with respect to;
                by default every closure of the step. ``[]`` with ``initial_state=True``
                gives the initial-state gradient alone.
            initial_state: Also return ``∂loss/∂u_0``.
            target_interval: Steps between targets (filtered fine states are often kept
                at a coarser interval than the coarse step); the loss compares the states
                after ``target_interval, 2 target_interval, ...`` steps.
            older: The initial older states ``[u_{-1}, ...]`` of a stepper that keeps them
                (see :meth:`run`); constants of the gradient (``initial_state`` is
                ``∂loss/∂u_0`` with them held).

        Raises:
            TypeError: ``u0`` is not a torch tensor.
            ValueError: A ``u0`` of the wrong dtype, device or shape, a horizon longer than
                the targets (or not a multiple of ``target_interval``), targets of the
                wrong shape, a
                closure that is not in the step's linear form, a closure whose model has no
                trainable parameters, or nothing to differentiate. Raised on every rank.
        """
        with rank_local(self.comm, "Preparing the rollout gradient"):
            self._check_state(u0, "u0")
            interval = target_interval
            if not is_integer_at_least(interval, 1):
                raise ValueError(
                    f"target_interval must be a positive integer, got {target_interval!r}."
                )
            interval = int(interval)
            horizon = len(targets) * interval if num_steps is None else num_steps
            if not is_integer_at_least(horizon, 1):
                raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
            horizon = int(horizon)
            if horizon % interval:
                raise ValueError(
                    f"The horizon of {horizon} steps is not a multiple of target_interval = "
                    f"{interval}; the last step must have a target."
                )
            if horizon > len(targets) * interval:
                raise ValueError(
                    f"The horizon of {horizon} steps is longer than the {len(targets)} target "
                    f"states{f' every {interval} steps' if interval > 1 else ''}; give at "
                    f"least {horizon // interval} targets or a shorter num_steps."
                )
            used = targets[: horizon // interval]
            target_tensors = [self._target(t, i) for i, t in enumerate(used)]
            chosen = self.closures if closures is None else list(closures)
            parameters = [self._parameters(closure) for closure in chosen]
            if not chosen and not initial_state:
                raise ValueError("Nothing to differentiate: give closures or initial_state=True.")
        # Each rank's arguments are checked above on their own; a horizon or a set of
        # inputs that differs between ranks would leave them in different collectives.
        same_everywhere(
            self.comm,
            "Preparing the rollout gradient",
            _SAME_ARGUMENTS,
            num_steps=horizon,
            target_interval=interval,
            closures=[closure.name for closure in chosen],
            initial_state=bool(initial_state),
        )
        start = u0.detach().clone().requires_grad_(initial_state)
        # A rank-local stage of the backward pass (a model's VJP) that raises on some ranks
        # only is agreed on at the others' next collective stage (_mpi.collective_stages).
        with collective_stages(self.comm, BACKWARD_PASS):
            states = self.run(start, horizon, older=older)[interval - 1 :: interval]
            loss = squared_distance(states, target_tensors, self.comm)
            inputs = [p for group in parameters for p in group]
            inputs += [start] if initial_state else []
            gradients = list(torch.autograd.grad(loss, inputs, materialize_grads=True))
        initial = gradients.pop() if initial_state else None
        allreduce_gradients(gradients, self.comm)
        grouped = []
        for group in parameters:
            grouped.append(gradients[: len(group)])
            gradients = gradients[len(group) :]
        return RolloutGradient(float(loss.detach()), grouped, initial)

    def _target(self, target: torch.Tensor | npt.ArrayLike, index: int) -> torch.Tensor:
        tensor = torch.as_tensor(target, dtype=torch.float64)
        if tuple(tensor.shape) != (self.num_owned,):
            raise ValueError(
                f"Target {index} has shape {tuple(tensor.shape)}; a state on this rank has "
                f"shape ({self.num_owned},) (the owned dofs of u)."
            )
        return tensor

    def _parameters(self, closure: ClosureBase) -> list[torch.Tensor]:
        if not any(closure is c for c in self.closures):
            raise ValueError(
                f"Closure '{closure.name}' is not in the step's linear form; the rollout "
                f"differentiates its closures {[c.name for c in self.closures]}."
            )
        parameters: list[torch.Tensor] = [p for p in closure.model.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError(
                f"The model of closure '{closure.name}' has no trainable parameters; leave it "
                "out of closures= (closures=[] with initial_state=True differentiates with "
                "respect to the initial state only)."
            )
        return parameters


class _CheckpointedSegment(torch.autograd.Function):
    """A segment of steps whose graph is rebuilt in backward (checkpointing).

    Called as ``apply(rollout, start, count, known, t0, num_levels, *levels, *parameters)``.
    The forward runs the steps without a graph (an autograd function's forward runs without
    one), so the first pass costs what a forward rollout does. The backward runs them again
    with the graph, from the saved levels (and, with ``known``, the forward's states
    instead of solving), and takes the segment's VJP with respect to the levels and the
    models' parameters. The parameters are inputs so that the outputs depend on them even
    when no level requires grad. The recomputation is the forward again: the models must be
    deterministic, as closures require (evaluation mode).

    Every rank reaches this backward at the same point of the graph, so the collective
    stages of the recomputation and of its VJP run in the same order on every rank.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        rollout: Rollout,
        start: int,
        count: int,
        known: dict[int, torch.Tensor] | None,
        t0: float,
        num_levels: int,
        *inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """The segment's states, without a graph (see the class docstring)."""
        ctx.rollout, ctx.start, ctx.count, ctx.known = rollout, start, count, known
        ctx.t0, ctx.parameters = t0, inputs[num_levels:]
        ctx.save_for_backward(*inputs[:num_levels])
        return rollout._segment(start, count, known, t0, *inputs[:num_levels])

    @staticmethod
    def backward(ctx, *sensitivities: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        """The segment's VJP, from its steps run again with their graph."""
        needs = ctx.needs_input_grad[6:]  # [*levels, *parameters]
        levels = [
            level.detach().requires_grad_(need)
            for level, need in zip(ctx.saved_tensors, needs, strict=False)
        ]
        with torch.enable_grad():
            states = ctx.rollout._segment(ctx.start, ctx.count, ctx.known, ctx.t0, *levels)
        wanted = [x for x, need in zip([*levels, *ctx.parameters], needs, strict=True) if need]
        pairs = [(s, g) for s, g in zip(states, sensitivities, strict=True) if s.requires_grad]
        gradients = iter(
            torch.autograd.grad(
                [s for s, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
            if pairs
            else [None] * len(wanted)
        )
        return None, None, None, None, None, None, *(next(gradients) if n else None for n in needs)


# -- losses and reductions -----------------------------------------------------------------


class _AllreduceSum(torch.autograd.Function):
    """``Σ_ranks local``; its gradient with respect to each rank's ``local`` is 1."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:  # type: ignore[override]
        return torch.tensor(comm.allreduce(float(local), op=MPI.SUM), dtype=local.dtype)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return gradient, None


def rollout_loss(
    states: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor | npt.ArrayLike],
    comm: MPI.Comm,
) -> torch.Tensor:
    """``Σ_n ‖u_n − t_n‖²`` over every rank's owned dofs (collective).

    Args:
        states: ``[u_1, ..., u_k]`` from :meth:`Rollout.run`, each ``(num_owned,)``.
        targets: ``[t_1, ..., t_k]``, tensors or arrays of the same shapes (compared in
            float64; constants of the loss).
        comm: The mesh communicator.

    Returns:
        A float64 scalar tensor, the same on every rank; its gradient flows to each rank's
        own states.

    Raises:
        ValueError: Another number of targets than states, or a target whose shape is not
            its state's (which would broadcast silently); raised on every rank.
    """
    with rank_local(comm, "Computing the rollout loss", ValueError):
        if len(states) != len(targets):
            raise ValueError(f"{len(states)} states but {len(targets)} targets.")
        compared = []
        for n, (state, target) in enumerate(zip(states, targets, strict=True)):
            if isinstance(target, torch.Tensor):
                value = target.detach().to(device=state.device, dtype=torch.float64)
            else:
                value = torch.as_tensor(np.asarray(target, dtype=np.float64), device=state.device)
            if tuple(value.shape) != tuple(state.shape):
                raise ValueError(
                    f"Target {n} has shape {tuple(value.shape)} but its state has "
                    f"{tuple(state.shape)} (this rank's owned dofs)."
                )
            compared.append(value)
    return squared_distance(states, compared, comm)


def squared_distance(
    states: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], comm: MPI.Comm
) -> torch.Tensor:
    """:func:`rollout_loss` of checked float64 tensor targets (collective: one allreduce).

    For callers whose targets are checked already (:meth:`Rollout.gradient`, the windows
    of :func:`dolfinx_mno.training.fit_rollout`): no check and no agreement per call.
    """
    local = torch.zeros((), dtype=torch.float64)
    for state, target in zip(states, targets, strict=True):
        local = local + ((state - target) ** 2).sum()
    return typing.cast(torch.Tensor, _AllreduceSum.apply(local, comm))


def allreduce_gradients(gradients: Sequence[torch.Tensor], comm: MPI.Comm) -> None:
    """Sum gradients over the ranks, in place (collective: one ``Allreduce``).

    Each rank's backward covers its own quadrature points, so a parameter's gradient is
    the sum of the ranks' gradients. The tensors are packed into one float64 buffer
    (copied to the CPU for a GPU tensor; complex tensors as their real and imaginary
    parts) and written back in their own dtype and device.
    Every rank must pass tensors of the same shapes in the same order. This helper is
    self-contained (mpi4py only; ``torch.distributed`` need not be initialised).

    Args:
        gradients: The tensors to sum, e.g. ``[p.grad for p in model.parameters()]``.
        comm: The communicator.
    """
    # A complex tensor (a Fourier layer's weights) travels as its real and imaginary parts.
    parts = [torch.view_as_real(g.detach()) if g.is_complex() else g.detach() for g in gradients]
    sizes = [p.numel() for p in parts]
    buffer = np.zeros(sum(sizes), dtype=np.float64)
    position = 0
    for part, size in zip(parts, sizes, strict=True):
        buffer[position : position + size] = part.reshape(-1).cpu().double().numpy()
        position += size
    comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    position = 0
    for gradient, part, size in zip(gradients, parts, sizes, strict=True):
        summed = torch.from_numpy(buffer[position : position + size]).reshape(part.shape)
        if gradient.is_complex():
            summed = torch.view_as_complex(summed.contiguous())
        with torch.no_grad():
            gradient.copy_(summed)
        position += size
