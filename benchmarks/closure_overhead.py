# # Closure update overhead beside one residual assembly
#
# This benchmark illustrates how to:
#
# - split one `Closure.update()` into operand evaluation, host→device copy (with the cast
#   to the model dtype), model, device→host copy, write into the quadrature function, and
#   `scatter_forward`;
# - compare it with one assembly of the residual vector the closure enters,
#
# $$
#   F(u; v) = \int_\Omega \nabla u \cdot \nabla v \,\mathrm{d}x
#           + \int_\Omega c(u, \nabla u)\, v \,\mathrm{d}x,
# $$
#
#   on the same mesh and with the closure's quadrature rule;
# - measure the fp32 `torch.matmul` rate of the machine in the same run (same threads,
#   all ranks at once) and report the throughput of a 2×64 MLP closure against it;
# - compare one rank with two (`--compare-ranks`).
#
# Two closures are timed: `identity`, a parameter-free module returning the first input
# column (its update is pure packing and unpacking), and `mlp`, a fp32 MLP
# ``3 → 64 → 64 → 1`` on the operands ``[u, grad(u)]``, so the float64 operands are cast to
# fp32 at the boundary. Its activation is tanh by default: smooth, so the closure's tangent
# (Newton) is continuous, and the usual choice for closure models. The MLP FLOP count is
# that of its three matrix products, ``2 (3·64 + 64·64 + 64·1)`` = 8704 per point; biases
# and activations are not counted. "Overhead" (packing and unpacking) is the update time
# minus the model's own computation: operands, both copies, write, scatter and the
# finiteness check with its collective.
#
# Defaults: P1 ``u``, quadrature degree 2 (3 points per triangle), 10⁴, 10⁵ and 10⁶ points
# in all, `torch.set_num_threads(1)` on every rank, serial and under MPI, so that the rank
# comparison compares ranks. Every figure is the median over `--repeats` calls after two
# warm-up calls. Under MPI each call starts after a barrier and its time is the maximum
# over the ranks. Results go to `benchmarks/results/closure_overhead_<tag>.json`; rank 0
# prints a table.
#
# ```
# python benchmarks/closure_overhead.py                      # serial, 1e4..1e6 points
# mpirun -n 2 python benchmarks/closure_overhead.py --tag mpi2
# python benchmarks/closure_overhead.py --compare-ranks      # runs both, prints speed-up
# python benchmarks/closure_overhead.py --batch-study        # MLP time vs batch size
# python benchmarks/closure_overhead.py --quick              # smoke test
# ```

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
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
    positive_size,
    refuse_quick_overrides,
    result_tag,
    run_serial_and_parallel,
    shared_cases,
)

# dolfinx_mno makes the MPI library of the dolfinx-solver wheel visible; it must be
# imported before dolfinx.
import dolfinx_mno as mno

# isort: split

import basix
import ufl
from dolfinx import fem, la, mesh

from dolfinx_mno.torch_bridge import PointwiseEvaluator, default_batch_size

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH = 64
WARMUP = 2
ACTIVATIONS: dict[str, Callable[[], torch.nn.Module]] = {
    "tanh": torch.nn.Tanh,
    "relu": torch.nn.ReLU,
    "gelu": torch.nn.GELU,
    "silu": torch.nn.SiLU,
}
STAGES = ("operands", "h2d", "model", "d2h", "write", "scatter", "check")


# ## Models


class FirstColumn(torch.nn.Module):
    """Parameter-free identity closure: ``(batch, num_inputs) → (batch, 1)``, the first column.

    It has no floating-point parameter, so it runs in the DOLFINx dtype (no cast) on the
    closure's device.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


def mlp(num_inputs: int, activation: str = "tanh", seed: int = 0) -> torch.nn.Sequential:
    """A fp32 MLP ``num_inputs → 64 → 64 → 1`` (two hidden layers)."""
    torch.manual_seed(seed)
    act = ACTIVATIONS[activation]
    return torch.nn.Sequential(
        torch.nn.Linear(num_inputs, WIDTH),
        act(),
        torch.nn.Linear(WIDTH, WIDTH),
        act(),
        torch.nn.Linear(WIDTH, 1),
    )


def mlp_flops(num_inputs: int, num_outputs: int = 1) -> int:
    """FLOPs per point of the three matrix products of :func:`mlp` (no bias, no activation)."""
    return 2 * (num_inputs * WIDTH + WIDTH * WIDTH + WIDTH * num_outputs)


# ## Timing helpers


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Return a function that waits for all work queued on ``device``."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed(comm: MPI.Comm, function: Callable[[], object]) -> float:
    """Wall time of ``function()`` started after a barrier, maximum over the ranks."""
    comm.Barrier()
    start = time.perf_counter()
    function()
    return float(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))


def rank_max(comm: MPI.Comm, values: dict[str, float]) -> dict[str, float]:
    """Maximum over the ranks of each entry of ``values`` (same keys on every rank)."""
    keys = sorted(values)
    maxima = np.empty(len(keys))
    comm.Allreduce(np.array([values[k] for k in keys]), maxima, op=MPI.MAX)
    return dict(zip(keys, maxima.tolist(), strict=True))


def median_of(samples: list[dict[str, float]]) -> dict[str, float]:
    """Entry-wise median of a list of timing dictionaries."""
    return {key: float(np.median([s[key] for s in samples])) for key in samples[0]}


def split_evaluate(evaluator: PointwiseEvaluator, record: dict[str, float]) -> None:
    """:meth:`PointwiseEvaluator.evaluate` (no tangent) with each stage timed separately.

    Mirrors the chunk loop of ``PointwiseEvaluator.evaluate`` on the evaluator's own
    buffers and adds the seconds spent copying operands into the device chunk buffer
    (``h2d``, including the cast to the model dtype), in the model (``model``) and copying
    its output back (``d2h``, including the cast to the DOLFINx dtype) to ``record``. On a
    GPU each stage is synchronised, which removes the copy/compute overlap of the real loop.
    """
    sync = synchronizer(evaluator.device)
    non_blocking = evaluator._non_blocking
    host_inputs, host_outputs = evaluator._inputs, evaluator._outputs
    h2d = compute = d2h = 0.0
    with torch.inference_mode():
        for start in range(0, evaluator.num_points, evaluator.batch_size):
            stop = min(start + evaluator.batch_size, evaluator.num_points)
            t0 = time.perf_counter()
            if evaluator._zero_copy:  # CPU, no cast: the model reads the host buffer
                x = host_inputs[start:stop]
            else:
                x = evaluator._chunk_inputs[: stop - start]
                x.copy_(host_inputs[start:stop], non_blocking=non_blocking)
            sync()
            t1 = time.perf_counter()
            y = evaluator.kernel.values(x)  # the path an update takes (fused MLP or model)
            sync()
            t2 = time.perf_counter()
            host_outputs[start:stop].copy_(y.reshape(stop - start, -1), non_blocking=non_blocking)
            sync()
            t3 = time.perf_counter()
            h2d, compute, d2h = h2d + t1 - t0, compute + t2 - t1, d2h + t3 - t2
    record.update(h2d=h2d, model=compute, d2h=d2h)


def matmul_rate(comm: MPI.Comm, device: torch.device, n: int, repeats: int) -> float:
    """fp32 matmul rate of one ``n × n`` product on this rank, in GFLOP/s.

    ``torch.matmul``'s; on the CPU the higher of it and NumPy's ``matmul`` at torch's
    thread count (the closures' fused MLP pass may run either BLAS, so the hardware limit
    is the faster one: on an AMD EPYC, OpenBLAS's 1.15× MKL's). All ranks multiply at the
    same time (a barrier starts each product), so the rate is the one a rank gets while the
    others work too.
    """
    sync = synchronizer(device)
    a = torch.randn((n, n), dtype=torch.float32, device=device)
    b = torch.randn((n, n), dtype=torch.float32, device=device)
    c = torch.empty((n, n), dtype=torch.float32, device=device)
    products = [lambda: torch.matmul(a, b, out=c)]
    if device.type == "cpu":
        from dolfinx_mno._blas import torch_threads

        arrays = a.numpy(), b.numpy(), c.numpy()

        def numpy_product() -> None:
            with torch_threads():
                np.matmul(arrays[0], arrays[1], out=arrays[2])

        products.append(numpy_product)
    rates = []
    for product in products:
        times = []
        for i in range(WARMUP + repeats):
            comm.Barrier()
            start = time.perf_counter()
            product()
            sync()
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
        rates.append(2 * n**3 / float(np.median(times)) / 1e9)
    return max(rates)


def gemm_rate(device: torch.device, rows: int, repeats: int) -> float:
    """fp32 rate of the MLP's hidden layer, ``(rows, 64) @ (64, 64)ᵀ + bias``, in GFLOP/s."""
    sync = synchronizer(device)
    layer = torch.nn.Linear(WIDTH, WIDTH).to(device)
    x = torch.randn((rows, WIDTH), dtype=torch.float32, device=device)
    times = []
    with torch.inference_mode():
        for i in range(5 * (WARMUP + repeats)):
            start = time.perf_counter()
            layer(x)
            sync()
            if i >= 5 * WARMUP:
                times.append(time.perf_counter() - start)
    return 2 * rows * WIDTH * WIDTH / float(np.median(times)) / 1e9


# ## The problem
#
# A unit square of $2N^2$ triangles, $N$ chosen so that the quadrature rule of the closure
# has about the requested number of points in all; $u$ is a smooth P1 or P2 function.


def points_per_cell(quadrature_degree: int) -> int:
    """Points of Basix's default triangle rule of the given degree."""
    return int(basix.make_quadrature(basix.CellType.triangle, quadrature_degree)[0].shape[0])


def build_problem(
    comm: MPI.Comm, target_points: int, element_degree: int, quadrature_degree: int
) -> tuple[mesh.Mesh, fem.Function, int]:
    """Mesh, unknown ``u`` and ``N`` for about ``target_points`` quadrature points."""
    n = max(1, round(np.sqrt(target_points / (2 * points_per_cell(quadrature_degree)))))
    msh = mesh.create_unit_square(comm, n, n, mesh.CellType.triangle)
    V = fem.functionspace(msh, ("Lagrange", element_degree))
    u = fem.Function(V, name="u")
    u.interpolate(lambda x: np.sin(2 * x[0]) * np.cos(x[1]) + x[1] ** 2)
    return msh, u, n


def residual_assembler(u: fem.Function, closure: mno.Closure) -> Callable[[], None]:
    """Return a function assembling ``F(u; v)`` into a preallocated vector (one residual).

    One call zeroes the vector, assembles the cell integrals (the closure term with the
    closure's rule), and sums the ghost contributions into their owners.
    """
    V = u.function_space
    v = ufl.TestFunction(V)
    F = ufl.inner(ufl.grad(u), ufl.grad(v)) * ufl.dx + ufl.inner(closure, v) * closure.dx
    form = fem.form(F)
    b = la.vector(V.dofmap.index_map, V.dofmap.index_map_bs)

    def assemble() -> None:
        b.array[:] = 0.0
        fem.assemble_vector(b.array, form)
        b.scatter_reverse(la.InsertMode.add)

    return assemble


# ## One case: a closure on one mesh


def measure_case(
    comm: MPI.Comm,
    u: fem.Function,
    model: torch.nn.Module,
    args: argparse.Namespace,
    matmul_gflops: float,
    flops_per_point: int = 0,
) -> dict[str, object]:
    """Time updates (plain and split into stages) and residual assemblies of one closure.

    ``flops_per_point`` (0 for the identity) turns the model time into GFLOP/s.
    """
    closure = mno.Closure(
        model,
        [u, ufl.grad(u)],
        value_shape=(),
        quadrature_degree=args.quadrature_degree,
        device=args.device,
        batch_size=args.batch_size,
    )
    assemble = residual_assembler(u, closure)
    evaluator = closure._evaluator

    plain, split, assembly = [], [], []
    for i in range(WARMUP + args.repeats):
        # Plain update: the figures a user gets from closure.timings.
        wall = timed(comm, closure.update)
        stages = dict(closure.timings)
        stages["check"] = stages["total"] - sum(
            stages[k] for k in ("operands", "model", "write", "scatter")
        )
        stages["wall"] = wall
        # The same update with the model stage split into copy-in, model, copy-out.
        record: dict[str, float] = {}
        evaluator.evaluate = lambda tangent=False, r=record: split_evaluate(evaluator, r)  # type: ignore[method-assign]
        closure.update()
        del evaluator.evaluate  # back to the class method
        assembly_time = timed(comm, assemble)
        if i >= WARMUP:
            plain.append(rank_max(comm, stages))
            split.append(rank_max(comm, record))
            assembly.append({"assembly": assembly_time})

    plain_median = median_of(plain)
    split_median = median_of(split)
    assembly_median = median_of(assembly)["assembly"]
    local_points = evaluator.num_points
    points = comm.allreduce(local_points, op=MPI.SUM)
    stage_times = {
        "operands": plain_median["operands"],
        **split_median,
        "write": plain_median["write"],
        "scatter": plain_median["scatter"],
        "check": plain_median["check"],
    }
    # Packing/unpacking: everything in an update except the model's own computation.
    overhead = plain_median["total"] - split_median["model"]
    flops = flops_per_point * points
    result: dict[str, object] = {
        "points": points,
        "points_per_rank": comm.allgather(local_points),
        "stages": stage_times,
        "update": plain_median["total"],
        "update_wall": plain_median["wall"],
        "model_with_copies": plain_median["model"],
        "assembly": assembly_median,
        "overhead": overhead,
        "overhead_over_assembly": overhead / assembly_median,
    }
    if flops:
        # Aggregate rates: all ranks' FLOPs over the slowest rank's time.
        compute_rate = flops / split_median["model"] / 1e9
        boundary_rate = flops / plain_median["model"] / 1e9
        result.update(
            flops=flops,
            mlp_gflops=compute_rate,
            mlp_gflops_with_copies=boundary_rate,
            mlp_fraction_of_matmul=compute_rate / matmul_gflops,
            mlp_fraction_of_matmul_with_copies=boundary_rate / matmul_gflops,
        )
    return result


# ## Batch-size study
#
# The MLP alone (the `PointwiseEvaluator` hot path: cast in, model, cast out) for several
# chunk sizes and activations, on random operands of the largest size.


def batch_study(
    comm: MPI.Comm, num_points: int, args: argparse.Namespace, matmul_gflops: float
) -> list[dict[str, object]]:
    """Time :meth:`PointwiseEvaluator.evaluate` of the MLP per activation and batch size."""
    device = mno.resolve_device(args.device, comm)
    batch_sizes = [*args.study_batch_sizes, num_points]
    rows = []
    rng = np.random.default_rng(comm.rank)
    for activation in args.study_activations:
        model = mlp(3, activation).to(device)
        for batch_size in batch_sizes:
            evaluator = PointwiseEvaluator(model, 3, 1, num_points, np.float64, device, batch_size)
            evaluator.inputs[:] = rng.random((num_points, 3))
            times = [timed(comm, evaluator.evaluate) for _ in range(WARMUP + args.repeats)]
            seconds = float(np.median(times[WARMUP:]))
            gflops = mlp_flops(3) * num_points * comm.size / seconds / 1e9
            rows.append(
                {
                    "activation": activation,
                    "batch_size": batch_size,
                    "whole_array": batch_size == num_points,
                    "seconds": seconds,
                    "gflops": gflops,
                    "fraction_of_matmul": gflops / matmul_gflops,
                }
            )
    return rows


# ## Reporting


def print_table(report: dict[str, object]) -> None:
    """Print the stage table and the target ratios."""
    config = report["config"]
    print(
        f"\nclosure_overhead: {config['ranks']} rank(s) × {config['threads']} thread(s), "
        f"device {config['device']}, P{config['element_degree']}, quadrature degree "
        f"{config['quadrature_degree']}, batch {config['batch_size']}, "
        f"MLP activation {config['activation']}"
    )
    print(
        f"fp32 matmul ({config['matmul_n']}²): {report['matmul_gflops']:.1f} GFLOP/s in all "
        f"(per rank {', '.join(f'{r:.1f}' for r in report['matmul_gflops_per_rank'])}); "
        f"MLP hidden-layer GEMM: {report['gemm_gflops']:.1f} GFLOP/s in all"
    )
    load = report["load_average"]
    print(
        "1-min load average before/after: "
        f"{load['before'][0]:.2f}/{load['after'][0]:.2f} (on {report['machine']['cores']} cores)"
    )
    header = ["points", "closure", *STAGES, "update", "assembly", "ovh/asm", "GFLOP/s", "%mm"]
    print("times in ms (median, max over ranks)")
    print(" ".join(f"{h:>9}" for h in header))
    for case in report["cases"]:
        stages = case["stages"]
        row = [str(case["points"]), case["closure"]]
        row += [ms(stages[s]) for s in STAGES]
        row += [ms(case["update"]), ms(case["assembly"]), f"{case['overhead_over_assembly']:.2f}"]
        if "mlp_gflops" in case:
            row += [f"{case['mlp_gflops']:.1f}", f"{100 * case['mlp_fraction_of_matmul']:.0f}"]
        else:
            row += ["-", "-"]
        print(" ".join(f"{c:>9}" for c in row))
    if report.get("batch_study"):
        print("\nMLP evaluation (cast + model + cast back) by batch size")
        print(f"{'activation':>10} {'batch':>9} {'ms':>9} {'GFLOP/s':>9} {'%mm':>5}")
        for row in report["batch_study"]:
            batch = "whole" if row["whole_array"] else str(row["batch_size"])
            print(
                f"{row['activation']:>10} {batch:>9} {ms(row['seconds']):>9} "
                f"{row['gflops']:>9.1f} {100 * row['fraction_of_matmul']:>5.0f}"
            )


def compare_files(one: Path, many: Path) -> list[dict[str, object]]:
    """Speed-up of the closure update from the run in ``one`` to the run in ``many``."""
    reports = [json.loads(path.read_text()) for path in (one, many)]
    cases = [{(c["closure"], c["points"]): c for c in r["cases"]} for r in reports]
    ranks = [r["config"]["ranks"] for r in reports]
    shared = shared_cases(cases[0], cases[1], (one.name, many.name))
    rows = []
    print(f"\nclosure update, {ranks[0]} rank(s) ({one.name}) vs {ranks[1]} ({many.name})")
    print(f"{'closure':>9} {'points':>9} {'update 1':>9} {'update 2':>9} {'speed-up':>9}")
    for key in sorted(shared, key=lambda k: (k[0], k[1])):
        first, second = cases[0][key]["update"], cases[1][key]["update"]
        rows.append(
            {
                "closure": key[0],
                "points": key[1],
                "ranks": ranks,
                "update": [first, second],
                "speedup": first / second,
                "assembly_speedup": cases[0][key]["assembly"] / cases[1][key]["assembly"],
            }
        )
        print(f"{key[0]:>9} {key[1]:>9} {ms(first):>9} {ms(second):>9} {first / second:>9.2f}")
    return rows


def compare_ranks(args: argparse.Namespace) -> None:
    """Run the benchmark on 1 and on ``args.ranks`` ranks and compare the update times."""
    script = str(Path(__file__).resolve())
    forwarded = [
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--element-degree",
        str(args.element_degree),
        "--quadrature-degree",
        str(args.quadrature_degree),
        "--activation",
        args.activation,
        "--sizes",
        *[str(s) for s in args.sizes],
    ]
    if args.batch_size is not None:
        forwarded += ["--batch-size", str(args.batch_size)]
    tags = run_serial_and_parallel(script, forwarded, args.tag, args.ranks, args.mpirun)
    prefix = f"{args.tag}_" if args.tag else ""
    paths = [RESULTS / f"closure_overhead_{tag}.json" for tag in tags]
    rows = compare_files(*paths)
    output = RESULTS / f"closure_overhead_{prefix}scaling.json"
    output.write_text(json.dumps(rows, indent=2))
    print(f"wrote {output}")


# ## Driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``argv``: default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        description="Time closure updates beside one residual assembly (see the header)."
    )
    parser.add_argument(
        "--sizes",
        type=positive_size,
        nargs="+",
        default=[1e4, 1e5, 1e6],
        help="total numbers of quadrature points (over all ranks) (default: 1e4 1e5 1e6)",
    )
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed calls per figure")
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
        help="torch.set_num_threads per rank (default 1, serial and under MPI, so that "
        "the rank comparison is a comparison of ranks)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=None, help="closure batch_size")
    parser.add_argument(
        "--element-degree", type=positive_int, default=1, help="Lagrange degree of u"
    )
    parser.add_argument(
        "--quadrature-degree",
        type=int,
        default=None,
        help="closure quadrature degree (default: twice the element degree)",
    )
    parser.add_argument("--activation", default="tanh", choices=sorted(ACTIVATIONS))
    parser.add_argument(
        "--matmul-n", type=positive_int, default=None, help="matmul size (2048; GPU 8192)"
    )
    parser.add_argument("--batch-study", action="store_true", help="MLP time vs batch size")
    parser.add_argument(
        "--study-batch-sizes",
        type=positive_int,
        nargs="+",
        default=[512, 1024, 2048, 4096, 8192, 16384, 65536],
        help="batch sizes of the study (the whole array is always added)",
    )
    parser.add_argument(
        "--study-activations", nargs="+", default=list(ACTIVATIONS), choices=sorted(ACTIVATIONS)
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument(
        "--compare-ranks",
        action="store_true",
        help="run serially and under mpirun -n RANKS, then print the update speed-up",
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
    refuse_quick_overrides(parser, args, ["sizes", "study_batch_sizes"])
    if args.quick:
        args.sizes = [2e3, 8e3]
        args.repeats = min(args.repeats, 3)
        args.study_batch_sizes = [512, 4096]
    args.sizes = [int(s) for s in args.sizes]
    if args.quadrature_degree is None:
        args.quadrature_degree = 2 * args.element_degree
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

    torch.set_num_threads(args.threads)
    device = mno.resolve_device(args.device, comm)
    # Other processes on the machine distort the figures; the load average says if any ran.
    load_before = os.getloadavg()
    matmul_n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    matmul_per_rank = comm.allgather(matmul_rate(comm, device, matmul_n, args.repeats))
    matmul_gflops = float(sum(matmul_per_rank))
    batch_size = args.batch_size or default_batch_size(device)
    gemm_gflops = float(comm.allreduce(gemm_rate(device, batch_size, args.repeats)))

    cases = []
    for target in args.sizes:
        msh, u, n = build_problem(comm, target, args.element_degree, args.quadrature_degree)
        num_inputs = 1 + msh.geometry.dim
        models = (
            ("identity", FirstColumn(), 0),
            ("mlp", mlp(num_inputs, args.activation), mlp_flops(num_inputs)),
        )
        for name, model, flops_per_point in models:
            case = measure_case(comm, u, model, args, matmul_gflops, flops_per_point)
            case.update(closure=name, target_points=target, n=n)
            case["cells"] = msh.topology.index_map(2).size_global
            cases.append(case)
            if comm.rank == 0:
                print(
                    f"  {name:>8} {case['points']:>8} points: update {ms(case['update'])} ms, "
                    f"assembly {ms(case['assembly'])} ms",
                    flush=True,
                )

    report: dict[str, object] = {
        "config": {
            "ranks": comm.size,
            "threads": args.threads,
            "device": str(device),
            "element_degree": args.element_degree,
            "quadrature_degree": args.quadrature_degree,
            "points_per_cell": points_per_cell(args.quadrature_degree),
            "batch_size": batch_size,
            "activation": args.activation,
            "repeats": args.repeats,
            "warmup": WARMUP,
            "matmul_n": matmul_n,
            "mlp_flops_per_point": mlp_flops(3),
        },
        "machine": machine(device),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "matmul_gflops": matmul_gflops,
        "matmul_gflops_per_rank": matmul_per_rank,
        "gemm_gflops": gemm_gflops,
        "cases": cases,
    }
    if args.batch_study:
        # Points per rank of the largest size, as in the closure runs.
        largest = max((c for c in cases if c["closure"] == "mlp"), key=lambda c: c["points"])
        local = largest["points_per_rank"][comm.rank]
        report["batch_study"] = batch_study(comm, local, args, matmul_gflops)

    if comm.rank == 0:
        print_table(report)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"closure_overhead_{result_tag(args.tag, comm.size, args.quick)}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
