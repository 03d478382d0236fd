"""Analytic closures written twice: as torch models and as the same UFL expressions."""

from __future__ import annotations

import torch
import ufl


class ScalarModel(torch.nn.Module):
    """c(u, ∇u) = sin(u) + |∇u|² + 1: inputs (u, ∂u/∂x_i), output (batch,)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x[:, 0]) + (x[:, 1:] ** 2).sum(dim=1) + 1.0


def scalar_ufl(u):
    return ufl.sin(u) + ufl.inner(ufl.grad(u), ufl.grad(u)) + 1.0


class FluxModel(torch.nn.Module):
    """q(u, ∇u) = (1 + u²) ∇u + (u, …, u)/2: a nonlinear diffusion flux, output (batch, d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x[:, :1]
        return (1.0 + u**2) * x[:, 1:] + 0.5 * u


def flux_ufl(u):
    d = len(ufl.grad(u).ufl_shape) and ufl.grad(u).ufl_shape[0]
    return (1.0 + u**2) * ufl.grad(u) + 0.5 * u * ufl.as_vector([1.0] * d)


class StressModel(torch.nn.Module):
    """σ(w, ∇w) = (1 + w·w) sym(∇w) + tr(∇w)² I for a vector field w: output (batch, d, d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dim
        w = x[:, :d]
        g = x[:, d:].reshape(-1, d, d)
        sym = 0.5 * (g + g.transpose(1, 2))
        trace = torch.diagonal(g, dim1=1, dim2=2).sum(dim=1)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        return (1.0 + (w**2).sum(dim=1))[:, None, None] * sym + (trace**2)[:, None, None] * eye


def stress_ufl(w):
    d = w.ufl_shape[0]
    g = ufl.grad(w)
    return (1.0 + ufl.dot(w, w)) * ufl.sym(g) + ufl.tr(g) ** 2 * ufl.Identity(d)
