"""The cluster's side: one Ray actor runs one node of one session.

An async actor: inputs are handled one at a time in the order the engine
sent them (each call carries its index; Ray does not promise an async
actor's order), turn events beside them, as in a node process. Every call
that can produce outputs yields ("out", frame) items as the node emits
them, and ("error", {...}) once if the node fails; for a node whose
process()/flush() is a generator it is a Ray streaming generator, so its
outputs reach the engine while it is still working, for any other one plain
call returns them all (cheaper): the typed error crosses as data and is raised again in the
engine as the class it was raised as. The node is called through the one
node host, as everywhere else.

Frames arrive through Ray's object store: an argument over Ray's inline
limit (100 KiB) is put there by the engine and read here without a copy
(its arrays are read-only views, as a node process's inputs are).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ...data import RuntimeData
from ...errors import EngineError, NodeExecutionError
from ...host import NodeHost
from ...node import Node
from ...turns import TurnEvent, TurnLedger
from ..base import NodeStats

_END = object()


def error_item(err: EngineError) -> tuple[str, dict[str, Any]]:
    """A typed error as data: ("error", {class, type, message, context, traceback})."""
    context = {k: v for k, v in err.context.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return ("error", {"class": type(err).__name__, "type": err.error_type.name, "message": err.message,
                      "context": context, "traceback": err.traceback_text})


class NodeActor:
    def __init__(self, node_id: str, cls: type[Node], params: dict[str, Any], accepts: Any,
                 process_timeout_secs: float = 0.0) -> None:
        self.node_id = node_id
        self.timeout = process_timeout_secs
        self.stats = NodeStats()
        self.turns = TurnLedger()
        self.host = NodeHost(node_id, cls, params, stats=self.stats, turns=self.turns,
                             in_thread=cls.blocking, accepts=accepts)
        self._next = 0
        self._order = asyncio.Condition()

    def _where(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"ray_node_id": ctx.get_node_id(), "pid": os.getpid(),
                "ip": ray.util.get_node_ip_address()}

    async def _bounded(self, where: str, work: Awaitable[None]) -> None:
        """`work` (a process() or flush()) within process_timeout_secs: a node that
        hangs fails the session, and the session's end kills this actor."""
        if not self.timeout:
            await work
            return
        try:
            async with asyncio.timeout(self.timeout) as bound:
                await work
        except TimeoutError:
            if not bound.expired():
                raise
            raise NodeExecutionError(f"{where}() exceeded process_timeout_secs={self.timeout:g}; its Ray actor "
                                     "will be stopped", node_id=self.node_id,
                                     context={"field": "process_timeout_secs", "limit": self.timeout}) from None

    async def _items(self, work: Callable[[Callable[[tuple], None]], Awaitable[None]], where: str = ""
                     ) -> AsyncIterator[tuple[str, Any]]:
        """Run `work(put)` as a task, yielding each item it puts as it comes, then
        ("error", ...) if it failed (in `where`, else where the node host was)."""
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(work(queue.put_nowait))
        task.add_done_callback(lambda _: queue.put_nowait(_END))
        while (item := await queue.get()) is not _END:
            yield item
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            yield error_item(self.host.wrap(exc, where or self.host.where))

    def _run(self, work: Callable[[Callable[[RuntimeData], Awaitable[None]]], Awaitable[None]],
             where: str = "") -> AsyncIterator[tuple[str, Any]]:
        """Run `work(emit)`, yielding each output as it is emitted (bounded in time when
        `where` names a process() or flush()), then its error if it failed."""
        def node_work(put: Callable[[tuple], None]) -> Awaitable[None]:
            async def emit(out: RuntimeData) -> None:
                if self.turns.passes(out):
                    put(("out", out))

            return self._bounded(where, work(emit)) if where else work(emit)

        return self._items(node_work)

    async def _in_order(self, index: int, where: str, work: Callable[..., Awaitable[None]]
                        ) -> AsyncIterator[tuple[str, Any]]:
        async with self._order:
            await self._order.wait_for(lambda: self._next == index)
        try:
            async for item in self._run(work, where):
                yield item
        finally:
            async with self._order:
                self._next += 1
                self._order.notify_all()

    # ------------------------------------------------------------ called by the engine

    async def start(self) -> AsyncIterator[tuple[str, Any]]:
        """("placed", where) at once, ("progress", phase, percent, message)..., then ("ready", where)."""
        where = self._where()
        yield ("placed", where)
        failed = False
        async for item in self._items(lambda put: self.host.start(
                lambda phase, pct, msg: put(("progress", phase, pct, msg))), "initialize"):
            failed = item[0] == "error"
            yield item
        if not failed:
            yield ("ready", where)

    async def process(self, index: int, frame: RuntimeData) -> AsyncIterator[tuple[str, Any]]:
        async for item in self._in_order(index, "process", lambda emit: self.host.process(frame, emit)):
            yield item

    async def flush(self, index: int) -> AsyncIterator[tuple[str, Any]]:
        async for item in self._in_order(index, "flush", self.host.flush):
            yield item

    # a node whose method returns its outputs (not a generator) has them all at
    # once: one plain call answers with the list (a streaming call costs Ray
    # a message per item and one more for the end)

    async def process_all(self, index: int, frame: RuntimeData) -> list[tuple[str, Any]]:
        return [item async for item in self.process(index, frame)]

    async def flush_all(self, index: int) -> list[tuple[str, Any]]:
        return [item async for item in self.flush(index)]

    async def turn_event(self, event: TurnEvent) -> AsyncIterator[tuple[str, Any]]:
        self.turns.note(event)  # before anything else: queued inputs of a voided turn are dropped
        async for item in self._run(lambda emit: self.host.turn_event(event, emit)):
            yield item

    async def close(self) -> dict[str, Any]:
        """Run the node's cleanup(); the node's counts and this process's CPU time."""
        error = None
        try:
            await self.host.cleanup()
        except EngineError as exc:
            error = str(exc)
        return {"busy_s": self.stats.busy_s, "cpu_s": time.process_time(), "cleanup_error": error}

    async def heartbeat(self, every: float) -> AsyncIterator[None]:
        """Never ends: an item every `every` seconds, the engine's watch on this actor."""
        while True:
            yield None
            await asyncio.sleep(every)
