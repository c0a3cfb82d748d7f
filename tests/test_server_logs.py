"""The server's log as an operator reads it: node ids on session records, one line per
unary call, a session failure logged once, a cancelled or timed-out call in one line,
JSON lines for log shippers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import eventually
from grpc_client import CLOSE, buffer, chunk, collect, init, kinds, proto_manifest, requests

from engine import RuntimeData
from engine._proto import execution_pb2 as epb
from engine._proto import execution_pb2_grpc as epb_grpc
from engine._proto import streaming_pb2_grpc as spb_grpc

ROOT = Path(__file__).resolve().parent.parent


def _engine_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("engine")]


async def test_a_failed_stream_is_logged_once_with_its_node(channel, caplog):
    caplog.set_level(logging.INFO, logger="engine")
    manifest = proto_manifest([("a", "CrashNode", {"mode": "exception"})])
    responses = await collect(spb_grpc.StreamingPipelineServiceStub(channel).StreamPipeline(
        requests(init(manifest), chunk("a", RuntimeData.text("x"), 0), CLOSE)))
    assert "error" in kinds(responses)
    failures = [r for r in _engine_records(caplog) if "failing on purpose" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert failures[0].node_id == "a" and failures[0].session_id not in ("", "-")
    assert all(r.session_id == failures[0].session_id for r in _engine_records(caplog)
               if getattr(r, "session_id", "-") != "-")


async def test_each_unary_call_logs_one_line(channel, caplog):
    caplog.set_level(logging.INFO, logger="engine")
    stub = epb_grpc.PipelineExecutionServiceStub(channel)
    ok = epb.ExecuteRequest(manifest=proto_manifest([("a", "PassThroughNode")], name="echo-text"))
    ok.data_inputs["a"].CopyFrom(buffer(RuntimeData.text("hi")))
    assert (await stub.ExecutePipeline(ok)).WhichOneof("outcome") == "result"
    bad = epb.ExecuteRequest(manifest=proto_manifest([("a", "CrashNode", {"mode": "exception"})], name="crash"))
    bad.data_inputs["a"].CopyFrom(buffer(RuntimeData.text("hi")))
    assert (await stub.ExecutePipeline(bad)).WhichOneof("outcome") == "error"
    lines = [r for r in _engine_records(caplog) if r.getMessage().startswith("ExecutePipeline ")]
    assert len(lines) == 2, [r.getMessage() for r in lines]
    first, second = lines
    assert first.getMessage().startswith("ExecutePipeline 'echo-text': ok, 1 output(s) in ")
    assert first.getMessage().endswith(" ms") and first.session_id != "-"
    assert second.getMessage().startswith("ExecutePipeline 'crash': failed NODE_EXECUTION: [node a]")
    assert second.node_id == "a"


def test_log_format_json(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-m", "engine", "run", str(ROOT / "examples" / "audio_pipeline.json"),
                          "--seconds", "0.2", "--log-format", "json", "-v"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    entries = [json.loads(line) for line in res.stderr.splitlines()]
    ready = next(e for e in entries if e["message"].startswith("session ready"))
    assert ready["level"] == "DEBUG" and ready["logger"] == "engine.session"
    assert ready["session_id"] and ready["ts"].endswith("Z")
    assert "node_id" not in ready  # not node-scoped: left out rather than "-"


def _lines(caplog, start: str, *needles: str) -> list[logging.LogRecord]:
    return [r for r in _engine_records(caplog)
            if r.getMessage().startswith(start) and all(n in r.getMessage() for n in needles)]


async def test_cancelled_and_timed_out_calls_are_one_line_each(channel, caplog):
    """A call the client cancels, or whose deadline passes, is not an error of the server:
    one INFO line with its session id and what happened, no traceback. (A stream's requests
    may end before its handler is cancelled: it then closes, saying why.)"""
    caplog.set_level(logging.INFO)
    stub = epb_grpc.PipelineExecutionServiceStub(channel)
    slow = epb.ExecuteRequest(manifest=proto_manifest([("a", "SleepNode", {"sleep_ms": 60_000})], name="slow"))
    slow.data_inputs["a"].CopyFrom(buffer(RuntimeData.text("hi")))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecutePipeline(slow, timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: _lines(caplog, "ExecutePipeline 'slow'"), "the unary call's line")

    streams = spb_grpc.StreamingPipelineServiceStub(channel)
    idle = proto_manifest([("a", "PassThroughNode")], name="idle")
    timed_out = streams.StreamPipeline(timeout=0.5)
    await timed_out.write(init(idle))
    first = (await timed_out.read()).ready.session_id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await timed_out.read()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: _lines(caplog, "stream ", "the client's deadline passed"), "the timed-out stream's line")

    cancelled = streams.StreamPipeline()
    await cancelled.write(init(idle))
    second = (await cancelled.read()).ready.session_id
    cancelled.cancel()
    await eventually(lambda: _lines(caplog, "stream ", "cancelled"), "the cancelled stream's line")

    (unary,) = _lines(caplog, "ExecutePipeline 'slow'")
    assert "cancelled: the client's deadline passed" in unary.getMessage(), unary.getMessage()
    assert unary.levelno == logging.INFO and unary.session_id not in ("", "-")
    for session_id, needle in ((first, "the client's deadline passed"), (second, "the client cancelled the call")):
        ends = [r for r in _lines(caplog, "stream ") if r.session_id == session_id and "ready" not in r.getMessage()]
        assert [needle in r.getMessage() for r in ends] == [True], [r.getMessage() for r in ends]
        assert ends[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
