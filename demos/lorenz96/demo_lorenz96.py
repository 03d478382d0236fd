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
# This demo illustrates how to:
#
# - simulate the two-level Lorenz 96 system, batched over initial conditions, with a
#   vectorised fourth-order Runge-Kutta (RK4) integrator in PyTorch,
# - learn its *closure*, the effect of the fast variables on the slow ones, from
#   reference data: classical parametrisations (climatology, linear, cubic polynomial),
#   local multilayer perceptrons trained with {py:func}`dolfinx_mno.training.fit`, and the
#   multiscale neural operator (MNO): a Fourier neural operator (FNO) over the periodic
#   ring of slow variables, trained with the same `fit`,
# - save the trained models to model files ({py:func}`dolfinx_mno.io.save_model`) and
#   rebuild them from the files alone ({py:func}`dolfinx_mno.io.load_model`),
# - compare the closures in free-running rollouts of the coarse model,
# - measure the cost of one coarse step with the MNO closure against one step of the full
#   two-level model, from $K = 2^6$ to $2^{14}$ slow variables.
#
# It reproduces the multiscale Lorenz 96 experiment of the MNO paper (Lütjens et al. 2022,
# [arXiv:2207.11417](https://arxiv.org/abs/2207.11417)). There is no mesh here: the demo
# checks the models and the training code of `dolfinx_mno` against the paper.
#
# Run it with `python demo_lorenz96.py` (about 7-10 minutes on 2 CPU cores). The flag
# `--quick` (used by CI) runs a small problem in under a minute. Under
# `mpirun -n 2` the simulations are shared out over the ranks by initial condition and
# the training is data-parallel (`fit` gives the same weights on any number of ranks);
# the runtime study needs a single process and is skipped in parallel. All outputs go to
# `../output/lorenz96/`; the recorded results are in `docs/lorenz96.md`.
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
# $Y_{j \pm J, k} = Y_{j,k}$ (Lorenz's original chains all $JK$ fast variables into one
# ring). The reference solution takes RK4 steps of $\Delta t = 0.005$.
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
# We compare seven closures:
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
# The polynomial coefficients and the networks are the same for every $k$: the system is
# invariant under rotations of the ring. The FNO (Li et al. 2021,
# [arXiv:2010.08895](https://arxiv.org/abs/2010.08895)) lifts $X$ to $n_c$ channels, applies
# $L$ Fourier layers
#
# $$
#   v \mapsto \sigma\left(W v + \mathcal{F}^{-1}\left(R \cdot \mathcal{F} v\right)\right),
# $$
#
# where $\mathcal{F}$ is the discrete Fourier transform over $k$ and $R$ acts on the lowest
# modes, and projects back to one channel. The ring is periodic, so the FFT needs no
# padding, and without a positional embedding the operator commutes with rotations of the
# ring (we check this) and runs at any $K$ in $O(K \log K)$.
#
# **Time stepping of the coarse model.** RK4 with the same $\Delta t$; the closure is
# evaluated once per step, at $X^n$, and held over the four stages: the explicit coupling
# of {py:class}`dolfinx_mno.petsc.LinearProblem`. (Evaluating it at every stage changed
# the rollout RMSE of the linear and cubic closures by less than 0.3 % in our tests.)
#
# **Metric.** From the same initial slow state, the coarse model and the reference run
# $N = 200$ steps ($t \in (0, 1]$). For each closure,
#
# $$
#   \mathrm{RMSE}(t_n) = \Big(\frac{1}{MK} \sum_{m=1}^{M} \sum_{k} \big(X^{m}_{k}(t_n)
#   - X^{m,\mathrm{ref}}_{k}(t_n)\big)^2\Big)^{1/2},
#   \qquad
#   \mathrm{RMSE} = \Big(\frac{1}{N} \sum_{n=1}^{N} \mathrm{RMSE}(t_n)^2\Big)^{1/2},
# $$
#
# over $M$ test initial conditions on the attractor, none of them used in training.
#
# ## Imports

# +
import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

from mpi4py import MPI

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as nnf
from neuralop.models import FNO

import dolfinx_mno as mno
from dolfinx_mno.io import load_model, save_model
from dolfinx_mno.models import MLP
from dolfinx_mno.training import fit, shard

matplotlib.use("Agg")  # write files, no display needed
# -

# ## Settings
#
# The full run, and the table in `docs/lorenz96.md`, use $K = J = 64$, the larger of the
# two settings in the paper's code ($K = 4$ and $K = 64$): 4096 fast variables per
# initial condition. `--quick` uses
# $K = J = 16$, less data and fewer epochs. Everything is seeded.

# +
parser = argparse.ArgumentParser(description="Learned closures for multiscale Lorenz 96.")
parser.add_argument("--quick", action="store_true", help="small problem for CI (seconds)")
parser.add_argument(
    "--max-log2-k", type=int, default=None, help="largest K = 2^n timed (default 14, quick 11)"
)
parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
args = parser.parse_args()

comm = MPI.COMM_WORLD
h, b, c, F = 0.5, 10.0, 8.0, 20.0  # coupling, amplitude ratio, time-scale ratio, forcing
dt = 0.005
if args.quick:
    settings = dict(
        num_slow=16,  # K (= J)
        num_train_trajectories=32,
        num_train_steps=1000,
        num_test_trajectories=16,
        num_pointwise_samples=20_000,
        mlp_epochs=30,
        mno_epochs=8,
        max_log2_k=11,
    )
else:
    settings = dict(
        num_slow=64,
        num_train_trajectories=128,
        num_train_steps=2000,
        num_test_trajectories=64,
        num_pointwise_samples=100_000,
        mlp_epochs=100,
        mno_epochs=20,
        max_log2_k=14,
    )
settings.update(
    spin_up_steps=400,  # two time units: onto the attractor
    record_every=20,  # training snapshots every 0.1 time units
    num_rollout_steps=200,
    seed=0,
)
if args.max_log2_k is not None:
    settings["max_log2_k"] = args.max_log2_k
K = J = settings["num_slow"]
output_dir = Path(__file__).resolve().parent.parent / "output" / "lorenz96"
if comm.rank == 0:
    output_dir.mkdir(parents=True, exist_ok=True)
comm.Barrier()

# float64 throughout, except inside the FNO (float32, see below). One thread per process
# by default: the arrays of one rank are small, and on a shared machine extra threads
# mostly wait for each other.
torch.set_num_threads(args.threads)
torch.use_deterministic_algorithms(True)
dtype = torch.float64
wall_clock = {"start": time.perf_counter()}


def log(message):
    """Print on rank 0 only."""
    if comm.rank == 0:
        print(message, flush=True)


# -

# ## Step 1: the two-level model
#
# The resolved tendency, the right-hand side of the coarse model without closure, is
# the Lorenz 96 tendency of the slow variables; `torch.roll` implements the periodic
# indices. It acts on the last axis, so it works on any batch of states.


def resolved_tendency(x):
    """X_{k-1} (X_{k+1} - X_{k-2}) - X_k + F for x of shape (..., K)."""
    return torch.roll(x, 1, -1) * (torch.roll(x, -1, -1) - torch.roll(x, 2, -1)) - x + F


# The full model integrates $K$ slow and $KJ$ fast variables per initial condition, so its
# cost and memory are dominated by the fast variables, shape `(batch, K, J)`. We keep the
# stage state of the fast variables in one buffer with a periodic *halo*: one copy of
# $Y_{J-1,k}$ before each block and copies of $Y_{0,k}, Y_{1,k}$ after it. Then
# $Y_{j-1,k}$, $Y_{j+1,k}$ and $Y_{j+2,k}$ are slices of the same buffer, and every
# operation writes into preallocated arrays (`out=`, in-place). One RK4 step needs five
# arrays of the size of $Y$: the state, the next state, the stage state with its halo, the
# stage tendency and one work array. At $K = J = 2^{14}$ each is 2 GiB in float64.


# The classical RK4 scheme: for each stage, its weight in the update and the time offset
# (in steps) of the next stage's state.
RK4_STAGES = [(1 / 6, 0.5), (1 / 3, 0.5), (1 / 3, 1.0), (1 / 6, None)]


class TwoLevelLorenz96:
    """The two-level Lorenz 96 model, advanced by RK4 steps of ``dt``.

    Args:
        x: Slow variables, shape ``(batch, K)``.
        y: Fast variables, shape ``(batch, K, J)``, same dtype. The model takes ownership
            of both tensors: they are advanced in place (or swapped with its buffers).

    Attributes:
        x, y: The current state.
    """

    def __init__(self, x, y):
        batch, num_slow, num_fast = y.shape
        assert x.shape == (batch, num_slow) and x.dtype == y.dtype
        self.x, self.y = x, y
        self.y_next = torch.empty_like(y)
        self.y_stage = torch.empty(batch, num_slow, num_fast + 3, dtype=y.dtype)  # with halo
        self.y_rate = torch.empty_like(y)
        self.work = torch.empty_like(y)

    def subgrid_tendency(self):
        """U_k = -(hc/b) sum_j Y_{j,k} of the current state, shape (batch, K)."""
        return self.y.sum(-1).mul_(-h * c / b)

    def _stage_rates(self, x_stage):
        """Tendencies at the stage state (``x_stage``, ``self.y_stage``).

        Writes dY/dt to ``self.y_rate`` and returns dX/dt, shape (batch, K).
        """
        ys, num_fast = self.y_stage, self.y_stage.shape[-1] - 3
        ys[..., 0] = ys[..., num_fast]  # halo: Y_{-1} = Y_{J-1}, Y_J = Y_0, Y_{J+1} = Y_1
        ys[..., num_fast + 1 :] = ys[..., 1:3]
        y = ys[..., 1 : num_fast + 1]
        torch.sub(ys[..., 3:], ys[..., :num_fast], out=self.work)  # Y_{j+2} - Y_{j-1}
        torch.mul(ys[..., 2 : num_fast + 2], self.work, out=self.y_rate)  # times Y_{j+1}
        self.y_rate.mul_(-c * b).add_(y, alpha=-c).add_(x_stage.unsqueeze(-1), alpha=h * c / b)
        return resolved_tendency(x_stage) - (h * c / b) * y.sum(-1)

    def step(self):
        """Advance the state by one RK4 step."""
        x, y = self.x, self.y
        y_stage = self.y_stage[..., 1:-2]
        y_stage.copy_(y)
        x_stage, x_next = x, x.clone()
        for stage, (weight, next_offset) in enumerate(RK4_STAGES):
            x_rate = self._stage_rates(x_stage)
            if stage == 0:
                torch.add(y, self.y_rate, alpha=weight * dt, out=self.y_next)
            else:
                self.y_next.add_(self.y_rate, alpha=weight * dt)
            x_next += weight * dt * x_rate
            if next_offset is not None:
                torch.add(y, self.y_rate, alpha=next_offset * dt, out=y_stage)
                x_stage = x + next_offset * dt * x_rate
        self.x = x_next
        self.y, self.y_next = self.y_next, self.y


# The coarse model takes the same RK4 step for the slow variables alone, with the closure
# evaluated once at $X^n$. A closure is any function from `(batch, K)` to `(batch, K)`.


def coarse_step(x, closure):
    """One RK4 step of dX/dt = resolved_tendency(X) + U, with U = closure(X^n) held fixed."""
    closure_values = closure(x)
    x_stage, x_next = x, x.clone()
    for weight, next_offset in RK4_STAGES:
        rate = resolved_tendency(x_stage) + closure_values
        x_next += weight * dt * rate
        if next_offset is not None:
            x_stage = x + next_offset * dt * rate
    return x_next


# ## Step 2: reference data
#
# Initial conditions: slow variables uniform in $[-F/2, F/2]$, fast ones uniform in
# $[-0.05, 0.05]$, then `spin_up_steps` steps (two time units) onto the attractor. All
# initial conditions are drawn on every rank from one seeded generator; each rank
# simulates its contiguous block of them ({py:func}`dolfinx_mno.training.shard`) and the
# blocks are gathered in order, so every rank holds the same global data whatever the
# number of ranks.


def random_states(num_states, num_slow, num_fast, seed):
    """Seeded random states: x (num_states, K) and y (num_states, K, J)."""
    generator = torch.Generator().manual_seed(seed)
    x = F * (torch.rand(num_states, num_slow, generator=generator, dtype=dtype) - 0.5)
    y = 0.1 * (torch.rand(num_states, num_slow, num_fast, generator=generator, dtype=dtype) - 0.5)
    return x, y


def simulate(num_trajectories, num_steps, record_every, seed):
    """Reference trajectories after spin-up, recorded every ``record_every`` steps.

    Returns:
        x, u: Slow variables and subgrid tendencies, both of shape
        ``(num_records, num_trajectories, K)`` with ``num_records = num_steps //
        record_every + 1`` (the state after spin-up comes first); the same on every rank.
    """
    x0, y0 = random_states(num_trajectories, K, J, seed)
    model = TwoLevelLorenz96(
        torch.from_numpy(shard(x0, comm).copy()), torch.from_numpy(shard(y0, comm).copy())
    )
    for _ in range(settings["spin_up_steps"]):
        model.step()
    x_records, u_records = [model.x.clone()], [model.subgrid_tendency()]
    for step in range(1, num_steps + 1):
        model.step()
        if step % record_every == 0:
            x_records.append(model.x.clone())
            u_records.append(model.subgrid_tendency())
    local = torch.stack(x_records).numpy(), torch.stack(u_records).numpy()
    blocks = comm.allgather(local)  # in rank order: the global trajectories, in order
    x, u = (np.concatenate([block[i] for block in blocks], axis=1) for i in (0, 1))
    return torch.from_numpy(x), torch.from_numpy(u)


# Training data: `num_train_trajectories` trajectories of `num_train_steps` steps, a
# snapshot every 0.1 time units. Test data: other initial conditions (another seed), every
# step of the 200-step rollout window.

# +
tic = time.perf_counter()
seed = settings["seed"]
x_train, u_train = simulate(
    settings["num_train_trajectories"],
    settings["num_train_steps"],
    settings["record_every"],
    seed + 1,
)
x_test, u_test = simulate(
    settings["num_test_trajectories"], settings["num_rollout_steps"], 1, seed + 2
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

# ## Step 3: closures
#
# ### Classical parametrisations
#
# Climatology, linear and cubic closures are least-squares fits of $U_k$ against $X_k$
# over all training snapshots and all $k$.

# +
x_points = x_snapshots.reshape(-1).numpy()
u_points = u_snapshots.reshape(-1).numpy()
linear_coefficients = np.polynomial.polynomial.polyfit(x_points, u_points, 1)
cubic_coefficients = np.polynomial.polynomial.polyfit(x_points, u_points, 3)


def polynomial_closure(coefficients):
    """U_k = sum_i a_i X_k^i (Horner), the same polynomial for every k."""

    def closure(x):
        values = torch.full_like(x, coefficients[-1])
        for a in coefficients[-2::-1]:
            values = values * x + a
        return values

    return closure


closures = {
    "none": torch.zeros_like,
    "climatology": polynomial_closure([u_points.mean()]),
    "linear": polynomial_closure(linear_coefficients),
    "cubic": polynomial_closure(cubic_coefficients),
}
# -

# ### Local multilayer perceptrons, trained with `fit`
#
# A local closure sees a few values around each $k$: $X_k$ alone, or the stencil
# $(X_{k-2}, \dots, X_{k+2})$, which contains everything the resolved tendency of $X_k$
# depends on. Every $k$ of every snapshot is one sample, shape `(num_samples, width)`,
# which is what {py:func}`~dolfinx_mno.training.fit` takes; we train on a seeded random
# subset of `num_pointwise_samples` of them. `fit` holds 20 % of the *trajectories* out
# for validation (`groups`: the trajectory of each sample, so that neighbouring snapshots
# of one trajectory never sit on both sides of the split), normalises inputs and targets
# with the statistics of the training split (the result is a
# {py:class}`~dolfinx_mno.NormalizedModel`), and returns the weights of the best
# validation epoch. Each rank passes its block of the samples (`shard`); the weights do
# not depend on the number of ranks.


# +
def stencil(x, half_width):
    """(X_{k-w}, ..., X_{k+w}) for every k: shape (..., K, 2w + 1) from x of shape (..., K)."""
    return torch.stack([torch.roll(x, -s, -1) for s in range(-half_width, half_width + 1)], -1)


def pointwise_closure(model, half_width):
    """The closure that applies a pointwise model to the stencil of every k."""

    def closure(x):
        features = stencil(x, half_width)
        return model(features.reshape(-1, features.shape[-1])).reshape(x.shape)

    return closure


# Snapshot i is record i // M of trajectory i % M (M trajectories): x_train is
# (records, trajectories, K).
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
# took two to three times longer in our tests.
#
# `fit(grid=True)` trains it on fields as they are: inputs `(num_snapshots, 1, K)` and
# targets `(num_snapshots, 1, K)`, the FNO's `(batch, channels, *grid)` layout. Its
# normalisation is per channel, pooled over the grid points and the training snapshots:
# one mean and one standard deviation for $X$ and one for $U$. Per-component statistics
# (one per $k$) would tie the model to one $K$ and break its rotation invariance. The
# result is a {py:class}`~dolfinx_mno.NormalizedModel` around the FNO, which
# {py:func}`~dolfinx_mno.io.save_model` writes like any other (the FNO and the
# normalisation axis are built-in architectures).


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


def field_closure(model):
    """The closure (batch, K) -> (batch, K), float64, of a float32 model of (batch, 1, K)."""

    def closure(x):
        return model(x.to(torch.float32).unsqueeze(1)).squeeze(1).to(x.dtype)

    return closure


# -

# The MNO is trained on whole snapshots: a minibatch of 32 fields per Adam step, two
# chunks of 16 (so two ranks can share it), with a validation split by trajectory. It has
# far more parameters than there are independent training fields, and its validation
# loss stops improving after five to ten epochs, so the learning rate is halved as soon as
# the validation loss stalls and training stops early.

# +
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

# ### A lean evaluation of the trained FNO for the coarse step
#
# At the sizes of the runtime study, a call of neuraloperator's `FNO` on one state is
# dominated by overheads: some hundred small tensor operations, complex `einsum`s that
# PyTorch turns into permutes, copies and a complex batched matrix product, and
# $1 \times 1$ convolutions that take a generic (im2col) path. `RingFNO` evaluates the
# same trained network, with the same weights and the same arithmetic up to float32
# rounding, with fewer and cheaper operations:
#
# - the channel MLPs and skips ($1 \times 1$ convolutions) are matrix products
#   (`addmm`) on activations of shape `(channels, batch K)`;
# - the normalisation of the input and of the output is folded into the first lifting
#   and the last projection layer (both are affine maps);
# - the spectral convolution keeps $m$ Fourier modes ($m = 17$ at $K \ge 32$). Instead
#   of a full real FFT, of which it uses $m$ coefficients, and an inverse FFT of a
#   zero-padded spectrum, it applies the truncated real DFT as two matrix products with
#   precomputed `(K, 2m)` and `(2m, K)` cosine/sine bases, $O(mK)$ per channel, exactly
#   the rFFT's coefficients with its `norm="forward"` scaling; the per-mode complex
#   channel mixing is one real batched product with the $2 \times 2$ block form of each
#   complex weight matrix.
#
# It is checked against the `NormalizedModel` below (relative difference at float32
# rounding level) and used for the rollouts and the timings.


# +
class RingFNO:
    """Evaluate a trained ``NormalizedModel(FNO)`` of the ring on ``(batch, K)`` states.

    Args:
        model: A :class:`~dolfinx_mno.NormalizedModel` around a float32 1D
            ``neuralop.models.FNO`` with the configuration of :func:`ring_fno` (linear
            FNO skips, soft-gating channel-MLP skips, GELU, post-activation, no norm,
            padding or positional embedding) and per-channel (``axis=1``) statistics.

    Shapes:
        ``(batch, K)`` → ``(batch, K)`` for any ``K``, in the input's dtype (float32
        inside).
    """

    def __init__(self, model):
        fno, blocks = model.model, model.model.fno_blocks
        assert fno.positional_embedding is None and fno.domain_padding is None
        assert blocks.norm is None and not blocks.preactivation and blocks.use_channel_mlp
        assert blocks.non_linearity is nnf.gelu and len(fno.n_modes) == 1
        stats = (model.input_normalization, model.output_normalization)
        assert all(s.axis == 1 and s.shift.numel() == 1 for s in stats)

        def matrix(conv):  # a 1x1 convolution's weight, (out, in)
            return conv.weight.detach()[..., 0].clone()

        def column(conv):  # its bias, (out, 1)
            return conv.bias.detach()[:, None].clone()

        shift_in, scale_in = (float(v) for v in (stats[0].shift, stats[0].scale))
        shift_out, scale_out = (float(v) for v in (stats[1].shift, stats[1].scale))
        lift, project = fno.lifting.fcs, fno.projection.fcs
        assert len(lift) == len(project) == 2
        first = matrix(lift[0]) / scale_in  # (x - s) / σ folded into the first layer
        self.lifting = [
            (first, column(lift[0]) - first * shift_in),
            (matrix(lift[1]), column(lift[1])),
        ]
        self.projection = [
            (matrix(project[0]), column(project[0])),
            (matrix(project[1]) * scale_out, column(project[1]) * scale_out + shift_out),
        ]
        self.layers = []
        for i in range(blocks.n_layers):
            conv, gate, mlp = blocks.convs[i], blocks.channel_mlp_skips[i], blocks.channel_mlp[i]
            assert gate.bias is None and len(mlp.fcs) == 2 and not conv.separable
            weight = conv.weight.to_tensor() if hasattr(conv.weight, "to_tensor") else conv.weight
            wr, wi = weight.detach().real, weight.detach().imag  # (in, out, modes)
            # (re x, im x) (wr + i wi) = (re x wr - im x wi, re x wi + im x wr), per mode
            mixing = torch.cat([torch.cat([wr, wi], 1), torch.cat([-wi, wr], 1)], 0)
            self.layers.append(
                (
                    mixing.permute(2, 0, 1).contiguous(),  # (modes, 2 in, 2 out)
                    conv.bias.detach().reshape(-1, 1).clone(),  # spectral bias, (out, 1)
                    matrix(blocks.fno_skips[i].conv),
                    (matrix(mlp.fcs[0]), column(mlp.fcs[0])),
                    (matrix(mlp.fcs[1]), column(mlp.fcs[1])),
                    gate.weight.detach().reshape(-1, 1).clone(),
                )
            )
        self.modes, self.width = self.layers[0][0].shape[0], self.layers[0][2].shape[0]
        self._bases = {}

    def bases(self, num_slow):
        """Truncated real DFT of length K: (m, forward (K, 2m), inverse (2m, K)), float32."""
        if num_slow not in self._bases:
            m = min(self.modes, num_slow // 2 + 1)
            k = torch.arange(num_slow, dtype=torch.float64)
            angle = 2 * math.pi * torch.outer(k, torch.arange(m, dtype=torch.float64)) / num_slow
            cos, sin = torch.cos(angle), torch.sin(angle)
            forward = torch.cat([cos, -sin], 1) / num_slow  # rfft, norm="forward"
            # irfft, norm="forward": modes 0 (and K/2) once, the others twice (conjugates).
            weight = torch.full((m,), 2.0, dtype=torch.float64)
            weight[0] = 1.0
            if num_slow % 2 == 0 and m == num_slow // 2 + 1:
                weight[-1] = 1.0
            inverse = torch.cat([cos.T * weight[:, None], -sin.T * weight[:, None]], 0)
            self._bases[num_slow] = (m, forward.float(), inverse.float().contiguous())
        return self._bases[num_slow]

    def __call__(self, x):
        """The closure of ``x``, shape ``(batch, K)``."""
        batch, num_slow = x.shape
        m, forward, inverse = self.bases(num_slow)
        width = self.width
        h = x.to(torch.float32).reshape(1, batch * num_slow)  # (channels, batch K)
        (w0, b0), (w1, b1) = self.lifting
        h = torch.addmm(b1, w1, nnf.gelu(torch.addmm(b0, w0, h)))
        for i, (mixing, bias, skip, (wa, ba), (wb, bb), gate) in enumerate(self.layers):
            last = i == len(self.layers) - 1
            # Fourier coefficients (re | im) of every channel and state: (width batch, 2m)
            coefficients = torch.mm(h.view(width * batch, num_slow), forward)
            coefficients = coefficients.view(width, batch, 2, m).permute(3, 1, 2, 0)
            mixed = torch.bmm(coefficients.reshape(m, batch, 2 * width), mixing[:m])
            mixed = mixed.view(m, batch, 2, width).permute(3, 1, 2, 0)
            s = torch.addmm(bias, skip, h)  # skip + spectral bias, then the spectral part
            s.view(width * batch, num_slow).addmm_(mixed.reshape(width * batch, 2 * m), inverse)
            if not last:
                s = nnf.gelu(s)
            t = torch.addmm(bb, wb, nnf.gelu(torch.addmm(ba, wa, s)))
            t.addcmul_(gate, h)  # channel-MLP output + soft-gating skip
            h = t if last else nnf.gelu(t)
        (w0, b0), (w1, b1) = self.projection
        h = torch.addmm(b1, w1, nnf.gelu(torch.addmm(b0, w0, h)))
        return h.view(batch, num_slow).to(x.dtype)


# -


# ### Model files
#
# Each trained model goes to a model file (weights, architecture, metadata; rank 0
# writes) and is rebuilt from the file alone. The rebuilt models are the ones used below;
# we check that they give exactly the outputs of the trained ones.

# +
half_widths = {"MLP (X_k)": 0, "MLP (stencil)": 2, "MNO": None}
file_names = {"MLP (X_k)": "mlp_local.pt", "MLP (stencil)": "mlp_stencil.pt", "MNO": "mno.pt"}
metadata = {"system": "two-level Lorenz 96", "K": K, "J": J, "h": h, "b": b, "c": c, "F": F}
models = {}
for name, result in fits.items():
    save_model(output_dir / file_names[name], result.model, metadata=metadata, comm=comm)
    models[name] = load_model(output_dir / file_names[name])
    if half_widths[name] is None:
        trained, closures[name] = field_closure(result.model), field_closure(models[name])
    else:
        trained = pointwise_closure(result.model, half_widths[name])
        closures[name] = pointwise_closure(models[name], half_widths[name])
    with torch.no_grad():
        assert torch.equal(trained(x_test[0]), closures[name](x_test[0])), name
# -

# The lean evaluation of the MNO gives the outputs of the model, up to float32 rounding;
# it is the MNO closure from here on. It commutes with rotations of the ring:

with torch.no_grad():
    reference_values = closures["MNO"](x_test.reshape(-1, K))
    closures["MNO"] = RingFNO(models["MNO"])
    lean_error = float(
        (closures["MNO"](x_test.reshape(-1, K)) - reference_values).abs().max()
    ) / float(reference_values.abs().max())
log(f"MNO lean evaluation: relative difference {lean_error:.1e} to the model")

with torch.no_grad():
    u_mno = closures["MNO"](x_test[0])
    rotation_error = float(
        (closures["MNO"](torch.roll(x_test[0], 5, -1)) - torch.roll(u_mno, 5, -1)).abs().max()
    ) / float(u_mno.abs().max())
log(f"MNO rotation check: relative difference {rotation_error:.1e}")

# ## Step 4: rollouts
#
# Every closure starts from the test states after spin-up and runs 200 coarse steps; we
# record the squared error against the reference at every step. Each rank rolls out its
# block of the test initial conditions; a sum over ranks gives the global RMSE. We also
# record the *offline* error of each closure, $\| U_\theta(X) - U \|$ on the test
# snapshots, and keep the first test trajectory of each closure for the plots (rank 0
# holds it).

# +
x_start = torch.from_numpy(shard(x_test[0], comm).copy())  # (local trajectories, K)
x_reference = torch.from_numpy(shard(x_test.transpose(0, 1), comm).copy()).transpose(0, 1)
num_steps, num_test = settings["num_rollout_steps"], settings["num_test_trajectories"]
rollout_mse, trajectory_mse, offline_rmse, first_trajectory = {}, {}, {}, {}
tic = time.perf_counter()
with torch.inference_mode():
    for name, closure in closures.items():
        x = x_start
        squared_error = np.zeros((num_steps, x.shape[0]))  # (steps, local trajectories)
        states = [x[:1]]
        for n in range(num_steps):
            x = coarse_step(x, closure)
            squared_error[n] = ((x - x_reference[n + 1]) ** 2).mean(-1).numpy()
            states.append(x[:1])
        first_trajectory[name] = torch.cat(states).numpy()  # (steps + 1, K)
        rollout_mse[name] = comm.allreduce(squared_error.sum(axis=1)) / num_test  # (steps,)
        trajectory_mse[name] = np.concatenate(comm.allgather(squared_error.mean(axis=0)))
        error = closure(x_test.reshape(-1, K)) - u_test.reshape(-1, K)
        offline_rmse[name] = float(error.pow(2).mean().sqrt())
wall_clock["rollouts"] = time.perf_counter() - tic
rmse = {name: float(np.sqrt(mse.mean())) for name, mse in rollout_mse.items()}
# -

# How much of a difference between two closures is noise? We give the standard error of
# the mean over test trajectories of their mean squared errors, carried over to the RMSE
# ($\delta\,\mathrm{RMSE} = \delta\,\mathrm{MSE} / (2\,\mathrm{RMSE})$), and the fraction
# of test trajectories on which the MNO has the smaller error.

# +
standard_error = {
    name: float(np.std(mse, ddof=1) / np.sqrt(mse.size) / (2 * rmse[name]))
    for name, mse in trajectory_mse.items()
}
mno_wins = {
    name: float(np.mean(trajectory_mse["MNO"] < mse)) for name, mse in trajectory_mse.items()
}
num_parameters = {"none": 0, "climatology": 1, "linear": 2, "cubic": 4}
for name, model in models.items():
    num_parameters[name] = sum(p.numel() * (1 + p.is_complex()) for p in model.parameters())
# -

# ## Step 5: runtime
#
# The cost of one coarse step with the MNO closure (one FNO evaluation and the RK4 step of
# the slow variables, one state) against one step of the full model (one state), for
# $K = J = 2^6, \dots, 2^{14}$: the median over repeats after a warm-up step, in this
# process alone, with `--threads` threads. The FNO is the trained one: its cost does not
# depend on the weights, and it runs at any $K$ (the closure values at other $K$ mean
# nothing here; only the cost counts). The full model needs five arrays of $KJ$ float64
# values, 10 GiB at $K = 2^{14}$; a size that does not fit in the available memory is
# skipped, and said so. We fit $\log(\text{cost}) = p \log K + \text{const}$ by least
# squares, over all sizes and over $K \ge 2^{10}$. The MNO step is timed with the lean
# evaluation (`RingFNO`, the same trained network); at small $K$ it still costs a
# fixed few tenths of a millisecond (some sixty tensor operations and their Python
# calls), so there the MNO's exponent measures overheads as much as the $O(mK)$ work;
# `docs/lorenz96.md` discusses what that means for the targets.
#
# The machine may be shared: the timings are medians, but other processes competing for
# memory bandwidth slow the memory-bound full model more than the MNO.


# +
def median_seconds(step, min_seconds=0.2, repeats=7):
    """Median wall time of one call of ``step``, after a warm-up call."""
    step()
    tic = time.perf_counter()
    step()
    once = time.perf_counter() - tic
    inner = max(1, int(min_seconds / max(once, 1e-9)))  # calls per repeat
    times = []
    for _ in range(repeats if once < 1.0 else 3):
        tic = time.perf_counter()
        for _ in range(inner):
            step()
        times.append((time.perf_counter() - tic) / inner)
    return statistics.median(times)


def available_memory():
    """MemAvailable of /proc/meminfo in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def timing_state(num_slow, num_fast):
    """An arbitrary state (the cost does not depend on it), built in place to save memory."""
    generator = torch.Generator().manual_seed(seed + 3)
    x = torch.rand(1, num_slow, generator=generator, dtype=dtype).sub_(0.5).mul_(F)
    y = torch.rand(1, num_slow, num_fast, generator=generator, dtype=dtype)
    return x, y.sub_(0.5).mul_(0.1)


timings = {"K": [], "full": [], "MNO": []}
if comm.size == 1:
    tic = time.perf_counter()
    for log2_k in range(6, settings["max_log2_k"] + 1):
        num_slow = 2**log2_k
        x_timing, _ = timing_state(num_slow, 1)
        with torch.inference_mode():
            mno_seconds = median_seconds(lambda x=x_timing: coarse_step(x, closures["MNO"]))
        full_seconds = None
        needed, free = 5.05 * 8 * num_slow**2, available_memory()
        if free is None or needed < 0.8 * free:
            full_model = TwoLevelLorenz96(*timing_state(num_slow, num_slow))
            full_seconds = median_seconds(full_model.step)
            del full_model
        else:
            log(f"K = 2^{log2_k}: full model skipped, needs {needed / 2**30:.1f} GiB")
        timings["K"].append(num_slow)
        timings["MNO"].append(mno_seconds)
        timings["full"].append(full_seconds)
        full_text = "skipped" if full_seconds is None else f"{full_seconds * 1e3:10.2f} ms"
        log(f"K = J = 2^{log2_k:<2d}: MNO step {mno_seconds * 1e3:8.3f} ms, full step {full_text}")
    wall_clock["runtime study"] = time.perf_counter() - tic
else:
    log("runtime study skipped: it times a single process (run without mpirun)")


def cost_exponent(k_values, seconds, k_min=0):
    """Least-squares slope of log(seconds) against log(K), over K >= k_min."""
    points = [(k, s) for k, s in zip(k_values, seconds, strict=True) if s and k >= k_min]
    if len(points) < 2:
        return float("nan")
    k_array, s_array = np.array(points).T
    return float(np.polyfit(np.log(k_array), np.log(s_array), 1)[0])


exponents = {
    model: {
        "all K": cost_exponent(timings["K"], timings[model]),
        "K >= 2^10": cost_exponent(timings["K"], timings[model], k_min=2**10),
    }
    for model in ("MNO", "full")
}
speed_up = {
    k: full / fast
    for k, full, fast in zip(timings["K"], timings["full"], timings["MNO"], strict=True)
    if full is not None
}
# -

# ## Step 6: results, plots and outputs
#
# The table and the timings are printed and written to `results.md`, all numbers to
# `results.json`. The plots: rollout RMSE against time (`lorenz96_rollout.png`); a
# snapshot of $X$ and of the closures, and the closures against $X_k$ over the training
# data (`lorenz96_snapshot.png`); the runtime study (`lorenz96_runtime.png`).

# +
names = ["none", "climatology", "linear", "cubic", "MLP (X_k)", "MLP (stencil)", "MNO"]
inputs = {
    "none": "-",
    "climatology": "-",
    "linear": "$X_k$",
    "cubic": "$X_k$",
    "MLP (X_k)": "$X_k$",
    "MLP (stencil)": "$X_{k-2}, \\dots, X_{k+2}$",
    "MNO": "$X$ (whole ring)",
}
lines = [
    f"Two-level Lorenz 96, K = J = {K}, {num_test} test initial conditions, "
    f"{num_steps} steps of {dt} ({'quick' if args.quick else 'full'} run, "
    f"{comm.size} rank(s)).",
    "",
    "| closure | inputs | parameters | offline RMSE of $U$ | rollout RMSE | s.e. | MNO better on |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
]
for name in names:
    wins = "-" if name == "MNO" else f"{100 * mno_wins[name]:.0f} %"
    lines.append(
        f"| {name} | {inputs[name]} | {num_parameters[name]} | {offline_rmse[name]:.3f} "
        f"| {rmse[name]:.3f} | {standard_error[name]:.3f} | {wins} |"
    )
if timings["K"]:
    lines += [
        "",
        f"Cost of one step (median, {args.threads} thread(s)):",
        "",
        "| K = J | full model (ms) | MNO coarse step (ms) | speed-up |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for k, full, fast in zip(timings["K"], timings["full"], timings["MNO"], strict=True):
        full_text = "not measured" if full is None else f"{full * 1e3:.3f}"
        ratio = "-" if full is None else f"{full / fast:.1f}"
        lines.append(f"| {k} | {full_text} | {fast * 1e3:.3f} | {ratio} |")
    lines += [
        "",
        "Cost exponents (least squares of log cost against log K): "
        + "; ".join(
            f"{model}: {values['all K']:.2f} (all K), {values['K >= 2^10']:.2f} (K >= 1024)"
            for model, values in exponents.items()
        ),
    ]
table = "\n".join(lines)
wall_clock["total"] = time.perf_counter() - wall_clock.pop("start")
results = {
    "settings": settings,
    "threads": args.threads,
    "ranks": comm.size,
    "rmse": rmse,
    "standard_error": standard_error,
    "offline_rmse": offline_rmse,
    "mno_wins": mno_wins,
    "trajectory_mse": {name: mse.tolist() for name, mse in trajectory_mse.items()},
    "num_parameters": num_parameters,
    "training": {
        name: {
            "epochs": result.history.epochs,
            "best_epoch": result.history.best_epoch,
            "best_val_loss": result.history.best_val_loss,
        }
        for name, result in fits.items()
    },
    "timings": timings,
    "exponents": exponents,
    "speed_up": speed_up,
    "rotation_error": rotation_error,
    "lean_error": lean_error,
    "wall_clock": wall_clock,
    "versions": {"torch": torch.__version__, "numpy": np.__version__},
    "cpu_count": os.cpu_count(),
}
# -

# Plotting and writing happen on rank 0 only.

if comm.rank == 0:
    print("\n" + table)
    (output_dir / "results.md").write_text(table + "\n")
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    styles = {
        "none": ("C7", ":"),
        "climatology": ("C5", ":"),
        "linear": ("C0", "--"),
        "cubic": ("C1", "--"),
        "MLP (X_k)": ("C2", "-."),
        "MLP (stencil)": ("C4", "-."),
        "MNO": ("C3", "-"),
    }
    times = dt * np.arange(1, num_steps + 1)

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for name in names:
        color, style = styles[name]
        ax.plot(times, np.sqrt(rollout_mse[name]), color=color, ls=style, label=name)
    ax.set(
        xlabel="time $t$",
        ylabel="RMSE of $X$",
        title=f"Rollouts of the coarse model, K = J = {K}",
    )
    ax.legend(fontsize=8)
    fig.savefig(output_dir / "lorenz96_rollout.png", dpi=100)

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    (ax_x, ax_u), (ax_rollout, ax_scatter) = axes
    k_axis = np.arange(K)
    ax_x.plot(k_axis, x_test[0, 0].numpy(), "k.-")
    ax_x.set(xlabel="$k$", ylabel="$X_k$", title="$X$ at $t = 0$ (first test state)")
    with torch.no_grad():
        ax_u.plot(k_axis, u_test[0, 0].numpy(), "k-", lw=2, alpha=0.5, label="true $U_k$")
        for name in ("linear", "cubic", "MLP (X_k)", "MLP (stencil)", "MNO"):
            color, style = styles[name]
            values = closures[name](x_test[0, :1])[0].numpy()
            ax_u.plot(k_axis, values, color=color, ls=style, label=name)
    ax_u.set(xlabel="$k$", ylabel="$U_k$", title="Closures of that $X$")
    ax_u.legend(fontsize=7)
    half = num_steps // 2
    ax_rollout.plot(k_axis, x_test[half, 0].numpy(), "k-", lw=2, alpha=0.5, label="reference")
    for name in ("none", "cubic", "MNO"):
        color, style = styles[name]
        ax_rollout.plot(k_axis, first_trajectory[name][half], color=color, ls=style, label=name)
    ax_rollout.set(xlabel="$k$", ylabel="$X_k$", title=f"$X$ at $t = {half * dt:g}$, rollouts")
    ax_rollout.legend(fontsize=7)
    shown = generator.choice(x_points.size, min(2000, x_points.size), replace=False)
    ax_scatter.plot(x_points[shown], u_points[shown], ".", ms=1, color="0.6", label="data")
    x_line = torch.linspace(float(x_points.min()), float(x_points.max()), 200, dtype=dtype)
    with torch.no_grad():
        for name in ("linear", "cubic", "MLP (X_k)"):
            color, style = styles[name]
            values = closures[name](x_line[None, :])[0]  # pointwise: any K
            ax_scatter.plot(x_line, values, color=color, ls=style, label=name)
    ax_scatter.set(xlabel="$X_k$", ylabel="$U_k$", title="Subgrid tendency (training data)")
    ax_scatter.legend(fontsize=7)
    fig.savefig(output_dir / "lorenz96_snapshot.png", dpi=80)

    if timings["K"]:
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        k_array = np.array(timings["K"], dtype=float)
        full_array = np.array([np.nan if s is None else s for s in timings["full"]])
        label_full = f"full model (slope {exponents['full']['all K']:.2f})"
        label_mno = f"MNO coarse step (slope {exponents['MNO']['all K']:.2f})"
        ax.loglog(k_array, full_array * 1e3, "ko-", label=label_full)
        ax.loglog(k_array, np.array(timings["MNO"]) * 1e3, "C3s-", label=label_mno)
        ax.set(xlabel="$K = J$", ylabel="cost of one step (ms)", title="Runtime, one state")
        ax.legend()
        fig.savefig(output_dir / "lorenz96_runtime.png", dpi=100)
    print(f"\nwall clock (s): {json.dumps({k: round(v, 1) for k, v in wall_clock.items()})}")
    print(f"outputs written to {output_dir}")

# ## Checks
#
# What must hold in every run, quick or full, on any number of ranks: every learned
# closure beats the coarse model without closure; every `fit` improved on its first
# epoch; the model files rebuild the trained models exactly (checked above); the MNO
# commutes with rotations of the ring; and, where timed, a coarse MNO step is cheaper than
# a full step at the largest $K$. The full run also checks that the MNO beats the linear
# closure by more than three standard errors. The paper's other targets (MNO better than
# the local MLPs, a speed-up of at least 100 at $K = 4096$, a cost exponent of the MNO
# step of at most 1.15) are reported in `results.md` and discussed in `docs/lorenz96.md`,
# not asserted: they depend on the machine and on training details.

for name in ("linear", "cubic", "MLP (X_k)", "MLP (stencil)", "MNO"):
    assert rmse[name] < rmse["none"], f"{name}: RMSE {rmse[name]:.3f} >= {rmse['none']:.3f}"
for name, result in fits.items():
    assert result.history.best_val_loss < result.history.val_loss[0], f"{name} did not learn"
assert rotation_error < 1e-4, f"the MNO does not commute with rotations ({rotation_error:.1e})"
assert lean_error < 1e-5, f"the lean MNO evaluation differs from the model ({lean_error:.1e})"
if timings["K"]:
    largest = max(k for k, s in zip(timings["K"], timings["full"], strict=True) if s)
    assert speed_up[largest] > 1.0, f"the MNO step is slower than the full step at K={largest}"
if not args.quick:
    margin = 3 * np.hypot(standard_error["MNO"], standard_error["linear"])
    assert rmse["MNO"] + margin < rmse["linear"], "the MNO does not beat the linear closure"
    # The paper's ordering: MNO < local MLPs < linear < no closure.
    local_mlps = [rmse["MLP (X_k)"], rmse["MLP (stencil)"]]
    assert rmse["MNO"] < min(local_mlps) and max(local_mlps) < rmse["linear"] < rmse["none"], rmse
log("all checks passed")
