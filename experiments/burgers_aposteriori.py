"""Burgers: the learned closures trained *a posteriori*, through the solver (issue 13, item 5).

It reads what ``demos/burgers/demo_burgers.py`` writes to ``demos/output/burgers/`` (the
a-priori local MLP and MNO, ``reference.npz`` with the filtered fine states,
``summary.json``) and follows the demo's last run, full or ``--quick``::

    python demos/burgers/demo_burgers.py          # the data and the a-priori closures
    python experiments/burgers_aposteriori.py     # this study
    mpirun -n 2 python experiments/burgers_aposteriori.py

The a-priori closures (the local MLP and the MNO) were fitted to the subgrid flux one
state at a time. Here each is trained further through the coarse solver with
:func:`dolfinx_mno.training.fit_rollout`: windows of ``window`` filtered fine states (one
every ``sample_every``, i.e. ``target_interval`` coarse IMEX steps, so a window runs
``window × target_interval`` steps) start from filtered fine states of the training
horizon, and the loss is the relative squared error of the coarse
states against the filtered fine ones at the sampling times inside the window. Its
gradient with respect to the model's weights is the discrete adjoint of the coarse scheme
(:class:`dolfinx_mno.rollout.Rollout`, ``docs/adjoint.md``). Adam, early stopping on a
seeded fifth of the windows (held out), checkpoints (in a new folder
``checkpoints_{local,mno}/run-NNN`` per run; ``--resume`` continues the last run's).

Then each closure, a priori and a posteriori, runs over the test horizon as the demo runs
it (updated every ``closure_interval`` steps), and over ten horizons for stability. Writes
``experiments/output/burgers_aposteriori/summary.json`` and the trained model files;
asserts that the training lowered the held-out rollout loss and that every run stays
stable. ``--closures`` chooses the closures to train (both by default).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch
from dolfinx import fem

from dolfinx_mno.io import save_model
from dolfinx_mno.rollout import Rollout
from dolfinx_mno.timestepping import IMEXStepper
from dolfinx_mno.training import fit_rollout
from dolfinx_mno.training.aposteriori import RolloutObjective
from dolfinx_mno.training.trajectories import TrajectoryWindows, split_windows

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY / "demos"), str(REPOSITORY / "demos" / "burgers")]
from burgers import Burgers, coarse_run, relative_error, set_nodal
from burgers_outputs import (
    add_demo_output_argument,
    local_closure,
    operator_closure,
    read_demo_output,
)
from utilities import log, output_folder, positive_int

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
add_demo_output_argument(parser)
parser.add_argument(
    "--window", type=positive_int, default=None, help="sampling intervals per rollout"
)
parser.add_argument(
    "--stride", type=positive_int, default=None, help="sampling intervals between window starts"
)
parser.add_argument("--epochs", type=positive_int, default=None)
parser.add_argument("--learning-rate", type=float, default=1e-3)
parser.add_argument(
    "--closures",
    nargs="+",
    choices=("local MLP", "MNO (FNO)"),
    default=("local MLP", "MNO (FNO)"),
    help="the closures to train a posteriori",
)
parser.add_argument(
    "--resume",
    action="store_true",
    help="continue the last run's training from its checkpoints (default: a fresh run, "
    "checkpointed in a new folder)",
)
args = parser.parse_args()

comm = MPI.COMM_WORLD
torch.set_num_threads(1)
output = output_folder("burgers_aposteriori", root=REPOSITORY / "experiments" / "output")
demo, _, filtered = read_demo_output(args.demo_output)
config, quick = demo["config"], demo["quick"]
window = args.window or (2 if quick else 16)
epochs = args.epochs or (2 if quick else 8)
stride = args.stride or (1 if quick else 4)
nc, dt = config["coarse_cells"], config["coarse_dt"]
t_train = config["spin_up"]
t_test = t_train + config["horizon"]
t_end = t_test + config["horizon"]
long_end = t_test + 10 * config["horizon"]
every = round(config["sample_every"] / dt)  # coarse steps per sampling interval
log(f"the demo's {'quick' if quick else 'full'} run; windows of {window} x {every} steps")


# ## The closures as the demo builds them, from its model files (or from ours)
def demo_local_closure(un, path=args.demo_output / "local_closure.pt"):
    return local_closure(un, path)


def demo_operator_closure(un, path=args.demo_output / "mno_closure.pt"):
    return operator_closure(un, path, demo["grid"])


# ## Training through the solver (the closure updated every step while training)
def checkpoint_folder(name):
    """``checkpoints_{name}/run-NNN``: a new folder per run, the last one with ``--resume``.

    ``fit_rollout`` starts a fresh run only in a folder without checkpoints, so that a
    resume never mixes two runs' checkpoints; the earlier runs' folders are kept.
    """
    parent = output / f"checkpoints_{name}"
    last = None
    if comm.rank == 0:
        runs = [int(p.name[4:]) for p in parent.glob("run-*") if p.name[4:].isdigit()]
        last = max(runs, default=0)
    last = comm.bcast(last)
    number = last if args.resume and last > 0 else last + 1
    return parent / f"run-{number:03d}"


def train_a_posteriori(name, closure_factory):
    """Train the closure of a coarse model a posteriori; returns its file and losses."""
    coarse = Burgers(nc, dt, closure_factory, name=f"train_{name}")
    stepper = IMEXStepper(coarse.problem, coarse.u, coarse.u_previous, dt, t_train, coarse.time)
    rollout = Rollout(stepper)

    def owned(values):
        """The owned dofs of the coarse function with these nodal values."""
        function = set_nodal(fem.Function(coarse.V), values)
        return function.x.array[: rollout.num_owned].copy()

    # The filtered fine states of the training horizon, one every `every` coarse steps; a
    # seeded fifth of the windows is held out for validation (early stopping).
    times = sorted(t for t in filtered if t_train - 1e-9 < t < t_test + 1e-9)
    trajectory = [owned(filtered[t]) for t in times]
    windows = dict(horizon=window, target_interval=every, stride=stride)
    all_windows = TrajectoryWindows(
        [trajectory], horizon=window, stride=stride, num_owned=rollout.num_owned, what="training"
    ).windows
    held_out = split_windows(all_windows, 0.2, seed=0)[1]  # fit_rollout's split (seed 0)
    absolute = RolloutObjective(rollout, coarse.closure, horizon=window, scale=1.0,
                                target_interval=every)  # fmt: skip

    def held_out_loss():
        """Σ over the held-out windows of Σ_j ‖u_j − t_j‖² (each at its own start time)."""
        return absolute.rollout_loss(held_out) * len(held_out)

    prior_loss = held_out_loss()
    tic = time.perf_counter()
    result = fit_rollout(
        rollout,
        [trajectory],
        validation_fraction=0.2,
        **windows,
        epochs=epochs,
        batch_size=4,
        learning_rate=args.learning_rate,
        patience=4,
        checkpoint_dir=checkpoint_folder(name),
        resume=args.resume,
        progress=comm.rank == 0,
    )
    seconds = time.perf_counter() - tic
    history = result.history
    posterior_loss = held_out_loss()
    log(
        f"{name}: held-out rollout loss a priori {prior_loss:.4e}, a posteriori "
        f"{posterior_loss:.4e} ({history.epochs} epochs, {seconds:.0f} s)"
    )
    path = output / f"{name}_aposteriori.pt"
    save_model(path, result.model, spec=coarse.closure.spec, comm=comm)
    return path, {
        "held_out_rollout_loss": {"a_priori": prior_loss, "a_posteriori": posterior_loss},
        "training_seconds": seconds,
        "history": {"train_loss": history.train_loss, "val_loss": history.val_loss},
    }


factories = {"local MLP": demo_local_closure, "MNO (FNO)": demo_operator_closure}
names = {"local MLP": "local", "MNO (FNO)": "mno"}
trained_paths, training = {}, {}
for label in args.closures:
    trained_paths[label], training[label] = train_a_posteriori(names[label], factories[label])


# ## The closures over the test horizon and over ten horizons, as the demo runs them
interval = demo["closure_interval"]
test_start = set_nodal(fem.Function(Burgers(nc, dt, name="start").V), filtered[round(t_test, 9)])
test_reference = {t: v for t, v in filtered.items() if t > t_test + 1e-9}
reference_energy = max(float(np.mean(v**2)) for v in filtered.values())
mesh_c = Burgers(nc, dt, name="none").mesh
models = {"no closure": Burgers(nc, dt, name="none", domain=mesh_c)}
for label, path in trained_paths.items():
    factory, name = factories[label], names[label]
    models[f"{label}, a priori"] = Burgers(nc, dt, factory, f"{name}_prior", mesh_c, interval)

    def trained_factory(un, factory=factory, path=path):
        return factory(un, path)

    models[f"{label}, a posteriori"] = Burgers(
        nc, dt, trained_factory, f"{name}_posterior", mesh_c, interval
    )
results = {}
for label, coarse in models.items():
    run = coarse_run(coarse, test_start, t_test, t_end, config["sample_every"])
    long_run = coarse_run(coarse, test_start, t_test, long_end, config["sample_every"])
    energies = long_run.energies
    results[label] = {
        "relative_l2_error": relative_error(run.states, test_reference),
        "wall_time_s": run.seconds,
        "stable_10_horizons": bool(
            np.all(np.isfinite(energies[:, 1])) and energies[-1, 0] >= long_end - 1e-6
        ),
        "max_energy_ratio_10_horizons": float(np.max(energies[:, 1]) / reference_energy),
    }
    log(f"{label:>34}: {results[label]}")

summary = {
    "demo": demo,
    "window_steps": window * every,
    "epochs": epochs,
    "learning_rate": args.learning_rate,
    "stride": stride,
    "training": training,
    "results": results,
    "ranks": comm.size,
}
if comm.rank == 0:
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{'run':>34} | rel. L2 error, test | wall time | max energy / fine's, 10 horizons")
    for label, row in results.items():
        print(
            f"{label:>34} | {row['relative_l2_error']:19.3e} | {row['wall_time_s']:7.2f} s "
            f"| {row['max_energy_ratio_10_horizons']:.2f}"
        )

# ## Checks: training lowered the rollout loss it minimises; every run stays stable.
# (Whether the test error also falls is the measurement, reported in docs/results.md.)
for label, row in training.items():
    losses = row["held_out_rollout_loss"]
    assert losses["a_posteriori"] < losses["a_priori"], (label, losses)
for label, row in results.items():
    assert row["stable_10_horizons"], f"{label} blew up"
    assert row["max_energy_ratio_10_horizons"] < 3.0, row
log(f"all checks passed; outputs in {output}")
