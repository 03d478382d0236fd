"""Small pieces shared by the solver tests: a direct solver, boundary conditions, a model."""

from __future__ import annotations

import torch
from dolfinx import fem, mesh

#: A direct solver for KSP (and SNES's KSP) options.
DIRECT = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}


def boundary_dofs(V: fem.FunctionSpace):
    """The dofs of ``V`` on the exterior facets of its mesh."""
    msh = V.mesh
    msh.topology.create_connectivity(msh.topology.dim - 1, msh.topology.dim)
    facets = mesh.exterior_facet_indices(msh.topology)
    return fem.locate_dofs_topological(V, msh.topology.dim - 1, facets)


def boundary_bc(V: fem.FunctionSpace, value: float | fem.Function = 0.0) -> fem.DirichletBC:
    """``u = value`` on the whole boundary."""
    if isinstance(value, fem.Function):
        return fem.dirichletbc(value, boundary_dofs(V))
    return fem.dirichletbc(value, boundary_dofs(V), V)


class Cubic(torch.nn.Module):
    """r(u) = u³."""

    def forward(self, x):
        return x[:, 0] ** 3
