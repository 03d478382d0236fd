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
#   microstructure: filter the fine gradient and flux to the coarse mesh with a
#   {py:class}`dolfinx_mno.data.ClosureSampler`, write them with
#   {py:class}`dolfinx_mno.data.ClosureDataWriter` and read them back with
#   {py:class}`dolfinx_mno.data.ClosureDataReader`,
# - filter with exact coarse-cell averages, {py:class}`dolfinx_mno.data.CellAverage`,
#   a {py:class}`dolfinx_mno.data.Restriction` the sampler accepts,
# - fit a *vector* closure (a flux) with {py:func}`dolfinx_mno.training.fit`, save it with
#   {py:func}`dolfinx_mno.io.save_model` and build the {py:class}`dolfinx_mno.Closure` from
#   the file,
# - couple the closure implicitly: {py:class}`dolfinx_mno.petsc.NonlinearProblem` with the
#   Jacobian built from the closure tangent $\partial q / \partial \nabla \bar u$,
# - check the learned closure against homogenisation theory, compare accuracy and cost with
#   coarse solves without closure and with solves that resolve the microstructure, and use
#   the same closure on another domain (a plate with holes, unstructured triangles),
# - mesh that plate with gmsh so that the fine mesh conforms to the microstructure: cut it
#   along every phase interface (`gmsh.model.occ.fragment` with lines),
# - do the same, on both domains, for a second microstructure, a checkerboard, whose
#   effective tensor $\sqrt{b_1 b_2}\, I$ is known exactly, and separate the closure's error
#   from the fine discretisation's.
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
# We solve the **steady** problem. The transient one, $u_t = \nabla\cdot(a\nabla u) + f$,
# has the same closure (the flux closure below is instantaneous); {doc}`the transient
# demo <demo_transient_diffusion>` learns it from fine trajectories and couples it
# implicitly in time.
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
# The period cell is symmetric, so the first-order corrector of homogenisation has zero
# mean, and it vanishes at $x_1 = 0$ and $1$, where the periods start and end: averages of
# the fine solution then differ from the homogenised solution only by higher-order terms
# and thin boundary layers (where the boundary data vary along $x_1$), which makes the
# comparisons below sharp.
#
# **Homogenisation.** As $\varepsilon \to 0$, $u$ tends to the solution of the same
# problem with the constant tensor (for stripes varying in $x_1$)
#
# $$
#   A_\text{hom} = \begin{pmatrix} \underline a & 0 \\ 0 & \bar a \end{pmatrix},
#   \qquad \underline a = \left( \tfrac12 a_1^{-1} + \tfrac12 a_2^{-1} \right)^{-1}
#   = 1.818\ldots, \quad \bar a = \tfrac12 (a_1 + a_2) = 5.5 .
# $$
#
# Across the stripes the flux $a\, \partial_1 u$ is continuous, so the resistances add up
# (harmonic mean); along them the gradient $\partial_2 u$ is continuous, so the
# conductivities add up (arithmetic mean).
#
# **The coarse model.** A coarse mesh of size $h \gg \varepsilon$ cannot see the stripes. A
# naive coarse model uses the mean conductivity $\bar a$, which is right along the
# stripes and wrong across them (by a factor 3 here). We keep $\bar a$ as the known
# physics and learn the rest of the *filtered flux* as a closure $q_\theta(\nabla \bar u)$:
# find $\bar u \in V_h$, $\bar u = g$ on $\partial\Omega$, such that
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
#   \text{target} = R(a \nabla u_f) - \bar a\, R(\nabla u_f) .
# $$
#
# This is the commutator of filtering and the coarse flux law, the closure target of the
# multiscale neural operator (Lütjens et al. 2022,
# [arXiv:2207.11417](https://arxiv.org/abs/2207.11417)). Homogenisation predicts
# $q(\nabla \bar u) = (A_\text{hom} - \bar a I) \nabla \bar u$, a linear map, so we fit a
# linear model and read the learned effective tensor
# $\bar a I + \partial q_\theta / \partial \nabla \bar u$ off the closure tangent.
#
# ## Imports

# +
import argparse
import json
import time
from pathlib import Path

from mpi4py import MPI

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import ufl
from dolfinx import fem, geometry, io, mesh
from dolfinx.fem.petsc import LinearProblem as DolfinxLinearProblem
from dolfinx.io import gmsh as gmshio
from microstructure import PLATE_HOLES, microstructure_mesh

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
from dolfinx_mno.petsc import LinearProblem, NonlinearProblem
from dolfinx_mno.training import fit, shard

matplotlib.use("Agg")  # write files, no display needed
# -

# ## Settings
#
# The full run uses $\varepsilon = 1/64$, a $16 \times 16$ coarse mesh ($h = 4\varepsilon$)
# and a fine mesh with 8 cells per period ($512 \times 512$ cells). `--quick` uses
# $\varepsilon = 1/32$ and an $8 \times 8$ coarse mesh (again $h = 4\varepsilon$, so
# $256 \times 256$ fine cells). The unit-square meshes are quadrilateral and aligned with
# the stripes: each coarse cell holds exactly four periods, and no fine cell cuts a stripe.

# +
parser = argparse.ArgumentParser(description="Learned flux closure for multiscale diffusion.")
parser.add_argument("--quick", action="store_true", help="small problem for CI (seconds)")
parser.add_argument(
    "--cells-per-period", type=int, default=8, help="fine cells per period, a multiple of 4"
)
args = parser.parse_args()
if args.cells_per_period % 4:
    parser.error("--cells-per-period must be a multiple of 4 (the stripes are quarter periods)")

comm = MPI.COMM_WORLD
torch.set_num_threads(1)  # a tiny model: the cores belong to the MPI ranks

a1, a2 = 1.0, 10.0
periods, coarse_cells = (32, 8) if args.quick else (64, 16)
epsilon = 1.0 / periods
fine_cells_per_period = args.cells_per_period
fine_cells = periods * fine_cells_per_period
a_mean = 0.5 * (a1 + a2)
a_harmonic = 1.0 / (0.5 / a1 + 0.5 / a2)
A_hom = np.diag([a_harmonic, a_mean])

quadrature_degree = 2  # the closure's rule on the coarse cells
direct_solver = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
repository = Path(__file__).resolve().parents[2]
output_dir = repository / "demos" / "output" / "multiscale_diffusion"
if comm.rank == 0:
    output_dir.mkdir(parents=True, exist_ok=True)
comm.Barrier()
data_path = output_dir / "closure_data.h5"
model_path = output_dir / "flux_closure.pt"


def conductivity(x):
    """The laminate a(x / ε) at points x, shape (3, num_points)."""
    phase = np.mod(x[0] / epsilon, 1.0)
    return np.where((phase >= 0.25) & (phase < 0.75), a2, a1)


# -

# ## A plain solver
#
# Every solve without a closure goes through one ordinary DOLFINx function: Lagrange
# elements of degree 1, $u = g$ on the whole boundary, a direct solver (MUMPS). Its
# `conductivity_of(msh)` returns a UFL coefficient: a constant scalar, a constant tensor,
# or a piecewise-constant function that resolves the stripes. The solve time excludes the
# set-up (form compilation): it is the slowest rank's time of `problem.solve()`
# (assembly, factorisation, solve), the best of `repeats` solves.


# +
def unit_square(n):
    """The unit square as n x n quadrilaterals."""
    return mesh.create_unit_square(comm, n, n, mesh.CellType.quadrilateral)


def boundary_dofs(V):
    """Degrees of freedom of V on the whole boundary."""
    msh = V.mesh
    msh.topology.create_connectivity(msh.topology.dim - 1, msh.topology.dim)
    facets = mesh.exterior_facet_indices(msh.topology)
    return fem.locate_dofs_topological(V, msh.topology.dim - 1, facets)


def timed(solve, repeats):
    """Best, over `repeats` calls, of the slowest rank's wall time of `solve()`."""
    best = np.inf
    for _ in range(repeats):
        comm.Barrier()
        tic = time.perf_counter()
        solve()
        best = min(best, comm.allreduce(time.perf_counter() - tic, op=MPI.MAX))
    return best


def resolved_conductivity(msh, law=conductivity, name="a"):
    """The law a(x / ε), piecewise constant on a mesh whose cells do not cut the phases."""
    a = fem.Function(fem.functionspace(msh, ("DG", 0)), name=name)
    a.interpolate(law)  # DG0: the value at the cell midpoint
    return a


def solve_plain(V, conductivity_of, loading, name, repeats=1):
    """Solve -div(A grad u) = f, u = g in V; returns (u, seconds, number of dofs)."""
    msh = V.mesh
    u_h = fem.Function(V, name=name)
    f, g = loading(ufl.SpatialCoordinate(msh))
    g_h = fem.Function(V)
    g_h.interpolate(fem.Expression(g, V.element.interpolation_points))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    problem = DolfinxLinearProblem(
        ufl.inner(conductivity_of(msh) * ufl.grad(u), ufl.grad(v)) * ufl.dx,
        f * v * ufl.dx,
        bcs=[fem.dirichletbc(g_h, boundary_dofs(V))],
        u=u_h,
        petsc_options_prefix=f"{name}_",
        petsc_options=direct_solver,
    )
    seconds = timed(problem.solve, repeats)
    return u_h, seconds, V.dofmap.index_map.size_global


# -

# ## Step 1: fine simulations and training data
#
# Six loadings, chosen so that the filtered gradients point in all directions and vary in
# size: a uniform source, three linear or bilinear boundary data, an oscillating source and
# a Gaussian source. The comparisons in Steps 4 and 5 use a seventh loading that is not
# among them.


# +
def zero(x):
    return 0.0 * x[0]


training_loadings = {
    "f = 1": (lambda x: 1.0 + 0.0 * x[0], zero),
    "g = x1": (zero, lambda x: x[0]),
    "g = x2": (zero, lambda x: x[1]),
    "g = x1 x2": (zero, lambda x: x[0] * x[1]),
    "f = 20 sin(2 pi x1) sin(pi x2)": (
        lambda x: 20.0 * np.sin(2 * np.pi * x[0]) * np.sin(np.pi * x[1]),
        zero,
    ),
    "f = Gaussian at (0.3, 0.6)": (
        lambda x: 100.0 * np.exp(-40.0 * ((x[0] - 0.3) ** 2 + (x[1] - 0.6) ** 2)),
        zero,
    ),
}
# -

# The fine problem has the same matrix for every loading (only $f$ and $g$ change), so one
# {py:class}`dolfinx_mno.petsc.LinearProblem` with `reuse_matrix=True` factorises it once
# and then only assembles right-hand sides. ($f$ and $g$ are interpolated into the fine
# space; the training data need consistent fine solutions, not a particular $f$.)

# +
fine = unit_square(fine_cells)
coarse = unit_square(coarse_cells)
a_fine = resolved_conductivity(fine)
V_fine = fem.functionspace(fine, ("Lagrange", 1))
W_coarse = fem.functionspace(coarse, ("DG", 0, (2,)))
# -

# **The filter.** The fine fields are piecewise constant on the fine cells: we interpolate
# $\nabla u_f$ and $a \nabla u_f$ into the fine DG$_0$ vector space, which takes their
# values at the cell midpoints; on a rectangle that is the exact cell mean of the gradient
# of a bilinear function. We filter them with the *exact* average over each coarse cell,
#
# $$
#   (R w)_K = \frac{1}{|K|} \int_K w \,\mathrm{d}x
#   = \frac{1}{|K|} \sum_{k \subset K} |k|\, w_k ,
# $$
#
# summed over the fine cells $k$ inside the coarse cell $K$: the package's
# {py:class}`~dolfinx_mno.data.CellAverage`. It needs nested meshes (it checks that they
# are) and is exact for fields that jump many times within a coarse cell, the very fields a
# closure is about; {py:class}`~dolfinx_mno.data.L2Projection` (by default) evaluates the fine
# field at the points of a quadrature rule on the coarse cells, which aliases such a field.
# It works under MPI with independently partitioned meshes, and, as every
# {py:class}`~dolfinx_mno.data.Restriction`, plugs into the sampler.

# **The sampler.** {py:class}`~dolfinx_mno.data.ClosureSampler` computes
# `R(fine tendency) - coarse tendency(R(fine state))` at the coarse quadrature points. Read
# "state" as the gradient and "tendency" as the flux law: the fine state is $\nabla u_f$, the
# fine tendency is the flux $a \nabla u_f$, the coarse state is the filtered gradient
# $\bar g = R(\nabla u_f)$ (a coarse DG$_0$ vector) and the coarse tendency is the known
# coarse flux $\bar a \bar g$. The closure's input is $\bar g$ itself. Both fields are
# constant on a coarse cell, so one point per cell (degree 0) carries all the information.
#
# **The data.** One fine solve per training loading, then the gradient and the flux are
# filtered and one sample is appended to the HDF5 file. The writer gathers each sample on
# rank 0 in global cell order, so the file does not depend on the number of ranks. The
# reader is serial: rank 0 reads and broadcasts, and
# {py:func}`~dolfinx_mno.training.shard` later gives each rank a contiguous block of the
# rows, which is what `fit` expects of its per-rank samples. The checkerboard below uses
# the same function with its own fine mesh, conductivity and element.


# +
def training_data(fine_mesh, conductivity, degree, gradient_degree, mean, path, attributes):
    """Fine solves of the training loadings, filtered into closure samples in `path`.

    Args:
        fine_mesh: The fine mesh, nested in `coarse`.
        conductivity: The resolved conductivity on `fine_mesh`.
        degree: Lagrange degree of the fine solution.
        gradient_degree: Degree of the discontinuous space the fine gradient and flux are
            interpolated into before filtering.
        mean: The coarse model's mean conductivity (the known coarse flux is mean * ḡ).
        path: The HDF5 file.
        attributes: Metadata for the file.

    Returns:
        Inputs ḡ and targets q on every rank, the fine solve times and the data sizes.
    """
    V = fem.functionspace(fine_mesh, ("Lagrange", degree))
    u_f, f_f, g_f = (fem.Function(V, name=n) for n in ("u_fine", "f", "g"))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    problem = LinearProblem(
        ufl.inner(conductivity * ufl.grad(u), ufl.grad(v)) * ufl.dx,
        f_f * v * ufl.dx,
        bcs=[fem.dirichletbc(g_f, boundary_dofs(V))],
        u=u_f,
        petsc_options_prefix=f"fine_{degree}_{gradient_degree}_",
        petsc_options=direct_solver,
        reuse_matrix=True,
    )
    W_fine = fem.functionspace(fine_mesh, ("DG", gradient_degree, (2,)))
    gradient, flux = fem.Function(W_fine), fem.Function(W_fine)
    expressions = [
        fem.Expression(e, W_fine.element.interpolation_points)
        for e in (ufl.grad(u_f), conductivity * ufl.grad(u_f))
    ]
    filtered_gradient = fem.Function(W_coarse, name="filtered_gradient")
    sampler = ClosureSampler(
        CellAverage(W_coarse, fine_mesh),  # R: exact coarse-cell means
        filtered_gradient,  # ḡ = R(grad u_f), overwritten by each sample
        [filtered_gradient],  # the input ḡ
        mean * filtered_gradient,  # the known coarse flux
        quadrature_degree=0,
    )
    seconds = []
    with ClosureDataWriter.from_sampler(
        path, sampler, fine_mesh=fine_mesh, attributes=attributes, mode="w"
    ) as writer:
        for f_source, g_boundary in training_loadings.values():
            f_f.interpolate(f_source)
            g_f.interpolate(g_boundary)
            seconds.append(timed(problem.solve, 1))
            gradient.interpolate(expressions[0])
            flux.interpolate(expressions[1])
            writer.append(sampler.sample(gradient, fine_tendency=flux))
    if comm.rank == 0:
        with ClosureDataReader(path) as data:
            read = data.inputs(), data.targets()  # (S * P, 2), (S * P, 2)
            sizes = {"num_samples": data.num_samples, "num_points": data.num_points}
    else:
        read = sizes = None
    (inputs, targets), sizes = comm.bcast((read, sizes), root=0)
    return inputs, targets, seconds, sizes


inputs, targets, fine_seconds, data_info = training_data(
    fine,
    a_fine,
    degree=1,
    gradient_degree=0,  # midpoint values: the cell means of a bilinear function's gradient
    mean=a_mean,
    path=data_path,
    attributes={
        "problem": "-div(a(x/eps) grad u) = f, laminate",
        "epsilon": epsilon,
        "conductivities": [a1, a2],
        "loadings": list(training_loadings),
    },
)
# -

# ## Step 2: fit and save the closure model
#
# The target is linear in the input, so the model is a single linear layer,
# `MLP(2, 2, hidden_features=[])`. We scale inputs and targets ourselves, with one scale
# each for both components and no shift, instead of `fit`'s default per-component
# standardisation: the second target component is zero in theory ($\bar a$ is exact along
# the stripes), and standardising it would blow its noise up to order one and let it
# dominate the loss. So we fit the layer to scaled data (`normalize=False`) and wrap the
# result in a {py:class}`~dolfinx_mno.NormalizedModel` with the same fixed scales, which
# the model file stores with the weights: the closure takes and returns physical values.
# The model's offset $q_\theta(0)$ (the layer's bias) is a constant flux, which has no
# effect with Dirichlet conditions ($\int_\Omega c \cdot \nabla v = 0$ for
# $v \in V_{h,0}$); we report it anyway. Training is seeded and data-parallel; its result
# does not depend on the number of ranks.


# +
def fit_flux_closure(inputs, targets, path, metadata):
    """Fit a linear layer to the scaled samples and save it with its scales to `path`.

    Returns the fit result (its model works on scaled values) and the fit time.
    """
    input_scale = np.sqrt(np.mean(inputs**2))
    target_scale = np.sqrt(np.mean(targets**2))
    tic = time.perf_counter()
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
    seconds = comm.allreduce(time.perf_counter() - tic, op=MPI.MAX)
    model = mno.NormalizedModel(
        result.model,
        mno.AffineNormalization(shift=0.0, scale=input_scale, width=2),
        mno.AffineNormalization(shift=0.0, scale=target_scale, width=2),
    )
    save_model(path, model, metadata=metadata, comm=comm)
    return result, seconds


result, fit_seconds = fit_flux_closure(
    inputs,
    targets,
    model_path,
    metadata={
        "operands": ["grad(u)"],
        "value_shape": [2],
        "quadrature_degree": quadrature_degree,
        "closure": "filtered flux minus a_mean * filtered gradient",
    },
)
# -

# ## Step 3: the coarse model with the learned closure
#
# The closure is built from the model file, with the operand $\nabla \bar u$ at the points
# of the degree-2 rule. `NonlinearProblem` builds the Jacobian with
# {py:func}`dolfinx_mno.derivative`, which includes the closure tangent, and re-evaluates
# values and tangents at every Newton iterate. The closure is linear, so Newton converges
# in one iteration. The function below works on any mesh: Step 5 uses it on the plate.
# All coarse runs on a mesh share one space, $V_h$ ($Q_1$ on the coarse unit square).


def solve_closure(V, loading, name, repeats=1, model=model_path, mean=a_mean):
    """The coarse model ā + learned closure in V; returns (u, seconds, iterations, closure)."""
    u_h = fem.Function(V, name=name)
    f, g = loading(ufl.SpatialCoordinate(V.mesh))
    g_h = fem.Function(V)
    g_h.interpolate(fem.Expression(g, V.element.interpolation_points))
    v = ufl.TestFunction(V)
    closure = mno.Closure(
        model, [ufl.grad(u_h)], value_shape=(2,), quadrature_degree=quadrature_degree
    )
    F = (
        ufl.inner(mean * ufl.grad(u_h), ufl.grad(v)) * ufl.dx
        + ufl.inner(closure, ufl.grad(v)) * closure.dx
        - f * v * ufl.dx
    )
    problem = NonlinearProblem(
        F,
        u_h,
        bcs=[fem.dirichletbc(g_h, boundary_dofs(V))],
        petsc_options_prefix=f"{name}_",
        petsc_options={"snes_rtol": 1e-10, "snes_atol": 1e-12, **direct_solver},
    )

    def solve():
        u_h.x.array[:] = 0.0  # the same initial guess for every timed repeat
        problem.solve()
        if problem.solver.getConvergedReason() <= 0:
            raise RuntimeError(f"Newton did not converge ({name})")

    seconds = timed(solve, repeats)
    return u_h, seconds, problem.solver.getIterationNumber(), closure


# The test loading, used for every comparison from here on, is a Gaussian source with
# bilinear boundary data:


def test_loading(x):
    """(f, g) as UFL expressions of the spatial coordinate x."""
    f = 50.0 * ufl.exp(-30.0 * ((x[0] - 0.65) ** 2 + (x[1] - 0.35) ** 2))
    g = 0.5 * x[0] * (1.0 - x[1])
    return f, g


V_coarse = fem.functionspace(coarse, ("Lagrange", 1))
u_closure, closure_seconds, newton_iterations, closure = solve_closure(
    V_coarse, test_loading, "u_closure", repeats=5
)
# Time of one closure update (operands, model with tangent, write, scatter): the last one.
closure_update_seconds = closure.timings["total"]

# **The learned effective tensor.** After the solve, `closure.tangent` holds
# $\partial q_\theta / \partial \nabla \bar u$ at every quadrature point, value shape
# `(2, 2)`: the Jacobian Newton used. For a linear model it is the same at all points;
# {py:meth}`~dolfinx_mno.Closure.mean_tangent` averages it over all points of all ranks,
# and we record its spread (over each rank's points, ghosts included).

# +
tangent_mean = closure.mean_tangent()  # (2, 2)
tangents = closure.tangent.x.array.reshape(-1, 2, 2)
tangent_spread = comm.allreduce(float(np.max(np.abs(tangents - tangent_mean))), op=MPI.MAX)
A_learned = a_mean * np.eye(2) + tangent_mean
tensor_error = np.linalg.norm(A_learned - A_hom) / np.linalg.norm(A_hom)
with torch.no_grad():
    offset = closure.model(torch.zeros(1, 2, dtype=torch.float64)).numpy().reshape(2)
# The best linear fit to the data, for comparison: how far did `fit` get?
A_least_squares = a_mean * np.eye(2) + np.linalg.lstsq(inputs, targets, rcond=None)[0].T
fit_gap = np.linalg.norm(A_learned - A_least_squares) / np.linalg.norm(A_hom)
# -

# ## Step 4: compare with the fine solution and with coarse models without closure
#
# The reference is the fine solution for the test loading, filtered to the coarse space
# $V_h$ ($Q_1$ on the coarse mesh) by the package's
# {py:class}`~dolfinx_mno.data.L2Projection`. Here it fits: $u_f$ is continuous and its
# oscillation is small ($O(\varepsilon)$). We raise the projection's quadrature degree to
# 10 (36 points per coarse cell); degrees 4, 10 and 20 give errors within $10^{-4}$ of each
# other. Every other solution is brought to $V_h$ by the same projection (the identity for
# solutions in $V_h$), and its error is
#
# $$
#   e(u) = \frac{\| P u - P u_f \|_{L^2(\Omega)}}{\| P u_f \|_{L^2(\Omega)}} .
# $$
#
# The runs:
#
# * **fine**: the reference itself;
# * **ā only**: the coarse model without closure, on the coarse mesh and on two refinements
#   of it. It converges, but to the solution of the wrong equation;
# * **A_hom**: the coarse model with the exact homogenised tensor, the best that any local
#   closure can do on this mesh;
# * **closure**: the coarse model with the learned closure (above);
# * **resolved**: the true $a(x/\varepsilon)$ on a mesh with 4 cells per period, the
#   coarsest mesh whose cells do not cut the stripes (the stripes are a quarter and a half
#   period wide). A mesh whose cells contain several stripes either averages them in its
#   quadrature, which is the ā-only model, or samples them, which aliases; and a mesh that
#   cuts the stripes converges slowly (on the unit square, with the midpoint value of $a$
#   on triangles of 5 and 10 cells per period: errors of 6 % and 2 %). So this is the
#   cheapest solve without closure that can reach the closure's accuracy.

# +
u_reference, reference_seconds, fine_dofs = solve_plain(
    V_fine, resolved_conductivity, test_loading, "u_fine"
)
projection = L2Projection(V_coarse, quadrature_degree=10)


def l2_norm(values, V):
    w = fem.Function(V)
    w.x.array[:] = values
    return np.sqrt(comm.allreduce(fem.assemble_scalar(fem.form(w**2 * ufl.dx)), op=MPI.SUM))


def relative_errors(solutions, reference, projection):
    """e(u) of each solution against the projected reference, on projection.space."""
    P_reference = projection(reference)
    V = projection.space
    norm = l2_norm(P_reference.x.array, V)
    errors = {}
    for name, u_h in solutions.items():
        P_u = u_h if u_h.function_space is V else projection(u_h)
        errors[name] = l2_norm(P_u.x.array - P_reference.x.array, V) / norm
    return errors, P_reference


def mean_only(msh):
    return fem.Constant(msh, a_mean)


def homogenised(msh):
    return fem.Constant(msh, A_hom)


runs = {"fine (reference)": dict(mesh=fine_cells, dofs=fine_dofs, seconds=reference_seconds)}
solutions = {}
for label, conductivity_of in (("ā only", mean_only), ("A_hom", homogenised)):
    name = "u_mean_only" if label == "ā only" else "u_hom"
    solutions[label], seconds, dofs = solve_plain(V_coarse, conductivity_of, test_loading, name, 5)
    runs[label] = dict(mesh=coarse_cells, dofs=dofs, seconds=seconds)
solutions["closure"] = u_closure
runs["closure"] = dict(
    mesh=coarse_cells, dofs=V_coarse.dofmap.index_map.size_global, seconds=closure_seconds
)
for n in (2 * coarse_cells, 4 * coarse_cells):
    label = f"ā only, {n}x{n}"
    V = fem.functionspace(unit_square(n), ("Lagrange", 1))
    solutions[label], seconds, dofs = solve_plain(V, mean_only, test_loading, "m", 3)
    runs[label] = dict(mesh=n, dofs=dofs, seconds=seconds)
if 4 < fine_cells_per_period:
    n = 4 * periods
    label = f"resolved, {n}x{n}"
    V = fem.functionspace(unit_square(n), ("Lagrange", 1))
    solutions[label], seconds, dofs = solve_plain(V, resolved_conductivity, test_loading, "r", 3)
    runs[label] = dict(mesh=n, dofs=dofs, seconds=seconds)

errors, u_filtered = relative_errors(solutions, u_reference, projection)
u_filtered.name = "u_fine_filtered"
runs["fine (reference)"]["error"] = 0.0
for name, error in errors.items():
    runs[name]["error"] = error
closure_error = errors["closure"]
closure_vs_hom = l2_norm(u_closure.x.array - solutions["A_hom"].x.array, V_coarse) / l2_norm(
    solutions["A_hom"].x.array, V_coarse
)
# -

# Which solve without closure matches the closure's error at the least cost? The ā-only
# runs never do: their error is that of the wrong equation. The candidate is the resolved
# run (or, failing that, the fine reference).

resolved = [name for name in runs if name.startswith("resolved")]
matching = [name for name in resolved if runs[name]["error"] <= closure_error]
match = matching[0] if matching else "fine (reference)"

# ## Step 5: the same closure on another domain
#
# The closure is a local constitutive law, $q_\theta(\nabla \bar u)$: nothing in it refers
# to the unit square or to its mesh. We use it unchanged on a plate with two holes,
# meshed with unstructured triangles of size $h = 1/40$ (`meshes/plate_with_holes.msh`,
# made by `meshes/make_meshes.py`), with $u = g$ on the outer boundary and on the holes,
# and the same test loading. The coarse runs are ā only, $A_\text{hom}$ and the closure.
#
# The reference is a fine solution on a triangle mesh of the plate that *conforms to the
# stripes*, made by `microstructure_mesh` (in {download}`microstructure.py`, next to this
# demo; the transient demo uses it too): gmsh's OpenCASCADE kernel cuts the plate with a
# line along every stripe interface (`fragment`), so that each piece lies in one phase, and
# meshes the pieces with cells of size $\varepsilon/8$ (as many per period as the unit
# square's fine mesh; $\varepsilon/4$ with `--quick`). On such a mesh the value of $a$ at
# each cell midpoint is exact, as on the unit square. (On a mesh that cuts the stripes, $a$
# from the cell midpoints converges slowly: on the unit square, triangles with 5 and 10
# cells per period gave errors of 6 % and 2 %.) Step 7 meshes the plate for the
# checkerboard with the same function, cut in both directions. The hole geometry,
# `PLATE_HOLES`, must be the one of `meshes/make_meshes.py`. The fine mesh's holes are
# rounder than the coarse mesh's polygons, so a few coarse quadrature points near the holes
# lie outside the fine mesh, by at most the polygons' sagitta
# ($h^2 / 8r \approx 7 \cdot 10^{-4}$); the projection takes their values from the nearest
# fine cell (`padding=2e-3`).

# +
plate_path = repository / "meshes" / "plate_with_holes.msh"
plate = gmshio.read_from_msh(plate_path, comm, 0, gdim=2).mesh

plate_cells_per_period = 4 if args.quick else fine_cells_per_period
tic = time.perf_counter()
fine_plate = microstructure_mesh(
    comm, 1.0, PLATE_HOLES, epsilon, epsilon / plate_cells_per_period, directions=(0,)
)
plate_mesh_seconds = comm.allreduce(time.perf_counter() - tic, op=MPI.MAX)
a_plate = resolved_conductivity(fine_plate)
u_plate_reference, plate_reference_seconds, plate_fine_dofs = solve_plain(
    fem.functionspace(fine_plate, ("Lagrange", 1)), lambda msh: a_plate, test_loading, "u_fine"
)
V_plate = fem.functionspace(plate, ("Lagrange", 1))
plate_projection = L2Projection(V_plate, quadrature_degree=10, padding=2e-3)
# -

# The coarse runs on a space against a fine reference, and their errors, are the same on
# every domain and for both microstructures: one function does them (Steps 5–7).


# +
def coarse_runs(V, reference, projection, plain, model, mean, name):
    """Coarse runs on V without closure (`plain`) and with the closure in `model`.

    Args:
        V: The coarse space.
        reference: The fine run, (solution, seconds, dofs).
        projection: The L² projection onto V of the errors.
        plain: {label: (function name, conductivity_of)} for `solve_plain`; must hold
            "A_hom".
        model, mean: The closure's model file and the known mean conductivity.
        name: Name of the closure solution.

    Returns:
        runs {label: dofs, seconds, error}, solutions {label: function}, the filtered
        reference, Newton's iterations, the closure, and the relative L² distance between
        the closure's and the A_hom solutions.
    """
    u_reference, seconds, dofs = reference
    runs = {"fine (reference)": dict(dofs=dofs, seconds=seconds, error=0.0)}
    solutions = {}
    for label, (function_name, conductivity_of) in plain.items():
        solutions[label], seconds, dofs = solve_plain(
            V, conductivity_of, test_loading, function_name, 5
        )
        runs[label] = dict(dofs=dofs, seconds=seconds)
    solutions["closure"], seconds, iterations, closure = solve_closure(
        V, test_loading, name, 5, model, mean
    )
    runs["closure"] = dict(dofs=runs["A_hom"]["dofs"], seconds=seconds)
    errors, filtered = relative_errors(solutions, u_reference, projection)
    filtered.name = "u_fine_filtered"
    for label, error in errors.items():
        runs[label]["error"] = error
    hom = solutions["A_hom"].x.array
    closure_vs_hom = l2_norm(solutions["closure"].x.array - hom, V) / l2_norm(hom, V)
    return runs, solutions, filtered, iterations, closure, closure_vs_hom


(
    plate_runs,
    plate_solutions,
    u_plate_filtered,
    plate_newton_iterations,
    _,
    plate_closure_vs_hom,
) = coarse_runs(
    V_plate,
    (u_plate_reference, plate_reference_seconds, plate_fine_dofs),
    plate_projection,
    {"ā only": ("u_mean_only", mean_only), "A_hom": ("u_hom", homogenised)},
    model_path,
    a_mean,
    "u_closure",
)
# -

# ## Step 6: a checkerboard
#
# The second microstructure is a **checkerboard** of the same period $\varepsilon$: squares
# of side $\varepsilon/2$, conductivity $b_2$ where exactly one of the two phases
# $y_i - \lfloor y_i \rfloor$ lies in $[\tfrac14, \tfrac34)$, $b_1$ elsewhere (the period
# cell is symmetric about its midlines, like the laminate's). In two dimensions its
# homogenised tensor is known in closed form (Keller 1964, Dykhne 1971):
#
# $$
#   A_\text{hom} = \sqrt{b_1 b_2}\, I .
# $$
#
# **Contrast and fine discretisation.** At the corners where four squares meet, the fine
# solution has a singularity $r^\alpha$ whose exponent falls with the contrast, and the
# discrete effective conductivity converges slowly. We measured it on the period cell
# (potential difference across two faces, no flux through the others: by symmetry the
# periodic cell problem), relative excess over $\sqrt{b_1 b_2}$ at 4, 8, 16, 32 cells per
# period:
#
# | contrast | $Q_1$ | $Q_2$ |
# |:--|:--|:--|
# | 2 | 1.6 %, 0.57 %, 0.20 %, 0.07 % | 0.23 %, 0.08 %, 0.02 %, 0.01 % |
# | 3 | 4.6 %, 1.8 %, 0.71 %, 0.28 % | 0.90 %, 0.35 %, 0.14 %, 0.05 % |
# | 5 | 12 %, 5.3 %, 2.5 %, 1.2 % | 3.2 %, 1.5 %, 0.71 %, 0.34 % |
# | 10 | 30 %, 16 %, 8.9 %, 5.1 % | 11 %, 6.4 %, 3.7 %, 2.1 % |
#
# At contrast 10 even $Q_2$ with 32 cells per period ($2048^2$ cells at
# $\varepsilon = 1/64$) is 2 % off. We take **contrast 3** ($b_1 = 1$, $b_2 = 3$,
# $\sqrt 3 = 1.732$ against $\bar b = 2$, so $\bar b$ alone is 15 % off) and fine $Q_2$
# elements with 4 cells per period: $256^2$ cells, 263,169 unknowns, as many as the
# laminate's fine $Q_1$ mesh, and a discrete effective conductivity 0.90 % above
# $\sqrt 3$, which the demo recomputes below. The rest is the laminate's pipeline: six
# fine solves, filtered gradient and flux, a linear flux closure, the same coarse mesh and
# test loading. The fine gradient of a $Q_2$ function is not constant per fine cell; on
# these rectangles it lies in discontinuous $Q_2$, so we interpolate it (and the flux)
# into that space exactly, and `CellAverage` integrates it exactly.

# +
b1, b2 = 1.0, 3.0
b_mean = 0.5 * (b1 + b2)
B_hom = np.sqrt(b1 * b2) * np.eye(2)
checker_degree, checker_cells_per_period = 2, 4
checker_model_path = output_dir / "flux_closure_checkerboard.pt"


def checkerboard(x):
    """The checkerboard b(x / ε) at points x, shape (3, num_points)."""
    inside = [
        (np.mod(x[i] / epsilon, 1.0) >= 0.25) & (np.mod(x[i] / epsilon, 1.0) < 0.75) for i in (0, 1)
    ]
    return np.where(inside[0] ^ inside[1], b2, b1)


def cell_conductivity(cell, degree):
    """The discrete effective conductivity of a mesh of whole periods, [0, w]^2 (serial)."""
    width = cell.geometry.x[:, 0].max()
    b = resolved_conductivity(cell, checkerboard, "b")
    V = fem.functionspace(cell, ("Lagrange", degree))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    g = fem.Function(V)
    g.interpolate(lambda x: x[0] / width)  # unit mean gradient across the block
    faces = mesh.locate_entities_boundary(
        cell, 1, lambda x: np.isclose(x[0], 0.0) | np.isclose(x[0], width)
    )
    problem = DolfinxLinearProblem(
        ufl.inner(b * ufl.grad(u), ufl.grad(v)) * ufl.dx,
        fem.Constant(cell, 0.0) * v * ufl.dx,
        bcs=[fem.dirichletbc(g, fem.locate_dofs_topological(V, 1, faces))],
        petsc_options_prefix="cell_",
        petsc_options=direct_solver,
    )
    u_h = problem.solve()
    # The energy per unit area at unit mean gradient: w^-2 * ∫ b |∇u|² dx * w^2.
    return fem.assemble_scalar(fem.form(b * ufl.inner(ufl.grad(u_h), ufl.grad(u_h)) * ufl.dx))


period_cell = mesh.create_rectangle(
    MPI.COMM_SELF,
    [[0.0, 0.0], [epsilon, epsilon]],
    [checker_cells_per_period, checker_cells_per_period],
    mesh.CellType.quadrilateral,
)
B_discrete = cell_conductivity(period_cell, checker_degree)
discretisation_error = B_discrete / np.sqrt(b1 * b2) - 1.0

tic = time.perf_counter()
checker_fine_cells = periods * checker_cells_per_period
fine_checker = unit_square(checker_fine_cells)
b_fine = resolved_conductivity(fine_checker, checkerboard, "b")
V_checker = fem.functionspace(fine_checker, ("Lagrange", checker_degree))
checker_inputs, checker_targets, checker_fine_seconds, _ = training_data(
    fine_checker,
    b_fine,
    degree=checker_degree,
    gradient_degree=checker_degree,
    mean=b_mean,
    path=output_dir / "closure_data_checkerboard.h5",
    attributes={"problem": "checkerboard", "epsilon": epsilon, "conductivities": [b1, b2]},
)
checker_data_seconds = comm.allreduce(time.perf_counter() - tic, op=MPI.MAX)
# -

# The fit is the laminate's: one linear layer, fixed scales, saved with its scales.

# +
checker_result, checker_fit_seconds = fit_flux_closure(
    checker_inputs,
    checker_targets,
    checker_model_path,
    metadata={"operands": ["grad(u)"], "value_shape": [2], "closure": "checkerboard flux"},
)
B_least_squares = (
    b_mean * np.eye(2) + np.linalg.lstsq(checker_inputs, checker_targets, rcond=None)[0].T
)
# -

# The coarse runs and the errors, as on the laminate: the reference is the fine solution
# for the test loading, projected onto the coarse $Q_1$ space.

# +
u_checker_reference, checker_reference_seconds, checker_fine_dofs = solve_plain(
    V_checker, lambda msh: b_fine, test_loading, "u_fine_checker"
)
checker_models = {  # label: (function name, conductivity)
    "b̄ only": ("u_mean_only", lambda msh: fem.Constant(msh, b_mean)),
    "A_hom": ("u_hom", lambda msh: fem.Constant(msh, B_hom)),
}
(
    checker_runs,
    checker_solutions,
    _,
    checker_newton_iterations,
    checker_closure,
    checker_closure_vs_hom,
) = coarse_runs(
    V_coarse,
    (u_checker_reference, checker_reference_seconds, checker_fine_dofs),
    projection,
    checker_models,
    checker_model_path,
    b_mean,
    "u_closure_checker",
)
B_learned = b_mean * np.eye(2) + checker_closure.mean_tangent()
checker_tensor_error = np.linalg.norm(B_learned - B_hom) / np.linalg.norm(B_hom)
# -

# ## Step 7: the checkerboard on the plate with holes
#
# The checkerboard's closure is a local law too, so it runs unchanged on the plate of
# Step 5: the same coarse mesh and space $V_h$, the same test loading and projection, and
# the coarse runs b̄ only, $A_\text{hom}$ and the learned closure.
#
# **The fine reference.** Its mesh must conform to the squares: `microstructure_mesh`
# cuts the plate along the interfaces in both directions, into the squares and the pieces
# of squares that the holes and the outer boundary leave (3,815 pieces at
# $\varepsilon = 1/32$, 14,875 at $1/64$), and meshes them with triangles. The
# conductivity is the value at each cell midpoint, as on the unit square. On triangles we
# take $P_2$ elements and choose the cell size from the discrete effective conductivity,
# computed as in Step 6 but on a block of $8 \times 8$ periods meshed by the same function
# (its faces are symmetry lines like the period cell's, and its squares are meshed like the
# plate's away from the holes). Relative excess over $\sqrt{b_1 b_2}$:
#
# | cell size | triangles per period | $P_1$ | $P_2$ |
# |:--|--:|--:|--:|
# | $\varepsilon/2$ | 18 | 14.9 % | 2.6 % |
# | $\varepsilon/4$ | 57 | 6.0 % | 1.18 % |
# | $\varepsilon/6$ | 105 | 3.8 % | 0.74 % |
# | $\varepsilon/8$ | 170 | 2.6 % | 0.50 % |
# | $\varepsilon/12$ | 365 | 1.5 % | 0.29 % |
#
# We take $P_2$ with cells of size $\varepsilon/4$ (two edges per side of a square),
# 1.18 % above $\sqrt 3$ (a single period cell, whose faces cut squares, gives 1.07 %), as
# close as the unit square's $Q_2$ (0.90 %): 203,869 triangles and 409,358 unknowns at
# $\varepsilon = 1/64$ (51,268 and 103,347 with `--quick`). The demo recomputes the
# block's value.

# +
checker_plate_cells_per_period = 4  # cell size ε/4
tic = time.perf_counter()
checker_plate = microstructure_mesh(
    comm, 1.0, PLATE_HOLES, epsilon, epsilon / checker_plate_cells_per_period, (0, 1)
)
checker_plate_mesh_seconds = comm.allreduce(time.perf_counter() - tic, op=MPI.MAX)
b_plate = resolved_conductivity(checker_plate, checkerboard, "b")
block = microstructure_mesh(
    MPI.COMM_SELF, 8 * epsilon, [], epsilon, epsilon / checker_plate_cells_per_period, (0, 1)
)  # 8 x 8 periods, on every rank
B_plate_discrete = cell_conductivity(block, checker_degree)
plate_discretisation_error = B_plate_discrete / np.sqrt(b1 * b2) - 1.0

u_checker_plate_reference, seconds, dofs = solve_plain(
    fem.functionspace(checker_plate, ("Lagrange", checker_degree)),
    lambda msh: b_plate,
    test_loading,
    "u_fine_checker_plate",
)
(
    checker_plate_runs,
    checker_plate_solutions,
    u_checker_plate_filtered,
    checker_plate_newton_iterations,
    _,
    checker_plate_closure_vs_hom,
) = coarse_runs(
    V_plate,
    (u_checker_plate_reference, seconds, dofs),
    plate_projection,
    checker_models,
    checker_model_path,
    b_mean,
    "u_closure",
)
# -

# ## Output: VTX files, plots and a JSON summary
#
# The laminate's coarse solutions of each domain go to one VTX file (open them in
# ParaView), and the checkerboard's on the plate to another; the laminate's fine
# unit-square solution and its conductivity to two more (a file holds one element).
# The plots need values at points: a small helper evaluates a function at given points on
# the rank that finds them and shares the values (`MPI.MAX` over ranks; points outside the
# mesh get $-\infty$).

# +
coarse_fields = [u_filtered, solutions["ā only"], solutions["A_hom"], u_closure]
with io.VTXWriter(comm, output_dir / "unit_square_coarse.bp", coarse_fields, "BP4") as vtx:
    vtx.write(0.0)
with io.VTXWriter(comm, output_dir / "unit_square_fine.bp", [u_reference], "BP4") as vtx:
    vtx.write(0.0)
with io.VTXWriter(comm, output_dir / "unit_square_conductivity.bp", [a_fine], "BP4") as vtx:
    vtx.write(0.0)  # DG0, one value per fine cell
plate_fields = [u_plate_filtered, *plate_solutions.values()]
with io.VTXWriter(comm, output_dir / "plate_coarse.bp", plate_fields, "BP4") as vtx:
    vtx.write(0.0)
checker_plate_fields = [u_checker_plate_filtered, *checker_plate_solutions.values()]
with io.VTXWriter(
    comm, output_dir / "plate_checkerboard_coarse.bp", checker_plate_fields, "BP4"
) as vtx:
    vtx.write(0.0)


def evaluate(u_h, points):
    """Values of the scalar function u_h at points (n, 3), on every rank (collective)."""
    msh = u_h.function_space.mesh
    tree = geometry.bb_tree(msh, msh.topology.dim)
    colliding = geometry.compute_colliding_cells(
        msh, geometry.compute_collisions_points(tree, points), points
    )
    found = np.flatnonzero(np.diff(colliding.offsets) > 0)
    values = np.full(len(points), -np.inf)
    if found.size:
        cells = colliding.array[colliding.offsets[found]]
        values[found] = u_h.eval(points[found], cells)[:, 0]
    comm.Allreduce(MPI.IN_PLACE, values, op=MPI.MAX)
    return values


line = np.zeros((401, 3))
line[:, 0] = np.linspace(0.0, 1.0, 401)
line[:, 1] = 0.35  # through the centre of the source
profiles = {
    "fine $u_f$": evaluate(u_reference, line),
    "filtered fine $P u_f$": evaluate(u_filtered, line),
    r"coarse, $\bar a$ only": evaluate(solutions["ā only"], line),
    r"coarse, $A_\mathrm{hom}$": evaluate(solutions["A_hom"], line),
    "coarse + learned closure": evaluate(u_closure, line),
}
pixels = 160
grid = np.zeros((pixels * pixels, 3))
grid[:, :2] = np.stack(
    np.meshgrid(*(2 * [(np.arange(pixels) + 0.5) / pixels]), indexing="xy"), axis=-1
).reshape(-1, 2)
plate_images = {  # per microstructure; masked outside the plate (the holes)
    microstructure: {
        name: np.ma.masked_invalid(evaluate(u_h, grid).reshape(pixels, pixels))
        for name, u_h in [("filtered", filtered), *solutions_.items()]
    }
    for microstructure, filtered, solutions_ in (
        ("laminate", u_plate_filtered, plate_solutions),
        ("checkerboard", u_checker_plate_filtered, checker_plate_solutions),
    )
}
# -

# Two figures on rank 0. The first: the training data with the exact closure
# $(\underline a - \bar a)\bar g_1$ and the learned one; the unit-square solutions along
# $x_2 = 0.35$; error against solve time. The second: the plate, one row per
# microstructure.

if comm.rank == 0:
    fig, (ax_data, ax_line, ax_cost) = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    g1 = np.linspace(inputs[:, 0].min(), inputs[:, 0].max(), 2)
    ax_data.plot(inputs[:, 0], targets[:, 0], "C0.", ms=3, alpha=0.5, label=r"data $q_1$")
    ax_data.plot(inputs[:, 1], targets[:, 1], "C2.", ms=3, alpha=0.5, label=r"data $q_2$")
    ax_data.plot(
        g1, (a_harmonic - a_mean) * g1, "k--", label=r"exact $(\underline{a} - \bar a)\,\bar g_1$"
    )
    ax_data.plot(g1, tangent_mean[0, 0] * g1 + offset[0], "C3-", lw=1, label=r"learned $q_1$")
    ax_data.set(
        xlabel=r"filtered gradient $\bar g_i$",
        ylabel=r"target $q_i = R(a \partial_i u_f) - \bar a \bar g_i$",
        title=f"Training data ({len(training_loadings)} fine solutions)",
    )
    ax_data.legend(fontsize=8)
    for (label, values), style in zip(
        profiles.items(), ["C7-", "k-", "C0--", "C2-", "C3:"], strict=True
    ):
        ax_line.plot(
            line[:, 0], values, style, lw=0.7 if label.startswith("fine") else 1.5, label=label
        )
    ax_line.set(xlabel="$x_1$", ylabel=r"$u(x_1, 0.35)$", title="Unit square, test loading")
    ax_line.legend(fontsize=8)
    for name, run in runs.items():
        if not name.startswith("fine"):
            marker = "o" if run["mesh"] == coarse_cells else "s"
            ax_cost.loglog(
                run["seconds"], run["error"], marker, label=f"{name} ({run['dofs']} dofs)"
            )
    ax_cost.axvline(reference_seconds, color="k", ls=":", label="fine solve (reference)")
    ax_cost.set(
        xlabel="solve time [s]",
        ylabel=r"$\|P u - P u_f\| / \|P u_f\|$",
        title="Error against the filtered fine solution",
    )
    ax_cost.legend(fontsize=7)
    fig.savefig(output_dir / "unit_square.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(2, 4, figsize=(16, 7.6), layout="constrained")
    for row, (microstructure, runs_, mean_label) in zip(
        axes,
        (
            ("laminate", plate_runs, ("ā only", r"$\bar a$")),
            ("checkerboard", checker_plate_runs, ("b̄ only", r"$\bar b$")),
        ),
        strict=True,
    ):
        images = plate_images[microstructure]
        panels = [
            (f"{microstructure}: filtered fine solution $P u_f$", images["filtered"], "viridis"),
            ("coarse + learned closure", images["closure"], "viridis"),
            (
                f"error, {mean_label[1]} only ({runs_[mean_label[0]]['error']:.1%})",
                np.abs(images[mean_label[0]] - images["filtered"]),
                "magma",
            ),
            (
                f"error, learned closure ({runs_['closure']['error']:.2%})",
                np.abs(images["closure"] - images["filtered"]),
                "magma",
            ),
        ]
        for ax, (title, image, cmap) in zip(row, panels, strict=True):
            shown = ax.imshow(image, origin="lower", extent=(0, 1, 0, 1), cmap=cmap)
            fig.colorbar(shown, ax=ax, shrink=0.8)
            ax.set(title=title, xticks=[], yticks=[])
    fig.savefig(output_dir / "plate.png", dpi=120)
    plt.close(fig)

# The JSON summary holds every number printed below, and the settings.

# +
summary = {
    "mode": "quick" if args.quick else "full",
    "ranks": comm.size,
    "epsilon": epsilon,
    "conductivities": [a1, a2],
    "coarse_mesh": coarse_cells,
    "fine_mesh": fine_cells,
    "A_hom": A_hom.tolist(),
    "A_learned": A_learned.tolist(),
    "tensor_relative_error": tensor_error,
    "A_least_squares": A_least_squares.tolist(),
    "fit_gap": fit_gap,
    "tangent_spread": tangent_spread,
    "closure_offset": offset.tolist(),
    "training": {
        **data_info,
        "loadings": list(training_loadings),
        "epochs": result.history.epochs,
        "best_epoch": result.history.best_epoch,
        "best_val_loss": result.history.best_val_loss,
        "fit_seconds": fit_seconds,
        "fine_solve_seconds": fine_seconds,
    },
    "unit_square": {
        "newton_iterations": newton_iterations,
        "closure_update_seconds": closure_update_seconds,
        "closure_vs_A_hom": closure_vs_hom,
        "runs": runs,
        "resolved_run_matching_closure": match,
    },
    "plate": {
        "coarse_cells": plate.topology.index_map(2).size_global,
        "fine_cells": fine_plate.topology.index_map(2).size_global,
        "fine_cells_per_period": plate_cells_per_period,
        "fine_mesh_seconds": plate_mesh_seconds,
        "newton_iterations": plate_newton_iterations,
        "closure_vs_A_hom": plate_closure_vs_hom,
        "runs": plate_runs,
    },
    "checkerboard": {
        "conductivities": [b1, b2],
        "fine_element": f"Q{checker_degree}",
        "fine_cells_per_period": checker_cells_per_period,
        "fine_mesh": checker_fine_cells,
        "A_hom": B_hom.tolist(),
        "A_learned": B_learned.tolist(),
        "tensor_relative_error": checker_tensor_error,
        "A_least_squares": B_least_squares.tolist(),
        "cell_problem_conductivity": B_discrete,
        "discretisation_error": discretisation_error,
        "training": {
            "epochs": checker_result.history.epochs,
            "best_val_loss": checker_result.history.best_val_loss,
            "fit_seconds": checker_fit_seconds,
            "fine_solve_seconds": checker_fine_seconds,
            "data_seconds": checker_data_seconds,
        },
        "newton_iterations": checker_newton_iterations,
        "closure_vs_A_hom": checker_closure_vs_hom,
        "runs": checker_runs,
        "plate": {
            "fine_element": f"P{checker_degree}",
            "fine_cell_size": epsilon / checker_plate_cells_per_period,
            "fine_cells": checker_plate.topology.index_map(2).size_global,
            "fine_mesh_seconds": checker_plate_mesh_seconds,
            "block_conductivity": B_plate_discrete,
            "discretisation_error": plate_discretisation_error,
            "newton_iterations": checker_plate_newton_iterations,
            "closure_vs_A_hom": checker_plate_closure_vs_hom,
            "runs": checker_plate_runs,
        },
    },
}
if comm.rank == 0:
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
# -

# Print on rank 0. Every number but the times is independent of the number of ranks.

if comm.rank == 0:
    print(
        f"\nlaminate a1 = {a1:g}, a2 = {a2:g}, eps = 1/{periods}; unit square: coarse "
        f"{coarse_cells}x{coarse_cells}, fine {fine_cells}x{fine_cells}; {comm.size} rank(s)"
    )
    print(
        f"training data: {data_info['num_samples']} fine solutions x {data_info['num_points']}"
        f" coarse cells; fit: {result.history.epochs} epochs, best validation loss "
        f"{result.history.best_val_loss:.2e}"
    )
    print("effective tensor:        A_hom             learned")
    for i in range(2):
        print(
            f"  row {i}       {A_hom[i, 0]:8.4f} {A_hom[i, 1]:8.4f}   "
            f"{A_learned[i, 0]:8.4f} {A_learned[i, 1]:8.4f}"
        )
    print(f"relative error |A_learned - A_hom| / |A_hom| = {tensor_error:.2e}")
    print(f"distance to the least-squares tensor of the data: {fit_gap:.2e} (relative)")
    print(f"closure offset q(0) = ({offset[0]:.1e}, {offset[1]:.1e})")

    def table(title, runs, closure_vs_hom, iterations):
        print(f"\n{title}: rel. L2 error against the filtered fine solution")
        for name, run in runs.items():
            print(f"  {name:<22} {run['dofs']:>8} dofs  {run['error']:10.3e}")
        print(f"  closure vs A_hom solution: {closure_vs_hom:.3e}; Newton iterations {iterations}")

    table("unit square", runs, closure_vs_hom, newton_iterations)
    print(f"  coarsest solve without closure at the closure's error: {match}")
    table("plate with holes", plate_runs, plate_closure_vs_hom, plate_newton_iterations)
    print("\nsolve times in seconds (these differ from run to run):")
    for domain, domain_runs in (("unit square", runs), ("plate", plate_runs)):
        print(
            f"  {domain}: " + ", ".join(f"{n} {r['seconds']:.3g}" for n, r in domain_runs.items())
        )
    print(f"  one closure update (values and tangent), unit square: {closure_update_seconds:.3g}")
    print(f"  fine plate mesh (gmsh: cut and mesh; to DOLFINx): {plate_mesh_seconds:.3g}")
    print(
        f"\ncheckerboard b1 = {b1:g}, b2 = {b2:g}: fine Q{checker_degree}, "
        f"{checker_fine_cells}x{checker_fine_cells} ({checker_cells_per_period} cells per "
        f"period); A_hom = sqrt(b1 b2) I = {B_hom[0, 0]:.4f} I"
    )
    print(
        f"  learned tensor [[{B_learned[0, 0]:.4f}, {B_learned[0, 1]:.4f}], "
        f"[{B_learned[1, 0]:.4f}, {B_learned[1, 1]:.4f}]]; relative error "
        f"{checker_tensor_error:.2e}; least squares on the data: diagonal "
        f"{B_least_squares[0, 0]:.4f}, {B_least_squares[1, 1]:.4f}"
    )
    print(
        f"  fine discretisation alone (period cell, same element): {B_discrete:.4f}, "
        f"{discretisation_error:+.2%} against sqrt(b1 b2)"
    )
    table(
        "checkerboard, unit square", checker_runs, checker_closure_vs_hom, checker_newton_iterations
    )
    print(
        "  solve times: "
        + ", ".join(f"{n} {r['seconds']:.3g}" for n, r in checker_runs.items())
        + f"; data (6 fine solves + filtering) {checker_data_seconds:.3g}, fit "
        f"{checker_fit_seconds:.3g}"
    )
    print(
        f"\ncheckerboard on the plate: fine P{checker_degree}, cell size eps/"
        f"{checker_plate_cells_per_period}, {summary['checkerboard']['plate']['fine_cells']} "
        f"triangles (gmsh {checker_plate_mesh_seconds:.3g} s); 8x8-period block, same mesh "
        f"and element: {B_plate_discrete:.4f}, {plate_discretisation_error:+.2%} against "
        "sqrt(b1 b2)"
    )
    table(
        "checkerboard, plate with holes",
        checker_plate_runs,
        checker_plate_closure_vs_hom,
        checker_plate_newton_iterations,
    )
    print(
        "  solve times: "
        + ", ".join(f"{n} {r['seconds']:.3g}" for n, r in checker_plate_runs.items())
    )
    print(f"outputs written to {output_dir}")

# ## Checks
#
# The tolerances come from measurements (full run / `--quick`; the same on 1 and 2 ranks;
# see `docs/results.md`):
#
# * the learned tensor is within 0.19 % / 0.40 % of $A_\text{hom}$ (the issue asks for
#   2 %); we require 1 %. The fit is within 0.03 % / 0.04 % of the least-squares tensor of
#   the data (we require 0.1 %): the remaining error is in the data themselves, an excess
#   of $\underline a$ by 0.65 % / 1.3 % that halves with $\varepsilon$, as the
#   $O(\varepsilon)$ error of the filtered flux relation does;
# * the model is linear, so its tangent is the same at every point (to round-off), and with
#   this exact Jacobian one Newton step solves the problem;
# * the closure's solution is within 0.08 % / 0.17 % (unit square) and 0.03 % / 0.06 %
#   (plate) of the solution with the exact $A_\text{hom}$ on the same mesh; we require
#   0.5 %;
# * against the filtered fine solution the closure's error is at most 1.26 times that of
#   the exact homogenised tensor (the best a local closure can do on that mesh); we require
#   1.5 times;
# * every ā-only run is at least 13.8 times less accurate than the closure run (on the
#   unit square, refining the ā-only mesh does not help); we require 10 times;
# * the data file holds one sample per loading and one point per coarse cell.
#
# Every rank holds the same global numbers, so every rank checks them.

assert data_info["num_samples"] == len(training_loadings)
assert data_info["num_points"] == coarse_cells**2
assert tensor_error < 1e-2, f"learned tensor off by {tensor_error:.2e}"
assert fit_gap < 1e-3, f"the fit is {fit_gap:.2e} from the least-squares optimum"
assert tangent_spread < 1e-10
assert newton_iterations == 1 and plate_newton_iterations == 1
for domain_runs, difference in ((runs, closure_vs_hom), (plate_runs, plate_closure_vs_hom)):
    assert difference < 5e-3, f"closure and A_hom solutions differ by {difference:.2e}"
    assert domain_runs["closure"]["error"] < 1.5 * domain_runs["A_hom"]["error"]
    mean_only_errors = [run["error"] for name, run in domain_runs.items() if "ā only" in name]
    assert min(mean_only_errors) > 10 * domain_runs["closure"]["error"]
if resolved:
    assert match in resolved, "no resolved solve reached the closure's error"

# The checkerboard's checks (measured, full run / `--quick`, the same on 1 and 2 ranks):
#
# * the learned tensor is within 0.92 % / 0.94 % of $\sqrt{b_1 b_2}\, I$ (the issue asks
#   for 2 %); we require 1.5 %. Almost all of it is the fine discretisation's: the period
#   cell with the same element ($Q_2$, 4 cells per period) gives 1.7476, 0.90 % above
#   $\sqrt 3$, and the learned diagonal is within 0.02 % / 0.04 % of that (we require
#   0.3 %);
# * one Newton iteration; the closure's solution is within 0.56 % / 0.57 % of the
#   $A_\text{hom}$ solution (the tensor's 0.9 %; we require 1 %);
# * against the filtered fine solution the closure's error is 1.04 / 1.37 times that of
#   the exact $A_\text{hom}$ (we require 1.6) and the b̄-only error is 21 / 6.2 times
#   the closure's (we require 4).

checker_diagonal = np.diag(B_learned)
assert len(checker_fine_seconds) == len(training_loadings)
assert 0.0 < discretisation_error < 0.011, f"cell problem: {discretisation_error:.2e}"
assert checker_tensor_error < 1.5e-2, f"checkerboard tensor off by {checker_tensor_error:.2e}"
assert np.max(np.abs(checker_diagonal / B_discrete - 1.0)) < 3e-3
assert checker_newton_iterations == 1
assert checker_closure_vs_hom < 1e-2
assert checker_runs["closure"]["error"] < 1.6 * checker_runs["A_hom"]["error"]
assert checker_runs["b̄ only"]["error"] > 4 * checker_runs["closure"]["error"]

# The checkerboard on the plate (measured, full run / `--quick`, the same on 1 and 2
# ranks):
#
# * the fine element, $P_2$ on triangles of size $\varepsilon/4$, gives 1.7525 on the
#   $8 \times 8$-period block, 1.18 % above $\sqrt 3$ (we require 1.5 %);
# * one Newton iteration; the closure's solution is within 0.33 % / 0.34 % of the
#   $A_\text{hom}$ solution (we require 1 %);
# * against the filtered fine solution the closure's error is 0.15 / 0.26 times that of
#   the exact $A_\text{hom}$ (we require at most 1.6 times, as on the unit square), and
#   the b̄-only error is 79 / 47 times the closure's (we require 4). The closure beats
#   $A_\text{hom}$ here because the reference is off too: its discretisation adds about
#   1 % to the effective conductivity, and so did the $Q_2$ data the closure learned from
#   (0.92 %), while $A_\text{hom}$ has none. On this coarse mesh, finer than the unit
#   square's, that dominates: with `--quick`, coarse runs with $1.7476\, I$ and
#   $1.7525\, I$ (the $Q_2$ cell's and the block's values) have errors 1.0e-3 and 1.1e-3,
#   close to the closure's 9.6e-4, against 3.7e-3 for $\sqrt 3\, I$.

assert 0.0 < plate_discretisation_error < 0.015, f"block: {plate_discretisation_error:.2e}"
assert checker_plate_newton_iterations == 1
assert checker_plate_closure_vs_hom < 1e-2
assert checker_plate_runs["closure"]["error"] < 1.6 * checker_plate_runs["A_hom"]["error"]
assert checker_plate_runs["b̄ only"]["error"] > 4 * checker_plate_runs["closure"]["error"]
