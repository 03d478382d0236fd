"""Timing for the choices made once at construction (chunk size, tangent mode, operands).

Self-contained: depends on nothing else in the package.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

__all__ = ["best_time", "best_times"]


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


def best_times(functions: Mapping[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Shortest wall time of each function, timed in turn in ``repeats`` rounds.

    Interleaved, so that a slow moment of a shared machine falls on every candidate
    alike instead of on whichever was being timed then. One warm-up call each first.
    """
    for function in functions.values():
        function()
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
