"""Speech for tests, demos and benchmarks: spoken by the engine's own TTS, or by
espeak-ng (a voice none of the bundled models speaks with), and the word
error rate that scores a transcript.

    from nodes.speech.spoken import question
    audio = question("What is the capital of France?")   # 16 kHz float32, with silence around it
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile

import numpy as np
import soxr


@functools.cache
def _voice(variation: bool):  # noqa: ANN202 - a PiperTTSNode, imported lazily with the speech extra
    from .tts import PiperTTSNode

    node = PiperTTSNode("spoken", {"variation": variation})
    node.initialize()
    return node


@functools.cache
def _spoken(text: str, rate: int, variation: bool = False) -> np.ndarray:
    node = _voice(variation)
    audio = np.concatenate(node.synthesize(text))
    return soxr.resample(audio, node.rate, rate).astype(np.float32)


def spoken(text: str, rate: int = 16000, *, variation: bool = False) -> np.ndarray:
    """`text` spoken by the default voice: mono float32 at `rate` (a fresh copy).

    Without `variation` the same text gives the same audio in every run (what
    tests want); with it, the voice's natural variation of sound and timing."""
    return _spoken(text, rate, variation).copy()


def question(text: str, *, lead_s: float = 0.5, tail_s: float = 1.0, noise: float = 0.003, seed: int = 0,
             rate: int = 16000) -> np.ndarray:
    """A spoken question as a caller sends it: silence, speech, silence, a little noise."""
    speech = _spoken(text, rate)
    audio = np.concatenate([np.zeros(int(lead_s * rate), np.float32), speech,
                            np.zeros(int(tail_s * rate), np.float32)])
    audio += np.random.default_rng(seed).normal(0, noise, audio.size).astype(np.float32)
    return audio


def paused(text: str, pause_s: float, at: float = 0.5, rate: int = 16000) -> np.ndarray:
    """`text` spoken with `pause_s` of silence inside it, at the quietest moment (a gap between
    words, or a stop consonant) near the share `at` of the speech."""
    x = _spoken(text, rate)
    hop = rate // 100
    frames = x[: x.size // hop * hop].reshape(-1, hop)
    energy = np.sqrt(np.mean(frames * frames, axis=1))
    loud = np.flatnonzero(energy > 0.01)
    first, last = loud[0], loud[-1]
    lo, hi = int(first + (last - first) * (at - 0.15)), int(first + (last - first) * (at + 0.15))
    cut = (lo + int(np.argmin(energy[lo:hi]))) * hop + hop // 2
    return np.concatenate([x[:cut], np.zeros(int(pause_s * rate), np.float32), x[cut:]])


def speech_seconds(text: str) -> float:
    """How long the spoken `text` lasts, up to its last voiced 10 ms (the voice pads with silence)."""
    x = _spoken(text, 16000)
    frames = x[: x.size // 160 * 160].reshape(-1, 160)
    loud = np.flatnonzero(np.sqrt(np.mean(frames * frames, axis=1)) > 0.01)
    return (loud[-1] + 1) * 160 / 16000 if loud.size else 0.0


def main(argv: list[str] | None = None) -> int:
    """python -m nodes.speech.spoken "What is the capital of France?" question.wav"""
    import sys

    from engine.audio_io import write_wav
    from engine.data import AudioData

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print('usage: python -m nodes.speech.spoken "TEXT" OUT.wav   (16 kHz mono, with silence around it)',
              file=sys.stderr)
        return 2
    audio = question(args[0])
    write_wav(args[1], AudioData(audio, 16000))
    print(f"wrote {args[1]} ({audio.size / 16000:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def espeak(text: str, rate: int = 16000, *, wpm: int = 150, voice: str = "en-us", lead_s: float = 0.3,
           tail_s: float = 1.5) -> np.ndarray:
    """`text` spoken by espeak-ng (apt-get install espeak-ng; `make test` does), mono
    float32 at `rate`, with `lead_s` and `tail_s` of silence around it."""
    import soundfile

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is needed: apt-get install espeak-ng (make test installs it)")
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run([exe, "-v", voice, "-s", str(wpm), "-w", f.name, text], check=True, timeout=30)
        audio, sr = soundfile.read(f.name, dtype="float32")
    audio = soxr.resample(audio, sr, rate).astype(np.float32)
    return np.concatenate([np.zeros(int(lead_s * rate), np.float32), audio, np.zeros(int(tail_s * rate), np.float32)])


_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
            "7": "seven", "8": "eight", "9": "nine", "10": "ten"}


def words(text: str) -> list[str]:
    """Lower-case words, digits spelled out, punctuation gone."""
    return [_NUMBERS.get(w, w) for w in re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()]


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance / reference length."""
    ref, hyp = words(reference), words(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)] / max(1, len(ref))
