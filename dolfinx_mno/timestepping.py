"""Small time loops for closure coupling: IMEX (explicit closure) and fully implicit.

In an IMEX step the resolved physics is implicit (the bilinear form ``a``) and the closure
is explicit: it is evaluated at the previous state ``u_n``::

    closure = Closure(model, [u_n, ufl.grad(u_n)], quadrature_degree=2)
    a = (u * v + dt * inner(grad(u), grad(v))) * dx
    L = (u_n * v + dt * f * v) * dx + dt * inner(closure, v) * closure.dx
    problem = dolfinx_mno.petsc.LinearProblem(a, L, u=u_h, petsc_options_prefix="heat_")
    stepper = IMEXStepper(problem, u_h, u_n, dt=0.01, time=t)
    stepper.run(100)

In an implicit (backward Euler) step the closure reads the new state ``u`` and Newton's
method solves for it, with the closure tangent in the Jacobian::

    closure = Closure(model, [ufl.grad(u_h)], value_shape=(2,), quadrature_degree=2)
    F = ((u_h - u_n) / dt * v + inner(grad(u_h), grad(v)) - f * v) * dx
    F += inner(closure, grad(v)) * closure.dx
    problem = dolfinx_mno.petsc.NonlinearProblem(F, u_h, petsc_options_prefix="heat_")
    stepper = ImplicitStepper(problem, u_h, u_n, dt=0.01, time=t)
    stepper.run(100)

**Time-dependent data.** A ``before_step(stepper, t_new)`` hook, passed to
:meth:`~ImplicitStepper.run` or :meth:`~ImplicitStepper.step`, runs at every step after the
time constant is set to ``t_new`` and before the closures are updated and the step is
solved; Dirichlet data and other coefficients are set there in one line::

    stepper.run(100, before_step=lambda stepper, t: g.interpolate(lambda x: exact(x, t)))

**Older states.** A scheme or a closure that reads states before ``u_n`` (a two-level
scheme such as Adams–Bashforth 2, or a closure with memory of the last step) gets them
from ``older=[u_nm1, ...]``: ``older[j]`` holds ``u_{n-1-j}``, and each successful step
shifts them (``older[0]`` becomes the ``u_n`` it started from). Set them with the initial
state; after a failed step they are unchanged::

    u_nm1 = fem.Function(V, name="u_nm1")         # u_{n-1}; here u_{-1} = u_0
    u_nm1.x.array[:] = u_n.x.array
    closure = Closure(model, [u_n, u_n - u_nm1], quadrature_degree=2)
    ...
    stepper = IMEXStepper(problem, u_h, u_n, dt=0.01, older=[u_nm1])

**Several stages.** :class:`SSPRK3Stepper` takes three IMEX steps per time step and
combines them as Shu and Osher's strong-stability-preserving Runge–Kutta method of order 3
(SSP-RK3): the explicit terms (advection, forcing, closures) are integrated to third order
and with SSP-RK3's stability region, which holds the imaginary axis up to ``√3`` (forward
Euler's holds none of it). The implicit terms stay first order, so put in ``a`` only what
must be implicit (a constraint such as a streamfunction, or stiff diffusion)::

    stepper = SSPRK3Stepper(problem, u_h, u_n, dt=0.01)   # the same problem as IMEXStepper

The closures are updated at every stage. ``hold_closures=True`` updates them once per
step, at ``uⁿ``, and keeps them over the stages: a third of their cost, at the price of a
first-order closure term (a neural operator that costs more than a step's solves).

**Statistics.** Every successful step appends a :class:`StepStatistics` to
``stepper.history``: the time reached, the wall time, the solver's converged reason and its
iterations (Newton and total KSP iterations for :class:`ImplicitStepper`, KSP iterations
for :class:`IMEXStepper`). The progress bar of :meth:`~ImplicitStepper.run` shows those of
the step just taken.
"""

from __future__ import annotations

import dataclasses
import time as _time
from collections.abc import Callable, Sequence

import numpy as np
from dolfinx import fem
from tqdm.auto import tqdm

from dolfinx_mno._mpi import rank_local
from dolfinx_mno.closure import ClosureEvaluationError
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.validation import is_integer_at_least

__all__ = ["IMEXStepper", "ImplicitStepper", "SSPRK3Stepper", "StepStatistics"]


@dataclasses.dataclass(frozen=True, slots=True)
class StepStatistics:
    """What one successful time step took.

    Attributes:
        step: Number of the step, counted from 1 over the stepper's life.
        t: Time at the end of the step.
        seconds: Wall time of the step on this rank: the ``before_step`` hook, the closure
            updates, the solve and the copy into ``u_previous``.
        converged_reason: The converged reason of the SNES (:class:`ImplicitStepper`) or
            KSP (:class:`IMEXStepper`), positive.
        linear_iterations: KSP iterations of the step, summed over its Newton iterations.
        newton_iterations: SNES iterations; ``None`` for :class:`IMEXStepper`.
    """

    step: int
    t: float
    seconds: float
    converged_reason: int
    linear_iterations: int
    newton_iterations: int | None = None

    def postfix(self) -> dict[str, str | int]:
        """The progress-bar postfix: time, Newton iterations (if any), KSP iterations."""
        newton = {} if self.newton_iterations is None else {"newton": self.newton_iterations}
        return {"t": f"{self.t:.4g}", **newton, "ksp": self.linear_iterations}


StepStatistics.__init__.__doc__ = "Record one step; see the class docstring for the fields."


#: ``before_step(stepper, t_new)``: set time-dependent data before a step is solved.
BeforeStep = Callable[["_Stepper", float], None]


def _check_dt_kept(stepper: _Stepper, dt: float, t_new: float) -> None:
    """Refuse a ``before_step`` hook that changed ``stepper.dt`` (restored to ``dt``).

    The step's new time ``t + dt`` is set before the hook runs: the solve would use the
    new step size (a ``fem.Constant`` the hook set too) and the stepper's time the old one.
    """
    if stepper.dt == dt:
        return
    changed, stepper.dt = stepper.dt, dt
    raise ValueError(
        f"before_step changed stepper.dt from {dt:g} to {changed:g} in the step to "
        f"t = {t_new:g}, whose time was already set from the old step size. Change the "
        "step size between steps: set stepper.dt (and the fem.Constant holding it) before "
        "stepper.step()."
    )


class _Stepper[Problem: (LinearProblem, NonlinearProblem)]:
    """The time loop shared by the steppers; subclasses say how one step is solved."""

    solver_name = "solver"
    problem_type: type = object

    def __init__(
        self,
        problem: Problem,
        u: fem.Function,
        u_previous: fem.Function,
        dt: float,
        t0: float = 0.0,
        time: fem.Constant | None = None,
        older: Sequence[fem.Function] = (),
    ):
        """Set up the time loop; see the class docstring for the arguments."""
        expected = self.problem_type
        if not isinstance(problem, expected):
            raise TypeError(
                f"{type(self).__name__} takes a dolfinx_mno.petsc.{expected.__name__}, got "
                f"{type(problem).__module__}.{type(problem).__name__}."
            )
        if not isinstance(problem.u, fem.Function) or not isinstance(u, fem.Function):
            raise TypeError(
                f"{type(self).__name__} advances one unknown, a dolfinx.fem.Function (of a "
                "mixed space for several fields); a block problem's list of unknowns is not "
                "supported. Use one mixed function (ufl.split(w) in the forms), or loop by "
                "hand: problem.solve(), then copy each unknown into its previous state."
            )
        if problem.u is not u:
            raise ValueError(
                "u must be the problem's solution function (problem.u): the solve writes "
                "problem.u, so a step would copy into u_previous a function that never "
                f"changes. Pass the same function as u=... to {expected.__name__} and here."
            )
        if isinstance(dt, bool) or not isinstance(dt, int | float | np.integer | np.floating):
            raise TypeError(
                f"dt must be a positive number, got a {type(dt).__name__}. A step size "
                "held in a fem.Constant of the forms is data: pass dt=float(c.value), and "
                "to change it, set both (c.value and stepper.dt) between steps, before "
                "stepper.step()."
            )
        if not dt > 0:
            raise ValueError(f"The time step must be positive, got {dt}.")
        if u.function_space != u_previous.function_space:
            raise ValueError("u and u_previous must live on the same function space.")
        older = list(older)
        for j, function in enumerate(older):
            if not isinstance(function, fem.Function):
                raise TypeError(
                    f"older[{j}] must be a dolfinx.fem.Function, got {type(function).__name__}."
                )
            if function.function_space != u.function_space:
                raise ValueError(
                    f"older[{j}] ('{function.name}') must live on the function space of u."
                )
        taken = {id(u), id(u_previous)}
        if len({id(f) for f in older} - taken) != len(older):
            raise ValueError(
                "The older states must be distinct functions, other than u and u_previous."
            )
        self.problem: Problem = problem
        self.u = u
        self.u_previous = u_previous
        self.dt = float(dt)
        self.t = float(t0)
        self.time = time
        #: ``[u_{n-1}, u_{n-2}, ...]``: the states before ``u_previous``, shifted each step.
        self.older: list[fem.Function] = older
        self.num_steps = 0
        #: The statistics of every successful step, in order.
        self.history: list[StepStatistics] = []

    def _solve(self) -> tuple[int, int, int | None]:
        """Solve for ``u`` at the new time.

        Returns:
            The solver's converged reason, its KSP iterations and its Newton iterations
            (``None`` for a linear solve).
        """
        raise NotImplementedError

    def step(self, before_step: BeforeStep | None = None) -> float:
        """Take one step; returns the new time.

        The step sets the time constant to ``t + dt``, calls ``before_step(self, t + dt)``
        (``self.t`` is still the old time), solves (which updates the closures), checks
        convergence, shifts the older states (``older[0]`` gets ``u_previous``), copies
        ``u`` into ``u_previous`` and appends a
        :class:`StepStatistics` to :attr:`history`.

        Args:
            before_step: Sets time-dependent data (Dirichlet values, sources) for the new
                time, on every rank. If it raises on any rank, the step raises on every
                rank (:func:`dolfinx_mno._mpi.rank_local`). It must not change
                :attr:`dt` (``ValueError``: the new time is already set); change the step
                size between steps.

        Raises:
            RuntimeError: If the solver did not converge.
            ClosureEvaluationError: If a closure update failed (with a note giving the
                time).
            Exception: What ``before_step`` raised (with a note giving the time): the
                same error where it raised alike on every rank, else, on every rank, its
                type on the first failing rank with the message ``"The before_step hook
                failed on rank(s) [r, ...] (k of n ranks); on rank r: ..."``.

            On any error the step is undone: ``u`` and ``u_previous`` hold ``u_n`` (and the
            older states are unchanged), the closures of :class:`ImplicitStepper` and
            :class:`SSPRK3Stepper` their values at ``u_n``, the time constant holds the old
            time, :attr:`t`, :attr:`num_steps` and :attr:`history` are unchanged. What
            ``before_step`` changed is not undone: it sets its data from the time it is
            given, so the next attempt sets them again.
        """
        dt = self.dt
        t_new = self.t + dt
        start = _time.perf_counter()
        if self.time is not None:
            self.time.value = t_new  # type: ignore[assignment]
        try:
            if before_step is not None:
                # Agreed on before the solve's collectives: raises on every rank or none.
                with rank_local(self.u.function_space.mesh.comm, "The before_step hook"):
                    before_step(self, t_new)
                    _check_dt_kept(self, dt, t_new)
            reason, linear_iterations, newton_iterations = self._solve()
        except Exception as err:
            err.add_note(f"In the time step from t = {self.t:g} to t = {t_new:g}.")
            self._restore(err)
            raise
        if reason <= 0:
            self._restore()
            raise RuntimeError(
                f"The {self.solver_name} diverged at t = {t_new:g} (reason {reason})."
            )
        self.u.x.scatter_forward()
        for j in range(len(self.older) - 1, -1, -1):  # the oldest first
            newer = self.older[j - 1] if j > 0 else self.u_previous
            self.older[j].x.array[:] = newer.x.array
        self.u_previous.x.array[:] = self.u.x.array
        self.t = t_new
        self.num_steps += 1
        self.history.append(
            StepStatistics(
                step=self.num_steps,
                t=t_new,
                seconds=_time.perf_counter() - start,
                converged_reason=reason,
                linear_iterations=linear_iterations,
                newton_iterations=newton_iterations,
            )
        )
        return self.t

    def _restore(self, error: Exception | None = None) -> None:
        """Undo a failed step: ``u`` back to ``u_n``, the time constant to the old time.

        Args:
            error: What failed (a subclass may add a note to it).
        """
        if self.time is not None:
            self.time.value = self.t  # type: ignore[assignment]
        self.u.x.array[:] = self.u_previous.x.array

    def run(
        self,
        num_steps: int,
        callback: Callable[[_Stepper], None] | None = None,
        progress: bool = True,
        desc: str = "time steps",
        before_step: BeforeStep | None = None,
    ) -> float:
        """Take ``num_steps`` steps; returns the time.

        Args:
            num_steps: Number of steps.
            callback: Called as ``callback(self)`` after each step (output, diagnostics;
                ``self.history[-1]`` holds the step's statistics).
            progress: Show a progress bar (on rank 0) labelled ``desc``, whose postfix gives
                the time, the Newton iterations and the KSP iterations of the step just
                taken.
            desc: Label of the progress bar.
            before_step: Called as ``before_step(self, t_new)`` before each step is solved
                (see :meth:`step`).
        """
        comm = self.u.function_space.mesh.comm
        bar = tqdm(
            total=num_steps,
            disable=not progress or comm.rank != 0,
            desc=desc,
            unit="step",
        )
        with bar:
            for _ in range(num_steps):
                self.step(before_step)
                if callback is not None:
                    callback(self)
                # The postfix first: update() redraws the bar, with the postfix it has.
                bar.set_postfix(self.history[-1].postfix(), refresh=False)
                bar.update()
        return self.t


class IMEXStepper(_Stepper[LinearProblem]):
    """Advance ``u_{n+1}`` from ``u_n`` with closures frozen at ``u_n``.

    Each :meth:`step` sets the time constant to ``t + dt``, calls the ``before_step`` hook
    if one is given, updates the closures (at the previous state, through
    :meth:`LinearProblem.solve`), solves, checks convergence, copies ``u`` into
    ``u_previous`` and records the KSP iterations in :attr:`history`.

    Args:
        problem: The linear problem of one step; its closures read ``u_previous``.
        u: The solution function of ``problem``.
        u_previous: The previous state, read by the forms and closures.
        dt: Time step.
        t0: Initial time.
        time: Optional constant holding the time, set to the new time before each solve
            (for time-dependent sources and boundary data).
        closure_interval: Update the closures every ``closure_interval`` steps (at steps
            0, k, 2k, ...) and keep their values in between. A closure much more expensive
            than a step, such as a neural operator, changes slowly on the time scale of a
            small explicit step; holding it over ``k`` steps adds an error of order
            ``k Δt`` to its time integration (first order, like IMEX Euler itself).
        older: ``[u_{n-1}, u_{n-2}, ...]``, states before ``u_previous`` that the forms or
            closures read, on the space of ``u``; each step shifts them (see the module
            docstring).
        hold_closures: With several :attr:`stages` (:class:`SSPRK3Stepper`): update the
            closures once per step, at ``uⁿ``, and keep their values over the step's
            stages, instead of updating them at every stage. A closure then costs a
            third as much per SSP-RK3 step, and its term is integrated to first order
            in time (the rest of the step keeps its order).

    Raises:
        TypeError: A problem that is not a :class:`dolfinx_mno.petsc.LinearProblem`, or
            a block problem (a list of unknowns).
        ValueError: ``u`` that is not ``problem.u``, a time step that is not positive,
            ``u`` and ``u_previous`` (or an older state) on different spaces, a function
            given twice, or a bad ``closure_interval``; with several :attr:`stages` (a
            subclass such as :class:`SSPRK3Stepper`), a ``closure_interval`` other than 1
            or older states; with one stage, ``hold_closures``.
    """

    solver_name = "linear solver"
    problem_type = LinearProblem

    def __init__(
        self,
        problem: LinearProblem,
        u: fem.Function,
        u_previous: fem.Function,
        dt: float,
        t0: float = 0.0,
        time: fem.Constant | None = None,
        closure_interval: int = 1,
        older: Sequence[fem.Function] = (),
        hold_closures: bool = False,
    ):
        """Set up the time loop; see the class docstring for the arguments."""
        if not is_integer_at_least(closure_interval, 1):
            raise ValueError(
                f"closure_interval must be a positive integer, got {closure_interval!r}."
            )
        if len(self.stages) > 1 and (closure_interval != 1 or len(older) != 0):
            raise ValueError(
                f"{type(self).__name__} updates the closures at every stage and keeps one "
                f"level: closure_interval must be 1 and older empty, got {closure_interval!r} "
                f"and {len(older)} older states."
            )
        if not isinstance(hold_closures, bool):
            raise TypeError(f"hold_closures must be True or False, got {hold_closures!r}.")
        if hold_closures and len(self.stages) == 1:
            raise ValueError(
                f"hold_closures keeps the closures over the stages of a step, and "
                f"{type(self).__name__} takes one stage: use closure_interval to hold them "
                "over steps."
            )
        super().__init__(problem, u, u_previous, dt, t0, time, older)
        self.closure_interval = int(closure_interval)
        self.hold_closures = hold_closures
        self._closures_at_stage = False  # a failed step left them at a later stage's state

    #: The step's stages in Shu–Osher form: ``(a, b)`` per stage, the stage's state being
    #: ``a uⁿ + b E(w)`` with ``E`` the IMEX step from the last stage's state ``w`` (``uⁿ``
    #: for the first). One stage ``(0, 1)``: IMEX Euler.
    stages: tuple[tuple[float, float], ...] = ((0.0, 1.0),)

    def _solve(self) -> tuple[int, int, int | None]:
        update = self.num_steps % self.closure_interval == 0
        if len(self.stages) == 1:
            self.problem.solve(update_closures=update)
            ksp = self.problem.solver
            reason: int = ksp.getConvergedReason()  # type: ignore[assignment]
            return reason, ksp.getIterationNumber(), None
        start = self.u_previous.x.array.copy()  # uⁿ
        iterations = 0
        try:
            for stage, (a, b) in enumerate(self.stages):
                self.problem.solve(update_closures=stage == 0 or not self.hold_closures)
                ksp = self.problem.solver
                reason = ksp.getConvergedReason()  # type: ignore[assignment]
                iterations += ksp.getIterationNumber()  # type: ignore[operator]
                if reason <= 0:
                    break
                self.u.x.array[:] = a * start + b * self.u.x.array
                if stage < len(self.stages) - 1:
                    self.u_previous.x.array[:] = self.u.x.array
                    # the next stage updates them there (unless held at uⁿ)
                    self._closures_at_stage = not self.hold_closures
            if reason > 0:
                self._closures_at_stage = False
        finally:
            self.u_previous.x.array[:] = start  # for the step's copy, or for _restore
        return reason, iterations, None

    def _restore(self, error: Exception | None = None) -> None:
        """Undo a failed step; with several stages the closures too.

        A later stage left them at an intermediate stage state; they are evaluated at
        ``u_n`` again (collective), as after a failed one-stage step.
        """
        super()._restore()
        if self._closures_at_stage:  # not after a hook's error or a first stage's failure
            self._closures_at_stage = False
            _update_closures_at_u_n(self.problem, error, "the failed stage")


def _update_closures_at_u_n(
    problem: LinearProblem | NonlinearProblem, error: Exception | None, last: str
) -> None:
    """Evaluate the closures of ``problem`` at the restored ``u_n`` after a failed step.

    Where that fails too (a model that fails everywhere now), they keep their values and
    ``error`` says so; without ``error`` the failure is raised.

    Args:
        problem: The step's problem.
        error: What failed in the step.
        last: What the closures' values are from, for the note.
    """
    try:
        for closure in problem.closures:
            closure.update()
    except ClosureEvaluationError as failure:
        if error is None:
            raise
        error.add_note(
            "The closures could not be evaluated at the restored state either and hold "
            f"the values of {last}: {failure}"
        )


class SSPRK3Stepper(IMEXStepper):
    """Three IMEX steps per time step, combined as SSP-RK3 (Shu and Osher 1988).

    With ``E`` the IMEX step of ``problem`` (from ``u_previous`` into ``u``)::

        w₁ = E(uⁿ),   w₂ = ¾ uⁿ + ¼ E(w₁),   uⁿ⁺¹ = ⅓ uⁿ + ⅔ E(w₂)

    Three right-hand sides and solves per step with the same matrix (``reuse_matrix=True``
    factorises it once). With ``a`` the mass matrix (only constraints such as a
    streamfunction implicit beside it) the scheme is third order in time; the terms of
    ``a`` beyond the mass matrix are integrated to first order. The closures are updated
    at every stage, at the stage's state (with ``hold_closures=True`` once per step, at
    ``uⁿ``); the time constant holds ``tⁿ⁺¹`` in all three.
    A stage that fails leaves ``u`` and ``u_previous`` at ``uⁿ`` and the closures evaluated
    at ``uⁿ``, as a failed IMEX step does.
    :class:`~dolfinx_mno.rollout.Rollout` differentiates through the three stages.

    Takes the arguments of :class:`IMEXStepper` except ``closure_interval`` (closures are
    updated at every step) and ``older`` (one-level states only).

    Raises:
        ValueError: The arguments :class:`IMEXStepper` refuses, ``closure_interval`` other
            than 1 or older states.
    """

    stages = ((0.0, 1.0), (0.75, 0.25), (1.0 / 3.0, 2.0 / 3.0))


class ImplicitStepper(_Stepper[NonlinearProblem]):
    """Advance ``u_{n+1}`` from ``u_n`` with closures evaluated at ``u_{n+1}`` (Newton).

    Each :meth:`step` sets the time constant to ``t + dt``, calls the ``before_step`` hook
    if one is given, solves the nonlinear problem of the step from the initial guess
    ``u = u_n`` (Newton's method updates the closures at every iterate, and the default
    Jacobian holds their tangents), checks convergence, copies ``u`` into ``u_previous``
    and records the Newton and KSP iterations in :attr:`history`. Use it for closures that
    must be implicit: stiff ones, such as a flux closure of a diffusion problem, whose
    explicit treatment limits the time step.

    Args:
        problem: The nonlinear problem of one step, e.g. backward Euler's residual
            ``(u - u_n) / dt * v * dx + ...``; its closures read ``u``.
        u: The unknown of ``problem``.
        u_previous: The previous state, read by the residual.
        dt: Time step.
        t0: Initial time.
        time: Optional constant holding the time, set to the new time before each solve.
        older: ``[u_{n-1}, u_{n-2}, ...]``, states before ``u_previous`` that the residual
            reads (BDF2, for example), on the space of ``u``; each step shifts them.

    Raises:
        TypeError: A problem that is not a :class:`dolfinx_mno.petsc.NonlinearProblem`,
            or a block problem (a list of unknowns).
        ValueError: ``u`` that is not ``problem.u``, a time step that is not positive,
            ``u`` and ``u_previous`` (or an older state) on different spaces, or a
            function given twice.
    """

    solver_name = "Newton solver"
    problem_type = NonlinearProblem

    def _restore(self, error: Exception | None = None) -> None:
        """Undo a failed step, the closures too: Newton left them at its last iterate.

        They are evaluated at ``u_n`` again (collective). Where that fails too (a model
        that fails everywhere now), they keep their values, and ``error`` says so.
        """
        super()._restore()
        _update_closures_at_u_n(self.problem, error, "Newton's last update")

    def _solve(self) -> tuple[int, int, int | None]:
        self.problem.solve()
        snes = self.problem.solver
        reason: int = snes.getConvergedReason()  # type: ignore[assignment]
        return reason, snes.getLinearSolveIterations(), snes.getIterationNumber()
