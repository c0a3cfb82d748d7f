"""The process executor of one engine: its zygote, its iceoryx2 space and
inbox, the engine-wide process count and the prewarmed pool (generic, and
initialized per node: prewarm_nodes); it makes a
`ProcessRunner` for each node of a session that runs in its own process.

The zygote is supervised: when it dies (its socket ends) it is started
again at once, at most `zygote_restarts_per_minute` times in any minute.
`serving` says whether node processes can be started now (False from the
death until the new zygote answers, and for good once the restarts are
used up); `on_serving` hears each change (the server's health).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...config import RuntimeConfig
from ...errors import InternalError, ResourceLimitError
from ...ipc import iox
from ...ipc.endpoints import EngineSpace, ProcessArgs
from ...plan import PlannedNode
from ...registry import ExecutorRegistry
from .inbox import EngineInbox, EventTarget
from .memory import watch_memory
from .pool import ProcessPool
from .prewarm_nodes import resolve
from .runner import ProcessRunner
from .zygote_client import ZygoteClient, ZygoteGone

if TYPE_CHECKING:
    from ..base import RunnerContext

log = logging.getLogger("engine.process")

RESTART_WINDOW_S = 60.0


class ProcessManager:
    def __init__(self, config: RuntimeConfig, registry: ExecutorRegistry) -> None:
        self.config = config
        self.registry = registry
        self.space: iox.IpcSpace | None = None
        self.ionode: Any = None
        self.zygote = ZygoteClient(config)
        self.zygote.on_gone = self._zygote_gone
        self.pool = ProcessPool(self)
        self._inbox: EngineInbox | None = None
        self._start_lock = asyncio.Lock()
        self._swept = False
        self._restarts: list[float] = []  # monotonic times of the zygote's restarts
        #: set once the zygote died more often than allowed: every spawn fails with it
        self._broken: InternalError | None = None
        self._restart_task: asyncio.Task | None = None
        self._closing = False
        self.serving = True
        self.on_serving: Callable[[bool], None] | None = None

    @property
    def zygote_pid(self) -> int | None:
        return self.zygote.pid

    @property
    def live(self) -> set[int]:
        """Pids of this engine's node processes that have not exited."""
        return self.zygote.live

    async def ensure_started(self) -> None:
        """The zygote runs (started, or restarted after it died); a typed error if it cannot be."""
        async with self._start_lock:
            if self._broken is not None:
                raise InternalError(str(self._broken), context=dict(self._broken.context))
            if self.zygote.started:
                return
            if self._closing:
                raise InternalError("the engine is closing")
            if self.space is None:
                await self.sweep()
                self.space = iox.IpcSpace.for_engine(self.config.ipc_root)
                self.ionode = self.space.node(f"engine{os.getpid()}")
                self._inbox = EngineInbox(self.ionode, self.space, self.inbox_slots, asyncio.get_running_loop())
            else:
                self._count_restart()
                await self.zygote.reap_dead()
            self.zygote.start(self.engine_space, self.registry.multiprocess_modules())
            try:
                await self.zygote.ready(self.config.session.spawn_timeout_secs)
            except BaseException:
                await self.zygote.aclose()  # a zygote that does not answer is stopped, not waited on
                self.zygote.on_gone = self._zygote_gone
                raise
            self.pool.zygote_started()
            self._set_serving(True)

    def _count_restart(self) -> None:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        limit = self.config.zygote_restarts_per_minute
        if len(self._restarts) >= limit:
            self._broken = InternalError(
                f"the node-process zygote died {len(self._restarts) + 1} times within a minute "
                f"(zygote_restarts_per_minute = {limit}); no node process can start until the engine restarts",
                context={"field": "zygote_restarts_per_minute", "limit": limit})
            log.error("%s", self._broken)
            raise InternalError(str(self._broken), context=dict(self._broken.context))
        self._restarts.append(now)

    def _zygote_gone(self) -> None:
        if self._closing:
            return
        log.warning("the node-process zygote died; starting a new one")
        self._set_serving(False)
        if self._restart_task is None or self._restart_task.done():
            self._restart_task = asyncio.get_running_loop().create_task(self._restart(), name="zygote-restart")

    async def _restart(self) -> None:
        try:
            await self.ensure_started()
        except InternalError as exc:
            if self._broken is None:  # it did not answer: the next spawn tries again
                log.error("could not restart the node-process zygote: %s", exc)
        else:
            log.info("node-process zygote restarted (pid %s)", self.zygote.pid)

    def _set_serving(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            if self.on_serving is not None:
                self.on_serving(serving)

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
        """Have the zygote start a node process: (its pid, its inbox's name if already made).

        A zygote that dies before answering is restarted and asked once more
        (a session starting just then waits for the new one, rather than failing)."""
        await self.ensure_started()
        try:
            return await self.zygote.spawn(args, child_sock, self.config.session.spawn_timeout_secs)
        except ZygoteGone:
            await self.ensure_started()
            return await self.zygote.spawn(args, child_sock, self.config.session.spawn_timeout_secs)

    async def exit_status(self, pid: int, wait_s: float) -> int | None:
        return await self.zygote.exit_status(pid, wait_s)

    def check_capacity(self, wanted: int) -> None:
        cap = self.config.caps.max_total_processes
        running = len(self.live) - self.pool.idle_count  # idle prewarmed processes are there to be used
        if running + wanted > cap:
            raise ResourceLimitError(
                f"engine-wide process cap reached (max_total_processes = {cap}): {running} running, "
                f"{wanted} more requested",
                context={"field": "max_total_processes", "limit": cap},
            )

    async def prewarm(self) -> None:
        """Start the zygote and fill the pool now (rather than at the first session), the
        nodes to keep initialized included; a ValidationError, before any process starts,
        names the prewarm setting at fault."""
        self.pool.keep_initialized(resolve(self.config, self.registry))
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
        self._closing = True
        if self._restart_task is not None:
            self._restart_task.cancel()
            await asyncio.gather(self._restart_task, return_exceptions=True)
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


