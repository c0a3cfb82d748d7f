"""The main loop of a node process: one node instance of one session.

Forked from the zygote, usually ahead of time as its standby, with its
event loop, iceoryx2 node and inbox already made (`Endpoints`). Given its
channels, it makes the output channel while the engine makes the input
channel, opens the engine's once told it exists, says Hello, and waits to
be assigned its node (at once for a session that is starting; later for a
prewarmed process). Then it imports and initializes the node (reporting
progress), says Ready (a process prewarmed with its node then waits for the
session that takes it: its Bind), and processes frames as they arrive: a node with
plain process()/flush() from a loop that blocks in poll() between frames,
an async one on the process's asyncio loop, both woken by iceoryx2 events.
Control (ping, shutdown) is read by a thread so it is never stuck behind
data. The node itself is called through the node host (`engine.host`), as in the
engine; in a traced session each call's timing goes to the engine as a
CallRecord (see engine.tracing). A timer (SIGALRM) ends the process when one process() call exceeds
its deadline. The process exits when the engine closes the control socket
(engine gone) and, through PR_SET_PDEATHSIG, when the zygote dies.

One module on purpose (~490 lines): the control thread, the data loop and
the turn-event tasks share the one Worker's state and its wake-ups.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import inspect
import logging
import os
import pickle
import select
import signal
import socket
import threading
import time
import traceback
from dataclasses import replace
from typing import Any

from .data import DataKind, RuntimeData
from .errors import EngineError, ErrorType, NodeExecutionError
from .executors.base import NodeStats
from .host import Deadline, NodeHost
from .ipc import codec, iox
from .ipc.channel import EOS, FrameReceiver, FrameSender, Inbox
from .ipc.control import (
    Assign,
    Bind,
    CallRecord,
    ChannelsReady,
    DeliverTurnEvent,
    Failure,
    Hello,
    OutputsReady,
    Ping,
    Pong,
    Progress,
    Ready,
    Shutdown,
    ShutdownAck,
    Stats,
    SyncChannel,
)
from .ipc.endpoints import Endpoints, ProcessArgs
from .ipc.loans import LoanedMemory, loan_of, send_in_place
from .ipc.logs import LogCapture
from .ipc.logs import capture as capture_logs
from .node import Node
from .turns import TurnEvent, TurnLedger
from .zygote import set_node_title


def _plain(fn: Any) -> bool:
    return not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn))


def load_class(module: str, qualname: str) -> type[Node]:
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if not exc.name or not (module == exc.name or module.startswith(exc.name + ".")):
            raise  # the module itself imports something missing: its own error says what
        raise NodeExecutionError(
            f"initialize() failed: the node process cannot import {module!r} ({exc}); node processes "
            f"import with the engine's own import path (its sys.path entries and PYTHONPATH): make "
            f"{module!r} importable there, e.g. install it or add its folder to PYTHONPATH") from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            # registration refuses classes in __main__ or in a function; this is one that
            # only exists once the app has run (made at run time, under `if __name__ == ...`)
            raise NodeExecutionError(
                f"initialize() failed: the node process imported {module!r} but found no {qualname} in it: "
                f"define the class at the top level of {module!r}, so that importing the module makes it"
            ) from None
    return obj


#: how long a node process waits for its queued log records to reach the engine before it exits
LOG_FLUSH_S = 1.0


class NodeFailed(Exception):
    """An event handler failed; its Failure was sent already."""


class AlarmDeadline(Deadline):
    """The process() deadline: SIGALRM with its default action ends the
    process even when process() is stuck in native code holding the GIL; the
    engine reports that death as the timeout. A timer costs a syscall per
    call and nothing while idle (a watchdog thread polled)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._armed = False

    def arm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        self._armed = True

    def disarm(self) -> None:
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._armed = False


def _picklable(context: dict[str, Any]) -> dict[str, Any]:
    try:
        pickle.dumps(context)
        return dict(context)
    except Exception:  # noqa: BLE001 - whatever a node put there: its text will do
        return {k: v if isinstance(v, str | int | float | bool | type(None)) else repr(v)
                for k, v in context.items()}


class Worker:
    def __init__(self, ctrl: SyncChannel, args: ProcessArgs, endpoints: Endpoints) -> None:
        self.ctrl = ctrl
        self.args = args
        self.endpoints = endpoints
        self.assigned: Assign | None = None
        self._assign = threading.Event()
        #: the session that took this process, when it was prewarmed with its node
        self.bound: Bind | None = None
        self.host: NodeHost | None = None
        self.counts = NodeStats()  # the node host's counters
        self.stopping = False
        self.send_s = 0.0  # CPU spent handing outputs to the channel (encoding, copying)
        self.sent_in_place = 0
        self._memory: LoanedMemory | None = None  # the node's, once it exists
        self._wake = asyncio.Event()
        self._channels_ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._blocking = False  # see _serve()
        self._waiter: Any = None  # select.poll over the inbox and the wake pipe
        self._wake_r, self._wake_w = os.pipe()  # wakes the blocking data loop
        os.set_blocking(self._wake_w, False)
        self.turns = TurnLedger()  # written by the control thread, read by the node
        self._events: collections.deque[TurnEvent] = collections.deque()  # arrived, not yet handed over
        self._event_tasks: set[asyncio.Task] = set()
        self._failed = False
        self.logs: LogCapture | None = None  # once assigned

    # ---------------------------------------------------------------- control

    def _control_thread(self) -> None:
        while True:
            try:
                msg = self.ctrl.recv()
            except OSError:
                msg = None
            if msg is None:  # the engine is gone: nobody to serve
                os._exit(0)
            if isinstance(msg, Ping):
                self.ctrl.send(Pong(msg.token, self.stats()))
            elif isinstance(msg, ChannelsReady):
                loop = self._loop
                if loop is not None:
                    loop.call_soon_threadsafe(self._channels_ready.set)
            elif isinstance(msg, Assign):
                self.assigned = msg
                self._assign.set()
                loop = self._loop
                if loop is not None:
                    loop.call_soon_threadsafe(self._wake.set)
            elif isinstance(msg, Bind):
                self.bound = msg
                loop = self._loop
                if loop is not None:
                    loop.call_soon_threadsafe(self._wake.set)
            elif isinstance(msg, DeliverTurnEvent):
                event = TurnEvent(msg.kind, msg.turn_id, msg.data, msg.source, msg.sequence)
                self.turns.note(event)  # before anything else: queued inputs of a voided turn are dropped
                self._events.append(event)
                self._wake_up(self._events_arrived)
            elif isinstance(msg, Shutdown):
                self.stopping = True
                self._wake_up(self._wake.set)

    def _wake_up(self, on_loop: Any) -> None:
        """From the control thread: run `on_loop` on the event loop and wake the blocking data loop."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(on_loop)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # already signalled
            pass

    def stats(self) -> Stats:
        c = self.counts
        return Stats(c.items_in, c.items_out, c.busy_s, cpu_s=time.process_time(),
                     extra={"send_s": self.send_s, "sent_in_place": self.sent_in_place})

    # ---------------------------------------------------------------- main

    async def main(self) -> int:
        a, ep = self.args, self.endpoints
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._control_thread, name="control", daemon=True).start()
        ionode, to_engine, listener = ep.ionode, ep.to_engine, ep.listener
        # This process makes the channel it publishes on while the engine
        # makes the input channel; each opens the other's when told it exists.
        out_svc = iox.open_frames_service(ionode, a.names.outputs, a.capacity, "create")
        sender = FrameSender(iox.publisher(out_svc), to_engine, a.slot)
        self.ctrl.send(OutputsReady(ep.inbox_name))
        await self._channels_ready.wait()  # bounded by the engine's spawn timeout, which kills us
        in_svc = iox.open_frames_service(ionode, a.names.inputs, a.capacity, "open")
        receiver = FrameReceiver(iox.subscriber(in_svc, a.capacity), to_engine, a.slot)

        def on_events(ids: set[int]) -> None:
            if iox.EV_WANT_CREDIT in ids:
                receiver.want_credit = True
            if iox.EV_CREDIT in ids:
                sender.on_credit()
            self._wake.set()

        inbox = Inbox(listener, ep.fd, on_events)
        inbox.attach(self._loop)
        self.ctrl.send(Hello(os.getpid()))
        self._inbox = inbox
        try:
            while not self._assign.is_set():  # a prewarmed process waits here
                if self.stopping:
                    self.ctrl.send(ShutdownAck(self.stats()))
                    return 0
                self._wake.clear()
                await self._wake.wait()
            return await self._serve(receiver, sender)
        finally:
            inbox.detach()
            iox.delete(receiver.sub, sender.pub, to_engine, listener)

    async def _serve(self, receiver: FrameReceiver, sender: FrameSender) -> int:
        a = self.assigned
        assert a is not None
        set_node_title(a.node_id, a.node_type, a.session_id)
        # Before the node's module is imported, so what it says while loading
        # reaches the engine too; the engine tags it with the session and node.
        self.logs = capture_logs(self.ctrl.send, level=a.log_level)

        async def emit(out: RuntimeData) -> None:
            await self._send(out, sender)

        self._emit = emit
        try:
            cls = load_class(a.module, a.qualname)
            host = self.host = NodeHost(a.node_id, cls, dict(a.params), stats=self.counts, turns=self.turns,
                                        deadline=AlarmDeadline(a.process_timeout_secs),
                                        accepts=None if a.accepts is None else [DataKind(k) for k in a.accepts])
            self._trace(a.trace)
            self._memory = LoanedMemory(sender)
            node = await host.start(lambda phase, pct, msg: self.ctrl.send(Progress(phase, pct, msg)),
                                    self._memory)
            # A node whose process() and flush() are plain functions is driven
            # by a loop that blocks in poll() between frames, without the event
            # loop's task switches (most of a hop's cost here). A node with
            # coroutines or async generators keeps the event loop.
            self._blocking = (self._inbox.fd is not None and _plain(node.process) and _plain(node.flush))
            if self._blocking:
                self._inbox.detach()
            self.ctrl.send(Ready())
            if a.prewarmed:
                await self._await_session()
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            borrow = bool(node.zero_copy_inputs)
            while not self.stopping:
                if self._failed:  # an event handler failed (reported already)
                    raise NodeFailed
                self._wake.clear()
                self._drain_events()
                if self._events:
                    await self._take_events()
                receiver.return_borrowed()
                item = receiver.receive(borrow)
                if item is None:
                    receiver.freed()
                    if self._blocking:
                        self._block()
                    else:
                        await self._wake.wait()
                    continue
                if item is EOS:
                    await self._finish_events()
                    await host.flush(emit)
                    await self._send_prepared(codec.eos_prepared(), sender)
                    self.ctrl.send(self.stats())
                    continue
                await host.process(item, emit)
                item = None  # a lent input goes back as soon as the node let it go
        except Exception as exc:
            self._report_failure(exc, self.host.where if self.host is not None else "initialize")
            return 1
        await self._cancel_events()
        try:
            if self.host is not None:
                await self.host.cleanup()
        finally:
            self._flush_logs()
            self.ctrl.send(ShutdownAck(self.stats()))
        return 0

    def _trace(self, on: bool) -> None:
        # each call's timing goes to the engine at once, which makes its span
        ctrl = self.ctrl
        if self.host is not None:
            self.host.on_call = (lambda call: ctrl.send(CallRecord((call,)))) if on else None

    async def _await_session(self) -> None:
        """Prewarmed and initialized: wait for the session that takes this process (or a Shutdown).

        Its frames may arrive before its Bind (they travel apart); they wait in
        the channel until the node is bound.
        """
        while self.bound is None and not self.stopping:
            self._wake.clear()
            await self._wake.wait()
        if self.bound is not None and not self.stopping:
            self._bind(self.bound)

    def _bind(self, b: Bind) -> None:
        """The node initialized ahead becomes the session's node: its ids, log level and tracing."""
        a, host = self.assigned, self.host
        assert a is not None and host is not None and host.node is not None
        set_node_title(b.node_id, a.node_type, b.session_id)
        host.node_id = host.node.node_id = b.node_id
        logging.getLogger().setLevel(b.log_level)
        self._trace(b.trace)
        self.assigned = replace(a, session_id=b.session_id, node_id=b.node_id, log_level=b.log_level,
                                trace=b.trace, prewarmed=False)

    def _flush_logs(self) -> None:
        # The process ends with os._exit, which would lose what is still
        # queued; and the engine should read the node's last words before its
        # Failure or acknowledgement (the control lane keeps their order).
        if self.logs is not None:
            self.logs.flush(LOG_FLUSH_S)

    def _report_failure(self, exc: BaseException, where: str) -> None:
        if self._failed:
            return
        self._failed = True
        if isinstance(exc, NodeFailed):
            return
        if self.host is not None:
            err = self.host.wrap(exc, where)
        elif isinstance(exc, EngineError):
            err = exc
        else:
            err = NodeExecutionError(f"{where}() failed: {type(exc).__name__}: {exc}")
        self._flush_logs()
        self.ctrl.send(Failure(err.context.get("where", where), err.error_type.name, err.message,
                               err.traceback_text or "".join(traceback.format_exception(exc)),
                               err.context.get("sequence"), type(err).__name__, _picklable(err.context)))

    # ---------------------------------------------------------------- turn events

    def _events_arrived(self) -> None:
        # On the loop: an async node takes its events at once, while a running
        # process() awaits; a plain node's blocking loop takes them between frames.
        if self.host is not None and self.host.node is not None and not self._blocking:
            self._start_event_tasks()

    def _start_event_tasks(self) -> None:
        loop = asyncio.get_running_loop()
        while self._events:
            task = loop.create_task(self._run_event(self._events.popleft()))
            self._event_tasks.add(task)
            task.add_done_callback(self._event_done)

    def _event_done(self, task: asyncio.Task) -> None:
        self._event_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The node failed: say so now (the data loop may be inside a long
            # process()); the engine tears the session down, which stops us.
            self._report_failure(task.exception(), "on_turn_event")  # type: ignore[arg-type]

    async def _take_events(self) -> None:
        if self._blocking:
            while self._events:
                await self._run_event(self._events.popleft())
        else:
            self._start_event_tasks()

    async def _finish_events(self) -> None:
        """Before end of stream: every event taken and its outputs sent."""
        await self._take_events()
        while self._event_tasks:
            await asyncio.gather(*self._event_tasks, return_exceptions=True)
        if self._failed:
            raise NodeFailed

    async def _cancel_events(self) -> None:
        for task in self._event_tasks:
            task.cancel()
        if self._event_tasks:
            await asyncio.gather(*self._event_tasks, return_exceptions=True)

    async def _run_event(self, event: TurnEvent) -> None:
        if self.host is not None:
            await self.host.turn_event(event, self._emit)

    def _drain_events(self) -> None:
        # A synchronous process() keeps the loop from running the inbox
        # callback; take pending events (a credit request, a credit) now.
        self._inbox.poll()

    def _block(self) -> None:
        """Sleep until the inbox has events or the control thread wakes us (GIL released)."""
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = select.poll()
            waiter.register(self._inbox.fd, select.POLLIN)
            waiter.register(self._wake_r, select.POLLIN)
        for fd, _ in waiter.poll():
            if fd == self._wake_r:
                os.read(self._wake_r, 64)

    # ---------------------------------------------------------------- outputs

    async def _send_prepared(self, p: codec.Prepared, sender: FrameSender) -> None:
        """Send one frame, waiting for room while the engine's buffer is full."""
        if sender.try_send(p):
            return
        if not self._blocking:
            await sender.send(p)
            return
        while not sender.try_send(p):
            sender.credit.clear()
            sender.ask_credit()
            while not sender.credit.is_set():
                if self.stopping:  # the engine is tearing the session down: nobody reads
                    return
                self._block()
                self._drain_events()

    async def _send(self, out: RuntimeData, sender: FrameSender) -> None:
        """A stamped output (see NodeHost) → the output channel, in place when it can."""
        if not self.turns.passes(out):
            return
        t0 = time.thread_time()
        p = codec.prepare(out)
        loan = loan_of(out) if self._memory is not None and self._memory.lent else None
        if loan is not None and send_in_place(p, loan, out, sender):
            self.sent_in_place += 1
        else:
            await self._send_prepared(p, sender)
        self.send_s += time.thread_time() - t0


def run(ctrl_fd: int, args: ProcessArgs, endpoints: Endpoints | None = None) -> int:
    sock = socket.socket(fileno=ctrl_fd)
    ctrl = SyncChannel(sock)
    try:
        ep = endpoints or Endpoints(args.space)
        worker = Worker(ctrl, args, ep)
        with asyncio.Runner(loop_factory=lambda: ep.loop) as runner:
            return runner.run(worker.main())
    except Exception as exc:
        try:
            ctrl.send(Failure("startup", ErrorType.INTERNAL.name, f"node process failed to start: {exc}",
                              "".join(traceback.format_exception(exc)), error_class="InternalError"))
        except OSError:
            pass
        return 1
