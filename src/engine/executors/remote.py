"""The remote executor: a manifest node with `host: "H:P"` runs on the engine there.

This engine opens one `StreamPipeline` to H:P per such node and session,
with a one-node manifest (the node's type, params and executor), relays the
remote's init progress as this node's, sends the node's inputs as
`DataChunk`s in order and takes the remote's results as the node's outputs.
Backpressure holds end to end: a push waits for the HTTP/2 stream to take
the chunk, and the reader stops reading while this node's consumers are
full, so a slow remote slows the sender and nothing is dropped or reordered.

Only `[remote] allowed_hosts` may be dialled (validation refuses any other
`host`), with the host's API key and CA from runtime.toml. A remote that
fails sends its typed error (kept, with the remote's message); one that dies,
hangs or drops off the network is noticed by gRPC keepalive and becomes this
node's typed error. Closing the session cancels the remote call, which tears
the remote session down too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import orjson
from grpc import aio

from ..config import RemoteSettings
from ..data import RuntimeData
from ..errors import EngineError, Issue, NodeExecutionError, rebuild_error
from ..turns import TurnEvent
from .base import NodeRunner, NodeStats, Progress, RunnerContext

if TYPE_CHECKING:
    from ..manifest import Manifest
    from ..plan import PlannedNode

log = logging.getLogger("engine.remote")


def check(manifest: Manifest, settings: RemoteSettings) -> list[Issue]:
    """Validation: every `host` a manifest names must be one the operator allows."""
    issues = []
    for decl in manifest.nodes:
        if decl.host and decl.host not in settings.allowed_hosts:
            allowed = ", ".join(settings.allowed_hosts) or "none: [remote] allowed_hosts is empty"
            issues.append(Issue(f"$.nodes[{decl.index}].host",
                                f"host {decl.host!r} is not one this engine may dial (allowed: {allowed})",
                                node_id=decl.id, field="host", code="remote.host"))
    return issues


def open_channel(address: str, s: RemoteSettings) -> aio.Channel:
    """A channel of its own to the engine at `address`, with keepalive (and TLS where set)."""
    host = s.host(address)
    options = [
        ("grpc.keepalive_time_ms", int(s.keepalive_secs * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_secs * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # a connection attempt (a TLS handshake included) gives up with the connect timeout,
        # not gRPC's default 20 s: a closed channel's attempt ends, and its socket with it
        ("grpc.min_reconnect_backoff_ms", int(s.connect_timeout_secs * 1000)),
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
        # one connection per runner: a session's remote nodes never queue behind another's
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if not host.ca_file:
        return aio.insecure_channel(address, options=options)
    if host.server_name:
        options.append(("grpc.ssl_target_name_override", host.server_name))
    creds = grpc.ssl_channel_credentials(root_certificates=Path(host.ca_file).read_bytes())
    return aio.secure_channel(address, creds, options=options)


class RemoteRunner(NodeRunner):
    """One node of one session, on the engine at `host`."""

    def __init__(self, planned: PlannedNode, ctx: RunnerContext, settings: RemoteSettings,
                 pipeline_name: str) -> None:
        self.node_id = planned.id
        self.planned = planned
        self.ctx = ctx
        self.stats = NodeStats()
        self.address = str(planned.decl.host)
        self._settings = settings
        self._pipeline = pipeline_name
        self._channel: aio.Channel | None = None
        self._call: Any = None
        self._write_lock = asyncio.Lock()
        self._pending_ends = max(1, len(planned.upstream))
        #: the last sequence sent: the remote refuses one that goes backwards
        self._last_sequence = 0
        self._ending = False

    # ------------------------------------------------------------ start

    async def start(self, progress: Progress) -> None:
        from .._proto import streaming_pb2 as spb
        from .._proto import streaming_pb2_grpc as spb_grpc

        self._channel = open_channel(self.address, self._settings)
        host = self._settings.host(self.address)
        metadata = (("authorization", f"Bearer {host.api_key}"),) if host.api_key else None
        try:
            async with asyncio.timeout(self._settings.connect_timeout_secs):
                await self._channel.channel_ready()
        except TimeoutError:
            raise NodeExecutionError(
                f"remote engine {self.address} cannot be reached (no connection within "
                f"{self._settings.connect_timeout_secs:g} s)", node_id=self.node_id,
                context={"host": self.address, "field": "host"}) from None
        self._call = spb_grpc.StreamingPipelineServiceStub(self._channel).StreamPipeline(metadata=metadata)
        await self._write(spb.StreamRequest(init=spb.StreamInit(manifest=self._one_node_manifest(),
                                                                client_version="v1")))
        try:
            async with asyncio.timeout(self.ctx.settings.init_timeout_secs):
                while True:
                    resp = await self._read_one()
                    kind = resp.WhichOneof("response")
                    if kind == "init_progress":
                        p = resp.init_progress
                        progress(self.node_id, p.phase, p.percent, f"{self.address}: {p.message}"
                                 if p.message else self.address)
                    elif kind == "ready":
                        break
                    elif kind == "error":
                        raise self._remote_error(resp.error)
        except TimeoutError:
            raise NodeExecutionError(
                f"remote engine {self.address} did not get the node ready within init_timeout_secs="
                f"{self.ctx.settings.init_timeout_secs:g}", node_id=self.node_id,
                context={"host": self.address}) from None
        self.ctx.track(self._read_results(), f"{self.node_id}:remote")

    def _one_node_manifest(self) -> Any:
        from ..manifest_proto import to_proto

        decl = self.planned.decl
        node: dict[str, Any] = {"id": decl.id, "node_type": decl.node_type, "params": dict(decl.params),
                                "is_streaming": decl.is_streaming}
        if decl.executor:
            node["executor"] = decl.executor
        return to_proto({"version": "v1", "metadata": {"name": f"{self._pipeline}/{decl.id}"},
                         "nodes": [node], "connections": []})

    # ------------------------------------------------------------ frames

    async def push(self, frame: RuntimeData) -> None:
        from .._proto import streaming_pb2 as spb
        from ..server import wire

        self.stats.items_in += 1
        # the input's own sequence travels (and comes back on its results); one
        # from a second upstream that is behind the first is raised to keep order
        sequence = max(frame.sequence or 0, self._last_sequence)
        self._last_sequence = sequence
        chunk = spb.DataChunk(node_id=self.node_id, sequence=sequence)
        wire.to_proto(frame, chunk.buffer)
        await self._write(spb.StreamRequest(data_chunk=chunk))

    async def turn_event(self, event: TurnEvent) -> None:
        # remotemedia.v1 carries no turn events: the remote node hears none
        return None

    async def end(self) -> None:
        from .._proto import streaming_pb2 as spb

        self._pending_ends -= 1
        if self._pending_ends > 0:
            return
        self._ending = True
        close = spb.StreamRequest(control=spb.StreamControl(command=spb.StreamControl.COMMAND_CLOSE))
        await self._write(close)
        async with self._write_lock:
            await self._guard(self._call.done_writing())

    async def _read_results(self) -> None:
        from ..server import wire

        while True:
            resp = await self._read_one()
            kind = resp.WhichOneof("response")
            if kind == "result":
                result = resp.result
                for buf in result.data_outputs.values():
                    frame = wire.from_proto(buf, self.node_id)
                    frame.sequence = result.sequence
                    frame.source = self.node_id
                    self.stats.items_out += 1
                    await self.ctx.emit(self.node_id, frame)
            elif kind == "error":
                raise self._remote_error(resp.error)
            elif kind == "closed":
                if not self._ending:
                    raise NodeExecutionError(f"remote engine {self.address} closed the node's session: "
                                             f"{resp.closed.reason or 'no reason given'}",
                                             node_id=self.node_id, context={"host": self.address})
                m = resp.closed.final_metrics.node_metrics.get(self.node_id)
                if m is not None:
                    self.stats.busy_s = self.stats.cpu_s = m.execution_time_ms / 1000
                await self.ctx.node_ended(self.node_id)
                return

    # ------------------------------------------------------------ the call

    async def _write(self, request: Any) -> None:
        async with self._write_lock:
            await self._guard(self._call.write(request))

    async def _read_one(self) -> Any:
        resp = await self._guard(self._call.read())
        if resp is aio.EOF:
            raise self._call_error(await self._call.code(), await self._call.details())
        return resp

    async def _guard(self, op: Any) -> Any:
        try:
            return await op
        except aio.AioRpcError as exc:
            code, details = exc.code(), exc.details()
        except asyncio.InvalidStateError:  # a write after the remote ended the call
            code, details = await self._call.code(), await self._call.details()
        # raised outside the handler, the call's coroutine dropped: the error a caller
        # keeps holds neither the call nor its channel (and so no socket) alive
        op = None
        raise self._call_error(code, details)

    def _call_error(self, code: grpc.StatusCode | None, details: str | None) -> EngineError:
        name = code.name if code is not None else "UNKNOWN"
        what = {"UNAVAILABLE": "is gone (connection lost or refused)",
                "DEADLINE_EXCEEDED": "did not answer in time",
                "UNAUTHENTICATED": "refused this engine's API key",
                "CANCELLED": "cancelled the call"}.get(name, "ended the call")
        return NodeExecutionError(f"remote engine {self.address} {what}: {name}: {details or ''}".rstrip(": "),
                                  node_id=self.node_id, context={"host": self.address, "grpc_status": name})

    def _remote_error(self, err: Any) -> EngineError:
        try:
            context = orjson.loads(err.context) if err.context else {}
        except orjson.JSONDecodeError:
            context = {"remote_context": err.context}
        if not isinstance(context, dict):
            context = {"remote_context": context}
        context["host"] = self.address
        return rebuild_error("", err.error_type, f"on {self.address}: {err.message}", node_id=self.node_id,
                             context=context, traceback_text=err.stack_trace)

    async def aclose(self) -> None:
        call, self._call = self._call, None
        if call is not None and not call.done():
            call.cancel()  # the remote tears its session down
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
