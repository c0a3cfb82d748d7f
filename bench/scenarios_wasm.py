"""What a WASM node costs: a frame through a WASM gain node vs the same gain
as a native node (one-node pipelines, each frame sent and awaited), the bare
Extism call under them, and a session's start with the module compiled
(instantiation) and without (the first compile)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

import numpy as np
import uvloop

from bench.harness import pct, round_trips, scenario
from engine import Engine, RuntimeData
from engine.catalog import default_registry
from engine.node import Node

MODULES = Path(__file__).resolve().parent.parent / "examples" / "wasm" / "modules"
CFG = {"ipc_root": "/tmp/remotemedia-bench", "wasm": {"modules_dir": str(MODULES)}}


class NativeGainNode(Node):
    """The gain of examples/wasm/src/gain.c, in Python on the event loop."""

    node_type = "BenchNativeGain"

    def process(self, frame: RuntimeData) -> RuntimeData:
        return RuntimeData.audio(frame.samples * np.float32(0.5), frame.sample_rate, frame.channels)


def _pipeline(node: dict) -> dict:
    return {"version": "v1", "metadata": {"name": "gain"}, "nodes": [{"id": "g", **node}], "connections": []}


WASM_GAIN = {"node_type": "WasmNode", "params": {"module": "gain.wasm", "config": {"gain": "0.5"}}}
NATIVE_GAIN = {"node_type": "BenchNativeGain"}


def _engine() -> Engine:
    registry = default_registry()
    registry.register(NativeGainNode)
    return Engine(CFG, registry=registry)


async def _round_trips(node: dict, frame: RuntimeData, n: int, warm: int = 100) -> list[float]:
    async with _engine() as engine, engine.stream(_pipeline(node)) as s:
        out = await round_trips(s, "g", frame, n, warm)
        await s.cancel()
    return out


def _bare_calls(frame: RuntimeData, n: int) -> list[float]:
    import extism.extism as ex

    compiled = ex.CompiledPlugin({"wasm": [{"data": (MODULES / "gain.wasm").read_bytes()}]}, functions=[])
    plugin = ex.Plugin(compiled, config={"gain": "0.5"}, functions=[])
    payload = frame.samples.tobytes()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        plugin.call("process", payload)
        out.append(time.perf_counter() - t)
    return out


async def _thread_hops(n: int) -> list[float]:
    """What running a call off the loop costs by itself: a no-op's round trip through a thread."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await asyncio.wrap_future(pool.submit(int))
        out.append(time.perf_counter() - t)
    pool.shutdown()
    return out


async def _session_starts(n: int) -> tuple[list[float], list[float]]:
    cold, warm = [], []
    for _ in range(n):
        async with _engine() as engine:  # a new engine: nothing compiled yet
            t = time.perf_counter()
            async with engine.stream(_pipeline(WASM_GAIN)) as s:
                cold.append(time.perf_counter() - t)
                await s.cancel()
            for _ in range(5):
                t = time.perf_counter()
                async with engine.stream(_pipeline(WASM_GAIN)) as s:
                    warm.append(time.perf_counter() - t)
                    await s.cancel()
    return cold, warm


@scenario("wasm_node")
def wasm_node() -> dict:
    rng = np.random.default_rng(0)
    series: dict[str, dict] = {}
    for _ in range(2):  # interleaved: the machine's noise falls on both alike
        for samples in (1024, 16384):
            frame = RuntimeData.audio(rng.standard_normal(samples).astype(np.float32), 48000)
            for label, node in (("WASM gain node", WASM_GAIN), ("native gain node", NATIVE_GAIN)):
                series.setdefault(f"{label}, {samples} f32", {"values": [], "unit": "s"})["values"].extend(
                    uvloop.run(_round_trips(node, frame, 1000)))
            series.setdefault(f"bare Extism call, {samples} f32", {"values": [], "unit": "s"})["values"].extend(
                _bare_calls(frame, 2000))
    series["thread handoff alone (a no-op through a one-thread executor)"] = {
        "values": uvloop.run(_thread_hops(4000)), "unit": "s"}
    cold, warm = uvloop.run(_session_starts(5))
    series["session start, module compiled (instantiate)"] = {"values": warm, "unit": "s"}
    series["session start, first use (validate + compile + instantiate)"] = {"values": cold, "unit": "s"}
    p50 = {k: pct(v["values"], .5) for k, v in series.items()}
    derived = {f"WASM − native per frame, {n} f32 (p50, µs)":
               (p50[f"WASM gain node, {n} f32"] - p50[f"native gain node, {n} f32"]) * 1e6
               for n in (1024, 16384)}
    return {"series": series, "derived": derived,
            "notes": "one-node streaming pipelines, each frame sent and its output awaited; the WASM "
                     "node's call runs on the node's own thread (a thread handoff each way), the "
                     "native node on the event loop; 'bare' is plugin.call() alone, same process"}
