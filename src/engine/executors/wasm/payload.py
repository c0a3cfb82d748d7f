"""A frame as the bytes a WASM plugin reads, and the plugin's bytes as a frame.

The contract (docs/wasm-nodes.md): audio is little-endian float32
interleaved samples (int16/int32 converted first), read back as float32 at
the input's rate and channel count; text is UTF-8; JSON its UTF-8 text;
binary raw; tensors and video their raw bytes, read back keeping dtype and,
where the size matches, shape (video: size, format). Metadata and the
timestamp pass through. An empty output is no frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from ...data import (
    AudioData,
    BinaryData,
    DataKind,
    JsonData,
    RuntimeData,
    TensorData,
    TextData,
    VideoData,
)
from ...errors import TypeValidationError

_F32 = np.dtype("<f4")
_SCALE = {np.dtype("<i2"): 1 / 32768.0, np.dtype("<i4"): 1 / 2147483648.0}


def to_bytes(frame: RuntimeData) -> bytes:
    """What the plugin gets for `frame` (Extism copies it into the plugin's memory)."""
    if isinstance(frame, AudioData):
        samples = frame.samples
        if samples.dtype != _F32:
            samples = (samples.astype(np.float32) * _SCALE[samples.dtype]).astype(_F32, copy=False)
        return samples.tobytes()
    if isinstance(frame, TextData):
        return frame.text.encode("utf-8")
    if isinstance(frame, JsonData):
        return orjson.dumps(frame.value)
    if isinstance(frame, BinaryData):
        return frame.data
    if isinstance(frame, TensorData):
        return frame.array.tobytes()
    if isinstance(frame, VideoData):
        return frame.pixels.tobytes()
    raise TypeValidationError(f"a WASM node cannot take a {frame.kind.name.lower()} frame")


def from_bytes(out: bytes, kind: DataKind, frame: RuntimeData, node_id: str) -> RuntimeData | None:
    """The plugin's output as a frame of `kind`, after input `frame`; None = no frame."""
    if not out:
        return None
    common: dict[str, Any] = {"metadata": dict(frame.metadata), "timestamp_us": frame.timestamp_us}
    if kind == DataKind.AUDIO:
        if not isinstance(frame, AudioData):
            raise _bad(node_id, f"output_type audio needs an audio input (its rate and channels); "
                       f"got a {frame.kind.name.lower()} frame")
        step = 4 * frame.channels
        if len(out) % step:
            raise _bad(node_id, f"the plugin returned {len(out)} bytes: not a whole number of "
                       f"float32 frames of {frame.channels} channel(s) ({step} bytes each)")
        return AudioData(np.frombuffer(out, _F32), frame.sample_rate, frame.channels, **common)
    if kind == DataKind.TEXT:
        try:
            text = out.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad(node_id, f"the plugin's text output is not UTF-8: {exc}") from None
        language = frame.language if isinstance(frame, TextData) else ""
        return TextData(text, language, **common)
    if kind == DataKind.JSON:
        try:
            value = orjson.loads(out)
        except orjson.JSONDecodeError as exc:
            raise _bad(node_id, f"the plugin's JSON output does not parse: {exc}") from None
        return JsonData(value, frame.schema_type if isinstance(frame, JsonData) else "", **common)
    if kind == DataKind.BINARY:
        return BinaryData(out, frame.mime_type if isinstance(frame, BinaryData) else "", **common)
    if kind == DataKind.TENSOR:
        return _tensor(out, frame, node_id, common)
    if kind == DataKind.VIDEO:
        if not isinstance(frame, VideoData) or len(out) != frame.pixels.nbytes:
            raise _bad(node_id, "output_type video needs a video input and an output of its size "
                       f"({len(out)} bytes returned)")
        return VideoData(np.frombuffer(out, np.uint8), frame.width, frame.height, frame.format,
                         frame.frame_number, **common)
    raise _bad(node_id, f"output_type {kind.name.lower()} is not a payload kind")


def _tensor(out: bytes, frame: RuntimeData, node_id: str, common: dict[str, Any]) -> TensorData:
    # the input tensor's dtype; float32 after audio; bytes otherwise
    if isinstance(frame, TensorData):
        dtype, shape, layout = frame.array.dtype, frame.array.shape, frame.layout
    else:
        dtype, shape, layout = (_F32 if isinstance(frame, AudioData) else np.dtype(np.uint8)), None, ""
    if len(out) % dtype.itemsize:
        raise _bad(node_id, f"the plugin returned {len(out)} bytes: not a whole number of {dtype} elements")
    array = np.frombuffer(out, dtype)
    if shape is not None and array.size == int(np.prod(shape)):
        array = array.reshape(shape)
    else:
        layout = ""
    return TensorData(array, layout, **common)


def _bad(node_id: str, message: str) -> TypeValidationError:
    return TypeValidationError(message, node_id=node_id, context={"field": "output_type"})
