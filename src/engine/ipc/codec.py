"""RuntimeData ↔ frame bytes (header + payload), via engine._fastpath.

A frame is encoded straight into its destination (a loaned shared-memory
sample or any writable buffer); the payload is copied once, without the GIL.
Decoding can copy out of the source (`copy=True`, the source may be released
afterwards) or return views over it that keep an owner object alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .. import _fastpath
from ..data import (
    AudioData,
    BinaryData,
    DataKind,
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

FrameError = _fastpath.FrameError
NO_SEQUENCE = _fastpath.NO_SEQUENCE
KIND_EOS = 0  # end of stream marker; carries no payload

_EMPTY = b""


@dataclass(slots=True)
class Prepared:
    """A frame ready to be written: header fields + a contiguous payload."""

    kind: int
    elem: int
    sequence: int
    timestamp_us: int
    a: int
    b: int
    extra: int
    shape: tuple[int, ...]
    meta: bytes
    payload: Any  # bytes-like, C-contiguous

    @property
    def size(self) -> int:
        return _fastpath.encoded_size(len(self.shape), len(self.meta), memoryview(self.payload).nbytes)


def _meta(frame: RuntimeData, **fields: str) -> bytes:
    m: dict[str, Any] = {k: v for k, v in fields.items() if v}
    if frame.metadata:
        m["md"] = frame.metadata
    if frame.source:
        m["src"] = frame.source
    return orjson.dumps(m) if m else _EMPTY


def prepare(frame: RuntimeData) -> Prepared:
    seq = NO_SEQUENCE if frame.sequence is None else frame.sequence
    ts = frame.timestamp_us
    if isinstance(frame, AudioData):
        s = frame.samples
        return Prepared(1, int(frame.format), seq, ts, frame.sample_rate, frame.channels, 0,
                        (s.size,), _meta(frame), s)
    if isinstance(frame, TensorData):
        a = frame.array
        return Prepared(3, int(frame.dtype), seq, ts, 0, 0, 0, tuple(a.shape),
                        _meta(frame, layout=frame.layout), a.reshape(-1) if a.ndim else a.reshape(1))
    if isinstance(frame, VideoData):
        return Prepared(2, int(frame.format), seq, ts, frame.width, frame.height,
                        frame.frame_number, (), _meta(frame), frame.pixels)
    if isinstance(frame, JsonData):
        return Prepared(4, 0, seq, ts, 0, 0, 0, (), _meta(frame, st=frame.schema_type),
                        orjson.dumps(frame.value, option=orjson.OPT_SERIALIZE_NUMPY))
    if isinstance(frame, TextData):
        return Prepared(5, 0, seq, ts, 0, 0, 0, (), _meta(frame, lang=frame.language),
                        frame.text.encode("utf-8"))
    if isinstance(frame, BinaryData):
        return Prepared(6, 0, seq, ts, 0, 0, 0, (), _meta(frame, mime=frame.mime_type), frame.data)
    raise TypeValidationError(f"cannot encode {type(frame).__name__}")


class Encoded:
    """A frame still in its wire form, on its way from one node process to
    another: its header is read (routing, a voided turn's drop), its payload
    is neither decoded nor encoded again; it is copied as it is.

    Only frames whose kind is not JSON travel so (a JSON frame may be a turn
    event, which the session routes by its content).
    """

    __slots__ = ("data", "kind", "sequence", "metadata", "source")
    schema_type = ""

    def __init__(self, data: bytearray, header: tuple) -> None:
        self.data = data
        meta_b = header[9]
        meta = orjson.loads(meta_b) if meta_b else {}
        self.kind = DataKind(header[0])
        self.sequence = None if header[2] == NO_SEQUENCE else header[2]
        self.metadata = meta.get("md", {})
        self.source = meta.get("src")

    def decode(self) -> RuntimeData:
        frame = decode(self.data)
        assert frame is not None
        return frame


def eos_prepared() -> Prepared:
    return Prepared(KIND_EOS, 0, NO_SEQUENCE, 0, 0, 0, 0, (), _EMPTY, _EMPTY)


def encode(frame: RuntimeData) -> bytes:
    """Encode into a new bytes object (tests, tooling; the IPC path writes in place)."""
    p = prepare(frame)
    buf = bytearray(p.size)
    write_into(buf, p)
    return bytes(buf)


def write_into(dst: Any, p: Prepared) -> int:
    return _fastpath.encode_into(dst, p.kind, p.elem, p.sequence, p.timestamp_us, p.a, p.b,
                                 p.extra, 0, p.shape, p.meta, p.payload)


def write_to_address(address: int, capacity: int, p: Prepared) -> int:
    return _fastpath.encode_to_address(address, capacity, p.kind, p.elem, p.sequence,
                                       p.timestamp_us, p.a, p.b, p.extra, 0, p.shape, p.meta,
                                       p.payload)


def decode(src: Any) -> RuntimeData | None:
    """Decode a frame from a buffer, copying the payload. None = end of stream."""
    header = _fastpath.decode(src)
    off, plen = header[10], header[11]
    payload = bytes(memoryview(src)[off : off + plen]) if plen else _EMPTY
    return build(header, payload)


def decode_from_address(address: int, length: int, owner: Any = None) -> RuntimeData | None:
    """Decode a frame at a raw address.

    With `owner` given, array payloads are read-only views over the source
    that keep `owner` alive (zero copy); otherwise the payload is copied.
    """
    header = _fastpath.decode_at_address(address, length)
    off, plen = header[10], header[11]
    if owner is not None:
        payload: Any = _fastpath.SharedView(address + off, plen, owner)
    else:
        buf = bytearray(plen)
        if plen:
            _fastpath.copy_from_address(address + off, buf)
        payload = buf
    return build(header, payload)


def _shell(cls: type, meta: dict, seq: int) -> Any:
    """A frame object with only its common fields set: for payloads this
    codec encoded from an already validated frame, so no re-validation."""
    obj = cls.__new__(cls)
    obj.metadata = meta.get("md", {})
    obj.sequence = None if seq == NO_SEQUENCE else seq
    obj.source = meta.get("src")
    return obj


def build(header: tuple, payload: Any) -> RuntimeData | None:
    kind, elem, seq, ts, a, b, extra, _flags, shape, meta_b, _off, _plen = header
    if kind == KIND_EOS:
        return None
    meta = orjson.loads(meta_b) if meta_b else {}
    try:
        if kind == DataKind.AUDIO:
            audio = _shell(AudioData, meta, seq)
            audio.timestamp_us = ts
            audio.samples = np.frombuffer(payload, dtype=SampleFormat(elem).dtype)
            if a <= 0 or b < 1 or audio.samples.size % b:
                raise ValueError(f"audio header rate={a} channels={b} for {audio.samples.size} samples")
            audio.sample_rate, audio.channels = a, b
            return audio
        if kind == DataKind.TENSOR:
            tensor = _shell(TensorData, meta, seq)
            tensor.timestamp_us = ts
            tensor.array = np.frombuffer(payload, dtype=TensorDtype(elem).dtype).reshape(shape)
            tensor.layout = meta.get("layout", "")
            return tensor
        common = {
            "metadata": meta.get("md", {}),
            "sequence": None if seq == NO_SEQUENCE else seq,
            "timestamp_us": ts,
            "source": meta.get("src"),
        }
        if kind == DataKind.VIDEO:
            return VideoData(np.frombuffer(payload, dtype=np.uint8), a, b, PixelFormat(elem),
                             extra, **common)
        if kind == DataKind.JSON:
            return JsonData(orjson.loads(payload), meta.get("st", ""), **common)
        if kind == DataKind.TEXT:
            return TextData(bytes(payload).decode("utf-8"), meta.get("lang", ""), **common)
        if kind == DataKind.BINARY:
            return BinaryData(bytes(payload), meta.get("mime", ""), **common)
    except (ValueError, TypeError) as exc:
        raise FrameError(f"frame payload does not match its header: {exc}") from exc
    raise FrameError(f"unknown frame kind {kind}")
