"""Local learned closures: PyTorch models evaluated at the quadrature points of a form.

A :class:`Closure` is a :class:`dolfinx.fem.Function` on a quadrature space, so it enters
UFL forms like any coefficient::

    closure = Closure(model, [u, ufl.grad(u)], value_shape=(2,), quadrature_degree=4)
    F -= ufl.inner(closure, ufl.grad(v)) * closure.dx
    closure.update()  # operands -> model -> values at the quadrature points

The stages of :meth:`Closure.update` are explicit (as in dolfinx-external-operator):
evaluate all operands with one cached, fused :class:`dolfinx.fem.Expression` on the owned
cells → feed the model in chunks → check the values → write them into the quadrature
function → ``scatter_forward`` to make ghosts consistent.

For implicit (Newton) coupling, :func:`derivative` replaces :func:`ufl.derivative`: it adds
the linearisation of every closure, ``δclosure = T · δ(operands)``, where the tangent
``T = ∂closure/∂operands`` is computed by automatic differentiation at the quadrature points
(reverse or forward mode, whichever measures faster for the model; see
:mod:`dolfinx_mno.pointwise_kernel`) and stored in :attr:`Closure.tangent`.
"""

from __future__ import annotations

import math
import os
import time
import typing
import weakref
from collections.abc import Sequence

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import torch
import ufl
from dolfinx import fem
from dolfinx.mesh import Mesh
from ufl.algorithms import expand_derivatives, extract_coefficients
from ufl.constantvalue import Zero

from dolfinx_mno._mpi import agree, describe, rank_local, same_everywhere
from dolfinx_mno.base import (
    ClosureBase,
    closure_of_tangent,
    register_tangent,
    validate_arguments,
)
from dolfinx_mno.operand_map import OperandEvaluator, OperandMatrix
from dolfinx_mno.operands import Operands, OperandsLike, operand_comm, operand_components
from dolfinx_mno.quadrature import (
    owned_dofs,
    quadrature_points,
    quadrature_space,
    selected_cells,
)
from dolfinx_mno.torch_bridge import (
    ModelStateError,
    PointwiseEvaluator,
    model_device,
    resolve_device,
    resolves_collectively,
)

__all__ = ["Closure", "ClosureEvaluationError", "derivative", "extract_closures"]


class ClosureEvaluationError(RuntimeError):
    """A closure update failed on at least one rank; the closure values were not changed."""

    def __init__(self, message: str):
        """Carry ``message``: the closure, the failing ranks and this rank's reason."""
        super().__init__(message)


class Closure(ClosureBase):
    """A learned closure whose values live at the quadrature points of a cell rule.

    Args:
        model: Pointwise model mapping ``(batch, num_inputs)`` to ``(batch, *value_shape)``
            or ``(batch, prod(value_shape))``. It is evaluated in its own dtype and moved
            to ``device``; each output row may depend only on the same input row. A path
            (``str`` or :class:`os.PathLike`) is read with :func:`dolfinx_mno.io.load_model`;
            if the file holds a :class:`~dolfinx_mno.spec.ClosureSpec` (``save_model(...,
            spec=closure.spec)``), the operands must be those it was trained on.
        operands: UFL expressions on one mesh (``u``, ``grad(u)``, ``x``, other
            coefficients), the same operands a ``ufl.ExternalOperator`` would take: an
            :class:`~dolfinx_mno.Operands`, a dict ``{name: expression}`` or a list. Their
            components, operand after operand and each in row-major order, form the
            ``num_inputs`` columns of the model input.
        value_shape: Shape of the closure value, a tuple of positive integers: ``()``
            (scalar), ``(d,)`` (a flux) or ``(d, d)`` (a stress); an integer ``d`` is
            refused (write ``(d,)``). ``None`` (the default): the model file's spec, else
            ``()``.
        quadrature_degree: Degree of Basix's default cell quadrature rule that carries the
            values. Integrate the closure with :attr:`dx`. ``None`` (the default): the
            model file's spec, else 2.
        mesh: The mesh; by default the mesh of the operands.
        device: ``"auto"`` (``cuda:(local rank % number of GPUs)`` when CUDA is available,
            else the CPU), or any :class:`torch.device`. ``None`` leaves the model where it
            is.
        batch_size: Points per model call (bounded memory), a positive integer; ``None``
            (the default) measures it for the model on the CPU, separately for values and
            for values with tangent (2,048–32,768 points for a 64-wide MLP, up to 131,072
            for a cheap formula), and gives 2¹⁸ on a GPU (see
            :mod:`dolfinx_mno.pointwise_kernel`).
        compile: Compile the model's value and tangent functions with
            :func:`torch.compile` (opt-in: the first compilation takes from seconds to
            minutes). On the CPU each compiled function is kept only where it measures
            no slower than the eager one (it pays for cheap formulas, whose values and
            tangent inductor fuses into one loop, not for MLPs, whose fused eager pass
            runs MKL's GEMMs); ``evaluation_plan["compile_declined"]`` says which were not
            kept. Where compilation is unavailable or fails, a ``RuntimeWarning`` says
            why and the model runs eagerly, with the same results. The operand stage is
            compiled too, for operands affine in the coefficients (the ``"compiled"``
            mode of :mod:`dolfinx_mno.operand_map`, kept only if it measures fastest;
            ``evaluation_plan["operands"]`` says which mode runs).
        tangent: Also compute ``∂closure/∂operands`` at each update (implicit coupling).
            :func:`derivative` switches it on when a Jacobian needs it.
        name: Name of the function (used in output files and error messages).
        cells: Run the model on these cells only: local cell indices, as
            :func:`dolfinx.mesh.locate_entities` or ``cell_tags.find(tag)`` return them
            (ghost cells among them are left to their owners, which must select them too).
            Elsewhere the closure and its tangent are zero, so ``closure.dx`` over the
            whole mesh integrates it over these cells only, and a model defined on part of
            the domain never sees the rest. ``None`` (the default): every cell. Given on
            every rank or on none (an empty array on a rank that selects nothing).

    Shapes:
        * ``self.x.array`` holds ``(num_cells, num_points, *value_shape)`` values,
          ``num_points`` being the points of the quadrature rule on one cell (with
          ``cells=``, :attr:`owned_value_dofs` are the selected cells' entries).
        * :attr:`tangent` holds ``(num_cells, num_points, *value_shape, num_inputs)``.

    Raises:
        ValueError: Operands from another mesh, a model input width different from the
            operand components, a model output that does not match ``value_shape``, a
            negative ``quadrature_degree``, or operands, a value shape or a degree other
            than those in the model file's spec; ``cells`` not one-dimensional or outside
            the rank's cells, or given on some ranks only.
        TypeError: A ``quadrature_degree`` that is not an integer, a ``value_shape`` that
            is not a tuple of positive integers (``2`` for ``(2,)``), operands that are
            form arguments, complex or otherwise unsupported dtypes, or ``cells`` that are
            not integers.

        Under MPI every check, the model file's reading and the probe run before the first
        collective call, and the ranks agree on their outcome: an error on some ranks
        raises on every rank, with the type of the first failing rank's error and a
        message naming the failing ranks and that rank's reason (an error that is the same
        on every rank is raised as is). A quadrature degree, value shape, operand width,
        dtype or ``tangent`` that differs between ranks raises ``ValueError`` on every rank.

    References:
        Lütjens et al., "Multiscale Neural Operator: Learning Fast and Grid-independent
        PDE Solvers", 2022, https://arxiv.org/abs/2207.11417.
    """

    supports_tangent = True

    # A closure's buffers and tangents are ordinary tensors whatever the caller's torch
    # mode: a closure built or updated under torch.inference_mode() must work outside it.
    @torch.inference_mode(False)
    def __init__(
        self,
        model: torch.nn.Module | str | os.PathLike[str],
        operands: OperandsLike,
        value_shape: tuple[int, ...] | None = None,
        quadrature_degree: int | None = None,
        *,
        mesh: Mesh | None = None,
        device: str | torch.device | None = "auto",
        batch_size: int | None = None,
        tangent: bool = False,
        name: str = "closure",
        compile: bool = False,
        cells: npt.ArrayLike | None = None,
    ):
        """Build the closure (collective); see the class docstring for the arguments."""
        # Every rank-local step (reading a model file, the checks, the probe, moving the
        # model and allocating its buffers) runs before the first collective call (the JIT
        # compilation of the operand expression), and the ranks agree on its outcome: a
        # failure on any rank raises on every rank instead of leaving the others waiting.
        comm = operand_comm(operands, mesh)
        named = device is not None and not resolves_collectively(device)
        target = resolve_device(device, comm) if device is not None and not named else None
        with rank_local(comm, f"Building closure '{name}'"):
            if named:  # checked rank by rank (a CUDA device this rank lacks)
                target = resolve_device(device, comm)
            operands = Operands(operands, mesh=mesh)
            arguments = validate_arguments(model, operands, value_shape, quadrature_degree)
            model, value_shape = arguments.model, arguments.value_shape
            quadrature_degree = arguments.quadrature_degree
            mesh, dtype, num_inputs = operands.mesh, operands.dtype, operands.num_inputs
            num_outputs = int(np.prod(value_shape, dtype=int))
            selected = selected_cells(cells, mesh)
            tdim = mesh.topology.dim
            num_cells = mesh.topology.index_map(tdim).size_local
            if selected is not None:
                num_cells = selected.size
            points = quadrature_points(mesh, int(quadrature_degree))
            _check_quadrature_operands(operands, points, int(quadrature_degree))
            num_points = num_cells * points.shape[0]

            # Probe the model where it is now, on two points (a rank without cells too).
            probe_device = model_device(model) or torch.device("cpu")
            probe = PointwiseEvaluator(model, num_inputs, num_outputs, 1, dtype, probe_device)
            output_shape = probe.probe()
            if output_shape not in (value_shape, (num_outputs,)) or (
                value_shape == () and output_shape not in ((), (1,))
            ):
                raise ValueError(
                    f"Model output width mismatch: the closure has value_shape {value_shape} "
                    f"({num_outputs} components per point) but the model returns "
                    f"{output_shape} per point."
                )
            # A model without tensors has no device of its own: it runs where it is sent.
            if target is not None:
                model.to(target)
            evaluator = PointwiseEvaluator(
                model,
                num_inputs,
                num_outputs,
                num_points,
                dtype,
                model_device(model) or target or probe_device,
                batch_size,
                compile=compile,
            )

        # Collective from here on.
        same_everywhere(
            comm,
            f"Building closure '{name}'",
            quadrature_degree=int(quadrature_degree),
            value_shape=value_shape,
            operand_components=num_inputs,
            dtype=np.dtype(dtype).name,
            tangent=bool(tangent),
            restricted_to_cells=selected is not None,
        )
        space = quadrature_space(mesh, int(quadrature_degree), value_shape)
        super().__init__(space, name=name, dtype=dtype)
        self._mno_quadrature_degree = int(quadrature_degree)
        self._operands = operands
        self._expression = operands.expression(points)
        #: The cells the model runs on: their number (cells ``0 .. n - 1``, all owned
        #: cells) or their local indices (``cells=``).
        self._selection: int | np.ndarray = num_cells if selected is None else selected
        self._num_cells = num_cells
        self._points_per_cell = points.shape[0]
        self._model = model
        self._evaluator = evaluator
        self._operand_buffer = evaluator.inputs.reshape(num_cells, points.shape[0], num_inputs)
        with rank_local(comm, f"Building closure '{name}'"):  # times the operand modes
            self._operand_evaluator = OperandEvaluator(
                self._expression, mesh, self._selection, self._operand_buffer, compile=compile
            )
        self._value_dofs = owned_dofs(space, self._selection)
        self._tangent: fem.Function | None = None
        self._tangent_dofs: slice | np.ndarray | None = None
        self._tangent_current = False  # whether the last update computed the tangent
        if tangent:
            self.enable_tangent()
        self._update_count = 0
        self._fill_not_updated()
        #: Seconds spent in each stage of the last successful update.
        self.timings: dict[str, float] = {}
        #: Seconds spent in each stage, summed over all successful updates.
        self.total_timings: dict[str, float] = {}

    @classmethod
    def from_external_operator(
        cls, operator: ufl.ExternalOperator, model: torch.nn.Module, **kwargs: typing.Any
    ) -> Closure:
        """Build a closure with the operands and quadrature space of an external operator.

        ``dolfinx_external_operator.FEMExternalOperator(*operands, function_space=Q)`` and
        ``Closure(model, operands, ...)`` describe the same thing: a map of UFL operands to
        values at the points of a quadrature space. This constructor reads the operands,
        value shape and quadrature degree from ``operator`` (its ``function_space`` must be
        a default-rule quadrature space, as in the external-operator demos).

        Args:
            operator: The external operator (not a derivative of one).
            model: The torch model implementing it.
            kwargs: Passed to :class:`Closure` (``device``, ``batch_size``, ``name``, ...).
        """
        if not isinstance(operator, ufl.ExternalOperator):
            raise TypeError(
                "from_external_operator takes a ufl.ExternalOperator (e.g. "
                "dolfinx_external_operator.FEMExternalOperator), got "
                f"{type(operator).__name__}; for other operands use Closure(model, operands)."
            )
        if any(operator.derivatives):
            raise ValueError("Build the closure from the operator itself, not a derivative.")
        space = getattr(operator, "original_function_space", None) or operator.ufl_function_space()
        element = space.ufl_element()
        degree = element.embedded_superdegree
        mesh = space.mesh
        points = element.custom_quadrature()[0] if element.has_custom_quadrature else None
        default = quadrature_points(mesh, degree)
        if points is None or points.shape != default.shape or not np.allclose(points, default):
            raise ValueError(
                "The external operator's space must be a quadrature space with Basix's "
                "default rule (basix.ufl.quadrature_element(cell, value_shape, degree=q))."
            )
        kwargs.setdefault("name", getattr(operator, "name", None) or "closure")
        return cls(
            model,
            operator.ufl_operands,
            tuple(operator.ufl_shape),
            int(degree),
            mesh=mesh,
            **kwargs,
        )

    # -- properties -------------------------------------------------------------------

    @property
    def num_inputs(self) -> int:
        """Number of input components per point (the model's input width)."""
        return self._evaluator.num_inputs

    @property
    def cells(self) -> np.ndarray | None:
        """The owned cells the model runs on (local indices), or ``None``: every cell.

        Set by ``cells=``; outside these cells the closure and its tangent are zero.
        Read-only: the closure evaluates its operands on these very indices.
        """
        if isinstance(self._selection, int):
            return None
        view = self._selection.view()  # the evaluator's own index: read-only
        view.flags.writeable = False
        return view

    @property
    def device(self) -> torch.device:
        """Device the model runs on."""
        return self._evaluator.device

    @property
    def model_dtype(self) -> torch.dtype:
        """Dtype the model runs in."""
        return self._evaluator.dtype

    @property
    def tangent(self) -> fem.Function:
        """``∂closure/∂operands`` at the quadrature points.

        Value shape ``(*value_shape, num_inputs)``; created by :meth:`enable_tangent`.
        """
        if self._tangent is None:
            raise RuntimeError(
                f"Closure '{self.name}' has no tangent; create it with tangent=True or "
                "build the Jacobian with dolfinx_mno.derivative."
            )
        return self._tangent

    def model_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The model at ``x`` as updates run it, with autograd's graph (rank-local).

        ``x`` is ``(n, num_inputs)`` in :attr:`model_dtype` on :attr:`device`. The result
        is the model's output, except that a plain MLP whose updates measured NumPy's
        tanh or BLAS faster uses them here too (its values differ from torch's by an ulp at
        most; the gradients are those of the values returned; see
        :meth:`~dolfinx_mno.pointwise_kernel.PointwiseKernel.differentiable_values`).
        Rollouts differentiate this (:mod:`dolfinx_mno.rollout`).
        """
        return self._evaluator.kernel.differentiable_values(x)

    def model_state_error(self) -> str | None:
        """Why the model must not be run now, or ``None`` (see :class:`ClosureBase`)."""
        return self._evaluator.state_error()

    def mean_tangent(self) -> np.ndarray:
        """The tangent of the last update averaged over every quadrature point (collective).

        Raises ``RuntimeError`` if the last update did not compute the tangent, or if the
        closure has no point on any rank (``cells=`` selected none).

        Each point of every owned cell (of ``cells``, if given) counts once, on whichever
        rank owns it, so the result does not depend on the number of ranks (up to
        summation order). For a closure linear in its operands, ``q = M x + c``, every
        point holds ``M``, and so does the mean: this reads an effective tensor off a
        learned linear flux closure.

        Returns:
            Array of shape ``(*value_shape, num_inputs)``, the same on every rank.
        """
        if not self._tangent_current:
            raise RuntimeError(
                f"Closure '{self.name}' has no tangent from its last update; call "
                "closure.update(tangent=True) first."
            )
        shape = (*self.value_shape, self.num_inputs)
        owned = self.tangent.x.array[self._tangent_dofs].reshape(-1, *shape)
        comm = self.function_space.mesh.comm
        total = comm.allreduce(owned.sum(axis=0), op=MPI.SUM)
        count = comm.allreduce(owned.shape[0], op=MPI.SUM)
        if count == 0:
            raise RuntimeError(f"Closure '{self.name}' has no quadrature point on any rank.")
        return total / count

    @property
    def evaluation_plan(self) -> dict[str, typing.Any]:
        """How updates run, as chosen at construction, with the seconds measured.

        The model's chunk size, tangent mode and compilation
        (:attr:`~dolfinx_mno.torch_bridge.PointwiseEvaluator.plan`) and, under
        ``"operands"``, the operand mode (:class:`~dolfinx_mno.operand_map.OperandEvaluator`).
        """
        return {**self._evaluator.plan, "operands": dict(self._operand_evaluator.plan)}

    def operand_matrix(self) -> OperandMatrix:
        """The constant map from coefficient dofs to the model inputs (affine operands).

        See :meth:`dolfinx_mno.operand_map.OperandEvaluator.matrix`; its transpose maps
        sensitivities at the quadrature points back to the dofs.
        """
        return self._operand_evaluator.matrix()

    # -- evaluation -------------------------------------------------------------------

    def enable_tangent(self) -> fem.Function:
        """Compute the tangent at every update from now on; returns :attr:`tangent`.

        Collective the first time (it creates the tangent's function space).
        """
        if self._tangent is None:
            mesh = self.function_space.mesh
            space = quadrature_space(
                mesh, self.quadrature_degree, (*self.value_shape, self.num_inputs)
            )
            self._tangent = fem.Function(space, name=f"{self.name}_tangent", dtype=self.dtype)
            self._tangent_dofs = owned_dofs(space, self._selection)
            # NaN until an update computes it; 0 (constant values) outside ``cells``.
            self._tangent.x.array[:] = np.nan if self.cells is None else 0.0
            self._tangent.x.array[self._tangent_dofs] = np.nan
            self._tangent.x.scatter_forward()  # the ghosts of cells their owners selected
            self._tangent._mno_quadrature_degree = self.quadrature_degree  # type: ignore
            self._tangent._mno_tangent_of = weakref.ref(self)  # type: ignore[attr-defined]
            register_tangent(self, self._tangent)
            self._evaluator.prepare_tangent()
        return self._tangent

    def _fill_not_updated(self) -> None:
        """NaN where the model runs until the first update, zero outside ``cells``."""
        if self.cells is None:
            super()._fill_not_updated()
            return
        self.x.array[:] = 0.0
        self.x.array[self._value_dofs] = np.nan
        self.x.scatter_forward()  # the ghosts of cells their owners selected

    @torch.inference_mode(False)
    def update(self, tangent: bool | None = None) -> None:
        """Evaluate the model at the current operands and store the values.

        Collective on the mesh communicator.

        Args:
            tangent: Also update :attr:`tangent`; by default, whenever it exists.

        Raises:
            ClosureEvaluationError: If the model raised or returned NaN/Inf on any rank,
                on every rank, with the same message: the failing ranks, how many there
                are, and the first one's reason (the exception, or the number of points
                with NaN/Inf), e.g. ``"Update 3 of closure 'q' failed on rank(s) [0, 2]
                (2 of 4 ranks); on rank 0: the model returned NaN/Inf values at 5 of 96
                quadrature points. The previous closure values were kept."``. The closure
                values (and tangent) keep their previous values, on all ranks.
        """
        comm = self.function_space.mesh.comm
        with_tangent = self._tangent is not None if tangent is None else tangent
        if with_tangent:
            self.enable_tangent()
        attempt = self._update_count + 1
        timings: dict[str, float] = {}
        reason: str | None = None
        cause: Exception | None = None
        t0 = time.perf_counter()
        try:
            self._operand_evaluator.evaluate()
            t1 = time.perf_counter()
            self._evaluator.evaluate(tangent=with_tangent)
            t2 = time.perf_counter()
            timings.update(operands=t1 - t0, model=t2 - t1)
            reason = self._check_finite(with_tangent)
        except ModelStateError as err:  # the model is not to be run now
            reason, cause = str(err), err
        except Exception as err:  # reported collectively below
            reason, cause = f"the model raised {describe(err)}", err
        # Agree on failure before touching any value or entering any other collective:
        # every rank raises the same error, which quotes the first failing rank's reason.
        agree(
            comm,
            reason,
            f"Update {attempt} of closure '{self.name}'",
            ClosureEvaluationError,
            cause=cause,
            note="The previous closure values were kept.",
        )
        timings["check"] = time.perf_counter() - t0 - sum(timings.values())
        t3 = time.perf_counter()
        self.x.array[self._value_dofs] = self._evaluator.outputs.reshape(-1)
        if with_tangent:
            assert self._tangent is not None and self._tangent_dofs is not None
            self._tangent.x.array[self._tangent_dofs] = self._evaluator.tangents.reshape(-1)
        t4 = time.perf_counter()
        self.x.scatter_forward()
        if with_tangent:
            assert self._tangent is not None
            self._tangent.x.scatter_forward()
        t5 = time.perf_counter()
        timings.update(write=t4 - t3, scatter=t5 - t4, total=t5 - t0)
        self._record(attempt, **timings)
        self._tangent_current = with_tangent

    def _check_finite(self, with_tangent: bool) -> str | None:
        """Describe non-finite model output on this rank, or return ``None``."""
        # A sum is a cheap test for the common all-finite case; count only on failure. The
        # evaluator sums the values' squares and the tangents while computing them.
        if math.isfinite(self._evaluator.value_squares) and (
            not with_tangent or math.isfinite(self._evaluator.tangent_sum)
        ):
            return None
        outputs = self._evaluator.outputs
        arrays = [outputs]
        if with_tangent:
            # An explicit width: reshape(0, -1) fails on a rank that owns no cells.
            width = self._evaluator.num_outputs * self._evaluator.num_inputs
            arrays.append(self._evaluator.tangents.reshape(outputs.shape[0], width))
        bad = np.zeros(outputs.shape[0], dtype=bool)
        for a in arrays:
            bad |= ~np.isfinite(a).all(axis=1)
        if not bad.any():
            return None
        what = "values or tangents" if with_tangent else "values"
        reason = (
            f"the model returned NaN/Inf {what} at {int(bad.sum())} of {outputs.shape[0]} "
            "quadrature points"
        )
        # Garbage in, garbage out: say so when the operands were not finite there either.
        inputs = np.asarray(self._evaluator.inputs)[bad]
        if (bad_inputs := int((~np.isfinite(inputs).all(axis=1)).sum())) > 0:
            reason += (
                f", and its inputs, the operands, were already NaN/Inf at {bad_inputs} of "
                "them (the state the closure reads is not finite)"
            )
        return reason

    def linearization(
        self, coefficient: fem.Function, argument: ufl.Argument
    ) -> ufl.core.expr.Expr | None:
        """Return ``δclosure = T · δ(operands)`` in the direction ``argument``.

        Args:
            coefficient: The unknown the operands are differentiated with respect to.
            argument: The direction (usually a trial function of ``coefficient``'s space).

        Returns:
            A UFL expression of shape :attr:`value_shape`, or ``None`` if no operand depends
            on ``coefficient``.
        """
        components = self._operand_variations(coefficient, argument)
        if components is None:
            return None
        return ufl.dot(self.enable_tangent(), ufl.as_vector(components))

    def depends_on(self, coefficient: fem.Function) -> bool:
        """Whether an operand depends on ``coefficient`` (has a non-zero Gateaux derivative).

        Pure UFL: allocates no tangent and calls no collective, so every rank agrees.
        """
        argument = ufl.Argument(coefficient.ufl_function_space(), 0)
        if self.views_of(coefficient):
            return True  # through a view UFL cannot see; derivative() refuses it
        return self._operand_variations(coefficient, argument) is not None

    def views_of(self, coefficient: fem.Function) -> list[str]:
        """The operands' functions that are views of ``coefficient`` (``coefficient.sub(i)``).

        A view shares ``coefficient``'s values but is another UFL coefficient, so
        ``ufl.derivative`` with respect to ``coefficient`` does not see through it.
        """
        own = coefficient.x.array
        return [
            f.name
            for op in self.operands
            for f in extract_coefficients(op)
            if isinstance(f, fem.Function)
            and f is not coefficient
            and np.may_share_memory(f.x.array, own)
        ]

    def _operand_variations(
        self, coefficient: fem.Function, argument: ufl.Argument
    ) -> list[ufl.core.expr.Expr] | None:
        """The components of ``δ(operands)``, or ``None`` if they are all zero."""
        variations = [
            expand_derivatives(ufl.derivative(op, coefficient, argument)) for op in self.operands
        ]
        components, _ = operand_components(variations)
        if all(isinstance(component, Zero) for component in components):
            return None
        return components


def _check_quadrature_operands(operands: Operands, points: np.ndarray, degree: int) -> None:
    """Refuse operands reading functions of a quadrature space with other points.

    Such a function has values only at its own points (a history variable of another
    degree, say); FFCx would refuse to evaluate it at the closure's with a bare "Mismatch
    of tabulation points and element points".
    """
    for name, expression in zip(operands.names, operands.expressions, strict=True):
        for f in extract_coefficients(expression):
            element = f.ufl_function_space().ufl_element()
            if not getattr(element, "has_custom_quadrature", False):
                continue
            own = element.custom_quadrature()[0]
            if own.shape == points.shape and np.allclose(own, points, rtol=0.0, atol=1e-14):
                continue
            raise ValueError(
                f"Operand {name} reads '{f.name}', a function on a quadrature space whose "
                f"values live at its own {own.shape[0]} points per cell (degree "
                f"{element.embedded_superdegree}), not at the {points.shape[0]} points of the "
                f"closure's degree-{degree} rule. Give the closure the same "
                "quadrature_degree, or interpolate the function into a space the closure can "
                "evaluate anywhere (Lagrange, DG)."
            )


def extract_closures(form: ufl.Form) -> list[ClosureBase]:
    """The closures (local and non-local) a form contains, in a stable order."""
    return [c for c in form.coefficients() if isinstance(c, ClosureBase)]


@typing.overload
def derivative(
    form: ufl.Form, coefficient: fem.Function, argument: ufl.Argument | None = None
) -> ufl.Form: ...


@typing.overload
def derivative(
    form: Sequence[ufl.Form],
    coefficient: Sequence[fem.Function],
    argument: Sequence[ufl.Argument] | None = None,
) -> list[list[ufl.Form]]: ...


def derivative(
    form: typing.Any, coefficient: typing.Any, argument: typing.Any = None
) -> typing.Any:
    """Gateaux derivative of a form containing closures (drop-in for :func:`ufl.derivative`).

    ``ufl.derivative`` treats a closure as a coefficient independent of ``coefficient``.
    This adds, for every closure ``c`` in ``form``, the term ``∂F/∂c[T · δ(operands)]``,
    which makes the Jacobian exact and Newton's method converge quadratically. Each such
    closure computes its tangent at every later :meth:`Closure.update`.

    For a block residual (a list of forms ``F_i`` and a list of unknowns ``u_j``, as
    :func:`dolfinx.fem.derivative_block` takes them) it returns the block Jacobian
    ``J[i][j] = derivative(F_i, u_j, du_j)``, with ``du_j`` a trial function of ``u_j``'s
    space (or ``argument[j]``); for a functional and a list of unknowns, the block
    residual ``[derivative(F, u_j, v_j)]``, ``v_j`` a test function of ``u_j``'s space.

    Args:
        form: The residual form, or a list of residual forms.
        coefficient: The unknown, or a list of unknowns (one per form).
        argument: Direction; by default a new :class:`ufl.Argument` on ``coefficient``'s
            space numbered after the form's arguments (a trial function for a residual).
            A list of them for a block residual.

    Returns:
        The Jacobian form, or the block Jacobian (a list of lists of forms).

    Raises:
        ValueError: ``form`` holds a closure's tangent that depends on ``coefficient`` (a
            second derivative, e.g. of ``mno.derivative(energy, u)``), or a closure reads a
            view ``coefficient.sub(i)``: in both cases a term of the Jacobian would be
            missing. A list of forms with a single unknown, lists of different lengths,
            or a form with arguments and a list of unknowns.
    """
    if not isinstance(form, ufl.Form) and isinstance(form, Sequence):
        return _block_derivative(form, coefficient, argument)
    if not isinstance(coefficient, fem.Function) and isinstance(coefficient, Sequence):
        if form.arguments():
            raise ValueError(
                "A list of unknowns needs a list of residual forms (one per unknown), or a "
                "functional (a form without arguments), as dolfinx.fem.derivative_block."
            )
        arguments = argument or [ufl.TestFunction(u.function_space) for u in coefficient]
        return [derivative(form, u, du) for u, du in zip(coefficient, arguments, strict=True)]
    name = coefficient.name
    for c in form.coefficients():
        owner = closure_of_tangent(c)
        if isinstance(owner, Closure) and owner.depends_on(coefficient):
            raise ValueError(
                f"The form holds the tangent of closure '{owner.name}' (∂{owner.name}/∂operands, "
                f"e.g. from an earlier mno.derivative), which depends on '{name}': its "
                "derivative is the closure's second derivative, which dolfinx_mno does not "
                "compute, so the Jacobian would silently miss it. Learn the derivative as a "
                "closure of its own (a model that returns ∂W/∂u, used directly in the "
                "residual), or linearise a frozen tangent by hand."
            )
    for closure in extract_closures(form):
        if isinstance(closure, Closure) and (views := closure.views_of(coefficient)):
            raise ValueError(
                f"Closure '{closure.name}' reads {views}, a view of '{name}' "
                f"({name}.sub(i)) that UFL sees as another coefficient: its tangent would "
                "be silently missing from the Jacobian. Give the closure the component of "
                f"'{name}' itself: {name}[i] for a vector function, ufl.split({name})[i] "
                "for a mixed one."
            )
    if argument is None:
        number = max((a.number() for a in form.arguments()), default=-1) + 1
        argument = ufl.Argument(coefficient.ufl_function_space(), number)
    jacobian = ufl.derivative(form, coefficient, argument)
    for closure in extract_closures(form):
        variation = closure.linearization(coefficient, argument)
        if variation is None:
            continue
        placeholder = ufl.Coefficient(closure.ufl_function_space())
        partial = expand_derivatives(ufl.derivative(form, closure, placeholder))
        jacobian += ufl.replace(partial, {placeholder: variation})
    return jacobian


def _block_derivative(
    forms: Sequence[ufl.Form],
    coefficients: typing.Any,
    arguments: typing.Any,
) -> list[list[ufl.Form]]:
    """``J[i][j] = derivative(forms[i], coefficients[j], arguments[j])`` (block Jacobian)."""
    if isinstance(coefficients, fem.Function) or not isinstance(coefficients, Sequence):
        raise ValueError(
            f"A block residual ({len(forms)} forms) needs a list of unknowns, one per form "
            f"(as dolfinx.fem.derivative_block takes them), got {type(coefficients).__name__}."
        )
    if arguments is None:
        arguments = [ufl.TrialFunction(u.function_space) for u in coefficients]
    if len(coefficients) != len(forms) or len(arguments) != len(coefficients):
        raise ValueError(
            f"A block residual of {len(forms)} forms needs as many unknowns (got "
            f"{len(coefficients)}) and directions (got {len(arguments)})."
        )
    return [
        [derivative(F, u, du) for u, du in zip(coefficients, arguments, strict=True)] for F in forms
    ]
