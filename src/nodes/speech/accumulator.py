"""AudioBufferAccumulatorNode: VAD-annotated windows → whole utterances.

Reads the SileroVADNode annotations (see vad.py). An utterance starts at
`speech_start` (with `vad_pad_ms` of audio from before it) and ends at
`speech_end`; it is emitted as one audio frame with metadata `utterance_id`,
followed by a turn-control frame `commit`. Too short (`min_utterance_
duration_ms`, or the VAD's `speech_discard`) → nothing. Longer than
`max_utterance_duration_ms` → emitted and committed there, and a new one
starts.

With `speculative` on, the utterance is also emitted once a pause has lasted
`speculative_delay_ms` (well before the VAD's end-of-turn silence), so ASR
and everything after it start while the VAD is still confirming the end of
the turn; if speech resumes, a `cancel` control for that id follows and the
next emission carries a new id. The delay keeps short pauses inside a
sentence (stop consonants, breaths) from starting work that gets cancelled.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from engine.data import AudioData, RuntimeData
from engine.node import Node

from .common import AUDIO, CONTROL, control, mono_f32


class AudioBufferAccumulatorNode(Node):
    node_type = "AudioBufferAccumulatorNode"
    input_types = AUDIO
    output_types = (*AUDIO, *CONTROL)
    params_schema = {
        "type": "object",
        "properties": {
            "min_utterance_duration_ms": {"type": "integer", "minimum": 0, "maximum": 60_000, "default": 300},
            "max_utterance_duration_ms": {"type": "integer", "minimum": 500, "maximum": 600_000,
                                          "default": 30_000},
            "speculative": {"type": "boolean", "default": True},
            "speculative_delay_ms": {"type": "integer", "minimum": 0, "maximum": 10_000, "default": 96},
        },
        "additionalProperties": False,
    }
    param_aliases = {
        "minUtteranceDurationMs": "min_utterance_duration_ms",
        "maxUtteranceDurationMs": "max_utterance_duration_ms",
        "speculativeDelayMs": "speculative_delay_ms",
    }

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self.min_ms = int(params.get("min_utterance_duration_ms", 300))
        self.max_ms = int(params.get("max_utterance_duration_ms", 30_000))
        self.speculative = bool(params.get("speculative", True))
        self.delay_ms = int(params.get("speculative_delay_ms", 96))
        self._pause_len: int | None = None  # samples of the current pause, None when not pausing
        self._preroll: collections.deque[np.ndarray] = collections.deque()
        self._preroll_len = 0
        self._parts: list[np.ndarray] | None = None  # the utterance being collected
        self._len = 0
        self._rate = 16000
        self._next_id = 0
        self._emitted: str | None = None  # id of a speculative emission not yet committed/cancelled

    def process(self, frame: RuntimeData) -> list[RuntimeData]:
        assert isinstance(frame, AudioData)
        x = mono_f32(self, frame)
        self._rate = frame.sample_rate
        event = frame.metadata.get("vad_event")
        out: list[RuntimeData] = []
        if self._parts is None:
            if event == "speech_start":
                pad = int(frame.metadata.get("vad_pad_ms", "0")) * self._rate // 1000
                self._parts = self._take_preroll(pad)
                self._len = sum(p.size for p in self._parts)
                self._append(x)
            else:
                self._remember(x, frame)
            return out
        self._append(x)
        if event == "speech_pause":
            self._pause_len = 0
        elif event == "speech_resume":
            self._pause_len = None
            if self._emitted is not None:
                out.append(control("cancel", self._emitted, reason="speech resumed"))
                self._emitted = None
        if self._pause_len is not None and event not in ("speech_end", "speech_discard"):
            self._pause_len += x.size
            if (self.speculative and self._emitted is None and self._long_enough()
                    and self._pause_len * 1000 >= self.delay_ms * self._rate):
                out.append(self._utterance(frame, speculative=True))
        if event in ("speech_end", "speech_discard"):
            out += self._finish(frame, keep=event == "speech_end")
        if self._parts is not None and self._len * 1000 >= self.max_ms * self._rate:
            out += self._finish(frame, keep=True)
            self._parts = []  # the speech goes on in a new utterance
        return out

    def flush(self) -> list[RuntimeData]:
        if self._parts is None:
            return []
        return self._finish(None, keep=True)

    # ------------------------------------------------------------ helpers

    def _long_enough(self) -> bool:
        return self._len * 1000 >= self.min_ms * self._rate

    def _append(self, x: np.ndarray) -> None:
        assert self._parts is not None
        self._parts.append(x)
        self._len += x.size

    def _remember(self, x: np.ndarray, frame: AudioData) -> None:
        # keep just enough audio from before a start for the largest pad
        self._preroll.append(x)
        self._preroll_len += x.size
        keep = self._rate  # 1 s
        while self._preroll and self._preroll_len - self._preroll[0].size >= keep:
            self._preroll_len -= self._preroll.popleft().size

    def _take_preroll(self, samples: int) -> list[np.ndarray]:
        if samples <= 0 or not self._preroll:
            self._preroll.clear()
            self._preroll_len = 0
            return []
        joined = np.concatenate(list(self._preroll))[-samples:]
        self._preroll.clear()
        self._preroll_len = 0
        return [joined]

    def _utterance(self, frame: AudioData | None, speculative: bool) -> AudioData:
        assert self._parts is not None
        uid = str(self._next_id)
        self._next_id += 1
        if speculative:
            self._emitted = uid
        samples = np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)
        meta = {"utterance_id": uid, "speculative": "1" if speculative else "0",
                "utterance_ms": str(samples.size * 1000 // self._rate)}
        return AudioData(samples, self._rate, 1, metadata=meta,
                         timestamp_us=frame.timestamp_us if frame is not None else 0)

    def _finish(self, frame: AudioData | None, keep: bool) -> list[RuntimeData]:
        out: list[RuntimeData] = []
        if keep and self._long_enough():
            if self._emitted is None:
                out.append(self._utterance(frame, speculative=False))
                uid = str(self._next_id - 1)
            else:
                uid = self._emitted
            out.append(control("commit", uid))
        elif self._emitted is not None:
            out.append(control("cancel", self._emitted, reason="too short"))
        self._emitted = None
        self._pause_len = None
        self._parts = None
        self._len = 0
        return out
