"""Shared fixtures: DOLFINx conftest habits (gc + barrier after each test)."""

import gc

from mpi4py import MPI

import pytest

import dolfinx_mno  # noqa: F401  (makes the wheel's MPI visible before dolfinx)

# The shared helpers assert too: pytest's introspection for their failures.
pytest.register_assert_rewrite("problems")


# The serial suite's longest files, longest first (`make test-serial` keeps this order,
# `--no-loadscope-reorder`): pytest-xdist hands each worker the next file as it frees up,
# and a long file handed out last leaves the other worker idle while it runs.
LONGEST_FIRST = ("test_demos.py", "test_benchmarks.py", "test_rank_invariance.py", "test_data.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest files first (stable: each file's tests keep their order)."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """With ``--dist loadfile``: each demo of ``test_demos.py`` is a work unit of its own.

    A demo's serial and 2-rank runs share its output folder and stay on one worker, in
    order; different demos write different folders and run on both workers. (The demos
    together take half the serial suite's time: as one unit, one worker ran them alone.)
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class DemosApart(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path, _, test = nodeid.partition("::")
            if path.endswith("test_demos.py") and test.startswith("test_demo["):
                return f"{path}::{test.partition('[')[2].rpartition('-')[0]}"
            return super()._split_scope(nodeid)

    return DemosApart(config, log)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what the imports and the collection made: each test's ``gc.collect()`` then
    scans the objects made since (its own garbage), not the ~300 000 objects of torch,
    DOLFINx, UFL and the test modules (0.2-0.5 s per collection, 1300 collections a CI run).

    Frozen objects are still freed when their reference count drops to zero; only a cycle
    among them would wait for the interpreter's exit. Fixtures (module-scoped ones
    included) are made after the collection, so their PETSc objects are collected as before.
    """
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def collect_and_synchronise():
    """Free PETSc/DOLFINx objects and keep ranks in step between tests."""
    yield
    gc.collect()
    MPI.COMM_WORLD.Barrier()


@pytest.fixture
def time_asleep(monkeypatch):
    """The wall time spent asleep in ``dolfinx_mno._mpi``'s passive waits, as a one-item list.

    Load only lengthens the sleeps, so the share of a wait spent asleep does not depend on
    the machine's load, unlike its CPU time; a polling wait spends none of it asleep.
    """
    import time
    from types import SimpleNamespace

    from dolfinx_mno import _mpi

    asleep = [0.0]

    def timed_sleep(pause: float) -> None:
        start = time.perf_counter()
        time.sleep(pause)
        asleep[0] += time.perf_counter() - start

    clock = SimpleNamespace(perf_counter=time.perf_counter, sleep=timed_sleep)
    monkeypatch.setattr(_mpi, "time", clock)
    return asleep


@pytest.fixture
def tiny_square():
    """The unit square in two triangles: on 3 or more ranks, some rank owns no cells.

    DOLFINx's partitioner gives ranks beyond the number of cells nothing; the fixture
    asserts it, so that tests using it really cover a rank without cells on 3 ranks.
    """
    from dolfinx import mesh  # after dolfinx_mno, whose import finds MPI for dolfinx

    msh = mesh.create_unit_square(MPI.COMM_WORLD, 1, 1)
    comm = msh.comm
    empty = comm.allreduce(int(msh.topology.index_map(2).size_local == 0))
    assert empty >= comm.size - 2
    return msh
