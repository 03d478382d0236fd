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
# This demo is implemented in {download}`demo_burgers.py`, with the problem's plain
# DOLFINx parts (parameters, IMEX solver, nodal values, output files) in
# {download}`burgers.py`. It illustrates how to:
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
# - couple the closures explicitly to a time-stepping scheme
#   ({py:class}`dolfinx_mno.timestepping.IMEXStepper`) and compare them with the coarse
#   model without closure, against the filtered fine solution.
#
# Run it with `python demo_burgers.py` or `mpirun -n 2 python demo_burgers.py`; `--quick`
# (used by CI) runs a smaller problem. Outputs go to `demos/output/burgers/`. The study
# behind `docs/results.md`, `experiments/burgers_results.py`, measures the closures this
# demo writes further: against a Smagorinsky eddy viscosity, energy spectra, stability
# over ten horizons, wall times, and the mesh a run *without* closure needs to be as
# accurate.
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
# and closure explicit:
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
# | local | $\tau_\theta(\bar u, \bar u_x)$ at each quadrature point, an MLP |
# | MNO | $\mathcal{G}_\theta[\bar u, \bar u_x]$, a Fourier neural operator on a grid |
#
# **Time windows.** The fine run spins up over $[0, t_s]$, provides training data over
# the training horizon $[t_s, t_s + T]$, and the reference over the test horizon
# $[t_s + T, t_s + 2T]$ (unseen states, same forcing law). The coarse runs start from the
# filtered fine state at $t_s + T$ and are compared over the test horizon.

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
from dolfinx_mno.training import fit, shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demos/: utilities.py
from burgers import Burgers, coarse_run, nodal, nu, relative_error, write_outputs, write_vtx
from utilities import log, output_folder

parser = argparse.ArgumentParser(description="Learned subgrid fluxes for 1D viscous Burgers.")
parser.add_argument("--quick", action="store_true", help="small problem for CI")
args = parser.parse_args()

comm = MPI.COMM_WORLD
torch.set_num_threads(1)
# The summary and reference are written last: an earlier run's are removed now.
output = output_folder("burgers", written_last=("summary.json", "reference.npz"))
# -

# Sizes. The quick mode keeps every step of the workflow, on smaller meshes and shorter
# horizons; its numbers are not the headline ones.

# +
if args.quick:
    config = dict(
        fine_cells=1024, coarse_cells=64, fine_dt=4e-4, coarse_dt=1e-3, spin_up=0.5,
        horizon=0.3, sample_every=4e-3, fno_epochs=15, mlp_epochs=20, closure_every=2e-3,
    )  # fmt: skip
else:
    config = dict(
        fine_cells=4096, coarse_cells=128, fine_dt=1e-4, coarse_dt=2.5e-4, spin_up=1.0,
        horizon=2.0, sample_every=4e-3, fno_epochs=60, mlp_epochs=80, closure_every=1e-3,
    )  # fmt: skip
nc = config["coarse_cells"]
h = 1.0 / nc
t_train = config["spin_up"]
t_test = t_train + config["horizon"]
t_end = t_test + config["horizon"]
for key in ("spin_up", "horizon"):  # sampling times must fall on the window boundaries
    steps = config[key] / config["sample_every"]
    assert abs(steps - round(steps)) < 1e-9
log(f"config: {config}")
# -

# ## The solver
#
# `Burgers(num_cells, dt, closure=...)` in `burgers.py` is an ordinary DOLFINx model: the
# forms above on `create_interval`, $u = 0$ at the walls, and a
# {py:class}`~dolfinx_mno.petsc.LinearProblem` whose matrix $M + \Delta t\,\nu K$ is
# factorised once (`reuse_matrix=True`). Its `run(u0, t0, t1, callback)` marches with an
# {py:class}`~dolfinx_mno.timestepping.IMEXStepper` and returns the wall time of the
# steps. A closure is a function of the previous state $u^n$ that returns the flux $\tau$
# and the measure to integrate it with; the model adds one term to the right-hand side,
#
# ```python
# tau, measure = closure(u_previous)
# L += dt * tau * v.dx(0) * measure
# ```
#
# For a learned closure, `tau` is the closure object and `measure` its `closure.dx`, the
# quadrature rule of the points it is evaluated at (a classical closure such as
# Smagorinsky's is plain UFL with `ufl.dx`). `nodal(u)` gathers the nodal values of a
# $P_1$ function in order of $x$ on every rank: the demo compares runs on those;
# `coarse_run` records them at the sampling times and `relative_error` is the relative L²
# error over all of them.
#
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
plain = Burgers(nc, config["coarse_dt"], name="no")  # the coarse model without closure
Vc = plain.V
u_bar = fem.Function(Vc, name="u_bar")
ratio = config["fine_cells"] // nc
projection = L2Projection(Vc, subdivisions=ratio, bcs=plain.bcs)
Wc = fem.functionspace(Vc.mesh, ("Discontinuous Lagrange", 0))
cell_average = CellAverage(Wc, fine.mesh)
q = ufl.TestFunction(Wc)
coarse_flux = Tendency((0.5 * u_bar**2 - nu * u_bar.dx(0)) * q * ufl.dx, name="coarse_flux")
sampler = ClosureSampler(
    projection, u_bar, [u_bar, u_bar.dx(0)], coarse_flux, quadrature_degree=2,
    tendency_restriction=cell_average,
)  # fmt: skip
u_f = fine.u_previous
fine_flux = 0.5 * u_f**2 - nu * u_f.dx(0)
tau_exact = sampler.filtered_tendency - coarse_flux.function
grid_inputs = GriddedSampler([u_bar, u_bar.dx(0)], grid)
grid_targets = GriddedSampler([tau_exact], grid, mesh=Vc.mesh)
# -

# The fine run calls `record(t)` at every sampling time. Over the training horizon it
# appends the sample to a new data file (`mode="w"`) and keeps the gridded fields (on rank
# 0, which receives the grids); from $t_s$ on it keeps the filtered fine solution, the
# reference.

# +
data_path = output / "closure_data.h5"
writer = ClosureDataWriter.from_sampler(
    data_path, sampler, fine_mesh=fine.mesh, time_step=config["sample_every"], mode="w",
    attributes={"problem": "viscous Burgers", "nu": nu, "flux": "u^2/2 - nu u_x"},
)  # fmt: skip
sample_steps = round(config["sample_every"] / config["fine_dt"])
grid_x, grid_y = [], []
filtered = {}  # time -> nodal values of the filtered fine solution


def record(t):
    """Samples on the training horizon, and the filtered fine solution from t_train on."""
    if t < t_train - 1e-9:
        return
    sample = sampler.sample(u_f, fine_flux)
    filtered[round(t, 9)] = nodal(u_bar)
    if t < t_test - 1e-9:
        writer.append(sample, time=t)
        grid_x.append(grid_inputs())
        grid_y.append(grid_targets())


log("fine run ...")
fine_seconds = fine.run(
    fem.Function(fine.V), 0.0, t_test, callback=record, every=sample_steps, progress="fine"
)
fine_state_test = fine.u.copy()  # the fine state at t_test
test_start = u_bar.copy()  # and its filtered state, where the coarse runs start
fine_test_seconds = fine.run(
    fine_state_test, t_test, t_end, callback=record, every=sample_steps, progress="fine, test"
)
writer.close()
fine_final = u_bar.x.array.copy()  # the filtered fine state at t_end
test_reference = {t: v for t, v in filtered.items() if t > t_test + 1e-9}
log(
    f"fine run: {fine_seconds + fine_test_seconds:.1f} s "
    f"(test horizon {fine_test_seconds:.2f} s), {len(test_reference)} reference states"
)
# -

# ## Step 2: the closures
#
# **Local closure.** An MLP $(\bar u, \bar u_x) \mapsto \tau$ with two hidden layers,
# fitted with {py:func}`~dolfinx_mno.training.fit` (normalised inputs and targets, Adam,
# early stopping on a validation split of whole snapshots: `groups` keeps the points of
# one snapshot on one side), saved with its operand specification and rebuilt as a
# {py:class}`~dolfinx_mno.Closure` from the file. Each rank passes its block of the
# samples (`shard`); the weights do not depend on the number of ranks.

# +
with ClosureDataReader(data_path) as reader:
    inputs, targets, times = reader.inputs(), reader.targets(), reader.times()
points_per_snapshot = inputs.shape[0] // times.size
snapshot = np.repeat(np.arange(times.size), points_per_snapshot)  # the split's groups
log(f"training data: {times.size} snapshots of {points_per_snapshot} points")
# The settings both fits share:
fit_settings = dict(learning_rate=3e-3, patience=15, normalize_targets=True, seed=0,
                    comm=comm, progress=comm.rank == 0 and not args.quick)  # fmt: skip
tic = time.perf_counter()
local_fit = fit(
    MLP(2, 1, hidden_features=[64, 64], seed=0),
    shard(inputs, comm),
    shard(targets.reshape(-1, 1), comm),
    groups=shard(snapshot, comm),
    epochs=config["mlp_epochs"],
    batch_size=1024,
    **fit_settings,
)
local_fit_seconds = time.perf_counter() - tic
local_path = output / "local_closure.pt"
save_model(
    local_path,
    local_fit.model,
    spec=mno.ClosureSpec(("u", "u_x"), (1, 1), value_shape=(), quadrature_degree=2),
    comm=comm,
)


def local_closure(un):
    closure = mno.Closure(str(local_path), mno.Operands({"u": un, "u_x": un.dx(0)}))
    return closure, closure.dx


# -

# **MNO.** A Fourier neural operator (neuraloperator's `FNO`: 4 Fourier layers, 16
# channels, 24 modes) maps the gridded $(\bar u, \bar u_x)$ to the gridded $\tau$; it
# sees the whole field, not one point. The inputs $\bar u_x$ let its pointwise path do
# what the local closure does, the Fourier layers add the non-local part. It is fitted
# with the same `fit`, `grid=True`: normalisation per channel over the grid, a split by
# whole fields. The {py:class}`~dolfinx_mno.NonlocalClosure` samples its operands on the
# same grid, applies the operator and interpolates the result back to its quadrature
# points.

# +
grid_data = (np.array(grid_x[::2]), np.array(grid_y[::2])) if comm.rank == 0 else None
grid_inputs_all, grid_targets_all = comm.bcast(grid_data, root=0)
torch.manual_seed(0)
operator = FNO(n_modes=(24,), hidden_channels=16, in_channels=2, out_channels=1, n_layers=4)
tic = time.perf_counter()
operator_fit = fit(
    operator,
    shard(grid_inputs_all.astype(np.float32), comm),
    shard(grid_targets_all.astype(np.float32), comm),
    grid=True,
    epochs=config["fno_epochs"],
    batch_size=16,
    chunk_size=16,
    **fit_settings,
)
operator_fit_seconds = time.perf_counter() - tic
operator_path = output / "mno_closure.pt"
save_model(
    operator_path,
    operator_fit.model,
    spec=mno.ClosureSpec(("u", "u_x"), (1, 1), grid=grid, mask_channel=False),
    comm=comm,
)


def operator_closure(un):
    closure = mno.NonlocalClosure(
        str(operator_path), mno.Operands({"u": un, "u_x": un.dx(0)}), value_shape=(),
        quadrature_degree=2, grid_shape=grid.shape, bounding_box=(grid.lower, grid.upper),
        mask_channel=False,
    )  # fmt: skip
    return closure, closure.dx


log(
    f"fits: local MLP {local_fit.history.epochs} epochs, {local_fit_seconds:.1f} s; "
    f"FNO {operator_fit.history.epochs} epochs, {operator_fit_seconds:.1f} s"
)
# -

# ## Step 3: coarse runs against the filtered fine solution
#
# Every coarse run starts from the filtered fine state at $t_s + T$ and runs over the test
# horizon; its error is the relative L² error against the filtered fine solution at all
# sampling times. The learned closures are updated every `closure_interval` steps, i.e.
# every 10⁻³ time units, 2·10⁻³ in the quick mode (`IMEXStepper(closure_interval=...)`):
# with the exact τ held 10⁻³ long, the coarse run stays within 0.45 % of the filtered fine
# one (measured while designing the demo), and the operator's cost is spread over several
# cheap steps.

# +
closure_interval = max(1, round(config["closure_every"] / config["coarse_dt"]))
coarse_model = partial(Burgers, nc, config["coarse_dt"], domain=Vc.mesh,
                       closure_interval=closure_interval)  # fmt: skip
models = {
    "no closure": plain,
    "local MLP": coarse_model(local_closure, name="local"),
    "MNO (FNO)": coarse_model(operator_closure, name="mno"),
}
errors, seconds = {}, {}
for label, model in models.items():
    run = coarse_run(model, test_start, t_test, t_end, config["sample_every"])
    errors[label] = relative_error(run.states, test_reference)
    seconds[label] = run.seconds
    log(f"{label:>12}: relative L2 error {errors[label]:.3e}, {run.seconds:.2f} s")
# -

# ## Outputs
#
# A VTX file with the coarse states at the end of the test horizon (the filtered fine one
# and every closure's, for ParaView), and `summary.json`. The filtered fine states and
# the fine state at $t_s + T$ go to `reference.npz` (nodal values, in order of $x$): with
# the model files they are all that `experiments/burgers_results.py` needs to measure the
# closures further without running the fine model again.

# +
write_vtx(output / "coarse_final.bp", fine_final, models.values(), t_end)
summary = {
    "quick": args.quick, "config": config,
    "grid": {"lower": list(grid.lower), "upper": list(grid.upper), "shape": list(grid.shape)},
    "closure_interval": closure_interval, "training_points": int(inputs.shape[0]),
    "fit_seconds": {"local": local_fit_seconds, "mno": operator_fit_seconds},
    "fine_seconds": {"total": fine_seconds + fine_test_seconds, "test": fine_test_seconds},
    "relative_l2_error": errors, "wall_time_s": seconds, "ranks": comm.size,
}  # fmt: skip
write_outputs(output, summary, filtered, fine_state_test)  # summary.json, reference.npz
# -

# ## Checks
#
# Both learned closures beat the coarse model without closure; the full run also checks
# that the MNO beats the local closure, as measured in `docs/results.md`.

# +
assert all(np.isfinite(e) for e in errors.values()), errors
assert errors["local MLP"] < errors["no closure"], errors
assert errors["MNO (FNO)"] < errors["no closure"], errors
if not args.quick:
    assert errors["MNO (FNO)"] < errors["local MLP"], errors
log("all checks passed")
