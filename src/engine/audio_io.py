"""WAV files ↔ AudioData (16-bit PCM through the stdlib `wave` module)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from .data import AudioData, SampleFormat
from .errors import ValidationError


def read_wav(path: str | Path) -> AudioData:
    try:
        with wave.open(str(path), "rb") as w:
            width, rate, ch, n = w.getsampwidth(), w.getframerate(), w.getnchannels(), w.getnframes()
            raw = w.readframes(n)
    except (OSError, wave.Error, EOFError) as exc:
        raise ValidationError(f"cannot read WAV {path}: {exc}") from None
    dtypes = {2: "<i2", 4: "<i4"}
    if width not in dtypes:
        raise ValidationError(f"{path}: {8 * width}-bit WAV is not supported (16 or 32-bit PCM)")
    return AudioData(np.frombuffer(raw, dtype=dtypes[width]).copy(), rate, ch)


def write_wav(path: str | Path, audio: AudioData) -> None:
    samples = audio.samples
    if audio.format is SampleFormat.F32:
        samples = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(audio.channels)
        w.setsampwidth(samples.dtype.itemsize)
        w.setframerate(audio.sample_rate)
        w.writeframes(samples.tobytes())


def tone(seconds: float, sample_rate: int = 48_000, freq: float = 440.0) -> AudioData:
    """A generated test signal: a sine with a little noise, float32 mono."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    rng = np.random.default_rng(1234)
    x = 0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    return AudioData(x.astype(np.float32), sample_rate, 1)
