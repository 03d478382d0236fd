"""The stages of a differentiable time step and their adjoints (used by :mod:`.rollout`).

Each stage is a :class:`torch.autograd.Function` whose backward is the transpose of its
forward, in the order the data flows:

1. :class:`OperandMap` / :class:`OperandFunction`: a state → a closure's model inputs,
   ``x = P u + x₀`` (the closure's constant operand matrix); backward ``Pᵀ g``, ghost
   entries summed into their owners.
2. The closure model: plain torch (autograd gives its VJP and the parameter gradients).
3. :class:`IMEXStep` / :class:`IMEXStepFunction`: ``u_{n+1} = A⁻¹ b(u_n, c_n)``; backward
   ``μ = A⁻ᵀ g`` with the kept factorisation, then ``(∂b/∂u_n)ᵀ μ`` and ``(∂b/∂c_n)ᵀ μ``.
   :class:`ImplicitStep` / :class:`ImplicitStepFunction`: ``F(u_{n+1}; u_n, c(u_{n+1}))
   = 0`` solved by Newton's method; backward at the converged state, ``λ = J⁻ᵀ g`` with the
   exact Jacobian (closure tangents included), then ``−(∂F/∂u_n)ᵀ λ`` and, through the
   model's VJP at the converged operands, the parameter gradients. A non-local closure
   is frozen in the assembled Jacobian ``A``; ``λ`` then comes from GMRES on the shell
   ``Jᵀ = Aᵀ + Dᵀ Bᵀ`` (``Dᵀ`` a torch VJP through :mod:`dolfinx_mno.nonlocal_adjoint`'s
   stages), preconditioned by the Newton solver's preconditioner transposed.

Tensors are float64 on the CPU and hold this rank's **owned** entries; every stage is
collective in forward and backward (scatters, assembly, solves), and every rank runs the
same stages in the same order.
"""

from __future__ import annotations

import typing
import weakref
from collections.abc import Sequence

from petsc4py import PETSc

import dolfinx.fem.petsc as _fem_petsc
import numpy as np
import numpy.typing as npt
import torch
import ufl
from dolfinx import fem, la
from ufl.algorithms import expand_derivatives

from dolfinx_mno._mpi import BACKWARD_PASS, agree, stage_entry
from dolfinx_mno.closure import Closure, ClosureEvaluationError
from dolfinx_mno.nonlocal_adjoint import nonlocal_values
from dolfinx_mno.nonlocal_closure import NonlocalClosure
from dolfinx_mno.petsc import FormData, LinearProblem, NonlinearProblem

__all__ = [
    "IMEXStep",
    "IMEXStepFunction",
    "ImplicitStep",
    "ImplicitStepFunction",
    "OperandFunction",
    "OperandMap",
    "owned_size",
]

Array = npt.NDArray[np.float64]
#: ``prepare(t_new)``: sets a step's time-dependent data (a rollout's time constant and
#: ``before_step`` hook), run again before the step's adjoint, which reassembles.
Prepare = typing.Callable[[float], None]


def owned_size(space: fem.FunctionSpace) -> int:
    """Number of owned entries of a function's ``x.array`` (owned dofs × block size)."""
    return int(space.dofmap.index_map.size_local * space.dofmap.index_map_bs)


def coefficients(form: ufl.Form | None) -> list[typing.Any]:
    """The coefficients of a UFL form (none for ``None`` or an empty form)."""
    return [] if form is None or form.empty() else list(form.coefficients())


def _check_reason(reason: typing.Any, what: str) -> None:
    if int(reason) <= 0:  # the same on every rank: a KSP's or SNES's reason is collective
        raise RuntimeError(f"The {what} did not converge (reason {int(reason)}).")


# -- stage 1: operands ---------------------------------------------------------------------


class OperandMap:
    """``x = P [dofs] + x₀`` for one closure, with the blocks of the state's levels from tensors.

    Args:
        closure: The closure (operands affine in their coefficients); for a
            :class:`~dolfinx_mno.NonlocalClosure` the rows are its grid samples on this rank.
        state: The function whose values the tensor holds (``u_previous`` for IMEX, ``u``
            for implicit steps); the closure's other coefficients are read at each call.
        older: The functions of the older levels ``u_{n-1}, ...`` (a stepper's ``older``),
            whose values also come from tensors.

    Attributes:
        blocks: For each level (``state``, then ``older``), its position among the operand
            matrix's coefficients, or ``None`` if the operands do not read it.
        block: ``blocks[0]``, the position of ``state``.
        shape: ``(num_points, num_inputs)`` of the model input on this rank.
    """

    def __init__(
        self,
        closure: Closure | NonlocalClosure,
        state: fem.Function,
        older: Sequence[fem.Function] = (),
    ):
        operator = closure.operand_matrix()
        self.matrix = operator.matrix
        self.transpose = operator.matrix.t().to_sparse_csr()
        self.offset = torch.from_numpy(operator.offset.reshape(-1).copy())
        self.shape = operator.offset.shape
        self.coefficients = operator.coefficients
        self.column_offsets = operator.column_offsets
        self.blocks: list[int | None] = [
            next((i for i, c in enumerate(self.coefficients) if c is level), None)
            for level in (state, *older)
        ]
        self.block = self.blocks[0]
        space = state.function_space
        self.comm = space.mesh.comm
        self.num_owned = owned_size(space)
        self.scratch = la.vector(space.dofmap.index_map, space.dofmap.index_map_bs)

    @property
    def reads_levels(self) -> bool:
        """Whether the operands read any level of the state."""
        return any(block is not None for block in self.blocks)

    def _dofs(self, levels: Sequence[Array | None]) -> torch.Tensor:
        """The concatenated coefficient arrays, each level's owned+ghost values in its block."""
        dofs = np.empty(self.column_offsets[-1])
        for level, block in zip(levels, self.blocks, strict=False):
            if block is not None:
                assert level is not None
                self.scratch.array[: self.num_owned] = level
                self.scratch.scatter_forward()
                start, stop = self.column_offsets[block], self.column_offsets[block + 1]
                dofs[start:stop] = self.scratch.array
        read = {block for block in self.blocks[: len(levels)] if block is not None}
        for i, coefficient in enumerate(self.coefficients):
            if i not in read:
                dofs[self.column_offsets[i] : self.column_offsets[i + 1]] = coefficient.x.array
        return torch.from_numpy(dofs)

    def apply(self, owned: Array | None, *older: Array) -> torch.Tensor:
        """The model inputs ``(num_points, num_inputs)`` at ``owned`` and the levels ``older``.

        Older levels not given are read from their functions.
        """
        values = self.matrix @ self._dofs([owned, *older]) + self.offset
        return values.reshape(self.shape)

    def pull_back_levels(self, sensitivity: torch.Tensor) -> list[torch.Tensor | None]:
        """``(∂x/∂level)ᵀ g`` for each level (``None`` for a level the operands do not read).

        ``Pᵀ g`` on the level's block, ghost entries summed into their owners.
        """
        full = self.transpose @ sensitivity.reshape(-1)
        gradients: list[torch.Tensor | None] = []
        for block in self.blocks:
            if block is None:
                gradients.append(None)
                continue
            start, stop = self.column_offsets[block], self.column_offsets[block + 1]
            self.scratch.array[:] = full[start:stop].numpy()
            self.scratch.scatter_reverse(la.InsertMode.add)
            gradients.append(torch.from_numpy(self.scratch.array[: self.num_owned].copy()))
        return gradients

    def pull_back(self, sensitivity: torch.Tensor) -> torch.Tensor:
        """``(∂x/∂state)ᵀ g``: ``Pᵀ g`` on the state's block, ghosts summed into owners."""
        assert self.block is not None
        gradient = self.pull_back_levels(sensitivity)[0]
        assert gradient is not None
        return gradient


class OperandFunction(torch.autograd.Function):
    """Autograd stage of :class:`OperandMap`: a state and its older levels → model inputs.

    Called as ``OperandFunction.apply(u_n, operand_map, u_{n-1}, ...)`` (owned entries).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, owned: torch.Tensor, operand_map: OperandMap, *older: torch.Tensor
    ) -> torch.Tensor:
        """The stage (see the class docstring)."""
        ctx.operand_map = operand_map
        ctx.num_older = len(older)
        return operand_map.apply(owned.detach().numpy(), *(o.detach().numpy() for o in older))

    @staticmethod
    def backward(ctx, sensitivity: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        """Its transpose (see the class docstring)."""
        stage_entry(ctx.operand_map.comm, BACKWARD_PASS)
        gradients = ctx.operand_map.pull_back_levels(sensitivity.contiguous())
        return gradients[0], None, *gradients[1 : 1 + ctx.num_older]


def closure_values(closure: Closure, inputs: torch.Tensor) -> torch.Tensor:
    """The model at ``inputs`` in its dtype and device, as float64 CPU values ``(-1,)``."""
    outputs = closure.model_outputs(inputs.to(device=closure.device, dtype=closure.model_dtype))
    return outputs.to(device="cpu", dtype=torch.float64).reshape(-1)


def model_values(closure: Closure | NonlocalClosure, inputs: torch.Tensor) -> torch.Tensor:
    """The owned closure values ``(-1,)`` (float64, CPU) from the model inputs.

    A local closure's inputs are ``(num_points, num_inputs)`` at its points
    (:func:`closure_values`); a non-local closure's are this rank's grid samples, which
    gather, the model (on the root) and scatter turn into values
    (:func:`~dolfinx_mno.nonlocal_adjoint.nonlocal_values`, collective).
    """
    if isinstance(closure, NonlocalClosure):
        return nonlocal_values(closure, inputs)
    return closure_values(closure, inputs)


# -- the Jacobians of a form with respect to the state and the closures --------------------


class _FormJacobians:
    """Matrices of ``∂form/∂unknown`` for a state and closures, and their transposed products.

    Assembled once when ``form`` is affine in every unknown, else on request at the current
    values of the functions (:meth:`assemble`).
    """

    def __init__(self, form: ufl.Form, unknowns: Sequence[fem.Function]):
        derivatives = [
            expand_derivatives(ufl.derivative(form, w, ufl.TrialFunction(w.function_space)))
            for w in unknowns
        ]
        read = {id(c) for derivative in derivatives for c in coefficients(derivative)}
        #: Whether the form is affine in the unknowns: the matrices never change.
        self.affine = not any(id(w) in read for w in unknowns)
        self.forms = [None if d.empty() else fem.form(d) for d in derivatives]
        self.matrices = [None if f is None else _fem_petsc.assemble_matrix(f) for f in self.forms]
        for matrix in self.matrices:
            if matrix is not None:
                matrix.assemble()
        # Each product's owned entries: the matrix's column layout.
        self.products = [None if m is None else m.createVecs()[0] for m in self.matrices]
        self.sizes = [owned_size(w.function_space) for w in unknowns]
        comm = unknowns[0].function_space.mesh.comm
        #: What the matrices read besides the unknowns (time-dependent data, say).
        self.data = FormData(derivatives, unknowns, comm)

    def assemble(self) -> None:
        """Reassemble the matrices at the functions' current values (collective)."""
        for form, matrix in zip(self.forms, self.matrices, strict=True):
            if matrix is not None:
                matrix.zeroEntries()
                _fem_petsc.assemble_matrix(matrix, form)
                matrix.assemble()
        self.data.save()

    def refresh(self) -> None:
        """Reassemble the matrices if their data changed since the last assembly.

        For affine forms, whose matrices are otherwise assembled once: a step's
        time-dependent coefficients, restored for its adjoint (collective).
        """
        if self.data.changed():
            self.assemble()

    def transpose_product(self, index: int, vector: PETSc.Vec, scale: float) -> Array:  # type: ignore[name-defined]
        """``scale · (∂form/∂w)ᵀ vector`` for the unknown ``w`` at ``index``: owned entries.

        Collective (a ``MatMultTranspose``), except for an unknown the form does not read.
        """
        matrix, product = self.matrices[index], self.products[index]
        if matrix is None:
            return np.zeros(self.sizes[index])
        assert product is not None
        matrix.multTranspose(vector, product)
        return scale * np.array(product.array_r)

    def transpose_products(self, vector: PETSc.Vec, scale: float) -> list[Array]:  # type: ignore[name-defined]
        """``scale · (∂form/∂w)ᵀ vector`` for every unknown ``w``: owned entries (collective)."""
        return [self.transpose_product(i, vector, scale) for i in range(len(self.matrices))]


def _write(function: fem.Function, dofs: slice | np.ndarray, values: Array) -> None:
    function.x.array[dofs] = values
    function.x.scatter_forward()


# -- stage 3a: an IMEX step ----------------------------------------------------------------


class IMEXStep:
    """One IMEX solve ``A u_{n+1} = b(u_n, u_{n-1}, ..., c_n)`` and its adjoint.

    ``b = R L(u_n, c) + (lifting and Dirichlet values)``, ``R`` zeroing the Dirichlet rows,
    so ``∂b/∂u_n = R B_u`` and ``∂b/∂c = R B_c`` with ``B_u``, ``B_c`` the matrices of
    ``∂L/∂u_n`` and ``∂L/∂c``: the adjoint is ``μ = A⁻ᵀ g``, ``R μ``, then ``B_uᵀ (R μ)``
    and ``B_cᵀ (R μ)``; likewise ``B_jᵀ (R μ)`` for each older level ``u_{n-1-j}`` that
    ``L`` reads. ``A`` is assembled here, once; the problem's KSP keeps its factorisation
    (or preconditioner) for every solve and transposed solve.

    Args:
        problem: The step's linear problem (constant bilinear form).
        u_previous: The previous state, read by ``L`` and the closures.
        closures: The closures of ``L``.
        L: The UFL linear form.
        older: The functions of the older levels ``u_{n-1}, ...`` (a stepper's ``older``).
    """

    def __init__(
        self,
        problem: LinearProblem,
        u_previous: fem.Function,
        closures: Sequence[Closure | NonlocalClosure],
        L: ufl.Form,
        older: Sequence[fem.Function] = (),
    ):
        self.problem = problem
        self.u_previous = u_previous
        self.older = list(older)
        self.num_levels = 1 + len(self.older)
        self.closures = list(closures)
        self.comm = u_previous.function_space.mesh.comm
        self.num_owned = owned_size(u_previous.function_space)
        self.value_dofs = [c.owned_value_dofs for c in self.closures]
        self.jacobians = _FormJacobians(L, [u_previous, *self.older, *self.closures])
        self.affine = self.jacobians.affine
        problem.assemble_operator()
        #: What the matrix reads (a time-dependent coefficient, a step size in a Constant).
        self.operator_data = FormData([problem.ufl_forms[0]], [], self.comm)
        self.rhs = problem.b.duplicate()
        self.adjoint_solution = problem.b.duplicate()

    def _refresh_operator(self) -> None:
        """Reassemble ``A`` if its data changed (PETSc then refactorises; collective)."""
        if self.operator_data.changed():
            self.problem.assemble_operator()
            self.operator_data.save()

    def _set_state(self, levels: Sequence[Array], values: Sequence[Array]) -> None:
        """Write the levels into ``u_previous`` and the older functions, values into closures."""
        for function, level in zip([self.u_previous, *self.older], levels, strict=True):
            _write(function, slice(0, self.num_owned), level)
        for closure, dofs, value in zip(self.closures, self.value_dofs, values, strict=True):
            _write(closure, dofs, value)

    def solve(self, levels: Sequence[Array], values: Sequence[Array], t_new: float) -> Array:
        """``u_{n+1}`` (owned) from ``[u_n, u_{n-1}, ...]`` and the closure values (collective)."""
        bad = [
            c.name for c, v in zip(self.closures, values, strict=True) if not np.isfinite(v).all()
        ]
        agree(
            self.comm,
            f"the model of closure(s) {bad} returned NaN/Inf values" if bad else None,
            f"The rollout step to t = {t_new:g}",
            ClosureEvaluationError,
        )
        self._set_state(levels, values)
        self._refresh_operator()
        problem = self.problem
        problem.assemble_rhs()
        problem.solver.solve(problem.b, problem.x)
        _check_reason(
            problem.solver.getConvergedReason(), f"linear solve of the step to t = {t_new:g}"
        )
        problem.x.ghostUpdate(addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)  # type: ignore
        _fem_petsc.assign(problem.x, problem.u)  # type: ignore[arg-type]
        return np.array(problem.x.array_r[: self.num_owned])

    def adjoint(
        self, sensitivity: Array, state: tuple[Sequence[Array], Sequence[Array]] | None
    ) -> list[torch.Tensor]:
        """``[∂J/∂u_n, ∂J/∂u_{n-1}, ..., ∂J/∂c_1, ...]`` (owned) from ``g = ∂J/∂u_{n+1}``.

        Collective.

        Args:
            sensitivity: ``g``, the owned entries.
            state: ``(levels, closure values)`` of the step, to assemble the Jacobians at
                (``None`` when ``L`` is affine: they were assembled once).
        """
        self._refresh_operator()  # A of this step (prepared by the caller)
        self.rhs.array_w[:] = sensitivity
        solver = self.problem.solver
        solver.solveTranspose(self.rhs, self.adjoint_solution)
        _check_reason(solver.getConvergedReason(), "transposed (adjoint) solve")
        _fem_petsc.set_bc(self.adjoint_solution, list(self.problem.bcs or []), alpha=0.0)
        if state is not None:
            self._set_state(*state)
            self.jacobians.assemble()
        else:
            self.jacobians.refresh()
        products = self.jacobians.transpose_products(self.adjoint_solution, 1.0)
        levels, values = products[: self.num_levels], products[self.num_levels :]
        owned = [value[dofs] for value, dofs in zip(values, self.value_dofs, strict=True)]
        gradients = [torch.from_numpy(level) for level in levels]
        return gradients + [torch.from_numpy(np.array(v)) for v in owned]


class IMEXStepFunction(torch.autograd.Function):
    """Autograd stage of :class:`IMEXStep`: ``(u_n, u_{n-1}, ..., c_1, ..., c_m) → u_{n+1}``.

    The inputs hold as many older levels as the step has (``IMEXStep.num_levels - 1``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        step: IMEXStep,
        t_new: float,
        known: torch.Tensor | None,
        prepare: Prepare | None,
        *inputs: torch.Tensor,
    ) -> torch.Tensor:
        """The stage (see the class docstring).

        ``known``: ``u_{n+1}`` from an earlier solve; ``prepare``: sets the step's
        time-dependent data again before its adjoint.
        """
        ctx.step, ctx.t_new, ctx.prepare = step, t_new, prepare
        if not step.affine:
            ctx.save_for_backward(*inputs)
        if known is not None:  # a recomputation: the solve would give the same state
            return known.detach().clone()
        arrays = [v.detach().numpy() for v in inputs]
        levels, values = arrays[: step.num_levels], arrays[step.num_levels :]
        return torch.from_numpy(step.solve(levels, values, t_new))

    @staticmethod
    def backward(ctx, sensitivity: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        """Its transpose (see the class docstring)."""
        step: IMEXStep = ctx.step
        stage_entry(step.comm, BACKWARD_PASS)
        if ctx.prepare is not None:  # the step's own time-dependent data
            ctx.prepare(ctx.t_new)
        state = None
        if not step.affine:
            arrays = [t.detach().numpy() for t in ctx.saved_tensors]
            state = (arrays[: step.num_levels], arrays[step.num_levels :])
        gradients = step.adjoint(sensitivity.contiguous().numpy(), state)
        return None, None, None, None, *gradients


# -- stage 3b: an implicit step ------------------------------------------------------------


class _NonlocalLinearisation:
    """A non-local closure's values ``c(u)`` at a converged state, kept as a torch graph.

    Built once per adjoint step (sample, gather, the model on the root, scatter:
    collective), then used for every product ``(∂c/∂u)ᵀ s`` of the adjoint's Krylov
    iterations and, last, for the parameter gradients: torch VJPs through one graph.

    Args:
        closure: The closure.
        operand_map: Its operand map for the state ``u``.
        state: ``u*``, the owned dofs of the converged state.

    Attributes:
        reads_state: Whether the closure's operands read ``u`` (else ``∂c/∂u = 0``).
        state: ``u*`` as a float64 leaf ``(num_owned,)``, requiring grad if ``reads_state``.
        values: ``c(u*)``, ``(num_points * num_outputs,)`` float64, the owned values.
    """

    def __init__(self, closure: NonlocalClosure, operand_map: OperandMap, state: Array):
        self.reads_state = operand_map.block is not None
        self.state = torch.from_numpy(state.copy()).requires_grad_(self.reads_state)
        with torch.enable_grad():
            if self.reads_state:
                inputs = OperandFunction.apply(self.state, operand_map)
            else:
                inputs = operand_map.apply(None)
            self.values = nonlocal_values(closure, inputs)

    def pull_back(self, sensitivity: Array) -> Array:
        """``(∂c/∂u)ᵀ s`` on the owned dofs of ``u`` from ``s`` at the owned points.

        Collective: the scatter's adjoint, the model's VJP on the root, the gather's
        adjoint and a reverse scatter, in that order on every rank.
        """
        (gradient,) = torch.autograd.grad(
            self.values, self.state, torch.from_numpy(sensitivity), retain_graph=True
        )
        return typing.cast(Array, gradient.numpy())


class _TransposedJacobian:
    """PETSc shell matrix ``y = Jᵀ x`` of an implicit step with non-local closures.

    ``J = A + R (Σ_i B_i D_i) R``: ``A`` the assembled Jacobian (local closures' tangents
    in, non-local closures frozen; Dirichlet rows and columns those of the identity),
    ``B_i = ∂F/∂c_i``, ``D_i = ∂c_i/∂u`` (a :class:`_NonlocalLinearisation`) and ``R``
    zeroing the Dirichlet dofs: the total Jacobian of the interior rows, with the
    identity on the Dirichlet dofs, as ``A`` has it.
    """

    def __init__(self, step: ImplicitStep):
        # Weakly: the step holds the KSP, which holds this context; a strong reference
        # would be a cycle through PETSc that Python's collector cannot see, and the step,
        # its problem, its mesh and their PETSc objects would never be freed.
        self._step = weakref.ref(step)
        #: ``(closure index, linearisation)`` of the closures that read ``u``; set per solve.
        self.linearisations: list[tuple[int, _NonlocalLinearisation]] = []
        self.masked = step.rhs.duplicate()
        self.product = step.rhs.duplicate()

    def mult(self, mat: PETSc.Mat, x: PETSc.Vec, y: PETSc.Vec) -> None:  # type: ignore[name-defined]
        """``y = Jᵀ x`` (collective)."""
        step = self._step()
        assert step is not None, "the step owns the KSP that calls this"
        bcs = step.problem.bcs
        step.problem.A.multTranspose(x, y)
        x.copy(self.masked)
        _fem_petsc.set_bc(self.masked, bcs, alpha=0.0)
        total = np.zeros(step.num_owned)
        for index, linearisation in self.linearisations:
            # B_i is unknown 1 + index of the step's Jacobians (0 is u_previous).
            values = step.jacobians.transpose_product(1 + index, self.masked, 1.0)
            total += linearisation.pull_back(values[step.value_dofs[index]])
        self.product.array_w[:] = total
        _fem_petsc.set_bc(self.product, bcs, alpha=0.0)
        y.axpy(1.0, self.product)


class _TransposedPreconditioner:
    """PETSc Python preconditioner ``y = P⁻ᵀ x``: the Newton solver's (e.g. LU of ``A``)."""

    def __init__(self, pc: PETSc.PC):  # type: ignore[name-defined]
        self.pc = pc

    def apply(self, pc: PETSc.PC, x: PETSc.Vec, y: PETSc.Vec) -> None:  # type: ignore[name-defined]
        """``y = P⁻ᵀ x`` (``PCApplyTranspose``; the factorisation is reused)."""
        self.pc.applyTranspose(x, y)


class ImplicitStep:
    """One implicit step ``F(u_{n+1}; u_n, c(u_{n+1})) = 0`` (Newton) and its adjoint.

    At the converged state ``u*`` (closures updated there, local ones with their tangents),
    the total Jacobian ``J = ∂F/∂u + ∂F/∂c · ∂c/∂u`` gives ``λ = J⁻ᵀ g`` (Dirichlet rows of
    ``λ`` zeroed: those residual rows do not read ``u_n`` or ``c``); then
    ``∂J/∂u_n = −(∂F/∂u_n)ᵀ λ`` and, for each closure, the sensitivity ``s = −(∂F/∂c)ᵀ λ``
    at its points, pulled back through the model at ``x(u*)`` by torch (the parameter
    gradients).

    With local closures only, ``J`` is the problem's assembled Jacobian (their tangents,
    from :func:`dolfinx_mno.derivative`), and ``λ`` is one transposed solve with the
    Newton solver's KSP. A :class:`~dolfinx_mno.NonlocalClosure` is frozen in the
    assembled ``A``; its linearisation ``B D`` (``B = ∂F/∂c``, ``D`` the torch graph of
    sample → gather → model → scatter) is dense, so ``Jᵀ = Aᵀ + Dᵀ Bᵀ`` is applied
    matrix-free (a shell matrix: ``MatMultTranspose`` of ``A`` and ``B``, one torch VJP per
    closure) and ``λ`` is found by GMRES preconditioned with the Newton solver's
    preconditioner transposed (``PCApplyTranspose``: the LU factors of ``A``, reused).
    The GMRES solver has the options prefix ``<the SNES's prefix>adjoint_`` (default
    ``rtol`` 1e-12).

    Args:
        problem: The step's nonlinear problem (its Jacobian with the local closures'
            tangents).
        u: The unknown, read by the closures.
        u_previous: The previous state, read by ``F``.
        closures: The closures of ``F`` (their operands read ``u``, not ``u_previous``).
        F: The UFL residual.
        operand_maps: One per closure, for the state ``u``.
    """

    def __init__(
        self,
        problem: NonlinearProblem,
        u: fem.Function,
        u_previous: fem.Function,
        closures: Sequence[Closure | NonlocalClosure],
        F: ufl.Form,
        operand_maps: Sequence[OperandMap],
    ):
        self.problem = problem
        self.comm = u.function_space.mesh.comm
        self.u = u
        self.u_previous = u_previous
        self.closures = list(closures)
        self.operand_maps = list(operand_maps)
        self.num_owned = owned_size(u.function_space)
        self.value_dofs = [c.owned_value_dofs for c in self.closures]
        self.jacobians = _FormJacobians(F, [u_previous, *self.closures])
        self.rhs = problem.b.duplicate()
        self.adjoint_solution = problem.b.duplicate()
        self._transposed = _TransposedJacobian(self)
        self._adjoint_ksp: PETSc.KSP | None = None  # type: ignore[name-defined]
        if any(isinstance(c, NonlocalClosure) for c in self.closures):  # alike on every rank
            self._adjoint_ksp = self._create_adjoint_ksp()

    def _create_adjoint_ksp(self) -> PETSc.KSP:  # type: ignore[name-defined]
        """GMRES on the shell ``Jᵀ``, preconditioned by the Newton solver's PC transposed."""
        comm = self.u.function_space.mesh.comm
        local, size = self.rhs.getLocalSize(), self.rhs.getSize()
        sizes = ((local, size), (local, size))
        operator = PETSc.Mat().createPython(sizes, self._transposed, comm=comm)  # type: ignore[attr-defined]
        operator.setUp()
        ksp = PETSc.KSP().create(comm)  # type: ignore[attr-defined]
        ksp.setOperators(operator)
        ksp.setType(PETSc.KSP.Type.GMRES)  # type: ignore[attr-defined]
        ksp.setTolerances(rtol=1e-12, max_it=500)
        pc = ksp.getPC()
        pc.setType(PETSc.PC.Type.PYTHON)  # type: ignore[attr-defined]
        pc.setPythonContext(_TransposedPreconditioner(self.problem.solver.getKSP().getPC()))
        ksp.setOptionsPrefix(f"{self.problem.solver.getOptionsPrefix() or ''}adjoint_")
        ksp.setFromOptions()
        return ksp

    def solve(self, u_n: Array, t_new: float) -> Array:
        """``u_{n+1}`` (owned) from ``u_n``, Newton from the guess ``u_n`` (collective)."""
        _write(self.u_previous, slice(0, self.num_owned), u_n)
        _write(self.u, slice(0, self.num_owned), u_n)
        self.problem.solve()
        _check_reason(
            self.problem.solver.getConvergedReason(), f"Newton solve of the step to t = {t_new:g}"
        )
        self.u.x.scatter_forward()
        return np.array(self.u.x.array[: self.num_owned])

    def _update_closures(self, u_new: Array) -> list[_NonlocalLinearisation | None]:
        """Bring the closures to ``u*``: local ones with tangents, non-local ones as graphs."""
        linearisations: list[_NonlocalLinearisation | None] = []
        for closure, operand_map, dofs in zip(
            self.closures, self.operand_maps, self.value_dofs, strict=True
        ):
            if isinstance(closure, NonlocalClosure):
                linearisation = _NonlocalLinearisation(closure, operand_map, u_new)
                _write(closure, dofs, linearisation.values.detach().numpy())
                linearisations.append(linearisation)
            else:
                closure.update(tangent=True)
                linearisations.append(None)
        return linearisations

    def _solve_transpose(self, linearisations: Sequence[_NonlocalLinearisation | None]) -> None:
        """``λ = J⁻ᵀ g`` into ``adjoint_solution`` (collective; see the class docstring)."""
        ksp = self.problem.solver.getKSP()
        if self._adjoint_ksp is None:  # local closures only (alike on every rank): J = A
            ksp.solveTranspose(self.rhs, self.adjoint_solution)
            _check_reason(ksp.getConvergedReason(), "transposed (adjoint) solve")
            return
        ksp.getPC().setUp()  # refactorises A, assembled at u*
        # Closures that do not read u add nothing (then GMRES converges in one iteration).
        self._transposed.linearisations = [
            (index, linearisation)
            for index, linearisation in enumerate(linearisations)
            if linearisation is not None and linearisation.reads_state
        ]
        try:
            self._adjoint_ksp.solve(self.rhs, self.adjoint_solution)
        finally:
            self._transposed.linearisations = []
        _check_reason(
            self._adjoint_ksp.getConvergedReason(),
            "adjoint GMRES solve (the transposed Jacobian with non-local closures)",
        )

    def adjoint(
        self, sensitivity: Array, u_n: Array, u_new: Array
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[_NonlocalLinearisation | None]]:
        """The adjoint of the step at ``(u_n, u*)`` from ``g = ∂J/∂u*`` (collective).

        Returns:
            ``∂J/∂u_n`` (owned), each closure's sensitivity ``∂J/∂c`` at its points, and
            each non-local closure's values at ``u*`` as a graph (``None`` for local ones).
        """
        problem = self.problem
        _write(self.u_previous, slice(0, self.num_owned), u_n)
        _write(self.u, slice(0, self.num_owned), u_new)
        linearisations = self._update_closures(u_new)
        bcs = problem.bcs
        problem.A.zeroEntries()
        _fem_petsc.assemble_matrix(problem.A, problem.J, bcs=bcs)  # type: ignore[arg-type, misc]
        problem.A.assemble()
        if not self.jacobians.affine:
            self.jacobians.assemble()
        else:
            self.jacobians.refresh()
        self.rhs.array_w[:] = sensitivity
        self._solve_transpose(linearisations)
        _fem_petsc.set_bc(self.adjoint_solution, bcs, alpha=0.0)
        grad_u, *values = self.jacobians.transpose_products(self.adjoint_solution, -1.0)
        owned = [value[dofs] for value, dofs in zip(values, self.value_dofs, strict=True)]
        sensitivities = [torch.from_numpy(np.array(v)) for v in owned]
        return torch.from_numpy(grad_u), sensitivities, linearisations


class ImplicitStepFunction(torch.autograd.Function):
    """Autograd stage of :class:`ImplicitStep`: ``(u_n, θ) → u_{n+1}``.

    The parameters ``θ`` (every closure's, in order) are inputs, since ``u_{n+1}`` depends
    on them through the converged fixed point, not through a recorded model call.
    """

    @staticmethod
    def forward(
        ctx,
        step: ImplicitStep,
        t_new: float,
        known: torch.Tensor | None,
        prepare: Prepare | None,
        u_n: torch.Tensor,
        *parameters: torch.Tensor,
    ) -> torch.Tensor:  # type: ignore[override]
        """The stage (see the class docstring).

        ``known``: ``u_{n+1}`` from an earlier solve; ``prepare``: sets the step's
        time-dependent data again before its adjoint.
        """
        ctx.step, ctx.t_new, ctx.prepare = step, t_new, prepare
        if known is not None:  # a recomputation: Newton would converge to the same state
            u_new = known.detach().clone()
        else:
            u_new = torch.from_numpy(step.solve(u_n.detach().numpy(), t_new))
        ctx.save_for_backward(u_n, u_new)
        return u_new

    @staticmethod
    def backward(ctx, sensitivity: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        """Its transpose (see the class docstring)."""
        step: ImplicitStep = ctx.step
        stage_entry(step.comm, BACKWARD_PASS)
        if ctx.prepare is not None:  # the step's own time-dependent data
            ctx.prepare(ctx.t_new)
        u_n, u_new = (t.detach() for t in ctx.saved_tensors)
        grad_u, sensitivities, linearisations = step.adjoint(
            sensitivity.contiguous().numpy(), u_n.numpy(), u_new.numpy()
        )
        parameter_gradients: list[torch.Tensor | None] = []
        with torch.enable_grad():
            for closure, operand_map, s, linearisation in zip(
                step.closures, step.operand_maps, sensitivities, linearisations, strict=True
            ):
                parameters = [p for p in closure.model.parameters() if p.requires_grad]
                if not parameters:  # alike on every rank (every rank holds the model)
                    continue
                if linearisation is None:
                    values = closure_values(
                        typing.cast(Closure, closure), operand_map.apply(u_new.numpy())
                    )
                else:  # collective: the scatter's adjoint (and the model's VJP on the root)
                    values = linearisation.values
                grads = torch.autograd.grad(values, parameters, s, allow_unused=True)
                parameter_gradients.extend(
                    torch.zeros_like(p) if g is None else g
                    for p, g in zip(parameters, grads, strict=True)
                )
        return None, None, None, None, grad_u, *parameter_gradients
