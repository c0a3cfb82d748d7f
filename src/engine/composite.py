"""Composite node types: a node type the operator defines as a small pipeline
of registered nodes (Triton's ensembles are the model).

A composite has one input node, one or more output nodes and a mapping from
the outer node's params to inner ones (`"llm.max_tokens"`). A manifest names
it like any node type; validation checks it as one node (its params, its
connections), then expands it into its inner nodes, with ids
`outer.inner` (a dot no manifest id may contain), so that they run, take
turn events and are traced like any other node. What the outside sees stays
the outer node: inputs addressed to it go to the input node, the output
nodes' frames leave under its id, errors name it.

A *stand-in* serves a node type only where that type's own class cannot run
on this machine (its model is not installed): the server's built-in
stand-ins (engine/standins.toml) answer the RemoteMedia Next.js app's
LFM2AudioNode and KokoroTTSNode with the bundled models.

Definitions come only from the operator's configuration (runtime.toml
`[composites.TYPE]`) and the engine's own file; a manifest never defines one.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .data import DataKind
from .errors import Issue

if TYPE_CHECKING:
    from .manifest import Connection, NodeDecl
    from .registry import ExecutorRegistry

#: separates an inner node's id from its composite's (a manifest id never contains it)
SEP = "."


@dataclass(frozen=True)
class InnerNode:
    id: str
    node_type: str
    params: MappingProxyType
    #: included only when the outer params have these values (e.g. text_only = false)
    when: MappingProxyType


@dataclass(frozen=True)
class CompositeType:
    node_type: str
    description: str
    nodes: tuple[InnerNode, ...]
    connections: tuple[tuple[str, str], ...]
    input: str
    outputs: tuple[str, ...]
    #: outer param → "inner_id.param"
    params: MappingProxyType
    #: outer params' values when a manifest leaves them out
    defaults: MappingProxyType
    #: outer params accepted and left out (they mean nothing here), with why
    inert: MappingProxyType
    stand_in: bool
    #: serve the node type by this composite even where its own class can run
    override: bool = False
    source: str = "runtime.toml"
    input_types: tuple[DataKind, ...] = field(default=())
    output_types: tuple[DataKind, ...] = field(default=())

    def serves_instead_of(self, why_class_cannot_run: str | None) -> bool:
        """Whether this composite serves its node type, given why the class of that name
        cannot run here (None: it can)."""
        return self.override or (self.stand_in and why_class_cannot_run is not None)

    # ------------------------------------------------------------ outer params

    @property
    def accepted(self) -> frozenset[str]:
        conditions = {k for n in self.nodes for k in n.when}
        return frozenset(self.params) | frozenset(self.defaults) | frozenset(self.inert) | conditions

    def outer_params(self, node_id: str, path: str, given: dict[str, Any]) -> tuple[dict[str, Any], list[Issue]]:
        """The outer node's params in canonical spelling with defaults, and the
        issues of those it does not take."""
        from .registry import canonical_params

        params = canonical_params(given, {}, self.accepted)
        issues = [Issue(f"{path}.params.{key}", f"param {key!r}: not a parameter of {self.node_type} "
                        f"(served by {self.served_by()}); it takes {', '.join(sorted(self.accepted)) or 'none'}",
                        node_id=node_id, field=key, code="params.additionalProperties")
                  for key in params if key not in self.accepted]
        for key, value in self.defaults.items():
            params.setdefault(key, value)
        return params, issues

    def included(self, params: dict[str, Any]) -> list[InnerNode]:
        return [n for n in self.nodes if all(params.get(k) == v for k, v in n.when.items())]

    def served_by(self, params: dict[str, Any] | None = None) -> str:
        """`WhisperNode → LlamaCppNode` (the inner node types along the pipeline)."""
        nodes = self.nodes if params is None else self.included(params)
        kind = "stand-in" if self.stand_in and not self.override else "composite"
        return f"{' → '.join(n.node_type for n in nodes)} ({kind}, {self.source})"

    def describe(self) -> dict[str, Any]:
        return {
            "node_type": self.node_type, "executor": "composite", "executor_overridable": False,
            "input_types": [k.name.lower() for k in self.input_types],
            "output_types": [k.name.lower() for k in self.output_types],
            "source": {"kind": "composite", "name": self.source}, "class": "",
            "description": self.description, "served_by": self.served_by(), "stand_in": self.stand_in,
            "params_schema": {"type": "object", "properties": {k: {} for k in sorted(self.accepted)}},
        }

    # ------------------------------------------------------------ expansion

    def expand(self, outer: NodeDecl, registry: ExecutorRegistry) -> tuple[list[NodeDecl], list[Issue]]:
        """The inner nodes of `outer` (ids `outer.inner`), their params mapped
        from the outer ones and validated; issues name the outer node."""
        from dataclasses import replace as dc_replace

        from .manifest import NodeDecl, params_issues

        params = dict(outer.params)
        nodes = self.included(params)
        mapped: dict[str, dict[str, Any]] = {n.id: dict(n.params) for n in nodes}
        for key, target in self.params.items():
            inner, _, name = target.partition(SEP)
            if key in params and inner in mapped:
                mapped[inner][name] = params[key]
        decls, issues = [], []
        path = f"$.nodes[{outer.index}]"
        for n in nodes:
            spec = registry.get(n.node_type)
            assert spec is not None, "checked when the composite was registered"
            inner_params = spec.normalize_params(mapped[n.id])
            for issue in params_issues(spec, outer.id, path, inner_params):
                issues.append(dc_replace(issue, message=f"{issue.message} (in {n.id}, a {n.node_type} "
                                         f"serving {self.node_type})"))
            decls.append(NodeDecl(
                id=f"{outer.id}{SEP}{n.id}", node_type=n.node_type, params=MappingProxyType(inner_params),
                executor=None, is_streaming=outer.is_streaming, input_types=spec.cls.input_types,
                output_types=spec.cls.output_types, capabilities=outer.capabilities, host=None,
                index=outer.index, outer=outer.id))
            why = spec.unavailable(inner_params)
            if why:
                issues.append(Issue(f"{path}.node_type", f"{self.node_type} is served here by "
                                    f"{self.served_by(params)}, and its {n.node_type} cannot run: {why}",
                                    node_id=outer.id, field="node_type", code="unavailable"))
        return decls, issues

    def inner_edges(self, outer: str, params: dict[str, Any]) -> list[tuple[str, str]]:
        ids = {n.id for n in self.included(params)}
        return [(f"{outer}{SEP}{a}", f"{outer}{SEP}{b}") for a, b in self.connections if a in ids and b in ids]

    def entry(self, outer: str) -> str:
        return f"{outer}{SEP}{self.input}"

    def exits(self, outer: str, params: dict[str, Any]) -> list[str]:
        ids = {n.id for n in self.included(params)}
        return [f"{outer}{SEP}{o}" for o in self.outputs if o in ids]


def expand(decls: list[NodeDecl], conns: list[Connection], composites: dict[str, CompositeType],
           registry: ExecutorRegistry) -> tuple[list[NodeDecl], list[Connection], dict[str, str], list[Issue]]:
    """Replace each composite node of a validated graph with its inner nodes.

    Returns the nodes, the connections, each composite's entry (outer id →
    its input node's id) and the issues of the inner params. A composite that
    is a sink sends the frames of every output node out under its own id,
    also those of an output node that feeds another inner node."""
    from dataclasses import replace as dc_replace

    from .manifest import Connection

    out_decls: list[NodeDecl] = []
    issues: list[Issue] = []
    entries: dict[str, str] = {}
    exits: dict[str, list[str]] = {}
    inner_conns: list[Connection] = []
    feeds = {c.source for c in conns}
    for d in decls:
        comp = composites.get(d.id)
        if comp is None:
            out_decls.append(d)
            continue
        inner, problems = comp.expand(d, registry)
        issues += problems
        entries[d.id] = comp.entry(d.id)
        exits[d.id] = comp.exits(d.id, dict(d.params))
        edges = comp.inner_edges(d.id, dict(d.params))
        inner_conns += [Connection(a, b) for a, b in edges]
        if d.id not in feeds:  # a sink: its outputs go out, also where they feed an inner node
            exposed = set(exits[d.id]) & {a for a, _ in edges}
            inner = [dc_replace(n, exposed=True) if n.id in exposed else n for n in inner]
        out_decls += inner
    out_conns: list[Connection] = []
    for c in conns:
        for src in exits.get(c.source, [c.source]):
            out_conns.append(Connection(src, entries.get(c.target, c.target)))
    return out_decls, out_conns + inner_conns, entries, issues


# ---------------------------------------------------------------- definitions

def parse(node_type: str, data: Any, source: str) -> tuple[CompositeType | None, list[str]]:
    """One `[composites.TYPE]` table → a CompositeType, or the problems that stop it."""
    if not isinstance(data, dict):
        return None, ["must be a table"]
    problems: list[str] = []
    known = {"description", "stand_in", "override", "input", "outputs", "params", "defaults", "inert_params", "nodes",
             "connections"}
    problems += [f"unknown key {k!r}" for k in data if k not in known]
    nodes = []
    for i, n in enumerate(data.get("nodes") or []):
        if not isinstance(n, dict) or not isinstance(n.get("id"), str) or not isinstance(n.get("node_type"), str):
            problems.append(f"nodes[{i}] needs a string id and node_type")
            continue
        if SEP in n["id"]:
            problems.append(f"nodes[{i}].id {n['id']!r} must not contain {SEP!r}")
        nodes.append(InnerNode(n["id"], n["node_type"], MappingProxyType(dict(n.get("params") or {})),
                               MappingProxyType(dict(n.get("when") or {}))))
    if not nodes:
        problems.append("needs at least one node in `nodes`")
    conns = []
    for i, c in enumerate(data.get("connections") or []):
        if not isinstance(c, dict) or not isinstance(c.get("from"), str) or not isinstance(c.get("to"), str):
            problems.append(f"connections[{i}] needs string `from` and `to`")
            continue
        conns.append((c["from"], c["to"]))
    ids = {n.id for n in nodes}
    entry = data.get("input", nodes[0].id if nodes else "")
    outputs = data.get("outputs", [nodes[-1].id] if nodes else [])
    if not isinstance(outputs, list):
        problems.append("outputs must be a list of node ids")
        outputs = []
    for what, nid in [("input", entry), *(("outputs", o) for o in outputs), *(("connections", a) for c in conns
                                                                               for a in c)]:
        if nid not in ids:
            problems.append(f"{what} names {nid!r}, which is not one of its nodes ({', '.join(sorted(ids))})")
    mapping = dict(data.get("params") or {})
    for key, target in mapping.items():
        inner, _, name = str(target).partition(SEP)
        if inner not in ids or not name:
            problems.append(f"params.{key} = {target!r}: expected \"NODE.PARAM\" with NODE one of its nodes")
    if problems:
        return None, problems
    return CompositeType(
        node_type=node_type, description=str(data.get("description", "")), nodes=tuple(nodes),
        connections=tuple(conns), input=entry, outputs=tuple(outputs),
        params=MappingProxyType({k: str(v) for k, v in mapping.items()}),
        defaults=MappingProxyType(dict(data.get("defaults") or {})),
        inert=MappingProxyType(dict(data.get("inert_params") or {})),
        stand_in=bool(data.get("stand_in", False)), override=bool(data.get("override", False)), source=source), []


def check(comp: CompositeType, registry: ExecutorRegistry) -> tuple[CompositeType | None, list[str]]:
    """A parsed composite against the registry: its inner node types exist, its
    mapped params are params of theirs; its outer data kinds filled in."""
    problems = []
    for n in comp.nodes:
        spec = registry.get(n.node_type)
        if spec is None:
            problems.append(f"node {n.id!r}: unknown node type {n.node_type!r}")
    if problems:
        return None, problems
    for key, target in comp.params.items():
        inner, _, name = target.partition(SEP)
        spec = registry.get(next(n.node_type for n in comp.nodes if n.id == inner))
        assert spec is not None
        if name not in spec.params_known:
            problems.append(f"params.{key} = {target!r}: {spec.node_type} has no param {name!r}")
    if problems:
        return None, problems
    kinds = {n.id: registry.get(n.node_type).cls for n in comp.nodes}  # type: ignore[union-attr]
    outs: list[DataKind] = []
    for o in comp.outputs:
        outs += [k for k in kinds[o].output_types if k not in outs]
    from dataclasses import replace as dc_replace

    return dc_replace(comp, input_types=kinds[comp.input].input_types, output_types=tuple(outs)), []


def builtin_definitions() -> dict[str, Any]:
    """The server's own stand-ins (engine/standins.toml)."""
    text = resources.files("engine").joinpath("standins.toml").read_text()
    return tomllib.loads(text).get("composites", {})
