"""The engine's connection to its Ray cluster: a driver process (see
`driver`), started by the first session that needs the cluster and ended
`idle_disconnect_secs` after the last one ends.

Calls go to the driver over one Unix socket in the order they are made;
each call's items come back on a queue of its own. If the driver dies, every
open call fails with the cause, and the next session starts a new driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

from ...config import RaySettings
from . import wire

log = logging.getLogger("engine.ray")

#: seconds the driver is given to exit before it is killed
_EXIT_SECS = 10.0


class CallFailed(Exception):
    """A driver call failed: `cause` is actor_died, ray, driver or driver_gone."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.message = message


class Call:
    """The items of one call, as they arrive."""

    def __init__(self, cid: int) -> None:
        self.cid = cid
        self.queue: asyncio.Queue = asyncio.Queue()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._items()

    async def _items(self) -> AsyncIterator[Any]:
        while True:
            kind, *rest = await self.queue.get()
            if kind == "item":
                yield rest[0]
            elif kind == "done":
                return
            else:
                raise CallFailed(*rest)

    async def value(self) -> Any:
        """The one item of a plain call."""
        out = None
        async for item in self:
            out = item
        return out


class DriverProcess:
    """One driver process and the calls open on it."""

    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        self.proc: asyncio.subprocess.Process | None = None
        self._link: wire.Link | None = None
        self._calls: dict[int, Call] = {}
        self._ids = itertools.count(1)
        self._pump: asyncio.Task | None = None
        self.alive = False

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.executors.ray_cluster.driver", str(theirs.fileno()),
                self.settings.address, self.settings.namespace, pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL)
        finally:
            theirs.close()
        self._link = wire.Link(ours)
        try:
            async with asyncio.timeout(self.settings.connect_timeout_secs):
                first = await self._link.read()
        except (TimeoutError, ConnectionError) as exc:
            await self.stop()
            why = (f"no connection within connect_timeout_secs={self.settings.connect_timeout_secs:g}"
                   if isinstance(exc, TimeoutError) else f"the driver process exited ({self.proc.returncode})")
            raise ConnectionError(why) from None
        if first[0] != "ready":
            await self.stop()
            raise ConnectionError(first[1])
        self.alive = True
        self._pump = asyncio.get_running_loop().create_task(self._read(self._link))

    async def _read(self, link: wire.Link) -> None:
        try:
            while True:
                message = await link.read()
                call = self._calls.get(message[1])
                if call is not None:
                    if message[0] != "item":
                        del self._calls[message[1]]
                    call.queue.put_nowait((message[0], *message[2:]))
        except ConnectionError:
            pass
        self.alive = False
        code = await self.proc.wait() if self.proc is not None else None
        for call in self._calls.values():
            call.queue.put_nowait(("fail", "driver_gone", f"the engine's Ray driver process exited ({code})"))
        self._calls.clear()

    def call(self, op: str, *args: Any) -> Call:
        call = Call(next(self._ids))
        try:
            if not self.alive or self._link is None:
                raise ConnectionError
            self._link.send((op, call.cid, *args))
        except ConnectionError:
            call.queue.put_nowait(("fail", "driver_gone", "the engine's Ray driver process is not running"))
            return call
        self._calls[call.cid] = call
        return call

    async def drain(self) -> None:
        """Wait while much is queued for the driver (backpressure on large frames)."""
        if self._link is not None:
            await self._link.drain()

    async def stop(self) -> None:
        """Ask the driver to exit (it kills what actors are left), kill it if it does not."""
        self.alive = False
        if self._link is not None:
            with contextlib.suppress(ConnectionError):
                self._link.send(("exit",))
                await self._link.flush()
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), _EXIT_SECS)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._pump is not None:  # it ends at the driver's end of the socket
            try:
                await asyncio.wait_for(asyncio.shield(self._pump), _EXIT_SECS)
            except TimeoutError:
                self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        if self._link is not None:
            await self._link.close()


class Connection:
    """The cluster, held while some session needs it."""

    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        self._users = 0
        self._lock = asyncio.Lock()
        self._idle: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task | None = None
        self.driver: DriverProcess | None = None
        #: driver processes started (one per busy period, not per session)
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self.driver is not None and self.driver.alive

    async def acquire(self) -> DriverProcess:
        """Count one user and start the driver if none runs; ConnectionError if it cannot connect."""
        self._users += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            async with self._lock:
                if not self.connected:
                    if self.driver is not None:  # one that died: collect it
                        await self.driver.stop()
                    self.driver = DriverProcess(self.settings)
                    try:
                        await self.driver.start()
                    except BaseException:
                        self.driver = None
                        raise
                    self.connects += 1
                    log.info("connected to the Ray cluster at %s (namespace %s)", self.settings.address,
                             self.settings.namespace)
                return self.driver
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """One user fewer; the last one starts the idle timer."""
        self._users -= 1
        if self._users > 0 or self.driver is None:
            return
        if self.settings.idle_disconnect_secs <= 0:
            self._disconnect_soon()
        else:
            self._idle = asyncio.get_running_loop().call_later(self.settings.idle_disconnect_secs,
                                                                self._disconnect_soon)

    def _disconnect_soon(self) -> None:
        self._idle = None
        self._closing = asyncio.get_running_loop().create_task(self._disconnect())

    async def _disconnect(self) -> None:
        async with self._lock:
            if self._users > 0 or self.driver is None:
                return
            driver, self.driver = self.driver, None
            await driver.stop()
            log.info("disconnected from the Ray cluster (no session needs it)")

    async def aclose(self) -> None:
        """Disconnect now (the engine is closing)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._closing is not None:
            with contextlib.suppress(Exception):
                await self._closing
        self._users = 0
        await self._disconnect()
