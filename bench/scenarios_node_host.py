"""What a node process costs to start and what a process → process hop costs:
the import set and memory of an idle node process, and a round trip through
a chain of three node processes (frames between them stay encoded)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import psutil
import uvloop

from bench.harness import pct, round_trips, scenario
from engine import Engine, RuntimeData

CFG = {"test_nodes": True, "ipc_root": "/tmp/remotemedia-bench"}

#: what a node process imports before its node: the worker and a node module
_NODE_IMPORTS = "import engine.worker, nodes.testing"
_PROBE = (f"import sys, time; t = time.perf_counter(); {_NODE_IMPORTS}; "
          "dt = time.perf_counter() - t; "
          "print(dt, len(sys.modules), int('jsonschema' in sys.modules), int('engine.engine' in sys.modules))")


def _chain(n: int) -> dict:
    nodes = [{"id": f"e{i}", "node_type": "EchoNode"} for i in range(n)]
    return {"version": "v1", "metadata": {"name": "chain"}, "nodes": nodes,
            "connections": [{"from": f"e{i}", "to": f"e{i + 1}"} for i in range(n - 1)]}


async def _round_trips(payload: RuntimeData, n: int, warm: int = 50) -> list[float]:
    async with Engine(CFG) as engine, engine.stream(_chain(3)) as s:
        out = await round_trips(s, "e0", payload, n, warm)
        await s.cancel()
    return out


@scenario("chain_3proc")
def chain_3proc() -> dict:
    rng = np.random.default_rng(0)
    small = RuntimeData.audio(rng.standard_normal(1024).astype(np.float32), 48000)
    big = RuntimeData.audio(rng.standard_normal(256 * 1024).astype(np.float32), 48000)
    series = {}
    for _ in range(2):  # interleaved: the machine's noise falls on both alike
        for label, payload, n in (("1024 f32", small, 1000), ("1 MiB", big, 200)):
            series.setdefault(f"engine → 3 EchoNode processes → engine, {label}", []).extend(
                uvloop.run(_round_trips(payload, n)))
    return {"series": {k: {"values": v, "unit": "s"} for k, v in series.items()},
            "notes": "a chain of three multiprocess EchoNodes; each frame is sent, passes "
                     "two process → process edges, and is awaited before the next"}


async def _idle_node_pss() -> list[float]:
    out = []
    async with Engine(CFG) as engine:
        for _ in range(5):
            async with engine.stream(_chain(1)) as s:
                pid = s.runners["e0"].pid
                await asyncio.sleep(0.3)
                out.append(psutil.Process(pid).memory_full_info().pss)
    return out


@scenario("node_process_imports")
def node_process_imports() -> dict:
    times, modules, heavy = [], [], []
    for _ in range(10):
        line = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                              check=True).stdout.split()
        times.append(float(line[0]))
        modules.append(float(line[1]))
        heavy.append(float(line[2]) + float(line[3]))
    pss = uvloop.run(_idle_node_pss())
    return {"series": {"node-process imports (engine.worker + a node module), fresh interpreter":
                           {"values": times, "unit": "s"},
                       "modules loaded by them": {"values": modules, "unit": "count"},
                       "PSS of an idle node process (EchoNode, after initialize)":
                           {"values": [p / 2**20 for p in pss], "unit": "MiB"}},
            "derived": {"loads jsonschema or engine.engine": bool(max(heavy)),
                        "median modules": pct(modules, .5)}}
