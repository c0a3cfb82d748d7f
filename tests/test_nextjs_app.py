"""The RemoteMedia Next.js speech app's pipelines, sent the way its routes send
them (tests/node_client/app_client.js: the original nodejs-client's mapping
and reading), against a real server with the real models.

The manifests in tests/fixtures/nextjs_app are the app's own (commit 22a42e1
of its repository): built by its route and pipeline-builder code, camelCase
params, descriptions and `config` block included. Questions are spoken by
espeak-ng, a voice none of the bundled models speaks with.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soxr
from speech_audio import espeak, spoken, wer

from engine import Engine
from engine.errors import ValidationError

pytestmark = pytest.mark.speech

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "node_client" / "app_client.js"
FIXTURES = HERE / "fixtures" / "nextjs_app"
APP_MANIFESTS = sorted(FIXTURES.glob("*.json"))


@pytest.fixture(scope="module")
def checker():
    """Whisper tiny.en on its standard (not the fitted) decoding path judges what
    the replies say; loaded before any leak snapshot, like onnxruntime's first
    session (Piper speaking once), which opens a cache database kept open for the
    life of the process."""
    from nodes.speech.whisper import WhisperNode

    spoken("Hello.")
    node = WhisperNode("check", {"window_s": 30})
    node.initialize()
    return node


async def _app(server, flow: str, fixture: str, out: Path, *inputs: Path) -> dict:
    node = shutil.which("node")
    assert node, "Node.js is needed (see README)"
    proc = await asyncio.create_subprocess_exec(
        node, str(CLIENT), server.address, flow, str(FIXTURES / fixture), str(out), *map(str, inputs),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, stderr.decode()
    seen = json.loads(stdout)
    assert "failure" not in seen, seen["failure"]
    assert seen["error"] is None, f"the server answered with an error: {seen['error']}"
    return seen


def _espeak_copies() -> set[str]:
    """The copies of espeak-ng phonemizer makes in temporary folders (one per wrapper)."""
    return {str(p) for p in Path(tempfile.gettempdir()).glob("tmp*/libespeak-ng.so")}


def _f32(path: Path, audio: np.ndarray) -> Path:
    path.write_bytes(np.ascontiguousarray(audio, dtype="<f4").tobytes())
    return path


def _heard(checker, raw: Path, rate: int = 24_000) -> str:
    audio = np.frombuffer(raw.read_bytes(), dtype="<f4")
    assert audio.size and float(np.abs(audio).max()) > 0.05, "the reply audio is silent"
    text, _ = checker.transcribe(soxr.resample(audio, rate, 16_000).astype(np.float32))
    return text


@pytest.mark.parametrize("fixture", [p.name for p in APP_MANIFESTS])
async def test_every_app_manifest_validates(fixture):
    async with Engine() as engine:
        m = engine.validate(FIXTURES / fixture)
    assert m.nodes, fixture


async def test_unknown_params_of_a_stand_in_are_refused_by_name():
    doc = json.loads((FIXTURES / "simple-s2s.json").read_text())
    params = json.loads(doc["nodes"][0]["params"])
    doc["nodes"][0]["params"] = json.dumps({**params, "temprature": 0.5})
    async with Engine() as engine:
        with pytest.raises(ValidationError) as exc:
            engine.validate(doc)
    (issue,) = exc.value.issues
    assert issue.node_id == "lfm2_audio" and issue.field == "temprature", issue
    assert "served by" in issue.message and "WhisperNode" in issue.message, issue.message


async def test_tts_page_speaks_the_text_after_close(make_server, checker, tmp_path):
    """Page `/`: one text chunk, then CLOSE and half-close at once; every audio
    result still comes, float32 mono 24 kHz, and says the text."""
    espeak_copies = _espeak_copies()
    srv = await make_server(test_nodes=False)
    seen = await _app(srv, "tts", "tts.json", tmp_path / "tts.f32")
    await srv.aclose()
    left = _espeak_copies() - espeak_copies
    assert not left, f"Kokoro's node process left temporary folders: {sorted(left)}"
    assert "ready" in seen["kinds"] and seen["kinds"][-1] == "closed", seen["kinds"]
    assert seen["sample_rates"] == [24_000] and seen["audio_results"] >= 1, seen
    heard = _heard(checker, tmp_path / "tts.f32")
    assert wer("Hello from the Next.js app.", heard) <= 0.34, heard


async def test_s2s_page_answers_two_turns_on_one_stream(make_server, checker, tmp_path):
    """Page `/s2s`: one persistent stream, a whole utterance per turn (24 kHz
    float32, sessionId/reset metadata); each turn gets text and audio."""
    srv = await make_server(test_nodes=False)
    questions = ["What is the capital of France?", "Name a color of the sky."]
    files = [_f32(tmp_path / f"q{i}.f32", espeak(q, 24_000, wpm=140 + 25 * i)) for i, q in enumerate(questions)]
    seen = await _app(srv, "s2s", "simple-s2s.json", tmp_path, *files)
    assert len(seen["turns"]) == 2, seen
    for i, turn in enumerate(seen["turns"]):
        assert turn["texts"], f"turn {i} got no text: {turn}"
        assert turn["sample_rate"] == 24_000 and turn["audio_bytes"] > 0, turn
        heard = _heard(checker, tmp_path / f"turn{i}.f32")
        assert wer(turn["texts"][0], heard) <= 0.5, (turn["texts"], heard)


async def test_vad_page_answers_a_question_sent_as_44k_blocks(make_server, checker, tmp_path):
    """Page `/vad-s2s` (WebSocket variant): 64 ms float32 blocks at 44.1 kHz with
    channels 0 and format 0, though the manifest says 48 kHz; LFM2AudioNode
    (text_only false) answers with text ended by <|text_end|>, and audio."""
    srv = await make_server(test_nodes=False)
    question = espeak("What is the capital of France?", 44_100, wpm=160, tail_s=2.5)
    seen = await _app(srv, "vad", "vad-s2s-streaming.json", tmp_path / "reply.f32",
                      _f32(tmp_path / "q.f32", question))
    assert "<|text_end|>" in seen["texts"], seen["texts"]
    reply = " ".join(t for t in seen["texts"] if not t.startswith("<|")).strip()
    assert reply, seen
    heard = _heard(checker, tmp_path / "reply.f32")
    assert wer(reply, heard) <= 0.5, (reply, heard)
