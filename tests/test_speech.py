"""Speech nodes with the real models; test audio is spoken by the project's own TTS."""

from __future__ import annotations

import asyncio
import collections
import os
import signal

import numpy as np
import psutil
import pytest
import soxr
from conftest import eventually
from grpc_client import CLOSE, collect, init, kinds, proto_manifest_from_dict, requests
from speech_audio import VOICE_LOOP, paused, question, spoken, wer
from voice_call import VoiceCall

from engine import RuntimeData
from engine._proto import streaming_pb2 as spb
from engine._proto import streaming_pb2_grpc as spb_grpc
from engine.catalog import default_registry
from engine.errors import NodeExecutionError
from engine.manifest import load_document
from engine.server import wire
from engine.turns import TurnEvent, turn_of

pytestmark = pytest.mark.speech


@pytest.fixture(scope="module", autouse=True)
def test_models():
    """Models the tests themselves use (to speak questions, to check replies), loaded
    before any leak-checked fixture takes its snapshot: they belong to the test."""
    from nodes.speech.whisper import WhisperNode

    spoken("Hello.")
    checker = WhisperNode("check", {"window_s": 30})  # the standard model judges
    checker.initialize()
    return {"asr": checker}

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


@pytest.mark.parametrize("window_s", [0, 30])  # fitted to the utterance, Whisper's standard
async def test_asr_transcribes_known_sentences(mp_engine, window_s):
    sentences = ["The quick brown fox jumps over the lazy dog.",
                 "Please call me back before six o'clock tonight.",
                 "What is the capital of France?"]
    errors = []
    for s in sentences:
        audio = spoken(s)
        result = await mp_engine.execute(one("asr", "WhisperNode", window_s=window_s),
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


def test_vad_skips_the_model_on_silence_and_hears_the_same():
    """Outside speech, windows below silence_floor_dbfs are scored silence at once and the
    model sees them only when something louder comes: a silent microphone costs no model
    run, and the segments found are exactly those of running the model on every window
    (Silero's state depends on seconds of history), quiet speech included."""
    from nodes.speech.vad import SileroVADNode

    speech = spoken("Is anybody there?")
    quiet = speech / np.abs(speech).max() * 10 ** (-45 / 20)  # quiet, still speech
    audio = np.concatenate([np.zeros(16000), speech, np.zeros(48000), quiet, np.zeros(96000)]).astype(np.float32)
    seen = {}
    for floor in (-60, -120):
        vad = SileroVADNode("vad", {"silence_floor_dbfs": floor, "min_silence_duration_ms": 320})
        vad.initialize()
        runs, probability = [0], vad.probability
        vad.probability = lambda w, p=probability, runs=runs: (runs.__setitem__(0, runs[0] + 1), p(w))[1]
        frames = vad.process(RuntimeData.audio(np.zeros(16000 * 5, np.float32), 16000))  # nobody speaks
        idle_runs = runs[0]
        frames = vad.process(RuntimeData.audio(audio, 16000))
        seen[floor] = [(i, f.metadata["vad_event"]) for i, f in enumerate(frames) if "vad_event" in f.metadata], idle_runs
    (gated, gated_idle), (full, full_idle) = seen[-60], seen[-120]
    assert [e for _, e in full].count("speech_start") == 2, full
    assert gated == full
    assert gated_idle == 0 and full_idle == 16000 * 5 // 512


def test_vad_skips_the_model_on_a_rooms_noise_and_hears_the_same():
    """In a room's steady noise (−50 dBFS, above the silence floor), windows within
    `noise_margin_db` of the noise are kept for the model like silence: few model runs while
    nobody speaks, and the same segments as running the model on every window."""
    from nodes.speech.vad import SileroVADNode

    rng = np.random.default_rng(3)
    speech = spoken("Is anybody there?")
    audio = np.concatenate([np.zeros(16000 * 5), speech, np.zeros(48000), 0.3 * speech, np.zeros(64000)])
    audio = (audio + rng.normal(0, 0.003, audio.size)).astype(np.float32)
    seen = {}
    for margin, floor in ((6, -60), (0, -120)):
        vad = SileroVADNode("vad", {"noise_margin_db": margin, "silence_floor_dbfs": floor,
                                    "min_silence_duration_ms": 320})
        vad.initialize()
        runs, probability = [0], vad.probability
        vad.probability = lambda w, p=probability, runs=runs: (runs.__setitem__(0, runs[0] + 1), p(w))[1]
        idle = vad.process(RuntimeData.audio(audio[:16000 * 5], 16000))  # the room, nobody speaking
        idle_runs = runs[0]
        frames = idle + vad.process(RuntimeData.audio(audio[16000 * 5:], 16000))
        seen[margin] = [(i, f.metadata["vad_event"]) for i, f in enumerate(frames) if "vad_event" in f.metadata], idle_runs
    (gated, gated_idle), (full, full_idle) = seen[6], seen[0]
    assert [e for _, e in full].count("speech_start") == 2, full
    assert gated == full
    assert full_idle == 16000 * 5 // 512 and gated_idle < full_idle // 10, (gated_idle, full_idle)


async def test_llm_answers_with_streamed_phrases(mp_engine):
    result = await mp_engine.execute(one("llm", "LlamaCppNode", max_tokens=40, first_phrase_max_words=3),
                                     {"llm": RuntimeData.text("Name three colors.")})
    phrases = result.all_outputs["llm"]
    assert len(phrases[0].text.split()) <= 3, phrases[0].text
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


def _described(frames: list[RuntimeData]) -> list[tuple[str, str]]:
    out = []
    for f in frames:
        event = TurnEvent.of(f)
        out.append(("utterance", turn_of(f)) if event is None else (event.kind, event.turn_id))
    return out


def _accumulator(**params):
    """An accumulator for `_windows`; their sound never ends (every window is as loud), so the
    speculative emission waits only for `speculative_delay_ms` unless `end_of_sound_max_wait_ms`
    is given."""
    from nodes.speech.accumulator import AudioBufferAccumulatorNode

    spec = default_registry().get("AudioBufferAccumulatorNode")
    return AudioBufferAccumulatorNode("acc", spec.normalize_params(
        {"min_utterance_duration_ms": 100, "speculative_delay_ms": 64, "min_endpointing_ms": 160,
         "max_endpointing_ms": 960, "endpointing_ms": 320, "end_of_sound_max_wait_ms": 0, **params}))


def _run(node, events: list[str | None]) -> list[RuntimeData]:
    return [o for f in _windows(events) for o in node.process(f)]


def test_accumulator_speculates_cancels_when_speech_resumes_and_commits_after_the_pause():
    node = _accumulator()
    out = _run(node, ["speech_start", None, None, None, "speech_pause", None, None,  # 96 ms: speculative 0
                      "speech_resume", None, None,                                    # → cancel 0
                      "speech_pause", *[None] * 10])                                   # speculative 1; commit
    assert _described(out) == [("utterance", "0"), ("cancel", "0"), ("utterance", "1"), ("commit", "1")]
    assert out[2].frames > out[0].frames  # the second emission holds all the speech
    assert out[0].metadata["speculative"] == "1"


def test_the_speculative_cut_waits_for_the_sound_to_end():
    """The VAD's pause can begin while a soft final consonant still sounds: the cut waits for a
    window as quiet as the noise before the speech (or for `end_of_sound_max_wait_ms`)."""
    rng = np.random.default_rng(0)
    noise = [rng.normal(0, 0.004, 512).astype(np.float32) for _ in range(20)]
    tail = [(n + rng.normal(0, 0.03, 512)).astype(np.float32) for n in noise[:4]]  # "...France": the s
    node = _accumulator(end_of_sound_max_wait_ms=1000, end_of_sound_db=6)
    frames = [RuntimeData.audio(n, 16000) for n in noise[:10]]
    frames += [RuntimeData.audio(np.full(512, 0.2, np.float32), 16000, metadata=m)
               for m in ({"vad_event": "speech_start", "vad_pad_ms": "0"}, {}, {})]
    frames += [RuntimeData.audio(t, 16000, metadata={"vad_event": "speech_pause"} if i == 0 else {})
               for i, t in enumerate(tail)]
    out = [o for f in frames for o in node.process(f)]
    assert _described(out) == []  # 128 ms of pause, past the 64 ms delay, but the sound goes on
    out = node.process(RuntimeData.audio(noise[10], 16000))
    assert _described(out) == [("utterance", "0")]
    assert out[0].frames == 512 * 8  # the whole sound, up to the first quiet window

    hurried = _accumulator(end_of_sound_max_wait_ms=96)
    out = [o for f in frames for o in hurried.process(f)]
    assert _described(out) == [("utterance", "0")] and out[0].frames == 512 * 6


@pytest.mark.parametrize(("probability", "pause_windows"), [(0.9, 5), (0.001, 30), (None, 10)])
def test_the_pause_that_ends_a_turn_follows_how_finished_it_looks(probability, pause_windows):
    """160 ms when the LLM finds the words finished, 960 ms when not, 320 ms with no estimate."""
    node = _accumulator()
    out = _run(node, ["speech_start", None, None, "speech_pause", None])  # speculative emission (64 ms)
    assert _described(out) == [("utterance", "0")]
    if probability is not None:
        node.on_turn_event(TurnEvent("eou", "0", {"probability": probability}))
    windows = 2  # of pause so far: the VAD's first quiet window and one more
    while not any(e == ("commit", "0") for e in _described(out)):
        out += _run(node, [None])
        windows += 1
        assert windows <= 40, "never committed"
    assert windows == pause_windows, f"committed after {windows} windows of pause"


def test_endpointing_shortens_on_a_log_scale_between_the_two_probabilities():
    node = _accumulator(min_endpointing_ms=100, max_endpointing_ms=1000,
                        likely_end_probability=0.1, unlikely_end_probability=0.001)
    assert node.endpointing_ms(0.5) == 100 and node.endpointing_ms(0.0001) == 1000
    assert node.endpointing_ms(0.01) == pytest.approx(550)  # halfway in log terms
    assert node.endpointing_ms(None) == 320 or node.p["endpointing_ms"] != 320


def test_a_turn_that_looks_certainly_finished_ends_after_the_quick_pause():
    """"What is the capital of France?" (0.93) ends sooner than "hello" (0.16), which a comma may follow."""
    node = _accumulator(min_endpointing_ms=350, quick_endpointing_ms=200, certain_end_probability=0.3)
    assert node.endpointing_ms(0.93) == 200 and node.endpointing_ms(0.16) == 350


def test_speech_after_a_committed_turn_interrupts_it_once_it_lasts():
    node = _accumulator(barge_in_min_speech_ms=128)
    _run(node, ["speech_start", None, None, "speech_pause", *[None] * 10])  # turn 0 committed
    node.on_turn_event(TurnEvent("speaking", "0", source="tts"))  # its reply is playing
    out = _run(node, ["speech_resume", None, None])  # 96 ms of speech: not yet
    assert _described(out) == []
    out = _run(node, [None, None])
    assert _described(out) == [("interrupt", "0")]
    assert _described(_run(node, [None] * 5)) == []  # once


def test_tts_holds_a_turn_until_its_commit_and_drops_it_on_cancel():
    from nodes.speech.tts import PiperTTSNode

    async def run(outputs):
        if outputs is None:
            return []
        return [x async for x in outputs] if hasattr(outputs, "__aiter__") else list(outputs)

    async def go():
        node = PiperTTSNode("tts", {})
        await asyncio.to_thread(node.initialize)
        assert await run(node.process(RuntimeData.text("Paris.", metadata={"turn_id": "7"}))) == []
        released = await run(node.on_turn_event(TurnEvent("commit", "7")))
        audio = [f for f in released if f.kind.name == "AUDIO"]
        assert len(audio) == 1 and audio[0].metadata["text"] == "Paris." and turn_of(audio[0]) == "7"
        live = await run(node.process(RuntimeData.text("It is big.", metadata={"turn_id": "7"})))
        assert [f.kind.name for f in live] == ["AUDIO"]  # committed: straight out
        assert await run(node.process(RuntimeData.text("Rome.", metadata={"turn_id": "8"}))) == []
        node._turns.note(TurnEvent("cancel", "8"))  # the engine voids the turn before the event arrives
        assert await run(node.on_turn_event(TurnEvent("cancel", "8"))) == []
        assert await run(node.on_turn_event(TurnEvent("commit", "8"))) == []  # cancelled stays cancelled
        assert await run(node.process(RuntimeData.text("More.", metadata={"turn_id": "8"}))) == []

    asyncio.run(go())


def test_an_interrupted_reply_is_cut_and_reports_what_was_played():
    from nodes.speech.tts import PiperTTSNode

    async def go():
        node = PiperTTSNode("tts", {"chunk_ms": 100, "pace_ahead_ms": 200})
        await asyncio.to_thread(node.initialize)
        node.on_turn_event(TurnEvent("commit", "3"))
        text = RuntimeData.text("The capital of France is Paris, a city of light and of many bridges.",
                                metadata={"turn_id": "3", "phrase_index": "0"})
        sent = []
        async for frame in node.process(text):  # paced: about 100 ms a frame after the first 200 ms
            sent.append(frame)
            if len([f for f in sent if f.kind.name == "AUDIO"]) == 8:
                break
        out = node.on_turn_event(TurnEvent("interrupt", "3"))
        event, played = out
        assert event.value["event"] == "interrupted" and event.value["turn_id"] == "3"
        assert 300 <= event.value["played_ms"] <= 800, event.value
        assert TurnEvent.of(played).kind == "played"
        heard = TurnEvent.of(played).data["text"]
        assert heard and text.text.startswith(heard) and len(heard) < len(text.text), heard
        assert TurnEvent.of(sent[1]).kind == "speaking"  # after the reply's first frame
        # nothing of the turn is left to send
        assert node._queue == collections.deque() and "3" not in node._held

    asyncio.run(go())


async def test_the_llm_remembers_only_what_was_played_of_an_interrupted_reply(mp_engine):
    from nodes.speech.llm import LlamaCppNode

    spec = default_registry().get("LlamaCppNode")
    node = LlamaCppNode("llm", spec.normalize_params({"max_tokens": 24}))
    await asyncio.to_thread(node.initialize)
    phrases = [f async for f in node.process(RuntimeData.text("What is the capital of France?",
                                                               metadata={"turn_id": "1"}))]
    node.on_turn_event(TurnEvent("commit", "1"))
    said = " ".join(p.text for p in phrases if p.text)
    assert said, "no reply"
    node.on_turn_event(TurnEvent("played", "1", {"text": "The capital"}))
    msgs = node.messages("And of Italy?")
    assert msgs[-3:] == [{"role": "user", "content": "What is the capital of France"},
                         {"role": "assistant", "content": "The capital"},
                         {"role": "user", "content": "And of Italy?"}], msgs


async def test_reset_metadata_starts_the_conversation_over_and_end_marker_closes_each_reply():
    """The RemoteMedia app's `reset: "true"` chunk metadata; LFM2-Audio's <|text_end|> after a reply."""
    from nodes.speech.llm import LlamaCppNode

    spec = default_registry().get("LlamaCppNode")
    node = LlamaCppNode("llm", spec.normalize_params({"max_tokens": 12, "end_marker": "<|text_end|>"}))
    await asyncio.to_thread(node.initialize)
    first = [f async for f in node.process(RuntimeData.text("What is the capital of France?"))]
    assert first[-1].text == "<|text_end|>" and first[-1].metadata["final"] == "1", first
    assert all(f.metadata.get("final") != "1" for f in first[:-1]) and any(f.text for f in first[:-1])
    assert len(node.messages("Hi")) > 2  # the exchange is remembered
    reset = RuntimeData.text("Hello there.", metadata={"reset": "true", "sessionId": "s1"})
    [f async for f in node.process(reset)]
    assert [m["content"] for m in node.messages("Hi") if m["role"] == "user"][0] == "Hello there", \
        "the conversation before the reset is forgotten"


async def test_a_speculative_turn_that_looks_unfinished_is_answered_only_once_committed():
    from nodes.speech.llm import LlamaCppNode

    spec = default_registry().get("LlamaCppNode")
    node = LlamaCppNode("llm", spec.normalize_params({"max_tokens": 16, "min_eou_to_reply": 1.0}))
    await asyncio.to_thread(node.initialize)
    text = RuntimeData.text("What is the capital of", metadata={"turn_id": "4", "speculative": "1"})
    out = [f async for f in node.process(text)]
    assert [TurnEvent.of(f).kind for f in out] == ["eou"], out  # scored, not answered
    assert TurnEvent.of(out[0]).data["probability"] < 0.01
    answer = node.on_turn_event(TurnEvent("commit", "4"))
    phrases = [f async for f in answer]
    assert phrases and phrases[-1].metadata["final"] == "1" and turn_of(phrases[0]) == "4"


async def test_a_transcript_that_ends_a_sentence_scores_as_more_likely_finished():
    """ASR heard the question end ("?"): the model's score of the words is multiplied by
    `sentence_end_factor`, so a misheard word does not hold a finished question for the longest pause."""
    from nodes.speech.llm import LlamaCppNode

    spec = default_registry().get("LlamaCppNode")
    node = LlamaCppNode("llm", spec.normalize_params({"max_tokens": 8, "min_eou_to_reply": 1.0}))
    await asyncio.to_thread(node.initialize)

    async def score(text: str, turn: str) -> float:
        out = [f async for f in node.process(RuntimeData.text(text, metadata={"turn_id": turn, "speculative": "1"}))]
        return TurnEvent.of(out[0]).data["probability"]

    from nodes.speech.chat import OPENER_EOU, SENTENCE_END_MAX_EOU

    words, question = await score("What do these make", "1"), await score("What do these make?", "2")
    assert 0 < words < 0.01
    assert question == pytest.approx(min(SENTENCE_END_MAX_EOU, 10 * words), rel=0.01)
    # a word a question opens with, before its comma: never a quick end, whatever its punctuation
    assert await score("Hello.", "3") == await score("Well", "4") == OPENER_EOU


async def test_a_cancelled_speculative_reply_stops_using_cpu(mp_engine):
    """The LLM answers a speculative turn; its cancel stops the completion at the next token."""
    doc = {"version": "v1", "metadata": {"name": "cancel"}, "nodes": [
        {"id": "ctl", "node_type": "TurnProbeNode", "executor": "native", "params": {}},
        {"id": "llm", "node_type": "LlamaCppNode", "params": {
            "max_tokens": 2000, "end_of_turn": False, "max_phrase_words": 3,
            "system_prompt": "Write a very long story, many paragraphs."}}],
        "connections": [{"from": "ctl", "to": "llm"}]}
    async with mp_engine.stream(doc) as s:
        outputs = []

        async def read():
            async for out in s:
                outputs.append(out)

        reader = asyncio.get_running_loop().create_task(read())
        await s.send("ctl", RuntimeData.text("ctl tagged x"))  # a text of turn x for the LLM
        await eventually(lambda: len(outputs) >= 3, "the LLM to stream its reply")
        proc = psutil.Process(s.runners["llm"].pid)
        c0 = sum(proc.cpu_times()[:2])
        await asyncio.sleep(0.3)
        busy = sum(proc.cpu_times()[:2]) - c0
        assert busy > 0.15, f"the LLM should be generating, used {busy:.2f} s of CPU in 0.3 s"
        await s.send("ctl", RuntimeData.text("ctl event cancel x"))
        n = len(outputs)
        await asyncio.sleep(0.1)  # the next token
        c0 = sum(proc.cpu_times()[:2])
        await asyncio.sleep(0.3)
        idle = sum(proc.cpu_times()[:2]) - c0
        assert idle < 0.05, f"the cancelled reply still used {idle:.2f} s of CPU in 0.3 s"
        assert len(outputs) <= n + 1, "phrases of the cancelled turn came out after its cancel"
        await s.cancel()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


# ---------------------------------------------------------------- the voice loop


def _voice_manifest():
    return load_document(VOICE_LOOP)


async def _talk(channel, audio: np.ndarray, chunk: int = 512) -> list[spb.StreamResponse]:
    """Everything sent at once, as some clients do (not in real time)."""
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
    frames = [f for f in frames if f.kind.name == "AUDIO"]
    assert frames, kinds(responses)
    audio = np.concatenate([f.samples for f in frames])
    text = " ".join(f.metadata["text"] for f in frames if "text" in f.metadata)
    return audio, text, frames[0].metadata["transcript"], frames[0].sample_rate


async def _heard(test_models, audio: np.ndarray, rate: int) -> str:
    heard, _ = await asyncio.to_thread(test_models["asr"].transcribe,
                                       soxr.resample(audio, rate, 16000).astype(np.float32))
    return heard


async def test_voice_loop_over_grpc(server, channel, test_models):
    q = "What is the capital of France?"
    responses = await _talk(channel, question(q))
    assert kinds(responses)[-1] == "closed"
    reply_audio, reply_text, transcript, rate = _reply(responses)
    assert wer(q, transcript) < 0.2
    assert rms(reply_audio) > 0.01
    # the reply audio says what the LLM wrote
    heard = await _heard(test_models, reply_audio, rate)
    assert wer(reply_text, heard) < 0.35, (reply_text, heard)


async def test_a_conversation_in_real_time_is_heard_and_answered_turn_by_turn(server, channel, test_models):
    questions = ["How many legs does a spider have?", "What color is the sky on a sunny day?",
                 "What do bees make from flowers?"]
    async with VoiceCall(channel, _voice_manifest()) as call:
        errors, replies = [], []
        for q in questions:
            start = await call.say(question(q, lead_s=0.3, tail_s=0.0))
            await call.silence_until(lambda start=start: call.played_out(start), f"a reply to {q!r}")
            turns = call.turns(after=start)
            assert len(turns) == 1, f"{q!r} answered {len(turns)} times"
            audio, said, transcript, rate = call.reply(turns[0])
            errors.append((wer(q, transcript), q, transcript))
            replies.append((said, await _heard(test_models, audio, rate)))
        responses = await call.close()
    # each reply is its text (one misheard short word in a short reply is 0.4)
    assert all(wer(said, heard) < 0.5 for said, heard in replies), replies
    assert sum(wer(said, heard) for said, heard in replies) / len(replies) < 0.25, replies
    assert kinds(responses)[-1] == "closed"
    assert sum(e for e, _, _ in errors) / len(errors) < 0.15, errors
    assert not call.events(), "nothing was interrupted"


async def test_a_pause_in_the_middle_of_a_sentence_does_not_end_the_turn(server, channel):
    q = "Please tell me the name of the largest planet."
    async with VoiceCall(channel, _voice_manifest()) as call:
        start = await call.say(np.concatenate([np.zeros(4800, np.float32), paused(q, 0.3, at=0.5)]))
        await call.silence_until(lambda: call.played_out(start), "a reply")
        await call.silence(1.0)  # nothing else comes
        turns = call.turns(after=start)
        assert len(turns) == 1, f"answered {len(turns)} times: {turns}"
        _audio, _said, transcript, _rate = call.reply(turns[0])
        assert wer(q, transcript) < 0.2, f"the reply answers {transcript!r}, not the whole sentence"
        assert not call.events(), "nothing was interrupted"
        await call.close()


async def test_speaking_over_the_reply_interrupts_it(server, channel, test_models):
    first, second = "Could you tell me the capital of France?", "How many legs does a spider have?"
    async with VoiceCall(channel, _voice_manifest()) as call:
        start, old, barge = await call.speak_over_the_reply(question(first, lead_s=0.3, tail_s=0.0),
                                                           question(second, lead_s=0.0, tail_s=0.0))
        await call.close()
    events = call.events()
    assert [(e["event"], e["turn_id"]) for _, e in events] == [("interrupted", old)], events
    t_event, event = events[0]
    assert event["played_ms"] > 0
    assert all(t <= t_event for t, f in call.audio() if turn_of(f) == old), "old audio after the event"
    new = call.turns(after=start)[1]
    _audio, _said, transcript, _rate = call.reply(new)
    assert wer(second, transcript) < 0.2, transcript


async def test_two_voice_sessions_do_not_interfere(server, channel):
    questions = ["What is the capital of France?", "How many legs does a spider have?"]
    results = await asyncio.gather(*(_talk(channel, question(q)) for q in questions))
    ids = set()
    for q, responses in zip(questions, results, strict=True):
        ids.add(next(r.ready.session_id for r in responses if r.WhichOneof("response") == "ready"))
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
