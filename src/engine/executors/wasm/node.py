"""WasmNode: a sandboxed WebAssembly plugin (the Extism plugin ABI) run on every frame.

Per frame the plugin's export `function` gets the payload bytes and returns
the new payload (see .payload for each kind). The instance is this node's
alone (its memory lives as long as the session), so a plugin keeps state
across frames. Calls run on a thread of the node's own, never on the event
loop; Extism stops a call at `timeout_ms` and a memory over `max_memory_mb`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, ClassVar

from ...data import DataKind, RuntimeData
from ...errors import EngineError, NodeExecutionError, ResourceLimitError
from ...node import Node
from .modules import Limits, ModuleError, ModuleStore
from .payload import from_bytes, to_bytes

_PAYLOAD_KINDS = (DataKind.AUDIO, DataKind.VIDEO, DataKind.TENSOR, DataKind.JSON, DataKind.TEXT,
                  DataKind.BINARY)


class WasmNode(Node):
    """Runs a sandboxed WebAssembly (Extism) plugin on every frame."""

    node_type = "WasmNode"
    executor_overridable = False
    input_types = _PAYLOAD_KINDS
    output_types = _PAYLOAD_KINDS
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "module": {"type": "string", "minLength": 1,
                       "description": "a file name in the operator's [wasm] modules_dir"},
            "module_base64": {"type": "string", "minLength": 1,
                              "description": "the module itself (only where [wasm] allow_inline = true)"},
            "function": {"type": "string", "minLength": 1, "default": "process",
                         "description": "the export called for every frame"},
            "config": {"type": "object", "additionalProperties": {"type": "string"}, "default": {},
                       "description": "handed to the plugin as its Extism config"},
            "timeout_ms": {"type": "integer", "minimum": 1,
                           "description": "one call's time limit (default and cap: [wasm])"},
            "max_memory_mb": {"type": "integer", "minimum": 1,
                              "description": "the instance's memory limit (default and cap: [wasm])"},
            "output_type": {"enum": [k.name.lower() for k in _PAYLOAD_KINDS],
                            "description": "the kind of frame the plugin returns (default: the input's)"},
        },
        "additionalProperties": False,
    }

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._store: ModuleStore | None = None
        self._thread: concurrent.futures.Executor | None = None
        self._plugin: Any = None
        self._cancel: Any = None
        self._limits: Limits | None = None
        self._inflight: concurrent.futures.Future | None = None
        self._closing = False
        output = params.get("output_type")
        self._output = DataKind.parse(output) if output else None
        self._function = params.get("function", "process")

    def bind(self, store: ModuleStore, thread: concurrent.futures.Executor) -> None:
        """The WASM executor's modules and the node's own thread (before initialize)."""
        self._store, self._thread = store, thread

    async def initialize(self) -> None:
        store = self._store
        if store is None:
            raise NodeExecutionError("WasmNode runs only on the wasm executor", node_id=self.node_id)
        self.report_progress("loading", 0.0, self.params.get("module") or "inline module")
        try:
            await self._instantiate(store)
        except BaseException:
            self._release()  # the host calls no cleanup() after a failed initialize()
            raise

    async def _instantiate(self, store: ModuleStore) -> None:
        try:
            self._limits = store.limits(self.params)
            source = await self._run(store.source, self.params)
            compiled = await self._run(store.compiled, source, self._limits)
            self._plugin = await self._run(store.instantiate, compiled, self.params.get("config") or {})
        except ModuleError as exc:
            raise NodeExecutionError(exc.message, node_id=self.node_id,
                                     context={"field": exc.field}) from None
        self._cancel = self._plugin.cancel_handle()
        if not self._plugin.function_exists(self._function):
            raise NodeExecutionError(f"{source.label} exports no function {self._function!r}",
                                     node_id=self.node_id, context={"field": "function"})
        self.report_progress("ready", 100.0, source.label)

    async def process(self, frame: RuntimeData) -> RuntimeData | None:
        out = await self._run(self._call, to_bytes(frame))
        return from_bytes(out, self._output or frame.kind, frame, self.node_id)

    async def cleanup(self) -> None:
        self._closing = True
        await self.settle()
        self._release()

    async def settle(self) -> None:
        """Stop a call still running on the node's thread (a torn-down session) and wait for it."""
        self._closing = True
        inflight, self._inflight = self._inflight, None
        if inflight is None or inflight.done() or inflight.cancel():
            return
        if self._cancel is not None:
            self._cancel.cancel()
        waiter = asyncio.wrap_future(inflight)
        await asyncio.wait([waiter])
        if not waiter.cancelled():
            waiter.exception()  # the stopped call's error is this teardown's, not news

    def _release(self) -> None:
        plugin, self._plugin = self._plugin, None
        if plugin is not None:
            plugin.__del__()  # its memory goes now, not at some later collection

    # ------------------------------------------------------------ calls

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._thread is not None
        self._inflight = self._thread.submit(fn, *args)
        return await asyncio.wrap_future(self._inflight)

    def _call(self, payload: bytes) -> bytes:
        """One plugin call (on the node's thread; the GIL is released inside)."""
        import extism.extism as ex

        if self._plugin is None:
            raise NodeExecutionError("the plugin instance was released", node_id=self.node_id)
        try:
            return self._plugin.call(self._function, payload)
        except ex.Error as exc:
            message = str(exc)
        # raised outside the handler: the error keeps no frame that holds the
        # instance (and through it the compiled module) alive
        raise self._plugin_error(message)

    def _plugin_error(self, message: str) -> EngineError:
        limits = self._limits
        assert limits is not None
        name = self._function
        if message == "timeout":
            if self._closing:
                return NodeExecutionError(f"{name}() stopped: the session closed", node_id=self.node_id,
                                          context={"cause": "cancelled"})
            return NodeExecutionError(
                f"plugin {name}() ran past timeout_ms={limits.timeout_ms} and was stopped",
                node_id=self.node_id,
                context={"cause": "timeout", "field": "timeout_ms", "limit": limits.timeout_ms})
        if message == "oom":
            return ResourceLimitError(
                f"plugin {name}() needed more memory than max_memory_mb={limits.max_memory_mb}",
                node_id=self.node_id,
                context={"cause": "memory", "field": "max_memory_mb", "limit": limits.max_memory_mb})
        if "wasm backtrace" in message or "wasm trap" in message:
            return NodeExecutionError(f"plugin {name}() trapped: {' '.join(message.split())}",
                                      node_id=self.node_id, context={"cause": "trap"})
        return NodeExecutionError(f"plugin {name}() failed: {message}", node_id=self.node_id,
                                  context={"cause": "plugin_error"})
