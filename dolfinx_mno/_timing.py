"""Timing for the choices made once at construction (chunk size, tangent mode, operands).

Self-contained: depends on nothing else in the package.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["best_time"]


def best_time(function: Callable[[], object], repeats: int = 2) -> float:
    """Shortest wall time in seconds of ``repeats`` calls, after one warm-up call.

    The minimum, not the median: on a shared machine other processes only ever add time.
    """
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best
