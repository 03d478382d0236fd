# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # Transient multiscale diffusion: a flux closure learned from fine trajectories
#
# This demo is implemented in {download}`demo_transient_diffusion.py`. It is the
# time-dependent companion of {doc}`demo_multiscale_diffusion`, and illustrates how to:
#
# - turn fine *trajectories* into closure training data: snapshots of the filtered
#   gradient and flux, one {py:class}`dolfinx_mno.data.ClosureSampler` sample per
#   snapshot, appended to one HDF5 file while the fine model runs,
# - fit with {py:func}`dolfinx_mno.training.fit` and a split *by trajectory* (`groups=`),
#   so that no validation snapshot has a near-copy in the training split,
# - couple a stiff flux closure **implicitly in time**: backward Euler with the closure at
#   the new state, Newton with the closure tangent in the Jacobian, run by
#   {py:class}`dolfinx_mno.timestepping.ImplicitStepper`,
# - compare with the explicit (IMEX) coupling of the same closure,
#   {py:class}`dolfinx_mno.timestepping.IMEXStepper`, and with coarse and fine runs
#   without closure, error over the horizon against wall time.
#
# Run it with `python demo_transient_diffusion.py` or `mpirun -n 2 python
# demo_transient_diffusion.py`; `--quick` (used by CI) runs a smaller problem in seconds.
# All outputs go to `demos/output/transient_diffusion/`.
#
# ## The problem
#
# $$
# \begin{align}
#   u_t &= \nabla \cdot \left( a(x / \varepsilon) \nabla u \right) + f(x, t)
#     && \text{in } \Omega \times (0, T], \\
#   u &= g && \text{on } \partial\Omega, \qquad u(\cdot, 0) = u_0 ,
# \end{align}
# $$
#
# on the unit square, with the laminate of the steady demo: $a = a_2 = 10$ in the middle
# half of each period in $x_1$, $a = a_1 = 1$ elsewhere, period $\varepsilon = 1/64$. Its
# homogenised tensor is $A_\text{hom} = \operatorname{diag}(\underline a, \bar a)$, the
# harmonic and the arithmetic mean (1.818 and 5.5).
#
# **Filtering in time.** The filter $R$ (coarse-cell averages) acts in space only, so it
# commutes with $\partial_t$: the filtered equation is
# $\partial_t \bar u = \nabla\cdot R(a \nabla u) + R f$, and the closure is the
# *instantaneous* flux commutator of the steady problem,
#
# $$
#   q = R(a \nabla u) - \bar a\, R(\nabla u) \approx q_\theta(\nabla \bar u) ,
# $$
#
# which homogenisation predicts to be $(A_\text{hom} - \bar a I)\nabla\bar u$. (The
# microstructure relaxes in a time of order $\varepsilon^2 / a \approx 10^{-5}$, far below
# the time step, so the fine solution carries its equilibrium corrector at every step.)
#
# **Time discretisation.** Backward Euler with step $\Delta t$ for every model. The coarse
# model with the closure: find $\bar u^{n+1} \in V_h$, $\bar u^{n+1} = g$ on
# $\partial\Omega$, with
#
# $$
#   \int_\Omega \frac{\bar u^{n+1} - \bar u^n}{\Delta t} v
#   + \bar a \nabla \bar u^{n+1} \cdot \nabla v
#   + q_\theta(\nabla \bar u^{n+1}) \cdot \nabla v
#   - f^{n+1} v \,\mathrm{d}x = 0 \qquad \forall v \in V_{h,0} .
# $$
#
# The closure is a diffusive flux, so it is as stiff as the diffusion itself; the
# **implicit** coupling above is stable for any $\Delta t$. The **IMEX** coupling reads
# $q_\theta(\nabla\bar u^n)$ instead: one linear solve per step with a matrix that never
# changes, but its stability depends on the closure. Here it is stable: in a Fourier mode
# $k$ across the stripes its amplification factor is
# $(1 + \Delta t (\bar a - \underline a) k^2) / (1 + \Delta t \bar a k^2) \in (0, 1)$, as
# $\underline a < \bar a$ (the closure takes diffusivity away). A closure that adds
# diffusivity would make it unstable for large $\Delta t k^2$.
#
# ## Imports

# +
import argparse
import json
import time
from pathlib import Path

from mpi4py import MPI

import dolfinx_solver  # noqa: F401  (loads the MPI libraries before dolfinx)
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import ufl
from dolfinx import fem, io, mesh

import dolfinx_mno as mno
from dolfinx_mno.data import (
    CellAverage,
    ClosureDataReader,
    ClosureDataWriter,
    ClosureSampler,
    L2Projection,
)
from dolfinx_mno.io import save_model
from dolfinx_mno.models import MLP
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.timestepping import IMEXStepper, ImplicitStepper
from dolfinx_mno.training import fit, shard

matplotlib.use("Agg")  # write files, no display needed
# -

# ## Settings
#
# The full run: $\varepsilon = 1/64$, coarse $Q_1$ on $16 \times 16$ quadrilaterals
# ($h = 4\varepsilon$), fine $Q_1$ on $512 \times 512$ (8 cells per period, aligned with
# the stripes), horizon $T = 0.1$ in 50 steps ($\Delta t = 2 \cdot 10^{-3}$; the slowest
# mode decays in about $1 / (\pi^2 (\underline a + \bar a)) = 0.014$). `--quick`:
# $\varepsilon = 1/32$, $8 \times 8$ and $256 \times 256$ cells, 25 steps.

# +
parser = argparse.ArgumentParser(description="Learned flux closure, transient diffusion.")
parser.add_argument("--quick", action="store_true", help="small problem for CI (seconds)")
args = parser.parse_args()

comm = MPI.COMM_WORLD
torch.set_num_threads(1)  # a tiny model: the cores belong to the MPI ranks

a1, a2 = 1.0, 10.0
periods, coarse_cells, num_steps = (32, 8, 25) if args.quick else (64, 16, 50)
epsilon = 1.0 / periods
fine_cells = 8 * periods
horizon = 0.1
dt = horizon / num_steps
record_every = 5  # steps between snapshots (training data, errors, output)
a_mean = 0.5 * (a1 + a2)
a_harmonic = 1.0 / (0.5 / a1 + 0.5 / a2)
A_hom = np.diag([a_harmonic, a_mean])

quadrature_degree = 2  # the closure's rule on the coarse cells
direct_solver = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
repository = Path(__file__).resolve().parents[2]
output_dir = repository / "demos" / "output" / "transient_diffusion"
if comm.rank == 0:
    output_dir.mkdir(parents=True, exist_ok=True)
comm.Barrier()
data_path = output_dir / "closure_data.h5"
model_path = output_dir / "flux_closure.pt"


def conductivity(x):
    """The laminate a(x / ε) at points x, shape (3, num_points)."""
    phase = np.mod(x[0] / epsilon, 1.0)
    return np.where((phase >= 0.25) & (phase < 0.75), a2, a1)


# -

# ## Scenarios
#
# A scenario is a source $f(x, t)$, boundary data $g(x)$ and an initial state
# $u_0(x)$ with $u_0 = g$ on the boundary. The sources form one family: a Gaussian
# circling a centre, plus a standing wave whose amplitude oscillates,
#
# $$
#   f = A\, e^{-30 |x - c(t)|^2} + B \sin(2\pi x_1) \sin(\pi x_2) \cos(\omega t), \qquad
#   c(t) = c_0 + r\, (\cos(\omega t + \varphi), \sin(\omega t + \varphi)) ,
# $$
#
# whose parameters are {py:class}`dolfinx.fem.Constant`s: every scenario then uses the
# same compiled forms, and the fine problem keeps one factorised matrix throughout.
# Four scenarios make the training data; the fifth, with parameters and data none of them
# has, is the test.

# +
scenarios = {
    "train: circling source": dict(
        A=50.0,
        c0=(0.5, 0.5),
        r=0.25,
        omega=2 * np.pi / horizon,
        phi=0.0,
        B=0.0,
        g=lambda x: 0.0 * x[0],
        u0=lambda x: 0.0 * x[0],
    ),
    "train: relaxing, g = x1": dict(
        A=0.0,
        c0=(0.5, 0.5),
        r=0.0,
        omega=2 * np.pi / horizon,
        phi=0.0,
        B=20.0,
        g=lambda x: x[0],
        u0=lambda x: x[0] + np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]),
    ),
    "train: fast source, g = x2": dict(
        A=100.0,
        c0=(0.3, 0.6),
        r=0.1,
        omega=-4 * np.pi / horizon,
        phi=1.0,
        B=0.0,
        g=lambda x: x[1],
        u0=lambda x: x[1],
    ),
    "train: standing wave, g = x1 x2": dict(
        A=0.0,
        c0=(0.5, 0.5),
        r=0.0,
        omega=4 * np.pi / horizon,
        phi=0.0,
        B=-30.0,
        g=lambda x: x[0] * x[1],
        u0=lambda x: x[0] * x[1] + np.sin(2 * np.pi * x[0]) * np.sin(np.pi * x[1]),
    ),
    "test": dict(
        A=60.0,
        c0=(0.6, 0.4),
        r=0.15,
        omega=3 * np.pi / horizon,
        phi=2.0,
        B=10.0,
        g=lambda x: 0.5 * x[0] * (1.0 - x[1]),
        u0=lambda x: 0.5 * x[0] * (1.0 - x[1]) + 0.5 * np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]),
    ),
}
training_scenarios = [name for name in scenarios if name.startswith("train")]


class Heat:
    """The pieces of a backward Euler heat model on one space, for any scenario.

    Holds the time constant, the source's parameters as constants, the boundary data
    `g`, the previous state `u_n` and the unknown `u`; `start(scenario)` sets them all.
    """

    def __init__(self, V):
        msh = V.mesh
        self.V = V
        self.time = fem.Constant(msh, 0.0)
        self.parameters = {
            key: fem.Constant(msh, np.zeros(2) if key == "c0" else 0.0)
            for key in ("A", "c0", "r", "omega", "phi", "B")
        }
        p, x, t = self.parameters, ufl.SpatialCoordinate(msh), self.time
        angle = p["omega"] * t + p["phi"]
        centre = p["c0"] + p["r"] * ufl.as_vector([ufl.cos(angle), ufl.sin(angle)])
        gaussian = ufl.exp(-30.0 * ufl.dot(x - centre, x - centre))
        wave = ufl.sin(2 * ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1]) * ufl.cos(p["omega"] * t)
        self.f = p["A"] * gaussian + p["B"] * wave
        self.g = fem.Function(V, name="g")
        self.u_n = fem.Function(V, name="u_n")
        self.u = fem.Function(V, name="u")
        msh.topology.create_connectivity(msh.topology.dim - 1, msh.topology.dim)
        facets = mesh.exterior_facet_indices(msh.topology)
        dofs = fem.locate_dofs_topological(V, msh.topology.dim - 1, facets)
        self.bcs = [fem.dirichletbc(self.g, dofs)]

    def start(self, scenario):
        """Set the source parameters, g, u_0 and t = 0 for `scenario`."""
        for key, constant in self.parameters.items():
            constant.value = scenario[key]
        self.time.value = 0.0
        self.g.interpolate(scenario["g"])
        self.u_n.interpolate(scenario["u0"])
        self.u.x.array[:] = self.u_n.x.array


# -

# ## The time loops
#
# A model *without* closure is a linear problem with a constant matrix,
# $(u, v) + \Delta t (A \nabla u, \nabla v) = (u^n + \Delta t f^{n+1}, v)$, for a
# conductivity $A$: the resolved $a(x/\varepsilon)$, the mean $\bar a$ or $A_\text{hom}$.
# {py:class}`dolfinx_mno.petsc.LinearProblem` with `reuse_matrix=True` factorises it once
# and then assembles only right-hand sides; {py:class}`~dolfinx_mno.timestepping.IMEXStepper`
# is its time loop (without closures, plain backward Euler).


# +
def plain_model(V, conductivity, name):
    """Backward Euler without closure; returns (heat, stepper)."""
    heat = Heat(V)
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    problem = LinearProblem(
        (u * v + dt * ufl.inner(conductivity * ufl.grad(u), ufl.grad(v))) * ufl.dx,
        (heat.u_n + dt * heat.f) * v * ufl.dx,
        u=heat.u,
        bcs=heat.bcs,
        petsc_options_prefix=f"{name}_",
        petsc_options=direct_solver,
        reuse_matrix=True,
    )
    return heat, IMEXStepper(problem, heat.u, heat.u_n, dt, time=heat.time)


# -

# The coarse model with the learned closure, implicit or IMEX. Implicit: the closure reads
# $\nabla \bar u^{n+1}$ (the unknown), {py:class}`~dolfinx_mno.petsc.NonlinearProblem`
# puts its tangent into the Jacobian, and
# {py:class}`~dolfinx_mno.timestepping.ImplicitStepper` runs Newton at every step from
# $\bar u^n$. The learned closure is linear, so Newton converges in one iteration; the
# same code takes a nonlinear closure. IMEX: the closure reads $\nabla \bar u^n$ and goes
# to the right-hand side, whose matrix is the $\bar a$-only model's.


# +
def closure_model(V, implicit, name):
    """Backward Euler with the learned closure; returns (heat, stepper, closure)."""
    heat = Heat(V)
    v = ufl.TestFunction(V)
    state = heat.u if implicit else heat.u_n
    closure = mno.Closure(
        model_path, [ufl.grad(state)], value_shape=(2,), quadrature_degree=quadrature_degree
    )
    flux_term = ufl.inner(closure, ufl.grad(v)) * closure.dx
    if implicit:
        F = (
            (heat.u - heat.u_n) / dt * v * ufl.dx
            + ufl.inner(a_mean * ufl.grad(heat.u), ufl.grad(v)) * ufl.dx
            + flux_term
            - heat.f * v * ufl.dx
        )
        problem = NonlinearProblem(
            F,
            heat.u,
            bcs=heat.bcs,
            petsc_options_prefix=f"{name}_",
            petsc_options={"snes_rtol": 1e-10, "snes_atol": 1e-12, **direct_solver},
        )
        return heat, ImplicitStepper(problem, heat.u, heat.u_n, dt, time=heat.time), closure
    u = ufl.TrialFunction(V)
    problem = LinearProblem(
        (u * v + dt * ufl.inner(a_mean * ufl.grad(u), ufl.grad(v))) * ufl.dx,
        (heat.u_n + dt * heat.f) * v * ufl.dx - dt * flux_term,
        u=heat.u,
        bcs=heat.bcs,
        petsc_options_prefix=f"{name}_",
        petsc_options=direct_solver,
        reuse_matrix=True,  # the closure is in the right-hand side only
    )
    return heat, IMEXStepper(problem, heat.u, heat.u_n, dt, time=heat.time), closure


# -

# One function runs any model through a scenario: `record_every` steps at a time, timed
# (the slowest rank's wall time of the steps only), then a call `record(heat, t)` that
# may take snapshots (not timed).


def run(model, scenario, record):
    """Run `model = (heat, stepper, ...)` over the horizon; returns the stepping time."""
    heat, stepper = model[:2]
    heat.start(scenario)
    stepper.t, seconds = 0.0, 0.0
    record(heat, 0.0)
    for _ in range(num_steps // record_every):
        comm.Barrier()
        tic = time.perf_counter()
        stepper.run(record_every, progress=False)
        seconds += comm.allreduce(time.perf_counter() - tic, op=MPI.MAX)
        record(heat, stepper.t)
    return seconds


# ## Step 1: fine trajectories and training data
#
# The fine model runs the four training scenarios. Every `record_every` steps the fine
# gradient and flux are interpolated into the fine DG$_0$ vector space (the midpoint
# values: on these rectangles, the exact cell means of a bilinear function's gradient),
# filtered by exact coarse-cell averages
# ({py:class}`~dolfinx_mno.data.CellAverage`), and one sample
# `input = R(∇u_f), target = R(a ∇u_f) - ā R(∇u_f)` is appended to the data file with its
# time. As in the steady demo, the sampler's "state" is the gradient and its "tendency"
# the flux law. The initial states are not sampled: $u_0$ is smooth, without the
# oscillating corrector the fine solution acquires in its first step, so its filtered flux
# is $\bar a\, R(\nabla u_0)$, not the homogenised one.

# +
fine = mesh.create_unit_square(comm, fine_cells, fine_cells, mesh.CellType.quadrilateral)
coarse = mesh.create_unit_square(comm, coarse_cells, coarse_cells, mesh.CellType.quadrilateral)
a_fine = fem.Function(fem.functionspace(fine, ("DG", 0)), name="a")
a_fine.interpolate(conductivity)  # the cells do not cut the stripes
V_fine = fem.functionspace(fine, ("Lagrange", 1))
V_coarse = fem.functionspace(coarse, ("Lagrange", 1))
fine_model = plain_model(V_fine, a_fine, "fine")

W_fine = fem.functionspace(fine, ("DG", 0, (2,)))
W_coarse = fem.functionspace(coarse, ("DG", 0, (2,)))
gradient, flux = fem.Function(W_fine), fem.Function(W_fine)
u_fine = fine_model[0].u
expressions = [
    fem.Expression(e, W_fine.element.interpolation_points)
    for e in (ufl.grad(u_fine), a_fine * ufl.grad(u_fine))
]
filtered_gradient = fem.Function(W_coarse, name="filtered_gradient")
sampler = ClosureSampler(
    CellAverage(W_coarse, fine),  # R: exact coarse-cell means
    filtered_gradient,  # ḡ = R(grad u_f), overwritten by each sample
    [filtered_gradient],  # the closure's input
    a_mean * filtered_gradient,  # the known coarse flux
    quadrature_degree=0,
)

trajectory_of_sample = []
fine_seconds = {}
with ClosureDataWriter.from_sampler(
    data_path,
    sampler,
    fine_mesh=fine,
    time_step=record_every * dt,
    attributes={
        "problem": "u_t = div(a(x/eps) grad u) + f, laminate",
        "epsilon": epsilon,
        "conductivities": [a1, a2],
        "scenarios": training_scenarios,
    },
    mode="w",
) as writer:
    for index, name in enumerate(training_scenarios):

        def snapshot(heat, t, index=index):
            if t == 0.0:
                return  # u_0 is smooth: it has no corrector yet (see above)
            gradient.interpolate(expressions[0])
            flux.interpolate(expressions[1])
            writer.append(sampler.sample(gradient, fine_tendency=flux), time=t)
            trajectory_of_sample.append(index)

        fine_seconds[name] = run(fine_model, scenarios[name], snapshot)
        if comm.rank == 0:
            print(f"fine run '{name}': {fine_seconds[name]:.2f} s", flush=True)
if comm.rank == 0:
    with ClosureDataReader(data_path) as data:
        read = data.inputs(), data.targets(), data.num_points
else:
    read = None
inputs, targets, num_points = comm.bcast(read, root=0)  # (S * P, 2), (S * P, 2)
groups = np.repeat(trajectory_of_sample, num_points)  # the trajectory of every row
# -

# ## Step 2: fit and save the closure
#
# Homogenisation predicts a linear closure, so the model is one linear layer. Snapshots of
# one trajectory are strongly correlated, so `groups=` sends whole trajectories to
# validation (one of the four). `fit` standardises the inputs; the targets stay in
# physical units (`normalize_targets=False`): their second component is zero in theory,
# and standardising it would blow its noise up to order one.

# +
tic = time.perf_counter()
result = fit(
    MLP(2, 2, hidden_features=[], seed=0),
    shard(inputs, comm),
    shard(targets, comm),
    groups=shard(groups, comm),
    validation_fraction=0.25,
    comm=comm,
    normalize=True,
    normalize_targets=False,
    epochs=300,
    learning_rate=1e-2,
    patience=30,
    seed=0,
    progress=False,
)
fit_seconds = comm.allreduce(time.perf_counter() - tic, op=MPI.MAX)
save_model(
    model_path,
    result.model,
    metadata={
        "operands": ["grad(u)"],
        "value_shape": [2],
        "closure": "filtered flux minus a_mean * filtered gradient",
    },
    comm=comm,
)
# -

# ## Step 3: the test scenario, every model
#
# The reference is the fine model's test run, filtered onto the coarse space $V_h$ by the
# L² projection (degree-10 rule, as in the steady demo) at every snapshot. Every coarse
# run is compared with it at the same times,
#
# $$
#   e(t) = \frac{\| P u(t) - P u_f(t) \|_{L^2}}{\| P u_f(t) \|_{L^2}}, \qquad
#   e_\text{max} = \max_t e(t) \text{ over the snapshots } t > 0 .
# $$
#
# The runs: the fine reference; the coarse model with $\bar a$ only on $16^2$, $32^2$ and
# $64^2$ cells; with the exact $A_\text{hom}$; with the learned closure, implicit and
# IMEX; and the coarsest mesh that resolves the stripes, $256^2$ (4 cells per period),
# the cheapest run without closure that can be as accurate (see the steady demo).

# +
projection = L2Projection(V_coarse, quadrature_degree=10)
reference = {}  # time -> filtered fine values


def keep_reference(heat, t):
    reference[t] = projection(heat.u).x.array.copy()


test = scenarios["test"]
fine_seconds["test"] = run(fine_model, test, keep_reference)
reference_norms = {}
w = fem.Function(V_coarse)
l2_form = fem.form(w**2 * ufl.dx)


def l2_norm(values):
    w.x.array[:] = values
    return np.sqrt(comm.allreduce(fem.assemble_scalar(l2_form), op=MPI.SUM))


def record_errors(snapshots, errors, project):
    """A `record` that keeps every snapshot and its error against the reference."""

    def record(heat, t):
        values = (projection(heat.u) if project else heat.u).x.array.copy()
        snapshots[t] = values
        errors[t] = l2_norm(values - reference[t]) / l2_norm(reference[t])

    return record


def unit_square(n):
    return mesh.create_unit_square(comm, n, n, mesh.CellType.quadrilateral)


models = {"ā only": plain_model(V_coarse, fem.Constant(coarse, a_mean), "mean")}
models["A_hom"] = plain_model(V_coarse, fem.Constant(coarse, A_hom), "hom")
models["closure, implicit"] = closure_model(V_coarse, implicit=True, name="implicit")
models["closure, IMEX"] = closure_model(V_coarse, implicit=False, name="imex")
mesh_of = {name: coarse_cells for name in models}
for n in (2 * coarse_cells, 4 * coarse_cells):
    name = f"ā only, {n}x{n}"
    msh = unit_square(n)
    models[name] = plain_model(
        fem.functionspace(msh, ("Lagrange", 1)), fem.Constant(msh, a_mean), f"mean{n}"
    )
    mesh_of[name] = n
n = 4 * periods
resolved_mesh = unit_square(n)
a_resolved = fem.Function(fem.functionspace(resolved_mesh, ("DG", 0)))
a_resolved.interpolate(conductivity)
resolved = f"resolved, {n}x{n}"
models[resolved] = plain_model(fem.functionspace(resolved_mesh, ("Lagrange", 1)), a_resolved, "r")
mesh_of[resolved] = n

runs, snapshots = {}, {}
for name, model in models.items():
    errors, snapshots[name] = {}, {}
    project = model[0].V is not V_coarse
    seconds = run(model, test, record_errors(snapshots[name], errors, project))
    runs[name] = dict(
        mesh=mesh_of[name],
        dofs=model[0].V.dofmap.index_map.size_global,
        seconds=seconds,
        max_error=max(e for t, e in errors.items() if t > 0),
        final_error=errors[max(errors)],
        errors=[errors[t] for t in sorted(errors)],
    )
runs["fine (reference)"] = dict(
    mesh=fine_cells, dofs=V_fine.dofmap.index_map.size_global, seconds=fine_seconds["test"]
)
times = sorted(reference)
# -

# **The learned effective tensor**, read off the closure tangent as in the steady demo:
# the implicit run's closure holds $\partial q_\theta / \partial \nabla\bar u$ at every
# quadrature point of the last Newton iterate, and
# {py:meth}`~dolfinx_mno.Closure.mean_tangent` averages it over all points of all ranks.

# +
closure = models["closure, implicit"][2]
newton_iterations = models["closure, implicit"][1].problem.solver.getIterationNumber()
A_learned = a_mean * np.eye(2) + closure.mean_tangent()
tensor_error = np.linalg.norm(A_learned - A_hom) / np.linalg.norm(A_hom)
A_least_squares = a_mean * np.eye(2) + np.linalg.lstsq(inputs, targets, rcond=None)[0].T
fit_gap = np.linalg.norm(A_learned - A_least_squares) / np.linalg.norm(A_hom)
closure_error = runs["closure, implicit"]["max_error"]
without_closure = [n for n in runs if n.startswith(("ā only", "resolved"))]
as_accurate = [n for n in without_closure if runs[n]["max_error"] <= closure_error]
match = min(as_accurate, key=lambda n: runs[n]["seconds"]) if as_accurate else "fine (reference)"
# -

# ## Output: VTX, a plot and a JSON summary
#
# The coarse solutions of the test run (every model on $V_h$, with the filtered fine
# solution) go to one VTX file, one frame per snapshot; the plot shows the error over
# time and the error against wall time.

# +
on_coarse = ["ā only", "A_hom", "closure, implicit", "closure, IMEX"]
fields = {"filtered fine": fem.Function(V_coarse, name="u_fine_filtered")}
for name in on_coarse:
    fields[name] = fem.Function(V_coarse, name="u_" + name.replace(", ", "_").replace(" ", "_"))
with io.VTXWriter(comm, output_dir / "test_coarse.bp", list(fields.values()), "BP4") as vtx:
    for t in times:
        fields["filtered fine"].x.array[:] = reference[t]
        for name in on_coarse:
            fields[name].x.array[:] = snapshots[name][t]
        vtx.write(t)

if comm.rank == 0:
    fig, (ax_time, ax_cost) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for name, r in runs.items():
        if "errors" in r:
            ax_time.semilogy(times[1:], r["errors"][1:], "o-", ms=3, label=name)
            ax_cost.loglog(r["seconds"], r["max_error"], "o", label=name)
    ax_time.set(
        xlabel="time $t$",
        ylabel=r"$\|P u - P u_f\| / \|P u_f\|$",
        title="Test scenario: error against the filtered fine solution",
    )
    ax_cost.axvline(fine_seconds["test"], color="k", ls=":", label="fine (reference)")
    ax_cost.set(
        xlabel=f"wall time of {num_steps} steps [s]",
        ylabel="max error over the horizon",
        title="Error against cost",
    )
    for ax in (ax_time, ax_cost):
        ax.legend(fontsize=7)
    fig.savefig(output_dir / "transient.png", dpi=120)
    plt.close(fig)

summary = {
    "mode": "quick" if args.quick else "full",
    "ranks": comm.size,
    "epsilon": epsilon,
    "coarse_mesh": coarse_cells,
    "fine_mesh": fine_cells,
    "dt": dt,
    "num_steps": num_steps,
    "A_hom": A_hom.tolist(),
    "A_learned": A_learned.tolist(),
    "tensor_relative_error": tensor_error,
    "A_least_squares": A_least_squares.tolist(),
    "fit_gap": fit_gap,
    "training": {
        "scenarios": training_scenarios,
        "num_samples": len(trajectory_of_sample),
        "num_points": num_points,
        "epochs": result.history.epochs,
        "best_val_loss": result.history.best_val_loss,
        "fit_seconds": fit_seconds,
    },
    "fine_seconds": fine_seconds,
    "newton_iterations_last_step": newton_iterations,
    "closure_update_seconds": closure.timings["total"],
    "times": times,
    "runs": runs,
    "coarsest_without_closure_as_accurate": match,
}
if comm.rank == 0:
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nlaminate a1 = {a1:g}, a2 = {a2:g}, eps = 1/{periods}; coarse "
        f"{coarse_cells}x{coarse_cells}, fine {fine_cells}x{fine_cells}; {num_steps} steps "
        f"of {dt:g}; {comm.size} rank(s)"
    )
    print(
        f"training data: {len(trajectory_of_sample)} snapshots x {num_points} coarse cells "
        f"from {len(training_scenarios)} fine trajectories; fit {result.history.epochs} "
        f"epochs, {fit_seconds:.2f} s"
    )
    print(
        f"learned tensor [[{A_learned[0, 0]:.4f}, {A_learned[0, 1]:.4f}], "
        f"[{A_learned[1, 0]:.4f}, {A_learned[1, 1]:.4f}]] vs A_hom diag({a_harmonic:.4f}, "
        f"{a_mean:.4f}): relative error {tensor_error:.2e} (least squares: {fit_gap:.1e} away)"
    )
    print("\ntest scenario         mesh     dofs   max error  final error  time [s]")
    for name, r in runs.items():
        errors_ = f"{r['max_error']:10.3e}  {r['final_error']:10.3e}" if "errors" in r else ""
        print(f"  {name:<20} {r['mesh']:4d} {r['dofs']:8d}  {errors_:<22}  {r['seconds']:8.3f}")
    print(f"coarsest run without closure as accurate as the implicit closure: {match}")
    print(f"outputs written to {output_dir}")
# -

# ## Checks
#
# Tolerances from measurements (full run / `--quick`, the same on 1 and 2 ranks; see
# `docs/results.md`):
#
# * the learned tensor is within 0.24 % / 0.54 % of $A_\text{hom}$ (the issue asks for
#   2 %); we require 1 %. The fit is within 0.06 % / 0.17 % of the least-squares tensor
#   of the data; we require 0.3 %;
# * the closure is linear, so Newton takes one iteration per step;
# * over the horizon, the implicit closure's error is 1.17 / 1.15 times that of the exact
#   $A_\text{hom}$ on the same mesh (the best a local closure can do there); we require
#   1.5 times. Every ā-only run is 45 / 12 times less accurate (we require 8 times):
#   refining it does not help, its equation is wrong;
# * the IMEX closure lags the flux by one step, an $O(\Delta t)$ error: 7.5 / 3.7 times
#   the implicit one's, and it halves with $\Delta t$ (full against quick). We require
#   the implicit coupling to be at least twice as accurate, and the IMEX one still 2.5
#   times more accurate than ā only;
# * in the full run, the coarsest run without closure that is as accurate as the closure
#   resolves the stripes.

assert len(trajectory_of_sample) == len(training_scenarios) * (num_steps // record_every)
assert tensor_error < 1e-2, f"learned tensor off by {tensor_error:.2e}"
assert fit_gap < 3e-3, f"the fit is {fit_gap:.2e} from the least-squares optimum"
assert newton_iterations == 1
mean_only = [runs[n]["max_error"] for n in runs if n.startswith("ā only")]
assert min(mean_only) > 8 * closure_error
assert closure_error < 1.5 * runs["A_hom"]["max_error"]
imex_error = runs["closure, IMEX"]["max_error"]
assert 2 * closure_error < imex_error < min(mean_only) / 2.5
assert match == resolved
