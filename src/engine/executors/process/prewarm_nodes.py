"""runtime.toml's `[[prewarm_nodes]]` and `prewarm_manifest`: the nodes whose
processes are kept initialized ahead (see pool), each as the Assign it gets.

Each is resolved as a session's node would be: validated and planned
(params normalized by the registry with `[node_params.TYPE]`, the
manifest's `metadata.multiprocess` applied), then made into an Assign by
the runner's own `assignment`. So a session's node and a prewarmed one
compare equal (pool.warm_key) exactly when initialize() would see the same
thing; any difference means a cold start, never a wrong model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ...config import PrewarmNode, RuntimeConfig, SessionSettings
from ...errors import EngineError, Issue, ValidationError
from ...ipc.control import Assign
from ...manifest import validate
from ...plan import ExecutionPlan, build_plan
from ...registry import ExecutorRegistry
from .runner import assignment

#: the session id a prewarmed process is assigned with, until a session binds it
PREWARM_SESSION = "prewarmed"


@dataclass(frozen=True)
class WarmNode:
    """One node to keep initialized ahead, in `count` processes."""

    assign: Assign
    capacity: int
    init_timeout_secs: float
    count: int


def resolve(config: RuntimeConfig, registry: ExecutorRegistry) -> list[WarmNode]:
    """Every node runtime.toml asks to keep initialized; a ValidationError names each setting at fault."""
    issues: list[Issue] = []
    nodes: list[WarmNode] = []
    for i, entry in enumerate(config.prewarm_nodes):
        nodes += _entry(config, registry, f"prewarm_nodes[{i}]", entry, issues)
    if config.prewarm_manifest:
        nodes += _manifest(config, registry, issues)
    cap = config.caps.max_total_processes
    total = config.prewarm_processes + sum(n.count for n in nodes)
    if total > cap:
        issues.append(Issue("prewarm_nodes", f"{total} prewarmed processes in all (prewarm_processes, "
                            f"prewarm_nodes, prewarm_manifest) exceed caps.max_total_processes={cap}"))
    if issues:
        raise ValidationError(issues)
    return nodes


def _entry(config: RuntimeConfig, registry: ExecutorRegistry, where: str, entry: PrewarmNode,
           issues: list[Issue]) -> list[WarmNode]:
    """One `[[prewarm_nodes]]` entry, as the one node of a manifest."""
    doc = {"version": "v1", "metadata": {"name": "prewarm"}, "connections": [],
           "nodes": [{"id": "prewarm", "node_type": entry.node_type, "params": dict(entry.params)}]}
    try:
        plan = build_plan(validate(doc, registry), registry, config.session, _ray(config))
    except ValidationError as exc:
        issues += [Issue(where + x.path.removeprefix("$.nodes[0]").removeprefix("$"), x.message,
                         field=x.field, code=x.code) for x in exc.issues]
        return []
    nodes = _process_nodes(plan, config.session, entry.count)
    if not nodes:
        kind = next(iter(plan.nodes.values())).executor
        issues.append(Issue(f"{where}.node_type", f"{entry.node_type} runs on the {kind} executor here, not "
                            "in a node process: there is no process to prewarm"))
    return nodes


def _manifest(config: RuntimeConfig, registry: ExecutorRegistry, issues: list[Issue]) -> list[WarmNode]:
    """Every node of `prewarm_manifest` that runs in a node process, one process each."""
    path = config.prewarm_manifest
    try:
        m = validate(path, registry)
        settings = config.for_manifest(dict(m.multiprocess))
        plan = build_plan(m, registry, settings, _ray(config))
    except EngineError as exc:
        problems: list[Any] = exc.issues if isinstance(exc, ValidationError) else [exc]
        issues += [Issue("prewarm_manifest", f"{path}: {p}") for p in problems]
        return []
    nodes = _process_nodes(plan, settings, 1)
    if not nodes:
        issues.append(Issue("prewarm_manifest", f"{path}: no node of it runs in a node process"))
    return nodes


def _process_nodes(plan: ExecutionPlan, settings: SessionSettings, count: int) -> list[WarmNode]:
    return [WarmNode(replace(assignment(planned, settings, PREWARM_SESSION, False), prewarmed=True),
                     settings.channel_capacity, settings.init_timeout_secs, count)
            for nid in plan.order if (planned := plan.nodes[nid]).executor == "multiprocess"]


def _ray(config: RuntimeConfig) -> Any:
    """As the engine plans a session: a node Ray would place runs there, not here."""
    return config.ray if config.ray.address else None
