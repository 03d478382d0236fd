"""The device and backend of each rank: ``cuda:(local rank % GPUs)``, NCCL on CUDA.

No GPU is needed: CUDA's presence and the node-local rank are stood in for.
"""

from __future__ import annotations

from mpi4py import MPI

import numpy as np
import pytest
import torch
import torch.distributed as dist

import dolfinx_mno  # noqa: F401  (before dolfinx)
from dolfinx_mno.distributed_fft import process_group_backend
from dolfinx_mno.torch_bridge import device_of_local_rank, node_local_rank, resolve_device


class _NodeLocal:
    """What ``Split_type(COMM_TYPE_SHARED)`` returns: a communicator with a rank."""

    def __init__(self, rank: int):
        self.rank = rank
        self.freed = False

    def Free(self) -> None:
        self.freed = True


class _Comm:
    """A communicator whose node-local rank is ``local_rank``."""

    def __init__(self, local_rank: int):
        self.local = _NodeLocal(local_rank)
        self.split_types: list[int] = []

    def Split_type(self, split_type: int) -> _NodeLocal:
        self.split_types.append(split_type)
        return self.local


@pytest.mark.parametrize(("gpus", "indices"), [(1, [0, 0, 0, 0]), (2, [0, 1, 0, 1])])
def test_auto_spreads_the_ranks_of_a_node_over_its_gpus(monkeypatch, gpus, indices):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    comms = [_Comm(rank) for rank in range(4)]
    devices = [resolve_device("auto", comm) for comm in comms]
    assert devices == [torch.device("cuda", index) for index in indices]
    assert all(c.split_types == [MPI.COMM_TYPE_SHARED] and c.local.freed for c in comms)
    assert [device_of_local_rank(rank, gpus) for rank in range(4)] == devices
    # An explicit device is kept as given, and the node is not asked.
    comm = _Comm(3)
    assert resolve_device("cuda:0", comm) == torch.device("cuda", 0)
    assert comm.split_types == []


def test_auto_without_cuda_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    comm = _Comm(1)
    assert resolve_device("auto", comm) == torch.device("cpu")
    assert resolve_device(None, comm) == torch.device("cpu")
    assert comm.split_types == []
    assert device_of_local_rank(5, 0) == torch.device("cpu")


@pytest.mark.mpi
def test_node_local_rank_on_one_host():
    comm = MPI.COMM_WORLD
    hosts = comm.allgather(MPI.Get_processor_name())
    local = node_local_rank(comm)
    if len(set(hosts)) == 1:
        assert local == comm.rank
    assert 0 <= local < comm.size


def test_backend_is_nccl_on_cuda_and_gloo_on_the_cpu(monkeypatch):
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert process_group_backend(torch.device("cuda", 1)) == "nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_group_backend() == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_group_backend() == "gloo"
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(
        RuntimeError,
        match=r"The distributed mode on CUDA devices needs NCCL, which this torch build lacks",
    ):
        process_group_backend(torch.device("cuda", 0))
    assert process_group_backend(torch.device("cpu")) == "gloo"


def test_a_cuda_device_this_machine_lacks_is_refused(monkeypatch):
    """An explicit CUDA device that is not there: a message that says what to pass, not
    torch's "Found no NVIDIA driver" from deep inside ``model.to``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    comm = _Comm(0)
    with pytest.raises(RuntimeError, match=r"^device='cuda' was requested, but torch finds no "):
        resolve_device("cuda", comm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match=r"'cuda:2' was requested, but torch finds 2 CUDA "):
        resolve_device(torch.device("cuda", 2), comm)
    assert resolve_device("cuda:1", comm) == torch.device("cuda", 1)
    assert resolve_device("cpu", comm) == torch.device("cpu") and comm.split_types == []


@pytest.mark.mpi
def test_closure_on_a_missing_cuda_device_fails_on_every_rank(monkeypatch, tiny_square):
    """``Closure(..., device="cuda")`` without CUDA: one clear error on every rank, raised
    before any collective (on 3 ranks, one of them owns no cells)."""
    from dolfinx import fem

    import dolfinx_mno as mno

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    u = fem.Function(fem.functionspace(tiny_square, ("Lagrange", 1)))
    model = torch.nn.Linear(1, 1, dtype=torch.float64)
    expected = r"device='cuda' was requested, but torch finds no CUDA device on this machine"
    for device in ("cuda", torch.device("cuda")):
        with pytest.raises(RuntimeError, match=expected):
            mno.Closure(model, [u], (), 1, device=device)
    closure = mno.Closure(model, [u], (), 1, device="cpu")  # the model stays usable
    closure.update()
    assert closure.x.array.dtype == np.float64
