"""Manifest loading and complete validation."""

from __future__ import annotations

import json

import pytest
from conftest import manifest

from engine._proto import execution_pb2
from engine.catalog import default_registry
from engine.data import DataKind
from engine.errors import ErrorType, ValidationError
from engine.manifest import validate

REG = default_registry(test_nodes=True)


def issues_of(doc) -> list:
    with pytest.raises(ValidationError) as info:
        validate(doc, REG)
    assert info.value.error_type is ErrorType.VALIDATION
    return info.value.issues


def chain() -> dict:
    return manifest([
        {"id": "a", "node_type": "AudioChunkerNode", "params": {"chunk_size": 256}},
        {"id": "b", "node_type": "AudioResampleNode", "params": {"target_sample_rate": 16000}},
        {"id": "c", "node_type": "PassThroughNode"},
    ])


def test_valid_manifest_loads_into_immutable_objects():
    m = validate(chain(), REG)
    assert [n.id for n in m.nodes] == ["a", "b", "c"]
    assert m.node("a").params["chunk_size"] == 256
    with pytest.raises(TypeError):
        m.node("a").params["chunk_size"] = 1  # type: ignore[index]


def test_accepts_json_text_bytes_and_files(tmp_path):
    doc = chain()
    text = json.dumps(doc)
    path = tmp_path / "m.json"
    path.write_text(text)
    for source in (text, text.encode(), path, str(path)):
        assert len(validate(source, REG).nodes) == 3


def test_camel_case_keys_from_existing_clients_are_normalized():
    doc = {
        "version": "v1",
        "metadata": {"name": "camel", "createdAt": "2025-01-01T00:00:00Z"},
        "nodes": [
            {"id": "a", "nodeType": "AudioChunkerNode", "params": {"chunkSize": 512}, "isStreaming": True},
            {"id": "b", "nodeType": "PassThroughNode"},
        ],
        "connections": [{"from": "a", "to": "b"}],
    }
    m = validate(doc, REG)
    assert m.node("a").params["chunk_size"] == 512
    assert m.node("a").is_streaming
    assert m.created_at == "2025-01-01T00:00:00Z"


def test_schema_violations_are_all_reported_with_paths():
    doc = chain()
    doc["version"] = "v2"
    doc["metadata"]["name"] = ""
    doc["nodes"][1]["id"] = "bad id!"
    doc["nodes"][2]["host"] = "no-port"
    doc["nodes"][0]["capabilities"] = {"gpu": {"type": "tpu"}, "cpu": {"cores": 0}}
    paths = {i.path for i in issues_of(doc)}
    assert {"$.version", "$.metadata.name", "$.nodes[1].id", "$.nodes[2].host",
            "$.nodes[0].capabilities.gpu.type", "$.nodes[0].capabilities.cpu.cores"} <= paths


def test_missing_top_level_fields():
    found = issues_of({"version": "v1"})
    fields = {i.field for i in found}
    assert {"metadata", "nodes", "connections"} <= fields


def test_empty_nodes_rejected():
    assert any(i.path == "$.nodes" for i in issues_of(manifest([], [])))


def test_duplicate_ids_dangling_edges_and_unknown_types_together():
    doc = manifest(
        [
            {"id": "a", "node_type": "PassThroughNode"},
            {"id": "a", "node_type": "PassThroughNode"},
            {"id": "b", "node_type": "AudioChunkr"},
        ],
        [("a", "b"), ("b", "ghost")],
    )
    found = issues_of(doc)
    codes = {i.code for i in found}
    assert {"duplicate_id", "unknown_node_type", "dangling_connection"} <= codes
    unknown = next(i for i in found if i.code == "unknown_node_type")
    assert unknown.node_id == "b"
    assert "AudioChunkerNode" in unknown.message  # suggestion
    dangling = next(i for i in found if i.code == "dangling_connection")
    assert dangling.path == "$.connections[1].to" and "ghost" in dangling.message


def test_cycle_is_named():
    doc = manifest(
        [{"id": x, "node_type": "PassThroughNode"} for x in "abc"],
        [("a", "b"), ("b", "c"), ("c", "a")],
    )
    cyc = next(i for i in issues_of(doc) if i.code == "cycle")
    assert "a → b → c → a" in cyc.message


def test_self_loop():
    doc = manifest([{"id": "a", "node_type": "PassThroughNode"}], [("a", "a")])
    assert any("self-loop" in i.message for i in issues_of(doc))


def test_params_schema_violations_name_node_and_field():
    doc = manifest([
        {"id": "ch", "node_type": "AudioChunkerNode", "params": {"chunk_size": -5}},
        {"id": "rs", "node_type": "AudioResampleNode", "params": {}},
        {"id": "fmt", "node_type": "AudioFormatNode", "params": {"format": "f64", "extra": 1}},
    ])
    found = issues_of(doc)
    by_node = {(i.node_id, i.field) for i in found}
    assert ("ch", "chunk_size") in by_node
    assert ("rs", "target_sample_rate") in by_node
    assert ("fmt", "format") in by_node
    assert ("fmt", "extra") in by_node
    assert all(i.path.startswith("$.nodes[") for i in found)


def test_type_mismatch_along_connection():
    doc = manifest([
        {"id": "sum", "node_type": "ChecksumNode"},
        {"id": "ch", "node_type": "AudioChunkerNode"},
    ])
    found = issues_of(doc)
    mismatch = next(i for i in found if i.code == "type_mismatch")
    assert "json" in mismatch.message and "audio" in mismatch.message and mismatch.node_id == "ch"


def test_declared_io_types_in_manifest_are_checked():
    doc = manifest([
        {"id": "p", "node_type": "PassThroughNode", "output_types": ["text"]},
        {"id": "ch", "node_type": "AudioChunkerNode"},
    ])
    assert any(i.code == "type_mismatch" for i in issues_of(doc))
    doc["nodes"][0]["output_types"] = ["no-such-type"]
    assert any("unknown data type" in i.message for i in issues_of(doc))


def test_executor_override_and_unknown_settings():
    doc = manifest([{"id": "e", "node_type": "EchoNode", "executor": "native"}])
    assert validate(doc, REG).node("e").executor == "native"
    doc["nodes"][0]["executor"] = "gpu"
    assert any(i.path == "$.nodes[0].executor" for i in issues_of(doc))


def test_existing_manifest_extensions_are_allowed():
    doc = chain()
    doc["metadata"]["multiprocess"] = {"channel_capacity": 8}
    doc["nodes"][0]["is_streaming"] = True
    doc["nodes"][0]["some_extension"] = {"x": 1}
    m = validate(doc, REG)
    assert m.multiprocess["channel_capacity"] == 8


def test_bad_json():
    with pytest.raises(ValidationError, match="not valid JSON"):
        validate("{not json", REG)


def test_proto_manifest_goes_through_the_same_validation():
    pm = execution_pb2.PipelineManifest(version="v1")
    pm.metadata.name = "proto"
    pm.nodes.add(id="a", node_type="AudioChunkerNode", params='{"chunkSize": 128}')
    pm.nodes.add(id="b", node_type="PassThroughNode", params="")
    c = pm.connections.add()
    setattr(c, "from", "a")
    c.to = "b"
    m = validate(pm, REG)
    assert m.node("a").params["chunk_size"] == 128
    pm.nodes[1].params = "{oops"
    pm.nodes[0].node_type = "Nope"
    found = issues_of(pm)
    assert {i.code for i in found} >= {"params.json", "unknown_node_type"}


def test_to_proto_round_trips_through_validation():
    from engine.catalog import default_registry
    from engine.manifest import validate
    from engine.manifest_proto import proto_to_dict, to_proto

    doc = {"version": "v1", "metadata": {"name": "rt", "createdAt": "2026-01-01T00:00:00Z",
                                         "multiprocess": {"channelCapacity": 8}},
           "nodes": [{"id": "c", "nodeType": "AudioChunkerNode", "params": {"chunkSize": 256}},
                     {"id": "p", "node_type": "PassThroughNode", "executor": "native"}],
           "connections": [{"from": "c", "to": "p"}]}
    proto = to_proto(doc)
    back = proto_to_dict(proto)
    assert back["metadata"]["multiprocess"] == {"channel_capacity": 8}
    registry = default_registry()
    a, b = validate(doc, registry), validate(proto, registry)
    assert [(n.id, n.node_type, dict(n.params), n.executor) for n in a.nodes] == \
        [(n.id, n.node_type, dict(n.params), n.executor) for n in b.nodes]
    assert a.connections == b.connections


# ---------------------------------------------------------------- declared data kinds


def test_type_mismatch_names_both_nodes_the_field_and_the_types():
    doc = manifest([
        {"id": "sum", "node_type": "ChecksumNode"},  # outputs json
        {"id": "ch", "node_type": "AudioChunkerNode"},  # accepts audio
    ])
    (mismatch,) = [i for i in issues_of(doc) if i.code == "type_mismatch"]
    assert mismatch.path == "$.connections[0]" and mismatch.node_id == "ch" and mismatch.field == "input_types"
    assert mismatch.extra == {"from": "sum", "to": "ch", "outputs": ["json"], "accepts": ["audio"]}
    assert "sum (ChecksumNode) outputs json" in mismatch.message
    assert "ch (AudioChunkerNode) accepts only audio" in mismatch.message


def test_a_node_that_declares_no_types_accepts_and_feeds_anything():
    validate(manifest([{"id": "sum", "node_type": "ChecksumNode"},  # json → any
                       {"id": "echo", "node_type": "EchoNode"},  # any → audio
                       {"id": "ch", "node_type": "AudioChunkerNode"}]), REG)


def test_types_that_share_one_kind_connect():
    doc = manifest([{"id": "p", "node_type": "PassThroughNode", "output_types": ["json", "audio"]},
                    {"id": "ch", "node_type": "AudioChunkerNode"}])
    assert validate(doc, REG).node("p").output_types == (DataKind.JSON, DataKind.AUDIO)


def test_fan_in_checks_every_connection_on_its_own():
    doc = manifest([
        {"id": "a", "node_type": "AudioChunkerNode"},
        {"id": "j", "node_type": "ChecksumNode"},
        {"id": "rs", "node_type": "AudioResampleNode", "params": {"target_sample_rate": 16000}},
    ], connections=[("a", "rs"), ("j", "rs")])
    found = [i for i in issues_of(doc) if i.code == "type_mismatch"]
    assert [(i.extra["from"], i.extra["to"], i.path) for i in found] == [("j", "rs", "$.connections[1]")]


def test_a_manifest_narrows_a_nodes_types_but_cannot_widen_them():
    # narrowing a node that takes anything: then checked along its connections
    narrowed = manifest([{"id": "sum", "node_type": "ChecksumNode"},
                         {"id": "p", "node_type": "PassThroughNode", "input_types": ["text"]}])
    (mismatch,) = issues_of(narrowed)
    assert mismatch.code == "type_mismatch" and mismatch.extra["accepts"] == ["text"]
    # within the class's own kinds: fine
    validate(manifest([{"id": "ch", "node_type": "AudioChunkerNode", "input_types": ["audio"]}]), REG)
    # wider than the class handles: refused, on the node, naming the field and both sets of kinds
    for field, node_type, declared in [("input_types", "AudioChunkerNode", ["text"]),
                                       ("input_types", "AudioChunkerNode", ["audio", "any"]),
                                       ("output_types", "ChecksumNode", ["audio"])]:
        (issue,) = issues_of(manifest([{"id": "n", "node_type": node_type, field: declared}]))
        assert (issue.code, issue.node_id, issue.field, issue.path) == \
            ("type_declaration", "n", field, f"$.nodes[0].{field}"), issue
        assert issue.extra["declared"] == declared and node_type in issue.message, issue


def test_declared_types_in_a_proto_manifest_are_checked_the_same():
    from engine._proto import common_pb2

    pm = execution_pb2.PipelineManifest(version="v1")
    pm.metadata.name = "proto"
    node = pm.nodes.add(id="ch", node_type="AudioChunkerNode", params="")
    node.input_types.append(common_pb2.DATA_TYPE_HINT_TEXT)
    (issue,) = issues_of(pm)
    assert (issue.code, issue.field) == ("type_declaration", "input_types")


def test_planned_nodes_say_which_kinds_they_accept():
    from engine.config import SessionSettings
    from engine.plan import build_plan

    doc = manifest([{"id": "p", "node_type": "PassThroughNode"},
                    {"id": "ch", "node_type": "AudioChunkerNode"},
                    {"id": "n", "node_type": "PassThroughNode", "input_types": ["audio", "text"]}],
                   connections=[("p", "ch")])
    plan = build_plan(validate(doc, REG), REG, SessionSettings())
    assert plan.nodes["p"].accepted_kinds is None
    assert plan.nodes["ch"].accepted_kinds == {DataKind.AUDIO}
    assert plan.nodes["n"].accepted_kinds == {DataKind.AUDIO, DataKind.TEXT}
