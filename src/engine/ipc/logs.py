"""Node process logs, shipped into the engine's own logging.

What a node process says reaches the engine as log records the host app can
filter: records of the `logging` module, warnings (through
`logging.captureWarnings`), and stray lines written to stdout or stderr, by
Python or by a C library writing to fd 1/2 directly.

Child side (`capture`, in the node process once it knows its node): a
handler on the root logger turns each record into a `LogEntry` (message
formatted there, since its args may neither pickle nor mean anything in the
engine; exception and stack text likewise) and puts it on a bounded queue; a
sender thread drains the queue in `LogBatch`es through the `send` callable it
was given (the control lane's). fds 1 and 2 are pointed at pipes read by a
thread that turns each line into an entry on the same queue (ipc.stdio).
Nothing here waits for the engine: when the queue is full a record is
dropped and counted, and the count travels in the next batch. What waits is the sender
thread, in `send`, which is the back-pressure that keeps a flooding node from
flooding the engine: the node's queue overflows instead.

Engine side (`NodeLog`, one per node process): each entry becomes a
LogRecord with its original level, time, message, place and exception text,
on the logger `engine.node.<the node's logger name>` (`engine.node` for the
node's root logger, `engine.node.stdout` / `engine.node.stderr` for stray
lines at INFO / WARNING, `engine.node.py.warnings` for warnings), carrying
`session_id`, `node_id` and `node_type` like every record of a session, and
`node_logger` (the name in the node process). The prefix keeps a node's
records apart from the engine's own (a node that imports engine code and
logs as `engine.session` is still the node speaking), and lets an app set
one level for everything nodes say. Drops are reported as a WARNING on
`engine.node`, "N log records dropped", and summed in `NodeLog.dropped`.

Modelled on LiveKit Agents' `ipc/log_queue.py` (records formatted in the
child, re-emitted through the logger of the same name in the parent), with
the bound it does not have and the fd-level capture it does not do.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .stdio import StdioCapture

#: the logger all node-process records are re-emitted under
PREFIX = "engine.node"
#: entries a node process holds for the engine before it drops new ones
QUEUE_ENTRIES = 2000
#: entries, and characters of text, in one message (the first entry is always
#: taken): bounds how long another control message can wait behind one
BATCH_ENTRIES = 100
BATCH_CHARS = 256 * 1024
#: characters kept of one message, and of one exception or stack text
MAX_MESSAGE_CHARS = 16 * 1024
MAX_TRACE_CHARS = 64 * 1024


@dataclass(frozen=True)
class LogEntry:
    """One log record of a node process, reduced to plain values that pickle."""

    #: the logger's name in the node process ("root", "stdout", "stderr", "py.warnings", ...)
    name: str
    levelno: int
    #: with its args applied
    message: str
    #: time.time() when the node logged it
    created: float
    pathname: str = ""
    lineno: int = 0
    func: str = ""
    exc_text: str = ""
    stack_info: str = ""
    thread_name: str = ""
    pid: int = 0


@dataclass(frozen=True)
class LogBatch:
    """Node process → engine: log entries, in the order logged, and how many
    were dropped (queue full) since the previous batch."""

    entries: tuple[LogEntry, ...]
    dropped: int = 0


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} characters cut]"


_formatter = logging.Formatter()


def entry_of(record: logging.LogRecord) -> LogEntry:
    """A record as the engine will re-emit it."""
    try:
        message = record.getMessage()
    except Exception as exc:  # noqa: BLE001 - a bad format string must not lose the record
        message = f"{record.msg!r} % {record.args!r} (cannot format: {type(exc).__name__}: {exc})"
    exc_text = record.exc_text or ""
    if not exc_text and record.exc_info:
        exc_text = _formatter.formatException(record.exc_info)
    return LogEntry(
        record.name, record.levelno, _cut(message, MAX_MESSAGE_CHARS), record.created,
        record.pathname or "", record.lineno or 0, record.funcName or "",
        _cut(exc_text, MAX_TRACE_CHARS), _cut(record.stack_info or "", MAX_TRACE_CHARS),
        record.threadName or "", record.process or 0,
    )


class LogQueue:
    """A bounded queue of entries and the thread that sends them in batches.

    `put` never waits: past `capacity` an entry is dropped and counted. The
    sender thread waits in `send` for as long as the engine takes to read;
    once `send` fails (the engine is gone) nothing more is sent.
    """

    def __init__(self, send: Callable[[LogBatch], Any], capacity: int = QUEUE_ENTRIES,
                 batch: int = BATCH_ENTRIES) -> None:
        self._send = send
        self.capacity = capacity
        self._batch = batch
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # the sender waits here for entries
        self._idle = threading.Condition(lock)  # flush() waits here for everything sent
        self._entries: collections.deque[LogEntry] = collections.deque()
        self._unreported = 0  # dropped, not yet in a batch
        self._sending = False
        self._closed = False
        self._broken = False
        #: entries dropped because the queue was full (or the engine gone), in all
        self.dropped = 0
        #: entries handed to `send`
        self.sent = 0
        # started by the first entry: a node that never logs pays nothing for it
        self._thread: threading.Thread | None = None

    def full(self) -> bool:
        return self._broken or len(self._entries) >= self.capacity

    def put(self, entry: LogEntry) -> bool:
        """Queue an entry for the engine; False (and counted) when it was dropped."""
        with self._work:
            if self._broken or self._closed or len(self._entries) >= self.capacity:
                self._drop(1)
                return False
            self._entries.append(entry)
            self._start()
            self._work.notify()
        return True

    def _start(self) -> None:
        if self._thread is None:  # (under the lock) the thread takes it once we let go
            self._thread = threading.Thread(target=self._forward, name="node-logs", daemon=True)
            self._thread.start()

    def drop(self, n: int = 1) -> None:
        """Count entries dropped before they were made (see LogHandler)."""
        with self._work:
            self._drop(n)

    def _drop(self, n: int) -> None:
        self.dropped += n
        if not self._broken and not self._closed:
            self._unreported += n
            self._start()
            self._work.notify()

    def _forward(self) -> None:
        while True:
            with self._work:
                while not self._entries and not self._unreported and not self._closed:
                    self._work.wait()
                if not self._entries and not self._unreported:
                    return  # closed and everything sent
                taken: list[LogEntry] = []
                chars = 0
                while self._entries and len(taken) < self._batch and chars < BATCH_CHARS:
                    entry = self._entries.popleft()
                    taken.append(entry)
                    chars += len(entry.message) + len(entry.exc_text) + len(entry.stack_info)
                batch = LogBatch(tuple(taken), self._unreported)
                self._unreported = 0
                self._sending = True
            try:
                self._send(batch)
            except Exception:  # noqa: BLE001 - OSError: the engine is gone; else unsendable: either way stop
                with self._work:
                    self._broken, self._sending = True, False
                    self.dropped += len(batch.entries) + len(self._entries)
                    self._entries.clear()
                    self._unreported = 0
                    self._idle.notify_all()
                return
            with self._work:
                self.sent += len(batch.entries)
                self._sending = False
                self._idle.notify_all()

    def flush(self, timeout: float, also: Callable[[], bool] = lambda: True) -> bool:
        """Wait until everything queued (and `also()`, checked under the lock) is sent;
        False if `timeout` passed first. Called before the process exits."""
        with self._idle:
            return self._idle.wait_for(
                lambda: self._broken or (not self._entries and not self._unreported and not self._sending
                                         and also()), timeout)

    def close(self, timeout: float) -> None:
        """Send what is queued (up to `timeout`), then stop the sender thread."""
        with self._work:
            self._closed = True
            self._work.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    @property
    def idle(self) -> threading.Condition:
        """Notified whenever something was sent; another producer (the stdio
        reader) notifies it too, so flush() re-checks its `also`."""
        return self._idle


class LogHandler(logging.Handler):
    """Every record of the node process → the queue. Never waits for the engine."""

    def __init__(self, queue: LogQueue, level: int) -> None:
        super().__init__(level)
        self.queue = queue

    def handle(self, record: logging.LogRecord) -> bool:
        # Handler.handle would take the handler's lock around emit(): the
        # queue has its own, and a flood should not serialize the node's
        # threads twice.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if sys.is_finalizing():
            return
        if self.queue.full():  # count it without paying to format it
            self.queue.drop()
            return
        try:
            self.queue.put(entry_of(record))
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise into the caller
            self.handleError(record)


class LogCapture:
    """What `capture` installed in a node process; `flush` before the process exits."""

    def __init__(self, queue: LogQueue, handler: LogHandler | None, streams: StdioCapture | None,
                 root_level: int | None) -> None:
        self.queue = queue
        self.handler = handler
        self.streams = streams
        self._root_level = root_level

    @property
    def dropped(self) -> int:
        return self.queue.dropped

    def flush(self, timeout: float = 1.0) -> bool:
        """Everything logged or written so far, sent (False if `timeout` passed first).

        Worth its wait before the process exits (it ends with os._exit, which
        would lose what is queued), and before a Failure is sent, so the
        engine reads the node's last words before its error.
        """
        streams = self.streams
        if streams is not None:
            streams.flush()
        return self.queue.flush(timeout, (lambda: not streams.pending()) if streams is not None else (lambda: True))

    def close(self, timeout: float = 1.0) -> None:
        """Flush, then put back what `capture` changed (the process carries on without it)."""
        self.flush(timeout)
        root = logging.getLogger()
        if self.handler is not None:
            root.removeHandler(self.handler)
            logging.captureWarnings(False)
            if self._root_level is not None:
                root.setLevel(self._root_level)
        if self.streams is not None:
            self.streams.restore(timeout)
        self.queue.close(timeout)


def capture(send: Callable[[LogBatch], Any], *, level: int = logging.INFO, streams: bool = True,
            capacity: int = QUEUE_ENTRIES) -> LogCapture:
    """In a node process: send its logs, warnings and stdout/stderr lines through `send`.

    `level` is the root logger's level here: records below it are not even
    made (the engine passes its own level for `engine.node`, see
    `engine_level`). `send` is called from one thread, the sender's, and may
    wait; it must raise once the engine is gone.
    """
    queue = LogQueue(send, capacity)
    root = logging.getLogger()
    handler = LogHandler(queue, logging.NOTSET)
    root_level = root.level
    root.setLevel(level)
    root.addHandler(handler)
    # warnings → the "py.warnings" logger; also makes logging.basicConfig()
    # in node code a no-op, since the root logger has a handler now
    logging.captureWarnings(True)
    stream_capture = None
    if streams:
        def put_line(name: str, level: int, line: str) -> None:
            queue.put(LogEntry(name, level, line, time.time(), pid=os.getpid()))

        try:
            stream_capture = StdioCapture(put_line, queue.idle)
        except OSError as exc:  # e.g. fd 1 or 2 closed: its logs still go, its stray lines do not
            logging.getLogger(__name__).warning("stdout/stderr of this node process are not captured: %s", exc)
    return LogCapture(queue, handler, stream_capture, root_level)


def engine_level() -> int:
    """The least level the engine would show for a node's records (the child's root level)."""
    return logging.getLogger(PREFIX).getEffectiveLevel()


# ---------------------------------------------------------------- engine side


class NodeLog:
    """Engine side, one per node process: its batches → the engine's logging."""

    def __init__(self, session_id: str, node_id: str, node_type: str = "") -> None:
        self.session_id = session_id
        self.node_id = node_id
        self.node_type = node_type
        #: records the node process dropped (its queue was full), as reported so far
        self.dropped = 0
        #: entries received
        self.received = 0

    def handle(self, batch: LogBatch) -> None:
        for entry in batch.entries:
            self._emit(entry)
        self.received += len(batch.entries)
        if batch.dropped:
            self.dropped += batch.dropped
            logging.getLogger(PREFIX).warning(
                "%d log records dropped: node %s logged faster than the engine read them (%d in all)",
                batch.dropped, self.node_id, self.dropped,
                extra={**self._extra(), "dropped": batch.dropped, "dropped_total": self.dropped})

    def _extra(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "node_id": self.node_id, "node_type": self.node_type}

    def _emit(self, e: LogEntry) -> None:
        name = PREFIX if e.name == "root" else f"{PREFIX}.{e.name}"
        logger = logging.getLogger(name)
        if not logger.isEnabledFor(e.levelno):
            return
        record = logger.makeRecord(name, e.levelno, e.pathname, e.lineno, e.message, None, None,
                                   e.func or None, {**self._extra(), "node_logger": e.name},
                                   e.stack_info or None)
        record.created = e.created
        record.msecs = (e.created - int(e.created)) * 1000
        start = getattr(logging, "_startTime", None)  # what relativeCreated counts from
        if start is not None:
            record.relativeCreated = (e.created - start) * 1000
        record.exc_text = e.exc_text or None  # Formatter appends it as it would a live traceback
        record.process = e.pid or None
        if e.thread_name:
            record.threadName = e.thread_name
        logger.handle(record)
