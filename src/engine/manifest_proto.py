"""A manifest's remotemedia.v1 form: the proto PipelineManifest ↔ the JSON shape.

`proto_to_dict` is how a manifest that came over gRPC is read (validation
then treats it like any other); `to_proto` is what a client sends.
"""

from __future__ import annotations

from typing import Any

import orjson

from .manifest import BadParams, load_document, normalize, parse_params_string


def proto_to_dict(pm: Any) -> dict[str, Any]:
    """remotemedia.v1.PipelineManifest → the JSON manifest shape."""
    from ._proto import common_pb2

    md: dict[str, Any] = {"name": pm.metadata.name}
    if pm.metadata.description:
        md["description"] = pm.metadata.description
    if pm.metadata.created_at:
        md["created_at"] = pm.metadata.created_at
    if pm.metadata.multiprocess_json:
        mp = parse_params_string(pm.metadata.multiprocess_json)
        md["multiprocess"] = mp if not isinstance(mp, BadParams) else pm.metadata.multiprocess_json
    nodes = []
    for n in pm.nodes:
        d: dict[str, Any] = {"id": n.id, "node_type": n.node_type, "params": n.params}
        if n.is_streaming:
            d["is_streaming"] = True
        if n.host:
            d["host"] = n.host
        if n.executor:
            d["executor"] = n.executor
        if n.input_types:
            d["input_types"] = [common_pb2.DataTypeHint.Name(t) for t in n.input_types]
        if n.output_types:
            d["output_types"] = [common_pb2.DataTypeHint.Name(t) for t in n.output_types]
        if n.HasField("capabilities"):
            c = n.capabilities
            caps: dict[str, Any] = {}
            if c.HasField("gpu"):
                caps["gpu"] = {"type": c.gpu.type, "min_memory_gb": c.gpu.min_memory_gb,
                               "required": c.gpu.required}
            if c.HasField("cpu"):
                cpu: dict[str, Any] = {}
                if c.cpu.cores:
                    cpu["cores"] = c.cpu.cores
                if c.cpu.arch:
                    cpu["arch"] = c.cpu.arch
                caps["cpu"] = cpu
            if c.memory_gb:
                caps["memory_gb"] = c.memory_gb
            d["capabilities"] = caps
        nodes.append(d)
    return {
        "version": pm.version,
        "metadata": md,
        "nodes": nodes,
        "connections": [{"from": c.__getattribute__("from"), "to": c.to} for c in pm.connections],
    }



def to_proto(source: Any) -> Any:
    """A JSON manifest (dict, JSON text or path) → the remotemedia.v1 PipelineManifest a client sends.

    The inverse of proto_to_dict for what the proto can carry; not validated
    (the server validates what it receives).
    """
    from ._proto import execution_pb2 as epb

    doc = normalize(load_document(source))
    md = doc.get("metadata") or {}
    m = epb.PipelineManifest(version=str(doc.get("version", "")))
    m.metadata.name = str(md.get("name", ""))
    m.metadata.description = str(md.get("description", ""))
    m.metadata.created_at = str(md.get("created_at", ""))
    if md.get("multiprocess"):
        m.metadata.multiprocess_json = orjson.dumps(md["multiprocess"]).decode()
    for n in doc.get("nodes") or []:
        node = m.nodes.add(id=str(n.get("id", "")), node_type=str(n.get("node_type", "")),
                           params=orjson.dumps(n.get("params") or {}).decode(),
                           is_streaming=bool(n.get("is_streaming", False)))
        if n.get("executor"):
            node.executor = str(n["executor"])
        if n.get("host"):
            node.host = str(n["host"])
    for c in doc.get("connections") or []:
        m.connections.add(**{"from": str(c.get("from", "")), "to": str(c.get("to", ""))})
    return m
