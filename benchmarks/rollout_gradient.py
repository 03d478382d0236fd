"""Cost of a rollout gradient: time against a forward rollout, and memory against ``k``.

The problem: an IMEX advection-diffusion step on the unit square (P1, ``--cells`` × ``--cells``
triangles pairs, zero Dirichlet data) with an MLP source closure ``q(u_n, ∇u_n)``
(``Linear(3, 32) → tanh → Linear(32, 32) → tanh → Linear(32, 1)``, float64, quadrature
degree 2: 3 points per cell)::

    a = (u v + dt κ ∇u·∇v) dx,   L = (u_n − dt β·∇u_n) v dx + dt q v dx_q

``--implicit``: backward Euler instead, the closure a flux ``q(u, ∇u)`` of the new state
(``Linear(3, 32) → tanh → Linear(32, 32) → tanh → Linear(32, 2)``, weights of the last layer
scaled by 0.2), solved by Newton with the closure's tangent (LU, tolerances 1e-12)::

    F = (u − u_n) v + dt κ ∇u·∇v + dt (β·∇u) v + dt q(u, ∇u)·∇v = 0

For each horizon ``k`` (``--steps``), without and with checkpointing (``--every`` steps
per segment), a fresh process (``--worker``) builds the problem, takes one warm-up gradient
over one step, then measures:

* **peak memory**: the peak resident set size (``ru_maxrss``) during one gradient over
  ``k`` steps minus the resident set size just before it (``/proc/self/statm``); a fresh
  process per configuration, so that one configuration's peak does not hide another's,
  with glibc's mmap threshold fixed (:func:`worker_environment`) so that the RSS follows
  the live memory rather than the heap's fragmentation;
* **time** (another fresh process, glibc's default allocator, whose dynamic threshold is
  faster: a fixed one maps and unmaps every activation buffer, 3–4× slower here): the best
  of ``--repeats`` forward rollouts (``torch.no_grad``) and of as many gradients (forward
  with the graph, then backward: transposed solves, operand pull-backs, the model's VJP),
  taken alternately; wall and CPU time (``time.process_time``), and the ratio of the CPU
  times, which the other jobs of a shared machine inflate less (the usual adjoint bound is
  3×; with checkpointing the backward recomputes part of a forward). Checkpointed, the
  gradient is taken two ways in the same rounds: keeping the forward's states
  (``keep_states=True``, the default: the recomputation runs the operand and model stages
  only) and solving the recomputed steps again (``keep_states=False``, ``ratio_solve_again``).
  In the same rounds, the gradient's first pass alone (``ratio_first_pass``: the forward
  rollout with its graph, or with checkpointed segments run without one but the last).

``--memory``: the closure also reads the change over the last step, ``q(u_n, u_n −
u_{n-1}, ∇u_n)`` (``Linear(4, 32)``), and the stepper keeps ``u_{n-1}``
(``older=[u_nm1]``): the rollout's state then holds two time levels, and the gradient
follows each state through two steps.

One thread (``torch.set_num_threads(1)``, one MPI rank). Writes
``benchmarks/results/rollout_gradient[_TAG].json`` and prints a table.

    .venv/bin/python benchmarks/rollout_gradient.py                 # k = 10, 40, 160
    .venv/bin/python benchmarks/rollout_gradient.py --steps 4 8 --cells 8 --repeats 1  # smoke
    .venv/bin/python benchmarks/rollout_gradient.py --memory --tag memory  # two time levels
    .venv/bin/python benchmarks/rollout_gradient.py --implicit --tag implicit  # Newton steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import machine, ms, positive_int

import dolfinx_mno as mno


def rss_bytes() -> int:
    """The resident set size now (``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_environment() -> dict[str, str]:
    """The environment of a worker: glibc's mmap threshold fixed at 64 KiB.

    glibc raises its mmap threshold as large blocks are freed, so later activation buffers
    (1.5 MiB each here) come from the heap; the small state tensors a rollout keeps,
    allocated in between, then pin the freed heap and the RSS keeps memory that is free
    (measured without this: 51, 96, 198 MiB with checkpointing for k = 10, 40, 160, and
    20–110 MiB from one forward rollout to the next, with nothing live). With a fixed
    threshold, blocks of 64 KiB or more are mapped and unmapped, and the RSS follows the
    live memory.
    """
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


DT, KAPPA = 1e-3, 0.05


def tanh_mlp(inputs: int, outputs: int) -> torch.nn.Sequential:
    """``Linear(inputs, 32) → tanh → Linear(32, 32) → tanh → Linear(32, outputs)``, float64."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, outputs),
    ).double()


def unit_square(cells: int):
    """P1 on the unit square: the space, ``u_n = sin(πx) sin(πy)`` and ``u = 0`` on ∂Ω."""
    from mpi4py import MPI

    from dolfinx import fem, mesh

    msh = mesh.create_unit_square(MPI.COMM_WORLD, cells, cells)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u_n = fem.Function(V)
    u_n.interpolate(lambda x: np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]))
    msh.topology.create_connectivity(1, 2)
    boundary = fem.locate_dofs_topological(V, 1, mesh.exterior_facet_indices(msh.topology))
    return V, u_n, fem.dirichletbc(0.0, boundary, V)


def build(
    cells: int,
    every: int | None,
    memory: bool = False,
    implicit: bool = False,
):
    """The rollout of the advection-diffusion step, its initial state (and older states)."""
    import ufl
    from dolfinx import fem

    from dolfinx_mno.petsc import LinearProblem
    from dolfinx_mno.rollout import Rollout
    from dolfinx_mno.timestepping import IMEXStepper

    if implicit:
        return build_implicit(cells, every)

    V, u_n, bc = unit_square(cells)
    uh, u_nm1 = fem.Function(V), fem.Function(V)
    u_nm1.interpolate(lambda x: 0.9 * np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]))
    model = tanh_mlp(4 if memory else 3, 1)
    operands = [u_n, u_n - u_nm1, ufl.grad(u_n)] if memory else [u_n, ufl.grad(u_n)]
    closure = mno.Closure(model, operands, quadrature_degree=2, device="cpu")
    beta = ufl.as_vector([1.0, 0.5])
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = (u * v + DT * KAPPA * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
    L = (u_n - DT * ufl.dot(beta, ufl.grad(u_n))) * v * ufl.dx + DT * closure * v * closure.dx
    problem = LinearProblem(
        a,
        L,
        u=uh,
        bcs=[bc],
        petsc_options={"ksp_type": "preonly", "pc_type": "lu"},
        petsc_options_prefix="rollout_benchmark_",
    )
    older = [u_nm1] if memory else []
    stepper = IMEXStepper(problem, uh, u_n, dt=DT, older=older)
    rollout = Rollout(stepper, checkpoint_every=every)
    return rollout, rollout.initial_state(), rollout.initial_older() or None, V


def build_implicit(cells: int, every: int | None):
    """The rollout of the backward Euler step with a flux closure of the new state."""
    import ufl
    from dolfinx import fem

    from dolfinx_mno.petsc import NonlinearProblem
    from dolfinx_mno.rollout import Rollout
    from dolfinx_mno.timestepping import ImplicitStepper

    V, u_n, bc = unit_square(cells)
    uh = fem.Function(V)
    uh.x.array[:] = u_n.x.array
    model = tanh_mlp(3, 2)
    with torch.no_grad():  # a mild closure: Newton converges in a few iterations
        model[4].weight.mul_(0.2)
    closure = mno.Closure(model, [uh, ufl.grad(uh)], (2,), quadrature_degree=2, device="cpu")
    beta = ufl.as_vector([1.0, 0.5])
    v = ufl.TestFunction(V)
    F = (
        (uh - u_n) * v
        + DT * KAPPA * ufl.inner(ufl.grad(uh), ufl.grad(v))
        + DT * ufl.dot(beta, ufl.grad(uh)) * v
    ) * ufl.dx + DT * ufl.inner(closure, ufl.grad(v)) * closure.dx
    options = {
        "ksp_type": "preonly",
        "pc_type": "lu",
        "snes_type": "newtonls",
        "snes_linesearch_type": "none",
        "snes_atol": 1e-12,
        "snes_rtol": 1e-12,
        "snes_stol": 0.0,
    }
    problem = NonlinearProblem(
        F, uh, bcs=[bc], petsc_options=options, petsc_options_prefix="rollout_benchmark_implicit_"
    )
    rollout = Rollout(ImplicitStepper(problem, uh, u_n, dt=DT), checkpoint_every=every)
    return rollout, rollout.initial_state(), None, V


def targets(V, num_owned: int, steps: int) -> list[torch.Tensor]:
    from dolfinx import fem

    goal = fem.Function(V)
    goal.interpolate(lambda x: 0.8 * np.sin(np.pi * x[0]) * np.sin(np.pi * x[1]))
    target = torch.from_numpy(goal.x.array[:num_owned].copy())
    return [target] * steps


def timed(action) -> tuple[float, float]:
    """Wall and CPU seconds (this process, ``time.process_time``) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu


def worker(args: argparse.Namespace) -> None:
    """One configuration in this process; prints its JSON row."""
    torch.set_num_threads(1)
    every = args.every if args.checkpoint else None
    rollout, u0, older, V = build(args.cells, every, args.memory, args.implicit)
    data = targets(V, rollout.num_owned, args.k)
    # Warm-up: JIT-compiled forms, factorisation, allocator, and (with one checkpointed
    # segment) a first recomputation. (torch.utils.checkpoint, used until the thirteenth
    # session, loaded ~140 MiB of libraries on its first call.)
    rollout.gradient(u0, data[: min(args.k, (every or 0) + 1)], older=older)
    row: dict[str, typing.Any] = {
        "k": args.k,
        "checkpoint_every": every,
        "implicit": args.implicit,
        "cells": args.cells,
        "dofs": rollout.num_owned,
        "points": int(rollout._maps[0].shape[0]),
    }
    if args.measure == "memory":
        before = rss_bytes()
        row["loss"] = rollout.gradient(u0, data, older=older).loss
        row["peak_rss_delta_bytes"] = peak_rss_bytes() - before
    else:
        rollout.gradient(u0, data, older=older)  # the first k-step backward: autograd's caches

        def forward() -> None:
            with torch.no_grad():
                rollout.run(u0, args.k, older=older)

        def first_pass() -> None:  # a gradient's forward: the graph, or checkpointed segments
            rollout.run(u0, args.k, older=older)

        # Alternated, so that a change of the machine's load hits both alike; the ratio
        # from CPU time, which other jobs on the machine do not inflate (much).
        def gradient(keep_states: bool) -> Callable[[], None]:
            def call() -> None:
                rollout.keep_states = keep_states
                rollout.gradient(u0, data, older=older)

            return call

        variants = {"": gradient(True)}
        if every is not None:  # the same rounds, solving the recomputed steps again
            variants["_solve_again"] = gradient(False)
        forward_times: list[tuple[float, float]] = []
        first_pass_times: list[tuple[float, float]] = []
        gradient_times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            forward_times.append(timed(forward))
            first_pass_times.append(timed(first_pass))
            for name, call in variants.items():
                gradient_times[name].append(timed(call))
        rollout.keep_states = True
        row["forward_s"] = min(t[0] for t in forward_times)
        row["forward_cpu_s"] = min(t[1] for t in forward_times)
        row["first_pass_cpu_s"] = min(t[1] for t in first_pass_times)
        row["ratio_first_pass"] = row["first_pass_cpu_s"] / row["forward_cpu_s"]
        for name, times in gradient_times.items():
            row[f"gradient{name}_s"] = min(t[0] for t in times)
            row[f"gradient{name}_cpu_s"] = min(t[1] for t in times)
            row[f"ratio{name}"] = row[f"gradient{name}_cpu_s"] / row["forward_cpu_s"]
    print(json.dumps(row))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[10, 40, 160])
    parser.add_argument("--cells", type=positive_int, default=32)
    parser.add_argument(
        "--every", type=positive_int, default=10, help="steps per checkpoint segment"
    )
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--memory", action="store_true", help="a closure of u_n - u_(n-1): two time levels"
    )
    parser.add_argument(
        "--implicit", action="store_true", help="backward Euler with Newton (closure of u_{n+1})"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=positive_int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--measure", default="time", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    rows: list[dict[str, typing.Any]] = []
    for k in args.steps:
        for checkpoint in (False, True):
            row: dict[str, typing.Any] = {}
            for measure in ("time", "memory"):
                command = (
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        f"--measure={measure}",
                        f"--k={k}",
                        f"--cells={args.cells}",
                        f"--every={args.every}",
                        f"--repeats={args.repeats}",
                    ]
                    + (["--checkpoint"] if checkpoint else [])
                    + (["--memory"] if args.memory else [])
                    + (["--implicit"] if args.implicit else [])
                )
                # Times with the default allocator; memory with a fixed mmap threshold.
                environment = worker_environment() if measure == "memory" else None
                output = subprocess.run(
                    command, check=True, capture_output=True, text=True, env=environment
                )
                row.update(json.loads(output.stdout.strip().splitlines()[-1]))
            rows.append(row)
    header = (
        f"{'k':>5} {'checkpoint':>10} {'forward ms':>11} {'gradient ms':>12} "
        f"{'CPU fwd ms':>11} {'CPU grad ms':>12} {'ratio':>6} {'solving again':>14} "
        f"{'first pass':>11} {'peak RSS Δ MiB':>15}"
    )
    levels = ", two time levels (--memory)" if args.memory else ""
    scheme = "backward Euler, Newton" if args.implicit else "IMEX"
    print(
        f"P1 {args.cells}x{args.cells}, {rows[0]['dofs']} dofs, {rows[0]['points']} points, "
        f"{scheme}{levels}"
    )
    print(header)
    for row in rows:
        every = row["checkpoint_every"]
        again = f"{row['ratio_solve_again']:.2f}" if every else "-"
        print(
            f"{row['k']:>5} {('every ' + str(every)) if every else 'no':>10} "
            f"{ms(row['forward_s']):>11} {ms(row['gradient_s']):>12} "
            f"{ms(row['forward_cpu_s']):>11} {ms(row['gradient_cpu_s']):>12} "
            f"{row['ratio']:>6.2f} {again:>14} {row['ratio_first_pass']:>11.2f} "
            f"{row['peak_rss_delta_bytes'] / 2**20:>15.1f}"
        )
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    path = results / f"rollout_gradient{'_' + args.tag if args.tag else ''}.json"
    path.write_text(
        json.dumps(
            {"machine": machine(torch.device("cpu")), "args": vars(args), "rows": rows}, indent=2
        )
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
