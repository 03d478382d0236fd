# # Strong scaling of the 2D turbulence runs from 1 to 2 ranks
#
# This benchmark illustrates how to:
#
# - time one step of the fine DNS of the 2D turbulence demo (`demos/turbulence_2d/flow.py`:
#   vorticity–streamfunction, ω in P1 and ψ in P2, IMEX Euler with one constant matrix
#   factorised once by MUMPS) on 1 and on 2 ranks, after a warm-up, and split it into the
#   right-hand side **assembly** and the rest, the MUMPS **triangular solves** (and the
#   copies of the step); the solves alone are also timed, repeated on one right-hand side;
# - time its set-up: the problem's construction, the initial state (a P2 Poisson solve,
#   factorisation included), the assembly of the step matrix and its MUMPS
#   **factorisation**;
# - time one step of a coarse run with a non-local closure (`NonlocalClosure` around a
#   neuraloperator FNO, updated at every step), split into the **FE** part of the step and
#   the **closure update** (`closure.timings`: sample, gather, model, scatter,
#   interpolate), and the same coarse run without closure for reference;
# - record the memory per rank: the peak resident set size (`ru_maxrss`), the resident set
#   size before and after the case, and MUMPS's own figure (`INFO(16)`, the MiB used by the
#   factorisation on the rank);
# - run both rank counts from one command, several rounds interleaved (1 rank, 2 ranks,
#   1 rank, ...) because the machine is shared, and print one table of speed-ups and
#   parallel efficiencies.
#
# The model is an untrained float32 `neuralop.models.FNO` (16 × 16 modes, 32 hidden
# channels, 4 layers, `domain_padding=0.25` on the non-periodic box); its cost does not
# depend on the weights. Its inputs are the coarse vorticity and velocity at the previous
# step (ω, u₁, u₂, plus the mask channel), its output the 2-vector flux τ that enters
# `dt * inner(τ, grad(v))`. The grid has `grid_refinement * n + 1` points per direction
# over the box (spacing h / 2 by default). The time step is `cfl * h` with `h = 2π / n`.
#
# Each process sets `OMP_NUM_THREADS`, `OPENBLAS_NUM_THREADS` and `MKL_NUM_THREADS` to 1
# unless they are set, and `torch.set_num_threads(1)`: a strong-scaling comparison of 1
# rank × 1 thread against 2 ranks × 1 thread. Step times are the maximum over the ranks,
# each step after a barrier; so is the step's CPU time (`time.process_time`), the work a
# rank did whatever share of a core the other jobs left it (MPI's waits inside MUMPS's
# solves poll, and count); a case's figure is the median over its timed steps, and the
# comparison takes, per case and rank count, the round with the smallest median (other
# jobs on a shared machine only ever add time). The 1-minute load average is recorded
# before and after each case.
#
# Results go to `benchmarks/results/turbulence_scaling_<tag>.json`; rank 0 prints a table.
#
# ```
# python benchmarks/turbulence_scaling.py --compare-ranks    # 1 and 2 ranks, 2 rounds
# python benchmarks/turbulence_scaling.py                    # one run, 1 rank (tag np1)
# mpirun -n 2 python benchmarks/turbulence_scaling.py        # one run, 2 ranks (tag np2)
# python benchmarks/turbulence_scaling.py --compare-ranks --rounds 2 --first-round 3
#                                                  # 2 more rounds, compared with the first 3
# python benchmarks/turbulence_scaling.py --compare-only    # compare the rounds on file
# python benchmarks/turbulence_scaling.py --quick --compare-ranks   # smoke test
# ```

from __future__ import annotations

import os

# One thread per rank for the BLAS of PETSc/MUMPS and NumPy: set before they are loaded.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse
import gc
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpi4py import MPI

import numpy as np
import torch
from _common import (
    device_name,
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

from neuralop.models import FNO

from dolfinx_mno.timestepping import IMEXStepper

DEMOS = Path(__file__).resolve().parents[1] / "demos"
sys.path[:0] = [str(DEMOS / "turbulence_2d"), str(DEMOS)]  # flow.py imports utilities
from flow import VorticityFlow, initial_vorticity, length

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("coarse", "coarse+MNO", "fine")
STAGES = ("sample", "gather", "model", "scatter", "interpolate")


# ## The runs


def build_fno(args: argparse.Namespace) -> torch.nn.Module:
    """The untrained float32 FNO, ``(1, 4, g, g) → (1, 2, g, g)`` (ω, u, mask → τ), seeded."""
    torch.manual_seed(0)
    return FNO(
        n_modes=(args.modes, args.modes),
        in_channels=1 + 2 + 1,
        out_channels=2,
        hidden_channels=args.hidden,
        n_layers=args.layers,
        domain_padding=args.domain_padding,
    ).eval()


def build_flow(kind: str, n: int, args: argparse.Namespace, comm: MPI.Comm) -> VorticityFlow:
    """The flow of one case: ``kind`` is ``coarse``, ``coarse+MNO`` or ``fine``."""
    closure = None
    if kind == "coarse+MNO":
        grid_points = args.grid_refinement * n + 1

        def closure(omega_n: Any, velocity_n: Any) -> tuple[Any, Any]:
            tau = mno.NonlocalClosure(
                build_fno(args),
                [omega_n, velocity_n],
                value_shape=(2,),
                quadrature_degree=2,
                grid_shape=(grid_points, grid_points),
                bounding_box=((0.0, 0.0), (length, length)),
                device=args.device,
            )
            return tau, tau.dx

    name = kind.replace("+", "_").lower() + str(n)
    return VorticityFlow(n, args.cfl * length / n, args.nu, closure=closure, name=name, comm=comm)


def timed(comm: MPI.Comm, function: Callable[[], object]) -> float:
    """Call ``function()`` after a barrier; returns its wall time, the slowest rank's."""
    comm.Barrier()
    start = time.perf_counter()
    function()
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX)


def resident_gib() -> float:
    """This process's current resident set size in GiB (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20  # kB
    return float("nan")


def measure(comm: MPI.Comm, kind: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Set up and time one case; the figures are complete on rank 0 only."""
    load_before = os.getloadavg()[0]
    rss_before = resident_gib()
    comm.Barrier()
    start = time.perf_counter()
    flow = build_flow(kind, n, args, comm)
    setup = {"construct": comm.allreduce(time.perf_counter() - start, op=MPI.MAX)}
    setup["initial_state"] = timed(comm, lambda: flow.set_vorticity(initial_vorticity(0)))
    problem = flow.problem
    setup["matrix_assembly"] = timed(comm, problem.assemble_operator)
    setup["factorisation"] = timed(comm, problem.solver.setUp)
    factor = problem.solver.getPC().getFactorMatrix()
    mumps_mib = float(factor.getMumpsInfo(16))  # MiB used by the factorisation on this rank

    closure = flow.closure
    stepper = IMEXStepper(
        problem, flow.w, flow.w_previous, flow.dt, 0.0, flow.time, flow.closure_interval
    )
    for _ in range(args.warmup):
        comm.Barrier()
        stepper.step()
    # Per step, this rank's: the step, the closure update in it, the right-hand side
    # assembly in it (through a timing wrapper), the rest (the MUMPS solves and copies), and
    # the step's CPU time: the work of the rank, whatever share of a core it was given.
    rhs_seconds = [0.0]
    assemble_rhs = problem.assemble_rhs

    def timed_assemble_rhs() -> None:
        start = time.perf_counter()
        assemble_rhs()
        rhs_seconds[0] += time.perf_counter() - start

    problem.assemble_rhs = timed_assemble_rhs  # type: ignore[method-assign]
    local = np.zeros((args.steps, 6))
    stages = []
    for i in range(args.steps):
        rhs_seconds[0] = 0.0
        comm.Barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        stepper.step()
        local[i, 0] = time.perf_counter() - start
        local[i, 5] = time.process_time() - cpu_start
        local[i, 1] = closure.timings["total"] if closure is not None else 0.0
        local[i, 2] = local[i, 0] - local[i, 1]
        local[i, 3] = rhs_seconds[0]
        local[i, 4] = local[i, 2] - local[i, 3]
        if closure is not None:
            stages.append([closure.timings[s] for s in STAGES])
    problem.assemble_rhs = assemble_rhs  # type: ignore[method-assign]
    slowest = np.empty_like(local)
    comm.Allreduce(local, slowest, op=MPI.MAX)
    cpu_total = np.empty(args.steps)
    comm.Allreduce(np.ascontiguousarray(local[:, 5]), cpu_total, op=MPI.SUM)
    # The triangular solves alone, repeated on the last right-hand side.
    solve_alone = [
        timed(comm, lambda: problem.solver.solve(problem.b, problem.x))
        for _ in range(args.breakdown)
    ]
    finite = comm.allreduce(bool(np.isfinite(flow.w.x.array).all()), op=MPI.LAND)
    index_map = flow.W.dofmap.index_map
    dofs = index_map.size_global * flow.W.dofmap.index_map_bs
    memory = {
        "peak_rss_gib": comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
        "rss_before_gib": comm.gather(rss_before),
        "rss_after_gib": comm.gather(resident_gib()),
        "mumps_factorisation_mib": comm.gather(mumps_mib),
        "owned_dofs": comm.gather(index_map.size_local * flow.W.dofmap.index_map_bs),
    }
    result: dict[str, Any] = {}
    if comm.rank == 0:
        median = np.median(slowest, axis=0)
        result = {
            "kind": kind,
            "n": n,
            "dofs": dofs,
            "cells": flow.mesh.topology.index_map(2).size_global,
            "dt": flow.dt,
            "steps": args.steps,
            "warmup": args.warmup,
            "setup": setup,
            "step": float(median[0]),
            "closure": float(median[1]),
            "fe": float(median[2]),
            "step_min": float(slowest[:, 0].min()),
            "step_max": float(slowest[:, 0].max()),
            "assemble_rhs": float(median[3]),
            "solve": float(median[4]),
            "solve_alone": float(np.median(solve_alone)),
            "step_cpu": float(median[5]),
            "step_cpu_total": float(np.median(cpu_total)),
            "finite": finite,
            "load_average": [load_before, os.getloadavg()[0]],
            **memory,
        }
        if closure is not None:
            root_stages = np.median(np.array(stages), axis=0)
            result["closure_stages"] = dict(zip(STAGES, map(float, root_stages), strict=True))
            result["grid_points"] = closure.grid.num_points
            result["communication_bytes"] = closure.communication
    return result


# ## Reporting


def print_run(report: dict[str, Any]) -> None:
    """Print one run's table (rank 0)."""
    config = report["config"]
    print(f"\nturbulence_scaling: {config['ranks']} rank(s) × 1 thread; times in ms (medians)")
    header = ["case", "dofs", "step", "CPU", "FE", "closure", "rhs", "solve", "factor s"]
    header += ["GiB/rank"]
    print(" ".join(f"{h:>12}" for h in header))
    for case in report["cases"]:
        row = [f"{case['kind']} {case['n']}²", str(case["dofs"]), ms(case["step"])]
        row += [ms(case["step_cpu"])]
        row += [ms(case["fe"]), ms(case["closure"]), ms(case["assemble_rhs"]), ms(case["solve"])]
        row += [f"{case['setup']['factorisation']:.2f}", f"{max(case['peak_rss_gib']):.2f}"]
        print(" ".join(f"{c:>12}" for c in row))


def best_rounds(paths: list[Path]) -> tuple[dict[tuple[str, int], dict[str, Any]], list]:
    """Per case, the round with the smallest median step time (with every round's in
    ``round_steps``); and each round's file name and load average."""
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    rounds = []
    for path in paths:
        report = json.loads(path.read_text())
        rounds.append({"file": path.name, "load_average": report["load_average"]})
        for case in report["cases"]:
            runs.setdefault((case["kind"], case["n"]), []).append(case)
    best = {}
    for key, cases in runs.items():
        best[key] = dict(min(cases, key=lambda case: case["step"]))
        best[key]["round_steps"] = [case["step"] for case in cases]
    return best, rounds


def compare_files(one: list[Path], many: list[Path], ranks: int) -> dict[str, Any]:
    """Speed-up and efficiency from the 1-rank runs in ``one`` to the runs in ``many``."""
    (first, rounds_one), (second, rounds_many) = best_rounds(one), best_rounds(many)
    names = [f"the runs {[path.name for path in paths]}" for paths in (one, many)]
    shared = shared_cases(first, second, names)
    rows = []
    print(
        f"\nturbulence_scaling, 1 rank vs {ranks} (1 thread each), best of "
        f"{len(one)}/{len(many)} round(s); times in ms, set-up in s, memory per rank"
    )
    header = ["case", "dofs", "step 1", f"step {ranks}", "speed-up", "effic.", "CPU s-up"]
    header += [f"FE {ranks}"]
    header += [f"closure {ranks}", f"rhs {ranks}", f"solve {ranks}", "factor 1", f"factor {ranks}"]
    header += ["GiB 1", f"GiB {ranks}", "MUMPS MiB 1", f"MUMPS MiB {ranks}"]
    print(" ".join(f"{h:>11}" for h in header))
    for key in sorted(shared, key=lambda k: (KINDS.index(k[0]), k[1])):
        a, b = first[key], second[key]
        speedup = a["step"] / b["step"]
        row = {
            "kind": key[0],
            "n": key[1],
            "dofs": a["dofs"],
            "ranks": [1, ranks],
            "step": [a["step"], b["step"]],
            "round_steps": [a["round_steps"], b["round_steps"]],
            "speedup": speedup,
            "efficiency": speedup / ranks,
            "step_cpu": [a["step_cpu"], b["step_cpu"]],
            "cpu_speedup": a["step_cpu"] / b["step_cpu"],
            "step_cpu_total": [a["step_cpu_total"], b["step_cpu_total"]],
            "fe": [a["fe"], b["fe"]],
            "fe_speedup": a["fe"] / b["fe"],
            "closure": [a["closure"], b["closure"]],
            "closure_stages": [a.get("closure_stages"), b.get("closure_stages")],
            "assemble_rhs": [a["assemble_rhs"], b["assemble_rhs"]],
            "solve": [a["solve"], b["solve"]],
            "solve_alone": [a["solve_alone"], b["solve_alone"]],
            "setup": [a["setup"], b["setup"]],
            "peak_rss_gib": [a["peak_rss_gib"], b["peak_rss_gib"]],
            "rss_before_gib": [a["rss_before_gib"], b["rss_before_gib"]],
            "mumps_factorisation_mib": [a["mumps_factorisation_mib"], b["mumps_factorisation_mib"]],
            "load_average": [a["load_average"], b["load_average"]],
            "finite": a["finite"] and b["finite"],
        }
        rows.append(row)
        cells = [f"{key[0]} {key[1]}²", str(a["dofs"]), ms(a["step"]), ms(b["step"])]
        cells += [f"{speedup:.2f}", f"{speedup / ranks:.0%}"]
        cells += [f"{a['step_cpu'] / b['step_cpu']:.2f}", ms(b["fe"]), ms(b["closure"])]
        cells += [ms(b["assemble_rhs"]), ms(b["solve"])]
        cells += [f"{a['setup']['factorisation']:.2f}", f"{b['setup']['factorisation']:.2f}"]
        cells += [f"{max(a['peak_rss_gib']):.2f}", f"{max(b['peak_rss_gib']):.2f}"]
        cells += [f"{max(a['mumps_factorisation_mib']):.0f}"]
        cells += [f"{max(b['mumps_factorisation_mib']):.0f}"]
        print(" ".join(f"{c:>11}" for c in cells))
    return {"rows": rows, "rounds": {"1": rounds_one, str(ranks): rounds_many}}


def compare_ranks(args: argparse.Namespace) -> None:
    """Run ``args.rounds`` rounds of 1 rank then ``args.ranks`` ranks; compare the best."""
    script = str(Path(__file__).resolve())
    forwarded = ["--fine-sizes", *map(str, args.fine_sizes), "--coarse-sizes"]
    forwarded += [*map(str, args.coarse_sizes), "--steps", str(args.steps)]
    forwarded += ["--warmup", str(args.warmup), "--breakdown", str(args.breakdown)]
    forwarded += ["--cfl", str(args.cfl), "--nu", str(args.nu), "--modes", str(args.modes)]
    forwarded += ["--hidden", str(args.hidden), "--layers", str(args.layers)]
    forwarded += ["--domain-padding", str(args.domain_padding)]
    forwarded += ["--grid-refinement", str(args.grid_refinement)]
    forwarded += ["--output-dir", str(args.output_dir)]
    prefix = f"{args.tag}_" if args.tag else ""
    for i in range(args.first_round, args.first_round + args.rounds):
        run_serial_and_parallel(script, forwarded, f"{prefix}r{i}", args.ranks, args.mpirun)
    compare_rounds(args)


def compare_rounds(args: argparse.Namespace) -> None:
    """Compare every round in ``args.output_dir`` whose tag is ``<args.tag>_r<i>``."""
    prefix = f"{args.tag}_" if args.tag else ""

    def round_files(ranks: int) -> list[Path]:
        pattern = f"turbulence_scaling_{prefix}r[0-9]*_np{ranks}.json"
        return sorted(args.output_dir.glob(pattern))

    paths = [round_files(1), round_files(args.ranks)]
    if not all(paths):
        raise SystemExit(f"no round files {prefix}r<i>_np1/np{args.ranks} in {args.output_dir}")
    comparison = compare_files(*paths, ranks=args.ranks)
    output = args.output_dir / f"turbulence_scaling_{prefix}comparison.json"
    output.write_text(json.dumps(comparison, indent=2))
    print(f"wrote {output}")


# ## Driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``argv``: else ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        description="Strong scaling of the 2D turbulence runs, 1 to 2 ranks (see the header)."
    )
    parser.add_argument("--fine-sizes", type=positive_int, nargs="+", default=[256, 512])
    parser.add_argument("--coarse-sizes", type=positive_int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--breakdown", type=positive_int, default=5, help="repeats of the solves alone (default 5)"
    )
    parser.add_argument("--cfl", type=float, default=0.25, help="dt = cfl * h (default 0.25)")
    parser.add_argument("--nu", type=float, default=1e-3, help="viscosity (default 1e-3)")
    parser.add_argument("--modes", type=positive_int, default=16, help="FNO modes per direction")
    parser.add_argument("--hidden", type=positive_int, default=32, help="FNO hidden channels")
    parser.add_argument("--layers", type=positive_int, default=4, help="FNO layers")
    parser.add_argument("--domain-padding", type=float, default=0.25, help="FNO padding")
    parser.add_argument(
        "--grid-refinement", type=positive_int, default=2, help="grid points per coarse cell side"
    )
    parser.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="the MNO's device: cpu, cuda or auto (default cpu)",
    )
    parser.add_argument("--tag", default=None, help="result tag (default np<ranks>)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="result folder")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument(
        "--compare-ranks",
        action="store_true",
        help="run serially and under mpirun -n RANKS, ROUNDS times, then compare",
    )
    parser.add_argument("--ranks", type=positive_int, default=2, help="ranks for --compare-ranks")
    parser.add_argument("--rounds", type=positive_int, default=2, help="rounds for --compare-ranks")
    parser.add_argument(
        "--first-round", type=int, default=0, help="number of the first round (to add rounds)"
    )
    parser.add_argument("--mpirun", default=None, help="mpirun for --compare-ranks")
    parser.add_argument(
        "--compare-only",
        action="store_true",
        help="only compare the round files of --tag in --output-dir",
    )
    args = parser.parse_args(argv)
    names = ["fine_sizes", "coarse_sizes", "steps", "warmup", "breakdown", "rounds"]
    refuse_quick_overrides(parser, args, names)
    if args.quick:
        args.fine_sizes, args.coarse_sizes = [32], [16]
        args.steps, args.warmup, args.breakdown, args.rounds = 3, 1, 2, 1
    return args


def main() -> None:
    """Run the benchmark."""
    args = parse_args()
    comm = MPI.COMM_WORLD
    if args.compare_only:
        if comm.rank == 0:
            compare_rounds(args)
        return
    if args.compare_ranks:
        if comm.size > 1:
            raise SystemExit("--compare-ranks launches mpirun itself; run it serially.")
        compare_ranks(args)
        return
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    # Small cases first: the peak resident set size (a running maximum) is then each
    # case's own, up to what the earlier, smaller cases left behind.
    plan = [(kind, n) for kind in KINDS[:2] for n in sorted(args.coarse_sizes)]
    plan += [("fine", n) for n in sorted(args.fine_sizes)]
    cases = []
    for kind, n in plan:
        case = measure(comm, kind, n, args)
        gc.collect()  # free this case's mesh, solver and closure before the next, on every rank
        if comm.rank == 0:
            cases.append(case)
            print(
                f"  {kind} {n}²: step {ms(case['step'])} ms (closure {ms(case['closure'])} ms),"
                f" factorisation {case['setup']['factorisation']:.2f} s,"
                f" peak {max(case['peak_rss_gib']):.2f} GiB/rank",
                flush=True,
            )
    if comm.rank != 0:
        return
    report = {
        "config": {
            "ranks": comm.size,
            "threads": 1,
            "fine_sizes": args.fine_sizes,
            "coarse_sizes": args.coarse_sizes,
            "steps": args.steps,
            "warmup": args.warmup,
            "breakdown": args.breakdown,
            "cfl": args.cfl,
            "nu": args.nu,
            "fno": {
                "modes": args.modes,
                "hidden": args.hidden,
                "layers": args.layers,
                "domain_padding": args.domain_padding,
                "dtype": "float32",
                "inputs": "omega, velocity (P1/P2 coarse state), mask",
                "grid_refinement": args.grid_refinement,
            },
            "solver": "MUMPS LU, factorised once; closure updated every step",
        },
        "machine": machine(torch.device("cpu")),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "cases": cases,
    }
    print_run(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tag = result_tag(args.tag, comm.size, args.quick)
    path = args.output_dir / f"turbulence_scaling_{tag}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
