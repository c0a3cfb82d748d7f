"""An engine killed with SIGKILL leaves shared memory behind; the next engine
(or `remotemedia-engine cleanup`) removes all of it, and never a live engine's.

Each test has its own `ipc_root` (short: a listener's socket path must fit
in 108 bytes, which pytest's tmp_path does not), so the engines of other test
runs on this machine are not in its way; /dev/shm is shared, so files there
are told apart by the engine prefix `rme<pid>x<token>_`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from conftest import eventually, manifest, probed_engine
from grpc_client import CLOSE, chunk, init, proto_manifest
from test_serve_cli import ServeProcess, _alive

from engine import RuntimeData
from engine._proto import streaming_pb2_grpc as spb_grpc
from engine.server import wire

pytestmark = pytest.mark.multiprocess

ECHO2 = proto_manifest([("a", "EchoNode"), ("b", "EchoNode")])
#: 1 MiB frames: bigger than the channels' first segment, so they grow while in flight
BIG = RuntimeData.tensor(np.arange(1 << 18, dtype=np.float32))
CHANNEL_OPTS = [("grpc.max_receive_message_length", 64 << 20)]


@pytest.fixture
def ipc_root():
    root = tempfile.mkdtemp(prefix="rmc", dir="/tmp")
    yield Path(root)
    shutil.rmtree(root, ignore_errors=True)


def engine_files(pid: int, root) -> set[str]:
    """Every file in /dev/shm and under `root` of the engine with this pid."""
    tag = f"rme{pid}x"
    found = {f"/dev/shm/{f}" for f in os.listdir("/dev/shm") if f.startswith(tag)}
    for d, _, files in os.walk(root):
        if tag in d:
            found.update(os.path.join(d, f) for f in files)
    return found


async def serve(tmp_path, root, name: str) -> tuple[ServeProcess, object]:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'ipc_root = "{root}"\ntest_nodes = true\n')
    return await ServeProcess.launch(cfg), cfg


class Stream:
    """One streaming call with a queue of requests (the test sends when it wants)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.call = spb_grpc.StreamingPipelineServiceStub(channel).StreamPipeline(self._requests())

    async def _requests(self):
        while (item := await self.queue.get()) is not None:
            yield item

    async def ready(self, manifest=ECHO2) -> None:
        self.queue.put_nowait(init(manifest))
        resp = await self.call.read()
        assert resp.WhichOneof("response") == "ready", f"no ready: {resp.WhichOneof('response')} {resp.error}"

    async def echo(self, seq: int, frame: RuntimeData) -> RuntimeData:
        self.queue.put_nowait(chunk("a", frame, seq))
        resp = await self.call.read()
        assert resp.WhichOneof("response") == "result", f"no result: {resp.WhichOneof('response')} {resp.error}"
        return wire.from_proto(resp.result.data_outputs["b"])


async def kill_mid_session(tmp_path, root, name: str) -> tuple[int, set[str]]:
    """Start `serve`, stream large frames through two node processes, SIGKILL
    the engine with frames in flight; returns its pid and the files it left."""
    srv, _cfg = await serve(tmp_path, root, name)
    pid = srv.proc.pid
    try:
        async with grpc.aio.insecure_channel(srv.address, options=CHANNEL_OPTS) as ch:
            stream = Stream(ch)
            await stream.ready()
            out = await stream.echo(0, BIG)
            assert np.array_equal(out.array, BIG.array)
            for seq in range(1, 9):  # in flight when the engine dies
                stream.queue.put_nowait(chunk("a", BIG, seq))
            children = {p.pid for p in psutil.Process(pid).children(recursive=True)}
            assert len(children) >= 3, f"expected a zygote and two node processes, got {children}"
            await srv.kill()
            stream.call.cancel()
    finally:
        await srv.kill()  # (at once, if the test failed before)
    await eventually(lambda: not _alive(children), "the dead engine's node processes to exit")
    left = engine_files(pid, root)
    assert any(f.startswith("/dev/shm/") for f in left) and any(not f.startswith("/dev/shm/") for f in left), (
        f"the killed engine left no files to recover ({left}): the test shows nothing")
    return pid, left


async def test_the_next_engine_removes_every_file_of_an_engine_killed_mid_session(tmp_path, ipc_root):
    pid, _left = await kill_mid_session(tmp_path, ipc_root, "dead")
    async with probed_engine(ipc_root=str(ipc_root)):
        assert engine_files(pid, ipc_root) == set(), "the new engine left the dead one's files"


async def test_cleanup_command_removes_a_dead_engines_files_and_prints_them(tmp_path, ipc_root):
    pid, left = await kill_mid_session(tmp_path, ipc_root, "dead")
    cfg = tmp_path / "cleanup.toml"
    cfg.write_text(f'ipc_root = "{ipc_root}"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine", "cleanup", "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0
    assert f"of dead engine rme{pid}x" in out, out
    printed = {line.strip() for line in out.splitlines() if line.startswith("  ")}
    assert left <= printed, f"not printed: {sorted(left - printed)[:5]}"
    assert engine_files(pid, ipc_root) == set()


async def test_engines_side_by_side_do_not_remove_each_others_files(tmp_path, ipc_root):
    """A running engine keeps its files and its session while another engine
    starts, runs process nodes, closes, and `cleanup` runs."""
    srv, cfg = await serve(tmp_path, ipc_root, "live")
    try:
        async with grpc.aio.insecure_channel(srv.address, options=CHANNEL_OPTS) as ch:
            stream = Stream(ch)
            await stream.ready()
            assert np.array_equal((await stream.echo(0, BIG)).array, BIG.array)
            before = engine_files(srv.proc.pid, ipc_root)
            async with probed_engine(ipc_root=str(ipc_root)) as other:
                m = manifest([{"id": "e", "node_type": "EchoNode"}])
                result = await other.execute(m, {"e": RuntimeData.text("hi")})
                assert result.outputs["e"].text == "hi"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine", "cleanup", "--config", str(cfg),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            out = (await proc.communicate())[0].decode()
            assert f"left alone: engine rme{srv.proc.pid}x" in out, out
            missing = before - engine_files(srv.proc.pid, ipc_root)
            assert not missing, f"the live engine lost files: {sorted(missing)[:5]}"
            for seq in range(1, 4):  # its session goes on, losslessly
                assert np.array_equal((await stream.echo(seq, BIG)).array, BIG.array)
            stream.queue.put_nowait(CLOSE)
            stream.queue.put_nowait(None)
            while await stream.call.read() is not grpc.aio.EOF:
                pass
        srv.proc.terminate()
        assert await srv.wait() == 0
        assert engine_files(srv.proc.pid, ipc_root) == set(), "a clean exit left files"
    finally:
        await srv.kill()
