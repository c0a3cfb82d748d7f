"""VibeVoiceTTSNode: Microsoft's VibeVoice text to speech (24 kHz float32),
with voice cloning from `voice_samples` (WAV paths on the server).

The real model needs the `vibevoice` package, torch, its weights in a local
folder (`model_path`; nothing is downloaded) and a GPU `device`. Where any
is missing the node type is served by the server's stand-in
(engine/standins.toml: Kokoro), which keeps the params and the output format.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.data import AudioData, DataKind, RuntimeData, TextData
from engine.errors import NodeExecutionError
from engine.node import Node

from . import models

RATE = 24_000


class VibeVoiceTTSNode(Node):
    """VibeVoice text to speech (vibevoice, torch); needs model_path and a device."""

    node_type = "VibeVoiceTTSNode"
    multiprocess = True
    input_types = (DataKind.TEXT,)
    output_types = (DataKind.AUDIO,)
    params_schema = {
        "type": "object",
        "properties": {
            "model_path": {"type": "string", "default": "",
                           "description": "a local folder with the VibeVoice weights (e.g. VibeVoice-1.5B)"},
            "device": {"enum": ["cuda", "mps", "cpu"], "default": "cuda", "description": "where the model runs (torch device)"},
            "cfg_scale": {"type": "number", "minimum": 0, "maximum": 10, "default": 1.3,
                          "description": "classifier-free guidance scale"},
            "inference_steps": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10,
                                "description": "diffusion steps per speech frame"},
            "sample_rate": {"const": RATE, "description": "always 24000"},
            "use_voice_cloning": {"type": "boolean", "default": True,
                                  "description": "speak in the voice of voice_samples"},
            "voice_samples": {"type": "array", "items": {}, "default": [],
                              "description": "WAV files on the server to clone the voice from"},
        },
        "additionalProperties": False,
    }
    inert_params = {"node_id": "the node's id is the manifest's"}

    @classmethod
    def unavailable(cls, params: dict[str, Any]) -> str | None:
        missing = [m for m in ("vibevoice", "torch") if not models.installed(m)]
        if missing:
            return f"it needs the Python packages {', '.join(missing)} (and a GPU)"
        path = params.get("model_path") or ""
        if not path or not Path(os.path.expanduser(path)).is_dir():
            return "model_path must be a local VibeVoice folder (runtime.toml [node_params.VibeVoiceTTSNode])"
        return None

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._model: Any = None
        self._processor: Any = None
        self._voices: list[np.ndarray] = []

    def initialize(self) -> None:
        why = self.unavailable(self.params)
        if why:
            raise NodeExecutionError(f"{self.node_type}: {why}", node_id=self.node_id)
        import soundfile
        import soxr
        import torch
        from vibevoice.modular.modeling_vibevoice_inference import (
            VibeVoiceForConditionalGenerationInference,
        )
        from vibevoice.processor.vibevoice_processor import VibeVoiceProcessor

        path = os.path.expanduser(self.params["model_path"])
        device = self.params.get("device", "cuda")
        self.report_progress("loading", 0, f"VibeVoice from {path}")
        self._processor = VibeVoiceProcessor.from_pretrained(path)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self._model = VibeVoiceForConditionalGenerationInference.from_pretrained(
            path, torch_dtype=dtype, device_map=device).eval()
        self._model.set_ddpm_inference_steps(num_steps=int(self.params.get("inference_steps", 10)))
        if self.params.get("use_voice_cloning", True):
            for sample in self.params.get("voice_samples") or []:
                if isinstance(sample, str) and sample:
                    audio, rate = soundfile.read(os.path.expanduser(sample), dtype="float32", always_2d=True)
                    self._voices.append(soxr.resample(audio.mean(axis=1), rate, RATE).astype(np.float32))
        self.report_progress("loaded", 100, "VibeVoice")

    def _synthesize(self, text: str) -> np.ndarray:
        import torch

        kwargs: dict[str, Any] = {"text": [f"Speaker 1: {text}"], "padding": True, "return_tensors": "pt",
                                  "return_attention_mask": True}
        if self._voices:
            kwargs["voice_samples"] = [self._voices]
        device = self.params.get("device", "cuda")
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self._processor(**kwargs).items()
                  if v is not None}
        out = self._model.generate(**inputs, max_new_tokens=None, cfg_scale=float(self.params.get("cfg_scale", 1.3)),
                                   tokenizer=self._processor.tokenizer, generation_config={"do_sample": False})
        wave = out.speech_outputs[0]
        return np.ascontiguousarray(wave.float().cpu().numpy().reshape(-1), dtype=np.float32)

    async def process(self, frame: RuntimeData) -> AsyncIterator[RuntimeData]:
        if not isinstance(frame, TextData) or not frame.text.strip() or frame.text.strip().startswith("<|"):
            return
        samples = await asyncio.to_thread(self._synthesize, frame.text.strip())
        yield AudioData(samples, RATE, 1, metadata=dict(frame.metadata))

    def cleanup(self) -> None:
        self._model = None
        self._processor = None
