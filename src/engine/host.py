"""The node host: the one piece of code that calls a node, wherever it runs.

The in-engine executor and the node process (and every executor after them)
drive a node through a `NodeHost`: it creates the node, calls its methods,
checks what it accepts and returns, stamps its outputs (sequence, source),
counts items and its busy time, and turns every failure into the same typed
error. So a node behaves, and fails, alike on every executor; the executors
differ only in how frames reach the host and where its outputs go.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import numpy as np

from .data import DataKind, RuntimeData
from .errors import EngineError, NodeExecutionError, TypeValidationError
from .executors.base import NodeStats
from .node import FrameMemory, Node
from .tracing import CallTiming
from .turns import TurnEvent, TurnLedger, turn_of

#: where a stamped output goes (the session, a channel)
Emit = Callable[[RuntimeData], Awaitable[None]]

_DONE = object()
#: results that iterate but are not outputs (a bare array, text)
_NOT_OUTPUTS = (np.ndarray, str, bytes)


class Deadline:
    """Bounds one call into the node; the node host arms it while the node
    works and disarms it while the node's outputs wait for their consumer.
    This one does nothing (the node process arms a real timer)."""

    def arm(self) -> None:
        pass

    def disarm(self) -> None:
        pass


NO_DEADLINE = Deadline()


async def _thread_iter(gen: Any):
    """Iterate a blocking sync generator without blocking the loop."""
    while True:
        item = await asyncio.to_thread(next, gen, _DONE)
        if item is _DONE:
            return
        yield item


def _returned(value: Any) -> str:
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(value, np.ndarray):
        return f"a bare {name} (shape {value.shape}, {value.dtype})"
    return f"{name}"


_EXPECTED = ("expected a RuntimeData (e.g. RuntimeData.audio(samples, sample_rate), "
             "RuntimeData.text(...), RuntimeData.tensor(...)), a list or generator of them, or None")


class NodeHost:
    """One node instance and the calls into it.

    `in_thread`: run sync methods in a worker thread (a blocking node on the
    engine's event loop). `deadline`: armed around the node's own work.
    """

    def __init__(self, node_id: str, cls: type[Node], params: dict[str, Any], *,
                 stats: NodeStats | None = None, turns: TurnLedger | None = None,
                 in_thread: bool = False, deadline: Deadline = NO_DEADLINE,
                 accepts: Iterable[DataKind] | None = None,
                 prepare: Callable[[Node], None] | None = None) -> None:
        self.node_id = node_id
        self.cls = cls
        self.params = params
        self.stats = stats if stats is not None else NodeStats()
        self.turns = turns if turns is not None else TurnLedger()
        self.in_thread = in_thread
        self.deadline = deadline
        #: called with the new node before its initialize() (an executor binds what it lends)
        self.prepare = prepare
        self.node: Node | None = None
        #: called with a tracing.CallTiming after each call, when the session is traced
        self.on_call: Callable[[CallTiming], None] | None = None
        self.where = "initialize"
        #: the sequence of the input being handled (a failure's context)
        self.sequence: int | None = None
        self.last_sequence: int | None = None
        # the kinds of frame the node takes, None = any (the plan's: a
        # manifest may narrow its class's)
        kinds = tuple(accepts or ())
        self._accepts = None if not kinds or DataKind.ANY in kinds else frozenset(kinds)

    # ------------------------------------------------------------ life

    async def start(self, progress: Callable[[str, float, str], None] | None = None,
                    memory: FrameMemory | None = None) -> Node:
        """Create the node and run its initialize()."""
        self.where = "initialize"
        try:
            node = self.cls(self.node_id, dict(self.params))
            node._progress = progress
            node._turns = self.turns
            if memory is not None:
                node._memory = memory
            if self.prepare is not None:
                self.prepare(node)
            await self._call(node.initialize)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._raise(exc, "initialize", None)
        self.node = node
        return node

    async def cleanup(self) -> None:
        node, self.node = self.node, None
        if node is not None:
            self.where = "cleanup"
            try:
                await self._call(node.cleanup)
            except Exception as exc:
                self._raise(exc, "cleanup", None)

    @property
    def handles_turn_events(self) -> bool:
        return self.node is not None and type(self.node).on_turn_event is not Node.on_turn_event

    # ------------------------------------------------------------ calls

    async def process(self, frame: RuntimeData, emit: Emit) -> None:
        """One input: counted, refused if the node does not accept its kind,
        dropped if its turn was voided while it waited."""
        self.stats.items_in += 1
        if self.turns.drops(frame):
            return
        if self._accepts is not None and frame.kind not in self._accepts:
            raise TypeValidationError(
                f"{self.cls.node_type or self.cls.__qualname__} accepts "
                f"{', '.join(sorted(k.name.lower() for k in self._accepts))}, "
                f"got a {frame.kind.name.lower()} frame", node_id=self.node_id,
                context={"field": "input_types", "sequence": frame.sequence})
        self.last_sequence = frame.sequence
        assert self.node is not None
        await self.call("process", self.node.process, frame, frame.sequence, emit)

    async def flush(self, emit: Emit) -> None:
        assert self.node is not None
        await self.call("flush", self.node.flush, None, self.last_sequence, emit)

    async def turn_event(self, event: TurnEvent, emit: Emit) -> None:
        if self.handles_turn_events:
            assert self.node is not None
            # not under the deadline: it runs beside a process() that has it
            await self.call("on_turn_event", self.node.on_turn_event, event, event.sequence, emit,
                            NO_DEADLINE)

    async def call(self, where: str, fn: Any, arg: Any, sequence: int | None, emit: Emit,
                   deadline: Deadline | None = None) -> None:
        """Call `fn(arg)` (or `fn()`), send each output through `emit`."""
        self.where, self.sequence = where, sequence
        deadline = deadline or self.deadline
        started = time.perf_counter()
        emitting = 0.0
        outputs_before = self.stats.items_out
        wall_start = time.time_ns() if self.on_call is not None else 0
        error = ""
        deadline.arm()
        try:
            args = () if arg is None else (arg,)
            result = await asyncio.to_thread(fn, *args) if self._to_thread(fn) else fn(*args)
            if result is None:
                return
            if inspect.isawaitable(result):
                result = await result
                if result is None:
                    return
            if isinstance(result, RuntimeData):  # the common case, without generator machinery
                outputs: Any = (result,)
            elif isinstance(result, _NOT_OUTPUTS) or not (
                    hasattr(result, "__aiter__") or isinstance(result, Iterable)):
                raise TypeValidationError(f"{where}() returned {_returned(result)}; {_EXPECTED}",
                                          node_id=self.node_id, context={"field": "outputs"})
            elif inspect.isgenerator(result) and self.in_thread:
                outputs = _thread_iter(result)
            else:
                outputs = result
            if hasattr(outputs, "__aiter__"):
                async for out in outputs:
                    emitting += await self._emit(where, out, arg, sequence, emit, deadline)
            else:
                for out in outputs:
                    emitting += await self._emit(where, out, arg, sequence, emit, deadline)
        except asyncio.CancelledError:
            error = "cancelled"
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._raise(exc, where, sequence)
        finally:
            deadline.disarm()
            # the node's own time: downstream work done while emitting is theirs
            self.stats.busy_s += time.perf_counter() - started - emitting
            if self.on_call is not None:
                turn = getattr(arg, "turn_id", "") if isinstance(arg, TurnEvent) else (
                    turn_of(arg) if isinstance(arg, RuntimeData) else "")
                self.on_call(CallTiming(where, sequence, wall_start, time.time_ns(),
                                        self.stats.items_out - outputs_before, turn, error))

    async def _call(self, fn: Any) -> Any:
        result = await asyncio.to_thread(fn) if self._to_thread(fn) else fn()
        if inspect.isawaitable(result):
            result = await result
        return result

    def _to_thread(self, fn: Any) -> bool:
        return self.in_thread and not inspect.iscoroutinefunction(fn) and not inspect.isasyncgenfunction(fn)

    async def _emit(self, where: str, out: Any, arg: Any, sequence: int | None, emit: Emit,
                    deadline: Deadline) -> float:
        if out is None:
            return 0.0
        if not isinstance(out, RuntimeData):
            raise TypeValidationError(f"{where}() emitted {_returned(out)}; {_EXPECTED}",
                                      node_id=self.node_id, context={"field": "outputs"})
        if out is arg:  # a pass-through: the input frame stays the caller's
            out = copy.copy(out)
        out.sequence = sequence
        out.source = self.node_id
        self.stats.items_out += 1
        deadline.disarm()  # waiting for the consumer is not the node's time
        t0 = time.perf_counter()
        try:
            await emit(out)
        finally:
            deadline.arm()
        return time.perf_counter() - t0

    # ------------------------------------------------------------ errors

    def _raise(self, exc: Exception, where: str, sequence: int | None) -> None:
        err = self.wrap(exc, where)
        err.context.setdefault("where", where)
        if sequence is not None:
            err.context.setdefault("sequence", sequence)
        if err is exc:
            raise err
        raise err from exc

    def wrap(self, exc: BaseException, where: str) -> EngineError:
        """The typed error for a failure in `where`: an EngineError the node
        raised stays what it is (with this node's id); anything else is a
        NodeExecutionError saying where and what."""
        if isinstance(exc, EngineError):
            if exc.node_id is None:
                exc.node_id = self.node_id
            if not exc.traceback_text:
                exc.traceback_text = "".join(traceback.format_exception(exc))
            return exc
        return NodeExecutionError(f"{where}() failed: {type(exc).__name__}: {exc}", node_id=self.node_id,
                                  traceback_text="".join(traceback.format_exception(exc)))
