"""The command line as a new user meets it: --version, help with defaults, -v anywhere,
one-line errors with a non-zero exit code, `bench` and audio files from any directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

import engine
from engine.cli import _Formatter, build_parser

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "audio_pipeline.json"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=ENV)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("remotemedia-engine: error: ")
    return lines[0]


def test_version(tmp_path):
    res = cli("--version", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f"remotemedia-engine {engine.__version__}"


def test_every_option_has_help_that_shows_its_default():
    parser = build_parser()
    formatter = _Formatter("remotemedia-engine")
    subparsers = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, sub in [("", parser), *subparsers.choices.items()]:
        for action in sub._actions:
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            text = formatter._get_help_string(action)
            assert action.help and "(default" in text, f"{name} {action.option_strings}: {text!r}"


def test_verbose_after_the_subcommand_without_grpc_internals(tmp_path):
    res = cli("run", str(EXAMPLE), "-v", "--seconds", "0.2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "DEBUG engine" in res.stderr and "session ready" in res.stderr
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", "0", "-v"], cwd=tmp_path,
                            env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serving remotemedia.v1" in line:
                break
        proc.send_signal(signal.SIGINT)
        lines += proc.stderr.readlines()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    text = "".join(lines)
    assert "serving remotemedia.v1" in text
    assert not [ln for ln in lines if " DEBUG grpc" in ln], text


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_grpc_port_in_use(tmp_path, busy_port):
    line = one_line_error(cli("serve", "--port", str(busy_port), cwd=tmp_path, timeout=60))
    assert f"cannot listen on 127.0.0.1:{busy_port}: address already in use" in line


def test_metrics_port_in_use(tmp_path, busy_port):
    res = cli("serve", "--port", "0", "--metrics-port", str(busy_port), cwd=tmp_path, timeout=60)
    line = one_line_error(res)
    assert f"cannot serve metrics on 127.0.0.1:{busy_port}: Address already in use" in line
    assert res.returncode == 2


def test_bad_toml_and_missing_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1\n")
    line = one_line_error(cli("serve", "--config", str(bad), cwd=tmp_path))
    assert f"{bad} is not valid TOML" in line
    line = one_line_error(cli("validate", str(EXAMPLE), "--config", str(tmp_path / "nope.toml"), cwd=tmp_path))
    assert "cannot read config" in line and "No such file or directory" in line
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[server]\nprot = 1\n")
    line = one_line_error(cli("serve", "--config", str(unknown), cwd=tmp_path))
    assert "server.prot" in line and "unknown configuration key" in line


def test_unreadable_input_says_why(tmp_path):
    text_file = tmp_path / "hostname"
    text_file.write_text("myhost\n")
    line = one_line_error(cli("run", str(EXAMPLE), "--input", str(text_file), cwd=tmp_path))
    assert line.endswith(f"cannot read audio file {text_file}: Format not recognised.")
    line = one_line_error(cli("run", str(EXAMPLE), "--input", str(tmp_path / "missing.wav"), cwd=tmp_path))
    assert "cannot read audio file" in line and "No such file" in line


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_U8"), ("WAV", "PCM_24"), ("WAV", "FLOAT"),
                                         ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_run_reads_audio_formats_and_resamples_to_the_first_nodes_rate(tmp_path, fmt, subtype):
    # a VAD-like first node that declares sampling_rate: input at 44.1 kHz is resampled to 16 kHz
    doc = {"version": "v1", "metadata": {"name": "rate"},
           "nodes": [{"id": "vad", "node_type": "PassThroughNode", "params": {"sampling_rate": 16000}}],
           "connections": []}
    src = tmp_path / f"in.{fmt.lower()}"
    t = np.arange(44_100) / 44_100
    soundfile.write(src, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44_100, format=fmt,
                    subtype=subtype)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(doc))
    res = cli("run", str(manifest), "--input", str(src), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "1.00 s @ 44100 Hz, resampled to 16000 Hz" in res.stdout
    assert "vad: audio 16000 samples, 1 ch @ 16000 Hz" in res.stdout

    resampling = ROOT / "examples" / "audio_pipeline.json"  # chunker → resampler → 16 kHz
    res = cli("run", str(resampling), "--input", str(src), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "output: audio 16000 samples, 1 ch @ 16000 Hz" in res.stdout


def test_the_speech_manifests_first_node_rate_is_its_schema_default():
    from engine.catalog import default_registry
    from engine.cli import _target_rate
    from engine.manifest import validate

    registry = default_registry()
    manifest = validate(ROOT / "examples" / "speech_to_speech.json", registry)
    assert _target_rate(registry, manifest, "vad") == 16000


def test_bench_list_from_another_directory(tmp_path):
    res = cli("bench", "list", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("scenarios:") and "grpc_unary" in res.stdout
