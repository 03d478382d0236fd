# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # Viscous Burgers, LES-style: learned subgrid fluxes on a coarse mesh
#
# This demo is implemented in {download}`demo_burgers.py`. It illustrates how to:
#
# - turn a fine DOLFINx simulation into closure training data: filter the state with an
#   exact, boundary-respecting L² projection onto the coarse space
#   ({py:class}`dolfinx_mno.data.L2Projection` with `subdivisions` and `bcs`), the flux
#   with exact coarse-cell averages ({py:class}`dolfinx_mno.data.CellAverage`), and get
#   the subgrid flux at the coarse quadrature points from a
#   {py:class}`dolfinx_mno.data.ClosureSampler`, written with
#   {py:class}`dolfinx_mno.data.ClosureDataWriter`;
# - sample the same fields on a grid for a neural operator
#   ({py:class}`dolfinx_mno.data.GriddedSampler`);
# - fit a local closure (an MLP of $\bar u$, $\bar u_x$) and a non-local one (a Fourier
#   neural operator, the multiscale neural operator of Lütjens et al. 2022) with
#   {py:func}`dolfinx_mno.training.fit`, save them, and build
#   {py:class}`dolfinx_mno.Closure` and {py:class}`dolfinx_mno.NonlocalClosure` from the
#   files;
# - compare in one run, against the filtered fine solution: no closure, a Smagorinsky
#   eddy viscosity with its constant tuned on the training data, the local closure and
#   the MNO: error over the horizon, energy spectra, stability over ten horizons, wall
#   time, and the mesh a run *without* closure needs to be as accurate.
#
# Run it with `python demo_burgers.py` or `mpirun -n 2 python demo_burgers.py`; `--quick`
# (used by CI) runs a smaller problem. Outputs go to `demos/output/burgers/`.
#
# ## The problem
#
# $$
#   u_t + \left(\tfrac12 u^2\right)_x = \nu u_{xx} + f(x, t) \quad \text{on } (0, 1),
#   \qquad u(0, t) = u(1, t) = 0,
# $$
#
# with $\nu = 10^{-3}$ and a forcing of four low wavenumbers whose phases and
# frequencies are drawn from a seeded generator,
# $f = A \sum_{k=1}^{4} \sin(2\pi k x + \phi_k + \omega_k t)$. Shocks a few $\nu$ wide
# form, travel and merge; near the walls, boundary layers of the same width.
#
# **Discretisation.** $P_1$ elements, IMEX Euler: diffusion implicit, advection, forcing
# and closure explicit ({py:class}`dolfinx_mno.timestepping.IMEXStepper`):
#
# $$
#   \left(\frac{u^{n+1} - u^n}{\Delta t}, v\right) + \nu (u^{n+1}_x, v_x)
#   = -(u^n u^n_x, v) + (f^{n+1}, v) + (\tau^n, v_x) .
# $$
#
# The fine model resolves the shocks (4096 cells, $h = 2.4 \times 10^{-4}$); the coarse
# model has 128 cells ($h = 7.8 \times 10^{-3}$, eight times the shock width).
#
# **The filter and the exact closure.** Let $\bar u \in V_{c,0}$ be the L² projection of
# the fine solution $u$ onto the coarse $P_1$ functions vanishing at the walls. The meshes
# are nested, so $V_{c,0} \subset V_{f,0}$, and testing the fine equations with a coarse
# $v$ gives, with $(\bar u_t, v) = (u_t, v)$ and one integration by parts,
#
# $$
#   (\bar u_t, v) + (\bar u \bar u_x, v) + \nu (\bar u_x, v_x) = (f, v) + (\tau, v_x),
#   \qquad
#   \tau = \frac{1}{|K|} \int_K \left( \tfrac12 u^2 - \nu u_x \right)
#        - \frac{1}{|K|} \int_K \left( \tfrac12 \bar u^2 - \nu \bar u_x \right)
# $$
#
# on each coarse cell $K$ ($v_x$ is constant on $K$, so only the cell averages of the
# subgrid flux matter). This is the commutator of filter and coarse operator in flux form
# (the LES subgrid stress). With the exact $\tau$ the coarse model follows the filtered
# fine solution up to its time-stepping error (0.25 % over the horizon when $\tau$ is fed
# from the fine run, measured while designing this demo). The closures model $\tau$:
#
# | closure | $\tau$ |
# |:--|:--|
# | none | 0 |
# | Smagorinsky | $-(C_s h)^2 \lvert\bar u_x\rvert \bar u_x$, $C_s$ tuned on the training data |
# | local | $\tau_\theta(\bar u, \bar u_x)$ at each quadrature point, an MLP |
# | MNO | $\mathcal{G}_\theta[\bar u, \bar u_x]$, a Fourier neural operator on a grid |
#
# **Time windows.** The fine run spins up over $[0, t_s]$, provides training data over
# the training horizon $[t_s, t_s + T]$, and the reference over the test horizon
# $[t_s + T, t_s + 2T]$ (unseen states, same forcing law). The coarse runs start from the
# filtered fine state at $t_s + T$, are compared over the test horizon, and continue for
# ten horizons to check stability.

# +
import argparse
import json
import time
from pathlib import Path

from mpi4py import MPI

import dolfinx_solver  # noqa: F401  (loads the MPI libraries before dolfinx)
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import ufl
from dolfinx import fem, io, mesh
from neuralop.models import FNO
from tqdm.auto import tqdm

import dolfinx_mno as mno
from dolfinx_mno.data import (
    CellAverage,
    ClosureDataReader,
    ClosureDataWriter,
    ClosureSampler,
    GriddedSampler,
    L2Projection,
    Tendency,
)
from dolfinx_mno.grid import Grid
from dolfinx_mno.io import save_model
from dolfinx_mno.models import MLP
from dolfinx_mno.petsc import LinearProblem
from dolfinx_mno.timestepping import IMEXStepper
from dolfinx_mno.training import fit, shard

parser = argparse.ArgumentParser(description="Learned subgrid fluxes for 1D viscous Burgers.")
parser.add_argument("--quick", action="store_true", help="small problem for CI")
parser.add_argument("--output", default=None, help="output folder")
args = parser.parse_args()

comm = MPI.COMM_WORLD
rank = comm.rank
torch.set_num_threads(1)
output = Path(args.output or Path(__file__).resolve().parent.parent / "output" / "burgers")
if rank == 0:
    output.mkdir(parents=True, exist_ok=True)
comm.Barrier()


def log(*message):
    if rank == 0:
        print(*message, flush=True)


# -

# Sizes. The quick mode keeps every step of the workflow, on smaller meshes and shorter
# horizons; its numbers are not the headline ones.

# +
if args.quick:
    config = dict(
        fine_cells=1024, coarse_cells=64, fine_dt=4e-4, coarse_dt=1e-3, spin_up=0.5,
        horizon=0.3, sample_every=4e-3, fno_epochs=15, mlp_epochs=20, closure_every=2e-3,
        no_closure_cells=[64, 128, 256],
    )  # fmt: skip
else:
    config = dict(
        fine_cells=4096, coarse_cells=128, fine_dt=1e-4, coarse_dt=2.5e-4, spin_up=1.0,
        horizon=2.0, sample_every=4e-3, fno_epochs=60, mlp_epochs=80, closure_every=1e-3,
        no_closure_cells=[128, 256, 512, 1024, 2048],
    )  # fmt: skip
nu = 1e-3
amplitude = 4.0
wavenumbers = np.arange(1, 5)
rng = np.random.default_rng(2022)
phases = rng.uniform(0.0, 2.0 * np.pi, wavenumbers.size)
frequencies = 2.0 * np.pi * rng.uniform(0.5, 2.0, wavenumbers.size)
nc = config["coarse_cells"]
h = 1.0 / nc
t_train = config["spin_up"]
t_test = t_train + config["horizon"]
t_end = t_test + config["horizon"]
long_end = t_test + 10 * config["horizon"]
for key in ("spin_up", "horizon"):  # sampling times must fall on the window boundaries
    assert (
        abs(config[key] / config["sample_every"] - round(config[key] / config["sample_every"]))
        < 1e-9
    )
log(f"config: {config}")
# -

# ## The solver
#
# One class runs the model on a mesh of `num_cells` cells, with or without a closure
# term. The closure term is $\Delta t\,(\tau, v_x)$ in the right-hand side, a separate
# integral with the closure's measure (`closure.dx`); Smagorinsky's flux is plain UFL.
# The matrix, $M + \Delta t\,\nu K$, is factorised once (`reuse_matrix=True`).


class Burgers:
    """IMEX Euler for viscous Burgers on `num_cells` P1 cells, with an optional closure.

    `closure(u_previous)` returns `(tau, measure)`: a UFL flux (or a closure) and the
    measure to integrate it with, or None. Models on the same mesh share `domain`.
    """

    def __init__(self, num_cells, dt, closure=None, name="u", domain=None, closure_interval=1):
        self.mesh = domain or mesh.create_interval(comm, num_cells, [0.0, 1.0])
        self.V = fem.functionspace(self.mesh, ("Lagrange", 1))
        self.dt = dt
        self.closure_interval = closure_interval
        self.u = fem.Function(self.V, name=name)
        self.u_previous = fem.Function(self.V, name=f"{name}_previous")
        self.time = fem.Constant(self.mesh, 0.0)
        x = ufl.SpatialCoordinate(self.mesh)
        self.forcing = amplitude * sum(
            ufl.sin(2 * np.pi * k * x[0] + phi + omega * self.time)
            for k, phi, omega in zip(wavenumbers, phases, frequencies, strict=True)
        )
        u, v = ufl.TrialFunction(self.V), ufl.TestFunction(self.V)
        un = self.u_previous
        a = (u * v + dt * nu * u.dx(0) * v.dx(0)) * ufl.dx
        L = (un * v - dt * un * un.dx(0) * v + dt * self.forcing * v) * ufl.dx
        self.closure = None
        if closure is not None:
            tau, measure = closure(un)
            L += dt * tau * v.dx(0) * measure
            self.closure = tau if isinstance(tau, mno.ClosureBase) else None
        walls = mesh.locate_entities_boundary(self.mesh, 0, lambda x: np.full(x.shape[1], True))
        dofs = fem.locate_dofs_topological(self.V, 0, walls)
        self.bcs = [fem.dirichletbc(0.0, dofs, self.V)]
        self.problem = LinearProblem(
            a,
            L,
            u=self.u,
            bcs=self.bcs,
            reuse_matrix=True,
            petsc_options_prefix=f"burgers_{name}_",
            petsc_options={"ksp_type": "preonly", "pc_type": "lu"},
        )

    def run(self, u0, t0, t1, callback=None, every=1, desc="steps"):
        """March from the state u0 (a function on V) at t0 to t1; returns the wall time.

        `callback(t)` is called at t0 and every `every` steps. The run stops early (with a
        NaN state) if the solution blows up.
        """
        self.u_previous.x.array[:] = u0.x.array
        self.u.x.array[:] = u0.x.array
        stepper = IMEXStepper(
            self.problem, self.u, self.u_previous, self.dt, t0, self.time, self.closure_interval
        )
        num_steps = round((t1 - t0) / self.dt)
        if callback is not None:
            callback(t0)
        seconds = 0.0
        for n in tqdm(
            range(num_steps), desc=desc, disable=rank != 0 or not desc.startswith("fine")
        ):
            tic = time.perf_counter()
            stepper.step()
            seconds += time.perf_counter() - tic
            if not comm.allreduce(bool(np.isfinite(self.u.x.array).all()), op=MPI.LAND):
                break  # blown up: the caller sees the missing states
            if callback is not None and (n + 1) % every == 0:
                callback(stepper.t)
        return comm.allreduce(seconds, op=MPI.MAX)


# -

# ## Step 1: the fine run and the training data
#
# **Filters.** `L2Projection(V_c, subdivisions=m, bcs=...)`: integrated with Basix's rule
# on each of the $m = 4096/128$ fine cells inside a coarse cell, the projection is exact
# (a single Gauss rule per coarse cell would alias the shocks), and it is zero at the
# walls. `CellAverage(W_c, fine_mesh)` averages any fine UFL expression exactly over the
# coarse cells ($W_c$: DG$_0$ on the coarse mesh).
#
# **Sampler.** {py:class}`~dolfinx_mno.data.ClosureSampler` computes
# `R(fine tendency) − coarse tendency(R(fine state))` at the coarse quadrature points.
# Here "tendency" is the flux $\tfrac12 u^2 - \nu u_x$: its fine version is filtered by
# the cell average (`tendency_restriction`), the coarse one is a weak
# {py:class}`~dolfinx_mno.data.Tendency` on DG$_0$, which is exactly the cell average of
# $\tfrac12\bar u^2 - \nu \bar u_x$. The closure inputs are $\bar u$ and $\bar u_x$ at
# the points of the degree-2 rule, the same points and columns as the closure's.
#
# **Grid data for the MNO.** The operator works on a grid of spacing $h/4$ whose points
# sit at $h/8, 3h/8, 5h/8, 7h/8$ inside each coarse cell, so that both the cell-constant
# $\tau$ and $\bar u_x$ are sampled exactly and the multilinear interpolation back to the
# two Gauss points of a cell uses that cell's values only. The grid extends $31$ spacings
# beyond each wall, where inputs are zero: this margin is the operator's padding on the
# non-periodic interval, and it makes the grid 576 = $2^6 \cdot 9$ points long, a fast
# FFT size (the quick mode's grid: 320).

# +
margin = 31
grid_points = 4 * nc + 2 + 2 * margin
spacing = h / 4
grid = Grid((-h / 8 - margin * spacing,), (1.0 + h / 8 + margin * spacing,), (grid_points,))
assert np.isclose(grid.spacing[0], spacing)

fine = Burgers(config["fine_cells"], config["fine_dt"], name="fine")
coarse_space_model = Burgers(nc, config["coarse_dt"], name="coarse_probe")
Vc = coarse_space_model.V
u_bar = fem.Function(Vc, name="u_bar")
ratio = config["fine_cells"] // nc
projection = L2Projection(Vc, subdivisions=ratio, bcs=coarse_space_model.bcs)
Wc = fem.functionspace(Vc.mesh, ("Discontinuous Lagrange", 0))
cell_average = CellAverage(Wc, fine.mesh)
q = ufl.TestFunction(Wc)
coarse_flux = Tendency((0.5 * u_bar**2 - nu * u_bar.dx(0)) * q * ufl.dx, name="coarse_flux")
sampler = ClosureSampler(
    projection,
    u_bar,
    [u_bar, u_bar.dx(0)],
    coarse_flux,
    quadrature_degree=2,
    tendency_restriction=cell_average,
)
u_f = fine.u_previous
fine_flux = 0.5 * u_f**2 - nu * u_f.dx(0)
tau_exact = sampler.filtered_tendency - coarse_flux.function
grid_inputs = GriddedSampler([u_bar, u_bar.dx(0)], grid)
grid_targets = GriddedSampler([tau_exact], grid, mesh=Vc.mesh)


def nodal(u):
    """Nodal values of a P1 function, gathered on every rank in order of x."""
    V = u.function_space
    owned = V.dofmap.index_map.size_local
    x = V.tabulate_dof_coordinates()[:owned, 0]
    xs = np.concatenate(comm.allgather(x))
    values = np.concatenate(comm.allgather(u.x.array[:owned]))
    return values[np.argsort(xs, kind="stable")]


data_path = output / "closure_data.h5"
if rank == 0 and data_path.exists():
    data_path.unlink()
comm.Barrier()
writer = ClosureDataWriter.from_sampler(
    data_path, sampler, fine_mesh=fine.mesh, time_step=config["sample_every"],
    attributes={"problem": "viscous Burgers", "nu": nu, "flux": "u^2/2 - nu u_x"},
)  # fmt: skip
sample_steps = round(config["sample_every"] / config["fine_dt"])
grid_x, grid_y = [], []
filtered = {}  # time -> nodal values of the filtered fine solution
train_start = fem.Function(Vc, name="u_bar_train_start")


def record(t):
    """Samples on the training horizon, and the filtered fine solution from t_train on."""
    if t < t_train - 1e-9:
        return
    sample = sampler.sample(u_f, fine_flux)
    filtered[round(t, 9)] = nodal(u_bar)
    if abs(t - t_train) < 1e-9:
        train_start.x.array[:] = u_bar.x.array
    if t < t_test - 1e-9:
        writer.append(sample, time=t)
        grid_x.append(grid_inputs())
        grid_y.append(grid_targets())


log("fine run ...")
fine_seconds = fine.run(
    fem.Function(fine.V), 0.0, t_test, callback=record, every=sample_steps, desc="fine, training"
)
fine_state_test = fem.Function(fine.V)
fine_state_test.x.array[:] = fine.u.x.array
test_start = fem.Function(Vc, name="u_bar_test_start")
test_start.x.array[:] = u_bar.x.array
fine_test_seconds = fine.run(
    fine_state_test, t_test, t_end, callback=record, every=sample_steps, desc="fine, test"
)
writer.close()
fine_final = fem.Function(Vc, name="fine_filtered")  # the filtered fine state at t_end
fine_final.x.array[:] = u_bar.x.array
train_reference = {t: v for t, v in filtered.items() if t_train + 1e-9 < t < t_test + 1e-9}
test_reference = {t: v for t, v in filtered.items() if t > t_test + 1e-9}
log(
    f"fine run: {fine_seconds + fine_test_seconds:.1f} s "
    f"(test horizon {fine_test_seconds:.2f} s), {len(test_reference)} reference states"
)
# -

# ## Step 2: the closures
#
# **Smagorinsky.** $\tau = -(C_s h)^2 |\bar u_x| \bar u_x$, a dissipative eddy viscosity.
# Its constant is tuned *a posteriori* on the training data: coarse runs over the
# training horizon from the filtered fine state, for a range of $C_s$, keeping the one
# with the smallest error against the filtered fine solution.

# +
smagorinsky_constant = fem.Constant(Vc.mesh, 0.0)


def smagorinsky(un):
    return -((smagorinsky_constant * h) ** 2) * abs(un.dx(0)) * un.dx(0), ufl.dx


def relative_error(run, reference):
    """Relative L² error over a horizon (nodal values of a uniform P1 mesh)."""
    keys = sorted(reference)
    if any(k not in run for k in keys):
        return float("inf")  # the run blew up
    a = np.array([run[k] for k in keys])
    b = np.array([reference[k] for k in keys])
    return float(np.sqrt(np.sum((a - b) ** 2) / np.sum(b**2)))


def coarse_run(model, start, t0, t1):
    """Run a coarse model; returns its states at the sampling times, energies, seconds."""
    states, energies = {}, []

    def callback(t):
        values = nodal(model.u)
        energies.append((t, float(np.mean(values**2))))
        if t > t0 + 1e-9:
            states[round(t, 9)] = values

    every = round(config["sample_every"] / model.dt)
    seconds = model.run(start, t0, t1, callback=callback, every=every)
    return states, np.array(energies), seconds


smagorinsky_model = Burgers(
    nc, config["coarse_dt"], closure=smagorinsky, name="smagorinsky", domain=Vc.mesh
)
tuning = {}
for constant in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4):
    smagorinsky_constant.value = constant
    states, _, _ = coarse_run(smagorinsky_model, train_start, t_train, t_test)
    tuning[constant] = relative_error(states, train_reference)
best_constant = min(tuning, key=tuning.get)
smagorinsky_constant.value = best_constant
log(f"Smagorinsky tuning (C_s: training error): {tuning}; C_s = {best_constant}")
# -

# **Local closure.** An MLP $(\bar u, \bar u_x) \mapsto \tau$ with two hidden layers,
# fitted with {py:func}`~dolfinx_mno.training.fit` (normalised inputs and targets, Adam,
# early stopping on a validation split of whole snapshots: `groups` keeps the points of
# one snapshot on one side), saved with its operand specification and rebuilt as a
# {py:class}`~dolfinx_mno.Closure` from the file.

# +
with ClosureDataReader(data_path) as reader:
    inputs, targets, times = reader.inputs(), reader.targets(), reader.times()
points_per_snapshot = inputs.shape[0] // times.size
snapshot = np.repeat(np.arange(times.size), points_per_snapshot)  # the split's groups
log(f"training data: {times.size} snapshots of {points_per_snapshot} points")
tic = time.perf_counter()
local_fit = fit(
    MLP(2, 1, hidden_features=[64, 64], seed=0),
    shard(inputs, comm),
    shard(targets.reshape(-1, 1), comm),
    groups=shard(snapshot, comm),
    comm=comm,
    epochs=config["mlp_epochs"],
    batch_size=1024,
    learning_rate=3e-3,
    patience=15,
    normalize_targets=True,
    seed=0,
    progress=rank == 0 and not args.quick,
)
local_fit_seconds = time.perf_counter() - tic
local_path = output / "local_closure.pt"
save_model(
    local_path,
    local_fit.model,
    metadata={"operands": ["u", "u.dx(0)"], "value_shape": [], "quadrature_degree": 2},
    comm=comm,
)


def local_closure(un):
    closure = mno.Closure(str(local_path), [un, un.dx(0)], value_shape=(), quadrature_degree=2)
    return closure, closure.dx


# -

# **MNO.** A Fourier neural operator (neuraloperator's `FNO`: 4 Fourier layers, 16
# channels, 24 modes) maps the gridded $(\bar u, \bar u_x)$ to the gridded $\tau$; it
# sees the whole field, not one point. The inputs $\bar u_x$ let its pointwise path do
# what the local closure does, the Fourier layers add the non-local part. It is fitted
# with the same `fit`, `grid=True`: normalisation per channel over the grid, a split by
# whole fields.

# +
if rank == 0:
    grid_data = (np.array(grid_x[::2]), np.array(grid_y[::2]))
else:
    grid_data = None
grid_inputs_all, grid_targets_all = comm.bcast(grid_data, root=0)
torch.manual_seed(0)
operator = FNO(n_modes=(24,), hidden_channels=16, in_channels=2, out_channels=1, n_layers=4)
tic = time.perf_counter()
operator_fit = fit(
    operator,
    shard(grid_inputs_all.astype(np.float32), comm),
    shard(grid_targets_all.astype(np.float32), comm),
    grid=True,
    comm=comm,
    epochs=config["fno_epochs"],
    batch_size=16,
    chunk_size=16,
    learning_rate=3e-3,
    patience=15,
    normalize_targets=True,
    seed=0,
    progress=rank == 0 and not args.quick,
)
operator_fit_seconds = time.perf_counter() - tic
operator_path = output / "mno_closure.pt"
save_model(
    operator_path,
    operator_fit.model,
    metadata={"operands": ["u", "u.dx(0)"], "grid": list(grid.shape), "value_shape": []},
    comm=comm,
)


def operator_closure(un):
    closure = mno.NonlocalClosure(
        str(operator_path),
        [un, un.dx(0)],
        value_shape=(),
        quadrature_degree=2,
        grid_shape=grid.shape,
        bounding_box=(grid.lower, grid.upper),
        mask_channel=False,
    )
    return closure, closure.dx


log(
    f"fits: local MLP {local_fit.history.epochs} epochs, {local_fit_seconds:.1f} s; "
    f"FNO {operator_fit.history.epochs} epochs, {operator_fit_seconds:.1f} s"
)
# -

# ## Step 3: coarse runs against the filtered fine solution
#
# Every coarse run starts from the filtered fine state at $t_s + T$ and runs for ten
# horizons. Error: relative L² error against the filtered fine solution over the test
# horizon (all sampling times). Energy spectrum: the squared sine coefficients of $\bar u$
# averaged over the test horizon; its error is the mean over wavenumbers of
# $|\log_{10}(E / E_\text{ref})|$. Stability: the largest energy $\int \bar u^2$ over the
# ten horizons relative to the largest of the filtered fine solution, and no NaN. Wall
# time: the test horizon (steps and closure updates, after set-up).


def spectrum(states):
    """Time-averaged sine spectrum of nodal states (zero at both walls)."""
    values = np.array([states[k] for k in sorted(states)])[:, 1:-1]
    n = values.shape[1] + 1
    j = np.arange(1, n)
    basis = np.sin(np.pi * np.outer(j, j) / n) * (2.0 / n)
    coefficients = values @ basis
    return np.mean(coefficients**2 / 2, axis=0)


# The learned closures are updated every `closure_interval` steps, i.e. every 10⁻³ time
# units, 2·10⁻³ in the quick mode (`IMEXStepper(closure_interval=...)`): with the exact τ
# held 10⁻³ long, the coarse run stays within 0.45 % of the filtered fine one (measured
# while designing the demo), and the operator's cost is spread over several cheap steps.
closure_interval = max(1, round(config["closure_every"] / config["coarse_dt"]))
reference_spectrum = spectrum(test_reference)
reference_energy = max(float(np.mean(v**2)) for v in filtered.values())
closures = {
    "no closure": None,
    "Smagorinsky": smagorinsky,
    "local MLP": local_closure,
    "MNO (FNO)": operator_closure,
}
results, runs, finals = {}, {}, [fine_final]
for label, closure in closures.items():
    name = label.split()[0].lower()
    if label == "Smagorinsky":
        model = smagorinsky_model
    else:
        model = Burgers(
            nc,
            config["coarse_dt"],
            closure=closure,
            name=name,
            domain=Vc.mesh,
            closure_interval=closure_interval if closure is not None else 1,
        )
    states, energies, seconds = coarse_run(model, test_start, t_test, t_end)
    runs[label] = states
    final = fem.Function(Vc, name=name)  # same mesh and element: the same dof layout
    final.x.array[:] = model.u.x.array
    finals.append(final)
    error = relative_error(states, test_reference)
    long_states, long_energies, _ = coarse_run(model, test_start, t_test, long_end)
    finite = bool(np.all(np.isfinite(long_energies[:, 1]))) and long_energies[-1, 0] >= (
        long_end - 1e-6
    )
    results[label] = {
        "relative_l2_error": error,
        "spectrum_error": float(np.mean(np.abs(np.log10(spectrum(states) / reference_spectrum)))),
        "wall_time_s": seconds,
        "stable_10_horizons": bool(finite),
        "max_energy_ratio_10_horizons": float(np.max(long_energies[:, 1]) / reference_energy),
    }
    if model.closure is not None and hasattr(model.closure, "total_timings"):
        results[label]["closure_update_ms"] = (
            1e3
            * float(np.mean(model.closure.total_timings.get("total", 0.0)))
            / max(model.closure.update_count, 1)
        )
    log(f"{label:>12}: {results[label]}")
results["fine (filtered)"] = {"wall_time_s": fine_test_seconds, "cells": config["fine_cells"]}
# -

# ## Step 4: how fine must a mesh be without closure?
#
# The same model without closure on meshes 1, 2, 4, ... times finer than the coarse one,
# each started from the projection of the fine state, its solution projected onto the
# coarse space and compared like the closures. The time step is the coarse one, or the
# fine one scaled to the mesh where that is smaller (the advective limit).

# +
refinement = {}
for cells in config["no_closure_cells"]:
    dt = min(config["coarse_dt"], config["fine_dt"] * config["fine_cells"] / cells)
    model = Burgers(cells, dt, name=f"plain_{cells}")
    start = L2Projection(model.V, subdivisions=config["fine_cells"] // cells, bcs=model.bcs)(
        fine_state_test
    )
    to_coarse = L2Projection(Vc, subdivisions=cells // nc, bcs=coarse_space_model.bcs)
    states = {}

    def keep(t, model=model, states=states, to_coarse=to_coarse):
        if t > t_test + 1e-9:
            states[round(t, 9)] = nodal(to_coarse(model.u, out=u_bar))

    every = round(config["sample_every"] / dt)
    seconds = model.run(start, t_test, t_end, callback=keep, every=every)
    refinement[cells] = {
        "relative_l2_error": relative_error(states, test_reference),
        "wall_time_s": seconds,
        "dt": dt,
    }
    log(f"no closure, {cells:5d} cells: {refinement[cells]}")
for label in ("local MLP", "MNO (FNO)", "Smagorinsky"):
    error = results[label]["relative_l2_error"]
    matching = [
        c for c in config["no_closure_cells"] if refinement[c]["relative_l2_error"] <= error
    ]
    results[label]["coarsest_plain_mesh_as_accurate"] = min(matching) if matching else None
# -

# ## Step 5: outputs
#
# A VTX file with the coarse states at the end of the test horizon (the filtered fine one
# and every closure's), a figure, and `summary.json`.

# +
final_states = {}
for label, states in runs.items():
    if states:
        final_states[label] = states[max(states)]
with io.VTXWriter(comm, output / "coarse_final.bp", finals, engine="BP4") as vtx:
    vtx.write(t_end)

summary = {
    "config": config,
    "nu": nu,
    "smagorinsky_constant": best_constant,
    "smagorinsky_tuning": {str(k): v for k, v in tuning.items()},
    "training_points": int(inputs.shape[0]),
    "fit_seconds": {"local": local_fit_seconds, "mno": operator_fit_seconds},
    "results": results,
    "no_closure_refinement": {str(k): v for k, v in refinement.items()},
    "ranks": comm.size,
}
if rank == 0:
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x_nodes = np.linspace(0.0, 1.0, nc + 1)
    last = max(test_reference)
    axes[0].plot(x_nodes, test_reference[last], "k", lw=2, label="fine, filtered")
    for label, values in final_states.items():
        axes[0].plot(x_nodes, values, lw=1, label=label)
    axes[0].set(xlabel="x", ylabel="ū", title=f"t = {last:g}")
    axes[0].legend(fontsize=8)
    k = np.arange(1, nc)
    axes[1].loglog(k, reference_spectrum, "k", lw=2, label="fine, filtered")
    for label, states in runs.items():
        if len(states) == len(test_reference):
            axes[1].loglog(k, spectrum(states), lw=1, label=label)
    axes[1].set(xlabel="wavenumber k", ylabel="E(k)", title="energy spectrum, test horizon")
    cells = config["no_closure_cells"]
    axes[2].loglog(
        [refinement[c]["wall_time_s"] for c in cells],
        [refinement[c]["relative_l2_error"] for c in cells],
        "ko-", label="no closure, refined",
    )  # fmt: skip
    for c in cells:
        axes[2].annotate(str(c), (refinement[c]["wall_time_s"], refinement[c]["relative_l2_error"]))
    for label in closures:
        axes[2].loglog(
            results[label]["wall_time_s"], results[label]["relative_l2_error"], "s", label=label
        )
    axes[2].set(xlabel="wall time, test horizon (s)", ylabel="relative L² error")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output / "burgers.png", dpi=110)
    print(json.dumps(results, indent=1))
# -

# ## Checks
#
# Tolerances come from the measurements in `docs/results.md`.

# +
errors = {label: results[label]["relative_l2_error"] for label in closures}
assert errors["local MLP"] < errors["no closure"], errors
assert errors["MNO (FNO)"] < errors["no closure"], errors
for label in closures:
    assert results[label]["stable_10_horizons"], f"{label} blew up"
    assert results[label]["max_energy_ratio_10_horizons"] < 3.0, results[label]
if not args.quick:
    assert errors["MNO (FNO)"] < errors["local MLP"] < errors["Smagorinsky"] < errors["no closure"]
log("all checks passed")
