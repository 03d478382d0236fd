"""DistributedFNO: neuraloperator's FNO on a grid split among ranks, against its own forward.

Run serially and with ``mpirun -n 2``, ``-n 3`` and ``-n 4``: every rank holds a slab of
rows of the first grid axis, the grids do not divide evenly among the ranks, and with
few modes along axis 1 some ranks own no modes in the transposed layout.
"""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch
from neuralop_reference import widened_spectral_buffer

import dolfinx_mno  # noqa: F401  (before dolfinx)
from dolfinx_mno.distributed_fft import SlabPartition, SlabSpectralTransform, process_group
from dolfinx_mno.distributed_operator import DistributedFNO, unsupported_options
from dolfinx_mno.torch_bridge import to_precision

neuralop = pytest.importorskip("neuralop")

comm = MPI.COMM_WORLD


def _model(modes: tuple[int, ...], dtype: torch.dtype = torch.float64, **options: typing.Any):
    torch.manual_seed(5)
    model = neuralop.models.FNO(
        n_modes=modes, in_channels=2, out_channels=3, hidden_channels=4, n_layers=2, **options
    )
    return to_precision(model, dtype).eval()


def _global_max(value: float) -> float:
    return float(comm.allreduce(value, op=MPI.MAX))


def _summed_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's gradient summed over the ranks (the grid's total)."""
    summed = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad.detach().clone()
        comm.Allreduce(
            MPI.IN_PLACE, torch.view_as_real(grad).numpy() if grad.is_complex() else grad.numpy()
        )
        summed[name] = grad
    return summed


CASES = {
    "2d-fno-odd": ((9, 7), (4, 6), {}),
    "2d-tucker-preactivation": (
        (10, 6),
        (6, 4),
        {"factorization": "tucker", "rank": 0.5, "preactivation": True},
    ),
    "2d-cp-no-embedding-few-modes": (
        (8, 8),
        (4, 2),
        {"factorization": "cp", "rank": 0.5, "positional_embedding": None},
    ),
    "3d-fno": ((7, 5, 6), (4, 4, 4), {"fno_skip": "soft-gating"}),
    "3d-tt-separable-max-modes": (
        (5, 6, 7),
        (4, 2, 6),
        {
            "factorization": "tt",
            "rank": 0.5,
            "separable": True,
            "max_n_modes": (4, 4, 6),
            "channel_mlp_skip": "linear",
        },
    ),
}


@pytest.mark.mpi
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_equal_neuralop(case: str):
    grid, modes, options = CASES[case]
    model = _model(modes, **options)
    generator = torch.Generator().manual_seed(7)
    field = torch.randn(2, 2, *grid, dtype=torch.float64, generator=generator)
    weights = torch.randn(2, 3, *grid, dtype=torch.float64, generator=generator)

    whole = field.clone().requires_grad_()
    with widened_spectral_buffer():
        expected = model(whole)
    (expected * weights).sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    distributed = DistributedFNO(model, grid, comm)
    rows = distributed.local_rows
    assert distributed.local_shape == (rows.stop - rows.start, *grid[1:])
    local = field[:, :, rows].clone().requires_grad_()
    output = distributed(local)
    (output * weights[:, :, rows]).sum().backward()

    assert output.dtype == torch.float64 and output.shape == (2, 3, *distributed.local_shape)
    assert _global_max((output - expected[:, :, rows]).abs().max().item()) <= 1e-12
    assert _global_max((local.grad - whole.grad[:, :, rows]).abs().max().item()) <= 1e-12
    grads = _summed_grads(model)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert (grad - expected_grads[name]).abs().max().item() <= 1e-12, name
    assert float(expected.detach().abs().max()) > 0.05  # the comparison is not of zeros


@pytest.mark.mpi
def test_float32_and_loaded_weights_equal_neuralop():
    """float32 against neuraloperator's unmodified forward; weights loaded from a state dict."""
    trained = _model((4, 4), torch.float32)
    model = _model((4, 4), torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.5)  # other weights, until the state dict is loaded
    grid = (9, 8)
    field = torch.randn(1, 2, *grid, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = trained(field)
        distributed = DistributedFNO(model, grid, comm)
        distributed.model.load_state_dict(trained.state_dict())
        output = distributed(field[:, :, distributed.local_rows])
    # The wrapper's state is the model's alone (neuraloperator adds a "_metadata" entry).
    tensors = {k for k in distributed.state_dict() if not k.endswith("_metadata")}
    assert tensors == {f"model.{k}" for k in trained.state_dict() if k != "_metadata"}
    error = (output - expected[:, :, distributed.local_rows]).abs().max().item()
    assert _global_max(error) <= 50 * np.finfo(np.float32).eps * float(expected.abs().max())


@pytest.mark.mpi
def test_uneven_explicit_rows():
    """Any partition of the rows with one or more per rank gives the same values."""
    grid = (3 * comm.size + 1, 6)
    counts = [1] * comm.size
    counts[-1] += grid[0] - comm.size
    model = _model((4, 4))
    field = torch.randn(1, 2, *grid, dtype=torch.float64, generator=torch.Generator())
    with torch.no_grad(), widened_spectral_buffer():
        expected = model(field)
    with torch.no_grad():
        distributed = DistributedFNO(model, grid, comm, rows=SlabPartition(tuple(counts)))
        output = distributed(field[:, :, distributed.local_rows])
    assert distributed.local_shape[0] == counts[comm.rank]
    assert (
        _global_max((output - expected[:, :, distributed.local_rows]).abs().max().item()) <= 1e-12
    )


@pytest.mark.mpi
@pytest.mark.parametrize("grid", [(3, 5, 4), (2, 7)])
def test_slab_transform_with_a_rank_without_rows(grid):
    """The FFTs of a rank holding no rows (rank 1) used to fail in MKL ("Inconsistent
    configuration parameters"), and the other ranks then aborted in gloo's all-to-all."""
    counts = list(SlabPartition.balanced(grid[0], max(comm.size - 1, 1)).counts)
    if comm.size > 1:
        counts.insert(1, 0)
    rows = SlabPartition(tuple(counts))
    modes = [list(range(n)) for n in grid[:-1]] + [list(range(grid[-1] // 2 + 1))]
    transform = SlabSpectralTransform(grid, rows, modes, process_group(comm), comm.rank)
    generator = torch.Generator().manual_seed(2)
    field = torch.randn(2, 3, *grid, dtype=torch.float64, generator=generator)
    weights = torch.randn(2, 3, *grid, dtype=torch.float64, generator=generator)
    block = rows.block(comm.rank)
    local = field[:, :, block].clone().requires_grad_()
    modes_local = transform.forward(local)
    expected = np.fft.rfftn(field.numpy(), axes=tuple(range(2, 2 + len(grid))), norm="forward")
    expected = expected[:, :, :, transform.mode_chunks.block(comm.rank)]
    error = np.abs(modes_local.detach().numpy() - expected).max(initial=0.0)
    assert _global_max(error) <= 1e-14 and modes_local.shape == expected.shape
    back = transform.inverse(modes_local)  # every mode kept: the field itself
    (back * weights[:, :, block]).sum().backward()  # collective, also on rank 1
    assert back.shape == local.shape
    assert _global_max(np.abs((back - local).detach().numpy()).max(initial=0.0)) <= 1e-14
    error = np.abs((local.grad - weights[:, :, block]).numpy()).max(initial=0.0)
    assert _global_max(error) <= 1e-14


@pytest.mark.mpi
def test_grid_smaller_than_ranks_raises_on_every_rank():
    model = _model((2, 4))
    if comm.size == 1:
        with pytest.raises(ValueError, match=r"rows=\(0,\) must give each of the 1 ranks"):
            DistributedFNO(model, (2, 8), comm, rows=SlabPartition((0,)))
        return
    grid = (comm.size - 1, 8)
    with pytest.raises(
        ValueError,
        match=(
            rf"The grid \({comm.size - 1}, 8\) has {comm.size - 1} rows along axis 0, the "
            rf"split axis, fewer than the {comm.size} ranks: use a finer grid or fewer ranks\."
        ),
    ):
        DistributedFNO(model, grid, comm)


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("modes", "grid", "kept"),
    [((8, 4), (6, 8), "(8, 3)"), ((4, 12), (8, 8), "(4, 7)")],
)
def test_modes_beyond_the_grid_raise_on_every_rank(modes, grid, kept):
    model = _model(modes)
    fft = (grid[0], grid[1] // 2 + 1)
    message = (
        f"The FNO's n_modes={modes}: it keeps {kept} modes (the last axis's n // 2 + 1 of a "
        f"real FFT), more than the grid {grid} has ({fft}); neuraloperator would silently "
        "drop the outer modes of its weights: use a finer grid or fewer modes."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        DistributedFNO(model, grid, comm)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"domain_padding": 0.25}, "domain_padding=0.25"),
        ({"norm": "instance_norm"}, "norm=InstanceNorm"),
        ({"resolution_scaling_factor": 0.5}, "resolution_scaling_factor="),
        ({"complex_data": True}, "complex_data=True"),
        ({"fno_block_precision": "mixed"}, "fno_block_precision='mixed'"),
    ],
)
def test_unsupported_options_are_named(options, named):
    model = _model((4, 4), **options)
    assert any(problem.startswith(named) for problem in unsupported_options(model))
    with pytest.raises(ValueError, match="DistributedFNO cannot distribute this model: "):
        DistributedFNO(model, (8, 8), comm)
    assert unsupported_options(_model((4, 4))) == []
    assert unsupported_options(_model((4,))) == ["n_modes=(4,): a 1-D FNO (the grid needs 2 axes)"]


@pytest.mark.mpi
def test_wrong_input_on_one_rank_raises_on_every_rank():
    grid = (max(4, comm.size), 8)
    model = _model((4, 4))
    distributed = DistributedFNO(model, grid, comm)
    rows = distributed.local_shape[0] + (comm.rank == 0)
    with pytest.raises(
        ValueError,
        match=(
            r"DistributedFNO.forward failed on rank\(s\) \[0\] \(1 of \d+ ranks?\); on rank 0: "
            rf"the input has shape \(1, 2, {distributed.rows.counts[0] + 1}, 8\)"
        ),
    ):
        distributed(torch.zeros(1, 2, rows, 8, dtype=torch.float64))


@pytest.mark.mpi
def test_modes_changed_after_construction_raise():
    model = _model((4, 4))
    distributed = DistributedFNO(model, (8, 8), comm)
    model.n_modes = (2, 2)
    with pytest.raises(RuntimeError, match=r"modes changed from \(4, 3\) to \(2, 2\)"):
        distributed(torch.zeros(1, 2, *distributed.local_shape, dtype=torch.float64))


MPIRUN = Path(sys.executable).parent / "mpirun"
RENDEZVOUS_JOB = Path(__file__).with_name("rendezvous_job.py")


@pytest.mark.skipif(not MPIRUN.exists(), reason="needs mpirun next to the Python executable")
@pytest.mark.parametrize("ranks", [2, 3])
def test_a_rendezvous_port_in_use_raises_on_every_rank(ranks):
    """MASTER_PORT in use (another job's, or a split communicator's with the same port):
    rank 0 cannot open the rendezvous, and every rank says so instead of hanging."""
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("starts its own MPI job; run it from the serial session")
    command = [str(MPIRUN), "-n", str(ranks), sys.executable, str(RENDEZVOUS_JOB)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    # Ranks' lines may interleave: count the messages.
    found = re.findall(
        r"rank (\d): Opening torch.distributed's rendezvous failed on rank\(s\) \[0\] .*?"
        r"Is port \d+ in use\? Unset MASTER_PORT",
        result.stdout,
    )
    assert sorted(int(rank) for rank in found) == list(range(ranks)), result.stdout
    assert "joined" not in result.stdout
