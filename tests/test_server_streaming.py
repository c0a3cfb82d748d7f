"""StreamingPipelineService over a real server on loopback, with real node processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import psutil
import pytest
from grpc_client import (
    CANCEL,
    CLOSE,
    chunk,
    collect,
    init,
    kinds,
    node_processes,
    proto_manifest,
    requests,
)

from engine import RuntimeData
from engine._proto import common_pb2 as pb
from engine._proto import streaming_pb2 as spb
from engine._proto import streaming_pb2_grpc as spb_grpc
from engine.server import wire
from nodes.testing import checksum


def _audio(i: int, n: int = 512) -> RuntimeData:
    rng = np.random.default_rng(i)
    return RuntimeData.audio(rng.standard_normal(n).astype(np.float32), 16000)


def _stub(channel) -> spb_grpc.StreamingPipelineServiceStub:
    return spb_grpc.StreamingPipelineServiceStub(channel)


async def _eventually_no_processes(server) -> None:
    """Behaviour, not timing: the bound only keeps a broken build from hanging."""
    engine = server.engine
    zygote = engine.process_manager().zygote_pid
    async with asyncio.timeout(10):
        # polls what the OS shows: no event tells a test that a process is gone
        while engine.sessions or engine.process_count or node_processes(zygote):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


CHECKSUM_PIPELINE = [("pass", "PassThroughNode"), ("echo", "EchoNode"), ("sum", "ChecksumNode")]


async def _checksum_stream(channel, n: int, offset: int = 0) -> list[spb.StreamResponse]:
    frames = [_audio(offset + i) for i in range(n)]
    call = _stub(channel).StreamPipeline(requests(
        init(proto_manifest(CHECKSUM_PIPELINE)),
        *(chunk("pass", f, i) for i, f in enumerate(frames)), CLOSE))
    responses = await collect(call)
    results = [r.result for r in responses if r.WhichOneof("response") == "result"]
    assert [r.sequence for r in results] == list(range(n))
    for r, frame in zip(results, frames, strict=True):
        got = wire.from_proto(r.data_outputs["sum"]).value
        assert got["checksum"] == checksum(frame)
    assert await call.code() == grpc.StatusCode.OK
    return responses


async def test_stream_lifecycle_through_native_and_process_nodes(server, channel):
    responses = await _checksum_stream(channel, 20)
    k = kinds(responses)
    assert k[0] == "ready" and k[-1] == "closed"
    assert k.count("result") == 20
    ready, closed = responses[0].ready, responses[-1].closed
    assert ready.session_id and closed.session_id == ready.session_id
    fm = closed.final_metrics
    assert set(fm.node_metrics) == {"pass", "echo", "sum"}
    assert fm.node_metrics["echo"].items_processed == 20
    assert fm.node_metrics["sum"].execution_time_ms > 0  # the process's final stats counted
    await _eventually_no_processes(server)


async def test_results_carry_the_input_sequence_and_every_output(server, channel):
    # one 1000-sample input → chunks of 300 → 4 outputs tagged with the same sequence
    m = proto_manifest([("c", "AudioChunkerNode", {"chunk_size": 300}), ("e", "EchoNode")])
    call = _stub(channel).StreamPipeline(requests(
        init(m), chunk("c", _audio(0, 1000), 7), chunk("c", _audio(1, 600), 9), CLOSE))
    responses = await collect(call)
    seqs = [r.result.sequence for r in responses if r.WhichOneof("response") == "result"]
    assert seqs[:5] == [7, 7, 7, 9, 9]
    assert sum(wire.from_proto(r.result.data_outputs["e"]).frames for r in responses
               if r.WhichOneof("response") == "result") == 1600


async def test_init_progress_arrives_before_ready_and_early_chunks_are_processed(server, channel):
    m = proto_manifest([("slow", "SlowInitNode", {"init_ms": 300, "steps": 3}), ("sum", "ChecksumNode")])
    frames = [_audio(i) for i in range(5)]
    # the client does not wait for ready: everything is sent at once
    call = _stub(channel).StreamPipeline(requests(
        init(m), *(chunk("slow", f, i) for i, f in enumerate(frames)), CLOSE))
    responses = await collect(call)
    k = kinds(responses)
    first_ready = k.index("ready")
    progress = [r.init_progress for r in responses[:first_ready]]
    assert progress and all(k_ == "init_progress" for k_ in k[:first_ready])
    assert {p.node_id for p in progress} == {"slow"}
    assert [p.percent for p in progress if p.node_id == "slow"][-1] == 100.0
    assert "init_progress" not in k[first_ready:]
    results = [r.result for r in responses if r.WhichOneof("response") == "result"]
    assert [wire.from_proto(r.data_outputs["sum"]).value["checksum"] for r in results] == \
        [checksum(f) for f in frames]
    assert k[-1] == "closed"


async def test_legacy_audio_chunk_and_named_buffers(server, channel):
    m = proto_manifest([("sum", "ChecksumNode")])
    a = _audio(1)
    legacy = spb.StreamRequest(audio_chunk=spb.AudioChunk(node_id="sum", buffer=wire.to_proto(a).audio, sequence=1))
    named = spb.DataChunk(node_id="sum", sequence=2)
    named.named_buffers["left"].CopyFrom(wire.to_proto(_audio(2)))
    named.named_buffers["right"].CopyFrom(wire.to_proto(RuntimeData.text("hi")))
    responses = await collect(_stub(channel).StreamPipeline(requests(
        init(m), legacy, spb.StreamRequest(data_chunk=named), CLOSE)))
    results = [r.result for r in responses if r.WhichOneof("response") == "result"]
    values = [(r.sequence, wire.from_proto(r.data_outputs["sum"]).value) for r in results]
    assert values[0] == (1, {**values[0][1], "checksum": checksum(a)})
    assert [(s, v["kind"]) for s, v in values[1:]] == [(2, "audio"), (2, "text")]


async def test_periodic_metrics(make_server):
    srv = await make_server(server={"metrics_every_n_chunks": 4})
    async with grpc.aio.insecure_channel(srv.address) as ch:
        responses = await collect(_stub(ch).StreamPipeline(requests(
            init(proto_manifest([("p", "PassThroughNode")])),
            *(chunk("p", _audio(i), i) for i in range(9)), CLOSE)))
    metrics = [r.metrics for r in responses if r.WhichOneof("response") == "metrics"]
    assert [m.chunks_processed for m in metrics] == [4, 8]
    assert metrics[-1].session_id == responses[0].ready.session_id
    assert metrics[-1].data_type_breakdown["audio"] == 8


# ---------------------------------------------------------------- errors end the call


def _sized_wrong() -> spb.StreamRequest:
    req = chunk("p", _audio(0), 1)
    req.data_chunk.buffer.audio.num_samples = 3
    return req


STREAM_ERRORS = {
    "data before init": ([chunk("p", _audio(0), 0)], pb.ERROR_TYPE_VALIDATION, "", "init"),
    "unknown target": ([chunk("nope", _audio(0), 0)], pb.ERROR_TYPE_VALIDATION, "nope", "unknown target"),
    "sequence backwards": ([chunk("p", _audio(0), 5), chunk("p", _audio(1), 4)], pb.ERROR_TYPE_VALIDATION, "p",
                           "backwards"),
    "declared size disagrees": ([_sized_wrong()], pb.ERROR_TYPE_TYPE_VALIDATION, "p", "num_samples"),
    "init twice": ([init(proto_manifest([("p", "PassThroughNode")]))], pb.ERROR_TYPE_VALIDATION, "", "twice"),
    "node crashes mid-stream": ([chunk("p", _audio(i), i) for i in range(6)], pb.ERROR_TYPE_NODE_EXECUTION, "crash",
                                "signal"),
}


@pytest.mark.parametrize("case", sorted(STREAM_ERRORS))
async def test_stream_errors_end_the_call(server, channel, case):
    sent, error_type, node_id, needle = STREAM_ERRORS[case]
    m = proto_manifest([("p", "PassThroughNode"), ("crash", "CrashNode", {"after": 2, "mode": "signal"})])
    first = [] if case == "data before init" else [init(m)]
    # no CLOSE: the server must end the call by itself
    release = asyncio.Event()

    async def gen():
        for item in (*first, *sent):
            yield item
        await release.wait()  # the client keeps its side open

    call = _stub(channel).StreamPipeline(gen())
    responses = await collect(call)
    release.set()
    k = kinds(responses)
    assert k[-1] == "error", k
    err = responses[-1].error
    assert err.error_type == error_type
    assert err.failing_node_id == node_id
    assert needle in (err.message + err.context).lower()
    assert await call.code() == grpc.StatusCode.OK
    if case == "node crashes mid-stream":
        assert k.count("result") == 2  # what the crash did not stop got through first
    await _eventually_no_processes(server)


async def test_cancel_stops_at_once(server, channel):
    m = proto_manifest([("s", "SleepNode", {"sleep_ms": 200})])
    queue: asyncio.Queue = asyncio.Queue()

    async def gen():
        while (item := await queue.get()) is not None:
            yield item

    call = _stub(channel).StreamPipeline(gen())
    queue.put_nowait(init(m))
    assert (await call.read()).WhichOneof("response") == "ready"
    for i in range(5):
        queue.put_nowait(chunk("s", _audio(i), i))
    queue.put_nowait(CANCEL)
    rest = await collect(call)
    queue.put_nowait(None)
    assert kinds(rest)[-1] == "closed"
    assert rest[-1].closed.reason == "cancelled by client"
    assert kinds(rest).count("result") < 5
    await _eventually_no_processes(server)


async def test_half_close_without_close_flushes(server, channel):
    responses = await collect(_stub(channel).StreamPipeline(requests(
        init(proto_manifest([("e", "EchoNode")])), chunk("e", _audio(0), 0))))
    assert kinds(responses) == ["ready", "result", "closed"]


async def test_session_cap_refuses_before_starting(make_server):
    srv = await make_server(caps={"max_sessions": 1})
    async with grpc.aio.insecure_channel(srv.address) as ch:
        hold = asyncio.Event()

        async def first_gen():
            yield init(proto_manifest([("e", "EchoNode")]))
            await hold.wait()
            yield CLOSE

        first = _stub(ch).StreamPipeline(first_gen())
        assert (await first.read()).WhichOneof("response") == "ready"
        async def second_gen():
            yield init(proto_manifest([("e", "EchoNode")]))
            await hold.wait()  # writes after the server's error would race its end of call

        second = await collect(_stub(ch).StreamPipeline(second_gen()))
        assert kinds(second) == ["error"]
        assert second[0].error.error_type == pb.ERROR_TYPE_RESOURCE_LIMIT
        assert "max_sessions" in second[0].error.context
        hold.set()
        assert kinds(await collect(first))[-1] == "closed"


async def test_an_output_too_large_for_a_result_fails_the_stream_in_band(make_server, caplog):
    """gRPC cannot send a message over its limit: the output that would be one is an error
    answered in the stream (RESOURCE_LIMIT, naming node and limit), the session is torn down
    at once and the server serves on, with no traceback in its log."""
    caplog.set_level(logging.INFO)
    limit = 1 << 20
    srv = await make_server(caps={"max_message_bytes": limit})
    async with grpc.aio.insecure_channel(srv.address) as ch:
        responses = await collect(_stub(ch).StreamPipeline(requests(
            init(proto_manifest([("gen", "GenerateNode", {"bytes": 2 * limit})])),
            chunk("gen", RuntimeData.text("x"), 0), CLOSE)))
        assert kinds(responses) == ["ready", "error"]
        err = responses[-1].error
        assert err.error_type == pb.ERROR_TYPE_RESOURCE_LIMIT and err.failing_node_id == "gen", err
        assert "caps.max_message_bytes" in err.message and f"{limit:,}" in err.message, err.message
        await _eventually_no_processes(srv)
        assert kinds(await collect(_stub(ch).StreamPipeline(requests(
            init(proto_manifest([("gen", "GenerateNode", {"bytes": 1000})])),
            chunk("gen", RuntimeData.text("x"), 0), CLOSE)))) == ["ready", "result", "closed"]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


# ---------------------------------------------------------------- clients that go away


async def test_client_cancelling_the_call_tears_the_session_down(server, channel):
    async def gen():
        yield init(proto_manifest([("echo", "EchoNode"), ("sum", "ChecksumNode")]))
        for i in range(3):
            yield chunk("echo", _audio(i), i)
        await asyncio.Event().wait()  # never closes

    call = _stub(channel).StreamPipeline(gen())
    got = []
    while len(got) < 4:
        got.append(await call.read())
    assert server.engine.process_count == 2
    call.cancel()
    await _eventually_no_processes(server)


CLIENT_SCRIPT = textwrap.dedent("""
    import sys, time, grpc, numpy as np
    sys.path.insert(0, {tests!r})
    from grpc_client import chunk, init, proto_manifest
    from engine import RuntimeData
    from engine._proto import streaming_pb2_grpc as spb_grpc

    def gen():
        yield init(proto_manifest([("echo", "EchoNode"), ("sleep", "SleepNode", {{"sleep_ms": 1}})]))
        i = 0
        while True:
            yield chunk("echo", RuntimeData.audio(np.zeros(256, np.float32), 16000), i)
            i += 1
            time.sleep(0.01)

    channel = grpc.insecure_channel({address!r})
    for n, resp in enumerate(spb_grpc.StreamingPipelineServiceStub(channel).StreamPipeline(gen())):
        if n == 5:
            print("streaming", flush=True)
""")


async def test_client_process_killed_mid_stream(server, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT.format(tests=os.path.dirname(__file__), address=server.address))
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), stdout=subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"streaming"
        assert len(server.engine.sessions) == 1 and server.engine.process_count == 2
        proc.send_signal(signal.SIGKILL)  # the connection drops without a goodbye
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await _eventually_no_processes(server)


async def test_ten_concurrent_sessions_do_not_interfere(server, channel):
    results = await asyncio.gather(*(_checksum_stream(channel, 15, offset=100 * k) for k in range(10)))
    sessions = {r[0].ready.session_id for r in results}
    assert len(sessions) == 10
    pids = set()
    for responses in results:
        session_pids = {wire.from_proto(r.result.data_outputs["sum"]).value["pid"]
                        for r in responses if r.WhichOneof("response") == "result"}
        assert len(session_pids) == 1  # one process served the whole session
        pids |= session_pids
    assert len(pids) == 10  # and no process served two sessions
    await _eventually_no_processes(server)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
