"""Speech pipelines over the real gRPC server as an operator sees them: each voice turn is
one log line (and a point of the turn latency histogram); a text too long to speak is
refused before any synthesis, an answer too large to send stops the run where it passes
the limit, and neither leaves a traceback in the server's log."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import urllib.request

import grpc
import pytest
from grpc_client import buffer, kinds, proto_manifest
from speech_audio import VOICE_LOOP, question, spoken, wer
from voice_call import VoiceCall

from engine import RuntimeData
from engine._proto import common_pb2 as pb
from engine._proto import execution_pb2 as epb
from engine._proto import execution_pb2_grpc as epb_grpc
from engine.logs import JsonFormatter
from engine.manifest import load_document
from engine.server import wire

pytestmark = pytest.mark.speech

#: 20,000 characters of sentences (Piper took 177 s of CPU on this before it failed at the send)
LONG_TEXT = ("This is one more sentence for the speech synthesizer to say. " * 400)[:20_000]


@pytest.fixture(scope="module", autouse=True)
def spoken_questions():
    """The voice that speaks the questions, loaded before any leak-checked fixture's snapshot."""
    spoken("Hello.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _turn_lines(caplog) -> dict[str, logging.LogRecord]:
    return {r.turn_id: r for r in caplog.records if r.name == "engine.session" and hasattr(r, "first_audio_ms")}


async def test_each_voice_turn_is_one_log_line_and_a_latency_observation(make_server, caplog):
    """A question is answered, a second one spoken over the answer interrupts it, and its own
    answer plays out: each turn that ends is one INFO line of the session with its fields (JSON
    logs carry them), and the turn latency histogram counts the turns answered."""
    caplog.set_level(logging.INFO)
    srv = await make_server(server={"metrics_port": _free_port()})
    first, second = "Could you tell me the capital of France?", "How many legs does a spider have?"
    async with grpc.aio.insecure_channel(srv.address) as ch, VoiceCall(ch, load_document(VOICE_LOOP)) as call:
        start, old, barge = await call.speak_over_the_reply(question(first, lead_s=0.3, tail_s=0.0),
                                                           question(second, lead_s=0.0, tail_s=0.0))
        new = call.turns(after=start)[1]
        # the reply played out: its turn is over without waiting for the session's end
        await call.silence_until(lambda: new in _turn_lines(caplog), "the second turn's line", limit_s=10)
        responses = await call.close()
    assert kinds(responses)[-1] == "closed"
    session_id = next(r.ready.session_id for r in responses if r.WhichOneof("response") == "ready")
    lines = _turn_lines(caplog)
    for turn, asked, interrupted in ((old, first, True), (new, second, False)):
        rec = lines[turn]
        assert rec.levelno == logging.INFO and rec.session_id == session_id
        assert rec.outcome == "commit" and rec.interrupted is interrupted, rec.getMessage()
        assert wer(asked, rec.transcript) < 0.2, rec.transcript
        assert rec.transcript in rec.getMessage()
        assert isinstance(rec.eou_probability, float) and 0 <= rec.eou_probability <= 1
        assert rec.first_audio_ms > 0 and rec.reply_audio_ms > 0
        assert f"first audio {rec.first_audio_ms:.0f} ms" in rec.getMessage()
        entry = json.loads(JsonFormatter().format(rec))
        assert entry["session_id"] == session_id and entry["turn_id"] == turn
        assert {"transcript", "eou_probability", "outcome", "first_audio_ms", "interrupted", "played_ms"} <= set(entry)
    assert 0 < lines[old].played_ms <= lines[old].reply_audio_ms and "interrupted after" in lines[old].getMessage()
    assert lines[new].played_ms is None
    for rec in lines.values():  # speculative turns that did not happen: cancelled, and why
        assert rec.outcome in ("commit", "cancel") and (rec.outcome == "commit" or rec.reason), rec.getMessage()
    assert len([r for r in lines.values() if r.outcome == "commit"]) == 2
    url = f"http://127.0.0.1:{srv.bound_metrics_port}/metrics"
    text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    count = next(line for line in text.splitlines() if line.startswith("remotemedia_turn_latency_seconds_count"))
    assert float(count.split()[-1]) == 2, count
    assert srv.metrics.registry.get_sample_value("remotemedia_turn_latency_seconds_sum") > 0


def _tts(node_type: str, text: str, **params) -> epb.ExecuteRequest:
    req = epb.ExecuteRequest(manifest=proto_manifest([("tts", node_type, params)], name="long-text"))
    req.data_inputs["tts"].CopyFrom(buffer(RuntimeData.text(text)))
    return req


def _tracebacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.exc_info or "Traceback" in r.getMessage() or "Traceback" in (r.exc_text or "")]


async def test_text_too_long_to_speak_or_to_send_is_refused_in_band(make_server, caplog):
    caplog.set_level(logging.INFO)
    limit = 1 << 20  # 1 MiB: about 12 s of Piper's float32 audio
    srv = await make_server(caps={"max_message_bytes": limit})
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = epb_grpc.PipelineExecutionServiceStub(ch)
        for node_type in ("PiperTTSNode", "KokoroTTSNode"):
            err = (await stub.ExecutePipeline(_tts(node_type, LONG_TEXT))).error
            assert err.error_type == pb.ERROR_TYPE_RESOURCE_LIMIT, (node_type, err)
            assert err.failing_node_id == "tts"
            assert "max_text_chars" in err.message and "20,000" in err.message, err.message
            assert json.loads(err.context)["limit"] == 4000
        # the cap raised: the answer's size stops the run at the output that passes it
        err = (await stub.ExecutePipeline(_tts("PiperTTSNode", LONG_TEXT, max_text_chars=20_000))).error
        assert err.error_type == pb.ERROR_TYPE_RESOURCE_LIMIT, err
        assert err.failing_node_id == "tts"
        assert "caps.max_message_bytes" in err.message and f"{limit:,}" in err.message, err.message
        # and the server serves on
        ok = await stub.ExecutePipeline(_tts("PiperTTSNode", "Hello there."))
        assert ok.WhichOneof("outcome") == "result", ok.error
        assert wire.from_proto(ok.result.data_outputs["tts"]).duration_s > 0.3
    calls = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ExecutePipeline 'long-text'")]
    assert [c.split(":")[1].strip().split(" ")[0] for c in calls] == ["failed"] * 3 + ["ok,"], calls
    assert not _tracebacks(caplog), "an expected error was logged with a traceback"
