"""Soak: many streaming sessions with node processes against one `serve`,
a fault in every tenth (client drop, node kill -9, node hang), and the
engine's resources sampled along the way.

Used by the `soak` scenario (1,000 sequential + 50 concurrent sessions) and,
shorter, by tests/test_soak.py. Each sample is taken when the engine is
quiet (no node process left, the zygote's standbys back, its idle trim of
free memory done), so counts of fds, threads and files compare exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil

from engine import RuntimeData
from engine._proto import execution_pb2 as epb
from engine._proto import streaming_pb2 as spb
from engine._proto import streaming_pb2_grpc
from engine.server import wire
from engine.server.process import IDLE_TRIM_SECS
from engine.zygote import NODE_NAME, STANDBY_NAME

FAULTS = ("client_drop", "node_kill", "node_hang")
#: process_timeout_secs of the hanging sessions: their "own work" in the teardown bound
HANG_TIMEOUT_S = 0.5
CLOSE = spb.StreamRequest(control=spb.StreamControl(command=spb.StreamControl.COMMAND_CLOSE))


def _manifest(hang: bool) -> epb.PipelineManifest:
    m = epb.PipelineManifest(version="v1", metadata=epb.ManifestMetadata(name="soak"))
    if hang:
        m.metadata.multiprocess_json = json.dumps({"process_timeout_secs": HANG_TIMEOUT_S})
    m.nodes.add(id="a", node_type="EchoNode")
    if hang:
        m.nodes.add(id="b", node_type="CrashNode", params=json.dumps({"after": 0, "mode": "hang"}))
    else:
        m.nodes.add(id="b", node_type="EchoNode")
    m.connections.add(**{"from": "a", "to": "b"})
    return m


@dataclass
class Sample:
    sessions: int
    rss_mib: float
    fds: int
    threads: int
    shm_files: int
    iox_files: int


@dataclass
class SoakResult:
    samples: list[Sample] = field(default_factory=list)
    teardown_s: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in ("clean", *FAULTS)})
    sessions: int = 0
    lost_frames: int = 0
    unexpected: list[str] = field(default_factory=list)

    def growth(self, warm: Sample) -> dict[str, float]:
        end = self.samples[-1]
        return {"rss_pct": 100 * (end.rss_mib - warm.rss_mib) / warm.rss_mib,
                "fds": end.fds - warm.fds, "threads": end.threads - warm.threads,
                "shm_files": end.shm_files - warm.shm_files, "iox_files": end.iox_files - warm.iox_files}


class Soak:
    def __init__(self, address: str, engine_pid: int, ipc_root: str, standbys: int = 1) -> None:
        self.address = address
        self.engine = psutil.Process(engine_pid)
        self.ipc_root = ipc_root
        self.standbys = standbys
        self.result = SoakResult()
        self.frame = RuntimeData.tensor(np.random.default_rng(0).standard_normal(4096).astype(np.float32))
        self.crc = zlib.crc32(self.frame.array.tobytes())

    # ------------------------------------------------------------ the engine's resources

    def _named(self, name: str) -> list[psutil.Process]:
        out = []
        for p in self.engine.children(recursive=True):
            try:
                if p.name() == name and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    async def quiet(self, timeout_s: float = 30.0, settle: bool = True) -> None:
        """Wait until no node process is left (and, with `settle`, the standbys are back)."""
        async with asyncio.timeout(timeout_s):
            while self._named(NODE_NAME) or (settle and len(self._named(STANDBY_NAME)) < self.standbys):  # noqa: ASYNC110 - other processes' state
                await asyncio.sleep(0.01)
            if settle:
                await asyncio.sleep(0.1)  # a standby's files and fds are made just after it forks

    async def sample(self) -> Sample:
        await self.quiet()
        # and past the engine's idle housekeeping (engine.server.process.trim_when_idle)
        await asyncio.sleep(IDLE_TRIM_SECS + 0.5)
        tag = f"rme{self.engine.pid}x"
        iox = 0
        for d in Path(self.ipc_root).glob(f"{tag}*"):  # noqa: ASYNC240 - a few entries, between sessions
            iox += sum(len(files) for _, _, files in os.walk(d))
        s = Sample(self.result.sessions, self.engine.memory_info().rss / 2**20, self.engine.num_fds(),
                   self.engine.num_threads(), sum(f.startswith(tag) for f in os.listdir("/dev/shm")), iox)
        self.result.samples.append(s)
        return s

    # ------------------------------------------------------------ one session

    async def session(self, channel: grpc.aio.Channel, fault: str | None, frames: int = 5,
                      measure: bool = True) -> None:
        stub = streaming_pb2_grpc.StreamingPipelineServiceStub(channel)
        queue: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (item := await queue.get()) is not None:
                yield item

        call = stub.StreamPipeline(requests())
        queue.put_nowait(spb.StreamRequest(init=spb.StreamInit(manifest=_manifest(fault == "node_hang"))))
        first = await call.read()
        if first.WhichOneof("response") != "ready":
            self.result.unexpected.append(f"no ready: {first}")
            queue.put_nowait(None)
            call.cancel()
            return
        seq = itertools.count()
        if fault == "node_hang":
            queue.put_nowait(self._chunk(next(seq)))
            t0 = time.perf_counter()
            kinds = await self._until_end(call, queue)
            self._ended("node_hang", t0, kinds, expect="error", own=HANG_TIMEOUT_S, measure=measure)
            queue.put_nowait(None)
            return
        for _ in range(frames):
            queue.put_nowait(self._chunk(next(seq)))
            resp = await call.read()
            while resp.WhichOneof("response") == "metrics":  # sent now and then, between results
                resp = await call.read()
            if resp.WhichOneof("response") != "result":
                self.result.unexpected.append(f"{fault}: {resp.WhichOneof('response')} {resp.error.message}")
                queue.put_nowait(None)
                call.cancel()
                return
            out = wire.from_proto(resp.result.data_outputs["b"])
            if zlib.crc32(out.array.tobytes()) != self.crc:
                self.result.lost_frames += 1
        t0 = time.perf_counter()
        if fault == "client_drop":
            queue.put_nowait(None)  # (the request generator ends; the call is dropped as it runs)
            call.cancel()
            if measure:  # gone means its node processes are gone
                await self.quiet(settle=False)
                self.result.teardown_s["client_drop"].append(time.perf_counter() - t0)
            return
        if fault == "node_kill":
            victims = self._named(NODE_NAME)
            if victims:
                os.kill(victims[0].pid, signal.SIGKILL)
            t0 = time.perf_counter()
            queue.put_nowait(self._chunk(next(seq)))
            kinds = await self._until_end(call, queue)
            self._ended("node_kill", t0, kinds, expect="error", own=0.0, measure=measure)
            queue.put_nowait(None)
            return
        queue.put_nowait(CLOSE)
        queue.put_nowait(None)
        kinds = await self._until_end(call, queue)
        self._ended("clean", t0, kinds, expect="closed", own=0.0, measure=measure)

    def _chunk(self, seq: int) -> spb.StreamRequest:
        return spb.StreamRequest(data_chunk=spb.DataChunk(node_id="a", buffer=wire.to_proto(self.frame),
                                                          sequence=seq))

    async def _until_end(self, call, queue: asyncio.Queue) -> list[str]:
        """Read to the end; half-close once the answer is an error (as a client that is done would)."""
        kinds = []
        try:
            while (resp := await call.read()) is not grpc.aio.EOF:
                kinds.append(resp.WhichOneof("response"))
                if kinds[-1] == "error":
                    queue.put_nowait(None)
        except grpc.aio.AioRpcError as exc:
            kinds.append(f"status {exc.code().name}")
        return kinds

    def _ended(self, what: str, t0: float, kinds: list[str], *, expect: str, own: float, measure: bool) -> None:
        if expect not in kinds and not (what == "node_kill" and "closed" in kinds):
            self.result.unexpected.append(f"{what}: ended with {kinds}")
        if measure:
            self.result.teardown_s[what].append(max(0.0, time.perf_counter() - t0 - own))

    # ------------------------------------------------------------ the run

    async def run(self, sequential: int, concurrent: int, sample_every: int, warm_up: int,
                  fault_every: int = 10) -> SoakResult:
        options = [("grpc.max_receive_message_length", 64 << 20)]
        faults = itertools.cycle(FAULTS)
        async with grpc.aio.insecure_channel(self.address, options=options) as channel:
            # warm-up: sequential sessions, then one burst as wide as the concurrent
            # phase, so bounded pools (the loop's executor threads, the allocator's
            # arenas) reach the size the run will use before the first sample
            for _ in range(warm_up):
                await self.session(channel, None, measure=False)
            await asyncio.gather(*(self.session(channel, None, measure=False) for _ in range(concurrent)))
            await self.sample()
            for i in range(1, sequential + 1):
                fault = next(faults) if i % fault_every == 0 else None
                await self.session(channel, fault)
                self.result.sessions += 1
                if i % sample_every == 0:
                    await self.sample()
            fault_kinds = [next(faults) if i % fault_every == 0 else None for i in range(1, concurrent + 1)]
            # node_kill among concurrent sessions kills some session's node: any of them may fail
            await asyncio.gather(*(self.session(channel, f if f != "node_kill" else "client_drop", measure=False)
                                   for f in fault_kinds))
            self.result.sessions += concurrent
            await self.sample()
        return self.result


def served_config(ipc_root: str) -> str:
    return (f'ipc_root = "{ipc_root}"\ntest_nodes = true\n[caps]\nmax_sessions = 256\n'
            f"max_total_processes = 256\n")


__all__ = ["FAULTS", "Sample", "Soak", "SoakResult", "served_config"]
