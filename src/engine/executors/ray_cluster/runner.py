"""The session's side of a Ray-placed node: its actor, its calls, its faults.

Everything goes through the engine's Ray driver process (see `driver`,
`connection`). Start: the engine connects (once for all sessions), refuses at
once a reservation no live node of the cluster could ever hold
(RESOURCE_LIMIT naming the resource), creates the actor (never shared,
never restarted) and relays its init progress; an actor that is not placed
within `init_timeout_secs` (the cluster is full) is RESOURCE_LIMIT too.

Frames: each input is one call (a streaming-generator call for a node whose
process() is a generator, else a plain one answering all its outputs); at most
`channel_capacity` calls are in flight per actor (a push waits for room),
and one reader takes the calls' outputs in the order the inputs were sent,
waiting for the session's downstream room, so a slow consumer holds the
node up and nothing is dropped or reordered. End of stream is one more
call (flush) after the last input. What is copied: a frame is written to
the driver's socket from where it lies and read into one buffer there
(two copies, through the kernel), put into Ray's object store when over
Ray's inline limit (one copy) and read there in place by the actor; outputs
take the same way back.

Faults: a watch (the actor's heartbeat, a streaming call) turns its death
into this node's typed error at once when Ray knows of it (worker killed),
and after `heartbeat_timeout_secs` of silence when it does not yet (the
actor's machine gone: Ray confirms that only after its own health checks),
even between frames. Teardown asks the actor to run the node's cleanup() after a
clean end, then kills it (`ray.kill`) and waits until Ray reports it dead.
The driver owns the actors, so if the engine (and so its driver) dies, Ray
ends them too.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any

from ...data import RuntimeData
from ...errors import EngineError, NodeExecutionError, ResourceLimitError, rebuild_error
from ...node import Node
from ...turns import TurnEvent
from ..base import NodeRunner, NodeStats, Progress, RunnerContext
from . import actor_resources
from .connection import CallFailed, Connection, DriverProcess

if TYPE_CHECKING:
    from ...plan import PlannedNode

log = logging.getLogger("engine.ray")

#: seconds teardown waits for the actor's kill to be done
_KILL_WAIT_SECS = 10.0


def _describe(resources: dict[str, Any]) -> str:
    parts = [f"CPU {resources['num_cpus']:g}"]
    if resources.get("num_gpus"):
        parts.append(f"GPU {resources['num_gpus']:g}")
    if resources.get("memory"):
        parts.append(f"memory {resources['memory'] / 1024**3:.1f} GB")
    parts += [f"{k} {v:g}" for k, v in resources.get("resources", {}).items()]
    return ", ".join(parts)


class RayRunner(NodeRunner):
    """One node of one session, on its own actor of the Ray cluster."""

    def __init__(self, planned: PlannedNode, ctx: RunnerContext, connection: Connection) -> None:
        self.node_id = planned.id
        self.planned = planned
        self.ctx = ctx
        self.stats = NodeStats()
        self._conn = connection
        self.resources = actor_resources(planned.decl, connection.settings)
        self._driver: DriverProcess | None = None
        #: the actor's name on the driver: this session's, this node's
        self._actor = f"{ctx.id}/{planned.id}"
        self._created = False
        self._room = asyncio.Semaphore(ctx.settings.channel_capacity)
        #: (call, batched, holds a room) per call, in the order sent; None = the end
        self._calls: asyncio.Queue = asyncio.Queue()
        self._index = 0
        self._pending_ends = max(1, len(planned.upstream))
        cls = planned.spec.cls
        self._events = cls.on_turn_event is not Node.on_turn_event
        #: a generator's outputs stream as they come; any other node's come in one answer
        self._streams = {name: inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn)
                         for name in ("process", "flush") for fn in (getattr(cls, name),)}
        self._closing = False
        self._ended = False
        #: where the actor runs: ray_node_id, ip, pid
        self.placed: dict[str, Any] = {}

    # ------------------------------------------------------------ start

    async def start(self, progress: Progress) -> None:
        try:
            self._driver = await self._conn.acquire()
        except ConnectionError as exc:
            raise NodeExecutionError(f"cannot connect to the Ray cluster at {self._conn.settings.address!r}: {exc}",
                                     node_id=self.node_id,
                                     context={"field": "ray.address", "address": self._conn.settings.address}) from None
        try:
            shortfall = await self._driver.call("shortfall", self.resources).value()
            if shortfall:
                raise ResourceLimitError(f"no node of the Ray cluster has {shortfall}", node_id=self.node_id,
                                         context={"field": "capabilities", "requested": _describe(self.resources)})
            await self._start_actor(progress)
        except CallFailed as exc:
            raise self._call_error(exc) from None
        settings = self._conn.settings
        watch = self._driver.call("watch", self._actor, settings.heartbeat_secs, settings.heartbeat_timeout_secs)
        self.ctx.track(self._watch(watch), f"{self.node_id}:ray-watch")
        self.ctx.track(self._read_results(), f"{self.node_id}:ray-results")

    async def _start_actor(self, progress: Progress) -> None:
        decl, accepts = self.planned.decl, self.planned.accepted_kinds
        self._created = True
        start = self._driver.call("start", self._actor, self.planned.spec.cls, dict(decl.params),
                                  tuple(accepts) if accepts else None, self.resources,
                                  self.ctx.settings.process_timeout_secs)
        timeout = self.ctx.settings.init_timeout_secs
        try:
            async with asyncio.timeout(timeout):
                async for item in start:
                    if item[0] == "placed":
                        self.placed = item[1]
                        self.stats.extra.update(self._where())  # the session's metrics say where it ran
                        progress(self.node_id, "placed", 0.0, f"on Ray node {self.placed['ip']}")
                    elif item[0] == "progress":
                        progress(self.node_id, *item[1:])
                    elif item[0] == "error":
                        raise self._error(item[1])
        except TimeoutError:
            if not self.placed:
                raise ResourceLimitError(
                    f"the Ray cluster had no room for the node's actor ({_describe(self.resources)}) within "
                    f"init_timeout_secs={timeout:g}", node_id=self.node_id,
                    context={"field": "capabilities", "requested": _describe(self.resources)}) from None
            raise NodeExecutionError(f"initialize() did not finish within init_timeout_secs={timeout:g}s",
                                     node_id=self.node_id, context={"where": "initialize"}) from None

    # ------------------------------------------------------------ frames

    async def push(self, frame: RuntimeData) -> None:
        await self._room.acquire()
        self.stats.items_in += 1
        self._send("process", (self._index, frame), holds_room=True)
        await self._driver.drain()

    def _send(self, method: str, args: tuple, holds_room: bool) -> None:
        if self._streams[method]:
            call = self._driver.call("stream", self._actor, method, args)
        else:
            call = self._driver.call("value", self._actor, f"{method}_all", args)
        self._index += 1
        self._calls.put_nowait((call, not self._streams[method], holds_room))

    async def turn_event(self, event: TurnEvent) -> None:
        # a voiding event reaches every actor (its queued inputs of that turn are
        # dropped there); others only a node that reads them
        if self._driver is not None and not self._closing and (self._events or event.voids):
            call = self._driver.call("stream", self._actor, "turn_event", (event,))
            self.ctx.track(self._outputs(call), f"{self.node_id}:turn-event")

    async def end(self) -> None:
        self._pending_ends -= 1
        if self._pending_ends > 0:
            return
        self._send("flush", (self._index,), holds_room=False)
        self._calls.put_nowait(None)

    async def _read_results(self) -> None:
        while (entry := await self._calls.get()) is not None:
            call, batched, holds_room = entry
            try:
                await self._outputs(call, batched)
            finally:
                if holds_room:
                    self._room.release()
        self._ended = True
        await self.ctx.node_ended(self.node_id)

    async def _outputs(self, call: Any, batched: bool = False) -> None:
        """Route one call's outputs as they come (or its one list of them); raise its error."""
        try:
            if batched:
                for item in await call.value():
                    await self._output(*item)
            else:
                async for item in call:
                    await self._output(*item)
        except CallFailed as exc:
            raise self._call_error(exc) from None

    async def _output(self, kind: str, value: Any) -> None:
        if kind == "error":
            raise self._error(value)
        self.stats.items_out += 1
        await self.ctx.emit(self.node_id, value)

    async def _watch(self, call: Any) -> None:
        try:
            await call.value()
        except CallFailed as exc:
            if not self._closing:
                raise self._call_error(exc) from None

    # ------------------------------------------------------------ errors

    def _error(self, item: dict[str, Any]) -> EngineError:
        context = {**item["context"], **self._where()}
        return rebuild_error(item["class"], item["type"], item["message"], node_id=self.node_id,
                             context=context, traceback_text=item["traceback"])

    def _call_error(self, exc: CallFailed) -> EngineError:
        if exc.cause == "actor_died":
            where = f" on Ray node {self.placed['ip']}" if self.placed else ""
            message = f"the node's Ray actor died{where}: {exc.message}"
        elif exc.cause == "driver_gone":
            message = exc.message
        else:
            message = f"Ray failed the node's call: {exc.message}"
        return NodeExecutionError(message, node_id=self.node_id, context={"cause": exc.cause, **self._where()})

    def _where(self) -> dict[str, Any]:
        return {k if k.startswith("ray_") else f"ray_{k}": v for k, v in self.placed.items()}

    # ------------------------------------------------------------ teardown

    async def aclose(self) -> None:
        self._closing = True
        driver, self._driver = self._driver, None
        if driver is not None and self._created and driver.alive:
            if self._ended:  # a clean end: the node's cleanup() runs, bounded
                try:
                    done = await asyncio.wait_for(driver.call("value", self._actor, "close", ()).value(),
                                                  self._conn.settings.cleanup_timeout_secs)
                    self.stats.busy_s, self.stats.cpu_s = done["busy_s"], done["cpu_s"]
                    if done["cleanup_error"]:
                        log.error("cleanup() of node %s failed: %s", self.node_id, done["cleanup_error"],
                                  extra={"session_id": self.ctx.id, "node_id": self.node_id})
                except (TimeoutError, CallFailed):
                    pass
            try:  # the driver kills it and answers once Ray reports it dead
                await asyncio.wait_for(driver.call("kill", self._actor).value(), _KILL_WAIT_SECS)
            except (TimeoutError, CallFailed) as exc:
                log.warning("the Ray actor of node %s may outlive its session: %r", self.node_id, exc,
                            extra={"session_id": self.ctx.id, "node_id": self.node_id})
        if driver is not None:
            self._conn.release()
