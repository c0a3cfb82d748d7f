"""Turn events (engine.turns): delivery to every node, voided turns, cancellation that
stops work, on both executors. The nodes are TurnProbeNode (nodes/testing.py): a `ctl`
node that sends events and a `worker` that generates tagged outputs step by step."""

from __future__ import annotations

import asyncio

import psutil
import pytest
from conftest import eventually, manifest

from engine import RuntimeData
from engine.errors import NodeExecutionError
from engine.turns import TurnEvent

pytestmark = pytest.mark.multiprocess

EXECUTORS = ["multiprocess", "native"]


def probe_pipeline(worker_executor: str, burn_ms: float = 5) -> dict:
    return manifest([
        {"id": "ctl", "node_type": "TurnProbeNode", "executor": "native", "params": {}},
        {"id": "worker", "node_type": "TurnProbeNode", "executor": worker_executor, "params": {"burn_ms": burn_ms}},
    ])


def side_by_side(worker_executor: str, burn_ms: float = 5) -> dict:
    """`ctl` and `worker` unconnected: events reach every node of the session all the same.
    (A native worker runs inside the send that feeds it, so it is fed from a task of its own.)"""
    return manifest([
        {"id": "ctl", "node_type": "TurnProbeNode", "executor": "native", "params": {}},
        {"id": "worker", "node_type": "TurnProbeNode", "executor": worker_executor, "params": {"burn_ms": burn_ms}},
    ], connections=[])


def texts(outputs) -> list[str]:
    return [o.data.text for o in outputs if o.data.kind.name == "TEXT"]


def seen(outputs, at: str) -> list[dict]:
    """The events node `at` reported having received."""
    return [o.data.value for o in outputs if o.data.kind.name == "JSON" and o.data.value.get("at") == at]


class Reader:
    def __init__(self, session) -> None:
        self.outputs = []
        self.task = asyncio.get_running_loop().create_task(self._read(session))

    async def _read(self, session) -> None:
        async for out in session:
            self.outputs.append(out)


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_a_cancel_stops_the_work_of_its_turn_and_nothing_of_it_comes_out(mp_engine, executor):
    async with mp_engine.stream(side_by_side(executor)) as s:
        reader = Reader(s)
        feeding = asyncio.get_running_loop().create_task(s.send("worker", RuntimeData.text("worker work a 100000")))
        await eventually(lambda: len(texts(reader.outputs)) >= 5, "the worker to produce for turn a")
        await s.send("ctl", RuntimeData.text("ctl event cancel a"))
        await eventually(lambda: any(e["saw"] == "cancel" for e in seen(reader.outputs, "worker")),
                         "the worker to receive the cancel")
        await feeding
        produced = len(texts(reader.outputs))
        await s.send("worker", RuntimeData.text("worker tagged a"))  # voided: never processed
        await s.send("worker", RuntimeData.text("worker tagged b"))  # another turn goes on
        await s.close()
        await reader.task
    outs = texts(reader.outputs)
    assert len(outs) <= produced + 2, f"turn a went on after its cancel: {len(outs)} outputs, {produced} before"
    assert "worker:b" in outs and "worker:a" not in outs, outs
    assert s.snapshot()["superseded_dropped"] >= 1


async def test_a_cancelled_turn_stops_using_cpu_in_its_node_process(mp_engine):
    async with mp_engine.stream(side_by_side("multiprocess", burn_ms=5)) as s:
        reader = Reader(s)
        await s.send("worker", RuntimeData.text("worker work a 100000"))
        await eventually(lambda: len(texts(reader.outputs)) >= 5, "the worker to produce for turn a")
        proc = psutil.Process(s.runners["worker"].pid)
        busy = await cpu_share(proc, 0.4)
        assert busy > 0.5, f"the worker should be busy for turn a, used {busy:.0%} of a core"
        await s.send("ctl", RuntimeData.text("ctl event cancel a"))
        await eventually(lambda: any(e["saw"] == "cancel" for e in seen(reader.outputs, "worker")),
                         "the worker to receive the cancel")
        idle = await cpu_share(proc, 0.4)
        assert idle < 0.2, f"the cancelled turn still uses {idle:.0%} of a core"
        await s.cancel()


async def cpu_share(proc: psutil.Process, window_s: float) -> float:
    """Share of one core `proc` used over `window_s` of wall time."""
    loop = asyncio.get_running_loop()
    c0, t0 = sum(proc.cpu_times()[:2]), loop.time()
    await asyncio.sleep(window_s)
    return (sum(proc.cpu_times()[:2]) - c0) / (loop.time() - t0)


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_events_reach_every_other_node_upstream_and_downstream(mp_engine, executor):
    async with mp_engine.stream(probe_pipeline(executor)) as s:
        reader = Reader(s)
        await s.send("ctl", RuntimeData.text("ctl event commit 7"))  # downstream: ctl → worker
        await s.send("ctl", RuntimeData.text("worker event played 7"))  # upstream: worker → ctl
        # ctl is upstream of the sender: an event reaches it while it has not
        # ended (once ctl has flushed, nothing more is handed to it)
        await eventually(lambda: seen(reader.outputs, "ctl"), "the upstream event to reach ctl")
        await s.close()  # the downstream event is handled before the end of stream
        await reader.task
    at_worker, at_ctl = seen(reader.outputs, "worker"), seen(reader.outputs, "ctl")
    assert [(e["saw"], e["turn_id"], e["source"]) for e in at_worker] == [("commit", "7", "ctl")], at_worker
    assert [(e["saw"], e["turn_id"], e["source"]) for e in at_ctl] == [("played", "7", "worker")], at_ctl
    assert at_worker[0]["data"] == {"sent_by": "ctl"}
    # a node never hears its own events, and events are not routed as data
    assert all(o.data.value.get("kind") is None for o in reader.outputs if o.data.kind.name == "JSON")


async def test_the_engine_observer_sees_each_event_once():
    from engine import Engine

    class Seen:
        def __init__(self) -> None:
            self.events: list[TurnEvent] = []

        def node_output(self, node_type: str, latency_s: float) -> None:
            pass

        def turn_event(self, event: TurnEvent) -> None:
            self.events.append(event)

    observer = Seen()
    async with Engine({"test_nodes": True}, observer=observer) as engine:
        await engine.execute(probe_pipeline("native"), {"ctl": RuntimeData.text("ctl event interrupt 3")})
    assert [(e.kind, e.turn_id, e.source, e.voids) for e in observer.events] == [("interrupt", "3", "ctl", True)]


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_a_failing_event_handler_is_the_nodes_typed_error(mp_engine, executor):
    with pytest.raises(NodeExecutionError) as info:
        await mp_engine.execute(probe_pipeline(executor), {"ctl": RuntimeData.text("ctl event fail 1")})
    assert info.value.node_id == "worker"
    assert "on_turn_event" in str(info.value) and "asked to fail" in str(info.value)
