"""NumPy's BLAS at torch's thread count, for the fused MLP's matrix products.

The fused MLP pass (:mod:`dolfinx_mno.mlp_kernel`) runs its matrix products with torch's
BLAS (MKL in torch's x86 wheels) or with NumPy's (OpenBLAS in NumPy's wheels), whichever
measures faster for the model at construction: on one core of an AMD EPYC, MKL took
1.2–2.2× as long as OpenBLAS for the narrow products of small MLPs (``docs/benchmarks.md``).

The two libraries keep separate thread pools: torch's follows
:func:`torch.set_num_threads`, NumPy's its environment (``OPENBLAS_NUM_THREADS``,
``OMP_NUM_THREADS``) or else every core. So that a closure uses the threads torch was
given (one per MPI rank, say) whichever library multiplies, :func:`torch_threads` sets
NumPy's BLAS to ``torch.get_num_threads()`` for the duration of a call and restores it
after, through `threadpoolctl <https://github.com/joblib/threadpoolctl>`_.
"""

from __future__ import annotations

import contextlib
import functools
import typing

import numpy as np  # noqa: F401  (its BLAS is loaded before the libraries are listed)
import torch

__all__ = ["blas_threads", "torch_threads"]


@functools.cache
def _controllers() -> tuple[typing.Any, ...]:
    """The BLAS libraries loaded (NumPy's among them), as threadpoolctl's controllers."""
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


def blas_threads() -> list[int]:
    """The thread count of each BLAS library threadpoolctl found (NumPy's among them)."""
    return [lib.get_num_threads() for lib in _controllers()]


@contextlib.contextmanager
def torch_threads() -> typing.Iterator[None]:
    """NumPy's BLAS at ``torch.get_num_threads()`` threads inside the ``with`` block.

    Costs two library calls a BLAS library when the counts already agree (about 1 µs),
    two more when they do not. Restores the previous counts on exit, also after an error.
    """
    wanted = torch.get_num_threads()
    changed = []
    try:
        for lib in _controllers():
            current = lib.get_num_threads()
            if current != wanted:
                lib.set_num_threads(wanted)
                changed.append((lib, current))
        yield
    finally:
        for lib, current in changed:
            lib.set_num_threads(current)
