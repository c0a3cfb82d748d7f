"""Prewarmed node processes: started before any session, each used by one session only.

Every test closes its engine under the leak probe: prewarmed processes and
their channels must go with the engine.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import psutil
import pytest
from conftest import eventually, manifest, probed_engine

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
