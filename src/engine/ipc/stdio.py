"""A node process's stdout and stderr (fds 1 and 2) → log entries, line by line.

Part of the node log lane (see ipc.logs): what Python prints, what a C
library writes to fd 1/2 directly and what a subprocess inherits all arrive
as records in the engine's log, on the same bounded queue as the node's
`logging` records.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import select
import sys
import termios
import threading
from collections.abc import Callable
from typing import Any

#: bytes of a stray line kept as one record (a longer "line" becomes several)
MAX_LINE_BYTES = 8 * 1024
#: what the capture pipes may hold (Linux caps it at /proc/sys/fs/pipe-max-size,
#: 1 MiB by default); see StdioCapture for why it matters
PIPE_BYTES = 1 << 20

#: stray lines: (fd, entry name, level)
STREAMS = ((1, "stdout", logging.INFO), (2, "stderr", logging.WARNING))


def _libc() -> Any:
    try:
        return ctypes.CDLL(None)
    except OSError:  # pragma: no cover - no C library to speak of
        return None


def _c_flush(libc: Any) -> None:
    if libc is not None:
        with contextlib.suppress(Exception):
            libc.fflush(None)


def _c_line_buffer_stdout(libc: Any) -> None:
    # C's stdout is fully buffered on a pipe, and a node process ends with
    # os._exit(), which never flushes it: line buffering makes a C library's
    # printf arrive as the line is written. glibc names the stream `stdout`.
    if libc is None:
        return
    with contextlib.suppress(Exception):
        stream = ctypes.c_void_p.in_dll(libc, "stdout")
        libc.setvbuf(stream, None, 1, 0)  # _IOLBF


def _pending_bytes(fd: int) -> int:
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf)
    except OSError:
        return 0
    return int.from_bytes(buf, sys.byteorder)


class StdioCapture:
    """fds 1 and 2 → pipes → a reader thread → one entry per line.

    At the fd level, so a C library's writes and a subprocess's inherited
    output are captured as well as Python's `print`. Python's own
    sys.stdout/sys.stderr keep writing to fds 1/2, line-buffered, so Python
    and C output stay in the order written.

    Nothing waits on the engine here either: the reader puts lines on the
    queue without waiting (dropped and counted when it is full). A writer
    waits only while the pipe is full and the reader has not yet read it; the
    reader needs the GIL for that, so a C call that holds the GIL while
    writing more than the pipe holds (PIPE_BYTES) waits until it lets the GIL
    go (during process(), at most until the deadline timer ends the process).
    """

    def __init__(self, put: Callable[[str, int, str], Any], idle: threading.Condition) -> None:
        """`put(name, level, line)` must not wait; `idle` is the condition
        flush() waits on: held while the reader says what it is doing."""
        self._put_line = put
        self.idle = idle
        self._libc = _libc()
        self._saved: dict[int, int] = {}  # fd → a duplicate of what it was
        self._readers: dict[int, tuple[str, int]] = {}  # pipe read end → (entry name, level)
        self._open: set[int] = set()  # read ends not at EOF yet; changed under idle
        self._reading = False  # guarded by idle; see pending()
        self._line_buffering: dict[str, bool] = {}
        self._flush_all()
        try:
            for fd, name, level in STREAMS:
                r, w = os.pipe()
                self._readers[r] = (name, level)
                self._open.add(r)
                try:
                    with contextlib.suppress(OSError):
                        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
                    saved = os.dup(fd)
                    os.dup2(w, fd)  # inheritable: a subprocess's output is captured too
                    self._saved[fd] = saved
                finally:
                    os.close(w)
        except OSError:
            self.restore(0.0)
            raise
        for attr in ("stdout", "stderr"):
            stream = getattr(sys, attr)
            if hasattr(stream, "reconfigure") and hasattr(stream, "line_buffering"):
                self._line_buffering[attr] = stream.line_buffering
                stream.reconfigure(line_buffering=True)
        _c_line_buffer_stdout(self._libc)
        self._keep_faults_visible()
        self._thread = threading.Thread(target=self._read, name="node-stdio", daemon=True)
        self._thread.start()

    def _keep_faults_visible(self) -> None:
        # faulthandler writes a crashing process's traceback to fd 2 as it
        # dies, when no thread of it can read a pipe any more: keep that on
        # the stderr the process was given.
        import faulthandler

        if faulthandler.is_enabled() and 2 in self._saved:
            faulthandler.enable(file=self._saved[2])

    def _flush_all(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        _c_flush(self._libc)

    def _read(self) -> None:
        poller = select.poll()
        for r in self._readers:
            poller.register(r, select.POLLIN)
        tails = {r: bytearray() for r in self._readers}
        open_fds = self._open
        while open_fds:
            for r, _ in poller.poll():
                with self.idle:
                    self._reading = True
                try:
                    data = os.read(r, 65536)
                except OSError:
                    data = b""
                if data:
                    self._lines(r, tails[r], data)
                else:  # every write end closed
                    poller.unregister(r)
                    if tails[r]:
                        self._put(r, bytes(tails[r]))
                    with self.idle:
                        open_fds.discard(r)  # before its number can be reused (see pending())
                    os.close(r)
                with self.idle:
                    self._reading = False
                    self.idle.notify_all()

    def _lines(self, r: int, tail: bytearray, data: bytes) -> None:
        tail += data
        start = 0
        while True:
            end = tail.find(b"\n", start)
            if end < 0:
                break
            self._put(r, bytes(tail[start:end]))
            start = end + 1
        del tail[:start]
        while len(tail) > MAX_LINE_BYTES:  # a "line" without end: keep it in pieces
            self._put(r, bytes(tail[:MAX_LINE_BYTES]))
            del tail[:MAX_LINE_BYTES]

    def _put(self, r: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if not text.strip():
            return
        name, level = self._readers[r]
        self._put_line(name, level, text)

    def pending(self) -> bool:
        """Anything written and not yet on the queue (called under idle).

        A byte is either still in its pipe or being handled by the reader,
        which says so before it reads.
        """
        return self._reading or any(_pending_bytes(r) for r in self._open)

    def flush(self) -> None:
        self._flush_all()

    def restore(self, timeout: float) -> None:
        self._flush_all()
        for attr, line_buffering in self._line_buffering.items():
            with contextlib.suppress(Exception):
                getattr(sys, attr).reconfigure(line_buffering=line_buffering)
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()
        thread = getattr(self, "_thread", None)
        if thread is not None:  # EOF once no one else (a subprocess) holds a write end
            thread.join(timeout)
        else:  # set-up failed before the reader started
            for r in self._open:
                os.close(r)
            self._open.clear()
