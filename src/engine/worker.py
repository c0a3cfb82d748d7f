"""The main loop of a node process: one node instance of one session.

Forked from the zygote, usually ahead of time as its standby, with its
event loop, iceoryx2 node and inbox already made (`Endpoints`). Given its
channels, it makes the output channel while the engine makes the input
channel, opens the engine's once told it exists, says Hello, and waits to
be assigned its node (at once for a session that is starting; later for a
prewarmed process). Then it imports and initializes the node (reporting
progress), says Ready, and processes frames as they arrive: a node with
plain process()/flush() from a loop that blocks in poll() between frames,
an async one on the process's asyncio loop, both woken by iceoryx2 events.
Control (ping, shutdown) is read by a thread so it is never stuck behind
data. A timer (SIGALRM) ends the process when one process() call exceeds
its deadline. The process exits when the engine closes the control socket
(engine gone) and, through PR_SET_PDEATHSIG, when the zygote dies.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import inspect
import os
import select
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _fastpath
from .data import RuntimeData
from .errors import EngineError, ErrorType
from .ipc import codec, iox
from .ipc.channel import EOS, FrameReceiver, FrameSender, Inbox
from .ipc.control import (
    Assign,
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
from .node import FrameMemory, Node, iterate_outputs
from .turns import TURN_EVENT_SCHEMA, TurnEvent, TurnLedger

try:  # imported here so the zygote preloads it (an import in the child costs ~6 ms a start)
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a declared dependency
    uvloop = None  # type: ignore[assignment]


@dataclass(frozen=True)
class EngineSpace:
    """Where the engine's iceoryx2 files are and how many slots its inbox has (fixed per engine)."""

    root: str
    prefix: str
    inbox_slots: int


@dataclass(frozen=True)
class ProcessArgs:
    """What a node process needs before it knows its node: where its channels are."""

    space: EngineSpace
    names: iox.ChannelNames
    capacity: int
    #: this process's slot on the engine's inbox
    slot: int


class Endpoints:
    """A process's own iceoryx2 set-up, independent of any session: its
    iceoryx2 node, a notifier on the engine's inbox, and its own inbox.

    The zygote keeps one standby child with these made (and its event loop
    created) before anyone asks for a process; a child forked on demand makes
    them first thing.
    """

    def __init__(self, es: EngineSpace) -> None:
        self.space = iox.IpcSpace(es.root, es.prefix)
        self.ionode = self.space.node(f"w{os.getpid()}")
        self.to_engine = iox.open_event_service(self.ionode, iox.ENGINE_INBOX, es.inbox_slots, "open").notifier_builder().create()
        self.inbox_name = f"rm/proc/{os.getpid()}x{os.urandom(4).hex()}/inbox"
        self.listener, self.fd = iox.make_listener(iox.open_event_service(self.ionode, self.inbox_name, how="create"), self.space)
        self.loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


#: bytes kept for a frame's meta (JSON: metadata, source, layout) in front of
#: an in-place payload; a frame whose meta outgrows it is sent by copy
META_ROOM = 1024


class Loan:
    """A loaned output sample whose payload a node writes in place."""

    __slots__ = ("sample", "address", "offset", "nbytes")

    def __init__(self, sample: Any, offset: int, nbytes: int) -> None:
        self.sample = sample
        self.address = sample.payload_ptr
        self.offset = offset
        self.nbytes = nbytes


class LoanedMemory(FrameMemory):
    """New output frames in the output channel's shared memory (see Node.new_tensor).

    Falls back to the heap when no sample can be loaned (the publisher's
    loan limit; the frame is then sent by copy like any other).
    """

    def __init__(self, sender: FrameSender) -> None:
        self.sender = sender
        self.lent = False  # any loan made yet (else no output can be in place)

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset = _fastpath.payload_offset(len(shape), META_ROOM)
        try:
            sample = iox.loan_slice(self.sender.pub, offset + nbytes)
        except Exception:  # noqa: BLE001 - loan limit or memory: the heap will do
            return super().array(shape, dtype)
        self.lent = True
        loan = Loan(sample, offset, nbytes)
        view = _fastpath.SharedView(loan.address + offset, nbytes, loan, True)
        return np.frombuffer(view, dtype=dtype, count=nbytes // dtype.itemsize if dtype.itemsize else 0).reshape(shape)


def _array_of(frame: RuntimeData) -> np.ndarray | None:
    arr = getattr(frame, "array", None)  # TensorData
    return getattr(frame, "samples", None) if arr is None else arr  # AudioData


def loan_of(frame: RuntimeData) -> Loan | None:
    """The loan a frame's payload lies in, if the whole payload is exactly that loan."""
    arr = _array_of(frame)
    if arr is None:
        return None
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if not isinstance(base, _fastpath.SharedView) or not isinstance(base.owner, Loan):
        return None
    loan = base.owner
    if loan.sample is None or arr.ctypes.data != loan.address + loan.offset or arr.nbytes != loan.nbytes \
            or not arr.flags.c_contiguous:
        return None
    return loan


def _plain(fn: Any) -> bool:
    return not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn))


def load_class(module: str, qualname: str) -> type[Node]:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class NodeFailed(Exception):
    """An event handler failed; its Failure was sent already."""


def _error_type(exc: BaseException) -> str:
    return exc.error_type.name if isinstance(exc, EngineError) else ErrorType.NODE_EXECUTION.name


class Worker:
    def __init__(self, ctrl: SyncChannel, args: ProcessArgs, endpoints: Endpoints) -> None:
        self.ctrl = ctrl
        self.args = args
        self.endpoints = endpoints
        self.assigned: Assign | None = None
        self._assign = threading.Event()
        self.node: Node | None = None
        self.stopping = False
        self.items_in = self.items_out = 0
        self.busy_s = 0.0
        self.send_s = 0.0  # CPU spent handing outputs to the channel (encoding, copying)
        self.sent_in_place = 0
        self._busy_seq: int | None = None
        self._armed = False
        self._memory: Any = None  # the node's LoanedMemory, once it exists
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
        self._sender: FrameSender | None = None

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

    def _arm(self) -> None:
        # The process() deadline: SIGALRM with its default action ends the
        # process even when process() is stuck in native code holding the
        # GIL; the engine reports that death as the timeout. A timer costs a
        # syscall per call and nothing while idle (a watchdog thread polled).
        signal.setitimer(signal.ITIMER_REAL, self._timeout)
        self._armed = True

    def _disarm(self) -> None:
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._armed = False

    def stats(self) -> Stats:
        return Stats(self.items_in, self.items_out, self.busy_s, cpu_s=time.process_time(),
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
        self._timeout = a.process_timeout_secs
        self._node_id = a.node_id
        self._where = "initialize"
        try:
            cls = load_class(a.module, a.qualname)
            node = cls(a.node_id, dict(a.params))
            node._progress = lambda phase, pct, msg: self.ctrl.send(Progress(phase, pct, msg))
            node._memory = self._memory = LoanedMemory(sender)
            node._turns = self.turns
            self._sender = sender
            result = node.initialize()
            if inspect.isawaitable(result):
                await result
            # A node whose process() and flush() are plain functions is driven
            # by a loop that blocks in poll() between frames, without the event
            # loop's task switches (most of a hop's cost here). A node with
            # coroutines or async generators keeps the event loop.
            self._blocking = (self._inbox.fd is not None and _plain(node.process) and _plain(node.flush))
            if self._blocking:
                self._inbox.detach()
            self.node = node
            self.ctrl.send(Ready())
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            borrow = bool(node.zero_copy_inputs)
            while not self.stopping:
                if self._failed:  # an event handler failed (reported already)
                    raise NodeFailed
                self._wake.clear()
                self._drain_events()
                if self._events:
                    await self._take_events(sender)
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
                    await self._finish_events(sender)
                    self._where = "flush"
                    await self._run(node.flush, None, sender)
                    await self._send_prepared(codec.eos_prepared(), sender)
                    self.ctrl.send(self.stats())
                    continue
                self.items_in += 1
                if self.turns.drops(item):  # its turn was cancelled or interrupted while it waited
                    item = None
                    continue
                self._where = "process"
                await self._run(node.process, item, sender)
                item = None  # a lent input goes back as soon as the node let it go
        except Exception as exc:
            self._report_failure(self._where, exc)
            return 1
        await self._cancel_events()
        try:
            if self.node is not None:
                result = self.node.cleanup()
                if inspect.isawaitable(result):
                    await result
        finally:
            self.ctrl.send(ShutdownAck(self.stats()))
        return 0

    def _report_failure(self, where: str, exc: BaseException) -> None:
        if self._failed:
            return
        self._failed = True
        self.ctrl.send(Failure(where, _error_type(exc), f"{where}() failed: {type(exc).__name__}: {exc}",
                               "".join(traceback.format_exception(exc)), self._busy_seq))

    # ---------------------------------------------------------------- turn events

    def _events_arrived(self) -> None:
        # On the loop: an async node takes its events at once, while a running
        # process() awaits; a plain node's blocking loop takes them between frames.
        if self.node is not None and not self._blocking and self._sender is not None:
            self._start_event_tasks(self._sender)

    def _start_event_tasks(self, sender: FrameSender) -> None:
        loop = asyncio.get_running_loop()
        while self._events:
            task = loop.create_task(self._run_event(self._events.popleft(), sender))
            self._event_tasks.add(task)
            task.add_done_callback(self._event_done)

    def _event_done(self, task: asyncio.Task) -> None:
        self._event_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The node failed: say so now (the data loop may be inside a long
            # process()); the engine tears the session down, which stops us.
            self._report_failure("on_turn_event", task.exception())  # type: ignore[arg-type]

    async def _take_events(self, sender: FrameSender) -> None:
        if self._blocking:
            while self._events:
                await self._run_event(self._events.popleft(), sender)
        else:
            self._start_event_tasks(sender)

    async def _finish_events(self, sender: FrameSender) -> None:
        """Before end of stream: every event taken and its outputs sent."""
        await self._take_events(sender)
        while self._event_tasks:
            await asyncio.gather(*self._event_tasks, return_exceptions=True)
        if self._failed:
            raise NodeFailed

    async def _cancel_events(self) -> None:
        for task in self._event_tasks:
            task.cancel()
        if self._event_tasks:
            await asyncio.gather(*self._event_tasks, return_exceptions=True)

    async def _run_event(self, event: TurnEvent, sender: FrameSender) -> None:
        node = self.node
        if node is None or type(node).on_turn_event is Node.on_turn_event:
            return
        result = node.on_turn_event(event)
        if inspect.isawaitable(result):
            result = await result
        async for out in iterate_outputs(result):
            await self._send(out, event.sequence, sender)

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

    async def _run(self, fn: Any, frame: Any, sender: FrameSender) -> None:
        seq = frame.sequence if frame is not None else self._busy_seq
        self._busy_seq = seq
        t0 = time.monotonic()
        self._arm()
        try:
            result = fn(frame) if frame is not None else fn()
            if result is None:
                return
            if isinstance(result, RuntimeData):  # the common case, without generator machinery
                self._disarm()
                await self._send(result, seq, sender)
                return
            if inspect.isawaitable(result):
                result = await result
            async for out in iterate_outputs(result):
                self._disarm()  # waiting for the consumer is not the node's time
                await self._send(out, seq, sender)
                self._arm()
        finally:
            self._disarm()
            self.busy_s += time.monotonic() - t0


    async def _send(self, out: RuntimeData, seq: int | None, sender: FrameSender) -> None:
        if self.turns.drops(out):
            return
        if getattr(out, "schema_type", None) == TURN_EVENT_SCHEMA:
            event = TurnEvent.of(out)
            if event is not None:
                self.turns.note(event)  # this node's own cancel applies here too
        t0 = time.thread_time()
        out.sequence = seq
        out.source = self._node_id
        self.items_out += 1
        p = codec.prepare(out)
        loan = loan_of(out) if self._memory.lent else None
        if loan is not None and self._send_in_place(p, loan, out, sender):
            self.sent_in_place += 1
        else:
            await self._send_prepared(p, sender)
        self.send_s += time.thread_time() - t0

    @staticmethod
    def _send_in_place(p: codec.Prepared, loan: Loan, out: RuntimeData, sender: FrameSender) -> bool:
        """Send a frame whose payload was written into its loaned sample; False = send it by copy."""
        if len(p.meta) > META_ROOM:
            return False  # the loan stays valid as the copy's source until it is collected
        payload_at = loan.address + loan.offset
        _fastpath.header_to_address(loan.address, loan.offset + loan.nbytes, p.kind, p.elem, p.sequence,
                                    p.timestamp_us, p.a, p.b, p.extra, 0, p.shape,
                                    p.meta.ljust(META_ROOM), loan.nbytes)  # JSON allows trailing blanks
        sample, loan.sample = loan.sample, None
        _array_of(out).flags.writeable = False  # type: ignore[union-attr]  # it is the consumer's now
        if sender.send_loaned(sample):
            return True
        # The channel was full, and the sample went back to the pool unsent.
        # Nothing in this process loans before this line, so the payload is
        # still there: take a copy and send it the usual way (with credit).
        p.payload = bytearray(loan.nbytes)
        _fastpath.copy_from_address(payload_at, p.payload)
        return False


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
                              "".join(traceback.format_exception(exc))))
        except OSError:
            pass
        return 1
