# # A neural operator on a grid split among ranks: memory, time and communication
#
# This benchmark illustrates how to:
#
# - measure the **peak memory per rank** of one forward of a Fourier neural operator
#   (`neuralop.models.FNO`) on a fixed global grid, distributed over $P$ ranks by
#   `dolfinx_mno.DistributedFNO` (each rank holds a slab of rows), against $P$;
# - time one forward in the **gathered** mode (the grid gathered on rank 0 with
#   `MPI.Gatherv`, the FNO run there, the output sent back with `MPI.Scatterv`: what
#   `NonlocalClosure` does) against the **distributed** mode (every rank runs its slab;
#   the spectral convolutions exchange only the kept Fourier modes, all-to-all);
# - a **weak-scaling** run (rows growing with the ranks, fixed rows per rank);
# - time one `NonlocalClosure.update()` in the gathered and in the distributed mode
#   (`distributed=True`) with the same FNO (P1 `u` and the mask on a 256² grid over a
#   unit square of 64 × 64 squares);
# - the **communication volume per rank** of the all-to-all transposes, counted exactly
#   for the runs here and modelled for 64 to 1024 ranks;
# - the **grid samples that travel between ranks** in the distributed closure's slab
#   gather (`SlabGather.remote_count`) and halo scatter (`SlabScatter.remote_count`),
#   with DOLFINx's default mesh partition against the mesh split into the grid's slabs
#   (`dolfinx_mno.redistribute_to_slabs`), and with balanced slab rows against rows that
#   follow the mesh partition (`NonlocalClosure(slabs="balanced" | "mesh")`), on a grid
#   whose inner rows miss the mesh's vertices (`--closure-grid`) and on one through them
#   (`--closure-cells + 1` points per side).
#
# Memory is the growth of the process's peak resident set (`VmHWM`, reset through
# `/proc/self/clear_refs` just before) during a forward after a warm-up one, run with
# `MALLOC_MMAP_THRESHOLD_=65536` so that glibc maps every large buffer afresh and returns
# it when freed: the growth is then the forward's live peak, without the allocator's
# cache or the first call's one-time costs (libraries, communicators: about 12 MiB, also
# recorded as `memory_mib_first_forward_per_rank`). Times are medians
# of `--repeats` forwards after one warm-up, with `torch.set_num_threads(1)` per rank and
# a barrier before each; a forward's time is the slowest rank's.
#
# Communication model: per spectral layer a rank sends, in the forward transpose, its
# rows of the kept modes of the other axes, ``batch * channels * (n_0 / P) * K`` complex
# numbers with ``K = k_1 * ... * k_{d-1}`` (the last axis's ``k // 2 + 1``), less the
# ``1 / P`` it keeps; the transpose back sends as many. So
# ``bytes per rank per layer = 2 * batch * channels * (n_0 / P) * K * (1 - 1 / P) * c``
# (``c`` = 8 bytes for complex64, 16 for complex128). Gathering instead moves the whole
# input and output grid through rank 0.
#
# ```
# export MALLOC_MMAP_THRESHOLD_=65536
# for p in 1 2 3 4; do mpirun -n $p python benchmarks/distributed_operator.py; done
# for p in 1 2 3; do mpirun -n $p python benchmarks/distributed_operator.py --remote; done
# python benchmarks/distributed_operator.py --summary      # the table of all runs
# python benchmarks/distributed_operator.py --quick        # smoke test (seconds)
# ```
#
# Results go to `benchmarks/results/distributed_operator_np<P>.json` (and, with `--remote`,
# `distributed_operator_remote_np<P>.json`).

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch
from _common import machine, positive_int, refuse_quick_overrides

from dolfinx_mno import DistributedFNO, to_precision

RESULTS = Path(__file__).parent / "results"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_growth_mib(run) -> float:
    """MiB by which ``run()`` raises this process's peak resident set."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) / 1024


def _model(modes: tuple[int, ...], width: int, layers: int) -> torch.nn.Module:
    import neuralop

    torch.manual_seed(0)
    model = neuralop.models.FNO(
        n_modes=modes, in_channels=2, out_channels=1, hidden_channels=width, n_layers=layers
    )
    return to_precision(model, torch.float32).eval()


def _median_time(comm: MPI.Comm, run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        run()
        times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    return statistics.median(times)


def _closure_update_times(model: torch.nn.Module, comm: MPI.Comm, args) -> dict[bool, float]:
    """Median seconds of ``NonlocalClosure.update()``, gathered and distributed mode.

    The closure of ``u`` (P1, 2 squares per triangle pair) and its mask on a unit square
    of ``closure_cells``² squares, on a ``closure_grid``² grid, with the benchmark's FNO.
    """
    import ufl
    from dolfinx import fem, mesh

    from dolfinx_mno import NonlocalClosure

    msh = mesh.create_unit_square(comm, args.closure_cells, args.closure_cells)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    x = ufl.SpatialCoordinate(msh)
    points = u.function_space.element.interpolation_points
    u.interpolate(fem.Expression(ufl.sin(3 * x[0]) * x[1], points))
    times = {}
    for distributed in (False, True):
        closure = NonlocalClosure(
            model,
            [u],
            quadrature_degree=2,
            grid_shape=(args.closure_grid,) * 2,
            distributed=distributed,
            device="cpu",
        )
        times[distributed] = _median_time(comm, closure.update, args.repeats)
    return times


def _remote_samples(model: torch.nn.Module, comm: MPI.Comm, args) -> list[dict]:
    """Grid points sent to other ranks per closure update, summed over ranks.

    For each grid (``closure_grid``² and ``(closure_cells + 1)``²), each mesh partition
    (DOLFINx's default, the grid's slabs) and each choice of slab rows.
    """
    import ufl
    from dolfinx import fem, mesh

    from dolfinx_mno import NonlocalClosure, redistribute_to_slabs
    from dolfinx_mno.grid import grid_over_mesh

    default = mesh.create_unit_square(comm, args.closure_cells, args.closure_cells)
    rows = []
    for points in (args.closure_grid, args.closure_cells + 1):
        grid_shape = (points, points)
        aligned = redistribute_to_slabs(default, grid_over_mesh(default, grid_shape))
        for partition, msh in (("default", default), ("slabs", aligned)):
            u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
            x = ufl.SpatialCoordinate(msh)
            u.interpolate(fem.Expression(x[0], u.function_space.element.interpolation_points))
            for slabs in ("balanced", "mesh"):
                closure = NonlocalClosure(
                    model, [u], grid_shape=grid_shape, distributed=True, slabs=slabs, device="cpu"
                )
                stage = closure.slab_stage
                assert stage is not None
                rows.append(
                    {
                        "grid": grid_shape,
                        "mesh_partition": partition,
                        "slabs": slabs,
                        "rows": stage.rows.counts,
                        "samples": comm.allreduce(closure.gridded_sampler.num_local),
                        "remote_slab_gather": stage.remote_counts["slab"],
                        "remote_halo_scatter": stage.remote_counts["halo"],
                    }
                )
    return rows


def _save_remote_samples(model: torch.nn.Module, comm: MPI.Comm, args) -> None:
    """Measure :func:`_remote_samples`; write its JSON and print it (rank 0)."""
    rows = _remote_samples(model, comm, args)
    if comm.rank != 0:
        return
    quick = "_quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"distributed_operator_remote_np{comm.size}{quick}.json"
    result = {
        "ranks": comm.size,
        "closure_cells": (args.closure_cells,) * 2,
        "remote_samples": rows,
        "command": f"mpirun -n {comm.size} python benchmarks/distributed_operator.py --remote"
        + (" --quick" if args.quick else ""),
    }
    path.write_text(json.dumps(result, indent=1))
    for row in rows:
        print(row)


def bytes_per_rank(
    grid: tuple[int, ...], kept: tuple[int, ...], channels: int, layers: int, ranks: int, c: int
) -> float:
    """Modelled all-to-all bytes a rank sends per forward (both transposes, every layer)."""
    modes = math.prod(kept[1:])
    return 2 * layers * channels * grid[0] / ranks * modes * (1 - 1 / ranks) * c


def measured_bytes(distributed: DistributedFNO, channels: int, c: int) -> int:
    """Exact bytes this rank sends per forward through the all-to-alls (batch 1)."""
    rank, total = distributed.comm.rank, 0
    for conv in distributed.convs:
        spectral = conv.spectral
        rest = math.prod(spectral.kept[2:])
        rows = spectral.rows.counts[rank]
        chunks = spectral.mode_chunks.counts
        sent_forward = rows * (spectral.kept[1] - chunks[rank]) * rest
        sent_back = chunks[rank] * (spectral.grid_shape[0] - rows) * rest
        total += channels * (sent_forward + sent_back) * c
    return total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grid", type=positive_int, nargs=2, default=(512, 512))
    parser.add_argument("--modes", type=positive_int, nargs=2, default=(16, 16))
    parser.add_argument("--width", type=positive_int, default=16)
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--weak-rows", type=positive_int, default=128, help="rows per rank (weak)")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument(
        "--closure-grid", type=positive_int, default=256, help="closure grid points"
    )
    parser.add_argument(
        "--closure-cells", type=positive_int, default=64, help="mesh squares per side"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--remote", action="store_true", help="only the samples sent between ranks")
    args = parser.parse_args(argv)
    names = ["grid", "modes", "width", "layers", "weak_rows", "repeats", "closure_grid"]
    refuse_quick_overrides(parser, args, [*names, "closure_cells"])
    return args


def main() -> None:
    args = parse_args()
    if args.summary:
        summary()
        return
    if args.quick:
        args.grid, args.modes, args.width, args.layers = (32, 32), (8, 8), 4, 2
        args.weak_rows, args.repeats = 16, 2
        args.closure_grid, args.closure_cells = 16, 4
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    grid, modes = tuple(args.grid), tuple(args.modes)
    model = _model(modes, args.width, args.layers)
    if args.remote:  # the counts do not depend on the model: a small one
        _save_remote_samples(_model((4, 4), 4, 1), comm, args)
        return
    field = torch.randn(1, 2, *grid, generator=torch.Generator().manual_seed(1))

    distributed = DistributedFNO(model, grid, comm)
    local = field[:, :, distributed.local_rows].contiguous()

    def distributed_forward():
        with torch.no_grad():
            distributed(local)

    memory_first = _peak_growth_mib(distributed_forward)
    memory_distributed = _peak_growth_mib(distributed_forward)  # warm: the live peak
    memory_gathered = 0.0
    if comm.rank == 0:
        with torch.no_grad():
            model(field)  # warm-up
            memory_gathered = _peak_growth_mib(lambda: model(field))
    with torch.no_grad():  # Gathered: rank 0 gathers the input, runs, scatters the output.
        counts = np.array(distributed.rows.counts) * grid[1]
        gathered_input = np.empty((2, *grid), np.float32) if comm.rank == 0 else None
        out = np.empty((1, *distributed.local_shape), np.float32)

        def gathered_forward():
            for channel in range(2):
                receive = [gathered_input[channel], counts] if comm.rank == 0 else None
                comm.Gatherv(local[0, channel].numpy(), receive, root=0)
            result = model(torch.from_numpy(gathered_input)[None]) if comm.rank == 0 else None
            send = [result[0, 0].numpy(), counts] if comm.rank == 0 else None
            comm.Scatterv(send, out[0], root=0)

        time_gathered = _median_time(comm, gathered_forward, args.repeats)
    time_distributed = _median_time(comm, distributed_forward, args.repeats)

    weak_grid = (args.weak_rows * comm.size, grid[1])
    weak = DistributedFNO(model, weak_grid, comm)
    weak_local = torch.randn(1, 2, *weak.local_shape)
    with torch.no_grad():
        time_weak = _median_time(comm, lambda: weak(weak_local), args.repeats)

    closure_times = _closure_update_times(model, comm, args)

    kept = (modes[0], modes[1] // 2 + 1)
    sent = comm.allreduce(measured_bytes(distributed, args.width, 8), op=MPI.MAX)
    memories = comm.gather(memory_distributed)
    firsts = comm.gather(memory_first)
    if comm.rank != 0:
        return
    result = {
        "ranks": comm.size,
        "grid": grid,
        "modes": modes,
        "width": args.width,
        "layers": args.layers,
        "dtype": "float32",
        "memory_mib_per_rank": memories,
        "memory_mib_first_forward_per_rank": firsts,
        "memory_mib_gathered_root": memory_gathered,
        "time_gathered_s": time_gathered,
        "time_distributed_s": time_distributed,
        "weak_grid": weak_grid,
        "time_weak_s": time_weak,
        "bytes_sent_max_rank": sent,
        "closure_grid": (args.closure_grid,) * 2,
        "closure_cells": (args.closure_cells,) * 2,
        "closure_update_gathered_s": closure_times[False],
        "closure_update_distributed_s": closure_times[True],
        "bytes_modelled": bytes_per_rank(grid, kept, args.width, args.layers, comm.size, 8),
        "machine": machine(torch.device("cpu")),
        "command": f"mpirun -n {comm.size} python benchmarks/distributed_operator.py"
        + (" --quick" if args.quick else ""),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"distributed_operator_np{comm.size}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(
        f"P={comm.size}: memory/rank {max(memories):.1f} MiB (gathered root "
        f"{memory_gathered:.1f}), forward gathered {1e3 * time_gathered:.1f} ms, distributed "
        f"{1e3 * time_distributed:.1f} ms, weak {weak_grid} {1e3 * time_weak:.1f} ms, "
        f"all-to-all {sent / 2**20:.2f} MiB/rank (model {result['bytes_modelled'] / 2**20:.2f}), "
        f"closure update gathered {1e3 * closure_times[False]:.1f} ms, distributed "
        f"{1e3 * closure_times[True]:.1f} ms"
    )


def summary() -> None:
    """Print the table of the saved runs and the modelled volume at 64..1024 ranks."""
    runs = [
        json.loads(p.read_text()) for p in sorted(RESULTS.glob("distributed_operator_np[0-9].json"))
    ]
    if runs:
        base = runs[0]
        print(
            f"grid {base['grid']}, modes {base['modes']}, width {base['width']}, "
            f"{base['layers']} layers, float32, 1 thread per rank"
        )
        print(
            "| P | peak MiB/rank (max) | x P / P=1 | gathered root MiB | gathered ms "
            "| distributed ms | weak grid | weak ms | all-to-all MiB/rank (model) "
            "| update gathered ms | update distributed ms |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        first = max(base["memory_mib_per_rank"])
        for run in runs:
            peak = max(run["memory_mib_per_rank"])
            print(
                f"| {run['ranks']} | {peak:.1f} | {peak * run['ranks'] / first:.2f} | "
                f"{run['memory_mib_gathered_root']:.1f} | {1e3 * run['time_gathered_s']:.1f} | "
                f"{1e3 * run['time_distributed_s']:.1f} | {tuple(run['weak_grid'])} | "
                f"{1e3 * run['time_weak_s']:.1f} | {run['bytes_sent_max_rank'] / 2**20:.2f} "
                f"({run['bytes_modelled'] / 2**20:.2f}) | "
                f"{1e3 * run['closure_update_gathered_s']:.1f} | "
                f"{1e3 * run['closure_update_distributed_s']:.1f} |"
            )
    print()
    print("Grid points sent to other ranks per closure update, summed over ranks")
    print("| P | grid | mesh partition | slabs | rows | samples | slab gather | halo scatter |")
    print("|---|---|---|---|---|---|---|---|")
    remote_runs = [
        json.loads(p.read_text())
        for p in sorted(RESULTS.glob("distributed_operator_remote_np[0-9].json"))
    ]
    for run in remote_runs:
        for row in run["remote_samples"]:
            print(
                f"| {run['ranks']} | {row['grid'][0]}² | {row['mesh_partition']} | "
                f"{row['slabs']} | {tuple(row['rows'])} | {row['samples']} | "
                f"{row['remote_slab_gather']} | {row['remote_halo_scatter']} |"
            )
    print()
    print("Modelled all-to-all volume per rank and forward (FNO width 64, 4 layers, float32,")
    print("modes 32 per axis kept, i.e. 32 x 32 x 17 on a 1024^3 grid, strong scaling;")
    print("weak scaling: 16 rows per rank on a (16 P) x 1024 x 1024 grid)")
    print("| P | strong: MiB/rank | weak: MiB/rank |")
    print("|---|---|---|")
    for ranks in (64, 128, 256, 512, 1024):
        strong = bytes_per_rank((1024, 1024, 1024), (32, 32, 17), 64, 4, ranks, 8)
        weak = bytes_per_rank((16 * ranks, 1024, 1024), (32, 32, 17), 64, 4, ranks, 8)
        print(f"| {ranks} | {strong / 2**20:.1f} | {weak / 2**20:.1f} |")


if __name__ == "__main__":
    main()
