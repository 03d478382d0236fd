"""Collective destruction of the PETSc objects that dropped problems leave behind.

Destroying a parallel PETSc object is collective (MUMPS frees its factors and its
communicators collectively), but Python frees objects at different moments on different
ranks (reference cycles wait for the cyclic garbage collector). petsc4py therefore queues a
dropped parallel object on its communicator's *garbage*, and
``PETSc.garbage_cleanup(comm)`` destroys, collectively, what is queued on every rank of
``comm``. The catch: the queue belongs to the communicator the objects live on, and DOLFINx
gives every mesh a communicator of its own. Once a mesh and the problems built on it are
dropped, nothing can reach that communicator any more: its queued solvers, matrices and
factorisations, and the MPI communicators PETSc and MUMPS made for them (about 15 for a
Newton solve with MUMPS), are never freed. MPICH has 2,048 communicators a process; a
loop that builds a problem on a new mesh exhausts them after about 130 iterations, and the
next MUMPS factorisation or mesh creation aborts ("Internal error 1 in
MUMPS_LOAD_RECV_MSGS", or "Too many communicators").

:func:`track` keeps, for each problem, a handle on each of its communicators (an empty
PETSc vector, which keeps PETSc's inner communicator alive) with a weak reference to the
problem: a problem's vectors live on their index map's communicator, another one than its
matrices' and solver's. :func:`collect`, called at a collective point (every problem's
construction), empties the queues of the tracked communicators whose problems are gone on
every rank of the calling communicator, all of them together and in rounds (destroying a
solver on one releases the vectors its callbacks held on another), then releases the
handles: the communicators are freed with the last object on them.
"""

from __future__ import annotations

import typing
import weakref

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np

__all__ = ["collect", "track", "tracked_count"]

#: Objects released by a destruction (a solver's callbacks holding vectors, say) are
#: queued during it; a few passes empty the chains seen in practice (two levels).
_PASSES = 3


class _Tracked(typing.NamedTuple):
    owner: weakref.ReferenceType[typing.Any]
    handle: PETSc.Vec  # type: ignore[name-defined]


_tracked: list[_Tracked] = []


def track(owner: typing.Any, *objects: typing.Any) -> None:
    """Remember the communicators of ``owner``'s PETSc objects until ``owner`` is gone.

    Collective on the objects' communicators (call it where ``owner`` is constructed, on
    every rank, with the same objects in the same order). One handle is kept for each
    distinct communicator: DOLFINx builds a problem's matrices on the mesh's communicator
    but its vectors (``create_vector``) on their index map's, which is another one, with a
    queue of its own.

    Args:
        owner: The object whose PETSc objects these are (a problem).
        objects: Its PETSc objects (``None`` entries are skipped), or the communicators
            (``MPI.Comm``) they live on.
    """
    seen: list[MPI.Comm] = []
    for entry in objects:
        if entry is None:
            continue
        comm = entry if isinstance(entry, MPI.Comm) else entry.getComm().tompi4py()
        # PETSc puts every object of one communicator on the same inner communicator.
        inner = PETSc.Vec().create(comm=comm)  # type: ignore[attr-defined, arg-type]
        inner_comm = inner.getComm().tompi4py()
        if any(MPI.Comm.Compare(inner_comm, other) == MPI.IDENT for other in seen):
            inner.destroy()
            continue
        seen.append(inner_comm)
        _tracked.append(_Tracked(weakref.ref(owner), inner))


def _same_ranks(a: MPI.Comm, b: MPI.Comm) -> bool:
    return MPI.Comm.Compare(a, b) in (MPI.IDENT, MPI.CONGRUENT)


def collect(comm: MPI.Comm) -> int:
    """Destroy what dropped problems left on communicators with the ranks of ``comm``.

    Collective on ``comm``. Tracked communicators with another group of ranks are left for
    a call on theirs. A problem counts as gone once it is freed on every rank; one freed
    on some ranks only (a reference cycle the collector has not reached everywhere) is
    left for a later call. ``comm``'s own queue is emptied too.

    Args:
        comm: The communicator on which every rank calls this.

    Returns:
        The number of tracked communicators released.
    """
    mine = [
        index
        for index, entry in enumerate(_tracked)
        if _same_ranks(entry.handle.getComm().tompi4py(), comm)
    ]
    released: list[_Tracked] = []
    if mine:  # the same entries, in the same order, on every rank of comm
        gone = np.array([_tracked[i].owner() is None for i in mine], dtype=np.int32)
        comm.Allreduce(MPI.IN_PLACE, gone, op=MPI.MIN)
        for index in reversed([i for i, flag in zip(mine, gone, strict=True) if flag]):
            released.append(_tracked.pop(index))
    # Rounds over all the released communicators: destroying an object on one of them
    # (a solver) may release objects on another (the vectors its Python callbacks held),
    # which are queued there after that queue was emptied.
    for _ in range(_PASSES):
        for entry in released:
            PETSc.garbage_cleanup(entry.handle.getComm())  # type: ignore[attr-defined]
        PETSc.garbage_cleanup(comm)  # type: ignore[attr-defined, arg-type]
    for entry in released:
        entry.handle.destroy()
    return len(released)


def tracked_count() -> int:
    """How many communicators are tracked (for tests and diagnostics)."""
    return len(_tracked)
