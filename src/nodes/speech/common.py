"""Small helpers shared by the speech nodes."""

from __future__ import annotations

import collections
import re

import numpy as np
import soxr

from engine.data import AudioData, DataKind, RuntimeData, SampleFormat
from engine.errors import ResourceLimitError, TypeValidationError
from engine.node import Node

from ..audio import require_audio

#: a model's special tokens in text (<|text_end|>, <|im_end|>, ...)
SPECIAL_TOKENS = re.compile(r"<\|[^|>]*\|>")

AUDIO = (DataKind.AUDIO,)
TEXT = (DataKind.TEXT,)

_SCALE = {SampleFormat.I16: 1 / 32768, SampleFormat.I32: 1 / 2147483648}


def mono_f32(node: Node, frame: RuntimeData, rate: int | None = None) -> np.ndarray:
    """Audio as mono float32, resampled to `rate` if given (a whole utterance at once)."""
    audio = require_audio(node, frame)
    x = audio.samples
    if audio.format is not SampleFormat.F32:
        x = x.astype(np.float32) * np.float32(_SCALE[audio.format])
    if audio.channels > 1:
        x = x.reshape(-1, audio.channels).mean(axis=1, dtype=np.float32)
    if rate is not None and audio.sample_rate != rate:
        x = soxr.resample(x, audio.sample_rate, rate).astype(np.float32, copy=False)
    return np.ascontiguousarray(x, dtype=np.float32)


#: a reply's first audio starts this long before its first sound (−50 dBFS): the synthesizers'
#: own lead-in silence (30–55 ms with Piper) is time a listener waits for nothing
LEAD_IN_S = 0.005
_LEAD_IN_FLOOR = 10 ** (-50 / 20)


def trim_lead_in(x: np.ndarray, rate: int) -> np.ndarray:
    """`x` from `LEAD_IN_S` before its first sample above −50 dBFS (all of it if none is)."""
    loud = np.flatnonzero(np.abs(x) > _LEAD_IN_FLOOR)
    if not loud.size:
        return x
    return x[max(0, int(loud[0]) - int(LEAD_IN_S * rate)):]


#: the longest text a TTS node takes in one frame by default: about four and a half minutes
#: of speech (~15 characters a second; 24-26 MB of float32 audio at 22-24 kHz), several times
#: a long chat reply, well inside one 64 MiB gRPC answer, and about 35 s of one core's time
#: (20,000 characters took Piper 177 s): a longer text is better sent in parts, each of them
#: spoken as it comes, than refused only once its audio no longer fits in an answer
MAX_TEXT_CHARS = 4000

#: the TTS nodes' `max_text_chars` param (JSON Schema)
MAX_TEXT_CHARS_PARAM = {"type": "integer", "minimum": 1, "maximum": 1_000_000, "default": MAX_TEXT_CHARS,
                        "description": "the longest text one input may carry; a longer one is an error "
                                       "(RESOURCE_LIMIT) before anything is synthesized"}


def check_text_length(node: Node, text: str) -> None:
    """Refuse a text longer than the node's `max_text_chars`, before any synthesis (never cut it)."""
    limit = int(node.params.get("max_text_chars", MAX_TEXT_CHARS))
    if len(text) > limit:
        raise ResourceLimitError(
            f"{node.node_type}: a text of {len(text):,} characters is longer than max_text_chars = {limit:,}; "
            "send it in parts (each is spoken as it comes) or raise max_text_chars",
            node_id=node.node_id, context={"field": "max_text_chars", "limit": limit, "chars": len(text)})


def remember(seen: collections.OrderedDict[str, None], key: str, keep: int = 256) -> None:
    """Add `key` to a bounded set of the most recent keys (turns committed, ...)."""
    seen[key] = None
    seen.move_to_end(key)
    while len(seen) > keep:
        seen.popitem(last=False)


def check_mono_rate(node: Node, audio: AudioData, rate: int) -> None:
    if audio.sample_rate != rate:
        raise TypeValidationError(
            f"{node.node_type} expects {rate} Hz audio (param sampling_rate), got {audio.sample_rate} Hz; "
            "put an AudioResampleNode in front", node_id=node.node_id)
