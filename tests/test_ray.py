"""Nodes on a Ray cluster (engine.executors.ray_cluster): a real two-node
cluster made by `ray start` (deploy/local_ray_cluster.py), one node declaring a GPU.
Placement by capabilities, the same outputs as local execution, streaming
nodes and turn events, init progress, flush, backpressure, the node's own
errors, an actor killed and its node removed, placements the cluster cannot
hold, cancel; and after each, nothing left in the cluster (Ray's state API)
nor in this process (the leak probe).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import psutil
import pytest
from conftest import TEST_IPC_ROOT, eventually, manifest, probed_engine, send_while_reading

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
from local_ray_cluster import RayCluster

from engine import RuntimeData
from engine.errors import NodeExecutionError, ResourceLimitError, ValidationError
from engine.executors.ray_cluster import Machine
from nodes.testing import checksum

pytestmark = pytest.mark.multiprocess

GPU = {"gpu": {"type": "cuda", "min_memory_gb": 8}}


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster().start()
    try:
        yield c
    finally:
        c.stop()


def _gpu_nodes(cluster: RayCluster) -> list[str]:
    from ray.util.state import list_nodes

    return [n.node_id for n in list_nodes(address=cluster.dashboard)
            if n.state == "ALIVE" and n.resources_total.get("GPU")]


def _gpu_node_id(cluster: RayCluster) -> str:
    return _gpu_nodes(cluster)[0]


def _ray(cluster: RayCluster, **settings) -> dict:
    return {"ray": {"address": cluster.address, "place_by_capabilities": True, "idle_disconnect_secs": 0,
                    **settings}}


def _audio(i: int, n: int = 1024) -> RuntimeData:
    return RuntimeData.audio(np.random.default_rng(i).standard_normal(n).astype(np.float32), 16000)


async def _nothing_left(cluster: RayCluster) -> None:
    await eventually(lambda: not cluster.alive_actors(), "the session's actors to be gone from the cluster", 20)


async def _stream(engine, m, frames, source="pass"):
    async with engine.stream(m) as session:
        for f in frames:
            await session.send(source, f)
        await session.close()
        return [o async for o in session], session


async def test_a_gpu_node_lands_on_the_gpu_node_and_the_others_do_not(cluster):
    m = manifest([{"id": "pass", "node_type": "PassThroughNode"},
                  {"id": "gpu", "node_type": "EchoNode", "capabilities": GPU},
                  {"id": "cpu", "node_type": "EchoNode", "executor": "ray"},
                  {"id": "sum", "node_type": "ChecksumNode"}])
    frames = [_audio(i) for i in range(20)]
    async with probed_engine(**_ray(cluster)) as engine:
        assert Machine.this().lacks(GPU) == "needs a cuda GPU; this machine has none"
        plan = engine.plan(m)[1]
        assert [plan.nodes[n].executor for n in ("pass", "gpu", "cpu", "sum")] == \
            ["native", "ray", "ray", "multiprocess"]
        outs, session = await _stream(engine, m, frames)
        assert [o.data.value["checksum"] for o in outs] == [checksum(f) for f in frames]
        nodes = session.snapshot()["nodes"]
        gpu_node = _gpu_node_id(cluster)
        assert nodes["gpu"]["extra"]["ray_node_id"] == gpu_node
        assert nodes["cpu"]["extra"]["ray_node_id"] != gpu_node
        assert nodes["gpu"]["items_in"] == nodes["gpu"]["items_out"] == 20
        connection = engine.ray_executor().connection
        assert connection.connects == 1
        # idle_disconnect_secs = 0: the driver process ended with the session (the leak probe checks it)
        await eventually(lambda: not connection.connected, "the engine to let go of the cluster")
    await _nothing_left(cluster)


async def test_a_mixed_pipeline_gives_the_same_outputs_as_all_local(cluster):
    def chain(where: str) -> dict:
        return manifest([{"id": "pass", "node_type": "PassThroughNode"},
                         {"id": "rs", "node_type": "AudioResampleNode", "executor": where,
                          "params": {"target_sample_rate": 24000}},
                         {"id": "echo", "node_type": "EchoNode"}])
    frames = [_audio(i, 480) for i in range(40)]
    async with probed_engine(**_ray(cluster)) as engine:
        local, _ = await _stream(engine, chain("native"), frames)
        remote, _ = await _stream(engine, chain("ray"), frames)
    # the resampler keeps state across frames and flushes its tail at the end
    assert len(remote) == len(local) >= len(frames) - 1
    for a, b in zip(remote, local, strict=True):
        assert a.data.sample_rate == b.data.sample_rate == 24000
        np.testing.assert_array_equal(a.data.samples, b.data.samples)
    await _nothing_left(cluster)


async def test_large_frames_travel_through_the_object_store(cluster):
    # 1 MiB frames (over Ray's inline limit: the object store, read in place
    # on the actor); HoldNode keeps them all and answers at the flush
    frames = [RuntimeData.tensor(np.full(1 << 20, i % 251, np.uint8)) for i in range(12)]
    m = manifest([{"id": "pass", "node_type": "PassThroughNode"},
                  {"id": "hold", "node_type": "HoldNode", "executor": "ray"}])
    async with probed_engine(**_ray(cluster)) as engine:
        outs, _ = await _stream(engine, m, frames)
    assert [o.data.value["checksum"] for o in outs] == [checksum(f) for f in frames]
    assert not any(o.data.value["writable"] for o in outs)  # views of the object store, not copies
    await _nothing_left(cluster)


async def test_a_streaming_node_and_turn_events_on_the_cluster(cluster):
    m = manifest([{"id": "a", "node_type": "TurnProbeNode", "executor": "native"},
                  {"id": "p", "node_type": "TurnProbeNode", "executor": "ray", "params": {"burn_ms": 1}}])
    async with probed_engine(**_ray(cluster)) as engine:
        outs, _ = await _stream(engine, m, [RuntimeData.text("p work t1 5"), RuntimeData.text("a event commit t2")],
                                source="a")
    texts = [o.data.text for o in outs if o.data.kind.name == "TEXT"]
    assert texts == [f"t1:{i}" for i in range(5)]  # an async generator's outputs, in order
    seen = [o.data.value for o in outs if o.data.kind.name == "JSON" and o.node_id == "p"]
    assert {"saw": "commit", "turn_id": "t2", "source": "a", "data": {"sent_by": "a"}, "at": "p"} in seen
    await _nothing_left(cluster)


async def test_init_progress_is_relayed(cluster):
    m = manifest([{"id": "slow", "node_type": "SlowInitNode", "executor": "ray",
                   "params": {"init_ms": 300, "steps": 3}}])
    progress = []
    async with probed_engine(**_ray(cluster)) as engine:
        async with engine.stream(m, on_progress=progress.append) as session:
            await session.send("slow", _audio(0))
            await session.close()
            assert len([o async for o in session]) == 1
    phases = [(p.node_id, p.phase) for p in progress]
    assert phases[0] == ("slow", "placed") and progress[0].message.startswith("on Ray node ")
    assert ("slow", "loading") in phases and ("slow", "loaded") in phases
    await _nothing_left(cluster)


async def test_a_slow_actor_slows_the_sender_and_loses_nothing(cluster):
    frames = [_audio(i) for i in range(60)]
    m = manifest([{"id": "pass", "node_type": "PassThroughNode"},
                  {"id": "slow", "node_type": "SleepNode", "executor": "ray", "params": {"sleep_ms": 10}}])
    async with probed_engine(**_ray(cluster), channel_capacity=2, output_queue_capacity=2) as engine:
        async with engine.stream(m) as session:
            seen, ahead = await send_while_reading(session, "pass", frames)
    assert seen == list(range(60))
    # 2 calls in flight on the actor, 2 queued before it, 2 outputs queued after it (and one in hand each)
    assert max(ahead) <= 2 + 2 + 2 + 3
    await _nothing_left(cluster)


async def test_the_nodes_own_error_is_typed(cluster):
    m = manifest([{"id": "pass", "node_type": "PassThroughNode"},
                  {"id": "crash", "node_type": "CrashNode", "executor": "ray", "params": {"after": 3}}])
    async with probed_engine(**_ray(cluster)) as engine:
        with pytest.raises(NodeExecutionError) as err:
            await _stream(engine, m, [_audio(i) for i in range(10)])
    assert err.value.node_id == "crash"
    assert "failing on purpose after 3 items" in err.value.message
    assert err.value.context["ray_ip"] and err.value.context["sequence"] == 3
    await _nothing_left(cluster)


async def test_an_actor_killed_is_the_nodes_typed_error(cluster):
    m = manifest([{"id": "pass", "node_type": "PassThroughNode"},
                  {"id": "far", "node_type": "EchoNode", "executor": "ray"}])
    async with probed_engine(**_ray(cluster)) as engine:
        async with engine.stream(m) as session:
            await session.send("pass", _audio(0))
            pid = session.runners["far"].placed["pid"]
            os.kill(pid, signal.SIGKILL)  # between frames: the watch notices, not the next call
            await session.wait_closed()
            err = session.error
            assert isinstance(err, NodeExecutionError), err
            assert err.node_id == "far" and "Ray actor died" in err.message
    await _nothing_left(cluster)


async def test_a_node_removed_is_the_nodes_typed_error(cluster):
    m = manifest([{"id": "pass", "node_type": "PassThroughNode"},
                  {"id": "gpu", "node_type": "EchoNode", "capabilities": GPU}])
    try:
        async with probed_engine(**_ray(cluster)) as engine:
            async with engine.stream(m) as session:
                await session.send("pass", _audio(0))
                lost = cluster.lose_node(session.runners["gpu"].placed["ray_node_id"])  # the GPU machine gone
                await session.wait_closed()
                err = session.error
                assert isinstance(err, NodeExecutionError), err
                assert err.node_id == "gpu" and "Ray actor died" in err.message
                await asyncio.to_thread(psutil.wait_procs, lost, 10)
    finally:
        await asyncio.to_thread(cluster.add_gpu_node)
        # until Ray has marked the lost node dead, it may still place actors there
        await eventually(lambda: len(_gpu_nodes(cluster)) == 1, "Ray to see exactly one GPU node", 60)
    await _nothing_left(cluster)


async def test_a_placement_no_node_can_hold_fails_at_start(cluster):
    for caps, resource in (({"memory_gb": 4096}, "memory 4096.0 GB"), ({"cpu": {"cores": 64}}, "CPU 64")):
        m = manifest([{"id": "big", "node_type": "EchoNode", "executor": "ray", "capabilities": caps}])
        async with probed_engine(**_ray(cluster)) as engine:
            with pytest.raises(ResourceLimitError) as err:
                async with engine.stream(m):
                    pass
        assert err.value.node_id == "big" and resource in err.value.message
        assert err.value.context["field"] == "capabilities"
    await _nothing_left(cluster)


async def test_a_full_cluster_fails_at_start_within_the_init_timeout(cluster):
    m = manifest([{"id": "gpu", "node_type": "EchoNode", "capabilities": GPU}])
    async with probed_engine(**_ray(cluster), init_timeout_secs=3) as engine:
        async with engine.stream(m) as first:  # holds the cluster's one GPU
            with pytest.raises(ResourceLimitError) as err:
                async with engine.stream(m):
                    pass
            assert err.value.node_id == "gpu" and "no room" in err.value.message and "GPU 1" in err.value.message
            await first.send("gpu", _audio(0))
            await first.close()
            assert len([o async for o in first]) == 1
    await _nothing_left(cluster)  # the actor that was never placed is gone too


async def test_cancel_kills_the_sessions_actors(cluster):
    m = manifest([{"id": "pass", "node_type": "PassThroughNode"},
                  {"id": "a", "node_type": "SleepNode", "executor": "ray", "params": {"sleep_ms": 50}},
                  {"id": "b", "node_type": "EchoNode", "executor": "ray"}])
    async with probed_engine(**_ray(cluster)) as engine:
        async with engine.stream(m) as session:
            for i in range(5):
                await session.send("pass", _audio(i))
            assert len(cluster.alive_actors()) == 2  # one actor per node, this session's own
            await session.cancel()
        await _nothing_left(cluster)


async def test_sessions_share_one_connection_and_the_engine_lets_go_when_idle(cluster):
    m = manifest([{"id": "e", "node_type": "EchoNode", "executor": "ray"}])
    async with probed_engine(**_ray(cluster, idle_disconnect_secs=1)) as engine:
        for _ in range(2):
            outs, _ = await _stream(engine, m, [_audio(0)], source="e")
            assert len(outs) == 1
        connection = engine.ray_executor().connection
        assert connection.connects == 1
        await eventually(lambda: not connection.connected, "the engine to disconnect when idle")
    await _nothing_left(cluster)


async def test_validation_says_where_nodes_go_and_needs_a_cluster(tmp_path):
    m = manifest([{"id": "pass", "node_type": "PassThroughNode"},
                  {"id": "gpu", "node_type": "EchoNode", "capabilities": GPU},
                  {"id": "far", "node_type": "EchoNode", "executor": "ray"}])
    async with probed_engine(ray={"place_by_capabilities": True}) as engine:
        with pytest.raises(ValidationError) as err:
            engine.validate(m)
    assert [(i.node_id, i.field) for i in err.value.issues] == [("gpu", "capabilities"), ("far", "executor")]
    assert "needs a cuda GPU" in err.value.issues[0].message and "[ray] address" in err.value.issues[0].message
    async with probed_engine() as engine:  # capabilities alone move nothing unless asked to
        local = manifest([{"id": "gpu", "node_type": "EchoNode", "capabilities": GPU}])
        assert engine.plan(local)[1].nodes["gpu"].executor == "multiprocess"
    # the CLI says which nodes go where
    path, cfg = tmp_path / "m.json", tmp_path / "runtime.toml"
    path.write_bytes(orjson.dumps(m))
    cfg.write_text(f'ipc_root = "{TEST_IPC_ROOT}"\ntest_nodes = true\n'
                   '[ray]\naddress = "10.0.0.9:6379"\nplace_by_capabilities = true\n')
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "engine", "validate", str(path), "--config", str(cfg)],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "  pass: native" in run.stdout
    assert "  gpu: ray (needs a cuda GPU; this machine has none; cluster 10.0.0.9:6379)" in run.stdout
    assert '  far: ray (executor "ray"; cluster 10.0.0.9:6379)' in run.stdout


async def test_a_cluster_that_does_not_answer_is_the_nodes_typed_error():
    m = manifest([{"id": "far", "node_type": "EchoNode", "executor": "ray"}])
    async with probed_engine(ray={"address": "127.0.0.1:9"}) as engine:
        with pytest.raises(NodeExecutionError) as err:
            async with engine.stream(m):
                pass
    assert err.value.node_id == "far" and "cannot connect to the Ray cluster at '127.0.0.1:9'" in err.value.message


async def test_a_grpc_client_declares_a_gpu_and_its_node_runs_on_the_cluster(cluster, make_server):
    import grpc
    from grpc_client import CLOSE, chunk, collect, init, proto_manifest, requests

    from engine._proto import streaming_pb2_grpc as spb_grpc
    from engine.server import wire

    server = await make_server(**_ray(cluster))
    m = proto_manifest([("pass", "PassThroughNode"), ("gpu", "EchoNode"), ("sum", "ChecksumNode")])
    m.nodes[1].capabilities.gpu.type = "cuda"  # as a remotemedia.v1 client declares it
    m.nodes[1].capabilities.gpu.required = True
    frames = [_audio(i) for i in range(50)]
    async with grpc.aio.insecure_channel(server.address) as ch:
        call = spb_grpc.StreamingPipelineServiceStub(ch).StreamPipeline(requests(
            init(m), *(chunk("pass", f, i) for i, f in enumerate(frames)), CLOSE))
        responses = await collect(call)
        assert await call.code() == grpc.StatusCode.OK
    sums = [(r.result.sequence, wire.from_proto(r.result.data_outputs["sum"]).value["checksum"])
            for r in responses if r.WhichOneof("response") == "result"]
    assert sums == [(i, checksum(f)) for i, f in enumerate(frames)]
    progress = [r.init_progress for r in responses if r.WhichOneof("response") == "init_progress"]
    assert any(p.node_id == "gpu" and p.message.startswith("on Ray node") for p in progress)
    assert responses[-1].closed.final_metrics.node_metrics["gpu"].items_processed == 50
    await _nothing_left(cluster)


async def test_an_engine_killed_leaves_nothing_in_the_cluster(cluster, tmp_path):
    import grpc
    from grpc_client import chunk, init, proto_manifest, until_ready
    from test_serve_cli import ServeProcess

    from engine._proto import streaming_pb2_grpc as spb_grpc

    cfg = tmp_path / "runtime.toml"
    cfg.write_text(f'ipc_root = "{TEST_IPC_ROOT}"\ntest_nodes = true\nstandby_processes = 0\n'
                   f'[ray]\naddress = "{cluster.address}"\n')
    serve = await ServeProcess.launch(cfg)
    try:
        m = proto_manifest([("pass", "PassThroughNode"), ("far", "EchoNode")], executor={"far": "ray"})
        async with grpc.aio.insecure_channel(serve.address) as ch:
            call = spb_grpc.StreamingPipelineServiceStub(ch).StreamPipeline()
            await call.write(init(m))
            await until_ready(call)
            await call.write(chunk("pass", _audio(0), 0))
            assert (await call.read()).WhichOneof("response") == "result"
            assert len(cluster.alive_actors()) == 1
            driver = [p for p in psutil.Process(serve.proc.pid).children() if "rme-ray-driver" in " ".join(p.cmdline())]
            assert len(driver) == 1
            await serve.kill()  # kill -9 of the engine, mid-session
            call.cancel()
        # its driver sees the engine gone, kills the session's actor and exits
        await eventually(lambda: not driver[0].is_running() or driver[0].status() == psutil.STATUS_ZOMBIE,
                         "the engine's Ray driver process to exit", 20)
        await _nothing_left(cluster)
    finally:
        await serve.kill()
        from engine.ipc import iox

        iox.sweep_stale(TEST_IPC_ROOT)  # the killed engine's files (crash recovery is not this test's subject)


async def test_a_node_that_hangs_on_its_actor_fails_at_process_timeout(cluster):
    m = manifest([{"id": "pass", "node_type": "PassThroughNode"},
                  {"id": "stuck", "node_type": "CrashNode", "executor": "ray", "params": {"mode": "hang"}}],
                 multiprocess={"process_timeout_secs": 1})
    async with probed_engine(**_ray(cluster)) as engine:
        with pytest.raises(NodeExecutionError) as err:
            await _stream(engine, m, [_audio(0)])
    assert err.value.node_id == "stuck" and "process_timeout_secs=1" in err.value.message
    assert err.value.context["field"] == "process_timeout_secs"
    await _nothing_left(cluster)
