"""Speech pipelines over the real gRPC server as an operator sees them: a text too long to
speak is refused before any synthesis, an answer too large to send stops the run where it
passes the limit, and neither leaves a traceback in the server's log."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
from grpc_client import buffer, proto_manifest

from engine import RuntimeData
from engine._proto import common_pb2 as pb
from engine._proto import execution_pb2 as epb
from engine._proto import execution_pb2_grpc as epb_grpc
from engine.server import wire

pytestmark = pytest.mark.speech

#: 20,000 characters of sentences (Piper took 177 s of CPU on this before it failed at the send)
LONG_TEXT = ("This is one more sentence for the speech synthesizer to say. " * 400)[:20_000]


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
