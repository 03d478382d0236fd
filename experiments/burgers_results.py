"""Burgers: the study of the Burgers section of ``docs/results.md``.

It measures the closures that ``demos/burgers/demo_burgers.py`` trains, from the files that
demo writes to ``demos/output/burgers/`` (model files, ``reference.npz``, ``summary.json``),
and follows the demo's last run, full or ``--quick``::

    python demos/burgers/demo_burgers.py      # the data, the closures, the test errors
    python experiments/burgers_results.py     # this study (about 2 minutes after a full run)
    mpirun -n 2 python experiments/burgers_results.py

First, a classical baseline: Smagorinsky's eddy viscosity, ``tau = -(C_s h)² |u_x| u_x``,
its constant tuned *a posteriori* on the training horizon (coarse runs from the filtered
fine state for a range of C_s, keeping the one with the smallest error against the
filtered fine solution). Then, for each coarse model (no closure, Smagorinsky, the local
MLP, the MNO), started from the filtered fine state at the start of the test horizon:

- the relative L² error against the filtered fine solution over the test horizon, the
  error of its energy spectrum and its wall time (steps and closure updates);
- stability: the largest energy over ten horizons relative to the filtered fine
  solution's, and no blow-up;
- the coarsest mesh *without* closure, among 1, 2, 4, ... times the coarse one, that is
  as accurate.

Writes ``experiments/output/burgers/summary.json`` (every number of that section, the
demo's included) and ``burgers.png``; asserts stability, and in a full run the ordering
of the errors: MNO < local MLP < Smagorinsky < no closure.
"""

import argparse
import json
import sys
from pathlib import Path

from mpi4py import MPI

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from dolfinx import fem, mesh

from dolfinx_mno.data import L2Projection

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY / "demos"), str(REPOSITORY / "demos" / "burgers")]
from burgers import Burgers, coarse_run, nodal, relative_error, set_nodal, smagorinsky
from burgers_outputs import (
    add_demo_output_argument,
    local_closure,
    operator_closure,
    read_demo_output,
)
from utilities import log, output_folder

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
add_demo_output_argument(parser)
args = parser.parse_args()

comm = MPI.COMM_WORLD
torch.set_num_threads(1)
output = output_folder("burgers", root=REPOSITORY / "experiments" / "output")
demo, reference, filtered = read_demo_output(args.demo_output)
config = demo["config"]

nc = config["coarse_cells"]
h = 1.0 / nc
t_train = config["spin_up"]
t_test = t_train + config["horizon"]
t_end = t_test + config["horizon"]
long_end = t_test + 10 * config["horizon"]
train_reference = {t: v for t, v in filtered.items() if t_train + 1e-9 < t < t_test + 1e-9}
test_reference = {t: v for t, v in filtered.items() if t > t_test + 1e-9}
reference_energy = max(float(np.mean(v**2)) for v in filtered.values())
no_closure_cells = [nc * 2**i for i in range(3 if demo["quick"] else 5)]
log(f"the demo's {'quick' if demo['quick'] else 'full'} run: {config}")


def spectrum(states):
    """Time-averaged sine spectrum of nodal states (zero at both walls)."""
    values = np.array([states[k] for k in sorted(states)])[:, 1:-1]
    n = values.shape[1] + 1
    j = np.arange(1, n)
    basis = np.sin(np.pi * np.outer(j, j) / n) * (2.0 / n)
    coefficients = values @ basis
    return np.mean(coefficients**2 / 2, axis=0)


# The closures as the demo builds them, from its model files.
def demo_local_closure(un):
    return local_closure(un, args.demo_output / "local_closure.pt")


def demo_operator_closure(un):
    return operator_closure(un, args.demo_output / "mno_closure.pt", demo["grid"])


# ## Smagorinsky, tuned on the training horizon
dt = config["coarse_dt"]
plain = Burgers(nc, dt, name="no")
Vc, interval = plain.V, demo["closure_interval"]
constant = fem.Constant(Vc.mesh, 0.0)
smagorinsky_model = Burgers(nc, dt, smagorinsky(constant, h), "smagorinsky", Vc.mesh)
train_start = set_nodal(fem.Function(Vc), filtered[round(t_train, 9)])
tuning = {}
for value in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4):
    constant.value = value
    run = coarse_run(smagorinsky_model, train_start, t_train, t_test, config["sample_every"])
    tuning[value] = relative_error(run.states, train_reference)
best_constant = min(tuning, key=tuning.get)
constant.value = best_constant
log(f"Smagorinsky tuning (C_s: training error): {tuning}; C_s = {best_constant}")

# ## The closures over the test horizon, and over ten horizons
test_start = set_nodal(fem.Function(Vc), filtered[round(t_test, 9)])
models = {
    "no closure": plain,
    "Smagorinsky": smagorinsky_model,
    "local MLP": Burgers(nc, dt, demo_local_closure, "local", Vc.mesh, interval),
    "MNO (FNO)": Burgers(nc, dt, demo_operator_closure, "mno", Vc.mesh, interval),
}
reference_spectrum = spectrum(test_reference)
results, runs = {}, {}
for label, model in models.items():
    run = coarse_run(model, test_start, t_test, t_end, config["sample_every"])
    runs[label] = run.states
    long_run = coarse_run(model, test_start, t_test, long_end, config["sample_every"])
    energies = long_run.energies
    stable = bool(np.all(np.isfinite(energies[:, 1])) and energies[-1, 0] >= long_end - 1e-6)
    results[label] = {
        "relative_l2_error": relative_error(run.states, test_reference),
        "spectrum_error": float(
            np.mean(np.abs(np.log10(spectrum(run.states) / reference_spectrum)))
        ),
        "wall_time_s": run.seconds,
        "stable_10_horizons": stable,
        "max_energy_ratio_10_horizons": float(np.max(energies[:, 1]) / reference_energy),
    }
    if model.closure is not None:
        total = model.closure.total_timings.get("total", 0.0)
        results[label]["closure_update_ms"] = 1e3 * total / max(model.closure.update_count, 1)
    log(f"{label:>12}: {results[label]}")
results["fine (filtered)"] = {
    "wall_time_s": demo["fine_seconds"]["test"],
    "cells": config["fine_cells"],
}

# ## How fine must a mesh be without closure?
# The same model without closure on meshes 1, 2, 4, ... times finer than the coarse one,
# each started from the projection of the fine state, its solution projected onto the
# coarse space and compared like the closures. The time step is the coarse one, or the
# fine one scaled to the mesh where that is smaller (the advective limit).
fine_mesh = mesh.create_interval(comm, config["fine_cells"], [0.0, 1.0])
fine_state_test = set_nodal(
    fem.Function(fem.functionspace(fine_mesh, ("Lagrange", 1))), reference["fine_state_test"]
)
u_bar = fem.Function(Vc)
refinement = {}
for cells in no_closure_cells:
    dt = min(config["coarse_dt"], config["fine_dt"] * config["fine_cells"] / cells)
    model = Burgers(cells, dt, name=f"plain_{cells}")
    start = L2Projection(model.V, subdivisions=config["fine_cells"] // cells, bcs=model.bcs)(
        fine_state_test
    )
    to_coarse = L2Projection(Vc, subdivisions=cells // nc, bcs=plain.bcs)
    states = {}

    def keep(t, model=model, states=states, to_coarse=to_coarse):
        if t > t_test + 1e-9:
            states[round(t, 9)] = nodal(to_coarse(model.u, out=u_bar))

    seconds = model.run(
        start, t_test, t_end, callback=keep, every=round(config["sample_every"] / dt)
    )
    refinement[cells] = {
        "relative_l2_error": relative_error(states, test_reference),
        "wall_time_s": seconds,
        "dt": dt,
    }
    log(f"no closure, {cells:5d} cells: {refinement[cells]}")
for label in ("local MLP", "MNO (FNO)", "Smagorinsky"):
    error = results[label]["relative_l2_error"]
    matching = [c for c in no_closure_cells if refinement[c]["relative_l2_error"] <= error]
    results[label]["coarsest_plain_mesh_as_accurate"] = min(matching) if matching else None

# ## Outputs: summary.json and burgers.png
summary = {
    "demo": demo,
    "smagorinsky_constant": best_constant,
    "smagorinsky_tuning": {str(k): v for k, v in tuning.items()},
    "results": results,
    "no_closure_refinement": {str(k): v for k, v in refinement.items()},
    "ranks": comm.size,
}
if comm.rank == 0:
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x_nodes = np.linspace(0.0, 1.0, nc + 1)
    last = max(test_reference)
    axes[0].plot(x_nodes, test_reference[last], "k", lw=2, label="fine, filtered")
    for label, states in runs.items():
        if states:
            axes[0].plot(x_nodes, states[max(states)], lw=1, label=label)
    axes[0].set(xlabel="x", ylabel="ū", title=f"t = {last:g}")
    axes[0].legend(fontsize=8)
    k = np.arange(1, nc)
    axes[1].loglog(k, reference_spectrum, "k", lw=2, label="fine, filtered")
    for label, states in runs.items():
        if len(states) == len(test_reference):
            axes[1].loglog(k, spectrum(states), lw=1, label=label)
    axes[1].set(xlabel="wavenumber k", ylabel="E(k)", title="energy spectrum, test horizon")
    axes[2].loglog(
        [refinement[c]["wall_time_s"] for c in no_closure_cells],
        [refinement[c]["relative_l2_error"] for c in no_closure_cells],
        "ko-", label="no closure, refined",
    )  # fmt: skip
    for c in no_closure_cells:
        axes[2].annotate(str(c), (refinement[c]["wall_time_s"], refinement[c]["relative_l2_error"]))
    for label in models:
        axes[2].loglog(
            results[label]["wall_time_s"], results[label]["relative_l2_error"], "s", label=label
        )
    axes[2].set(xlabel="wall time, test horizon (s)", ylabel="relative L² error")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output / "burgers.png", dpi=110)
    print(json.dumps(results, indent=1))

# ## Checks: every coarse model stays stable over ten horizons; the ordering (full run)
errors = {label: results[label]["relative_l2_error"] for label in models}
for label in models:
    assert results[label]["stable_10_horizons"], f"{label} blew up"
    assert results[label]["max_energy_ratio_10_horizons"] < 3.0, results[label]
if not demo["quick"]:
    assert errors["MNO (FNO)"] < errors["local MLP"] < errors["Smagorinsky"] < errors["no closure"]
log(f"all checks passed; outputs in {output}")
