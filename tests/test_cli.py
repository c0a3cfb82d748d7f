"""The command line: validate exit codes, run on generated audio and on a WAV file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from engine.audio_io import read_wav, write_wav
from engine.data import AudioData

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "audio_pipeline.json"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_validate_ok_and_errors(tmp_path):
    ok = cli("validate", str(EXAMPLE))
    assert ok.returncode == 0 and "valid" in ok.stdout
    doc = json.loads(EXAMPLE.read_text())
    doc["nodes"][0]["node_type"] = "AudioChunker"
    doc["connections"].append({"from": "output", "to": "chunker"})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    res = cli("validate", str(bad))
    assert res.returncode == 2
    assert "AudioChunkerNode" in res.stderr and "cycle" in res.stderr


def test_run_on_generated_audio():
    res = cli("run", str(EXAMPLE))
    assert res.returncode == 0, res.stderr
    assert "output: audio 32000 samples, 1 ch @ 16000 Hz I16" in res.stdout
    assert "chunker" in res.stdout and "busy" in res.stdout


def test_run_on_wav_file_writes_output(tmp_path):
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    write_wav(src, AudioData((np.sin(np.arange(48000) / 10) * 10000).astype(np.int16), 48000))
    res = cli("run", str(EXAMPLE), "--input", str(src), "--output", str(dst))
    assert res.returncode == 0, res.stderr
    out = read_wav(dst)
    assert out.sample_rate == 16000 and out.frames == 16000


def test_nodes_lists_every_node_type(tmp_path):
    res = cli("nodes")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["NODE", "TYPE", "EXECUTOR", "INPUT", "->", "OUTPUT", "SOURCE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["AudioChunkerNode"] == ["AudioChunkerNode", "native", "audio", "->", "audio", "built-in"]
    assert rows["WhisperNode"][:2] == ["WhisperNode", "multiprocess"]
    assert "EchoNode" not in rows  # test nodes are off by default

    cfg = tmp_path / "runtime.toml"
    cfg.write_text("test_nodes = true\n")
    res = cli("nodes", "--json", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    listing = json.loads(res.stdout)
    assert listing["failed"] == []
    nodes = {n["node_type"]: n for n in listing["nodes"]}
    assert nodes["EchoNode"]["source"] == {"kind": "test"}
    chunker = nodes["AudioChunkerNode"]
    assert chunker["class"] == "nodes.audio:AudioChunkerNode" and chunker["source"] == {"kind": "builtin"}
    assert chunker["params_schema"]["type"] == "object" and chunker["params_schema"]["properties"]
    from engine.catalog import default_registry

    assert sorted(nodes) == default_registry(test_nodes=True).names()
