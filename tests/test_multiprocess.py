"""Node processes over shared memory: data integrity, isolation, faults, teardown.

Every test that starts an engine runs under the leak probe (the `mp_engine`
fixture or `probed_engine`): after the engine closes, no child process, no
shared-memory file, no iceoryx2 file under its root, no extra fd and no
extra thread may remain.
"""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import psutil
import pytest
from conftest import eventually, manifest

from engine import ErrorType, RuntimeData
from engine.errors import NodeExecutionError, ResourceLimitError
from nodes.testing import checksum

pytestmark = pytest.mark.multiprocess


def session_services(engine, session, pids) -> list[str]:
    """iceoryx2 services (by name) still there that belong to this session or its processes."""
    import iceoryx2 as iox2

    space = engine._process_manager.space
    names = [d.name().to_string() for d in iox2.Service.list(space.config(), iox2.ServiceType.Ipc)]
    mine = (f"rm/{session.id}/", *(f"rm/proc/{pid}x" for pid in pids))
    return [n for n in names if n.startswith(mine)]


async def collect(session):
    return [o async for o in session]


async def feed(session, target: str, n: int) -> NodeExecutionError | None:
    """Send `n` text frames; returns the node error a send failed with (the
    session failed meanwhile), None when every frame was taken."""
    for i in range(n):
        try:
            await session.send(target, RuntimeData.text(f"item {i}"))
        except NodeExecutionError as exc:
            return exc
    return None


async def stream_all(engine, m, target, frames, **kw):
    async with engine.stream(m, **kw) as s:
        reader = asyncio.create_task(collect(s))
        for f in frames:
            await s.send(target, f)
        await s.close()
        outs = await reader
        await s.wait_closed()
    return outs


MIXED = manifest([
    {"id": "chunk", "node_type": "AudioChunkerNode", "params": {"chunk_size": 4096}},
    {"id": "echo", "node_type": "EchoNode"},
    {"id": "sum", "node_type": "ChecksumNode"},
    {"id": "sink", "node_type": "PassThroughNode"},
])


async def test_mixed_pipeline_moves_audio_with_checksums_intact(mp_engine):
    x = np.random.default_rng(1).standard_normal(48000).astype(np.float32)
    outs = await stream_all(mp_engine, MIXED, "chunk",
                            [RuntimeData.audio(x[i:i + 4800], 48000) for i in range(0, 48000, 4800)])
    expected = [checksum(RuntimeData.audio(x[i:i + 4096], 48000)) for i in range(0, 48000 - 4095, 4096)]
    got = [o.data.value["checksum"] for o in outs]
    assert got[:len(expected)] == expected
    assert len(got) == len(expected) + 1  # flushed remainder
    pids = {o.data.value["pid"] for o in outs}
    assert len(pids) == 1 and os.getpid() not in pids


async def test_large_tensors_cross_processes_intact_in_separate_processes(mp_engine):
    m = manifest([{"id": "echo", "node_type": "EchoNode"}, {"id": "sum", "node_type": "ChecksumNode"}])
    rng = np.random.default_rng(2)
    frames = [RuntimeData.tensor(rng.integers(0, 255, 16 * 2**20, dtype=np.uint8)) for _ in range(3)]
    frames.append(RuntimeData.tensor(rng.standard_normal((1024, 1024)).astype(np.float32)))
    async with mp_engine.stream(m) as s:
        pids = [r.pid for r in s.runners.values()]
        assert len(set(pids)) == 2 and os.getpid() not in pids
        # separate processes with their own memory
        assert all(psutil.Process(p).memory_info().rss > 0 for p in pids)
        assert all(psutil.Process(p).ppid() != os.getpid() for p in pids)  # forked by the zygote
        reader = asyncio.create_task(collect(s))
        for f in frames:
            await s.send("echo", f)
        await s.close()
        outs = await reader
    assert [o.data.value["checksum"] for o in outs] == [checksum(f) for f in frames]
    assert [o.sequence for o in outs] == [0, 1, 2, 3]


async def test_outputs_identical_with_multiprocess_on_and_off(mp_engine):
    from engine import Engine

    m = manifest([
        {"id": "chunk", "node_type": "AudioChunkerNode", "params": {"chunk_size": 1000}},
        {"id": "echo", "node_type": "EchoNode"},
        {"id": "rs", "node_type": "AudioResampleNode", "params": {"target_sample_rate": 16000}},
        {"id": "burn", "node_type": "CpuBurnNode", "params": {"burn_ms": 1}},
    ])
    x = np.random.default_rng(3).standard_normal(48000).astype(np.float32)
    frames = [RuntimeData.audio(x[i:i + 3000], 48000) for i in range(0, 48000, 3000)]
    on = await stream_all(mp_engine, m, "chunk", frames)
    assert not mp_engine.sessions, f"sessions left after the stream closed: {list(mp_engine.sessions)}"
    async with Engine({"test_nodes": True, "multiprocess_enabled": False}) as native:
        off = await stream_all(native, m, "chunk", frames)
        assert native._process_manager is None  # no process was started
    assert [o.sequence for o in on] == [o.sequence for o in off]
    assert all(a.data.samples.tobytes() == b.data.samples.tobytes() for a, b in zip(on, off, strict=True))
    # the same through the manifest's per-pipeline flag
    m2 = dict(m, metadata={"name": "off", "multiprocess": {"enabled": False}})
    off2 = await stream_all(mp_engine, m2, "chunk", frames)
    assert [o.data.samples.tobytes() for o in off2] == [o.data.samples.tobytes() for o in on]


async def test_executor_override_runs_node_in_engine(mp_engine):
    m = manifest([{"id": "sum", "node_type": "ChecksumNode", "executor": "native"}])
    r = await mp_engine.execute(m, {"sum": RuntimeData.text("x")})
    assert r.outputs["sum"].value["pid"] == os.getpid()


@pytest.mark.parametrize("mode, expect", [
    ("exception", "RuntimeError: CrashNode"),
    ("exit", "exited with code 3"),
    ("signal", "killed by signal SIGKILL"),
])
async def test_crash_modes_give_typed_error_and_clean_teardown(mp_engine, mode, expect):
    m = manifest([{"id": "echo", "node_type": "EchoNode"},
                  {"id": "crash", "node_type": "CrashNode", "params": {"after": 2, "mode": mode}}])
    async with mp_engine.stream(m) as s:
        pids = [r.pid for r in s.runners.values()]
        assert len(session_services(mp_engine, s, pids)) == 6  # 2 frame services + 1 inbox per process
        feeder = asyncio.create_task(feed(s, "echo", 10))  # the node fails at its third frame
        with pytest.raises(NodeExecutionError) as info:
            async for _ in s:
                pass
            raise AssertionError("the iteration ended without the node's error")
        refused = await feeder
    assert info.value.node_id == "crash" and info.value.error_type is ErrorType.NODE_EXECUTION
    # a send after the failure fails with the session's error (not some other one)
    assert refused is None or refused is info.value, f"a send failed with {refused!r}, not {info.value!r}"
    assert expect in str(info.value) or expect in info.value.traceback_text
    await s.wait_closed()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert session_services(mp_engine, s, pids) == []


async def test_kill_minus_9_mid_stream(mp_engine):
    m = manifest([{"id": "slow", "node_type": "SleepNode", "params": {"sleep_ms": 5}},
                  {"id": "echo", "node_type": "EchoNode"}])
    async with mp_engine.stream(m) as s:
        reader = asyncio.create_task(collect(s))
        for i in range(5):
            await s.send("slow", RuntimeData.text(str(i)))
        victim = s.runners["echo"].pid
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(NodeExecutionError, match="SIGKILL") as info:
            await reader
        assert info.value.node_id == "echo"
        await s.wait_closed()
    assert not psutil.pid_exists(s.runners["slow"].pid) or psutil.Process(s.runners["slow"].pid).status() == psutil.STATUS_ZOMBIE
    assert session_services(mp_engine, s, [victim, s.runners["slow"].pid]) == []


async def test_hang_past_process_deadline(mp_engine):
    m = manifest([{"id": "hang", "node_type": "CrashNode", "params": {"after": 1, "mode": "hang"}}],
                 multiprocess={"process_timeout_secs": 0.5})
    async with mp_engine.stream(m) as s:
        feeder = asyncio.create_task(feed(s, "hang", 3))  # the second frame hangs the node
        with pytest.raises(NodeExecutionError, match="process_timeout_secs") as info:
            async for _ in s:
                pass
            raise AssertionError("the iteration ended without the node's error")
        refused = await feeder
    assert info.value.node_id == "hang"
    assert refused is None or refused is info.value, f"a send failed with {refused!r}, not {info.value!r}"


async def test_init_timeout(mp_engine):
    m = manifest([{"id": "slow", "node_type": "SlowInitNode", "params": {"init_ms": 5000}}],
                 multiprocess={"init_timeout_secs": 0.3})
    with pytest.raises(NodeExecutionError, match="init_timeout_secs") as info:
        async with mp_engine.stream(m):
            pass
    assert info.value.node_id == "slow"
    assert not mp_engine.sessions


async def test_init_failure_is_reported_with_traceback(mp_engine):
    m = manifest([{"id": "bad", "node_type": "CrashNode", "params": {"in_init": True}}])
    with pytest.raises(NodeExecutionError, match="initialize") as info:
        async with mp_engine.stream(m):
            pass
    assert "failing on purpose" in info.value.traceback_text


async def test_init_progress_reaches_the_caller(mp_engine):
    events = []
    m = manifest([{"id": "slow", "node_type": "SlowInitNode", "params": {"init_ms": 100, "steps": 4}}])
    async with mp_engine.stream(m, on_progress=events.append) as s:
        assert s.state == "running"
    assert [e.percent for e in events] == [0, 25, 50, 75, 100]
    assert all(e.node_id == "slow" for e in events)


async def test_caller_cancel_mid_stream(mp_engine):
    m = manifest([{"id": "slow", "node_type": "SleepNode", "params": {"sleep_ms": 50}}])
    async with mp_engine.stream(m) as s:
        pids = [r.pid for r in s.runners.values()]
        for i in range(3):
            await s.send("slow", RuntimeData.text(str(i)))
        await s.cancel()
    assert s.state == "closed"
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)


async def test_caller_task_cancelled_tears_down(mp_engine):
    m = manifest([{"id": "slow", "node_type": "SleepNode", "params": {"sleep_ms": 200}}])
    started = asyncio.Event()
    holder = {}

    async def client():
        async with mp_engine.stream(m) as s:
            holder["s"] = s
            started.set()
            for i in range(100):
                await s.send("slow", RuntimeData.text(str(i)))

    task = asyncio.create_task(client())
    await started.wait()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await holder["s"].wait_closed()
    assert not mp_engine.sessions


async def test_slow_consumer_loses_nothing(mp_engine):
    m = manifest([{"id": "echo", "node_type": "EchoNode"},
                  {"id": "slow", "node_type": "SleepNode", "params": {"sleep_ms": 2}}],
                 multiprocess={"channel_capacity": 4})
    n = 200
    outs = await stream_all(mp_engine, m, "echo", [RuntimeData.tensor(np.full(1000, i, np.int32)) for i in range(n)])
    assert [o.sequence for o in outs] == list(range(n))
    assert [int(o.data.array[0]) for o in outs] == list(range(n))


async def test_drop_policy_counts_drops(mp_engine):
    m = manifest([{"id": "slow", "node_type": "SleepNode", "params": {"sleep_ms": 20}}],
                 multiprocess={"channel_capacity": 2, "overflow_policy": "drop_newest"})
    async with mp_engine.stream(m) as s:
        reader = asyncio.create_task(collect(s))
        for i in range(30):
            await s.send("slow", RuntimeData.text(str(i)))
        await s.close()
        outs = await reader
        dropped = s.snapshot()["dropped"]
    assert dropped > 0 and len(outs) + dropped == 30


async def test_ten_concurrent_sessions_do_not_interfere(mp_engine):
    m = manifest([{"id": "echo", "node_type": "EchoNode"}, {"id": "sum", "node_type": "ChecksumNode"}])

    async def one(k: int):
        rng = np.random.default_rng(100 + k)
        frames = [RuntimeData.tensor(rng.integers(0, 255, 50_000, dtype=np.uint8)) for _ in range(10)]
        outs = await stream_all(mp_engine, m, "echo", frames)
        assert [o.data.value["checksum"] for o in outs] == [checksum(f) for f in frames]
        return {o.data.value["pid"] for o in outs}

    pids = await asyncio.gather(*(one(k) for k in range(10)))
    assert len(set().union(*pids)) == 10  # one checksum process per session, none shared


async def test_process_limits_are_checked_before_spawning(mp_engine):
    from engine.zygote import STANDBY_NAME

    pm = mp_engine.process_manager()
    await pm.ensure_started()  # the zygote and its standby exist: a spawn would take the standby
    await eventually(lambda: any(p.name() == STANDBY_NAME for p in psutil.Process(pm.zygote_pid).children()),
                     "a standby")
    before = {p.pid for p in psutil.Process(pm.zygote_pid).children()}
    m = manifest([{"id": f"e{i}", "node_type": "EchoNode"} for i in range(3)],
                 multiprocess={"max_processes_per_session": 2})
    with pytest.raises(ResourceLimitError, match="max_processes_per_session") as info:
        async with mp_engine.stream(m):
            raise AssertionError("a session over max_processes_per_session started")
    assert info.value.context["field"] == "max_processes_per_session"
    assert mp_engine.process_count == 0, f"node processes were started: {pm.live}"
    after = {p.pid for p in psutil.Process(pm.zygote_pid).children()}
    assert after == before, f"the zygote's children changed: {before} → {after}"
    assert not mp_engine.sessions


async def test_total_process_cap():
    from conftest import probed_engine

    async with probed_engine(caps={"max_total_processes": 2}) as engine:
        m = manifest([{"id": "e", "node_type": "EchoNode"}, {"id": "f", "node_type": "EchoNode"}])
        async with engine.stream(m) as running:
            with pytest.raises(ResourceLimitError) as info:
                engine.stream(manifest([{"id": "x", "node_type": "EchoNode"}]))
            # the process cap, not another limit (max_sessions also says "cap")
            assert info.value.context.get("field") == "max_total_processes", info.value
            assert len(engine.sessions) == 1 and engine.process_count == 2
            await running.send("e", RuntimeData.text("still running"))  # the refusal harmed no one
            await running.close()
            assert [o.data.text async for o in running] == ["still running"]


async def test_memory_limit_fails_session(mp_engine):
    m = manifest([{"id": "echo", "node_type": "EchoNode"}],
                 multiprocess={"max_session_memory_mb": 1})
    # sampling starts with the process, so the limit may strike while the node
    # is still starting (start() raises) or once it runs (iteration raises)
    session = mp_engine.stream(m)
    with pytest.raises(ResourceLimitError, match="max_session_memory_mb"):
        async with session:
            async for _ in session:
                pass
    await session.wait_closed()


async def test_zygote_standby_is_used_once_and_replaced_when_it_dies(mp_engine):
    from engine.zygote import NODE_NAME, STANDBY_NAME

    def named(name):
        zygote = psutil.Process(mp_engine.process_manager().zygote_pid)
        return {p.pid for p in zygote.children() if p.name() == name and p.status() != psutil.STATUS_ZOMBIE}

    await mp_engine.process_manager().ensure_started()
    await eventually(lambda: len(named(STANDBY_NAME)) == 1, "a standby")
    standby = named(STANDBY_NAME).pop()
    m = manifest([{"id": "e", "node_type": "EchoNode"}])
    async with mp_engine.stream(m) as s:
        assert s.runners["e"].pid == standby  # handed over, now a node process
        assert psutil.Process(standby).name() == NODE_NAME
        await s.send("e", RuntimeData.text("a"))
        await s.close()
        assert [o.data.text async for o in s] == ["a"]
    await eventually(lambda: len(named(STANDBY_NAME)) == 1 and standby not in named(STANDBY_NAME), "a new standby")
    os.kill(named(STANDBY_NAME).pop(), signal.SIGKILL)  # a standby that dies is not a session's business
    async with mp_engine.stream(m) as s:
        await s.send("e", RuntimeData.text("b"))
        await s.close()
        assert [o.data.text async for o in s] == ["b"]
    await eventually(lambda: len(named(STANDBY_NAME)) == 1, "the dead standby's replacement")


@pytest.mark.parametrize("standbys", [0, 2])
async def test_standby_processes_sets_how_many_the_zygote_keeps(standbys):
    from conftest import probed_engine

    from engine.zygote import STANDBY_NAME

    async with probed_engine(standby_processes=standbys) as engine:
        pm = engine.process_manager()
        await pm.ensure_started()

        def standing() -> int:
            return sum(p.name() == STANDBY_NAME for p in psutil.Process(pm.zygote_pid).children())

        await eventually(lambda: standing() == standbys, f"{standbys} standbys")
        m = manifest([{"id": f"e{i}", "node_type": "EchoNode"} for i in range(3)])
        async with engine.stream(m) as s:
            for i in range(3):
                await s.send(f"e{i}", RuntimeData.text(str(i)))
            await s.close()
            assert sorted([o.data.text async for o in s]) == ["0", "1", "2"]
        await eventually(lambda: standing() == standbys, f"{standbys} standbys again")
        assert standing() == standbys


def test_standby_processes_is_validated():
    from engine import Engine
    from engine.errors import ValidationError

    with pytest.raises(ValidationError, match="standby_processes"):
        Engine({"standby_processes": 17})


async def test_sending_to_a_node_that_died_fails_instead_of_waiting(mp_engine):
    # the node fails on its first frame and its process exits; the end of
    # stream sent after it finds no consumer, which must fail the send with
    # the node's error instead of waiting for room that never comes
    m = manifest([{"id": "a", "node_type": "CrashNode", "params": {"mode": "exception"}}])
    for _ in range(10):
        with pytest.raises(NodeExecutionError, match="failing on purpose") as info:
            await mp_engine.execute(m, {"a": RuntimeData.text("x")})
        assert info.value.node_id == "a"
