"""The voice matrix: questions the loop was never tuned on, in voices that are not the bot's.

Every question is spoken by each voice (espeak-ng, American and British,
male and female, 130–190 words a minute; Piper with its natural variation,
the bot's own voice, kept apart in the figures), half of each voice's
questions under background noise at 20 dB SNR. The questions include ones
that end in a soft consonant ("France", "glass", "months": the VAD's pause
begins before the word ends), ones with a comma after a first word that
could stand alone ("Hello, can you hear me?"), and ones with a 300 ms pause
inside the sentence. After each question the client sends 0.3–2 s of
silence and then nothing until the reply has played (a client that stops
sending when nobody speaks, as push-to-talk and WebRTC's DTX do).

    from bench.matrix import cells
    for cell in cells():        # 24 questions × 5 voices
        cell.spoken.audio       # 16 kHz float32: lead silence, speech, trailing silence
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from bench.scenarios_speech import Spoken

RATE, CHUNK = 16000, 512
CHUNK_S = CHUNK / RATE
LEAD_S = 0.3
#: a sample above this is speech (−40 dBFS): where a question's speech ends
LOUD = 0.01
SNR_DB = 20.0
PAUSE_S = 0.3
TRAILING_S = (0.3, 0.6, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class Voice:
    name: str
    espeak_voice: str | None  # None: Piper's joe voice with its natural variation
    wpm: int = 150

    @property
    def bots_own(self) -> bool:
        return self.espeak_voice is None


VOICES = (
    Voice("espeak en-us male 130 wpm", "en-us", 130),
    Voice("espeak en-gb male 165 wpm", "en-gb", 165),
    Voice("espeak en-us female 150 wpm", "en-us+f3", 150),
    Voice("espeak en-gb-rp female 190 wpm", "en-gb-x-rp+f4", 190),
    Voice("piper joe, varied (the bot's voice)", None),
)


@dataclass(frozen=True)
class Question:
    text: str
    #: where a 300 ms pause goes (share of the speech; the quietest moment near it), or None
    pause_at: float | None = None
    #: what the question tests: "soft end", "comma", "pause", or "" (a plain question)
    tests: str = ""


QUESTIONS = (
    Question("What is the capital of France?", tests="soft end"),
    Question("Tell me something about Paris.", tests="soft end"),
    Question("Why does light bend in glass?", tests="soft end"),
    Question("How many days are in twelve months?", tests="soft end"),
    Question("What is frozen water called?", tests="soft end"),
    Question("Name a big city in Texas.", tests="soft end"),
    Question("Hello, can you hear me?", tests="comma"),
    Question("Well, what is the tallest animal?", tests="comma"),
    Question("Okay, tell me a fun fact about cats.", tests="comma"),
    Question("So, which planet is closest to the sun?", tests="comma"),
    Question("What is the largest ocean on Earth?", pause_at=0.45, tests="pause"),
    Question("How many legs does a spider have?", pause_at=0.5, tests="pause"),
    Question("Who wrote the play Romeo and Juliet?", pause_at=0.4, tests="pause"),
    Question("What language do people speak in Spain?", pause_at=0.55, tests="pause"),
    Question("What color is the sky on a clear day?"),
    Question("What do bees make?"),
    Question("Can you name a yellow fruit?"),
    Question("What is two plus three?"),
    Question("Where do penguins live?"),
    Question("Why is the sea salty?"),
    Question("How many wheels does a bicycle have?"),
    Question("What do plants need to grow?"),
    Question("What is the opposite of hot?"),
    Question("What is the fastest land animal?"),
)


@dataclass
class Cell:
    question: Question
    voice: Voice
    noisy: bool
    trailing_s: float
    spoken: Spoken

    @property
    def label(self) -> str:
        return f"{self.voice.name}{', noise' if self.noisy else ''}: {self.question.text!r}"


def cells(voices: tuple[Voice, ...] = VOICES, questions: tuple[Question, ...] = QUESTIONS) -> list[Cell]:
    """Every question in every voice; noise on every other question, alternating by voice, so each
    question is heard both clean and in noise; the trailing silence cycles through TRAILING_S."""
    out = []
    for v, voice in enumerate(voices):
        for i, q in enumerate(questions):
            noisy = (i + v) % 2 == 1
            trailing = TRAILING_S[(i + v) % len(TRAILING_S)]
            speech = say(q, voice)
            out.append(Cell(q, voice, noisy, trailing, stream_of(q.text, speech, trailing, noisy, seed=v * 100 + i)))
    return out


def say(q: Question, voice: Voice) -> np.ndarray:
    """`q` spoken by `voice` (16 kHz float32, the voice's own silence trimmed), with its pause."""
    return trimmed(_said(q.text, voice.espeak_voice, voice.wpm, q.pause_at))


@functools.cache
def _said(text: str, espeak_voice: str | None, wpm: int, pause_at: float | None) -> np.ndarray:
    from nodes.speech.spoken import espeak, spoken

    if espeak_voice is None:
        x = spoken(text, RATE, variation=True)
    else:
        x = espeak(text, RATE, wpm=wpm, voice=espeak_voice, lead_s=0, tail_s=0)
    return x if pause_at is None else with_pause(trimmed(x), PAUSE_S, pause_at)


def trimmed(x: np.ndarray) -> np.ndarray:
    """`x` from 20 ms before its first loud sample to 50 ms after its last."""
    loud = np.flatnonzero(np.abs(x) > LOUD)
    lo, hi = max(0, loud[0] - RATE // 50), min(x.size, loud[-1] + RATE // 20)
    return x[lo:hi].astype(np.float32)


def with_pause(x: np.ndarray, pause_s: float, at: float) -> np.ndarray:
    """`x` with `pause_s` of silence at its quietest 10 ms (a gap between words) near the share `at`."""
    hop = RATE // 100
    frames = x[: x.size // hop * hop].reshape(-1, hop)
    energy = np.sqrt(np.mean(frames * frames, axis=1))
    lo, hi = int(len(frames) * (at - 0.15)), int(len(frames) * (at + 0.15))
    cut = (lo + int(np.argmin(energy[lo:hi]))) * hop + hop // 2
    return np.concatenate([x[:cut], np.zeros(int(pause_s * RATE), np.float32), x[cut:]])


def background(n: int, seed: int) -> np.ndarray:
    """Pink-ish background noise (a room's hum and hiss, not white noise), unit RMS."""
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.normal(0, 1, n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    spectrum /= np.sqrt(np.maximum(f, 50.0))  # 1/f power above 50 Hz
    x = np.fft.irfft(spectrum, n)
    return (x / np.sqrt(np.mean(x * x))).astype(np.float32)


def stream_of(text: str, speech: np.ndarray, trailing_s: float, noisy: bool, seed: int = 0) -> Spoken:
    """`speech` as a client streams it: LEAD_S of silence before, `trailing_s` after, chunk-padded;
    with noise at SNR_DB below the speech's level where `noisy`, else a faint hiss (−50 dBFS)."""
    lead = np.zeros(int(LEAD_S * RATE), np.float32)
    tail = np.zeros(int(trailing_s * RATE), np.float32)
    audio = np.concatenate((lead, speech, tail))
    audio = np.concatenate((audio, np.zeros(-audio.size % CHUNK, np.float32)))
    loud = np.flatnonzero(np.abs(speech) > LOUD) + lead.size
    active = speech[np.abs(speech) > LOUD * 0.1]
    level = float(np.sqrt(np.mean(active * active))) / 10 ** (SNR_DB / 20) if noisy else 0.003
    audio = audio + level * background(audio.size, seed)
    return Spoken(text, audio.astype(np.float32), (loud[0] // CHUNK + 1) * CHUNK_S,
                  (loud[-1] // CHUNK + 1) * CHUNK_S)
