"""The demos' shared helpers (``demos/utilities.py``) under MPI."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from mpi4py import MPI

import pytest

import dolfinx_mno  # noqa: F401  (before dolfinx)

sys.path.insert(0, str(Path(__file__).parents[1] / "demos"))
from utilities import output_folder

COMM = MPI.COMM_WORLD


@pytest.mark.mpi
def test_an_output_folder_that_cannot_be_created_raises_on_every_rank():
    """A file where the folder should be: every rank raises (before, rank 0 raised and the
    others waited in a barrier forever: an audit of the demos under mpirun -n 2)."""
    root = Path(COMM.bcast(tempfile.mkdtemp(prefix="mno-demo-") if COMM.rank == 0 else None))
    try:
        assert output_folder("made", COMM, root) == root / "made"
        assert (root / "made").is_dir()
        if COMM.rank == 0:
            (root / "blocked").write_text("a file in the way")
        COMM.Barrier()
        with pytest.raises(OSError, match=r"^Cannot create the output folder .*blocked/inner: "):
            output_folder("blocked/inner", COMM, root)
    finally:
        COMM.Barrier()
        if COMM.rank == 0:
            shutil.rmtree(root)


@pytest.mark.mpi
def test_an_output_folder_forgets_what_the_run_writes_last():
    """Files written last (a summary of the models saved first) are removed when the run
    starts, the others kept: a run stopped between the two leaves no old summary beside new
    models (the audit of the eighteenth session)."""
    root = Path(COMM.bcast(tempfile.mkdtemp(prefix="mno-demo-") if COMM.rank == 0 else None))
    try:
        if COMM.rank == 0:
            (root / "demo").mkdir()
            for name in ("summary.json", "model.pt", "reference.npz"):
                (root / "demo" / name).write_text("an earlier run")
        COMM.Barrier()
        folder = output_folder("demo", COMM, root, written_last=("summary.json", "reference.npz"))
        names = sorted(path.name for path in folder.iterdir())
        assert names == ["model.pt"]
        assert (folder / "model.pt").read_text() == "an earlier run"
        # Nothing to remove (a first run) is no error.
        assert output_folder("demo", COMM, root, written_last=("summary.json",)) == folder
    finally:
        COMM.Barrier()
        if COMM.rank == 0:
            shutil.rmtree(root)
