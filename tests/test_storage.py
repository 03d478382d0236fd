"""Gridded training data in HDF5 (``dolfinx_mno/data/storage.py``): writer and reader.

The closure-data (quadrature point) tests of the same module are in ``test_data.py``.
"""

import shutil
import tempfile
from pathlib import Path

from mpi4py import MPI

import h5py
import numpy as np
import pytest

import dolfinx_mno  # noqa: F401  (before dolfinx)
from dolfinx_mno.data import (
    ClosureDataReader,
    ClosureDataWriter,
    GriddedDataReader,
    GriddedDataWriter,
)
from dolfinx_mno.grid import Grid

COMM = MPI.COMM_WORLD
GRID = Grid((0.0, -1.0), (2.0, 1.0), (5, 4))


def fields(num_samples, seed=0, dtype=np.float64):
    """Inputs (n, 2, 5, 4) and targets (n, 1, 5, 4), random."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_samples, 2, *GRID.shape)).astype(dtype)
    return x, (x[:, :1] * x[:, 1:]).astype(dtype)


@pytest.fixture
def shared_dir():
    """A folder every rank sees: rank 0's, removed after the test."""
    path = COMM.bcast(tempfile.mkdtemp(prefix="mno-storage-") if COMM.rank == 0 else None)
    yield Path(path)
    COMM.Barrier()
    if COMM.rank == 0:
        shutil.rmtree(path)


def writer(path, mode="a", dtype=np.float64, **kwargs):
    settings = dict(grid=GRID, in_channels=2, out_channels=1, dtype=dtype, time_step=0.1)
    return GriddedDataWriter(path, COMM, mode=mode, **{**settings, **kwargs})


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gridded_round_trip(shared_dir, dtype):
    """Fields on rank 0 → file → the same arrays, times, grid and metadata on every rank."""
    path = shared_dir / "fields.h5"
    x, u = fields(3, dtype=dtype)
    root = COMM.rank == 0
    metadata = {"operands": ["u", "mask"], "extension_value": 0.0}
    with writer(path, mode="w", dtype=dtype, metadata=metadata, units={"u": "K"}) as w:
        for i in range(2):
            assert w.append(x[i] if root else None, u[i] if root else None, time=0.5 * i) == i + 1
    with writer(path, dtype=dtype, metadata=metadata, units={"u": "K"}) as w:  # reopen: append
        assert w.num_samples == 2
        assert w.append(x[2] if root else None, u[2] if root else None) == 3
    with GriddedDataReader(path) as data:
        assert data.num_samples == 3
        assert data.grid_shape == (5, 4) and (data.in_channels, data.out_channels) == (2, 1)
        assert data.grid == GRID
        assert np.array_equal(data.inputs(), x) and data.inputs().dtype == dtype
        assert np.array_equal(data.targets(), u)
        assert np.array_equal(data.inputs([2, 0]), x[[2, 0]])
        assert np.array_equal(data.targets(slice(1, 3)), u[1:3])
        assert data.inputs(slice(3, 3)).shape == (0, 2, 5, 4)  # an empty block
        np.testing.assert_array_equal(data.times(), [0.0, 0.5, np.nan])
        inputs, targets = data.tensors()
        assert np.array_equal(inputs.numpy(), x) and np.array_equal(targets.numpy(), u)
        assert data.metadata["format"] == "dolfinx_mno.gridded_data"
        assert data.metadata["operands"] == ["u", "mask"]
        assert data.metadata["units"] == {"u": "K"} and data.metadata["time_step"] == 0.1


@pytest.mark.mpi
def test_gridded_writer_refuses_bad_fields_on_every_rank(shared_dir):
    path = shared_dir / "fields.h5"
    x, u = fields(2)
    root = COMM.rank == 0
    with writer(path, mode="w") as w:
        w.append(x[0] if root else None, u[0] if root else None)
        bad = {
            r"inputs have shape \(2, 5, 3\), expected \(2, 5, 4\)": (x[1][..., :3], u[1]),
            r"targets have shape \(2, 5, 4\), expected \(1, 5, 4\)": (x[1], x[1]),
            "inputs have dtype float32, expected float64": (x[1].astype(np.float32), u[1]),
            "inputs must be a NumPy array on rank 0, got list": (x[1].tolist(), u[1]),
        }
        for message, (inputs, targets) in bad.items():
            with pytest.raises(ValueError, match=f"Cannot append to .*{message}. Nothing was"):
                w.append(inputs if root else None, targets if root else None)
        assert w.num_samples == 1
    with pytest.raises(ValueError, match="the writer is closed"):
        w.append(x[1] if root else None, u[1] if root else None)
    # Reopening with other metadata is refused, naming the difference; the file is intact.
    with pytest.raises(ValueError, match=r"metadata differ.*\n  in_channels: file has 2, given 3"):
        writer(path, in_channels=3)
    with pytest.raises(ValueError, match=r"grid_shape: file has \[5, 4\], given \[5, 5\]"):
        writer(path, grid=(5, 5))
    with GriddedDataReader(path) as data:
        assert data.num_samples == 1 and np.array_equal(data.inputs(), x[:1])


def test_gridded_writer_arguments_and_formats(tmp_path):
    with pytest.raises(ValueError, match=r"Need in_channels ≥ 1 and out_channels ≥ 1, got 0"):
        GriddedDataWriter(
            tmp_path / "a.h5", MPI.COMM_SELF, grid=(4,), in_channels=0, out_channels=1
        )
    with pytest.raises(ValueError, match=r"Need a grid shape of positive sizes, got \(\)"):
        GriddedDataWriter(tmp_path / "a.h5", MPI.COMM_SELF, grid=(), in_channels=1, out_channels=1)
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int64"):
        GriddedDataWriter(
            tmp_path / "a.h5", MPI.COMM_SELF, grid=(4,), in_channels=1, out_channels=1, dtype=int
        )
    # A plain grid shape: no corners stored, no Grid rebuilt.
    path = tmp_path / "ring.h5"
    with GriddedDataWriter(path, MPI.COMM_SELF, grid=(8,), in_channels=1, out_channels=1) as w:
        w.append(np.ones((1, 8)), np.zeros((1, 8)))
    with GriddedDataReader(path) as data:
        assert data.grid is None and data.grid_shape == (8,)
        assert np.array_equal(data.inputs(), np.ones((1, 1, 8)))
    # Each reader and writer refuses the other format, and says which one to use.
    with pytest.raises(ValueError) as error:
        ClosureDataReader(path)
    assert str(error.value) == (
        f"{path} is not a dolfinx_mno closure data file (it holds gridded data: read it "
        "with GriddedDataReader)."
    )
    closure = tmp_path / "points.h5"
    ClosureDataWriter(
        closure, MPI.COMM_SELF, num_inputs=1, value_shape=(), num_points=3, points_per_cell=3
    ).close()
    with pytest.raises(ValueError) as error:
        GriddedDataReader(closure)
    assert str(error.value) == (
        f"{closure} is not a dolfinx_mno gridded data file (it holds closure data: read it "
        "with ClosureDataReader)."
    )
    with pytest.raises(ValueError, match="not a dolfinx_mno gridded data file"):
        GriddedDataWriter(closure, MPI.COMM_SELF, grid=(8,), in_channels=1, out_channels=1)
    with h5py.File(tmp_path / "other.h5", "w"):
        pass
    with pytest.raises(ValueError, match=r"other.h5 is not a dolfinx_mno gridded data file\.$"):
        GriddedDataReader(tmp_path / "other.h5")


def test_gridded_file_keeps_complete_samples_after_an_interrupted_append(tmp_path):
    """Rows beyond num_complete (an append killed before its commit) are ignored and reused."""
    path = tmp_path / "fields.h5"
    x, u = fields(3)
    with GriddedDataWriter(path, MPI.COMM_SELF, grid=GRID, in_channels=2, out_channels=1) as w:
        w.append(x[0], u[0])
    with h5py.File(path, "r+") as file:  # the data of a second append, without its commit
        for name, value in (("inputs", x[1]), ("targets", u[1]), ("time", 7.0)):
            file[name].resize(2, axis=0)
            file[name][1] = value
    with GriddedDataReader(path) as data:
        assert data.num_samples == 1 and np.array_equal(data.inputs(), x[:1])
    with GriddedDataWriter(path, MPI.COMM_SELF, grid=GRID, in_channels=2, out_channels=1) as w:
        w.append(x[2], u[2])
    with GriddedDataReader(path) as data:
        assert np.array_equal(data.inputs(), x[[0, 2]]) and np.array_equal(
            data.targets(), u[[0, 2]]
        )
        np.testing.assert_array_equal(data.times(), [np.nan, np.nan])
