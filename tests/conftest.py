"""Shared fixtures: DOLFINx conftest habits (gc + barrier after each test)."""

import gc

from mpi4py import MPI

import pytest

import dolfinx_mno  # noqa: F401  (makes the wheel's MPI visible before dolfinx)


@pytest.fixture(autouse=True)
def collect_and_synchronise():
    """Free PETSc/DOLFINx objects and keep ranks in step between tests."""
    yield
    gc.collect()
    MPI.COMM_WORLD.Barrier()
