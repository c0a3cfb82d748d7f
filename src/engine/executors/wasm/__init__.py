"""The WASM executor: nodes that are sandboxed WebAssembly plugins.

A `WasmNode` runs an Extism plugin (any Extism PDK builds one: Rust, C, Go,
Zig, AssemblyScript...) inside the engine's process, in a sandbox: no
files, no network, no access to the engine's memory, each call stopped at
its time limit and each instance held to its memory limit. Modules are
compiled once per engine (by content hash) and instantiated per session;
each node's calls run on a thread of its own, so a plugin that spins holds up
neither the event loop nor any other node.

The node is driven by the one node host, as on the other executors (the
runner is the native one with a queue in front, see .runner), bound to this
executor's modules.
"""

from __future__ import annotations

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
    """One engine's WASM modules."""

    def __init__(self, settings: WasmSettings) -> None:
        self.modules = ModuleStore(settings)

    def check(self, manifest: Manifest) -> list[Issue]:
        """Validation of the manifest's WASM nodes (module, caps, export)."""
        issues: list[Issue] = []
        for decl in manifest.nodes:
            if decl.node_type == WasmNode.node_type and not decl.host:
                issues += self.modules.check(decl.id, f"$.nodes[{decl.index}]", decl.params)
        return issues

    def runner(self, planned: PlannedNode, ctx: RunnerContext) -> WasmRunner:
        return WasmRunner(planned, ctx, self.modules)

    def close(self) -> None:
        """After the engine's sessions are gone: the compiled modules go."""
        self.modules.clear()
