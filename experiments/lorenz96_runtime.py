"""Lorenz 96: the cost of a coarse MNO step against a step of the full two-level model.

The runtime study of ``docs/lorenz96.md``. It times the MNO that
``demos/lorenz96/demo_lorenz96.py`` trains (``demos/output/lorenz96/mno.pt``)::

    python demos/lorenz96/demo_lorenz96.py     # the closures (about 5-7 minutes, full)
    python experiments/lorenz96_runtime.py     # K = J = 2^6 ... 2^14 (about 2 minutes)
    python experiments/lorenz96_runtime.py --min-log2-k 12 --max-log2-k 12 --neuralop

For K = J = 2^6, ..., 2^14 (2^11 after a ``--quick`` demo run): the cost of one coarse
step with the MNO closure (one FNO evaluation and the RK4 step of the slow variables, one
state) against one step of the full model (one state). Each is the median over repeats
after a warm-up call, in this process alone (it refuses to run under MPI), with
``--threads`` torch threads. The FNO is the trained one: its cost does not depend on the
weights, and it runs at any K (the closure values at other K mean nothing here; only
the cost counts). The MNO step uses the lean evaluation ``RingFNO`` (``ring_fno.py``);
``--neuralop`` also times the step with neuraloperator's own ``FNO.forward``. The full
model needs five arrays of KJ float64 values, 10 GiB at K = 2^14; a size that does not fit
in the available memory is skipped, and said so. The cost exponents are least-squares
fits of log(cost) = p log K + const over all sizes and over K >= 2^10.

The machine may be shared: the timings are medians, but other processes competing for
memory bandwidth slow the memory-bound full model more than the MNO.

Writes ``experiments/output/lorenz96/runtime.md``, ``runtime.json`` and
``lorenz96_runtime.png``; asserts that the MNO step is cheaper than the full step at the
largest K timed, and that ``RingFNO`` agrees with the model (relative difference below
1e-5 on the timed states).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from mpi4py import MPI

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from dolfinx_mno.io import load_model

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY / "demos"), str(REPOSITORY / "demos" / "lorenz96")]
from lorenz96 import F, TwoLevelLorenz96, coarse_step, dtype, field_closure
from ring_fno import RingFNO
from utilities import output_folder, positive_int

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument(
    "--demo-output",
    type=Path,
    default=REPOSITORY / "demos" / "output" / "lorenz96",
    help="the folder the Lorenz 96 demo wrote (default: demos/output/lorenz96)",
)
parser.add_argument("--min-log2-k", type=positive_int, default=6, help="smallest K = 2^n timed")
parser.add_argument(
    "--max-log2-k",
    type=positive_int,
    default=None,
    help="largest K = 2^n timed (14; 11 after --quick)",
)
parser.add_argument("--threads", type=positive_int, default=1, help="torch threads")
parser.add_argument("--neuralop", action="store_true", help="also time neuraloperator's FNO")
args = parser.parse_args()

if MPI.COMM_WORLD.size > 1:
    sys.exit("the runtime study times a single process: run it without mpirun")
files = [args.demo_output / name for name in ("closures.json", "mno.pt")]
if not all(path.is_file() for path in files):
    sys.exit(f"{args.demo_output} has no closures.json or mno.pt: run the Lorenz 96 demo first")
demo = json.loads(files[0].read_text())
max_log2_k = args.max_log2_k or (11 if demo["quick"] else 14)
if max_log2_k < args.min_log2_k:
    parser.error(f"--max-log2-k {max_log2_k} is below --min-log2-k {args.min_log2_k}")
seed = demo["settings"]["seed"]
output = output_folder("lorenz96", root=REPOSITORY / "experiments" / "output")
torch.set_num_threads(args.threads)
torch.use_deterministic_algorithms(True)
model = load_model(files[1])
closures = {"MNO": RingFNO(model)}
if args.neuralop:
    closures["neuralop FNO"] = field_closure(model)


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


def cost_exponent(k_values, seconds, k_min=0):
    """Least-squares slope of log(seconds) against log(K), over K >= k_min."""
    points = [(k, s) for k, s in zip(k_values, seconds, strict=True) if s and k >= k_min]
    if len(points) < 2:
        return float("nan")
    k_array, s_array = np.array(points).T
    return float(np.polyfit(np.log(k_array), np.log(s_array), 1)[0])


timings = {"K": [], "full": [], **{name: [] for name in closures}}
lean_error = {}
tic = time.perf_counter()
for log2_k in range(args.min_log2_k, max_log2_k + 1):
    num_slow = 2**log2_k
    x_timing, _ = timing_state(num_slow, 1)
    with torch.inference_mode():
        for name, closure in closures.items():
            timings[name].append(median_seconds(lambda x=x_timing, f=closure: coarse_step(x, f)))
        reference = field_closure(model)(x_timing)
        lean = (closures["MNO"](x_timing) - reference).abs().max() / reference.abs().max()
        lean_error[num_slow] = float(lean)
    full_seconds = None
    needed, free = 5.05 * 8 * num_slow**2, available_memory()
    if free is None or needed < 0.8 * free:
        full_model = TwoLevelLorenz96(*timing_state(num_slow, num_slow))
        full_seconds = median_seconds(full_model.step)
        del full_model
    else:
        print(f"K = 2^{log2_k}: full model skipped, needs {needed / 2**30:.1f} GiB")
    timings["K"].append(num_slow)
    timings["full"].append(full_seconds)
    full_text = "skipped" if full_seconds is None else f"{full_seconds * 1e3:10.2f} ms"
    steps = ", ".join(f"{name} step {timings[name][-1] * 1e3:8.3f} ms" for name in closures)
    print(f"K = J = 2^{log2_k:<2d}: {steps}, full step {full_text}", flush=True)
seconds = time.perf_counter() - tic

exponents = {
    name: {
        "all K": cost_exponent(timings["K"], timings[name]),
        "K >= 2^10": cost_exponent(timings["K"], timings[name], k_min=2**10),
    }
    for name in ("MNO", "full")
}
speed_up = {
    k: full / fast
    for k, full, fast in zip(timings["K"], timings["full"], timings["MNO"], strict=True)
    if full is not None
}

lines = [
    f"Cost of one step (median, one state, {args.threads} thread(s)); the MNO "
    f"trained in the demo's {'quick' if demo['quick'] else 'full'} run.",
    "",
    "| K = J | full model (ms) | MNO coarse step (ms) | speed-up |"
    + (" neuralop `FNO` step (ms) |" if args.neuralop else ""),
    "| ---: | ---: | ---: | ---: |" + (" ---: |" if args.neuralop else ""),
]
for i, k in enumerate(timings["K"]):
    full, fast = timings["full"][i], timings["MNO"][i]
    full_text = "not measured" if full is None else f"{full * 1e3:.3f}"
    ratio = "-" if full is None else f"{full / fast:.1f}"
    extra = f" {timings['neuralop FNO'][i] * 1e3:.3f} |" if args.neuralop else ""
    lines.append(f"| {k} | {full_text} | {fast * 1e3:.3f} | {ratio} |{extra}")
lines += [
    "",
    "Cost exponents (least squares of log cost against log K): "
    + "; ".join(
        f"{name}: {values['all K']:.2f} (all K), {values['K >= 2^10']:.2f} (K >= 1024)"
        for name, values in exponents.items()
    ),
]
table = "\n".join(lines)
print("\n" + table)
(output / "runtime.md").write_text(table + "\n")
results = {
    "threads": args.threads,
    "timings": timings,
    "exponents": exponents,
    "speed_up": speed_up,
    "lean_error": lean_error,
    "seconds": seconds,
    "load_average": os.getloadavg(),
    "versions": {"torch": torch.__version__, "numpy": np.__version__},
    "cpu_count": os.cpu_count(),
}
(output / "runtime.json").write_text(json.dumps(results, indent=2) + "\n")
fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
k_array = np.array(timings["K"], dtype=float)
full_array = np.array([np.nan if s is None else s for s in timings["full"]])
label_full = f"full model (slope {exponents['full']['all K']:.2f})"
label_mno = f"MNO coarse step (slope {exponents['MNO']['all K']:.2f})"
ax.loglog(k_array, full_array * 1e3, "ko-", label=label_full)
ax.loglog(k_array, np.array(timings["MNO"]) * 1e3, "C3s-", label=label_mno)
ax.set(xlabel="$K = J$", ylabel="cost of one step (ms)", title="Runtime, one state")
ax.legend()
fig.savefig(output / "lorenz96_runtime.png", dpi=100)
print(f"outputs written to {output} ({seconds:.0f} s)")

largest = max((k for k, s in zip(timings["K"], timings["full"], strict=True) if s), default=None)
assert largest is None or speed_up[largest] > 1.0, f"the MNO step is slower at K={largest}"
assert max(lean_error.values()) < 1e-5, f"RingFNO differs from the model: {lean_error}"
print("all checks passed")
