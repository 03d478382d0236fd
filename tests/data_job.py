"""Jobs run in subprocesses by ``test_data.py``.

``sample DIR``: the same small "simulation" on any number of ranks writes closure data
with each restriction to ``DIR/<method>.h5`` (``l2_projection``, ``interpolation``, and
``cell_average`` onto DG0 from a nested fine mesh, ``refined_interpolation`` onto a mesh
made by ``dolfinx.mesh.refine``; run under ``mpirun -n 1, 2, 3``; the files must hold the
same arrays).

``hold PATH``: a writer that appends one sample, prints ``holding``, keeps the file open
until a line arrives on standard input, then appends a second sample and closes.

``kill PATH flush N`` / ``kill PATH write N``: appends synthetic samples (serial) and kills
itself with SIGKILL right after the N-th HDF5 flush, or during the N-th dataset write
(after the write, before the flush that follows it). Prints ``appended i`` after each
append that returned.
"""

import os
import signal
import sys

from mpi4py import MPI

import h5py
import numpy as np

import dolfinx_mno  # noqa: F401  (before dolfinx)
from dolfinx_mno.data import ClosureDataWriter, ClosureSample

NUM_CELLS, POINTS_PER_CELL, NUM_INPUTS = 7, 3, 2
#: The files ``sample`` writes: by restriction, and onto a refined coarse mesh.
FILES = ("l2_projection", "interpolation", "cell_average", "refined_interpolation")


def synthetic_sample(i: int) -> ClosureSample:
    """Sample ``i``: inputs ``i + row/100``, targets ``-(i + row/100)``, shape (2,)."""
    rows = np.arange(NUM_CELLS * POINTS_PER_CELL, dtype=np.float64) / 100.0 + i
    inputs = np.stack([rows, 2 * rows], axis=1)
    targets = np.stack([-rows, rows**2], axis=1)
    cells = np.arange(NUM_CELLS, dtype=np.int64)[::-1].copy()  # any order: sorted on write
    return ClosureSample(inputs, targets, cells, MPI.COMM_SELF)


def synthetic_writer(path, mode="a") -> ClosureDataWriter:
    return ClosureDataWriter(
        path,
        MPI.COMM_SELF,
        num_inputs=NUM_INPUTS,
        value_shape=(2,),
        num_points=NUM_CELLS * POINTS_PER_CELL,
        points_per_cell=POINTS_PER_CELL,
        time_step=0.5,
        units={"time": "s"},
        metadata={"case": "synthetic"},
        mode=mode,
    )


def _kill_after(cls, method: str, count: int) -> None:
    original = getattr(cls, method)
    calls = [0]

    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(cls, method, wrapper)


def kill(path: str, where: str, count: int) -> None:
    if where == "flush":
        _kill_after(h5py.File, "flush", count)
    else:
        _kill_after(h5py.Dataset, "__setitem__", count)
    writer = synthetic_writer(path, mode="w")
    for i in range(20):
        writer.append(synthetic_sample(i), time=0.5 * i)
        print(f"appended {i + 1}", flush=True)


def hold(path: str) -> None:
    with synthetic_writer(path, mode="w") as writer:
        writer.append(synthetic_sample(0))
        print("holding", flush=True)
        sys.stdin.readline()
        writer.append(synthetic_sample(1))


def sample(directory: str) -> None:
    import ufl
    from dolfinx import fem, mesh

    from dolfinx_mno.data import (
        CellAverage,
        ClosureSampler,
        Interpolation,
        L2Projection,
        Tendency,
    )

    comm = MPI.COMM_WORLD
    coarse = mesh.create_unit_square(comm, 5, 4, mesh.CellType.triangle)
    fine = mesh.create_unit_square(comm, 13, 11, mesh.CellType.quadrilateral)
    V_f = fem.functionspace(fine, ("Lagrange", 2))
    u_f = fem.Function(V_f, name="u_f")
    W_f = fem.functionspace(fine, ("Lagrange", 4))
    fine_tendency = Tendency(u_f**2, W_f)
    V_c = fem.functionspace(coarse, ("Lagrange", 1))
    # Cell averages need a nested fine mesh: the coarse triangles refined 3 times.
    nested = mesh.create_unit_square(comm, 15, 12, mesh.CellType.triangle)
    u_nested = fem.Function(fem.functionspace(nested, ("Lagrange", 2)), name="u_f")
    nested_tendency = Tendency(u_nested**2, fem.functionspace(nested, ("Lagrange", 4)))
    W_c = fem.functionspace(coarse, ("DG", 0))
    # A coarse mesh made by dolfinx.mesh.refine: its original cell indices follow the
    # partition, so samples recorded by them were in another order on each rank count.
    unrefined = mesh.create_unit_square(comm, 3, 2)
    unrefined.topology.create_entities(1)
    refined = mesh.refine(unrefined)[0]
    cases = [
        (L2Projection(V_c), u_f, fine_tendency, fine),
        (Interpolation(V_c), u_f, fine_tendency, fine),
        (CellAverage(W_c, nested), u_nested, nested_tendency, nested),
        (Interpolation(fem.functionspace(refined, ("Lagrange", 1))), u_f, fine_tendency, fine),
    ]
    for (restriction, state, tendency, fine_mesh), name in zip(cases, FILES, strict=True):
        u_c = fem.Function(restriction.space, name="u_c")
        coarse = restriction.space.mesh
        x = ufl.SpatialCoordinate(coarse)
        sampler = ClosureSampler(
            restriction, u_c, [u_c, ufl.grad(u_c), x[0]], u_c**2, 3, fine_tendency=tendency
        )
        path = os.path.join(directory, f"{name}.h5")
        writer = ClosureDataWriter.from_sampler(
            path, sampler, fine_mesh=fine_mesh, time_step=0.1, units={"u": "1"}, mode="w"
        )
        for step in range(3):
            t = 0.1 * step
            state.interpolate(lambda x, t=t: np.sin(3 * x[0] + t) * np.cos(2 * x[1]) + x[1] ** 2)
            writer.append(sampler.sample(state), time=t)
        writer.close()


if __name__ == "__main__":
    if sys.argv[1] == "sample":
        sample(sys.argv[2])
    elif sys.argv[1] == "hold":
        hold(sys.argv[2])
    else:
        kill(sys.argv[2], sys.argv[3], int(sys.argv[4]))
