"""AudioBufferAccumulatorNode: VAD-annotated windows → user turns.

Reads the SileroVADNode annotations (see vad.py) and decides where a user's
turn begins and ends. An utterance starts at `speech_start` (with
`vad_pad_ms` of audio from before it) and is emitted as one audio frame with
metadata `turn_id`; the turn's fate then goes out as turn events (see
engine.turns): `commit` when the turn has ended, `cancel` when it did not.

When it ends (endpointing): once a pause has lasted long enough. How long
depends on how complete the words so far look. With `speculative` on, the
utterance is emitted as soon as a pause has lasted `speculative_delay_ms`
and the sound has ended, so speech recognition, the LLM and TTS start while
the pause goes on. The VAD's pause can begin 100–150 ms before a word ends
(a soft final consonant: "France", "glass"), and a cut there changes the
words ("capital of friend"), so the emission waits for a window within
`end_of_sound_db` of the noise heard before the speech (at most until the
pause lasts `end_of_sound_max_wait_ms`); the
LLM answers an `eou` event with the probability that the transcript is a
finished turn. The pause that commits the turn is `quick_endpointing_ms`
when that probability is at least `certain_end_probability`,
`min_endpointing_ms` when it is at least `likely_end_probability`, `max_endpointing_ms`
when it is at most `unlikely_end_probability`, and in between on a log
scale; `endpointing_ms` while no estimate has come. Speech before that
cancels the speculative turn (everything done for it stops) and the
utterance goes on. A pause the VAD itself closes (its
`min_silence_duration_ms`) or `max_utterance_duration_ms` always commits.

Barge-in: speech that lasts `barge_in_min_speech_ms` after a committed turn
sends `interrupt` for that turn, which stops its reply (LLM and TTS) if it
is still being generated or played; the speech itself becomes the next turn.
Only where a reply exists: once another node has sent a turn event about
that turn (the LLM's `eou` score, TTS's `speaking` with the reply's first
audio), the sign that something answers it. An interrupt voids the whole
turn, its transcript too, so in a pipeline that only transcribes (no node
answers, none sends turn events) speech after a turn interrupts nothing:
every utterance keeps its transcript.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np

from engine.data import AudioData, RuntimeData
from engine.node import Node
from engine.turns import TURN_ID, TurnEvent

from .common import AUDIO, mono_f32

_PARAMS: dict[str, Any] = {
    "min_utterance_duration_ms": {"type": "integer", "minimum": 0, "maximum": 60_000, "default": 300,
                                  "description": "shorter speech is no turn"},
    "max_utterance_duration_ms": {"type": "integer", "minimum": 500, "maximum": 600_000, "default": 30_000,
                                  "description": "a longer turn is committed there and the speech goes on in "
                                                 "a new one"},
    "speculative": {"type": "boolean", "default": True,
                    "description": "emit the utterance at the first pause, before the turn is known to have ended"},
    "speculative_delay_ms": {"type": "integer", "minimum": 0, "maximum": 10_000, "default": 64,
                             "description": "pause before the speculative emission"},
    "end_of_sound_db": {"type": "number", "minimum": 0, "maximum": 60, "default": 6,
                        "description": "the speculative emission also waits for the sound to end: a window "
                                       "at most this far above the noise heard before the speech (dB)"},
    "end_of_sound_max_wait_ms": {"type": "integer", "minimum": 0, "maximum": 10_000, "default": 250,
                                 "description": "pause after which the speculative emission waits no longer "
                                                "for the sound to end"},
    # commas and pauses between words last 120-450 ms in the voice matrix (bench/matrix.py); at
    # 160 ms, "Hello, can you hear me?" was answered at "Hello"
    "min_endpointing_ms": {"type": "integer", "minimum": 0, "maximum": 10_000, "default": 350,
                           "description": "pause that ends a turn that looks finished"},
    "max_endpointing_ms": {"type": "integer", "minimum": 0, "maximum": 30_000, "default": 1000,
                           "description": "pause that ends a turn that looks unfinished"},
    "endpointing_ms": {"type": "integer", "minimum": 0, "maximum": 30_000, "default": 400,
                       "description": "pause that ends a turn while no end-of-turn estimate has come"},
    # SmolLM2's scores of 24 finished and 24 cut-off transcripts overlapped
    # between 0.004 and 0.009 (finished ones mostly 0.04-0.9, cut-off ones
    # mostly below 0.0005): these bound that zone, on either side.
    # SmolLM2 scores 8 of 12 finished questions of the voice matrix 0.3-0.93, and a first word
    # followed by a comma ("hello", "okay", "well") 0.002-0.16
    "quick_endpointing_ms": {"type": "integer", "minimum": 0, "maximum": 10_000, "default": 200,
                             "description": "pause that ends a turn that looks certainly finished"},
    "certain_end_probability": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.3,
                                "description": "end-of-turn probability from which `quick_endpointing_ms` "
                                               "applies"},
    "likely_end_probability": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.02,
                               "description": "end-of-turn probability from which the shortest pause applies"},
    "unlikely_end_probability": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.001,
                                 "description": "end-of-turn probability up to which the longest pause applies"},
    "barge_in": {"type": "boolean", "default": True,
                 "description": "speech after a committed turn interrupts its reply"},
    "barge_in_min_speech_ms": {"type": "integer", "minimum": 0, "maximum": 10_000, "default": 160,
                               "description": "speech that lasts less (a cough, a click) interrupts nothing"},
}


#: a window this quiet (−50 dBFS RMS) is the end of the sound whatever the noise before the speech
_QUIET_FLOOR = 10 ** (-50 / 20)
#: how much of the audio before the speech sets its noise level
_NOISE_MS = 300


def _rms(x: np.ndarray) -> float:
    return math.sqrt(float(np.dot(x, x)) / x.size) if x.size else 0.0


class AudioBufferAccumulatorNode(Node):
    node_type = "AudioBufferAccumulatorNode"
    input_types = AUDIO
    output_types = AUDIO
    params_schema = {"type": "object", "properties": _PARAMS, "additionalProperties": False}
    param_aliases = {
        "minUtteranceDurationMs": "min_utterance_duration_ms",
        "maxUtteranceDurationMs": "max_utterance_duration_ms",
        "speculativeDelayMs": "speculative_delay_ms",
    }

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        p = {k: params.get(k, spec["default"]) for k, spec in _PARAMS.items()}
        self.p = p
        self._preroll: collections.deque[np.ndarray] = collections.deque()
        #: RMS at or under which a window is the end of the sound (set from the noise before each utterance)
        self._quiet_rms = 0.0
        self._last_rms = 0.0
        self._preroll_len = 0
        self._parts: list[np.ndarray] | None = None  # the utterance being collected
        self._len = 0
        self._rate = 16000
        self._pause: int | None = None  # samples of the current pause, None while speaking
        self._speech = 0  # samples of speech in the current utterance (barge-in)
        self._next_id = 0
        self._emitted: str | None = None  # a speculative emission not yet committed or cancelled
        self._eou: dict[str, float] = {}  # turn → end-of-turn probability (from the LLM)
        self._replying: str | None = None  # the last committed turn, whose reply may be under way
        #: the turns (of _emitted and _replying) another node has sent an event about: being answered
        self._answered: set[str] = set()

    # ------------------------------------------------------------ node

    def process(self, frame: RuntimeData) -> list[RuntimeData]:
        assert isinstance(frame, AudioData)
        x = mono_f32(self, frame)
        self._rate = frame.sample_rate
        self._last_rms = _rms(x)
        event = frame.metadata.get("vad_event")
        out: list[RuntimeData] = []
        if self._parts is None:
            if event in ("speech_start", "speech_resume"):  # resume: the VAD had not closed a turn we committed
                self._begin(frame, x)
            else:
                self._remember(x)
            return out
        self._append(x)
        if event == "speech_pause":
            self._pause = 0
        elif event in ("speech_resume", "speech_start"):
            self._pause = None
            if self._emitted is not None:
                out.append(self.turn_event("cancel", self._emitted, reason="speech resumed"))
                self._emitted = None
        if event in ("speech_end", "speech_discard"):
            return out + self._finish(frame, keep=event == "speech_end", silence_ms=self._ms(self._pause or 0))
        if self._pause is None:
            self._speech += x.size
            out += self._barge_in()
        else:
            self._pause += x.size
            out += self._pausing(frame)
        if self._parts is not None and self._len * 1000 >= self.p["max_utterance_duration_ms"] * self._rate:
            out += self._finish(frame, keep=True, silence_ms=0)
            self._parts, self._len = [], 0  # the speech goes on in a new utterance
        return out

    def on_turn_event(self, event: TurnEvent) -> None:
        if not event.voids and event.turn_id and event.turn_id in (self._emitted, self._replying):
            self._answered.add(event.turn_id)
        if event.kind == "eou" and event.turn_id == self._emitted:
            prob = event.data.get("probability")
            if isinstance(prob, (int, float)):
                self._eou[event.turn_id] = float(prob)

    def flush(self) -> list[RuntimeData]:
        if self._parts is None:
            return []
        return self._finish(None, keep=True, silence_ms=self._ms(self._pause or 0))

    # ------------------------------------------------------------ turn logic

    def _pausing(self, frame: AudioData) -> list[RuntimeData]:
        out: list[RuntimeData] = []
        if not self._long_enough():
            return out
        pause_ms = self._ms(self._pause or 0)
        sound_ended = self._last_rms <= self._quiet_rms or pause_ms >= self.p["end_of_sound_max_wait_ms"]
        if self.p["speculative"] and self._emitted is None and pause_ms >= self.p["speculative_delay_ms"] \
                and sound_ended:
            out.append(self._utterance(frame, speculative=True))
        if pause_ms >= self.endpointing_ms(self._eou.get(self._emitted or "")):
            out += self._finish(frame, keep=True, silence_ms=pause_ms)
        return out

    def endpointing_ms(self, probability: float | None) -> float:
        """The pause that ends a turn whose words look finished with `probability` (None: not known)."""
        lo, hi = self.p["min_endpointing_ms"], self.p["max_endpointing_ms"]
        if probability is None:
            return self.p["endpointing_ms"]
        likely, unlikely = self.p["likely_end_probability"], self.p["unlikely_end_probability"]
        if probability >= self.p["certain_end_probability"]:
            return min(lo, self.p["quick_endpointing_ms"])
        if probability >= likely:
            return lo
        if probability <= unlikely or likely <= unlikely:
            return hi
        share = (math.log(probability) - math.log(unlikely)) / (math.log(likely) - math.log(unlikely))
        return hi - (hi - lo) * share

    def _barge_in(self) -> list[RuntimeData]:
        # a turn nothing answers has no reply to interrupt, only a transcript to lose
        if (self._replying not in self._answered or not self.p["barge_in"]
                or self._speech * 1000 < self.p["barge_in_min_speech_ms"] * self._rate):
            return []
        turn, self._replying = self._replying, None
        self._answered.discard(turn)
        return [self.turn_event("interrupt", turn, speech_ms=self._ms(self._speech))]

    def _finish(self, frame: AudioData | None, keep: bool, silence_ms: int) -> list[RuntimeData]:
        out: list[RuntimeData] = []
        if keep and self._long_enough():
            if self._emitted is None:
                out.append(self._utterance(frame, speculative=False))
            uid = self._emitted
            assert uid is not None
            eou = self._eou.get(uid)
            out.append(self.turn_event("commit", uid, silence_ms=silence_ms,
                                       utterance_ms=self._ms(self._len - (self._pause or 0)),
                                       **({"eou_probability": eou} if eou is not None else {})))
            self._replying = uid
        elif self._emitted is not None:
            out.append(self.turn_event("cancel", self._emitted, reason="too short"))
        self._emitted = None
        self._answered = {t for t in self._answered if t == self._replying}
        self._eou.clear()
        self._pause = None
        self._parts = None
        self._len = self._speech = 0
        return out

    # ------------------------------------------------------------ audio

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self._rate

    def _long_enough(self) -> bool:
        return self._len * 1000 >= self.p["min_utterance_duration_ms"] * self._rate

    def _begin(self, frame: AudioData, x: np.ndarray) -> None:
        pad = int(frame.metadata.get("vad_pad_ms", "0")) * self._rate // 1000
        self._quiet_rms = max(_QUIET_FLOOR, self._noise_rms() * 10 ** (self.p["end_of_sound_db"] / 20))
        self._parts = self._take_preroll(pad)
        self._len = sum(p.size for p in self._parts)
        self._pause = None
        self._speech = x.size
        self._append(x)

    def _append(self, x: np.ndarray) -> None:
        assert self._parts is not None
        self._parts.append(x)
        self._len += x.size

    def _remember(self, x: np.ndarray) -> None:
        # keep just enough audio from before a start for the largest pad
        self._preroll.append(x)
        self._preroll_len += x.size
        keep = self._rate  # 1 s
        while self._preroll and self._preroll_len - self._preroll[0].size >= keep:
            self._preroll_len -= self._preroll.popleft().size

    def _noise_rms(self) -> float:
        """The level of what was heard just before the speech: the quieter third of the last
        `_NOISE_MS` of the preroll (the room as it is now, not a second ago)."""
        levels, heard = [], 0
        for x in reversed(self._preroll):
            if heard * 1000 >= _NOISE_MS * self._rate:
                break
            levels.append(_rms(x))
            heard += x.size
        levels.sort()
        return levels[len(levels) // 3] if levels else 0.0

    def _take_preroll(self, samples: int) -> list[np.ndarray]:
        joined = np.concatenate(list(self._preroll))[-samples:] if samples > 0 and self._preroll else None
        self._preroll.clear()
        self._preroll_len = 0
        return [] if joined is None else [joined]

    def _utterance(self, frame: AudioData | None, speculative: bool) -> AudioData:
        assert self._parts is not None
        uid = str(self._next_id)
        self._next_id += 1
        self._emitted = uid
        samples = np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)
        meta = {TURN_ID: uid, "speculative": "1" if speculative else "0",
                "utterance_ms": str(self._ms(samples.size))}
        return AudioData(samples, self._rate, 1, metadata=meta,
                         timestamp_us=frame.timestamp_us if frame is not None else 0)
