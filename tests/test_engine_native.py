"""The in-process engine: batch and streaming, flush, cancel, errors, any loop."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import soxr
import uvloop
from conftest import manifest

from engine import Engine, ErrorType, RuntimeData
from engine.errors import (
    NodeExecutionError,
    ResourceLimitError,
    TypeValidationError,
    ValidationError,
)
from engine.node import Node

FRONT_END = manifest([
    {"id": "chunk", "node_type": "AudioChunkerNode", "params": {"chunk_size": 1024}},
    {"id": "rs", "node_type": "AudioResampleNode", "params": {"target_sample_rate": 16000}},
    {"id": "out", "node_type": "PassThroughNode"},
])


def noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 0.3


async def run_stream(engine, m, target, frames):
    outs = []
    async with engine.stream(m) as s:
        async def consume():
            async for o in s:
                outs.append(o)
        task = asyncio.create_task(consume())
        for f in frames:
            await s.send(target, f)
        await s.close()
        await task
        await s.wait_closed()
    return outs


async def test_batch_execute_resamples_whole_signal():
    x = noise(48000)
    async with Engine() as engine:
        result = await engine.execute(FRONT_END, {"chunk": RuntimeData.audio(x, 48000)})
    out = result.outputs["out"]
    assert out.sample_rate == 16000 and out.frames == 16000
    expected = soxr.resample(x, 48000, 16000, quality="HQ")
    assert np.allclose(out.samples, expected, atol=1e-4)
    assert len(result.all_outputs["out"]) > 1
    assert result.metrics["nodes"]["chunk"]["items_in"] == 1


async def test_streaming_outputs_are_tagged_with_input_sequence():
    x = noise(4800 * 10)
    async with Engine() as engine:
        outs = await run_stream(engine, FRONT_END, "chunk",
                                [RuntimeData.audio(x[i * 4800:(i + 1) * 4800], 48000) for i in range(10)])
    seqs = [o.sequence for o in outs]
    assert seqs == sorted(seqs) and set(seqs) <= set(range(10))
    assert {o.node_id for o in outs} == {"out"}
    joined = np.concatenate([o.data.samples for o in outs])
    assert joined.size == 16000  # the flush delivered the remainder and the filter tail


async def test_chunker_keeps_remainder_and_flushes():
    m = manifest([{"id": "c", "node_type": "AudioChunkerNode", "params": {"chunkSize": 100}}])
    async with Engine() as engine:
        outs = await run_stream(engine, m, "c", [RuntimeData.audio(np.arange(i * 70, (i + 1) * 70, dtype=np.int16), 8000)
                                                 for i in range(5)])
    sizes = [o.data.frames for o in outs]
    assert sizes == [100, 100, 100, 50]
    assert np.concatenate([o.data.samples for o in outs]).tolist() == list(range(350))


async def test_chunker_multichannel():
    m = manifest([{"id": "c", "node_type": "AudioChunkerNode", "params": {"chunk_size": 3}}])
    x = np.arange(20, dtype=np.float32)
    async with Engine() as engine:
        r = await engine.execute(m, {"c": RuntimeData.audio(x, 8000, channels=2)})
    parts = r.all_outputs["c"]
    assert [p.frames for p in parts] == [3, 3, 3, 1]
    assert r.outputs["c"].samples.tolist() == x.tolist()


async def test_format_node_converts_through_fastpath():
    m = manifest([{"id": "f", "node_type": "AudioFormatNode", "params": {"format": "i16"}}])
    async with Engine() as engine:
        r = await engine.execute(m, {"f": RuntimeData.audio(np.array([0.5, -0.5], np.float32), 8000)})
    assert r.outputs["f"].samples.dtype == np.int16
    assert r.outputs["f"].samples.tolist() == [16384, -16384]


async def test_fan_out_and_fan_in():
    m = manifest(
        [{"id": "src", "node_type": "PassThroughNode"},
         {"id": "a", "node_type": "AudioFormatNode", "params": {"format": "i16"}},
         {"id": "b", "node_type": "PassThroughNode"},
         {"id": "join", "node_type": "PassThroughNode"},
         {"id": "side", "node_type": "PassThroughNode"}],
        [("src", "a"), ("src", "b"), ("a", "join"), ("b", "join"), ("src", "side")],
    )
    async with Engine() as engine:
        r = await engine.execute(m, {"src": RuntimeData.audio(np.arange(10, dtype=np.int16), 8000)})
    assert sorted(r.outputs) == ["join", "side"]
    assert len(r.all_outputs["join"]) == 2 and r.outputs["join"].frames == 20
    assert r.outputs["side"].samples.tolist() == list(range(10))


async def test_all_data_kinds_pass_through_unchanged():
    m = manifest([{"id": "p", "node_type": "PassThroughNode"}])
    frames = [RuntimeData.text("hi"), RuntimeData.json({"a": 1}), RuntimeData.binary(b"\x00\x01"),
              RuntimeData.tensor(np.eye(3, dtype=np.float32)),
              RuntimeData.video(np.zeros(12, np.uint8), 2, 2, 1)]
    async with Engine() as engine:
        outs = await run_stream(engine, m, "p", frames)
    assert [o.data for o in outs] == frames


async def test_wrong_data_kind_is_a_typed_error_naming_the_node():
    m = manifest([{"id": "c", "node_type": "AudioChunkerNode"}])
    async with Engine() as engine:
        with pytest.raises(TypeValidationError) as info:
            await engine.execute(m, {"c": RuntimeData.text("not audio")})
    assert info.value.node_id == "c" and info.value.error_type is ErrorType.TYPE_VALIDATION
    assert not engine.sessions


class Boom(Node):
    node_type = "Boom"

    def process(self, frame):
        raise ValueError("kaboom")


async def test_node_exception_fails_session_with_node_execution_error():
    from engine.catalog import default_registry

    reg = default_registry()
    reg.register(Boom)
    m = manifest([{"id": "p", "node_type": "PassThroughNode"}, {"id": "x", "node_type": "Boom"}])
    async with Engine(registry=reg) as engine:
        s = engine.stream(m)
        async with s:
            with pytest.raises(NodeExecutionError) as info:
                await s.send("p", RuntimeData.text("a"))
            assert info.value.node_id == "x" and "kaboom" in str(info.value)
            assert "ValueError" in info.value.traceback_text
            with pytest.raises(NodeExecutionError):
                async for _ in s:
                    pass
        assert s.state == "closed"


async def test_send_to_unknown_node_and_after_close():
    async with Engine() as engine:
        async with engine.stream(FRONT_END) as s:
            with pytest.raises(ValidationError, match="unknown target node"):
                await s.send("nope", RuntimeData.text("x"))
            await s.close()
            with pytest.raises(Exception, match="cannot send"):
                await s.send("chunk", RuntimeData.audio(noise(10), 48000))


async def test_cancel_stops_at_once():
    async with Engine() as engine:
        async with engine.stream(FRONT_END) as s:
            await s.send("chunk", RuntimeData.audio(noise(48000), 48000))
            await s.cancel()
            outs = [o async for o in s]
            assert outs == []
            assert s.state == "closed"
        assert not engine.sessions


async def test_invalid_manifest_raises_before_anything_runs():
    async with Engine() as engine:
        with pytest.raises(ValidationError) as info:
            engine.stream(manifest([{"id": "a", "node_type": "Nope"}]))
        assert info.value.issues[0].code == "unknown_node_type"
        with pytest.raises(ValidationError, match="unknown node"):
            await engine.execute(FRONT_END, {"ghost": RuntimeData.text("x")})


async def test_session_cap_is_enforced():
    async with Engine({"caps": {"max_sessions": 1}}) as engine:
        async with engine.stream(FRONT_END):
            with pytest.raises(ResourceLimitError):
                engine.stream(FRONT_END)
        async with engine.stream(FRONT_END):
            pass


def test_runs_on_plain_asyncio_and_uvloop():
    async def go():
        async with Engine() as engine:
            r = await engine.execute(FRONT_END, {"chunk": RuntimeData.audio(noise(4800), 48000)})
            return type(asyncio.get_running_loop()).__module__, r.outputs["out"].frames

    mod, frames = asyncio.run(go())
    assert "uvloop" not in mod and frames == 1600
    mod, frames = uvloop.run(go())
    assert "uvloop" in mod and frames == 1600


def test_engine_installs_no_loop_policy_or_signal_handlers():
    import signal

    before = (asyncio.get_event_loop_policy().__class__, signal.getsignal(signal.SIGINT),
              signal.getsignal(signal.SIGTERM))

    async def go():
        async with Engine() as engine:
            await engine.execute(FRONT_END, {"chunk": RuntimeData.audio(noise(480), 48000)})

    asyncio.run(go())
    after = (asyncio.get_event_loop_policy().__class__, signal.getsignal(signal.SIGINT),
             signal.getsignal(signal.SIGTERM))
    assert before == after
