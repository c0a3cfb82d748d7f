"""Engine values ↔ remotemedia.v1 messages: errors, metrics, versions, limits.

Frames themselves convert in `engine.server.wire`; this module holds what only the
gRPC service needs.
"""

from __future__ import annotations

import functools
import re
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .. import __version__
from .._proto import common_pb2 as pb
from .._proto import streaming_pb2 as spb
from ..config import ClientLimits
from ..errors import EngineError, InternalError
from ..registry import ExecutorRegistry

PROTOCOL_VERSION = "v1"
SUPPORTED_PROTOCOLS = ("v1",)

_VERSION_RE = re.compile(r"^\s*v?(\d+)(?:[.\-+_].*)?\s*$", re.IGNORECASE)


def engine_error(exc: BaseException) -> EngineError:
    """Any exception as an EngineError (unknown ones become INTERNAL, with their traceback)."""
    if isinstance(exc, EngineError):
        return exc
    return InternalError(f"{type(exc).__name__}: {exc}", traceback_text="".join(traceback.format_exception(exc)))


def error_to_proto(err: EngineError, out: pb.ErrorResponse | None = None) -> pb.ErrorResponse:
    msg = out if out is not None else pb.ErrorResponse()
    msg.error_type = int(err.error_type)
    msg.message = err.message
    if err.node_id:
        msg.failing_node_id = err.node_id
    if err.context:
        msg.context = orjson.dumps(err.context, default=str).decode()
    if err.traceback_text:
        msg.stack_trace = err.traceback_text
    return msg


#: bytes of the largest message kept for what a message holds besides its outputs
#: (metrics and node results of an answer, a result's metadata, framing)
RESERVE_BYTES = 64 * 1024


def payload_budget(max_message_bytes: int) -> int:
    """How many bytes of outputs one message of at most `max_message_bytes` may carry."""
    return max_message_bytes - min(RESERVE_BYTES, max_message_bytes // 8)


def limits_from_proto(rl: pb.ResourceLimits) -> ClientLimits | None:
    if not (rl.max_memory_bytes or rl.max_timeout_ms or rl.max_audio_samples):
        return None
    return ClientLimits(rl.max_memory_bytes, rl.max_timeout_ms, rl.max_audio_samples)


def check_client_version(client_version: str) -> tuple[bool, str]:
    """(compatible, message). Empty means "v1": one client leaves the field out."""
    if not client_version.strip():
        return True, "no client version given; treated as v1"
    match = _VERSION_RE.match(client_version)
    if match is None:
        return False, f"cannot read client version {client_version!r}; expected e.g. 'v1' or '1.2.0'"
    major = int(match.group(1))
    if major != 1:
        return False, (f"client speaks protocol major version {major}; this server speaks "
                       f"{PROTOCOL_VERSION} only")
    return True, f"client {client_version} is compatible with {PROTOCOL_VERSION}"


@functools.cache
def build_timestamp() -> str:
    """When the installed engine was built: the compiled extension's modification time."""
    from .. import _fastpath

    ts = Path(_fastpath.__file__).stat().st_mtime
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def version_info(registry: ExecutorRegistry, out: pb.VersionInfo) -> None:
    out.protocol_version = PROTOCOL_VERSION
    out.runtime_version = __version__
    out.supported_node_types.extend(sorted(registry.names()))
    out.supported_protocols.extend(SUPPORTED_PROTOCOLS)
    out.build_timestamp = build_timestamp()


def execution_metrics(snapshot: Mapping[str, Any], out: pb.ExecutionMetrics, *,
                      proto_to_runtime_ms: float = 0.0, runtime_to_proto_ms: float = 0.0,
                      outputs_by_kind: Mapping[str, int] | None = None) -> None:
    """Fill ExecutionMetrics from a session snapshot (see Session.snapshot)."""
    out.wall_time_ms = snapshot.get("wall_time_ms", 0.0)
    nodes = snapshot.get("nodes", {})
    out.cpu_time_ms = sum(st.get("cpu_s", 0.0) for st in nodes.values()) * 1000
    out.memory_used_bytes = int(snapshot.get("peak_memory_bytes", 0))
    for node_id, st in nodes.items():
        nm = out.node_metrics[node_id]
        nm.execution_time_ms = st.get("busy_s", 0.0) * 1000
        nm.items_processed = int(st.get("items_in", 0))
        custom = {"items_out": st.get("items_out", 0), "cpu_ms": st.get("cpu_s", 0.0) * 1000,
                  "dropped": st.get("dropped", 0), **st.get("extra", {})}
        nm.custom_metrics = orjson.dumps(custom, default=str).decode()
    out.proto_to_runtime_ms = proto_to_runtime_ms
    out.runtime_to_proto_ms = runtime_to_proto_ms
    out.serialization_time_ms = proto_to_runtime_ms + runtime_to_proto_ms
    breakdown = dict(snapshot.get("by_kind", {}))
    for kind, n in (outputs_by_kind or {}).items():
        breakdown[kind] = breakdown.get(kind, 0) + n
    for kind, n in breakdown.items():
        out.data_type_breakdown[kind] = int(n)


def stream_metrics(snapshot: Mapping[str, Any], out: spb.StreamMetrics) -> None:
    out.session_id = snapshot["session_id"]
    out.chunks_processed = snapshot["chunks_processed"]
    out.average_latency_ms = snapshot["average_latency_ms"]
    out.total_items = snapshot["outputs"]
    out.buffer_items = snapshot["buffered_outputs"]
    out.chunks_dropped = snapshot["dropped"]
    out.peak_memory_bytes = snapshot["peak_memory_bytes"]
    for kind, n in snapshot["by_kind"].items():
        out.data_type_breakdown[kind] = int(n)


def trace_carrier(context: Any) -> dict[str, str] | None:
    """A call's W3C trace context (`traceparent`, `tracestate` metadata), for engine.tracing."""
    md = {k: v for k, v in (context.invocation_metadata() or ()) if k in ("traceparent", "tracestate")}
    return md or None

