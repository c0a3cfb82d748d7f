"""A bounded asyncio FIFO whose terminal markers never wait."""

from __future__ import annotations

import asyncio
import collections
from typing import Any


class BoundedFifo:
    """Bounded FIFO for one consumer task.

    `put` waits while full (backpressure); `put_terminal` always appends, so
    an end or error marker can be queued behind a full buffer without waiting.
    """

    def __init__(self, capacity: int) -> None:
        self._items: collections.deque = collections.deque()
        self._capacity = capacity
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Any) -> None:
        while len(self._items) >= self._capacity:
            self._writable.clear()
            await self._writable.wait()
        self._items.append(item)
        self._readable.set()

    def try_put(self, item: Any) -> bool:
        """Append without waiting; False when full."""
        if len(self._items) >= self._capacity:
            return False
        self._items.append(item)
        self._readable.set()
        return True

    def put_terminal(self, item: Any) -> None:
        self._items.append(item)
        self._readable.set()

    async def get(self) -> Any:
        while not self._items:
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        if len(self._items) < self._capacity:
            self._writable.set()
        return item

    def clear(self) -> None:
        self._items.clear()
        self._writable.set()
