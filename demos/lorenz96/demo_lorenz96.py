# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # Multiscale Lorenz 96: learned closures and the multiscale neural operator
#
# This demo is implemented in {download}`demo_lorenz96.py`, with the two-level system
# itself in {download}`lorenz96.py`. It illustrates how to:
#
# - learn the *closure* of a multiscale system, the effect of the fast variables on the
#   slow ones, from reference data: classical parametrisations (climatology, linear,
#   cubic polynomial), local multilayer perceptrons trained with
#   {py:func}`dolfinx_mno.training.fit`, and the multiscale neural operator (MNO): a
#   Fourier neural operator (FNO) over the periodic ring of slow variables, trained with
#   the same `fit` on whole fields (`grid=True`);
# - keep time series out of both sides of the validation split (`groups`), and train
#   data-parallel with the same weights on any number of ranks;
# - save the trained models to model files ({py:func}`dolfinx_mno.io.save_model`) and
#   rebuild them from the files alone ({py:func}`dolfinx_mno.io.load_model`);
# - compare the closures in free-running rollouts of the coarse model.
#
# It follows the multiscale Lorenz 96 experiment of the MNO paper (Lütjens et al. 2022,
# [arXiv:2207.11417](https://arxiv.org/abs/2207.11417)). There is no mesh here: the demo
# exercises the models and the training code of `dolfinx_mno`.
#
# Run it with `python demo_lorenz96.py` (about 5-7 minutes on 2 CPU cores) or under
# `mpirun -n 2`, where the simulations are shared out over the ranks by initial condition
# and the training is data-parallel. The flag `--quick` (used by CI) runs a small
# problem in under a minute. Outputs go to `demos/output/lorenz96/`. The paper
# reproduction in `docs/lorenz96.md` measures the closures this demo writes:
# `experiments/lorenz96_results.py` (the table of closures, with standard errors and
# figures) and `experiments/lorenz96_runtime.py` (the cost of a coarse MNO step against
# the full model, up to $K = 2^{14}$).
#
# ## The problem
#
# $K$ slow variables $X_k$ on a ring, each coupled to a block of $J$ fast variables
# $Y_{j,k}$ (Lorenz 1996):
#
# $$
# \begin{align}
#   \frac{\mathrm{d}X_k}{\mathrm{d}t} &= X_{k-1}\left(X_{k+1} - X_{k-2}\right) - X_k + F
#     \underbrace{- \frac{hc}{b} \sum_{j=0}^{J-1} Y_{j,k}}_{U_k}, & k &= 0, \dots, K-1, \\
#   \frac{\mathrm{d}Y_{j,k}}{\mathrm{d}t} &= -cb\, Y_{j+1,k}\left(Y_{j+2,k} - Y_{j-1,k}\right)
#     - c\, Y_{j,k} + \frac{hc}{b} X_k, & j &= 0, \dots, J-1,
# \end{align}
# $$
#
# with $h = 0.5$ (coupling), $b = 10$ (amplitude ratio), $c = 8$ (time-scale ratio),
# $F = 20$ (forcing) and $J = K$. The indices are periodic: $X_{k \pm K} = X_k$, and, as in
# the paper's code, each block of fast variables is its own ring,
# $Y_{j \pm J, k} = Y_{j,k}$. The reference solution takes RK4 steps of $\Delta t = 0.005$.
#
# The full model costs $O(KJ) = O(K^2)$ per step. A *coarse* model keeps only the slow
# variables and replaces the subgrid tendency $U_k$ by a closure $U_\theta(X)$, learned
# from reference data:
#
# $$
#   \frac{\mathrm{d}X_k}{\mathrm{d}t} = X_{k-1}\left(X_{k+1} - X_{k-2}\right) - X_k + F
#   + U_\theta(X)_k .
# $$
#
# We compare seven closures, the same function for every $k$ (the system is invariant
# under rotations of the ring):
#
# | closure | $U_\theta(X)_k$ |
# | --- | --- |
# | none | $0$ |
# | climatology | $\bar U$, the mean subgrid tendency |
# | linear | $a_0 + a_1 X_k$ |
# | cubic (Arnold et al. 2013) | $a_0 + a_1 X_k + a_2 X_k^2 + a_3 X_k^3$ |
# | MLP ($X_k$) | a multilayer perceptron of $X_k$ |
# | MLP (stencil) | a multilayer perceptron of $(X_{k-2}, \dots, X_{k+2})$ |
# | MNO | $\mathcal{G}_\theta(X)_k$, an FNO over the whole ring |
#
# The FNO (Li et al. 2021, [arXiv:2010.08895](https://arxiv.org/abs/2010.08895)) lifts
# $X$ to $n_c$ channels, applies $L$ Fourier layers
# $v \mapsto \sigma\left(W v + \mathcal{F}^{-1}\left(R \cdot \mathcal{F} v\right)\right)$,
# where $\mathcal{F}$ is the discrete Fourier transform over $k$ and $R$ acts on the lowest
# modes, and projects back to one channel. The ring is periodic, so the FFT needs no
# padding, and without a positional embedding the operator commutes with rotations of the
# ring (we check this) and runs at any $K$ in $O(K \log K)$.
#
# **The coarse model** takes RK4 steps of the same $\Delta t$; the closure is evaluated
# once per step, at $X^n$, and held over the four stages: the explicit coupling of
# {py:class}`dolfinx_mno.petsc.LinearProblem`.
#
# **Metric.** From the same initial slow state, the coarse model and the reference run
# $N = 200$ steps ($t \in (0, 1]$). For each closure, over $M$ test initial conditions on
# the attractor, none of them used in training,
#
# $$
#   \mathrm{RMSE} = \Big(\frac{1}{NMK} \sum_{n=1}^{N} \sum_{m=1}^{M} \sum_{k}
#   \big(X^{m}_{k}(t_n) - X^{m,\mathrm{ref}}_{k}(t_n)\big)^2\Big)^{1/2} .
# $$

# +
import argparse
import json
import sys
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch
from neuralop.models import FNO

import dolfinx_mno as mno
from dolfinx_mno.io import load_model, save_model
from dolfinx_mno.models import MLP
from dolfinx_mno.training import fit, shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demos/: utilities.py
from lorenz96 import (
    F,
    b,
    c,
    field_closure,
    h,
    pointwise_closure,
    polynomial_closure,
    rollout,
    simulate,
    stencil,
)
from utilities import log, output_folder

# -

# ## Settings
#
# The full run uses $K = J = 64$, the larger of the two settings in the paper's code
# ($K = 4$ and $K = 64$): 4096 fast variables per initial condition. `--quick` uses
# $K = J = 16$, less data and fewer epochs. Everything is seeded. The arrays of one rank
# are small: one torch thread per process.

# +
parser = argparse.ArgumentParser(description="Learned closures for multiscale Lorenz 96.")
parser.add_argument("--quick", action="store_true", help="small problem for CI (seconds)")
args = parser.parse_args()

comm = MPI.COMM_WORLD
settings = dict(
    num_slow=16 if args.quick else 64,  # K (= J)
    num_train_trajectories=32 if args.quick else 128,
    num_train_steps=1000 if args.quick else 2000,
    num_test_trajectories=16 if args.quick else 64,
    num_pointwise_samples=20_000 if args.quick else 100_000,
    mlp_epochs=30 if args.quick else 100,
    mno_epochs=8 if args.quick else 20,
    spin_up_steps=400,  # two time units: onto the attractor
    record_every=20,  # training snapshots every 0.1 time units
    num_rollout_steps=200,
    seed=0,
)
K, seed = settings["num_slow"], settings["seed"]
output = output_folder("lorenz96")
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
wall_clock = {}
# -

# ## Step 1: the two-level model and reference data
#
# `lorenz96.py` holds the system: `resolved_tendency(x)`, the right-hand side of the
# coarse model without closure (`torch.roll` implements the periodic indices, on the last
# axis, so it works on any batch of states); `TwoLevelLorenz96`, the full model, batched
# over initial conditions, whose RK4 step writes into preallocated arrays (its cost and
# memory are those of the fast variables, `(batch, K, J)`); and `coarse_step(x, closure)`,
# one RK4 step of the coarse model with the closure evaluated at $X^n$.
#
# `simulate` draws initial conditions (slow variables uniform in $[-F/2, F/2]$, fast ones
# in $[-0.05, 0.05]$) on every rank from one seeded generator, runs `spin_up_steps` steps
# onto the attractor and records the slow variables $X$ and the subgrid tendency $U$.
# Each rank simulates its contiguous block of the initial conditions
# ({py:func}`dolfinx_mno.training.shard`) and the blocks are gathered in order, so every
# rank holds the same global data whatever the number of ranks. Training data: a
# snapshot every 0.1 time units; test data: other initial conditions (another seed),
# every step of the 200-step rollout window. Shapes: `(records, trajectories, K)`.

# +
tic = time.perf_counter()
spin_up = settings["spin_up_steps"]
x_train, u_train = simulate(
    settings["num_train_trajectories"],
    K,
    settings["num_train_steps"],
    settings["record_every"],
    seed + 1,
    spin_up,
)
x_test, u_test = simulate(
    settings["num_test_trajectories"], K, settings["num_rollout_steps"], 1, seed + 2, spin_up
)
wall_clock["reference data"] = time.perf_counter() - tic
x_snapshots, u_snapshots = x_train.reshape(-1, K), u_train.reshape(-1, K)  # (snapshots, K)
log(
    f"K = J = {K}: {x_snapshots.shape[0]} training snapshots, "
    f"{settings['num_test_trajectories']} test trajectories "
    f"({wall_clock['reference data']:.1f} s); X: mean {x_snapshots.mean():.2f}, "
    f"std {x_snapshots.std():.2f}; U: mean {u_snapshots.mean():.2f}, std {u_snapshots.std():.2f}"
)
# -

# ## Step 2: closures
#
# ### Classical parametrisations
#
# Climatology, linear and cubic closures are least-squares fits of $U_k$ against $X_k$
# over all training snapshots and all $k$; `polynomial_closure(a)` evaluates
# $\sum_i a_i X_k^i$ for every $k$.

# +
x_points = x_snapshots.reshape(-1).numpy()
u_points = u_snapshots.reshape(-1).numpy()
polynomials = {
    "climatology": [float(u_points.mean())],
    "linear": np.polynomial.polynomial.polyfit(x_points, u_points, 1).tolist(),
    "cubic": np.polynomial.polynomial.polyfit(x_points, u_points, 3).tolist(),
}
closures = {"none": torch.zeros_like}
closures.update({name: polynomial_closure(a) for name, a in polynomials.items()})
# -

# ### Local multilayer perceptrons, trained with `fit`
#
# A local closure sees a few values around each $k$: $X_k$ alone, or the stencil
# $(X_{k-2}, \dots, X_{k+2})$ (`stencil(x, 2)`), which contains everything the resolved
# tendency of $X_k$ depends on. Every $k$ of every snapshot is one sample, shape
# `(num_samples, width)`, which is what {py:func}`~dolfinx_mno.training.fit` takes; we
# train on a seeded random subset of `num_pointwise_samples` of them. `fit` holds 20 % of
# the *trajectories* out for validation (`groups`: the trajectory of each sample, so that
# neighbouring snapshots of one trajectory never sit on both sides of the split),
# normalises inputs and targets with the statistics of the training split (the result is
# a {py:class}`~dolfinx_mno.NormalizedModel`), and returns the weights of the best
# validation epoch. Each rank passes its block of the samples (`shard`); the weights do
# not depend on the number of ranks.

# +
# Snapshot i is record i // M of trajectory i % M (M trajectories).
snapshot_trajectory = np.arange(x_snapshots.shape[0]) % settings["num_train_trajectories"]
point_trajectory = np.repeat(snapshot_trajectory, K)  # the same for every (snapshot, k)
generator = np.random.default_rng(seed)
sample_index = generator.choice(x_points.size, settings["num_pointwise_samples"], replace=False)
fits = {}
for name, half_width in (("MLP (X_k)", 0), ("MLP (stencil)", 2)):
    tic = time.perf_counter()
    features = stencil(x_snapshots, half_width).reshape(-1, 2 * half_width + 1)[sample_index]
    fits[name] = fit(
        MLP(2 * half_width + 1, 1, hidden_features=[64, 64], activation="tanh", seed=seed),
        shard(features, comm),
        shard(u_points[sample_index, None], comm),
        comm=comm,
        groups=shard(point_trajectory[sample_index], comm),
        epochs=settings["mlp_epochs"],
        batch_size=1024,
        chunk_size=512,  # at most two ranks share a minibatch
        learning_rate=3e-3,
        patience=20,
        seed=seed,
        progress=not args.quick,
    )
    wall_clock[name] = time.perf_counter() - tic
    history = fits[name].history
    log(
        f"{name}: best epoch {history.best_epoch} of {history.epochs}, validation loss "
        f"{history.val_loss[0]:.3f} -> {history.best_val_loss:.3f} ({wall_clock[name]:.1f} s)"
    )
# -

# ### The multiscale neural operator
#
# The MNO closure maps the whole field $X$ to the closure field $U$ with neuraloperator's
# `FNO`: one input and one output channel, `n_modes` Fourier modes ($\min(32, K)$ here:
# wavenumbers up to 16 at $K = 64$), 32 hidden channels, four Fourier layers, no domain
# padding and no positional embedding. The FNO runs in float32: in float64, PyTorch's CPU
# convolutions (the FNO's pointwise channel mixing) take a slower path, and an evaluation
# took two to three times longer in our tests. `field_closure(model)` casts at the
# boundary: `(batch, K)` float64 in and out, `(batch, 1, K)` float32 inside.
#
# `fit(grid=True)` trains it on fields as they are: inputs and targets
# `(num_snapshots, 1, K)`, the FNO's `(batch, channels, *grid)` layout. Its normalisation
# is per channel, pooled over the grid points and the training snapshots: one mean and
# one standard deviation for $X$ and one for $U$. Per-component statistics (one per $k$)
# would tie the model to one $K$ and break its rotation invariance. The MNO is trained on
# whole snapshots, a minibatch of 32 fields per Adam step in two chunks of 16 (so two
# ranks can share it), with a validation split by trajectory. It has far more parameters
# than there are independent training fields, and its validation loss stops improving
# after five to ten epochs, so the learning rate is halved as soon as the validation loss
# stalls and training stops early.


# +
def ring_fno(n_modes=32, hidden_channels=32, n_layers=4, seed=0):
    """A float32 FNO on the periodic ring: (batch, 1, K) -> (batch, 1, K) for any K.

    ``seed`` seeds the initial weights without touching the global random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fno = FNO(
            n_modes=(n_modes,),
            in_channels=1,
            out_channels=1,
            hidden_channels=hidden_channels,
            n_layers=n_layers,
            positional_embedding=None,  # keep the operator invariant under rotations
            domain_padding=None,  # the ring is periodic: no padding
        )
    return mno.to_precision(fno, torch.float32)  # complex weights stay complex


tic = time.perf_counter()
fits["MNO"] = fit(
    ring_fno(n_modes=min(32, K), seed=seed),
    shard(x_snapshots.unsqueeze(1), comm),  # (snapshots, 1, K)
    shard(u_snapshots.unsqueeze(1), comm),
    comm=comm,
    grid=True,  # fields, per-channel statistics of inputs and targets
    groups=shard(snapshot_trajectory, comm),
    epochs=settings["mno_epochs"],
    batch_size=32,
    chunk_size=16,
    learning_rate=3e-3,
    lr_patience=2,  # halve the rate as soon as the validation loss stalls ...
    patience=6,  # ... and stop when it no longer improves: the MNO overfits quickly
    seed=seed,
    progress=not args.quick,
)
wall_clock["MNO"] = time.perf_counter() - tic
history = fits["MNO"].history
log(
    f"MNO: best epoch {history.best_epoch} of {history.epochs}, validation loss "
    f"{history.val_loss[0]:.3f} -> {history.best_val_loss:.3f} ({wall_clock['MNO']:.1f} s)"
)
# -

# ### Model files
#
# Each trained model goes to a model file (weights, architecture, metadata; rank 0
# writes) and is rebuilt from the file alone: `NormalizedModel`, `MLP` and neuraloperator's
# `FNO` are built-in architectures. The rebuilt models are the ones used below; we check
# that they give exactly the outputs of the trained ones. The coefficients of the
# polynomial closures go to `closures.json`.

# +
half_widths = {"MLP (X_k)": 0, "MLP (stencil)": 2, "MNO": None}
file_names = {"MLP (X_k)": "mlp_local.pt", "MLP (stencil)": "mlp_stencil.pt", "MNO": "mno.pt"}
metadata = {"system": "two-level Lorenz 96", "K": K, "J": K, "h": h, "b": b, "c": c, "F": F}
for name, result in fits.items():
    save_model(output / file_names[name], result.model, metadata=metadata, comm=comm)
    model = load_model(output / file_names[name])
    if half_widths[name] is None:
        trained, closures[name] = field_closure(result.model), field_closure(model)
    else:
        trained = pointwise_closure(result.model, half_widths[name])
        closures[name] = pointwise_closure(model, half_widths[name])
    with torch.no_grad():
        assert torch.equal(trained(x_test[0]), closures[name](x_test[0])), name
# -

# The MNO commutes with rotations of the ring:

with torch.no_grad():
    u_mno = closures["MNO"](x_test[0])
    rotated = closures["MNO"](torch.roll(x_test[0], 5, -1))
    rotation_error = float((rotated - torch.roll(u_mno, 5, -1)).abs().max() / u_mno.abs().max())
log(f"MNO rotation check: relative difference {rotation_error:.1e}")

# ## Step 3: rollouts
#
# Every closure starts from the test states after spin-up and runs 200 coarse steps;
# `rollout` records the squared error against the reference after every step. Each rank
# rolls out its block of the test initial conditions; a sum over ranks gives the global
# RMSE.

# +
x_reference = torch.from_numpy(shard(x_test.transpose(0, 1), comm).copy()).transpose(0, 1)
tic = time.perf_counter()
rmse = {}
for name, closure in closures.items():
    squared_error = rollout(closure, x_reference).squared_error  # (steps, local trajectories)
    mse = comm.allreduce(squared_error.sum(axis=1)) / settings["num_test_trajectories"]
    rmse[name] = float(np.sqrt(mse.mean()))
    log(f"{name:>14}: rollout RMSE {rmse[name]:.3f}")
wall_clock["rollouts"] = time.perf_counter() - tic
# -

# ## Outputs
#
# `closures.json` holds the settings, the polynomial coefficients, the training
# histories, the rollout RMSEs and the wall-clock times; with the model files it is all
# that the experiments need to measure the closures further.

# +
training = {
    name: {
        "epochs": result.history.epochs,
        "best_epoch": result.history.best_epoch,
        "best_val_loss": result.history.best_val_loss,
    }
    for name, result in fits.items()
}
summary = {
    "quick": args.quick,
    "settings": settings,
    "polynomials": polynomials,
    "model_files": file_names,
    "training": training,
    "rmse": rmse,
    "rotation_error": rotation_error,
    "wall_clock": wall_clock,
    "ranks": comm.size,
}
if comm.rank == 0:
    (output / "closures.json").write_text(json.dumps(summary, indent=2) + "\n")
# -

# ## Checks
#
# What must hold in every run, quick or full, on any number of ranks: every learned
# closure beats the coarse model without closure; every `fit` improved on its first
# epoch; the model files rebuild the trained models exactly (checked above); the MNO
# commutes with rotations of the ring. The full run also checks the paper's ordering,
# MNO < local MLPs < linear < no closure; `experiments/lorenz96_results.py` checks its
# significance.

# +
for name in ("linear", "cubic", "MLP (X_k)", "MLP (stencil)", "MNO"):
    assert rmse[name] < rmse["none"], f"{name}: RMSE {rmse[name]:.3f} >= {rmse['none']:.3f}"
for name, result in fits.items():
    assert result.history.best_val_loss < result.history.val_loss[0], f"{name} did not learn"
assert rotation_error < 1e-4, f"the MNO does not commute with rotations ({rotation_error:.1e})"
if not args.quick:
    local_mlps = [rmse["MLP (X_k)"], rmse["MLP (stencil)"]]
    assert rmse["MNO"] < min(local_mlps) and max(local_mlps) < rmse["linear"] < rmse["none"], rmse
log("all checks passed")
