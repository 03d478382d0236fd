# # Closures against dolfinx-external-operator, side by side
#
# This benchmark illustrates how to:
#
# - write the same pointwise closure twice, as a `dolfinx_external_operator.FEMExternalOperator`
#   with its external function (as that package's demos do) and as a `dolfinx_mno.Closure`
#   with a torch model, on the same mesh, operands and quadrature space;
# - time both pipelines interleaved in one run, for values alone and for values and the
#   tangent that Newton's method needs;
# - measure the machine's fp32 matmul rate in the same run, and the update of a
#   parameter-free identity closure against one residual assembly.
#
# The three closures (P1 ``u`` on a unit square of triangles, quadrature degree 2):
#
# - `analytic`: the flux $q(u, \nabla u) = (1 + u^2)\nabla u + u/2$ with operands
#   ``(u, grad(u))``, as in dolfinx-external-operator's non-linear heat demos. ext-op
#   evaluates it with NumPy and hand-written derivatives ``∂q/∂u`` and ``∂q/∂∇u`` (two
#   derivative operators); the closure runs the same formula as a torch module (float64)
#   and its tangent comes from autograd. Residual $\int q \cdot \nabla v$.
# - `mlp`: a fp32 MLP ``3 → 64 → 64 → 1``, tanh, on the single operand
#   ``x = (u, ∂u/∂x, ∂u/∂y)``; ext-op calls it inside its external function as its
#   hyperelasticity demo does: values from ``model(x)``, values and tangent in one call of
#   ``torch.func.vmap(torch.func.jacfwd(f, has_aux=True))``. Residual $\int c\, v$.
# - `mlp_vector`: the same MLP with two outputs (a flux), residual $\int q \cdot \nabla v$.
#
# What is timed (one "update"):
#
# - ext-op, values: `evaluate_operands(F_ops)` then `evaluate_external_operators(F_ops, …)`
#   (which assigns the values and calls `scatter_forward`).
# - ext-op, values + tangent: `evaluate_operands(F_ops)`, then for `analytic` the value and
#   both derivative operators (`evaluate_external_operators` on `F_ops` and on `J_ops`), for
#   the MLPs the derivative operator alone, whose external function returns the tangent and
#   the values, and the values assigned by hand (as in ext-op's hyperelasticity demo).
# - ours: `closure.update()` and `closure.update(tangent=True)`.
#
# Every figure is the median over `--repeats` rounds after two warm-up rounds; each round
# runs the four calls of a closure in alternating order (ABBA), each started after a barrier
# and timed as the maximum over the ranks. `torch.set_num_threads(1)` on every rank.
# Results go to `benchmarks/results/closure_vs_external_operator_<tag>.json`; rank 0 prints
# a table of times and ratios (ext-op time / ours: above 1 means ours is faster).
#
# ```
# python benchmarks/closure_vs_external_operator.py                  # serial, 1e4..1e6
# mpirun -n 2 python benchmarks/closure_vs_external_operator.py      # 2 ranks
# python benchmarks/closure_vs_external_operator.py --compare-ranks  # both, one after the other
# python benchmarks/closure_vs_external_operator.py --quick          # smoke test
# python benchmarks/closure_vs_external_operator.py --markdown benchmarks/results/*.json
# ```

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch
from _common import (
    existing_file,
    machine,
    ms,
    positive_int,
    positive_size,
    refuse_quick_overrides,
    result_tag,
    run_serial_and_parallel,
)
from closure_overhead import FirstColumn, matmul_rate, points_per_cell, residual_assembler, timed

# dolfinx_mno makes the MPI library of the dolfinx-solver wheel visible; it must be
# imported before dolfinx.
import dolfinx_mno as mno

# isort: split

import dolfinx_external_operator as dxo
import ufl
from dolfinx import fem, mesh

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH = 64
WARMUP = 2
CLOSURES = ("analytic", "mlp", "mlp_vector")


# ## The closures, written for both packages


class Flux(torch.nn.Module):
    """``q(u, ∇u) = (1 + u²)∇u + u/2``: ``(batch, 3) → (batch, 2)`` (inputs ``u, ∇u``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x[:, :1]
        return (1.0 + u * u) * x[:, 1:] + 0.5 * u


def flux_external(derivatives: tuple[int, ...]) -> Callable[..., np.ndarray]:
    """The flux for ext-op: NumPy values and hand-written derivatives (operands ``u, ∇u``)."""

    def values(u: np.ndarray, grad_u: np.ndarray) -> np.ndarray:
        u = u.reshape(-1, 1)
        return ((1.0 + u * u) * grad_u.reshape(-1, 2) + 0.5 * u).reshape(-1)

    def d_du(u: np.ndarray, grad_u: np.ndarray) -> np.ndarray:
        return (2.0 * u.reshape(-1, 1) * grad_u.reshape(-1, 2) + 0.5).reshape(-1)

    def d_dgrad(u: np.ndarray, grad_u: np.ndarray) -> np.ndarray:
        k = 1.0 + u.reshape(-1) ** 2
        out = np.zeros((k.size, 2, 2))
        out[:, 0, 0] = k
        out[:, 1, 1] = k
        return out.reshape(-1)

    functions = {(0, 0): values, (1, 0): d_du, (0, 1): d_dgrad}
    if derivatives not in functions:
        raise NotImplementedError(f"no external function for derivatives {derivatives}")
    return functions[derivatives]


def mlp(num_outputs: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Sequential:
    """An MLP ``3 → 64 → 64 → num_outputs`` with tanh, in evaluation mode (fp32 by default)."""
    torch.manual_seed(seed)
    layers = torch.nn.Sequential(
        torch.nn.Linear(3, WIDTH),
        torch.nn.Tanh(),
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.Tanh(),
        torch.nn.Linear(WIDTH, num_outputs),
    )
    return layers.to(dtype).eval()


def mlp_flops(num_outputs: int) -> int:
    """FLOPs per point of the MLP's three matrix products (biases and tanh not counted)."""
    return 2 * (3 * WIDTH + WIDTH * WIDTH + WIDTH * num_outputs)


def mlp_external(model: torch.nn.Module, value_shape: tuple[int, ...]) -> Callable:
    """The MLP inside an ext-op external function, as ext-op's hyperelasticity demo does.

    Values: ``model(x)`` on all points at once. Derivative: values and tangent from one
    call of ``vmap(jacfwd(f, has_aux=True))``, returned as ``(tangent, values)``.
    """
    dtype = next(model.parameters()).dtype

    def local(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = model(x.unsqueeze(0)).reshape(value_shape)
        return y, y

    stress_and_tangent = torch.func.vmap(torch.func.jacfwd(local, has_aux=True))

    def operand(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, 3).to(dtype)

    def values(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(operand(x)).double().numpy().reshape(-1)

    def tangent(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            jacobian, y = stress_and_tangent(operand(x))
        return jacobian.double().numpy().reshape(-1), y.double().numpy().reshape(-1)

    def external(derivatives: tuple[int, ...]) -> Callable:
        if derivatives == (0,):
            return values
        if derivatives == (1,):
            return tangent
        raise NotImplementedError(f"no external function for derivatives {derivatives}")

    return external


# ## One closure, both ways


@dataclass
class Pair:
    """One closure as an ext-op operator and as a ``Closure``, with their forms.

    Attributes:
        name: ``analytic``, ``mlp`` or ``mlp_vector``.
        closure: The ``dolfinx_mno.Closure``.
        operator: The ``FEMExternalOperator``.
        residual_ext, jacobian_ext: ext-op's residual and Jacobian, operators replaced.
        residual_ours, jacobian_ours: The same forms with the closure
            (``dolfinx_mno.derivative`` for the Jacobian).
        flops_per_point: MLP FLOPs per point (0 for the analytic closure).
    """

    name: str
    closure: mno.Closure
    operator: dxo.FEMExternalOperator
    residual_ext: ufl.Form
    jacobian_ext: ufl.Form
    residual_ours: ufl.Form
    jacobian_ours: ufl.Form
    F_operators: list = field(default_factory=list)
    J_operators: list = field(default_factory=list)
    flops_per_point: int = 0

    def ext_values(self) -> None:
        """ext-op: operands, then the operator's values (assigned and scattered by ext-op)."""
        operands = dxo.evaluate_operands(self.F_operators)
        dxo.evaluate_external_operators(self.F_operators, operands)

    def ext_values_and_tangent(self) -> None:
        """ext-op: operands, then values and derivatives, as its demos do."""
        operands = dxo.evaluate_operands(self.F_operators)
        if self.name == "analytic":
            dxo.evaluate_external_operators(self.F_operators, operands)
            dxo.evaluate_external_operators(self.J_operators, operands)
        else:  # one call returns (tangent, values); the values are assigned by hand
            ((_, values),) = dxo.evaluate_external_operators(self.J_operators, operands)
            self.operator.ref_coefficient.x.array[:] = values

    def ours_values(self) -> None:
        """``closure.update()``."""
        self.closure.update(tangent=False)

    def ours_values_and_tangent(self) -> None:
        """``closure.update(tangent=True)``."""
        self.closure.update(tangent=True)


def build_pair(
    name: str,
    u: fem.Function,
    quadrature_degree: int,
    closure_options: dict,
    mlp_dtype: torch.dtype = torch.float32,
) -> Pair:
    """The closure ``name`` on ``u``'s mesh, both ways, with residuals and Jacobians.

    The MLPs run in ``mlp_dtype`` on both sides (the operands are cast to it).
    """
    msh = u.function_space.mesh
    v = ufl.TestFunction(u.function_space)
    du = ufl.TrialFunction(u.function_space)
    metadata = {"quadrature_degree": quadrature_degree, "quadrature_scheme": "default"}
    dx = ufl.Measure("dx", domain=msh, metadata=metadata)
    if name == "analytic":
        operands = [u, ufl.grad(u)]
        value_shape: tuple[int, ...] = (2,)
        model: torch.nn.Module = Flux()
        external = flux_external
        flops = 0
    else:
        operands = [ufl.as_vector([u, u.dx(0), u.dx(1)])]
        value_shape = () if name == "mlp" else (2,)
        model = mlp(1 if name == "mlp" else 2, mlp_dtype)
        external = mlp_external(model, value_shape)
        flops = mlp_flops(1 if name == "mlp" else 2)
    Q = mno.quadrature_space(msh, quadrature_degree, value_shape)
    operator = dxo.FEMExternalOperator(*operands, function_space=Q, external_function=external)

    def residual(q: ufl.core.expr.Expr, measure: ufl.Measure) -> ufl.Form:
        test = ufl.grad(v) if value_shape else v
        return ufl.inner(q, test) * measure

    F = residual(operator, dx)
    J = ufl.algorithms.expand_derivatives(ufl.derivative(F, u, du))
    F_ext, F_operators = dxo.replace_external_operators(F)
    J_ext, J_operators = dxo.replace_external_operators(J)

    closure = mno.Closure(model, operands, value_shape, quadrature_degree, **closure_options)
    F_ours = residual(closure, closure.dx)
    J_ours = mno.derivative(F_ours, u, du)
    return Pair(
        name, closure, operator, F_ext, J_ext, F_ours, J_ours, F_operators, J_operators, flops
    )


def build_problem(comm: MPI.Comm, target_points: int, quadrature_degree: int):
    """Unit square of ``2 N²`` triangles with about ``target_points`` points; smooth P1 ``u``."""
    n = max(1, round(np.sqrt(target_points / (2 * points_per_cell(quadrature_degree)))))
    msh = mesh.create_unit_square(comm, n, n, mesh.CellType.triangle)
    V = fem.functionspace(msh, ("Lagrange", 1))
    u = fem.Function(V, name="u")
    u.interpolate(lambda x: np.sin(2 * x[0]) * np.cos(x[1]) + x[1] ** 2)
    return msh, u, n


# ## Timing


def interleaved(
    comm: MPI.Comm, calls: dict[str, Callable[[], None]], repeats: int
) -> dict[str, float]:
    """Median wall time (max over ranks) of each call, run in alternating order per round."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(WARMUP + repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            seconds = timed(comm, calls[name])
            if i >= WARMUP:
                samples[name].append(seconds)
    return {name: float(np.median(times)) for name, times in samples.items()}


def measure_pair(comm: MPI.Comm, pair: Pair, repeats: int) -> dict[str, object]:
    """Time the four updates of one closure and keep ours' stage timings."""
    stages: list[dict[str, float]] = []

    def ours_values() -> None:
        pair.ours_values()
        stages.append(dict(pair.closure.timings))

    times = interleaved(
        comm,
        {
            "ext_values": pair.ext_values,
            "ours_values": ours_values,
            "ext_values_tangent": pair.ext_values_and_tangent,
            "ours_values_tangent": pair.ours_values_and_tangent,
        },
        repeats,
    )
    points = comm.allreduce(pair.closure._num_cells * pair.closure._points_per_cell)
    result: dict[str, object] = {
        "closure": pair.name,
        "points": points,
        "times": times,
        "ours_stages": {
            key: float(np.median([s[key] for s in stages[WARMUP:]])) for key in stages[0]
        },
        "speedup_values": times["ext_values"] / times["ours_values"],
        "speedup_values_tangent": times["ext_values_tangent"] / times["ours_values_tangent"],
        "tangent_cost_ours": times["ours_values_tangent"] / times["ours_values"],
        "tangent_cost_ext": times["ext_values_tangent"] / times["ext_values"],
    }
    plan = getattr(pair.closure, "evaluation_plan", None)  # absent before the fast path
    if plan is not None:
        result["plan"] = json.loads(json.dumps(plan, default=str))
    if pair.flops_per_point:
        flops = pair.flops_per_point * points
        result["mlp_gflops_update"] = flops / times["ours_values"] / 1e9
        model_seconds = float(comm.allreduce(result["ours_stages"]["model"], op=MPI.MAX))
        result["mlp_gflops_model"] = flops / model_seconds / 1e9
    return result


def measure_identity(
    comm: MPI.Comm, u: fem.Function, quadrature_degree: int, repeats: int, closure_options: dict
):
    """``update()`` of the identity closure on ``[u, grad(u)]`` against one residual assembly.

    With the closures' options (``compile=True`` compiles the operand stage too).
    """
    closure = mno.Closure(FirstColumn(), [u, ufl.grad(u)], (), quadrature_degree, **closure_options)
    assemble = residual_assembler(u, closure)
    times = interleaved(comm, {"update": closure.update, "assembly": assemble}, repeats)
    mode = closure.evaluation_plan["operands"]["mode"]
    return {**times, "update_over_assembly": times["update"] / times["assembly"], "operands": mode}


# ## Reporting


TARGETS = (
    # (key, description, test on the report's largest-size and smallest-size figures)
    ("analytic_values", "analytic, values: ≥ 1.5× ext-op at the largest size"),
    ("analytic_values_small", "analytic, values: ≥ 1× ext-op at the smallest size"),
    ("analytic_values_tangent", "analytic, values + tangent: ≥ 1× ext-op"),
    ("mlp_values_tangent", "MLP, values + tangent: ≥ 3× ext-op (vmap(jacfwd))"),
    ("mlp_tangent_cost", "MLP, values + tangent ≤ 2× values (ours)"),
    ("mlp_matmul_fraction", "MLP values ≥ 50 % of the fp32 matmul rate (whole update)"),
    ("identity_over_assembly", "identity update ≤ 0.5 × one residual assembly"),
)


def targets(report: dict) -> dict[str, dict[str, object]]:
    """Each target of the issue with its measured figure and whether it is met."""
    cases = report["cases"]
    largest = max(c["points"] for c in cases)
    smallest = min(c["points"] for c in cases)

    def case(name: str, points: int) -> dict:
        return next(c for c in cases if c["closure"] == name and c["points"] == points)

    identity = next(i for i in report["identity"] if i["points"] == largest)
    figures = {
        "analytic_values": (case("analytic", largest)["speedup_values"], 1.5, ">="),
        "analytic_values_small": (case("analytic", smallest)["speedup_values"], 1.0, ">="),
        "analytic_values_tangent": (
            case("analytic", largest)["speedup_values_tangent"],
            1.0,
            ">=",
        ),
        "mlp_values_tangent": (case("mlp", largest)["speedup_values_tangent"], 3.0, ">="),
        "mlp_tangent_cost": (case("mlp", largest)["tangent_cost_ours"], 2.0, "<="),
        "mlp_matmul_fraction": (
            case("mlp", largest)["mlp_gflops_update"] / report["matmul_gflops"],
            0.5,
            ">=",
        ),
        "identity_over_assembly": (identity["update_over_assembly"], 0.5, "<="),
    }
    result = {}
    for key, description in TARGETS:
        value, bound, sense = figures[key]
        met = value >= bound if sense == ">=" else value <= bound
        result[key] = {"description": description, "value": value, "bound": bound, "met": met}
    return result


def print_report(report: dict) -> None:
    """Print times, ratios and the targets."""
    config = report["config"]
    print(
        f"\nclosure_vs_external_operator: {config['ranks']} rank(s) × {config['threads']} "
        f"thread(s), P1, quadrature degree {config['quadrature_degree']}, "
        f"closure options {config['closure_options']}"
    )
    load = report["load_average"]
    print(
        f"fp32 matmul ({config['matmul_n']}²): {report['matmul_gflops']:.1f} GFLOP/s in all; "
        f"load average before/after {load['before'][0]:.2f}/{load['after'][0]:.2f}"
    )
    print("times in ms (median, max over ranks); ratio = ext-op / ours (> 1: ours faster)")
    header = ["closure", "points", "ext val", "ours val", "ratio", "ext v+t", "ours v+t"]
    header += ["ratio", "ours t/v", "GFLOP/s"]
    print(" ".join(f"{h:>10}" for h in header))
    for c in report["cases"]:
        t = c["times"]
        row = [c["closure"], str(c["points"]), ms(t["ext_values"]), ms(t["ours_values"])]
        row += [f"{c['speedup_values']:.2f}", ms(t["ext_values_tangent"])]
        row += [ms(t["ours_values_tangent"]), f"{c['speedup_values_tangent']:.2f}"]
        row += [f"{c['tangent_cost_ours']:.2f}"]
        row += [f"{c['mlp_gflops_update']:.1f}" if "mlp_gflops_update" in c else "-"]
        print(" ".join(f"{x:>10}" for x in row))
    print("identity closure: update against one residual assembly")
    for i in report["identity"]:
        print(
            f"{i['points']:>10} update {ms(i['update']):>8} ms, assembly "
            f"{ms(i['assembly']):>8} ms, ratio {i['update_over_assembly']:.2f} "
            f"(operands: {i.get('operands', '-')})"
        )
    print("targets (largest size unless said otherwise):")
    for target in report["targets"].values():
        verdict = "met" if target["met"] else "NOT met"
        print(f"  {target['description']}: {target['value']:.2f} ({verdict})")


def markdown(paths: list[Path]) -> str:
    """Markdown tables of result files (times, ratios, targets), for ``docs/benchmarks.md``."""
    lines = []
    for path in paths:
        report = json.loads(path.read_text())
        config, load = report["config"], report["load_average"]
        lines += [
            f"**{path.name}**: {config['ranks']} rank(s) × {config['threads']} thread(s), "
            f"closure options {config['closure_options']}, fp32 matmul "
            f"{report['matmul_gflops']:.0f} GFLOP/s in all, 1-min load "
            f"{load['before'][0]:.1f} → {load['after'][0]:.1f}.",
            "",
            "| closure | points | ext-op values | ours values | ratio | ext-op values + tangent "
            "| ours values + tangent | ratio | ours (v+t)/v | MLP GFLOP/s (% of matmul) |",
            "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for c in report["cases"]:
            t = c["times"]
            rate = "–"
            if "mlp_gflops_update" in c:
                share = 100 * c["mlp_gflops_update"] / report["matmul_gflops"]
                rate = f"{c['mlp_gflops_update']:.1f} ({share:.0f} %)"
            lines.append(
                f"| {c['closure']} | {c['points']:,} | {ms(t['ext_values'])} | "
                f"{ms(t['ours_values'])} | **{c['speedup_values']:.2f}** | "
                f"{ms(t['ext_values_tangent'])} | {ms(t['ours_values_tangent'])} | "
                f"**{c['speedup_values_tangent']:.2f}** | {c['tangent_cost_ours']:.2f} | {rate} |"
            )
        lines += ["", "| points | identity update | residual assembly | ratio | operand mode |"]
        lines.append("|--:|--:|--:|--:|:--|")
        for i in report["identity"]:
            lines.append(
                f"| {i['points']:,} | {ms(i['update'])} | {ms(i['assembly'])} | "
                f"**{i['update_over_assembly']:.2f}** | {i.get('operands', '-')} |"
            )
        if report.get("targets"):
            lines += ["", "| target | measured | verdict |", "|:--|--:|:--|"]
            for target in report["targets"].values():
                verdict = "met" if target["met"] else "**not met**"
                lines.append(f"| {target['description']} | {target['value']:.2f} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def targets_table(paths: list[Path]) -> str:
    """One markdown row per target, one column per result file (the runs side by side)."""
    reports = [json.loads(path.read_text()) for path in paths]
    reports = [r for r in reports if r.get("targets")]
    header = "| target | " + " | ".join(
        p.stem.removeprefix("closure_vs_external_operator_")
        for r, p in zip(reports, paths, strict=False)
    )
    lines = [header + " |", "|:--|" + "--:|" * len(reports)]
    for key, description in TARGETS:
        cells = []
        for report in reports:
            target = report["targets"][key]
            cells.append(f"{target['value']:.2f}" + ("" if target["met"] else " ✗"))
        lines.append(f"| {description} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ## Driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``argv``: default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description="Closure against ext-op (see the header).")
    parser.add_argument("--sizes", type=positive_size, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed rounds per figure")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per rank")
    parser.add_argument("--quadrature-degree", type=positive_int, default=2)
    parser.add_argument("--closures", nargs="+", default=list(CLOSURES), choices=CLOSURES)
    parser.add_argument("--compile", action="store_true", help="Closure(..., compile=True)")
    parser.add_argument("--tag", default=None, help="result file tag (default np<ranks>)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--compare-ranks", action="store_true", help="1 rank, then --ranks")
    parser.add_argument("--ranks", type=positive_int, default=2)
    parser.add_argument("--mpirun", default=None)
    parser.add_argument(
        "--markdown",
        nargs="+",
        type=existing_file,
        default=None,
        help="only print result files as tables",
    )
    args = parser.parse_args(argv)
    refuse_quick_overrides(parser, args, ["sizes"])
    if args.quick:
        args.sizes = [2e3, 8e3]
        args.repeats = min(args.repeats, 3)
    args.sizes = [int(s) for s in args.sizes]
    return args


def main() -> None:
    """Run the benchmark."""
    args = parse_args()
    comm = MPI.COMM_WORLD
    if args.markdown:
        if comm.rank == 0:
            print(markdown(args.markdown))
            print(targets_table(args.markdown))
        return
    if args.compare_ranks:
        if comm.size > 1:
            raise SystemExit("--compare-ranks launches mpirun itself; run it serially.")
        forwarded = ["--repeats", str(args.repeats), "--threads", str(args.threads)]
        forwarded += ["--quadrature-degree", str(args.quadrature_degree)]
        forwarded += ["--sizes", *map(str, args.sizes), "--closures", *args.closures]
        forwarded += ["--compile"] if args.compile else []
        run_serial_and_parallel(
            str(Path(__file__).resolve()), forwarded, args.tag, args.ranks, args.mpirun
        )
        return

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    load_before = os.getloadavg()
    matmul_n = 2048
    matmul_gflops = float(comm.allreduce(matmul_rate(comm, device, matmul_n, args.repeats)))
    closure_options: dict[str, object] = {"device": "cpu"}
    if args.compile:
        closure_options["compile"] = True

    cases, identity = [], []
    for target in args.sizes:
        _, u, n = build_problem(comm, target, args.quadrature_degree)
        for name in args.closures:
            start = time.perf_counter()
            pair = build_pair(name, u, args.quadrature_degree, closure_options)
            setup = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
            case = measure_pair(comm, pair, args.repeats)
            case.update(n=n, setup_seconds=setup)
            cases.append(case)
            if comm.rank == 0:
                t = case["times"]
                print(
                    f"  {name:>10} {case['points']:>8} points: values ext {ms(t['ext_values'])}"
                    f" / ours {ms(t['ours_values'])} ms, values+tangent ext "
                    f"{ms(t['ext_values_tangent'])} / ours {ms(t['ours_values_tangent'])} ms",
                    flush=True,
                )
            del pair
        row = measure_identity(comm, u, args.quadrature_degree, args.repeats, closure_options)
        row["points"] = cases[-1]["points"]
        identity.append(row)

    report: dict[str, object] = {
        "config": {
            "ranks": comm.size,
            "threads": args.threads,
            "quadrature_degree": args.quadrature_degree,
            "repeats": args.repeats,
            "warmup": WARMUP,
            "matmul_n": matmul_n,
            "closure_options": {k: str(v) for k, v in closure_options.items()},
        },
        "machine": machine(device),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "matmul_gflops": matmul_gflops,
        "cases": cases,
        "identity": identity,
    }
    if set(args.closures) == set(CLOSURES):
        report["targets"] = targets(report)
    if comm.rank == 0:
        if "targets" not in report:
            report["targets"] = {}
        print_report(report)
        RESULTS.mkdir(parents=True, exist_ok=True)
        tag = result_tag(args.tag, comm.size, args.quick)
        path = RESULTS / f"closure_vs_external_operator_{tag}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
