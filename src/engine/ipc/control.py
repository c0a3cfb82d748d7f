"""The control lane between the engine and one node process.

A unix socketpair per process, separate from the shared-memory data
channels, so control never waits behind data. Each message is a small frozen
dataclass, framed as a 4-byte length + pickle (both ends are this engine's
own code; nothing from a client is ever unpickled).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

_LEN = struct.Struct("<I")
MAX_MESSAGE = 16 * 1024 * 1024


@dataclass(frozen=True)
class ChannelsReady:
    """Engine → node process: the input channel exists; open it.

    Each side creates the channel it publishes on while the other does the
    same, and opens the other's only once it is complete.
    """


@dataclass(frozen=True)
class OutputsReady:
    """Node process → engine: the output channel and the process's inbox exist; open them."""

    inbox: str  # the process's own event service, for the engine's notifier


@dataclass(frozen=True)
class Hello:
    """Node process → engine: alive, channels open; waiting for its node."""

    pid: int


@dataclass(frozen=True)
class Assign:
    """Engine → node process: the one node this process will run, for one session.

    Sent once. A process is launched generic (its channels and control lane
    only), so one can be started before any session asks for it (prewarmed),
    and even assigned and initialized then (`prewarmed`, then a Bind).
    """

    session_id: str
    node_id: str
    node_type: str
    module: str
    qualname: str
    params: dict
    process_timeout_secs: float
    #: the data kinds (DataKind values) the node takes; None = any
    accepts: tuple[int, ...] | None = None
    #: the least level the engine shows of what the node logs (see ipc.logs):
    #: the node process does not even make the records below it
    log_level: int = logging.INFO
    #: the session is traced: time each node call and send a CallRecord
    trace: bool = False
    #: initialize, say Ready, then wait for a Bind: a process prewarmed with
    #: its node initialized before any session exists (session_id and node_id
    #: are stand-ins until the Bind)
    prewarmed: bool = False


#: the Assign fields a session gives a prewarmed process in its Bind; every
#: other field is what its node was initialized with
BOUND_LATER = ("session_id", "node_id", "log_level", "trace", "prewarmed")


@dataclass(frozen=True)
class Bind:
    """Engine → prewarmed node process: the session that took it.

    Its node, initialized already, serves this session's node from now on:
    outputs, errors and the process title carry these ids, and the session's
    log level and tracing apply. Sent once; frames may follow at once.
    """

    session_id: str
    node_id: str
    log_level: int = logging.INFO
    trace: bool = False


@dataclass(frozen=True)
class CallRecord:
    """Node process → engine: node calls it timed (a traced session only; see engine.tracing)."""

    calls: tuple


@dataclass(frozen=True)
class Progress:
    phase: str
    percent: float
    message: str


@dataclass(frozen=True)
class Ready:
    """initialize() returned; the node can process."""


@dataclass(frozen=True)
class Failure:
    """The node failed; the process exits right after sending this."""

    where: str  # "initialize" | "process" | "flush" | "on_turn_event" | "startup"
    error_type: str  # errors.ErrorType name
    message: str  # EngineError.message (without the node prefix)
    traceback: str = ""
    sequence: int | None = None
    error_class: str = ""  # the EngineError subclass raised (errors.ERROR_CLASSES)
    context: dict = field(default_factory=dict)  # its context, where it pickles


@dataclass(frozen=True)
class Stats:
    items_in: int
    items_out: int
    busy_s: float
    #: CPU time of the whole node process (its one job is this node)
    cpu_s: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Ping:
    """Engine → node process: answer with a Pong carrying your current Stats."""

    token: int


@dataclass(frozen=True)
class Pong:
    token: int
    stats: Stats | None = None


@dataclass(frozen=True)
class DeliverTurnEvent:
    """Engine → node process: a turn event from another node (see engine.turns).

    On this lane, not the data channel, so it overtakes the inputs queued
    for the node: a voided turn's queued work is dropped, not done.
    """

    kind: str
    turn_id: str
    data: dict
    source: str
    sequence: int | None


@dataclass(frozen=True)
class Shutdown:
    """Engine → node: stop (after the current item), clean up, acknowledge, exit."""


@dataclass(frozen=True)
class ShutdownAck:
    stats: Stats | None = None


def pack(msg: Any) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


class SyncChannel:
    """Node-process side: blocking socket, sends safe from several threads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, msg: Any) -> None:
        data = pack(msg)
        with self._lock:
            self.sock.sendall(data)

    def recv(self) -> Any | None:
        """Next message; None when the engine closed its end."""
        head = self._read(_LEN.size)
        if head is None:
            return None
        (n,) = _LEN.unpack(head)
        if n > MAX_MESSAGE:
            raise ValueError(f"control message too large: {n}")
        body = self._read(n)
        return None if body is None else pickle.loads(body)

    def _read(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)


class AsyncChannel:
    """Engine side: asyncio streams over the socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> AsyncChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    async def recv(self) -> Any | None:
        try:
            head = await self._reader.readexactly(_LEN.size)
            (n,) = _LEN.unpack(head)
            if n > MAX_MESSAGE:
                raise ValueError(f"control message too large: {n}")
            return pickle.loads(await self._reader.readexactly(n))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def send(self, msg: Any) -> None:
        if not self._writer.is_closing():
            self._writer.write(pack(msg))

    def close(self) -> None:
        self._writer.close()
