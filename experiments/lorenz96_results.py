"""Lorenz 96: the table of closures of ``docs/lorenz96.md``, from the demo's closures.

It measures the closures that ``demos/lorenz96/demo_lorenz96.py`` trains, from the files
that demo writes to ``demos/output/lorenz96/`` (``closures.json`` and the model files), and
follows the demo's last run, full or ``--quick``::

    python demos/lorenz96/demo_lorenz96.py     # the closures (about 5-7 minutes, full)
    python experiments/lorenz96_results.py     # this table (about 1 minute after a full run)
    mpirun -n 2 python experiments/lorenz96_results.py

It simulates the demo's reference data again (the same seeds give the same data on any
number of ranks) and reports, for each closure: its offline error (RMSE of U on the test
snapshots), its rollout RMSE, the standard error of that over the test trajectories, the
fraction of test trajectories on which the MNO has the smaller error, and paired
differences of the per-trajectory mean squared errors. The MNO is evaluated with
``RingFNO`` (``ring_fno.py``: the same network, with the arithmetic of the runtime study),
checked against the model to float32 rounding.

Writes ``experiments/output/lorenz96/``: ``results.md`` (the tables), ``results.json``
(every number, per-trajectory errors included), ``lorenz96_rollout.png`` and
``lorenz96_snapshot.png``. In a full run it asserts that the MNO beats the linear closure
by more than three standard errors.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from mpi4py import MPI

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from dolfinx_mno.io import load_model
from dolfinx_mno.training import shard

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY / "demos"), str(REPOSITORY / "demos" / "lorenz96")]
from lorenz96 import dt, field_closure, pointwise_closure, polynomial_closure, rollout, simulate
from ring_fno import RingFNO
from utilities import log, output_folder

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument(
    "--demo-output",
    type=Path,
    default=REPOSITORY / "demos" / "output" / "lorenz96",
    help="the folder the Lorenz 96 demo wrote (default: demos/output/lorenz96)",
)
args = parser.parse_args()

comm = MPI.COMM_WORLD
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
if not (args.demo_output / "closures.json").is_file():
    sys.exit(f"{args.demo_output} has no closures.json: run the Lorenz 96 demo first")
demo = json.loads((args.demo_output / "closures.json").read_text())
settings, quick = demo["settings"], demo["quick"]
K, seed = settings["num_slow"], settings["seed"]
num_steps, num_test = settings["num_rollout_steps"], settings["num_test_trajectories"]
output = output_folder("lorenz96", root=REPOSITORY / "experiments" / "output")

# The demo's reference data, simulated again.
spin_up = settings["spin_up_steps"]
x_train, u_train = simulate(
    settings["num_train_trajectories"],
    K,
    settings["num_train_steps"],
    settings["record_every"],
    seed + 1,
    spin_up,
)
x_test, u_test = simulate(num_test, K, num_steps, 1, seed + 2, spin_up)
x_points, u_points = x_train.reshape(-1).numpy(), u_train.reshape(-1).numpy()

# The demo's closures, from its files.
closures = {"none": torch.zeros_like}
closures.update({name: polynomial_closure(a) for name, a in demo["polynomials"].items()})
models = {name: load_model(args.demo_output / file) for name, file in demo["model_files"].items()}
closures["MLP (X_k)"] = pointwise_closure(models["MLP (X_k)"], 0)
closures["MLP (stencil)"] = pointwise_closure(models["MLP (stencil)"], 2)
with torch.no_grad():
    reference_values = field_closure(models["MNO"])(x_test.reshape(-1, K))
    closures["MNO"] = RingFNO(models["MNO"])
    lean_error = float(
        (closures["MNO"](x_test.reshape(-1, K)) - reference_values).abs().max()
    ) / float(reference_values.abs().max())
    u_mno = closures["MNO"](x_test[0])
    rotation_error = float(
        (closures["MNO"](torch.roll(x_test[0], 5, -1)) - torch.roll(u_mno, 5, -1)).abs().max()
    ) / float(u_mno.abs().max())
log(f"MNO lean evaluation: relative difference {lean_error:.1e} to the model")
log(f"MNO rotation check: relative difference {rotation_error:.1e}")

# Rollouts: each rank its block of the test trajectories.
x_reference = torch.from_numpy(shard(x_test.transpose(0, 1), comm).copy()).transpose(0, 1)
rollout_mse, trajectory_mse, offline_rmse, first_trajectory = {}, {}, {}, {}
for name, closure in closures.items():
    run = rollout(closure, x_reference)
    first_trajectory[name] = run.first_trajectory  # (steps + 1, K); rank 0 plots it
    rollout_mse[name] = comm.allreduce(run.squared_error.sum(axis=1)) / num_test  # (steps,)
    trajectory_mse[name] = np.concatenate(comm.allgather(run.squared_error.mean(axis=0)))
    with torch.inference_mode():
        error = closure(x_test.reshape(-1, K)) - u_test.reshape(-1, K)
    offline_rmse[name] = float(error.pow(2).mean().sqrt())
rmse = {name: float(np.sqrt(mse.mean())) for name, mse in rollout_mse.items()}

# How much of a difference between two closures is noise? The standard error of the mean
# over test trajectories of their mean squared errors, carried over to the RMSE
# (δRMSE = δMSE / (2 RMSE)), the fraction of test trajectories on which the MNO has the
# smaller error, and paired differences of the per-trajectory errors.
standard_error = {
    name: float(np.std(mse, ddof=1) / np.sqrt(mse.size) / (2 * rmse[name]))
    for name, mse in trajectory_mse.items()
}
mno_wins = {
    name: float(np.mean(trajectory_mse["MNO"] < mse)) for name, mse in trajectory_mse.items()
}
pairs = [
    ("MNO", "MLP (stencil)"),
    ("MNO", "MLP (X_k)"),
    ("MLP (stencil)", "MLP (X_k)"),
    ("MLP (X_k)", "cubic"),
    ("MLP (X_k)", "linear"),
    ("linear", "none"),
    ("climatology", "none"),
]
paired = {}
for first, second in pairs:
    difference = trajectory_mse[first] - trajectory_mse[second]
    paired[f"{first} - {second}"] = {
        "mean": float(difference.mean()),
        "standard_error": float(np.std(difference, ddof=1) / np.sqrt(difference.size)),
        "first_better_on": float(np.mean(difference < 0)),
    }
num_parameters = {"none": 0, "climatology": 1, "linear": 2, "cubic": 4}
for name, model in models.items():
    num_parameters[name] = sum(p.numel() * (1 + p.is_complex()) for p in model.parameters())

# Tables, results.json and figures (rank 0).
names = list(closures)
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
    f"{num_steps} steps of {dt} ({'quick' if quick else 'full'} run, {comm.size} rank(s)).",
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
lines += ["", "| comparison | MSE difference | first better on |", "| --- | ---: | ---: |"]
for pair, values in paired.items():
    difference = f"{values['mean']:+.2f}".replace("-", "−")
    lines.append(
        f"| {pair.replace(' - ', ' − ')} | {difference} ± {values['standard_error']:.2f} "
        f"| {100 * values['first_better_on']:.0f} % |"
    )
table = "\n".join(lines)
results = {
    "settings": settings,
    "ranks": comm.size,
    "rmse": rmse,
    "standard_error": standard_error,
    "offline_rmse": offline_rmse,
    "mno_wins": mno_wins,
    "paired_differences": paired,
    "trajectory_mse": {name: mse.tolist() for name, mse in trajectory_mse.items()},
    "num_parameters": num_parameters,
    "training": demo["training"],
    "rotation_error": rotation_error,
    "lean_error": lean_error,
    "data": {
        "x_mean": float(x_points.mean()),
        "x_std": float(x_points.std()),
        "u_mean": float(u_points.mean()),
        "u_std": float(u_points.std()),
    },
    "demo_wall_clock": demo["wall_clock"],
    "versions": {"torch": torch.__version__, "numpy": np.__version__},
    "cpu_count": os.cpu_count(),
}
if comm.rank == 0:
    print("\n" + table)
    (output / "results.md").write_text(table + "\n")
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
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
    title = f"Rollouts of the coarse model, K = J = {K}"
    ax.set(xlabel="time $t$", ylabel="RMSE of $X$", title=title)
    ax.legend(fontsize=8)
    fig.savefig(output / "lorenz96_rollout.png", dpi=100)

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
    generator = np.random.default_rng(seed)  # the demo drew its MLP samples from it first
    generator.choice(x_points.size, settings["num_pointwise_samples"], replace=False)
    shown = generator.choice(x_points.size, min(2000, x_points.size), replace=False)
    ax_scatter.plot(x_points[shown], u_points[shown], ".", ms=1, color="0.6", label="data")
    x_line = torch.linspace(float(x_points.min()), float(x_points.max()), 200, dtype=x_test.dtype)
    with torch.no_grad():
        for name in ("linear", "cubic", "MLP (X_k)"):
            color, style = styles[name]
            values = closures[name](x_line[None, :])[0]  # pointwise: any K
            ax_scatter.plot(x_line, values, color=color, ls=style, label=name)
    ax_scatter.set(xlabel="$X_k$", ylabel="$U_k$", title="Subgrid tendency (training data)")
    ax_scatter.legend(fontsize=7)
    fig.savefig(output / "lorenz96_snapshot.png", dpi=80)
    print(f"outputs written to {output}")

# Checks: the lean evaluation is the model; in the full run, the MNO beats the linear
# closure by more than three standard errors (the demo checks the ordering).
assert lean_error < 1e-5, f"the lean MNO evaluation differs from the model ({lean_error:.1e})"
assert rotation_error < 1e-4, f"the MNO does not commute with rotations ({rotation_error:.1e})"
if not quick:
    margin = 3 * np.hypot(standard_error["MNO"], standard_error["linear"])
    assert rmse["MNO"] + margin < rmse["linear"], "the MNO does not beat the linear closure"
log("all checks passed")
