# # The GPU checks of issues 12, 13 and 14, in one short run
#
# A GPU machine is lent to some tasks only, for minutes. This script is what such a session
# runs, prepared and smoke-tested on the CPU beforehand (`--quick --device cpu`, in
# `tests/test_benchmarks.py`). One process, serial, every check guarded: a check that fails
# records its error and the others still run. An estimated 5-8 minutes on an H100-class
# machine, most of it the torch.compile of the CUDA-graph check; run it with a timeout.
#
# 1. **Transfers** (issue 12): the stages of one update of the `3 → 64 → 64 → 1` fp32 MLP
#    closure with its model on the device (`closure_overhead.py`'s `measure_case`) at 10⁶
#    and 10⁷ points, and the bandwidth of its host→device and device→host copies (the
#    float64 operands and values on the host side) as a fraction of the pinned-copy limit
#    measured in the same run for the same number of bytes. Target: ≥ 50 %.
# 2. **CUDA graphs** (issue 12): the same closure's `update()` with `compile=True`, CUDA
#    graphs on (`mode="reduce-overhead"`, the default on a GPU) and off (`mode="default"`),
#    and eager.
# 3. **Rollout gradients on the device** (issues 13 and 14): the gradient of a `k`-step
#    rollout loss with a neuraloperator FNO in a `NonlocalClosure` (float32, seeded, the
#    same weights on both devices), its model on the CPU and on the device: the largest
#    difference of the parameter gradients relative to their largest entry (issue 13's
#    target: ≤ 1e-6), and the times of a forward rollout and of a gradient on each.
#    (a) the 1D Burgers coarse model (128 cells, the demo's `Burgers`), (b) the 2D
#    turbulence coarse model with its MNO (`turbulence_scaling.py`'s coarse+MNO case, 64²):
#    the coarse + MNO run and its a-posteriori training step of issue 14.
#
# ```
# python benchmarks/gpu_checks.py --device cuda --output-dir "$OUT"   # on the GPU machine
# python benchmarks/gpu_checks.py --quick --device cpu                # smoke test, seconds
# ```
#
# Writes `gpu_checks<_tag>.json` to `--output-dir` (default `benchmarks/results/`) and
# prints a table per check.

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpi4py import MPI

import closure_overhead
import numpy as np
import torch
import turbulence_scaling
import ufl
from _common import device_name, machine, positive_int, positive_size, refuse_quick_overrides
from neuralop.models import FNO

import dolfinx_mno as mno
from dolfinx_mno import pointwise_kernel
from dolfinx_mno.rollout import Rollout
from dolfinx_mno.timestepping import IMEXStepper

DEMOS = Path(__file__).resolve().parents[1] / "demos"
sys.path[:0] = [str(DEMOS / "burgers"), str(DEMOS)]
from burgers import Burgers

RESULTS = Path(__file__).resolve().parent / "results"
COMM = MPI.COMM_SELF


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(device: torch.device, action: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``action()`` after one warm-up call, the device synchronised."""
    action()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        action()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# ## 1. Transfers against the pinned-copy limit


def pinned_copy_rates(device: torch.device, num_bytes: int, repeats: int) -> dict[str, float]:
    """Bytes per second of one pinned host→device and device→host copy of ``num_bytes``."""
    host = torch.empty(num_bytes // 8, dtype=torch.float64).pin_memory()
    on_device = torch.empty(num_bytes // 8, dtype=torch.float64, device=device)
    h2d = median_seconds(device, lambda: on_device.copy_(host, non_blocking=True), repeats)
    d2h = median_seconds(device, lambda: host.copy_(on_device, non_blocking=True), repeats)
    return {"h2d": num_bytes / h2d, "d2h": num_bytes / d2h}


def transfers(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The MLP closure's update stages and its copies' share of the pinned-copy limit."""
    options = argparse.Namespace(
        quadrature_degree=2, device=str(device), batch_size=args.batch_size, repeats=args.repeats
    )
    matmul = closure_overhead.matmul_rate(COMM, device, 2048 if args.quick else 8192, 3)
    rows = []
    for target in args.sizes:
        _, u, _ = closure_overhead.build_problem(COMM, int(target), 1, 2)
        case = closure_overhead.measure_case(
            COMM, u, closure_overhead.mlp(3), options, matmul, closure_overhead.mlp_flops(3)
        )
        points, stages = case["points"], case["stages"]
        row = {"points": points, "update": case["update"], "assembly": case["assembly"]}
        row.update({f"stage_{k}": v for k, v in stages.items()})
        # Host side: float64 operands (3 a point) in, float64 values (1 a point) out.
        moved = {"h2d": 3 * 8 * points, "d2h": 8 * points}
        if device.type == "cuda":
            for way, num_bytes in moved.items():
                limit = pinned_copy_rates(device, num_bytes, args.repeats)[way]
                row[f"{way}_bytes_per_s"] = num_bytes / stages[way]
                row[f"{way}_pinned_limit_bytes_per_s"] = limit
                row[f"{way}_fraction_of_limit"] = num_bytes / stages[way] / limit
        rows.append(row)
    return rows


# ## 2. CUDA graphs on and off


def cuda_graphs(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """``update()`` of the MLP closure: eager, compiled with and without CUDA graphs."""
    _, u, _ = closure_overhead.build_problem(COMM, int(args.sizes[0]), 1, 2)
    rows = []
    # On the CPU only the mode without graphs exists; the smoke test (--quick) skips it
    # (seconds of compilation; tests/test_pointwise_kernel.py covers compile=True).
    modes: tuple[str, ...] = ("reduce-overhead", "default") if device.type == "cuda" else ()
    modes = modes if device.type == "cuda" or args.quick else ("default",)
    settings = [("eager", False, None)] + [(f"compiled, mode={m}", True, m) for m in modes]
    for label, compiled, mode in settings:
        if mode is not None:
            pointwise_kernel.CUDA_COMPILE_MODE = mode
        try:
            start = time.perf_counter()
            closure = mno.Closure(closure_overhead.mlp(3), [u, ufl.grad(u)], (), 2,
                                  device=device, compile=compiled)  # fmt: skip
            closure.update()
            setup = time.perf_counter() - start
            update = median_seconds(device, closure.update, args.repeats)
        finally:
            pointwise_kernel.CUDA_COMPILE_MODE = "reduce-overhead"
        kernel = closure._evaluator.kernel
        rows.append({
            "setting": label, "points": closure._evaluator.num_points, "update": update,
            "setup": setup, "compile_error": getattr(kernel, "compile_error", None),
        })  # fmt: skip
    return rows


# ## 3. Rollout gradients with the model on the CPU and on the device


def burgers_rollout(device: torch.device, quick: bool) -> Rollout:
    """The 1D Burgers coarse model with an FNO closure of ``(u, u_x)`` on ``device``."""
    cells = 16 if quick else 128

    def closure(un: Any) -> tuple[Any, Any]:
        torch.manual_seed(0)
        fno = FNO(n_modes=(8 if quick else 32,), in_channels=2, out_channels=1,
                  hidden_channels=8 if quick else 32, n_layers=4)  # fmt: skip
        tau = mno.NonlocalClosure(
            fno.eval(), mno.Operands({"u": un, "u_x": un.dx(0)}), value_shape=(),
            quadrature_degree=2, grid_shape=(2 * cells + 1,), bounding_box=((0.0,), (1.0,)),
            mask_channel=False, device=device,
        )  # fmt: skip
        return tau, tau.dx

    coarse = Burgers(cells, 2e-4, closure, name=f"burgers_{device.type}", comm=COMM)
    coarse.u_previous.interpolate(lambda x: np.sin(2 * np.pi * x[0]) * (1 - x[0]) * x[0] * 4)
    stepper = IMEXStepper(coarse.problem, coarse.u, coarse.u_previous, coarse.dt, 0.0, coarse.time)
    return Rollout(stepper)


def turbulence_rollout(device: torch.device, quick: bool) -> Rollout:
    """The 2D turbulence coarse model (64², 8² quick) with its FNO on ``device``."""
    options = ["--device", str(device)] + (
        ["--quick", "--modes", "4", "--hidden", "4"] if quick else []
    )
    args = turbulence_scaling.parse_args(options)
    flow = turbulence_scaling.build_flow("coarse+MNO", 8 if quick else 64, args, COMM)
    flow.set_vorticity(turbulence_scaling.initial_vorticity(0))
    stepper = IMEXStepper(flow.problem, flow.w, flow.w_previous, flow.dt, 0.0, flow.time)
    return Rollout(stepper)


def as_real(gradient: torch.Tensor) -> torch.Tensor:
    """A gradient as real numbers (an FNO's spectral weights are complex)."""
    gradient = gradient.detach()
    return torch.view_as_real(gradient) if gradient.is_complex() else gradient


CASES = {"burgers_1d": burgers_rollout, "turbulence_2d": turbulence_rollout}


def rollout_gradients(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Per case: the gradient on the CPU and on ``device``, their difference and times."""
    rows = []
    for name, build in CASES.items():
        row: dict[str, Any] = {"case": name, "steps": args.steps}
        gradients = {}
        for where in dict.fromkeys([torch.device("cpu"), device]):
            rollout = build(where, args.quick)
            u0 = rollout.initial_state()
            targets = [0.9 * u0] * args.steps
            result = rollout.gradient(u0, targets)
            flat = torch.cat([as_real(g).reshape(-1).cpu().double() for g in result.parameters[0]])
            gradients[where.type] = flat

            def forward(rollout=rollout, u0=u0) -> None:
                with torch.no_grad():
                    rollout.run(u0, args.steps)

            repeats = max(1, args.repeats // 3)
            row[f"{where.type}_loss"] = result.loss
            row[f"{where.type}_forward_s"] = median_seconds(where, forward, repeats)
            row[f"{where.type}_gradient_s"] = median_seconds(
                where, lambda r=rollout, u=u0, t=targets: r.gradient(u, t), repeats
            )
            row["dofs"], row["parameters"] = rollout.num_owned, int(flat.numel())
        cpu, other = gradients["cpu"], gradients[device.type]
        row["relative_difference"] = float((other - cpu).abs().max() / cpu.abs().max())
        rows.append(row)
    return rows


# ## The run


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    for row in rows:
        print("  " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
        ))  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The GPU checks of issues 12-14 (see header).")
    parser.add_argument(
        "--device", type=device_name, default="auto", help="cuda, cpu or auto (default auto)"
    )
    parser.add_argument("--sizes", type=positive_size, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--steps", type=positive_int, default=20, help="rollout steps (default 20)")
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--batch-size", type=positive_int, default=None, help="closure chunk size")
    parser.add_argument("--tag", default="")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    refuse_quick_overrides(parser, args, ["sizes", "steps", "repeats"])
    return args


def main() -> None:
    args = parse_args()
    if args.quick:
        args.sizes, args.steps, args.repeats = [2e3], 3, 3
    device = mno.resolve_device(args.device, COMM)  # torch's threads: all cores, for the CPU side
    report: dict[str, Any] = {
        "machine": machine(device),
        "args": vars(args) | {"output_dir": str(args.output_dir)},
    }
    checks = {
        "transfers": transfers,
        "cuda_graphs": cuda_graphs,
        "rollout_gradients": rollout_gradients,
    }
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            report[name] = check(args, device)
            print_rows(f"{name} ({time.perf_counter() - start:.0f} s)", report[name])
        except Exception as err:  # a failed check must not lose the others' figures
            report[name] = {"error": "".join(traceback.format_exception(err))}
            print(f"\n{name} FAILED:\n{report[name]['error']}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else "_quick" if args.quick else ""
    path = args.output_dir / f"gpu_checks{suffix}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
