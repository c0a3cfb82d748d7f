"""In-memory frame types: what flows between nodes.

`RuntimeData` is the base; each kind is a small class backed by numpy (audio,
video, tensor) or plain Python values (JSON, text, binary). Construct with
the factory methods on `RuntimeData` (`RuntimeData.audio(...)`, ...).
Every frame also carries string metadata, the sequence of the input that
caused it, a timestamp and the id of the node that produced it.

One module on purpose (~480 lines): the frame kinds are small and are read
together (the factory methods and the join rules name every kind).
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

import numpy as np

from .errors import TypeValidationError


class DataKind(enum.IntEnum):
    """Frame kinds; values match remotemedia.v1.DataTypeHint."""

    AUDIO = 1
    VIDEO = 2
    TENSOR = 3
    JSON = 4
    TEXT = 5
    BINARY = 6
    ANY = 7

    @classmethod
    def parse(cls, value: str | int | DataKind) -> DataKind:
        if isinstance(value, DataKind):
            return value
        if isinstance(value, int):
            return cls(value)
        name = value.strip().upper()
        name = name.removeprefix("DATA_TYPE_HINT_")
        return cls[name]


class SampleFormat(enum.IntEnum):
    """Audio sample formats; values match remotemedia.v1.AudioFormat."""

    F32 = 1
    I16 = 2
    I32 = 3

    @property
    def dtype(self) -> np.dtype:
        return _SAMPLE_DTYPES[self]

    @classmethod
    def from_dtype(cls, dtype: np.dtype) -> SampleFormat:
        fmt = _SAMPLE_FORMATS.get(dtype)
        if fmt is not None:
            return fmt
        raise TypeValidationError(
            f"unsupported audio sample dtype {dtype}; use float32, int16 or int32"
        )


_SAMPLE_DTYPES = {
    SampleFormat.F32: np.dtype("<f4"),
    SampleFormat.I16: np.dtype("<i2"),
    SampleFormat.I32: np.dtype("<i4"),
}
_SAMPLE_FORMATS = {dt: fmt for fmt, dt in _SAMPLE_DTYPES.items()}


class PixelFormat(enum.IntEnum):
    """Values match remotemedia.v1.PixelFormat."""

    UNSPECIFIED = 0
    RGB24 = 1
    RGBA32 = 2
    YUV420P = 3
    GRAY8 = 4

    def frame_bytes(self, width: int, height: int) -> int | None:
        if self is PixelFormat.RGB24:
            return width * height * 3
        if self is PixelFormat.RGBA32:
            return width * height * 4
        if self is PixelFormat.GRAY8:
            return width * height
        if self is PixelFormat.YUV420P:
            cw, ch = (width + 1) // 2, (height + 1) // 2
            return width * height + 2 * cw * ch
        return None


class TensorDtype(enum.IntEnum):
    """Values match remotemedia.v1.TensorDtype."""

    F32 = 1
    F16 = 2
    I32 = 3
    I8 = 4
    U8 = 5

    @property
    def dtype(self) -> np.dtype:
        return _TENSOR_DTYPES[self]

    @classmethod
    def from_dtype(cls, dtype: np.dtype) -> TensorDtype:
        t = _TENSOR_KINDS.get(dtype)
        if t is not None:
            return t
        raise TypeValidationError(
            f"unsupported tensor dtype {dtype}; use float32, float16, int32, int8 or uint8"
        )


_TENSOR_DTYPES = {
    TensorDtype.F32: np.dtype("<f4"),
    TensorDtype.F16: np.dtype("<f2"),
    TensorDtype.I32: np.dtype("<i4"),
    TensorDtype.I8: np.dtype("i1"),
    TensorDtype.U8: np.dtype("u1"),
}
_TENSOR_KINDS = {dt: t for t, dt in _TENSOR_DTYPES.items()}


class RuntimeData:
    """Base of all frames. Use the factory class methods to build one."""

    kind: ClassVar[DataKind]
    __slots__ = ("metadata", "sequence", "timestamp_us", "source")

    def __init__(
        self,
        *,
        metadata: dict[str, str] | None = None,
        sequence: int | None = None,
        timestamp_us: int = 0,
        source: str | None = None,
    ) -> None:
        self.metadata: dict[str, str] = metadata if metadata is not None else {}
        self.sequence = sequence
        self.timestamp_us = timestamp_us
        self.source = source

    # ---- factories (the public constructors) ----

    @staticmethod
    def audio(samples: Any, sample_rate: int, channels: int = 1, **common: Any) -> AudioData:
        return AudioData(samples, sample_rate, channels, **common)

    @staticmethod
    def video(
        pixels: Any,
        width: int,
        height: int,
        format: PixelFormat | int = PixelFormat.RGB24,
        frame_number: int = 0,
        **common: Any,
    ) -> VideoData:
        return VideoData(pixels, width, height, PixelFormat(format), frame_number, **common)

    @staticmethod
    def tensor(array: Any, layout: str = "", **common: Any) -> TensorData:
        return TensorData(array, layout, **common)

    @staticmethod
    def json(value: Any, schema_type: str = "", **common: Any) -> JsonData:
        return JsonData(value, schema_type, **common)

    @staticmethod
    def text(text: str, language: str = "", encoding: str = "utf-8", **common: Any) -> TextData:
        return TextData(text, language, encoding, **common)

    @staticmethod
    def binary(data: bytes | bytearray | memoryview, mime_type: str = "", **common: Any) -> BinaryData:
        return BinaryData(bytes(data), mime_type, **common)

    # ---- shared helpers ----

    def _common(self) -> dict[str, Any]:
        return {
            "metadata": dict(self.metadata),
            "sequence": self.sequence,
            "timestamp_us": self.timestamp_us,
            "source": self.source,
        }


    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def equals(self, other: object) -> bool:
        """Value equality, payload compared byte for byte."""
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return self.equals(other)

    __hash__ = None  # type: ignore[assignment]


def _as_array(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr


class AudioData(RuntimeData):
    """Interleaved audio samples (1-D, all channels), float32/int16/int32."""

    kind = DataKind.AUDIO
    __slots__ = ("samples", "sample_rate", "channels")

    def __init__(self, samples: Any, sample_rate: int, channels: int = 1, **common: Any) -> None:
        super().__init__(**common)
        arr = _as_array(samples, "samples")
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        SampleFormat.from_dtype(arr.dtype)
        if channels < 1:
            raise TypeValidationError(f"audio channels must be >= 1, got {channels}")
        if sample_rate <= 0:
            raise TypeValidationError(f"audio sample_rate must be > 0, got {sample_rate}")
        if arr.ndim == 2:
            if arr.shape[1] != channels:
                raise TypeValidationError(
                    f"audio array has {arr.shape[1]} columns but channels={channels}"
                )
            arr = arr.reshape(-1)
        elif arr.ndim != 1:
            raise TypeValidationError(f"audio samples must be 1-D (interleaved) or 2-D, got {arr.ndim}-D")
        if arr.size % channels:
            raise TypeValidationError(
                f"{arr.size} interleaved samples is not a multiple of {channels} channels"
            )
        self.samples: np.ndarray = np.ascontiguousarray(arr)
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)

    @property
    def format(self) -> SampleFormat:
        return SampleFormat.from_dtype(self.samples.dtype)

    @property
    def frames(self) -> int:
        """Samples per channel."""
        return self.samples.size // self.channels

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    @property
    def nbytes(self) -> int:
        return self.samples.nbytes

    def equals(self, other: object) -> bool:
        return (
            isinstance(other, AudioData)
            and other.sample_rate == self.sample_rate
            and other.channels == self.channels
            and other.samples.dtype == self.samples.dtype
            and np.array_equal(other.samples, self.samples)
        )

    def __repr__(self) -> str:
        return (
            f"AudioData({self.frames} frames x {self.channels} ch @ {self.sample_rate} Hz, "
            f"{self.format.name}, seq={self.sequence})"
        )


class VideoData(RuntimeData):
    kind = DataKind.VIDEO
    __slots__ = ("pixels", "width", "height", "format", "frame_number")

    def __init__(
        self,
        pixels: Any,
        width: int,
        height: int,
        format: PixelFormat = PixelFormat.RGB24,
        frame_number: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        arr = np.ascontiguousarray(_as_array(pixels, "pixels"), dtype=np.uint8).reshape(-1)
        expected = PixelFormat(format).frame_bytes(width, height)
        if expected is not None and arr.size != expected:
            raise TypeValidationError(
                f"video frame {width}x{height} {PixelFormat(format).name} needs {expected} bytes, got {arr.size}"
            )
        self.pixels: np.ndarray = arr
        self.width = int(width)
        self.height = int(height)
        self.format = PixelFormat(format)
        self.frame_number = int(frame_number)

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes

    def equals(self, other: object) -> bool:
        return (
            isinstance(other, VideoData)
            and (other.width, other.height, other.format, other.frame_number, other.timestamp_us)
            == (self.width, self.height, self.format, self.frame_number, self.timestamp_us)
            and np.array_equal(other.pixels, self.pixels)
        )

    def __repr__(self) -> str:
        return f"VideoData({self.width}x{self.height} {self.format.name}, #{self.frame_number}, seq={self.sequence})"


class TensorData(RuntimeData):
    kind = DataKind.TENSOR
    __slots__ = ("array", "layout")

    def __init__(self, array: Any, layout: str = "", **common: Any) -> None:
        super().__init__(**common)
        arr = np.ascontiguousarray(_as_array(array, "tensor"))
        TensorDtype.from_dtype(arr.dtype)
        self.array: np.ndarray = arr
        self.layout = layout

    @property
    def dtype(self) -> TensorDtype:
        return TensorDtype.from_dtype(self.array.dtype)

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def equals(self, other: object) -> bool:
        return (
            isinstance(other, TensorData)
            and other.layout == self.layout
            and other.array.dtype == self.array.dtype
            and other.array.shape == self.array.shape
            and np.array_equal(other.array, self.array)
        )

    def __repr__(self) -> str:
        return f"TensorData({self.array.shape} {self.array.dtype}, seq={self.sequence})"


class JsonData(RuntimeData):
    kind = DataKind.JSON
    __slots__ = ("value", "schema_type")

    def __init__(self, value: Any, schema_type: str = "", **common: Any) -> None:
        super().__init__(**common)
        self.value = value
        self.schema_type = schema_type

    @property
    def nbytes(self) -> int:
        import orjson

        return len(orjson.dumps(self.value))

    def equals(self, other: object) -> bool:
        return isinstance(other, JsonData) and other.value == self.value and other.schema_type == self.schema_type

    def __repr__(self) -> str:
        return f"JsonData({self.value!r:.60}, seq={self.sequence})"


class TextData(RuntimeData):
    kind = DataKind.TEXT
    __slots__ = ("text", "language", "encoding")

    def __init__(self, text: str, language: str = "", encoding: str = "utf-8", **common: Any) -> None:
        super().__init__(**common)
        if not isinstance(text, str):
            raise TypeValidationError(f"text must be str, got {type(text).__name__}")
        self.text = text
        self.language = language
        self.encoding = encoding or "utf-8"

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))

    def equals(self, other: object) -> bool:
        return isinstance(other, TextData) and (other.text, other.language) == (self.text, self.language)

    def __repr__(self) -> str:
        return f"TextData({self.text!r:.60}, seq={self.sequence})"


class BinaryData(RuntimeData):
    kind = DataKind.BINARY
    __slots__ = ("data", "mime_type")

    def __init__(self, data: bytes, mime_type: str = "", **common: Any) -> None:
        super().__init__(**common)
        self.data = bytes(data)
        self.mime_type = mime_type

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def equals(self, other: object) -> bool:
        return isinstance(other, BinaryData) and (other.data, other.mime_type) == (self.data, self.mime_type)

    def __repr__(self) -> str:
        return f"BinaryData({len(self.data)} bytes {self.mime_type}, seq={self.sequence})"


def join_texts(frames: list[TextData]) -> str:
    """Several texts of one sink as one. Texts of different turns (utterances: one
    transcript each) and phrases (metadata `phrase_index`, whole words) are joined
    with a space where neither side has one; the pieces of one stream (an LLM's
    tokens, which carry their own spacing) are joined as they are."""
    from .turns import turn_of  # turns builds on this module

    out = frames[0].text
    for prev, frame in zip(frames, frames[1:], strict=False):
        whole = turn_of(prev) != turn_of(frame) or "phrase_index" in frame.metadata
        if whole and out and frame.text and not out[-1].isspace() and not frame.text[0].isspace():
            out += " "
        out += frame.text
    return out


def concat(frames: list[RuntimeData]) -> RuntimeData:
    """Join several outputs of one sink into one value (batch execution).

    Audio is concatenated (all parts must share rate, channels and format),
    text is joined (see join_texts), JSON values become a list, binary bytes are joined,
    tensors are stacked along a new first axis, video keeps the last frame,
    and outputs of mixed kinds become a JSON list of summaries.
    """
    if len(frames) == 1:
        return frames[0]
    first = frames[0]
    if any(type(f) is not type(first) for f in frames):
        return JsonData([_summary(f) for f in frames], schema_type="mixed-outputs")
    if isinstance(first, AudioData):
        for f in frames:
            assert isinstance(f, AudioData)
            if (f.sample_rate, f.channels, f.samples.dtype) != (
                first.sample_rate,
                first.channels,
                first.samples.dtype,
            ):
                raise TypeValidationError(
                    "cannot concatenate audio outputs with different rates, channels or formats",
                    node_id=first.source,
                )
        return AudioData(
            np.concatenate([f.samples for f in frames]),  # type: ignore[attr-defined]
            first.sample_rate,
            first.channels,
            **first._common(),
        )
    if isinstance(first, TextData):
        return TextData(join_texts(frames), first.language, **first._common())  # type: ignore[attr-defined]
    if isinstance(first, JsonData):
        return JsonData([f.value for f in frames], first.schema_type, **first._common())  # type: ignore[attr-defined]
    if isinstance(first, BinaryData):
        return BinaryData(b"".join(f.data for f in frames), first.mime_type, **first._common())  # type: ignore[attr-defined]
    if isinstance(first, TensorData):
        return TensorData(np.stack([f.array for f in frames]), first.layout, **first._common())  # type: ignore[attr-defined]
    # Video: the last frame is the pipeline's current picture.
    return frames[-1]


def _summary(frame: RuntimeData) -> dict[str, Any]:
    return {"kind": frame.kind.name.lower(), "bytes": frame.nbytes, "source": frame.source}
