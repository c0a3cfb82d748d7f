"""The NodeExecutionPlan: which executor runs each node, the topological
order, fan-out (downstream lists), fan-in (upstream lists), sources and sinks.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RaySettings, SessionSettings
from .data import DataKind
from .executors.ray_cluster import placement
from .manifest import Manifest, NodeDecl
from .registry import ExecutorKind, ExecutorRegistry, NodeTypeSpec


@dataclass(frozen=True, slots=True)
class PlannedNode:
    decl: NodeDecl
    spec: NodeTypeSpec
    executor: ExecutorKind
    upstream: tuple[str, ...]
    downstream: tuple[str, ...]

    @property
    def id(self) -> str:
        return self.decl.id

    @property
    def is_sink(self) -> bool:
        """Its outputs leave the pipeline (to the caller): it feeds no node, or it is
        an output node of a composite sink (which may also feed inner nodes)."""
        return not self.downstream or self.decl.exposed

    @property
    def is_source(self) -> bool:
        return not self.upstream

    @property
    def accepted_kinds(self) -> frozenset[DataKind] | None:
        """The kinds of frame this node takes, None = any: its manifest's
        `input_types` where declared (validated to lie within its class's),
        else its class's. Along connections validation checked them; what a
        caller sends to a source node is checked against them on arrival."""
        kinds = self.decl.input_types
        return None if not kinds or DataKind.ANY in kinds else frozenset(kinds)


@dataclass(frozen=True, slots=True)
class ExecutionPlan:
    order: tuple[str, ...]
    nodes: dict[str, PlannedNode]

    @property
    def sinks(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if self.nodes[n].is_sink)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if self.nodes[n].is_source)

    def count(self, executor: ExecutorKind) -> int:
        return sum(1 for n in self.nodes.values() if n.executor == executor)


def build_plan(manifest: Manifest, registry: ExecutorRegistry, settings: SessionSettings,
               ray: RaySettings | None = None) -> ExecutionPlan:
    """Plan a validated manifest (cycles and unknown types were rejected already).
    With `ray`, a node it places on the cluster runs there (executors.ray_cluster)."""
    ups: dict[str, list[str]] = {n.id: [] for n in manifest.nodes}
    downs: dict[str, list[str]] = {n.id: [] for n in manifest.nodes}
    for c in manifest.connections:
        downs[c.source].append(c.target)
        ups[c.target].append(c.source)
    # Kahn's algorithm, stable in manifest order.
    indeg = {k: len(v) for k, v in ups.items()}
    ready = [n.id for n in manifest.nodes if indeg[n.id] == 0]
    order: list[str] = []
    while ready:
        nid = ready.pop(0)
        order.append(nid)
        for d in downs[nid]:
            indeg[d] -= 1
            if indeg[d] == 0:
                ready.append(d)
    nodes = {}
    for decl in manifest.nodes:
        spec = registry.get(decl.node_type)
        assert spec is not None, "validated manifest names only registered types"
        kind = spec.resolve_executor(decl.executor)
        if ray is not None and kind == "multiprocess" and ray.place_by_capabilities and placement(decl, spec, ray):
            kind = "ray"
        if kind == "multiprocess" and not settings.multiprocess_enabled:
            kind = "native"
        if decl.host:  # on the engine there (which runs it on the executor it chooses)
            kind = "remote"
        nodes[decl.id] = PlannedNode(decl, spec, kind, tuple(ups[decl.id]), tuple(downs[decl.id]))
    return ExecutionPlan(tuple(order), nodes)
