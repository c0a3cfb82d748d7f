"""The process executor of one engine: its zygote, its iceoryx2 space and
inbox, the engine-wide process count and the prewarmed pool; it makes a
`ProcessRunner` for each node of a session that runs in its own process."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from ...config import RuntimeConfig
from ...errors import ResourceLimitError
from ...ipc import iox
from ...ipc.endpoints import EngineSpace, ProcessArgs
from ...plan import PlannedNode
from ...registry import ExecutorRegistry
from .inbox import EngineInbox, EventTarget
from .memory import watch_memory
from .pool import ProcessPool
from .runner import ProcessRunner
from .zygote_client import ZygoteClient

if TYPE_CHECKING:
    from ..base import RunnerContext

log = logging.getLogger("engine.process")


class ProcessManager:
    def __init__(self, config: RuntimeConfig, registry: ExecutorRegistry) -> None:
        self.config = config
        self.registry = registry
        self.space: iox.IpcSpace | None = None
        self.ionode: Any = None
        self.zygote = ZygoteClient(config)
        self.pool = ProcessPool(self)
        self._inbox: EngineInbox | None = None
        self._start_lock = asyncio.Lock()
        self._swept = False

    @property
    def zygote_pid(self) -> int | None:
        return self.zygote.pid

    @property
    def live(self) -> set[int]:
        """Pids of this engine's node processes that have not exited."""
        return self.zygote.live

    async def ensure_started(self) -> None:
        async with self._start_lock:
            if self.zygote.started:
                self.zygote.check_alive()
                return
            await self.sweep()
            self.space = iox.IpcSpace.for_engine(self.config.ipc_root)
            self.ionode = self.space.node(f"engine{os.getpid()}")
            self._inbox = EngineInbox(self.ionode, self.space, self.inbox_slots, asyncio.get_running_loop())
            self.zygote.start(self.engine_space, self.registry.multiprocess_modules())
            self.pool.refill()

    async def sweep(self) -> None:
        """Remove what engines that died (kill -9, OOM) left in shared memory; once per engine."""
        if not self._swept:
            self._swept = True
            await asyncio.to_thread(iox.sweep_stale, self.config.ipc_root)

    @property
    def engine_space(self) -> EngineSpace:
        assert self.space is not None
        return EngineSpace(self.space.root, self.space.prefix, self.inbox_slots)

    @property
    def inbox_slots(self) -> int:
        # room for prewarmed processes being retired while the cap is reached
        return 2 * self.config.caps.max_total_processes + 8

    def take_slot(self, target: EventTarget) -> int:
        assert self._inbox is not None
        return self._inbox.take_slot(target)

    def free_slot(self, slot: int) -> None:
        if self._inbox is not None:
            self._inbox.free_slot(slot)

    async def spawn(self, args: ProcessArgs, child_sock: socket.socket) -> tuple[int, str | None]:
        """Have the zygote start a node process: (its pid, its inbox's name if already made)."""
        await self.ensure_started()
        return await self.zygote.spawn(args, child_sock, self.config.session.spawn_timeout_secs)

    async def exit_status(self, pid: int, wait_s: float) -> int | None:
        return await self.zygote.exit_status(pid, wait_s)

    def check_capacity(self, wanted: int) -> None:
        cap = self.config.caps.max_total_processes
        running = len(self.live) - len(self.pool.idle)  # idle prewarmed processes are there to be used
        if running + wanted > cap:
            raise ResourceLimitError(
                f"engine-wide process cap reached (max_total_processes = {cap}): {running} running, "
                f"{wanted} more requested",
                context={"field": "max_total_processes", "limit": cap},
            )

    async def prewarm(self) -> None:
        """Start the zygote and fill the pool now (rather than at the first session)."""
        await self.ensure_started()
        await self.pool.filled()

    def cleanup_dead(self) -> None:
        if self.ionode is not None:
            try:
                self.ionode.try_cleanup_dead_nodes()
            except Exception:  # pragma: no cover
                log.exception("iceoryx2 dead-node cleanup failed")

    def runner(self, ctx: RunnerContext, planned: PlannedNode) -> ProcessRunner:
        return ProcessRunner(self, ctx, planned)

    async def monitor_memory(self, session: Any) -> None:
        """Fail `session` when its node processes use more than its memory limit."""
        def pids() -> list[int]:
            return [r.pid for r in session.runners.values() if isinstance(r, ProcessRunner) and r.pid]

        await watch_memory(pids, session.settings, session.metrics)

    async def aclose(self) -> None:
        await self.pool.aclose()
        await self.zygote.aclose()
        if self._inbox is not None:
            self._inbox.close()
            self._inbox = None
        self.cleanup_dead()
        self.ionode = None
        if self.space is not None:
            self.space.remove()
            self.space = None


