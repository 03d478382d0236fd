"""Closure updates against the chunk size: the measured choice, with and without the cache bound.

A closure runs its model on chunks of points. For a plain MLP the chunk's activations (and,
for the tangent, its cotangents) should stay in the last-level cache: the chunk choice
(:meth:`~dolfinx_mno.pointwise_kernel.PointwiseKernel.chunk_bound`) no longer times
sizes whose buffers would not fit. This script times ``closure.update()`` and
``closure.update(tangent=True)`` on the same mesh and operands for:

* ``chosen``: the closure's own choice (cache-bounded);
* ``chosen, unbounded``: the choice without the bound (the rule before it);
* every candidate size, given as ``batch_size`` (which bounds the tangent's chunks too).

The model is ``Linear(3, 64) → tanh → Linear(64, 64) → tanh → Linear(64, 1)`` in float32 on
``(u, ∇u)`` of a P1 function, quadrature degree 2, on a ``--cells`` × ``--cells`` unit
square (408: 998,784 points). One thread, one rank. In each of ``--rounds`` rounds every
closure is timed in turn (best of ``--repeats`` updates); the table gives the median over
the rounds and each one's ratio to the bounded choice. Writes
``benchmarks/results/chunk_sizes[_TAG].json``.

    .venv/bin/python benchmarks/chunk_sizes.py
    .venv/bin/python benchmarks/chunk_sizes.py --cells 64 --rounds 1 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from unittest import mock

from mpi4py import MPI

import numpy as np
import torch
from _common import machine, positive_int

import dolfinx_mno as mno
from dolfinx_mno import pointwise_kernel
from dolfinx_mno._cache import cache_bytes_per_core


def best_update(closure: mno.Closure, tangent: bool, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        closure.update(tangent=tangent)
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=positive_int, default=408)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--tag", default="")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)

    import ufl
    from dolfinx import fem, mesh

    msh = mesh.create_unit_square(MPI.COMM_SELF, args.cells, args.cells)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    u.interpolate(lambda x: np.sin(3 * x[0]) * x[1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    ).float()

    def build(**kwargs) -> mno.Closure:
        closure = mno.Closure(model, [u, ufl.grad(u)], quadrature_degree=2, device="cpu", **kwargs)
        closure.update(tangent=True)  # chooses the tangent's chunk
        return closure

    closures = {"chosen": build()}
    with mock.patch.object(pointwise_kernel, "cache_bytes_per_core", lambda: None):
        closures["chosen, unbounded"] = build()
    for size in pointwise_kernel.CHUNK_CANDIDATES:
        closures[f"batch_size={size}"] = build(batch_size=size)
    num_points = 6 * args.cells**2  # two triangles a square, three points each

    times: dict[str, dict[str, list[float]]] = {
        name: {"values": [], "tangent": []} for name in closures
    }
    for round_ in range(args.rounds):
        for name, closure in closures.items():
            times[name]["values"].append(best_update(closure, False, args.repeats))
            times[name]["tangent"].append(best_update(closure, True, args.repeats))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    median = {
        name: {kind: float(np.median(values)) for kind, values in entry.items()}
        for name, entry in times.items()
    }
    rows = []
    for name, closure in closures.items():
        plan = closure.evaluation_plan
        rows.append(
            {
                "closure": name,
                "batch_size": plan["batch_size"],
                "tangent_batch_size": plan["tangent_batch_size"],
                "values_ms": 1e3 * median[name]["values"],
                "tangent_ms": 1e3 * median[name]["tangent"],
                "values_ratio": median[name]["values"] / median["chosen"]["values"],
                "tangent_ratio": median[name]["tangent"] / median["chosen"]["tangent"],
                "rounds_ms": {k: [1e3 * t for t in v] for k, v in times[name].items()},
            }
        )
    result = {
        "machine": machine(torch.device("cpu")),
        "command": "benchmarks/chunk_sizes.py "
        + " ".join(f"--{k}={v}" for k, v in vars(args).items() if v != ""),
        "num_points": num_points,
        "cache_bytes_per_core": cache_bytes_per_core(),
        "rows": rows,
    }
    out = (
        Path(__file__).parent / "results" / f"chunk_sizes{'_' + args.tag if args.tag else ''}.json"
    )
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"\n{num_points:,} points, cache {cache_bytes_per_core()} bytes per core")
    print(f"{'closure':<20} {'chunk':>7} {'tangent chunk':>13} {'values':>9} {'+ tangent':>10}")
    for row in rows:
        print(
            f"{row['closure']:<20} {row['batch_size']:>7} {row['tangent_batch_size']:>13} "
            f"{row['values_ms']:>6.1f} ms {row['tangent_ms']:>7.1f} ms  "
            f"({row['values_ratio']:.2f}, {row['tangent_ratio']:.2f} of chosen)"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
