"""The public API: names, version, device selection."""

import importlib.metadata

from mpi4py import MPI

import torch

import dolfinx_mno


def test_all_names_exist_and_are_unique():
    for name in dolfinx_mno.__all__:
        assert hasattr(dolfinx_mno, name), name
    # The order itself is ruff's RUF022 (isort-style: constants, classes, functions).
    assert len(set(dolfinx_mno.__all__)) == len(dolfinx_mno.__all__)


def test_version():
    assert dolfinx_mno.__version__ == importlib.metadata.version("dolfinx_mno")


def test_resolve_device():
    device = dolfinx_mno.resolve_device("auto", MPI.COMM_WORLD)
    if torch.cuda.is_available():
        assert device.type == "cuda"
        assert device.index < torch.cuda.device_count()
    else:
        assert device == torch.device("cpu")
    assert dolfinx_mno.resolve_device("cpu", MPI.COMM_WORLD) == torch.device("cpu")
