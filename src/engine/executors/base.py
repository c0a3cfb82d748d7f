"""The interface every executor's node runner implements for a session."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..data import RuntimeData
from ..turns import TurnEvent

#: called by a runner for every frame its node emits (the session routes it)
Emit = Callable[[str, RuntimeData], Awaitable[None]]
#: called once when a runner's node has flushed at end of stream
Ended = Callable[[str], Awaitable[None]]
#: initialization progress: (node_id, phase, percent, message)
Progress = Callable[[str, str, float, str], None]
#: run a coroutine as a task the session owns (its failure fails the session): (coro, name)
Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task]


@dataclass
class NodeStats:
    items_in: int = 0
    items_out: int = 0
    busy_s: float = 0.0
    #: CPU seconds; a process node reports its process's, a native node its busy time
    cpu_s: float = 0.0
    dropped: int = 0
    extra: dict = field(default_factory=dict)


class NodeRunner(abc.ABC):
    """One node of one session, on one executor."""

    node_id: str
    stats: NodeStats

    @abc.abstractmethod
    async def start(self, progress: Progress) -> None:
        """Create and initialize the node; return when it is ready to process."""

    @abc.abstractmethod
    async def push(self, frame: RuntimeData) -> None:
        """Deliver one input frame; awaits while the node cannot accept more."""

    @abc.abstractmethod
    async def turn_event(self, event: TurnEvent) -> None:
        """Hand the node a turn event sent by another node, ahead of its queued inputs,
        without waiting for the node to handle it."""

    @abc.abstractmethod
    async def end(self) -> None:
        """End of stream from one upstream; the last one flushes the node."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release everything this runner started; safe to call more than once."""
