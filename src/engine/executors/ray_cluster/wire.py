"""Messages between the engine and its Ray driver process, over a Unix socket.

One message: a header (the pickle's length, the number of out-of-band
buffers, each buffer's length), the pickle (protocol 5), then the buffers,
so a frame's samples are written from where they lie and read into one
buffer each, never re-pickled. The socket is read with `sock_recv_into`
straight into each buffer (asyncio's StreamReader grows and slices a
bytearray per chunk: five times slower for a 1 MiB frame), and one writer
task sends messages whole, in the order they were queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import pickle
import socket
import struct
from typing import Any

_HEAD = struct.Struct("<II")
#: the socket's buffers: a 1 MiB frame crosses in a few reads
SOCKET_BUFFER = 4 * 1024 * 1024
#: queued bytes past which drain() waits
HIGH_WATER = 8 * 1024 * 1024


def encode(message: Any) -> list[bytes | memoryview]:
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = _HEAD.pack(len(body), len(raws)) + struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
    return [head, body, *raws]


class Link:
    """One end of the socket: `send` queues, `read` awaits the next message."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        #: (the parts of one message, their size), in the order queued
        self._out: collections.deque[tuple[list[bytes | memoryview], int]] = collections.deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()  # set while nothing is queued
        self._idle.set()
        self.closed = False
        self._writer = self._loop.create_task(self._write())

    def send(self, message: Any) -> None:
        if self.closed:
            raise ConnectionError("the link is closed")
        parts = encode(message)
        size = sum(memoryview(p).nbytes for p in parts)
        self._out.append((parts, size))
        self._queued += size
        if self._queued > HIGH_WATER:
            self._room.clear()
        self._idle.clear()
        self._wake.set()

    async def drain(self) -> None:
        """Wait while more than HIGH_WATER bytes are queued."""
        while not self._room.is_set() and not self.closed:
            await self._room.wait()

    async def flush(self) -> None:
        """Wait until everything queued is sent (or the link is closed)."""
        await self._idle.wait()

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                while self._out:
                    parts, size = self._out.popleft()
                    for part in parts:
                        await self._loop.sock_sendall(self.sock, part)
                    self._queued -= size
                    if self._queued <= HIGH_WATER:
                        self._room.set()
                self._wake.clear()
                self._idle.set()
        except OSError:
            pass
        finally:
            self.closed = True
            self._room.set()
            self._idle.set()

    async def _exactly(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = await self._loop.sock_recv_into(self.sock, view[got:])
            if not k:
                raise ConnectionError("the other side closed the link")
            got += k
        return buf

    async def read(self) -> Any:
        """The next message; ConnectionError when the other side is gone."""
        size, count = _HEAD.unpack(await self._exactly(_HEAD.size))
        lengths = struct.unpack(f"<{count}Q", await self._exactly(8 * count)) if count else ()
        body = await self._exactly(size)
        buffers = [await self._exactly(n) for n in lengths]
        return pickle.loads(body, buffers=buffers)

    async def close(self) -> None:
        self.closed = True
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self.sock.close()
