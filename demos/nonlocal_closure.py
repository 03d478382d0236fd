# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # A non-local closure: a Fourier neural operator for long-range heat exchange
#
# This demo illustrates how to:
#
# - learn a *non-local* missing term, one whose value at a point depends on the field in a
#   whole neighbourhood, with a Fourier neural operator (FNO,
#   [Li et al. 2021](https://arxiv.org/abs/2010.08895)) from `neuraloperator`;
# - couple it to an unstructured mesh with holes through a
#   {py:class}`dolfinx_mno.NonlocalClosure`, which samples the field on a grid (with a
#   *mask channel* marking the points inside the domain) and interpolates the operator's
#   output back to the quadrature points;
# - store training fields with {py:class}`dolfinx_mno.data.GriddedDataWriter` and train
#   on the file with {py:func}`dolfinx_mno.training.fit`, data-parallel over the MPI ranks,
#   with a learning-rate schedule of our choice;
# - validate the FNO on what it sees in the simulation, and check the learned closure
#   against the exact operator with global quantities that do not depend on the number of
#   MPI ranks.
#
# Run it with `python nonlocal_closure.py` or `mpirun -n 2 python nonlocal_closure.py`;
# `--quick` (used by CI) runs a small problem. Outputs go to `output/nonlocal_closure/`.
# `experiments/nonlocal_closure.py` runs this demo, then checks the heat balance, times
# the runs, and draws the stages of the grid transfer.
#
# ## The problem
#
# A plate $\Omega$, the unit square with two circular holes, is heated by a source $f$ and
# held at $u = 0$ on its outer edge and on the holes. Heat is conducted with diffusivity
# $D$, and *also* exchanged over a finite range $\sigma$, a stand-in for a mechanism the
# solver does not resolve (radiation through a semi-transparent plate):
#
# $$
# \begin{align}
#   \partial_t u &= D \Delta u + \gamma \left( A_\sigma[u] - u \right) + f
#     && \text{in } \Omega \times (0, T], \\
#   u &= 0 && \text{on } \partial\Omega \times (0, T] \text{ and outside } \Omega, \\
#   u &= 0 && \text{in } \Omega \text{ at } t = 0,
# \end{align}
# $$
#
# where every point sends heat away at the rate $\gamma u$ and receives
#
# $$
#   A_\sigma[u](x) = \int_{\mathbb{R}^2} \varphi_\sigma(x - y)\, \tilde u(y) \,\mathrm{d}y,
#   \qquad \varphi_\sigma(z) = \frac{e^{-|z|^2 / 2\sigma^2}}{2\pi\sigma^2},
# $$
#
# with $\tilde u$ extended by zero outside $\Omega$: heat jumps across the holes, and near
# the edges part of it goes to the cold surroundings (the non-local Dirichlet problem of
# [Andreu et al. 2010](https://doi.org/10.1090/surv/165)). Our solver knows only
# $\partial_t u = D \Delta u + f$. $A_\sigma[u](x)$ depends on $u$ in a whole disc around
# $x$: no pointwise closure $c(u(x), \nabla u(x))$ can represent it, but a neural operator,
# which maps fields to fields, can. The loss $-\gamma u$ goes into UFL directly; the
# closure is $A_\sigma$, learned by an FNO $A_\theta$. The local terms are implicit and
# the closure explicit: find $u^{n+1} \in V_0$ (continuous $P_1$, zero on
# $\partial\Omega$) such that
#
# $$
#   \int_\Omega (1 + \Delta t\, \gamma)\, u^{n+1} v
#     + \Delta t\, D\, \nabla u^{n+1} \cdot \nabla v \,\mathrm{d}x
#   = \int_\Omega \left(u^n + \Delta t\, f\right) v \,\mathrm{d}x
#   + \underbrace{\Delta t\, \gamma \int_\Omega A_\theta[u^n]\, v \,\mathrm{d}x}_{\text{closure}}
#   \quad \forall v \in V_0 .
# $$
#
# Since $\|A_\sigma\| \le 1$ (an average), this splitting is stable for any $\Delta t$.
# We run the solver three times: without the exchange (**baseline**), with the FNO
# (**closure**), and with the *exact* $A_\sigma$ on the same grid through the same kind of
# closure (**reference**), so that the last two differ by the model's error alone.
#
# ## Imports and settings
#
# `--quick` uses the plate mesh as stored (3,449 triangles) and a $32 \times 32$ grid; the
# default run refines it once (13,796 triangles) and uses a $64 \times 64$ grid, more
# training fields and smaller time steps. Both end at $T = 0.15$, close to steady state.

# +
import argparse
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch
import ufl
from dolfinx import fem, io, mesh
from dolfinx.io import gmsh as gmshio
from neuralop.models import FNO
from utilities import assemble_global

import dolfinx_mno as mno
from dolfinx_mno.data import GriddedDataReader, GriddedDataWriter
from dolfinx_mno.petsc import LinearProblem
from dolfinx_mno.timestepping import IMEXStepper
from dolfinx_mno.training import fit

parser = argparse.ArgumentParser(description="A non-local FNO closure on a plate with holes.")
parser.add_argument("--quick", action="store_true", help="small problem for CI")
args = parser.parse_args()

comm = MPI.COMM_WORLD
diffusivity, exchange_rate, exchange_range = 1.0, 20.0, 0.2  # D, γ, σ
final_time = 0.15
if args.quick:
    grid_points, num_steps, refine, num_fields, epochs = 32, 15, False, 512, 8
else:
    grid_points, num_steps, refine, num_fields, epochs = 64, 60, True, 1024, 8
dt = final_time / num_steps
direct_solver = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
grid_shape = (grid_points, grid_points)
output_dir = Path(__file__).resolve().parent / "output" / "nonlocal_closure"
output_dir.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # the fastest for a small model, and the same on every rank
# -

# ## The mesh
#
# An unstructured gmsh mesh (made by `meshes/make_meshes.py`), read on rank 0 and
# distributed. All boundary facets, outer edge and holes alike, carry $u = 0$.

mesh_path = Path(__file__).resolve().parents[1] / "meshes" / "plate_with_holes.msh"
msh = gmshio.read_from_msh(mesh_path, comm, 0, gdim=2).mesh
if refine:
    msh.topology.create_entities(1)
    msh = mesh.refine(msh)[0]
V = fem.functionspace(msh, ("Lagrange", 1))
x = ufl.SpatialCoordinate(msh)

# ## Step 1: the exact operator on the grid
#
# A {py:class}`~dolfinx_mno.NonlocalClosure` samples its operands (here $u^n$) on a
# vertex-centred grid over the mesh's bounding box, the unit square. Grid points in the
# holes get `extension_value` (zero, exactly $\tilde u$ there), and a mask channel is
# appended (1 inside $\Omega$, 0 outside): the model maps `(1, 2, nx, ny)` to
# `(1, 1, nx, ny)`. On the grid, $A_\sigma$ is a convolution with the Gaussian sampled
# within $3\sigma$ and normalised to sum 1, computed by FFT on a padded grid so that
# nothing wraps around. This module is the model of the reference closure and the teacher
# that makes the FNO's training targets.


class GaussianExchange(torch.nn.Module):
    """The exact ``A_σ[u] = φ_σ * ũ`` on a grid: ``(batch, 2, nx, ny) → (batch, 1, nx, ny)``."""

    def __init__(self, sigma: float, spacing: float):
        super().__init__()
        radius = int(np.ceil(3 * sigma / spacing))
        offsets = spacing * np.arange(-radius, radius + 1)
        weights = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
        self.register_buffer("kernel", torch.from_numpy(weights / weights.sum())[None, None])
        self.radius = radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, r = x[:, :1], self.radius  # zero outside the domain: the closure's extension value
        size = (u.shape[-2] + 2 * r, u.shape[-1] + 2 * r)
        kernel = torch.fft.rfft2(self.kernel.to(x.dtype), s=size)
        full = torch.fft.irfft2(torch.fft.rfft2(u, s=size) * kernel, s=size)
        return full[..., r : r + u.shape[-2], r : r + u.shape[-1]]


spacing = 1.0 / (grid_points - 1)
exact_operator = GaussianExchange(exchange_range, spacing).double()

# ## Step 2: the solver, with optional non-local exchange
#
# An ordinary DOLFINx heat solver. The exchange adds the three lines marked
# `# <-- exchange`: the implicit loss $\gamma u$, the closure of the model on the operand
# $u^n$, and the closure term, integrated with the closure's own quadrature rule
# `closure.dx`. {py:class}`~dolfinx_mno.petsc.LinearProblem` updates the closure (sample,
# gather, model, scatter, interpolate) before every solve.


def gaussian_source(centres, amplitudes, width):
    """A UFL sum of Gaussian heaters ``a exp(-|x - c|² / 2w²)``."""
    terms = [
        a * ufl.exp(-((x[0] - cx) ** 2 + (x[1] - cy) ** 2) / (2 * width**2))
        for (cx, cy), a in zip(centres, amplitudes, strict=True)
    ]
    return sum(terms[1:], terms[0])


def solve_heat(source, model=None, callback=None, description="time steps"):
    """Backward Euler for u_t = DΔu + f (+ γ(A[u] - u) with A the closure of ``model``).

    ``callback(closure)`` runs after every step. Returns the dof values of u after every
    step and the closure (or ``None``).
    """
    u_n, u_h = fem.Function(V, name="u_n"), fem.Function(V, name="u")
    msh.topology.create_connectivity(1, 2)
    boundary_dofs = fem.locate_dofs_topological(V, 1, mesh.exterior_facet_indices(msh.topology))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = (u * v + dt * diffusivity * ufl.inner(ufl.grad(u), ufl.grad(v))) * ufl.dx
    L = (u_n + dt * source) * v * ufl.dx
    closure = None
    if model is not None:
        a += dt * exchange_rate * u * v * ufl.dx  # <-- exchange
        closure = mno.NonlocalClosure(model, [u_n], grid_shape=grid_shape)  # <-- exchange
        L += dt * exchange_rate * closure * v * closure.dx  # <-- exchange
    problem = LinearProblem(
        a,
        L,
        bcs=[fem.dirichletbc(0.0, boundary_dofs, V)],
        u=u_h,
        petsc_options_prefix="plate_",
        petsc_options=direct_solver,
        reuse_matrix=True,  # `a` is the same every step: factorise once
    )
    states = []

    def after_step(_):
        states.append(u_h.x.array.copy())
        if callback is not None:
            callback(closure)

    IMEXStepper(problem, u_h, u_n, dt).run(num_steps, callback=after_step, desc=description)
    return states, closure


# ## Step 3: training data, in an HDF5 file
#
# In an application the training data come from resolved simulations. Here the exact
# operator is known, so we make input fields on the grid: random sums of Gaussian bumps
# times a cut-off that vanishes outside the plate and goes to zero continuously at its
# boundary, as the temperature does. From these the FNO learns the operator, not one family
# of solutions. The validation data come from the closure itself: one run of the reference
# solver, with three random heaters, keeps the closure's
# {py:meth}`~dolfinx_mno.NonlocalClosure.gridded_inputs` after every step (on rank 0,
# `(2, nx, ny)`: $u^n$ and the mask). The FNO sees exactly these as a closure, so they
# measure the fit where it matters; their mask gives the cut-off.

# +
validation = []


def keep_gridded_inputs(closure):
    """Keep the closure's last model input (rank 0); skip the first, where u = 0."""
    if comm.rank == 0 and closure.update_count > 1:
        validation.append(closure.gridded_inputs())


rng = np.random.default_rng(seed=2024)
heaters = rng.uniform(0.1, 0.9, size=(3, 2)), rng.uniform(100.0, 300.0, size=3)
_, validation_closure = solve_heat(
    gaussian_source(*heaters, width=0.08), exact_operator, keep_gridded_inputs, "validation run"
)


def random_fields(mask, num_fields, rng):
    """Random inputs ``(num_fields, 2, nx, ny)``: sums of bumps times a cut-off, and the mask."""
    gx, gy = np.meshgrid(*[np.linspace(0.0, 1.0, n) for n in mask.shape], indexing="ij")
    # A mask blurred over 0.05 is 1/2 on the boundary: twice its excess over 1/2 rises
    # from 0 on the boundary to 1 about 0.1 inside.
    with torch.no_grad():
        blurred = GaussianExchange(0.05, spacing).double()(torch.from_numpy(mask)[None, None])
    cutoff = np.clip(2.0 * blurred[0, 0].numpy() - 1.0, 0.0, 1.0) * mask
    fields = np.empty((num_fields, 2, *mask.shape))
    fields[:, 1] = mask
    for k in range(num_fields):
        field = np.zeros(mask.shape)
        for _ in range(rng.integers(1, 6)):
            (cx, cy), width = rng.uniform(0.0, 1.0, 2), rng.uniform(0.04, 0.25)
            bump = np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * width**2))
            field += rng.uniform(-0.5, 2.0) * bump
        fields[k, 0] = field * cutoff
    return fields


# -

# Rank 0 makes the fields and their exact images; a
# {py:class}`~dolfinx_mno.data.GriddedDataWriter` appends them to a file, crash-safely
# (every rank calls `append`, rank 0 passes the data and writes), with the grid and our
# metadata. In an application the simulations write it once, and every training run reads it.

# +
data_path = output_dir / "training_fields.h5"
inputs = targets = None
if comm.rank == 0:
    inputs = random_fields(validation[0][1], num_fields, np.random.default_rng(seed=7))
    with torch.no_grad():
        targets = exact_operator(torch.from_numpy(inputs)).numpy()
with GriddedDataWriter(
    data_path,
    comm,
    grid=validation_closure.grid,
    in_channels=2,
    out_channels=1,
    mode="w",
    fsync=False,  # made in seconds: no need to survive a crash of the machine
    metadata={"channels": ["u", "mask"], "targets": "A_sigma[u]", "sigma": exchange_range},
) as writer:
    for k in range(num_fields):
        writer.append(*((inputs[k], targets[k]) if comm.rank == 0 else (None, None)))
# -

# ## Step 4: fit the FNO
#
# A smooth operator needs a small FNO: 8 Fourier modes per direction, 8 hidden channels,
# 2 layers, and the grid coordinates as (default) positional embedding. The grid does not
# continue periodically, so every Fourier layer works on the grid zero-padded by 25 % on
# each side (`domain_padding`).
#
# {py:func}`~dolfinx_mno.training.fit` takes the reader: every rank reads its block of the
# fields, the ranks share each minibatch, and the weights are the same, bit for bit, on
# any number of ranks. It holds back a fifth of the fields for validation and normalises
# the targets (the returned {py:class}`~dolfinx_mno.NormalizedModel` maps back) but not
# the inputs (zero and the mask mean something). It trains in float32 with Adam; for a
# fixed budget of epochs we inject a cosine schedule instead of the default plateau one.
# The closure runs the model in float64, like the finite-element problem
# ({py:func}`dolfinx_mno.to_precision` also casts the complex spectral weights).

# +
torch.manual_seed(0)  # the initial weights
fno = FNO(
    n_modes=(8, 8),
    in_channels=2,  # u and the mask
    out_channels=1,
    hidden_channels=8,
    n_layers=2,
    use_channel_mlp=False,
    domain_padding=0.25,  # the domain is not periodic
)
with GriddedDataReader(data_path) as data:
    result = fit(
        fno,
        data,
        comm=comm,
        epochs=epochs,
        batch_size=8,
        chunk_size=4,  # two backward passes per step: work for two ranks
        learning_rate=3e-2,
        scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs),
        normalize=False,
        normalize_targets=True,
        progress=comm.rank == 0 and not args.quick,
    )
closure_model = mno.to_precision(result.model, torch.float64)
# -

# The relative $L^2$ error of the FNO on every validation snapshot, which it never saw:

fit_errors = None
if comm.rank == 0:
    snapshots = torch.from_numpy(np.stack(validation))
    with torch.no_grad():
        exact, learned = exact_operator(snapshots), closure_model(snapshots)
    difference = torch.linalg.norm((learned - exact).flatten(1), dim=1)
    fit_errors = (difference / torch.linalg.norm(exact.flatten(1), dim=1)).numpy()
fit_errors = comm.bcast(fit_errors, root=0)

# ## Step 5: the three runs
#
# The test heaters, two Gaussians beside the holes, are new to the FNO.

test_source = gaussian_source([(0.25, 0.72), (0.78, 0.25)], [250.0, 150.0], width=0.06)
models = {"baseline": None, "closure": closure_model, "reference": exact_operator}
states, closures = {}, {}
for name, model in models.items():
    states[name], closures[name] = solve_heat(test_source, model, description=f"{name} run")

# ## Step 6: compare
#
# Global quantities: each rank integrates over the cells it owns and `comm.allreduce` sums
# (`assemble_global` in `utilities.py`). For each run, $\|u(t)\|_{L^2}$ and the relative
# $L^2$ difference to the reference at every step; for the closures at the last step, the
# relative $L^2(\Omega)$ error of $A_\theta$ against $A_\sigma$. (The heat balance,
# the net exchange with the surroundings, is checked by `experiments/nonlocal_closure.py`.)

# +
w = fem.Function(V)
norm_squared = fem.form(w * w * ufl.dx)


def l2_norm(values):
    """Global L2 norm of the P1 function with dof values `values` (local, with ghosts)."""
    w.x.array[:] = values
    return np.sqrt(assemble_global(norm_squared))


norms = {name: np.array([l2_norm(u) for u in states[name]]) for name in models}
references = states["reference"]
errors = {
    name: np.array([l2_norm(u - ref) for u, ref in zip(states[name], references, strict=True)])
    / norms["reference"]
    for name in models
}
learned, exact = closures["closure"], closures["reference"]
closure_error = np.sqrt(
    assemble_global(fem.form((learned - exact) ** 2 * exact.dx))
    / assemble_global(fem.form(exact**2 * exact.dx))
)
# -

# `solution.bp` holds the three solutions at every step (open it in ParaView). Rank 0
# prints the results, which are the same for any number of ranks.

# +
fields = {name: fem.Function(V, name=f"u_{name}") for name in models}
with io.VTXWriter(comm, output_dir / "solution.bp", list(fields.values()), "BP4") as vtx:
    for step in range(num_steps):
        for name, field in fields.items():
            field.x.array[:] = states[name][step]
        vtx.write((step + 1) * dt)

if comm.rank == 0:
    print(f"\nplate with holes: {msh.topology.index_map(2).size_global} cells, grid {grid_shape}")
    print(
        f"FNO fit: {num_fields} fields, {result.history.epochs} epochs; relative error on "
        f"{len(fit_errors)} validation snapshots: median {np.median(fit_errors):.3e}, "
        f"max {np.max(fit_errors):.3e}"
    )
    for name in models:
        print(
            f"{name:>9} run: |u(T)|_L2 = {norms[name][-1]:.5f}, largest relative difference "
            f"to the reference {np.max(errors[name]):.3e}"
        )
    print(f"closure relative L2 error at the last step: {closure_error:.3e}")
# -

# ## Checks
#
# The FNO must have learned the operator, not the training fields: on the validation
# snapshots its median relative error must be below 5 % and its largest below 10 %
# (measured: 2.4 % and 3.7 % with `--quick`, 1.4 % and 6.2 % by default). At the last
# step of the test run the learned closure must be within 5 % of the exact operator in
# $L^2(\Omega)$ (measured: 2.4 % and 2.2 %). Leaving out the exchange changes the
# solution by about 16 %. The closure's error enters the solution damped (its errors are
# smooth, and diffusion spreads them), so the closure run must stay within 1 % of the
# reference at every step (measured: 0.15 % and 0.19 %) and the baseline at least ten
# times further away. Every rank holds the same numbers, so every rank checks them.

assert np.median(fit_errors) < 0.05, f"poor FNO fit (median error {np.median(fit_errors):.2e})"
assert np.max(fit_errors) < 0.1, f"poor FNO fit (max error {np.max(fit_errors):.2e})"
assert closure_error < 0.05, f"the learned closure is off by {closure_error:.2e}"
assert np.max(errors["closure"]) < 1e-2, "the closure run departs from the reference"
assert errors["baseline"][-1] > 10 * np.max(errors["closure"]), "the closure does not help"
