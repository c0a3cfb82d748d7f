"""RuntimeData ↔ remotemedia.v1 DataBuffer, lossless, with size checks.

Declared sizes on the wire (num_samples, width × height, tensor shape) must
agree with the bytes that came with them; disagreement is a
TypeValidationError naming the field, never a silent truncation.
"""

from __future__ import annotations

import math

import numpy as np
import orjson

from .._proto import common_pb2 as pb
from ..data import (
    AudioData,
    BinaryData,
    JsonData,
    PixelFormat,
    RuntimeData,
    SampleFormat,
    TensorData,
    TensorDtype,
    TextData,
    VideoData,
)
from ..errors import TypeValidationError


def to_proto(frame: RuntimeData, out: pb.DataBuffer | None = None) -> pb.DataBuffer:
    buf = out if out is not None else pb.DataBuffer()
    if frame.metadata:
        buf.metadata.update(frame.metadata)
    if isinstance(frame, AudioData):
        a = buf.audio
        a.samples = frame.samples.tobytes()
        a.sample_rate = frame.sample_rate
        a.channels = frame.channels
        a.format = int(frame.format)
        a.num_samples = frame.samples.size
    elif isinstance(frame, VideoData):
        v = buf.video
        v.pixel_data = frame.pixels.tobytes()
        v.width, v.height = frame.width, frame.height
        v.format = int(frame.format)
        v.frame_number = frame.frame_number
        v.timestamp_us = frame.timestamp_us
    elif isinstance(frame, TensorData):
        t = buf.tensor
        t.data = frame.array.tobytes()
        t.shape.extend(frame.array.shape)
        t.dtype = int(frame.dtype)
        t.layout = frame.layout
    elif isinstance(frame, JsonData):
        buf.json.json_payload = orjson.dumps(frame.value, option=orjson.OPT_SERIALIZE_NUMPY).decode()
        buf.json.schema_type = frame.schema_type
    elif isinstance(frame, TextData):
        buf.text.text_data = frame.text.encode("utf-8")
        buf.text.encoding = frame.encoding
        buf.text.language = frame.language
    elif isinstance(frame, BinaryData):
        buf.binary.data = frame.data
        buf.binary.mime_type = frame.mime_type
    else:  # pragma: no cover - every RuntimeData subclass is handled above
        raise TypeValidationError(f"cannot convert {type(frame).__name__} to DataBuffer")
    return buf


def audio_from_proto(a: pb.AudioBuffer, metadata: dict[str, str], node_id: str | None = None) -> AudioData:
    fmt_value = a.format or pb.AUDIO_FORMAT_F32
    try:
        fmt = SampleFormat(fmt_value)
    except ValueError:
        raise TypeValidationError(f"audio.format: unknown audio format {fmt_value}", node_id=node_id) from None
    channels = a.channels or 1
    width = fmt.dtype.itemsize
    if len(a.samples) % width:
        raise TypeValidationError(
            f"audio.samples: {len(a.samples)} bytes is not a whole number of {fmt.name} samples",
            node_id=node_id,
        )
    count = len(a.samples) // width
    if a.num_samples and a.num_samples != count:
        raise TypeValidationError(
            f"audio.num_samples says {a.num_samples} but samples holds {count}", node_id=node_id
        )
    if count % channels:
        raise TypeValidationError(
            f"audio.samples: {count} samples is not a multiple of {channels} channels", node_id=node_id
        )
    if a.sample_rate == 0:
        raise TypeValidationError("audio.sample_rate must be > 0", node_id=node_id)
    arr = np.frombuffer(a.samples, dtype=fmt.dtype)
    return AudioData(arr, a.sample_rate, channels, metadata=metadata)


def from_proto(buf: pb.DataBuffer, node_id: str | None = None) -> RuntimeData:
    which = buf.WhichOneof("data_type")
    metadata = dict(buf.metadata)
    if which == "audio":
        return audio_from_proto(buf.audio, metadata, node_id)
    if which == "video":
        v = buf.video
        try:
            fmt = PixelFormat(v.format)
        except ValueError:
            raise TypeValidationError(f"video.format: unknown pixel format {v.format}", node_id=node_id) from None
        expected = fmt.frame_bytes(v.width, v.height)
        if expected is not None and expected != len(v.pixel_data):
            raise TypeValidationError(
                f"video.pixel_data: {v.width}x{v.height} {fmt.name} needs {expected} bytes, got {len(v.pixel_data)}",
                node_id=node_id,
            )
        return VideoData(np.frombuffer(v.pixel_data, dtype=np.uint8), v.width, v.height, fmt,
                         v.frame_number, metadata=metadata, timestamp_us=v.timestamp_us)
    if which == "tensor":
        t = buf.tensor
        try:
            dtype = TensorDtype(t.dtype or pb.TENSOR_DTYPE_F32)
        except ValueError:
            raise TypeValidationError(f"tensor.dtype: unknown dtype {t.dtype}", node_id=node_id) from None
        shape = tuple(int(d) for d in t.shape)
        expected = math.prod(shape) * dtype.dtype.itemsize if shape else len(t.data)
        if expected != len(t.data):
            raise TypeValidationError(
                f"tensor.data: shape {list(shape)} of {dtype.name} needs {expected} bytes, got {len(t.data)}",
                node_id=node_id,
            )
        arr = np.frombuffer(t.data, dtype=dtype.dtype)
        if shape:
            arr = arr.reshape(shape)
        return TensorData(arr, t.layout, metadata=metadata)
    if which == "json":
        try:
            value = orjson.loads(buf.json.json_payload) if buf.json.json_payload else None
        except orjson.JSONDecodeError as exc:
            raise TypeValidationError(f"json.json_payload is not valid JSON: {exc}", node_id=node_id) from None
        return JsonData(value, buf.json.schema_type, metadata=metadata)
    if which == "text":
        enc = buf.text.encoding or "utf-8"
        try:
            text = buf.text.text_data.decode(enc)
        except (UnicodeDecodeError, LookupError) as exc:
            raise TypeValidationError(f"text.text_data: cannot decode as {enc}: {exc}", node_id=node_id) from None
        return TextData(text, buf.text.language, "utf-8", metadata=metadata)
    if which == "binary":
        return BinaryData(buf.binary.data, buf.binary.mime_type, metadata=metadata)
    raise TypeValidationError("DataBuffer carries no data (data_type not set)", node_id=node_id)
