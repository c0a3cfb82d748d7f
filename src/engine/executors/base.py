"""The interface every executor's node runner implements for a session."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..data import RuntimeData
from ..turns import TurnEvent, TurnLedger

if TYPE_CHECKING:
    from ..config import SessionSettings
    from ..errors import EngineError

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


class RunnerContext(Protocol):
    """What a runner may use of the session it runs a node for."""

    id: str
    settings: SessionSettings
    #: the session's turn ledger (voided turns; see engine.turns)
    turns: TurnLedger
    #: the session's trace when it is sampled (a tracing.SessionTrace), else None
    trace: Any

    @property
    def error(self) -> EngineError | None:
        """The session's first error, if it failed."""

    @property
    def state(self) -> str:
        """new → starting → running → closing → closed."""

    async def emit(self, node_id: str, frame: RuntimeData) -> None:
        """Route one output of `node_id` (awaits downstream room)."""

    def emit_nowait(self, node_id: str, frame: RuntimeData) -> bool:
        """Route an output if that needs no waiting; False = use emit()."""

    async def node_ended(self, node_id: str) -> None:
        """`node_id` has flushed at end of stream."""

    def forwards_encoded(self, node_id: str) -> bool:
        """True when `node_id`'s outputs all go to node processes (they may stay encoded)."""

    def track(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Run a task the session owns (cancelled at close; its failure fails the session)."""

    def fail_soon(self, error: BaseException) -> None:
        """Fail the session with `error` (from a callback: the teardown runs in a task)."""


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

    def push_nowait(self, frame: RuntimeData) -> bool:
        """Deliver one input frame if that needs no waiting and no work on this
        call's stack; False = nothing done (use push)."""
        return False

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
