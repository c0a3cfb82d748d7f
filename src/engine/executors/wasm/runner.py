"""The WASM node's runner: the native runner, with the node working in a task
of its own behind a bounded queue, as a node process works behind its channel,
and its plugin calls on a thread of its own.

So a sender hands a frame over and goes on (at most `channel_capacity` wait),
a client's cancel is read while a call runs, tearing the session down stops
the call that is running (see WasmNode.settle), and a plugin that spins
holds up only its own node: no other node or session waits for its thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from ...data import RuntimeData
from ...node import Node
from ...plan import PlannedNode
from ..base import Progress, RunnerContext
from ..native import NativeRunner
from .modules import ModuleStore
from .node import WasmNode

_END = object()


class WasmRunner(NativeRunner):
    def __init__(self, planned: PlannedNode, ctx: RunnerContext, modules: ModuleStore) -> None:
        self._modules = modules
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"wasm-{planned.id}")
        self._node: WasmNode | None = None
        super().__init__(planned, ctx, prepare=self._bind)
        self._queue: asyncio.Queue[RuntimeData | object] = asyncio.Queue(ctx.settings.channel_capacity)

    def _bind(self, node: Node) -> None:
        assert isinstance(node, WasmNode)
        node.bind(self._modules, self._thread)
        self._node = node

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

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            if self._node is not None:  # also one whose initialize() never finished
                await self._node.settle()
            self._thread.shutdown(wait=True)  # idle by now: nothing left to wait for
