"""Manifest loading and complete validation, before any process exists.

Input: a dict, JSON text/bytes, a file path or a protobuf PipelineManifest.
camelCase keys written by existing clients are normalized to the schema's
snake_case first. Then every problem is collected, not just the first:
schema violations, duplicate ids, dangling connections, self-loops and
cycles, unknown node types (with suggestions), params that break the node
type's schema, and data-kind mismatches along connections. Each Issue has a
JSON path, the node id and an actionable message.

Data kinds: a node's class declares the kinds it accepts and produces
(Node.input_types / output_types; ANY = whatever comes). A manifest node may
declare its own `input_types` / `output_types` to narrow the class's, never
to widen them: the class's code is what handles the frames. Along each
connection the upstream's output kinds and the downstream's input kinds must
share one, unless either side accepts or produces ANY (a node that declares
nothing accepts anything). Frames the caller sends to a source node are not
known here; the node's host checks those when they arrive.

One module on purpose (~535 lines): every check feeds one list of Issues in
one pass, and the checks read the same normalized document (composites
expand in engine.composite; the remotemedia.v1 proto form is
engine.manifest_proto).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import fastjsonschema
import jsonschema
import orjson

from .data import DataKind
from .errors import Issue, ValidationError
from .node import ParamUnavailable
from .registry import snake_case, unimportable

if TYPE_CHECKING:
    from .composite import CompositeType
    from .registry import ExecutorRegistry, NodeTypeSpec


@dataclass(frozen=True, slots=True)
class NodeDecl:
    id: str
    node_type: str
    params: MappingProxyType
    executor: str | None
    is_streaming: bool
    input_types: tuple[DataKind, ...]
    output_types: tuple[DataKind, ...]
    capabilities: MappingProxyType
    host: str | None
    index: int  # position in the manifest (for error paths)
    #: the composite node this node serves inside (see engine.composite), "" = none
    outer: str = ""
    #: its outputs also leave the pipeline (an output node of a composite sink that feeds an inner node)
    exposed: bool = False

    @property
    def public_id(self) -> str:
        """The id the caller knows this node by: its composite's, else its own."""
        return self.outer or self.id


@dataclass(frozen=True, slots=True)
class Connection:
    source: str
    target: str


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    description: str
    created_at: str
    nodes: tuple[NodeDecl, ...]
    connections: tuple[Connection, ...]
    multiprocess: MappingProxyType  # metadata.multiprocess overrides
    raw: MappingProxyType
    #: a composite node's id → its input node's id (what a caller sends to it goes there)
    entries: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    #: a composite node's id → what serves it ("WhisperNode → LlamaCppNode (stand-in, built-in)")
    served_by: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    #: what a session logs once at start: params given that mean nothing on this server
    notes: tuple[str, ...] = ()

    def entry(self, node_id: str) -> str:
        """The node that takes what a caller sends to `node_id` (a composite's input node)."""
        return self.entries.get(node_id, node_id)

    @property
    def public_ids(self) -> frozenset[str]:
        """The node ids a caller knows: a composite's own, never its inner nodes'."""
        return frozenset(n.public_id for n in self.nodes)

    def node(self, node_id: str) -> NodeDecl:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)


# ---------------------------------------------------------------- loading

def _snake_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {snake_case(k) if isinstance(k, str) else k: v for k, v in obj.items()}
    return obj


def normalize(doc: dict[str, Any]) -> dict[str, Any]:
    """camelCase → snake_case at the places the schema defines (not inside params)."""
    out = _snake_keys(doc)
    if isinstance(out.get("metadata"), dict):
        md = _snake_keys(out["metadata"])
        if isinstance(md.get("multiprocess"), dict):
            md["multiprocess"] = _snake_keys(md["multiprocess"])
        out["metadata"] = md
    if isinstance(out.get("nodes"), list):
        nodes = []
        for n in out["nodes"]:
            n = _snake_keys(n)
            if isinstance(n, dict) and isinstance(n.get("capabilities"), dict):
                caps = _snake_keys(n["capabilities"])
                for k in ("gpu", "cpu"):
                    if isinstance(caps.get(k), dict):
                        caps[k] = _snake_keys(caps[k])
                n["capabilities"] = caps
            if isinstance(n, dict) and isinstance(n.get("params"), str):
                # the proto form carries params as a JSON string
                n["params"] = parse_params_string(n["params"])
            nodes.append(n)
        out["nodes"] = nodes
    return out


class BadParams:
    def __init__(self, text: str, error: str) -> None:
        self.text, self.error = text, error


def parse_params_string(text: str) -> Any:
    if not text.strip():
        return {}
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return BadParams(text, str(exc))


def load_document(source: Any) -> dict[str, Any]:
    """Any accepted manifest form → a plain dict (not yet validated)."""
    if isinstance(source, dict):
        return source
    if hasattr(source, "DESCRIPTOR") and hasattr(source, "nodes"):
        from .manifest_proto import proto_to_dict  # the proto form builds on this module

        return proto_to_dict(source)
    if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith("{")):
        try:
            source = Path(source).read_bytes()
        except OSError as exc:
            raise ValidationError(Issue("$", f"cannot read manifest file: {exc}", code="io")) from None
    if isinstance(source, (bytes, bytearray, memoryview, str)):
        try:
            doc = orjson.loads(source)
        except orjson.JSONDecodeError as exc:
            raise ValidationError(Issue("$", f"manifest is not valid JSON: {exc}", code="json")) from None
        if not isinstance(doc, dict):
            raise ValidationError(Issue("$", "manifest must be a JSON object", code="type"))
        return doc
    raise ValidationError(Issue("$", f"cannot load a manifest from {type(source).__name__}", code="type"))


# ---------------------------------------------------------------- schema

@cache
def manifest_schema() -> dict[str, Any]:
    text = resources.files("engine").joinpath("schemas/manifest.v1.json").read_text()
    return json.loads(text)


@cache
def _validators() -> tuple[Any, Any]:
    schema = manifest_schema()
    # fastjsonschema is the fast path (a compiled check, tens of µs for a
    # 10-node manifest); jsonschema runs only when that fails, to report
    # every violation with its path rather than just the first.
    return fastjsonschema.compile(schema), jsonschema.Draft7Validator(
        schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )


def _json_path(parts: Any) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _node_at(doc: dict[str, Any], parts: list[Any]) -> str | None:
    if len(parts) >= 2 and parts[0] == "nodes" and isinstance(parts[1], int):
        try:
            node = doc["nodes"][parts[1]]
            return node.get("id") if isinstance(node, dict) and isinstance(node.get("id"), str) else None
        except (IndexError, KeyError, TypeError):
            return None
    return None


def _schema_issues(doc: dict[str, Any]) -> list[Issue]:
    fast, full = _validators()
    try:
        fast(doc)
        created = doc["metadata"].get("created_at")
        if created is None or full.format_checker.conforms(created, "date-time"):
            return []
    except fastjsonschema.JsonSchemaException:
        pass
    issues = []
    for err in sorted(full.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        parts = list(err.absolute_path)
        field = str(parts[-1]) if parts else None
        if err.validator == "required":
            missing = err.message.split("'")[1] if "'" in err.message else ""
            field = missing or field
        issues.append(Issue(_json_path(parts), _friendly(err), node_id=_node_at(doc, parts),
                            field=field, code=f"schema.{err.validator}"))
    return issues


def _friendly(err: jsonschema.ValidationError) -> str:
    if err.validator == "pattern" and err.absolute_path and err.absolute_path[-1] in ("id", "from", "to"):
        return f"{err.instance!r} is not a valid node id (letters, digits, '_' and '-' only)"
    if err.validator == "const" and list(err.absolute_path) == ["version"]:
        return f"unsupported manifest version {err.instance!r}; expected \"v1\""
    return err.message


# ---------------------------------------------------------------- semantics

def _find_cycle(ids: list[str], edges: dict[str, list[str]]) -> list[str] | None:
    """A cycle (its node ids, the first repeated at the end), or None.

    Depth-first with an explicit stack, not recursion: a chain of any length
    is checked (a recursive walk ended in RecursionError at ~1,000 nodes)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(ids, WHITE)
    for root in ids:
        if color[root] != WHITE:
            continue
        color[root] = GREY
        path = [root]  # the grey nodes, in order
        todo = [iter(edges.get(root, ()))]  # each path node's edges still to follow
        while todo:
            for v in todo[-1]:
                if color.get(v) == GREY:
                    return path[path.index(v):] + [v]
                if color.get(v) == WHITE:
                    color[v] = GREY
                    path.append(v)
                    todo.append(iter(edges.get(v, ())))
                    break
            else:
                color[path.pop()] = BLACK
                todo.pop()
    return None


def _parse_kinds(values: Any, path: str, node_id: str, issues: list[Issue]) -> tuple[DataKind, ...]:
    if values is None:
        return ()
    if not isinstance(values, list):
        issues.append(Issue(path, "must be a list of data types", node_id=node_id))
        return ()
    kinds = []
    for i, v in enumerate(values):
        try:
            kind = DataKind.parse(v)
            if kind.value:
                kinds.append(kind)
        except (KeyError, ValueError, AttributeError):
            issues.append(Issue(f"{path}[{i}]", f"unknown data type {v!r}; use one of "
                                f"{', '.join(k.name.lower() for k in DataKind)}", node_id=node_id))
    return tuple(kinds)


def _any(kinds: tuple[DataKind, ...]) -> bool:
    return not kinds or DataKind.ANY in kinds


def _compatible(out_kinds: tuple[DataKind, ...], in_kinds: tuple[DataKind, ...]) -> bool:
    if _any(out_kinds) or _any(in_kinds):
        return True
    return bool(set(out_kinds) & set(in_kinds))


def _kinds(kinds: tuple[DataKind, ...]) -> str:
    return "|".join(k.name.lower() for k in kinds)


def _names(kinds: tuple[DataKind, ...]) -> list[str]:
    return [k.name.lower() for k in kinds]


def _declared_kinds(spec: NodeTypeSpec, node_id: str, path: str, field: str,
                    declared: tuple[DataKind, ...], issues: list[Issue]) -> tuple[DataKind, ...]:
    """The kinds a node accepts (or produces): the manifest's where it declares
    some, else the class's. Kinds the class does not handle are an issue: a
    manifest narrows a node's types, it cannot make its code take more."""
    of_class: tuple[DataKind, ...] = getattr(spec.cls, field)
    if not declared:
        return of_class
    if _any(of_class):
        return declared
    extra = tuple(k for k in declared if k not in of_class)
    if extra:
        what = "accepts" if field == "input_types" else "produces"
        issues.append(Issue(
            f"{path}.{field}", f"{field} {_kinds(declared)} is wider than what node type "
            f"{spec.node_type!r} {what} ({_kinds(of_class)}); remove {_kinds(extra)} or leave "
            f"{field} out", node_id=node_id, field=field, code="type_declaration",
            extra={"declared": _names(declared), "node_type": _names(of_class)}))
    return declared


def params_issues(spec: NodeTypeSpec, node_id: str, path: str, params: dict[str, Any]) -> list[Issue]:
    try:
        spec.params_fast(params)
        return []
    except fastjsonschema.JsonSchemaException:
        pass
    issues = []
    for err in spec.params_validator.iter_errors(params):
        parts = list(err.absolute_path)
        field = ".".join(map(str, parts)) if parts else None
        if err.validator == "required" and "'" in err.message:
            field = err.message.split("'")[1]
        elif err.validator == "additionalProperties" and "'" in err.message:
            field = err.message.split("'")[1]
        message = f"param {field!r}: {err.message}" if field else err.message
        issues.append(Issue(f"{path}.params" + "".join(f".{p}" for p in parts), message,
                            node_id=node_id, field=field, code=f"params.{err.validator}"))
    return issues


def _unavailable_issue(path: str, node_id: str, node_type: str, why: str | ParamUnavailable) -> Issue:
    """Why a node cannot run here, said at the param at fault when its class names one."""
    if isinstance(why, ParamUnavailable):
        return Issue(f"{path}.params.{why.param}", str(why), node_id=node_id, field=why.param,
                     code="unavailable")
    return Issue(f"{path}.node_type", f"node type {node_type!r} cannot run on this server: {why}",
                 node_id=node_id, field="node_type", code="unavailable")


def _type_mismatch(path: str, upstream: NodeDecl, downstream: NodeDecl) -> Issue:
    outs, ins = _kinds(upstream.output_types), _kinds(downstream.input_types)
    return Issue(
        path, f"type mismatch: {upstream.id} ({upstream.node_type}) outputs {outs} but {downstream.id} "
        f"({downstream.node_type}) accepts only {ins}; connect {downstream.id} to a node that outputs "
        f"{ins}, or put a converting node between them", node_id=downstream.id, field="input_types",
        code="type_mismatch",
        extra={"from": upstream.id, "to": downstream.id, "outputs": _names(upstream.output_types),
               "accepts": _names(downstream.input_types)})


def _inert_note(node_id: str, node_type: str, given: list[str], why: Any) -> list[str]:
    if not given:
        return []
    reasons = "; ".join(f"{k}: {why[k]}" for k in sorted(given))
    return [f"node {node_id} ({node_type}): param{'s' if len(given) > 1 else ''} {', '.join(sorted(given))} "
            f"mean{'' if len(given) > 1 else 's'} nothing on this server and {'are' if len(given) > 1 else 'is'} "
            f"ignored ({reasons})"]


def validate(source: Any, registry: ExecutorRegistry) -> Manifest:
    """Load and completely validate a manifest; raise ValidationError with every issue."""
    doc = normalize(load_document(source))
    # bad JSON in a proto params string is reported as a params issue
    issues: list[Issue] = []
    for i, n in enumerate(doc.get("nodes") or []):
        if isinstance(n, dict) and isinstance(n.get("params"), BadParams):
            issues.append(Issue(f"$.nodes[{i}].params", f"params is not valid JSON: {n['params'].error}",
                                node_id=n.get("id"), field="params", code="params.json"))
            n["params"] = {}
    issues += _schema_issues(doc)
    structurally_broken = any(i.code in ("schema.type", "schema.required") and i.path.count(".") <= 1
                              for i in issues)
    if structurally_broken or not isinstance(doc.get("nodes"), list):
        raise ValidationError(issues)

    nodes_raw = [n for n in doc["nodes"] if isinstance(n, dict)]
    conns_raw = [c for c in (doc.get("connections") or []) if isinstance(c, dict)]

    seen: dict[str, int] = {}
    for i, n in enumerate(nodes_raw):
        nid = n.get("id")
        if not isinstance(nid, str):
            continue
        if nid in seen:
            issues.append(Issue(f"$.nodes[{i}].id", f"duplicate node id {nid!r} (first at $.nodes[{seen[nid]}])",
                                node_id=nid, field="id", code="duplicate_id"))
        else:
            seen[nid] = i

    decls: list[NodeDecl] = []
    specs: dict[str, NodeTypeSpec] = {}
    composites: dict[str, CompositeType] = {}
    served: dict[str, str] = {}
    notes: list[str] = []
    for i, n in enumerate(nodes_raw):
        nid, ntype = n.get("id"), n.get("node_type")
        if not isinstance(nid, str) or not isinstance(ntype, str) or not ntype:
            continue
        path = f"$.nodes[{i}]"
        spec = registry.get(ntype)
        params = n.get("params") if isinstance(n.get("params"), dict) else {}
        given = params
        why = None  # why the class cannot run here
        if spec is not None:
            params = spec.normalize_params(given)
            why = spec.unavailable(params)
        comp = registry.composite(ntype)
        if comp is not None and (spec is None or comp.serves_instead_of(why)):
            outer, problems = comp.outer_params(nid, path, given)
            issues += problems
            composites[nid] = comp
            served[nid] = comp.served_by(outer)
            decls.append(NodeDecl(
                id=nid, node_type=ntype, params=MappingProxyType(outer), executor=None,
                is_streaming=bool(n.get("is_streaming", False)), input_types=comp.input_types,
                output_types=comp.output_types, capabilities=MappingProxyType(n.get("capabilities") or {}),
                host=None, index=i))
            notes += _inert_note(nid, ntype, [k for k in outer if k in comp.inert], comp.inert)
            continue
        if spec is None:
            hint = registry.suggest(ntype)
            msg = f"unknown node type {ntype!r}"
            msg += f"; did you mean {', '.join(map(repr, hint))}?" if hint else f"; registered types: {', '.join(registry.names())}"
            issues.append(Issue(f"{path}.node_type", msg, node_id=nid, field="node_type",
                                code="unknown_node_type", extra={"suggestions": hint}))
        else:
            specs[nid] = spec
            notes += _inert_note(nid, ntype, spec.inert_params(given), spec.cls.inert_params)
            issues += params_issues(spec, nid, path, params)
            if why is not None:
                issues.append(_unavailable_issue(path, nid, ntype, why))
            executor = n.get("executor")
            if executor and not spec.accepts_executor(executor):
                can = ("native, multiprocess or ray" if spec.overridable else
                       f"{spec.executor} or ray" if spec.executor == "multiprocess" else repr(spec.executor))
                why_not = unimportable(spec.cls) if executor in ("multiprocess", "ray") else ""
                issues.append(Issue(f"{path}.executor", f"node type {ntype!r} runs on the {can} "
                                    f"executor, not {executor!r}" + (f": {why_not}" if why_not else ""),
                                    node_id=nid, field="executor", code="executor"))
        in_kinds = _parse_kinds(n.get("input_types"), f"{path}.input_types", nid, issues)
        out_kinds = _parse_kinds(n.get("output_types"), f"{path}.output_types", nid, issues)
        if spec is not None:
            in_kinds = _declared_kinds(spec, nid, path, "input_types", in_kinds, issues)
            out_kinds = _declared_kinds(spec, nid, path, "output_types", out_kinds, issues)
        decls.append(NodeDecl(
            id=nid, node_type=ntype, params=MappingProxyType(params),
            executor=n.get("executor") if n.get("executor") in ("native", "multiprocess", "wasm", "ray") else None,
            is_streaming=bool(n.get("is_streaming", False)), input_types=in_kinds,
            output_types=out_kinds, capabilities=MappingProxyType(n.get("capabilities") or {}),
            host=n.get("host"), index=i,
        ))

    by_id = {d.id: d for d in decls}
    edges: dict[str, list[str]] = {}
    conns: list[Connection] = []
    seen_edges: set[tuple[str, str]] = set()
    for j, c in enumerate(conns_raw):
        src, dst = c.get("from"), c.get("to")
        if not isinstance(src, str) or not isinstance(dst, str):
            continue
        path = f"$.connections[{j}]"
        bad = False
        for end, nid in (("from", src), ("to", dst)):
            if nid not in seen:
                hint = [k for k in seen if k.lower() == nid.lower()]
                issues.append(Issue(f"{path}.{end}", f"connection {end} unknown node {nid!r}"
                                    + (f"; did you mean {hint[0]!r}?" if hint else ""),
                                    node_id=nid, field=end, code="dangling_connection"))
                bad = True
        if bad:
            continue
        if src == dst:
            issues.append(Issue(path, f"self-loop: {src} → {src}", node_id=src, code="cycle"))
            continue
        if (src, dst) in seen_edges:
            issues.append(Issue(path, f"duplicate connection {src} → {dst}", node_id=dst,
                                code="duplicate_connection"))
            continue
        seen_edges.add((src, dst))
        edges.setdefault(src, []).append(dst)
        conns.append(Connection(src, dst))
        a, b = by_id.get(src), by_id.get(dst)
        if a is not None and b is not None and not _compatible(a.output_types, b.input_types):
            issues.append(_type_mismatch(path, a, b))

    cycle = _find_cycle([d.id for d in decls], edges)
    if cycle:
        shown = cycle if len(cycle) <= 21 else [*cycle[:10], f"… {len(cycle) - 20} more …", *cycle[-10:]]
        issues.append(Issue("$.connections", f"cycle: {' → '.join(shown)}", node_id=cycle[0],
                            code="cycle", extra={"cycle": cycle}))

    entries: dict[str, str] = {}
    if composites and not issues:
        # checked as the caller wrote it; now each composite becomes its inner nodes
        from .composite import expand  # composite builds on NodeDecl: imported here, not at the top

        decls, conns, entries, problems = expand(decls, conns, composites, registry)
        issues += problems

    if issues:
        raise ValidationError(issues)

    md = doc["metadata"]
    return Manifest(
        name=md["name"], description=md.get("description", ""), created_at=md.get("created_at", ""),
        nodes=tuple(decls), connections=tuple(conns),
        multiprocess=MappingProxyType(dict(md.get("multiprocess") or {})),
        raw=MappingProxyType(doc), entries=MappingProxyType(entries), served_by=MappingProxyType(served),
        notes=tuple(notes),
    )
