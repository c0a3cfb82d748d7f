"""What a test may not leave behind: processes, shared-memory files, iceoryx2
files under the engine's `ipc_root`, fds, threads."""

from __future__ import annotations

import gc
import os
import re
import threading
import time
from pathlib import Path

import psutil

from engine.config import RuntimeConfig

#: where the tests' engines keep their iceoryx2 files (config `ipc_root`):
#: the tests' own root (conftest.TEST_IPC_ROOT) and the default one, for an
#: engine a test makes without naming a root
TEST_IPC_ROOT = "/tmp/remotemedia-engine-tests"
IPC_ROOTS = (TEST_IPC_ROOT, RuntimeConfig.ipc_root)


def ipc_files(roots: tuple[str, ...] = IPC_ROOTS) -> set[str]:
    """Every path iceoryx2 keeps under the roots for engines of this process.

    An engine's files live in `<root>/rme<pid>x<token>/` (engine.ipc.iox.
    IpcSpace): node monitors and details, service and port tags, the event
    sockets of listeners. Only folders of this process's engines count, so
    an engine of another program using the same root is not taken for a leak.
    """
    mine = f"rme{os.getpid()}x"
    found: set[str] = set()
    for root in roots:
        try:
            engines = [e for e in os.scandir(root) if e.name.startswith(mine)]
        except FileNotFoundError:
            continue
        for entry in engines:
            found.add(entry.path)
            found.update(str(p) for p in Path(entry.path).rglob("*"))
    return found


_SHM_OWNER = re.compile(r"rme(\d+)x")


def shm_files(descendants: set[int]) -> set[str]:
    """The engines' shared-memory files in /dev/shm (`rme<engine pid>x...`) that are this
    process's: its own engines', its descendants' and a dead engine's (a leak, whoever's);
    another program's engine running beside the suite is not the test's."""
    me = os.getpid()
    found = set()
    for name in os.listdir("/dev/shm"):
        owner = _SHM_OWNER.match(name)
        if owner is None:
            continue
        pid = int(owner.group(1))
        if pid == me or pid in descendants or not psutil.pid_exists(pid):
            found.add(name)
    return found


def snapshot() -> dict:
    me = psutil.Process()
    children = {p.pid for p in me.children(recursive=True)}
    return {
        "children": children,
        "shm": shm_files(children),
        "ipc_files": ipc_files(),
        "fds": len(os.listdir("/proc/self/fd")),
        # the loop's default executor (asyncio.to_thread) lives as long as the
        # loop, which outlives a test's fixtures; every other thread counts
        "threads": {t.ident for t in threading.enumerate()
                    if t.is_alive() and not t.name.startswith("asyncio_")},
    }


def leaks(before: dict, settle_s: float = 10.0) -> dict:
    """Differences that persist (threads and fds get a moment to wind down)."""
    deadline = time.monotonic() + settle_s
    while True:
        # objects kept alive only by reference cycles (a caught error's traceback,
        # a closed gRPC channel whose core object goes with its last reference)
        gc.collect()
        after = snapshot()
        found = {
            "children": after["children"] - before["children"],
            "shm": after["shm"] - before["shm"],
            "ipc_files": after["ipc_files"] - before["ipc_files"],
            "fds": max(0, after["fds"] - before["fds"]),
            "threads": after["threads"] - before["threads"],
        }
        if not any(found.values()) or time.monotonic() > deadline:
            return {k: v for k, v in found.items() if v}
        time.sleep(0.05)
