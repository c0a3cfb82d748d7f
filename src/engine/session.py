"""SessionExecutionContext: one pipeline run.

It owns everything the run started (node runners, their processes and
channels, its tasks) and tears all of it down on every exit path: done,
error, cancel, caller gone, engine shutdown. Frames are pushed along the
plan inline (native nodes run as the frame arrives; a process node's input
is written into its channel), so a slow node slows its producer instead of
growing a queue: that is the backpressure. Sink outputs go to a bounded
output queue, tagged with the sequence of the input that caused them.

One module on purpose (~550 lines): the session's state machine, routing
and teardown share its state and each exit path must be read against all of
them; splitting them would spread one invariant (nothing left behind) over
files.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import SessionSettings
from .data import DataKind, RuntimeData
from .errors import (
    EngineError,
    InternalError,
    ResourceLimitError,
    SessionClosedError,
    ValidationError,
)
from .executors.base import NodeRunner
from .fifo import BoundedFifo
from .logs import ContextAdapter
from .manifest import Manifest
from .plan import ExecutionPlan, PlannedNode
from .tracing import SessionTrace, Tracing
from .turn_log import TurnLog
from .turns import TURN_EVENT_SCHEMA, TURN_ID, TurnEvent, TurnLedger

log = logging.getLogger("engine.session")


@dataclass(frozen=True, slots=True)
class Output:
    node_id: str
    sequence: int | None
    data: RuntimeData


class OutputSink(Protocol):
    """Where a session's sink outputs go instead of its queue (Engine.stream's
    `output_sink`). Outputs that can be taken at once are handed over right
    where they arrive, without a task switch (as iteration gets them)."""

    def has_room(self) -> bool:
        """True when put_nowait() may be called now."""

    def put_nowait(self, out: Output) -> None:
        """Take `out` (called only after has_room() said True)."""

    async def put(self, out: Output) -> None:
        """Take `out`, waiting while full (the waiting is the backpressure)."""


class AwaitedSink:
    """An async callable as an OutputSink: every output is awaited into it."""

    def __init__(self, fn: Callable[[Output], Awaitable[None]]) -> None:
        self.put = fn

    def has_room(self) -> bool:
        return False

    def put_nowait(self, out: Output) -> None:  # pragma: no cover - has_room() is False
        raise RuntimeError("AwaitedSink takes outputs only through put()")


@dataclass(frozen=True, slots=True)
class InitProgress:
    node_id: str
    phase: str
    percent: float
    message: str
    elapsed_ms: int


@dataclass
class SessionMetrics:
    chunks_in: int = 0
    outputs: int = 0
    peak_memory_bytes: int = 0
    latency_sum_s: float = 0.0
    latency_count: int = 0
    by_kind: collections.Counter = field(default_factory=collections.Counter)


_END = object()
_KIND_NAMES = {k: k.name.lower() for k in DataKind}
#: inputs whose arrival time is kept to measure output latency
_LATENCY_WINDOW = 4096


RunnerFactory = Callable[["Session", PlannedNode], NodeRunner]


class Observer(Protocol):
    """Receives per-frame measurements (e.g. a Prometheus exporter)."""

    def node_output(self, node_type: str, latency_s: float) -> None:
        """A node emitted a frame `latency_s` after the input that caused it entered the session."""

    # Optional: `turn_event(event: TurnEvent) -> None`, called as each turn
    # event is delivered (see engine.turns), `turn_ended(report: TurnReport)`,
    # called once per turn when it is over (see engine.turn_log), and
    # `node_frame(node_id, frame)`, called for every frame a node emits (a
    # trace: keep it cheap).


class Session:
    """A running pipeline. Use through `Engine.stream()` / `Engine.execute()`."""

    def __init__(
        self,
        manifest: Manifest,
        plan: ExecutionPlan,
        settings: SessionSettings,
        runner_factory: RunnerFactory,
        *,
        on_progress: Callable[[InitProgress], Any] | None = None,
        on_close: Callable[[Session], Any] | None = None,
        session_id: str | None = None,
        observer: Observer | None = None,
        output_sink: OutputSink | Callable[[Output], Awaitable[None]] | None = None,
        tracing: Tracing | None = None,
        trace_carrier: dict[str, str] | None = None,
    ) -> None:
        self.id = session_id or uuid.uuid4().hex[:16]
        #: this session's trace when it is sampled (engine.tracing); runners add node calls
        self.trace: SessionTrace | None = (
            tracing.session(self.id, manifest.name, len(plan.order), trace_carrier)
            if tracing is not None else None)
        self.manifest = manifest
        self.plan = plan
        self.settings = settings
        self.metrics = SessionMetrics()
        self._on_progress = on_progress
        self._on_close = on_close
        self._factory = runner_factory
        self._runners: dict[str, NodeRunner] = {}
        self._outputs = BoundedFifo(settings.output_queue_capacity)
        self._seq = itertools.count()
        self._sinks_open = set(plan.sinks)
        self._error: EngineError | None = None
        self._state = "new"  # new → starting → running → closing → closed
        self._torn_down = asyncio.Event()
        self._teardown_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._start_tasks: list[asyncio.Task] = []
        self._send_times: dict[int, float] = {}
        self._started_at = time.perf_counter()
        self._observer = observer
        self._sink: OutputSink | None = output_sink if output_sink is None or hasattr(output_sink, "has_room") \
            else AwaitedSink(output_sink)  # type: ignore[arg-type]
        self._deadline: asyncio.TimerHandle | None = None
        self.memory_watched = False  # set once a process executor samples this session
        #: turns voided in this session (see engine.turns); native nodes share it
        self.turns = TurnLedger()
        self._on_turn_event = getattr(observer, "turn_event", None)
        self._on_frame = getattr(observer, "node_frame", None)
        self.log = ContextAdapter(log, {"session_id": self.id, "node_id": "-"})
        #: each turn's one line when it is over (engine.turn_log)
        self.turn_log = TurnLog(self.log, getattr(observer, "turn_ended", None))

    # ------------------------------------------------------------ lifecycle

    @property
    def state(self) -> str:
        return self._state

    @property
    def error(self) -> EngineError | None:
        return self._error

    @property
    def runners(self) -> dict[str, NodeRunner]:
        return self._runners

    async def start(self) -> None:
        """Create every node and initialize them concurrently; return when all are ready."""
        if self._state != "new":
            raise SessionClosedError(f"session {self.id} already started")
        self._state = "starting"
        for note in self.manifest.notes:
            self.log.info("%s", note)
        if self.settings.max_duration_secs > 0:
            self._deadline = asyncio.get_running_loop().call_later(
                self.settings.max_duration_secs, self._deadline_passed)
        try:
            for nid in self.plan.order:
                self._runners[nid] = self._factory(self, self.plan.nodes[nid])
            async with asyncio.TaskGroup() as tg:
                self._start_tasks = [tg.create_task(r.start(self._progress)) for r in self._runners.values()]
            if self._state == "closed":  # failed, cancelled or out of time while starting
                raise self._error or SessionClosedError(f"session {self.id} was closed while starting")
        except BaseException as exc:
            err = self._error or _first_engine_error(exc)
            await self._teardown()
            self._state = "closed"
            if err is not None:
                self._error = err
                raise err from None
            raise
        self._state = "running"
        self.log.debug("session ready: %d nodes", len(self._runners))

    def _deadline_passed(self) -> None:
        limit = self.settings.max_duration_secs
        self.fail_soon(ResourceLimitError(
            f"session {self.id} ran past its time limit of {limit:g} s",
            context={"field": "max_duration_secs", "limit": limit}))

    def _progress(self, node_id: str, phase: str, percent: float, message: str) -> None:
        ev = InitProgress(node_id, phase, percent, message,
                          int((time.perf_counter() - self._started_at) * 1000))
        if self._on_progress is not None:
            try:
                self._on_progress(ev)
            except Exception:
                self.log.exception("progress callback failed")

    # ------------------------------------------------------------ data path

    async def send(self, node_id: str, data: RuntimeData, sequence: int | None = None) -> int:
        """Feed one frame to a node; returns the sequence it was tagged with."""
        if self._error is not None:
            raise self._error
        if self._state != "running":
            raise SessionClosedError(f"session {self.id} is {self._state}; cannot send")
        runner = self._runners.get(self.manifest.entry(node_id))
        if runner is None:
            raise ValidationError(f"unknown target node {node_id!r}; nodes: {', '.join(sorted(self.manifest.public_ids))}",
                                  node_id=node_id)
        if not isinstance(data, RuntimeData):
            raise ValidationError(f"send() takes RuntimeData, got {type(data).__name__}", node_id=node_id)
        limit = self.settings.max_audio_samples
        if limit and data.kind is DataKind.AUDIO and data.samples.size > limit:  # type: ignore[attr-defined]
            raise ResourceLimitError(
                f"audio frame of {data.samples.size} samples exceeds max_audio_samples={limit}",  # type: ignore[attr-defined]
                node_id=node_id, context={"field": "max_audio_samples", "limit": limit})
        seq = next(self._seq) if sequence is None else sequence
        data.sequence = seq
        self.metrics.chunks_in += 1
        self.metrics.by_kind[_KIND_NAMES[data.kind]] += 1
        times = self._send_times
        if seq not in times:
            times[seq] = time.perf_counter()
            if len(times) > _LATENCY_WINDOW:  # forget the oldest input (dicts keep insertion order)
                del times[next(iter(times))]
        try:
            await runner.push(data)
        except EngineError as exc:
            await self.fail(exc)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = InternalError(f"{type(exc).__name__}: {exc}", node_id=node_id)
            await self.fail(err)
            raise err from exc
        return seq

    async def emit(self, node_id: str, frame: RuntimeData) -> None:
        """Route one frame a node produced: to its downstream nodes, or out if a sink.

        A turn event goes to every other node instead; a frame of a voided
        turn goes nowhere.
        """
        if (event := TurnEvent.of(frame)) is not None:
            await self.deliver(event, node_id)
            return
        if self.turns.drops(frame):
            return
        planned = self.plan.nodes[node_id]
        if planned.is_sink:
            out = self._sink_output(planned, frame)
            if self._sink is not None:
                await self._sink.put(out)
            else:
                await self._outputs.put(out)
            if not planned.downstream:
                return
        else:
            self._observe(planned, frame)
        for target in planned.downstream:
            await self._runners[target].push(frame)

    def emit_nowait(self, node_id: str, frame: RuntimeData) -> bool:
        """emit() when it needs no waiting: a sink's output while the caller's
        queue has room. False = not done (use emit)."""
        planned = self.plan.nodes[node_id]
        if getattr(frame, "schema_type", None) == TURN_EVENT_SCHEMA:
            return False
        if not planned.is_sink:
            # one downstream that takes it at once (a node process with room):
            # no task switch per frame between two node processes
            if len(planned.downstream) != 1:
                return False
            if self.turns.drops(frame):
                return True
            if not self._runners[planned.downstream[0]].push_nowait(frame):
                return False
            self._observe(planned, frame)
            return True
        if planned.downstream:
            return False  # an exposed output node (also feeds others): emit() does both
        sink = self._sink
        if not (sink.has_room() if sink is not None else len(self._outputs) < self._outputs.capacity):
            return False
        if self.turns.drops(frame):
            return True
        out = self._sink_output(planned, frame)
        if sink is None:
            return self._outputs.try_put(out)  # room checked above
        sink.put_nowait(out)
        return True

    def forwards_encoded(self, node_id: str) -> bool:
        """True when every output of `node_id` goes to node processes only, so
        its frames may stay encoded on the way (see codec.Encoded)."""
        planned = self.plan.nodes[node_id]
        return (not planned.is_sink and self._on_frame is None and bool(planned.downstream)
                and all(self.plan.nodes[t].executor == "multiprocess" for t in planned.downstream))

    async def deliver(self, event: TurnEvent, source: str) -> None:
        """Hand a turn event from node `source` to every other node (see engine.turns)."""
        if event.source != source:
            event = TurnEvent(event.kind, event.turn_id, event.data, source, event.sequence)
        self.turns.note(event)
        self.turn_log.event(event)
        if self._on_turn_event is not None:
            self._on_turn_event(event)
        for nid, runner in self._runners.items():
            if nid != source:
                await runner.turn_event(event)

    def _observe(self, planned: PlannedNode, frame: RuntimeData) -> float | None:
        if self._on_frame is not None:
            self._on_frame(planned.id, frame)
        if frame.metadata and (turn := frame.metadata.get(TURN_ID)):
            self.turn_log.frame(turn, frame, planned.is_sink)
        t0 = self._send_times.get(frame.sequence) if frame.sequence is not None else None
        if t0 is not None and self._observer is not None:
            self._observer.node_output(planned.spec.node_type, time.perf_counter() - t0)
        return t0

    def _sink_output(self, planned: PlannedNode, frame: RuntimeData) -> Output:
        t0 = self._observe(planned, frame)
        self.metrics.outputs += 1
        if t0 is not None:
            self.metrics.latency_sum_s += time.perf_counter() - t0
            self.metrics.latency_count += 1
        return Output(planned.decl.public_id, frame.sequence, frame)

    async def node_ended(self, node_id: str) -> None:
        """A node flushed at end of stream: propagate the end downstream."""
        planned = self.plan.nodes[node_id]
        for target in planned.downstream:
            await self._runners[target].end()
        if planned.is_sink:
            self._sinks_open.discard(node_id)
            if not self._sinks_open:
                self._outputs.put_terminal(_END)
                self._start_teardown()

    def track(self, coro: Any, name: str) -> asyncio.Task:
        """Run a background task owned by this session; its failure fails the session."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            err = exc if isinstance(exc, EngineError) else InternalError(f"{type(exc).__name__}: {exc}")
            self.fail_soon(err)

    def fail_soon(self, err: EngineError) -> None:
        """Fail from a callback (not a coroutine): schedules the teardown."""
        if self._error is None and self._state not in ("closed",):
            self._record_error(err)
            self._start_teardown()

    async def fail(self, err: EngineError) -> None:
        if self._error is None and self._state != "closed":
            self._record_error(err)
        await self._teardown()

    def _record_error(self, err: EngineError) -> None:
        planned = self.plan.nodes.get(err.node_id or "")
        if planned is not None and planned.decl.outer:  # the caller knows the composite, not its inside
            err.context.setdefault("inner_node", planned.id)
            err.node_id = planned.decl.outer
        self._error = err
        self.log.warning("session failed: %s", err, extra={"node_id": err.node_id or "-"})
        self._outputs.put_terminal(err)

    def _start_teardown(self) -> None:
        if self._teardown_task is None:
            self._teardown_task = asyncio.get_running_loop().create_task(
                self._do_teardown(), name=f"{self.id}:teardown")

    # ------------------------------------------------------------ consuming

    def __aiter__(self) -> AsyncIterator[Output]:
        return self

    async def __anext__(self) -> Output:
        if self._state == "closed" and not len(self._outputs):
            raise StopAsyncIteration
        item = await self._outputs.get()
        if item is _END:
            self._outputs.put_terminal(_END)  # later calls end too
            raise StopAsyncIteration
        if isinstance(item, EngineError):
            self._outputs.put_terminal(_END)
            raise item
        return item

    # ------------------------------------------------------------ ending

    async def close(self) -> None:
        """Flush: the end of stream enters the pipeline behind every frame sent.

        Iteration ends after the last output; the session then tears itself
        down (`wait_closed()` waits for that). Outputs must be consumed while
        closing: the output queue is bounded.
        """
        if self._error is not None:
            raise self._error
        if self._state != "running":
            return
        self._state = "closing"
        try:
            for nid in self.plan.sources:
                await self._runners[nid].end()
        except EngineError as exc:
            await self.fail(exc)
            raise

    async def wait_closed(self) -> None:
        """Wait until everything the session started is gone."""
        await self._torn_down.wait()

    async def cancel(self) -> None:
        """Stop at once: nothing more is delivered; returns once everything is torn down."""
        if self._state != "closed":
            self._outputs.clear()
            self._outputs.put_terminal(_END)
        # also when a teardown is already under way: wait for it to finish
        await self._teardown()

    async def _teardown(self) -> None:
        # One teardown task per session, shielded: a caller cancelled while
        # waiting for it (or a tracked task that it cancels) cannot cut it short.
        self._start_teardown()
        assert self._teardown_task is not None
        if asyncio.current_task() is self._teardown_task:
            return
        await asyncio.shield(self._teardown_task)

    async def _do_teardown(self) -> None:
        self._state = "closed"
        if self._deadline is not None:
            self._deadline.cancel()
        current = asyncio.current_task()
        try:
            for task in list(self._tasks):
                if task is not current:
                    task.cancel()
            # a node still starting is stopped first, then closed like the others
            starting = [t for t in self._start_tasks if not t.done()]
            for task in starting:
                task.cancel()
            if starting:
                await asyncio.wait(starting)
            results = await asyncio.gather(*(r.aclose() for r in self._runners.values()),
                                           return_exceptions=True)
            for runner, res in zip(self._runners.values(), results, strict=True):
                if isinstance(res, BaseException):
                    self.log.error("teardown of node %s failed: %r", runner.node_id, res,
                                   extra={"node_id": runner.node_id})
            pending = [t for t in self._tasks if t is not current]
            if pending:
                await asyncio.wait(pending, timeout=self.settings.shutdown_timeout_secs + 1)
        finally:
            self.turn_log.close()
            if self.trace is not None:
                self.trace.end(self._error)
            self._outputs.put_terminal(_END)
            self._torn_down.set()
            if self._on_close is not None:
                self._on_close(self)

    async def __aenter__(self) -> Session:
        if self._state == "new":
            await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        # Leaving the block without close() (an exception, a caller that went
        # away) cancels; everything is torn down either way.
        await self.cancel()

    def snapshot(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "session_id": self.id,
            "chunks_processed": m.chunks_in,
            "outputs": m.outputs,
            "average_latency_ms": (m.latency_sum_s / m.latency_count * 1000) if m.latency_count else 0.0,
            "buffered_outputs": len(self._outputs),
            "dropped": sum(r.stats.dropped for r in self._runners.values()),
            "superseded_dropped": self.turns.dropped,
            "peak_memory_bytes": m.peak_memory_bytes,
            "by_kind": dict(m.by_kind),
            "nodes": {nid: vars(r.stats) for nid, r in self._runners.items()},
        }


def _first_engine_error(exc: BaseException) -> EngineError | None:
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _first_engine_error(sub)
            if found is not None:
                return found
        return InternalError(f"{type(exc.exceptions[0]).__name__}: {exc.exceptions[0]}")
    if isinstance(exc, Exception):
        return InternalError(f"{type(exc).__name__}: {exc}")
    return None
