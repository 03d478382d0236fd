"""Time a closure's tangent: reverse-mode autograd (what dolfinx_mno does) against forward mode.

Newton's method with a closure needs, at every iterate, the closure's values and its
tangent ``∂closure/∂operands`` at every quadrature point. ``PointwiseEvaluator`` computes
the tangent by reverse mode, one backward pass per output component over one forward pass.
This script times that against the forward-mode alternative (``torch.func.jvp``, one pass
per input component, in the evaluator's chunks) and against a plain forward pass (values
only), for:

* ``linear``: a linear layer with input and output normalisation, 2 inputs, 2 outputs
  (the multiscale-diffusion demos' flux closure);
* ``mlp``: ``Linear(3, 64) → tanh → Linear(64, 64) → tanh → Linear(64, 2)``, 3 inputs
  (``u`` and ``∇u`` in 2D), 2 outputs (a flux).

All in float64 on the CPU, one thread, over 10³, 10⁴ and 10⁵ points. Every figure is the
median of ``--repeats`` calls after 3 warm-up calls. The two tangents are checked to agree
(to 1e-12, relative). Writes ``benchmarks/results/tangent_modes[_TAG].json``.

    .venv/bin/python benchmarks/tangent_modes.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine, ms, positive_int, positive_size

import dolfinx_mno as mno
from dolfinx_mno.torch_bridge import PointwiseEvaluator


def models() -> dict[str, torch.nn.Module]:
    """The two closures, seeded, in float64, in evaluation mode."""
    torch.manual_seed(0)
    linear = mno.NormalizedModel(
        torch.nn.Linear(2, 2),
        mno.AffineNormalization(shift=[0.1, -0.2], scale=[2.0, 3.0], width=2),
        mno.AffineNormalization(shift=[0.0, 0.5], scale=[4.0, 1.5], width=2),
    ).double()
    mlp = torch.nn.Sequential(
        torch.nn.Linear(3, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 2),
    ).double()
    # Evaluation mode, as a closure sets it: the evaluator refuses a model in training mode.
    return {"linear": linear.eval(), "mlp": mlp.eval()}


def forward_mode(
    model: torch.nn.Module, x: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and tangent ``(n, num_outputs, num_inputs)`` by one ``jvp`` per input.

    In chunks of ``chunk`` points, as the evaluator works.
    """
    values, tangents = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            xc = x[start : start + chunk]
            direction = torch.zeros_like(xc)
            columns = []
            for i in range(x.shape[1]):
                direction.zero_()
                direction[:, i] = 1
                y, dy = torch.func.jvp(model, (xc,), (direction,))  # type: ignore[misc]
                columns.append(dy.reshape(xc.shape[0], -1))
            values.append(y)
            tangents.append(torch.stack(columns, dim=-1))
    return torch.cat(values), torch.cat(tangents)


def median_seconds(call, repeats: int) -> float:
    """Median wall time of ``call()`` over ``repeats`` calls, after 3 warm-up calls."""
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        call()
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=positive_size, nargs="+", default=[1e3, 1e4, 1e5])
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--tag", default="")
    return parser.parse_args(argv)


def main() -> None:
    """Run the study, write the JSON file and print the table."""
    args = parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for name, model in models().items():
        num_inputs = model[0].in_features if isinstance(model, torch.nn.Sequential) else 2
        for size in args.sizes:
            n = int(size)
            evaluator = PointwiseEvaluator(model, num_inputs, 2, n, np.float64, torch.device("cpu"))
            evaluator.inputs[:] = rng.standard_normal((n, num_inputs))
            x = torch.from_numpy(evaluator.inputs.copy())
            values = median_seconds(lambda e=evaluator: e.evaluate(tangent=False), args.repeats)
            reverse = median_seconds(lambda e=evaluator: e.evaluate(tangent=True), args.repeats)
            chunk = evaluator.batch_size
            forward = median_seconds(
                lambda m=model, x=x, c=chunk: forward_mode(m, x, c), args.repeats
            )
            reference = forward_mode(model, x, chunk)[1].numpy()
            evaluator.evaluate(tangent=True)
            difference = np.max(np.abs(evaluator.tangents - reference)) / np.max(np.abs(reference))
            if difference > 1e-12:
                raise AssertionError(f"{name}, {n} points: tangents differ by {difference:.1e}")
            rows.append(
                dict(
                    model=name,
                    points=n,
                    values_seconds=values,
                    reverse_seconds=reverse,
                    forward_seconds=forward,
                    speedup=forward / reverse,
                    tangent_difference=float(difference),
                )
            )
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    path = results / f"tangent_modes{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps({"machine": machine(torch.device("cpu")), "rows": rows}, indent=2))
    print("model   points   values [ms]  reverse [ms]  forward [ms]  forward/reverse")
    for r in rows:
        print(
            f"{r['model']:<7} {r['points']:>7}  {ms(r['values_seconds']):>11}  "
            f"{ms(r['reverse_seconds']):>12}  {ms(r['forward_seconds']):>12}  "
            f"{r['speedup']:>14.1f}x"
        )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
