"""Prewarmed node processes: made before any session asks, each used by one
session only, then replaced in the background.

Two kinds, each on a shelf of its own. Generic ones (`prewarm_processes`)
are launched and through their handshake, so a session's node only waits
for its own initialize(). Initialized ones (`[[prewarm_nodes]]`,
`prewarm_manifest`; see prewarm_nodes) are also assigned one node and
through its initialize(), then parked after Ready: a session's node whose
Assign would be the same (warm_key) binds one (control.Bind) and goes
straight on. Their models load in the node process, never in the zygote:
CTranslate2 and llama.cpp hang after a fork once their threads started.

A shelf stops refilling after three failures in a row (a broken environment
or a model that does not load must not fork forever); a new zygote starts
the count again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from ...errors import InternalError
from ...ipc import iox
from ...ipc.control import BOUND_LATER, Assign, Failure, Hello, Progress, Ready
from ...ipc.logs import LogBatch, NodeLog, engine_level
from .supervised import NodeProcess, describe_status

if TYPE_CHECKING:
    from .manager import ProcessManager
    from .prewarm_nodes import WarmNode

log = logging.getLogger("engine.process")

#: failures in a row after which a shelf stops refilling
_MAX_FAILURES = 3

#: what an initialized process was made for (see warm_key)
WarmKey = tuple[Any, ...]


def warm_key(assign: Assign, capacity: int) -> WarmKey:
    """Everything a node initialized ahead could depend on: its Assign but the
    fields a session binds later, and its channels' capacity. A field added
    to Assign is part of it unless named in BOUND_LATER. Params compare as
    canonical JSON, so 6 and 6.0 differ (initialize() might tell them apart)."""
    return (capacity, *(_canonical(getattr(assign, f.name)) for f in fields(Assign) if f.name not in BOUND_LATER))


def _canonical(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=repr) if isinstance(value, dict) else value


@dataclass(eq=False)
class Shelf:
    """`want` prewarmed processes of one kind, idle or being made."""

    want: int
    capacity: int
    #: what each is assigned and initialized with ahead; None = generic (assigned by its session)
    assign: Assign | None = None
    init_timeout_secs: float = 0.0
    idle: list[NodeProcess] = field(default_factory=list)
    filling: set[asyncio.Task] = field(default_factory=set)
    failures: int = 0

    @property
    def what(self) -> str:
        a = self.assign
        return "a node process" if a is None else f"{a.node_type} {a.params}"


class ProcessPool:
    def __init__(self, manager: ProcessManager) -> None:
        self.manager = manager
        c = manager.config
        #: None: the generic shelf; else one per warm_key
        self.shelves: dict[WarmKey | None, Shelf] = {None: Shelf(c.prewarm_processes, c.session.channel_capacity)}
        self._filling: set[asyncio.Task] = set()
        self._retiring: set[asyncio.Task] = set()
        self._closing = False

    @property
    def idle(self) -> list[NodeProcess]:
        """The generic prewarmed processes, never assigned."""
        return self.shelves[None].idle

    @property
    def idle_count(self) -> int:
        """Idle prewarmed processes of every kind: there to be used (or stopped to make room)."""
        return sum(len(s.idle) for s in self.shelves.values())

    def keep_initialized(self, nodes: Iterable[WarmNode]) -> None:
        """Keep these nodes initialized ahead (equal ones add up); called again, it replaces the counts."""
        wanted: dict[WarmKey, Shelf] = {}
        for n in nodes:
            key = warm_key(n.assign, n.capacity)
            if key in wanted:
                wanted[key].want += n.count
            else:
                wanted[key] = Shelf(n.count, n.capacity, n.assign, n.init_timeout_secs)
        for key, shelf in list(self.shelves.items()):
            if key is not None and key not in wanted:
                shelf.want = 0
        for key, shelf in wanted.items():
            if key in self.shelves:
                self.shelves[key].want = shelf.want
            else:
                self.shelves[key] = shelf

    async def filled(self) -> None:
        """Return once no process is being prewarmed (each ready, or failed for good)."""
        while self._filling:
            await asyncio.gather(*self._filling, return_exceptions=True)

    def zygote_started(self) -> None:
        """A (new) zygote runs: prewarm again, whatever the old one's death cost."""
        for shelf in self.shelves.values():
            shelf.failures = 0
        self.refill()

    def take(self, capacity: int) -> NodeProcess | None:
        """A generic prewarmed process whose channels fit, or None."""
        shelf = self.shelves[None]
        return self._take(shelf) if capacity == shelf.capacity else None

    def take_initialized(self, key: WarmKey) -> NodeProcess | None:
        """A process whose node was initialized ahead as `key` says, or None."""
        shelf = self.shelves.get(key)
        return self._take(shelf) if shelf is not None and shelf.assign is not None else None

    def _take(self, shelf: Shelf) -> NodeProcess | None:
        while shelf.idle:
            proc = shelf.idle.pop(0)
            if proc.alive:
                proc.on_exit = None
                asyncio.get_running_loop().call_soon(self.refill)
                return proc
            self.retire(proc)
        return None

    def make_room(self) -> bool:
        """At the process cap, stop one idle process (generic first) so a session's own one fits;
        True if one was (refill() once that session's process is gone)."""
        m = self.manager
        if len(m.zygote.live) < m.config.caps.max_total_processes:
            return False
        for shelf in self.shelves.values():
            if shelf.idle:
                self.retire(shelf.idle.pop(0))
                return True
        return False

    def refill(self) -> None:
        m = self.manager
        if self._closing:
            return
        room = m.config.caps.max_total_processes - len(m.zygote.live) - len(self._filling)
        for shelf in self.shelves.values():
            if shelf.failures >= _MAX_FAILURES:
                continue
            n = max(0, min(shelf.want - len(shelf.idle) - len(shelf.filling), room))
            for _ in range(n):
                self._start_filling(shelf)
            room -= n

    def _start_filling(self, shelf: Shelf) -> None:
        task = asyncio.get_running_loop().create_task(self._fill_one(shelf), name="prewarm")
        self._filling.add(task)
        shelf.filling.add(task)
        task.add_done_callback(lambda t: self._filled_one(shelf, t))

    def _filled_one(self, shelf: Shelf, task: asyncio.Task) -> None:
        self._filling.discard(task)
        shelf.filling.discard(task)
        # a failure is tried again (up to the limit); and the room counted
        # for a process being made was counted twice while it was alive
        self.refill()

    async def _fill_one(self, shelf: Shelf) -> None:
        proc = NodeProcess(self.manager, iox.ChannelNames.for_prewarmed(os.urandom(6).hex()), shelf.capacity)
        proc.on_exit = lambda: self._exited(shelf, proc)
        try:
            await self._make_ready(proc, shelf)
        except BaseException as exc:
            await dispose(proc)
            if not isinstance(exc, asyncio.CancelledError):
                self._failed(shelf, exc)
                return
            raise
        shelf.failures = 0
        shelf.idle.append(proc)

    def _failed(self, shelf: Shelf, exc: BaseException) -> None:
        shelf.failures += 1
        log.warning("could not prewarm %s: %s", shelf.what, exc)
        if shelf.failures >= _MAX_FAILURES:
            log.warning("stopped prewarming %s after %d failures in a row", shelf.what, shelf.failures)

    async def _make_ready(self, proc: NodeProcess, shelf: Shelf) -> None:
        """Launch `proc` up to its Hello and, on an initialized shelf, through its node's initialize()."""
        loop = asyncio.get_running_loop()
        await proc.launch()
        if shelf.assign is not None:  # read by the process right after its Hello: no extra round trip
            assert proc.ctrl is not None
            proc.ctrl.send(replace(shelf.assign, log_level=engine_level()))
        msg = await proc.hello(loop.time() + self.manager.config.session.spawn_timeout_secs, None)
        if not isinstance(msg, Hello):
            raise InternalError(f"process {proc.pid} failed to start: {await self._said(proc, msg)}")
        if shelf.assign is not None:
            await self._initialized(proc, shelf)

    async def _initialized(self, proc: NodeProcess, shelf: Shelf) -> None:
        """Read `proc`'s control lane up to its Ready; what it logs meanwhile belongs to no session yet."""
        assert shelf.assign is not None
        logs = NodeLog("-", shelf.assign.node_id, shelf.assign.node_type)
        limit = shelf.init_timeout_secs
        deadline = asyncio.get_running_loop().time() + limit
        while True:
            msg = await proc.recv(deadline, "initialize()", "init_timeout_secs", limit, None)
            if isinstance(msg, Ready):
                return
            if isinstance(msg, LogBatch):
                logs.handle(msg)
            elif not isinstance(msg, Progress):
                raise InternalError(f"initialize() in process {proc.pid} failed: {await self._said(proc, msg)}")

    async def _said(self, proc: NodeProcess, msg: Any) -> str:
        if isinstance(msg, Failure):
            return f"{msg.error_class or msg.error_type}: {msg.message}"
        if msg is None and proc.pid is not None:
            return describe_status(await self.manager.exit_status(proc.pid, 1.0))
        return repr(msg)

    def _exited(self, shelf: Shelf, proc: NodeProcess) -> None:
        if proc in shelf.idle:
            shelf.idle.remove(proc)
            shelf.failures += 1
            log.warning("prewarmed process %s (%s) exited; starting another", proc.pid, shelf.what)
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
        idle = [p for shelf in self.shelves.values() for p in shelf.idle]
        for shelf in self.shelves.values():
            shelf.idle.clear()
        await asyncio.gather(*(dispose(p) for p in idle), *self._retiring, return_exceptions=True)


async def dispose(proc: NodeProcess) -> None:
    """Stop a process that serves no session (1 s grace), reap it, release it."""
    try:
        await proc.stop(1.0)
        await proc.reaped()
    finally:
        proc.release()
