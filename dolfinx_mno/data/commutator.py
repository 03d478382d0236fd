"""Closure targets as the commutator of filtering and the coarse operator.

A fine model ``∂u/∂t = N_f(u)`` resolves all scales; the coarse model
``∂ū/∂t = N_c(ū) + c`` resolves the filtered field ``ū = R u`` only. For the coarse model
to follow the filtered fine solution, ``∂ū/∂t = R ∂u/∂t``, the closure must be

.. math::  c = R N_f(u) - N_c(R u),

the commutator of the filter ``R`` (a restriction, :mod:`dolfinx_mno.data.restriction`) and
the operator when ``N_f = N_c``. :class:`ClosureSampler` computes ``c`` at the quadrature
points of the coarse mesh, together with the closure inputs (operands of ``ū``), from
snapshots of a fine simulation. :class:`Tendency` turns a UFL right-hand side into a
function: pointwise (interpolation of an expression) or weak (a mass-matrix solve).

References:
    Lütjens et al., "Multiscale Neural Operator: Learning Fast and Grid-independent PDE
    Solvers", 2022, https://arxiv.org/abs/2207.11417 (closure as the filtered-minus-coarse
    tendency). Sagaut, "Large Eddy Simulation for Incompressible Flows", Springer, 2006,
    https://doi.org/10.1007/b137536 (the commutator/subgrid term ``R N(u) − N(R u)``).
"""

from __future__ import annotations

import typing
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import ufl
from dolfinx import fem
from ufl.algorithms import extract_arguments

from dolfinx_mno._mpi import rank_local, same_everywhere
from dolfinx_mno.cell_order import geometric_cell_index
from dolfinx_mno.data.restriction import CellAverage, MassSolver, Restriction
from dolfinx_mno.data.sample import ClosureSample, mesh_summary
from dolfinx_mno.operands import (
    Operands,
    OperandsLike,
    WithOperands,
    describe,
    operand_components,
)
from dolfinx_mno.quadrature import (
    owned_dofs,
    quadrature_points,
    quadrature_space,
    selected_cells,
)
from dolfinx_mno.spec import ClosureSpec
from dolfinx_mno.validation import check_integer

__all__ = ["ClosureSampler", "Tendency", "describe"]


class Tendency:
    """A right-hand side ``N(u)`` of ``∂u/∂t = N(u)`` as a function ``t`` in a space.

    * **Weak** (``definition`` is a linear form ``R(v)``, ``v`` a test function of
      ``space``): ``t`` solves ``(t, v) = R(v)`` for all ``v``, with the mass matrix
      assembled once (PETSc, CG + Jacobi). Use it for operators with derivatives that
      are not defined pointwise, e.g. diffusion
      ``R(v) = −(∇u, ∇v) + (∇u·n, v)_∂Ω``.
    * **Pointwise** (``definition`` is a UFL expression without arguments, e.g. ``u**2``):
      ``t`` is its interpolant in ``space``; choose ``space`` so that it is exact where you
      need it (``u**2`` of a degree-``k`` ``u`` lies in the degree-``2k`` space).

    Args:
        definition: The linear form or expression; it refers to the state function.
        space: The space of ``t``; for a form, by default (and necessarily) its test space.
        petsc_options: Options of the mass solve (weak only), overriding
            :data:`dolfinx_mno.data.restriction.MASS_SOLVER_OPTIONS`.
        name: Name of :attr:`function`.

    Example:
        >>> tendency = Tendency(-ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx)
        >>> t = tendency()  # a fem.Function on v's space, for the current u
    """

    def __init__(
        self,
        definition: ufl.Form | ufl.core.expr.Expr,
        space: fem.FunctionSpace | None = None,
        *,
        petsc_options: dict[str, typing.Any] | None = None,
        name: str = "tendency",
    ):
        """Compile the definition (collective); see the class docstring for the arguments."""
        self.definition = definition
        self._solver: MassSolver | None = None
        if isinstance(definition, ufl.Form):
            arguments = definition.arguments()
            if len(arguments) != 1 or arguments[0].number() != 0:
                raise ValueError(
                    "A weak tendency must be a linear form (exactly one test function), got "
                    f"a form with {len(arguments)} argument(s)."
                )
            test_space = arguments[0].ufl_function_space()
            if space is not None and space != test_space:
                raise ValueError("For a weak tendency, space must be the test function's space.")
            space = typing.cast(fem.FunctionSpace, test_space)
            self.kind = "weak"
            self._solver = MassSolver(
                space, ufl.Measure("dx", domain=space.mesh), petsc_options=petsc_options
            )
            self.function = fem.Function(space, name=name, dtype=self._solver.dtype)
            self._form = fem.form(definition, dtype=self._solver.dtype)
        else:
            expression = ufl.as_ufl(definition)
            if space is None:
                raise ValueError("A pointwise tendency (a UFL expression) needs a space.")
            if extract_arguments(expression):
                raise ValueError(
                    "A pointwise tendency must not contain test or trial functions; pass a "
                    "linear form for a weak tendency."
                )
            if tuple(expression.ufl_shape) != tuple(space.value_shape):
                raise ValueError(
                    f"The tendency has shape {tuple(expression.ufl_shape)} but the space has "
                    f"value shape {tuple(space.value_shape)}."
                )
            self.kind = "pointwise"
            dtype = _dtype_of(expression, space)
            self.function = fem.Function(space, name=name, dtype=dtype)
            self._expression = fem.Expression(
                expression, space.element.interpolation_points, dtype=dtype
            )

    @property
    def space(self) -> fem.FunctionSpace:
        """The space of the tendency."""
        return typing.cast(fem.FunctionSpace, self.function.function_space)

    def __call__(self) -> fem.Function:
        """Evaluate the tendency at the current state (collective); returns :attr:`function`.

        Raises:
            RuntimeError: On all ranks, if the mass solve of a weak tendency did not converge.
        """
        if self._solver is not None:
            self._solver.solve(self._form, self.function)
        else:
            self.function.interpolate(self._expression)
            self.function.x.scatter_forward()
        return self.function

    def __str__(self) -> str:
        """The definition, for metadata (the same text in every run of a script)."""
        return f"{self.kind}: {describe(self.definition)}"


def _dtype_of(expression: ufl.core.expr.Expr, space: fem.FunctionSpace) -> np.dtype:
    dtypes = {
        np.dtype(c.dtype)
        for c in ufl.algorithms.extract_coefficients(expression)
        if hasattr(c, "dtype")
    }
    if len(dtypes) > 1:
        raise TypeError(f"The expression mixes scalar types {sorted(map(str, dtypes))}.")
    return dtypes.pop() if dtypes else np.dtype(space.mesh.geometry.x.dtype)


class ClosureSampler(WithOperands):
    """Closure training samples from snapshots of a fine simulation.

    For a fine state ``u`` (any mesh), :meth:`sample` computes at the points of the
    degree-``quadrature_degree`` rule on the owned coarse cells

    * the **inputs**: the operands evaluated at the filtered state ``ū = R u``; the
      columns are those of :class:`dolfinx_mno.Closure` built with the same operands
      (components operand after operand, each in row-major order, one fused
      :class:`dolfinx.fem.Expression`), so a model trained on them plugs into a closure;
    * the **targets**: the commutator ``c = R t_f − N_c(ū)``, where ``t_f`` is the fine
      tendency (given, or computed by ``fine_tendency``) and ``N_c`` the coarse tendency.

    Steps of :meth:`sample` (collective): ``ū = R u`` is written into ``coarse_state`` (the
    function the operands and the coarse tendency refer to) → ``R t_f`` into
    :attr:`filtered_tendency` → a :class:`Tendency` ``N_c`` is evaluated → one expression
    evaluates ``[operands, R t_f − N_c, x]`` at the points → :attr:`target` (a quadrature
    function) receives the targets.

    Args:
        restriction: The filter ``R`` onto the coarse space ``V_c``
            (:class:`~dolfinx_mno.data.restriction.L2Projection` or
            :class:`~dolfinx_mno.data.restriction.Interpolation`). The same filter is applied
            to the state and to the fine tendency.
        coarse_state: The filtered state ``ū``, a function on ``V_c``; overwritten by each
            sample.
        operands: UFL expressions on the coarse mesh (``ū``, ``grad(ū)``, ``x``, ...), the
            closure's operands: an :class:`~dolfinx_mno.Operands`, a dict
            ``{name: expression}`` or a list. Their names are the data file's ``operands``
            and name its input columns.
        coarse_tendency: ``N_c(ū)``: a UFL expression of ``coarse_state``, evaluated exactly
            at the points, or a :class:`Tendency` on the coarse mesh (e.g. weak diffusion).
            Its shape is that of ``V_c``'s values, the target's ``value_shape``.
        quadrature_degree: Degree of Basix's default rule carrying inputs and targets (the
            closure's quadrature degree).
        fine_tendency: Computes the fine tendency ``t_f`` from the fine state, e.g. a
            :class:`Tendency` on the fine mesh; or pass ``t_f`` to :meth:`sample` (e.g. the
            time difference ``(u^{n+1} − u^n)/Δt`` of the fine run).
        tendency_restriction: The filter applied to the fine tendency, when it differs from
            the state's (default: ``restriction``). Use it for flux closures: the state is
            filtered into ``V_c`` and the fine flux by exact cell averages
            (:class:`~dolfinx_mno.data.restriction.CellAverage`) into a DG₀ space, which is
            then the space of :attr:`filtered_tendency` and sets the target's
            ``value_shape``.
        name: Name of :attr:`target`.
        cells: Sample these coarse cells only (local indices, as for
            :class:`dolfinx_mno.Closure`'s ``cells=``): data for a closure that runs on
            part of the mesh. :attr:`target` is zero elsewhere. ``None`` (the default):
            every cell.

    Shapes:
        ``inputs`` ``(num_local_points, num_inputs)``, ``targets``
        ``(num_local_points, *value_shape)``, with ``num_local_points = num_owned_cells ×
        num_points_per_cell`` (the owned cells among ``cells``, if given), in the
        ``(cell, point)`` order of the closure's dofs.

    Raises:
        ValueError: Operands or tendency on another mesh, shapes that do not match ``V_c``,
            ``coarse_state`` not on the restriction's space; ``cells`` as
            :class:`dolfinx_mno.Closure` refuses them (on every rank).
        TypeError: Unsupported dtypes.
    """

    def __init__(
        self,
        restriction: Restriction,
        coarse_state: fem.Function,
        operands: OperandsLike,
        coarse_tendency: ufl.core.expr.Expr | Tendency,
        quadrature_degree: int = 2,
        *,
        fine_tendency: Callable[[], fem.Function] | None = None,
        tendency_restriction: Restriction | None = None,
        name: str = "closure_target",
        cells: npt.ArrayLike | None = None,
    ):
        """Set up the sampler (collective); see the class docstring for the arguments."""
        # Validate everything before the first collective call (JIT compilation).
        if not isinstance(restriction, Restriction):
            raise TypeError("restriction must be an Interpolation, an L2Projection or alike.")
        space = restriction.space
        if not isinstance(coarse_state, fem.Function) or coarse_state.function_space != space:
            raise ValueError("coarse_state must be a fem.Function on the restriction's space.")
        mesh = space.mesh
        if tendency_restriction is None:
            tendency_restriction = restriction
        elif not isinstance(tendency_restriction, Restriction):
            raise TypeError("tendency_restriction must be a CellAverage, an L2Projection or alike.")
        elif tendency_restriction.space.mesh.ufl_domain() != mesh.ufl_domain():
            raise ValueError("tendency_restriction must restrict onto the coarse mesh.")
        tendency_space = tendency_restriction.space
        operands = Operands(operands, mesh=mesh)
        value_shape = tuple(tendency_space.value_shape)
        if isinstance(coarse_tendency, Tendency):
            if coarse_tendency.space.mesh.ufl_domain() != mesh.ufl_domain():
                raise ValueError("The coarse tendency must live on the coarse mesh.")
            coarse_value: ufl.core.expr.Expr = coarse_tendency.function
        else:
            coarse_value = ufl.as_ufl(coarse_tendency)
            domains = ufl.domain.extract_domains(coarse_value)
            if any(d != mesh.ufl_domain() for d in domains):
                raise ValueError("The coarse tendency must live on the coarse mesh.")
        if tuple(coarse_value.ufl_shape) != value_shape:
            raise ValueError(
                f"The coarse tendency has shape {tuple(coarse_value.ufl_shape)}, but the "
                f"filtered fine tendency has the value shape {value_shape} of the space it is "
                "restricted to."
            )
        check_integer(quadrature_degree, "quadrature_degree")
        if fine_tendency is not None and not callable(fine_tendency):
            raise TypeError("fine_tendency must be callable (e.g. a Tendency) or None.")
        dtype, state_dtype = operands.dtype, np.dtype(coarse_state.dtype)
        if state_dtype != dtype:
            raise TypeError(f"coarse_state is {state_dtype}, the operands {dtype}: use one dtype.")

        self.restriction = restriction
        self.tendency_restriction = tendency_restriction
        self.coarse_state = coarse_state
        self._operands = operands
        self._coarse_tendency = coarse_tendency
        self._fine_tendency = fine_tendency
        self.quadrature_degree = int(quadrature_degree)
        self.value_shape = value_shape
        self.dtype = dtype

        self.num_inputs = operands.num_inputs
        num_outputs = int(np.prod(value_shape, dtype=int))
        gdim = mesh.geometry.dim
        x = ufl.SpatialCoordinate(mesh)
        points = quadrature_points(mesh, self.quadrature_degree)
        self.points_per_cell = int(points.shape[0])
        tdim = mesh.topology.dim
        owned = mesh.topology.index_map(tdim).size_local

        # Collective from here on.
        with rank_local(mesh.comm, "Setting up the closure sampler"):
            selected = selected_cells(cells, mesh)
        same_everywhere(
            mesh.comm, "Setting up the closure sampler", restricted_to_cells=selected is not None
        )
        self._cells = np.arange(owned, dtype=np.int32) if selected is None else selected
        self._num_cells = int(self._cells.size)
        self.num_points = mesh.comm.allreduce(self._num_cells) * self.points_per_cell
        self._restricted = selected is not None
        #: The samples' global cell indices: by position, the same on any partition.
        self._cell_index = geometric_cell_index(mesh)[self._cells]
        #: ``R t_f``: the filtered fine tendency, on ``V_c``.
        self.filtered_tendency = fem.Function(tendency_space, name="filtered_tendency", dtype=dtype)
        commutator = self.filtered_tendency - coarse_value
        target_components, _ = operand_components([commutator])
        components = [*operands.components, *target_components]
        components += [x[i] for i in range(gdim)]
        self._expression = fem.Expression(ufl.as_vector(components), points, dtype=dtype)
        self._buffer = np.zeros(
            (self._num_cells, self.points_per_cell, self.num_inputs + num_outputs + gdim),
            dtype=dtype,
        )
        self._num_outputs = num_outputs
        #: The targets of the last sample, a quadrature function of shape ``value_shape``.
        self.target = fem.Function(
            quadrature_space(mesh, self.quadrature_degree, value_shape), name=name, dtype=dtype
        )
        self._target_dofs = owned_dofs(
            self.target.function_space, self._num_cells if selected is None else selected
        )

    @property
    def spec(self) -> ClosureSpec:
        """The closure a model trained on these samples is for.

        Operands, value shape and quadrature degree; store it with the trained model,
        ``save_model(path, model, spec=sampler.spec)``.
        """
        return ClosureSpec.from_operands(self._operands, self.value_shape, self.quadrature_degree)

    def sample(
        self,
        fine_state: fem.Function,
        fine_tendency: fem.Function | ufl.core.expr.Expr | None = None,
    ) -> ClosureSample:
        """Filter a fine snapshot and return closure inputs and targets (collective).

        Args:
            fine_state: The fine state ``u`` (any mesh covering the coarse one).
            fine_tendency: The fine tendency ``t_f`` (a function of the same value shape on
                the fine mesh, or a UFL expression on it if the tendency restriction takes
                expressions, as :class:`~dolfinx_mno.data.restriction.CellAverage` does);
                by default computed with ``fine_tendency`` of the constructor.

        Returns:
            This rank's inputs, targets, global cell indices and point coordinates (new
            arrays); :attr:`target` and ``coarse_state`` are updated too.

        Raises:
            ValueError: No fine tendency, or one of the wrong shape.
            RuntimeError: A mass solve did not converge.
        """
        if fine_tendency is None and self._fine_tendency is None:
            raise ValueError(
                "No fine tendency: pass fine_tendency to sample() or to the constructor."
            )
        takes_expressions = isinstance(self.tendency_restriction, CellAverage)
        if fine_tendency is not None and not isinstance(fine_tendency, fem.Function):
            if not (takes_expressions and isinstance(fine_tendency, ufl.core.expr.Expr)):
                raise TypeError(
                    "fine_tendency must be a fem.Function (or a UFL expression, with a "
                    f"CellAverage tendency restriction), got {type(fine_tendency).__name__}."
                )
        if fine_tendency is None:
            assert self._fine_tendency is not None
            fine_tendency = self._fine_tendency()
        self.restriction(fine_state, out=self.coarse_state)
        self.tendency_restriction(
            fine_tendency,  # type: ignore[arg-type]  # an expression only for CellAverage
            out=self.filtered_tendency,
        )
        if isinstance(self._coarse_tendency, Tendency):
            self._coarse_tendency()
        mesh = self.coarse_state.function_space.mesh
        self._expression.eval(mesh, self._cells, values=self._buffer)
        table = self._buffer.reshape(-1, self._buffer.shape[-1])
        end = self.num_inputs + self._num_outputs
        targets = table[:, self.num_inputs : end]
        self.target.x.array[self._target_dofs] = targets.reshape(-1)
        self.target.x.scatter_forward()
        return ClosureSample(
            inputs=np.ascontiguousarray(table[:, : self.num_inputs]),
            targets=np.ascontiguousarray(targets).reshape(-1, *self.value_shape),
            cell_index=self._cell_index.copy(),
            comm=mesh.comm,
            coordinates=np.ascontiguousarray(table[:, end:]),
        )

    def metadata(self, fine_mesh: typing.Any = None) -> dict[str, typing.Any]:
        """What a data file should record about these samples (collective).

        Args:
            fine_mesh: The fine mesh, whose size is recorded too.

        Returns:
            JSON-serialisable metadata: operands, input names, shapes, quadrature, the
            filter, the coarse tendency and the mesh sizes; with ``cells=``, also
            ``sampled_cells`` and ``coarse_cells`` (global counts).
        """
        restriction = self.restriction
        metadata: dict[str, typing.Any] = {
            "operands": list(self._operands.names),
            "operand_widths": self.operand_widths,
            "input_names": self.input_names,
            "quadrature_degree": self.quadrature_degree,
            "target": "R(fine tendency) - coarse tendency(R(fine state))",
            "coarse_tendency": (
                str(self._coarse_tendency)
                if isinstance(self._coarse_tendency, Tendency)
                else f"pointwise: {describe(self._coarse_tendency)}"
            ),
            "restriction": getattr(restriction, "method", type(restriction).__name__),
            "tendency_restriction": getattr(
                self.tendency_restriction, "method", type(self.tendency_restriction).__name__
            ),
            "coarse_mesh": mesh_summary(self.coarse_state.function_space.mesh),
            "coarse_space": str(self.coarse_state.function_space.ufl_element()),
        }
        if self._restricted:  # only then: files of every cell keep their metadata
            mesh = self.coarse_state.function_space.mesh
            metadata["sampled_cells"] = self.num_points // self.points_per_cell
            metadata["coarse_cells"] = mesh.topology.index_map(mesh.topology.dim).size_global
        degree = getattr(restriction, "quadrature_degree", None)
        if degree is not None:
            metadata["restriction_quadrature_degree"] = int(degree)
        if fine_mesh is not None:
            metadata["fine_mesh"] = mesh_summary(fine_mesh)
        return metadata
