"""A node on another engine: the per-chunk round trip through a remote
EchoNode (another engine on loopback) vs a local process EchoNode, and how
long a remote that dies (kill -9) or hangs (SIGSTOP) takes to become the
node's typed error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import uvloop

from bench.harness import round_trips, scenario
from engine import Engine, RuntimeData
from engine.errors import NodeExecutionError

IPC_ROOT = "/tmp/remotemedia-bench"


async def _serve() -> tuple[asyncio.subprocess.Process, str]:
    cfg = Path(IPC_ROOT) / "remote-engine.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f'ipc_root = "{IPC_ROOT}"\ntest_nodes = true\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine", "serve", "--port", "0", "--config", str(cfg),
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    assert proc.stderr is not None
    while True:
        line = (await proc.stderr.readline()).decode()
        if not line:
            raise RuntimeError("the remote engine did not start")
        if m := re.search(r"serving remotemedia\.v1 on (\S+):(\d+)", line):
            asyncio.get_running_loop().create_task(_drain(proc.stderr))
            return proc, f"{m.group(1)}:{m.group(2)}"


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


def _echo(host: str | None) -> dict:
    node = {"id": "e", "node_type": "EchoNode", **({"host": host} if host else {})}
    return {"version": "v1", "metadata": {"name": "echo"}, "nodes": [node], "connections": []}


def _engine(host: str, **remote) -> Engine:
    return Engine({"test_nodes": True, "ipc_root": IPC_ROOT,
                   "remote": {"allowed_hosts": [host], **remote}})


async def _round_trips(engine: Engine, host: str | None, frame: RuntimeData, n: int,
                       warm: int = 100) -> list[float]:
    async with engine.stream(_echo(host)) as s:
        out = await round_trips(s, "e", frame, n, warm)
        await s.cancel()
    return out


async def _hops(n: int) -> dict[str, list[float]]:
    frame = RuntimeData.audio(np.random.default_rng(0).standard_normal(1024).astype(np.float32), 16000)
    proc, host = await _serve()
    series: dict[str, list[float]] = {}
    try:
        async with _engine(host) as engine:
            for _ in range(2):  # interleaved: the machine's noise falls on both alike
                series.setdefault("remote EchoNode (another engine, loopback), 1024 f32", []).extend(
                    await _round_trips(engine, host, frame, n))
                series.setdefault("local process EchoNode, 1024 f32", []).extend(
                    await _round_trips(engine, None, frame, n))
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    return series


async def _time_to_error(sig: int) -> float:
    """From the signal to the remote engine to the node's typed error at the sender."""
    frame = RuntimeData.audio(np.zeros(1024, np.float32), 16000)
    proc, host = await _serve()
    try:
        async with _engine(host) as engine, engine.stream(_echo(host)) as s:
            it = s.__aiter__()
            await s.send("e", frame)
            await it.__anext__()
            os.kill(proc.pid, sig)
            t = time.perf_counter()
            with contextlib.suppress(NodeExecutionError):
                while True:
                    await s.send("e", frame)
                    await asyncio.sleep(0.01)
            return time.perf_counter() - t
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        await proc.wait()


@scenario("remote_node")
def remote_node() -> dict:
    series = {k: {"values": v, "unit": "s"} for k, v in uvloop.run(_hops(1000)).items()}
    for label, sig in (("kill -9", signal.SIGKILL), ("hang (SIGSTOP)", signal.SIGSTOP)):
        series[f"remote {label} → the node's typed error"] = {
            "values": [uvloop.run(_time_to_error(sig)) for _ in range(5)], "unit": "s"}
    return {"series": series,
            "notes": "each chunk sent and its result awaited before the next; the remote engine is "
                     "`remotemedia-engine serve` in its own process on 127.0.0.1, running EchoNode in "
                     "a node process of its own; keepalive as configured by default "
                     "([remote] keepalive_secs 0.5, keepalive_timeout_secs 0.75)"}
