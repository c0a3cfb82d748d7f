"""Prewarmed node processes: launched and through their handshake before
any session asks, so a session's node only waits for its own initialize().

Each is used by one session, then replaced in the background. The pool
stops refilling after three failures in a row (a broken environment must
not fork forever).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from ...errors import InternalError
from ...ipc import iox
from ...ipc.control import Hello
from .supervised import NodeProcess

if TYPE_CHECKING:
    from .manager import ProcessManager

log = logging.getLogger("engine.process")

#: failures in a row after which the pool stops refilling
_MAX_FAILURES = 3


class ProcessPool:
    def __init__(self, manager: ProcessManager) -> None:
        self.manager = manager
        self.idle: list[NodeProcess] = []  # prewarmed, never assigned
        self._filling: set[asyncio.Task] = set()
        self._retiring: set[asyncio.Task] = set()
        self._failures = 0
        self._closing = False

    async def filled(self) -> None:
        """Return once the processes being prewarmed now are ready (or failed)."""
        if self._filling:
            await asyncio.gather(*self._filling, return_exceptions=True)

    def zygote_started(self) -> None:
        """A (new) zygote runs: prewarm again, whatever the old one's death cost."""
        self._failures = 0
        self.refill()

    def take(self, capacity: int) -> NodeProcess | None:
        """A prewarmed process whose channels fit, or None (then the caller launches one)."""
        m = self.manager
        if capacity == m.config.session.channel_capacity:
            while self.idle:
                proc = self.idle.pop(0)
                if proc.alive:
                    proc.on_exit = None
                    asyncio.get_running_loop().call_soon(self.refill)
                    return proc
        elif self.idle and len(m.zygote.live) >= m.config.caps.max_total_processes:
            self.retire(self.idle.pop(0))  # make room under the cap for a process that fits
        return None

    def refill(self) -> None:
        m = self.manager
        if self._closing or self._failures >= _MAX_FAILURES:
            return
        want = m.config.prewarm_processes - len(self.idle) - len(self._filling)
        room = m.config.caps.max_total_processes - len(m.zygote.live) - len(self._filling)
        loop = asyncio.get_running_loop()
        for _ in range(min(want, room)):
            task = loop.create_task(self._fill_one(), name="prewarm")
            self._filling.add(task)
            task.add_done_callback(self._filling.discard)

    async def _fill_one(self) -> None:
        s = self.manager.config.session
        proc = NodeProcess(self.manager, iox.ChannelNames.for_prewarmed(os.urandom(6).hex()), s.channel_capacity)
        proc.on_exit = lambda: self._exited(proc)
        try:
            await proc.launch()
            msg = await proc.hello(asyncio.get_running_loop().time() + s.spawn_timeout_secs, None)
            if not isinstance(msg, Hello):
                raise InternalError(f"prewarmed process {proc.pid} failed to start: {msg!r}")
        except BaseException as exc:
            await dispose(proc)
            if not isinstance(exc, asyncio.CancelledError):
                self._failures += 1
                log.warning("could not prewarm a node process: %s", exc)
                return
            raise
        self._failures = 0
        self.idle.append(proc)

    def _exited(self, proc: NodeProcess) -> None:
        if proc in self.idle:
            self.idle.remove(proc)
            self._failures += 1
            log.warning("prewarmed node process %s exited", proc.pid)
            self.retire(proc)
            self.refill()

    def retire(self, proc: NodeProcess) -> None:
        task = asyncio.get_running_loop().create_task(dispose(proc), name="prewarm-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def aclose(self) -> None:
        self._closing = True
        for task in self._filling:
            task.cancel()
        await asyncio.gather(*self._filling, *self._retiring, return_exceptions=True)
        idle, self.idle = self.idle, []
        await asyncio.gather(*(dispose(p) for p in idle), return_exceptions=True)


async def dispose(proc: NodeProcess) -> None:
    """Stop a process that serves no session (1 s grace), reap it, release it."""
    try:
        await proc.stop(1.0)
        await proc.reaped()
    finally:
        proc.release()
