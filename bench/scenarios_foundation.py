"""Foundation scenarios: manifest validation, native pipeline overhead."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from bench.harness import scenario
from engine import Engine, RuntimeData
from engine.catalog import default_registry
from engine.manifest import validate


def ten_node_manifest() -> dict:
    nodes = [{"id": "in", "node_type": "AudioChunkerNode", "params": {"chunk_size": 512}}]
    nodes += [{"id": f"rs{i}", "node_type": "AudioResampleNode", "params": {"target_sample_rate": 16000}} for i in range(3)]
    nodes += [{"id": f"fmt{i}", "node_type": "AudioFormatNode", "params": {"format": "i16"}} for i in range(3)]
    nodes += [{"id": f"out{i}", "node_type": "PassThroughNode"} for i in range(3)]
    conns = [("in", f"rs{i}") for i in range(3)] + [(f"rs{i}", f"fmt{i}") for i in range(3)]
    conns += [(f"fmt{i}", f"out{i}") for i in range(3)] + [("rs0", "out1"), ("rs1", "out2"), ("rs2", "out0")]
    assert len(nodes) == 10 and len(conns) == 12
    return {"version": "v1", "metadata": {"name": "bench-10", "created_at": "2026-01-01T00:00:00Z"},
            "nodes": nodes, "connections": [{"from": a, "to": b} for a, b in conns]}


@scenario("validate_10_nodes")
def validate_10_nodes() -> dict:
    registry = default_registry()
    doc = ten_node_manifest()
    for _ in range(200):
        validate(doc, registry)
    times = []
    for _ in range(3000):
        t = time.perf_counter()
        validate(doc, registry)
        times.append(time.perf_counter() - t)
    p50 = sorted(times)[len(times) // 2]
    return {
        "series": {"validate (10 nodes, 12 connections)": {"values": times, "unit": "s"}},
        "targets": {"p50 < 1 ms": "met" if p50 < 1e-3 else f"MISSED ({p50 * 1e3:.3f} ms)"},
    }


CHAIN = {"version": "v1", "metadata": {"name": "bench-native-3"}, "nodes": [
    {"id": "chunk", "node_type": "AudioChunkerNode", "params": {"chunk_size": 1024}},
    {"id": "rs", "node_type": "AudioResampleNode", "params": {"target_sample_rate": 16000}},
    {"id": "out", "node_type": "PassThroughNode"}],
    "connections": [{"from": "chunk", "to": "rs"}, {"from": "rs", "to": "out"}]}


@scenario("native_pipeline_overhead")
def native_pipeline_overhead() -> dict:
    """Per-frame cost through the engine vs calling the three nodes directly."""
    from nodes.audio import AudioChunkerNode, AudioResampleNode
    from nodes.basic import PassThroughNode

    n_frames = 3000
    rng = np.random.default_rng(0)
    frames = [rng.standard_normal(1024).astype(np.float32) for _ in range(64)]

    def direct() -> list[float]:
        c = AudioChunkerNode("chunk", {"chunk_size": 1024})
        r = AudioResampleNode("rs", {"target_sample_rate": 16000})
        p = PassThroughNode("out", {})
        out = []
        for i in range(n_frames):
            t = time.perf_counter()
            for a in c.process(RuntimeData.audio(frames[i % 64], 48000)):
                for b in r.process(a):
                    p.process(b)
            out.append(time.perf_counter() - t)
        return out

    async def engine_run() -> list[float]:
        out = []
        async with Engine() as engine, engine.stream(CHAIN) as s:
            async def drain():
                async for _ in s:
                    pass
            task = asyncio.get_running_loop().create_task(drain())
            for i in range(n_frames):
                t = time.perf_counter()
                await s.send("chunk", RuntimeData.audio(frames[i % 64], 48000))
                out.append(time.perf_counter() - t)
            await s.close()
            await task
        return out

    # interleave rounds so machine noise hits both alike
    d_all, e_all = [], []
    for _ in range(3):
        d_all += direct()
        e_all += asyncio.run(engine_run())
    from bench.harness import pct

    d50, e50 = pct(d_all, 0.5), pct(e_all, 0.5)
    return {
        "series": {
            "direct node calls per 1024-sample frame": {"values": d_all, "unit": "s"},
            "engine stream send per 1024-sample frame": {"values": e_all, "unit": "s"},
        },
        "derived": {
            "engine overhead per frame p50 (µs)": (e50 - d50) * 1e6,
            "ratio engine/direct p50": e50 / d50,
        },
        "notes": "Engine time covers send() of one 48 kHz frame through chunker → resampler → "
                 "pass-through into the output queue (inline push, no queue hop between native nodes).",
    }
