"""A Newton solve with an MLP closure; prints global quantities as JSON (rank 0).

Run by ``test_rank_invariance.py`` under ``mpirun -n 1``, ``-n 2`` and ``-n 3``.
"""

import json
import sys

from mpi4py import MPI

import numpy as np
import torch
import ufl
from dolfinx import fem, mesh

import dolfinx_mno as mno
from dolfinx_mno.petsc import NonlinearProblem

comm = MPI.COMM_WORLD
msh = mesh.create_unit_square(comm, 17, 13, mesh.CellType.triangle)
V = fem.functionspace(msh, ("Lagrange", 2))
u = fem.Function(V)
v = ufl.TestFunction(V)
x = ufl.SpatialCoordinate(msh)

torch.manual_seed(1234)
model = torch.nn.Sequential(
    torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
).double()
with torch.no_grad():
    model[2].weight.mul_(0.1)  # a mild perturbation of the diffusion flux


class Flux(torch.nn.Module):
    """q = ∇u + MLP(u, ∇u, x): a learned correction of the diffusion flux."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, inputs):
        return inputs[:, 1:3] * (1 + inputs[:, :1] ** 2) + self.mlp(inputs)


closure = mno.Closure(Flux(model), [u, ufl.grad(u), x], value_shape=(2,), quadrature_degree=4)
f = 10 * ufl.sin(3 * x[0]) * x[1] + 4.0
F = ufl.inner(closure, ufl.grad(v)) * closure.dx - f * v * ufl.dx
msh.topology.create_connectivity(1, 2)
facets = mesh.exterior_facet_indices(msh.topology)
bc = fem.dirichletbc(0.0, fem.locate_dofs_topological(V, 1, facets), V)
problem = NonlinearProblem(
    F,
    u,
    bcs=[bc],
    petsc_options_prefix="rank_",
    petsc_options={
        "snes_rtol": 1e-13,
        "snes_atol": 1e-14,
        "ksp_type": "preonly",
        "pc_type": "lu",
        "pc_factor_mat_solver_type": "mumps",
    },
)
problem.solve()
assert problem.solver.getConvergedReason() > 0


def integral(expr, dx=ufl.dx):
    return comm.allreduce(fem.assemble_scalar(fem.form(expr * dx)), op=MPI.SUM)


closure.update()
result = {
    "ranks": comm.size,
    "newton_iterations": problem.solver.getIterationNumber(),
    "u_l2": np.sqrt(integral(u * u)),
    "grad_u_l2": np.sqrt(integral(ufl.inner(ufl.grad(u), ufl.grad(u)))),
    "u_weighted": integral(u * ufl.sin(5 * x[0]) * ufl.cos(2 * x[1])),
    "closure_l2": np.sqrt(integral(ufl.inner(closure, closure), closure.dx)),
    "closure_x_moment": integral(closure[0] * x[0] + closure[1] * x[1] ** 2, closure.dx),
    "tangent_l2": np.sqrt(integral(ufl.inner(closure.tangent, closure.tangent), closure.dx)),
}
if comm.rank == 0:
    json.dump(result, sys.stdout)
