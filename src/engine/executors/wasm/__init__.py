"""The WASM executor: nodes that are sandboxed WebAssembly plugins.

A `WasmNode` runs an Extism plugin (any Extism PDK builds one: Rust, C, Go,
Zig, AssemblyScript...) inside the engine's process, in a sandbox: no
files, no network, no access to the engine's memory, each call stopped at
its time limit and each instance held to its memory limit. Modules are
compiled once per engine (by content hash) and instantiated per session;
calls run on the executor's own threads, so a plugin that spins never holds
up the event loop.

The node is driven by the one node host, as on the other executors (the
runner is the native one with a queue in front, see .runner), bound to this
executor's modules and threads.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import TYPE_CHECKING

from ...config import WasmSettings
from ...errors import Issue
from .modules import ModuleStore
from .node import WasmNode
from .runner import WasmRunner

if TYPE_CHECKING:
    from ...manifest import Manifest
    from ...plan import PlannedNode
    from ..base import RunnerContext

__all__ = ["WasmExecutor", "WasmNode"]


class WasmExecutor:
    """One engine's WASM modules and the threads that call them."""

    def __init__(self, settings: WasmSettings) -> None:
        self.modules = ModuleStore(settings)
        self._threads = settings.threads or os.cpu_count() or 1
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def check(self, manifest: Manifest) -> list[Issue]:
        """Validation of the manifest's WASM nodes (module, caps, export)."""
        issues: list[Issue] = []
        for decl in manifest.nodes:
            if decl.node_type == WasmNode.node_type:
                issues += self.modules.check(decl.id, f"$.nodes[{decl.index}]", decl.params)
        return issues

    def runner(self, planned: PlannedNode, ctx: RunnerContext) -> WasmRunner:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="wasm")
        return WasmRunner(planned, ctx, self.modules, self._pool)

    def close(self) -> None:
        """After the engine's sessions are gone: the threads end, the compiled modules go."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.modules.clear()
