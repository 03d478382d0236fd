"""Differentiable rollouts: gradients through IMEX time steps that contain closures.

A rollout of ``k`` steps of an :class:`~dolfinx_mno.timestepping.IMEXStepper` is built as
a torch graph, so that torch autograd gives the gradient of a scalar loss of the states
with respect to the closures' parameters ``θ`` (and the initial state) by the *discrete
adjoint* of the scheme. Step ``n`` is three stages, each with its own backward::

    x_n     = P u_n + x₀                 operand map       (_OperandMap: Pᵀ g, reverse scatter)
    c_n     = model(x_n)                 the closure model (torch autograd: VJP and dθ)
    u_{n+1} = A⁻¹ b(u_n, c_n)            the IMEX solve    (_StepSolve: μ = A⁻ᵀ g, then
                                                            (∂b/∂u_n)ᵀ μ and (∂b/∂c_n)ᵀ μ)

``P`` is the closure's constant operand matrix
(:meth:`~dolfinx_mno.Closure.operand_matrix`, from the owned and ghost dofs of the
operand coefficients to the model inputs at the owned quadrature points), ``A`` the
step's constant matrix, whose factorisation (or preconditioner) the transposed solves
reuse (``KSPSolveTranspose``), and ``∂b/∂u_n``, ``∂b/∂c_n`` the Jacobians of the
right-hand side with its Dirichlet rows zeroed, assembled once as PETSc matrices when the
linear form is affine in ``u_n`` and the closures (else at each step's state in backward).
See ``docs/adjoint.md`` for the method, and why it is not dolfinx-adjoint.

Tensors at the boundary are float64 on the CPU: a state is the **owned** dofs of ``u``
(``index_map.size_local * bs`` entries), closure values are the owned cells' values in the
closure's dof order (:func:`~dolfinx_mno.quadrature.owned_dofs`). The model runs in its own
dtype and on its own device. Each rank's graph covers its own dofs and points; the
collective PETSc operations in backward run in the same order on every rank because every
rank builds the same graph. Parameter gradients are sums over ranks
(:func:`allreduce_gradients`), so they do not depend on the number of ranks.

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
from petsc4py import PETSc

import dolfinx.fem.petsc as _fem_petsc
import numpy as np
import numpy.typing as npt
import torch
import torch.utils.checkpoint
import ufl
from dolfinx import fem, la
from ufl.algorithms import expand_derivatives

from dolfinx_mno._mpi import agree, rank_local
from dolfinx_mno.base import ClosureBase
from dolfinx_mno.closure import Closure, ClosureEvaluationError, extract_closures
from dolfinx_mno.quadrature import owned_dofs
from dolfinx_mno.timestepping import IMEXStepper

__all__ = ["Rollout", "RolloutGradient", "allreduce_gradients", "rollout_loss"]

Array = npt.NDArray[np.float64]


def _owned_size(space: fem.FunctionSpace) -> int:
    """Number of owned entries of a function's ``x.array`` (owned dofs × block size)."""
    return int(space.dofmap.index_map.size_local * space.dofmap.index_map_bs)


def _num_cells(function: fem.Function) -> int:
    """Number of cells this rank owns on ``function``'s mesh."""
    topology = function.function_space.mesh.topology
    return int(topology.index_map(topology.dim).size_local)


def _coefficients(form: ufl.Form | None) -> list[typing.Any]:
    return [] if form is None or form.empty() else list(form.coefficients())


# -- stage 1: operands ---------------------------------------------------------------------


class _OperandMap:
    """``x = P [dofs] + x₀`` for one closure, with ``u_n``'s block taken from a tensor.

    The other coefficients of the operands are read at each call (they are constants of
    the rollout, e.g. data set by the ``before_step`` hook).
    """

    def __init__(self, closure: Closure, u_previous: fem.Function):
        operator = closure.operand_matrix()
        self.matrix = operator.matrix
        self.transpose = operator.matrix.t().to_sparse_csr()
        self.offset = torch.from_numpy(operator.offset.reshape(-1).copy())
        self.shape = operator.offset.shape
        self.coefficients = operator.coefficients
        self.column_offsets = operator.column_offsets
        self.block: int | None = next(
            (i for i, c in enumerate(self.coefficients) if c is u_previous), None
        )
        space = u_previous.function_space
        self.num_owned = _owned_size(space)
        self.scratch = la.vector(space.dofmap.index_map, space.dofmap.index_map_bs)

    def dofs(self, u_owned: Array | None) -> torch.Tensor:
        """The concatenated coefficient arrays, ``u_n``'s owned+ghost values in its block."""
        dofs = np.empty(self.column_offsets[-1])
        for i, coefficient in enumerate(self.coefficients):
            start, stop = self.column_offsets[i], self.column_offsets[i + 1]
            if i == self.block:
                assert u_owned is not None
                self.scratch.array[: self.num_owned] = u_owned
                self.scratch.scatter_forward()
                dofs[start:stop] = self.scratch.array
            else:
                dofs[start:stop] = coefficient.x.array
        return torch.from_numpy(dofs)

    def apply(self, u_owned: Array | None) -> torch.Tensor:
        """The model inputs ``(num_points, num_inputs)`` for the state ``u_owned``."""
        values = self.matrix @ self.dofs(u_owned) + self.offset
        return values.reshape(self.shape)

    def pull_back(self, sensitivity: torch.Tensor) -> torch.Tensor:
        """``∂x/∂u_nᵀ g``: ``Pᵀ g`` on ``u_n``'s block, ghosts summed into their owners."""
        assert self.block is not None
        full = self.transpose @ sensitivity.reshape(-1)
        start, stop = self.column_offsets[self.block], self.column_offsets[self.block + 1]
        self.scratch.array[:] = full[start:stop].numpy()
        self.scratch.scatter_reverse(la.InsertMode.add)
        return torch.from_numpy(self.scratch.array[: self.num_owned].copy())


class _OperandFunction(torch.autograd.Function):
    """Autograd stage of :class:`_OperandMap` (``u_n`` owned → model inputs)."""

    @staticmethod
    def forward(ctx, u_owned: torch.Tensor, operand_map: _OperandMap) -> torch.Tensor:  # type: ignore[override]
        ctx.operand_map = operand_map
        return operand_map.apply(u_owned.detach().numpy())

    @staticmethod
    def backward(ctx, sensitivity: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ctx.operand_map.pull_back(sensitivity.contiguous()), None


# -- stage 3: the step's solve -------------------------------------------------------------


class _StepSolver:
    """One IMEX solve ``A u_{n+1} = b(u_n, c_n)`` and its adjoint.

    ``b = R L(u_n, c) + (lifting and Dirichlet values)``, ``R`` zeroing the Dirichlet rows,
    so ``∂b/∂u_n = R B_u`` and ``∂b/∂c = R B_c`` with ``B_u``, ``B_c`` the matrices of
    ``∂L/∂u_n`` and ``∂L/∂c``: the adjoint is ``μ = A⁻ᵀ g``, ``R μ``, then ``B_uᵀ (R μ)``
    and ``B_cᵀ (R μ)``.
    """

    def __init__(self, stepper: IMEXStepper, closures: Sequence[Closure], L: ufl.Form):
        problem = stepper.problem
        self.problem = problem
        self.u_previous = stepper.u_previous
        self.closures = list(closures)
        self.comm = stepper.u.function_space.mesh.comm
        self.num_owned = _owned_size(stepper.u.function_space)
        self.value_dofs = [owned_dofs(c.function_space, _num_cells(c)) for c in self.closures]
        unknowns: list[fem.Function] = [self.u_previous, *self.closures]
        forms = [
            expand_derivatives(
                ufl.derivative(L, unknown, ufl.TrialFunction(unknown.function_space))
            )
            for unknown in unknowns
        ]
        depends = {id(c) for form in forms for c in _coefficients(form)}
        #: Whether ``L`` is affine in ``u_n`` and the closures: Jacobians assembled once.
        self.affine = not any(id(unknown) in depends for unknown in unknowns)
        self.forms = [None if form.empty() else fem.form(form) for form in forms]
        self.jacobians = [
            None if form is None else _fem_petsc.assemble_matrix(form) for form in self.forms
        ]
        for matrix in self.jacobians:
            if matrix is not None:
                matrix.assemble()
        # Each gradient's owned entries: the Jacobian's column layout.
        self.outputs = [None if m is None else m.createVecs()[0] for m in self.jacobians]
        self.sizes = [
            self.num_owned,
            *(c.x.array[d].size for c, d in zip(self.closures, self.value_dofs, strict=True)),
        ]
        problem.assemble_operator()
        self.rhs = problem.b.duplicate()
        self.adjoint_solution = problem.b.duplicate()

    def _set_state(self, u_n: Array, values: Sequence[Array]) -> None:
        """Write ``u_n`` into ``u_previous`` and the closure values into the closures."""
        self.u_previous.x.array[: self.num_owned] = u_n
        self.u_previous.x.scatter_forward()
        for closure, dofs, value in zip(self.closures, self.value_dofs, values, strict=True):
            closure.x.array[dofs] = value
            closure.x.scatter_forward()

    def _check(self, reason: typing.Any, what: str) -> None:
        if int(reason) <= 0:  # the same on every rank: a KSP's reason is collective
            raise RuntimeError(f"The {what} did not converge (KSP reason {reason}).")

    def solve(self, u_n: Array, values: Sequence[Array], t_new: float) -> Array:
        """``u_{n+1}`` (owned) from ``u_n`` and the closure values (collective)."""
        bad = [
            c.name for c, v in zip(self.closures, values, strict=True) if not np.isfinite(v).all()
        ]
        agree(
            self.comm,
            f"the model of closure(s) {bad} returned NaN/Inf values" if bad else None,
            f"The rollout step to t = {t_new:g}",
            ClosureEvaluationError,
        )
        self._set_state(u_n, values)
        problem = self.problem
        problem.assemble_rhs()
        problem.solver.solve(problem.b, problem.x)
        self._check(
            problem.solver.getConvergedReason(), f"linear solve of the step to t = {t_new:g}"
        )
        problem.x.ghostUpdate(addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)  # type: ignore
        _fem_petsc.assign(problem.x, problem.u)  # type: ignore[arg-type]
        return np.array(problem.x.array_r[: self.num_owned])

    def adjoint(
        self, sensitivity: Array, state: tuple[Array, Sequence[Array]] | None
    ) -> list[torch.Tensor]:
        """``[∂J/∂u_n, ∂J/∂c_1, ...]`` from ``g = ∂J/∂u_{n+1}`` (collective).

        Args:
            sensitivity: ``g``, the owned entries.
            state: ``(u_n, closure values)`` of the step, to assemble the Jacobians at
                (``None`` when ``L`` is affine: they were assembled once).
        """
        self.rhs.array_w[:] = sensitivity
        solver = self.problem.solver
        solver.solveTranspose(self.rhs, self.adjoint_solution)
        self._check(solver.getConvergedReason(), "transposed (adjoint) solve")
        _fem_petsc.set_bc(self.adjoint_solution, list(self.problem.bcs or []), alpha=0.0)
        if state is not None:
            self._set_state(*state)
            for form, matrix in zip(self.forms, self.jacobians, strict=True):
                if matrix is not None:
                    matrix.zeroEntries()
                    _fem_petsc.assemble_matrix(matrix, form)
                    matrix.assemble()
        gradients = []
        for i, (matrix, output) in enumerate(zip(self.jacobians, self.outputs, strict=True)):
            if matrix is None:
                gradients.append(torch.zeros(self.sizes[i], dtype=torch.float64))
                continue
            assert output is not None
            matrix.multTranspose(self.adjoint_solution, output)
            owned = output.array_r
            gradient = owned if i == 0 else owned[self.value_dofs[i - 1]]
            gradients.append(torch.from_numpy(np.array(gradient)))
        return gradients


class _StepFunction(torch.autograd.Function):
    """Autograd stage of :class:`_StepSolver` (``u_n``, closure values → ``u_{n+1}``)."""

    @staticmethod
    def forward(
        ctx, solver: _StepSolver, t_new: float, u_n: torch.Tensor, *values: torch.Tensor
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.solver = solver
        if not solver.affine:
            ctx.save_for_backward(u_n, *values)
        arrays = [v.detach().numpy() for v in values]
        return torch.from_numpy(solver.solve(u_n.detach().numpy(), arrays, t_new))

    @staticmethod
    def backward(ctx, sensitivity: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        solver: _StepSolver = ctx.solver
        state = None
        if not solver.affine:
            u_n, *values = (t.detach().numpy() for t in ctx.saved_tensors)
            state = (u_n, values)
        gradients = solver.adjoint(sensitivity.contiguous().numpy(), state)
        return None, None, *gradients


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
    r"""Differentiable rollouts of an IMEX time stepper with local closures.

    :meth:`run` advances ``k`` steps of ``stepper`` as a torch graph (see the module
    docstring); :meth:`gradient` runs it and returns the gradient of :func:`rollout_loss`.
    The stepper's time, step count and history are not changed; the problem's functions
    (``u``, ``u_previous``, the closure values, the time constant) are left at the last
    state that was computed (in a checkpointed backward: a recomputed one).

    Args:
        stepper: The IMEX stepper (``closure_interval=1``). Its linear problem's bilinear
            form must be constant (no ``u_previous``, no closures: the matrix and its
            factorisation are reused by every step and every transposed solve); its linear
            form may contain local :class:`~dolfinx_mno.Closure`\ s whose operands are
            affine in their coefficients (``u_n``, ``grad(u_n)``, ``x``, other fixed
            coefficients). A linear form nonlinear in ``u_n`` or a closure is supported:
            its Jacobians are then assembled at each step's state in backward.
        checkpoint_every: Keep the autograd graph of only one segment of this many steps
            at a time (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant): the
            model's activations of the other segments are dropped and recomputed in
            backward, one more forward in all. ``None`` (the default) keeps every step's.
        before_step: Called as ``before_step(stepper, t_new)`` before each step, as in
            :meth:`~dolfinx_mno.timestepping.IMEXStepper.step` (time-dependent data; not
            differentiated). The stepper's time constant, if any, is set first.

    Raises:
        TypeError: ``stepper`` is not an :class:`IMEXStepper` (the implicit stepper is not
            supported yet).
        ValueError: ``closure_interval`` other than 1, a bilinear form that reads
            ``u_previous``, a closure or the solution, a linear form that reads the
            solution, operands not affine in their coefficients, or a bad
            ``checkpoint_every``.
        NotImplementedError: A :class:`~dolfinx_mno.NonlocalClosure` in the forms.

        Checked on every rank, agreed before any collective call.
    """

    def __init__(
        self,
        stepper: IMEXStepper,
        *,
        checkpoint_every: int | None = None,
        before_step: Callable[[IMEXStepper, float], None] | None = None,
    ):
        """Check the stepper and assemble the constant matrices (collective)."""
        if not isinstance(stepper, IMEXStepper):
            raise TypeError(
                f"Rollout needs an IMEXStepper, got {type(stepper).__name__}; rollouts of the "
                "implicit (Newton) stepper are not supported yet."
            )
        comm = stepper.u.function_space.mesh.comm
        with rank_local(comm, "Building the rollout"):
            closures, L = self._check(stepper, checkpoint_every)
            self._maps = [_OperandMap(closure, stepper.u_previous) for closure in closures]
        self.stepper = stepper
        self.comm = comm
        self.closures: list[Closure] = closures
        self.checkpoint_every = checkpoint_every
        self.before_step = before_step
        self._solver = _StepSolver(stepper, closures, L)
        self._t0 = stepper.t

    @staticmethod
    def _check(
        stepper: IMEXStepper, checkpoint_every: int | None
    ) -> tuple[list[Closure], ufl.Form]:
        """The closures and the UFL linear form, or raise (rank-local, the same everywhere)."""
        if stepper.closure_interval != 1:
            raise ValueError(
                f"Rollout needs closure_interval=1 (closures updated every step), got "
                f"{stepper.closure_interval}."
            )
        if checkpoint_every is not None and (
            not isinstance(checkpoint_every, int) or checkpoint_every < 1
        ):
            raise ValueError(
                f"checkpoint_every must be None or a positive integer, got {checkpoint_every!r}."
            )
        problem = stepper.problem
        a, L = problem.ufl_forms
        read_by_a = {id(c) for c in _coefficients(a)}
        for function, what in ((stepper.u_previous, "u_previous"), (stepper.u, "the solution u")):
            if id(function) in read_by_a:
                raise ValueError(
                    f"The bilinear form reads {what} ('{function.name}'): a rollout reuses one "
                    "constant matrix. Move the term to the linear form (explicit)."
                )
        if extract_closures(a):
            raise ValueError(
                "The bilinear form contains closures: a rollout reuses one constant matrix. "
                "Put the closure terms in the linear form (IMEX)."
            )
        if any(c is stepper.u for c in _coefficients(L)):
            raise ValueError(
                f"The linear form reads the solution u ('{stepper.u.name}'); an IMEX step "
                "reads the previous state u_previous only."
            )
        closures = extract_closures(L)
        nonlocal_ = [c.name for c in closures if not isinstance(c, Closure)]
        if nonlocal_:
            raise NotImplementedError(
                f"Rollouts support local closures only; {nonlocal_} are not (non-local "
                "closures are not supported yet)."
            )
        for closure in typing.cast(list[Closure], closures):
            try:
                closure.operand_matrix()
            except ValueError as err:
                raise ValueError(
                    f"Closure '{closure.name}': a rollout needs operands affine in their "
                    f"coefficients (u, grad(u), x, ...): {err}"
                ) from err
        return typing.cast(list[Closure], closures), L

    # -- states ------------------------------------------------------------------------

    @property
    def num_owned(self) -> int:
        """Number of entries of a state on this rank (owned dofs × block size)."""
        return self._solver.num_owned

    def initial_state(self) -> torch.Tensor:
        """The owned values of ``u_previous`` now, a new float64 CPU tensor."""
        return torch.from_numpy(self.stepper.u_previous.x.array[: self.num_owned].copy())

    def run(self, u0: torch.Tensor, num_steps: int) -> list[torch.Tensor]:
        """Advance ``num_steps`` steps from ``u0``, from the stepper's time (collective).

        Args:
            u0: The initial state, ``(num_owned,)`` float64 on the CPU; it may require
                grad.
            num_steps: The horizon ``k ≥ 1``.

        Returns:
            ``[u_1, ..., u_k]``, each ``(num_owned,)`` float64 on the CPU, with autograd
            history when ``u0`` or a model parameter requires grad.

        Raises:
            ValueError: A bad ``u0`` or ``num_steps`` (on every rank).
            RuntimeError: A linear solve did not converge.
            ClosureEvaluationError: A model returned NaN/Inf values.
        """
        with rank_local(self.comm, "Starting the rollout"):
            self._check_state(u0, "u0")
            if not isinstance(num_steps, int) or num_steps < 1:
                raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
        self._t0 = self.stepper.t
        segment = self.checkpoint_every or num_steps
        states: list[torch.Tensor] = []
        state = u0
        for start in range(0, num_steps, segment):
            count = min(segment, num_steps - start)
            if self.checkpoint_every is not None and torch.is_grad_enabled():
                outputs = torch.utils.checkpoint.checkpoint(
                    self._segment, state, start, count, use_reentrant=False
                )
            else:
                outputs = self._segment(state, start, count)
            states.extend(outputs)
            state = outputs[-1]
        return states

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

    def _segment(self, state: torch.Tensor, start: int, count: int) -> tuple[torch.Tensor, ...]:
        """Steps ``start .. start + count - 1`` from ``state``; returns their new states."""
        states = []
        for n in range(start, start + count):
            state = self._step(state, n)
            states.append(state)
        return tuple(states)

    def _step(self, state: torch.Tensor, n: int) -> torch.Tensor:
        """Step ``n``: time and hook, operands, models, solve."""
        t_new = self._t0 + (n + 1) * self.stepper.dt
        if self.stepper.time is not None:
            self.stepper.time.value = t_new  # type: ignore[assignment]
        if self.before_step is not None:
            with rank_local(self.comm, "The before_step hook"):
                self.before_step(self.stepper, t_new)
        values = []
        for closure, operand_map in zip(self.closures, self._maps, strict=True):
            if operand_map.block is None:  # the operands do not read u_n
                inputs = operand_map.apply(None)
            else:
                inputs = _OperandFunction.apply(state, operand_map)
            model = closure.model
            outputs = model(inputs.to(device=closure.device, dtype=closure.model_dtype))
            values.append(outputs.to(device="cpu", dtype=torch.float64).reshape(-1))
        return typing.cast(torch.Tensor, _StepFunction.apply(self._solver, t_new, state, *values))

    # -- the gradient --------------------------------------------------------------------

    def gradient(
        self,
        u0: torch.Tensor,
        targets: Sequence[torch.Tensor | npt.ArrayLike],
        *,
        num_steps: int | None = None,
        closures: Sequence[ClosureBase] | None = None,
        initial_state: bool = False,
    ) -> RolloutGradient:
        """The gradient of :func:`rollout_loss` over ``num_steps`` steps (collective).

        The parameters' ``.grad`` are not touched; assign the returned gradients to them
        to take an optimiser step.

        Args:
            u0: The initial state, ``(num_owned,)`` float64 on the CPU.
            targets: Target states ``[t_1, ..., t_m]``, each ``(num_owned,)`` (this rank's
                owned dofs), ``m ≥ num_steps``.
            num_steps: The horizon; by default ``len(targets)``.
            closures: The closures whose model parameters to differentiate with respect to;
                by default every closure of the step. ``[]`` with ``initial_state=True``
                gives the initial-state gradient alone.
            initial_state: Also return ``∂loss/∂u_0``.

        Raises:
            ValueError: A horizon longer than the targets, targets of the wrong shape, a
                closure that is not in the step's linear form, a closure whose model has no
                trainable parameters, or nothing to differentiate. Raised on every rank.
        """
        with rank_local(self.comm, "Preparing the rollout gradient"):
            horizon = len(targets) if num_steps is None else num_steps
            if horizon > len(targets):
                raise ValueError(
                    f"The horizon of {horizon} steps is longer than the {len(targets)} target "
                    f"states; give at least {horizon} targets or a shorter num_steps."
                )
            target_tensors = [self._target(t, i) for i, t in enumerate(targets[:horizon])]
            chosen = self.closures if closures is None else list(closures)
            parameters = [self._parameters(closure) for closure in chosen]
            if not chosen and not initial_state:
                raise ValueError("Nothing to differentiate: give closures or initial_state=True.")
        start = u0.detach().clone().requires_grad_(initial_state)
        states = self.run(start, horizon)
        loss = rollout_loss(states, target_tensors, self.comm)
        inputs = [p for group in parameters for p in group] + ([start] if initial_state else [])
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
    states: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], comm: MPI.Comm
) -> torch.Tensor:
    """``Σ_n ‖u_n − t_n‖²`` over every rank's owned dofs (collective: one allreduce).

    Args:
        states: ``[u_1, ..., u_k]`` from :meth:`Rollout.run`, each ``(num_owned,)``.
        targets: ``[t_1, ..., t_k]``, the same shapes (float64).
        comm: The mesh communicator.

    Returns:
        A float64 scalar tensor, the same on every rank; its gradient flows to each rank's
        own states.
    """
    if len(states) != len(targets):
        raise ValueError(f"{len(states)} states but {len(targets)} targets.")
    local = torch.zeros((), dtype=torch.float64)
    for state, target in zip(states, targets, strict=True):
        local = local + ((state - target) ** 2).sum()
    return typing.cast(torch.Tensor, _AllreduceSum.apply(local, comm))


def allreduce_gradients(gradients: Sequence[torch.Tensor], comm: MPI.Comm) -> None:
    """Sum gradients over the ranks, in place (collective: one ``Allreduce``).

    Each rank's backward covers its own quadrature points, so a parameter's gradient is
    the sum of the ranks' gradients. The tensors are packed into one float64 buffer
    (copied to the CPU for a GPU tensor) and written back in their own dtype and device.
    Every rank must pass tensors of the same shapes in the same order. This helper is
    self-contained (mpi4py only; ``torch.distributed`` need not be initialised).

    Args:
        gradients: The tensors to sum, e.g. ``[p.grad for p in model.parameters()]``.
        comm: The communicator.
    """
    sizes = [g.numel() for g in gradients]
    buffer = np.zeros(sum(sizes), dtype=np.float64)
    position = 0
    for gradient, size in zip(gradients, sizes, strict=True):
        buffer[position : position + size] = gradient.detach().reshape(-1).cpu().double().numpy()
        position += size
    comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    position = 0
    for gradient, size in zip(gradients, sizes, strict=True):
        summed = torch.from_numpy(buffer[position : position + size]).reshape(gradient.shape)
        with torch.no_grad():
            gradient.copy_(summed)
        position += size
