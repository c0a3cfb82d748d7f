"""PipelineExecutionService: GetVersion and unary ExecutePipeline.

ExecutePipeline runs the manifest to completion and answers with one
DataBuffer per sink. Every failure, whatever raised it, is answered as an
`error` with its ErrorType and failing node, never as a bare gRPC status;
the run's processes are gone before the response is sent (Engine.execute
waits for the teardown).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import orjson
from grpc import aio

from .._proto import common_pb2 as pb
from .._proto import execution_pb2 as epb
from .._proto import execution_pb2_grpc as epb_grpc
from ..engine import Engine
from ..errors import EngineError, ValidationError, VersionMismatchError
from . import wire
from .convert import (
    check_client_version,
    engine_error,
    error_to_proto,
    execution_metrics,
    limits_from_proto,
    trace_carrier,
)
from .convert import version_info as fill_version_info
from .metrics import ServerMetrics

log = logging.getLogger("engine.server")


class PipelineExecutionServicer(epb_grpc.PipelineExecutionServiceServicer):
    def __init__(self, engine: Engine, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics

    async def GetVersion(self, request: epb.VersionRequest, context: aio.ServicerContext) -> epb.VersionResponse:
        resp = epb.VersionResponse()
        fill_version_info(self.engine.registry, resp.version_info)
        resp.compatible, resp.compatibility_message = check_client_version(request.client_version)
        return resp

    async def ExecutePipeline(self, request: epb.ExecuteRequest,
                              context: aio.ServicerContext) -> epb.ExecuteResponse:
        t0 = time.perf_counter()
        self.metrics.sessions.labels("execute").inc()
        resp = epb.ExecuteResponse()
        try:
            self._run_checks(request)
            manifest = self.engine.validate(request.manifest)
            t_conv = time.perf_counter()
            inputs = {nid: wire.from_proto(buf, node_id=nid) for nid, buf in request.data_inputs.items()}
            p2r_ms = (time.perf_counter() - t_conv) * 1000
            result = await self.engine.execute(manifest, inputs, limits=limits_from_proto(request.resource_limits),
                                               trace_carrier=trace_carrier(context))
        except Exception as exc:  # every failure is answered in-band, typed
            err = engine_error(exc)
            if not isinstance(exc, EngineError):
                log.exception("ExecutePipeline failed unexpectedly")
            self.metrics.error(err.error_type.name)
            error_to_proto(err, resp.error)
            _log_call(request, t0, f"failed {err.error_type.name}: {err}", node_id=err.node_id)
            return resp

        out = resp.result
        t_conv = time.perf_counter()
        out_kinds: Counter[str] = Counter()
        for node_id, frame in result.outputs.items():
            wire.to_proto(frame, out.data_outputs[node_id])
            out_kinds[frame.kind.name.lower()] += len(result.all_outputs[node_id])
        r2p_ms = (time.perf_counter() - t_conv) * 1000
        snap = result.metrics
        snap["wall_time_ms"] = (time.perf_counter() - t0) * 1000
        execution_metrics(snap, out.metrics, proto_to_runtime_ms=p2r_ms, runtime_to_proto_ms=r2p_ms,
                          outputs_by_kind=out_kinds)
        for node_id, st in snap["nodes"].items():
            nr = out.node_results.add(node_id=node_id, status=pb.NODE_STATUS_SUCCESS)
            nr.output_metadata = _node_output_metadata(node_id, st, result)
        out.status = pb.EXECUTION_STATUS_SUCCESS
        self.metrics.execute_latency.observe(time.perf_counter() - t0)
        _log_call(request, t0, f"ok, {sum(out_kinds.values())} output(s)", session_id=snap.get("session_id"))
        return resp

    def _run_checks(self, request: epb.ExecuteRequest) -> None:
        ok, message = check_client_version(request.client_version)
        if not ok:
            raise VersionMismatchError(message)
        if not request.HasField("manifest"):
            raise ValidationError("ExecuteRequest.manifest is missing")


def _log_call(request: epb.ExecuteRequest, t0: float, outcome: str, *, node_id: str | None = None,
              session_id: str | None = None) -> None:
    """The call's one line (an access log): pipeline, outcome, time."""
    name = request.manifest.metadata.name or "(unnamed)"
    log.info("ExecutePipeline %r: %s in %.1f ms", name, outcome.replace("\n", "; "),
             (time.perf_counter() - t0) * 1000, extra={"node_id": node_id or "-", "session_id": session_id or "-"})


def _node_output_metadata(node_id: str, stats: dict[str, Any], result: Any) -> str:
    info: dict[str, Any] = {"items_in": stats.get("items_in", 0), "items_out": stats.get("items_out", 0)}
    frames = result.all_outputs.get(node_id)
    if frames:
        info["outputs"] = len(frames)
        info["kind"] = frames[0].kind.name.lower()
    return orjson.dumps(info).decode()
