"""Nodes on a Ray cluster: the per-frame round trip through a Ray-placed
EchoNode vs a local process EchoNode (1024 f32 and 1 MiB), a plain Ray
actor's echo of the same frames from a driver of its own (what Ray itself
costs, without the engine), an actor's start to ready, and how long a
killed actor takes to become the node's typed error. The cluster is the
local two-node one of deploy/local_ray_cluster.py (`ray start` processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import uvloop

from bench.harness import round_trips, scenario
from engine import Engine, RuntimeData

IPC_ROOT = "/tmp/remotemedia-bench"

_PLAIN = """
import sys, time, numpy as np, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
@ray.remote(num_cpus=1)
class Echo:
    def echo(self, x):
        return x
@ray.remote(num_cpus=1)
class AsyncEcho:
    async def echo(self, x):
        return x
a = Echo.remote(); ray.get(a.echo.remote(0))
b = AsyncEcho.remote(); ray.get(b.echo.remote(0))
for size in (1024, 262144):
    x = np.zeros(size, np.float32)
    for actor, name in ((a, "sync"), (b, "async")):
        for i in range(50):
            ray.get(actor.echo.remote(x))
        for i in range(int(sys.argv[2])):
            t = time.perf_counter(); ray.get(actor.echo.remote(x)); print(name, size, time.perf_counter() - t)
t = time.perf_counter(); b = Echo.remote(); ray.get(b.echo.remote(0)); print("start", time.perf_counter() - t)
"""


def _echo(executor: str) -> dict:
    return {"version": "v1", "metadata": {"name": "echo"},
            "nodes": [{"id": "e", "node_type": "EchoNode", "executor": executor}], "connections": []}


async def _round_trips(engine: Engine, executor: str, frame: RuntimeData, n: int) -> list[float]:
    async with engine.stream(_echo(executor)) as s:
        out = await round_trips(s, "e", frame, n, 50)
        await s.cancel()
    return out


async def _engine_series(address: str, n: int) -> dict[str, list[float]]:
    frames = {"1024 f32": RuntimeData.audio(np.zeros(1024, np.float32), 16000),
              "1 MiB": RuntimeData.audio(np.zeros(262144, np.float32), 16000)}
    series: dict[str, list[float]] = {}
    cfg = {"test_nodes": True, "ipc_root": IPC_ROOT, "ray": {"address": address, "idle_disconnect_secs": 60}}
    async with Engine(cfg) as engine:
        for _ in range(2):  # interleaved: the machine's noise falls on both alike
            for label, frame in frames.items():
                series.setdefault(f"Ray-placed EchoNode, {label}", []).extend(
                    await _round_trips(engine, "ray", frame, n))
                series.setdefault(f"local process EchoNode, {label}", []).extend(
                    await _round_trips(engine, "multiprocess", frame, n))
        # the engine ↔ driver process hop alone (no Ray)
        driver = await engine.ray_executor().connection.acquire()
        try:
            for label, frame in frames.items():
                for i in range(n + 50):
                    t = time.perf_counter()
                    await driver.call("echo", frame).value()
                    if i >= 50:
                        series.setdefault(f"engine ↔ Ray driver process hop alone, {label}", []).append(
                            time.perf_counter() - t)
        finally:
            engine.ray_executor().connection.release()
        # start to ready of a session whose one node is an actor (the engine already connected)
        for _ in range(5):
            t = time.perf_counter()
            async with engine.stream(_echo("ray")) as s:
                series.setdefault("actor start → ready (session start, connected)", []).append(
                    time.perf_counter() - t)
                await s.cancel()
        for _ in range(3):
            t = time.perf_counter()
            async with engine.stream(_echo("ray")) as s:
                it = s.__aiter__()
                await s.send("e", frames["1024 f32"])
                await it.__anext__()
                os.kill(s.runners["e"].placed["pid"], signal.SIGKILL)
                t = time.perf_counter()
                await s.wait_closed()
                series.setdefault("actor kill -9 → the node's typed error", []).append(time.perf_counter() - t)
    # the first session of an idle engine: the driver process connects first
    for _ in range(2):
        async with Engine({**cfg, "ray": {"address": address, "idle_disconnect_secs": 0}}) as engine:
            t = time.perf_counter()
            async with engine.stream(_echo("ray")) as s:
                series.setdefault("first session start (driver connects, actor starts)", []).append(
                    time.perf_counter() - t)
                await s.cancel()
    return series


def _plain_ray(address: str, n: int) -> dict[str, list[float]]:
    run = subprocess.run([sys.executable, "-c", _PLAIN, address, str(n)], capture_output=True, text=True,
                         timeout=600, check=True)
    out: dict[str, list[float]] = {}
    sizes = {"1024": "1024 f32", "262144": "1 MiB"}
    for line in run.stdout.splitlines():
        *key, value = line.split()
        name = ("plain Ray actor start → first call" if key == ["start"] else
                f"plain Ray {key[0]} actor echo (own driver), {sizes[key[1]]}")
        out.setdefault(name, []).append(float(value))
    return out


async def _node_removed(cluster: object, address: str) -> float:
    """From the loss of the machine under a session's actor (kill -9 of its Ray node's
    raylet and every process under it) to the node's typed error."""
    gpu = {"version": "v1", "metadata": {"name": "gpu"}, "nodes": [
        {"id": "e", "node_type": "EchoNode", "executor": "ray", "capabilities": {"gpu": {"type": "cuda"}}}],
        "connections": []}
    cfg = {"test_nodes": True, "ipc_root": IPC_ROOT, "ray": {"address": address, "idle_disconnect_secs": 0}}
    async with Engine(cfg) as engine, engine.stream(gpu) as s:
        it = s.__aiter__()
        await s.send("e", RuntimeData.audio(np.zeros(1024, np.float32), 16000))
        await it.__anext__()
        lost = cluster.lose_node(s.runners["e"].placed["ray_node_id"])
        t = time.perf_counter()
        await s.wait_closed()
        took = time.perf_counter() - t
    await asyncio.to_thread(psutil.wait_procs, lost, 10)
    return took


@scenario("ray_node")
def ray_node() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
    from local_ray_cluster import RayCluster

    cluster = RayCluster().start()
    try:
        series = uvloop.run(_engine_series(cluster.address, 500))
        series.update(_plain_ray(cluster.address, 500))
        removed = []
        for _ in range(2):
            removed.append(uvloop.run(_node_removed(cluster, cluster.address)))
            cluster.add_gpu_node()
        series["actor's machine gone (its Ray node's processes kill -9) → the node's typed error"] = removed
    finally:
        with contextlib.suppress(Exception):
            cluster.stop()
    return {"series": {k: {"values": v, "unit": "s"} for k, v in series.items()},
            "notes": "each frame sent and its echo awaited before the next; the cluster is two `ray start` "
                     "nodes on this machine; a Ray-placed node's frames go engine → the engine's Ray driver "
                     "process (Unix socket) → the actor (Ray, the object store for frames over 100 KiB) and back"}
