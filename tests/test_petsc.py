"""Solvers with closures: Newton iteration counts, convergence rates and IMEX steps."""

import gc
import re
import subprocess
import sys
import weakref
from pathlib import Path

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np
import pytest
import torch
import ufl
from analytic import FluxModel, flux_ufl
from dolfinx import fem, mesh
from dolfinx.fem.forms import derivative_block
from dolfinx.fem.petsc import NonlinearProblem as DolfinxNonlinearProblem
from dolfinx.fem.petsc import assemble_vector
from problems import DIRECT, NEWTON, Cubic, boundary_bc

import dolfinx_mno as mno
from dolfinx_mno import petsc_garbage
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem

MPIRUN = Path(sys.executable).parent / "mpirun"
DESTROY_JOB = Path(__file__).with_name("destroy_order_job.py")


def _l2(expr, msh, degree=8):
    form = fem.form(ufl.inner(expr, expr) * ufl.dx(metadata={"quadrature_degree": degree}))
    return np.sqrt(msh.comm.allreduce(fem.assemble_scalar(form), op=MPI.SUM))


class Source(torch.nn.Module):
    """f(x) = 2π² sin(πx) sin(πy): the source of u = sin(πx) sin(πy) for -Δu = f."""

    def forward(self, x):
        return 2 * np.pi**2 * torch.sin(np.pi * x[:, 0]) * torch.sin(np.pi * x[:, 1])


@pytest.mark.mpi
@pytest.mark.parametrize("degree,rate", [(1, 2.0), (2, 3.0)])
def test_manufactured_source_converges_at_fe_rate(degree, rate):
    """-Δu = closure(x) with the closure as the only source: L2 rate ≈ degree + 1."""
    errors = []
    sizes = [8, 16, 32]
    for n in sizes:
        msh = mesh.create_unit_square(MPI.COMM_WORLD, n, n)
        V = fem.functionspace(msh, ("Lagrange", degree))
        x = ufl.SpatialCoordinate(msh)
        closure = mno.Closure(Source().double(), [x], mesh=msh, quadrature_degree=2 * degree + 2)
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        a = ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx
        L = ufl.inner(closure, v) * closure.dx
        problem = LinearProblem(
            a, L, bcs=[boundary_bc(V)], petsc_options=DIRECT, petsc_options_prefix="mms_"
        )
        uh = problem.solve()
        exact = ufl.sin(ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1])
        errors.append(_l2(uh - exact, msh))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert rates[-1] == pytest.approx(rate, abs=0.1), (errors, rates)


def _nonlinear_diffusion(n, use_closure, model=None, degree=1, msh=None):
    """-div q(u, ∇u) = f on the unit square, u = 0 on the boundary, solved by Newton.

    The flux is integrated with the degree-``2 degree`` rule; ``msh`` replaces the
    ``n × n`` mesh.
    """
    msh = msh or mesh.create_unit_square(MPI.COMM_WORLD, n, n)
    V = fem.functionspace(msh, ("Lagrange", degree))
    q = 2 * degree
    u = fem.Function(V)
    v = ufl.TestFunction(V)
    x = ufl.SpatialCoordinate(msh)
    f = 10 * ufl.sin(ufl.pi * x[0]) * ufl.sin(2 * ufl.pi * x[1]) + 5.0
    opts = {
        "snes_type": "newtonls",
        "snes_linesearch_type": "none",
        "snes_rtol": 1e-12,
        "snes_atol": 1e-13,
        "snes_max_it": 30,
        **DIRECT,
    }
    if use_closure:
        closure = mno.Closure(model or FluxModel().double(), [u, ufl.grad(u)], (2,), q)
        F = ufl.inner(closure, ufl.grad(v)) * closure.dx - f * v * ufl.dx
        problem = NonlinearProblem(
            F, u, bcs=[boundary_bc(V)], petsc_options=opts, petsc_options_prefix="nl_closure_"
        )
    else:
        dx = ufl.dx(metadata={"quadrature_degree": q})
        F = ufl.inner(flux_ufl(u), ufl.grad(v)) * dx - f * v * ufl.dx
        problem = NonlinearProblem(
            F, u, bcs=[boundary_bc(V)], petsc_options=opts, petsc_options_prefix="nl_ufl_"
        )
    history = []
    problem.solver.setMonitor(lambda snes, it, norm: history.append(norm))
    problem.solve()
    assert problem.solver.getConvergedReason() > 0
    return u, problem.solver.getIterationNumber(), history


@pytest.mark.mpi
def test_newton_matches_pure_ufl():
    """Same iteration count and solution as the pure-UFL problem; quadratic convergence."""
    u_c, its_c, hist_c = _nonlinear_diffusion(16, True)
    u_u, its_u, hist_u = _nonlinear_diffusion(16, False)
    assert its_c == its_u
    assert its_c >= 4  # a genuinely nonlinear solve
    comm = u_c.function_space.mesh.comm
    diff = comm.allreduce(np.max(np.abs(u_c.x.array - u_u.x.array)), op=MPI.MAX)
    scale = comm.allreduce(np.max(np.abs(u_u.x.array)), op=MPI.MAX)
    assert diff <= 1e-10 * scale
    # Quadratic convergence: the estimated order log(r_{k+1}/r_k) / log(r_k/r_{k-1}) ≈ 2
    # for the iterates above round-off.
    r = np.array(hist_c)
    orders = [
        np.log(r[k + 1] / r[k]) / np.log(r[k] / r[k - 1])
        for k in range(1, len(r) - 1)
        if r[k + 1] > 1e-12
    ]
    assert len(orders) >= 2 and min(orders[-2:]) > 1.8, (r, orders)
    np.testing.assert_allclose(hist_c, hist_u, rtol=1e-6, atol=1e-13)


@pytest.mark.mpi
@pytest.mark.parametrize("snes_type", ["newtonls", "ksponly"])
def test_closures_hold_the_solution_after_the_solve(tiny_square, snes_type):
    """After a solve, the closure and its tangent are those of the solution u, as a UFL
    diagnostic of u is. Before: ksponly stops without evaluating the residual at its
    update, and ∫c dx was that of the initial guess (1.0, not 903.3 at u = 29/3)."""
    V = fem.functionspace(tiny_square, ("Lagrange", 1))
    u, v = fem.Function(V), ufl.TestFunction(V)
    u.x.array[:] = 1.0
    closure = mno.Closure(Cubic().double(), [u], (), 2, device="cpu", name="r")
    # r(u) = 27, linearised at u = 1: 1 + 3 (u - 1) = 27 gives u = 29/3 (one ksponly step).
    F = (closure - 27.0) * v * closure.dx
    options = {**DIRECT, "snes_type": snes_type, "snes_rtol": 1e-14, "snes_atol": 1e-12}
    problem = NonlinearProblem(
        F, u, petsc_options_prefix=f"held_{snes_type}_", petsc_options=options
    )
    problem.solve()
    assert problem.solver.getConvergedReason() > 0
    expected = 29.0 / 3.0 if snes_type == "ksponly" else 3.0
    comm = tiny_square.comm
    assert comm.allreduce(np.abs(u.x.array - expected).max(initial=0.0), op=MPI.MAX) < 1e-12
    for value, exact in ((closure, u**3), (closure.tangent[0], 3 * u**2)):
        got = comm.allreduce(fem.assemble_scalar(fem.form(value * closure.dx)), op=MPI.SUM)
        want = comm.allreduce(fem.assemble_scalar(fem.form(exact * closure.dx)), op=MPI.SUM)
        assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.mpi
def test_newton_on_a_rank_without_cells(tiny_square):
    """Newton with a closure where (on 3 ranks) a rank owns no cells: as pure UFL."""
    u_c, its_c, hist_c = _nonlinear_diffusion(1, True, degree=3, msh=tiny_square)
    u_u, its_u, hist_u = _nonlinear_diffusion(1, False, degree=3, msh=tiny_square)
    assert its_c == its_u
    assert its_c >= 3  # a genuinely nonlinear solve
    comm = tiny_square.comm
    diff = comm.allreduce(np.max(np.abs(u_c.x.array - u_u.x.array), initial=0.0), op=MPI.MAX)
    scale = comm.allreduce(np.max(np.abs(u_u.x.array), initial=0.0), op=MPI.MAX)
    assert scale > 0.1
    assert diff <= 1e-12 * scale
    np.testing.assert_allclose(hist_c, hist_u, rtol=1e-8, atol=1e-13)


@pytest.mark.mpi
def test_newton_reevaluates_closure_every_iterate():
    """The closure is updated once per residual evaluation (Newton iterate)."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 8, 8)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    v = ufl.TestFunction(V)
    closure = mno.Closure(FluxModel().double(), [u, ufl.grad(u)], (2,), 2)
    F = ufl.inner(closure, ufl.grad(v)) * closure.dx - 10.0 * v * ufl.dx
    problem = NonlinearProblem(
        F,
        u,
        bcs=[boundary_bc(V)],
        petsc_options_prefix="count_",
        petsc_options={"snes_linesearch_type": "none", **DIRECT},
    )
    problem.solve()
    its = problem.solver.getIterationNumber()
    assert problem.solver.getConvergedReason() > 0
    assert closure.update_count == its + 1  # one residual per iterate plus the initial one
    assert problem.closures == [closure]


class Perturbation(torch.nn.Module):
    """p(u, ∇u) = q(u, ∇u) - ∇u = u² ∇u + u/2 (1, …, 1): FluxModel less its Laplacian."""

    def __init__(self):
        super().__init__()
        self.flux = FluxModel()

    def forward(self, x):
        return self.flux(x) - x[:, 1:]


def _split_diffusion(jacobian):
    """-Δu - div p(u, ∇u) = f with p a closure (or q = ∇u + p in UFL), solved by Newton.

    ``jacobian`` is "exact" (the default, dolfinx_mno.derivative), "frozen"
    (ufl.derivative with frozen_closures=True) or "pure UFL" (no closure).
    """
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 16, 16)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V)
    v = ufl.TestFunction(V)
    x = ufl.SpatialCoordinate(msh)
    f = 10 * ufl.sin(ufl.pi * x[0]) * ufl.sin(2 * ufl.pi * x[1]) + 5.0
    options = {
        "snes_linesearch_type": "none",
        "snes_rtol": 1e-12,
        "snes_atol": 1e-13,
        "snes_stol": 0.0,  # a slow Picard iteration would stop on its small steps
        "snes_max_it": 50,
        **DIRECT,
    }
    kwargs = {}
    if jacobian == "pure UFL":
        dx = ufl.dx(metadata={"quadrature_degree": 2})
        F = ufl.inner(flux_ufl(u), ufl.grad(v)) * dx - f * v * ufl.dx
    else:
        closure = mno.Closure(Perturbation().double(), [u, ufl.grad(u)], (2,), 2)
        F = ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx - f * v * ufl.dx
        F += ufl.inner(closure, ufl.grad(v)) * closure.dx
        if jacobian == "frozen":
            kwargs = {"J": ufl.derivative(F, u), "frozen_closures": True}
    problem = NonlinearProblem(
        F,
        u,
        bcs=[boundary_bc(V)],
        petsc_options=options,
        petsc_options_prefix=f"split_{jacobian.replace(' ', '_')}_",
        **kwargs,
    )
    history = []
    problem.solver.setMonitor(lambda snes, it, norm: history.append(norm))
    problem.solve()
    assert problem.solver.getConvergedReason() > 0
    return u.x.array.copy(), problem.solver.getIterationNumber(), np.array(history)


@pytest.mark.mpi
def test_frozen_closure_jacobian_converges_linearly_to_the_same_solution():
    """frozen_closures=True gives Picard: same solution, linear rate; the default is Newton."""
    comm = MPI.COMM_WORLD
    u_exact, its_exact, _ = _split_diffusion("exact")
    u_ufl, its_ufl, _ = _split_diffusion("pure UFL")
    u_frozen, its_frozen, history = _split_diffusion("frozen")
    scale = comm.allreduce(np.max(np.abs(u_ufl)), op=MPI.MAX)
    assert scale > 0.1
    assert its_exact == its_ufl == 4
    assert comm.allreduce(np.max(np.abs(u_exact - u_ufl)), op=MPI.MAX) <= 1e-12 * scale
    # Picard: a constant contraction factor (about 0.2 here), so several times the
    # iterations, to the same solution.
    assert its_frozen >= 3 * its_exact, its_frozen
    ratios = history[2:-1] / history[1:-2]
    assert 0.1 < ratios.min() and ratios.max() < 0.3, ratios
    assert comm.allreduce(np.max(np.abs(u_frozen - u_ufl)), op=MPI.MAX) <= 1e-10 * scale


@pytest.mark.mpi
def test_jacobian_missing_closure_tangents_is_refused():
    """A given J without the tangent of a closure that depends on u raises, on all ranks."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 1, 1)  # 3 ranks: one owns no cell
    V = fem.functionspace(msh, ("Lagrange", 1))
    u, u_n = fem.Function(V, name="u"), fem.Function(V, name="u_n")
    v = ufl.TestFunction(V)
    flux = mno.Closure(FluxModel().double(), [u, ufl.grad(u)], (2,), 2, name="flux")
    F = ufl.inner(flux, ufl.grad(v)) * flux.dx - v * ufl.dx
    expected = (
        "The Jacobian J misses the tangent of closure(s) 'flux', whose operands depend on "
        "the unknown 'u': Newton's method would converge slowly, to a looser tolerance. "
        "Build J with dolfinx_mno.derivative(F, u) (or leave J=None), or pass "
        "frozen_closures=True if a Picard (frozen-closure) Jacobian is meant."
    )
    with pytest.raises(ValueError) as info:
        NonlinearProblem(F, u, J=ufl.derivative(F, u), petsc_options_prefix="missing_")
    assert str(info.value) == expected
    with pytest.raises(RuntimeError, match="has no tangent"):
        _ = flux.tangent  # the check allocated nothing
    # A closure whose tangent exists but is not in J is refused as well.
    flux.enable_tangent()
    with pytest.raises(ValueError, match="misses the tangent of closure"):
        NonlinearProblem(F, u, J=ufl.derivative(F, u), petsc_options_prefix="missing_")
    # Accepted: dolfinx_mno.derivative, the explicit opt-out, and a closure of u_n only.
    NonlinearProblem(F, u, J=mno.derivative(F, u), petsc_options_prefix="exact_j_")
    NonlinearProblem(
        F, u, J=ufl.derivative(F, u), frozen_closures=True, petsc_options_prefix="frozen_j_"
    )
    previous = mno.Closure(FluxModel().double(), [u_n, ufl.grad(u_n)], (2,), 2)
    G = ufl.inner(previous, ufl.grad(v)) * previous.dx + u * v * ufl.dx
    problem = NonlinearProblem(
        G, u, J=ufl.derivative(G, u), petsc_options_prefix="explicit_j_", petsc_options=DIRECT
    )
    previous.update()
    problem.solve()  # u = Π(div q(u_n)) = 0 for u_n = 0
    assert problem.solver.getConvergedReason() > 0
    assert MPI.COMM_WORLD.allreduce(np.max(np.abs(u.x.array), initial=0.0), op=MPI.MAX) == 0.0


def _block_problem(msh, use_closure, kind, J=None):
    """A block residual [F_u, F_p] in two unknowns u (P2) and p (P1), closures in both.

    -div((1 + u² + p²) ∇u) = f and -Δp + p + sin(u) p + p³ = u, u = 0 on the boundary.
    """
    V, Q = fem.functionspace(msh, ("Lagrange", 2)), fem.functionspace(msh, ("Lagrange", 1))
    u, p = fem.Function(V, name="u"), fem.Function(Q, name="p")
    v, r = ufl.TestFunction(V), ufl.TestFunction(Q)
    x = ufl.SpatialCoordinate(msh)
    f = 10 * ufl.sin(3 * x[0]) + 5.0
    if use_closure:
        flux = mno.Closure(BlockFlux().double(), [u, p, ufl.grad(u)], (2,), 4, name="flux")
        source = mno.Closure(BlockSource().double(), [u, p], (), 3, name="source")
        F_u = ufl.inner(flux, ufl.grad(v)) * flux.dx - f * v * ufl.dx
        F_p = ufl.inner(ufl.grad(p), ufl.grad(r)) * ufl.dx + source * r * source.dx
    else:
        dx4, dx3 = (ufl.dx(metadata={"quadrature_degree": q}) for q in (4, 3))
        flux_ufl_ = (1 + u**2 + p**2) * ufl.grad(u)
        F_u = ufl.inner(flux_ufl_, ufl.grad(v)) * dx4 - f * v * ufl.dx
        F_p = ufl.inner(ufl.grad(p), ufl.grad(r)) * ufl.dx + (ufl.sin(u) * p + p**3) * r * dx3
    F = [F_u, F_p + (p - u) * r * ufl.dx]
    problem_class = NonlinearProblem if use_closure else DolfinxNonlinearProblem
    return problem_class(
        F,
        [u, p],
        J=J(F, [u, p]) if J else None,
        bcs=[boundary_bc(V)],
        kind=kind,
        petsc_options=NEWTON,
        petsc_options_prefix=f"block_{kind}_{int(use_closure)}_",
    )


class BlockFlux(torch.nn.Module):
    """(1 + u² + p²) ∇u from the inputs (u, p, ∇u)."""

    def forward(self, x):
        return (1 + x[:, :1] ** 2 + x[:, 1:2] ** 2) * x[:, 2:]


class BlockSource(torch.nn.Module):
    """sin(u) p + p³ from the inputs (u, p)."""

    def forward(self, x):
        return torch.sin(x[:, 0]) * x[:, 1] + x[:, 1] ** 3


@pytest.mark.mpi
@pytest.mark.parametrize("kind,cells", [("mpi", 4), ("nest", 1)])
def test_block_newton_matches_pure_ufl(kind, cells):
    """Block residuals (lists of forms and unknowns, as in DOLFINx) with closures.

    The same iterations and solution as the pure-UFL block problem, with the default
    Jacobian and with mno.derivative's block Jacobian; a block J from
    dolfinx.fem.derivative_block misses the closures' tangents and is refused. On 3 ranks
    the 1 × 1 mesh leaves a rank without cells.
    """
    msh = mesh.create_unit_square(MPI.COMM_WORLD, cells, cells)
    comm = msh.comm
    reference = _block_problem(msh, False, kind)
    reference.solve()
    its = reference.solver.getIterationNumber()
    assert reference.solver.getConvergedReason() > 0 and its >= 4
    for J in (None, mno.derivative):
        problem = _block_problem(msh, True, kind, J)
        problem.solve()
        assert problem.solver.getConvergedReason() > 0
        assert problem.solver.getIterationNumber() == its
        for w, w_ref in zip(problem.u, reference.u, strict=True):
            scale = comm.allreduce(np.max(np.abs(w_ref.x.array), initial=0.0), op=MPI.MAX)
            diff = np.max(np.abs(w.x.array - w_ref.x.array), initial=0.0)
            assert scale > 0.01
            assert comm.allreduce(diff, op=MPI.MAX) <= 1e-12 * scale
    missing = r"misses the tangent of closure\(s\) 'flux', 'source', whose operands depend on "
    with pytest.raises(ValueError, match=missing + r"the unknowns u\[0\] \('u'\), u\[1\] \('p'\):"):
        _block_problem(msh, True, kind, derivative_block)
    with pytest.raises(ValueError, match=r"A block residual \(2 forms\) needs a list of unknowns"):
        _block_problem(msh, True, kind, lambda F, u: mno.derivative(F, u[0]))


class BlockEnergy(torch.nn.Module):
    """W(u, p) = sin(u) p + p⁴ / 4 from the inputs (u, p): BlockSource is ∂W/∂p."""

    def forward(self, x):
        return torch.sin(x[:, 0]) * x[:, 1] + x[:, 1] ** 4 / 4


@pytest.mark.mpi
def test_block_residual_of_a_learned_energy_matches_pure_ufl():
    """mno.derivative(Π, [u, p]) of a functional: the block residual, as derivative_block.

    It crashed with AttributeError ('list' object has no attribute 'name').
    """
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 3, 3)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 2)), name="u")
    p = fem.Function(fem.functionspace(msh, ("Lagrange", 1)), name="p")
    u.interpolate(lambda x: np.sin(3 * x[0]) + x[1])
    p.interpolate(lambda x: x[0] * x[1] - 0.5)
    W = mno.Closure(BlockEnergy().double(), [u, p], (), 3, name="W")
    residual = mno.derivative(W * W.dx, [u, p])
    W.update()
    W_ufl = (ufl.sin(u) * p + p**4 / 4) * ufl.dx(metadata={"quadrature_degree": 3})
    for R, R_ufl in zip(residual, derivative_block(W_ufl, [u, p]), strict=True):
        b, b_ufl = (assemble_vector(mno.form(form)) for form in (R, R_ufl))
        for vec in (b, b_ufl):
            vec.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        scale = b_ufl.norm(PETSc.NormType.NORM_INFINITY)
        b.axpy(-1.0, b_ufl)
        assert scale > 0.01
        assert b.norm(PETSc.NormType.NORM_INFINITY) <= 1e-14 * scale
    with pytest.raises(ValueError, match=r"^A list of unknowns needs a list of residual forms"):
        mno.derivative(residual[0], [u, p])


class Quartic(torch.nn.Module):
    """W(u) = 5 u⁴ / 2, whose tangent is 10 u³: a learned energy density."""

    def forward(self, x):
        return 2.5 * x[:, 0] ** 4


@pytest.mark.mpi
def test_forms_holding_only_a_closure_tangent_update_the_closure():
    """A form that holds closure.tangent, not the closure, updates it: values as pure UFL.

    A hand-written Newton step (a LinearProblem whose operator holds the tangent), and a
    residual written with the derivative of a learned energy W (W.tangent, with the
    Jacobian by hand): the tangent follows u at every solve and every Newton iterate
    (it used to stay at its last manual update, or NaN).
    """
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    comm = msh.comm
    V = fem.functionspace(msh, ("Lagrange", 1))
    u, v, du = fem.Function(V), ufl.TestFunction(V), ufl.TrialFunction(V)
    dx2 = ufl.dx(metadata={"quadrature_degree": 2})
    W = mno.Closure(Quartic().double(), [u], (), 2, name="W", tangent=True)
    W.update()
    L = (20.0 * v - ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
    a = ufl.inner(ufl.grad(du), ufl.grad(v)) * ufl.dx
    step = LinearProblem(
        a + W.tangent[0] * du * v * W.dx, L, petsc_options=DIRECT, petsc_options_prefix="ts_"
    )
    step_ufl = LinearProblem(
        a + 10 * u**3 * du * v * dx2, L, petsc_options=DIRECT, petsc_options_prefix="ts_ufl_"
    )
    assert step.closures == [W]
    u.interpolate(lambda x: x[0] + 2 * x[1])  # after W's update: the solve must update it
    w, w_ufl = step.solve(), step_ufl.solve()
    scale = comm.allreduce(np.max(np.abs(w_ufl.x.array)), op=MPI.MAX)
    assert scale > 0.1
    assert comm.allreduce(np.max(np.abs(w.x.array - w_ufl.x.array)), op=MPI.MAX) <= 1e-12 * scale

    def newton(F, J, prefix, problem_class=NonlinearProblem):
        u.x.array[:] = 0.0
        problem = problem_class(
            F, u, J=J, bcs=[boundary_bc(V)], petsc_options=NEWTON, petsc_options_prefix=prefix
        )
        problem.solve()
        assert problem.solver.getConvergedReason() > 0
        return u.x.array.copy(), problem.solver.getIterationNumber()

    J = a + 30 * u**2 * du * v * dx2
    F = W.tangent[0] * v * W.dx - L
    u_closure, its = newton(F, J, "energy_")
    u_ufl, its_ufl = newton(10 * u**3 * v * dx2 - L, J, "energy_ufl_", DolfinxNonlinearProblem)
    assert its == its_ufl >= 4
    scale = comm.allreduce(np.max(np.abs(u_ufl)), op=MPI.MAX)
    assert scale > 0.1
    assert comm.allreduce(np.max(np.abs(u_closure - u_ufl)), op=MPI.MAX) <= 1e-12 * scale


@pytest.mark.mpi
def test_jacobian_freezes_closures_without_tangent():
    """Non-local closures have no tangent: ufl.derivative(F, u) is accepted as it is."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u, v = fem.Function(V), ufl.TestFunction(V)
    identity = torch.nn.Identity()
    closure = mno.NonlocalClosure(identity, [u], grid_shape=(9, 9), mask_channel=False)
    assert not closure.supports_tangent
    F = (ufl.inner(ufl.grad(u), ufl.grad(v)) - closure * v) * ufl.dx(
        metadata={"quadrature_degree": 2}
    )
    problem = NonlinearProblem(F, u, J=ufl.derivative(F, u), petsc_options_prefix="nonlocal_j_")
    assert problem.closures == [closure]


@pytest.mark.mpi
def test_linear_problem_refuses_closures_never_updated():
    """solve(update_closures=False) before any update raises on all ranks, changing nothing."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 1, 1)  # 3 ranks: one owns no cell
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n, uh = fem.Function(V), fem.Function(V)
    u_n.x.array[:] = 2.0
    uh.x.array[:] = -1.0
    w, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    cubic = mno.Closure(Cubic().double(), [u_n], quadrature_degree=2, name="c")
    problem = LinearProblem(
        w * v * ufl.dx, cubic * v * cubic.dx, u=uh, petsc_options=DIRECT, petsc_options_prefix="n_"
    )
    with pytest.raises(RuntimeError) as info:
        problem.solve(update_closures=False)
    assert str(info.value) == (
        "Closure(s) 'c' have never been updated, so solve(update_closures=False) would "
        "assemble them without the model's values. Call solve() (update_closures=True, the "
        "default) for the first solve, or closure.update() before."
    )
    assert cubic.update_count == 0
    np.testing.assert_array_equal(uh.x.array, -1.0)
    problem.solve()
    problem.solve(update_closures=False)
    assert cubic.update_count == 1
    assert (
        MPI.COMM_WORLD.allreduce(np.max(np.abs(uh.x.array - 8.0), initial=0.0), op=MPI.MAX) < 1e-12
    )
    # A closure left out of closures= must have been updated by the caller.
    other = mno.Closure(Cubic().double(), [u_n], quadrature_degree=2, name="other")
    left_out = LinearProblem(
        w * v * ufl.dx,
        (cubic + other) * v * cubic.dx,
        closures=[cubic],
        petsc_options_prefix="left_out_",
    )
    with pytest.raises(RuntimeError) as info:
        left_out.solve()
    assert str(info.value) == (
        "Closure(s) 'other' have never been updated and are not in this problem's closures, "
        "so the solve would assemble them without the model's values. Call closure.update() "
        "first, or leave closures=None so that the problem updates every closure of its forms."
    )
    assert cubic.update_count == 1  # the check came first
    other.update()
    left_out.solve()
    assert cubic.update_count == 2


def test_reuse_matrix_refuses_closures_in_matrix():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n = fem.Function(V)
    closure = mno.Closure(Cubic().double(), [u_n], quadrature_degree=2)
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = (1 + closure) * u * v * closure.dx
    with pytest.raises(ValueError, match="without closures"):
        LinearProblem(a, u_n * v * ufl.dx, reuse_matrix=True, petsc_options_prefix="r_")


@pytest.mark.mpi
def test_reused_matrix_follows_a_moved_mesh(tiny_square):
    """reuse_matrix=True kept the matrix of the first geometry after the mesh moved (the
    right-hand side followed it): the solution of (u, v) + (∇u, ∇v) = (1, v), u = 1, came
    out 2 on the square stretched to 2 × 1. On 3 ranks a rank owns no cells."""
    V = fem.functionspace(tiny_square, ("Lagrange", 2))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = (ufl.inner(ufl.grad(u), ufl.grad(v)) + u * v) * ufl.dx
    L = v * ufl.dx
    reused = LinearProblem(a, L, reuse_matrix=True, petsc_options=DIRECT, petsc_options_prefix="m_")
    reused.solve()
    tiny_square.geometry.x[:, 0] *= 2.0
    try:
        moved = reused.solve().x.array.copy()
        fresh = LinearProblem(a, L, petsc_options=DIRECT, petsc_options_prefix="f_").solve()
        comm = tiny_square.comm
        scale = comm.allreduce(np.max(np.abs(fresh.x.array), initial=0.0), op=MPI.MAX)
        diff = comm.allreduce(np.max(np.abs(moved - fresh.x.array), initial=0.0), op=MPI.MAX)
        assert scale > 0.1 and diff <= 1e-12 * scale
    finally:
        tiny_square.geometry.x[:, 0] /= 2.0


@pytest.mark.skipif(not MPIRUN.exists(), reason="needs mpirun next to the Python executable")
@pytest.mark.parametrize("ranks", [2, 3])
def test_rank_dependent_drop_order_does_not_deadlock(ranks):
    """Problems finalised in a different order on each rank (as the GC may) do not hang."""
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("starts its own MPI job; run it from the serial session")
    command = [str(MPIRUN), "-n", str(ranks), sys.executable, str(DESTROY_JOB)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done") == ranks  # lines of ranks may interleave
    # The garbage queue per rank: the dropped problems' solvers and vectors, then none
    # after the next problem's construction, which cleans it up collectively.
    queued = [int(n) for n in re.findall(r"Total entries: (\d+)", result.stdout)]
    assert len(queued) == 2 * ranks, result.stdout
    assert min(queued[:ranks]) > 0 and queued[ranks:] == ranks * [0], queued


@pytest.mark.mpi
def test_dropped_problems_are_freed():
    """No reference cycle keeps a problem alive: the SNES callbacks do not hold it."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    V = fem.functionspace(msh, ("Lagrange", 1))
    w, v = fem.Function(V), ufl.TestFunction(V)
    closure = mno.Closure(Cubic().double(), [w], quadrature_degree=2)
    F = (closure + w - 1.0) * v * closure.dx
    nonlinear = NonlinearProblem(F, w, petsc_options_prefix="freed_nl_", petsc_options=DIRECT)
    nonlinear.solve()
    u = ufl.TrialFunction(V)
    linear = LinearProblem(
        u * v * ufl.dx, closure * v * closure.dx, petsc_options_prefix="freed_l_"
    )
    linear.solve()
    references = [weakref.ref(nonlinear), weakref.ref(linear)]
    del nonlinear, linear
    gc.collect()
    assert [r() for r in references] == [None, None]


@pytest.mark.mpi
def test_closures_in_the_preconditioner_form_are_checked_and_updated():
    """``P=`` forms: their closures are checked (closure.dx) and updated like ``a``'s."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 1, 1)  # 3 ranks: one owns no cell
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n, uh = fem.Function(V), fem.Function(V)
    u_n.x.array[:] = 1.0
    w, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    k = mno.Closure(Cubic().double(), [u_n], quadrature_degree=2, name="k")
    a, L = w * v * ufl.dx, u_n * v * ufl.dx
    with pytest.raises(ValueError, match=r"^Closure\(s\) 'k' \(degree 2\) are integrated with"):
        LinearProblem(a, L, P=(1 + k) * w * v * ufl.dx, petsc_options_prefix="p_dx_")
    # GMRES on a, preconditioned by LU of P = (1 + u³) a = 2 a: converges to a⁻¹ L.
    krylov = {"ksp_type": "gmres", "pc_type": "lu", "ksp_rtol": 1e-14, "ksp_atol": 0.0}
    problem = LinearProblem(
        a, L, P=(1 + k) * w * v * k.dx, u=uh, petsc_options=krylov, petsc_options_prefix="p_"
    )
    assert problem.closures == [k]
    problem.solve()
    problem.solve()
    assert k.update_count == 2
    err = np.max(np.abs(uh.x.array - 1.0), initial=0.0)
    assert MPI.COMM_WORLD.allreduce(err, op=MPI.MAX) < 1e-12
    with pytest.raises(ValueError, match="without closures"):
        LinearProblem(a, L, P=(1 + k) * w * v * k.dx, reuse_matrix=True, petsc_options_prefix="r_")


@pytest.mark.mpi
def test_newton_refuses_closures_never_updated(tiny_square):
    """As the linear problem does: a closure left out of ``closures=`` and never updated
    raises on every rank before the solve (it used to give a NaN residual, reason -4)."""
    V = fem.functionspace(tiny_square, ("Lagrange", 1))
    u = fem.Function(V)
    v = ufl.TestFunction(V)
    c = mno.Closure(Cubic().double(), [u], quadrature_degree=2, name="c")
    F = (u - 1.0) * v * ufl.dx + 1e-3 * c * v * c.dx
    problem = NonlinearProblem(F, u, closures=[], petsc_options=DIRECT, petsc_options_prefix="nu_")
    with pytest.raises(RuntimeError, match=r"^Closure\(s\) 'c' have never been updated and are"):
        problem.solve()
    assert c.update_count == 0
    c.update()
    problem.solve()  # the closure frozen at u = 0 (Picard by hand): u = 1
    assert problem.solver.getConvergedReason() > 0
    err = np.max(np.abs(u.x.array - 1.0), initial=0.0)
    assert MPI.COMM_WORLD.allreduce(err, op=MPI.MAX) < 1e-10


@pytest.mark.mpi
def test_float32_problems_say_petsc_needs_float64():
    """A float32 mesh with a float32 closure (closures support it): the PETSc problems
    failed deep in DOLFINx's form constructor with a list of nanobind signatures; they now
    say that PETSc's scalar type is float64, before compiling anything."""
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 2, 2, dtype=np.float32)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V, dtype=np.float32)
    closure = mno.Closure(FluxModel().float(), [u, ufl.grad(u)], (2,), 2)
    v = ufl.TestFunction(V)
    F = ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx + ufl.inner(closure, ufl.grad(v)) * closure.dx
    a = ufl.inner(ufl.TrialFunction(V), v) * ufl.dx
    expected = r"^The form is on a float32 mesh, but PETSc's scalar type is float64"
    with pytest.raises(TypeError, match=expected):
        LinearProblem(a, ufl.inner(closure, ufl.grad(v)) * closure.dx, petsc_options_prefix="f32_")
    with pytest.raises(TypeError, match=expected):
        NonlinearProblem(F, u, petsc_options_prefix="f32n_")


def _free_communicators() -> int:
    """How many more communicators this process can make now (MPICH: 2,048 in all)."""
    held = []
    try:
        while len(held) < 8192:
            held.append(MPI.COMM_SELF.Dup())  # a context id free in this process, no waiting
    except MPI.Exception:
        pass
    finally:
        for comm in held:
            comm.Free()
    return len(held)


@pytest.mark.mpi
def test_problems_dropped_with_their_meshes_free_their_communicators():
    """Before: a Newton problem (MUMPS) and a linear one dropped with their mesh left their
    PETSc objects queued on that mesh's communicator, which nothing could reach any more:
    26 MPI communicators a mesh (104 here), kept for good. MPICH has 2,048 a process; a loop over
    meshes aborted in MUMPS ("Internal error 1 in MUMPS_LOAD_RECV_MSGS") or in a mesh's
    creation after ~80 meshes, and so did the 2-rank test suite. Then still one a Newton
    problem (4 here), and one a linear problem never solved: their vectors live on their
    index map's communicator, whose queue was emptied before the solver's released them,
    or not at all."""

    def solve_on_a_new_mesh():
        msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
        V = fem.functionspace(msh, ("Lagrange", 1))
        u, v, w = fem.Function(V), ufl.TestFunction(V), ufl.TrialFunction(V)
        closure = mno.Closure(Cubic(), [u], (), 2, device="cpu", name="r")
        F = (ufl.inner(ufl.grad(u), ufl.grad(v)) + (u + closure - 1) * v) * closure.dx
        problem = NonlinearProblem(F, u, petsc_options_prefix="freed_nl_", petsc_options=NEWTON)
        problem.solve()
        assert problem.solver.getConvergedReason() > 0
        a = (ufl.inner(ufl.grad(w), ufl.grad(v)) + w * v) * ufl.dx
        linear = LinearProblem(a, v * ufl.dx, petsc_options_prefix="freed_l_", petsc_options=DIRECT)
        linear.solve()
        LinearProblem(a, v * ufl.dx, petsc_options_prefix="unsolved_", petsc_options=DIRECT)

    def free():
        gc.collect()
        petsc_garbage.collect(MPI.COMM_WORLD)
        return _free_communicators()

    solve_on_a_new_mesh()  # PETSc's and MUMPS's communicators made once
    before = free()
    for _ in range(4):
        solve_on_a_new_mesh()
    leaked = before - free()
    assert leaked == 0, leaked
