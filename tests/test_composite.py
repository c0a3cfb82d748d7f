"""Composite node types (engine.composite): defined in the configuration, named
by a manifest as one node, run as their inner nodes, seen from outside as
the outer node (inputs, outputs, errors)."""

from __future__ import annotations

import logging

import pytest

from engine import Engine, RuntimeData
from engine.catalog import default_registry
from engine.config import RuntimeConfig
from engine.errors import NodeExecutionError, ValidationError

#: echo (a node process) → pass (in the engine), the outer param `crash_after` → a CrashNode
PAIR = {
    "description": "echo then pass",
    "input": "echo",
    "outputs": ["echo", "pass"],
    "params": {"crash_after": "crash.after"},
    "defaults": {"with_crash": False},
    "inert_params": {"device": "runs on CPU here"},
    "nodes": [
        {"id": "echo", "node_type": "EchoNode"},
        {"id": "pass", "node_type": "PassThroughNode"},
        {"id": "crash", "node_type": "CrashNode", "when": {"with_crash": True}},
    ],
    "connections": [{"from": "echo", "to": "pass"}, {"from": "echo", "to": "crash"}],
}


def _config(**composites):
    return {"test_nodes": True, "ipc_root": "/tmp/remotemedia-engine-test", "composites": composites}


def _manifest(params=None, downstream=False):
    nodes = [{"id": "outer", "node_type": "Pair", "params": params or {}}]
    conns = []
    if downstream:
        nodes.append({"id": "after", "node_type": "PassThroughNode"})
        conns.append({"from": "outer", "to": "after"})
    return {"version": "v1", "metadata": {"name": "composite"}, "nodes": nodes, "connections": conns}


async def test_a_composite_sink_sends_every_output_nodes_frames_under_its_id():
    async with Engine(_config(Pair=PAIR)) as engine:
        result = await engine.execute(_manifest({"device": "cuda"}), {"outer": RuntimeData.text("hi")})
    assert set(result.outputs) == {"outer"}
    assert [f.text for f in result.all_outputs["outer"]] == ["hi", "hi"]  # echo's and pass's


async def test_a_composite_with_a_downstream_feeds_it_from_its_output_nodes():
    async with Engine(_config(Pair=PAIR)) as engine:
        result = await engine.execute(_manifest(downstream=True), {"outer": RuntimeData.text("hi")})
    assert set(result.outputs) == {"after"}
    assert [f.text for f in result.all_outputs["after"]] == ["hi", "hi"]


async def test_an_inner_nodes_error_names_the_composite():
    async with Engine(_config(Pair=PAIR)) as engine:
        with pytest.raises(NodeExecutionError) as exc:
            await engine.execute(_manifest({"with_crash": True, "crash_after": 0}), {"outer": RuntimeData.text("x")})
    assert exc.value.node_id == "outer" and exc.value.context["inner_node"] == "outer.crash", exc.value


async def test_params_are_checked_as_the_composites_and_the_inner_nodes():
    async with Engine(_config(Pair=PAIR)) as engine:
        with pytest.raises(ValidationError) as exc:
            engine.validate(_manifest({"crash_afterr": 1}))
        (issue,) = exc.value.issues
        assert (issue.node_id, issue.field) == ("outer", "crash_afterr") and "served by" in issue.message
        with pytest.raises(ValidationError) as exc:
            engine.validate(_manifest({"with_crash": True, "crash_after": -1}))
        (issue,) = exc.value.issues
        assert issue.node_id == "outer" and "crash" in issue.message and "CrashNode" in issue.message, issue


async def test_inert_params_are_named_once_in_the_sessions_log(caplog):
    caplog.set_level(logging.INFO, logger="engine")
    async with Engine(_config(Pair=PAIR)) as engine:
        await engine.execute(_manifest({"device": "cuda"}), {"outer": RuntimeData.text("hi")})
    notes = [r.getMessage() for r in caplog.records if "mean" in r.getMessage()]
    assert notes == ["node outer (Pair): param device means nothing on this server and is ignored "
                     "(device: runs on CPU here)"], notes


def test_composites_are_listed_and_bad_ones_reported():
    bad = {**PAIR, "outputs": ["nowhere"]}
    registry = default_registry(RuntimeConfig.load(_config(Pair=PAIR, Broken=bad), env={}))
    assert "Pair" in registry.names() and "Broken" not in registry.names()
    (failure,) = [f for f in registry.failures if "Broken" in str(f)]
    assert "'nowhere'" in failure.error, failure
    taken = default_registry(RuntimeConfig.load(_config(EchoNode=PAIR), env={}))
    assert any("stand_in" in f.error for f in taken.failures), taken.failures


async def test_a_stand_in_serves_only_where_the_class_cannot_run():
    def tts(**params):
        return {"version": "v1", "metadata": {"name": "tts"},
                "nodes": [{"id": "tts", "node_type": "KokoroTTSNode", "params": params}], "connections": []}

    async with Engine() as engine:
        # the packaged weights are installed (speech extra): the class itself serves
        assert engine.validate(tts(voice="af_bella")).served_by == {}
        # weights that are not here: the stand-in (Piper at 24 kHz) serves
        m = engine.validate(tts(model_path="/nonexistent/kokoro.onnx"))
        assert "PiperTTSNode" in m.served_by["tts"] and [n.id for n in m.nodes] == ["tts.tts"]
    # the operator's override: the composite serves even where the class can run
    async with Engine({"composites": {"KokoroTTSNode": {"override": True, "nodes": [
            {"id": "tts", "node_type": "PiperTTSNode"}]}}}) as engine:
        assert "PiperTTSNode" in engine.validate(tts()).served_by["tts"]
    # a stand-in that cannot run either: validation says what is missing, naming the node
    async with Engine({"composites": {"KokoroTTSNode": {"stand_in": True, "params": {"model_path": "t.model_path"},
                                                        "nodes": [{"id": "t", "node_type": "KokoroTTSNode"}]}}}
                      ) as engine:
        with pytest.raises(ValidationError) as exc:
            engine.validate(tts(model_path="/nonexistent/kokoro.onnx"))
        assert any(i.node_id == "tts" and "/nonexistent/kokoro.onnx" in i.message for i in exc.value.issues)


def test_camel_case_params_reach_every_node():
    registry = default_registry(RuntimeConfig.load({}, env={}))
    vad = registry.get("SileroVADNode")
    assert vad.normalize_params({"minSilenceDurationMs": 700})["min_silence_duration_ms"] == 700
    collector = registry.get("TextCollectorNode")
    assert collector.normalize_params({"splitPattern": "[.]"})["split_pattern"] == "[.]"
    assert collector.normalize_params({"min_sentence_length": 5, "minSentenceLength": 9})["min_sentence_length"] == 5


def test_node_params_are_defaults_for_every_node_of_a_type():
    cfg = RuntimeConfig.load({"node_params": {"TextCollectorNode": {"minSentenceLength": 7},
                                              "WhisperNode": {"modle": "x"}, "NoSuchNode": {}}}, env={})
    registry = default_registry(cfg)
    collector = registry.get("TextCollectorNode")
    assert collector.normalize_params({})["min_sentence_length"] == 7
    assert collector.normalize_params({"minSentenceLength": 2})["min_sentence_length"] == 2  # the manifest wins
    failed = {str(f.source): f.error for f in registry.failures}
    assert "'modle'" in failed["module [node_params.WhisperNode] (runtime.toml)"], failed
    assert "NoSuchNode" in failed["module [node_params.NoSuchNode] (runtime.toml)"], failed
