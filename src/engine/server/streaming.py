"""StreamingPipelineService: one bidirectional call drives one session.

    init → (init_progress …) → ready → data chunks ⇄ results (+ metrics every
    N chunks) → CLOSE → closed → status OK

Two tasks serve a call, both owned by it and cancelled when it ends:

- the *reader* takes requests off the wire, checks them (target node,
  sequence order, declared sizes against bytes) and converts each buffer once
  into a frame. While the pipeline starts, chunks wait in a bounded inbox;
  when it is full the reader stops reading, so gRPC flow control slows the
  client down instead of anything being refused or lost. Once the pipeline
  runs, the reader feeds the session itself (one task hop less per chunk);
  CLOSE flushes, CANCEL stops at once.
- the *driver* starts the session, answers `ready`, feeds what was queued
  meanwhile, then hands over to the reader.

Sink outputs come straight from the session (its output sink) as `result`s
tagged with the input's sequence. Everything the call answers goes through
one bounded outbox that the call's generator drains; the outbox being full
is what slows the pipeline down for a slow reader. An `error`, `closed` or
the end of the request stream is terminal: the generator sends it and
returns, and its `finally` tears the session down. A client that goes away
cancels the generator: the same `finally`, and one log line saying whether
the client cancelled or its deadline passed.

One module on purpose (~460 lines): the two tasks, the outbox and the
call's end share one StreamCall's state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from grpc import aio

from .._proto import streaming_pb2 as spb
from .._proto import streaming_pb2_grpc as spb_grpc
from ..config import ServerSettings
from ..data import DataKind, RuntimeData
from ..engine import Engine
from ..errors import EngineError, ResourceLimitError, ValidationError, VersionMismatchError
from ..fifo import BoundedFifo
from ..logs import ContextAdapter
from ..session import InitProgress, Output, Session
from . import wire
from .call_end import DEADLINE_PASSED, CallEnd
from .convert import (
    check_client_version,
    engine_error,
    error_to_proto,
    execution_metrics,
    limits_from_proto,
    payload_budget,
    stream_metrics,
    trace_carrier,
)
from .metrics import ServerMetrics

log = logging.getLogger("engine.server")

_OUTBOX_CAPACITY = 256
#: how long an ending call keeps reading what the client still sends
LINGER_S = 1.0
#: inputs whose arrival time is kept to report processing_time_ms per result
_TIMING_WINDOW = 4096


@dataclass(frozen=True, slots=True)
class _Chunk:
    node_id: str
    sequence: int
    frames: tuple[RuntimeData, ...]


@dataclass(frozen=True, slots=True)
class _Close:
    cancel: bool = False
    reason: str = "closed by client"


@dataclass(frozen=True, slots=True)
class _Final:
    """Terminal: send `response` (if any), then end the call."""

    response: spb.StreamResponse | None
    #: a `closed` answer's reason, logged once it is sent (a cancel may come first)
    closed_reason: str = ""


class StreamingPipelineServicer(spb_grpc.StreamingPipelineServiceServicer):
    def __init__(self, engine: Engine, metrics: ServerMetrics, settings: ServerSettings) -> None:
        self.engine = engine
        self.metrics = metrics
        self.settings = settings

    async def StreamPipeline(self, request_iterator: AsyncIterator[spb.StreamRequest],
                             context: aio.ServicerContext) -> AsyncIterator[spb.StreamResponse]:
        call = StreamCall(self.engine, self.metrics, self.settings, request_iterator, trace_carrier(context),
                          CallEnd(context, self.engine))
        async for response in call.run():
            yield response


class StreamCall:
    def __init__(self, engine: Engine, metrics: ServerMetrics, settings: ServerSettings,
                 requests: AsyncIterator[spb.StreamRequest], carrier: dict[str, str] | None = None,
                 ended: CallEnd | None = None) -> None:
        self.engine = engine
        self.ended = ended
        self.end_said = ""  # the reason the call's end was logged with (a `closed` sent)
        self.carrier = carrier
        self.metrics = metrics
        self.settings = settings
        self.requests = requests
        self.session: Session | None = None
        self.outbox = BoundedFifo(_OUTBOX_CAPACITY)
        self.inbox: asyncio.Queue[_Chunk | _Close] = asyncio.Queue(max(1, settings.pending_chunks_capacity))
        self.tasks: list[asyncio.Task] = []
        self.received_at: dict[int, float] = {}
        self.chunks = 0
        self.sent = 0
        self.live = False  # the pipeline is up and the queue of early chunks is drained
        self.ending = False  # a terminal answer is queued: the reader drops what still comes
        self.known_nodes: set[str] = set()
        self.last_sequence = -1
        self.started = time.perf_counter()
        #: the bytes of outputs one result may carry (gRPC would refuse to send a larger one)
        self.max_result_bytes = payload_budget(engine.config.caps.max_message_bytes)
        self.log: logging.LoggerAdapter = ContextAdapter(log, {"session_id": "-", "node_id": "-"})

    # ------------------------------------------------------------ the call

    async def run(self) -> AsyncIterator[spb.StreamResponse]:
        try:
            first = await self._first_init()
            if first is None:
                return
            self._open_session(first)
            loop = asyncio.get_running_loop()
            self.tasks.append(loop.create_task(self._reader(), name="stream-reader"))
            self.tasks.append(loop.create_task(self._driver(first), name="stream-driver"))
            while True:
                item = await self.outbox.get()
                if isinstance(item, _Final):
                    if item.response is not None:
                        yield item.response
                    if item.closed_reason:
                        self.end_said = item.closed_reason
                        self.log.info("stream closed (%s): %d chunks", item.closed_reason, self.chunks)
                    await self._let_client_finish(self.tasks[0])
                    return
                yield item
        except EngineError as err:
            yield self._error_response(err)
            await self._let_client_finish(None)
        except (asyncio.CancelledError, GeneratorExit):  # not an error of ours: one line, no traceback
            why = self.ended.why() if self.ended is not None else ""
            if why and why != self.end_said:  # said once (a deadline may have ended the requests first)
                self.log.info("stream ended: %s (%d chunks in %.1f s)", why, self.chunks,
                              time.perf_counter() - self.started)
            raise
        finally:
            await asyncio.shield(self._cleanup())

    async def _let_client_finish(self, reader: asyncio.Task | None) -> None:
        """Keep reading (and dropping) what the client still sends, briefly, before ending the call.

        Clients send init, every chunk and CLOSE without waiting for answers;
        ending the call while they write makes their own write fail, and the
        client then sees an INTERNAL error instead of this call's answer. A
        client that half-closes ends this at once; `LINGER_S` bounds the rest.
        """
        try:
            async with asyncio.timeout(LINGER_S):
                if reader is not None:
                    await asyncio.wait({reader})
                else:
                    async for _ in self.requests:
                        pass
        except (TimeoutError, Exception):  # noqa: BLE001 - the answer is sent; this is courtesy
            pass

    async def _first_init(self) -> spb.StreamInit | None:
        try:
            request = await anext(aiter(self.requests))
        except StopAsyncIteration:
            return None  # the client half-closed without a word
        if request.WhichOneof("request") != "init":
            raise ValidationError(f"the first message of a stream must be init, got "
                                  f"{request.WhichOneof('request') or 'an empty request'} (STREAM_ERROR_INIT_REQUIRED)")
        init = request.init
        ok, message = check_client_version(init.client_version)
        if not ok:
            raise VersionMismatchError(message)
        if not init.HasField("manifest"):
            raise ValidationError("StreamInit.manifest is missing")
        return init

    def _open_session(self, init: spb.StreamInit) -> None:
        self.session = self.engine.stream(init.manifest, on_progress=self._progress,
                                          limits=limits_from_proto(init.resource_limits),
                                          output_sink=self, trace_carrier=self.carrier)
        self.metrics.sessions.labels("stream").inc()
        self.log = ContextAdapter(log, {"session_id": self.session.id, "node_id": "-"})
        self.known_nodes = set(self.session.manifest.public_ids)

    async def _cleanup(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.session is not None:
            await self.session.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        # Answers nobody will read (a client that never read, then left) go
        # now: this call may live on in a reference cycle (an error's
        # traceback) until the collector's next full pass, and must not keep
        # up to an outbox of frames (tens of MiB) alive meanwhile.
        self.outbox.clear()
        while not self.inbox.empty():
            self.inbox.get_nowait()

    # ------------------------------------------------------------ responses

    def _progress(self, ev: InitProgress) -> None:
        resp = spb.StreamResponse()
        p = resp.init_progress
        p.node_id, p.phase, p.percent, p.message, p.elapsed_ms = (
            ev.node_id, ev.phase, ev.percent, ev.message, ev.elapsed_ms)
        self.outbox.put_terminal(resp)  # never waits: progress events are few

    def _error_response(self, err: EngineError) -> spb.StreamResponse:
        self.metrics.error(err.error_type.name)
        if self.session is None or err is not self.session.error:  # the session logged its own
            self.log.info("stream error: %s", err, extra={"node_id": err.node_id or "-"})
        resp = spb.StreamResponse()
        error_to_proto(err, resp.error)
        return resp

    def _fail(self, exc: BaseException) -> None:
        if self.ending:  # a crash is seen by more than one task; the call answers once
            return
        if not isinstance(exc, EngineError):  # a defect, not a typed error: its traceback is worth a look
            self.log.error("stream failed unexpectedly", exc_info=exc)
        self._end(_Final(self._error_response(engine_error(exc))))

    def _end(self, final: _Final) -> None:
        self.ending = True
        self.outbox.put_terminal(final)
        while not self.inbox.empty():  # early chunks are moot now; a reader waiting for room goes on
            self.inbox.get_nowait()

    def _metrics_response(self) -> spb.StreamResponse:
        assert self.session is not None
        resp = spb.StreamResponse()
        stream_metrics(self.session.snapshot(), resp.metrics)
        return resp

    # ------------------------------------------------------------ reader

    async def _reader(self) -> None:
        """Requests → the session; once the call is ending, read on and drop (see _let_client_finish)."""
        try:
            async for request in self.requests:
                if not self.ending:
                    await self._submit(lambda r=request: self._parse(r))
        except EngineError as exc:  # a request that did not decode (server.decode)
            self._fail(exc)
            return
        if not self.ending:
            if self.ended is not None and self.ended.deadline_passed():
                # the requests ended because the call did: nobody waits for what a flush would give
                await self._submit(lambda: _Close(cancel=True, reason=DEADLINE_PASSED))
            else:
                await self._submit(lambda: _Close(reason="client finished sending"))

    async def _submit(self, make: Callable[[], _Chunk | _Close]) -> None:
        """Queue while the pipeline starts, handle in place once it runs; a failure ends the call."""
        try:
            item = make()
            if not self.live:
                await self.inbox.put(item)
                if self.live:
                    # it went live while this waited for room: what is queued is this task's now
                    await self._drain_inbox()
            else:
                await self._handle(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail((self.session.error if self.session else None) or exc)

    def _parse(self, request: spb.StreamRequest) -> _Chunk | _Close:
        which = request.WhichOneof("request")
        if which == "data_chunk":
            c = request.data_chunk
            node_id = self._target(c.node_id)
            seq = self._sequence(c.sequence, node_id)
            frames: list[RuntimeData] = []
            if c.HasField("buffer"):
                frames.append(wire.from_proto(c.buffer, node_id=node_id))
            for name in sorted(c.named_buffers):
                frame = wire.from_proto(c.named_buffers[name], node_id=node_id)
                frame.metadata.setdefault("input_name", name)
                frames.append(frame)
            if not frames:
                raise ValidationError(f"data_chunk {seq} for node {node_id!r} carries no buffer", node_id=node_id)
            return _Chunk(node_id, seq, tuple(frames))
        if which == "audio_chunk":  # deprecated form, same meaning as a data_chunk of audio
            c = request.audio_chunk
            node_id = self._target(c.node_id)
            seq = self._sequence(c.sequence, node_id)
            return _Chunk(node_id, seq, (wire.audio_from_proto(c.buffer, {}, node_id),))
        if which == "control":
            command = request.control.command
            if command == spb.StreamControl.COMMAND_CLOSE:
                return _Close()
            if command == spb.StreamControl.COMMAND_CANCEL:
                return _Close(cancel=True, reason="cancelled by client")
            raise ValidationError(f"unknown control command {command}")
        if which == "init":
            raise ValidationError("init sent twice: a stream runs one pipeline")
        raise ValidationError("empty StreamRequest (no init, data_chunk, audio_chunk or control)")

    def _target(self, node_id: str) -> str:
        if node_id not in self.known_nodes:
            raise ValidationError(f"unknown target node {node_id!r}; nodes: {', '.join(sorted(self.known_nodes))}",
                                  node_id=node_id or None)
        return node_id

    def _sequence(self, seq: int, node_id: str) -> int:
        if seq < self.last_sequence:
            raise ValidationError(
                f"sequence went backwards: {seq} after {self.last_sequence} (STREAM_ERROR_INVALID_SEQUENCE)",
                node_id=node_id)
        self.last_sequence = seq
        self.chunks += 1
        self.metrics.chunks.inc()
        times = self.received_at
        if seq not in times:
            times[seq] = time.perf_counter()
            if len(times) > _TIMING_WINDOW:
                del times[next(iter(times))]
        return seq

    # ------------------------------------------------------------ driver

    async def _driver(self, init: spb.StreamInit) -> None:
        """Start the session, answer ready, feed what was queued meanwhile, then hand over to the reader."""
        session = self.session
        assert session is not None
        try:
            await session.start()
            ready = spb.StreamResponse()
            ready.ready.session_id = session.id
            ready.ready.recommended_chunk_size = init.expected_chunk_size
            self.outbox.put_terminal(ready)
            self.log.info("stream ready: %d nodes", len(session.plan.order))
            self.tasks.append(asyncio.get_running_loop().create_task(self._watch(), name="stream-watch"))
            for node_id, buf in init.data_inputs.items():
                await session.send(self._target(node_id), wire.from_proto(buf, node_id=node_id), 0)
            if await self._drain_inbox():
                self.live = True  # no await since the inbox was seen empty: nothing slips between
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(session.error or exc)

    async def _drain_inbox(self) -> bool:
        while not self.inbox.empty():
            if not await self._handle(self.inbox.get_nowait()):
                return False
        return True

    async def _handle(self, item: _Chunk | _Close) -> bool:
        session = self.session
        assert session is not None
        if isinstance(item, _Close):
            await self._finish(item)
            return False
        for frame in item.frames:
            await session.send(item.node_id, frame, item.sequence)
        self.sent += 1
        every = self.settings.metrics_every_n_chunks
        if every and self.sent % every == 0:
            await self.outbox.put(self._metrics_response())
        return True

    async def _finish(self, item: _Close) -> None:
        session = self.session
        assert session is not None
        if item.cancel:
            await session.cancel()
            self.outbox.clear()  # stop at once: results not yet sent are dropped
        else:
            await session.close()  # flushes; every output is delivered before the teardown
        await session.wait_closed()
        if session.error is not None and not item.cancel:
            self._fail(session.error)
            return
        closed = spb.StreamResponse()
        closed.closed.session_id = session.id
        closed.closed.reason = item.reason
        snap = session.snapshot()
        snap["wall_time_ms"] = (time.perf_counter() - self.started) * 1000
        execution_metrics(snap, closed.closed.final_metrics)
        self._end(_Final(closed, item.reason))

    async def _watch(self) -> None:
        """A session that fails on its own (a node crashed, a limit) ends the call with its error."""
        assert self.session is not None
        await self.session.wait_closed()
        if self.session.error is not None:
            self._fail(self.session.error)

    # The session's output sink (session.OutputSink): each output becomes a
    # result, right where it arrives while the outbox has room.

    def has_room(self) -> bool:
        return len(self.outbox) < self.outbox.capacity

    def put_nowait(self, out: Output) -> None:
        self.outbox.try_put(self._result(out))

    async def put(self, out: Output) -> None:
        """Waits while the outbox is full: the call's backpressure."""
        await self.outbox.put(self._result(out))

    def _result(self, out: Output) -> spb.StreamResponse:
        self._check_size(out)
        resp = spb.StreamResponse()
        r = resp.result
        seq = out.sequence or 0
        r.sequence = seq
        wire.to_proto(out.data, r.data_outputs[out.node_id])
        t0 = self.received_at.get(seq)
        if t0 is not None:
            elapsed = time.perf_counter() - t0
            r.processing_time_ms = elapsed * 1000
            self.metrics.chunk_latency.observe(elapsed)
        assert self.session is not None
        r.total_items_processed = self.session.metrics.outputs
        self.metrics.results.inc()
        return resp

    def _check_size(self, out: Output) -> None:
        """An output too large for one message fails the session in-band (raised into the
        node's emit), rather than the call failing in gRPC's send with the session left
        running. JSON is not measured here: its size is known only once serialized."""
        data = out.data
        if data.kind is DataKind.JSON:
            return
        size = data.nbytes
        if size > self.max_result_bytes:
            limit = self.engine.config.caps.max_message_bytes
            raise ResourceLimitError(
                f"an output of {size:,} bytes is more than one result may carry "
                f"(caps.max_message_bytes = {limit:,} bytes)", node_id=out.node_id,
                context={"field": "caps.max_message_bytes", "limit": limit, "output_bytes": size})
