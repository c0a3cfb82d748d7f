"""What `serve` sets up for its whole process (an embedding app keeps its own):
a default executor started in full, large buffers given back to the OS when
freed, and free memory returned when the engine goes idle."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import gc
import os
import sys
import threading
from typing import Any

#: glibc's mallopt parameter
_M_MMAP_THRESHOLD = -3
#: seconds of no session before free memory is handed back
IDLE_TRIM_SECS = 1.0


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def fixed_executor(loop: asyncio.AbstractEventLoop) -> concurrent.futures.ThreadPoolExecutor:
    """The loop's default executor (asyncio.to_thread: blocking native nodes, file
    checks), with all its threads started now: asyncio's grows one thread at a
    time under load and never shrinks, so a server's thread count would step up
    with its first busy minute; this one is what it will be from the start."""
    workers = min(32, (os.cpu_count() or 1) + 4)  # asyncio's own bound
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="asyncio")
    barrier = threading.Barrier(workers)  # every worker waits here: each needs a thread of its own
    concurrent.futures.wait([pool.submit(barrier.wait, 10) for _ in range(workers)])
    loop.set_default_executor(pool)
    return pool


def fixed_mmap_threshold(kib: int) -> None:
    """glibc: buffers of `kib` KiB or more mmapped, and unmapped when freed. Its
    default threshold rises to the size of the first large buffer freed, after
    which 256 KiB gRPC messages come from the heap and, freed in an order the
    heap cannot trim, stay in the process (measured: +55 MiB after one
    never-reading client's outbox, vs +2 MiB with the threshold fixed)."""
    libc = _libc()
    if kib > 0 and libc is not None:  # not glibc: nothing to do
        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(kib * 1024))


async def trim_when_idle(engine: Any) -> None:
    """Once the engine has had no session for IDLE_TRIM_SECS after some ran:
    collect cycles and hand free heap memory back (glibc malloc_trim), so what a
    burst of sessions allocated does not stay in the process until the next one."""
    libc = _libc()
    trimmed_at = engine.sessions_started
    while True:
        await engine.wait_idle()
        await asyncio.sleep(IDLE_TRIM_SECS)
        if engine.sessions or engine.sessions_started == trimmed_at:
            continue
        trimmed_at = engine.sessions_started
        gc.collect()
        if libc is not None:
            await asyncio.to_thread(libc.malloc_trim, 0)
