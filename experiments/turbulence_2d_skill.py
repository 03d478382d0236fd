"""2D turbulence: the resolution factor a closure of τ reaches against the share of τ it explains.

``turbulence_2d_in_sample.py`` measures, on one test seed, both halves of this question:
how far an *unbiased* closure of the subgrid flux τ gets when it explains a fraction f of
τ's variance (the exact τ degraded with white noise, ``--degraded f ...``), and how much
of τ a learned closure explains and how far it gets. This script reads its summaries for
several test seeds and puts the two side by side, so that one can see what share of τ a
closure would need for a given resolution factor::

    OUT=experiments/output/turbulence_2d_in_sample
    FROM=$OUT/mno32w32_checkerboard_36seeds_mirrored_split_aposteriori3_mirrored.pt
    for seed in 5 101 102 103 104 105; do
        mpirun -n 2 python experiments/turbulence_2d_in_sample.py --checkerboard \\
            --no-in-sample --degraded 0.5 0.75 0.9 0.95 0.99 --fno-modes 32 --fno-width 32 \\
            --hold --train-seeds 36 --trajectory-split --mirror --from $FROM --test-seed $seed
    done
    python experiments/turbulence_2d_skill.py $OUT/summary_hold_36seeds*aposteriori3_mirrored*.json

(``--test-seed 5`` is the default test seed; the script refuses it as an option only when
it is one of the training seeds, so the loop may name it.) Every summary must be a
different test seed of runs with the same settings. For each fraction f, and for the exact
τ (f = 1), it gives the mean resolution factor over the seeds with its standard error; a
factor the ladder of coarse meshes cannot resolve (the run outlasts the 64² mesh) counts
as 4 and is reported as a lower bound. Each learned closure gets its mean share of τ
explained and its mean resolution factor. Writes ``skill.json`` and ``skill.png`` to
``--output-dir`` (``experiments/output/turbulence_2d_skill/``; the figure is copied to
``docs/figures/turbulence_2d_skill.png``). Serial; reads files only.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY / "demos")]
from utilities import log, output_folder

DEGRADED = re.compile(r"^oracle τ, (?P<fraction>[0-9.e-]+) of its variance$")
# Settings that may differ between the summaries of one study: the test seed itself and
# the bookkeeping of each run.
PER_SEED = {"test_seed"}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument(
    "summaries",
    type=Path,
    nargs="+",
    help="summary JSON files of turbulence_2d_in_sample.py, one per test seed",
)
parser.add_argument(
    "--output-dir",
    type=Path,
    default=REPOSITORY / "experiments" / "output" / "turbulence_2d_skill",
    help="where skill.json and skill.png go (default experiments/output/turbulence_2d_skill)",
)
args = parser.parse_args()

# ## The summaries: one per test seed, with the same settings otherwise
missing = [str(p) for p in args.summaries if not p.is_file()]
if missing:
    sys.exit("missing summaries (run turbulence_2d_in_sample.py first): " + ", ".join(missing))
summaries = [json.loads(p.read_text()) for p in args.summaries]
seeds = [s["config"]["test_seed"] for s in summaries]
if len(set(seeds)) != len(seeds):
    sys.exit(f"each summary must be a different test seed, got test seeds {seeds}")
if any(s.get("quick") for s in summaries) and not all(s.get("quick") for s in summaries):
    sys.exit("the summaries mix --quick runs with full ones")
settings = [{k: v for k, v in s["config"].items() if k not in PER_SEED} for s in summaries]
for path, other in zip(args.summaries[1:], settings[1:], strict=True):
    differ = sorted(
        k for k in settings[0].keys() | other.keys() if settings[0].get(k) != other.get(k)
    )
    if differ:
        sys.exit(f"{path.name} differs from {args.summaries[0].name} in {differ}")


def factor(run: dict) -> tuple[float, bool]:
    """A run's resolution factor and whether it is only a lower bound."""
    return float(run["resolution_factor"]), bool(run.get("factor_is_lower_bound", False))


def degraded_runs(summary: dict) -> dict[float, dict]:
    """The oracle runs of a summary by the share of τ they explain (1 for the exact τ)."""
    runs = {}
    for name, run in summary["runs"].items():
        match = DEGRADED.match(name)
        if match:
            runs[float(match["fraction"])] = run
        elif name == "oracle τ":
            runs[1.0] = run
    return runs


fractions = sorted(set.intersection(*(set(degraded_runs(s)) for s in summaries)))
if not fractions:
    sys.exit("no oracle run common to every summary (run with --degraded)")
learned = sorted(set.intersection(*(set(s["variance_explained"]) for s in summaries)))


def shortened(name: str, width: int) -> str:
    """`name`, cut to `width` characters with an ellipsis if longer."""
    return name if len(name) <= width else name[: width - 3] + "..."


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (0 for one value)."""
    array = np.asarray(values, dtype=float)
    error = array.std(ddof=1) / np.sqrt(array.size) if array.size > 1 else 0.0
    return float(array.mean()), float(error)


def factors_of(runs: list[dict]) -> dict:
    """The runs' resolution factors, which are lower bounds, their mean and its error."""
    factors, bounds = zip(*(factor(run) for run in runs), strict=True)
    mean, error = mean_and_error(list(factors))
    return {
        "factors": list(factors),
        "lower_bounds": list(bounds),
        "mean_factor": mean,
        "factor_standard_error": error,
    }


oracle_runs = [degraded_runs(s) for s in summaries]
oracles = [
    {"fraction_explained": fraction} | factors_of([runs[fraction] for runs in oracle_runs])
    for fraction in fractions
]
closures = []
for name in learned:
    shares = [float(s["variance_explained"][name]) for s in summaries]
    closures.append(
        {
            "name": name,
            "fractions_explained": shares,
            "mean_fraction_explained": mean_and_error(shares)[0],
        }
        | factors_of([s["runs"][name] for s in summaries])
    )
output = output_folder(args.output_dir.name, root=args.output_dir.parent)
result = {
    "test_seeds": seeds,
    "oracle": oracles,
    "learned": closures,
    "summaries": [p.name for p in args.summaries],
}
(output / "skill.json").write_text(json.dumps(result, indent=2))

log(f"{len(seeds)} test seeds {seeds}")
log(f"{'share of τ explained':>40} | resolution factor (mean ± s.e.)")
for row in oracles:
    bounds = sum(row["lower_bounds"])
    note = f", ≥ on {bounds} of {len(seeds)} seeds" if bounds else ""
    label = "exact τ" if row["fraction_explained"] == 1.0 else "unbiased closure"
    log(
        f"{label + ', ' + format(row['fraction_explained'], '.2f'):>40} | "
        f"{row['mean_factor']:.2f} ± {row['factor_standard_error']:.2f}{note}"
    )
for row in closures:
    log(
        f"{shortened(row['name'], 40):>40} | "
        f"{row['mean_factor']:.2f} ± {row['factor_standard_error']:.2f} "
        f"at {row['mean_fraction_explained']:.2f} of τ"
    )

# ## The figure: resolution factor against the share of τ explained
figure, axes = plt.subplots(figsize=(5.5, 3.9))
for i in range(len(seeds)):
    x = [row["fraction_explained"] for row in oracles]
    y = [row["factors"][i] for row in oracles]
    axes.plot(x, y, "-", color="0.75", lw=0.8, zorder=1)
    bound = [row["lower_bounds"][i] for row in oracles]
    axes.scatter([a for a, b in zip(x, bound, strict=True) if b],
                 [a for a, b in zip(y, bound, strict=True) if b],
                 marker="^", color="0.6", s=18, zorder=2)  # fmt: skip
axes.errorbar(
    [row["fraction_explained"] for row in oracles],
    [row["mean_factor"] for row in oracles],
    yerr=[row["factor_standard_error"] for row in oracles],
    marker="o", color="k", capsize=3, zorder=3,
    label=f"unbiased closure (exact τ + noise), mean of {len(seeds)} seeds",
)  # fmt: skip
for row, marker in zip(closures, "sDvP*", strict=False):
    axes.scatter(row["fractions_explained"], row["factors"], marker=marker, s=22, alpha=0.6,
                 zorder=4)  # fmt: skip
    axes.errorbar([row["mean_fraction_explained"]], [row["mean_factor"]],
                  yerr=[row["factor_standard_error"]], marker=marker, ms=8, capsize=3,
                  zorder=5, label=shortened(row["name"], 60))  # fmt: skip
axes.axhline(4.0, color="tab:red", lw=0.8, ls="--")
axes.annotate("target, 4×", (0.0, 4.0), xytext=(3, 3), textcoords="offset points",
              fontsize=8, color="tab:red")  # fmt: skip
axes.set_xlim(0.0, 1.02)
axes.set_xlabel("share of τ's variance explained over the test trajectory")
axes.set_ylabel("resolution factor (▲: at least)")
axes.set_title("2D turbulence, 16²: what a closure of τ must explain", fontsize=10)
axes.legend(fontsize=6.5, loc="center left")
figure.tight_layout()
figure.savefig(output / "skill.png", dpi=120)
log(f"wrote {output / 'skill.json'} and {output / 'skill.png'}")
