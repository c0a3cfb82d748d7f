"""`remotemedia-engine serve` as a real process: SIGTERM drains, exit code 0, nothing left."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from conftest import TEST_IPC_ROOT
from grpc_client import CLOSE, chunk, collect, init, kinds, proto_manifest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import RuntimeData
from engine._proto import streaming_pb2_grpc as spb_grpc
from engine.server import wire


class ServeProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.address = ""
        self._pump: asyncio.Task | None = None

    @classmethod
    async def start(cls, tmp_path, **server: object) -> ServeProcess:
        cfg = tmp_path / "runtime.toml"
        body = "\n".join(f"{k} = {v!r}" for k, v in server.items())
        cfg.write_text(f'ipc_root = "{TEST_IPC_ROOT}"\ntest_nodes = true\n[server]\n{body}\n')
        return await cls.launch(cfg)

    @classmethod
    async def launch(cls, cfg: os.PathLike[str] | str, env: dict[str, str] | None = None,
                     blocked: set[signal.Signals] | None = None) -> ServeProcess:
        """`serve` with config file `cfg` (and environment `env`), once it listens; started
        with the `blocked` signals blocked, as a parent script may leave them."""
        def block() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked or set())

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine", "serve", "--port", "0", "--config", str(cfg),
            stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, env=env,
            preexec_fn=block if blocked else None)
        self = cls(proc)
        async with asyncio.timeout(60):
            while not self.address:
                line = (await proc.stderr.readline()).decode()
                assert line, "server exited: " + "".join(self.lines)
                self.lines.append(line)
                if m := re.search(r"serving remotemedia\.v1 on (\S+):(\d+)", line):
                    self.address = f"{m.group(1)}:{m.group(2)}"
        self._pump = asyncio.get_running_loop().create_task(self._read_rest())
        return self

    async def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode())

    async def wait(self) -> int:
        async with asyncio.timeout(60):
            code = await self.proc.wait()
            if self._pump is not None:
                await self._pump
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._pump is not None:
            await self._pump


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}


async def test_sigterm_drains_running_sessions_then_exits_zero(tmp_path):
    srv = await ServeProcess.start(tmp_path, drain_timeout_secs=60.0)
    try:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            queue: asyncio.Queue = asyncio.Queue()

            async def gen():
                while (item := await queue.get()) is not None:
                    yield item

            stub = spb_grpc.StreamingPipelineServiceStub(ch)
            call = stub.StreamPipeline(gen())
            queue.put_nowait(init(proto_manifest([("sum", "ChecksumNode")])))
            assert (await call.read()).WhichOneof("response") == "ready"
            queue.put_nowait(chunk("sum", RuntimeData.audio(np.ones(64, np.float32), 16000), 0))
            first = await call.read()
            node_pid = wire.from_proto(first.result.data_outputs["sum"]).value["pid"]
            assert _alive({node_pid})

            srv.proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(ch)
            async with asyncio.timeout(30):
                # health is what a load balancer polls; so does this test: NOT_SERVING,
                # then no answer at all once the server takes no new call
                while True:
                    try:
                        status = (await health.Check(health_pb2.HealthCheckRequest())).status
                    except grpc.aio.AioRpcError as exc:  # refused, or cut off as it stopped
                        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                        break
                    assert status in (health_pb2.HealthCheckResponse.SERVING,
                                      health_pb2.HealthCheckResponse.NOT_SERVING)
                    await asyncio.sleep(0.02)
            # new sessions are refused at the connection level while draining (a balancer
            # sends them elsewhere), not in-band ...
            async def only_init():
                yield init(proto_manifest([("e", "EchoNode")]))
                await asyncio.Event().wait()

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect(stub.StreamPipeline(only_init()))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError):  # a new connection: the listener is closed
                async with grpc.aio.insecure_channel(srv.address) as fresh:
                    await health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=2)
            # ... the running one finishes normally
            queue.put_nowait(chunk("sum", RuntimeData.audio(np.ones(64, np.float32), 16000), 1))
            queue.put_nowait(CLOSE)
            rest = await collect(call)
            queue.put_nowait(None)
            assert kinds(rest) == ["result", "closed"]
            assert await call.code() == grpc.StatusCode.OK
        assert await srv.wait() == 0
    finally:
        await srv.kill()
    assert not _alive({node_pid})
    assert any("draining" in line for line in srv.lines)


async def test_drain_deadline_tears_down_sessions_that_do_not_finish(tmp_path):
    srv = await ServeProcess.start(tmp_path, drain_timeout_secs=0.5)
    try:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            hold = asyncio.Event()

            async def gen():
                yield init(proto_manifest([("sum", "ChecksumNode")]))
                yield chunk("sum", RuntimeData.text("x"), 0)
                await hold.wait()

            call = spb_grpc.StreamingPipelineServiceStub(ch).StreamPipeline(gen())
            assert (await call.read()).WhichOneof("response") == "ready"
            node_pid = wire.from_proto((await call.read()).result.data_outputs["sum"]).value["pid"]
            srv.proc.send_signal(signal.SIGINT)
            rest = await collect(call)  # the server ends the call once the deadline passes
            hold.set()
            assert kinds(rest)[-1] == "error"
            assert "shutting down" in rest[-1].error.message
            assert await call.code() == grpc.StatusCode.OK
        assert await srv.wait() == 0
    finally:
        await srv.kill()
    assert not _alive({node_pid})
    assert any("tearing them down" in line for line in srv.lines)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"rme{srv.proc.pid}x")]


async def test_sigterm_drains_a_server_started_with_its_signals_blocked(tmp_path):
    """A parent that blocks SIGINT/SIGTERM while it starts children (deploy/local_cluster.py did)
    leaves them blocked in the child: serve unblocks them, so SIGTERM still drains."""
    cfg = tmp_path / "runtime.toml"
    cfg.write_text(f'ipc_root = "{TEST_IPC_ROOT}"\n')
    srv = await ServeProcess.launch(cfg, blocked={signal.SIGINT, signal.SIGTERM})
    try:
        status = await asyncio.to_thread(Path(f"/proc/{srv.proc.pid}/status").read_text)
        blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk")), 16)
        assert not blocked & (1 << (signal.SIGTERM - 1)), "serve still blocks SIGTERM"
        srv.proc.send_signal(signal.SIGTERM)
        assert await srv.wait() == 0, "".join(srv.lines)
        assert any("signal received: draining" in line for line in srv.lines), "".join(srv.lines)
    finally:
        await srv.kill()
