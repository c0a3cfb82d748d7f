"""Prewarmed node processes: started before any session (generic, or with
their node initialized ahead), each used by one session only.

Every test closes its engine under the leak probe: prewarmed processes and
their channels must go with the engine.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

import numpy as np
import psutil
import pytest
from conftest import eventually, manifest, probed_engine
from leakprobe import TEST_IPC_ROOT

from engine import Engine, RuntimeData
from engine.errors import ValidationError
from nodes.testing import checksum

pytestmark = pytest.mark.multiprocess


def node_processes(engine: Engine) -> set[int]:
    from grpc_client import node_processes as descendants

    return {p for p in descendants(engine.process_manager().zygote_pid)
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE}


@pytest.fixture
async def prewarmed():
    async with probed_engine(prewarm_processes=2) as engine:
        yield engine


def pool_pids(engine: Engine) -> set[int]:
    return {p.pid for p in engine.process_manager().pool.idle}


async def test_engine_start_fills_the_pool(prewarmed):
    assert len(pool_pids(prewarmed)) == 2
    assert node_processes(prewarmed) == pool_pids(prewarmed)
    assert prewarmed.process_count == 2


async def test_a_session_runs_in_a_prewarmed_process_used_once(prewarmed):
    warm = pool_pids(prewarmed)
    frame = RuntimeData.audio(np.arange(4096, dtype=np.float32), 16000)
    async with prewarmed.stream(manifest([{"id": "sum", "node_type": "ChecksumNode"}])) as s:
        pid = s.runners["sum"].pid
        assert pid in warm
        await s.send("sum", frame)
        await s.close()
        outs = [o async for o in s]
    assert outs[0].data.value["checksum"] == checksum(frame)
    # the used process is gone, never handed to another session; the pool is refilled
    await eventually(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                   "the used process to exit")
    await eventually(lambda: len(pool_pids(prewarmed)) == 2, "the pool to refill")
    assert pid not in pool_pids(prewarmed)


async def test_sessions_beyond_the_pool_start_their_own_processes(prewarmed):
    warm = pool_pids(prewarmed)
    m = manifest([{"id": f"e{i}", "node_type": "EchoNode"} for i in range(3)])
    async with prewarmed.stream(m) as s:
        pids = {r.pid for r in s.runners.values()}
        assert len(pids & warm) == 2 and len(pids) == 3
        for i in range(3):
            await s.send(f"e{i}", RuntimeData.text(f"t{i}"))
        await s.close()
        assert sorted([d.text async for d in _data(s)]) == ["t0", "t1", "t2"]


async def test_other_channel_capacity_does_not_use_the_pool(prewarmed):
    warm = pool_pids(prewarmed)
    m = manifest([{"id": "e", "node_type": "EchoNode"}], multiprocess={"channel_capacity": 7})
    async with prewarmed.stream(m) as s:
        assert s.runners["e"].pid not in warm
        await s.send("e", RuntimeData.text("x"))
        await s.close()
        assert [d.text async for d in _data(s)] == ["x"]
    assert pool_pids(prewarmed) == warm


async def _data(session):
    async for o in session:
        yield o.data


async def test_a_dead_prewarmed_process_is_replaced(prewarmed):
    victim = next(iter(pool_pids(prewarmed)))
    os.kill(victim, signal.SIGKILL)
    await eventually(lambda: victim not in pool_pids(prewarmed) and len(pool_pids(prewarmed)) == 2,
                   "a replacement")
    async with prewarmed.stream(manifest([{"id": "e", "node_type": "EchoNode"}])) as s:
        await s.send("e", RuntimeData.text("ok"))
        await s.close()
        assert [d.text async for d in _data(s)] == ["ok"]


async def test_prewarm_processes_is_validated():
    with pytest.raises(ValidationError, match="prewarm_processes"):
        Engine({"prewarm_processes": 9, "caps": {"max_total_processes": 4}})
    with pytest.raises(ValidationError, match="prewarm_processes"):
        Engine({"prewarm_processes": -1})


# ---------------------------------------------------------------- initialized ahead (prewarm_nodes)

PROBE = "InitProbeNode"


def probe(node_id: str = "probe", **params: Any) -> dict[str, Any]:
    return {"id": node_id, "node_type": PROBE, "params": params}


def keep(node_type: str = PROBE, count: int = 1, **params: Any) -> dict[str, Any]:
    """Config keeping `count` processes with `node_type` initialized with `params`."""
    return {"prewarm_nodes": [{"node_type": node_type, "params": params, "count": count}]}


def initialized_pids(engine: Engine) -> set[int]:
    """Idle processes whose node was initialized ahead (every shelf but the generic one)."""
    return {p.pid for key, shelf in engine.process_manager().pool.shelves.items() if key is not None
            for p in shelf.idle}


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def run_probe(engine: Engine, m: dict[str, Any], node_id: str = "probe") -> tuple[dict, list[str]]:
    """One session of `m`, one frame to `node_id`: (what the probe said, its init progress phases)."""
    progress: list[Any] = []
    async with engine.stream(m, on_progress=progress.append) as s:
        await s.send(node_id, RuntimeData.text("x"))
        await s.close()
        (said,) = [o.data.value async for o in s]
    return said, [p.phase for p in progress if p.node_id == node_id]


async def test_a_node_runs_in_the_process_initialized_ahead_for_it(caplog):
    async with probed_engine(**keep(tag="a")) as engine:
        (warm,) = initialized_pids(engine)
        assert node_processes(engine) == {warm}
        caplog.set_level(logging.INFO, logger="engine.node")  # after the prewarm: the Bind carries it
        progress: list[Any] = []
        async with engine.stream(manifest([probe(tag="a")]), on_progress=progress.append) as s:
            assert s.runners["probe"].pid == warm
            await s.send("probe", RuntimeData.text("x"))
            await s.close()
            (said,) = [o.data.value async for o in s]
        # initialize() ran once, before the session; the node now carries the session's node id
        assert said == {"pid": warm, "inits": 1, "node_id": "probe", "tag": "a"}, said
        assert [(p.node_id, p.phase) for p in progress] == [("probe", "prewarmed")], progress
        (record,) = [r for r in caplog.records if r.getMessage() == "probe probe handled a frame"]
        assert (record.session_id, record.node_id) == (s.id, "probe")


async def test_a_traced_session_traces_the_calls_of_a_node_initialized_ahead():
    import leakprobe
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    before = leakprobe.snapshot()
    async with Engine({"test_nodes": True, "ipc_root": TEST_IPC_ROOT, **keep(tag="a")}, tracer_provider=tp) as engine:
        (warm,) = initialized_pids(engine)
        said, _ = await run_probe(engine, manifest([probe(tag="a")]))
        assert said["pid"] == warm
    assert leakprobe.leaks(before) == {}
    spans = exporter.get_finished_spans()
    (session,) = [s for s in spans if s.parent is None]
    (call,) = [s for s in spans if s.name == "probe.process"]  # timed in the process, once bound
    assert call.parent is not None and call.parent.span_id == session.context.span_id
    assert (call.attributes["remotemedia.session_id"], call.attributes["remotemedia.node_id"]) == \
        (session.attributes["remotemedia.session_id"], "probe")


async def test_each_initialized_process_serves_one_session_and_the_pool_refills():
    m = manifest([probe(tag="a")])
    async with probed_engine(**keep(tag="a")) as engine:
        (first,) = initialized_pids(engine)
        said, _ = await run_probe(engine, m)
        assert said["pid"] == first
        await eventually(lambda: gone(first), "the used process to exit")
        await eventually(lambda: len(initialized_pids(engine)) == 1, "the pool to refill")
        (second,) = initialized_pids(engine)
        assert second != first
        async with engine.stream(m) as s1, engine.stream(m) as s2:
            pids = (s1.runners["probe"].pid, s2.runners["probe"].pid)
        assert pids[0] == second and pids[1] not in (first, second), pids


async def test_a_node_whose_assign_differs_gets_a_cold_process():
    async with probed_engine(**keep(tag="a")) as engine:
        warm = initialized_pids(engine)
        for node, multiprocess in ((probe(tag="b"), {}), (probe(tag="a"), {"process_timeout_secs": 7}),
                                   (probe(tag="a"), {"channel_capacity": 7})):
            said, phases = await run_probe(engine, manifest([node], multiprocess=multiprocess))
            assert said["pid"] not in warm and said["inits"] == 1, (node, multiprocess, said)
            assert phases == ["loading"], (node, multiprocess, phases)
        assert initialized_pids(engine) == warm


async def test_params_are_matched_as_the_engine_normalizes_them():
    async with probed_engine(node_params={PROBE: {"tag": "site"}}, **keep()) as engine:
        (warm,) = initialized_pids(engine)
        said, phases = await run_probe(engine, manifest([probe()]))  # no params: the operator's
        assert (said["pid"], said["tag"], phases) == (warm, "site", ["prewarmed"])


async def test_prewarm_manifest_keeps_each_of_its_process_nodes_initialized(tmp_path):
    m = manifest([{"id": "in", "node_type": "PassThroughNode"}, probe("p1", tag="one"), probe("p2", tag="two")],
                 connections=[("in", "p1"), ("in", "p2")])
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(m))
    async with probed_engine(prewarm_manifest=str(path)) as engine:
        warm = initialized_pids(engine)
        assert len(warm) == 2
        progress: list[Any] = []
        async with engine.stream(m, on_progress=progress.append) as s:
            assert {s.runners["p1"].pid, s.runners["p2"].pid} == warm
            await s.close()
        assert sorted((p.node_id, p.phase) for p in progress) == [("p1", "prewarmed"), ("p2", "prewarmed")]


async def test_a_killed_initialized_process_is_replaced(caplog):
    caplog.set_level(logging.WARNING, logger="engine.process")
    async with probed_engine(**keep(tag="a")) as engine:
        (victim,) = initialized_pids(engine)
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: len(initialized_pids(engine)) == 1 and victim not in initialized_pids(engine),
                         "a replacement")
        await eventually(lambda: node_processes(engine) == initialized_pids(engine), "the killed process reaped")
        assert any(f"{victim} ({PROBE}" in r.getMessage() and "exited" in r.getMessage() for r in caplog.records)
        (replacement,) = initialized_pids(engine)
        said, phases = await run_probe(engine, manifest([probe(tag="a")]))
        assert (said["pid"], said["inits"], phases) == (replacement, 1, ["prewarmed"])


async def test_initialized_processes_come_back_from_a_new_zygote():
    async with probed_engine(**keep(tag="a", count=2)) as engine:
        pm = engine.process_manager()
        old_zygote, old = pm.zygote_pid, initialized_pids(engine)
        assert old_zygote is not None
        os.kill(old_zygote, signal.SIGKILL)  # its node processes die with it (PR_SET_PDEATHSIG)
        await eventually(lambda: pm.serving and pm.zygote_pid not in (None, old_zygote), "a new zygote")
        await eventually(lambda: len(initialized_pids(engine)) == 2 and not initialized_pids(engine) & old,
                         "the initialized processes made again", timeout_s=20)
        assert {psutil.Process(p).ppid() for p in initialized_pids(engine)} == {pm.zygote_pid}


async def test_an_initialize_that_fails_ahead_is_logged_counted_and_leaves_nothing(caplog):
    caplog.set_level(logging.WARNING, logger="engine.process")
    async with probed_engine(**keep("CrashNode", in_init=True)) as engine:
        (shelf,) = [s for key, s in engine.process_manager().pool.shelves.items() if key is not None]
        assert (shelf.failures, shelf.idle, shelf.filling) == (3, [], set())  # tried three times, then stopped
        assert node_processes(engine) == set()
        failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("could not prewarm CrashNode")]
        assert len(failed) == 3 and all("failing on purpose" in f for f in failed), failed
        assert any("stopped prewarming CrashNode" in r.getMessage() for r in caplog.records)


async def test_initialized_processes_count_against_the_process_cap():
    async with probed_engine(caps={"max_total_processes": 2}, **keep(tag="a", count=2)) as engine:
        warm = initialized_pids(engine)
        assert engine.process_count == 2
        # a node that fits none needs a process of its own: an idle one is stopped to make room
        said, _ = await run_probe(engine, manifest([probe(tag="b")]))
        assert said["pid"] not in warm
        await eventually(lambda: len(initialized_pids(engine)) == 2, "the pool to refill once room is free")
        assert engine.process_count == 2


def test_prewarm_nodes_are_validated():
    for config, where in (({"prewarm_nodes": {"node_type": PROBE}}, "prewarm_nodes: must be an array"),
                          (keep(count=0), r"prewarm_nodes\[0\]\.count"),
                          ({"prewarm_nodes": [{"count": 1}]}, r"prewarm_nodes\[0\]\.node_type"),
                          ({"prewarm_nodes": [{"node_type": PROBE, "params": "a"}]}, r"prewarm_nodes\[0\]\.params"),
                          ({"prewarm_nodes": [{"node_type": PROBE, "parms": {}}]}, r"prewarm_nodes\[0\]\.parms"),
                          ({"prewarm_processes": 3, **keep(count=2), "caps": {"max_total_processes": 4}},
                           "prewarm_nodes: 5 prewarmed processes")):
        with pytest.raises(ValidationError, match=where):
            Engine(config)


async def test_prewarm_nodes_are_checked_against_the_registry_before_any_process_starts(tmp_path):
    import leakprobe

    for config, where in ((keep("NoSuchNode"), r"prewarm_nodes\[0\]\.node_type: unknown node type"),
                          (keep(tag=5), r"prewarm_nodes\[0\]\.params\.tag"),
                          (keep("PassThroughNode"), r"prewarm_nodes\[0\]\.node_type: PassThroughNode runs on the native"),
                          ({"prewarm_manifest": str(tmp_path / "none.json")}, "prewarm_manifest: .*cannot read")):
        before = leakprobe.snapshot()
        engine = Engine({"test_nodes": True, "ipc_root": TEST_IPC_ROOT, **config})
        try:
            with pytest.raises(ValidationError, match=where):
                await engine.start()
            assert engine.process_count == 0
        finally:
            await engine.aclose()
        assert leakprobe.leaks(before) == {}


@pytest.mark.speech
async def test_a_real_model_is_loaded_ahead_and_its_process_used_once():
    tts = {"id": "tts", "node_type": "PiperTTSNode"}
    async with probed_engine(**keep("PiperTTSNode")) as engine:
        (warm,) = initialized_pids(engine)
        progress: list[Any] = []
        async with engine.stream(manifest([tts]), on_progress=progress.append) as s:
            assert s.runners["tts"].pid == warm
            await s.send("tts", RuntimeData.text("Hello there."))
            await s.close()
            audio = [o.data async for o in s]
        assert [p.phase for p in progress] == ["prewarmed"], progress  # its model was not loaded again
        assert audio and all(a.sample_rate == 22050 and np.abs(a.samples).max() > 0 for a in audio)
        await eventually(lambda: len(initialized_pids(engine)) == 1 and warm not in initialized_pids(engine),
                         "a new Piper process initialized", timeout_s=60)
        progress.clear()
        async with engine.stream(manifest([{**tts, "params": {"speed": 1.5}}]), on_progress=progress.append) as s:
            assert s.runners["tts"].pid not in initialized_pids(engine) | {warm}
            await s.close()
        assert "prewarmed" not in [p.phase for p in progress] and progress, progress
