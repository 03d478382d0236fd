# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # Quickstart: add a learned closure to a heat-equation solver
#
# This demo illustrates how to:
#
# - fit a small PyTorch model to a term that an existing solver is missing,
# - add that model to an ordinary DOLFINx script as a {py:class}`dolfinx_mno.Closure`,
#   which takes **four added lines**, all marked `# <-- closure` below,
# - advance an implicit-explicit (IMEX) time-stepping scheme with
#   {py:class}`dolfinx_mno.petsc.LinearProblem` and
#   {py:class}`dolfinx_mno.timestepping.IMEXStepper`,
# - write the closure field for ParaView with {py:class}`dolfinx_mno.ClosureWriter`,
# - check the learned closure against the same term written exactly in UFL, with
#   global quantities that do not depend on the number of MPI ranks.
#
# Run it with `python quickstart.py` or, in parallel, with
# `mpirun -n 2 python quickstart.py`. The flag `--quick` (used by CI) runs a small problem
# in a few seconds. All outputs go to `output/quickstart/` next to this file.
#
# ## The problem
#
# The "true" physics is a heat equation with a source $f$ and a nonlinear reaction
# $r(u) = -u^3$ on the unit square $\Omega = (0, 1)^2$:
#
# $$
# \begin{align}
#   \partial_t u &= \Delta u + f + r(u) && \text{in } \Omega \times (0, T], \\
#   u &= 0 && \text{on } \partial\Omega \times (0, T], \\
#   u &= 0 && \text{in } \Omega \text{ at } t = 0,
# \end{align}
# $$
#
# with $f = 50$. Our existing solver only knows $\partial_t u = \Delta u + f$: it lacks the
# reaction, a stand-in for a subgrid or constitutive term that is known only from data.
# We learn $r_\theta \approx r$ with a small neural network and add it as a *closure*.
#
# Backward Euler for the resolved physics, with the closure evaluated explicitly at the
# previous state $u^n$ (an IMEX scheme), gives the weak form: find $u^{n+1} \in V_0$, the
# continuous piecewise-linear ($P_1$) functions that vanish on $\partial\Omega$, such that
#
# $$
#   \int_\Omega u^{n+1} v + \Delta t\, \nabla u^{n+1} \cdot \nabla v \,\mathrm{d}x
#   = \int_\Omega \left(u^n + \Delta t\, f\right) v \,\mathrm{d}x
#   + \underbrace{\Delta t \int_\Omega r_\theta(u^n)\, v \,\mathrm{d}x}_{\text{closure}}
#   \quad \forall v \in V_0 .
# $$
#
# The closure values $r_\theta(u^n)$ live at the points of a quadrature rule on each cell
# (degree 2: three points per triangle). The model is evaluated there once per time step,
# and the bilinear form, hence the matrix, is unchanged.
#
# We run three simulations and compare them:
#
# 1. **baseline**: the existing solver, without the reaction;
# 2. **closure**: the existing solver plus the learned closure $r_\theta(u^n)$;
# 3. **reference**: the existing solver plus the exact $r(u^n) = -(u^n)^3$ written in UFL,
#    with the same explicit treatment and the same quadrature rule, so that the difference
#    between runs 2 and 3 measures the model's error alone.
#
# ## Imports
#
# `mpi4py` comes first, as in every DOLFINx script. The first two `dolfinx_mno` imports
# are the first two closure lines: the package itself, and its `LinearProblem`, a drop-in
# replacement for {py:class}`dolfinx.fem.petsc.LinearProblem` that evaluates the closures of
# a form before each solve. The third, `IMEXStepper`, only replaces a hand-written time
# loop (see Step 2).

# +
import argparse
import time
from pathlib import Path

from mpi4py import MPI

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import ufl
from dolfinx import fem, io, mesh

import dolfinx_mno as mno  # <-- closure
from dolfinx_mno.petsc import LinearProblem  # <-- closure (was dolfinx.fem.petsc)
from dolfinx_mno.timestepping import IMEXStepper

matplotlib.use("Agg")  # write files, no display needed
# -

# ## Settings
#
# The default run uses a $64 \times 64$ mesh and 100 time steps; `--quick` a $16 \times 16$
# mesh and 20 larger steps. Both end at $T = 0.4$, when the solution is close to its
# steady state.

# +
parser = argparse.ArgumentParser(description="Add a learned closure to a heat solver.")
parser.add_argument("--quick", action="store_true", help="small problem for CI (seconds)")
args = parser.parse_args()

comm = MPI.COMM_WORLD
final_time = 0.4
num_cells, num_steps = (16, 20) if args.quick else (64, 100)
dt = final_time / num_steps
source = 50.0
direct_solver = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
output_dir = Path(__file__).resolve().parent / "output" / "quickstart"
output_dir.mkdir(parents=True, exist_ok=True)

# The model is tiny, so one torch thread per process is fastest; more threads only compete
# with the MPI ranks (and with each other on a busy machine) for the cores.
torch.set_num_threads(1)
# -

# ## Step 1: a learned closure
#
# The term our solver lacks is


def reaction(u):
    """The true reaction r(u) = -u³ (works on torch tensors and UFL expressions alike)."""
    return -(u**3)


# In a real application the closure model is trained offline, on data from experiments or
# from a resolved simulation, and loaded from a checkpoint. To keep this demo
# self-contained we fit one here, in about a second: a multilayer perceptron
# $1 \to 32 \to 32 \to 1$ fitted by Adam to 1024 samples of $r(u)$ with $u \in [-0.5, 4]$,
# a range that covers every state the simulations visit (with zero initial and boundary
# values and $f = 50$, $0 \le u \lesssim 2.8$ with the reaction and $\lesssim 3.7$ without).
#
# The network works best on inputs and outputs of order one, so we wrap it in a
# {py:class}`dolfinx_mno.NormalizedModel`; its normalisation statistics are stored in the
# model, so the closure is evaluated with physical inputs and returns physical values.
# We fit in `float64` and then run the fitted model in `float32`: the closure casts its
# inputs and outputs at the boundary with the `float64` DOLFINx problem, the `float32`
# values differ from the `float64` ones by about 1e-7 (far below the fit error), and its
# `tanh` costs a quarter as much, so each update is about 2× faster on the CPU (see
# `docs/benchmarks.md`).


def fit_closure_model(num_samples=1024, num_iterations=500, seed=0):
    """Fit a small MLP to r(u) for u in [-0.5, 4]; returns the model and its fit error."""
    torch.manual_seed(seed)
    u = -0.5 + 4.5 * torch.rand(num_samples, 1, dtype=torch.float64)
    r = reaction(u)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(1, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 1),
    ).double()
    model = mno.NormalizedModel(
        mlp, mno.AffineNormalization.from_data(u), mno.AffineNormalization.from_data(r)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(num_iterations):
        optimizer.zero_grad()
        loss = torch.mean((model(u) - r) ** 2) / torch.var(r)
        loss.backward()
        optimizer.step()
    # Fit error: max |r_θ - r| relative to max |r|, on a fine grid of the training range.
    u_test = torch.linspace(-0.5, 4.0, 2001, dtype=torch.float64).reshape(-1, 1)
    with torch.no_grad():
        r_test = reaction(u_test)
        fit_error = torch.max(torch.abs(model(u_test) - r_test)) / torch.max(torch.abs(r_test))
    return model.float().eval(), float(fit_error)


# The fit is seeded, so it is deterministic. Rank 0 fits the model and broadcasts it, so
# that every rank evaluates exactly the same weights whatever the number of ranks.

tic = time.perf_counter()
model, fit_error = comm.bcast(fit_closure_model() if comm.rank == 0 else None, root=0)
fit_time = time.perf_counter() - tic

# ## Step 2: the existing solver, plus the closure
#
# Below is an ordinary DOLFINx heat-equation solver, wrapped in a function so that we can
# run it three times. Only the two lines marked `# <-- closure` (and the two imports above)
# were added to it; the `if` around them exists only because this demo also runs the solver
# without a closure. The reference run adds the exact reaction in UFL instead, integrated
# with the closure's quadrature rule, {py:func}`dolfinx_mno.measure`.
#
# {py:class}`~dolfinx_mno.Closure` takes the model, the UFL *operands* that are fed to it
# at each quadrature point (here just $u^n$), and the quadrature degree. It is a
# {py:class}`dolfinx.fem.Function` and enters UFL like any coefficient; `closure.dx` is the
# measure with its quadrature rule. {py:class}`~dolfinx_mno.petsc.LinearProblem` evaluates
# the model at the current $u^n$ before every solve, and
# {py:class}`~dolfinx_mno.timestepping.IMEXStepper` is the usual time loop (solve, check
# convergence, copy $u^{n+1}$ into $u^n$) with a progress bar; a hand-written loop of
# `problem.solve()` and `u_n.x.array[:] = u_h.x.array` works just as well, since the
# closure is updated inside `problem.solve()`. We use a direct solver (MUMPS), so that all
# three runs solve their linear systems to round-off.
#
# The closure run also writes the closure field for ParaView (the `closure_file` lines).
# Its values live at quadrature points, which no DOLFINx writer takes;
# {py:class}`~dolfinx_mno.ClosureWriter` writes their cell averages, computed with the
# closure's own quadrature rule, as cell data named `closure` in the VTX file `closure.bp`.
# Each `write(t)` averages the current values: after a step, the closure holds
# $r_\theta(u^n)$, the value used in that step, which belongs to $t_n$. (In a Newton
# solve, list `closure.tangent`, $\partial r_\theta / \partial u$, too.)


def solve_heat(V, closure_model=None, exact_reaction=None, description="time steps"):
    """Backward Euler for u_t = Δu + f (+ a reaction).

    Returns the dof values of u after every step and the time spent stepping.
    """
    msh = V.mesh
    u_n = fem.Function(V, name="u_n")  # the state at t_n; zero initial condition
    u_h = fem.Function(V, name="u")  # the state at t_{n+1}
    f = fem.Constant(msh, source)

    msh.topology.create_connectivity(msh.topology.dim - 1, msh.topology.dim)
    boundary_facets = mesh.exterior_facet_indices(msh.topology)
    boundary_dofs = fem.locate_dofs_topological(V, msh.topology.dim - 1, boundary_facets)
    bc = fem.dirichletbc(0.0, boundary_dofs, V)

    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = (u * v + dt * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
    L = (u_n + dt * f) * v * ufl.dx
    closure_file = None
    if closure_model is not None:
        closure = mno.Closure(closure_model, [u_n], quadrature_degree=2)  # <-- closure
        L += dt * ufl.inner(closure, v) * closure.dx  # <-- closure
        closure_file = mno.ClosureWriter(comm, output_dir / "closure.bp", [closure])
    if exact_reaction is not None:  # reference run only: r(u_n) in UFL, same quadrature
        L += dt * ufl.inner(exact_reaction(u_n), v) * mno.measure(msh, 2)

    problem = LinearProblem(
        a,
        L,
        bcs=[bc],
        u=u_h,
        petsc_options_prefix="heat_",
        petsc_options=direct_solver,
        reuse_matrix=True,  # `a` is the same every step: factorise once
    )
    states = []  # u after every step, to compare the runs afterwards

    def after_step(stepper):
        states.append(u_h.x.array.copy())
        if closure_file is not None:  # the closure of this step, r_θ(u^n), belongs to t_n
            closure_file.write(stepper.t - dt)

    stepper = IMEXStepper(problem, u_h, u_n, dt)
    tic = time.perf_counter()
    stepper.run(num_steps, callback=after_step, desc=description)
    wall_time = time.perf_counter() - tic
    if closure_file is not None:
        closure_file.close()
    return states, wall_time


# ## Step 3: run the three simulations
#
# All three runs share one mesh and one $P_1$ space, so their solutions can be compared dof
# by dof. We also record the time spent time stepping (the slowest rank's), which shows the
# cost of evaluating the closure (and of writing it).

# +
msh = mesh.create_unit_square(comm, num_cells, num_cells)
V = fem.functionspace(msh, ("Lagrange", 1))

runs = {
    "baseline": {},
    "closure": {"closure_model": model},
    "reference": {"exact_reaction": reaction},
}
states, wall_times = {}, {}
for name, kwargs in runs.items():
    states[name], wall_time = solve_heat(V, description=f"{name} run", **kwargs)
    wall_times[name] = comm.allreduce(wall_time, op=MPI.MAX)
# -

# ## Step 4: compare, save and plot
#
# Norms are global quantities: each rank integrates over the cells it owns, and
# `comm.allreduce` sums the contributions. We compute $\|u(t)\|_{L^2}$ for each run and the
# relative $L^2$ difference of the baseline and the closure runs to the reference,
# $\|u(t) - u_\text{ref}(t)\|_{L^2} / \|u_\text{ref}(t)\|_{L^2}$, at every step. The three
# solutions are also written to one VTX file (open `quickstart.bp` in ParaView, and
# `closure.bp` beside it for the closure).

# +
w = fem.Function(V)
norm_squared = fem.form(w * w * ufl.dx)


def l2_norm(values):
    """Global L2 norm of the P1 function with dof values `values` (local, with ghosts)."""
    w.x.array[:] = values
    return np.sqrt(comm.allreduce(fem.assemble_scalar(norm_squared), op=MPI.SUM))


times = dt * np.arange(1, num_steps + 1)
norms = {name: np.array([l2_norm(u) for u in states[name]]) for name in runs}
errors = {
    name: np.array(
        [l2_norm(u - u_ref) for u, u_ref in zip(states[name], states["reference"], strict=True)]
    )
    / norms["reference"]
    for name in ("baseline", "closure")
}

fields = {name: fem.Function(V, name=f"u_{name}") for name in runs}
vtx_path = output_dir / "quickstart.bp"
mesh_once = io.VTXMeshPolicy.reuse  # the mesh does not move: write it once
with io.VTXWriter(comm, vtx_path, list(fields.values()), "BP4", mesh_once) as vtx:
    for step, t in enumerate(times):
        for name, field in fields.items():
            field.x.array[:] = states[name][step]
        vtx.write(t)
# -

# Plotting and printing happen on rank 0 only.

if comm.rank == 0:
    fig, (ax_norm, ax_error) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    styles = {"baseline": "C0-", "closure": "C1-", "reference": "k--"}
    labels = {
        "baseline": "baseline (no reaction)",
        "closure": r"learned closure $r_\theta(u)$",
        "reference": "exact reaction $r(u)$",
    }
    for name in runs:
        ax_norm.plot(times, norms[name], styles[name], label=labels[name])
    ax_norm.set(xlabel="time $t$", ylabel=r"$\|u(t)\|_{L^2}$", title="Solution norm")
    ax_norm.legend()
    for name in ("baseline", "closure"):
        ax_error.semilogy(times, errors[name], styles[name], label=labels[name])
    ax_error.set(
        xlabel="time $t$",
        ylabel=r"$\|u - u_\mathrm{ref}\|_{L^2} / \|u_\mathrm{ref}\|_{L^2}$",
        title="Relative difference to the exact reaction",
    )
    ax_error.legend()
    fig.savefig(output_dir / "quickstart.png", dpi=150)

    print(f"\nmesh {num_cells}x{num_cells}, {num_steps} steps, {comm.size} rank(s)")
    print(f"closure fit: max relative error {fit_error:.2e}, {fit_time:.2f} s")
    header = ["run", "|u(T)|_L2", "rel. diff. at T", "max rel. diff.", "stepping"]
    print("{:<10} {:>10} {:>16} {:>15} {:>9}".format(*header))
    for name in runs:
        if name in errors:
            diff = f"{errors[name][-1]:16.2e} {np.max(errors[name]):15.2e}"
        else:
            diff = f"{'-':>16} {'-':>15}"
        print(f"{name:<10} {norms[name][-1]:10.5f} {diff} {wall_times[name]:7.2f} s")
    print(f"outputs written to {output_dir}")

# ## Checks
#
# The closure run must reproduce the reference up to the model's error. Ignoring the
# reaction altogether (the baseline) changes the solution by about 25 %; the closure
# reproduces the reaction up to its relative fit error of about 0.7 % (below 1 %, which
# we check), so we expect the closure run to be within roughly
# $0.25 \times 0.007 \approx 1.7 \times 10^{-3}$ of the reference, and require a relative
# $L^2$ difference below $2 \times 10^{-3}$ at every step. (It is smaller in practice, a
# few $10^{-4}$: the fit is best inside the training range, where the states are.) The
# baseline must be at least ten times further from the reference than the closure run.
# Every rank holds the same global numbers, so every rank checks them.

tolerance = 2e-3
assert fit_error < 1e-2, f"the closure fit is poor (max relative error {fit_error:.2e})"
assert np.max(errors["closure"]) < tolerance, "the closure run departs from the reference"
assert errors["baseline"][-1] > 10 * np.max(errors["closure"]), "the closure does not help"
