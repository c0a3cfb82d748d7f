"""The WASM node's runner: the native runner, with the node working in a task
of its own behind a bounded queue, as a node process works behind its channel.

So a sender hands a frame over and goes on (at most `channel_capacity` wait),
a client's cancel is read while a call runs, and tearing the session down
stops the call that is running (see WasmNode.cleanup).
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from ...data import RuntimeData
from ...plan import PlannedNode
from ..base import Progress, RunnerContext
from ..native import NativeRunner
from .modules import ModuleStore

_END = object()


class WasmRunner(NativeRunner):
    def __init__(self, planned: PlannedNode, ctx: RunnerContext, modules: ModuleStore,
                 pool: concurrent.futures.Executor) -> None:
        super().__init__(planned, ctx, prepare=lambda node: node.bind(modules, pool))
        self._queue: asyncio.Queue[RuntimeData | object] = asyncio.Queue(ctx.settings.channel_capacity)

    async def start(self, progress: Progress) -> None:
        await super().start(progress)
        self.ctx.track(self._work(), f"{self.node_id}:wasm")

    async def push(self, frame: RuntimeData) -> None:
        await self._queue.put(frame)

    def push_nowait(self, frame: RuntimeData) -> bool:
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            return False
        return True

    async def end(self) -> None:
        self._pending_ends -= 1
        if self._pending_ends == 0:
            await self._queue.put(_END)

    async def _work(self) -> None:
        while (item := await self._queue.get()) is not _END:
            assert isinstance(item, RuntimeData)
            await super().push(item)
        await self.finish()
