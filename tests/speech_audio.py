"""Test speech made by the project itself (Piper speaks known sentences)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import soxr

from nodes.speech.spoken import paused, question, spoken

VOICE_LOOP = Path(__file__).resolve().parent.parent / "examples" / "speech_to_speech.json"

__all__ = ["VOICE_LOOP", "espeak", "paused", "question", "spoken", "wer", "words"]


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


def espeak(text: str, rate: int = 16000, *, wpm: int = 150, voice: str = "en-us", lead_s: float = 0.3,
           tail_s: float = 1.5) -> np.ndarray:
    """`text` spoken by espeak-ng (a voice none of the bundled models speaks with), mono
    float32 at `rate`, with `lead_s` and `tail_s` of silence around it."""
    exe = shutil.which("espeak-ng")
    assert exe, "espeak-ng is needed (make test installs it: apt-get install espeak-ng)"
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run([exe, "-v", voice, "-s", str(wpm), "-w", f.name, text], check=True, timeout=30)
        audio, sr = soundfile.read(f.name, dtype="float32")
    audio = soxr.resample(audio, sr, rate).astype(np.float32)
    return np.concatenate([np.zeros(int(lead_s * rate), np.float32), audio, np.zeros(int(tail_s * rate), np.float32)])

