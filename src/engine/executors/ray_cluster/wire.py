"""Messages between the engine and its Ray driver process, over a Unix socket.

One message: a header (the pickle's length, the number of out-of-band
buffers, each buffer's length), the pickle (protocol 5), then the buffers,
so a frame's samples are written from where they lie and read into one
buffer each, never re-pickled.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

_HEAD = struct.Struct("<II")


def encode(message: Any) -> list[bytes | memoryview]:
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = _HEAD.pack(len(body), len(raws)) + struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
    return [head, body, *raws]


async def read(reader: asyncio.StreamReader) -> Any:
    """The next message; IncompleteReadError when the other side is gone."""
    size, count = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    lengths = struct.unpack(f"<{count}Q", await reader.readexactly(8 * count)) if count else ()
    body = await reader.readexactly(size)
    buffers = [await reader.readexactly(n) for n in lengths]
    return pickle.loads(body, buffers=buffers)
