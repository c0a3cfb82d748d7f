"""Audio nodes: chunking, resampling (soxr), sample-format conversion (_fastpath)."""

from __future__ import annotations

from typing import Any

import numpy as np
import soxr

from engine import _fastpath
from engine.data import AudioData, DataKind, RuntimeData, SampleFormat
from engine.errors import TypeValidationError
from engine.node import Node

AUDIO = (DataKind.AUDIO,)


def require_audio(node: Node, frame: RuntimeData) -> AudioData:
    if not isinstance(frame, AudioData):
        raise TypeValidationError(f"{node.node_type} takes audio, got {frame.kind.name.lower()}",
                                  node_id=node.node_id)
    return frame


class AudioChunkerNode(Node):
    """Re-cuts audio into chunks of exactly `chunk_size` samples per channel.

    The remainder is kept across calls and flushed (shorter) at end of stream.
    A change of rate, channels or format flushes the remainder first.
    """

    node_type = "AudioChunkerNode"
    input_types = AUDIO
    output_types = AUDIO
    params_schema = {
        "type": "object",
        "properties": {"chunk_size": {"type": "integer", "minimum": 1, "maximum": 16_777_216, "default": 1024,
                                      "description": "frames per output chunk (per channel); the remainder "
                                                     "comes out at the end of the stream"}},
        "additionalProperties": False,
    }
    param_aliases = {"chunkSize": "chunk_size"}

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self.chunk_size = int(params.get("chunk_size", 1024))
        self._buf: np.ndarray | None = None
        self._fmt: tuple[int, int, np.dtype] | None = None
        self._template: AudioData | None = None

    def process(self, frame: RuntimeData) -> list[AudioData]:
        audio = require_audio(self, frame)
        out: list[AudioData] = []
        fmt = (audio.sample_rate, audio.channels, audio.samples.dtype)
        if self._fmt is not None and fmt != self._fmt:
            out += self._drain(final=True)
        self._fmt, self._template = fmt, audio
        self._buf = audio.samples if self._buf is None or not self._buf.size else np.concatenate((self._buf, audio.samples))
        out += self._drain(final=False)
        return out

    def _drain(self, final: bool) -> list[AudioData]:
        if self._buf is None or self._template is None:
            return []
        t = self._template
        step = self.chunk_size * t.channels
        n_full = self._buf.size // step
        out = [
            AudioData(self._buf[i * step : (i + 1) * step].copy(), t.sample_rate, t.channels,
                      metadata=dict(t.metadata))
            for i in range(n_full)
        ]
        rest = self._buf[n_full * step :]
        if final and rest.size:
            out.append(AudioData(rest.copy(), t.sample_rate, t.channels, metadata=dict(t.metadata)))
            rest = rest[:0]
        self._buf = rest
        return out

    def flush(self) -> list[AudioData]:
        return self._drain(final=True)


class AudioResampleNode(Node):
    """Resamples to `target_sample_rate` with soxr's streaming resampler.

    One resampler per stream keeps filter state across chunks, so chunked
    input resamples to the same signal as the whole input at once; the
    filter's tail is flushed at end of stream.
    """

    node_type = "AudioResampleNode"
    input_types = AUDIO
    output_types = AUDIO
    params_schema = {
        "type": "object",
        "required": ["target_sample_rate"],
        "properties": {
            "target_sample_rate": {"type": "integer", "minimum": 1000, "maximum": 384_000,
                                   "description": "the output rate in Hz"},
            "quality": {"enum": ["QQ", "LQ", "MQ", "HQ", "VHQ"], "default": "HQ",
                        "description": "soxr quality recipe, quick (QQ) to very high (VHQ)"},
        },
        "additionalProperties": False,
    }
    param_aliases = {"targetSampleRate": "target_sample_rate", "sampleRate": "target_sample_rate",
                     "target_rate": "target_sample_rate"}

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self.target = int(params["target_sample_rate"])
        self.quality = params.get("quality", "HQ")
        self._rs: soxr.ResampleStream | None = None
        self._key: tuple[int, int, np.dtype] | None = None
        self._template: AudioData | None = None

    def _stream_for(self, audio: AudioData) -> list[AudioData]:
        key = (audio.sample_rate, audio.channels, audio.samples.dtype)
        out: list[AudioData] = []
        if self._key != key:
            out += self.flush()
            self._key = key
            self._rs = soxr.ResampleStream(audio.sample_rate, self.target, audio.channels,
                                           dtype=audio.samples.dtype, quality=self.quality)
        self._template = audio
        return out

    def process(self, frame: RuntimeData) -> list[AudioData]:
        audio = require_audio(self, frame)
        if audio.sample_rate == self.target:
            out = self.flush()
            out.append(audio)
            return out
        out = self._stream_for(audio)
        assert self._rs is not None
        x = audio.samples.reshape(-1, audio.channels) if audio.channels > 1 else audio.samples
        y = self._rs.resample_chunk(x, last=False)
        if y.size:
            out.append(AudioData(y.reshape(-1), self.target, audio.channels, metadata=dict(audio.metadata)))
        return out

    def flush(self) -> list[AudioData]:
        rs, t = self._rs, self._template
        self._rs, self._key = None, None
        if rs is None or t is None:
            return []
        empty = np.zeros((0, t.channels) if t.channels > 1 else (0,), dtype=t.samples.dtype)
        y = rs.resample_chunk(empty, last=True)
        return [AudioData(y.reshape(-1), self.target, t.channels, metadata=dict(t.metadata))] if y.size else []


class AudioFormatNode(Node):
    """Converts the sample format (f32 / i16 / i32) through engine._fastpath."""

    node_type = "AudioFormatNode"
    input_types = AUDIO
    output_types = AUDIO
    params_schema = {
        "type": "object",
        "required": ["format"],
        "properties": {"format": {"enum": ["f32", "i16", "i32", "F32", "I16", "I32"],
                                  "description": "the output sample format: float32, int16 or int32 PCM"}},
        "additionalProperties": False,
    }
    param_aliases = {"targetFormat": "format", "target_format": "format"}

    _CONVERT = {
        (SampleFormat.I16, SampleFormat.F32): _fastpath.i16_to_f32,
        (SampleFormat.F32, SampleFormat.I16): _fastpath.f32_to_i16,
        (SampleFormat.I32, SampleFormat.F32): _fastpath.i32_to_f32,
        (SampleFormat.F32, SampleFormat.I32): _fastpath.f32_to_i32,
        (SampleFormat.I16, SampleFormat.I32): _fastpath.i16_to_i32,
        (SampleFormat.I32, SampleFormat.I16): _fastpath.i32_to_i16,
    }

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self.target = SampleFormat[str(params["format"]).upper()]

    def process(self, frame: RuntimeData) -> AudioData:
        audio = require_audio(self, frame)
        src = audio.format
        if src is self.target:
            return audio
        dst = np.empty(audio.samples.size, dtype=self.target.dtype)
        self._CONVERT[(src, self.target)](audio.samples, dst)
        return AudioData(dst, audio.sample_rate, audio.channels, metadata=dict(audio.metadata))


class FastResampleNode(AudioResampleNode):
    """The RemoteMedia resampler's contract on soxr: `target_rate` out, the rate in
    taken from each frame (`source_rate` is only a hint: browsers capture at 44.1
    or 48 kHz whatever a client assumed), `quality` Low/Medium/High."""

    node_type = "FastResampleNode"
    params_schema = {
        "type": "object",
        "required": ["target_rate"],
        "properties": {
            "target_rate": {"type": "integer", "minimum": 1000, "maximum": 384_000,
                            "description": "the output rate in Hz"},
            "source_rate": {"type": "integer", "minimum": 0, "maximum": 384_000, "default": 0,
                            "description": "the rate the client expects to send (a hint: each frame's own "
                                           "sample_rate is what is resampled from)"},
            "quality": {"enum": ["Low", "Medium", "High", "VeryHigh", "low", "medium", "high", "very_high",
                                 "QQ", "LQ", "MQ", "HQ", "VHQ"], "default": "High",
                        "description": "Low (soxr LQ), Medium (MQ), High (HQ), VeryHigh (VHQ)"},
            "channels": {"type": "integer", "minimum": 0, "maximum": 64, "default": 0,
                         "description": "the channels the client expects (a hint; 0 = any): each frame's own "
                                        "channel count is kept"},
        },
        "additionalProperties": False,
    }
    param_aliases = {"targetSampleRate": "target_rate", "target_sample_rate": "target_rate",
                     "sourceSampleRate": "source_rate", "source_sample_rate": "source_rate"}
    _QUALITY = {"low": "LQ", "medium": "MQ", "high": "HQ", "veryhigh": "VHQ", "very_high": "VHQ"}

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        quality = str(params.get("quality", "High"))
        mapped = {"target_sample_rate": params["target_rate"],
                  "quality": self._QUALITY.get(quality.lower(), quality)}
        super().__init__(node_id, mapped)
        self.params = params
