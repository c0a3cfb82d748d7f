"""Node plugins: the example plugin package (examples/plugin), installed with
pip into a folder of its own, served by a real `remotemedia-engine serve` in
its own node process; broken plugins reported by name while the rest load;
runtime.toml `[nodes] modules`; the `nodes` command; a `nodes.py` that hides
the built-in package.

Nothing is installed into the shared environment: the plugins reach the
engine's processes through PYTHONPATH only.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from conftest import TEST_IPC_ROOT, eventually
from grpc_client import CLOSE, buffer, chunk, collect, init, kinds, proto_manifest
from test_serve_cli import ServeProcess, _alive

from engine import RuntimeData
from engine._proto import common_pb2 as pb
from engine._proto import execution_pb2 as epb
from engine._proto import execution_pb2_grpc as epb_grpc
from engine._proto import streaming_pb2_grpc as spb_grpc
from engine.server import wire
from engine.zygote import NODE_NAME

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

#: a module for runtime.toml `[nodes] modules`: one node defined in it, one
#: only imported into it (which must not register a second time)
EXTRA_NODES = '''
import os

from engine.data import RuntimeData
from engine.node import Node
from nodes.basic import PassThroughNode  # imported, not defined here: not registered again


class WhereNode(Node):
    """Answers the pid of the process it runs in."""

    node_type = "WhereNode"
    multiprocess = True

    def process(self, frame):
        return RuntimeData.json({"pid": os.getpid()})
'''

#: a second distribution whose entry points each fail in a way of their own
BROKEN_ENTRY_POINTS = """\
[remotemedia.nodes]
MissingNode = broken_plugin_missing.nodes:MissingNode
NotANode = json:dumps
PassThroughNode = broken_plugin_taken:PassThroughNode
Renamed = broken_plugin_taken:RenamedNode
"""

BROKEN_TAKEN = '''
from engine.node import Node


class PassThroughNode(Node):
    node_type = "PassThroughNode"  # a built-in's node type

    def process(self, frame):
        return frame


class RenamedNode(Node):
    node_type = "RenamedNode"  # not the entry point's name: loads, with a warning

    def process(self, frame):
        return frame
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """A folder holding the installed example plugin, the broken distribution
    and the runtime.toml module, for PYTHONPATH."""
    tmp = tmp_path_factory.mktemp("plugins")
    # built from a copy: an in-tree build leaves build/ and *.egg-info in the repository
    source = shutil.copytree(ROOT / "examples" / "plugin", tmp / "plugin-src")
    site = tmp / "site"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"pip could not install the example plugin:\n{res.stdout}{res.stderr}"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(BROKEN_ENTRY_POINTS)
    (site / "broken_plugin_taken.py").write_text(BROKEN_TAKEN)
    (site / "extra_nodes.py").write_text(EXTRA_NODES)
    return site


def plugin_env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{site}"}


def write_config(tmp_path: Path, nodes: str = 'modules = ["extra_nodes", "no_such_module"]') -> Path:
    cfg = tmp_path / "runtime.toml"
    cfg.write_text(f'ipc_root = "{TEST_IPC_ROOT}"\n[nodes]\n{nodes}\n')
    return cfg


def nodes_cli(site: Path, cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", "nodes", "--config", str(cfg), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=plugin_env(site))


async def start_server(site: Path, cfg: Path) -> ServeProcess:
    return await ServeProcess.launch(cfg, env=plugin_env(site))


def node_processes_of(pid: int) -> set[int]:
    """The node processes (not the zygote, not a standby) below process `pid`."""
    out = set()
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if p.name() == NODE_NAME:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def leftovers(pid: int) -> list[str]:
    """Shared-memory and iceoryx2 files of the engine of process `pid`."""
    prefix = f"rme{pid}x"
    found = [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]
    if os.path.isdir(TEST_IPC_ROOT):
        found += [f for f in os.listdir(TEST_IPC_ROOT) if f.startswith(prefix)]
    return found


async def stream_once(stub, manifest, node_id: str, frame: RuntimeData, server_pid: int):
    """One chunk through a stream; returns the decoded output and the node
    processes below the server while the session was open."""
    queue: asyncio.Queue = asyncio.Queue()

    async def gen():
        while (item := await queue.get()) is not None:
            yield item

    call = stub.StreamPipeline(gen())
    queue.put_nowait(init(manifest))
    assert (first := await call.read()).WhichOneof("response") == "ready", first
    queue.put_nowait(chunk(node_id, frame, 0))
    resp = await call.read()
    assert resp.WhichOneof("response") == "result", resp
    running = node_processes_of(server_pid)
    queue.put_nowait(CLOSE)
    rest = await collect(call)
    queue.put_nowait(None)
    assert kinds(rest) == ["closed"], rest
    await eventually(lambda: not _alive(running), "the session's node processes to exit")
    outputs = {k: wire.from_proto(v) for k, v in resp.result.data_outputs.items()}
    return outputs, running


async def test_served_plugin_runs_in_its_own_process_and_fails_typed(plugin_site, tmp_path):
    import leakprobe

    before = leakprobe.snapshot()
    srv = await start_server(plugin_site, write_config(tmp_path))
    pids: set[int] = set()
    try:
        log = "".join(srv.lines)
        # the broken plugins are reported by name at start-up ...
        assert "entry point MissingNode (broken-plugin) did not load: ModuleNotFoundError" in log
        assert "entry point NotANode (broken-plugin) did not load: TypeError" in log
        assert "'PassThroughNode' is already registered by built-in" in log
        assert "module no_such_module (runtime.toml) did not load: ModuleNotFoundError" in log
        assert "entry point Renamed (broken-plugin) registers node type 'RenamedNode'" in log
        async with grpc.aio.insecure_channel(srv.address) as ch:
            # ... and the rest still load
            version = await epb_grpc.PipelineExecutionServiceStub(ch).GetVersion(epb.VersionRequest())
            types = set(version.version_info.supported_node_types)
            assert {"GainNode", "WhereNode", "PassThroughNode", "AudioChunkerNode"} <= types
            assert not {"MissingNode", "NotANode"} & types

            stub = spb_grpc.StreamingPipelineServiceStub(ch)
            quarter = RuntimeData.audio(np.full(480, 0.25, np.float32), 16000)
            outputs, running = await stream_once(
                stub, proto_manifest([("gain", "GainNode", {"gain": 2.0})]), "gain", quarter, srv.proc.pid)
            np.testing.assert_array_equal(outputs["gain"].samples, np.full(480, 0.5, np.float32))
            assert len(running) == 1, f"expected GainNode's process below the server, got {running}"
            assert srv.proc.pid not in running
            pids |= running

            # a runtime.toml module's node runs in a process of its own too
            outputs, running = await stream_once(
                stub, proto_manifest([("where", "WhereNode")]), "where", quarter, srv.proc.pid)
            where_pid = outputs["where"].value["pid"]
            assert running == {where_pid}, f"WhereNode answered pid {where_pid}, node processes {running}"
            pids |= running

            # the plugin's own failure reaches the client typed, naming the node
            req = epb.ExecuteRequest(manifest=proto_manifest([("gain", "GainNode", {"gain": 8.0})]))
            req.data_inputs["gain"].CopyFrom(buffer(quarter))
            resp = await epb_grpc.PipelineExecutionServiceStub(ch).ExecutePipeline(req)
            assert resp.WhichOneof("outcome") == "error", resp
            assert resp.error.error_type == pb.ERROR_TYPE_NODE_EXECUTION, resp.error
            assert resp.error.failing_node_id == "gain"
            assert "gain 8 clips the audio" in resp.error.message
        srv.proc.send_signal(signal.SIGTERM)
        assert await srv.wait() == 0, "".join(srv.lines)
    finally:
        await srv.kill()
    assert not _alive(pids), f"node processes left running: {_alive(pids)}"
    assert not any("cannot preload" in line for line in srv.lines), "".join(srv.lines)
    assert leftovers(srv.proc.pid) == []
    assert leakprobe.leaks(before) == {}


def test_nodes_json_lists_plugins_with_their_source_and_failures(plugin_site, tmp_path):
    res = nodes_cli(plugin_site, write_config(tmp_path), "--json")
    assert res.returncode == 1, f"a plugin failed, so the exit code says so:\n{res.stderr}"
    listing = json.loads(res.stdout)
    nodes = {n["node_type"]: n for n in listing["nodes"]}
    gain = nodes["GainNode"]
    assert gain["source"] == {"kind": "entry_point", "name": "GainNode", "distribution": "remotemedia-gain",
                              "value": "remotemedia_gain.nodes:GainNode"}
    assert gain["executor"] == "multiprocess" and gain["executor_overridable"] is True
    assert gain["input_types"] == ["audio"] and gain["output_types"] == ["audio"]
    assert gain["params_schema"]["properties"]["gain"]["default"] == 1.0
    assert gain["class"] == "remotemedia_gain.nodes:GainNode"
    assert nodes["WhereNode"]["source"] == {"kind": "module", "name": "extra_nodes"}
    assert nodes["PassThroughNode"]["source"] == {"kind": "builtin"}
    assert nodes["RenamedNode"]["source"]["name"] == "Renamed"
    assert "EchoNode" not in nodes  # test nodes are off in this configuration
    failed = {f["name"]: f for f in listing["failed"]}
    assert set(failed) == {"MissingNode", "NotANode", "PassThroughNode", "no_such_module"}
    assert failed["MissingNode"]["error"].startswith("ModuleNotFoundError: No module named 'broken_plugin_missing'")
    assert failed["MissingNode"]["source"]["distribution"] == "broken-plugin"
    assert "is not a subclass of engine.Node" in failed["NotANode"]["error"]
    assert "already registered by built-in (nodes.basic:PassThroughNode)" in failed["PassThroughNode"]["error"]
    assert failed["no_such_module"]["source"] == {"kind": "module", "name": "no_such_module"}


def test_nodes_text_table_and_entry_points_off(plugin_site, tmp_path):
    res = nodes_cli(plugin_site, write_config(tmp_path, 'modules = ["extra_nodes"]'))
    assert res.returncode == 1, res.stderr
    gain = next(line for line in res.stdout.splitlines() if line.startswith("GainNode "))
    assert gain.split() == ["GainNode", "multiprocess", "audio", "->", "audio", "entry", "point", "GainNode",
                            "(remotemedia-gain)"]
    assert "failed to load (3):" in res.stdout
    assert "entry point MissingNode (broken-plugin): ModuleNotFoundError" in res.stdout

    off = nodes_cli(plugin_site, write_config(tmp_path, 'entry_points = false\nmodules = ["extra_nodes"]'))
    assert off.returncode == 0, off.stderr
    assert "node type" not in off.stderr, off.stderr  # a plugin that loads is not news on every command
    assert "GainNode" not in off.stdout and "failed" not in off.stdout
    assert any(line.startswith("WhereNode ") and line.endswith("module extra_nodes (runtime.toml)")
               for line in off.stdout.splitlines())


def test_embedded_engine_loads_plugins_and_runs_them_either_executor(plugin_site, tmp_path):
    """Engine() in an app's own process: the same registry, the same outputs
    in a node process and in the engine."""
    import leakprobe

    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(f'''
        import asyncio, json
        import numpy as np
        from engine import Engine, RuntimeData

        def manifest(executor):
            return {{"version": "v1", "metadata": {{"name": "gain"}}, "nodes": [
                {{"id": "g", "node_type": "GainNode", "params": {{"gain": 3.0}}, "executor": executor}}],
                "connections": []}}

        async def main():
            async with Engine({{"ipc_root": "{TEST_IPC_ROOT}"}}) as engine:
                spec = engine.registry.get("GainNode")
                frame = RuntimeData.audio(np.linspace(-0.3, 0.3, 64, dtype=np.float32), 16000)
                outs = {{}}
                for executor in ("multiprocess", "native"):
                    result = await engine.execute(manifest(executor), {{"g": frame}})
                    outs[executor] = result.outputs["g"].samples.tolist()
                print(json.dumps({{"source": str(spec.source), "outputs": outs,
                                  "failed": [f.source.name for f in engine.registry.failures]}}))

        asyncio.run(main())
    '''))
    before = leakprobe.snapshot()
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=plugin_env(plugin_site))
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["source"] == "entry point GainNode (remotemedia-gain)"
    expected = (np.linspace(-0.3, 0.3, 64, dtype=np.float32) * np.float32(3.0)).tolist()
    assert got["outputs"] == {"multiprocess": expected, "native": expected}
    assert sorted(got["failed"]) == ["MissingNode", "NotANode", "PassThroughNode"]
    assert leakprobe.leaks(before) == {}


def test_an_apps_nodes_py_that_hides_the_builtin_package_is_named(tmp_path):
    (tmp_path / "nodes.py").write_text("from engine import Node\n\n\nclass MyNode(Node):\n"
                                       "    node_type = 'MyNode'\n")
    (tmp_path / "app.py").write_text("import nodes\nfrom engine import Engine\n\nEngine()\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    res = subprocess.run([sys.executable, "app.py"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=env)
    assert res.returncode != 0
    assert "ShadowedNodesPackageError" in res.stderr, res.stderr
    assert f"the module 'nodes' imported from {tmp_path / 'nodes.py'} is not remotemedia-engine's" in res.stderr
    assert f"Rename {tmp_path / 'nodes.py'}" in res.stderr
    assert "has no attribute 'builtin_nodes'" not in res.stderr

    # the command line says the same in one line, without a traceback
    cli = subprocess.run([sys.executable, "-m", "engine", "nodes"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=env)
    assert cli.returncode == 2
    assert cli.stderr.startswith("error: the module 'nodes' imported from "), cli.stderr
    assert "Traceback" not in cli.stderr
