"""Native executor: the node runs in the engine's event loop.

Sync process()/flush() of a node that declares `blocking = True` (every node
that normally runs in its own process) is moved to a worker thread, so the
loop never blocks. Calls into one node are serialized by a lock (fan-in may
push from several tasks). The node itself is called through the node host
(`engine.host`), as in a node process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..data import RuntimeData
from ..host import NodeHost
from ..node import Node
from ..plan import PlannedNode
from ..turns import TurnEvent
from .base import NodeRunner, NodeStats, Progress, RunnerContext

log = logging.getLogger("engine.native")


class NativeRunner(NodeRunner):
    def __init__(self, planned: PlannedNode, ctx: RunnerContext, *,
                 prepare: Callable[[Node], None] | None = None) -> None:
        self.node_id = planned.id
        self.planned = planned
        self.ctx = ctx
        self.stats = NodeStats()
        self._blocking = planned.spec.cls.blocking
        self.host = NodeHost(planned.id, planned.spec.cls, dict(planned.decl.params), stats=self.stats,
                             turns=ctx.turns, in_thread=self._blocking, accepts=planned.accepted_kinds,
                             prepare=prepare)
        trace = getattr(ctx, "trace", None)
        if trace is not None:
            node_type = planned.spec.node_type
            self.host.on_call = lambda call: trace.node_call(planned.id, node_type, call)
        self._event_tasks: set[asyncio.Task] = set()
        self._pending_ends = max(1, len(planned.upstream))
        self._lock = asyncio.Lock()

    async def start(self, progress: Progress) -> None:
        await self.host.start(lambda phase, pct, msg: progress(self.node_id, phase, pct, msg))

    async def _emit(self, frame: RuntimeData) -> None:
        await self.ctx.emit(self.node_id, frame)

    async def push(self, frame: RuntimeData) -> None:
        async with self._lock:
            await self.host.process(frame, self._emit)
        # a native node's CPU is its busy time (it shares the engine's process)
        self.stats.cpu_s = self.stats.busy_s

    async def turn_event(self, event: TurnEvent) -> None:
        # In a task of its own, not in the sender's call: the sender may be
        # this node's own downstream, waiting inside its process() for us
        # (the event going upstream), which would wait for it in turn.
        if not self.host.handles_turn_events:
            return
        task = self.ctx.track(self._on_turn_event(event), f"{self.node_id}:turn-event")
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)

    async def _on_turn_event(self, event: TurnEvent) -> None:
        if self._blocking:  # its process() may be running in a thread: wait for it
            async with self._lock:
                await self.host.turn_event(event, self._emit)
        else:  # alongside a process() that is waiting, as in a node process
            await self.host.turn_event(event, self._emit)

    async def end(self) -> None:
        self._pending_ends -= 1
        if self._pending_ends > 0:
            return
        await self.finish()

    async def finish(self) -> None:
        """Every upstream has ended: handle what is left, flush the node, say so."""
        while self._event_tasks:  # events handed over before the end are handled before the flush
            await asyncio.gather(*self._event_tasks, return_exceptions=True)
        async with self._lock:
            await self.host.flush(self._emit)
        self.stats.cpu_s = self.stats.busy_s
        await self.ctx.node_ended(self.node_id)

    async def aclose(self) -> None:
        try:
            await self.host.cleanup()
        except Exception:
            log.exception("cleanup() of node %s failed", self.node_id,
                          extra={"session_id": self.ctx.id, "node_id": self.node_id})
