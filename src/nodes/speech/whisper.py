"""WhisperNode: speech recognition with faster-whisper (CTranslate2).

Takes utterances (any rate; resampled to 16 kHz as a whole) and emits one
text frame per utterance, carrying the utterance's metadata plus `asr_ms`,
`avg_logprob`, `no_speech_prob` and `segments` (JSON: start, end, text).
An utterance with no words produces no text.

Whisper encodes a fixed 30 s window, which is most of its cost on a short
utterance. With `window_s` 0 (the default) the encoder gets a window fitted
to the utterance instead: twice its length plus a second, at least 8 s, with
repeated trigrams suppressed, the output capped at ~8 tokens per second of
audio, and a sentence that starts over the first one's words cut (a short
window makes Whisper repeat itself at the end). About the same words,
several times faster; utterances over 14 s use the standard window.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from engine.data import RuntimeData, TextData
from engine.errors import NodeExecutionError
from engine.node import Node, ParamUnavailable

from . import models
from .common import AUDIO, TEXT, mono_f32

_RATE = 16000
_HOP = 160  # samples per mel frame
#: the longest utterance a fitted window is used for (2× + 1 s stays under 30 s)
_FITTED_MAX_S = 14.0
_SENTENCES = re.compile(r"(?<=[.?!])\s+")


def _words(sentence: str) -> list[str]:
    return re.sub(r"[^\w' ]+", " ", sentence.lower()).split()


def without_restart(text: str) -> str:
    """`text` up to a sentence that starts over with the first sentence's first words
    ("Can you tell me a joke? Can you"): Whisper's loop on a short window."""
    sentences = _SENTENCES.split(text)
    first = _words(sentences[0])
    for i, later in enumerate(sentences[1:], 1):
        w = _words(later)
        n = min(len(w), 2)
        if n and w[:n] == first[:n]:
            return " ".join(sentences[:i])
    return text


class WhisperNode(Node):
    node_type = "WhisperNode"
    multiprocess = True
    blocking = True
    input_types = AUDIO
    output_types = TEXT
    params_schema = {
        "type": "object",
        "properties": {
            "model": {"type": "string", "minLength": 1, "default": "tiny.en",
                      "description": "tiny.en (bundled) or a CTranslate2 Whisper model directory"},
            "language": {"type": "string", "minLength": 2, "maxLength": 8, "default": "en",
                         "description": "the spoken language (ISO 639-1 code)"},
            "beam_size": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1,
                          "description": "beam search width; 1 = greedy (fastest)"},
            "compute_type": {"enum": ["int8", "int8_float32", "float32", "default"], "default": "int8",
                             "description": "CTranslate2 weight and compute precision"},
            "cpu_threads": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1,
                            "description": "threads of this node's process (one is fastest for short "
                                           "utterances on a small machine)"},
            "window_s": {"type": "number", "minimum": 0, "maximum": 30, "default": 0,
                         "description": "encoder window: 0 = fitted to the utterance, 30 = Whisper's standard"},
            "min_window_s": {"type": "number", "minimum": 4, "maximum": 30, "default": 8,
                             "description": "the shortest fitted window"},
        },
        "additionalProperties": False,
    }
    param_aliases = {"beamSize": "beam_size", "computeType": "compute_type", "model_path": "model",
                     "modelPath": "model", "cpuThreads": "cpu_threads"}

    @classmethod
    def unavailable(cls, params: dict[str, Any]) -> str | ParamUnavailable | None:
        if not models.installed("faster_whisper"):
            return "the Python package faster-whisper is not installed: pip install '.[speech]'"
        return models.whisper_model_unavailable(params.get("model", "tiny.en"))

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._model: Any = None
        self._tokenizer: Any = None
        self.window_s = float(params.get("window_s", 0))
        self.language = params.get("language", "en")
        self.beam_size = int(params.get("beam_size", 1))

    def initialize(self) -> None:
        why = self.unavailable(self.params)  # validation said so already; a node made directly learns it here
        if why is not None:
            raise NodeExecutionError(str(why), node_id=self.node_id,
                                     context={"field": why.param} if isinstance(why, ParamUnavailable) else {})
        threads = int(self.params.get("cpu_threads", 1))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        name = self.params.get("model", "tiny.en")
        path = models.whisper_tiny_en_path(self.node_id) if name == "tiny.en" else Path(os.path.expanduser(name))
        self.report_progress("loading", 0, f"Whisper {name}")
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        self._model = WhisperModel(str(path), device="cpu", compute_type=self.params.get("compute_type", "int8"),
                                   cpu_threads=threads, local_files_only=True)
        self._tokenizer = Tokenizer(self._model.hf_tokenizer, self._model.model.is_multilingual,
                                    task="transcribe", language=self.language)
        self.report_progress("warming up", 80, "first transcription")
        self.transcribe(np.zeros(_RATE, np.float32))  # the first run is several times slower
        self.report_progress("loaded", 100, f"Whisper {name}")

    def transcribe(self, audio16k: np.ndarray) -> tuple[str, dict[str, str]]:
        """(text, metadata about it) for 16 kHz mono float32 audio (blocking)."""
        seconds = audio16k.size / _RATE
        if self.window_s == 0 and seconds <= _FITTED_MAX_S:
            return self._fitted(audio16k, max(float(self.params.get("min_window_s", 8.0)), 2 * seconds + 1.0))
        segments, _info = self._model.transcribe(
            audio16k, language=self.language, beam_size=self.beam_size, temperature=0.0,
            condition_on_previous_text=False, without_timestamps=True, vad_filter=False)
        segs = list(segments)  # lazy: iterating does the work
        text = " ".join(s.text.strip() for s in segs).strip()
        meta = {}
        if segs:
            meta = {"avg_logprob": f"{sum(s.avg_logprob for s in segs) / len(segs):.4f}",
                    "no_speech_prob": f"{max(s.no_speech_prob for s in segs):.4f}",
                    "segments": orjson.dumps([{"start": s.start, "end": s.end, "text": s.text.strip()}
                                              for s in segs]).decode()}
        return text, meta

    def _fitted(self, audio16k: np.ndarray, window_s: float) -> tuple[str, dict[str, str]]:
        import ctranslate2

        frames = int(window_s * _RATE) // _HOP
        frames += frames % 2  # the encoder halves the frame count
        padded = np.concatenate((audio16k, np.zeros(frames * _HOP, np.float32)))
        features = self._model.feature_extractor(padded)[None, :, :frames]
        tok = self._tokenizer
        seconds = audio16k.size / _RATE
        (result,) = self._model.model.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features)),
            [[*tok.sot_sequence, tok.no_timestamps]], beam_size=self.beam_size,
            max_length=int(8 * seconds) + 6, suppress_blank=True, suppress_tokens=[-1],
            no_repeat_ngram_size=3, return_scores=True, return_no_speech_prob=True)
        ids = [t for t in result.sequences_ids[0] if t < tok.eot]
        text = without_restart(tok.decode(ids).strip())
        meta = {"avg_logprob": f"{result.scores[0]:.4f}", "no_speech_prob": f"{result.no_speech_prob:.4f}",
                "segments": orjson.dumps([{"start": 0.0, "end": round(seconds, 3), "text": text}]).decode()}
        return text, meta

    def process(self, frame: RuntimeData) -> TextData | None:
        t0 = time.perf_counter()
        text, extra = self.transcribe(mono_f32(self, frame, _RATE))
        if not text:
            return None
        meta = {**frame.metadata, "asr_ms": f"{(time.perf_counter() - t0) * 1000:.1f}", **extra}
        return TextData(text, language=self.language, metadata=meta)
