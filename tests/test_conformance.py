"""One node, every executor, the same results.

Each case runs the same pipeline with its nodes on every executor (the
manifest's per-node `executor`) and compares what the caller sees: outputs
(values, order, sequence numbers, metadata, timestamps, source), errors
(class, ErrorType, message, node id), what end of stream flushes, and what
a cancel leaves. A node must not be able to tell, nor make its caller tell,
where it ran. The reference is the first executor; every other one must
give the same outcome, and the reference itself is checked for sense (a
case that produced nothing or failed where it should not proves nothing).

The nodes are the built-in and test nodes plus tests/conformance_nodes.py,
a module of the tests' folder, imported by node processes from the app's
import path as a user's own nodes would be.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import conformance_nodes
import numpy as np
import pytest
import pytest_asyncio
from conftest import eventually, manifest, probed_engine

from engine import RuntimeData
from engine.data import AudioData, BinaryData, JsonData, TensorData, TextData, VideoData
from engine.errors import (
    EngineError,
    InternalError,
    NodeExecutionError,
    ResourceLimitError,
    SessionClosedError,
    TypeValidationError,
    ValidationError,
)
from engine.registry import ExecutorRegistry
from nodes.testing import checksum

# One engine for the module (its zygote starts once); each case checks that
# its sessions and node processes are gone, and the engine's close is leak-probed.
pytestmark = [pytest.mark.multiprocess, pytest.mark.asyncio(loop_scope="module")]

#: the reference first
EXECUTORS = ("native", "multiprocess")
#: a guard against a hang, not a timing assertion
CASE_TIMEOUT_S = 60


def conformance_registry() -> ExecutorRegistry:
    import nodes

    registry = ExecutorRegistry()
    for cls in (*nodes.builtin_nodes(), *nodes.test_nodes(), *conformance_nodes.NODES):
        registry.register(cls)
    return registry


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_engine():
    async with probed_engine(registry=conformance_registry()) as e:
        yield e


@pytest_asyncio.fixture(loop_scope="module")
async def engine(shared_engine):
    yield shared_engine
    # what a case started is gone when it ends, not only when the engine closes
    assert not shared_engine.sessions, "a session outlived its case"
    manager = shared_engine.process_manager()
    await eventually(lambda: not manager.live, "the case's node processes to exit")


# ---------------------------------------------------------------- what the caller sees


def describe_frame(frame: RuntimeData) -> dict[str, Any]:
    """Everything a caller can observe of a frame, payloads by checksum."""
    d: dict[str, Any] = {"kind": frame.kind.name, "sequence": frame.sequence, "source": frame.source,
                         "timestamp_us": frame.timestamp_us, "metadata": dict(frame.metadata)}
    if isinstance(frame, AudioData):
        d.update(sample_rate=frame.sample_rate, channels=frame.channels, dtype=str(frame.samples.dtype),
                 samples=frame.samples.shape)
    elif isinstance(frame, TensorData):
        d.update(dtype=str(frame.array.dtype), shape=frame.array.shape, layout=frame.layout)
    elif isinstance(frame, VideoData):
        d.update(width=frame.width, height=frame.height, format=frame.format.name,
                 frame_number=frame.frame_number)
    elif isinstance(frame, JsonData):
        d.update(value=frame.value, schema_type=frame.schema_type)
    elif isinstance(frame, TextData):
        d.update(text=frame.text, language=frame.language, encoding=frame.encoding)
    elif isinstance(frame, BinaryData):
        d.update(mime_type=frame.mime_type)
    d["payload"] = checksum(frame)
    return d


def describe_error(exc: EngineError | None) -> dict[str, Any] | None:
    if exc is None:
        return None
    return {"class": type(exc).__name__, "error_type": exc.error_type.name, "node_id": exc.node_id,
            # a session's id differs from run to run, never from executor to executor
            "message": re.sub(r"session [0-9a-f]{16}", "session <id>", str(exc))}


@dataclass
class Outcome:
    #: per sink, its outputs in order (sinks' outputs interleave by timing)
    outputs: dict[str, list[dict[str, Any]]]
    error: dict[str, Any] | None


Inputs = Callable[[], list[tuple[str, RuntimeData]]]


async def run(engine, doc: dict, inputs: Inputs) -> Outcome:
    """Start, feed, close and read one session; the first error the caller sees ends it."""
    outputs: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    error: EngineError | None = None

    async def read(session) -> None:
        async for out in session:
            assert out.sequence == out.data.sequence, f"Output.sequence {out.sequence} != frame's"
            outputs[out.node_id].append(describe_frame(out.data))

    async with asyncio.timeout(CASE_TIMEOUT_S):
        session = engine.stream(doc)
        try:
            async with session:
                reader = asyncio.create_task(read(session))
                try:
                    for target, frame in inputs():
                        await session.send(target, frame)
                    await session.close()
                except EngineError:
                    # the reader ends with the session's error too; this one is what the caller saw first
                    await asyncio.wait([reader])
                    reader.exception()
                    raise
                await reader
        except EngineError as exc:
            error = exc
        await session.wait_closed()
    return Outcome(dict(outputs), describe_error(error))


def on(executor: str, nodes: list[dict], connections: list[tuple[str, str]] | None = None,
       native: tuple[str, ...] = ()) -> dict:
    """The pipeline with every node on `executor` (the ids in `native` stay in the engine)."""
    placed = [dict(n, executor="native" if n["id"] in native else executor) for n in nodes]
    return manifest(placed, connections)


async def on_every_executor(engine, pipeline: Callable[[str], dict], inputs: Inputs) -> Outcome:
    """Run on each executor; assert every outcome equals the reference's; return it."""
    outcomes = {ex: await run(engine, pipeline(ex), inputs) for ex in EXECUTORS}
    reference = outcomes[EXECUTORS[0]]
    for ex, got in outcomes.items():
        assert got.error == reference.error, (
            f"error differs on {ex}:\n  {EXECUTORS[0]}: {reference.error}\n  {ex}: {got.error}")
        assert got.outputs == reference.outputs, _outputs_diff(EXECUTORS[0], reference, ex, got)
    return reference


def _outputs_diff(ref_name: str, ref: Outcome, name: str, got: Outcome) -> str:
    lines = [f"outputs differ on {name}:"]
    for sink in sorted(set(ref.outputs) | set(got.outputs)):
        a, b = ref.outputs.get(sink, []), got.outputs.get(sink, [])
        if len(a) != len(b):
            lines.append(f"  sink {sink}: {len(a)} outputs on {ref_name}, {len(b)} on {name}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                keys = [k for k in x.keys() | y.keys() if x.get(k) != y.get(k)]
                lines.append(f"  sink {sink} output {i}: " + ", ".join(
                    f"{k}: {x.get(k)!r} on {ref_name}, {y.get(k)!r} on {name}" for k in sorted(keys)))
                break
    if got.error or ref.error:
        lines.append(f"  errors: {ref.error} / {got.error}")
    return "\n".join(lines)


# ---------------------------------------------------------------- inputs


def texts(*words: str, target: str = "in") -> Inputs:
    return lambda: [(target, RuntimeData.text(w, metadata={"caller": w}, timestamp_us=7 + i))
                    for i, w in enumerate(words)]


def every_kind(target: str = "in") -> Inputs:
    """One frame of each kind, with caller metadata and timestamps."""
    def make() -> list[tuple[str, RuntimeData]]:
        rng = np.random.default_rng(11)
        common = lambda i: {"metadata": {"k": str(i)}, "timestamp_us": 1_000_000 + i}  # noqa: E731
        frames = [
            RuntimeData.audio(rng.standard_normal(480).astype(np.float32), 48000, **common(0)),
            RuntimeData.audio(rng.integers(-2**15, 2**15, 320, dtype=np.int16), 16000, channels=2, **common(1)),
            RuntimeData.video(rng.integers(0, 255, 4 * 2 * 3, dtype=np.uint8), 4, 2, frame_number=5, **common(2)),
            RuntimeData.tensor(rng.standard_normal((3, 5)).astype(np.float32), layout="NC", **common(3)),
            RuntimeData.tensor(rng.integers(0, 255, 200_000, dtype=np.uint8), **common(4)),  # past the lending size
            RuntimeData.json({"a": [1, 2, {"b": None}], "ü": "ñ"}, schema_type="x", **common(5)),
            RuntimeData.text("héllo wörld", language="de", **common(6)),
            RuntimeData.binary(bytes(range(256)) * 3, mime_type="application/x-test", **common(7)),
        ]
        return [(target, f) for f in frames]
    return make


def audio(n_frames: int, samples: int, rate: int = 48000, target: str = "in") -> Inputs:
    def make() -> list[tuple[str, RuntimeData]]:
        x = np.random.default_rng(5).standard_normal(n_frames * samples).astype(np.float32)
        return [(target, RuntimeData.audio(x[i * samples:(i + 1) * samples], rate)) for i in range(n_frames)]
    return make


# ---------------------------------------------------------------- outputs


def _node(nid: str, node_type: str, **params: Any) -> dict:
    return {"id": nid, "node_type": node_type, "params": params}


OUTPUT_CASES: dict[str, tuple[Callable[[str], dict], Inputs]] = {
    # a pass-through keeps the caller's metadata and timestamps; the source becomes the node
    "echo every kind": (lambda ex: on(ex, [_node("in", "EchoNode")]), every_kind()),
    # a list of five outputs per input, written in place or not, None for "skip"; a JSON count at flush
    "list of outputs": (lambda ex: on(ex, [_node("in", "ConformanceListNode")]),
                        texts("a", "skip", "bc", "skip", "def")),
    "list of outputs from every kind": (lambda ex: on(ex, [_node("in", "ConformanceListNode")]), every_kind()),
    "sync generator": (lambda ex: on(ex, [_node("in", "ConformanceSyncGenNode")]),
                       texts("", "ab", "abcdefgh", "x")),
    "async generator": (lambda ex: on(ex, [_node("in", "ConformanceAsyncGenNode")]), texts("p", "q", "r")),
    "async process": (lambda ex: on(ex, [_node("in", "ConformanceAsyncNode")]), texts("a", "skip", "b")),
    "in-place and copied tensors": (
        lambda ex: on(ex, [_node("in", "GenerateNode", bytes=300_000, in_place=True, meta="in place"),
                           _node("copy", "GenerateNode", bytes=1000, in_place=False, meta="copied")],
                      connections=[("in", "copy")]),
        texts("a", "b", "c")),
    # chunker on each executor; its remainder comes at flush, with the last input's sequence
    "audio chain with a flushed remainder": (
        lambda ex: on(ex, [_node("in", "AudioChunkerNode", chunk_size=1000),
                           _node("rs", "AudioResampleNode", target_sample_rate=16000),
                           _node("fmt", "AudioFormatNode", format="i16")]),
        audio(5, 3100)),
    # one engine-side source feeding two sinks on the executor under test, and a chain behind one
    "fan-out to two sinks": (
        lambda ex: on(ex, [_node("in", "PassThroughNode"), _node("list", "ConformanceListNode"),
                           _node("gen", "ConformanceSyncGenNode"), _node("up", "ConformanceAsyncNode")],
                      connections=[("in", "list"), ("in", "gen"), ("gen", "up")], native=("in",)),
        texts("one", "skip", "three")),
    # a node that emits only at end of stream, from inputs it kept (private copies)
    "outputs only at end of stream": (lambda ex: on(ex, [_node("in", "HoldNode", zero_copy=False)]),
                                      every_kind()),
    # end of stream with no input at all: flush outputs carry no sequence
    "end of stream without input": (
        lambda ex: on(ex, [_node("in", "ConformanceListNode"), _node("gen", "ConformanceSyncGenNode")],
                      connections=[]),
        lambda: []),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
async def test_outputs_are_the_same_on_every_executor(engine, case):
    pipeline, inputs = OUTPUT_CASES[case]
    ref = await on_every_executor(engine, pipeline, inputs)
    assert ref.error is None, f"{case}: failed on {EXECUTORS[0]}: {ref.error}"
    assert ref.outputs and all(ref.outputs.values()), f"{case}: nothing came out on {EXECUTORS[0]}"


async def test_outputs_are_stamped_by_the_host_not_by_the_node(engine):
    # what the comparison above takes as the reference, pinned down once
    pipeline, inputs = OUTPUT_CASES["list of outputs"]
    ref = await on_every_executor(engine, pipeline, inputs)
    outs = ref.outputs["in"]
    assert [o["sequence"] for o in outs] == [0] * 5 + [2] * 5 + [4] * 5 + [4], outs
    assert {o["source"] for o in outs} == {"in"}
    assert outs[0]["metadata"] == {"caller": "a"} and outs[0]["timestamp_us"] == 7  # the input itself
    assert outs[1]["metadata"] == {"n": "1", "from": "TEXT"} and outs[1]["timestamp_us"] == 1001
    assert outs[-1]["value"] == {"seen": 3}


async def test_end_of_stream_flushes_with_the_last_sequence_on_every_executor(engine):
    ref = await on_every_executor(
        engine, lambda ex: on(ex, [_node("in", "AudioChunkerNode", chunk_size=1000),
                                   _node("fmt", "AudioFormatNode", format="i16")]),
        audio(5, 3100))
    outs = ref.outputs["fmt"]
    # 5 × 3100 samples: 15 chunks of 1000 while streaming, the 500 left at end of stream
    assert [o["samples"] for o in outs] == [(1000,)] * 15 + [(500,)], outs
    assert [o["sequence"] for o in outs] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4], outs
    assert {o["dtype"] for o in outs} == {"int16"}


# ---------------------------------------------------------------- errors

ERROR_CLASSES = {
    "RuntimeError": NodeExecutionError,  # any other exception is the node's execution error
    "TypeValidationError": TypeValidationError,
    "ResourceLimitError": ResourceLimitError,
    "InternalError": InternalError,
    "ValidationError": ValidationError,
    "NodeExecutionError": NodeExecutionError,
}
STAGES = ("initialize", "process", "flush")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("raised", list(ERROR_CLASSES))
async def test_a_nodes_error_reads_the_same_on_every_executor(engine, stage, raised):
    ref = await on_every_executor(
        engine, lambda ex: on(ex, [_node("fail", "ConformanceFailNode", stage=stage, error=raised)]),
        texts("a", "b", target="fail"))
    assert ref.outputs == {}
    assert ref.error is not None, f"no error on {EXECUTORS[0]}"
    assert ref.error["class"] == ERROR_CLASSES[raised].__name__, ref.error
    assert ref.error["node_id"] == "fail", ref.error
    assert f"fails in {stage} on purpose" in ref.error["message"], ref.error


async def test_an_error_behind_an_engine_node_reads_the_same_on_every_executor(engine):
    ref = await on_every_executor(
        engine, lambda ex: on(ex, [_node("in", "PassThroughNode"),
                                   _node("fail", "ConformanceFailNode", stage="process", error="RuntimeError"),
                                   _node("out", "PassThroughNode")], native=("in", "out")),
        texts("a"))
    assert ref.error is not None and ref.error["node_id"] == "fail", ref.error


async def test_a_crash_node_exception_reads_the_same_on_every_executor(engine):
    ref = await on_every_executor(
        engine, lambda ex: on(ex, [_node("crash", "CrashNode", mode="exception", after=0)]),
        texts("a", target="crash"))
    assert ref.error is not None and ref.error["class"] == "NodeExecutionError", ref.error
    assert "CrashNode crash failing on purpose" in ref.error["message"], ref.error


@pytest.mark.parametrize("returns", ["int", "ndarray", "list_of_str"])
async def test_a_bad_return_reads_the_same_on_every_executor(engine, returns):
    ref = await on_every_executor(
        engine, lambda ex: on(ex, [_node("bad", "ConformanceBadReturnNode", returns=returns)]),
        texts("a", target="bad"))
    assert ref.error is not None and ref.error["node_id"] == "bad", ref.error


async def test_a_node_of_the_apps_own_folder_runs_in_its_own_process(engine):
    # the suite's nodes come from tests/, on the app's import path, not on
    # PYTHONPATH: a node process must find them as the engine did
    import os

    doc = on("multiprocess", [_node("in", "ConformanceAsyncNode")])
    async with engine.stream(doc) as s:
        pid = s.runners["in"].pid
        await s.send("in", RuntimeData.text("x"))
        await s.close()
        assert [o.data.text async for o in s] == ["in>X"]
    assert pid != os.getpid()


# ---------------------------------------------------------------- cancel


async def cancelled_mid_stream(engine, executor: str) -> dict[str, Any]:
    """Cancel while frames are in flight; what the caller sees afterwards."""
    doc = on(executor, [_node("slow", "SleepNode", sleep_ms=20)])
    received: list[Any] = []
    async with asyncio.timeout(CASE_TIMEOUT_S):
        async with engine.stream(doc) as s:
            async def feed() -> EngineError | None:
                for i in range(1000):  # more than any channel holds: the feeder is still sending at the cancel
                    try:
                        await s.send("slow", RuntimeData.text(str(i)))
                    except EngineError as exc:
                        return exc
                return None

            async def read() -> None:
                async for out in s:
                    received.append(out)

            feeder, reader = asyncio.create_task(feed()), asyncio.create_task(read())
            await eventually(lambda: len(received) >= 2, "outputs before the cancel")
            await s.cancel()
            refused = await feeder
            await reader
            after_cancel = [o async for o in s]
            with pytest.raises(EngineError) as later:
                await s.send("slow", RuntimeData.text("late"))
        await s.wait_closed()
    return {"state": s.state, "after_cancel": after_cancel, "refused": describe_error(refused),
            "late_send": describe_error(later.value), "session_left": s.id in engine.sessions,
            "error": describe_error(s.error)}


async def test_a_cancelled_session_leaves_nothing_on_every_executor(engine):
    seen = {ex: await cancelled_mid_stream(engine, ex) for ex in EXECUTORS}
    ref = seen[EXECUTORS[0]]
    for ex, got in seen.items():
        assert got == ref, f"cancel differs on {ex}:\n  {EXECUTORS[0]}: {ref}\n  {ex}: {got}"
    assert ref["state"] == "closed" and ref["after_cancel"] == [] and not ref["session_left"], ref
    assert ref["refused"] is not None and ref["refused"]["class"] == SessionClosedError.__name__, ref
    assert ref["error"] is None, ref  # a cancel is not a failure
    # and no process, shared-memory file or iceoryx2 file is left: the engine fixture's leak probe


async def turn_cancel_drops_queued_frames(engine, executor: str) -> dict[str, Any]:
    """Frames of a turn that wait for a busy node when the turn is cancelled are never processed."""
    doc = on(executor, [_node("ctl", "TurnProbeNode"), _node("worker", "TurnProbeNode", burn_ms=5)],
             connections=[], native=("ctl",))
    outputs: list[Any] = []

    def produced(prefix: str) -> list[str]:
        return [o.data.text for o in outputs if isinstance(o.data, TextData) and o.data.text.startswith(prefix)]

    async with asyncio.timeout(CASE_TIMEOUT_S):
        async with engine.stream(doc) as s:
            async def read() -> None:
                async for out in s:
                    outputs.append(out)

            reader = asyncio.create_task(read())
            # a native worker runs inside the send that feeds it: every send to it goes from a task
            work = asyncio.create_task(s.send("worker", RuntimeData.text("worker work a 100000")))
            await eventually(lambda: len(produced("a:")) >= 3, "the worker busy with turn a")
            queued = [asyncio.create_task(s.send("worker", RuntimeData.text(f"worker tagged q{i}",
                                                                             metadata={"turn_id": "a"})))
                      for i in range(3)]
            await asyncio.sleep(0)  # each queued send reaches the busy node before the cancel is sent
            await s.send("ctl", RuntimeData.text("ctl event cancel a"))
            await asyncio.gather(work, *queued)
            await s.send("worker", RuntimeData.text("worker tagged b"))
            await s.close()
            await reader
    events = [(o.node_id, o.data.value["saw"], o.data.value["turn_id"]) for o in outputs
              if isinstance(o.data, JsonData) and "saw" in o.data.value]
    return {"tagged": produced("worker:"), "events": events, "error": describe_error(s.error)}


async def test_a_turn_cancel_drops_queued_frames_on_every_executor(engine):
    seen = {ex: await turn_cancel_drops_queued_frames(engine, ex) for ex in EXECUTORS}
    ref = seen[EXECUTORS[0]]
    for ex, got in seen.items():
        assert got == ref, f"turn cancel differs on {ex}:\n  {EXECUTORS[0]}: {ref}\n  {ex}: {got}"
    # the queued frames of turn a (tagged q0..q2) never reached the node; turn b did
    assert ref["tagged"] == ["worker:b"], ref
    assert ref["events"] == [("worker", "cancel", "a")], ref
    assert ref["error"] is None, ref

