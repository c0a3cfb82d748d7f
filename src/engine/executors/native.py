"""Native executor: the node runs in the engine's event loop.

Sync process()/flush() of a node that declares `blocking = True` (every node
that normally runs in its own process) is moved to a worker thread, so the
loop never blocks. Calls into one node are serialized by a lock (fan-in may
push from several tasks).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import time
import traceback
from typing import Any

from ..data import RuntimeData
from ..errors import EngineError, NodeExecutionError, TypeValidationError
from ..node import Node, iterate_outputs
from ..plan import PlannedNode
from ..turns import TurnEvent, TurnLedger
from .base import Emit, Ended, NodeRunner, NodeStats, Progress, Spawn

log = logging.getLogger("engine.native")

_DONE = object()


async def _thread_iter(gen: Any):
    """Iterate a blocking sync generator without blocking the loop."""
    while True:
        item = await asyncio.to_thread(next, gen, _DONE)
        if item is _DONE:
            return
        yield item


class NativeRunner(NodeRunner):
    def __init__(self, planned: PlannedNode, emit: Emit, ended: Ended, session_id: str,
                 turns: TurnLedger | None = None, spawn: Spawn | None = None) -> None:
        self.node_id = planned.id
        self._turns = turns if turns is not None else TurnLedger()
        self._spawn = spawn
        self._event_tasks: set[asyncio.Task] = set()
        self.planned = planned
        self._emit = emit
        self._ended = ended
        self._session_id = session_id
        self._pending_ends = max(1, len(planned.upstream))
        self._lock = asyncio.Lock()
        self._node: Node | None = None
        self._blocking = planned.spec.cls.blocking
        self._last_sequence: int | None = None
        self.stats = NodeStats()

    async def start(self, progress: Progress) -> None:
        spec = self.planned.spec
        try:
            node = spec.cls(self.node_id, dict(self.planned.decl.params))
            node._progress = lambda phase, pct, msg: progress(self.node_id, phase, pct, msg)
            node._turns = self._turns  # the session's: voided as the event is delivered
            await self._call(node.initialize)
        except EngineError as exc:
            exc.node_id = exc.node_id or self.node_id
            raise
        except Exception as exc:
            raise self._wrap(exc, "initialize") from exc
        self._node = node

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._blocking and not inspect.iscoroutinefunction(fn):
            result = await asyncio.to_thread(fn, *args)
        else:
            result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _wrap(self, exc: BaseException, where: str) -> EngineError:
        tb = "".join(traceback.format_exception(exc))
        if isinstance(exc, TypeValidationError):
            exc.node_id = exc.node_id or self.node_id
            return exc
        return NodeExecutionError(f"{where}() failed: {type(exc).__name__}: {exc}",
                                  node_id=self.node_id, traceback_text=tb)

    async def _run(self, fn: Any, frame: RuntimeData | TurnEvent | None, sequence: int | None,
                   where: str = "") -> None:
        assert self._node is not None
        started = time.perf_counter()
        emitting = 0.0
        try:
            result = await (self._call(fn, frame) if frame is not None else self._call(fn))
            if inspect.isgenerator(result) and self._blocking:
                result = _thread_iter(result)
            async for out in iterate_outputs(result):
                if not isinstance(out, RuntimeData):
                    raise TypeError(f"emitted {type(out).__name__}, expected RuntimeData")
                if out is frame:
                    out = copy.copy(out)
                out.sequence = sequence
                out.source = self.node_id
                self.stats.items_out += 1
                t_emit = time.perf_counter()
                await self._emit(self.node_id, out)
                emitting += time.perf_counter() - t_emit
        except EngineError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._wrap(exc, where or ("process" if frame is not None else "flush")) from exc
        finally:
            # the node's own time: downstream work done while emitting is theirs
            busy = time.perf_counter() - started - emitting
            self.stats.busy_s += busy
            self.stats.cpu_s += busy

    async def push(self, frame: RuntimeData) -> None:
        async with self._lock:
            self.stats.items_in += 1
            if self._turns.drops(frame):  # its turn was voided while it waited for the lock
                return
            self._last_sequence = frame.sequence
            await self._run(self._node.process, frame, frame.sequence)  # type: ignore[union-attr]

    async def turn_event(self, event: TurnEvent) -> None:
        # In a task of its own, not in the sender's call: the sender may be
        # this node's own downstream, waiting inside its process() for us
        # (the event going upstream), which would wait for it in turn.
        node = self._node
        if node is None or type(node).on_turn_event is Node.on_turn_event:
            return
        coro = self._on_turn_event(node, event)
        task = self._spawn(coro, f"{self.node_id}:turn-event") if self._spawn is not None \
            else asyncio.get_running_loop().create_task(coro)
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)

    async def _on_turn_event(self, node: Node, event: TurnEvent) -> None:
        if self._blocking:  # its process() may be running in a thread: wait for it
            async with self._lock:
                await self._run(node.on_turn_event, event, event.sequence, "on_turn_event")
        else:  # alongside a process() that is waiting, as in a node process
            await self._run(node.on_turn_event, event, event.sequence, "on_turn_event")

    async def end(self) -> None:
        self._pending_ends -= 1
        if self._pending_ends > 0:
            return
        while self._event_tasks:  # events handed over before the end are handled before the flush
            await asyncio.gather(*self._event_tasks, return_exceptions=True)
        async with self._lock:
            await self._run(self._node.flush, None, self._last_sequence)  # type: ignore[union-attr]
        await self._ended(self.node_id)

    async def aclose(self) -> None:
        node, self._node = self._node, None
        if node is None:
            return
        try:
            await self._call(node.cleanup)
        except Exception:
            log.exception("cleanup() of node %s failed", self.node_id,
                          extra={"session_id": self._session_id, "node_id": self.node_id})
