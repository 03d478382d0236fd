# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # 2D turbulence: a coarse mesh with a learned closure against mesh refinement
#
# This demo is implemented in {download}`demo_turbulence_2d.py`, with the flow solver in
# {download}`flow.py`, the measurements (data check, coarse runs against a reference,
# resolution factor, a-posteriori training) in {download}`comparison.py` and the outputs
# (VTX, figures, summary) in {download}`report.py`. It illustrates how to:
#
# - make closure data from a 2D DNS: filter the vorticity to a nested coarse mesh
#   ({py:class}`dolfinx_mno.data.L2Projection`), the vorticity flux by exact coarse-cell
#   averages ({py:class}`dolfinx_mno.data.CellAverage`), and sample the exact subgrid flux
#   ({py:class}`dolfinx_mno.data.ClosureSampler`, {py:class}`dolfinx_mno.data.GriddedSampler`);
# - tune a Smagorinsky constant on those data, fit a local vector closure (an MLP) and a
#   non-local one (a Fourier neural operator in a {py:class}`dolfinx_mno.NonlocalClosure`)
#   a priori, then train both *through the solver* (a posteriori,
#   {py:func}`dolfinx_mno.training.fit_rollout`);
# - measure them as Kochkov et al. 2021 (https://arxiv.org/abs/2102.01010) do: vorticity
#   correlation with the filtered DNS, time to decorrelate, spectra, long-run stability,
#   and the *resolution factor*: the finer mesh without closure a model is as good as.
#
# Run it with `python demo_turbulence_2d.py` (or under `mpirun -n 2`): the full mode, a 256²
# DNS, takes an hour on 2 cores; `--medium` (128², 7 minutes) and `--quick` (CI) are smaller.
# Outputs go to `demos/output/turbulence_2d/`; the numbers are in `docs/results.md`.
#
# ## The problem
#
# Forced 2D turbulence in vorticity–streamfunction form on the free-slip box
# $\Omega = (0, 2\pi)^2$ (DOLFINx has no periodic constraints on this stack):
#
# $$
#   \omega_t + u\cdot\nabla\omega = \nu\Delta\omega - \alpha\omega + 4\sin 4y, \qquad
#   -\Delta\psi = \omega, \qquad u = (\psi_y, -\psi_x), \qquad \omega = \psi = 0
#   \text{ on } \partial\Omega,
# $$
#
# Kolmogorov forcing, drag $\alpha = 0.1$, $\nu = 10^{-3}$ (Re ≈ 1000). $\omega \in P_1$,
# $\psi \in P_2$, IMEX Euler (diffusion, drag and $\psi$ implicit; advection explicit with
# the Taylor–Galerkin correction; one constant matrix, factorised once): see `flow.py`.
# Its first-order time error caps even the exact closure at 1.7× finer; `scheme="ssprk3"`
# (`dolfinx_mno.timestepping.SSPRK3Stepper`) lifts the cap to 3.8× (`docs/results.md`);
# what a learned closure reaches of it is limited by its form, even with perfect data
# (`experiments/turbulence_2d_in_sample.py`).
# A closure adds a subgrid vorticity flux $\tau$, a vector, to the weak form:
#
# $$
#   \left(\frac{\omega^{n+1} - \omega^n}{\Delta t}, v\right) + \nu(\nabla\omega^{n+1},
#   \nabla v) + \dots = (u^n\omega^n, \nabla v) + \dots + (\tau^n, \nabla v).
# $$
#
# **The exact closure.** With $\bar\omega$ the L² projection of the DNS vorticity onto the
# coarse $P_1$ functions vanishing on the walls (the meshes are nested), testing the fine
# equations with coarse $v$ gives the coarse ones with, on each coarse cell $K$,
# $\tau = \mathrm{avg}_K(u\omega - \nu\nabla\omega) - \mathrm{avg}_K(\bar u\bar\omega -
# \nu\nabla\bar\omega)$, $\bar u$ the coarse velocity of $\bar\omega$. The closures model it:
#
# | model | $\tau$ |
# |:--|:--|
# | no closure (the *ladder*: coarse mesh, 2×, 4× finer) | 0 |
# | Smagorinsky | $-(C_s h)^2 \lvert S(\bar u)\rvert \nabla\bar\omega$, $C_s$ fitted to $\tau$ |
# | local MLP | $\tau_\theta(\nabla\bar\omega, \nabla\bar u)$ at each cell |
# | MNO (FNO) | $\mathcal G_\theta[\bar\omega, \bar u]$ on a grid |

# +
import argparse
import sys
import time
from functools import partial
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch
import ufl
from dolfinx import fem
from neuralop.models import FNO

import dolfinx_mno as mno
from dolfinx_mno.data import CellAverage, ClosureSampler, L2Projection, Tendency
from dolfinx_mno.grid import Grid
from dolfinx_mno.grid_gather import GriddedSampler
from dolfinx_mno.io import save_model
from dolfinx_mno.models import MLP
from dolfinx_mno.training import fit, shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demos/: utilities.py
import comparison
import report
from flow import VorticityFlow, length, smagorinsky, spin_up, velocity
from utilities import boundary_dofs, log, output_folder

parser = argparse.ArgumentParser(description="Learned closures for 2D turbulence.")
size = parser.add_mutually_exclusive_group()  # --quick --medium ran the quick one
size.add_argument("--quick", action="store_true", help="small problem for CI")
size.add_argument("--medium", action="store_true", help="the workflow at 128² (~7 min)")
args = parser.parse_args()
comm = MPI.COMM_WORLD
torch.set_num_threads(1)
output = output_folder("turbulence_2d", written_last=("summary.json",))
# -

# Sizes. The time step of a mesh of $n$ cells per side is $\Delta t = c/n$: with
# $h = 2\pi/n$ and velocities up to about 5 once the flow is turbulent, the CFL number is
# about $0.8c$ (the explicit advection's limit is about 0.4). The full mode's DNS is 256²,
# 8× the coarse 32² mesh; 512² would cost 8× more (4× the cells, 2× the steps), about a
# quarter of an hour per time unit on two cores. The spin-up runs at 128², then one time
# unit at 256². The quick mode keeps every stage on small meshes and short horizons; its
# numbers are not the headline ones.

# +
if args.quick:
    config = dict(
        dns=32, coarse=8, ladder=[8, 16], courant=0.5, spin_up_n=16, spin_up=1.0,
        spin_up_fine=0.25, train_seeds=[1, 2], test_seed=3, horizon=0.5, test_horizon=1.5,
        sample_every=0.125, mlp_epochs=15, fno_epochs=10, fno_modes=8, fno_width=16,
        window=2, rollout_epochs=2, stride=1,
    )  # fmt: skip
elif args.medium:
    config = dict(
        dns=128, coarse=16, ladder=[16, 32, 64], courant=0.4, spin_up_n=64, spin_up=5.0,
        spin_up_fine=1.0, train_seeds=[1, 2, 3], test_seed=5, horizon=2.0,
        test_horizon=6.0, sample_every=0.05, mlp_epochs=200, fno_epochs=60, fno_modes=8,
        fno_width=24, window=4, rollout_epochs=5, stride=2,
    )  # fmt: skip
else:
    config = dict(
        dns=256, coarse=32, ladder=[32, 64, 128], courant=0.4, spin_up_n=128, spin_up=5.0,
        spin_up_fine=1.0, train_seeds=[1, 2, 3], test_seed=5, horizon=2.0,
        test_horizon=6.0, sample_every=0.0625, mlp_epochs=200, fno_epochs=100, fno_modes=16,
        fno_width=32, window=4, rollout_epochs=10, stride=2,
    )  # fmt: skip
nu = 1e-3
nf, nc = config["dns"], config["coarse"]
ratio, h = nf // nc, length / nc


def time_step(n):
    return config["courant"] / n


log(f"config: {config}")
# -

# ## Step 1: the DNS and the data
#
# `dns` is the fine flow. The coarse model without closure, `plain`, doubles as the place
# where the filtered states live: `plain.set_vorticity(ω̄)` solves the coarse
# streamfunction, so its `omega_n` and `velocity_n` are the closure's operands at the
# filtered state. The flux is averaged exactly over the coarse cells into a DG₀ vector
# space; the coarse flux is a weak {py:class}`~dolfinx_mno.data.Tendency` on the same
# space (exactly its cell average). The velocity and vorticity gradients are constant on
# a cell (P1 ω, P2 ψ), so a one-point rule (the centroid) carries the local closure.

# +
dns = VorticityFlow(nf, time_step(nf), nu, name="dns")
plain = VorticityFlow(nc, time_step(nc), nu, name="plain")
coarse_mesh, Vc = plain.mesh, plain.V
bc_c = fem.dirichletbc(0.0, boundary_dofs(Vc), Vc)  # ω̄ = 0 on the walls
projection = L2Projection(Vc, subdivisions=ratio, bcs=[bc_c])
omega_bar = fem.Function(Vc, name="omega_bar")
Wc = fem.functionspace(coarse_mesh, ("Discontinuous Lagrange", 0, (2,)))
q = ufl.TestFunction(Wc)
coarse_flux = Tendency(
    ufl.inner(plain.velocity_n * plain.omega_n - nu * ufl.grad(plain.omega_n), q) * ufl.dx,
    name="coarse_flux",
)
operands = {"grad_omega": ufl.grad(plain.omega_n), "grad_u": ufl.grad(plain.velocity_n)}
sampler = ClosureSampler(
    projection, omega_bar, operands, coarse_flux, quadrature_degree=1,
    tendency_restriction=CellAverage(Wc, dns.mesh),
)  # fmt: skip
omega_f, psi_f = ufl.split(dns.w)
fine_flux = velocity(psi_f) * omega_f - nu * ufl.grad(omega_f)
tau_exact = sampler.filtered_tendency - coarse_flux.function
# -

# The non-local closure works on a grid of spacing $h/2$ whose points sit a quarter
# cell inside the coarse cells, with a margin of $n_c/2$ cells beyond the walls where the
# inputs are zero (the padding of a Fourier operator on a non-periodic domain).

# +
margin = nc  # grid points beyond each wall (n_c / 2 cells)
shape = 2 * nc + 2 * margin
lower = h / 4 - margin * h / 2
grid = Grid((lower, lower), (lower + (shape - 1) * h / 2,) * 2, (shape, shape))
grid_inputs = GriddedSampler([plain.omega_n, plain.velocity_n], grid)
grid_targets = GriddedSampler([tau_exact], grid, mesh=coarse_mesh)


def filtered(omega_fine):
    """ω̄ of a fine vorticity; sets the coarse state (and ψ̄) of `plain`."""
    projection(omega_fine, out=omega_bar)
    plain.set_vorticity(omega_bar)
    return omega_bar


n = config["spin_up_n"]  # the spin-up runs on n² first, then on the DNS mesh
cheap = VorticityFlow(n, time_step(n), nu, name="cheap") if n != nf else None
spin_up_dns = partial(  # spin_up_dns(seed): the DNS from the initial vorticity of `seed`
    spin_up, dns, duration=config["spin_up"], cheap=cheap, fine_duration=config["spin_up_fine"]
)

every = comparison.steps_between(config["sample_every"], dns.dt)
coarse_every = comparison.steps_between(config["sample_every"], plain.dt)
samples, grid_x, grid_y, trajectories = [], [], [], []
num_owned = plain.W.dofmap.index_map.size_local * plain.W.dofmap.index_map_bs
tic = time.perf_counter()
for seed in config["train_seeds"]:
    spin_up_dns(seed)
    trajectories.append([])

    def record(t):
        filtered(dns.omega)
        samples.append(sampler.sample(dns.omega, fine_flux))
        trajectories[-1].append(plain.w.x.array[:num_owned].copy())
        grid_x.append(grid_inputs())
        grid_y.append(grid_targets())

    dns.run(0.0, config["horizon"], record, every=every, progress=f"training trajectory {seed}")
log(f"training data: {len(samples)} snapshots, {time.perf_counter() - tic:.1f} s")
# -

# **The test trajectory and a check of the data.** Before the test trajectory runs, one
# DNS step checks the data: a coarse step (with the DNS time step) from $\bar\omega$ with
# the exact $\tau$ must give the filtered DNS tendency, up to the difference of the
# Taylor–Galerkin terms and of explicit and implicit viscosity in the flux, both $O(\Delta t)$.

# +
spin_up_dns(config["test_seed"])
start_fine = dns.omega
start = filtered(start_fine).copy()  # first: the sampler reads the coarse state of `plain`
tendency_error = comparison.tendency_check(dns, start, nc, sampler, fine_flux, tau_exact)
log(f"coarse tendency vs the filtered DNS tendency: {tendency_error}")

reference, dns_energies, t_test = [], [], config["test_horizon"]


def record_reference(t):
    reference.append(filtered(dns.omega).x.array.copy())
    dns_energies.append(dns.energy())


dns_seconds = dns.run(0.0, t_test, record_reference, every=every, progress="test trajectory")
dns_final = dns.omega
log(f"DNS: {dns_seconds / t_test:.1f} s per time unit")
# -

# ## Step 2: the closures
#
# **Smagorinsky.** $\tau = -C_s^2 g$ with $g = h^2 |S| \nabla\bar\omega$: least squares on
# the training data gives $C_s^2 = -\sum \tau\cdot g / \sum g\cdot g$ in closed form (a
# priori). A negative value (backscatter dominating the data) is clipped to zero.

# +
inputs = np.concatenate([s.inputs for s in samples])  # (points, 6): ∇ω̄, ∇ū row-major
targets = np.concatenate([s.targets for s in samples]).reshape(-1, 2)
c_s_squared = comparison.smagorinsky_constant(inputs, targets, h, comm)
c_s = float(np.sqrt(max(c_s_squared, 0.0)))
log(f"Smagorinsky: C_s = {c_s:.3f} (C_s² = {c_s_squared:.3e} before clipping)")
# -

# **Local MLP** of the six inputs $(\nabla\bar\omega, \nabla\bar u)$ to the two components
# of $\tau$, fitted with {py:func}`~dolfinx_mno.training.fit` (a validation split by whole
# snapshots), saved with its operands, and rebuilt from the file as a
# {py:class}`~dolfinx_mno.Closure` in any coarse model.

# +
snapshot = np.repeat(np.arange(len(samples)), samples[0].inputs.shape[0])  # split groups
tic = time.perf_counter()
local_fit = fit(
    MLP(6, 2, hidden_features=[64, 64], seed=0), inputs, targets, groups=snapshot, comm=comm,
    epochs=config["mlp_epochs"], batch_size=1024, learning_rate=3e-3, patience=20,
    normalize_targets=True, seed=0, progress=not args.quick,
)  # fmt: skip
local_seconds = time.perf_counter() - tic
local_path = output / "local_closure.pt"
save_model(local_path, local_fit.model, spec=sampler.spec, comm=comm)


def local_closure(omega_n, velocity_n):
    closure = mno.Closure(str(local_path), mno.Operands(
        {"grad_omega": ufl.grad(omega_n), "grad_u": ufl.grad(velocity_n)}))  # fmt: skip
    return closure, closure.dx


# -

# **MNO.** neuraloperator's FNO maps the gridded $(\bar\omega, \bar u)$ (3 channels) to
# the gridded $\tau$ (2 channels); the {py:class}`~dolfinx_mno.NonlocalClosure` samples its
# operands on the same grid, applies it, and interpolates the output to the cell centres.

# +
grid_data = (np.array(grid_x), np.array(grid_y)) if comm.rank == 0 else None
grid_x_all, grid_y_all = comm.bcast(grid_data, root=0)
torch.manual_seed(0)
operator = FNO(n_modes=(config["fno_modes"],) * 2, hidden_channels=config["fno_width"],
               in_channels=3, out_channels=2, n_layers=4)  # fmt: skip
tic = time.perf_counter()
operator_fit = fit(
    operator, shard(grid_x_all.astype(np.float32), comm),
    shard(grid_y_all.astype(np.float32), comm), grid=True, comm=comm,
    epochs=config["fno_epochs"], batch_size=8, chunk_size=8, learning_rate=3e-3,
    patience=20, normalize_targets=True, seed=0, progress=not args.quick,
)  # fmt: skip
operator_seconds = time.perf_counter() - tic
operator_path = output / "mno_closure.pt"
save_model(operator_path, operator_fit.model,
           spec=mno.ClosureSpec(("omega", "u"), (1, 2), value_shape=(2,), quadrature_degree=1,
                                grid=grid, mask_channel=False), comm=comm)  # fmt: skip


def operator_closure(omega_n, velocity_n):
    closure = mno.NonlocalClosure(
        str(operator_path), mno.Operands({"omega": omega_n, "u": velocity_n}),
        value_shape=(2,), quadrature_degree=1, grid_shape=grid.shape,
        bounding_box=(grid.lower, grid.upper), mask_channel=False,
    )  # fmt: skip
    return closure, closure.dx


log(f"fits: MLP {local_seconds:.1f} s, FNO {operator_seconds:.1f} s")
# -

# **A posteriori.** Each learned closure is trained further through the coarse solver:
# windows of `window` filtered states of the training trajectories (one every
# `sample_every`), loss the rollout's error against them, gradients by the discrete
# adjoint of the coarse steps ({py:class}`~dolfinx_mno.rollout.Rollout`). The model trains
# in place, so the trained coarse model is the one that then runs.

# +
coarse_flow = partial(VorticityFlow, nc, plain.dt, nu, domain=coarse_mesh)  # (closure, name=)
eddy_viscosity = smagorinsky(fem.Constant(coarse_mesh, c_s), h)
models = {"no closure": plain, "Smagorinsky": coarse_flow(eddy_viscosity, name="smagorinsky")}
training = {}
for label, factory in (("local MLP", local_closure), ("MNO", operator_closure)):
    name = label.split()[0].lower()
    models[f"{label}, a priori"] = coarse_flow(factory, name=f"{name}_prior")
    trained = models[f"{label}, a posteriori"] = coarse_flow(factory, name=f"{name}_post")
    training[label] = comparison.train_a_posteriori(
        trained, trajectories, coarse_every, config["window"], config["rollout_epochs"],
        learning_rate=1e-3, stride=config["stride"], progress=not args.quick, plain=plain,
    )  # fmt: skip
    log(f"{label} a posteriori: {training[label]}")
# -

# ## Step 3: every model against the filtered DNS of the test trajectory
#
# Every model starts from the filtered DNS state of the test seed. The correlation is
# taken on the coarse mesh (the finer meshes of the ladder are filtered to it the same
# way as the DNS). The coarse models run on for ten training horizons, for stability.

# +
test_runs = comparison.Comparison(Vc, reference, config["sample_every"], 10 * config["horizon"])
ladder = test_runs.ladder(config["ladder"], plain, time_step, start_fine, nf)
runs = {"no closure" if n == nc else f"no closure, {n}²": run for n, run in ladder.items()}
runs |= {label: test_runs.run(flow, start) for label, flow in models.items() if flow is not plain}
# -

# ## Step 4: the headline, spectra and outputs
#
# The resolution factor of a model is the finer mesh of the ladder whose decorrelation
# time it matches (interpolated in $\log n$); the wall-time ratio compares the ladder's
# cost per time unit there with the model's.

# +
table = comparison.headline(runs, ladder, nc)
report.write_vtx(output / "test_vorticity.bp", Vc, reference, runs, config["sample_every"])
shown = ["no closure", "MNO, a posteriori"]  # beside the DNS in the figures
spectra = report.figures(output, runs, dns_final, reference[-1], Vc, shown)
summary = {
    "quick": args.quick, "ranks": comm.size, "config": config, "nu": nu,
    "smagorinsky_constant": c_s, "tendency_check": tendency_error,
    "dns_seconds_per_time_unit": dns_seconds / t_test, "dns_max_energy": max(dns_energies),
    "fit_seconds": {"local": local_seconds, "mno": operator_seconds},
}  # fmt: skip
report.write_summary(output / "summary.json", summary, training, table, runs, spectra, comm)
# -

# ## Checks
#
# The exact τ reproduces the filtered DNS tendency far better than no closure; every run
# starts correlated with the reference; a-posteriori training lowers the held-out rollout
# loss it minimises; every coarse model stays finite with bounded energy over ten
# training horizons.

# +
assert tendency_error["exact tau"] < 0.1 * tendency_error["no closure"], tendency_error
for label, row in table.items():
    assert row["correlation_start"] > 0.99, (label, row)
for label, result in training.items():
    assert result.held_out_after < result.held_out_before, (label, result)
for label in models:
    row = table[label]
    assert row["finite"] and row["long_run_end"] > 10 * config["horizon"] - 1e-6, (label, row)
    assert row["max_energy"] < 10 * max(dns_energies), (label, row)
log("all checks passed")
