"""OpenTelemetry: one trace per session, a span per node call (native and in node
processes) with session, node and input sequence; sampling per session; OTLP from [tracing]."""

from __future__ import annotations

import pytest
from conftest import TEST_IPC_ROOT, manifest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode

from engine import Engine, RuntimeData
from engine.errors import NodeExecutionError

P = "remotemedia."


def provider(sampler=None) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tp = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    return tp, exporter


async def test_one_trace_per_session_with_a_span_per_node_call():
    import leakprobe

    before = leakprobe.snapshot()
    tp, exporter = provider()
    doc = manifest([{"id": "inline", "node_type": "PassThroughNode"}, {"id": "proc", "node_type": "EchoNode"}],
                   name="traced")
    engine = Engine({"test_nodes": True, "ipc_root": TEST_IPC_ROOT}, tracer_provider=tp)
    async with engine:
        async with engine.stream(doc) as session:
            for i in range(3):
                await session.send("inline", RuntimeData.text(f"t{i}"))
            await session.close()
            outs = [o async for o in session]
        assert len(outs) == 3
        r1 = await engine.execute(doc, {"inline": RuntimeData.text("again")})
        assert r1.outputs["proc"].text == "again"
    assert leakprobe.leaks(before) == {}
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == ["session traced", "session traced"]
    first = roots[0]
    assert first.attributes[P + "session_id"] == session.id
    in_first = [s for s in spans if s.context.trace_id == first.context.trace_id and s.parent is not None]
    assert all(s.parent.span_id == first.context.span_id for s in in_first)
    calls = {(s.name, s.attributes.get(P + "sequence")) for s in in_first}
    for seq in range(3):  # both the native node and the node process's calls, by input sequence
        assert ("inline.process", seq) in calls and ("proc.process", seq) in calls
    assert ("proc.flush", 2) in calls
    proc = next(s for s in in_first if s.name == "proc.process")
    assert proc.attributes[P + "node_id"] == "proc" and proc.attributes[P + "node_type"] == "EchoNode"
    assert proc.attributes[P + "session_id"] == session.id and proc.attributes[P + "outputs"] == 1
    assert first.start_time <= proc.start_time <= proc.end_time <= first.end_time


async def test_a_failed_call_and_session_are_marked_as_errors():
    tp, exporter = provider()
    engine = Engine({"test_nodes": True, "ipc_root": TEST_IPC_ROOT}, tracer_provider=tp)
    async with engine:
        with pytest.raises(NodeExecutionError):
            await engine.execute(manifest([{"id": "bad", "node_type": "CrashNode", "params": {"mode": "exception"}}]),
                                 {"bad": RuntimeData.text("x")})
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["bad.process"].status.status_code is StatusCode.ERROR
    assert "failing on purpose" in spans["bad.process"].status.description
    root = spans["session test"]
    assert root.status.status_code is StatusCode.ERROR and root.attributes[P + "error_type"] == "NODE_EXECUTION"


async def test_an_unsampled_session_records_nothing():
    tp, exporter = provider(ALWAYS_OFF)
    engine = Engine({"test_nodes": True, "ipc_root": TEST_IPC_ROOT}, tracer_provider=tp)
    async with engine:
        result = await engine.execute(manifest([{"id": "p", "node_type": "EchoNode"}]), {"p": RuntimeData.text("x")})
        assert result.outputs["p"].text == "x"
    assert exporter.get_finished_spans() == ()


def test_tracing_settings():
    from engine.config import RuntimeConfig
    from engine.errors import ValidationError
    from engine.tracing import tracer_provider

    cfg = RuntimeConfig.load({"tracing": {"enabled": True, "otlp_endpoint": "127.0.0.1:4317",
                                          "sample_ratio": 0.25, "service_name": "voice"}})
    tp = tracer_provider(cfg.tracing)
    try:
        assert tp.resource.attributes["service.name"] == "voice"
        assert "0.25" in tp.sampler.get_description()
    finally:
        tp.shutdown()
    assert tracer_provider(RuntimeConfig.load({}).tracing) is None
    with pytest.raises(ValidationError, match="tracing.sample_ratio"):
        RuntimeConfig.load({"tracing": {"sample_ratio": 2}})


@pytest.fixture
def spoken_question():
    """Made before the engine starts: the voice that speaks it belongs to the test."""
    from nodes.speech.spoken import question

    return question("What is the capital of France?")


@pytest.mark.speech
async def test_a_voice_turns_spans_show_its_stages(spoken_question):
    from speech_audio import VOICE_LOOP

    from engine.manifest import load_document

    tp, exporter = provider()
    engine = Engine({"ipc_root": TEST_IPC_ROOT}, tracer_provider=tp)
    audio = spoken_question
    async with engine:
        async with engine.stream(load_document(VOICE_LOOP)) as session:
            for i in range(0, audio.size, 512):
                await session.send("vad", RuntimeData.audio(audio[i:i + 512], 16000))
            await session.close()
            replies = [o for o in [o async for o in session] if o.data.metadata.get("text")]
    assert replies, "the voice loop answered"
    turn = replies[0].data.metadata["turn_id"]
    spans = [s for s in exporter.get_finished_spans() if s.attributes.get(P + "turn_id") == turn]
    stages = {s.attributes[P + "node_id"] for s in spans}
    assert {"asr", "llm", "tts"} <= stages, stages
    # the utterance is transcribed, then answered, then spoken: each stage's call starts
    # after the one before it started (the LLM streams phrases to the TTS while it writes)
    first = {node: min(s.start_time for s in spans if s.name == f"{node}.process")
             for node in ("asr", "llm", "tts")}
    assert first["asr"] <= first["llm"] <= first["tts"], sorted((s.start_time, s.name) for s in spans)
    root = next(s for s in exporter.get_finished_spans() if s.parent is None)
    assert all(s.context.trace_id == root.context.trace_id for s in spans)


async def test_tracing_settings_export_over_otlp_to_a_collector():
    # a real OTLP/gRPC receiver (the collector's TraceService), in threads of its own
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 - the service's method name
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    try:
        engine = Engine({"test_nodes": True, "ipc_root": TEST_IPC_ROOT, "tracing": {
            "enabled": True, "otlp_endpoint": f"127.0.0.1:{port}", "service_name": "otlp-test"}})
        async with engine:
            await engine.execute(manifest([{"id": "p", "node_type": "EchoNode"}], name="exported"),
                                 {"p": RuntimeData.text("x")})
        # closing the engine flushed its exporter
    finally:
        collector.stop(None)
    spans = [(rs.resource, span) for req in received for rs in req.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    names = {span.name for _, span in spans}
    assert {"session exported", "p.process", "p.flush"} <= names, names
    resource = spans[0][0]
    assert any(a.key == "service.name" and a.value.string_value == "otlp-test" for a in resource.attributes)


async def test_a_callers_traceparent_continues_its_trace_through_the_server():
    import grpc
    import leakprobe
    from grpc_client import CLOSE, buffer, chunk, collect, init, proto_manifest, requests

    from engine._proto import execution_pb2 as epb
    from engine._proto import execution_pb2_grpc as epb_grpc
    from engine._proto import streaming_pb2_grpc as spb_grpc
    from engine.server import EngineServer

    tp, exporter = provider()
    before = leakprobe.snapshot()
    server = EngineServer({"test_nodes": True, "ipc_root": TEST_IPC_ROOT}, port=0, tracer_provider=tp)
    await server.start()
    trace_id, span_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    metadata = (("traceparent", f"00-{trace_id}-{span_id}-01"),)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            manifest = proto_manifest([("p", "EchoNode")], name="called")
            req = epb.ExecuteRequest(manifest=manifest)
            req.data_inputs["p"].CopyFrom(buffer(RuntimeData.text("x")))
            resp = await epb_grpc.PipelineExecutionServiceStub(channel).ExecutePipeline(req, metadata=metadata)
            assert resp.WhichOneof("outcome") == "result"
            await collect(spb_grpc.StreamingPipelineServiceStub(channel).StreamPipeline(
                requests(init(manifest), chunk("p", RuntimeData.text("y"), 0), CLOSE), metadata=metadata))
    finally:
        await server.aclose()
    assert leakprobe.leaks(before) == {}
    roots = [s for s in exporter.get_finished_spans() if s.name == "session called"]
    assert len(roots) == 2
    for root in roots:
        assert format(root.context.trace_id, "032x") == trace_id
        assert format(root.parent.span_id, "016x") == span_id and root.parent.is_remote
