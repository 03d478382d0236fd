"""The CPU's last-level cache, per core: what a chunk of model work should fit in.

Read once from Linux's ``/sys/devices/system/cpu/cpu0/cache`` (the highest-level data or
unified cache, divided by the number of CPUs sharing it), else from glibc's
``sysconf(_SC_LEVEL3_CACHE_SIZE)`` / ``_SC_LEVEL2_CACHE_SIZE`` (not divided: they say
nothing of sharing). ``None`` where neither says: callers then bound nothing.
"""

from __future__ import annotations

import functools
import os
import pathlib

__all__ = ["cache_bytes_per_core"]

_SYSFS = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")


def _parse_size(text: str) -> int:
    """``"32768K"`` → bytes (sysfs writes K, M or G suffixes, or plain bytes)."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _count_cpus(cpu_list: str) -> int:
    """``"0-3,8"`` → 5."""
    count = 0
    for part in cpu_list.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def _from_sysfs(root: pathlib.Path) -> int | None:
    best: tuple[int, int] | None = None  # (level, bytes per core)
    for index in sorted(root.glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text())
            sharing = _count_cpus((index / "shared_cpu_list").read_text())
        except (OSError, ValueError):
            continue
        if size > 0 and (best is None or level > best[0]):
            best = (level, size // max(sharing, 1))
    return None if best is None else best[1]


def _from_sysconf() -> int | None:
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if size > 0:
            return size
    return None


@functools.cache
def cache_bytes_per_core() -> int | None:
    """Bytes of last-level cache per core on this machine, or ``None`` if unknown."""
    return _from_sysfs(_SYSFS) or _from_sysconf()
