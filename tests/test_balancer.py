"""Many engines behind nginx (deploy/): real engines and a real nginx as
processes on loopback. Sessions spread over the engines; a rolling restart of
every engine under a steady load of streaming sessions loses none and refuses
none; when every engine is full, the answer is the engine's own typed
RESOURCE_LIMIT. Nothing of any engine is left afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from conftest import TEST_IPC_ROOT
from grpc_client import CLOSE, chunk, collect, init, proto_manifest, until_ready

from engine import RuntimeData
from engine._proto import common_pb2 as pb
from engine._proto import streaming_pb2_grpc as spb_grpc
from engine.server import wire
from nodes.testing import checksum

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
from local_cluster import Cluster  # noqa: E402

pytestmark = pytest.mark.multiprocess

PIPELINE = proto_manifest([("pass", "PassThroughNode"), ("sum", "ChecksumNode")])


def _free_ports(n: int) -> int:
    """A base port with the n ports after it free (nginx + engines bind them)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65535 and all(_free(base + i) for i in range(n + 1)):
            return base
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def cluster_config(tmp_path):
    def write(**settings: object) -> str:
        cfg = tmp_path / "engine.toml"
        caps = settings.pop("max_sessions", None)
        lines = [f'ipc_root = "{TEST_IPC_ROOT}"', "test_nodes = true", "standby_processes = 0",
                 "[server]", "drain_timeout_secs = 30.0"]
        if caps is not None:
            lines += ["[caps]", f"max_sessions = {caps}"]
        cfg.write_text("\n".join(lines) + "\n")
        return str(cfg)
    return write


def _engine_of(node_pid: int, cluster: Cluster) -> int:
    """Which engine (its index) a node process belongs to."""
    engines = {e.proc.pid: i for i, e in enumerate(cluster.engines) if e.proc is not None}
    for parent in psutil.Process(node_pid).parents():
        if parent.pid in engines:
            return engines[parent.pid]
    raise AssertionError(f"node process {node_pid} is under no engine")


def _nothing_left(pids: set[int]) -> None:
    alive = {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
    assert not alive
    for pid in pids:
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"rme{pid}x")]


async def _session(stub, n: int = 3, pause_s: float = 0.0) -> tuple[list[int], str]:
    """One streaming session: n chunks, each checksum checked; (node pids, how it ended)."""
    frames = [RuntimeData.audio(np.random.default_rng(i).standard_normal(256).astype(np.float32), 16000)
              for i in range(n)]

    async def reqs():
        yield init(PIPELINE)
        for i, f in enumerate(frames):
            yield chunk("pass", f, i)
            if pause_s:
                await asyncio.sleep(pause_s)
        yield CLOSE

    call = stub.StreamPipeline(reqs())
    responses = await collect(call)
    results = [r.result for r in responses if r.WhichOneof("response") == "result"]
    errors = [r.error for r in responses if r.WhichOneof("response") == "error"]
    if errors:
        return [], f"error: {errors[0].message}"
    got = [wire.from_proto(r.data_outputs["sum"]).value for r in results]
    assert [g["checksum"] for g in got] == [checksum(f) for f in frames]
    assert responses[-1].WhichOneof("response") == "closed"
    return [g["pid"] for g in got], "ok"


async def test_sessions_spread_over_the_engines(cluster_config):
    with Cluster(3, _free_ports(4), cluster_config()) as cluster:
        engine_pids = {e.proc.pid for e in cluster.engines}
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            stub = spb_grpc.StreamingPipelineServiceStub(ch)
            hold = asyncio.Event()
            running: list[int] = []

            async def session_on_engine() -> int:
                async def reqs():
                    yield init(PIPELINE)
                    yield chunk("pass", RuntimeData.audio(np.ones(64, np.float32), 16000), 0)
                    await hold.wait()
                    yield CLOSE

                call = stub.StreamPipeline(reqs())
                while (resp := await call.read()).WhichOneof("response") != "result":
                    pass
                # while the session runs, its node process is under its engine
                running.append(_engine_of(wire.from_proto(resp.result.data_outputs["sum"]).value["pid"], cluster))
                if len(running) == 20:  # all 20 at once, then let go
                    hold.set()
                rest = await collect(call)
                assert rest[-1].WhichOneof("response") == "closed"
                return running[-1]

            async with asyncio.timeout(60):
                await asyncio.gather(*(session_on_engine() for _ in range(20)))
        assert len(set(running)) > 1, "every session landed on one engine"
    _nothing_left(engine_pids)


async def test_a_rolling_restart_under_load_loses_and_refuses_no_session(cluster_config):
    counts = {"started": 0, "ok": 0}
    failures: list[str] = []
    with Cluster(3, _free_ports(4), cluster_config()) as cluster:
        pids = {e.proc.pid for e in cluster.engines}
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            stub = spb_grpc.StreamingPipelineServiceStub(ch)
            stop = asyncio.Event()

            async def client() -> None:
                while not stop.is_set():
                    counts["started"] += 1
                    try:
                        _, how = await _session(stub, n=5, pause_s=0.05)
                    except grpc.aio.AioRpcError as exc:
                        how = f"{exc.code().name}: {exc.details()}"
                    if how == "ok":
                        counts["ok"] += 1
                    else:
                        failures.append(how)

            clients = [asyncio.get_running_loop().create_task(client()) for _ in range(4)]
            await asyncio.sleep(1.0)  # a steady load first
            before = counts["started"]
            for i in range(len(cluster.engines)):
                exit_code = await asyncio.to_thread(cluster.restart, i)
                assert exit_code == 0, cluster.engines[i].lines
                pids.add(cluster.engines[i].proc.pid)
                await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*clients)
        log = (cluster.prefix / "error.log").read_text()
    assert failures == [], (failures[:3], log[-3000:])
    assert counts["ok"] == counts["started"] and counts["started"] > before + 10
    _nothing_left(pids)


async def test_when_every_engine_is_full_the_answer_is_resource_limit(cluster_config):
    with Cluster(2, _free_ports(3), cluster_config(max_sessions=2)) as cluster:
        pids = {e.proc.pid for e in cluster.engines}
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            stub = spb_grpc.StreamingPipelineServiceStub(ch)
            hold = asyncio.Event()

            async def held():
                yield init(PIPELINE)
                await hold.wait()
                yield CLOSE

            calls = [stub.StreamPipeline(held()) for _ in range(4)]
            for call in calls:  # 2 per engine: least_conn sends each to the emptier one
                await until_ready(call)
            refused = await collect(stub.StreamPipeline(held()))
            assert refused[0].WhichOneof("response") == "error"
            assert refused[0].error.error_type == pb.ERROR_TYPE_RESOURCE_LIMIT
            assert "max_sessions" in refused[0].error.context
            hold.set()
            for call in calls:
                await collect(call)
    _nothing_left(pids)


def _recipe() -> list[str]:
    """The docs' command line for the local cluster, as a newcomer would type it."""
    root = Path(__file__).resolve().parent.parent
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            if "deploy/local_cluster.py" in line and line.lstrip().startswith("python"):
                return line.split("#")[0].split()
    raise AssertionError("no `python deploy/local_cluster.py` line in README.md or docs/")


def test_the_cluster_recipe_runs_as_written_and_ctrl_c_drains_it(tmp_path):
    """The docs' recipe, with the plain `python` on PATH (it has no engine: the script runs itself
    with the project's venv), its port moved to a free one; SIGINT drains every engine, and
    nothing of them is left: no process, no nginx folder, no shared memory."""
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    cmd = _recipe()
    assert "--config" not in cmd, "the recipe names a config file a fresh clone does not have"
    engines = int(cmd[cmd.index("--engines") + 1])
    cmd[cmd.index("--port") + 1] = str(_free_ports(engines))
    python = shutil.which("python3") or shutil.which("python")
    assert python, "no python on PATH"
    nginx_dirs = set(Path(tempfile.gettempdir()).glob("rme-nginx-*"))
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # started as `... &` from a script starts it: SIGINT ignored (it still stops on it)
    proc = subprocess.Popen([python, *cmd[1:]], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()
        assert line.startswith("nginx on "), line + proc.stderr.read() if proc.poll() is not None else line
        children = psutil.Process(proc.pid).children(recursive=True)
        engine_pids = [c.pid for c in children if "serve" in c.cmdline()]
        assert len(engine_pids) == engines
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped" in out
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(c.pid) and c.status() != psutil.STATUS_ZOMBIE for c in children):
        assert time.monotonic() < deadline, "a process of the cluster outlived it"
        time.sleep(0.05)
    assert set(Path(tempfile.gettempdir()).glob("rme-nginx-*")) == nginx_dirs
    assert not [f for f in os.listdir("/dev/shm") if any(f.startswith(f"rme{pid}x") for pid in engine_pids)]


def test_the_cluster_script_says_why_it_cannot_start(tmp_path):
    """A port in use, a missing config: one line, exit 1, nothing started or left."""
    import subprocess
    import tempfile

    script = str(Path(__file__).resolve().parent.parent / "deploy" / "local_cluster.py")
    nginx_dirs = set(Path(tempfile.gettempdir()).glob("rme-nginx-*"))
    missing = subprocess.run([sys.executable, script, "--engines", "1", "--config", str(tmp_path / "runtime.toml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "cannot read config" in missing.stderr and "Traceback" not in missing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        clash = subprocess.run([sys.executable, script, "--engines", "1", "--port", str(port - 1)],
                               capture_output=True, text=True, timeout=60)
    assert clash.returncode == 1, clash.stderr
    assert "already in use" in clash.stderr and "Traceback" not in clash.stderr, clash.stderr
    assert set(Path(tempfile.gettempdir()).glob("rme-nginx-*")) == nginx_dirs
