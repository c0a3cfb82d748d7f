"""gRPC service scenarios: unary round trip, streaming round trip through a
node process, and how many real-time streams one server holds.

The server runs as its own process (`python -m engine serve`, uvloop), as in
production; clients run in the bench process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import psutil

from bench.harness import pct, scenario
from engine._proto import common_pb2 as pb
from engine._proto import execution_pb2 as epb
from engine._proto import execution_pb2_grpc, streaming_pb2_grpc
from engine._proto import streaming_pb2 as spb

IPC_ROOT = "/tmp/remotemedia-bench"


class Served:
    def __init__(self, address: str, pid: int) -> None:
        self.address = address
        self.pid = pid

    def cpu_seconds(self) -> dict[str, float]:
        """CPU used so far by the engine process, its node processes (alive now) and this client."""
        engine = psutil.Process(self.pid)
        nodes = 0.0
        for child in engine.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                t = child.cpu_times()
                nodes += t.user + t.system
        t, me = engine.cpu_times(), psutil.Process().cpu_times()
        return {"engine": t.user + t.system, "nodes": nodes, "client": me.user + me.system}


@contextlib.contextmanager
def served(extra_toml: str = "", **server: object) -> Iterator[Served]:
    """A `remotemedia-engine serve` process on a free port; `extra_toml`: more top-level settings."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "runtime.toml")
        body = "\n".join(f"{k} = {v!r}" for k, v in server.items())
        with open(cfg, "w") as f:
            f.write(f'ipc_root = "{IPC_ROOT}"\ntest_nodes = true\n{extra_toml}[caps]\nmax_sessions = 256\n'
                    f'max_total_processes = 256\n[server]\n{body}\n')
        proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", "0", "--config", cfg],
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        try:
            assert proc.stderr is not None
            address = ""
            while not address:
                line = proc.stderr.readline()
                if not line:
                    raise RuntimeError("server exited before listening")
                if m := re.search(r"serving remotemedia\.v1 on (\S+):(\d+)", line):
                    address = f"{m.group(1)}:{m.group(2)}"
            # keep reading its log so the pipe never fills
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            yield Served(address, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def manifest(nodes: list[tuple[str, str]], name: str = "bench") -> epb.PipelineManifest:
    m = epb.PipelineManifest(version="v1", metadata=epb.ManifestMetadata(name=name))
    for nid, node_type in nodes:
        m.nodes.add(id=nid, node_type=node_type, params=json.dumps({}))
    for (a, _), (b, _) in zip(nodes, nodes[1:], strict=False):
        m.connections.add(**{"from": a, "to": b})
    return m


def audio_buffer(n: int, rate: int = 16000) -> pb.DataBuffer:
    samples = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    return pb.DataBuffer(audio=pb.AudioBuffer(samples=samples.tobytes(), sample_rate=rate, channels=1,
                                              format=pb.AUDIO_FORMAT_F32, num_samples=n))


@scenario("grpc_unary")
def grpc_unary() -> dict:
    n, warm = 1000, 100
    with served() as srv, grpc.insecure_channel(srv.address) as ch:
        stub = execution_pb2_grpc.PipelineExecutionServiceStub(ch)
        req = epb.ExecuteRequest(manifest=manifest([("p", "PassThroughNode")]))
        req.data_inputs["p"].CopyFrom(audio_buffer(1024))
        rtt, engine_ms, version = [], [], []
        for i in range(n + warm):
            t = time.perf_counter()
            resp = stub.ExecutePipeline(req)
            dt = time.perf_counter() - t
            assert resp.WhichOneof("outcome") == "result", resp.error
            if i >= warm:
                rtt.append(dt)
                engine_ms.append(resp.result.metrics.wall_time_ms / 1000)
        for _ in range(n):  # the same channel, an RPC that does no engine work
            t = time.perf_counter()
            stub.GetVersion(epb.VersionRequest())
            version.append(time.perf_counter() - t)
    p50 = pct(rtt, .5)
    return {"series": {"ExecutePipeline round trip, PassThroughNode, 1024 f32": {"values": rtt, "unit": "s"},
                       "  of which in the servicer (request decoded → response built)": {"values": engine_ms,
                                                                                           "unit": "s"},
                       "GetVersion round trip (gRPC floor on this channel)": {"values": version, "unit": "s"}},
            "targets": {"p50 ≤ 1 ms": f"{'met' if p50 <= 0.001 else 'MISSED'} ({p50 * 1e3:.3f} ms)"}}


class _Pinger:
    """One streaming call driven from asyncio: send a chunk, wait for its result."""

    def __init__(self, channel: grpc.aio.Channel, nodes: list[tuple[str, str]]) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queue.put_nowait(spb.StreamRequest(init=spb.StreamInit(manifest=manifest(nodes))))
        self.call = streaming_pb2_grpc.StreamingPipelineServiceStub(channel).StreamPipeline(self._requests())
        self.target = nodes[0][0]

    async def _requests(self):
        while (item := await self.queue.get()) is not None:
            yield item

    async def ready(self) -> None:
        while True:
            resp = await self.call.read()
            kind = resp.WhichOneof("response")
            if kind == "ready":
                return
            if kind != "init_progress":
                raise RuntimeError(f"expected ready, got {resp}")

    def send(self, buf: pb.DataBuffer, seq: int) -> None:
        self.queue.put_nowait(spb.StreamRequest(data_chunk=spb.DataChunk(node_id=self.target, buffer=buf,
                                                                         sequence=seq)))

    async def result(self) -> spb.ChunkResult:
        while True:
            resp = await self.call.read()
            kind = resp.WhichOneof("response")
            if kind == "result":
                return resp.result
            if kind != "metrics":
                raise RuntimeError(f"expected a result, got {resp}")

    async def close(self) -> None:
        self.queue.put_nowait(spb.StreamRequest(control=spb.StreamControl(command=spb.StreamControl.COMMAND_CLOSE)))
        while await self.call.read() is not grpc.aio.EOF:
            pass
        self.queue.put_nowait(None)


def _uvloop_run(coro):
    import uvloop

    return uvloop.run(coro)


@scenario("grpc_stream_echo")
def grpc_stream_echo() -> dict:
    n, warm = 1000, 100

    async def go(address: str) -> tuple[list[float], list[float]]:
        rtt, engine_s = [], []
        async with grpc.aio.insecure_channel(address) as ch:
            p = _Pinger(ch, [("echo", "EchoNode")])
            await p.ready()
            buf = audio_buffer(320)
            for i in range(n + warm):
                t = time.perf_counter()
                p.send(buf, i)
                r = await p.result()
                dt = time.perf_counter() - t
                if i >= warm:
                    rtt.append(dt)
                    engine_s.append(r.processing_time_ms / 1000)
            await p.close()
        return rtt, engine_s

    with served(metrics_every_n_chunks=0) as srv:
        before = srv.cpu_seconds()
        rtt, engine_s = _uvloop_run(go(srv.address))
        after = srv.cpu_seconds()
    cpu = {k: (after[k] - before[k]) / (n + warm) * 1e6 for k in ("engine", "client")}
    p50, e50 = pct(rtt, .5), pct(engine_s, .5)
    return {"series": {"stream chunk → result, 1 multiprocess EchoNode, 320 f32": {"values": rtt, "unit": "s"},
                       "  of which in the engine (chunk read → result built)": {"values": engine_s, "unit": "s"}},
            "notes": f"engine share of the p50 round trip: {100 * e50 / p50:.0f}%; the rest is gRPC "
                     f"(both sides' HTTP/2, protobuf, the client loop). CPU per chunk (session start "
                     f"included): engine process {cpu['engine']:.0f} µs, client {cpu['client']:.0f} µs",
            "targets": {"p50 ≤ 2 ms": f"{'met' if p50 <= 0.002 else 'MISSED'} ({p50 * 1e3:.3f} ms)"}}


@scenario("grpc_concurrent_streams")
def grpc_concurrent_streams() -> dict:
    """Real-time streams of 16 kHz audio, each through its own multiprocess
    EchoNode, one chunk per chunk-duration per stream: how many are held with
    p99 chunk latency ≤ 50 ms, for 20 ms chunks and for 100 ms chunks."""
    seconds = 6.0
    plans = {0.020: os.environ.get("BENCH_STREAM_LEVELS_20MS", "10,20,30,40,50"),
             0.100: os.environ.get("BENCH_STREAM_LEVELS_100MS", "25,50,75,100,125")}

    async def level(srv: Served, k: int, period: float) -> tuple[list[float], dict[str, float]]:
        lat: list[float] = []
        n = int(seconds / period)
        async with grpc.aio.insecure_channel(srv.address) as ch:
            pingers = [_Pinger(ch, [("echo", "EchoNode")]) for _ in range(k)]
            await asyncio.gather(*(p.ready() for p in pingers))
            buf = audio_buffer(int(16000 * period))
            before = srv.cpu_seconds()

            async def run(p: _Pinger, offset: float) -> None:
                await asyncio.sleep(offset)
                start = time.perf_counter()
                sent: dict[int, float] = {}
                receiver = asyncio.get_running_loop().create_task(receive(p, sent))
                for i in range(n):
                    await asyncio.sleep(max(0.0, start + i * period - time.perf_counter()))
                    sent[i] = time.perf_counter()
                    p.send(buf, i)
                await receiver

            async def receive(p: _Pinger, sent: dict[int, float]) -> None:
                for _ in range(n):
                    r = await p.result()
                    if r.sequence * period >= 0.5:  # skip each stream's first half second
                        lat.append(time.perf_counter() - sent[r.sequence])

            await asyncio.gather(*(run(p, i * period / k) for i, p in enumerate(pingers)))
            after = srv.cpu_seconds()  # node processes are still alive here
            await asyncio.gather(*(p.close() for p in pingers))
        cpu = {part: (after[part] - before[part]) / (k * n) * 1e6 for part in after}
        return lat, cpu

    series, held, notes = {}, {}, []
    with served(metrics_every_n_chunks=0) as srv:
        for period, levels in plans.items():
            ms = round(period * 1000)
            held[ms] = 0
            for k in (int(x) for x in levels.split(",")):
                lat, cpu = _uvloop_run(level(srv, k, period))
                series[f"{k} streams, {ms} ms chunks"] = {"values": lat, "unit": "s"}
                notes.append(f"{k}×{ms} ms: engine {cpu['engine']:.0f} µs, node processes {cpu['nodes']:.0f} µs, "
                             f"client {cpu['client']:.0f} µs")
                if pct(lat, .99) > 0.050:
                    break
                held[ms] = k
    return {"series": series,
            "notes": "client and server share the 2 vCPUs; each chunk size stops at its first level with "
                     "p99 > 50 ms. CPU per chunk: " + "; ".join(notes),
            "targets": {f"≥ 50 streams at p99 ≤ 50 ms, {ms} ms chunks":
                        f"{'met' if n >= 50 else 'MISSED'} ({n} held)" for ms, n in held.items()}}
