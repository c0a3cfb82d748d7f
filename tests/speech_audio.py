"""Test speech (see nodes.speech.spoken): the project's own voice, espeak-ng's, and the WER that scores it."""

from __future__ import annotations

from pathlib import Path

from nodes.speech.spoken import espeak, paused, question, spoken, wer, words

VOICE_LOOP = Path(__file__).resolve().parent.parent / "examples" / "speech_to_speech.json"

__all__ = ["VOICE_LOOP", "espeak", "paused", "question", "spoken", "wer", "words"]
