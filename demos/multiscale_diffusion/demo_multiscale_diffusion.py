# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # Multiscale diffusion: a learned flux closure on a coarse mesh
#
# This demo is implemented in {download}`demo_multiscale_diffusion.py`. It illustrates how to:
#
# - produce closure training data from fine simulations that resolve a periodic
#   microstructure: filter the fine gradient and flux to the coarse mesh with exact
#   coarse-cell averages, {py:class}`dolfinx_mno.data.CellAverage`, in a
#   {py:class}`dolfinx_mno.data.ClosureSampler`; write them with
#   {py:class}`dolfinx_mno.data.ClosureDataWriter` and read them back with
#   {py:class}`dolfinx_mno.data.ClosureDataReader`,
# - fit a *vector* closure (a flux) with {py:func}`dolfinx_mno.training.fit`, keep its
#   scales with its weights in a {py:class}`dolfinx_mno.NormalizedModel`, save it with
#   {py:func}`dolfinx_mno.io.save_model` and build the {py:class}`dolfinx_mno.Closure` from
#   the file,
# - couple the closure implicitly: {py:class}`dolfinx_mno.petsc.NonlinearProblem` with the
#   Jacobian built from the closure tangent $\partial q / \partial \nabla \bar u$,
# - read the learned effective tensor off that tangent, and check it and the coarse
#   solution against homogenisation theory and the fine solution.
#
# The same steps for a second microstructure (a checkerboard), on a second domain (a plate
# with holes, with a fine mesh that conforms to the microstructure) and with the cost of
# every solve against solves that resolve the microstructure make up the experiment
# `experiments/multiscale_diffusion_results.py`, whose numbers are in `docs/results.md`.
#
# Run it with `python demo_multiscale_diffusion.py` or `mpirun -n 2 python
# demo_multiscale_diffusion.py`; `--quick` (used by CI) runs a smaller problem in seconds.
# All outputs go to `demos/output/multiscale_diffusion/`.
#
# ## The problem
#
# Diffusion through a material with a fine periodic structure of period $\varepsilon$:
#
# $$
# \begin{align}
#   -\nabla \cdot \left( a(x / \varepsilon) \nabla u \right) &= f && \text{in } \Omega, \\
#   u &= g && \text{on } \partial\Omega .
# \end{align}
# $$
#
# The microstructure is a **laminate**: stripes normal to $x_1$ with conductivity $a_2$
# in the middle half of each period and $a_1$ elsewhere,
#
# $$
#   a(y) = \begin{cases} a_2 & \text{if } \tfrac14 \le y_1 - \lfloor y_1 \rfloor
#   < \tfrac34, \\ a_1 & \text{otherwise,} \end{cases}
#   \qquad a_1 = 1,\ a_2 = 10 .
# $$
#
# **Homogenisation.** As $\varepsilon \to 0$, $u$ tends to the solution of the same
# problem with the constant tensor
#
# $$
#   A_\text{hom} = \begin{pmatrix} \underline a & 0 \\ 0 & \bar a \end{pmatrix},
#   \qquad \underline a = \left( \tfrac12 a_1^{-1} + \tfrac12 a_2^{-1} \right)^{-1}
#   = 1.818\ldots, \quad \bar a = \tfrac12 (a_1 + a_2) = 5.5 .
# $$
#
# Across the stripes the flux is continuous, so the resistances add up (harmonic mean);
# along them the gradient is continuous, so the conductivities add up (arithmetic mean).
#
# **The coarse model.** A coarse mesh of size $h \gg \varepsilon$ cannot see the stripes. A
# naive coarse model uses the mean conductivity $\bar a$, right along the stripes and wrong
# across them (by a factor 3 here). We keep $\bar a$ as the known physics and learn the rest
# of the *filtered flux* as a closure $q_\theta(\nabla \bar u)$: find $\bar u \in V_h$,
# $\bar u = g$ on $\partial\Omega$, such that
#
# $$
#   F(\bar u; v) = \int_\Omega \bar a \nabla \bar u \cdot \nabla v \,\mathrm{d}x
#   + \int_\Omega q_\theta(\nabla \bar u) \cdot \nabla v \,\mathrm{d}x
#   - \int_\Omega f v \,\mathrm{d}x = 0 \quad \forall v \in V_{h,0} .
# $$
#
# **Training data.** From fine solutions $u_f$ under several loadings we form the fine
# gradient $\nabla u_f$ and the fine flux $a \nabla u_f$, filter both to the coarse scale with
# the coarse-cell average $R$, and set
#
# $$
#   \text{input} = R(\nabla u_f), \qquad
#   \text{target} = R(a \nabla u_f) - \bar a\, R(\nabla u_f) ,
# $$
#
# the commutator of filtering and the coarse flux law, the closure target of the multiscale
# neural operator (Lütjens et al. 2022, [arXiv:2207.11417](https://arxiv.org/abs/2207.11417)).
# Homogenisation predicts $q(\nabla \bar u) = (A_\text{hom} - \bar a I) \nabla \bar u$, a
# linear map, so we fit a linear model and read the learned effective tensor
# $\bar a I + \partial q_\theta / \partial \nabla \bar u$ off the closure tangent.
#
# ## Imports
#
# The problem itself (the microstructure, the loadings, the plain DOLFINx solvers without
# closure) is in {download}`problem.py`, next to this demo; small helpers shared by all
# demos (boundary dofs, norms, rank-0 printing) are in `demos/utilities.py`.

# +
import argparse
import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch
import ufl
from dolfinx import fem, io

import dolfinx_mno as mno
from dolfinx_mno.data import (
    CellAverage,
    ClosureDataReader,
    ClosureDataWriter,
    ClosureSampler,
    L2Projection,
)
from dolfinx_mno.io import save_model
from dolfinx_mno.models import MLP
from dolfinx_mno.petsc import NonlinearProblem
from dolfinx_mno.training import fit, shard

# demos/utilities.py is one folder up (problem.py is in this script's folder, on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from problem import (
    DIRECT_SOLVER,
    TRAINING_LOADINGS,
    FineProblem,
    laminate,
    resolved_conductivity,
    solve_plain,
    test_loading,
)
from utilities import boundary_dofs, log, output_folder, relative_l2_error, unit_square

# -

# ## Settings
#
# The full run uses $\varepsilon = 1/64$, a $16 \times 16$ coarse mesh ($h = 4\varepsilon$)
# and a fine mesh with 8 cells per period ($512 \times 512$ cells). `--quick` uses
# $\varepsilon = 1/32$ and an $8 \times 8$ coarse mesh. The meshes are quadrilateral and
# aligned with the stripes: each coarse cell holds exactly four periods, and no fine cell
# cuts a stripe.

# +
parser = argparse.ArgumentParser(description="Learned flux closure for multiscale diffusion.")
parser.add_argument("--quick", action="store_true", help="small problem for CI (seconds)")
args = parser.parse_args()

comm = MPI.COMM_WORLD
torch.set_num_threads(1)  # a tiny model: the cores belong to the MPI ranks

periods, coarse_cells = (32, 8) if args.quick else (64, 16)
microstructure = laminate(epsilon=1.0 / periods)  # a1 = 1, a2 = 10, 8 fine cells per period
a_mean, A_hom = microstructure.mean, microstructure.A_hom
fine_cells = periods * microstructure.cells_per_period
quadrature_degree = 2  # the closure's rule on the coarse cells
output_dir = output_folder("multiscale_diffusion", comm)
data_path = output_dir / "closure_data.h5"
model_path = output_dir / "flux_closure.pt"
# -

# ## Step 1: fine simulations and training data
#
# The fine model resolves the stripes: $Q_1$ on the fine mesh, with the conductivity
# interpolated into the piecewise constants (exact, as no cell cuts a stripe). Six
# loadings (sources and boundary data, `TRAINING_LOADINGS`) make the filtered gradients
# point in all directions and vary in size. They share one matrix, so `FineProblem`
# factorises it once (a {py:class}`dolfinx_mno.petsc.LinearProblem` with
# `reuse_matrix=True`) and then only assembles right-hand sides.

fine = unit_square(comm, fine_cells)
a_fine = resolved_conductivity(fine, microstructure.law)
fine_problem = FineProblem(fem.functionspace(fine, ("Lagrange", 1)), a_fine)

# **The filter.** We interpolate $\nabla u_f$ and $a \nabla u_f$ into the fine DG$_0$ vector
# space, which takes their values at the cell midpoints; on a rectangle that is the exact
# cell mean of the gradient of a bilinear function. We then filter them with the *exact*
# average over each coarse cell $K$, summed over the fine cells $k$ inside it,
#
# $$
#   (R w)_K = \frac{1}{|K|} \int_K w \,\mathrm{d}x
#   = \frac{1}{|K|} \sum_{k \subset K} |k|\, w_k ,
# $$
#
# the package's {py:class}`~dolfinx_mno.data.CellAverage`. It needs nested meshes (it
# checks that they are) and is exact for fields that jump many times within a coarse cell,
# the very fields a closure is about. It works under MPI with independently partitioned
# meshes.
#
# **The sampler.** {py:class}`~dolfinx_mno.data.ClosureSampler` computes
# `R(fine tendency) - coarse tendency(R(fine state))` at the coarse quadrature points. Read
# "state" as the gradient and "tendency" as the flux law: the fine state is $\nabla u_f$,
# the fine tendency is $a \nabla u_f$, the coarse state is $\bar g = R(\nabla u_f)$ (a
# coarse DG$_0$ vector) and the coarse tendency is the known flux $\bar a \bar g$. The
# closure's input is $\bar g$ itself. Both fields are constant on a coarse cell, so one
# point per cell (degree 0) carries all the information.

# +
coarse = unit_square(comm, coarse_cells)
W_coarse = fem.functionspace(coarse, ("DG", 0, (2,)))
g_bar = fem.Function(W_coarse, name="filtered_gradient")
sampler = ClosureSampler(
    CellAverage(W_coarse, fine),  # R: exact coarse-cell means
    g_bar,  # the coarse state ḡ = R(grad u_f), overwritten by each sample
    [g_bar],  # the closure's input
    a_mean * g_bar,  # the known coarse flux
    quadrature_degree=0,
)

W_fine = fem.functionspace(fine, ("DG", 0, (2,)))
gradient, flux = fem.Function(W_fine), fem.Function(W_fine)
points = W_fine.element.interpolation_points
to_gradient = fem.Expression(ufl.grad(fine_problem.u), points)
to_flux = fem.Expression(a_fine * ufl.grad(fine_problem.u), points)
# -

# **The data.** One fine solve per loading; then the gradient and the flux are filtered and
# one sample is appended to the HDF5 file. The writer gathers each sample on rank 0 in
# global cell order, so the file does not depend on the number of ranks. The reader is
# serial: rank 0 reads and broadcasts, and {py:func}`~dolfinx_mno.training.shard` later
# gives each rank a contiguous block of the rows, which is what `fit` expects.

# +
attributes = {
    "problem": "-div(a(x/eps) grad u) = f, laminate",
    "epsilon": microstructure.epsilon,
    "conductivities": list(microstructure.conductivities),
    "loadings": list(TRAINING_LOADINGS),
}
with ClosureDataWriter.from_sampler(
    data_path, sampler, fine_mesh=fine, attributes=attributes, mode="w"
) as writer:
    for f, g in TRAINING_LOADINGS.values():
        fine_problem.solve(f, g)
        gradient.interpolate(to_gradient)
        flux.interpolate(to_flux)
        writer.append(sampler.sample(gradient, fine_tendency=flux))

if comm.rank == 0:
    with ClosureDataReader(data_path) as data:
        read = data.inputs(), data.targets(), data.num_samples, data.num_points
else:
    read = None
inputs, targets, num_samples, num_points = comm.bcast(read, root=0)  # (S * P, 2) each
# -

# ## Step 2: fit and save the closure model
#
# The target is linear in the input, so the model is a single linear layer,
# `MLP(2, 2, hidden_features=[])`. We scale inputs and targets with one fixed scale each,
# instead of `fit`'s per-component standardisation (`normalize=False`): the second target
# component is zero in theory ($\bar a$ is exact along the stripes), and standardising it
# would blow its noise up to order one. A {py:class}`~dolfinx_mno.NormalizedModel` keeps the
# scales with the weights in the model file: the closure takes and returns physical values.
# Training is seeded and data-parallel: its result does not depend on the number of ranks.

# +
input_scale = np.sqrt(np.mean(inputs**2))
target_scale = np.sqrt(np.mean(targets**2))
result = fit(
    MLP(2, 2, hidden_features=[], seed=0),
    shard(inputs / input_scale, comm),
    shard(targets / target_scale, comm),
    comm=comm,
    normalize=False,  # scaled above
    epochs=400,
    batch_size=32,
    chunk_size=16,
    learning_rate=1e-2,
    patience=50,
    seed=0,
    progress=False,
)
model = mno.NormalizedModel(
    result.model,
    mno.AffineNormalization(shift=0.0, scale=input_scale, width=2),
    mno.AffineNormalization(shift=0.0, scale=target_scale, width=2),
)
# The file records what the model is for: one operand named grad_u, a vector value, the
# quadrature degree. A closure built from it reads these and checks its operands.
spec = mno.ClosureSpec(("grad_u",), (2,), value_shape=(2,), quadrature_degree=quadrature_degree)
metadata = {"closure": "filtered flux minus a_mean * filtered gradient"}
save_model(model_path, model, metadata=metadata, spec=spec, comm=comm)
# -

# ## Step 3: the coarse model with the learned closure
#
# The closure is built from the model file, with the operand $\nabla \bar u$ at the points
# of a degree-2 rule, and enters the form as any coefficient, integrated with its own
# measure `closure.dx`. `NonlinearProblem` builds the Jacobian with
# {py:func}`dolfinx_mno.derivative`, which includes the closure tangent, and re-evaluates
# values and tangents at every Newton iterate. The test loading, used for every comparison
# from here on, is a Gaussian source with bilinear boundary data, not among the training
# loadings.

# +
V = fem.functionspace(coarse, ("Lagrange", 1))
u_closure = fem.Function(V, name="u_closure")
closure = mno.Closure(model_path, mno.Operands({"grad_u": ufl.grad(u_closure)}))
f, g = test_loading(ufl.SpatialCoordinate(coarse))
g_h = fem.Function(V)
g_h.interpolate(fem.Expression(g, V.element.interpolation_points))
v = ufl.TestFunction(V)
F = (
    ufl.inner(a_mean * ufl.grad(u_closure), ufl.grad(v)) * ufl.dx
    + ufl.inner(closure, ufl.grad(v)) * closure.dx
    - f * v * ufl.dx
)
problem = NonlinearProblem(
    F,
    u_closure,
    bcs=[fem.dirichletbc(g_h, boundary_dofs(V))],
    petsc_options_prefix="closure_",
    petsc_options={"snes_rtol": 1e-10, "snes_atol": 1e-12, **DIRECT_SOLVER},
)
problem.solve()
assert problem.solver.getConvergedReason() > 0, "Newton did not converge"
newton_iterations = problem.solver.getIterationNumber()
# -

# **The learned effective tensor.** After the solve, `closure.tangent` holds
# $\partial q_\theta / \partial \nabla \bar u$ (value shape `(2, 2)`) at every quadrature
# point. For a linear model it is the same everywhere;
# {py:meth}`~dolfinx_mno.Closure.mean_tangent` averages it over all points of all ranks.
# The least-squares fit to the data shows how far `fit` got.

# +
tangent_mean = closure.mean_tangent()  # (2, 2)
tangents = closure.tangent.x.array.reshape(-1, 2, 2)
tangent_spread = comm.allreduce(float(np.max(np.abs(tangents - tangent_mean))), op=MPI.MAX)
A_learned = a_mean * np.eye(2) + tangent_mean
tensor_error = np.linalg.norm(A_learned - A_hom) / np.linalg.norm(A_hom)
A_least_squares = a_mean * np.eye(2) + np.linalg.lstsq(inputs, targets, rcond=None)[0].T
fit_gap = np.linalg.norm(A_learned - A_least_squares) / np.linalg.norm(A_hom)
# -

# ## Step 4: compare with the fine solution and with coarse models without closure
#
# The reference is the fine solution for the test loading, filtered to the coarse space
# $V_h$ by the package's {py:class}`~dolfinx_mno.data.L2Projection` (with a degree-10
# rule: $u_f$ oscillates within each coarse cell). The error of a coarse solution $u$ is
#
# $$
#   e(u) = \frac{\| u - P u_f \|_{L^2(\Omega)}}{\| P u_f \|_{L^2(\Omega)}} .
# $$
#
# We compare three coarse models on the same mesh: **ā only** (no closure), which
# converges, as the mesh is refined, to the solution of the wrong equation; **A_hom**, the
# exact homogenised tensor, the best that any local closure can do on this mesh; and the
# **closure**. `solve_plain` (in `problem.py`) is an ordinary DOLFINx linear solve.

# +
u_fine, _ = solve_plain(fem.functionspace(fine, ("Lagrange", 1)), a_fine, test_loading, "u_fine")
u_filtered = L2Projection(V, quadrature_degree=10)(u_fine)
u_filtered.name = "u_fine_filtered"
solutions = {
    "ā only": solve_plain(V, fem.Constant(coarse, a_mean), test_loading, "u_mean_only")[0],
    "A_hom": solve_plain(V, fem.Constant(coarse, A_hom), test_loading, "u_hom")[0],
    "closure": u_closure,
}
errors = {name: relative_l2_error(u.x.array, u_filtered) for name, u in solutions.items()}
closure_vs_hom = relative_l2_error(u_closure.x.array, solutions["A_hom"])
# -

# ## Output and checks
#
# The coarse solutions go to one VTX file (open it in ParaView); the numbers are printed
# on rank 0 and are the same on any number of ranks.

# +
with io.VTXWriter(comm, output_dir / "coarse.bp", [u_filtered, *solutions.values()]) as vtx:
    vtx.write(0.0)

log(f"laminate, eps = 1/{periods}: coarse {coarse_cells}², fine {fine_cells}²")
log(f"training data: {num_samples} fine solutions x {num_points} coarse cells")
log(f"fit: {result.history.epochs} epochs, validation loss {result.history.best_val_loss:.2e}")
log(f"A_hom     = {A_hom.round(4).tolist()}\nA_learned = {A_learned.round(4).tolist()}")
log(f"relative error {tensor_error:.2e}; distance to least squares {fit_gap:.2e}")
log(f"Newton iterations {newton_iterations}; closure vs A_hom solution {closure_vs_hom:.2e}")
for name, error in errors.items():
    log(f"  error, {name:<8} {error:.3e}")
# -

# The tolerances come from measurements (full run / `--quick`, the same on 1 and 2 ranks;
# see `docs/results.md`):
#
# * the learned tensor is within 0.19 % / 0.40 % of $A_\text{hom}$ (we require 1 %), and
#   within 0.03 % / 0.04 % of the least-squares tensor of the data (we require 0.1 %): the
#   rest is in the data, an excess of $\underline a$ that halves with $\varepsilon$;
# * the model is linear: its tangent is the same at every point, and one Newton step solves;
# * the closure's solution is within 0.08 % / 0.17 % of the $A_\text{hom}$ one (we require
#   0.5 %); its error is 1.26 / 1.14 times that of $A_\text{hom}$ (we require 1.5), and the
#   ā-only error 48 / 14 times the closure's (we require 10).

assert num_samples == len(TRAINING_LOADINGS) and num_points == coarse_cells**2
assert tensor_error < 1e-2, f"learned tensor off by {tensor_error:.2e}"
assert fit_gap < 1e-3, f"the fit is {fit_gap:.2e} from the least-squares optimum"
assert tangent_spread < 1e-10
assert newton_iterations == 1
assert closure_vs_hom < 5e-3, f"closure and A_hom solutions differ by {closure_vs_hom:.2e}"
assert errors["closure"] < 1.5 * errors["A_hom"]
assert errors["ā only"] > 10 * errors["closure"]
