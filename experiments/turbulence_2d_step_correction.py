"""2D turbulence: a learned correction of the whole coarse step (issue 14, after "What limits it").

``turbulence_2d_limits.py`` found that the exact subgrid flux ``τ`` fed at every coarse
step keeps the 16² model correlated with the filtered DNS only 1.7× longer, while with the
DNS time step it outlasts the 64² mesh: the coarse *time* step's error, which ``τ`` does
not correct, is the limit. This experiment measures the next step, a closure that corrects
the whole coarse step (Kochkov et al. 2021's learned correction, arXiv:2102.01010; Um et
al. 2020's "solver in the loop", arXiv:2007.00016):

1. **Target.** The one-step correction ``s_n``, a vorticity source on the coarse mesh such
   that one coarse step from the filtered DNS state ``ω̄(t_n)`` with the source gives
   ``ω̄(t_{n+1})`` exactly. With the step ``a(w, (v, q)) = L((v, q)) + Δt (s, v)``
   (:mod:`flow`), ``r(v) = a(w̄_{n+1}, (v, 0)) − L((v, 0))`` at ``w̄_n`` and ``s_n`` is the
   P1 function vanishing on the walls with ``Δt (s_n, v) = r(v)`` for the interior ``v``
   (one solve with the coarse mass matrix). Checks: one coarse step with the exact ``s_n``
   reproduces ``ω̄_{n+1}`` to round-off, and an *oracle* run fed ``s_n`` at every coarse
   step tracks the filtered DNS.
2. **Learnability.** (a) A local MLP of the pointwise coarse features ``(ω̄, ū, ∇ω̄, ∇ū)``
   at the quadrature points → ``s`` (a :class:`dolfinx_mno.Closure`), (b) an FNO of
   ``(ω̄, ū)`` on the demo's grid → ``s`` (a :class:`dolfinx_mno.NonlocalClosure`), both
   fitted a priori on the training seeds and entering the coarse step as a source, ``+ dt *
   inner(closure, v) * closure.dx``; the better one is then trained a posteriori through
   the solver (``fit_rollout``). Skill on the held-out test seed (relative L² error,
   variance explained) and the decorrelation time of the 16² model with each source, from
   the test seed's filtered state, against no closure, the oracle and the 32²/64² ladder,
   with the energy of a long run for stability.

The DNS (the demo's settings, :mod:`turbulence_2d_data`, shared with
``turbulence_2d_limits.py``) is filtered at every coarse step and saved per rank in
``experiments/output/turbulence_2d_step_correction/dns_*.npz``; a rerun with the same
settings and number of ranks reads it instead::

    mpirun -n 2 python experiments/turbulence_2d_step_correction.py   # --medium settings
    python experiments/turbulence_2d_step_correction.py --quick       # smoke test, < 60 s

Writes ``summary.json`` (``summary_quick.json`` with ``--quick``; with ``--train-seeds N``
``summary_medium_Nseeds.json``, and ``_bound<B>``, ``_window<W>`` for those options)
beside the DNS data and prints the tables. ``--bound B`` wraps both learned sources in
:class:`dolfinx_mno.Bounded` (``B`` training standard deviations), ``--window W`` sets the
a-posteriori window, ``--dissipative`` removes in the runs, at every step, the enstrophy
the learned sources would inject. ``--memory`` gives the local source the change of the
coarse vorticity over the last coarse step as well (``ω̄_n − ω̄_{n-1}`` and its gradient;
the coarse flow keeps ``ω̄_{n-1}`` as its stepper's older state), fits only that source,
compares it with the one without memory fitted by an earlier run of the same settings,
and trains it a posteriori through the solver with a rollout whose state holds both time
levels (trajectories at every coarse step, windows of ``W × sample_every`` steps);
``--warm-start`` starts that training from the source without memory. ``--cnn`` replaces
the FNO by a small CNN on the same grid (compact support, as Kochkov et al.'s models) and
reads the local MLP fitted by the run without it. ``--test-seeds K`` runs every model
(and the ladder) from ``K`` more test trajectories too, seeds 101, ..., ``100 + K`` (their
DNS saved beside the others): each model's decorrelation times over the ``K + 1`` test
seeds, their spread, and the resolution factor of the seed-averaged correlation.
``--coarse N`` sets the coarse mesh (``N²``, default 16² at ``--medium``; the ladder is
``N²``, ``(2N)²`` and ``(4N)²`` where coarser than the DNS), with its own DNS, fits and
summaries (``_coarse<N>`` in their names).
"""

import argparse
import itertools
import json
import math
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpi4py import MPI

import numpy as np
import torch
import ufl
from dolfinx import fem
from ufl.algorithms.estimate_degrees import estimate_total_polynomial_degree

import dolfinx_mno as mno
from dolfinx_mno.data import MassSolver
from dolfinx_mno.grid_gather import GriddedSampler
from dolfinx_mno.models import MLP
from dolfinx_mno.quadrature import measure, quadrature_points
from dolfinx_mno.training import fit

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY / "demos"), str(REPOSITORY / "demos" / "turbulence_2d")]
from comparison import resolution_factor, train_a_posteriori
from flow import VorticityFlow
from turbulence_2d_data import (
    CoarseRuns,
    Turbulence,
    add_resolution_factors,
    as_run,
    closure_grid,
    fit_grid_operator,
    fno,
    grid_closure,
    grid_spec,
    over_seeds,
    read_cache,
    settings,
    steps,
    write_cache,
)
from utilities import assemble_global, log, output_folder, positive_int

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="small problem, a smoke test")
parser.add_argument("--rollout-epochs", type=positive_int, default=None, help="a-posteriori epochs")
parser.add_argument(
    "--window",
    type=positive_int,
    default=None,
    help="a-posteriori window, in snapshots (default 4)",
)
parser.add_argument(
    "--dissipative", action="store_true",
    help="runs remove the enstrophy a learned source injects: s - max(0, (s, ω)) / (ω, ω) ω",
)  # fmt: skip
parser.add_argument("--mlp-epochs", type=positive_int, default=None, help="a-priori epochs (100)")
parser.add_argument("--fno-epochs", type=positive_int, default=None, help="a-priori epochs (60)")
parser.add_argument(
    "--train-seeds",
    type=positive_int,
    default=None,
    help="number of training trajectories (default 3)",
)
parser.add_argument(
    "--bound", type=float, default=None,
    help="bound the learned sources: dolfinx_mno.Bounded, in training standard deviations",
)  # fmt: skip
parser.add_argument(
    "--cnn", action="store_true",
    help="the non-local source is a small CNN on the grid (a compact stencil, Kochkov-style) "
    "instead of the FNO; the local MLP is read from the run without --cnn",
)  # fmt: skip
parser.add_argument(
    "--warm-start", action="store_true",
    help="with --memory: train through the solver from the source without memory (its "
    "memory weights zero), against that source trained on the same windows",
)  # fmt: skip
parser.add_argument(
    "--test-seeds", type=int, default=0,
    help="also run every model from this many more test trajectories (seeds 101, 102, ...): "
    "the spread of the decorrelation times and the factor of the seed-averaged correlation",
)  # fmt: skip
parser.add_argument(
    "--coarse", type=positive_int, default=None,
    help="the coarse mesh (cells per side, dividing the DNS's; default 16, 8 with --quick); the "
    "ladder is it and its 2× and 4× refinements coarser than the DNS",
)  # fmt: skip
parser.add_argument(
    "--memory", action="store_true",
    help="the local source also reads the change of ω̄ over the last coarse step, trained a "
    "priori and a posteriori, against the source without it (the FNO is not fitted)",
)  # fmt: skip
args = parser.parse_args()
if args.cnn and args.memory:
    parser.error("--cnn and --memory are separate measurements; give one of them")
if args.test_seeds < 0:
    parser.error(f"--test-seeds must be 0 or more, got {args.test_seeds}")
if args.bound is not None and not 0 < args.bound < math.inf:  # Bounded's rule, checked first
    parser.error(f"--bound must be positive and finite, got {args.bound}")
comm = MPI.COMM_WORLD
torch.set_num_threads(1)
output = output_folder("turbulence_2d_step_correction", root=REPOSITORY / "experiments" / "output")
config = settings(args.quick)
if args.coarse is not None:
    if not 1 <= args.coarse < config["dns"] or config["dns"] % args.coarse:
        parser.error(f"--coarse must divide the DNS's {config['dns']} cells and be fewer")
    config["coarse"] = args.coarse
    config["ladder"] = [f * args.coarse for f in (1, 2, 4) if f * args.coarse < config["dns"]]
if args.quick:
    config |= dict(
        quadrature_degree=2, mlp_epochs=10, fno_epochs=5, fno_modes=4, fno_width=8,
        long_end=3.0, window=2, rollout_epochs=1, stride=2, memory_stride=2,
    )  # fmt: skip
else:
    config |= dict(
        quadrature_degree=2, mlp_epochs=100, fno_epochs=60, fno_modes=8, fno_width=24,
        long_end=20.0, window=4, rollout_epochs=5, stride=2, memory_stride=4,
    )  # fmt: skip
config["rollout_epochs"] = args.rollout_epochs or config["rollout_epochs"]
config["window"] = args.window or config["window"]
config["mlp_epochs"] = args.mlp_epochs or config["mlp_epochs"]
config["fno_epochs"] = args.fno_epochs or config["fno_epochs"]
config["bound"] = args.bound
config["dissipative"] = args.dissipative
config["memory"] = args.memory
config["warm_start"] = args.warm_start
config["cnn"] = args.cnn
if args.train_seeds is not None:  # seeds 1, 2, ... without the test seed
    seeds = [seed for seed in range(1, args.train_seeds + 2) if seed != config["test_seed"]]
    config["train_seeds"] = seeds[: args.train_seeds]
log(f"config: {config}")
data = Turbulence(config, comm)
dns, plain, nc = data.dns, data.plain, config["coarse"]
fine_per_coarse = steps(plain.dt, dns.dt)
every = steps(config["sample_every"], plain.dt)  # coarse steps per sample


# ## The DNS, filtered at every coarse step (read from the previous run's file if it fits)
def filtered_trajectory(seed: int, horizon: float) -> tuple[np.ndarray, np.ndarray, float]:
    """ω̄ every coarse step (local dofs, ``(steps + 1, n)``), the DNS ω at 0, seconds."""
    states: list[np.ndarray] = []
    start = dns.omega  # overwritten at t = 0 (the end of the spin-up)

    def record(t: float) -> None:
        step = round(t / dns.dt)
        if step == 0:
            start.x.array[:] = dns.omega.x.array
        if step % fine_per_coarse == 0:
            states.append(data.filtered(dns.omega).x.array.copy())

    seconds = data.trajectory(seed, horizon, record)
    return np.array(states), start.x.array.copy(), seconds


def generate_dns() -> dict[str, np.ndarray]:
    """The filtered trajectories by ``seed<n>``, the test seed's DNS start and cost."""
    arrays = {f"seed{seed}": filtered_trajectory(seed, config["horizon"])[0]
              for seed in config["train_seeds"]}  # fmt: skip
    test, start_fine, seconds = filtered_trajectory(config["test_seed"], config["test_horizon"])
    arrays[f"seed{config['test_seed']}"] = test
    arrays["start_fine"] = start_fine
    arrays["dns_seconds_per_time_unit"] = np.array(seconds / config["test_horizon"])
    return arrays


base_mode = ("quick" if args.quick else "medium") + (
    f"_coarse{args.coarse}" if args.coarse is not None else ""
)
mode = base_mode + (f"_{args.train_seeds}seeds" if args.train_seeds else "")
cache = output / f"dns_{mode}_rank{comm.rank}of{comm.size}.npz"
key = json.dumps({k: config[k] for k in settings(args.quick)}, sort_keys=True)
tic = time.perf_counter()
if (cached := read_cache(cache, key, comm)) is not None:
    dns_data = cached
    log(f"DNS read from {cache.name}")
else:
    dns_data = generate_dns()
    write_cache(cache, key, dns_data)
    log(f"DNS: {time.perf_counter() - tic:.1f} s")
train_states = [dns_data[f"seed{seed}"] for seed in config["train_seeds"]]
test_states = dns_data[f"seed{config['test_seed']}"]
start_fine = fem.Function(dns.V)
start_fine.x.array[:] = dns_data["start_fine"]
start = fem.Function(data.V)
start.x.array[:] = test_states[0]


# ## The target: the one-step correction s_n
class StepCorrection:
    """``s_n`` with ``Δt (s_n, v) = a(w̄_{n+1}, (v, 0)) − L((v, 0))`` at ``w̄_n`` (P1, 0 on walls).

    Calling it with ``ω̄_n`` and ``ω̄_{n+1}`` (dof values on the coarse space) leaves
    ``flow`` at ``ω̄_n`` (``ψ̄_n`` solved for) and the correction in :attr:`source`.
    """

    def __init__(self, flow: VorticityFlow, bc: fem.DirichletBC):
        self.flow = flow
        self.next = fem.Function(flow.W, name="w_next")
        (test,) = flow.L.arguments()
        residual = ufl.action(flow.a, self.next) - flow.L
        v = ufl.TestFunction(flow.V)
        residual = ufl.replace((1.0 / flow.dt) * residual, {test: ufl.as_vector((v, 0.0))})
        # The step integrates L with the degree UFL estimates for the mixed element's test
        # function (degree 2: the forcing sin(4y) gets 5); the P1 test function here would
        # get 4, and the forcing's quadrature error (1e-7 of ω at 16²) would stay in s_n.
        degree = max(estimate_total_polynomial_degree(i.integrand()) for i in flow.L.integrals())
        residual = ufl.Form([
            i.reconstruct(metadata={"quadrature_degree": degree, **i.metadata()})
            for i in residual.integrals()
        ])  # fmt: skip
        self.form = fem.form(residual)
        options = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
        self.mass = MassSolver(flow.V, ufl.dx, petsc_options=options, bcs=[bc])
        self.source = fem.Function(flow.V, name="step_correction")
        #: ``ω̄_n`` of the last call.
        self.omega = fem.Function(flow.V, name="omega_n")

    def __call__(self, omega_now: np.ndarray, omega_next: np.ndarray) -> fem.Function:
        self.omega.x.array[:] = omega_next
        self.flow.set_vorticity(self.omega)
        self.next.x.array[:] = self.flow.w.x.array
        self.omega.x.array[:] = omega_now
        self.flow.set_vorticity(self.omega)
        self.mass.solve(self.form, self.source)
        return self.source


correction = StepCorrection(plain, data.bc)
test_sources = [correction(a, b).x.array.copy() for a, b in itertools.pairwise(test_states)]

# Check: one coarse step from ω̄_n with the exact s_n gives ω̄_{n+1} to round-off.
check_source = fem.Function(data.V)
check = data.coarse_model("check", source=lambda o, u: (check_source, ufl.dx))
check_error = 0.0
for n in range(0, len(test_sources), max(1, len(test_sources) // 8)):
    check_source.x.array[:] = test_sources[n]
    start_n = fem.Function(data.V)
    start_n.x.array[:] = test_states[n]
    check.set_vorticity(start_n)
    check.run(0.0, check.dt)
    scale = comm.allreduce(np.abs(test_states[n + 1]).max(), op=MPI.MAX)
    difference = np.abs(check.omega.x.array - test_states[n + 1]).max()
    check_error = max(check_error, comm.allreduce(difference, op=MPI.MAX) / scale)
log(f"one step with the exact s_n: max |ω − ω̄_(n+1)| / max |ω̄_(n+1)| = {check_error:.2e}")
assert check_error < 1e-9, check_error

# ## Training data: pointwise features at the quadrature points and gridded fields
q = config["quadrature_degree"]


def source_operands(omega_n, velocity_n, previous: fem.Function | None) -> mno.Operands:
    """The local source's inputs; with ``previous`` (``ω̄_{n-1}``, ``--memory``) also the
    change ``ω̄_n − ω̄_{n-1}`` over the last coarse step and its gradient."""
    named = {"omega": omega_n, "u": velocity_n,
             "grad_omega": ufl.grad(omega_n), "grad_u": ufl.grad(velocity_n)}  # fmt: skip
    if previous is not None:
        named |= {"d_omega": omega_n - previous, "grad_d_omega": ufl.grad(omega_n - previous)}
    return mno.Operands(named)


previous_state = fem.Function(data.V, name="omega_previous") if args.memory else None
operands = source_operands(plain.omega_n, plain.velocity_n, previous_state)
num_cells = data.mesh.topology.index_map(2).size_local
features = fem.Expression(
    ufl.as_vector([*operands.components, correction.source]), quadrature_points(data.mesh, q)
)
grid = closure_grid(nc)
grid_inputs = GriddedSampler([plain.omega_n, plain.velocity_n], grid)
grid_targets = GriddedSampler([correction.source], grid, mesh=data.mesh)
tic = time.perf_counter()
points, grid_x, grid_y = [], [], []
for states in train_states:
    for n in range(1 if args.memory else 0, len(states) - 1):  # memory: from ω̄_1 on
        if previous_state is not None:
            previous_state.x.array[:] = states[n - 1]
        correction(states[n], states[n + 1])
        points.append(features.eval(data.mesh, np.arange(num_cells, dtype=np.int32)))
        if not args.memory:
            grid_x.append(grid_inputs())
            grid_y.append(grid_targets())
num_owned = plain.W.dofmap.index_map.size_local * plain.W.dofmap.index_map_bs


def coarse_state(omega: np.ndarray) -> np.ndarray:
    """The owned dofs of ``w = (ω̄, ψ̄)`` of a filtered vorticity (for ``fit_rollout``)."""
    correction.omega.x.array[:] = omega
    plain.set_vorticity(correction.omega)
    return plain.w.x.array[:num_owned].copy()


trajectories = [[coarse_state(omega) for omega in states[::every]] for states in train_states]
table = np.concatenate([p.reshape(-1, p.shape[-1]) for p in points])
inputs, targets = table[:, :-1], table[:, -1:]
num_points = comm.allreduce(len(table), op=MPI.SUM)
log(f"training data: {len(points)} steps, {num_points} points, {time.perf_counter() - tic:.1f} s")

# ## The learned step corrections: a local MLP and an FNO, fitted a priori (or read: the
# fits of a previous run with the same settings and number of ranks)
fit_mode = mode + (f"_bound{args.bound:g}" if args.bound is not None else "")
memoryless_path = output / f"local_correction_{fit_mode}.pt"  # --memory compares with it
fit_mode += "_memory" if args.memory else ""
local_path = output / f"local_correction_{fit_mode}.pt"
operator_path = output / f"mno_correction_{fit_mode}.pt"
fits_path = output / f"fits_{fit_mode}.json"
memoryless_fits = fits_path  # --cnn reads the local MLP's fit record from it
if args.cnn:
    fit_mode += "_cnn"
    operator_path = output / f"cnn_correction_{fit_mode}.pt"
    fits_path = output / f"fits_{fit_mode}.json"
OPERATOR = "CNN" if args.cnn else "MNO"


class StencilCNN(torch.nn.Module):
    """``layers`` convolutions ``kernel × kernel`` of ``width`` channels (GELU), then a
    1×1 one: a non-local source of compact support (``layers (kernel − 1) + 1`` grid
    points, about three coarse cells across), as Kochkov et al.'s learned corrections."""

    def __init__(self, in_channels=3, out_channels=1, width=32, layers=3, kernel=5):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels, width=width,
                           layers=layers, kernel=kernel)  # fmt: skip
        blocks: list[torch.nn.Module] = []
        channels = in_channels
        for _ in range(layers):
            blocks += [torch.nn.Conv2d(channels, width, kernel, padding=kernel // 2),
                       torch.nn.GELU()]  # fmt: skip
            channels = width
        self.net = torch.nn.Sequential(*blocks, torch.nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


mno.register_architecture("turbulence_2d.stencil_cnn", StencilCNN)
fit_keys = ("quadrature_degree", "mlp_epochs", "fno_epochs", "fno_modes", "fno_width", "bound")


def bounded(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with ``--bound``: ``fit`` normalises the targets, so the bound is in
    standard deviations of the training sources."""
    return model if args.bound is None else mno.Bounded(model, args.bound)


fit_key = json.dumps([key, comm.size, {k: config[k] for k in fit_keys}])


def record_fit(result, tic: float) -> dict:
    """The fit's wall time and best validation loss (normalised targets: ≈ 1 − FVE)."""
    history = result.history
    return {"seconds": time.perf_counter() - tic, "best_val_loss": history.best_val_loss,
            "best_epoch": history.best_epoch}  # fmt: skip


def fit_corrections() -> dict:
    """Fit both corrections to the training data, save them; their fit records.

    The record is removed first and written last: a run interrupted between them leaves
    model files without a record, which the next run refits instead of reading.
    """
    tic = time.perf_counter()
    if comm.rank == 0:
        fits_path.unlink(missing_ok=True)
    comm.Barrier()
    if args.cnn:  # the local MLP of the run without --cnn, with the same settings
        memoryless = json.loads(memoryless_fits.read_text()) if memoryless_fits.exists() else {}
        assert local_path.exists() and memoryless.get("key") == fit_key, (
            f"--cnn reads {local_path} and its record {memoryless_fits.name} of a run with "
            "the same settings: run without --cnn first"
        )
        records = {
            "key": fit_key,
            "local MLP": memoryless["local MLP"],
        }
        return fit_operator(records)
    local_fit = fit(
        bounded(MLP(operands.num_inputs, 1, hidden_features=[64, 64], seed=0)), inputs, targets,
        groups=np.repeat(np.arange(len(points)), len(table) // len(points)), comm=comm,
        epochs=config["mlp_epochs"], batch_size=2048, learning_rate=3e-3, patience=20,
        normalize_targets=True, seed=0, progress=False,
    )  # fmt: skip
    mno.save_model(local_path, local_fit.model, comm=comm,
                   spec=mno.ClosureSpec.from_operands(operands, (), q))  # fmt: skip
    records = {"key": fit_key, "local MLP": record_fit(local_fit, tic)}
    if args.memory:
        if comm.rank == 0:
            fits_path.write_text(json.dumps(records, indent=2))
        return records
    return fit_operator(records)


def fit_operator(records: dict) -> dict:
    """Fit the non-local correction (FNO, or the CNN with ``--cnn``), save it; the records."""
    tic = time.perf_counter()
    if args.cnn:
        torch.manual_seed(0)
        operator: torch.nn.Module = StencilCNN()
    else:
        operator = fno(config["fno_modes"], config["fno_width"], out_channels=1)
    operator_fit = fit_grid_operator(
        bounded(operator), grid_x, grid_y, epochs=config["fno_epochs"],
        spec=grid_spec(grid, value_shape=(), quadrature_degree=q), path=operator_path, comm=comm,
    )  # fmt: skip
    records[OPERATOR] = record_fit(operator_fit, tic)
    if comm.rank == 0:
        fits_path.write_text(json.dumps(records, indent=2))
    comm.Barrier()
    return records


fits = json.loads(fits_path.read_text()) if fits_path.exists() else {}
if fits.get("key") == fit_key and local_path.exists() and (args.memory or operator_path.exists()):
    log(f"fits read from {fits_path.name} and the model files")
else:
    fits = fit_corrections()
log(f"fits: {fits}")


def local_source(omega_n, velocity_n, path: Path = local_path, previous=None):
    closure = mno.Closure(str(path), source_operands(omega_n, velocity_n, previous))
    return closure, closure.dx


operator_source = grid_closure(operator_path, grid, value_shape=(), quadrature_degree=q)


hooks: dict[str, Callable[[int], None] | None] = {}


def learned_model(label: str, name: str, source: Callable, memory: bool = False) -> VorticityFlow:
    """The coarse model with a learned source (``memory``: one that also reads ``ω̄_{n-1}``,
    kept by the flow); with ``--dissipative`` its runs remove, at every step, the enstrophy
    the source would inject (``hooks[label]``): ``α = max(0, (s, ω̄)) / (ω̄, ω̄)`` in the
    term ``- dt α ω̄ v`` beside the source, with the source evaluated once per step by the
    hook (the solver's own updates are switched off)."""
    if not args.dissipative:
        hooks[label] = None
        return data.coarse_model(name, source=source, memory=memory)
    alpha = fem.Constant(data.mesh, 0.0)
    flow = data.coarse_model(
        name, source=source, source_damping=alpha, closure_interval=10**9, memory=memory
    )
    closure, omega = flow.closure, flow.omega_n
    assert closure is not None
    injection = fem.form(closure * omega * closure.dx)
    norm = fem.form(omega * omega * ufl.dx)

    def remove_injection(step: int) -> None:
        closure.update()
        alpha.value = max(0.0, assemble_global(injection)) / assemble_global(norm)

    hooks[label] = remove_injection
    return flow


if args.memory:
    models = {}
    if memoryless_path.exists():  # the source without memory, fitted by an earlier run
        models["local MLP, a priori"] = learned_model(
            "local MLP, a priori", "mlp_prior",
            lambda omega_n, velocity_n: local_source(omega_n, velocity_n, memoryless_path),
        )  # fmt: skip
    label = "local MLP with memory, a priori"
    models[label] = learned_model(label, "mlp_memory", local_source, memory=True)
else:
    models = {
        "local MLP, a priori": learned_model("local MLP, a priori", "mlp_prior", local_source),
        f"{OPERATOR}, a priori": learned_model(
            f"{OPERATOR}, a priori", "mno_prior", operator_source
        ),
    }


# ## A-priori skill on the test seed, every sample_every
def a_priori_skill(flows: dict[str, VorticityFlow]) -> dict[str, dict[str, float]]:
    """Relative L² error and variance explained of each flow's source, test-seed average."""
    s, dxq = correction.source, measure(data.mesh, q)
    moments = [fem.form(s * s * dxq), fem.form(1.0 * dxq), fem.form(s * dxq)]
    previous = fem.Function(data.V)
    errors = {label: fem.form((flow.closure - s) ** 2 * dxq) for label, flow in flows.items()}
    skill: dict[str, list[tuple[float, float]]] = {label: [] for label in flows}
    for n in range(0, len(test_sources), every):
        correction(test_states[n], test_states[n + 1])
        norm, area, mean = (assemble_global(form) for form in moments)
        variance = norm - mean**2 / area
        previous.x.array[:] = test_states[max(n - 1, 0)]
        for label, flow in flows.items():
            flow.set_vorticity(correction.omega, previous=previous)
            flow.closure.update()
            error = assemble_global(errors[label])
            skill[label].append((np.sqrt(error / norm), 1.0 - error / variance))
    return {
        label: {"relative_l2": float(np.mean([r[0] for r in rows])),
                "fve": float(np.mean([r[1] for r in rows]))}
        for label, rows in skill.items()
    }  # fmt: skip


skill = a_priori_skill(models)
log(f"a-priori skill on the test seed: {skill}")

# ## Runs against the filtered DNS of the test seed
coarse_runs = CoarseRuns(data, test_states[::every])
long_end = config["long_end"]
runs = {"no closure": coarse_runs.run(plain, start, long_end=long_end)}
runs |= coarse_runs.ladder(config["ladder"], start_fine)
oracle_source = fem.Function(data.V, name="oracle_source")
oracle = data.coarse_model("oracle", source=lambda o, u: (oracle_source, ufl.dx))


def feed_oracle(step: int) -> None:
    if step < len(test_sources):
        oracle_source.x.array[:] = test_sources[step]


runs["oracle: exact s_n every step"] = coarse_runs.run(oracle, start, before_step=feed_oracle)
for label, flow in models.items():
    runs[label] = coarse_runs.run(flow, start, long_end=long_end, each_step=hooks[label])
    log(f"{label}: t(ρ<0.95) = {runs[label]['decorrelation_time']}")


# ## A-posteriori fine-tuning of the better learned source (longer decorrelation time)
def lasts(label: str) -> float:
    t = runs[label]["decorrelation_time"]
    return config["test_horizon"] if t is None else t


def warm_memory_model(path: Path) -> None:
    """Save to ``path`` the source with memory that *is* the source without memory.

    The memory fit's model (its input statistics for the three memory inputs) with the
    memoryless fit's weights, statistics and bound for the nine shared inputs and zero
    first-layer weights for the memory inputs: the same function of the state, which
    training through the solver may then teach to use the memory (``--warm-start``).
    """
    old, new = mno.load_model(memoryless_path), mno.load_model(local_path)
    width = old.input_normalization.shift.numel()
    with torch.no_grad():
        for name in ("shift", "scale"):
            getattr(new.input_normalization, name)[:width] = getattr(old.input_normalization, name)
            getattr(new.output_normalization, name).copy_(getattr(old.output_normalization, name))
        for p_new, p_old in zip(new.parameters(), old.parameters(), strict=True):
            if p_new.shape == p_old.shape:
                p_new.copy_(p_old)
            else:  # the first layer: the memory inputs' columns start at zero
                p_new.zero_()
                p_new[:, :width] = p_old
    mno.save_model(path, new, comm=comm, spec=mno.ClosureSpec.from_operands(operands, (), q))


def tune(label: str, name: str, source: Callable, memory: bool, data: list, interval: int,
         window: int, stride: int) -> None:  # fmt: skip
    """Train a coarse model's source a posteriori, then its skill and run (in place)."""
    tuned = learned_model(label, name, source, memory=memory)
    trainings[label] = vars(
        train_a_posteriori(
            tuned, data, interval, window, config["rollout_epochs"], learning_rate=1e-3,
            stride=stride,
        )
    )  # fmt: skip
    log(f"{label}: {trainings[label]}")
    tuned_models[label] = tuned
    skill.update(a_priori_skill({label: tuned}))
    runs[label] = coarse_runs.run(tuned, start, long_end=long_end, each_step=hooks[label])


trainings: dict[str, dict] = {}
tuned_models: dict[str, VorticityFlow] = {}
if args.memory:  # the rollout follows ω̄_n through both levels: states at every coarse step
    every_step = [[coarse_state(omega) for omega in states] for states in train_states]
    per_step = dict(data=every_step, interval=1, window=config["window"] * every,
                    stride=config["memory_stride"])  # fmt: skip
    if args.warm_start:  # both from the source without memory, on the same windows
        assert memoryless_path.exists(), (
            f"--warm-start needs {memoryless_path} (a run without --memory)"
        )
        warm_path = output / f"local_correction_{fit_mode}_warm.pt"
        warm_memory_model(warm_path)
        start_skill = a_priori_skill({"warm": learned_model(
            "warm", "warm", lambda o, u, previous: local_source(o, u, warm_path, previous),
            memory=True)})["warm"]  # fmt: skip
        memoryless = skill["local MLP, a priori"]
        log(f"warm start: {start_skill} (the source without memory: {memoryless})")
        assert abs(start_skill["fve"] - memoryless["fve"]) < 1e-10, (start_skill, memoryless)
        # The same windows: from state 1 on (the forcing does not depend on time).
        tune("local MLP, a posteriori (windows of steps)", "tuned_plain",
             lambda o, u: local_source(o, u, memoryless_path), False,
             **(per_step | {"data": [states[1:] for states in every_step]}))  # fmt: skip
        tune("local MLP with memory from the one without, a posteriori", "tuned_warm",
             lambda o, u, previous: local_source(o, u, warm_path, previous), memory=True,
             **per_step)  # fmt: skip
    else:
        tune("local MLP with memory, a posteriori", "tuned", local_source, True, **per_step)
else:
    best = max(models, key=lambda label: (lasts(label), skill[label]["fve"]))
    tune(best.replace("a priori", "a posteriori"), "tuned",
         local_source if "MLP" in best else operator_source, memory=False, data=trajectories,
         interval=every, window=config["window"], stride=config["stride"])  # fmt: skip

# ## Resolution factor and wall-time ratio against the ladder (the demo's definition)
horizon = config["test_horizon"]


def ladder_label(n: int) -> str:
    return "no closure" if n == nc else f"no closure, {n}²"


ladder_labels = [ladder_label(n) for n in config["ladder"] if n != nc]
add_resolution_factors(runs, {n: runs[ladder_label(n)] for n in config["ladder"]}, nc, horizon)


# ## More test seeds: the spread of the decorrelation times (``--test-seeds``)
def more_test_seeds(count: int) -> dict[str, Any]:
    """Every model's runs from ``count`` more test trajectories and from the test seed.

    The DNS of seeds 101, 102, ... (none of them a training seed) is filtered every
    ``sample_every`` and saved per rank like the training data. Returns, per run label,
    :func:`over_seeds` of its correlations on all the seeds (the test seed's from the runs
    above) with the seed-averaged correlation's resolution factor and wall-time ratio
    against the ladder, ``beats_no_closure``: on how many seeds it lasts longer than the
    coarse mesh without closure, and ``gain_over_no_closure`` with its
    ``gain_standard_error``: the mean over the seeds of the difference of the two times
    (paired, seed by seed: the seeds' own spread cancels), times never reached counted as
    the horizon.
    """
    seeds = [101 + i for i in range(count)]
    # The same for any training seeds: the settings without them, and these seeds.
    path = output / f"dns_{base_mode}_test{count}seeds_rank{comm.rank}of{comm.size}.npz"
    dns_settings = {k: config[k] for k in settings(args.quick) if k != "train_seeds"}
    seeds_key = json.dumps([dns_settings, seeds], sort_keys=True)
    if (cached := read_cache(path, seeds_key, comm)) is not None:
        arrays = cached
    else:
        arrays = {}
        for seed in seeds:
            states, fine, _ = filtered_trajectory(seed, horizon)
            arrays |= {f"seed{seed}": states[::every], f"start{seed}": fine}
            log(f"test seed {seed}: DNS done")
        write_cache(path, seeds_key, arrays)
    flows = {"no closure": plain} | models | tuned_models
    rows: dict[str, list[dict]] = {label: [runs[label]] for label in [*flows, *ladder_labels]}
    for seed in seeds:
        reference = list(arrays[f"seed{seed}"])
        seed_runs = CoarseRuns(data, reference)
        initial, fine = fem.Function(data.V), fem.Function(dns.V)
        initial.x.array[:], fine.x.array[:] = reference[0], arrays[f"start{seed}"]
        for label, flow in flows.items():
            rows[label].append(seed_runs.run(flow, initial, each_step=hooks.get(label)))
        for label, row in seed_runs.ladder(config["ladder"], fine).items():
            rows[label].append(row)
        log(f"test seed {seed}: " + ", ".join(
            f"{label} {row[-1]['decorrelation_time']}" for label, row in rows.items()))  # fmt: skip
    coarse = [row["correlations"] for row in rows["no closure"]]
    stats = {
        label: over_seeds([row["correlations"] for row in rows_], config["sample_every"], coarse)
        | {"seconds_per_time_unit": float(np.mean([row["seconds_per_time_unit"] for row in rows_]))}
        for label, rows_ in rows.items()
    }  # fmt: skip

    def averaged(label: str) -> types.SimpleNamespace:
        t = stats[label]["averaged_time"]
        return as_run({"decorrelation_time": t,
                       "seconds_per_time_unit": stats[label]["seconds_per_time_unit"]},
                      horizon)  # fmt: skip

    seed_ladder = {n: averaged(ladder_label(n)) for n in config["ladder"]}
    for label, row in stats.items():
        factor, ratio, capped = resolution_factor(seed_ladder, nc, averaged(label))
        row |= {"resolution_factor": factor, "wall_time_ratio": ratio,
                "factor_is_lower_bound": capped,
                "gain_over_no_closure": row.pop("gain_over_baseline"),
                "beats_no_closure": row.pop("beats_baseline")}  # fmt: skip
    return {"seeds": [config["test_seed"], *seeds], "runs": stats}


test_seeds = more_test_seeds(args.test_seeds) if args.test_seeds else None

summary = {
    "quick": args.quick,
    "ranks": comm.size,
    "config": config,
    "dns_seconds_per_time_unit": float(dns_data["dns_seconds_per_time_unit"]),
    "one_step_check": check_error,
    "fits": {k: v for k, v in fits.items() if k != "key"},
    "a_priori_skill": skill,
    "a_posteriori": trainings,
    "runs": runs,
    "test_seeds": test_seeds,
}
if comm.rank == 0:
    name = fit_mode + (f"_window{args.window}" if args.window else "")
    name += "_dissipative" if args.dissipative else ""
    name += "_warm" if args.warm_start else ""
    name += f"_test{args.test_seeds}seeds" if args.test_seeds else ""
    (output / f"summary{'' if name == 'medium' else '_' + name}.json").write_text(
        json.dumps(summary, indent=2)
    )


def cell(value: float | None) -> str:
    return f"> {horizon:g}" if value is None else f"{value:.3f}"


log(f"\n{'run (coarse ' + str(nc) + '² unless said)':>36} | t(ρ<0.95) | ρ at end | factor | "
    f"wall ratio | s / unit | max energy to t={long_end:g}")  # fmt: skip
for name, row in runs.items():
    energy = f"{row['max_energy']:.1f}" if "max_energy" in row else "–"
    bound = "≥" if row["factor_is_lower_bound"] else " "
    log(
        f"{name:>36} | {cell(row['decorrelation_time']):>9} | {row['correlation_end']:8.3f} | "
        f"{bound}{row['resolution_factor']:5.2f} | {row['wall_time_ratio']:10.2f} | "
        f"{row['seconds_per_time_unit']:8.3f} | {energy}"
    )
log(f"\n{'source, test seed':>36} | rel. L2 error of s | variance explained")
for name, row in skill.items():
    log(f"{name:>36} | {row['relative_l2']:18.3f} | {row['fve']:18.3f}")
for label, training in trainings.items():
    log(
        f"{label}: held-out rollout loss {training['held_out_before']:.4g} → "
        f"{training['held_out_after']:.4g} in {training['epochs']} epochs, "
        f"{training['seconds']:.0f} s"
    )

if test_seeds is not None:
    log(
        f"\nover the test seeds {test_seeds['seeds']}: t(ρ<0.95) mean ± std [min, max] | "
        "the seed-averaged ρ's t | its factor (wall ratio) | gain over no closure, paired, ± its "
        "standard error | seeds where it outlasts no closure"
    )
    for name, row in test_seeds["runs"].items():
        bound = "≥" if row["factor_is_lower_bound"] else " "
        log(
            f"{name:>36} | {row['mean']:.3f} ± {row['std']:.3f} [{row['min']:.3f}, "
            f"{row['max']:.3f}] | {cell(row['averaged_time']):>7} | {bound}"
            f"{row['resolution_factor']:5.2f} ({row['wall_time_ratio']:.2f}) | "
            f"{row['gain_over_no_closure']:+.3f} ± {row['gain_standard_error']:.3f} | "
            f"{row['beats_no_closure']}/{len(test_seeds['seeds'])}"
        )

# ## Checks: every run starts correlated; the oracle (exact to round-off in one step, checked
# above) tracks the filtered DNS over the whole test horizon; the learned runs' numbers are
# the measurement.
for name, row in runs.items():
    assert row["correlations"][0] > 0.99, (name, row["correlations"][:2])
for name, row in (test_seeds or {"runs": {}})["runs"].items():
    assert row["mean_correlation"][0] > 0.99, (name, row["mean_correlation"][:2])
oracle_row = runs["oracle: exact s_n every step"]
assert oracle_row["decorrelation_time"] is None and oracle_row["correlation_end"] > 0.99, oracle_row
log(f"all checks passed; outputs in {output}")
