"""SileroVADNode: Silero VAD v6 (the ONNX model inside faster-whisper) on onnxruntime.

Runs in the engine process by default: one 512-sample window costs ~0.1 ms
back to back, less than a hop to a node process and back; but ~0.7 ms when
windows come 32 ms apart, as live audio does (the model's weights are out of
the caches by then). So outside speech a window whose peak is below
`silence_floor_dbfs` is scored 0 without running the model, and kept: the
model runs on the kept windows, back to back, when the next louder window
comes. Silero's recurrent state depends on seconds of history (it never
settles on silence, and a state left as it was, or taken from silence, made
it find other segments in quiet speech), so this keeps its results exactly
those of running it on every window for silences up to `_REPLAY` windows
(8.2 s); past that the oldest are let go. The floor is below what Silero
hears: espeak-ng speech peaking at −55 dBFS scores 0.95, at −60 dBFS 0.02.
A connected microphone that nobody speaks into costs almost nothing.

A real microphone is rarely that quiet: a room's hiss and hum sit at −60 to
−40 dBFS. So the floor also follows the room: a window whose peak is within
`noise_margin_db` of the quietest recent windows' peaks (the noise heard
outside speech) is kept the same way. Speech that stays that close to the
noise is below what Silero calls speech anyway (it scored such windows 0);
the model still sees every window, in order, when the next louder one comes.

Input audio is re-cut into windows (512 samples at 16 kHz, 256 at 8 kHz); each window goes out as an audio frame annotated in its metadata:

- `vad_probability`: the model's speech probability for the window;
- `vad_speech`: "1" while inside a speech segment;
- `vad_event` on the window where something happened: `speech_start`,
  `speech_pause` (first window below the silence threshold inside speech),
  `speech_resume` (speech again before the pause closed the segment),
  `speech_end` (silence lasted `min_silence_duration_ms`), or
  `speech_discard` (the segment ended shorter than `min_speech_duration_ms`);
- `vad_pad_ms` on `speech_start`: how much audio before it belongs to the
  segment (`speech_pad_ms`).
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from engine.data import AudioData, RuntimeData
from engine.node import Node

from . import models
from .common import AUDIO, check_mono_rate, mono_f32

_WINDOW = {16000: 512, 8000: 256}
_CONTEXT = {16000: 64, 8000: 32}
_REPLAY = 256  # quiet windows kept for the model (8.2 s at 16 kHz)


class SileroVADNode(Node):
    node_type = "SileroVADNode"
    multiprocess = False
    input_types = AUDIO
    output_types = AUDIO
    params_schema = {
        "type": "object",
        "properties": {
            "threshold": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.5,
                          "description": "speech probability above which a window is speech"},
            "min_speech_duration_ms": {"type": "integer", "minimum": 0, "maximum": 60_000, "default": 250,
                                       "description": "a segment shorter than this is discarded"},
            "min_silence_duration_ms": {"type": "integer", "minimum": 0, "maximum": 60_000, "default": 320,
                                        "description": "silence that ends a segment"},
            "speech_pad_ms": {"type": "integer", "minimum": 0, "maximum": 5_000, "default": 30,
                              "description": "audio kept before and after each segment"},
            "silence_floor_dbfs": {"type": "number", "minimum": -120, "maximum": 0, "default": -60,
                                   "description": "outside speech, a window peaking below this level (dBFS) "
                                                  "is silence without running the model (-120: always run it)"},
            "noise_margin_db": {"type": "number", "minimum": 0, "maximum": 40, "default": 6,
                                "description": "outside speech, a window peaking less than this far above the "
                                               "room's noise is silence without running the model (0: off)"},
            "sampling_rate": {"enum": [8000, 16000], "default": 16000,
                              "description": "the input's rate in Hz (send audio at this rate)"},
        },
        "additionalProperties": False,
    }
    param_aliases = {
        "minSpeechDurationMs": "min_speech_duration_ms",
        "minSilenceDurationMs": "min_silence_duration_ms",
        "speechPadMs": "speech_pad_ms",
        "samplingRate": "sampling_rate",
        "sample_rate": "sampling_rate",
        "sampleRate": "sampling_rate",
    }

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self.rate = int(params.get("sampling_rate", 16000))
        self.window = _WINDOW[self.rate]
        self.threshold = float(params.get("threshold", 0.5))
        self.neg_threshold = max(self.threshold - 0.15, 0.01)
        self.min_speech = int(params.get("min_speech_duration_ms", 250)) * self.rate // 1000
        self.min_silence = int(params.get("min_silence_duration_ms", 320)) * self.rate // 1000
        self.pad_ms = int(params.get("speech_pad_ms", 30))
        floor_db = float(params.get("silence_floor_dbfs", -60))
        self.floor = 0.0 if floor_db <= -120 else 10 ** (floor_db / 20)
        margin_db = float(params.get("noise_margin_db", 6))
        self.margin = 10 ** (margin_db / 20) if margin_db > 0 else 0.0
        self._noise = 0.0  # the room's noise: a window peak, following the quietest (see _skippable)
        self._session: Any = None
        self._pending = np.zeros(0, np.float32)
        self._template: AudioData | None = None

    def initialize(self) -> None:
        models.require("onnxruntime", self.node_id, self.node_type)
        self.report_progress("loading", 0, "Silero VAD v6")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(models.silero_vad_path(self.node_id)), sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        self._reset()
        self.report_progress("loaded", 100, "Silero VAD v6")

    def _reset(self) -> None:
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros(_CONTEXT[self.rate], np.float32)
        self._in_speech = False
        self._paused = False
        self._speech_len = 0  # samples from speech start to the current pause
        self._silence_len = 0
        self._quiet: collections.deque[np.ndarray] = collections.deque()  # windows the model has not seen yet
        self._quiet_context = self._context  # the context before the first of them

    def probability(self, window: np.ndarray) -> float:
        x = np.concatenate((self._context, window))[None, :]
        prob, self._h, self._c = self._session.run(None, {"input": x, "h": self._h, "c": self._c})
        self._context = window[-len(self._context):]
        return float(np.asarray(prob).reshape(-1)[0])

    def process(self, frame: RuntimeData) -> list[AudioData]:
        assert isinstance(frame, AudioData)
        check_mono_rate(self, frame, self.rate)
        self._template = frame
        x = mono_f32(self, frame)
        buf = np.concatenate((self._pending, x)) if self._pending.size else x
        n = buf.size // self.window
        out = [self._step(buf[i * self.window:(i + 1) * self.window], frame) for i in range(n)]
        self._pending = buf[n * self.window:].copy()
        return out

    def _heard_noise(self, peak: float) -> None:
        """A window that is not speech: the room's noise estimate drops at once to a quieter one
        and rises slowly (1 % a window: a few seconds to follow a louder room). Only windows the
        model called silence (or skipped as such) count, so speech never raises it."""
        if peak < self._noise or not self._noise:
            self._noise = peak
        else:
            self._noise += (peak - self._noise) * 0.01

    def _step(self, window: np.ndarray, src: AudioData) -> AudioData:
        peak = float(np.abs(window).max())
        if not self._in_speech and (peak < self.floor or peak < self._noise * self.margin):
            self._heard_noise(peak)
            p = 0.0  # silence, as the model would say; it sees the window later, with the next louder one
            if len(self._quiet) == _REPLAY:
                self._quiet_context = self._quiet.popleft()[-len(self._context):]
            elif not self._quiet:
                self._quiet_context = self._context
            self._quiet.append(window)
        else:
            if self._quiet:  # the model catches up on the quiet windows, back to back (hot: ~0.1 ms each)
                self._context = self._quiet_context
                for w in self._quiet:
                    self.probability(w)
                self._quiet.clear()
            p = self.probability(window)
            if not self._in_speech and p < self.neg_threshold:
                self._heard_noise(peak)
        meta = dict(src.metadata)
        meta["vad_probability"] = f"{p:.4f}"
        event = None
        if not self._in_speech:
            if p >= self.threshold:
                self._in_speech, self._paused = True, False
                self._speech_len, self._silence_len = self.window, 0
                event = "speech_start"
                meta["vad_pad_ms"] = str(self.pad_ms)
        elif p >= self.threshold:
            if self._paused:
                event = "speech_resume"
                self._speech_len += self._silence_len
            self._paused, self._silence_len = False, 0
            self._speech_len += self.window
        elif p < self.neg_threshold or self._paused:
            if not self._paused:
                self._paused = True
                event = "speech_pause"
            self._silence_len += self.window
            if self._silence_len >= self.min_silence:
                event = "speech_end" if self._speech_len >= self.min_speech else "speech_discard"
                meta["vad_speech_ms"] = str(self._speech_len * 1000 // self.rate)
                self._in_speech = self._paused = False
        else:
            self._speech_len += self.window
        meta["vad_speech"] = "1" if self._in_speech else "0"
        if event:
            meta["vad_event"] = event
        return AudioData(window.copy(), self.rate, 1, metadata=meta, timestamp_us=src.timestamp_us)

    def flush(self) -> list[AudioData]:
        """End of stream: an open segment ends here (with the leftover samples)."""
        if not self._in_speech or self._template is None:
            return []
        meta = dict(self._template.metadata)
        meta.update(vad_speech="0", vad_probability="0.0000",
                    vad_event="speech_end" if self._speech_len >= self.min_speech else "speech_discard",
                    vad_speech_ms=str(self._speech_len * 1000 // self.rate))
        self._in_speech = False
        return [AudioData(self._pending.copy(), self.rate, 1, metadata=meta)]
