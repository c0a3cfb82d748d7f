"""Speech nodes with the real models; test audio is spoken by the project's own TTS."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import numpy as np
import pytest
import soxr
from grpc_client import CLOSE, collect, init, kinds, proto_manifest_from_dict, requests
from speech_audio import VOICE_LOOP, question, spoken

from engine import RuntimeData, wire
from engine._proto import streaming_pb2 as spb
from engine._proto import streaming_pb2_grpc as spb_grpc
from engine.errors import NodeExecutionError
from engine.manifest import load_document

pytestmark = pytest.mark.speech


@pytest.fixture(scope="module", autouse=True)
def test_models():
    """Models the tests themselves use (to speak questions, to check replies), loaded
    before any leak-checked fixture takes its snapshot: they belong to the test."""
    from nodes.speech.whisper import WhisperNode

    spoken("Hello.")
    checker = WhisperNode("check", {})
    checker.initialize()
    return {"asr": checker}

_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
            "7": "seven", "8": "eight", "9": "nine", "10": "ten"}


def words(text: str) -> list[str]:
    out = []
    for w in re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split():
        out.append(_NUMBERS.get(w, w))
    return out


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance / reference length."""
    ref, hyp = words(reference), words(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)] / max(1, len(ref))


def one(node_id: str, node_type: str, **params) -> dict:
    return {"version": "v1", "metadata": {"name": "speech-test"},
            "nodes": [{"id": node_id, "node_type": node_type, "params": params}], "connections": []}


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


# ---------------------------------------------------------------- each model


async def test_tts_streams_non_silent_audio_at_the_declared_rate(mp_engine):
    text = "The weather is nice today. Let us go for a walk in the park."
    result = await mp_engine.execute(one("tts", "PiperTTSNode"), {"tts": RuntimeData.text(text)})
    frames = result.all_outputs["tts"]
    assert len(frames) == 2  # one per sentence, streamed
    for f in frames:
        assert f.sample_rate == 22050 and f.channels == 1
        assert rms(f.samples) > 0.01
    assert 2.0 < sum(f.duration_s for f in frames) < 10.0
    result = await mp_engine.execute(one("tts", "PiperTTSNode", output_sample_rate=16000, speed=1.5),
                                     {"tts": RuntimeData.text("Hello there.")})
    assert result.outputs["tts"].sample_rate == 16000


async def test_asr_transcribes_known_sentences(mp_engine):
    sentences = ["The quick brown fox jumps over the lazy dog.",
                 "Please call me back before six o'clock tonight.",
                 "What is the capital of France?"]
    errors = []
    for s in sentences:
        audio = spoken(s)
        result = await mp_engine.execute(one("asr", "WhisperNode"),
                                         {"asr": RuntimeData.audio(audio, 16000)})
        text = result.outputs["asr"].text
        errors.append(wer(s, text))
        assert float(result.outputs["asr"].metadata["asr_ms"]) > 0
    assert sum(errors) / len(errors) < 0.15, errors


async def test_vad_finds_the_speech_segments(mp_engine):
    a, b = spoken("Good morning everyone."), spoken("This is a test of the speech detector.")
    rng = np.random.default_rng(1)
    parts = [np.zeros(8000), a, np.zeros(16000), b, np.zeros(16000)]
    audio = np.concatenate(parts).astype(np.float32)
    audio += rng.normal(0, 0.003, audio.size).astype(np.float32)
    starts_true = [0.5, 0.5 + a.size / 16000 + 1.0]
    ends_true = [0.5 + a.size / 16000, starts_true[1] + b.size / 16000]
    result = await mp_engine.execute(one("vad", "SileroVADNode", min_silence_duration_ms=320),
                                     {"vad": RuntimeData.audio(audio, 16000)})
    t, starts, ends = 0.0, [], []
    for f in result.all_outputs["vad"]:
        event = f.metadata.get("vad_event")
        if event == "speech_start":
            starts.append(t)
        elif event == "speech_end":
            ends.append(t + f.duration_s - 0.320)  # the end is confirmed after the silence
        t += f.duration_s
    assert len(starts) == 2 and len(ends) == 2, (starts, ends)
    for got, want in zip(starts + ends, starts_true + ends_true, strict=True):
        assert abs(got - want) < 0.25, (starts, ends, starts_true, ends_true)


async def test_llm_answers_with_streamed_phrases(mp_engine):
    result = await mp_engine.execute(one("llm", "LlamaCppNode", max_tokens=40),
                                     {"llm": RuntimeData.text("Name three colors.")})
    phrases = result.all_outputs["llm"]
    assert phrases[-1].metadata["final"] == "1"
    assert " ".join(p.text for p in phrases).strip()
    assert all(p.metadata["transcript"] == "Name three colors." for p in phrases)


async def test_lfm2_without_a_model_file_is_a_clear_init_error(mp_engine):
    with pytest.raises(NodeExecutionError) as info:
        await mp_engine.execute(one("brain", "LFM2Node"), {"brain": RuntimeData.text("hi")})
    assert info.value.node_id == "brain"
    assert "model_path" in str(info.value) and "LFM2" in str(info.value)


# ---------------------------------------------------------------- the turn logic


def _windows(events: list[str | None]) -> list[RuntimeData]:
    out = []
    for e in events:
        meta = {"vad_event": e} if e else {}
        if e == "speech_start":
            meta["vad_pad_ms"] = "0"
        out.append(RuntimeData.audio(np.full(512, 0.1, np.float32), 16000, metadata=meta))
    return out


def test_accumulator_speculates_cancels_and_commits():
    from nodes.speech.accumulator import AudioBufferAccumulatorNode

    node = AudioBufferAccumulatorNode("acc", {"min_utterance_duration_ms": 100, "speculative_delay_ms": 64})
    seq = ["speech_start", None, None, None, "speech_pause", None, None,  # speculative emission (id 0)
           "speech_resume", None, None,                                     # → cancel 0
           "speech_pause", None, None, None, "speech_end"]                  # emission id 1, commit 1
    out = [o for f in _windows(seq) for o in node.process(f)]
    described = [(o.kind.name, o.metadata.get("utterance_id"), getattr(o, "value", {}).get("event")
                  if o.kind.name == "JSON" else o.metadata.get("speculative")) for o in out]
    assert described == [("AUDIO", "0", "1"), ("JSON", "0", "cancel"), ("AUDIO", "1", "1"), ("JSON", "1", "commit")]
    assert out[2].frames > out[0].frames  # the second emission holds all the speech


def test_tts_holds_speculative_audio_until_commit_and_drops_it_on_cancel():
    from nodes.speech.common import control
    from nodes.speech.tts import PiperTTSNode

    async def run(node, frame):
        return [x async for x in node.process(frame)]

    async def go():
        node = PiperTTSNode("tts", {})
        await asyncio.to_thread(node.initialize)
        held = await run(node, RuntimeData.text("Paris.", metadata={"utterance_id": "7"}))
        assert held == []
        released = await run(node, control("commit", "7"))
        assert len(released) == 1 and released[0].metadata["text"] == "Paris."
        live = await run(node, RuntimeData.text("It is big.", metadata={"utterance_id": "7"}))
        assert len(live) == 1  # committed: straight out
        assert await run(node, RuntimeData.text("Rome.", metadata={"utterance_id": "8"})) == []
        assert await run(node, control("cancel", "8")) == []
        assert await run(node, control("commit", "8")) == []  # cancelled stays cancelled
        assert await run(node, RuntimeData.text("More.", metadata={"utterance_id": "8"})) == []

    asyncio.run(go())


# ---------------------------------------------------------------- the voice loop


def _voice_manifest():
    return load_document(VOICE_LOOP)


async def _talk(channel, audio: np.ndarray, chunk: int = 512) -> list[spb.StreamResponse]:
    reqs = [init(proto_manifest_from_dict(_voice_manifest()))]
    for seq, i in enumerate(range(0, audio.size, chunk)):
        c = spb.DataChunk(node_id="vad", sequence=seq)
        wire.to_proto(RuntimeData.audio(audio[i:i + chunk], 16000), c.buffer)
        reqs.append(spb.StreamRequest(data_chunk=c))
    reqs.append(CLOSE)
    return await collect(spb_grpc.StreamingPipelineServiceStub(channel).StreamPipeline(requests(*reqs)))


def _reply(responses: list[spb.StreamResponse]) -> tuple[np.ndarray, str, str, int]:
    frames = [wire.from_proto(r.result.data_outputs["tts"]) for r in responses
              if r.WhichOneof("response") == "result"]
    assert frames, kinds(responses)
    audio = np.concatenate([f.samples for f in frames])
    text = " ".join(f.metadata["text"] for f in frames)
    return audio, text, frames[0].metadata["transcript"], frames[0].sample_rate


async def test_voice_loop_over_grpc(server, channel, test_models):
    q = "What is the capital of France?"
    responses = await _talk(channel, question(q))
    assert kinds(responses)[-1] == "closed"
    reply_audio, reply_text, transcript, rate = _reply(responses)
    assert wer(q, transcript) < 0.2
    assert rms(reply_audio) > 0.01
    # the reply audio says what the LLM wrote
    heard, _ = await asyncio.to_thread(test_models["asr"].transcribe, soxr.resample(reply_audio, rate, 16000).astype(np.float32))
    assert wer(reply_text, heard) < 0.35, (reply_text, heard)


async def test_two_voice_sessions_do_not_interfere(server, channel):
    questions = ["What is the capital of France?", "How many legs does a spider have?"]
    results = await asyncio.gather(*(_talk(channel, question(q)) for q in questions))
    ids = set()
    for q, responses in zip(questions, results, strict=True):
        ids.add(responses[0].ready.session_id if kinds(responses)[0] == "ready" else
                next(r.ready.session_id for r in responses if r.WhichOneof("response") == "ready"))
        _audio, _text, transcript, _rate = _reply(responses)
        assert wer(q, transcript) < 0.2, (q, transcript)
    assert len(ids) == 2


@pytest.mark.parametrize("victim", ["asr", "llm", "tts"])
async def test_killing_a_model_process_fails_the_session_cleanly(mp_engine, victim):
    manifest = _voice_manifest()
    async with mp_engine.stream(manifest) as session:
        pid = session.runners[victim].pid
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(NodeExecutionError) as info:
            async for _ in session:  # the death ends the output stream with the error
                pass
        assert info.value.node_id == victim
        assert "SIGKILL" in str(info.value)
    await session.wait_closed()
