"""Two routes to a rollout gradient, on the same problem in one run: ours and dolfinx-adjoint's.

Issue 13 names two ways to differentiate DOLFINx time steps with closures: dolfinx-adjoint
(pyadjoint for DOLFINx, which tapes every solve and assembly and derives the adjoint
equations from UFL) and a ``torch.autograd.Function`` per step whose backward runs the
transposed PETSc solve (:class:`dolfinx_mno.rollout.Rollout`, ``docs/adjoint.md``). This
script measures both on a closure that both can express: a flux with three parameters,

    q(u, ∇u) = θ₀ tanh(θ₁ u) ∇u + (θ₂ u², 0),

a ``torch.nn.Module`` in a :class:`dolfinx_mno.Closure` for us, the same formula in UFL with
``dolfinx_adjoint.Constant`` controls for pyadjoint, in the IMEX step

    a = (u v + dt ∇u·∇v) dx,   L = u_n v dx − dt q(u_n, ∇u_n)·∇v dx_q

on the unit square (P1, ``n × n`` squares cut into triangles, ``u = 0`` on the boundary,
quadrature degree 2, LU by MUMPS on both sides, ``dt = 0.01``). The loss is our
:func:`~dolfinx_mno.rollout.rollout_loss`, ``Σ_n Σ_dofs (u_n − t_n)²`` over ``k`` steps
against targets from a run with other parameters; pyadjoint gets the same sum exactly, as
``∫ w (u_n − t_n)² dx`` with the vertex quadrature rule and ``w = 1 / (lumped mass)``.

For each size, in alternating order over ``--repeats`` rounds after one warm-up round
(which JIT-compiles every form), the median wall time (slowest rank) of:

* ``ours_forward``: the stepper's ``run(k)``, the plain time loop;
* ``ours_gradient``: ``Rollout.gradient`` (forward with the torch graph, then backward);
* ``pyadjoint_forward``: the same loop with dolfinx-adjoint's problem, not taped
  (``pyadjoint.stop_annotating()``);
* ``pyadjoint_gradient``: the loop taped, then ``ReducedFunctional.derivative()``;
* ``pyadjoint_derivative``: ``derivative()`` alone, on the tape of the last round.

It also records both gradients and their largest relative difference (they must agree to
round-off; ``tests/test_benchmarks.py`` asserts 1e-10 on 1, 2 and 3 ranks).

``--closure mlp``: a learned closure instead, a tanh MLP ``3 → W → W → 2`` (``--width``,
float64, last layer scaled by 0.1), differentiated with respect to all its weights. pyadjoint
has no torch model: its MLP is written out in UFL (each weight matrix a vector
``dolfinx_adjoint.Constant`` reshaped with ``ufl.as_matrix``, ``tanh`` per component), so
FFCx compiles the network and its derivatives into the assembly kernels. That is the
fairest pyadjoint route to such a closure short of a custom block calling torch's VJP
(which is what our route is, ``docs/adjoint.md``); the first round's JIT compilation is
reported separately (``first_round``).

``--implicit``: backward Euler instead, ``(u − u_n) v + dt ∇u·∇v + dt q(u, ∇u)·∇v = 0``, the
closure of the new state, solved by Newton to 1e-13 on both sides (ours with the closure's
tangent in the Jacobian, :class:`~dolfinx_mno.timestepping.ImplicitStepper`; pyadjoint's
``NonlinearProblem`` with UFL's Jacobian). Writes
``benchmarks/results/adjoint_routes[_TAG].json`` and prints a table.

    .venv/bin/python benchmarks/adjoint_routes.py                 # n = 32, 64, 128; k = 20
    .venv/bin/mpirun -n 2 .venv/bin/python benchmarks/adjoint_routes.py --tag np2
    .venv/bin/python benchmarks/adjoint_routes.py --closure mlp --sizes 32 --tag mlp8
    .venv/bin/python benchmarks/adjoint_routes.py --implicit --tag implicit
    .venv/bin/python benchmarks/adjoint_routes.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch
from _common import machine, ms, positive_int, refuse_quick_overrides
from closure_overhead import timed

# dolfinx_mno makes the MPI library of the dolfinx-solver wheel visible; it must be
# imported before dolfinx.
import dolfinx_mno as mno

# isort: split

import dolfinx_adjoint as dxa
import pyadjoint
import ufl
from dolfinx import fem, la, mesh

from dolfinx_mno.models import MLP
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.rollout import Rollout
from dolfinx_mno.timestepping import IMEXStepper, ImplicitStepper

RESULTS = Path(__file__).resolve().parent / "results"
DT = 0.01
DIRECT = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
#: Newton converged to round-off on both sides: each adjoint is that of the converged step.
NEWTON = {
    **DIRECT,
    "snes_type": "newtonls",
    "snes_linesearch_type": "none",
    "snes_atol": 1e-13,
    "snes_rtol": 1e-13,
    "snes_stol": 0.0,
    "snes_max_it": 30,
    "snes_error_if_not_converged": True,
}
#: The parameters of the targets' run, and those the gradient is taken at.
TRUE, START = (0.05, 2.0, 0.5), (0.03, 1.5, 0.3)
WARMUP = 1


class Flux(torch.nn.Module):
    """``q(u, ∇u) = θ₀ tanh(θ₁ u) ∇u + (θ₂ u², 0)``: ``(batch, 3) → (batch, 2)``."""

    def __init__(self, theta: tuple[float, float, float]):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.theta
        u = x[:, :1]
        return a * torch.tanh(b * u) * x[:, 1:] + torch.cat([c * u * u, torch.zeros_like(u)], 1)


def flux_ufl(theta: tuple, u: ufl.core.expr.Expr) -> ufl.core.expr.Expr:
    """:class:`Flux` in UFL."""
    a, b, c = theta
    return a * ufl.tanh(b * u) * ufl.grad(u) + ufl.as_vector([c * u * u, 0.0])


def mlp(width: int) -> MLP:
    """The package's tanh MLP ``3 → width → width → 2`` (float64, seeded), its last layer
    scaled by 0.1 so that the flux stays small."""
    model = MLP(3, 2, hidden_features=[width, width], seed=0)
    with torch.no_grad():
        for parameter in list(model.parameters())[-2:]:
            parameter.mul_(0.1)
    return model


def mlp_ufl(model: MLP, controls: list, u: ufl.core.expr.Expr):
    """:func:`mlp` in UFL, its weights the (flattened) ``controls`` in parameter order."""

    def shaped(control: object, parameter: torch.Tensor) -> ufl.core.expr.Expr:
        if parameter.ndim == 1:
            return ufl.as_vector([control[i] for i in range(parameter.shape[0])])  # type: ignore[index]
        rows, columns = parameter.shape
        entries = [[control[i * columns + j] for j in range(columns)] for i in range(rows)]  # type: ignore[index]
        return ufl.as_matrix(entries)

    def tanh(z: ufl.core.expr.Expr) -> ufl.core.expr.Expr:
        return ufl.as_vector([ufl.tanh(z[i]) for i in range(z.ufl_shape[0])])

    w0, b0, w1, b1, w2, b2 = (
        shaped(c, p) for c, p in zip(controls, model.parameters(), strict=True)
    )
    x = ufl.as_vector([u, *ufl.grad(u)])
    return w2 * tanh(w1 * tanh(w0 * x + b0) + b1) + b2


def initial(x: np.ndarray) -> np.ndarray:
    """The initial state (zero on the boundary of the unit square)."""
    return 2.0 * np.sin(np.pi * x[0]) * np.sin(2.0 * np.pi * x[1])


@dataclass
class Routes:
    """One problem, both ways.

    Attributes:
        model, closure, stepper, rollout: Ours.
        u0: The initial state's owned dofs.
        targets: The target states' owned dofs, one per step.
        controls: pyadjoint's parameters (``dolfinx_adjoint.Constant``).
        pyadjoint_run: Runs pyadjoint's loop (taped unless annotation is stopped) and
            returns the loss (a pyadjoint ``AdjFloat`` when taped).
    """

    model: torch.nn.Module
    closure: mno.Closure
    stepper: IMEXStepper | ImplicitStepper
    rollout: Rollout
    u0: torch.Tensor
    targets: list[torch.Tensor]
    controls: list
    pyadjoint_run: Callable[[], object]
    #: The reduced functional of the last :meth:`pyadjoint_gradient`'s tape.
    functional: object = field(default=None, init=False, repr=False)

    def ours_forward(self) -> None:
        """The plain time loop: ``k`` steps from ``u0``."""
        stepper = self.stepper
        for function in (stepper.u_previous, stepper.u):
            function.x.array[: self.rollout.num_owned] = self.u0.numpy()
            function.x.scatter_forward()
        stepper.run(len(self.targets), progress=False)

    def ours_gradient(self) -> tuple[float, np.ndarray]:
        """``Rollout.gradient``: the loss and ``∂loss/∂θ``."""
        result = self.rollout.gradient(self.u0, self.targets, closures=[self.closure])
        return result.loss, np.concatenate([g.numpy().ravel() for g in result.parameters[0]])

    def pyadjoint_forward(self) -> None:
        """pyadjoint's loop without a tape."""
        with pyadjoint.stop_annotating():
            self.pyadjoint_run()

    def pyadjoint_gradient(self) -> tuple[float, np.ndarray]:
        """pyadjoint's loop taped, then the reduced functional's derivative."""
        pyadjoint.get_working_tape().clear_tape()
        loss = self.pyadjoint_run()
        self.functional = pyadjoint.ReducedFunctional(
            loss, [pyadjoint.Control(c) for c in self.controls]
        )
        return float(loss), self.pyadjoint_derivative()

    def pyadjoint_derivative(self) -> np.ndarray:
        """``derivative()`` on the last tape (after :meth:`pyadjoint_gradient`)."""
        if self.functional is None:
            raise RuntimeError("pyadjoint_derivative needs a tape: call pyadjoint_gradient first.")
        derivative = self.functional.derivative()  # type: ignore[attr-defined]
        return np.concatenate([d.x.array.ravel() for d in derivative])


def build(
    msh: mesh.Mesh,
    num_steps: int,
    bcs: bool = True,
    start_state: Callable[[np.ndarray], np.ndarray] = initial,
    width: int | None = None,
    implicit: bool = False,
) -> Routes:
    """Both routes on ``msh`` for ``num_steps`` steps (collective).

    ``bcs``: ``u = 0`` on the boundary (else natural conditions, so that a mesh of two
    cells keeps free dofs). ``start_state``: the initial state, interpolated in P1.
    ``width``: the closure is :func:`mlp` of this width (targets from its parameters
    scaled by 1.1) instead of :class:`Flux` (targets from ``TRUE``). ``implicit``: backward
    Euler with the closure of the new state, solved by Newton (ours with the closure's
    tangent in the Jacobian, pyadjoint's with UFL's derivative), instead of IMEX.
    """
    V = fem.functionspace(msh, ("Lagrange", 1))
    msh.topology.create_connectivity(msh.topology.dim - 1, msh.topology.dim)
    facets = mesh.exterior_facet_indices(msh.topology)
    boundary = fem.locate_dofs_topological(V, msh.topology.dim - 1, facets)
    conditions = [fem.dirichletbc(0.0, boundary, V)] if bcs else []
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = (u * v + DT * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx  # the IMEX matrix

    # Ours: the closure in the step's form, the rollout of the stepper.
    u_n, uh = fem.Function(V, name="u_n"), fem.Function(V, name="u")
    u_n.interpolate(start_state)
    uh.x.array[:] = u_n.x.array
    model: torch.nn.Module = Flux(START) if width is None else mlp(width)
    stepper: IMEXStepper | ImplicitStepper
    if implicit:
        closure = mno.Closure(model, [uh, ufl.grad(uh)], (2,), 2)
        F = (uh - u_n) * v * ufl.dx + DT * ufl.inner(ufl.grad(uh), ufl.grad(v)) * ufl.dx
        F += DT * ufl.inner(closure, ufl.grad(v)) * closure.dx
        nonlinear = NonlinearProblem(
            F, uh, bcs=conditions, petsc_options=NEWTON, petsc_options_prefix="ours_"
        )
        stepper = ImplicitStepper(nonlinear, uh, u_n, dt=DT)
    else:
        closure = mno.Closure(model, [u_n, ufl.grad(u_n)], (2,), 2)
        L = u_n * v * ufl.dx - DT * ufl.inner(closure, ufl.grad(v)) * closure.dx
        problem = LinearProblem(
            a, L, u=uh, bcs=conditions, petsc_options=DIRECT, petsc_options_prefix="ours_",
            reuse_matrix=True,
        )  # fmt: skip
        stepper = IMEXStepper(problem, uh, u_n, dt=DT)
    rollout = Rollout(stepper)
    u0 = torch.from_numpy(u_n.x.array[: rollout.num_owned].copy())
    parameters = [p.detach().clone() for p in model.parameters()]
    true = (
        [torch.tensor(TRUE, dtype=torch.float64)]
        if width is None
        else [1.1 * p for p in parameters]
    )
    with torch.no_grad():
        for p, value in zip(model.parameters(), true, strict=True):
            p.copy_(value)
        targets = [state.clone() for state in rollout.run(u0, num_steps)]
        for p, value in zip(model.parameters(), parameters, strict=True):
            p.copy_(value)

    # pyadjoint: the same step with the closure in UFL and its parameters as controls.
    if width is None:
        controls = [dxa.Constant(msh, value) for value in START]
    else:  # vectors: dolfinx-adjoint 0.4's Constant takes no matrix
        controls = [dxa.Constant(msh, p.numpy().ravel().copy()) for p in parameters]
    p_n, ph = dxa.Function(V, name="p_n"), dxa.Function(V, name="p")
    quadrature = ufl.Measure("dx", domain=msh, metadata={"quadrature_degree": 2})
    state = ph if implicit else p_n  # what the closure reads
    flux = flux_ufl(controls, state) if width is None else mlp_ufl(model, controls, state)
    problem_p: dxa.LinearProblem | dxa.NonlinearProblem
    if implicit:
        F_p = (ph - p_n) * v * ufl.dx + DT * ufl.inner(ufl.grad(ph), ufl.grad(v)) * ufl.dx
        F_p += DT * ufl.inner(flux, ufl.grad(v)) * quadrature
        problem_p = dxa.NonlinearProblem(
            F_p, ph, bcs=conditions, petsc_options=NEWTON, adjoint_petsc_options=DIRECT,
            petsc_options_prefix="pyadjoint_",
        )  # fmt: skip
    else:
        L_p = p_n * v * ufl.dx - DT * ufl.inner(flux, ufl.grad(v)) * quadrature
        problem_p = dxa.LinearProblem(
            a, L_p, u=ph, bcs=conditions, petsc_options=DIRECT, adjoint_petsc_options=DIRECT,
            petsc_options_prefix="pyadjoint_",
        )  # fmt: skip
    # Σ_dofs (p − t)² = ∫ w (p − t)² dx with the vertex rule and w = 1 / (lumped mass).
    vertex = ufl.Measure("dx", domain=msh, metadata={"quadrature_rule": "vertex"})
    lumped = fem.assemble_vector(fem.form(v * vertex))
    lumped.scatter_reverse(la.InsertMode.add)
    lumped.scatter_forward()
    weight = fem.Function(V)
    weight.x.array[:] = 1.0 / lumped.array
    target_functions = []
    for target in targets:
        function = fem.Function(V)
        function.x.array[: rollout.num_owned] = target.numpy()
        function.x.scatter_forward()
        target_functions.append(function)
    start = dxa.Function(V, name="start")
    start.interpolate(start_state)

    def pyadjoint_run() -> object:
        # Through pyadjoint (a new version of p_n on the tape), not by writing its array:
        # the tape would otherwise keep p_n's value from the end of the last run.
        dxa.assign(start, p_n)
        if implicit:  # Newton's first guess: the state, as ours
            dxa.assign(start, ph)
        loss = 0.0
        for target in target_functions:
            problem_p.solve()
            dxa.assign(ph, p_n)
            loss += dxa.assemble_scalar(weight * (ph - target) ** 2 * vertex)
        return loss

    return Routes(model, closure, stepper, rollout, u0, targets, controls, pyadjoint_run)


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a − b| / max |b|``."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def measure(
    comm: MPI.Comm,
    n: int,
    num_steps: int,
    repeats: int,
    width: int | None = None,
    implicit: bool = False,
) -> dict[str, object]:
    """Both routes on the ``n × n`` square: medians of interleaved rounds, and agreement.

    ``width``: the MLP closure of this width, else the flux; ``implicit``: backward Euler
    by Newton, else IMEX (:func:`build`).
    """
    msh = mesh.create_unit_square(comm, n, n)
    routes = build(msh, num_steps, width=width, implicit=implicit)
    calls = {
        "ours_forward": routes.ours_forward,
        "ours_gradient": routes.ours_gradient,
        "pyadjoint_forward": routes.pyadjoint_forward,
        "pyadjoint_gradient": routes.pyadjoint_gradient,
        "pyadjoint_derivative": routes.pyadjoint_derivative,
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    first_round: dict[str, float] = {}
    # Alternating orders; pyadjoint_derivative needs the tape of pyadjoint_gradient just before.
    orders = (
        list(calls),
        [*list(calls)[2:], "ours_gradient", "ours_forward"],
    )
    for i in range(WARMUP + repeats):
        order = orders[i % 2]
        for name in order:
            seconds = timed(comm, calls[name])
            if i >= WARMUP:
                samples[name].append(seconds)
            else:  # with the JIT compilation of every form
                first_round[name] = seconds
    ours_loss, ours = routes.ours_gradient()
    pyadjoint_loss, theirs = routes.pyadjoint_gradient()
    pyadjoint.get_working_tape().clear_tape()
    times = {name: float(np.median(values)) for name, values in samples.items()}
    return {
        "n": n,
        "steps": num_steps,
        "dofs": routes.stepper.u.function_space.dofmap.index_map.size_global,
        "times": times,
        "first_round": first_round,
        "gradient_over_forward": {
            "ours": times["ours_gradient"] / times["ours_forward"],
            "pyadjoint": times["pyadjoint_gradient"] / times["pyadjoint_forward"],
        },
        "pyadjoint_over_ours": {
            "forward": times["pyadjoint_forward"] / times["ours_forward"],
            "gradient": times["pyadjoint_gradient"] / times["ours_gradient"],
        },
        "loss": {"ours": ours_loss, "pyadjoint": pyadjoint_loss},
        "gradient": {"ours": ours.tolist(), "pyadjoint": theirs.tolist()},
        "gradient_difference": relative_difference(ours, theirs),
    }


def table(result: dict) -> str:
    """The results as a Markdown table (times in ms)."""
    closure = (
        "flux (3 parameters)"
        if result["width"] is None
        else f"MLP 3-{result['width']}-{result['width']}-2"
    )
    scheme = "implicit (Newton)" if result.get("implicit") else "IMEX"
    lines = [
        f"{closure}, {scheme}, {result['ranks']} rank(s), {result['steps']} steps, "
        f"{result['repeats']} rounds, {result['machine']['cpu']}",
        "",
        "| n | dofs | ours forward | ours gradient | ratio | pyadjoint forward | "
        "pyadjoint gradient | ratio | of which derivative | pyadjoint / ours, gradient | "
        "gradients differ by | pyadjoint's first gradient (compiling) |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for case in result["cases"]:
        t = case["times"]
        lines.append(
            f"| {case['n']} | {case['dofs']:,} | {ms(t['ours_forward'])} | "
            f"{ms(t['ours_gradient'])} | {case['gradient_over_forward']['ours']:.2f} | "
            f"{ms(t['pyadjoint_forward'])} | {ms(t['pyadjoint_gradient'])} | "
            f"{case['gradient_over_forward']['pyadjoint']:.2f} | "
            f"{ms(t['pyadjoint_derivative'])} | "
            f"{case['pyadjoint_over_ours']['gradient']:.1f} | "
            f"{case['gradient_difference']:.1e} | "
            f"{ms(case['first_round']['pyadjoint_gradient'])} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Our rollout gradient against pyadjoint's.")
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--steps", type=positive_int, default=20, help="time steps per rollout")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds")
    parser.add_argument("--closure", choices=("flux", "mlp"), default="flux")
    parser.add_argument(
        "--width", type=positive_int, default=8, help="hidden width of --closure mlp"
    )
    parser.add_argument("--implicit", action="store_true", help="backward Euler by Newton")
    parser.add_argument("--tag", default=None, help="result file tag")
    parser.add_argument("--quick", action="store_true", help="n = 8, 4 steps, 1 round")
    args = parser.parse_args(argv)
    refuse_quick_overrides(parser, args, ["sizes", "steps", "repeats"])
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.sizes, args.steps, args.repeats = [8], 4, 1
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    width = args.width if args.closure == "mlp" else None
    cases = []
    for n in args.sizes:
        cases.append(measure(comm, n, args.steps, args.repeats, width, args.implicit))
        if comm.rank == 0:
            print(f"n = {n}: done", flush=True)
    result = {
        "machine": machine(torch.device("cpu")),
        "ranks": comm.size,
        "closure": args.closure,
        "width": width,
        "implicit": args.implicit,
        "steps": args.steps,
        "repeats": args.repeats,
        "cases": cases,
    }
    if comm.rank == 0:
        RESULTS.mkdir(exist_ok=True)
        suffix = f"_{args.tag}" if args.tag else "_quick" if args.quick else ""
        name = f"adjoint_routes{suffix}.json"
        (RESULTS / name).write_text(json.dumps(result, indent=1))
        print(table(result))
    return result


if __name__ == "__main__":
    main()
