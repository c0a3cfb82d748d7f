"""PipelineExecutionService over a real server on loopback: version, unary runs, errors, auth, health, metrics."""

from __future__ import annotations

import json
import logging
import socket
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_client import buffer, node_processes, proto_manifest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import RuntimeData
from engine._proto import common_pb2 as pb
from engine._proto import execution_pb2 as epb
from engine._proto import execution_pb2_grpc as epb_grpc
from engine.server import wire

# ---------------------------------------------------------------- version


@pytest.mark.parametrize("client_version,compatible", [
    ("", True), ("v1", True), ("1", True), ("1.4.2", True), ("v1.0", True),
    ("v2", False), ("2.0.0", False), ("0.9", False), ("banana", False),
])
async def test_get_version(channel, client_version, compatible):
    stub = epb_grpc.PipelineExecutionServiceStub(channel)
    resp = await stub.GetVersion(epb.VersionRequest(client_version=client_version))
    info = resp.version_info
    assert resp.compatible is compatible
    assert resp.compatibility_message
    assert info.protocol_version == "v1"
    assert info.runtime_version
    assert "v1" in info.supported_protocols
    assert {"PassThroughNode", "AudioChunkerNode", "EchoNode"} <= set(info.supported_node_types)
    assert info.build_timestamp.endswith("Z")


# ---------------------------------------------------------------- unary runs

_rng = np.random.default_rng(7)
FRAMES = {
    "audio_f32": RuntimeData.audio(_rng.standard_normal(1024).astype(np.float32), 16000),
    "audio_i16_stereo": RuntimeData.audio(_rng.integers(-30000, 30000, 2048).astype(np.int16), 48000, 2),
    "audio_i32": RuntimeData.audio(_rng.integers(-2**30, 2**30, 300).astype(np.int32), 8000),
    "video": RuntimeData.video(_rng.integers(0, 255, 4 * 3 * 3, dtype=np.uint8), 4, 3, frame_number=9),
    "tensor": RuntimeData.tensor(_rng.standard_normal((2, 3, 4)).astype(np.float32), layout="NCH"),
    "tensor_u8": RuntimeData.tensor(_rng.integers(0, 255, (5, 5), dtype=np.uint8)),
    "json": RuntimeData.json({"a": [1, 2, {"b": None}], "ü": "✓"}, schema_type="demo"),
    "text": RuntimeData.text("héllo wörld", language="de"),
    "binary": RuntimeData.binary(bytes(range(256)) * 3, "application/octet-stream"),
}


@pytest.mark.parametrize("name", sorted(FRAMES))
async def test_unary_pass_through_is_byte_identical(channel, name):
    frame = FRAMES[name]
    frame.metadata["origin"] = name
    sent = buffer(frame)
    req = epb.ExecuteRequest(manifest=proto_manifest([("p", "PassThroughNode")]))
    req.data_inputs["p"].CopyFrom(sent)
    resp = await epb_grpc.PipelineExecutionServiceStub(channel).ExecutePipeline(req)
    assert resp.WhichOneof("outcome") == "result", resp.error
    got = resp.result.data_outputs["p"]
    assert got.SerializeToString(deterministic=True) == sent.SerializeToString(deterministic=True)
    assert resp.result.status == pb.EXECUTION_STATUS_SUCCESS


async def test_unary_through_processes_reports_metrics_and_leaves_no_process(server, channel):
    audio = RuntimeData.audio(np.arange(4000, dtype=np.float32), 16000)
    req = epb.ExecuteRequest(manifest=proto_manifest(
        [("chunk", "AudioChunkerNode", {"chunk_size": 1000}), ("echo", "EchoNode"), ("sum", "ChecksumNode")]))
    req.data_inputs["chunk"].CopyFrom(buffer(audio))
    resp = await epb_grpc.PipelineExecutionServiceStub(channel).ExecutePipeline(req)
    assert resp.WhichOneof("outcome") == "result", resp.error
    # processes of the run are gone before the response is sent
    assert node_processes(server.engine.process_manager().zygote_pid) == set()
    out = wire.from_proto(resp.result.data_outputs["sum"])
    assert len(out.value) == 4 and all(item["kind"] == "audio" for item in out.value)
    m = resp.result.metrics
    assert m.wall_time_ms > 0
    assert set(m.node_metrics) == {"chunk", "echo", "sum"}
    assert m.node_metrics["echo"].items_processed == 4
    assert m.node_metrics["sum"].execution_time_ms > 0
    assert m.cpu_time_ms > 0
    assert m.proto_to_runtime_ms > 0 and m.runtime_to_proto_ms > 0
    assert m.data_type_breakdown["audio"] >= 1 and m.data_type_breakdown["json"] >= 1
    assert [r.node_id for r in resp.result.node_results] == ["chunk", "echo", "sum"]
    assert all(r.status == pb.NODE_STATUS_SUCCESS for r in resp.result.node_results)
    assert json.loads(resp.result.node_results[2].output_metadata)["outputs"] == 4


# ---------------------------------------------------------------- errors


def _bad_size_audio() -> pb.DataBuffer:
    buf = buffer(RuntimeData.audio(np.zeros(100, np.float32), 16000))
    buf.audio.num_samples = 99
    return buf


def _req(nodes, connections=None, inputs=None, **kw) -> epb.ExecuteRequest:
    req = epb.ExecuteRequest(manifest=proto_manifest(nodes, connections, **kw))
    for nid, buf in (inputs or {"a": buffer(RuntimeData.text("x"))}).items():
        req.data_inputs[nid].CopyFrom(buf)
    return req


ERROR_CASES = {
    "unknown node type": (_req([("a", "NoSuchNode")]), pb.ERROR_TYPE_VALIDATION, "a", "unknown node type"),
    "duplicate ids": (_req([("a", "PassThroughNode"), ("a", "PassThroughNode")], []),
                      pb.ERROR_TYPE_VALIDATION, "a", "duplicate"),
    "dangling edge": (_req([("a", "PassThroughNode")], [("a", "ghost")]), pb.ERROR_TYPE_VALIDATION, "ghost", "ghost"),
    "cycle": (_req([("a", "PassThroughNode"), ("b", "PassThroughNode")], [("a", "b"), ("b", "a")]),
              pb.ERROR_TYPE_VALIDATION, "a", "cycle"),
    "bad params": (_req([("a", "AudioChunkerNode", {"chunk_size": -5})]), pb.ERROR_TYPE_VALIDATION, "a",
                   "chunk_size"),
    "kind mismatch": (_req([("a", "ChecksumNode"), ("b", "AudioChunkerNode")]), pb.ERROR_TYPE_VALIDATION, "b",
                      "json"),
    "input for unknown node": (_req([("a", "PassThroughNode")], inputs={"zz": buffer(RuntimeData.text("x"))}),
                               pb.ERROR_TYPE_VALIDATION, "zz", "unknown node"),
    "declared size disagrees": (_req([("a", "PassThroughNode")], inputs={"a": _bad_size_audio()}),
                                pb.ERROR_TYPE_TYPE_VALIDATION, "a", "num_samples"),
    "empty buffer": (_req([("a", "PassThroughNode")], inputs={"a": pb.DataBuffer()}),
                     pb.ERROR_TYPE_TYPE_VALIDATION, "a", "no data"),
    "node cannot take the input": (_req([("a", "AudioChunkerNode")]), pb.ERROR_TYPE_TYPE_VALIDATION, "a", ""),
    "over the process cap": (_req([("a", "EchoNode"), ("b", "EchoNode")],
                                  multiprocess={"max_processes_per_session": 1}),
                             pb.ERROR_TYPE_RESOURCE_LIMIT, "", "max_processes_per_session"),
    "node fails": (_req([("a", "CrashNode", {"mode": "exception"})]), pb.ERROR_TYPE_NODE_EXECUTION, "a",
                   "failing on purpose"),
    "node process dies": (_req([("a", "CrashNode", {"mode": "exit", "exit_code": 9})]),
                          pb.ERROR_TYPE_NODE_EXECUTION, "a", "9"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
async def test_unary_errors_are_typed_and_name_the_node(server, channel, case):
    req, error_type, node_id, needle = ERROR_CASES[case]
    resp = await epb_grpc.PipelineExecutionServiceStub(channel).ExecutePipeline(req)
    assert resp.WhichOneof("outcome") == "error"
    err = resp.error
    assert err.error_type == error_type, err
    assert err.failing_node_id == node_id
    assert needle.lower() in (err.message + err.context).lower()
    assert node_processes(server.engine.process_manager().zygote_pid) == set()


async def test_unary_client_version_mismatch(channel):
    req = _req([("a", "PassThroughNode")])
    req.client_version = "v3"
    resp = await epb_grpc.PipelineExecutionServiceStub(channel).ExecutePipeline(req)
    assert resp.error.error_type == pb.ERROR_TYPE_VERSION_MISMATCH


async def test_unary_resource_limits_are_honoured(channel):
    stub = epb_grpc.PipelineExecutionServiceStub(channel)
    req = _req([("a", "PassThroughNode")], inputs={"a": buffer(RuntimeData.audio(np.zeros(2000, np.float32), 16000))})
    req.resource_limits.max_audio_samples = 1000
    resp = await stub.ExecutePipeline(req)
    assert resp.error.error_type == pb.ERROR_TYPE_RESOURCE_LIMIT
    assert resp.error.failing_node_id == "a" and "max_audio_samples" in resp.error.message

    req = _req([("a", "SleepNode", {"sleep_ms": 5000})])
    req.resource_limits.max_timeout_ms = 300
    resp = await stub.ExecutePipeline(req)
    assert resp.error.error_type == pb.ERROR_TYPE_RESOURCE_LIMIT
    assert "time limit" in resp.error.message


async def test_message_size_cap(make_server):
    srv = await make_server(caps={"max_message_bytes": 1 << 20})
    async with grpc.aio.insecure_channel(srv.address) as ch:
        req = _req([("a", "PassThroughNode")],
                   inputs={"a": buffer(RuntimeData.binary(b"\0" * (2 << 20)))})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await epb_grpc.PipelineExecutionServiceStub(ch).ExecutePipeline(req)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_outputs_past_the_message_size_stop_the_run_in_band(make_server, caplog):
    """1,000 outputs of 200 kB would be 200 MB; the answer may be 1 MiB: the run stops at the
    output that passes it, answered as RESOURCE_LIMIT naming node and limit, and the server
    serves on; its log says so in one line, without a traceback and without 'ok'."""
    caplog.set_level(logging.INFO)
    limit = 1 << 20
    srv = await make_server(caps={"max_message_bytes": limit})
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = epb_grpc.PipelineExecutionServiceStub(ch)
        req = _req([("chunk", "AudioChunkerNode", {"chunk_size": 1}), ("gen", "GenerateNode", {"bytes": 200_000})],
                   inputs={"chunk": buffer(RuntimeData.audio(np.zeros(1000, np.float32), 16000))}, name="big")
        resp = await stub.ExecutePipeline(req)
        assert resp.WhichOneof("outcome") == "error", "the run should have been stopped"
        err = resp.error
        assert err.error_type == pb.ERROR_TYPE_RESOURCE_LIMIT, err
        assert err.failing_node_id == "gen"
        assert "caps.max_message_bytes" in err.message and f"{limit:,}" in err.message, err.message
        context = json.loads(err.context)
        assert context["limit"] == limit
        assert context["output_bytes"] <= limit + 200_000, "it went on past the output that passed the limit"
        assert node_processes(srv.engine.process_manager().zygote_pid) == set()
        assert not srv.engine.sessions
        ok = await stub.ExecutePipeline(_req([("a", "PassThroughNode")], name="small"))
        assert ok.WhichOneof("outcome") == "result", ok.error
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ExecutePipeline 'big'")]
    assert len(lines) == 1 and "failed RESOURCE_LIMIT" in lines[0], lines
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()], \
        "an expected error was logged with a traceback"


# ---------------------------------------------------------------- auth, health, metrics


async def test_api_keys(make_server):
    srv = await make_server(server={"api_keys": ["k-one", "k-two"]})
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = epb_grpc.PipelineExecutionServiceStub(ch)
        for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", "k-one"),),
                         (("authorization", "Basic k-one"),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetVersion(epb.VersionRequest(), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "k-one" not in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecutePipeline(_req([("a", "PassThroughNode")]))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for key in ("k-one", "k-two"):
            resp = await stub.GetVersion(epb.VersionRequest(), metadata=(("authorization", f"Bearer {key}"),
                                                                          ("x-client", "tests")))
            assert resp.compatible
        resp = await stub.ExecutePipeline(_req([("a", "PassThroughNode")]),
                                          metadata=(("authorization", "Bearer k-two"),))
        assert resp.WhichOneof("outcome") == "result"
        # health needs no key
        health = health_pb2_grpc.HealthStub(ch)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING


async def test_health_and_reflection(channel):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "remotemedia.v1.PipelineExecutionService", "remotemedia.v1.StreamingPipelineService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    names = set()
    async for resp in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        names |= {s.name for s in resp.list_services_response.service}
    assert {"remotemedia.v1.PipelineExecutionService", "remotemedia.v1.StreamingPipelineService"} <= names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_prometheus_metrics(make_server):
    srv = await make_server(server={"metrics_port": _free_port()})
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = epb_grpc.PipelineExecutionServiceStub(ch)
        await stub.ExecutePipeline(_req([("a", "PassThroughNode"), ("b", "EchoNode")]))
        await stub.ExecutePipeline(_req([("a", "NoSuchNode")]))
    url = f"http://127.0.0.1:{srv.bound_metrics_port}/metrics"
    import asyncio

    text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    assert "remotemedia_active_sessions 0.0" in text
    assert "remotemedia_node_processes 0.0" in text
    assert 'remotemedia_errors_total{error_type="VALIDATION"} 1.0' in text
    assert 'remotemedia_sessions_total{rpc="execute"} 2.0' in text
    assert 'remotemedia_node_output_latency_seconds_count{node_type="EchoNode"} 1.0' in text
    assert "remotemedia_execute_latency_seconds_count 1.0" in text


def test_validated_manifests_are_cached_by_content():
    from engine import Engine
    from engine.errors import ValidationError

    engine = Engine({"test_nodes": True})
    m1 = proto_manifest([("a", "PassThroughNode")])
    first = engine.validate(m1)
    assert engine.validate(proto_manifest([("a", "PassThroughNode")])) is first
    assert engine.validate(proto_manifest([("b", "PassThroughNode")])) is not first
    bad = proto_manifest([("a", "NoSuchNode")])
    for _ in range(2):  # a failing manifest is checked (and fails) every time
        with pytest.raises(ValidationError):
            engine.validate(bad)
