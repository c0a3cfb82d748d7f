"""/dev/shm too small: a session whose channels do not fit fails at start
with RESOURCE_LIMIT naming the node (and a frame that would grow a channel
past the room fails its session the same way), never with SIGBUS; the
engine goes on serving sessions that fit.

The test mounts a 16 MiB tmpfs on a folder of its own and fills it with a
ballast file to leave the room it wants; the engine runs as `serve` in its
own mount namespace (unshare, as root) with that tmpfs bound over /dev/shm,
so nothing else on the machine sees a small /dev/shm.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile

import grpc
import numpy as np
import pytest
from grpc_client import CLOSE, chunk, collect, init, kinds, proto_manifest, requests
from test_serve_cli import ServeProcess

from engine import ErrorType, RuntimeData
from engine._proto import streaming_pb2_grpc as spb_grpc

pytestmark = pytest.mark.multiprocess

SHM_MIB = 16


@pytest.fixture
def small_shm():
    """A 16 MiB tmpfs on a folder of the test's own; unmounted after."""
    folder = tempfile.mkdtemp(prefix="rmshm", dir="/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SHM_MIB}m", "tmpfs", folder], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=True)
        os.rmdir(folder)


def leave_room(folder: str, mib: float) -> None:
    """Fill the tmpfs with a ballast file (real pages) until `mib` MiB are left."""
    path = os.path.join(folder, "ballast")
    if os.path.exists(path):
        os.unlink(path)
    st = os.statvfs(folder)
    size = st.f_bavail * st.f_frsize - int(mib * 2**20)
    if size > 0:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)


async def serve_with_small_shm(tmp_path, shm: str) -> ServeProcess:
    root = tempfile.mkdtemp(prefix="rms", dir="/tmp")
    cfg = tmp_path / "runtime.toml"
    cfg.write_text(f'ipc_root = "{root}"\ntest_nodes = true\nstandby_processes = 0\n')
    script = (f"mount --bind {shm} /dev/shm && exec {sys.executable} -m engine serve "
              f"--port 0 --config {cfg}")
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    srv = ServeProcess(proc)
    srv.root = root  # type: ignore[attr-defined]
    async with asyncio.timeout(60):
        while not srv.address:
            line = (await proc.stderr.readline()).decode()
            assert line, "server exited: " + "".join(srv.lines)
            srv.lines.append(line)
            if m := re.search(r"serving remotemedia\.v1 on (\S+):(\d+)", line):
                srv.address = f"{m.group(1)}:{m.group(2)}"
    srv._pump = asyncio.get_running_loop().create_task(srv._read_rest())
    return srv


async def run(channel, capacity: int | None, frame: RuntimeData):
    mp = {"channel_capacity": capacity} if capacity else None
    call = spb_grpc.StreamingPipelineServiceStub(channel).StreamPipeline(requests(
        init(proto_manifest([("e", "EchoNode")], multiprocess=mp)), chunk("e", frame, 1), CLOSE))
    return await collect(call)


async def test_sessions_that_do_not_fit_in_dev_shm_fail_typed_and_the_rest_are_served(tmp_path, small_shm):
    small = RuntimeData.tensor(np.arange(1000, dtype=np.float32))
    srv = await serve_with_small_shm(tmp_path, small_shm)
    try:
        async with grpc.aio.insecure_channel(srv.address, options=[
                ("grpc.max_receive_message_length", 64 << 20)]) as ch:
            ok = await run(ch, 4, small)
            assert "result" in kinds(ok) and kinds(ok)[-1] == "closed", kinds(ok)

            leave_room(small_shm, 0.5)  # a node's two channels need 1.25 MiB to start
            full = await run(ch, 4, small)
            assert kinds(full) == ["error"], kinds(full)
            err = full[0].error
            assert err.error_type == ErrorType.RESOURCE_LIMIT.value and err.failing_node_id == "e", err
            assert "not enough shared memory for the channels of node 'e'" in err.message, err.message

            leave_room(small_shm, 3)  # room to start, not for a 4 MiB slot
            grows = await run(ch, 4, RuntimeData.tensor(np.zeros(3 << 18, np.float32)))  # 3 MiB
            assert kinds(grows)[0] == "ready" and kinds(grows)[-1] == "error", kinds(grows)
            err = grows[-1].error
            assert err.error_type == ErrorType.RESOURCE_LIMIT.value and err.failing_node_id == "e", err
            assert "MiB frame to node 'e'" in err.message, err.message

            leave_room(small_shm, SHM_MIB)  # ballast gone: the same sessions fit
            again = await run(ch, 4, small)
            assert "result" in kinds(again) and kinds(again)[-1] == "closed", kinds(again)
            big = await run(ch, 4, RuntimeData.tensor(np.zeros(3 << 18, np.float32)))
            assert "result" in kinds(big) and kinds(big)[-1] == "closed", kinds(big)
        assert srv.proc.returncode is None, "the engine died"
        srv.proc.terminate()
        assert await srv.wait() == 0
    finally:
        await srv.kill()
        shutil.rmtree(srv.root, ignore_errors=True)  # type: ignore[attr-defined]
