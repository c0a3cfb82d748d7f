"""A pipeline that only transcribes (examples/transcribe.json: VAD → utterances →
Whisper) keeps every utterance: barge-in acts only where something answers the
turn, and the texts of separate utterances are joined with a space."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from speech_audio import espeak, wer

from engine.audio_io import write_wav
from engine.catalog import default_registry
from engine.data import AudioData, RuntimeData, concat
from engine.turns import TurnEvent, turn_of

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
SENTENCES = ["The weather was cold and grey all morning.",
             "We walked to the station and caught the early train.",
             "Nobody expected the meeting to end in a misunderstanding."]


@pytest.mark.speech
def test_three_sentences_with_pauses_are_three_transcripts(tmp_path):
    audio = np.concatenate([espeak(s, 16000, wpm=150, lead_s=0.3, tail_s=1.2) for s in SENTENCES])
    wav = tmp_path / "three.wav"
    write_wav(wav, AudioData(audio, 16000))
    res = subprocess.run([sys.executable, "-m", "engine", "run", str(ROOT / "examples" / "transcribe.json"),
                          "--input", str(wav)], capture_output=True, text=True, timeout=180, cwd=tmp_path, env=ENV)
    assert res.returncode == 0, res.stderr
    heard = re.findall(r"^  asr: '(.*)'$", res.stdout, re.M)  # each text as it passes the sink
    assert len(heard) == len(SENTENCES), f"expected one transcript per sentence, got {heard}"
    for said, text in zip(SENTENCES, heard, strict=True):
        assert wer(said, text) < 0.25, (said, text)
    joined = re.search(r"^  asr: text '(.*)'  \[3 items\]$", res.stdout, re.M)
    assert joined is not None, res.stdout
    assert joined.group(1) == " ".join(heard), joined.group(1)


# ---------------------------------------------------------------- the accumulator's barge-in


def _accumulator():
    from nodes.speech.accumulator import AudioBufferAccumulatorNode

    spec = default_registry().get("AudioBufferAccumulatorNode")
    return AudioBufferAccumulatorNode("utterances", spec.normalize_params(
        {"speculative": False, "endpointing_ms": 160, "barge_in_min_speech_ms": 64}))


def _feed(node, events: list[str | None]) -> list[tuple[str, str]]:
    """32 ms windows of 16 kHz audio with these VAD events → what the node sent (kind, turn)."""
    out = []
    for event in events:
        frame = RuntimeData.audio(np.full(512, 0.1, np.float32), 16000,
                                  metadata={"vad_event": event} if event else {})
        for f in node.process(frame):
            sent = TurnEvent.of(f)
            out.append(("utterance", turn_of(f)) if sent is None else (sent.kind, sent.turn_id))
    return out


TURN = ["speech_start", *[None] * 5, "speech_pause", *[None] * 6]  # ~190 ms of speech, a 220 ms pause
SPEECH_AGAIN = ["speech_resume", None, None, None]  # 128 ms of speech after the commit


def test_speech_after_a_turn_nothing_answers_interrupts_nothing():
    node = _accumulator()
    assert _feed(node, TURN) == [("utterance", "0"), ("commit", "0")]
    assert _feed(node, SPEECH_AGAIN) == []
    # a voiding event from elsewhere is no sign of an answer either
    node.on_turn_event(TurnEvent("cancel", "0", source="client"))
    assert _feed(node, [None, None]) == []


def test_speech_after_a_turn_being_answered_interrupts_it_once():
    node = _accumulator()
    _feed(node, TURN)
    node.on_turn_event(TurnEvent("speaking", "0", source="tts"))  # its reply's first audio went out
    assert _feed(node, SPEECH_AGAIN) == [("interrupt", "0")]
    assert _feed(node, [None, None]) == []


def test_an_answer_to_an_older_turn_does_not_arm_barge_in():
    node = _accumulator()
    _feed(node, TURN)
    _feed(node, [None] * 10 + TURN)  # turn 1 committed
    node.on_turn_event(TurnEvent("speaking", "0", source="tts"))
    assert _feed(node, SPEECH_AGAIN) == []


def test_texts_of_separate_turns_and_phrases_are_joined_with_a_space():
    def text(t: str, **meta: str) -> RuntimeData:
        return RuntimeData.text(t, metadata=meta)

    assert concat([text("misunderstanding.", turn_id="0"), text("But", turn_id="1")]).text \
        == "misunderstanding. But"
    assert concat([text("Paris", turn_id="3", phrase_index="0"), text("is big.", turn_id="3", phrase_index="1")]
                  ).text == "Paris is big."
    # the tokens of one stream carry their own spacing
    assert concat([text("Hel", turn_id="3"), text("lo", turn_id="3"), text(" world", turn_id="3")]).text \
        == "Hello world"
    assert concat([text("a. ", turn_id="0"), text("b", turn_id="1")]).text == "a. b"
