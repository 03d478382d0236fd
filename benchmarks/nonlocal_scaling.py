# # Cost of one non-local closure update against the grid size
#
# This benchmark illustrates how to:
#
# - time one `NonlocalClosure.update()` split into its stages, as `closure.timings` reports
#   them: **sample** (operands interpolated into a DG space and evaluated at this rank's
#   grid points), **gather** (`MPI.Gatherv` of the samples to the root), **model** (one
#   call of the neural operator on the root), **scatter** (`MPI.Scatterv` of each rank's
#   sub-block of the output grid) and **interpolate** (multilinear interpolation to the
#   quadrature points and `scatter_forward`);
# - measure how the cost grows with the number of grid points $N = n^2$ for
#   $n = 32, \dots, 1024$ points per direction, and fit the exponent $p$ of
#   $t \propto N^p$ by least squares on a log-log scale, for the model alone and for the
#   whole update;
# - report the share of the gather and scatter in the update (the communication the grid
#   transfer adds), and compare one rank with two (`--compare-ranks`).
#
# The model is a fixed float32 Fourier neural operator (`neuralop.models.FNO`, 16 × 16
# modes, 32 hidden channels, 4 layers, `domain_padding=0.25` as on a non-periodic domain,
# which pads an $n^2$ grid to $(1.5 n)^2$), with random weights: the cost does not depend
# on them. Its input is the operands ``[u, grad(u)]`` of a P1 function (3 channels) plus the
# mask channel; its output one channel. The mesh is the unit square with $n \times n$
# squares cut into $2 n^2$ triangles, so that the mesh size follows the grid spacing
# $1/(n - 1)$; the closure has quadrature degree 2 (3 points per triangle).
#
# Every figure is a median over repeated updates after one warm-up update. Each update
# starts after a barrier. The stage times are the **root rank's**: every other rank waits
# for the root twice per update (the root gathers, then runs the model alone), so the
# root's stages are the critical path (on the other ranks `closure.timings["wait"]` is
# the wait for the root's model, spent asleep rather than polling MPI, so that the core
# is free). The update time is the maximum over the ranks of `closure.timings["total"]`.
# `torch.set_num_threads(1)` on every rank by default (`--threads`), serial and under MPI;
# `--root-threads` gives the root, which alone runs the model, more threads (the other
# ranks' cores are idle during the model). The 1-minute load average is recorded before
# and after each grid size: other jobs on the machine distort the figures.
#
# Results go to `benchmarks/results/nonlocal_scaling_<tag>.json`; rank 0 prints a table.
#
# ```
# python benchmarks/nonlocal_scaling.py                      # serial, 32² .. 1024²
# mpirun -n 2 python benchmarks/nonlocal_scaling.py          # 2 ranks (tag np2)
# python benchmarks/nonlocal_scaling.py --compare-ranks      # runs both, prints speed-up
# python benchmarks/nonlocal_scaling.py --quick              # smoke test (seconds)
# ```

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch
from _common import (
    device_name,
    existing_file,
    machine,
    ms,
    positive_int,
    refuse_quick_overrides,
    result_tag,
    run_serial_and_parallel,
    shared_cases,
)

# dolfinx_mno makes the MPI library of the dolfinx-solver wheel visible; it must be
# imported before dolfinx.
import dolfinx_mno as mno

# isort: split

import ufl
from dolfinx import fem, mesh
from neuralop.models import FNO

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP = 1
STAGES = ("sample", "gather", "model", "scatter", "interpolate")
SIZES = (32, 64, 128, 256, 512, 1024)
SHARE_SIZE = 256  # grid size at which the gather + scatter share is reported


# ## The model and the problem


def build_fno(num_channels: int, args: argparse.Namespace) -> torch.nn.Module:
    """The benchmark's float32 FNO, ``(1, num_channels, n, n) → (1, 1, n, n)``, seeded."""
    torch.manual_seed(0)
    return FNO(
        n_modes=(args.modes, args.modes),
        in_channels=num_channels,
        out_channels=1,
        hidden_channels=args.hidden,
        n_layers=args.layers,
        domain_padding=args.domain_padding,
    ).eval()


def build_closure(
    comm: MPI.Comm, n: int, args: argparse.Namespace
) -> tuple[mno.NonlocalClosure, int, float]:
    """The closure on an ``n × n`` grid over a unit square of ``2 n²`` triangles.

    Returns the closure, the global number of cells and the set-up time (maximum over the
    ranks) of the closure alone.
    """
    msh = mesh.create_unit_square(comm, n, n, mesh.CellType.triangle)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V, name="u")
    u.interpolate(lambda x: np.sin(2 * x[0]) * np.cos(x[1]) + x[1] ** 2)
    model = build_fno(msh.geometry.dim + 1 + 1, args)  # u, grad u, mask
    comm.Barrier()
    start = time.perf_counter()
    closure = mno.NonlocalClosure(
        model,
        [u, ufl.grad(u)],
        quadrature_degree=args.quadrature_degree,
        grid_shape=(n, n),
        device=args.device,
    )
    setup = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
    return closure, msh.topology.index_map(2).size_global, setup


# ## One size


def measure(comm: MPI.Comm, n: int, args: argparse.Namespace) -> dict[str, object]:
    """Time the updates of the closure on an ``n × n`` grid.

    After the warm-up, the number of timed updates is ``args.repeats``, reduced (to no
    fewer than ``args.min_repeats``) so that they take about ``args.time_budget`` seconds.
    """
    load_before = os.getloadavg()[0]
    closure, num_cells, setup = build_closure(comm, n, args)
    samples: list[dict[str, float]] = []  # this rank's timings, one per timed update
    totals: list[float] = []  # maximum over the ranks of the update time
    for _ in range(WARMUP):
        comm.Barrier()
        closure.update()
        warmup_time = comm.allreduce(closure.timings["total"], op=MPI.MAX)
    repeats = max(args.min_repeats, min(args.repeats, int(args.time_budget / warmup_time)))
    for _ in range(repeats):
        comm.Barrier()
        closure.update()
        samples.append(dict(closure.timings))
        totals.append(comm.allreduce(closure.timings["total"], op=MPI.MAX))
    load_after = os.getloadavg()[0]
    per_rank = comm.gather({k: float(np.median([s[k] for s in samples])) for k in samples[0]})
    quadrature_points = closure.function_space.dofmap.index_map.size_global
    result: dict[str, object] = {}
    if comm.rank == closure.root:
        assert per_rank is not None
        stages = per_rank[closure.root]
        update = float(np.median(totals))
        result = {
            "n": n,
            "grid_points": closure.grid.num_points,
            "cells": num_cells,
            "quadrature_points": quadrature_points,
            "repeats": repeats,
            "setup": setup,
            "stages": {k: stages[k] for k in STAGES},
            "root_total": stages["total"],
            "update": update,
            "communication_share": (stages["gather"] + stages["scatter"]) / update,
            "communication_bytes": closure.communication,
            "load_average": [load_before, load_after],
            "per_rank": per_rank,
        }
    result["peak_rss_gib"] = comm.gather(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    )
    return result


# ## Reporting


def fit_exponent(points: list[int], seconds: list[float]) -> float:
    """Least-squares slope ``p`` of ``log t = p log N + c``."""
    return float(np.polyfit(np.log(points), np.log(seconds), 1)[0])


def exponents(cases: list[dict[str, object]], smallest: int = 0) -> dict[str, float]:
    """Fitted exponents of the model, each stage and the update, over grids ``n ≥ smallest``."""
    chosen = [c for c in cases if c["n"] >= smallest]
    if len(chosen) < 2:
        return {}
    points = [c["grid_points"] for c in chosen]
    fits = {s: fit_exponent(points, [c["stages"][s] for c in chosen]) for s in STAGES}
    fits["update"] = fit_exponent(points, [c["update"] for c in chosen])
    return fits


def print_table(report: dict[str, object]) -> None:
    """Print the stage table, the fitted exponents and the communication share."""
    config = report["config"]
    print(
        f"\nnonlocal_scaling: {config['ranks']} rank(s) × {config['threads']} thread(s) "
        f"(root: {config['root_threads']}), "
        f"device {config['device']}, FNO {config['modes']} modes, {config['hidden']} hidden, "
        f"{config['layers']} layers, domain padding {config['domain_padding']}, fp32"
    )
    load = report["load_average"]
    print(
        "1-min load average before/after: "
        f"{load['before'][0]:.2f}/{load['after'][0]:.2f} (on {report['machine']['cores']} cores)"
    )
    print("times in ms (median; stages on the root rank, update = max over ranks)")
    header = ["grid", "points", "cells", "reps", *STAGES, "update", "g+s %", "setup s", "GiB"]
    header += ["load"]
    print(" ".join(f"{h:>11}" for h in header))
    for case in report["cases"]:
        row = [f"{case['n']}²", str(case["grid_points"]), str(case["cells"]), str(case["repeats"])]
        row += [ms(case["stages"][s]) for s in STAGES]
        row += [ms(case["update"]), f"{100 * case['communication_share']:.1f}"]
        row += [f"{case['setup']:.2f}", f"{max(case['peak_rss_gib']):.2f}"]
        row += ["/".join(f"{load:.1f}" for load in case["load_average"])]
        print(" ".join(f"{c:>11}" for c in row))
    for label, fits in report["exponents"].items():
        if fits:
            text = ", ".join(f"{k} {v:.2f}" for k, v in fits.items())
            print(f"exponent p of t ∝ N^p, {label}: {text}")
    share = report.get("communication_share_at_256")
    if share is not None:
        print(f"gather + scatter share of the update at {SHARE_SIZE}²: {100 * share:.1f} %")


def compare_files(one: Path, many: Path) -> list[dict[str, object]]:
    """Speed-up of the update and of each stage from the run in ``one`` to ``many``."""
    reports = [json.loads(path.read_text()) for path in (one, many)]
    cases = [{c["n"]: c for c in r["cases"]} for r in reports]
    ranks = [r["config"]["ranks"] for r in reports]
    shared = shared_cases(cases[0], cases[1], (one.name, many.name))
    rows = []
    print(f"\nnon-local update, {ranks[0]} rank(s) ({one.name}) vs {ranks[1]} ({many.name})")
    header = ["grid", "update 1", "update 2", "speed-up", "model 1", "model 2", "g+s % 2"]
    print(" ".join(f"{h:>10}" for h in header))
    for n in sorted(shared):
        first, second = cases[0][n], cases[1][n]
        rows.append(
            {
                "n": n,
                "ranks": ranks,
                "update": [first["update"], second["update"]],
                "speedup": first["update"] / second["update"],
                "stage_speedup": {s: first["stages"][s] / second["stages"][s] for s in STAGES},
                "communication_share": [
                    first["communication_share"],
                    second["communication_share"],
                ],
            }
        )
        row = [f"{n}²", ms(first["update"]), ms(second["update"])]
        row += [f"{first['update'] / second['update']:.2f}"]
        row += [ms(first["stages"]["model"]), ms(second["stages"]["model"])]
        row += [f"{100 * second['communication_share']:.1f}"]
        print(" ".join(f"{c:>10}" for c in row))
    return rows


def compare_ranks(args: argparse.Namespace) -> None:
    """Run the benchmark on 1 and on ``args.ranks`` ranks and compare the update times."""
    script = str(Path(__file__).resolve())
    forwarded = [
        "--repeats",
        str(args.repeats),
        "--min-repeats",
        str(args.min_repeats),
        "--time-budget",
        str(args.time_budget),
        "--threads",
        str(args.threads),
        "--root-threads",
        str(args.root_threads),
        "--device",
        args.device,
        "--modes",
        str(args.modes),
        "--hidden",
        str(args.hidden),
        "--layers",
        str(args.layers),
        "--domain-padding",
        str(args.domain_padding),
        "--quadrature-degree",
        str(args.quadrature_degree),
        "--sizes",
        *[str(s) for s in args.sizes],
    ]
    tags = run_serial_and_parallel(script, forwarded, args.tag, args.ranks, args.mpirun)
    prefix = f"{args.tag}_" if args.tag else ""
    paths = [RESULTS / f"nonlocal_scaling_{tag}.json" for tag in tags]
    rows = compare_files(*paths)
    output = RESULTS / f"nonlocal_scaling_{prefix}comparison.json"
    output.write_text(json.dumps(rows, indent=2))
    print(f"wrote {output}")


# ## Driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``argv``: default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        description="Time non-local closure updates against the grid size (see the header)."
    )
    parser.add_argument(
        "--sizes",
        type=positive_int,
        nargs="+",
        default=list(SIZES),
        help="grid points per direction (default: 32 64 128 256 512 1024)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=15, help="most timed updates per size"
    )
    parser.add_argument(
        "--min-repeats",
        type=positive_int,
        default=3,
        help="fewest timed updates per size (default 3)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=20.0,
        help="seconds of timed updates per size, within the repeat bounds (default 20)",
    )
    parser.add_argument(
        "--tag",
        default=None,
        help="result file tag (default: np<ranks>; with --compare-ranks, a prefix)",
    )
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="cpu, cuda or auto (default: cpu)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch.set_num_threads per rank (default 1, serial and under MPI)",
    )
    parser.add_argument(
        "--root-threads",
        type=positive_int,
        default=None,
        help="torch.set_num_threads on the rank that runs the model (default: --threads)",
    )
    parser.add_argument("--modes", type=positive_int, default=16, help="FNO modes per direction")
    parser.add_argument("--hidden", type=positive_int, default=32, help="FNO hidden channels")
    parser.add_argument("--layers", type=positive_int, default=4, help="FNO layers")
    parser.add_argument(
        "--domain-padding", type=float, default=0.25, help="FNO domain padding (default 0.25)"
    )
    parser.add_argument(
        "--quadrature-degree", type=positive_int, default=2, help="closure quadrature"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument(
        "--compare-ranks",
        action="store_true",
        help="run serially and under mpirun -n RANKS, then print the speed-up",
    )
    parser.add_argument("--ranks", type=positive_int, default=2, help="ranks for --compare-ranks")
    parser.add_argument("--mpirun", default=None, help="mpirun for --compare-ranks")
    parser.add_argument(
        "--compare",
        nargs=2,
        type=existing_file,
        metavar=("ONE_RANK.json", "MANY_RANKS.json"),
        help="only compare two result files",
    )
    args = parser.parse_args(argv)
    refuse_quick_overrides(parser, args, ["sizes"])
    if args.root_threads is None:
        args.root_threads = args.threads
    if args.quick:
        args.sizes = [32, 64]
        args.repeats = min(args.repeats, 3)
        args.min_repeats = min(args.min_repeats, args.repeats)
    return args


def main() -> None:
    """Run the benchmark."""
    args = parse_args()
    comm = MPI.COMM_WORLD
    if args.compare is not None:
        if comm.rank == 0:
            compare_files(*args.compare)
        return
    if args.compare_ranks:
        if comm.size > 1:
            raise SystemExit("--compare-ranks launches mpirun itself; run it serially.")
        compare_ranks(args)
        return

    torch.set_num_threads(args.root_threads if comm.rank == 0 else args.threads)
    device = mno.resolve_device(args.device, comm)
    # Other processes on the machine distort the figures; the load average says if any ran.
    load_before = os.getloadavg()
    cases = []
    for n in sorted(args.sizes):
        case = measure(comm, n, args)
        gc.collect()  # free this size's mesh and closure before the next, on every rank
        if comm.rank == 0:
            cases.append(case)
            print(
                f"  {n:>5}²: update {ms(case['update'])} ms (model {ms(case['stages']['model'])} "
                f"ms), {case['repeats']} repeats, set-up {case['setup']:.2f} s",
                flush=True,
            )
    if comm.rank != 0:
        return

    report: dict[str, object] = {
        "config": {
            "ranks": comm.size,
            "threads": args.threads,
            "root_threads": args.root_threads,
            "device": str(device),
            "modes": args.modes,
            "hidden": args.hidden,
            "layers": args.layers,
            "domain_padding": args.domain_padding,
            "dtype": "float32",
            "operands": "[u, grad(u)], P1",
            "quadrature_degree": args.quadrature_degree,
            "warmup": WARMUP,
            "repeats": args.repeats,
            "min_repeats": args.min_repeats,
            "time_budget": args.time_budget,
        },
        "machine": machine(device),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "cases": cases,
        "exponents": {
            "all sizes": exponents(cases),
            "n >= 128": exponents(cases, smallest=128),
        },
    }
    share = next((c["communication_share"] for c in cases if c["n"] == SHARE_SIZE), None)
    report["communication_share_at_256"] = share
    print_table(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"nonlocal_scaling_{result_tag(args.tag, comm.size, args.quick)}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
