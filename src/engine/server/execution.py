"""PipelineExecutionService: GetVersion and unary ExecutePipeline.

ExecutePipeline runs the manifest to completion and answers with one
DataBuffer per sink. Every failure, whatever raised it, is answered as an
`error` with its ErrorType and failing node, never as a bare gRPC status;
the run's processes are gone before the response is sent (Engine.execute
waits for the teardown). Outputs that would not fit in one message stop the
run as they pass the limit (RESOURCE_LIMIT), rather than after computing
an answer gRPC cannot send. A call the client cancels, or whose deadline
passes, is one log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from typing import Any

import orjson
from grpc import aio

from .._proto import common_pb2 as pb
from .._proto import execution_pb2 as epb
from .._proto import execution_pb2_grpc as epb_grpc
from ..engine import Engine, ExecutionResult, OutputLimit
from ..errors import EngineError, ResourceLimitError, ValidationError, VersionMismatchError
from . import wire
from .call_end import CallEnd
from .convert import (
    check_client_version,
    engine_error,
    error_to_proto,
    execution_metrics,
    limits_from_proto,
    payload_budget,
    trace_carrier,
)
from .convert import version_info as fill_version_info
from .metrics import ServerMetrics

log = logging.getLogger("engine.server")


class PipelineExecutionServicer(epb_grpc.PipelineExecutionServiceServicer):
    def __init__(self, engine: Engine, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        #: the server's message size limit (gRPC's, both ways): the answer must fit in it
        self.max_message_bytes = engine.config.caps.max_message_bytes

    async def GetVersion(self, request: epb.VersionRequest, context: aio.ServicerContext) -> epb.VersionResponse:
        resp = epb.VersionResponse()
        fill_version_info(self.engine.registry, resp.version_info)
        resp.compatible, resp.compatibility_message = check_client_version(request.client_version)
        return resp

    async def ExecutePipeline(self, request: epb.ExecuteRequest,
                              context: aio.ServicerContext) -> epb.ExecuteResponse:
        t0 = time.perf_counter()
        self.metrics.sessions.labels("execute").inc()
        session_id = uuid.uuid4().hex[:16]
        ended = CallEnd(context, self.engine)
        # the run is a task of its own so that a cancel is seen as it comes (what ended
        # the call is judged then), not after the run's teardown
        run = asyncio.get_running_loop().create_task(self._run(request, context, session_id),
                                                     name=f"{session_id}:execute")
        try:
            result, p2r_ms = await asyncio.shield(run)
            resp = self._answer(result, t0, p2r_ms)
        except asyncio.CancelledError:  # not an error of ours: no traceback, one line
            why = ended.why()
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)  # its session is torn down
            _log_call(request, t0, f"cancelled: {why}", session_id=session_id)
            raise
        except Exception as exc:  # every failure is answered in-band, typed
            return self._failed(request, exc, t0, session_id)
        self.metrics.execute_latency.observe(time.perf_counter() - t0)
        outputs = sum(len(frames) for frames in result.all_outputs.values())
        _log_call(request, t0, f"ok, {outputs} output(s)", session_id=session_id)
        return resp

    async def _run(self, request: epb.ExecuteRequest, context: aio.ServicerContext,
                   session_id: str) -> tuple[ExecutionResult, float]:
        self._run_checks(request)
        manifest = self.engine.validate(request.manifest)
        t_conv = time.perf_counter()
        inputs = {nid: wire.from_proto(buf, node_id=nid) for nid, buf in request.data_inputs.items()}
        p2r_ms = (time.perf_counter() - t_conv) * 1000
        # the answer is one message: outputs that could not be sent stop the run where they pass it
        limit = OutputLimit(self.max_message_bytes, "caps.max_message_bytes",
                            self.max_message_bytes - payload_budget(self.max_message_bytes))
        result = await self.engine.execute(manifest, inputs, limits=limits_from_proto(request.resource_limits),
                                           trace_carrier=trace_carrier(context), output_limit=limit,
                                           session_id=session_id)
        return result, p2r_ms

    def _answer(self, result: ExecutionResult, t0: float, p2r_ms: float) -> epb.ExecuteResponse:
        resp = epb.ExecuteResponse()
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
        size = resp.ByteSize()
        if size > self.max_message_bytes:  # the reserve fell short: still an answer, not a failed send
            largest = max(out.data_outputs, key=lambda nid: out.data_outputs[nid].ByteSize(), default=None)
            raise ResourceLimitError(
                f"the answer came to {size:,} bytes: more than one message may carry "
                f"(caps.max_message_bytes = {self.max_message_bytes:,} bytes)", node_id=largest,
                context={"field": "caps.max_message_bytes", "limit": self.max_message_bytes,
                         "response_bytes": size})
        return resp

    def _failed(self, request: epb.ExecuteRequest, exc: Exception, t0: float,
                session_id: str) -> epb.ExecuteResponse:
        err = engine_error(exc)
        if not isinstance(exc, EngineError):  # a defect: its traceback is worth a look
            log.exception("ExecutePipeline failed unexpectedly", extra={"session_id": session_id})
        self.metrics.error(err.error_type.name)
        resp = epb.ExecuteResponse()
        error_to_proto(err, resp.error)
        _log_call(request, t0, f"failed {err.error_type.name}: {err}", node_id=err.node_id, session_id=session_id)
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
