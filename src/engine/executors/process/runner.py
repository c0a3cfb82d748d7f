"""A node's session-side life in its own process: launch (or take a
prewarmed process) → hello (spawn timeout) → assign → progress … ready
(init timeout), or bind a process whose node was initialized ahead for an
equal Assign (pool.warm_key) → frames both ways and turn events → end of
stream → graceful close → SIGTERM → SIGKILL. A death is reported as the
node's typed error: the Failure it sent, else how the process ended.

One module (~450 lines): start, the data pump, the control loop and the
close share the one runner's state; each exit path must be read against
all of them."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import signal
from typing import TYPE_CHECKING, Any

from ...config import SessionSettings
from ...errors import (
    EngineError,
    InternalError,
    NodeExecutionError,
    SessionClosedError,
    rebuild_error,
)
from ...ipc import codec, iox, shm_budget
from ...ipc.channel import EOS, ChannelClosed, FrameReceiver
from ...ipc.control import (
    Assign,
    Bind,
    CallRecord,
    DeliverTurnEvent,
    Failure,
    Hello,
    Ping,
    Pong,
    Progress,
    Ready,
    ShutdownAck,
    Stats,
)
from ...ipc.logs import LogBatch, NodeLog, engine_level
from ...plan import PlannedNode
from ...turns import TurnEvent
from ..base import NodeRunner, NodeStats, RunnerContext
from ..base import Progress as ProgressFn
from .pool import warm_key
from .supervised import NodeProcess, describe_status

if TYPE_CHECKING:
    from .manager import ProcessManager

log = logging.getLogger("engine.process")

#: how long a dead process's control lane is read for the Failure it sent
_LAST_WORDS_S = 1.0


def assignment(planned: PlannedNode, settings: SessionSettings, session_id: str, trace: bool) -> Assign:
    """What a node process is told of its node; made here alike for a session's
    node and for one initialized ahead (prewarm_nodes), so that the two compare
    equal exactly when initialize() would see the same thing."""
    spec, kinds = planned.spec, planned.accepted_kinds
    return Assign(session_id, planned.id, spec.node_type, spec.module, spec.qualname, dict(planned.decl.params),
                  settings.process_timeout_secs, None if kinds is None else tuple(sorted(int(k) for k in kinds)),
                  log_level=engine_level(), trace=trace)


class ProcessRunner(NodeRunner):
    """Supervises the node process running one node of one session."""

    def __init__(self, manager: ProcessManager, session: RunnerContext, planned: PlannedNode) -> None:
        self.manager = manager
        self.session = session
        self.planned = planned
        self.node_id = planned.id
        self.stats = NodeStats()
        self.proc: NodeProcess | None = None
        s = session.settings
        self._drop = (not s.enable_backpressure) or s.overflow_policy != "block"
        self._pending_ends = max(1, len(planned.upstream))
        self._closing = False
        self._closed = False
        self._ctrl_task: asyncio.Task | None = None
        self._failure: Failure | None = None
        self._pings: dict[int, asyncio.Future] = {}
        self._pump_task: asyncio.Task | None = None
        self._ping_tokens = itertools.count(1)
        self._events_sent = 0
        self._forward = False
        self._made_room = False
        self.log = logging.LoggerAdapter(log, {"session_id": session.id, "node_id": self.node_id})
        self._logs = NodeLog(session.id, self.node_id, planned.spec.node_type)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # ------------------------------------------------------------ start

    async def start(self, progress: ProgressFn) -> None:
        s = self.session.settings
        assign = assignment(self.planned, s, self.session.id, self.session.trace is not None)
        proc = self.manager.pool.take_initialized(warm_key(assign, s.channel_capacity))
        if proc is not None:
            self._bind(proc, assign)
            progress(self.node_id, "prewarmed", 100.0, f"initialized ahead in process {proc.pid}")
        else:
            proc = await self._assigned(assign)
            await self._initialize(proc, progress)
        # Frames for node processes only stay encoded through the engine.
        self._forward = self.session.forwards_encoded(self.node_id)
        self._ctrl_task = self.session.track(self._control_loop(), f"{self.node_id}:control")
        proc.on_data = self._on_data
        self._on_data()  # outputs may already wait (a node that emits at start)

    def _adopt(self, proc: NodeProcess) -> None:
        """A prewarmed process becomes this node's: its death is this node's from now on."""
        self.proc = proc
        proc.node_id = self.node_id
        proc.on_exit = self._on_exit

    def _bind(self, proc: NodeProcess, assign: Assign) -> None:
        self._adopt(proc)
        self.log.debug("runs in prewarmed process %s, initialized ahead", proc.pid)
        assert proc.ctrl is not None
        proc.ctrl.send(Bind(assign.session_id, assign.node_id, assign.log_level, assign.trace))

    async def _assigned(self, assign: Assign) -> NodeProcess:
        """A process with this node assigned: a generic prewarmed one, else a new one."""
        pool = self.manager.pool
        proc = pool.take(self.session.settings.channel_capacity)
        if proc is None:
            self._made_room = pool.make_room()
            return await self._launch(assign)
        self._adopt(proc)
        self.log.debug("runs in prewarmed process %s (channels %s)", proc.pid, proc.names.inputs)
        assert proc.ctrl is not None
        proc.ctrl.send(assign)
        return proc

    async def _initialize(self, proc: NodeProcess, progress: ProgressFn) -> None:
        """Wait for the node's Ready, passing its progress on (init timeout)."""
        s = self.session.settings
        deadline = asyncio.get_running_loop().time() + s.init_timeout_secs
        while True:
            msg = await proc.recv(deadline, "initialize()", "init_timeout_secs", s.init_timeout_secs, self.node_id)
            if isinstance(msg, Progress):
                progress(self.node_id, msg.phase, msg.percent, msg.message)
            elif isinstance(msg, Ready):
                return
            elif isinstance(msg, LogBatch):  # initialize() may log
                self._on_logs(msg)
            else:
                raise await self._start_failure(msg, "initialize")

    async def _launch(self, assign: Assign) -> NodeProcess:
        """A new process for this node, up to its Hello.

        One that is gone before saying Hello without a word (the zygote's
        standby can die just as it is handed the request) is replaced once.
        """
        s, loop = self.session.settings, asyncio.get_running_loop()
        shm_budget.check(shm_budget.channels_bytes(), self.node_id, f"the channels of node {self.node_id!r}")
        for attempt in (1, 2):
            proc = self.proc = NodeProcess(self.manager, iox.ChannelNames.for_node(self.session.id, self.node_id),
                                           s.channel_capacity)
            proc.on_exit = self._on_exit
            proc.node_id = self.node_id
            await proc.launch()
            assert proc.ctrl is not None
            proc.ctrl.send(assign)  # read by the process right after its Hello: no extra round trip
            msg = await proc.hello(loop.time() + s.spawn_timeout_secs, self.node_id)
            if isinstance(msg, Hello):
                return proc
            if msg is not None or attempt == 2:
                raise await self._start_failure(msg, "start")
            self.log.warning("node process %s exited while starting; starting another", proc.pid)
            proc.on_exit = None
            await proc.stop(0.0)
            await proc.reaped()
            proc.release()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _start_failure(self, msg: Any, where: str) -> EngineError:
        if isinstance(msg, Failure):
            return self._error_from(msg)
        status = await self.manager.exit_status(self.pid, 1.0) if self.pid else None
        return NodeExecutionError(f"node process {self.pid} {describe_status(status)} during {where}",
                                  node_id=self.node_id)

    def _error_from(self, f: Failure) -> EngineError:
        """The node's error as it was raised in its process: same class, same message."""
        tail = "\n".join(f.traceback.strip().splitlines()[-6:]) if f.traceback else ""
        context = {**f.context, "where": f.where, "sequence": f.sequence, "traceback_tail": tail}
        return rebuild_error(f.error_class, f.error_type, f.message, node_id=self.node_id,
                             context=context, traceback_text=f.traceback)

    # ------------------------------------------------------------ supervise

    def _on_exit(self) -> None:
        # While starting, start() reads the control lane itself and reports
        # the death (with the node's Failure, when it sent one).
        if not self._closing and self._ctrl_task is not None:
            self.session.track(self._report_death(), f"{self.node_id}:death")

    async def _report_death(self) -> None:
        status = await self.manager.exit_status(self.pid or -1, 1.0)
        # What the process said before it died is on its control lane: read
        # to the lane's end (the control loop returns there) before deciding.
        if self._ctrl_task is not None and not self._ctrl_task.done():
            await asyncio.wait({self._ctrl_task}, timeout=_LAST_WORDS_S)
        if self._failure is not None:
            err = self._error_from(self._failure)
        elif status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
            # the worker's deadline timer (see Worker._arm) fired
            limit = self.session.settings.process_timeout_secs
            err = NodeExecutionError(f"process() exceeded process_timeout_secs={limit:g}; its node process "
                                     f"{self.pid} was stopped", node_id=self.node_id,
                                     context={"field": "process_timeout_secs", "limit": limit})
        else:
            err = NodeExecutionError(f"node process {self.pid} {describe_status(status)}",
                                     node_id=self.node_id, context={"exit_status": status})
        self.manager.cleanup_dead()
        self.session.fail_soon(err)

    async def _control_loop(self) -> None:
        assert self.proc is not None and self.proc.ctrl is not None
        ctrl = self.proc.ctrl
        while True:
            msg = await ctrl.recv()
            if msg is None:
                return
            if isinstance(msg, Failure):
                self._failure = msg
                if not self._closing:
                    self.session.fail_soon(self._error_from(msg))
            elif isinstance(msg, LogBatch):
                self._on_logs(msg)
            elif isinstance(msg, CallRecord):
                self._on_calls(msg)
            elif isinstance(msg, Stats):
                self._merge(msg)
            elif isinstance(msg, ShutdownAck):
                if msg.stats is not None:
                    self._merge(msg.stats)
            elif isinstance(msg, Pong):
                if msg.stats is not None:
                    self._merge(msg.stats)
                fut = self._pings.pop(msg.token, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def refresh_stats(self) -> None:
        """Bring `stats` up to date with the node process's own counters (a ping round
        trip; gives up after a second, leaving the last numbers)."""
        ctrl = self.proc.ctrl if self.proc is not None else None
        if ctrl is None or self._closing:
            return
        token = next(self._ping_tokens)
        fut = self._pings[token] = asyncio.get_running_loop().create_future()
        ctrl.send(Ping(token))
        try:
            await asyncio.wait_for(fut, 1.0)
        except TimeoutError:
            pass
        finally:
            self._pings.pop(token, None)

    def _on_logs(self, batch: LogBatch) -> None:
        """What the node process logged → the engine's logging, tagged with the session and node."""
        self._logs.handle(batch)
        if batch.dropped:
            self.stats.extra["log_records_dropped"] = self._logs.dropped

    def _merge(self, st: Stats) -> None:
        self.stats.busy_s = st.busy_s
        self.stats.cpu_s = st.cpu_s
        self.stats.extra["process_items_in"] = st.items_in
        self.stats.extra["process_items_out"] = st.items_out
        for key, value in st.extra.items():
            self.stats.extra[f"process_{key}"] = value

    def _on_data(self) -> None:
        """Outputs of the node process → the session, in order, from the inbox callback.

        While outputs can be routed without waiting (a sink's output with room
        in the caller's queue), they are handled right here, without a task
        switch; the first one that needs waiting (a downstream push, a full
        queue, end of stream) starts a pump task, which drains the channel and
        ends when it is empty.
        """
        if self._pump_task is not None or self.proc is None or self.proc.receiver is None:
            return  # the pump drains what came
        receiver = self.proc.receiver
        try:
            while (item := self._next_output(receiver)) is not None:
                if item is EOS or not self.session.emit_nowait(self.node_id, item):
                    self._pump_task = self.session.track(self._pump(item), f"{self.node_id}:pump")
                    return
        except Exception as exc:  # a callback's exception would only reach the loop's log
            self.session.fail_soon(exc if isinstance(exc, EngineError)
                                   else InternalError(f"{type(exc).__name__}: {exc}", node_id=self.node_id))

    async def _pump(self, item: Any) -> None:
        try:
            receiver = self.proc.receiver if self.proc is not None else None
            n = 0
            while receiver is not None and item is not None:
                if item is EOS:
                    await self.session.node_ended(self.node_id)
                    return
                await self.session.emit(self.node_id, item)
                n += 1
                if n % 16 == 0:
                    await asyncio.sleep(0)  # yield: a busy channel must not starve the loop
                item = self._next_output(receiver)
        finally:
            self._pump_task = None

    def _next_output(self, receiver: FrameReceiver) -> Any:
        """The next frame (counted), EOS, or None when the channel is empty (credit given)."""
        item = receiver.receive_encoded() if self._forward else receiver.receive()
        if item is None:
            receiver.freed()
        elif item is not EOS:
            self.stats.items_out += 1
        return item

    # ------------------------------------------------------------ data in

    async def push(self, frame: Any) -> None:
        sender = self.proc.sender if self.proc is not None else None
        if sender is None or self._closing:
            raise self._gone()
        self.stats.items_in += 1
        try:
            if not await sender.send(_wire(frame), drop_when_full=self._drop):
                self.stats.dropped += 1
        except ChannelClosed:
            raise self._gone() from None

    def push_nowait(self, frame: Any) -> bool:
        """push() when it needs no waiting: the frame fits in the channel now
        (or, under a drop policy, is dropped). False = nothing done."""
        sender = self.proc.sender if self.proc is not None else None
        if sender is None or self._closing or sender.closed:
            return False
        if not sender.try_send(_wire(frame)):
            if not self._drop:
                return False
            self.stats.dropped += 1
        self.stats.items_in += 1
        return True

    async def turn_event(self, event: TurnEvent) -> None:
        ctrl = self.proc.ctrl if self.proc is not None else None
        if ctrl is None or self._closing:
            return
        ctrl.send(DeliverTurnEvent(event.kind, event.turn_id, dict(event.data), event.source, event.sequence))
        self._events_sent += 1

    async def end(self) -> None:
        self._pending_ends -= 1
        if self._pending_ends == 0 and self.proc is not None and self.proc.sender is not None:
            if self._events_sent:
                # The control lane and the data channel do not keep order
                # between them: once this ping is answered, the process has
                # taken every event sent before it, so none arrives after EOS.
                await self.refresh_stats()
            # The process may have failed (and been released) while the ping
            # was out: then the session's error is the answer, not a send.
            sender = self.proc.sender if self.proc is not None else None
            if sender is None:
                raise self._gone()
            try:
                await sender.send(codec.eos_prepared())
            except ChannelClosed:
                raise self._gone() from None

    def _gone(self) -> EngineError:
        """Why a frame cannot reach the node process: the session's error if it
        has one; closed, if it is closing (a cancel stopped the process)."""
        if self.session.error is not None:
            return self.session.error
        if self._closing or self.session.state in ("closing", "closed"):
            return SessionClosedError(f"session {self.session.id} is {self.session.state}; cannot send")
        return NodeExecutionError(f"node process {self.pid} exited", node_id=self.node_id)

    # ------------------------------------------------------------ teardown

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True
        proc = self.proc
        if proc is None:
            return
        try:
            await proc.stop(self.session.settings.shutdown_timeout_secs)
            await self._drain_control()
            await proc.reaped()
        finally:
            proc.release()
            if self._made_room:  # an idle prewarmed process was stopped for this one: its place is free again
                self.manager.pool.refill()

    def _on_calls(self, msg: CallRecord) -> None:
        trace = self.session.trace
        if trace is not None:
            for call in msg.calls:
                trace.node_call(self.node_id, self.planned.spec.node_type, call)

    async def _drain_control(self) -> None:
        # The session cancels its tasks (the control loop among them) before
        # closing runners; the last Stats / ShutdownAck still sit in the
        # socket of the exited process: read them so the final numbers count.
        task = self._ctrl_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        ctrl = self.proc.ctrl if self.proc is not None else None
        if ctrl is None:
            return
        try:
            async with asyncio.timeout(0.2):
                while (msg := await ctrl.recv()) is not None:
                    if isinstance(msg, LogBatch):  # cleanup() may log
                        self._on_logs(msg)
                    elif isinstance(msg, CallRecord):  # the last calls' timings (a traced session)
                        self._on_calls(msg)
                    elif isinstance(msg, Stats):
                        self._merge(msg)
                    elif isinstance(msg, ShutdownAck) and msg.stats is not None:
                        self._merge(msg.stats)
        except (TimeoutError, ValueError, pickle.UnpicklingError):
            pass


def _wire(frame: Any) -> codec.Prepared | codec.Encoded:
    """What goes into the channel: a forwarded frame as it came, anything else encoded."""
    return frame if type(frame) is codec.Encoded else codec.prepare(frame)
