"""2D turbulence: what a learned closure of τ could reach with perfect data (issue 14).

``turbulence_2d_time_scheme.py`` measured, at 16² with the third-order time scheme
(SSP-RK3), that the exact subgrid flux ``τ`` is worth a resolution factor of 3.8, and that
the demo's local MLP of ``τ``, trained on eighteen trajectories, is worth 1.08. That gap has
two possible causes, and they call for different remedies:

* **expressivity**: what the closure reads (six cell-wise gradients) and its size cannot
  represent enough of ``τ``: more data would not help, other inputs or a non-local
  operator would;
* **generalisation**: the closure could represent ``τ`` but its training trajectories do
  not teach it the test trajectory's: more (or more varied) data would help.

This experiment separates them by *cheating on purpose*: every closure is fitted **in
sample**, on the test trajectory itself (the filtered SSP-RK3 DNS of test seed 5, at every
coarse step of its 6 time units), and then run from its start. No closure of a given form
can do better with any training set than it does here, up to the optimiser. It measures,
from the same spun-up state as the time-scheme experiment:

(a) the SSP-RK3 ladder without closure (16², 32², 64²) and the exact-τ oracle at 16²; the
    oracle degraded to an unbiased prediction of τ that explains only part of its
    variance (``--degraded``): how good a closure of τ must be to gain;
(b) fitted in sample, a priori, and run: the demo's local MLP of ``(∇ω̄, ∇ū)`` (6 → 64 →
    64 → 2), a wider and deeper one (6 → 128 → 128 → 128 → 2), and the MNO of the demo
    (a neuraloperator FNO of ``(ω̄, ū)`` on the closure grid, in a ``NonlocalClosure``),
    or with ``--fno-modes`` several MNOs that keep more Fourier modes: the demo's 8 modes
    per axis of the 64² grid (which spans twice the box) keep wavelengths of 8 coarse
    cells and longer, while ``τ`` varies from cell to cell (``--no-local``: the MNOs only);
(c) each closure's fraction of ``τ``'s variance explained over the test trajectory;
(d) with ``--compare PATH``, a closure of the same inputs fitted elsewhere (out of sample,
    e.g. ``turbulence_2d_time_scheme.py``'s ``local_closure_18seeds.pt``), the same way;
    with ``--train-seeds N``, each MNO fitted out of sample too, on the SSP-RK3 DNS of
    ``N`` other seeds (the demo's training horizon each), and run the same way; with
    ``--mirror`` also on the mirror images ``y → L − y`` of those samples (the box's
    symmetry: twice the data without another DNS); with ``--trajectory-split``, their
    fits validated (and stopped early) on whole held-out training trajectories rather
    than on random samples, which neighbour training samples in time; with
    ``--fno-factorization`` (neuraloperator's low-rank spectral weights) or
    ``--weight-decay`` (AdamW), every MNO regularised;
(e) with ``--a-posteriori EPOCHS``, the in-sample local MLP and MNO trained further
    through the SSP-RK3 solver (``fit_rollout``) on windows of the test trajectory, and
    the out-of-sample MNOs on those of their training trajectories (with
    ``--trajectory-split``, validated on the trajectories their fit held out), and the
    latter saved beside their fits (``..._aposteriori<EPOCHS>.pt``); with
    ``--mirror-rollouts`` (on the ``--checkerboard`` meshes, which the mirror maps onto
    themselves) on the mirror images of those trajectories too
    (:class:`turbulence_2d_data.StateMirror`); with ``--from PATH``, the out-of-sample MNO
    is not fitted but read from ``PATH``, e.g. such a file, to run it again or to train it
    further. ``--test-seed SEED`` runs everything on another seed's test trajectory (never a
    training seed; the training seeds stay those that leave out 5), e.g. a saved MNO on
    seeds it has never seen, for a resolution factor over several test trajectories.

With ``--hold`` the closures are updated once per step and held over its three stages
(``hold_closures=True`` of the stepper), as the oracle holds ``τ``: a third of their cost.

    mpirun -n 2 python experiments/turbulence_2d_in_sample.py --a-posteriori 30    # 30 min
    mpirun -n 2 python experiments/turbulence_2d_in_sample.py --a-posteriori 30 --hold
    mpirun -n 2 python experiments/turbulence_2d_in_sample.py --no-local --degraded \
        --fno-modes 8 16 32 --fno-width 32 --hold                                  # MNOs only
    mpirun -n 2 python experiments/turbulence_2d_in_sample.py --no-local --degraded \
        --fno-modes 32 --fno-width 32 --hold --train-seeds 18        # and out of sample too
    mpirun -n 2 python experiments/turbulence_2d_in_sample.py --no-in-sample --degraded \
        --fno-modes 32 --fno-width 32 --hold --train-seeds 9 --mirror    # with the mirror
    mpirun -n 2 python experiments/turbulence_2d_in_sample.py --no-in-sample --degraded \
        --fno-modes 32 --fno-width 32 --hold --train-seeds 18 --trajectory-split \
        --fno-factorization tucker --a-posteriori 10        # regularised, then the solver
    mpirun -n 2 python experiments/turbulence_2d_in_sample.py --no-in-sample --degraded \
        --fno-modes 64 --fno-width 32 --hold --train-seeds 18 --trajectory-split \
        --from experiments/output/turbulence_2d_in_sample/mno64w32_18seeds_split.pt \
        --a-posteriori 4                               # further through the solver, no fit
    mpirun -n 2 python experiments/turbulence_2d_in_sample.py --no-in-sample --degraded \
        --fno-modes 32 --fno-width 32 --hold --train-seeds 18 --trajectory-split \
        --checkerboard --mirror --mirror-rollouts --a-posteriori 7    # mirrored rollouts
    mpirun -n 2 python experiments/turbulence_2d_in_sample.py --no-in-sample --degraded \
        --fno-modes 64 --fno-width 32 --hold --train-seeds 18 --trajectory-split \
        --from experiments/output/turbulence_2d_in_sample/mno64w32_18seeds_split_aposteriori6.pt \
        --test-seed 101                                # a saved MNO on another test seed
    python experiments/turbulence_2d_in_sample.py --quick          # smoke test, ~20 s

Writes ``experiments/output/turbulence_2d_in_sample/summary.json`` (``summary_quick.json``
with ``--quick``, ``summary_aposteriori30_hold.json`` with ``--a-posteriori 30 --hold``,
``summary_..._mno8-16-32w32.json`` with other MNOs than the demo's, ``..._18seeds...`` with
``--train-seeds 18``, ``..._mirrored...`` with ``--mirror``, ``..._mirroredrollouts...``
with ``--mirror-rollouts``, ``..._split...`` with ``--trajectory-split``,
``..._tucker0.1_wd0.1`` with those regularisers, ``..._lr0.0001`` with another
a-posteriori learning rate, ``..._from_<stem>`` with ``--from``, ``..._seed<N>`` with
``--test-seed N``) and prints the tables.
Each training seed's DNS data are cached there, in ``dns_seed<N>_rank<r>of<size>.npz``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch
import ufl
from dolfinx import fem

import dolfinx_mno as mno
from dolfinx_mno.grid_gather import GriddedSampler
from dolfinx_mno.io import architecture_config, read_model_file, save_model
from dolfinx_mno.models import MLP
from dolfinx_mno.training import fit

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY / "demos"), str(REPOSITORY / "demos" / "turbulence_2d")]
from comparison import train_a_posteriori
from flow import VorticityFlow
from turbulence_2d_data import (
    MIRROR_SIGNS,
    NU,
    CoarseRuns,
    ExactFlux,
    StateMirror,
    Turbulence,
    add_resolution_factors,
    as_run,
    closure_grid,
    fit_grid_operator,
    fno,
    grid_closure,
    grid_spec,
    held_out_groups,
    mirror,
    read_cache,
    settings,
    steps,
    write_cache,
)
from utilities import log, output_folder, positive_int

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="small problem, a smoke test")
parser.add_argument(
    "--mlp-epochs", type=positive_int, default=None, help="a-priori epochs of the MLPs (200)"
)
parser.add_argument(
    "--fno-epochs", type=positive_int, default=None, help="a-priori epochs of the MNO (60)"
)
parser.add_argument(
    "--fno-modes",
    type=positive_int,
    nargs="+",
    default=[8],
    metavar="M",
    help="Fourier modes per axis of each MNO fitted (default 8, the demo's; several values "
    "fit and run one MNO each)",
)
parser.add_argument(
    "--fno-width", type=positive_int, default=None, help="channels of the MNOs (24; --quick 16)"
)
parser.add_argument(
    "--fno-factorization",
    choices=("tucker", "cp", "tt"),
    default=None,
    help="store each spectral convolution's weights as this low-rank decomposition "
    "(neuraloperator's TFNO; default: dense)",
)
parser.add_argument(
    "--fno-rank",
    type=float,
    default=0.1,
    metavar="R",
    help="with --fno-factorization: the fraction of the dense weights kept (default 0.1)",
)
parser.add_argument(
    "--weight-decay",
    type=float,
    default=0.0,
    metavar="W",
    help="fit the MNOs with AdamW and this decoupled weight decay (default 0: Adam)",
)
parser.add_argument(
    "--no-local", action="store_true", help="fit and run no local MLP in sample (the MNOs only)"
)
parser.add_argument(
    "--train-seeds",
    type=positive_int,
    default=None,
    metavar="N",
    help="also fit each MNO out of sample, on the SSP-RK3 DNS of seeds 1, 2, ... without the "
    "test seed (N of them), and run it",
)
parser.add_argument(
    "--mirror",
    action="store_true",
    help="fit the out-of-sample MNOs to the training samples and their mirror images "
    "y → L − y (the box's symmetry), twice the data for free",
)
parser.add_argument(
    "--mirror-rollouts",
    action="store_true",
    help="with --mirror, --checkerboard and --a-posteriori: train the out-of-sample MNOs "
    "through the solver on the mirror images of their trajectories too (and validate on "
    "those of the held-out ones): twice the windows, twice the time per epoch",
)
parser.add_argument(
    "--checkerboard",
    action="store_true",
    help="every mesh with the diagonals of the coarse mesh's alternating checkerboard "
    "(flow.box's checkerboard): symmetric under the mirror, so that --mirror holds at the "
    "cell scale too (another mesh: other results, and DNS caches of their own)",
)
parser.add_argument(
    "--trajectory-split",
    action="store_true",
    help="validate the out-of-sample fits on whole held-out training trajectories (with "
    "their mirror images), not on random samples, which neighbour training samples in "
    "time: the validation loss then measures, and early stopping chooses, generalisation "
    "across trajectories; with --a-posteriori, the training through the solver holds out "
    "the same trajectories",
)
parser.add_argument(
    "--from",
    dest="start_from",
    type=Path,
    default=None,
    metavar="PATH",
    help="with --train-seeds: run (and with --a-posteriori train further) the out-of-sample "
    "MNO saved at PATH, e.g. one this script trained through the solver "
    "(..._aposteriori<N>.pt), instead of fitting it (one --fno-modes and --fno-width, the "
    "file's)",
)
parser.add_argument(
    "--test-seed",
    type=positive_int,
    default=None,
    metavar="SEED",
    help="the seed of the test trajectory (default: the one the training seeds leave out, "
    "5; --quick 3); never one of the training seeds",
)
parser.add_argument(
    "--no-in-sample",
    action="store_true",
    help="fit no closure in sample: only the out-of-sample MNOs of --train-seeds",
)
parser.add_argument(
    "--compare",
    type=Path,
    default=None,
    metavar="PATH",
    help="a local closure of (∇ω̄, ∇ū) fitted out of sample, run the same way",
)
parser.add_argument(
    "--degraded",
    type=float,
    nargs="*",
    default=[0.9, 0.75, 0.5, 0.33],
    metavar="F",
    help="also run the oracle degraded to explain the fraction F of τ's variance "
    "(default 0.9 0.75 0.5 0.33)",
)
parser.add_argument(
    "--a-posteriori",
    type=positive_int,
    default=None,
    metavar="EPOCHS",
    help="also train the in-sample MLP and MNO through the SSP-RK3 solver",
)
parser.add_argument(
    "--hold",
    action="store_true",
    help="update the closures once per SSP-RK3 step and hold them over its stages, as the "
    "oracle does (a third of their cost), in the runs and the a-posteriori training",
)
parser.add_argument(
    "--window", type=positive_int, default=4, help="a-posteriori window, in samples (default 4)"
)
parser.add_argument(
    "--learning-rate", type=float, default=3e-4, help="a-posteriori learning rate (3e-4)"
)
args = parser.parse_args()
comm = MPI.COMM_WORLD
torch.set_num_threads(1)
if not all(0.0 < fraction < 1.0 for fraction in args.degraded):
    parser.error(f"--degraded: fractions must lie in (0, 1), got {args.degraded}")
if args.compare is not None and not args.compare.is_file():
    parser.error(f"--compare: no file {args.compare}")
if args.mirror and args.train_seeds is None:
    parser.error("--mirror needs --train-seeds: it mirrors the out-of-sample training data")
if args.mirror_rollouts and not (args.mirror and args.checkerboard and args.a_posteriori):
    parser.error(
        "--mirror-rollouts needs --mirror, --checkerboard (the mesh the mirror maps onto "
        "itself) and --a-posteriori"
    )
if args.trajectory_split and (args.train_seeds or 0) < 3:  # a fifth of them validate
    parser.error("--trajectory-split needs --train-seeds 3 or more: trajectories to validate on")
if args.start_from is not None and args.train_seeds is None:
    parser.error("--from needs --train-seeds: it replaces the fit on those seeds' DNS")
if args.start_from is not None and len(args.fno_modes) != 1:
    parser.error(f"--from: one --fno-modes, the file's, got {args.fno_modes}")
if args.start_from is not None and not args.start_from.is_file():
    parser.error(f"--from: no file {args.start_from}")
if args.no_in_sample and args.train_seeds is None:
    parser.error("--no-in-sample needs --train-seeds: there would be no closure to run")
if not 0.0 < args.fno_rank <= 1.0:
    parser.error(f"--fno-rank: a fraction in (0, 1], got {args.fno_rank}")
if args.fno_rank != 0.1 and args.fno_factorization is None:
    parser.error("--fno-rank needs --fno-factorization: a dense FNO has no rank")
if not args.weight_decay >= 0.0:
    parser.error(f"--weight-decay: at least 0, got {args.weight_decay}")
if len(set(args.fno_modes)) != len(args.fno_modes):
    parser.error(f"--fno-modes: each value once, got {args.fno_modes}")
output = output_folder("turbulence_2d_in_sample", root=REPOSITORY / "experiments" / "output")
config = settings(args.quick)
# The training seeds leave out the settings' test seed whatever --test-seed says, so that the
# MNOs fitted before (and their files) stay the ones a run on another test seed reads.
left_out = config["test_seed"]
seeds = [seed for seed in range(1, (args.train_seeds or 0) + 2) if seed != left_out]
seeds = seeds[: args.train_seeds or 0]
if args.test_seed is not None and args.test_seed in seeds:
    parser.error(f"--test-seed {args.test_seed} is one of the training seeds {seeds}")
config["test_seed"] = args.test_seed or left_out
seed_tag = "" if config["test_seed"] == left_out else f"_seed{config['test_seed']}"
config |= {"mlp_epochs": 15, "fno_epochs": 5} if args.quick else {}
config |= {"fno_modes": args.fno_modes, "fno_width": args.fno_width or (16 if args.quick else 24)}
if args.fno_factorization is not None:
    config |= {"fno_factorization": args.fno_factorization, "fno_rank": args.fno_rank}
if args.weight_decay > 0.0:
    config["weight_decay"] = args.weight_decay
if args.checkerboard:
    config["checkerboard"] = config["coarse"]
mesh_tag = "_checkerboard" if args.checkerboard else ""  # in the names of its files
config["mlp_epochs"] = args.mlp_epochs or config.get("mlp_epochs", 200)
config["fno_epochs"] = args.fno_epochs or config.get("fno_epochs", 60)
if max(args.fno_modes) > (points := closure_grid(config["coarse"]).shape[0]):
    parser.error(f"--fno-modes: at most {points}, the points per axis of the closure grid")
if args.start_from is not None:  # the file's FNO must be the one its label will name
    expected = architecture_config(
        fno(args.fno_modes[0], config["fno_width"], factorization=args.fno_factorization,
            rank=args.fno_rank if args.fno_factorization else 1.0)
    )  # fmt: skip
    try:
        stored = read_model_file(args.start_from).architecture["kwargs"].get("model")
    except (OSError, ValueError) as err:
        parser.error(f"--from: {err}")
    if stored != expected:
        parser.error(
            f"--from: {args.start_from} holds another operator than the FNO of --fno-modes "
            f"{args.fno_modes[0]}, --fno-width {config['fno_width']} (its architecture: "
            f"{stored})"
        )
    config["from"] = str(args.start_from)
log(f"config: {config}")

# ## The SSP-RK3 DNS of the test seed, filtered, with τ and the closures' data
data = Turbulence(config, comm)
plain, omega_bar, nc = data.plain, data.omega_bar, config["coarse"]
dns = VorticityFlow(
    config["dns"], data.dns.dt, NU, domain=data.dns.mesh, name="dns3", scheme="ssprk3"
)
exact = ExactFlux(data)
grid = closure_grid(nc)
grid_inputs = GriddedSampler([plain.omega_n, plain.velocity_n], grid)
grid_targets = GriddedSampler([exact.ufl], grid, mesh=data.mesh)
num_owned = plain.W.dofmap.index_map.size_local * plain.W.dofmap.index_map_bs
fine_per_coarse = steps(plain.dt, dns.dt)
samples_every = steps(config["sample_every"], plain.dt)  # coarse steps per sample

tic = time.perf_counter()
start_fine = fem.Function(dns.V)


def ssprk3_dns(seed: int, horizon: float, record, start: fem.Function) -> float:
    """The SSP-RK3 DNS of ``seed`` over ``horizon`` after the demo's spin-up (IMEX Euler),
    with ``record(t)`` at every DNS step; ``start`` keeps the spun-up state. Returns the
    wall time of the run after the spin-up."""

    def keep_start(t: float) -> None:
        start.x.array[:] = data.dns.omega.x.array

    data.trajectory(seed, 0.0, keep_start)  # the spin-up only
    dns.set_vorticity(start)
    return dns.run(0.0, horizon, record)


recorded: dict[str, list] = {k: [] for k in ("samples", "tau", "omega", "w", "grid_x", "grid_y")}
flux = exact.fine_flux(dns)


def record(t: float) -> None:
    """At every coarse step: the sample, τ, ω̄, the coarse state and the gridded data."""
    if round(t / dns.dt) % fine_per_coarse == 0:
        recorded["samples"].append(exact(dns.omega, flux))
        recorded["tau"].append(exact.tau.x.array.copy())
        recorded["omega"].append(omega_bar.x.array.copy())
        recorded["w"].append(plain.w.x.array[:num_owned].copy())
        recorded["grid_x"].append(grid_inputs())
        recorded["grid_y"].append(grid_targets())


dns_seconds = ssprk3_dns(config["test_seed"], config["test_horizon"], record, start_fine)
log(f"the SSP-RK3 DNS of the test seed and its data: {time.perf_counter() - tic:.1f} s")
start = fem.Function(data.V, name="start")
start.x.array[:] = recorded["omega"][0]
reference = recorded["omega"][::samples_every]
runs_against_dns = CoarseRuns(data, reference)


def coarse_model(name: str, closure=None) -> VorticityFlow:
    return data.coarse_model(name, closure=closure, scheme="ssprk3", hold_closures=args.hold)


# ## (a) The ladder and the oracle
runs: dict[str, dict] = {f"no closure, {nc}²": runs_against_dns.run(coarse_model("plain3"), start)}
runs |= runs_against_dns.ladder(config["ladder"], start_fine, "ssprk3")
oracle_tau = fem.Function(exact.space, name="oracle_tau")


def oracle_step(step: int) -> None:
    oracle_tau.x.array[:] = recorded["tau"][step]


runs["oracle τ"] = runs_against_dns.run(
    coarse_model("oracle3", lambda o, u: (oracle_tau, ufl.dx)), start, before_step=oracle_step
)

# How good must a closure of τ be? The oracle degraded to an unbiased prediction that
# explains the fraction f of τ's variance: f τ + (1 − f) mean(τ) + √(f(1 − f)) σ ξ, with ξ
# white noise, fresh at every step, the same on any number of ranks (drawn for every cell,
# indexed by global cell number), σ τ's standard deviation at that step, per component.
cells = exact.space.dofmap.index_map
global_cells = cells.local_to_global(np.arange(cells.size_local + cells.num_ghosts, dtype=np.int32))


def degraded_step(fraction: float):
    def before_step(step: int) -> None:
        values = recorded["tau"][step].reshape(-1, 2)
        owned = values[: cells.size_local]
        sums = comm.allreduce(np.array([*owned.sum(axis=0), *(owned**2).sum(axis=0)]))
        mean = sums[:2] / cells.size_global
        sigma = np.sqrt(np.maximum(sums[2:] / cells.size_global - mean**2, 0.0))
        noise = np.random.default_rng([17, step]).standard_normal((cells.size_global, 2))
        oracle_tau.x.array[:] = (
            fraction * values + (1 - fraction) * mean
            + np.sqrt(fraction * (1 - fraction)) * sigma * noise[global_cells]
        ).ravel()  # fmt: skip

    return before_step


for fraction in args.degraded:
    runs[f"oracle τ, {fraction:g} of its variance"] = runs_against_dns.run(
        coarse_model(f"degraded{fraction:g}", lambda o, u: (oracle_tau, ufl.dx)),
        start,
        before_step=degraded_step(fraction),
    )
log(f"ladder and oracles: {[(k, v['decorrelation_time']) for k, v in runs.items()]}")

# ## (b) The closures, fitted in sample: every coarse step of the test trajectory
tic = time.perf_counter()
samples = recorded["samples"]
inputs = np.concatenate([s.inputs for s in samples])
targets = np.concatenate([s.targets for s in samples]).reshape(-1, 2)
groups = np.repeat(np.arange(len(samples)), samples[0].inputs.shape[0])
paths: dict[str, Path] = {}
quick = "_quick" if args.quick else ""
local_mlps = [("local MLP", [64, 64]), ("wide local MLP", [128, 128, 128])]
local_mlps = [] if args.no_local or args.no_in_sample else local_mlps
for label, hidden in local_mlps:
    result = fit(
        MLP(6, 2, hidden_features=hidden, seed=0), inputs, targets, groups=groups, comm=comm,
        epochs=config["mlp_epochs"], batch_size=1024, learning_rate=3e-3, patience=20,
        normalize_targets=True, seed=0, progress=False,
    )  # fmt: skip
    paths[label] = output / f"{label.replace(' ', '_')}{seed_tag}{quick}.pt"
    save_model(paths[label], result.model, spec=exact.sampler.spec, comm=comm)


def fit_mno(modes: int, fields_x: list, fields_y: list, path: Path, groups=None) -> dict:
    """Fits an FNO keeping ``modes`` Fourier modes per axis to the gridded ``(ω̄, ū) → τ``
    of ``fields_x`` and ``fields_y`` (one entry per sample on every rank, rank 0's the
    fields; ``groups``: :func:`fit_grid_operator`'s), saves it at ``path`` and returns its
    fit's losses."""
    operator = fno(modes, config["fno_width"], factorization=args.fno_factorization,
                   rank=args.fno_rank if args.fno_factorization else 1.0)  # fmt: skip
    operator_fit = fit_grid_operator(
        operator, fields_x, fields_y, epochs=config["fno_epochs"], spec=grid_spec(grid),
        path=path, comm=comm, groups=groups, weight_decay=args.weight_decay,
        progress=not args.quick,
    )  # fmt: skip
    history = operator_fit.history
    return {
        "fields": len(fields_x),
        "weights": sum(parameter.numel() for parameter in operator.parameters()),
        "epochs": history.epochs,
        "best_epoch": history.best_epoch,
        "val_loss": history.best_val_loss,
        "train_loss": history.train_loss[-1],
    }


fno_fits: dict[str, dict] = {}
# How the MNOs are regularised, in their labels and in their files' names.
regularised = ["", ""]
if args.fno_factorization is not None:
    regularised[0] += f", {args.fno_factorization} rank {args.fno_rank:g}"
    regularised[1] += f"_{args.fno_factorization}{args.fno_rank:g}"
if args.weight_decay > 0.0:
    regularised[0] += f", weight decay {args.weight_decay:g}"
    regularised[1] += f"_wd{args.weight_decay:g}"
mno_labels = {
    modes: ("MNO" if args.fno_modes == [8] else f"MNO, {modes} modes") + regularised[0]
    for modes in args.fno_modes
}
mno_files = {
    modes: f"mno{modes}w{config['fno_width']}{regularised[1]}{mesh_tag}" for modes in args.fno_modes
}
for modes, label in mno_labels.items() if not args.no_in_sample else ():
    paths[label] = output / f"{mno_files[modes]}{seed_tag}{quick}.pt"
    fno_fits[label] = fit_mno(modes, recorded["grid_x"], recorded["grid_y"], paths[label])
    log(f"{label}: {fno_fits[label]}")
fit_seconds = time.perf_counter() - tic
log(f"in-sample fits: {fit_seconds:.1f} s")

# ## (d) The same MNOs fitted out of sample, on other seeds' SSP-RK3 DNS
out_of_sample: dict[str, Path] = {}
out_of_sample_seconds = None
if args.train_seeds is not None:
    tic = time.perf_counter()
    training_grids: dict[str, list] = {"x": [], "y": []}
    training_states: list[list[np.ndarray]] = []  # per seed, for training through the solver

    def record_training(t: float) -> None:
        """The gridded inputs, τ and the coarse state at every sample of a trajectory."""
        if round(t / dns.dt) % (fine_per_coarse * samples_every) == 0:
            exact(dns.omega, flux)
            training_grids["x"].append(grid_inputs())
            training_grids["y"].append(grid_targets())
            training_states[-1].append(plain.w.x.array[:num_owned].copy())

    seed_start = fem.Function(dns.V)
    # A saved MNO run as it is needs none of the training data (only a fit or the training
    # through the solver does).
    needs_data = args.start_from is None or args.a_posteriori is not None
    # The settings the training DNS depend on: not the test seed (--test-seed), so the
    # cache written on any test seed serves all.
    dns_settings = {k: config[k] for k in settings(args.quick)} | {"test_seed": left_out}
    for seed in seeds if needs_data else ():
        # Each seed's data are cached: another run with other MNOs or with --mirror reads
        # them instead of repeating the DNS (a minute a seed).
        cache = output / f"dns_seed{seed}{quick}{mesh_tag}_rank{comm.rank}of{comm.size}.npz"
        key = json.dumps([dns_settings, seed, grid.shape]
                         + ([config["checkerboard"]] if args.checkerboard else []))  # fmt: skip
        if (cached := read_cache(cache, key, comm)) is not None:
            training_states.append(list(cached["states"]))
            for k, fields in training_grids.items():  # rank 0's fields, elsewhere Nones
                fields += list(cached[k]) if comm.rank == 0 else [None] * len(cached["states"])
            continue
        training_states.append([])
        first = len(training_grids["x"])
        ssprk3_dns(seed, config["horizon"], record_training, seed_start)
        grids = {
            k: np.asarray(v[first:] if comm.rank == 0 else []) for k, v in training_grids.items()
        }
        write_cache(cache, key, {"states": np.asarray(training_states[-1]), **grids})
    if needs_data:
        log(f"the SSP-RK3 DNS of seeds {seeds}: {time.perf_counter() - tic:.1f} s")
    # The trajectory of each sample (a mirror image's is that of its original).
    trajectory_of = np.repeat(
        np.arange(len(training_states)), [len(states) for states in training_states]
    )
    if args.mirror and needs_data:  # rank 0 holds the fields, the other ranks as many Nones
        for k, signs in zip("xy", MIRROR_SIGNS, strict=True):
            fields = training_grids[k]
            fields += mirror(fields, signs) if comm.rank == 0 else [None] * len(fields)
        trajectory_of = np.tile(trajectory_of, 2)
    for modes, label in mno_labels.items():
        trajectories = f"{len(seeds)} trajector{'y' if len(seeds) == 1 else 'ies'}"
        variant, suffix = (" and mirrored", "_mirrored") if args.mirror else ("", "")
        if args.trajectory_split:
            variant, suffix = f"{variant}, validated on whole ones", f"{suffix}_split"
        name = f"{label}, out of sample ({trajectories}{variant})"
        if args.start_from is not None:  # already fitted (and perhaps trained further)
            name = f"{name}, from {args.start_from.name}"
            out_of_sample[name] = args.start_from
            continue
        out_of_sample[name] = output / f"{mno_files[modes]}_{len(seeds)}seeds{suffix}{quick}.pt"
        fno_fits[name] = fit_mno(
            modes, training_grids["x"], training_grids["y"], out_of_sample[name],
            groups=trajectory_of if args.trajectory_split else None,
        )  # fmt: skip
        log(f"{name}: {fno_fits[name]}")
    out_of_sample_seconds = time.perf_counter() - tic


def local_closure(path: Path):
    def factory(omega_n, velocity_n):
        operands = {"grad_omega": ufl.grad(omega_n), "grad_u": ufl.grad(velocity_n)}
        closure = mno.Closure(str(path), mno.Operands(operands))
        return closure, closure.dx

    return factory


factories = {
    label: grid_closure(path, grid) if label.startswith("MNO") else local_closure(path)
    for label, path in paths.items()
}
flows = {
    f"{label}, in sample": coarse_model(f"closure{i}", factory)
    for i, (label, factory) in enumerate(factories.items())
}
if args.compare is not None:
    flows["local MLP, out of sample"] = coarse_model("compared", local_closure(args.compare))
for i, (name, path) in enumerate(out_of_sample.items()):
    flows[name] = coarse_model(f"out_of_sample{i}", grid_closure(path, grid))

# ## (c) How much of τ each closure explains over the test trajectory
taus = recorded["tau"][::samples_every]
predictions = {label: flow.closure for label, flow in flows.items()}
skill = {
    label: row["fve"]
    for label, row in exact.skill(predictions, list(flows.values()), taus, reference).items()
}
log(f"variance explained: {skill}")

# ## (b, d) The runs, and (e) the same closures trained through the solver
for label, flow in flows.items():
    runs[label] = runs_against_dns.run(flow, start)
    log(f"{label}: t(ρ<0.95) = {runs[label]['decorrelation_time']}")
training: dict[str, dict] = {}
if args.a_posteriori is not None:
    # in sample: on the test trajectory; out of sample: on the training trajectories
    trained = [(label, f"{label}, in sample", [recorded["w"][::samples_every]])
               for label in factories if label in ("local MLP", *mno_labels.values())]  # fmt: skip
    validation = None  # with --trajectory-split: the trajectories the a-priori fit held out
    if out_of_sample and args.trajectory_split:
        held = held_out_groups(trajectory_of)
        validation = [states for i, states in enumerate(training_states) if i in held]
        training_states = [states for i, states in enumerate(training_states) if i not in held]
    if args.mirror_rollouts:  # the mirror images of the trajectories are trajectories too
        state_mirror = StateMirror(plain.W)
        training_states += [[state_mirror(w) for w in states] for states in training_states]
        if validation is not None:
            validation += [[state_mirror(w) for w in states] for states in validation]
    trained += [(name, name, training_states) for name in out_of_sample]
    without_closure = coarse_model("plain_held_out")  # the held-out loss to beat
    for label, trained_from, trajectories in trained:
        factory = (
            factories[label] if label in factories else grid_closure(out_of_sample[label], grid)
        )
        flow = coarse_model(f"tuned_{len(training)}", factory)
        tuned = train_a_posteriori(
            flow, trajectories, samples_every, args.window, args.a_posteriori,
            learning_rate=args.learning_rate, stride=1 if args.quick else 2,
            plain=without_closure, validation=validation if label in out_of_sample else None,
            progress=not args.quick,
        )  # fmt: skip
        name = f"{trained_from}, a posteriori"
        training[name] = vars(tuned)
        if label in out_of_sample:  # kept, to run again or to train further
            tag = f"_aposteriori{args.a_posteriori}" + ("_mirrored" if args.mirror_rollouts else "")
            tuned_path = out_of_sample[label].with_stem(f"{out_of_sample[label].stem}{tag}")
            save_model(
                tuned_path, flow.closure.model, spec=flow.closure.spec, comm=comm,
                metadata={"trained_from": str(out_of_sample[label]), "epochs": tuned.epochs,
                          "learning_rate": args.learning_rate, "window": args.window},
            )  # fmt: skip
        skill[name] = exact.skill({name: flow.closure}, [flow], taus, reference)[name]["fve"]
        runs[name] = runs_against_dns.run(flow, start)
        log(f"{name}: {training[name]}, t(ρ<0.95) = {runs[name]['decorrelation_time']}")

ladder = {n: runs[f"no closure, {n}²"] for n in config["ladder"]}
add_resolution_factors(runs, ladder, nc, config["test_horizon"])

summary = {
    "quick": args.quick,
    "ranks": comm.size,
    "config": config,
    "compare": None if args.compare is None else str(args.compare),
    "hold_closures": args.hold,
    "dns_seconds_per_time_unit": dns_seconds / config["test_horizon"],
    "fit_seconds": fit_seconds,
    "train_seeds": args.train_seeds,
    "mirror": args.mirror,
    "mirror_rollouts": args.mirror_rollouts,
    "trajectory_split": args.trajectory_split,
    "out_of_sample_seconds": out_of_sample_seconds,
    "fno_fits": fno_fits,
    "variance_explained": skill,
    "a_posteriori": {"window": args.window, "learning_rate": args.learning_rate, **training},
    "runs": runs,
}
if comm.rank == 0:  # a smoke test must not overwrite the measured numbers
    modes_name = "-".join(map(str, args.fno_modes))
    demo_mno = args.fno_modes == [8] and args.fno_width is None
    tuned_at_other_rate = args.a_posteriori is not None and args.learning_rate != 3e-4
    mno_name = [] if demo_mno else [f"mno{modes_name}w{config['fno_width']}"]
    mno_name += [regularised[1].lstrip("_")] if regularised[1] else []
    name = "_".join(
        (["quick"] if args.quick else [])
        + ([f"aposteriori{args.a_posteriori}"] if args.a_posteriori else [])
        + (["hold"] if args.hold else [])
        + ([f"{args.train_seeds}seeds"] if args.train_seeds else [])
        + (["mirrored"] if args.mirror else [])
        + (["mirroredrollouts"] if args.mirror_rollouts else [])
        + (["split"] if args.trajectory_split else [])
        + (["checkerboard"] if args.checkerboard else [])
        + mno_name
        + ([f"from_{args.start_from.stem}"] if args.start_from is not None else [])
        + ([f"lr{args.learning_rate:g}"] if tuned_at_other_rate else [])
        + ([seed_tag.lstrip("_")] if seed_tag else [])
    )
    (output / (f"summary_{name}.json" if name else "summary.json")).write_text(
        json.dumps(summary, indent=2)
    )


def cell(value: float | None) -> str:
    return f"> {config['test_horizon']:g}" if value is None else f"{value:.3f}"


log(f"\n{'SSP-RK3, 16² unless said':>46} | τ explained | t(ρ<0.95) | ρ at end | resolution"
    " | wall-time ratio | s / unit")  # fmt: skip
for label, row in runs.items():
    explained = f"{skill[label]:11.3f}" if label in skill else " " * 11
    bound = "≥" if row["factor_is_lower_bound"] else " "
    log(
        f"{label:>46} | {explained} | {cell(row['decorrelation_time']):>9} | "
        f"{row['correlation_end']:8.3f} | {bound}{row['resolution_factor']:9.2f} | "
        f"{row['wall_time_ratio']:15.2f} | {row['seconds_per_time_unit']:.3f}"
    )
for label, row in training.items():
    before, after = row["held_out_before"], row["held_out_after"]
    log(
        f"{label}: held-out rollout loss {before:.4g} → {after:.4g} in {row['epochs']} epochs"
        f" (no closure: {row['held_out_no_closure']:.4g})"
    )

# ## Checks: every run starts correlated; the oracle lasts at least as long as no closure;
# every in-sample fit explains part of τ on its own training data; training through the
# solver does not worsen its held-out windows. (How much, and how long the closures last,
# are the measurements, in docs/results.md.)
for label, row in runs.items():
    assert row["correlations"][0] > 0.99, (label, row["correlations"][:2])
oracle_time, plain_time = (
    as_run(runs[k], config["test_horizon"]).decorrelation_time
    for k in ("oracle τ", f"no closure, {nc}²")
)
assert oracle_time >= plain_time, (oracle_time, plain_time)
for label in (k for k in skill if "in sample" in k):
    assert 0.0 < skill[label] <= 1.0, (label, skill[label])
# Training through the solver keeps its best weights on the held-out windows, the starting
# ones included; so if it held out the windows measured here, it cannot have made them worse.
for label, row in training.items():
    assert row["held_out_after"] <= row["held_out_before"] * (1 + 1e-9), (label, row)
log(f"all checks passed; outputs in {output}")
