"""The leak probe counts what the test's own engines leave, not another engine's running
beside the suite (a `make run` during `make test`)."""

from __future__ import annotations

import os
import subprocess
import time

import leakprobe
import psutil


def test_shared_memory_of_another_engine_beside_the_suite_is_not_a_leak():
    beside = subprocess.Popen(["setsid", "-f", "sleep", "30"])  # reparented to init: not ours
    beside.wait()
    other = None
    for _ in range(100):  # setsid -f returns before its child has become `sleep 30`
        other = next((p for p in psutil.process_iter(["cmdline"])
                      if p.info["cmdline"] == ["sleep", "30"] and p.ppid() != os.getpid()), None)
        if other is not None:
            break
        time.sleep(0.05)
    assert other is not None, "the process beside the suite never started"
    dead = subprocess.Popen(["true"])  # an engine that died and left its files
    dead.wait()
    names = {"beside": f"rme{other.pid}xprobe_test_beside", "mine": f"rme{os.getpid()}xprobe_test_mine",
             "dead": f"rme{dead.pid}xprobe_test_dead"}
    before = leakprobe.snapshot()
    try:
        for name in names.values():
            open(f"/dev/shm/{name}", "wb").close()
        found = leakprobe.leaks(before, settle_s=0).get("shm", set())
    finally:
        for name in names.values():
            os.unlink(f"/dev/shm/{name}")
        other.kill()
    assert names["beside"] not in found
    assert {names["mine"], names["dead"]} <= found
