"""Audio files ↔ AudioData.

Reading goes through libsndfile (the `soundfile` package): WAV of any PCM
width or float, FLAC, OGG/Vorbis/Opus, MP3 and the other formats libsndfile
knows. 16-bit (and narrower) PCM stays int16, wider PCM becomes int32, the
rest float32. Writing is 16-bit PCM WAV (stdlib `wave`).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import soundfile
import soxr

from .data import AudioData, SampleFormat
from .errors import ValidationError

_INT16 = {"PCM_S8", "PCM_U8", "PCM_16", "ALAW", "ULAW"}
_INT32 = {"PCM_24", "PCM_32"}


def read_audio(path: str | Path) -> AudioData:
    """Read an audio file; a ValidationError says why one cannot be read."""
    try:
        # opened here so that a missing or unreadable file says why (libsndfile: "System error")
        with open(path, "rb") as f, soundfile.SoundFile(f) as sf:
            dtype = "int16" if sf.subtype in _INT16 else "int32" if sf.subtype in _INT32 else "float32"
            samples, rate, channels = sf.read(dtype=dtype, always_2d=True), sf.samplerate, sf.channels
    except soundfile.LibsndfileError as exc:
        raise ValidationError(f"cannot read audio file {path}: {_why_not_audio(path, exc.error_string)}") from None
    except (OSError, RuntimeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ValidationError(f"cannot read audio file {path}: {reason}") from None
    if samples.shape[0] == 0:
        raise ValidationError(f"cannot read audio file {path}: it holds no audio frames")
    return AudioData(np.ascontiguousarray(samples).reshape(-1), int(rate), int(channels))


def _why_not_audio(path: str | Path, error: str) -> str:
    """Why libsndfile could not read `path`: an empty file says so (some libsndfile builds
    give no reason for one), else libsndfile's own words."""
    if Path(path).stat().st_size == 0:
        return "the file is empty (0 bytes)"
    return error.strip() or "not an audio format libsndfile reads (WAV, FLAC, OGG, MP3, ...)"


read_wav = read_audio


def resample(audio: AudioData, rate: int) -> AudioData:
    """The same audio at `rate` (soxr, high quality); the sample format is kept."""
    if audio.sample_rate == rate:
        return audio
    x = audio.samples.reshape(-1, audio.channels)
    y = soxr.resample(x, audio.sample_rate, rate)
    return AudioData(np.ascontiguousarray(y, dtype=audio.samples.dtype).reshape(-1), rate, audio.channels)


def write_wav(path: str | Path, audio: AudioData) -> None:
    samples = audio.samples
    if audio.format is SampleFormat.F32:
        samples = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    try:
        # opened here: wave.open(path) that cannot create the file leaves a broken object
        # whose __del__ prints "Exception ignored" after the error
        f = open(path, "wb")  # closed by the with below
    except OSError as exc:
        raise ValidationError(f"cannot write audio file {path}: {exc.strerror or exc}") from None
    with f, wave.open(f, "wb") as w:
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
