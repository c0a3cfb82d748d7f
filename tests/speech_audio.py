"""Test speech made by the project itself (Piper speaks known sentences)."""

from __future__ import annotations

from pathlib import Path

from nodes.speech.spoken import paused, question, spoken

VOICE_LOOP = Path(__file__).resolve().parent.parent / "examples" / "speech_to_speech.json"

__all__ = ["VOICE_LOOP", "paused", "question", "spoken"]
