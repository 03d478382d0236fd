"""The time schemes of the 2D turbulence demo's flow solver (``demos/turbulence_2d/flow.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest

import dolfinx_mno  # noqa: F401  (before dolfinx)

DEMO = Path(__file__).parents[1] / "demos"
sys.path[:0] = [str(DEMO), str(DEMO / "turbulence_2d")]
from flow import VorticityFlow, initial_vorticity  # noqa: E402

COMM = MPI.COMM_WORLD


def _vorticity_at(scheme: str, dt: float, end: float = 0.4) -> np.ndarray:
    """The owned vorticity dofs of an 8² run from a smooth state to ``end``."""
    flow = VorticityFlow(8, dt, 1e-3, scheme=scheme, name=f"{scheme}_{round(end / dt)}")
    flow.set_vorticity(initial_vorticity(1, peak=2.0))
    flow.run(0.0, end)
    omega = flow.omega
    return omega.x.array[: omega.function_space.dofmap.index_map.size_local].copy()


def _norm(values: np.ndarray) -> float:
    return float(np.sqrt(COMM.allreduce(float(values @ values), op=MPI.SUM)))


@pytest.mark.mpi
@pytest.mark.parametrize("scheme, low, high", [("ssprk3", 2.8, 3.2), ("euler", 0.6, 1.2)])
def test_time_scheme_order(scheme: str, low: float, high: float):
    """Errors against a run with a 32× smaller step fall as Δt³ for SSP-RK3 and as Δt for
    IMEX Euler with the Taylor–Galerkin term (first order: the velocity of the correction
    is frozen over the step), on any number of ranks. At the coarsest step SSP-RK3's error
    is also two orders of magnitude below Euler's (measured 0.030 against 4.4)."""
    reference = _vorticity_at("ssprk3", 0.05 / 32)
    errors = [_norm(_vorticity_at(scheme, dt) - reference) for dt in (0.05, 0.025, 0.0125)]
    rates = np.log2(np.array(errors[:-1]) / errors[1:])
    assert np.all((rates > low) & (rates < high)), (errors, rates)
    if scheme == "ssprk3":
        assert errors[0] < 0.05 * _norm(_vorticity_at("euler", 0.05) - reference), errors


@pytest.mark.mpi
@pytest.mark.parametrize(
    "options, message",
    [
        ({"scheme": "rk4"}, r"scheme must be one of \('euler', 'ssprk3'\), got 'rk4'"),
        ({"scheme": "ssprk3", "memory": True}, "takes neither memory nor a closure_interval"),
        ({"scheme": "ssprk3", "closure_interval": 2}, "takes neither memory"),
        ({"hold_closures": True}, "hold_closures needs several stages: scheme='euler' has one"),
    ],
)
def test_bad_scheme_options_are_refused(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        VorticityFlow(4, 0.1, 1e-3, **options)
