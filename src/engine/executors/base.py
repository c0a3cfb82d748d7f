"""The interface every executor's node runner implements for a session."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..data import RuntimeData

#: called by a runner for every frame its node emits (the session routes it)
Emit = Callable[[str, RuntimeData], Awaitable[None]]
#: called once when a runner's node has flushed at end of stream
Ended = Callable[[str], Awaitable[None]]
#: initialization progress: (node_id, phase, percent, message)
Progress = Callable[[str, str, float, str], None]


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
    async def end(self) -> None:
        """End of stream from one upstream; the last one flushes the node."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release everything this runner started; safe to call more than once."""
