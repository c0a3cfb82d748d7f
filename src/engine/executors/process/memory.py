"""How much memory a session's node processes use, and the limit on it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import psutil

from ...errors import ResourceLimitError


def process_memory(pids: list[int]) -> int:
    """Bytes charged to these processes: PSS, else USS, else RSS."""
    total = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            try:
                mi = p.memory_full_info()
                total += getattr(mi, "pss", 0) or getattr(mi, "uss", 0) or mi.rss
            except (psutil.AccessDenied, AttributeError):
                total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


_PAGE = os.sysconf("SC_PAGE_SIZE")
#: take PSS for the peak-memory metric every this many memory samples
_PSS_EVERY = 10


def resident_bytes(pids: list[int]) -> int:
    """RSS of these processes from /proc/<pid>/statm (an upper bound of their PSS)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


async def watch_memory(pids: Callable[[], list[int]], settings: Any, metrics: Any) -> None:
    """Raise ResourceLimitError once the processes `pids()` use more than the
    session's `max_session_memory_mb`; keeps `metrics.peak_memory_bytes`.

    PSS is what the limit means, but reading it walks page tables (~1 ms
    a process here). RSS bounds PSS from above and costs a tiny read, so
    PSS is only taken when RSS passes the limit, and every
    `_PSS_EVERY`-th sample for the peak-memory metric.
    """
    limit = settings.max_session_memory_mb * 1024 * 1024
    interval = settings.memory_sample_interval_ms / 1000
    tick = 0
    while True:
        await asyncio.sleep(interval)
        now = pids()
        if not now:
            continue
        tick += 1
        if resident_bytes(now) <= limit and tick % _PSS_EVERY != 1:
            continue
        used = await asyncio.to_thread(process_memory, now)
        metrics.peak_memory_bytes = max(metrics.peak_memory_bytes, used)
        if used > limit:
            raise ResourceLimitError(
                f"session processes use {used / 2**20:.1f} MiB, over max_session_memory_mb="
                f"{settings.max_session_memory_mb}",
                context={"field": "max_session_memory_mb", "used_bytes": used},
            )
