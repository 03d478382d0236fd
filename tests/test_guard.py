"""The guard: DOLFINx's own problems refuse forms with closures, which they never update."""

import gc

from mpi4py import MPI

import dolfinx.fem.petsc
import numpy as np
import pytest
import ufl
from analytic import FluxModel
from dolfinx import fem, mesh
from problems import DIRECT, Cubic

import dolfinx_mno as mno
from dolfinx_mno.guard import install_problem_guard
from dolfinx_mno.petsc import LinearProblem


def _closure_forms(msh):
    """A residual, and a bilinear and linear form, each with one closure named 'flux'/'c'."""
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    v, w = ufl.TestFunction(V), ufl.TrialFunction(V)
    flux = mno.Closure(FluxModel().double(), [u, ufl.grad(u)], (2,), 2, name="flux")
    F = ufl.inner(flux, ufl.grad(v)) * flux.dx - v * ufl.dx
    cubic = mno.Closure(Cubic().double(), [u], quadrature_degree=2, name="c")
    return u, F, w * v * ufl.dx, cubic * v * cubic.dx


@pytest.mark.mpi
def test_dolfinx_problems_refuse_forms_with_closures(capfd):
    """DOLFINx's own problems raise (before any collective) and name the fix."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 1, 1)  # 3 ranks: one owns no cell
    u, F, a, L = _closure_forms(msh)
    nonlinear = (
        "dolfinx.fem.petsc.NonlinearProblem does not update closures, so closure(s) 'flux' "
        "would enter the form with whatever values they hold. Use "
        "dolfinx_mno.petsc.NonlinearProblem (same arguments), which updates them at every "
        "Newton iterate."
    )
    linear = (
        "dolfinx.fem.petsc.LinearProblem does not update closures, so closure(s) 'c' would "
        "enter the form with whatever values they hold. Use dolfinx_mno.petsc.LinearProblem "
        "(same arguments), which updates them before every solve, or, with closures=[], "
        "assembles the values they hold (e.g. to project them for output)."
    )
    with pytest.raises(TypeError) as info:
        dolfinx.fem.petsc.NonlinearProblem(F, u, petsc_options_prefix="plain_nl_")
    assert str(info.value) == nonlinear
    with pytest.raises(TypeError) as info:
        dolfinx.fem.petsc.NonlinearProblem(
            F=F, u=u, J=mno.derivative(F, u), petsc_options_prefix="plain_nl_"
        )
    assert str(info.value) == nonlinear
    with pytest.raises(TypeError) as info:
        dolfinx.fem.petsc.LinearProblem(a, L, petsc_options_prefix="plain_l_")
    assert str(info.value) == linear
    with pytest.raises(TypeError) as info:  # blocked forms, the closure in a nested list
        dolfinx.fem.petsc.LinearProblem([[a]], [L], kind="nest", petsc_options_prefix="b_")
    assert str(info.value) == linear
    with pytest.raises(TypeError) as info:
        dolfinx.fem.petsc.NewtonSolverNonlinearProblem(F, u)
    assert str(info.value) == (
        "dolfinx.fem.petsc.NewtonSolverNonlinearProblem does not update closures, so "
        "closure(s) 'flux' would enter the form with whatever values they hold. Use "
        "dolfinx_mno.petsc.NonlinearProblem (with SNES in place of NewtonSolver), which "
        "updates them at every Newton iterate."
    )

    class Custom(dolfinx.fem.petsc.LinearProblem):
        pass

    with pytest.raises(
        TypeError, match=r"<locals>\.Custom does not update closures, so closure\(s\) 'c'"
    ):
        Custom(a, L, petsc_options_prefix="custom_")
    # The guard raised before the instance existed: no half-built problem to finalise.
    gc.collect()
    assert "Exception ignored" not in capfd.readouterr().err

    # Our subclass solves the same forms: the closure reads u = 1, so u = Π(1³) = 1.
    problem = LinearProblem(a, L, u=u, petsc_options_prefix="ours_l_", petsc_options=DIRECT)
    u.x.array[:] = 1.0
    problem.solve()
    values = np.abs(u.x.array - 1.0)
    assert MPI.COMM_WORLD.allreduce(np.max(values, initial=0.0), op=MPI.MAX) < 1e-12


@pytest.mark.mpi
def test_guard_leaves_forms_without_closures_alone():
    """DOLFINx's problems without closures solve as before; installing again is a no-op."""
    guarded = dolfinx.fem.petsc.LinearProblem.__dict__["__new__"]
    install_problem_guard()
    assert dolfinx.fem.petsc.LinearProblem.__dict__["__new__"] is guarded
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 1, 1)
    V = fem.functionspace(msh, ("Lagrange", 1))
    w, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    problem = dolfinx.fem.petsc.LinearProblem(
        w * v * ufl.dx, 3.0 * v * ufl.dx, petsc_options=DIRECT, petsc_options_prefix="plain_"
    )
    uh = problem.solve()
    values = np.abs(uh.x.array - 3.0)  # the L2 projection of a constant
    assert MPI.COMM_WORLD.allreduce(np.max(values, initial=0.0), op=MPI.MAX) < 1e-12


@pytest.mark.mpi
def test_compiled_forms_with_closures_are_refused_too():
    """A compiled ``fem.form`` holds only the C++ function: the guard finds the closure
    from it (it used to let DOLFINx's problem assemble the closure frozen), and the
    dolfinx_mno problems say that they take UFL forms."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 1, 1)  # 3 ranks: one owns no cell
    u, _, a, L = _closure_forms(msh)
    with pytest.raises(TypeError, match=r"^dolfinx.fem.petsc.LinearProblem does not update"):
        dolfinx.fem.petsc.LinearProblem(
            fem.form(a), fem.form(L), u=u, petsc_options_prefix="compiled_"
        )
    with pytest.raises(TypeError, match=r"^Closure forms must be given as UFL forms"):
        LinearProblem(a, fem.form(L), u=u, petsc_options_prefix="compiled_ours_")
    # A hand-compiled Jacobian holds the tangent's C++ function alone; it was let through,
    # to be assembled with the tangent of whatever state the closure was last updated at.
    cubic = mno.extract_closures(L)[0]
    w = ufl.TestFunction(u.function_space)
    J = mno.derivative(cubic * w * cubic.dx, u)
    compiled = fem.form(J)
    held = compiled._cpp_object.coefficients
    assert not any(f is cubic._cpp_object for f in held)
    assert any(f is cubic.tangent._cpp_object for f in held)
    with pytest.raises(TypeError, match=r"^dolfinx.fem.petsc.LinearProblem .* closure\(s\) 'c' "):
        dolfinx.fem.petsc.LinearProblem(
            compiled, fem.form(w * ufl.dx), u=u, petsc_options_prefix="cJ_"
        )
