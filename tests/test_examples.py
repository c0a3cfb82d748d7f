"""The examples and the README's embedding snippet, run as a user runs them: from
another directory, against a real server, and without one."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


async def run_script(cwd: Path, *args: str, limit_s: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, cwd=cwd, env=ENV,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(limit_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_grpc_client_from_another_directory(server, tmp_path):
    rc, out, err = await run_script(tmp_path, str(EXAMPLES / "grpc_client.py"), server.address)
    assert rc == 0, err
    assert re.search(r"unary: 16000 samples @ 16000 Hz", out), out
    assert "stream: session" in out and "stream closed" in out


async def test_examples_without_a_server_say_so_in_one_line(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    rc, out, err = await run_script(tmp_path, str(EXAMPLES / "grpc_client.py"), address)
    assert rc == 1 and err.strip() == f"no server at {address} (start one with `make run`)", err
    question = tmp_path / "q.wav"
    with wave.open(str(question), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(1600, "<i2").tobytes())
    rc, out, err = await run_script(tmp_path, str(EXAMPLES / "voice_client.py"), str(question),
                                    str(tmp_path / "r.wav"), "--address", address)
    assert rc == 1 and err.strip() == f"no server at {address} (start one with `make run`)", err


async def test_voice_client_usage(tmp_path):
    rc, out, err = await run_script(tmp_path, str(EXAMPLES / "voice_client.py"))
    assert rc == 2 and "usage: voice_client.py" in err and "IndexError" not in err
    rc, out, _ = await run_script(tmp_path, str(EXAMPLES / "voice_client.py"), "--help")
    assert rc == 0 and "--address" in out and "16 kHz mono" in out


async def test_readme_embedding_snippet_from_another_directory(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = [textwrap.dedent(code) for indent, code in
              re.findall(r"^( *)```python\n(.*?)^\1```", readme, re.S | re.M)]
    snippet = next(b for b in blocks if "from engine import Engine" in b and "engine.stream(" in b)
    (tmp_path / "embed.py").write_text(snippet)
    rc, out, err = await run_script(tmp_path, "embed.py")
    assert rc == 0, err
    assert "audio 16000 frames" in out or "AudioData" in out, out


@pytest.fixture
def question_wav(tmp_path):
    """Spoken before the server's leak snapshot: the voice that speaks it belongs to the test."""
    from nodes.speech.spoken import question

    audio = (question("What is the capital of France?") * 32767).astype("<i2")
    src = tmp_path / "question.wav"
    with wave.open(str(src), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(audio.tobytes())
    return src


@pytest.mark.speech
async def test_voice_client_talks_to_the_voice_loop_and_reports_what_it_measured(question_wav, server, tmp_path):
    src = question_wav
    rc, out, err = await run_script(tmp_path, str(EXAMPLES / "voice_client.py"), str(src), "reply.wav",
                                    "--address", server.address, limit_s=180)
    assert rc == 0, err
    assert "capital of france" in re.search(r"^heard: (.*)$", out, re.M).group(1).lower(), out
    assert "paris" in re.search(r"^reply: (.*)$", out, re.M).group(1).lower(), out
    assert re.search(r"^end of speech → first reply audio: \d+ ms$", out, re.M), out
    assert (tmp_path / "reply.wav").stat().st_size > 10_000


async def test_voice_client_says_why_sending_failed(server, tmp_path):
    # a copy without its manifest beside it: the request stream fails while it is made,
    # which gRPC alone reports only as "Exception iterating requests!"
    import shutil

    script = tmp_path / "voice_client.py"
    shutil.copy(EXAMPLES / "voice_client.py", script)
    question = tmp_path / "q.wav"
    with wave.open(str(question), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(1600, "<i2").tobytes())
    rc, out, err = await run_script(tmp_path, str(script), str(question), "r.wav", "--address", server.address)
    assert rc == 1 and err.strip().startswith("error while sending: "), err
    assert "speech_to_speech.json" in err and "Exception iterating requests" not in err


@pytest.mark.parametrize("manifest", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_every_example_manifest_validates(manifest, tmp_path):
    # as a user checks one, from another directory (the speech examples need the speech extra)
    res = subprocess.run([sys.executable, "-m", "engine", "validate", str(EXAMPLES / manifest)],
                         capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"{manifest}: valid (" in res.stdout, res.stdout
