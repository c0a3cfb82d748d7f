"""Input that once escaped as a crash: manifests large enough to exhaust a
recursive check, and request bodies that are not protobufs at all."""

from __future__ import annotations

import logging

import grpc
import pytest
from conftest import manifest
from grpc_client import CLOSE, chunk, collect, init, kinds, proto_manifest, proto_manifest_from_dict

from engine import Engine, ErrorType, RuntimeData
from engine.errors import ValidationError

GARBAGE = b"\xff\xff\xff\xff not a protobuf"


def chain(n: int, cycle: bool = False) -> dict:
    m = manifest([{"id": f"n{i}", "node_type": "PassThroughNode"} for i in range(n)])
    if cycle:
        m["connections"].append({"from": f"n{n - 1}", "to": "n0"})
    return m


@pytest.mark.parametrize("n", [1_000, 10_000])
def test_long_chains_are_validated_without_recursion(n):
    engine = Engine({"test_nodes": True})
    assert len(engine.validate(chain(n)).nodes) == n
    with pytest.raises(ValidationError) as info:
        engine.validate(chain(n, cycle=True))
    issue = info.value.issues[0]
    assert issue.code == "cycle" and issue.node_id == "n0"
    assert len(issue.extra["cycle"]) == n + 1
    assert f"… {n + 1 - 20} more …" in str(info.value) and len(str(info.value)) < 1000, "the message lists every node"


async def test_a_1000_node_cycle_over_grpc_is_a_validation_error(channel):
    from engine._proto import streaming_pb2_grpc as spb_grpc

    call = spb_grpc.StreamingPipelineServiceStub(channel).StreamPipeline(
        iter([init(proto_manifest_from_dict(chain(1_000, cycle=True)))]))
    responses = await collect(call)
    assert kinds(responses) == ["error"]
    assert responses[0].error.error_type == ErrorType.VALIDATION.value
    assert "cycle: n0 → n1" in responses[0].error.message


def _records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("engine", "grpc"))]


async def test_a_malformed_unary_request_is_invalid_argument_with_one_log_line(channel, caplog):
    caplog.set_level(logging.INFO)
    raw = channel.unary_unary("/remotemedia.v1.PipelineExecutionService/ExecutePipeline",
                              request_serializer=bytes, response_deserializer=bytes)
    for _ in range(3):
        caplog.clear()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(GARBAGE)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid remotemedia.v1.ExecuteRequest" in info.value.details()
        records = _records(caplog)
        assert len(records) == 1 and records[0].exc_info is None, [r.getMessage() for r in records]


@pytest.mark.parametrize("where", ["first", "after ready"])
async def test_a_malformed_stream_message_is_a_validation_error_then_invalid_argument(server, channel, caplog, where):
    caplog.set_level(logging.INFO)
    good = [init(proto_manifest([("e", "PassThroughNode")])).SerializeToString(),
            chunk("e", RuntimeData.text("x"), 1).SerializeToString()] if where == "after ready" else []
    raw = channel.stream_stream("/remotemedia.v1.StreamingPipelineService/StreamPipeline",
                                request_serializer=bytes, response_deserializer=bytes)
    caplog.clear()
    call = raw(iter([*good, GARBAGE, CLOSE.SerializeToString()]))
    from engine._proto import streaming_pb2 as spb

    responses = [spb.StreamResponse.FromString(r) async for r in _read_raw(call)]
    assert kinds(responses)[-1] == "error", kinds(responses)
    assert responses[-1].error.error_type == ErrorType.VALIDATION.value
    assert "not a valid remotemedia.v1.StreamRequest" in responses[-1].error.message
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    malformed = [r for r in _records(caplog) if "malformed" in r.getMessage()]
    assert len(malformed) == 1 and all(r.exc_info is None for r in _records(caplog)), \
        [r.getMessage() for r in _records(caplog)]
    assert not server.engine.sessions


async def _read_raw(call):
    """Every message, up to the end of the call (whose status the test checks itself)."""
    try:
        while (item := await call.read()) is not grpc.aio.EOF:
            yield item
    except grpc.aio.AioRpcError:
        pass
