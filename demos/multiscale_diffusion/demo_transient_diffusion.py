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
#   without closure, error over the horizon against wall time,
# - do all of it for two microstructures, a laminate and a checkerboard, and use each
#   closure, learned on the unit square, unchanged on a plate with holes.
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
# on the unit square and on the plate with holes of the steady demo, with its two
# microstructures of period $\varepsilon = 1/64$:
#
# * the **laminate**: $a = a_2 = 10$ in the middle half of each period in $x_1$,
#   $a = a_1 = 1$ elsewhere; $A_\text{hom} = \operatorname{diag}(\underline a, \bar a)$,
#   the harmonic and the arithmetic mean (1.818 and 5.5);
# * the **checkerboard**: $b = b_2 = 3$ where exactly one phase of $x / \varepsilon$ lies in
#   $[\tfrac14, \tfrac34)$, $b = b_1 = 1$ elsewhere; $A_\text{hom} = \sqrt{b_1 b_2}\, I$
#   (Keller, Dykhne), against the mean $\bar b = 2$.
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
# $k$ across the laminate's stripes its amplification factor is
# $(1 + \Delta t (\bar a - \underline a) k^2) / (1 + \Delta t \bar a k^2) \in (0, 1)$, as
# $\underline a < \bar a$ (the closure takes diffusivity away; so does the
# checkerboard's, $\sqrt{b_1 b_2} < \bar b$). A closure that adds diffusivity would make
# it unstable for large $\Delta t k^2$.
#
# ## Imports

# +
import argparse
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

from mpi4py import MPI

import dolfinx_solver  # noqa: F401  (loads the MPI libraries before dolfinx)
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import ufl
from dolfinx import fem, io, mesh
from dolfinx.io import gmsh as gmshio
from microstructure import PLATE_HOLES, microstructure_mesh

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
# ($h = 4\varepsilon$) and $P_1$ on the plate's triangles ($h = 1/40$), horizon $T = 0.1$
# in 50 steps ($\Delta t = 2 \cdot 10^{-3}$; the slowest mode decays in about
# $1 / (\pi^2 (\underline a + \bar a)) = 0.014$). `--quick`: $\varepsilon = 1/32$, an
# $8 \times 8$ coarse unit square, 25 steps.
#
# The fine models are the steady demo's, chosen there from measured discretisation
# errors: for the laminate $Q_1$ with 8 cells per period on the unit square ($512^2$) and
# $P_1$ on triangles of size $\varepsilon/8$ on the plate ($\varepsilon/4$ with `--quick`);
# for the checkerboard, whose corners make the fine solution singular, $Q_2$ with 4 cells
# per period ($256^2$, an effective conductivity 0.90 % above $\sqrt 3$) and $P_2$ on
# triangles of size $\varepsilon/4$ (1.18 % above). Every fine mesh conforms to the
# microstructure, so the conductivity at each cell midpoint is exact.

# +
parser = argparse.ArgumentParser(description="Learned flux closure, transient diffusion.")
parser.add_argument("--quick", action="store_true", help="small problem for CI (seconds)")
args = parser.parse_args()

comm = MPI.COMM_WORLD
torch.set_num_threads(1)  # a tiny model: the cores belong to the MPI ranks

periods, coarse_cells, num_steps = (32, 8, 25) if args.quick else (64, 16, 50)
epsilon = 1.0 / periods
horizon = 0.1
dt = horizon / num_steps
record_every = 5  # steps between snapshots (training data, errors, output)
quadrature_degree = 2  # the closure's rule on the coarse cells
direct_solver = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
repository = Path(__file__).resolve().parents[2]
output_dir = repository / "demos" / "output" / "transient_diffusion"
if comm.rank == 0:
    output_dir.mkdir(parents=True, exist_ok=True)
comm.Barrier()


def in_middle_half(x, i):
    """Whether the phase of x_i / ε lies in [1/4, 3/4)."""
    phase = np.mod(x[i] / epsilon, 1.0)
    return (phase >= 0.25) & (phase < 0.75)


@dataclass
class Microstructure:
    """A microstructure and the fine models that resolve it."""

    name: str
    law: object  # conductivity at points x, shape (3, num_points) -> (num_points,)
    mean: float  # the coarse model's known conductivity
    A_hom: np.ndarray  # the homogenised tensor
    degree: int  # fine Lagrange degree (unit square and plate)
    cells_per_period: int  # fine unit square
    directions: tuple[int, ...]  # the plate mesh's cuts: (0,) stripes, (0, 1) squares
    plate_cells_per_period: int


a1, a2, b1, b2 = 1.0, 10.0, 1.0, 3.0
microstructures = [
    Microstructure(
        "laminate",
        lambda x: np.where(in_middle_half(x, 0), a2, a1),
        0.5 * (a1 + a2),
        np.diag([1.0 / (0.5 / a1 + 0.5 / a2), 0.5 * (a1 + a2)]),
        degree=1,
        cells_per_period=8,
        directions=(0,),
        plate_cells_per_period=4 if args.quick else 8,
    ),
    Microstructure(
        "checkerboard",
        lambda x: np.where(in_middle_half(x, 0) ^ in_middle_half(x, 1), b2, b1),
        0.5 * (b1 + b2),
        np.sqrt(b1 * b2) * np.eye(2),
        degree=2,
        cells_per_period=4,
        directions=(0, 1),
        plate_cells_per_period=4,
    ),
]
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
# same compiled forms, and a fine problem keeps one factorised matrix throughout.
# Four scenarios on the unit square make the training data; the fifth, with parameters
# and data none of them has, is the test on both domains. It starts from $u_0 = g$, which
# satisfies the boundary condition on the holes too.

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
        u0=lambda x: 0.5 * x[0] * (1.0 - x[1]),
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


def resolved_model(msh, law, degree, name):
    """A model that resolves the microstructure; returns (heat, stepper, conductivity).

    The law is a piecewise constant on `msh`, which must conform to it.
    """
    a = fem.Function(fem.functionspace(msh, ("DG", 0)), name="a")
    a.interpolate(law)  # the value at each cell midpoint: exact on a conforming mesh
    return (*plain_model(fem.functionspace(msh, ("Lagrange", degree)), a, name), a)


# -

# The coarse model with the learned closure, implicit or IMEX. Implicit: the closure reads
# $\nabla \bar u^{n+1}$ (the unknown), {py:class}`~dolfinx_mno.petsc.NonlinearProblem`
# puts its tangent into the Jacobian, and
# {py:class}`~dolfinx_mno.timestepping.ImplicitStepper` runs Newton at every step from
# $\bar u^n$. The learned closure is linear, so Newton converges in one iteration; the
# same code takes a nonlinear closure. IMEX: the closure reads $\nabla \bar u^n$ and goes
# to the right-hand side, whose matrix is the mean-only model's.


# +
def closure_model(V, model_path, mean, implicit, name):
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
            + ufl.inner(mean * ufl.grad(heat.u), ufl.grad(v)) * ufl.dx
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
        (u * v + dt * ufl.inner(mean * ufl.grad(u), ufl.grad(v))) * ufl.dx,
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
# may take snapshots (not timed). Python's cyclic garbage collector is paused while the
# steps are timed, as `timeit` does: a full collection walks every object of this
# script (all the models, forms and snapshots) and would land on whichever run is timed
# then (it added 0.14 s to one 0.03 s run).


def run(model, scenario, record):
    """Run `model = (heat, stepper, ...)` over the horizon; returns the stepping time."""
    heat, stepper = model[:2]
    heat.start(scenario)
    stepper.t, seconds = 0.0, 0.0
    record(heat, 0.0)
    for _ in range(num_steps // record_every):
        comm.Barrier()
        gc.disable()
        tic = time.perf_counter()
        try:
            stepper.run(record_every, progress=False)
        finally:
            toc = time.perf_counter()
            gc.enable()
        seconds += comm.allreduce(toc - tic, op=MPI.MAX)
        record(heat, stepper.t)
    return seconds


# ## Step 1: fine trajectories and training data
#
# The fine model runs the four training scenarios on the unit square. Every
# `record_every` steps the fine gradient and flux are interpolated into the fine
# discontinuous vector space of the fine degree (DG$_0$ for $Q_1$: the midpoint values,
# on these rectangles the exact cell means of a bilinear function's gradient; DG$_2$ for
# $Q_2$, which holds its gradient exactly), filtered by exact coarse-cell averages
# ({py:class}`~dolfinx_mno.data.CellAverage`), and one sample
# `input = R(∇u_f), target = R(a ∇u_f) - ā R(∇u_f)` is appended to the data file with its
# time. As in the steady demo, the sampler's "state" is the gradient and its "tendency"
# the flux law. The initial states are not sampled: $u_0$ is smooth, without the
# oscillating corrector the fine solution acquires in its first step, so its filtered flux
# is $\bar a\, R(\nabla u_0)$, not the homogenised one.


# +
def unit_square(n):
    return mesh.create_unit_square(comm, n, n, mesh.CellType.quadrilateral)


coarse = unit_square(coarse_cells)
V_coarse = fem.functionspace(coarse, ("Lagrange", 1))
W_coarse = fem.functionspace(coarse, ("DG", 0, (2,)))


def training_data(ms, fine_model, path):
    """Fine trajectories of the training scenarios, filtered into closure samples in `path`.

    Returns the inputs, targets and trajectory of every row (on every rank), the number of
    snapshots and the fine run times.
    """
    heat = fine_model[0]
    fine = heat.V.mesh
    conductivity = fine_model[2]
    gradient_degree = 0 if ms.degree == 1 else ms.degree
    W_fine = fem.functionspace(fine, ("DG", gradient_degree, (2,)))
    gradient, flux = fem.Function(W_fine), fem.Function(W_fine)
    expressions = [
        fem.Expression(e, W_fine.element.interpolation_points)
        for e in (ufl.grad(heat.u), conductivity * ufl.grad(heat.u))
    ]
    filtered_gradient = fem.Function(W_coarse, name="filtered_gradient")
    sampler = ClosureSampler(
        CellAverage(W_coarse, fine),  # R: exact coarse-cell means
        filtered_gradient,  # ḡ = R(grad u_f), overwritten by each sample
        [filtered_gradient],  # the closure's input
        ms.mean * filtered_gradient,  # the known coarse flux
        quadrature_degree=0,
    )
    trajectory_of_sample, seconds = [], {}
    with ClosureDataWriter.from_sampler(
        path,
        sampler,
        fine_mesh=fine,
        time_step=record_every * dt,
        attributes={
            "problem": f"u_t = div(a(x/eps) grad u) + f, {ms.name}",
            "epsilon": epsilon,
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

            seconds[name] = run(fine_model, scenarios[name], snapshot)
            if comm.rank == 0:
                print(f"{ms.name}, fine run '{name}': {seconds[name]:.2f} s", flush=True)
    if comm.rank == 0:
        with ClosureDataReader(path) as data:
            read = data.inputs(), data.targets(), data.num_points
    else:
        read = None
    inputs, targets, num_points = comm.bcast(read, root=0)  # (S * P, 2), (S * P, 2)
    groups = np.repeat(trajectory_of_sample, num_points)  # the trajectory of every row
    return inputs, targets, groups, len(trajectory_of_sample), seconds


# -

# ## Step 2: fit and save the closure
#
# Homogenisation predicts a linear closure, so the model is one linear layer. Snapshots of
# one trajectory are strongly correlated, so `groups=` sends whole trajectories to
# validation (one of the four). `fit` standardises the inputs; the targets stay in
# physical units (`normalize_targets=False`): a component that is zero in theory (the
# laminate's second) would otherwise have its noise blown up to order one.


# +
def fit_closure(inputs, targets, groups, path, name):
    """Fit a linear layer, save it to `path`; returns the fit result and time."""
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
    seconds = comm.allreduce(time.perf_counter() - tic, op=MPI.MAX)
    metadata = {"operands": ["grad(u)"], "value_shape": [2], "closure": f"{name} flux"}
    save_model(path, result.model, metadata=metadata, comm=comm)
    return result, seconds


# -

# ## Step 3: the test scenario, every model
#
# The reference is the fine model's test run, filtered onto the coarse space of the
# domain by the L² projection (degree-10 rule, as in the steady demo) at every snapshot.
# Every coarse run is compared with it at the same times,
#
# $$
#   e(t) = \frac{\| P u(t) - P u_f(t) \|_{L^2}}{\| P u_f(t) \|_{L^2}}, \qquad
#   e_\text{max} = \max_t e(t) \text{ over the snapshots } t > 0 .
# $$
#
# On the plate the fine mesh's holes are rounder than the coarse mesh's polygons: the
# projection takes the values at the few coarse points outside the fine mesh from the
# nearest fine cell (`padding`, as in the steady demo).


# +
def compare(fine_model, models, V, padding=0.0):
    """Run the test scenario with the fine model and `models` (name: model) on V.

    Returns the runs (errors over time, wall times), the coarse snapshots of the models on
    V and the filtered reference, both as {time: values}.
    """
    projection = L2Projection(V, quadrature_degree=10, padding=padding)
    w = fem.Function(V)
    l2_form = fem.form(w**2 * ufl.dx)

    def l2_norm(values):
        w.x.array[:] = values
        return np.sqrt(comm.allreduce(fem.assemble_scalar(l2_form), op=MPI.SUM))

    reference = {}

    def keep_reference(heat, t):
        reference[t] = projection(heat.u).x.array.copy()

    fine_seconds = run(fine_model, scenarios["test"], keep_reference)
    runs = {
        "fine (reference)": dict(
            dofs=fine_model[0].V.dofmap.index_map.size_global, seconds=fine_seconds
        )
    }
    snapshots = {}
    for name, model in models.items():
        errors, values_at = {}, {}

        def record(heat, t, errors=errors, values_at=values_at):
            values = (heat.u if heat.V is V else projection(heat.u)).x.array.copy()
            values_at[t] = values
            errors[t] = l2_norm(values - reference[t]) / l2_norm(reference[t])

        seconds = run(model, scenarios["test"], record)
        runs[name] = dict(
            dofs=model[0].V.dofmap.index_map.size_global,
            seconds=seconds,
            max_error=max(e for t, e in errors.items() if t > 0),
            final_error=errors[max(errors)],
            errors=[errors[t] for t in sorted(errors)],
        )
        if model[0].V is V:
            snapshots[name] = values_at
    return runs, snapshots, reference


# -

# ## Steps 1–3 for each microstructure, on the unit square and on the plate
#
# On the unit square the coarse runs are: the mean conductivity only, on $16^2$ cells and
# (laminate) on $32^2$ and $64^2$; the exact $A_\text{hom}$; the learned closure, implicit
# and IMEX; and, for the laminate, the coarsest mesh that resolves the stripes, $256^2$
# (4 cells per period, see the steady demo), the cheapest run without closure that can be
# as accurate. On the plate (`meshes/plate_with_holes.msh`) the closure learned on the unit
# square is used unchanged, against the mean only and $A_\text{hom}$; the fine reference is
# a plate mesh that conforms to the microstructure, made by `microstructure_mesh` (in
# {download}`microstructure.py`, shared with the steady demo).
#
# **The learned effective tensor** is read off the closure tangent as in the steady demo:
# the implicit run's closure holds $\partial q_\theta / \partial \nabla\bar u$ at every
# quadrature point of the last Newton iterate, and
# {py:meth}`~dolfinx_mno.Closure.mean_tangent` averages it over all points of all ranks.

# +
plate = gmshio.read_from_msh(repository / "meshes" / "plate_with_holes.msh", comm, 0, gdim=2).mesh
V_plate = fem.functionspace(plate, ("Lagrange", 1))
results, vtx_fields = {}, {}
for ms in microstructures:
    data_path = output_dir / f"closure_data_{ms.name}.h5"
    model_path = output_dir / f"flux_closure_{ms.name}.pt"
    fine_cells = periods * ms.cells_per_period
    fine_model = resolved_model(unit_square(fine_cells), ms.law, ms.degree, f"fine_{ms.name}")
    inputs, targets, groups, num_snapshots, fine_seconds = training_data(ms, fine_model, data_path)
    result, fit_seconds = fit_closure(inputs, targets, groups, model_path, ms.name)

    models = {
        "mean only": plain_model(V_coarse, fem.Constant(coarse, ms.mean), f"mean_{ms.name}"),
        "A_hom": plain_model(V_coarse, fem.Constant(coarse, ms.A_hom), f"hom_{ms.name}"),
        "closure, implicit": closure_model(V_coarse, model_path, ms.mean, True, f"i_{ms.name}"),
        "closure, IMEX": closure_model(V_coarse, model_path, ms.mean, False, f"e_{ms.name}"),
    }
    if ms.name == "laminate":
        for n in (2 * coarse_cells, 4 * coarse_cells):
            msh = unit_square(n)
            models[f"mean only, {n}x{n}"] = plain_model(
                fem.functionspace(msh, ("Lagrange", 1)), fem.Constant(msh, ms.mean), f"mean{n}"
            )
        n = 4 * periods
        models[f"resolved, {n}x{n}"] = resolved_model(unit_square(n), ms.law, 1, "resolved")
    runs, snapshots, reference = compare(fine_model, models, V_coarse)
    closure = models["closure, implicit"][2]
    A_learned = ms.mean * np.eye(2) + closure.mean_tangent()
    A_least_squares = ms.mean * np.eye(2) + np.linalg.lstsq(inputs, targets, rcond=None)[0].T
    closure_error = runs["closure, implicit"]["max_error"]
    without_closure = [n for n in runs if n.startswith(("mean only", "resolved"))]
    as_accurate = [n for n in without_closure if runs[n]["max_error"] <= closure_error]
    match = min(as_accurate, key=lambda n: runs[n]["seconds"]) if as_accurate else None

    tic = time.perf_counter()
    fine_plate = microstructure_mesh(
        comm, 1.0, PLATE_HOLES, epsilon, epsilon / ms.plate_cells_per_period, ms.directions
    )
    plate_mesh_seconds = comm.allreduce(time.perf_counter() - tic, op=MPI.MAX)
    plate_models = {
        "mean only": plain_model(V_plate, fem.Constant(plate, ms.mean), f"pmean_{ms.name}"),
        "A_hom": plain_model(V_plate, fem.Constant(plate, ms.A_hom), f"phom_{ms.name}"),
        "closure, implicit": closure_model(V_plate, model_path, ms.mean, True, f"pi_{ms.name}"),
    }
    plate_runs, plate_snapshots, plate_reference = compare(
        resolved_model(fine_plate, ms.law, ms.degree, f"pfine_{ms.name}"),
        plate_models,
        V_plate,
        padding=2e-3,
    )
    vtx_fields[ms.name] = {
        "unit_square": (V_coarse, reference, snapshots),
        "plate": (V_plate, plate_reference, plate_snapshots),
    }
    results[ms.name] = {
        "A_hom": ms.A_hom.tolist(),
        "A_learned": A_learned.tolist(),
        "tensor_relative_error": np.linalg.norm(A_learned - ms.A_hom) / np.linalg.norm(ms.A_hom),
        "A_least_squares": A_least_squares.tolist(),
        "fit_gap": np.linalg.norm(A_learned - A_least_squares) / np.linalg.norm(ms.A_hom),
        "training": {
            "num_snapshots": num_snapshots,
            "num_points": inputs.shape[0] // num_snapshots,
            "epochs": result.history.epochs,
            "best_val_loss": result.history.best_val_loss,
            "fit_seconds": fit_seconds,
            "fine_seconds": fine_seconds,
        },
        "newton_iterations_last_step": models["closure, implicit"][
            1
        ].problem.solver.getIterationNumber(),
        "closure_update_seconds": closure.timings["total"],
        "unit_square": {
            "fine_mesh": fine_cells,
            "runs": runs,
            "coarsest_without_closure_as_accurate": match,
        },
        "plate": {
            "fine_cells": fine_plate.topology.index_map(2).size_global,
            "fine_mesh_seconds": plate_mesh_seconds,
            "newton_iterations_last_step": plate_models["closure, implicit"][
                1
            ].problem.solver.getIterationNumber(),
            "runs": plate_runs,
        },
    }
times = sorted(vtx_fields["laminate"]["unit_square"][1])
# -

# ## Output: VTX, a plot and a JSON summary
#
# The coarse solutions of the test run (every coarse model of a domain, with the filtered
# fine solution) go to one VTX file per microstructure and domain, one frame per
# snapshot. The plot shows, per microstructure, the error over time on both domains and
# the error against wall time on the unit square.

# +
for name, domains in vtx_fields.items():
    for domain, (V, reference, snapshots) in domains.items():
        fields = {"filtered fine": fem.Function(V, name="u_fine_filtered")}
        for model in snapshots:
            fields[model] = fem.Function(V, name="u_" + model.replace(", ", "_").replace(" ", "_"))
        path = output_dir / f"test_{name}_{domain}.bp"
        with io.VTXWriter(comm, path, list(fields.values()), "BP4") as vtx:
            for t in times:
                fields["filtered fine"].x.array[:] = reference[t]
                for model, values_at in snapshots.items():
                    fields[model].x.array[:] = values_at[t]
                vtx.write(t)

if comm.rank == 0:
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.4), layout="constrained")
    for row, (name, result) in zip(axes, results.items(), strict=True):
        for ax, domain in zip(row[:2], ("unit_square", "plate"), strict=True):
            for model, r in result[domain]["runs"].items():
                if "errors" in r:
                    ax.semilogy(times[1:], r["errors"][1:], "o-", ms=3, label=model)
            ax.set(
                xlabel="time $t$",
                ylabel=r"$\|P u - P u_f\| / \|P u_f\|$",
                title=f"{name}, {domain.replace('_', ' ')}: error against the filtered fine",
            )
            ax.legend(fontsize=7)
        ax = row[2]
        runs = result["unit_square"]["runs"]
        for model, r in runs.items():
            if "errors" in r:
                ax.loglog(r["seconds"], r["max_error"], "o", label=model)
        ax.axvline(runs["fine (reference)"]["seconds"], color="k", ls=":", label="fine")
        ax.set(
            xlabel=f"wall time of {num_steps} steps [s]",
            ylabel="max error over the horizon",
            title=f"{name}, unit square: error against cost",
        )
        ax.legend(fontsize=7)
    fig.savefig(output_dir / "transient.png", dpi=100)
    plt.close(fig)

summary = {
    "mode": "quick" if args.quick else "full",
    "ranks": comm.size,
    "epsilon": epsilon,
    "coarse_mesh": coarse_cells,
    "plate_coarse_cells": plate.topology.index_map(2).size_global,
    "dt": dt,
    "num_steps": num_steps,
    "times": times,
    **results,
}
if comm.rank == 0:
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\neps = 1/{periods}; coarse {coarse_cells}x{coarse_cells} and the plate's "
        f"{summary['plate_coarse_cells']} triangles; {num_steps} steps of {dt:g}; "
        f"{comm.size} rank(s)"
    )
    for name, result in results.items():
        A, training = np.array(result["A_learned"]), result["training"]
        print(
            f"\n{name}: {training['num_snapshots']} snapshots x {training['num_points']} coarse "
            f"cells from {len(training_scenarios)} fine trajectories; fit "
            f"{training['epochs']} epochs, {training['fit_seconds']:.2f} s"
        )
        print(
            f"learned tensor [[{A[0, 0]:.4f}, {A[0, 1]:.4f}], [{A[1, 0]:.4f}, {A[1, 1]:.4f}]]; "
            f"relative error against A_hom {result['tensor_relative_error']:.2e} (least "
            f"squares: {result['fit_gap']:.1e} away)"
        )
        for domain in ("unit_square", "plate"):
            print(f"test, {domain:<20}    dofs   max error  final error  time [s]")
            for model, r in result[domain]["runs"].items():
                errors_ = (
                    f"{r['max_error']:10.3e}  {r['final_error']:10.3e}" if "errors" in r else ""
                )
                print(f"  {model:<20} {r['dofs']:8d}  {errors_:<22}  {r['seconds']:8.3f}")
        match = result["unit_square"]["coarsest_without_closure_as_accurate"]
        print(f"coarsest run without closure as accurate as the implicit closure: {match}")
    print(f"outputs written to {output_dir}")
# -

# ## Checks
#
# Tolerances from measurements (full run / `--quick`, the same on 1 and 2 ranks; see
# `docs/results.md`):
#
# * the learned tensor is within 0.24 % / 0.54 % of $A_\text{hom}$ for the laminate
#   (we require 1 %; the issue asks for 2 %) and 0.91 % / 0.95 % for the checkerboard
#   (we require 1.5 %: as in the steady demo, 0.90 % of it is the fine $Q_2$
#   discretisation's excess conductivity); each fit is within 0.2 % of the least-squares
#   tensor of its data (we require 0.3 %);
# * the closures are linear, so Newton takes one iteration per step;
# * on the unit square, the implicit closure's maximum error over the horizon is 1.38 /
#   1.22 (laminate) and 1.07 / 1.28 (checkerboard) times that of the exact
#   $A_\text{hom}$, the best a local closure can do there (we require 1.5 times); the
#   mean-only runs are 48 / 14 and 21 / 6.0 times less accurate (we require 5 times):
#   refining the laminate's does not help, its equation is wrong;
# * on the plate, with the closure learned on the unit square: 1.16 / 0.92 and
#   0.17 / 0.42 times the $A_\text{hom}$ error (the checkerboard's reference, like its
#   training data, carries about 1 % of discretisation excess, which $A_\text{hom}$ lacks;
#   see the steady demo); the mean only is 28 / 13 and 72 / 30 times less accurate (we
#   require 1.5 and 8 times);
# * the IMEX closure lags the flux by one step, an $O(\Delta t)$ error: 8.7 / 4.8 times the
#   implicit one's for the laminate, 1.9 / 1.3 times for the checkerboard, whose closure
#   is smaller ($\sqrt 3 - 2 = -0.27$ against $\underline a - \bar a = -3.7$). We require
#   the implicit coupling to be more accurate by 1.2 times, and IMEX still 2.5 times more
#   accurate than the mean only;
# * for the laminate, the cheapest run without closure that is as accurate as the closure
#   resolves the stripes.

for name, result in results.items():
    square, plate_runs = result["unit_square"]["runs"], result["plate"]["runs"]
    closure_error = square["closure, implicit"]["max_error"]
    mean_only = min(r["max_error"] for n, r in square.items() if n.startswith("mean only"))
    imex_error = square["closure, IMEX"]["max_error"]
    assert result["training"]["num_snapshots"] == len(training_scenarios) * (
        num_steps // record_every
    )
    tolerance = 1e-2 if name == "laminate" else 1.5e-2
    assert result["tensor_relative_error"] < tolerance, (name, result["tensor_relative_error"])
    assert result["fit_gap"] < 3e-3, (name, result["fit_gap"])
    assert result["newton_iterations_last_step"] == 1
    assert result["plate"]["newton_iterations_last_step"] == 1
    assert closure_error < 1.5 * square["A_hom"]["max_error"], name
    assert mean_only > 5 * closure_error, name
    assert 1.2 * closure_error < imex_error < mean_only / 2.5, name
    plate_error = plate_runs["closure, implicit"]["max_error"]
    assert plate_error < 1.5 * plate_runs["A_hom"]["max_error"], name
    assert plate_runs["mean only"]["max_error"] > 8 * plate_error, name
match = results["laminate"]["unit_square"]["coarsest_without_closure_as_accurate"]
assert match is not None and match.startswith("resolved"), match
