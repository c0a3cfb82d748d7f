"""LFM2AudioNode: Liquid AI's LFM2-Audio (speech in → text, or text and speech, out).

The real model needs the `liquid-audio` package, torch, its weights in a
local folder (`model_path`; nothing is downloaded) and, to be fast, a CUDA
`device`. Where any of these is missing the node type is served by the
server's stand-in (engine/standins.toml: Whisper → the bundled LLM, and
Piper when `text_only` is false), which keeps the same params and outputs.

Input: one whole utterance per frame (mono float32; resampled to 24 kHz).
Output: the reply's text tokens as they come, with `text_only: false` also
its audio (24 kHz float32) in short pieces, then `<|text_end|>`. One
conversation per metadata `sessionId` (default one per node); metadata
`reset: "true"` starts it over.
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
from .common import mono_f32

RATE = 24_000
_AUDIO_BATCH = 5  # audio tokens decoded together (fewer clicks between pieces)


class LFM2AudioNode(Node):
    """LFM2-Audio speech-to-speech (liquid-audio, torch); needs model_path and a device."""

    node_type = "LFM2AudioNode"
    multiprocess = True
    input_types = (DataKind.AUDIO,)
    output_types = (DataKind.TEXT, DataKind.AUDIO)
    params_schema = {
        "type": "object",
        "properties": {
            "model_path": {"type": "string", "default": "",
                           "description": "a local folder with the LFM2-Audio weights (e.g. LFM2-Audio-1.5B)"},
            "device": {"enum": ["cuda", "cpu"], "default": "cuda", "description": "where the model runs (torch device)"},
            "system_prompt": {"type": "string", "default": "Respond with interleaved text and audio.",
                              "description": "the system message of every conversation"},
            "text_only": {"type": "boolean", "default": False, "description": "reply with text only"},
            "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": 32_768, "default": 512,
                               "description": "the longest reply, in tokens (text and audio)"},
            "text_temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 0.7,
                                 "description": "sampling temperature of text tokens (text_only)"},
            "text_top_k": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 50,
                           "description": "top-k sampling of text tokens (text_only)"},
            "audio_temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1.0,
                                  "description": "sampling temperature of audio tokens"},
            "audio_top_k": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 4,
                            "description": "top-k sampling of audio tokens"},
            "sample_rate": {"const": RATE, "description": "always 24000"},
            "session_timeout_minutes": {"type": "number", "minimum": 0, "default": 30,
                                        "description": "a conversation idle this long is forgotten"},
        },
        "additionalProperties": False,
    }
    inert_params = {"hf_repo": "nothing is downloaded; the model is model_path",
                    "node_id": "the node's id is the manifest's"}

    @classmethod
    def unavailable(cls, params: dict[str, Any]) -> str | None:
        missing = [m for m in ("liquid_audio", "torch") if not models.installed(m)]
        if missing:
            return (f"it needs the Python packages {', '.join(m.replace('_', '-') for m in missing)} "
                    "(and a GPU to be fast)")
        path = params.get("model_path") or ""
        if not path:
            return "model_path is not set (a local LFM2-Audio folder; runtime.toml [node_params.LFM2AudioNode])"
        if not Path(os.path.expanduser(path)).is_dir():
            return f"model_path {path} is not a folder"
        return None

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._model: Any = None
        self._processor: Any = None
        self._chats: dict[str, Any] = {}
        self._lock: asyncio.Lock | None = None

    def initialize(self) -> None:
        why = self.unavailable(self.params)
        if why:
            raise NodeExecutionError(f"{self.node_type}: {why}", node_id=self.node_id)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from liquid_audio import LFM2AudioModel, LFM2AudioProcessor

        path = os.path.expanduser(self.params["model_path"])
        device = self.params.get("device", "cuda")
        self.report_progress("loading", 0, f"LFM2-Audio from {path}")
        self._processor = LFM2AudioProcessor.from_pretrained(path, device=device).eval()
        self._model = LFM2AudioModel.from_pretrained(path, device=device).eval()
        self.report_progress("loaded", 100, "LFM2-Audio")

    def _chat(self, key: str, reset: bool) -> Any:
        from liquid_audio import ChatState

        if reset or key not in self._chats:
            chat = ChatState(self._processor)
            chat.new_turn("system")
            chat.add_text(self.params.get("system_prompt", ""))
            chat.end_turn()
            self._chats[key] = chat
        return self._chats[key]

    async def process(self, frame: RuntimeData) -> AsyncIterator[RuntimeData]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        audio = mono_f32(self, frame, RATE)
        meta = dict(frame.metadata)
        async with self._lock:
            chat = self._chat(meta.get("sessionId", ""), meta.get("reset") == "true")
            queue: asyncio.Queue[Any] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            worker = loop.run_in_executor(None, self._generate, chat, audio,
                                          lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
            while (item := await queue.get()) is not None:
                if isinstance(item, str):
                    yield TextData(item, metadata=dict(meta))
                else:
                    yield AudioData(item, RATE, 1, metadata=dict(meta))
            await worker
            yield TextData("<|text_end|>", metadata={**meta, "final": "1"})

    def _generate(self, chat: Any, audio: np.ndarray, put: Any) -> None:
        """One reply, in a thread: text pieces (str) and audio pieces (arrays) to `put`, then None."""
        import torch
        from liquid_audio import LFMModality

        try:
            chat.new_turn("user")
            chat.add_audio(torch.from_numpy(audio).float().unsqueeze(0), RATE)
            chat.end_turn()
            chat.new_turn("assistant")
            p = self.params
            if p.get("text_only", False):
                tokens = self._model.generate_sequential(**chat, max_new_tokens=p.get("max_new_tokens", 512),
                                                         text_temperature=p.get("text_temperature"),
                                                         text_top_k=p.get("text_top_k"))
            else:
                tokens = self._model.generate_interleaved(**chat, max_new_tokens=p.get("max_new_tokens", 512),
                                                          audio_temperature=p.get("audio_temperature", 1.0),
                                                          audio_top_k=p.get("audio_top_k", 4))
            texts, audios, flags, batch = [], [], [], []
            for token in tokens:
                if token.numel() == 1:
                    texts.append(token)
                    flags.append(LFMModality.TEXT)
                    if piece := self._processor.text.decode(token):
                        put(piece)
                else:
                    audios.append(token)
                    flags.append(LFMModality.AUDIO_OUT)
                    batch.append(token)
                    if len(batch) >= _AUDIO_BATCH:
                        put(self._decode(batch))
                        batch = []
            if len(batch) > 1:
                put(self._decode(batch[:-1]))  # the last frame is the end-of-audio marker
            codebooks = int(audios[0].numel()) if audios else 8
            chat.append(text=torch.stack(texts, 1) if texts else None,
                        audio_out=torch.stack(audios, 1) if audios else torch.empty((codebooks, 0), dtype=torch.long),
                        modality_flag=torch.tensor([int(f.value) for f in flags], dtype=torch.long).unsqueeze(0))
            chat.end_turn()
        finally:
            put(None)

    def _decode(self, batch: list[Any]) -> np.ndarray:
        import torch

        codes = torch.stack([t.clone().detach() for t in batch], dim=0).T.unsqueeze(0)
        with torch.no_grad():
            wave = self._processor.mimi.decode(codes)[0]
        return np.ascontiguousarray(wave.cpu().numpy().reshape(-1), dtype=np.float32)

    def cleanup(self) -> None:
        self._chats.clear()
        self._model = None
        self._processor = None
