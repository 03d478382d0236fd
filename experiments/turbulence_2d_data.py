"""The DNS and coarse runs shared by the 2D turbulence experiments.

``turbulence_2d_limits.py`` and ``turbulence_2d_step_correction.py`` regenerate the DNS of
the flagship demo (``demos/turbulence_2d/``) with its ``flow`` module and its ``--quick``
and ``--medium`` settings, filter it onto the coarse mesh, and compare coarse runs with the
filtered DNS of the test seed. This module holds what both need:

* :func:`settings`: the demo's settings (mesh sizes, time steps, seeds, horizons), with a
  sampling interval that is a whole number of coarse steps;
* :class:`Turbulence`: the DNS, the coarse model without closure, the filter ``ω̄ = P ω``
  onto the coarse P1 functions vanishing on the walls, and the spun-up trajectories;
* :class:`CoarseRuns`: a coarse (or ladder) run from the filtered test state, its
  vorticity correlation with the filtered DNS and its decorrelation time;
* :class:`ExactFlux`: the exact subgrid flux ``τ`` of a DNS state on the coarse cells, and
  how much of it predictions of it explain (:meth:`ExactFlux.skill`);
* :func:`closure_grid`: the grid of the demo's non-local closures (spacing ``h/2`` with a
  zero margin of half the box beyond the walls);
* :func:`fno`, :func:`fit_grid_operator` and :func:`grid_spec`: the demo's FNO, its fit to
  gridded samples, and the spec it is saved with; :func:`held_out_groups`: the groups
  (trajectories) that fit validates on;
* :func:`mirror`: the gridded samples of the mirror image of a flow, the box's symmetry;
  :class:`StateMirror`: the same of the coarse states, for training through the solver;
* :func:`over_seeds`: the decorrelation times of runs from several test seeds, their
  spread, and the time of their seed-averaged correlation;
* :func:`as_run` and :func:`add_resolution_factors`: the demo's resolution factor and
  wall-time ratio of the runs against the ladder.

Like the experiments, it needs ``demos/`` and ``demos/turbulence_2d/`` on ``sys.path``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports that need demos/ on sys.path
    raise SystemExit(
        "turbulence_2d_data.py is the module the 2D turbulence experiments share, not a "
        "script: run turbulence_2d_limits.py or turbulence_2d_step_correction.py (--help)."
    )

import math
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mpi4py import MPI

import numpy as np
import torch
import ufl
from comparison import resolution_factor
from dolfinx import fem
from dolfinx import mesh as dmesh
from flow import VorticityFlow, length, spin_up, velocity
from neuralop.models import FNO
from utilities import assemble_global, boundary_dofs

import dolfinx_mno as mno
from dolfinx_mno.data import CellAverage, ClosureSample, ClosureSampler, L2Projection, Tendency
from dolfinx_mno.grid import Grid
from dolfinx_mno.quadrature import measure
from dolfinx_mno.training import FitResult, fit, shard
from dolfinx_mno.training.samples import split_samples

#: Viscosity of the demo (Re ≈ 1000).
NU = 1e-3


def read_cache(path: Path, key: str, comm: MPI.Comm) -> dict[str, np.ndarray] | None:
    """The arrays of every rank's ``path`` if all were written with ``key`` (collective).

    A missing, damaged or half-written file (an interrupted run) counts as absent on its
    rank, and then on every rank: the caller regenerates the data everywhere.
    """
    arrays = None
    try:
        with np.load(path) as stored:
            if str(stored["key"]) == key:
                arrays = {name: stored[name] for name in stored.files if name != "key"}
    except Exception:  # absent, truncated, not an .npz, another layout
        arrays = None
    return arrays if comm.allreduce(arrays is not None, op=MPI.LAND) else None


def write_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` with ``key`` to ``path`` atomically (a new name, then a rename)."""
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, key=np.array(key), **arrays)
    os.replace(partial, path)


def settings(quick: bool) -> dict[str, Any]:
    """The demo's ``--quick`` or ``--medium`` settings of the DNS, the meshes and the runs.

    Keys: ``dns`` and ``coarse`` (cells per side), ``ladder`` (the no-closure meshes),
    ``courant`` (time step ``courant / n``), ``spin_up_n``, ``spin_up`` and ``spin_up_fine``
    (see :func:`flow.spin_up`), ``train_seeds``, ``test_seed``, ``horizon`` (of each
    training trajectory), ``test_horizon`` and ``sample_every`` (a whole number of coarse
    and DNS steps).
    """
    if quick:
        return dict(
            dns=32, coarse=8, ladder=[8, 16], courant=0.5, spin_up_n=16, spin_up=1.0,
            spin_up_fine=0.25, train_seeds=[1, 2], test_seed=3, horizon=0.5,
            test_horizon=1.5, sample_every=0.125,
        )  # fmt: skip
    return dict(
        dns=128, coarse=16, ladder=[16, 32, 64], courant=0.4, spin_up_n=64, spin_up=5.0,
        spin_up_fine=1.0, train_seeds=[1, 2, 3], test_seed=5, horizon=2.0, test_horizon=6.0,
        sample_every=0.05,
    )  # fmt: skip


def steps(interval: float, dt: float) -> int:
    """Time steps ``dt`` in ``interval`` (an error if they do not fit exactly)."""
    count = round(interval / dt)
    assert count >= 1 and abs(count * dt - interval) < 1e-9 * interval, (interval, dt)
    return count


def closure_grid(coarse: int) -> Grid:
    """The grid of the non-local closures on the ``coarse²`` mesh.

    Spacing ``h/2``, points at cell quarter points, with a margin of ``coarse`` points (half
    the box) beyond each wall, where the closure's inputs are zero.
    """
    h = length / coarse
    margin = coarse
    shape = 2 * coarse + 2 * margin
    lower = h / 4 - margin * h / 2
    return Grid((lower, lower), (lower + (shape - 1) * h / 2,) * 2, (shape, shape))


def grid_closure(
    path, grid: Grid, value_shape: tuple[int, ...] = (2,), quadrature_degree: int = 1
) -> Callable:
    """A :class:`VorticityFlow` closure factory: the operator saved at ``path`` on ``grid``.

    ``factory(omega_n, velocity_n)`` returns ``(closure, closure.dx)`` for a
    :class:`~dolfinx_mno.NonlocalClosure` of the operands ``omega`` and ``u`` (the demo
    writes the same closure out, as its tutorial).
    """

    def factory(omega_n: fem.Function, velocity_n: fem.Function):
        closure = mno.NonlocalClosure(
            str(path),
            mno.Operands({"omega": omega_n, "u": velocity_n}),
            value_shape=value_shape,
            quadrature_degree=quadrature_degree,
            grid_shape=grid.shape,
            bounding_box=(grid.lower, grid.upper),
            mask_channel=False,
        )
        return closure, closure.dx

    return factory


def fno(
    modes: int,
    width: int,
    out_channels: int = 2,
    factorization: str | None = None,
    rank: float = 1.0,
) -> FNO:
    """The demo's FNO on the ``(ω̄, ū)`` grid: ``modes`` Fourier modes per axis, ``width``
    channels, four layers; its weights drawn after ``torch.manual_seed(0)``.

    ``factorization`` (``"tucker"``, ``"cp"`` or ``"tt"``) stores each spectral
    convolution's weights as a low-rank tensor decomposition of ``rank`` times their size
    (neuraloperator's TFNO): the same modes with a tenth of the weights or fewer.
    """
    torch.manual_seed(0)
    return FNO(n_modes=(modes, modes), hidden_channels=width, in_channels=3,
               out_channels=out_channels, n_layers=4, factorization=factorization,
               rank=rank)  # fmt: skip


#: :func:`fit_grid_operator`'s validation split: the fraction of the samples (or of the
#: groups) held out, and fit's seed, which draws them (and the order of the batches).
VALIDATION_FRACTION, SPLIT_SEED = 0.2, 0


def held_out_groups(groups: Sequence[int]) -> np.ndarray:
    """The sorted ids of the groups :func:`fit_grid_operator` validates on, given its
    ``groups`` (one id per sample): the same split, from the same settings, so that other
    training (through the solver) can hold out the same trajectories."""
    ids = np.asarray(groups, dtype=np.int64)
    _, val_index = split_samples(ids.size, VALIDATION_FRACTION, SPLIT_SEED, ids)
    return np.unique(ids[val_index])


def fit_grid_operator(
    operator: torch.nn.Module,
    fields_x: Sequence[np.ndarray] | None,
    fields_y: Sequence[np.ndarray] | None,
    *,
    epochs: int,
    spec: mno.ClosureSpec,
    path: Path,
    comm: MPI.Comm,
    groups: Sequence[int] | None = None,
    weight_decay: float = 0.0,
    progress: bool = False,
) -> FitResult:
    """Fits ``operator`` to gridded samples as the demo fits its MNO and saves it at ``path``.

    ``fields_x`` and ``fields_y`` are the inputs and targets on the grid, one array per
    sample, as rank 0 holds them (the other ranks' are ignored: rank 0 broadcasts them, and
    each rank trains on its share). The fit is :func:`~dolfinx_mno.training.fit` with
    normalised targets, batches of 8, a learning rate of 3e-3 and a patience of 20 epochs;
    its validation split (:data:`VALIDATION_FRACTION`, :data:`SPLIT_SEED`) takes random
    samples, or with ``groups`` (one id per sample, the same on every rank, e.g. its
    trajectory) whole groups: those of :func:`held_out_groups`. A positive ``weight_decay``
    replaces Adam by :class:`torch.optim.AdamW` with that decoupled weight decay;
    ``progress`` shows the fit's progress bar (on rank 0).
    """
    data = (np.asarray(fields_x), np.asarray(fields_y)) if comm.rank == 0 else None
    all_x, all_y = comm.bcast(data, root=0)
    local_groups = None if groups is None else shard(np.asarray(groups, dtype=np.int64), comm)
    optimizer: dict[str, Any] = {"learning_rate": 3e-3}
    if weight_decay > 0.0:
        optimizer = {"optimizer": partial(torch.optim.AdamW, lr=3e-3, weight_decay=weight_decay)}
    result = fit(
        operator, shard(all_x.astype(np.float32), comm), shard(all_y.astype(np.float32), comm),
        grid=True, comm=comm, epochs=epochs, batch_size=8, chunk_size=8, patience=20,
        normalize_targets=True, seed=SPLIT_SEED, validation_fraction=VALIDATION_FRACTION,
        progress=progress, groups=local_groups, **optimizer,
    )  # fmt: skip
    mno.save_model(path, result.model, spec=spec, comm=comm)
    return result


def grid_spec(grid: Grid, value_shape: tuple[int, ...] = (2,), quadrature_degree: int = 1):
    """The :class:`~dolfinx_mno.ClosureSpec` of an operator on ``grid`` from ``(ω̄, ū)``,
    as :func:`grid_closure` builds its closure."""
    return mno.ClosureSpec(("omega", "u"), (1, 2), value_shape=value_shape,
                           quadrature_degree=quadrature_degree, grid=grid,
                           mask_channel=False)  # fmt: skip


#: Signs of the channels ``(ω̄, ū_x, ū_y)`` and ``(τ_x, τ_y)`` in the mirror image of a flow.
MIRROR_SIGNS = ((-1.0, 1.0, -1.0), (-1.0, 1.0))


def mirror(fields: Sequence[np.ndarray], signs: Sequence[float]) -> list[np.ndarray]:
    """The gridded fields of the mirror image ``y → L − y`` of the flow: the box's symmetry.

    The equations, the walls and the forcing ``n sin(n y)`` (``n L/π`` even) are unchanged
    by the mirror ``(x, y) → (x, L − y)`` with ``ω → −ω`` (a pseudo-scalar: the mirror
    reverses the sense of rotation), ``u → (u_x, −u_y)`` and so ``τ → (−τ_x, τ_y)``: the
    mirror image of a trajectory is a trajectory, and that of a random initial condition
    (:func:`flow.initial_vorticity`'s Gaussian sine series) is as likely. The mirrored
    samples double the training data for free, but on the default meshes only down to a
    few cells: their diagonals are not mirrored, and on :func:`closure_grid` the cell-wise
    ``τ`` shows them (three of a cell's four grid points lie in one of its two triangles,
    the same three in every cell; in a mirrored sample, the other three). On the meshes of
    :func:`flow.box` with an even ``checkerboard`` (``config["checkerboard"]`` of
    :class:`Turbulence`) the mirror holds at every scale.

    Args:
        fields: One array ``(channels, nx, ny)`` per sample on a grid symmetric about
            ``y = L/2``, e.g. :func:`closure_grid`'s.
        signs: One sign per channel, from :data:`MIRROR_SIGNS`.
    """
    factors = np.asarray(signs).reshape(-1, 1, 1)
    return [factors * field[..., ::-1] for field in fields]


#: Signs of ``(ω̄, ψ̄)`` in the mirror image of a coarse state: both pseudo-scalars.
STATE_MIRROR_SIGNS = (-1.0, -1.0)


class StateMirror:
    """The mirror image ``y → L − y`` of the coarse states ``w = (ω̄, ψ̄)`` of a flow.

    The states of :func:`mirror`'s flows, as :func:`comparison.train_a_posteriori` reads
    them (this rank's owned dofs of ``W``), so that the training through the solver sees
    the mirror images of its trajectories too: ``(ω̄, ψ̄)(x, y) → −(ω̄, ψ̄)(x, L − y)``
    (``u = curl ψ`` then maps to ``(u_x, −u_y)``). The mirror maps the dofs of ``W`` onto
    one another only where it maps the mesh onto itself: the meshes of :func:`flow.box`
    with an even ``checkerboard``; there a step of the mirrored state is the mirror image
    of the step, to round-off.

    The dofs are matched once, by their coordinates (about the box's middle line
    ``y = L/2``), over all ranks: a dof's image may be owned by another rank. A call
    gathers the coarse state on every rank, which is small.

    Args:
        W: The mixed space of the states (P1 ``ω̄``, P2 ``ψ̄``), of a mesh the mirror maps
            onto itself.

    Raises:
        ValueError: On every rank, if some dof has no image among the dofs (another mesh,
            e.g. the default one, whose diagonals the mirror does not map onto diagonals).
    """

    def __init__(self, W: fem.FunctionSpace):
        domain, index_map = W.mesh, W.dofmap.index_map
        if W.dofmap.index_map_bs != 1 or W.num_sub_spaces != len(STATE_MIRROR_SIGNS):
            raise ValueError(f"W must be the (ω̄, ψ̄) space of a flow, got {W}.")
        self.comm, self.num_owned = domain.comm, index_map.size_local
        # The cells first: on the default mesh the dofs' coordinates are symmetric (a
        # diagonal's midpoint is a square's centre), its triangles are not.
        tdim = domain.topology.dim
        num_cells = domain.topology.index_map(tdim).size_local
        centres = dmesh.compute_midpoints(domain, tdim, np.arange(num_cells, dtype=np.int32))
        _, cells_unmatched = self._images(centres[:, :2], np.zeros(num_cells, np.int64))
        num_local = index_map.size_local + index_map.num_ghosts
        coordinates, sign = np.empty((num_local, 2)), np.empty(num_local)
        component = np.empty(num_local, dtype=np.int64)
        for i, factor in enumerate(STATE_MIRROR_SIGNS):
            space, to_W = W.sub(i).collapse()
            coordinates[to_W] = space.tabulate_dof_coordinates()[:, :2]
            component[to_W], sign[to_W] = i, factor
        owned = slice(0, self.num_owned)
        self.partner, dofs_unmatched = self._images(coordinates[owned], component[owned])
        if cells_unmatched or dofs_unmatched:  # every rank raises: the counts are global
            raise ValueError(
                f"{cells_unmatched} cells and {dofs_unmatched} dofs of W have no mirror image "
                f"y -> {length:g} - y: the mirror does not map this mesh onto itself "
                "(use flow.box's checkerboard meshes)."
            )
        self.sign = sign[owned]

    def _images(self, points: np.ndarray, component: np.ndarray) -> tuple[np.ndarray, int]:
        """For this rank's ``points`` (``(n, 2)``, one ``component`` each, owned, in the
        order of their global numbers), the global number of each one's mirror image of the
        same component among all ranks' points, and how many (on all ranks) have none."""
        from scipy.spatial import KDTree

        everyone = np.concatenate(self.comm.allgather(points))
        everyone_component = np.concatenate(self.comm.allgather(component))
        images = points * [1.0, -1.0] + [0.0, length]
        partner = np.zeros(len(points), dtype=np.int64)
        distance = np.zeros(len(points))
        for i in np.unique(everyone_component):
            candidates = np.flatnonzero(everyone_component == i)
            mine = np.flatnonzero(component == i)
            if mine.size:
                distance[mine], nearest = KDTree(everyone[candidates]).query(images[mine])
                partner[mine] = candidates[nearest]
        tolerance = 1e-8 * length
        return partner, self.comm.allreduce(int(np.count_nonzero(distance > tolerance)))

    def __call__(self, state: np.ndarray) -> np.ndarray:
        """The mirror image of ``state`` (this rank's owned dofs; collective)."""
        state = np.asarray(state)
        wrong = self.comm.allreduce(state.shape != (self.num_owned,), op=MPI.LOR)
        if wrong:  # agreed before the gather, so that no rank waits in it alone
            raise ValueError(
                f"a state of {self.num_owned} owned dofs on this rank, got {state.shape} "
                "(on this rank or another)"
            )
        everyone = np.concatenate(self.comm.allgather(state))
        return self.sign * everyone[self.partner]


class Turbulence:
    """The DNS, the coarse model without closure and the filter between them.

    Args:
        config: :func:`settings` (or a dict with its keys), and optionally
            ``checkerboard``: :func:`flow.box`'s, for every mesh (the DNS, the coarse and
            the spin-up meshes, and :meth:`CoarseRuns.ladder`): meshes symmetric
            under the mirror ``y → L − y`` (:func:`mirror`).
        comm: Communicator.

    Attributes:
        dns: The DNS flow (``config["dns"]²``).
        plain: The coarse flow without closure; :meth:`filtered` sets its state.
        omega_bar: The filtered vorticity, P1 on the coarse mesh (overwritten by
            :meth:`filtered`).
        projection: The filter from the DNS mesh.
    """

    def __init__(self, config: dict[str, Any], comm: MPI.Comm = MPI.COMM_WORLD):
        self.config = config
        nf, nc, n = config["dns"], config["coarse"], config["spin_up_n"]
        meshes = {"comm": comm, "checkerboard": config.get("checkerboard")}
        self.dns = VorticityFlow(nf, self.time_step(nf), NU, name="dns", **meshes)
        self.plain = VorticityFlow(nc, self.time_step(nc), NU, name="plain", **meshes)
        self.mesh, self.V = self.plain.mesh, self.plain.V
        self.bc = fem.dirichletbc(0.0, boundary_dofs(self.V), self.V)
        self.projection = L2Projection(self.V, subdivisions=nf // nc, bcs=[self.bc])
        self.omega_bar = fem.Function(self.V, name="omega_bar")
        self._cheap = None
        if n != nf:
            self._cheap = VorticityFlow(n, self.time_step(n), NU, name="cheap", **meshes)

    def time_step(self, n: int) -> float:
        """The time step of an ``n²`` mesh (CFL ≈ 0.3)."""
        return self.config["courant"] / n

    def filtered(self, omega_fine: fem.Function) -> fem.Function:
        """``ω̄`` of a DNS vorticity; sets the coarse state (and ``ψ̄``) of :attr:`plain`."""
        self.projection(omega_fine, out=self.omega_bar)
        self.plain.set_vorticity(self.omega_bar)
        return self.omega_bar

    def trajectory(self, seed: int, horizon: float, record: Callable[[float], None]) -> float:
        """Spin the DNS up from ``seed``'s initial vorticity and run it over ``horizon``.

        ``record(t)`` is called at every DNS step (and at ``t = 0``). Returns the wall time
        of the run after the spin-up.
        """
        config = self.config
        spin_up(self.dns, seed, config["spin_up"], self._cheap, config["spin_up_fine"])
        return self.dns.run(0.0, horizon, record)

    def coarse_model(self, name: str, dt: float | None = None, **closures: Any) -> VorticityFlow:
        """A flow on the coarse mesh (time step ``dt``, default the coarse one) with closures.

        ``closures``: ``closure=`` and/or ``source=`` of :class:`flow.VorticityFlow`.
        """
        dt = self.plain.dt if dt is None else dt
        return VorticityFlow(self.plain.n, dt, NU, domain=self.mesh, name=name, **closures)


class ExactFlux:
    """The exact subgrid flux ``τ = avg_K(uω − ν∇ω) − avg_K(ūω̄ − ν∇ω̄)`` on the coarse cells.

    Args:
        data: The DNS and coarse spaces; :meth:`__call__` sets ``data.plain`` to ``ω̄``.

    Attributes:
        space: The DG₀ vectors on the coarse mesh that ``τ`` lives in.
        sampler: The a-priori sampler of ``τ`` with the inputs ``(∇ω̄, ∇ū)`` of the demo's
            local closure at the degree-1 quadrature points.
        ufl: ``τ`` as a UFL expression of the sampler's functions.
        tau: ``τ`` as a function of :attr:`space`, set by :meth:`__call__`.
    """

    def __init__(self, data: Turbulence):
        plain = data.plain
        self.data = data
        self.space = fem.functionspace(data.mesh, ("Discontinuous Lagrange", 0, (2,)))
        flux = plain.velocity_n * plain.omega_n - NU * ufl.grad(plain.omega_n)
        form = ufl.inner(flux, ufl.TestFunction(self.space)) * ufl.dx
        coarse_flux = Tendency(form, name="coarse_flux")
        operands = {"grad_omega": ufl.grad(plain.omega_n), "grad_u": ufl.grad(plain.velocity_n)}
        self.sampler = ClosureSampler(
            data.projection, data.omega_bar, operands, coarse_flux, quadrature_degree=1,
            tendency_restriction=CellAverage(self.space, data.dns.mesh),
        )  # fmt: skip
        self.ufl = self.sampler.filtered_tendency - coarse_flux.function
        self.tau = fem.Function(self.space, name="tau")
        self._expression = fem.Expression(self.ufl, self.space.element.interpolation_points)

    @staticmethod
    def fine_flux(flow: VorticityFlow) -> Any:
        """The flux ``uω − ν∇ω`` of ``flow``'s current state (UFL)."""
        omega, psi = ufl.split(flow.w)
        return velocity(psi) * omega - NU * ufl.grad(omega)

    def __call__(self, omega: fem.Function, fine_flux: Any) -> ClosureSample:
        """The sample of the DNS vorticity ``omega`` (its flux ``fine_flux``, from
        :meth:`fine_flux` of the DNS flow); sets ``ω̄``, the coarse state and :attr:`tau`."""
        self.data.filtered(omega)
        sample = self.sampler.sample(omega, fine_flux)
        self.tau.interpolate(self._expression)
        return sample

    def skill(
        self,
        predictions: dict[str, Any],
        flows: Sequence[VorticityFlow],
        taus: Sequence[np.ndarray],
        omegas: Sequence[np.ndarray],
    ) -> dict[str, dict[str, float]]:
        """How well each prediction of ``τ`` matches it over a trajectory's samples.

        For each sample, :attr:`tau` is set to ``taus[i]`` and ``ω̄`` to ``omegas[i]``; every
        flow of ``flows`` is set to ``ω̄`` and its closure (if any) updated; then each UFL
        expression of ``predictions`` (a flow's closure, say) is compared with ``τ`` at the
        degree-1 quadrature points of the coarse mesh.

        Returns:
            Per prediction, the means over the samples of the relative L² error ``‖τ_pred −
            τ‖ / ‖τ‖`` (``"relative_l2"``) and of the fraction of ``τ``'s variance explained
            ``1 − ‖τ_pred − τ‖² / ‖τ − mean τ‖²`` (``"fve"``; 1: exact, 0: no better than
            the mean).
        """
        tau, omega_bar = self.tau, self.data.omega_bar
        dxq = measure(self.data.mesh, 1)
        moments = [fem.form(ufl.inner(tau, tau) * dxq), fem.form(1.0 * dxq)]
        moments += [fem.form(tau[i] * dxq) for i in range(2)]
        errors = {
            label: fem.form(ufl.inner(predicted - tau, predicted - tau) * dxq)
            for label, predicted in predictions.items()
        }
        skill: dict[str, dict[str, list[float]]] = {
            label: {"relative_l2": [], "fve": []} for label in errors
        }
        for values, omega in zip(taus, omegas, strict=True):
            tau.x.array[:] = values
            omega_bar.x.array[:] = omega
            norm, area, *mean = (assemble_global(form) for form in moments)
            variance = norm - (mean[0] ** 2 + mean[1] ** 2) / area
            for flow in flows:
                flow.set_vorticity(omega_bar)
                if flow.closure is not None:
                    flow.closure.update()
            for label, form in errors.items():
                error = assemble_global(form)
                skill[label]["relative_l2"].append(float(np.sqrt(error / norm)))
                skill[label]["fve"].append(float(1.0 - error / variance))
        return {
            label: {key: float(np.mean(values)) for key, values in rows.items()}
            for label, rows in skill.items()
        }


def decorrelation(sample_times: np.ndarray, rho: np.ndarray) -> float | None:
    """``t(ρ < 0.95)``, None if never within the horizon (NaN counts as decorrelated)."""
    t = mno.decorrelation_time(sample_times, np.nan_to_num(rho, nan=-1.0))
    return None if math.isinf(t) else float(t)


class CoarseRuns:
    """Runs from the filtered test state against the filtered DNS.

    Args:
        data: The DNS and coarse spaces.
        reference: The filtered DNS vorticity (dof values on the coarse space) every
            ``config["sample_every"]`` from the start of the test trajectory.
    """

    def __init__(self, data: Turbulence, reference: Sequence[np.ndarray]):
        self.data, self.reference = data, reference
        self.horizon = data.config["test_horizon"]
        self.pair = fem.Function(data.V), fem.Function(data.V)
        self.correlation = mno.Correlation(*self.pair)

    def run(
        self,
        flow: VorticityFlow,
        initial: fem.Function,
        to_coarse: Callable[[fem.Function], fem.Function] | None = None,
        before_step: Callable[[int], None] | None = None,
        record_every: int | None = None,
        reference_index: Callable[[int], int] | None = None,
        reference: Sequence[np.ndarray] | None = None,
        long_end: float | None = None,
        each_step: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Run ``flow`` over the test horizon from ``initial``; its correlation with the DNS.

        Args:
            flow: The model.
            initial: Its initial vorticity (P1 on ``flow.V``).
            to_coarse: The filter of a finer flow's vorticity onto the coarse space.
            before_step: ``before_step(k)`` runs before step ``k`` (an oracle sets its
                closure there).
            record_every: Compare every this many steps (default: ``sample_every``).
            reference_index: The index into ``reference`` of step ``k`` (default: ``k //
                record_every``).
            reference: Other reference samples than the constructor's.
            long_end: Run on to this time after the test horizon (stability), recording
                the energy every ``record_every`` steps (without ``before_step``).
            each_step: ``each_step(k)`` runs at the start and after every step, of both
                runs (``k`` counts from the start of each); its time counts as the model's.

        Returns:
            ``decorrelation_time`` (None: never), ``correlation_end``,
            ``seconds_per_time_unit`` (over the test horizon), ``correlations``, and with
            ``long_end`` the ``energy_end`` and ``max_energy`` of the long run and whether
            it stayed ``finite``. A run that blows up (a non-finite state, or a closure that
            fails on it) stops there: its correlations are NaN from then on.
        """
        omega_reference = self.reference if reference is None else reference
        every = record_every or steps(self.data.config["sample_every"], flow.dt)
        index = reference_index or (lambda step: step // every)
        rho: list[float] = []

        def callback(t: float) -> None:
            step = round(t / flow.dt)
            if step % every == 0:
                if not np.isfinite(flow.energy()):  # collective: the ranks agree
                    rho.append(np.nan)  # blown up (the run stops after this step)
                    return
                omega = flow.omega if to_coarse is None else to_coarse(flow.omega)
                self.pair[0].x.array[:] = omega.x.array
                self.pair[1].x.array[:] = omega_reference[index(step)]
                rho.append(self.correlation())
            if before_step is not None:
                before_step(step)
            if each_step is not None:
                tic = time.perf_counter()
                each_step(step)
                hook_seconds.append(time.perf_counter() - tic)

        hook_seconds: list[float] = []
        flow.set_vorticity(initial)
        tic = time.perf_counter()
        try:
            seconds = flow.run(0.0, self.horizon, callback)
        except mno.ClosureEvaluationError:  # raised on every rank: the closure blew up
            seconds = flow.comm.allreduce(time.perf_counter() - tic, op=MPI.MAX)
        seconds += flow.comm.allreduce(sum(hook_seconds), op=MPI.MAX)
        expected = round(self.horizon / (every * flow.dt)) + 1
        rho += [np.nan] * (expected - len(rho))  # a blown-up run stops early
        sample_times = np.arange(expected) * every * flow.dt
        result = {
            "decorrelation_time": decorrelation(sample_times, np.asarray(rho)),
            "correlation_end": float(rho[-1]),
            "seconds_per_time_unit": seconds / self.horizon,
            "correlations": [float(r) for r in rho],
        }
        if long_end is not None:
            energies = [flow.energy()]
            if np.isfinite(energies[0]):

                def record_energy(t: float) -> None:
                    step = round((t - self.horizon) / flow.dt)
                    if step % every == 0:
                        energies.append(flow.energy())
                    if each_step is not None:
                        each_step(step)

                try:
                    flow.run(self.horizon, long_end, record_energy, every=1 if each_step else every)
                except mno.ClosureEvaluationError:
                    energies.append(np.nan)
            finite = bool(np.all(np.isfinite(energies))) and len(energies) > 1
            result |= {
                "long_end": long_end,
                "finite": finite,
                "energy_end": float(energies[-1]),
                "max_energy": float(np.nanmax(energies)) if finite else math.inf,
            }
        return result

    def ladder(
        self, sizes: Sequence[int], start_fine: fem.Function, scheme: str = "euler"
    ) -> dict[str, dict[str, Any]]:
        """The runs without closure on the finer meshes of ``sizes`` (keys ``"no closure, n²"``).

        ``start_fine``: the DNS vorticity at the start, filtered onto each mesh.
        ``scheme``: the time scheme of the runs (:class:`flow.VorticityFlow`).
        """
        data, runs = self.data, {}
        nf, nc = data.config["dns"], data.config["coarse"]
        for size in (n for n in sizes if n != nc):
            flow = VorticityFlow(
                size, data.time_step(size), NU, name=f"ladder{size}_{scheme}", scheme=scheme,
                checkerboard=data.config.get("checkerboard"),
            )  # fmt: skip
            bc = fem.dirichletbc(0.0, boundary_dofs(flow.V), flow.V)
            to_flow = L2Projection(flow.V, subdivisions=nf // size, bcs=[bc])
            to_coarse = L2Projection(data.V, subdivisions=size // nc, bcs=[data.bc])
            runs[f"no closure, {size}²"] = self.run(flow, to_flow(start_fine), to_coarse=to_coarse)
        return runs


def over_seeds(
    correlations: Sequence[Sequence[float]],
    sample_every: float,
    baseline: Sequence[Sequence[float]] | None = None,
) -> dict[str, Any]:
    """The decorrelation of one model's runs from several test seeds.

    Args:
        correlations: Per seed, the correlation with that seed's filtered DNS every
            ``sample_every`` from the start (NaN: blown up, counted as ρ = −1 as in
            :func:`decorrelation`).
        sample_every: The sampling interval.
        baseline: Another model's correlations from the same seeds (e.g. no closure).

    Returns:
        ``times`` (per seed, ``None``: never within the horizon; ``capped_times`` with
        the horizon for ``None``), ``mean``, ``std`` (the
        sample standard deviation, 0 for one seed), ``min`` and ``max`` of the times with
        ``None`` counted as the horizon, ``never`` (how many seeds never decorrelate),
        ``mean_correlation`` (the correlation averaged over the seeds at each sample) and
        ``averaged_time``: the decorrelation time of that average (Kochkov et al.'s
        measure; ``None``: never). With ``baseline`` also the paired comparison, seed by
        seed (the seeds' own spread cancels): ``gain_over_baseline`` (the mean difference
        of the times), its ``gain_standard_error`` and ``beats_baseline`` (on how many
        seeds the model lasts longer).
    """
    rho = np.nan_to_num(np.asarray(correlations, dtype=float), nan=-1.0)
    if rho.ndim != 2 or rho.shape[0] == 0 or rho.shape[1] < 2:
        raise ValueError(f"need (seeds, samples) correlations, got shape {rho.shape}")
    sample_times = np.arange(rho.shape[1]) * sample_every
    times = [decorrelation(sample_times, row) for row in rho]
    capped = np.array([sample_times[-1] if t is None else t for t in times])
    mean_rho = rho.mean(axis=0)
    paired = {}
    if baseline is not None:
        gain = capped - np.array(over_seeds(baseline, sample_every)["capped_times"])
        paired = {
            "gain_over_baseline": float(gain.mean()),
            "gain_standard_error": float(gain.std(ddof=1) / np.sqrt(len(gain)))
            if len(gain) > 1
            else 0.0,
            "beats_baseline": int(np.sum(gain > 0)),
        }
    return paired | {
        "capped_times": [float(t) for t in capped],
        "times": times,
        "mean": float(capped.mean()),
        "std": float(capped.std(ddof=1)) if len(capped) > 1 else 0.0,
        "min": float(capped.min()),
        "max": float(capped.max()),
        "never": sum(t is None for t in times),
        "mean_correlation": [float(r) for r in mean_rho],
        "averaged_time": decorrelation(sample_times, mean_rho),
    }


def as_run(row: dict[str, Any], horizon: float) -> SimpleNamespace:
    """A run's ``decorrelation_time`` (None: never) and ``seconds_per_time_unit`` over
    ``horizon``, as :func:`comparison.resolution_factor` reads a run."""
    t = row["decorrelation_time"]
    return SimpleNamespace(
        times=np.array([0.0, horizon]),
        decorrelation_time=math.inf if t is None else t,
        seconds_per_time_unit=row["seconds_per_time_unit"],
    )


def add_resolution_factors(
    rows: dict[str, dict[str, Any]], ladder: dict[int, dict[str, Any]], coarse: int, horizon: float
) -> None:
    """Add each row's ``resolution_factor``, ``wall_time_ratio`` and
    ``factor_is_lower_bound`` against the runs without closure of ``ladder`` (mesh size →
    row), as the demo defines them (:func:`comparison.resolution_factor`)."""
    runs = {n: as_run(row, horizon) for n, row in ladder.items()}
    for row in rows.values():
        factor, ratio, capped = resolution_factor(runs, coarse, as_run(row, horizon))
        row |= {
            "resolution_factor": factor,
            "wall_time_ratio": ratio,
            "factor_is_lower_bound": capped,
        }
