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
"""

from __future__ import annotations

from collections.abc import Callable

from dolfinx import fem
from tqdm.auto import tqdm

from dolfinx_mno.petsc import LinearProblem, NonlinearProblem

__all__ = ["IMEXStepper", "ImplicitStepper"]


class _Stepper[Problem: (LinearProblem, NonlinearProblem)]:
    """The time loop shared by the steppers; subclasses say how one step is solved."""

    solver_name = "solver"

    def __init__(
        self,
        problem: Problem,
        u: fem.Function,
        u_previous: fem.Function,
        dt: float,
        t0: float = 0.0,
        time: fem.Constant | None = None,
    ):
        """Set up the time loop; see the class docstring for the arguments."""
        if not dt > 0:
            raise ValueError(f"The time step must be positive, got {dt}.")
        if u.function_space != u_previous.function_space:
            raise ValueError("u and u_previous must live on the same function space.")
        self.problem: Problem = problem
        self.u = u
        self.u_previous = u_previous
        self.dt = float(dt)
        self.t = float(t0)
        self.time = time
        self.num_steps = 0

    def _solve(self) -> int:
        """Solve for ``u`` at the new time; returns the solver's converged reason."""
        raise NotImplementedError

    def step(self) -> float:
        """Take one step; returns the new time.

        Raises:
            RuntimeError: If the solver did not converge.
            ClosureEvaluationError: If a closure update failed (with a note giving the
                time).

            On either error the state is left as it was: ``u`` and ``u_previous`` hold
            ``u_n``, and the time constant the old time.
        """
        t_new = self.t + self.dt
        if self.time is not None:
            self.time.value = t_new  # type: ignore[assignment]
        try:
            reason = self._solve()
        except Exception as err:
            self._restore()
            err.add_note(f"In the time step from t = {self.t:g} to t = {t_new:g}.")
            raise
        if reason <= 0:
            self._restore()
            raise RuntimeError(
                f"The {self.solver_name} diverged at t = {t_new:g} (reason {reason})."
            )
        self.u.x.scatter_forward()
        self.u_previous.x.array[:] = self.u.x.array
        self.t = t_new
        self.num_steps += 1
        return self.t

    def _restore(self) -> None:
        """Undo a failed step: ``u`` back to ``u_n``, the time constant to the old time."""
        if self.time is not None:
            self.time.value = self.t  # type: ignore[assignment]
        self.u.x.array[:] = self.u_previous.x.array

    def run(
        self,
        num_steps: int,
        callback: Callable[[_Stepper], None] | None = None,
        progress: bool = True,
        desc: str = "time steps",
    ) -> float:
        """Take ``num_steps`` steps, calling ``callback(self)`` after each; returns the time.

        A progress bar labelled ``desc`` is shown on rank 0 when ``progress`` is true.
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
                self.step()
                if callback is not None:
                    callback(self)
                bar.update()
                bar.set_postfix(t=f"{self.t:.4g}", refresh=False)
        return self.t


class IMEXStepper(_Stepper[LinearProblem]):
    """Advance ``u_{n+1}`` from ``u_n`` with closures frozen at ``u_n``.

    Each :meth:`step` sets the time constant to ``t + dt``, updates the closures (at the
    previous state, through :meth:`LinearProblem.solve`), solves, checks convergence, and
    copies ``u`` into ``u_previous``.

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
    """

    solver_name = "linear solver"

    def __init__(
        self,
        problem: LinearProblem,
        u: fem.Function,
        u_previous: fem.Function,
        dt: float,
        t0: float = 0.0,
        time: fem.Constant | None = None,
        closure_interval: int = 1,
    ):
        """Set up the time loop; see the class docstring for the arguments."""
        if not isinstance(closure_interval, int) or closure_interval < 1:
            raise ValueError(
                f"closure_interval must be a positive integer, got {closure_interval!r}."
            )
        super().__init__(problem, u, u_previous, dt, t0, time)
        self.closure_interval = closure_interval

    def _solve(self) -> int:
        self.problem.solve(update_closures=self.num_steps % self.closure_interval == 0)
        return self.problem.solver.getConvergedReason()  # type: ignore[return-value]


class ImplicitStepper(_Stepper[NonlinearProblem]):
    """Advance ``u_{n+1}`` from ``u_n`` with closures evaluated at ``u_{n+1}`` (Newton).

    Each :meth:`step` sets the time constant to ``t + dt``, solves the nonlinear problem
    of the step from the initial guess ``u = u_n`` (Newton's method updates the closures
    at every iterate, and the default Jacobian holds their tangents), checks convergence,
    and copies ``u`` into ``u_previous``. Use it for closures that must be implicit: stiff
    ones, such as a flux closure of a diffusion problem, whose explicit treatment limits
    the time step.

    Args:
        problem: The nonlinear problem of one step, e.g. backward Euler's residual
            ``(u - u_n) / dt * v * dx + ...``; its closures read ``u``.
        u: The unknown of ``problem``.
        u_previous: The previous state, read by the residual.
        dt: Time step.
        t0: Initial time.
        time: Optional constant holding the time, set to the new time before each solve.
    """

    solver_name = "Newton solver"

    def _solve(self) -> int:
        self.problem.solve()
        return self.problem.solver.getConvergedReason()  # type: ignore[return-value]
