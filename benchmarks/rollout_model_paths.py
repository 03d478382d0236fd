"""Rollouts and their gradients by how the closure's MLP runs in them, interleaved in one process.

The problem is ``benchmarks/rollout_gradient.py``'s (an IMEX advection-diffusion step on
the unit square, P1, an MLP source closure ``Linear(3, 32) → tanh → Linear(32, 32) → tanh →
Linear(32, 1)`` in float64 at 6,144 points, one thread, one rank), with ``--steps`` steps in
segments of ``--every``. The rollout's model stage (``Closure.model_outputs``) runs five
ways, switched in turn within each round on the same rollout:

* ``model``: the model's own forward with autograd (torch's ``tanh``), as before the
  fourteenth session;
* ``numpy tanh per op``: the same layers with autograd, and NumPy's ``tanh`` as an autograd
  function of its own (a reference kept here: it separates the two effects below);
* ``fused`` (what dolfinx_mno runs when the closure's updates chose NumPy's ``tanh``): the
  layers as one autograd function, ``mlp_kernel.MLPFunction``, NumPy's ``tanh`` and a
  hand-written backward, the matrix products by torch's BLAS;
* ``fused, numpy gemm``: the same with the matrix products by NumPy's BLAS;
* ``the same, buffers without a graph`` (what dolfinx_mno runs when the updates chose
  NumPy's tanh and BLAS): where no graph is recorded (the forward rollout, the first pass
  of each checkpointed segment), the fused pass of the updates in its buffers
  (``SequentialMLP.fresh_values``) instead of ``MLPFunction``.

Each round times, for each way, the best of ``--repeats`` forward rollouts (``torch.no_grad``)
and of as many gradients, in CPU time (``time.process_time``: other jobs on a shared
machine inflate it less than wall time). The table gives the medians over ``--rounds``
rounds, each way's ratio of gradient to forward, and each way's time against ``model``'s
in the same rounds. Writes ``benchmarks/results/rollout_model_paths[_TAG].json``.

    .venv/bin/python benchmarks/rollout_model_paths.py
    .venv/bin/python benchmarks/rollout_model_paths.py --steps 4 --cells 8 --rounds 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from unittest import mock

import numpy as np
import rollout_gradient
import torch
from _common import machine, positive_int

from dolfinx_mno import pointwise_kernel


class NumPyTanh(torch.autograd.Function):
    """``tanh`` by NumPy as its own autograd function (the per-operation reference)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``tanh(x)`` into a new tensor, kept for the backward."""
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        np.tanh(x.detach().contiguous().numpy(), out=y.numpy())
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``grad (1 - y²)``."""
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


def numpy_tanh_per_op(kernel: pointwise_kernel.PointwiseKernel, x: torch.Tensor) -> torch.Tensor:
    h = x
    for layer in kernel.model:
        h = NumPyTanh.apply(h) if isinstance(layer, torch.nn.Tanh) else layer(h)
    return h


def model_forward(kernel: pointwise_kernel.PointwiseKernel, x: torch.Tensor) -> torch.Tensor:
    return kernel.model(x)


def fused_with(gemm: str):
    """The fused pass with NumPy's tanh and ``gemm``'s BLAS (whatever the closure chose)."""

    def way(kernel: pointwise_kernel.PointwiseKernel, x: torch.Tensor) -> torch.Tensor:
        assert kernel._mlp is not None
        kernel._mlp.use_tanh_kernel("numpy", x.dtype, x.device)
        kernel._mlp.use_gemm_kernel(gemm, x.dtype, x.device)
        return kernel._mlp.differentiable_values(x)

    return way


DIFFERENTIABLE_VALUES = pointwise_kernel.PointwiseKernel.differentiable_values


def buffered(kernel: pointwise_kernel.PointwiseKernel, x: torch.Tensor) -> torch.Tensor:
    """What dolfinx_mno runs with NumPy's tanh and BLAS: without a graph, the buffers."""
    assert kernel._mlp is not None
    kernel._mlp.use_tanh_kernel("numpy", x.dtype, x.device)
    kernel._mlp.use_gemm_kernel("numpy", x.dtype, x.device)
    return DIFFERENTIABLE_VALUES(kernel, x)


WAYS = {
    "model": model_forward,
    "numpy tanh per op": numpy_tanh_per_op,
    "fused": fused_with("torch"),
    "fused, numpy gemm": fused_with("numpy"),
    "the same, buffers without a graph": buffered,
}


def cpu_seconds(action) -> float:
    start = time.process_time()
    action()
    return time.process_time() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=160)
    parser.add_argument(
        "--every", type=positive_int, default=10, help="steps per checkpoint segment"
    )
    parser.add_argument("--cells", type=positive_int, default=32)
    parser.add_argument("--rounds", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--tag", default="")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)

    rollout, u0, _, V = rollout_gradient.build(args.cells, args.every)
    data = rollout_gradient.targets(V, rollout.num_owned, args.steps)
    (closure,) = rollout.closures
    plan = closure.evaluation_plan
    print(
        f"this closure's updates chose {plan['tanh_kernel']!r} tanh and "
        f"{plan['gemm_kernel']!r} GEMM"
    )

    def forward() -> None:
        with torch.no_grad():
            rollout.run(u0, args.steps)

    def gradient() -> None:
        rollout.gradient(u0, data)

    times: dict[str, dict[str, list[float]]] = {w: {"forward": [], "gradient": []} for w in WAYS}
    for round_ in range(args.rounds):
        for way, function in WAYS.items():
            with mock.patch.object(
                pointwise_kernel.PointwiseKernel, "differentiable_values", function
            ):
                gradient()  # warm-up
                times[way]["gradient"].append(
                    min(cpu_seconds(gradient) for _ in range(args.repeats))
                )
                times[way]["forward"].append(min(cpu_seconds(forward) for _ in range(args.repeats)))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    rows = []
    for way, entry in times.items():
        ratios = [g / f for g, f in zip(entry["gradient"], entry["forward"], strict=True)]
        against = {
            kind: float(
                np.median([a / b for a, b in zip(entry[kind], times["model"][kind], strict=True)])
            )
            for kind in ("forward", "gradient")
        }
        rows.append(
            {
                "way": way,
                "forward_cpu_s": float(np.median(entry["forward"])),
                "gradient_cpu_s": float(np.median(entry["gradient"])),
                "ratio": float(np.median(ratios)),
                "forward_against_model": against["forward"],
                "gradient_against_model": against["gradient"],
                "rounds": entry,
            }
        )
    result = {
        "machine": machine(torch.device("cpu")),
        "args": vars(args),
        "points": 6 * args.cells**2,
        "tanh_kernel": plan["tanh_kernel"],
        "gemm_kernel": plan["gemm_kernel"],
        "rows": rows,
    }
    name = f"rollout_model_paths{'_' + args.tag if args.tag else ''}.json"
    out = Path(__file__).parent / "results" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(
        f"\nk = {args.steps}, segments of {args.every}, {6 * args.cells**2:,} points; "
        f"CPU ms, medians of {args.rounds} rounds"
    )
    header = f"{'way':<34} {'forward':>8} {'gradient':>9} {'ratio':>6}  against 'model'"
    print(header)
    for row in rows:
        print(
            f"{row['way']:<34} {1e3 * row['forward_cpu_s']:>8.0f} "
            f"{1e3 * row['gradient_cpu_s']:>9.0f} {row['ratio']:>6.2f}  "
            f"forward {row['forward_against_model']:.2f}, gradient "
            f"{row['gradient_against_model']:.2f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
