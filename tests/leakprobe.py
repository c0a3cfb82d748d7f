"""What a test may not leave behind: processes, shared-memory files, fds, threads."""

from __future__ import annotations

import gc
import os
import threading
import time

import psutil


def snapshot() -> dict:
    me = psutil.Process()
    return {
        "children": {p.pid for p in me.children(recursive=True)},
        "shm": {f for f in os.listdir("/dev/shm") if f.startswith("rme")},
        "fds": len(os.listdir("/proc/self/fd")),
        # the loop's default executor (asyncio.to_thread) lives as long as the
        # loop, which outlives a test's fixtures; every other thread counts
        "threads": {t.ident for t in threading.enumerate()
                    if t.is_alive() and not t.name.startswith("asyncio_")},
    }


def leaks(before: dict, settle_s: float = 3.0) -> dict:
    """Differences that persist (threads and fds get a moment to wind down)."""
    deadline = time.monotonic() + settle_s
    gc.collect()  # objects kept alive only by reference cycles (e.g. a caught error's traceback)
    while True:
        after = snapshot()
        found = {
            "children": after["children"] - before["children"],
            "shm": after["shm"] - before["shm"],
            "fds": max(0, after["fds"] - before["fds"]),
            "threads": after["threads"] - before["threads"],
        }
        if not any(found.values()) or time.monotonic() > deadline:
            return {k: v for k, v in found.items() if v}
        time.sleep(0.05)
