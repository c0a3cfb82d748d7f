"""WhisperNode: speech recognition with faster-whisper (CTranslate2).

Takes utterances (any rate; resampled to 16 kHz as a whole) and emits one
text frame per utterance, carrying the utterance's metadata plus `asr_ms`,
`avg_logprob`, `no_speech_prob` and `segments` (JSON: start, end, text).
Turn-control frames pass through untouched, in order, so nodes further down
see commits and cancels after the text they concern. An utterance with no
words produces no text.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from engine.data import RuntimeData, TextData
from engine.node import Node

from . import models
from .common import AUDIO, CONTROL, TEXT, as_control, mono_f32


class WhisperNode(Node):
    node_type = "WhisperNode"
    multiprocess = True
    blocking = True
    input_types = (*AUDIO, *CONTROL)
    output_types = (*TEXT, *CONTROL)
    params_schema = {
        "type": "object",
        "properties": {
            "model": {"type": "string", "minLength": 1, "default": "tiny.en"},
            "language": {"type": "string", "minLength": 2, "maxLength": 8, "default": "en"},
            "beam_size": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
            "compute_type": {"enum": ["int8", "int8_float32", "float32", "default"], "default": "int8"},
            "cpu_threads": {"type": "integer", "minimum": 1, "maximum": 64, "default": 2},
        },
        "additionalProperties": False,
    }
    param_aliases = {"beamSize": "beam_size", "computeType": "compute_type", "model_path": "model",
                     "modelPath": "model", "cpuThreads": "cpu_threads"}

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._model: Any = None

    def initialize(self) -> None:
        models.require("faster_whisper", self.node_id, self.node_type)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        name = self.params.get("model", "tiny.en")
        path = (models.whisper_tiny_en_path(self.node_id) if name == "tiny.en"
                else models.existing_file(name, self.node_id, "model"))
        self.report_progress("loading", 0, f"Whisper {name}")
        from faster_whisper import WhisperModel

        self._model = WhisperModel(str(path), device="cpu", compute_type=self.params.get("compute_type", "int8"),
                                   cpu_threads=int(self.params.get("cpu_threads", 2)), local_files_only=True)
        self.report_progress("warming up", 80, "first transcription")
        import numpy as np

        self.transcribe(np.zeros(16000, np.float32))  # the first run is several times slower
        self.report_progress("loaded", 100, f"Whisper {name}")

    def transcribe(self, audio16k: Any) -> tuple[str, list[Any]]:
        segments, _info = self._model.transcribe(
            audio16k, language=self.params.get("language", "en"), beam_size=int(self.params.get("beam_size", 1)),
            temperature=0.0, condition_on_previous_text=False, without_timestamps=True, vad_filter=False)
        segs = list(segments)  # lazy: iterating does the work
        return " ".join(s.text.strip() for s in segs).strip(), segs

    def process(self, frame: RuntimeData) -> RuntimeData | None:
        if as_control(frame) is not None:
            return frame
        t0 = time.perf_counter()
        text, segs = self.transcribe(mono_f32(self, frame, 16000))
        if not text:
            return None
        meta = dict(frame.metadata)
        meta["asr_ms"] = f"{(time.perf_counter() - t0) * 1000:.1f}"
        if segs:
            meta["avg_logprob"] = f"{sum(s.avg_logprob for s in segs) / len(segs):.4f}"
            meta["no_speech_prob"] = f"{max(s.no_speech_prob for s in segs):.4f}"
            meta["segments"] = orjson.dumps([{"start": s.start, "end": s.end, "text": s.text.strip()}
                                             for s in segs]).decode()
        return TextData(text, language=self.params.get("language", "en"), metadata=meta)


