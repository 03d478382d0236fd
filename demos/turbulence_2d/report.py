"""The outputs of ``demo_turbulence_2d.py``: VTX of the test runs, the figures (correlation
against time, spectra, vorticity snapshots) and ``summary.json``.

The runs and spectra come from :mod:`comparison`; everything here only writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from comparison import APosteriori, Run
from dolfinx import fem, io
from flow import length

import dolfinx_mno as mno


def plot(output: Path, runs: dict[str, Run], spectra: dict, snapshots: dict, t0: float) -> None:
    """Correlation vs time, spectra at the end, vorticity snapshots (rank 0 only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run in runs.items():
        ax.plot(run.times - t0, run.correlations, label=label)
    ax.axhline(0.95, color="k", lw=0.5, ls="--")
    ax.set(xlabel="time", ylabel="vorticity correlation", ylim=(0.0, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "correlation.png", dpi=120)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for label, s in spectra.items():
        axes[0].loglog(s.k, s.energy, label=label)
        axes[1].loglog(s.k, s.enstrophy, label=label)
    axes[0].set(xlabel="k", ylabel="energy")
    axes[1].set(xlabel="k", ylabel="enstrophy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "spectra.png", dpi=120)
    fig, axes = plt.subplots(1, len(snapshots), figsize=(3 * len(snapshots), 3))
    bound = max(np.abs(v).max() for v in snapshots.values())
    for ax, (label, values) in zip(np.atleast_1d(axes), snapshots.items(), strict=True):
        ax.imshow(values, origin="lower", cmap="RdBu_r", vmin=-bound, vmax=bound)
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(output / "vorticity.png", dpi=120)
    plt.close("all")


def write_vtx(path: Path, space: fem.FunctionSpace, reference, runs, sample_every: float) -> None:
    """The filtered DNS and every coarse model's vorticity at the sampling times (VTX)."""
    functions = {"filtered DNS": fem.Function(space, name="filtered_dns")}
    for label in runs:
        functions[label] = fem.Function(space, name=label.replace(",", "").replace(" ", "_"))
    with io.VTXWriter(space.mesh.comm, path, list(functions.values()), engine="BP4") as vtx:
        for i, values in enumerate(reference):
            functions["filtered DNS"].x.array[:] = values
            for label, run in runs.items():
                functions[label].x.array[:] = run.states[i] if i < len(run.states) else np.nan
            vtx.write(i * sample_every)


def figures(
    output: Path,
    runs: dict[str, Run],
    dns: fem.Function,
    reference: np.ndarray,
    space: fem.FunctionSpace,
    labels: list[str],
) -> dict[str, mno.Spectra]:
    """Spectra and snapshots at the end of the test horizon, and the PNGs (collective).

    ``dns``: the DNS vorticity; ``reference``: the filtered one on the coarse ``space``;
    ``labels``: the runs to show beside them. Returns the spectra on rank 0 (else empty).
    """
    fields = {"DNS": dns, "filtered DNS": fem.Function(space)}
    fields["filtered DNS"].x.array[:] = reference
    for label in labels:
        fields[label] = fem.Function(space)
        fields[label].x.array[:] = runs[label].states[-1]
    spectra, snapshots = {}, {}
    for label, field in fields.items():
        msh = field.function_space.mesh
        n = round(np.sqrt(msh.topology.index_map(2).size_global / 2))  # 2 n² triangles
        values = mno.sample_on_box_grid(field, msh, 2 * n)  # two grid intervals per cell
        if values is not None:
            snapshots[label] = values
            spectra[label] = mno.box_spectra(values, (length, length))
    if msh.comm.rank == 0:
        plot(output, runs, spectra, snapshots, float(next(iter(runs.values())).times[0]))
    return spectra


def write_summary(
    path: Path,
    summary: dict,
    training: dict[str, APosteriori],
    table: dict[str, dict],
    runs: dict[str, Run],
    spectra: dict[str, mno.Spectra],
    comm: Any,
) -> None:
    """Write ``summary.json`` on rank 0 of ``comm``: ``summary`` and the results of the runs.

    Adds to ``summary`` (the demo's set-up and numbers) ``"a_posteriori"`` (the fields of
    ``training``), ``"models"`` (``table``, of :func:`headline`), ``"correlations"`` (of
    every run, over the test horizon) and ``"spectra"`` (rank 0's, of :func:`figures`).
    """
    summary = {
        **summary,
        "a_posteriori": {k: vars(v) for k, v in training.items()},
        "models": table,
        "correlations": {k: r.correlations.tolist() for k, r in runs.items()},
        "spectra": {
            k: {f: getattr(v, f).tolist() for f in ("k", "energy", "enstrophy")}
            for k, v in spectra.items()
        },
    }
    if comm.rank == 0:
        path.write_text(json.dumps(summary, indent=2))
