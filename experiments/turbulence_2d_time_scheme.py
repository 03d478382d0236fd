"""2D turbulence: what the coarse time scheme costs the closures (issue 14, "the time scheme").

``turbulence_2d_limits.py`` found that the exact subgrid flux ``τ`` fed to the 16² model
at every coarse step reaches a resolution factor of only 1.7, and more than 4 with the DNS
time step: the coarse model's *time* error (IMEX Euler with the Taylor–Galerkin
correction, first order) caps what any closure of ``τ`` can do. This experiment tests the
lever it named: a third-order time scheme (``VorticityFlow(scheme="ssprk3")``: SSP-RK3 of
explicit Euler stages, the streamfunction implicit; three solves per step with one
matrix). It measures, from the same spun-up state of the test seed:

(a) **The reference's own time error**: the 128² DNS with each scheme, filtered to 16²,
    against each other.
(b) **The no-closure ladder** (16², 32², 64²) with each scheme against the DNS of the
    same scheme, and the demo's IMEX Euler ladder against the SSP-RK3 DNS.
(c) **The exact-τ oracle** at 16² with each scheme, at the coarse time step and at 2 and 4
    times it (SSP-RK3 is stable on the imaginary axis; the Euler scheme is not), with
    the resolution factor and the wall-time ratio on the ladder of the same scheme.
(d) With ``--learned``, **the demo's a-priori local closure of τ** (the MLP of
    ``turbulence_2d_limits.py``, fitted here again on the same training seeds) with each
    scheme at the coarse time step; with ``--a-posteriori EPOCHS`` also the same closure
    trained through each scheme's solver (``fit_rollout`` through the three stages of an
    SSP-RK3 step), on windows of the training seeds' filtered DNS (the Euler DNS: over
    the 2 time units of a training trajectory the two DNS stay correlated above 0.95).

The oracle holds the exact ``τ`` of ``tⁿ`` over the three stages of an SSP-RK3 step (the
DNS state at the stages is not known), so its flux is first order in time while the rest
of the step is third order; ``turbulence_2d_limits.py`` measured that holding ``τ`` over
two coarse steps changes the Euler oracle's decorrelation time by 0.008.

    mpirun -n 2 python experiments/turbulence_2d_time_scheme.py      # --medium settings
    python experiments/turbulence_2d_time_scheme.py --quick          # smoke test, ~20 s

Writes ``experiments/output/turbulence_2d_time_scheme/summary.json``
(``summary_quick.json`` with ``--quick``, ``summary_9seeds.json`` with ``--train-seeds 9``,
``summary_9seeds_lr0.0003.json`` with ``--learning-rate 3e-4`` too) and prints the tables.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np
import ufl
from dolfinx import fem

import dolfinx_mno as mno
from dolfinx_mno.io import save_model
from dolfinx_mno.models import MLP
from dolfinx_mno.training import fit

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY / "demos"), str(REPOSITORY / "demos" / "turbulence_2d")]
from comparison import train_a_posteriori
from flow import VorticityFlow, schemes
from turbulence_2d_data import (
    NU,
    CoarseRuns,
    ExactFlux,
    Turbulence,
    add_resolution_factors,
    as_run,
    settings,
    steps,
)
from utilities import log, output_folder, positive_int

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="small problem, a smoke test")
parser.add_argument(
    "--dt-factors",
    type=positive_int,
    nargs="+",
    default=[1, 2, 4],
    help="coarse time steps of the 16² runs, in multiples of the demo's (default 1 2 4)",
)
parser.add_argument(
    "--learned", action="store_true", help="also fit and run the a-priori local closure of τ"
)
parser.add_argument(
    "--a-posteriori",
    type=positive_int,
    default=None,
    metavar="EPOCHS",
    help="also train the local closure through each scheme's solver (implies --learned)",
)
parser.add_argument(
    "--window", type=positive_int, default=4, help="a-posteriori window, in samples (default 4)"
)
parser.add_argument(
    "--train-seeds",
    type=positive_int,
    default=None,
    metavar="N",
    help="train the local closure on seeds 1, 2, ... without the test seed (default: the "
    "demo's three)",
)
parser.add_argument(
    "--mlp-epochs", type=positive_int, default=None, help="a-priori epochs (default 200)"
)
parser.add_argument(
    "--learning-rate", type=float, default=1e-3, help="a-posteriori learning rate (1e-3)"
)
parser.add_argument(
    "--reuse-fit",
    action="store_true",
    help="read the a-priori closure an earlier run with the same seeds saved, if any",
)
args = parser.parse_args()
args.learned = args.learned or args.a_posteriori is not None
comm = MPI.COMM_WORLD
output = output_folder("turbulence_2d_time_scheme", root=REPOSITORY / "experiments" / "output")
config = settings(args.quick)
per_sample = steps(config["sample_every"], config["courant"] / config["coarse"])
for factor in args.dt_factors:  # each run's steps must fall on the reference's samples
    if per_sample % factor and factor % per_sample:
        parser.error(
            f"--dt-factors: {factor} neither divides nor is a multiple of the {per_sample} "
            "coarse steps between two reference samples"
        )
if args.train_seeds is not None:
    seeds = [seed for seed in range(1, args.train_seeds + 2) if seed != config["test_seed"]]
    config["train_seeds"] = seeds[: args.train_seeds]
log(f"config: {config}, dt factors {args.dt_factors}")

# ## The DNS with both schemes, the filter and the exact subgrid flux (as the limits)
data = Turbulence(config, comm)
plain, omega_bar, nc = data.plain, data.omega_bar, config["coarse"]
dns = {
    "euler": data.dns,
    "ssprk3": VorticityFlow(
        config["dns"], data.dns.dt, NU, domain=data.dns.mesh, name="dns3", scheme="ssprk3"
    ),
}
exact = ExactFlux(data)
Wc, tau = exact.space, exact.tau


fine_per_coarse = steps(plain.dt, data.dns.dt)
samples_every = steps(config["sample_every"], plain.dt)  # coarse steps per sample
# Per scheme: the filtered DNS ω̄ and the exact τ at every coarse step of the test horizon.
trajectory: dict[str, dict[str, list[np.ndarray]]] = {s: {"omega": [], "tau": []} for s in dns}
dns_seconds: dict[str, float] = {}


def recorder(scheme: str):
    flow, flux, stored = dns[scheme], exact.fine_flux(dns[scheme]), trajectory[scheme]

    def record(t: float) -> None:
        if round(t / flow.dt) % fine_per_coarse == 0:
            exact(flow.omega, flux)  # sets ω̄, the coarse state and τ
            stored["omega"].append(omega_bar.x.array.copy())
            stored["tau"].append(tau.x.array.copy())

    return record


# (d) The a-priori data of the learned closure: the demo's seeds, spacing and fit.
mode = "_".join(
    (["quick"] if args.quick else []) + ([f"{args.train_seeds}seeds"] if args.train_seeds else [])
)
local_path = output / (f"local_closure_{mode}.pt" if mode else "local_closure.pt")
reuse = args.reuse_fit and comm.allreduce(local_path.exists(), op=MPI.LAND)
if args.learning_rate != 1e-3:
    mode = f"{mode}_lr{args.learning_rate:g}".lstrip("_")
if args.learned:
    tic = time.perf_counter()
    demo_every = round((0.125 if args.quick else 0.0625) / data.dns.dt)
    aligned_every = steps(config["sample_every"], data.dns.dt)
    samples, flux, aligned = [], exact.fine_flux(data.dns), []
    num_owned = plain.W.dofmap.index_map.size_local * plain.W.dofmap.index_map_bs

    def record_training(t: float) -> None:
        step = round(t / data.dns.dt)
        if step % demo_every == 0 or step % aligned_every == 0:
            if step % demo_every == 0:  # sets ω̄ and the coarse state too
                samples.append(exact(data.dns.omega, flux))
            else:
                data.filtered(data.dns.omega)
            if step % aligned_every == 0:  # the coarse state (ω̄, ψ̄) for fit_rollout
                aligned[-1].append(plain.w.x.array[:num_owned].copy())

    for seed in config["train_seeds"]:
        aligned.append([])
        data.trajectory(seed, config["horizon"], record_training)
    points = samples[0].inputs.shape[0]
if args.learned and not reuse:
    local_fit = fit(
        MLP(6, 2, hidden_features=[64, 64], seed=0),
        np.concatenate([sample.inputs for sample in samples]),
        np.concatenate([sample.targets for sample in samples]).reshape(-1, 2),
        groups=np.repeat(np.arange(len(samples)), points), comm=comm,
        epochs=args.mlp_epochs or (15 if args.quick else 200), batch_size=1024,
        learning_rate=3e-3, patience=20, normalize_targets=True, seed=0, progress=False,
    )  # fmt: skip
    save_model(local_path, local_fit.model, spec=exact.sampler.spec, comm=comm)
if args.learned:
    log(f"the local closure's data and fit: {time.perf_counter() - tic:.1f} s (reused: {reuse})")


def local_closure(omega_n, velocity_n):
    closure = mno.Closure(str(local_path), mno.Operands(
        {"grad_omega": ufl.grad(omega_n), "grad_u": ufl.grad(velocity_n)}))  # fmt: skip
    return closure, closure.dx


tic = time.perf_counter()
start_fine = fem.Function(data.dns.V)
record_filtered = recorder("euler")


def record_euler(t: float) -> None:
    if t == 0.0:  # the end of the spin-up: both DNS start here
        start_fine.x.array[:] = data.dns.omega.x.array
    record_filtered(t)


dns_seconds["euler"] = data.trajectory(config["test_seed"], config["test_horizon"], record_euler)
dns["ssprk3"].set_vorticity(start_fine)
dns_seconds["ssprk3"] = dns["ssprk3"].run(0.0, config["test_horizon"], recorder("ssprk3"))
log(f"the two DNS of the test seed: {time.perf_counter() - tic:.1f} s")
start = fem.Function(data.V, name="start")
start.x.array[:] = trajectory["euler"]["omega"][0]
references = {s: trajectory[s]["omega"][::samples_every] for s in dns}

# ## (a) The DNS's own time error: the two filtered DNS against each other
pair = fem.Function(data.V), fem.Function(data.V)
correlation = mno.Correlation(*pair)
dns_rho = []
for euler, rk3 in zip(references["euler"], references["ssprk3"], strict=True):
    pair[0].x.array[:], pair[1].x.array[:] = euler, rk3
    dns_rho.append(correlation())
sample_times = np.arange(len(dns_rho)) * config["sample_every"]
dns_time = mno.decorrelation_time(sample_times, np.asarray(dns_rho))


# ## (b, c) The ladders and the oracles, each scheme against its own DNS
def coarse_run(
    runs: CoarseRuns, scheme: str, factor: int, oracle: bool, learned: bool = False
) -> dict:
    """The 16² model with ``scheme`` at ``factor`` times the coarse step; ``oracle``: exact τ,
    ``learned``: the learned local closure."""
    name = f"{'oracle' if oracle else 'learned' if learned else 'plain'}_{scheme}_{factor}"
    oracle_tau = fem.Function(Wc, name=f"{name}_tau")
    closure = (lambda o, u: (oracle_tau, ufl.dx)) if oracle else None
    closure = local_closure if learned else closure
    flow = data.coarse_model(name, factor * plain.dt, closure=closure, scheme=scheme)
    taus = trajectory[scheme]["tau"]

    def before_step(step: int) -> None:
        oracle_tau.x.array[:] = taus[step * factor]

    options: dict = {"before_step": before_step if oracle else None}
    if samples_every % factor:  # compare every step, with the samples its times fall on
        options |= {
            "record_every": 1,
            "reference_index": lambda step: step * factor // samples_every,
        }
    return runs.run(flow, start, **options)


results: dict[str, dict[str, dict]] = {}
training: dict[str, dict] = {}
for scheme in schemes:
    runs = CoarseRuns(data, references[scheme])
    table = {f"no closure, {nc}²": coarse_run(runs, scheme, 1, oracle=False)}
    table |= runs.ladder(config["ladder"], start_fine, scheme)
    for factor in args.dt_factors:
        suffix = "" if factor == 1 else f", {factor}×Δt"
        if factor != 1:
            table[f"no closure{suffix}"] = coarse_run(runs, scheme, factor, oracle=False)
        table[f"oracle τ{suffix}"] = coarse_run(runs, scheme, factor, oracle=True)
    if args.learned:
        table["local MLP τ, a priori"] = coarse_run(runs, scheme, 1, False, learned=True)
    if args.a_posteriori is not None:
        flow = data.coarse_model(f"tuned_{scheme}", closure=local_closure, scheme=scheme)
        tuned = train_a_posteriori(
            flow, aligned, samples_every, args.window, args.a_posteriori,
            learning_rate=args.learning_rate,
            stride=1 if args.quick else 2,
        )  # fmt: skip
        training[scheme] = vars(tuned)
        log(f"{scheme}, a posteriori: {training[scheme]}")
        table["local MLP τ, a posteriori"] = runs.run(flow, start)
    results[scheme] = table
    log(f"{scheme}: {[(k, v['decorrelation_time']) for k, v in table.items()]}")
# The demo's scheme against the time-accurate reference.
runs = CoarseRuns(data, references["ssprk3"])
cross = {f"no closure, {nc}²": coarse_run(runs, "euler", 1, oracle=False)}
cross |= runs.ladder(config["ladder"], start_fine, "euler")
cross["oracle τ"] = coarse_run(runs, "euler", 1, oracle=True)
results["euler against the SSP-RK3 DNS"] = cross


for table in results.values():
    ladder = {n: table[f"no closure, {n}²"] for n in config["ladder"]}
    add_resolution_factors(table, ladder, nc, config["test_horizon"])

summary = {
    "quick": args.quick,
    "ranks": comm.size,
    "config": config,
    "dt_factors": args.dt_factors,
    "learned": args.learned,
    "a_posteriori": {
        "epochs": args.a_posteriori,
        "window": args.window,
        "learning_rate": args.learning_rate,
        **training,
    },
    "reused_fit": reuse,
    "dns_seconds_per_time_unit": {s: v / config["test_horizon"] for s, v in dns_seconds.items()},
    "dns_correlation": [float(r) for r in dns_rho],
    "dns_decorrelation_time": None if math.isinf(dns_time) else float(dns_time),
    "runs": results,
}
if comm.rank == 0:  # a smoke test must not overwrite the measured numbers
    (output / (f"summary_{mode}.json" if mode else "summary.json")).write_text(
        json.dumps(summary, indent=2)
    )


def cell(value: float | None) -> str:
    return f"> {config['test_horizon']:g}" if value is None else f"{value:.3f}"


log(
    f"\nThe Euler DNS against the SSP-RK3 DNS (filtered to {nc}²): t(ρ < 0.95) = "
    f"{cell(summary['dns_decorrelation_time'])}, ρ at the end {dns_rho[-1]:.3f}; DNS s / unit "
    + ", ".join(f"{s} {v:.2f}" for s, v in summary["dns_seconds_per_time_unit"].items())
)
for name, table in results.items():
    log(f"\n{name:>34} | t(ρ<0.95) | ρ at end | resolution | wall-time ratio | s / unit")
    for label, row in table.items():
        bound = "≥" if row["factor_is_lower_bound"] else " "
        log(
            f"{label:>34} | {cell(row['decorrelation_time']):>9} | {row['correlation_end']:8.3f}"
            f" | {bound}{row['resolution_factor']:9.2f} | {row['wall_time_ratio']:15.2f}"
            f" | {row['seconds_per_time_unit']:.3f}"
        )

# ## Checks: both DNS start from the same state; every run starts correlated; the oracle
# at the coarse step lasts at least as long as the plain model of its scheme. (How long,
# and how the schemes compare, are the measurements, in docs/results.md.)
assert dns_rho[0] > 1 - 1e-12, dns_rho[0]
for name, table in results.items():
    for label, row in table.items():
        assert row["correlations"][0] > 0.99, (name, label, row["correlations"][:2])
    plain_time, oracle_time = (
        as_run(table[key], config["test_horizon"]).decorrelation_time
        for key in (f"no closure, {nc}²", "oracle τ")
    )
    assert oracle_time >= plain_time, (name, oracle_time, plain_time)
log(f"all checks passed; outputs in {output}")
