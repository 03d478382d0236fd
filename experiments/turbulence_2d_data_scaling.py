"""2D turbulence: the learned step correction's skill against the number of trajectories.

``turbulence_2d_step_correction.py`` found that more training trajectories, not a richer
model or longer unrolls, moved the learned step correction (issue 14). This script reads
its summaries for several numbers of training trajectories, with the other settings the
same, and shows the trend against the ladder of coarse meshes without closure::

    mpirun -n 2 python experiments/turbulence_2d_step_correction.py --train-seeds 9 \\
        --bound 4 --window 16 --rollout-epochs 10 --dissipative
    # ... the same with --train-seeds 18 and 36 (--mlp-epochs 60 / 30, --fno-epochs 40 / 20)
    python experiments/turbulence_2d_data_scaling.py

It fits the decorrelation time of the a-posteriori source against log2 of the number of
trajectories (a line through the points: the gain per doubling) and says how many
doublings the line needs to reach the 32² and 64² meshes' decorrelation times, i.e.
resolution factors 2 and 4. With ``--test-seeds K`` it reads the summaries of runs with
``--test-seeds K`` and uses each model's mean decorrelation time over the ``K + 1`` test
seeds, with its standard error, instead of the one test seed's. Writes
``data_scaling.json`` and ``data_scaling.png`` (``data_scaling_test<K>seeds.*``) to
``experiments/output/turbulence_2d_data_scaling/`` (the figures are copied to
``docs/figures/turbulence_2d_data_scaling.png`` and ``turbulence_2d_test_seeds.png``).
Serial; reads files only.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY / "demos")]
from utilities import log, output_folder, positive_int

SUMMARIES = REPOSITORY / "experiments" / "output" / "turbulence_2d_step_correction"
SOURCES = {"a priori": "local MLP, a priori", "a posteriori": "local MLP, a posteriori"}
LADDER = {1: "no closure", 2: "no closure, 32²", 4: "no closure, 64²"}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument(
    "--seeds",
    type=positive_int,
    nargs="+",
    default=[9, 18, 36],
    help="numbers of training trajectories whose summaries to read (default 9 18 36)",
)
parser.add_argument(
    "--suffix",
    default="bound4_window16_dissipative",
    help="the summaries' settings, as in summary_medium_<N>seeds_<suffix>.json",
)
parser.add_argument(
    "--test-seeds",
    type=int,
    default=0,
    help="read the runs with --test-seeds K: mean times over the K + 1 test seeds (default 0)",
)
args = parser.parse_args()
if args.test_seeds < 0:  # the step correction's own rule: 0 or more
    parser.error(f"--test-seeds must be 0 or more, got {args.test_seeds}")
suffix = args.suffix + (f"_test{args.test_seeds}seeds" if args.test_seeds else "")
output = output_folder("turbulence_2d_data_scaling", root=REPOSITORY / "experiments" / "output")

# ## The summaries, one per number of trajectories, checked to differ only in that number
paths = [SUMMARIES / f"summary_medium_{n}seeds_{suffix}.json" for n in args.seeds]
missing = [str(p) for p in paths if not p.is_file()]
if missing:
    sys.exit(
        "missing summaries (run turbulence_2d_step_correction.py first): " + ", ".join(missing)
    )
summaries = [json.loads(p.read_text()) for p in paths]
# The epochs scale with the data; memory_stride only serves --memory runs.
ignored = {"train_seeds", "mlp_epochs", "fno_epochs", "memory_stride"}
settings = [{k: v for k, v in s["config"].items() if k not in ignored} for s in summaries]
# A setting that an older summary lacks did not exist then: it had its default, off.
for n, other in zip(args.seeds[1:], settings[1:], strict=True):
    differ = sorted(
        k
        for k in settings[0].keys() | other.keys()
        if settings[0].get(k, False) != other.get(k, False)
    )
    if differ:
        sys.exit(
            f"the {n}-trajectory run differs from the {args.seeds[0]}-trajectory one in {differ}"
        )
counts = [len(s["config"]["train_seeds"]) for s in summaries]


def decorrelation(summary: dict, name: str) -> tuple[float, float]:
    """A run's decorrelation time and its standard error (0 with one test seed)."""
    if not args.test_seeds:
        return summary["runs"][name]["decorrelation_time"], 0.0
    row = summary["test_seeds"]["runs"][name]
    return row["mean"], row["std"] / np.sqrt(len(summary["test_seeds"]["seeds"]))


times = {label: [decorrelation(s, name)[0] for s in summaries] for label, name in SOURCES.items()}
errors = {label: [decorrelation(s, name)[1] for s in summaries] for label, name in SOURCES.items()}
ladder = {factor: decorrelation(summaries[-1], name)[0] for factor, name in LADDER.items()}

# ## The gain per doubling of the data (least squares in log2 of the count)
slope, intercept = np.polyfit(np.log2(counts), times["a posteriori"], 1)
doublings = {
    factor: (
        float((ladder[factor] - intercept) / slope - np.log2(counts[-1])) if slope > 0 else None
    )
    for factor in (2, 4)
}
result = {
    "trajectories": counts,
    "decorrelation_times": times,
    "standard_errors": errors,
    "paired_gains_over_no_closure": (
        {
            label: [
                (row["gain_over_no_closure"], row["gain_standard_error"])
                for row in (s["test_seeds"]["runs"][name] for s in summaries)
            ]
            for label, name in SOURCES.items()
        }
        if args.test_seeds
        else None
    ),
    "test_seeds": summaries[-1]["test_seeds"]["seeds"] if args.test_seeds else None,
    "ladder": {f"{factor}x": t for factor, t in ladder.items()},
    "gain_per_doubling": float(slope),
    "doublings_beyond_the_last_to_reach": {f"{factor}x": d for factor, d in doublings.items()},
    "summaries": [p.name for p in paths],
}
stem = "data_scaling" + (f"_test{args.test_seeds}seeds" if args.test_seeds else "")
(output / f"{stem}.json").write_text(json.dumps(result, indent=2))

log(f"{'trajectories':>12} | " + " | ".join(f"{label:>12}" for label in times))
for i, n in enumerate(counts):
    log(
        f"{n:12d} | "
        + " | ".join(
            f"{times[label][i]:6.3f} ± {errors[label][i]:.3f}"
            if args.test_seeds
            else f"{times[label][i]:12.3f}"
            for label in times
        )
    )
if args.test_seeds:
    for label, gains in result["paired_gains_over_no_closure"].items():
        pairs = zip(counts, gains, strict=True)
        text = ", ".join(f"{n}: {gain:+.3f} ± {error:.3f}" for n, (gain, error) in pairs)
        log(f"{label}, gain over no closure (paired, ± standard error): {text}")
log("ladder without closure: " + ", ".join(f"{16 * f}² {t:.3f}" for f, t in ladder.items()))
for factor, d in doublings.items():
    reach = (
        "never (no gain)"
        if d is None
        else f"{d:.1f} more doublings ({counts[-1] * 2**d:.3g} trajectories)"
    )
    mesh = f"the {16 * factor}² mesh's {ladder[factor]:.3f}"
    log(f"a posteriori, {slope:+.3f} per doubling: {mesh} in {reach}")

# ## The figure: decorrelation time against the number of trajectories, the ladder beside it
# (with --test-seeds, beside it the seed-averaged correlations of the largest run's models)
columns = 2 if args.test_seeds else 1
figure, panels = plt.subplots(1, columns, figsize=(5.5 * columns, 3.8), squeeze=False)
axes = panels[0, 0]
for label, marker in (("a priori", "s"), ("a posteriori", "o")):
    axes.errorbar(counts, times[label], yerr=errors[label], marker=marker, capsize=3,
                  label=f"16² + learned step correction, {label}")  # fmt: skip
reach_32 = doublings[2] if doublings[2] is not None else 0.0
line = np.array([counts[0], counts[-1] * 2 ** min(reach_32 + 1.0, 12.0)])
axes.plot(
    line, slope * np.log2(line) + intercept, "k:", lw=1, label=f"fit: {slope:+.3f} per doubling"
)
for factor, t in ladder.items():
    axes.axhline(t, color="0.6", lw=0.8)
    axes.annotate(f"{16 * factor}², no closure", (line[-1], t), xytext=(0, 3), ha="right",
                  textcoords="offset points", fontsize=8, color="0.35")  # fmt: skip
axes.set_xscale("log", base=2)
axes.set_xlabel("training trajectories (2 time units each)")
axes.set_ylabel(
    f"t(ρ < 0.95), mean of {args.test_seeds + 1} test seeds" if args.test_seeds
    else "t(ρ < 0.95) on the test seed"
)  # fmt: skip
axes.set_title("2D turbulence, 16² coarse mesh: skill against data", fontsize=10)
axes.legend(fontsize=7, loc="upper left")
if args.test_seeds:
    axes = panels[0, 1]
    last = summaries[-1]
    every = last["config"]["sample_every"]
    for name in [*LADDER.values(), *SOURCES.values()]:
        rho = last["test_seeds"]["runs"][name]["mean_correlation"]
        style = "--" if name in LADDER.values() else "-"
        label = "no closure, 16²" if name == "no closure" else name
        axes.plot(np.arange(len(rho)) * every, rho, style, label=label)
    axes.axhline(0.95, color="0.6", lw=0.8)
    axes.set_xlabel("t")
    axes.set_ylabel(f"ρ, mean of {len(last['test_seeds']['seeds'])} test seeds")
    axes.set_title(
        f"{counts[-1]} training trajectories: the seed-averaged correlation", fontsize=10
    )
    axes.legend(fontsize=7, loc="lower left")
figure.tight_layout()
figure.savefig(output / f"{stem}.png", dpi=110)
log(f"outputs in {output}")
