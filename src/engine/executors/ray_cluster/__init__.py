"""The Ray executor: manifest nodes placed on a Ray cluster by their `capabilities`.

A node goes to the cluster named by `[ray] address` when it asks for it
(`"executor": "ray"`), or, with `place_by_capabilities = true`, when it is a
process node whose `capabilities` this machine cannot meet (a GPU it does not
have, more cores or memory than it has). There it runs as one Ray actor per
node and session, never shared, reserving what its capabilities say
(`num_gpus`, `num_cpus`, `memory`), and calls the node through the one node
host, as a node process does.

This module decides placement and never imports Ray; `runner` (the session's
side) and `actor` (the cluster's side) do, and only once a session needs
the cluster.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from ...config import RaySettings
from ...errors import Issue

if TYPE_CHECKING:
    from ...manifest import Manifest, NodeDecl
    from ...plan import PlannedNode
    from ...registry import ExecutorRegistry, NodeTypeSpec
    from ..base import RunnerContext
    from .runner import RayRunner


@dataclass(frozen=True)
class Machine:
    """What this machine offers a node: cores, memory, GPU kinds."""

    cpus: int
    memory_gb: float
    gpu_types: frozenset[str]

    @staticmethod
    @functools.cache
    def this() -> Machine:
        gpus = set()
        if glob.glob("/dev/nvidia[0-9]*"):
            gpus.add("cuda")
        if os.path.exists("/dev/kfd"):
            gpus.add("rocm")
        if glob.glob("/dev/dri/renderD*"):
            gpus.add("vulkan")
        if sys.platform == "darwin":
            gpus.add("metal")
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return Machine(cpus, psutil.virtual_memory().total / 1024**3, frozenset(gpus))

    def lacks(self, capabilities: Any) -> str:
        """What of `capabilities` this machine cannot meet ("" = nothing)."""
        gpu = capabilities.get("gpu")
        if isinstance(gpu, dict) and gpu.get("required", True):
            kind = gpu.get("type", "any")
            if not (self.gpu_types if kind == "any" else kind in self.gpu_types):
                return f"needs a {kind} GPU; this machine has none" if kind != "any" else \
                    "needs a GPU; this machine has none"
        cores = (capabilities.get("cpu") or {}).get("cores")
        if cores and cores > self.cpus:
            return f"needs {cores} CPU cores; this machine has {self.cpus}"
        memory = capabilities.get("memory_gb")
        if memory and memory > self.memory_gb:
            return f"needs {memory:g} GB of memory; this machine has {self.memory_gb:.1f}"
        return ""


def placement(decl: NodeDecl, spec: NodeTypeSpec, settings: RaySettings, machine: Machine | None = None) -> str:
    """Why `decl` runs on the Ray cluster ("" = it does not)."""
    if decl.host:
        return ""
    if decl.executor == "ray":
        return 'executor "ray"'
    if not settings.place_by_capabilities or spec.resolve_executor(decl.executor) != "multiprocess":
        return ""
    return (machine or Machine.this()).lacks(decl.capabilities)


def placements(manifest: Manifest, registry: ExecutorRegistry, settings: RaySettings) -> dict[str, str]:
    """node id → why it runs on the Ray cluster, for the nodes that do."""
    out = {}
    for decl in manifest.nodes:
        spec = registry.get(decl.node_type)
        if spec is not None and (why := placement(decl, spec, settings)):
            out[decl.id] = why
    return out


def check(manifest: Manifest, registry: ExecutorRegistry, settings: RaySettings) -> list[Issue]:
    """Validation: a node that must run on Ray needs a configured cluster (and Ray installed)."""
    if settings.address and importlib.util.find_spec("ray") is not None:
        return []
    problem = ("but none is configured ([ray] address is empty)" if not settings.address else
               "but Ray is not installed here (pip install 'remotemedia-engine[ray]')")
    by_id = {d.id: d for d in manifest.nodes}
    issues = []
    for nid, why in placements(manifest, registry, settings).items():
        field = "executor" if by_id[nid].executor == "ray" else "capabilities"
        issues.append(Issue(f"$.nodes[{by_id[nid].index}].{field}", f"runs on a Ray cluster ({why}), {problem}",
                            node_id=nid, field=field, code="ray.not_configured"))
    return issues


def actor_resources(decl: NodeDecl, settings: RaySettings) -> dict[str, Any]:
    """The actor's reservation: num_cpus, num_gpus, memory (bytes), custom resources."""
    caps = decl.capabilities
    out: dict[str, Any] = {"num_cpus": float((caps.get("cpu") or {}).get("cores") or settings.default_num_cpus)}
    gpu = caps.get("gpu")
    if isinstance(gpu, dict) and gpu.get("required", True):
        out["num_gpus"] = 1
        if settings.gpu_memory_resource and gpu.get("min_memory_gb"):
            out["resources"] = {settings.gpu_memory_resource: float(gpu["min_memory_gb"])}
    if caps.get("memory_gb"):
        out["memory"] = int(caps["memory_gb"] * 1024**3)
    return out


class RayExecutor:
    """The engine's side of the cluster: the connection, held only while a
    session needs it, and a runner per node and session."""

    def __init__(self, settings: RaySettings) -> None:
        from .connection import Connection

        self.settings = settings
        self.connection = Connection(settings)

    def runner(self, planned: PlannedNode, ctx: RunnerContext) -> RayRunner:
        from .runner import RayRunner

        return RayRunner(planned, ctx, self.connection)

    async def aclose(self) -> None:
        await self.connection.aclose()
