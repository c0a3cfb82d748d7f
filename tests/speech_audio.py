"""Test speech made by the project itself: Piper speaks known sentences."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import soxr

VOICE_LOOP = Path(__file__).resolve().parent.parent / "examples" / "speech_to_speech.json"


@functools.cache
def _voice():
    from nodes.speech.tts import PiperTTSNode

    node = PiperTTSNode("test-voice", {})
    node.initialize()
    return node


@functools.cache
def _spoken(text: str) -> np.ndarray:
    node = _voice()
    audio = np.concatenate(node.synthesize(text))
    return soxr.resample(audio, node.rate, 16000).astype(np.float32)


def spoken(text: str) -> np.ndarray:
    """`text` spoken at 16 kHz, float32 mono (a copy)."""
    return _spoken(text).copy()


def question(text: str, lead_s: float = 0.5, tail_s: float = 1.0, noise: float = 0.003, seed: int = 0) -> np.ndarray:
    """A spoken question as a caller sends it: silence, speech, silence, a little noise."""
    speech = _spoken(text)
    audio = np.concatenate([np.zeros(int(lead_s * 16000), np.float32), speech,
                            np.zeros(int(tail_s * 16000), np.float32)])
    audio += np.random.default_rng(seed).normal(0, noise, audio.size).astype(np.float32)
    return audio


def speech_end_s(text: str, lead_s: float = 0.5) -> float:
    """Where the speech ends in `question(text)`, in seconds."""
    return lead_s + _spoken(text).size / 16000
