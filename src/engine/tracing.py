"""OpenTelemetry traces: one trace per session, a span per node call.

Optional: needs the `otel` extra (opentelemetry-sdk and the OTLP exporter)
and `[tracing] enabled = true` in runtime.toml, or an embedding app's own
`TracerProvider` passed to `Engine(tracer_provider=...)`. Off, it costs
nothing: no span is made and node processes record nothing.

The session's span (`session <pipeline>`) is the root; the sampler
(`sample_ratio`, parent-based) decides per session, so a trace is whole or
absent. Each node call (`<node>.process`, `.flush`, `.on_turn_event`) is a
child span with the session, node, node type, the input's sequence and its
turn (a voice loop's turn id), the number of outputs, and the error if it
failed. Node processes time their calls themselves (the host's own clock,
`time.time_ns`) and send the records over their control lane
(`ipc.control.CallRecord`); the engine makes their spans, so only the
engine process exports, over OTLP/gRPC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .composite import SEP as COMPOSITE_SEP

log = logging.getLogger("engine.tracing")

PREFIX = "remotemedia."


@dataclass(frozen=True, slots=True)
class CallTiming:
    """One node call, timed where it ran."""

    where: str  # process | flush | on_turn_event
    sequence: int | None
    start_ns: int
    end_ns: int
    outputs: int
    turn_id: str = ""
    error: str = ""


def tracer_provider(settings: Any) -> Any:
    """A TracerProvider exporting over OTLP as `[tracing]` says, or None when tracing is off."""
    if not settings.enabled:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        from .errors import ValidationError

        raise ValidationError(f"[tracing] enabled needs the otel extra (pip install "
                              f"'remotemedia-engine[otel]'): {exc}") from None
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}),
                              sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
    exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint or None, insecure=settings.otlp_insecure)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Tracing:
    """The engine's tracer; makes a `SessionTrace` for each sampled session."""

    def __init__(self, provider: Any, *, owned: bool) -> None:
        self.provider = provider
        self.owned = owned  # made from [tracing]: shut down with the engine
        self.tracer = provider.get_tracer("remotemedia-engine")

    def session(self, session_id: str, pipeline: str, nodes: int,
                carrier: dict[str, str] | None = None) -> SessionTrace | None:
        """The session's root span; a caller's W3C `traceparent` (in `carrier`) makes it a child
        of the caller's span, and the caller's sampling decision then holds."""
        parent = None
        if carrier:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            parent = TraceContextTextMapPropagator().extract(carrier)
        span = self.tracer.start_span(f"session {pipeline}", context=parent, attributes={
            PREFIX + "session_id": session_id, PREFIX + "pipeline": pipeline, PREFIX + "nodes": nodes})
        if not span.is_recording():  # not sampled: nothing more is made for this session
            span.end()
            return None
        return SessionTrace(self.tracer, span, session_id)

    def shutdown(self) -> None:
        if self.owned:
            self.provider.shutdown()


class SessionTrace:
    def __init__(self, tracer: Any, span: Any, session_id: str) -> None:
        from opentelemetry import trace

        self._trace = trace
        self.tracer = tracer
        self.span = span
        self.session_id = session_id
        self._context = trace.set_span_in_context(span)

    def node_call(self, node_id: str, node_type: str, call: CallTiming) -> None:
        attributes: dict[str, Any] = {
            PREFIX + "session_id": self.session_id, PREFIX + "node_id": node_id,
            PREFIX + "node_type": node_type, PREFIX + "outputs": call.outputs,
        }
        outer, sep, _inner = node_id.partition(COMPOSITE_SEP)
        if sep:  # an inner node of a composite: the node the caller knows
            attributes[PREFIX + "composite_node_id"] = outer
        if call.sequence is not None:
            attributes[PREFIX + "sequence"] = call.sequence
        if call.turn_id:
            attributes[PREFIX + "turn_id"] = call.turn_id
        span = self.tracer.start_span(f"{node_id}.{call.where}", context=self._context,
                                      start_time=call.start_ns, attributes=attributes)
        if call.error:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, call.error))
        span.end(end_time=call.end_ns)

    def end(self, error: Any = None) -> None:
        if error is not None:
            self.span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(error)))
            self.span.set_attribute(PREFIX + "error_type", error.error_type.name)
        self.span.end()


__all__ = ["CallTiming", "SessionTrace", "Tracing", "tracer_provider"]
