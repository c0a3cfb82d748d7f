"""Frames: protobuf DataBuffer and shared-memory codec round trips, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from engine import RuntimeData
from engine._proto import common_pb2
from engine.data import AudioData, PixelFormat, concat
from engine.errors import TypeValidationError
from engine.ipc import codec
from engine.server.wire import from_proto, to_proto


def samples():
    rng = np.random.default_rng(7)
    return [
        RuntimeData.audio(rng.standard_normal(1000).astype(np.float32), 48000),
        RuntimeData.audio(np.zeros(0, np.float32), 16000),
        RuntimeData.audio(rng.integers(-32768, 32767, 6 * 333, dtype=np.int16), 44100, channels=6),
        RuntimeData.audio(rng.integers(-2**31, 2**31 - 1, 2 * 7, dtype=np.int32), 8000, channels=2),
        RuntimeData.audio(rng.standard_normal((5, 2)).astype(np.float32), 22050, channels=2),
        RuntimeData.video(rng.integers(0, 255, 3 * 5 * 3, dtype=np.uint8), 5, 3, PixelFormat.RGB24, 9,
                          timestamp_us=123),
        RuntimeData.video(rng.integers(0, 255, 3 * 3 + 2 * 2 * 2, dtype=np.uint8), 3, 3, PixelFormat.YUV420P),
        RuntimeData.video(np.zeros(0, np.uint8), 0, 0, PixelFormat.GRAY8),
        RuntimeData.tensor(rng.standard_normal((2, 3, 4)).astype(np.float32), layout="NCH"),
        RuntimeData.tensor(np.arange(7, dtype=np.int8)),
        RuntimeData.tensor(np.zeros((0, 4), np.float16)),
        RuntimeData.tensor(np.array(5, dtype=np.int32)),
        RuntimeData.tensor(np.arange(12, dtype=np.uint8).reshape(3, 4)[:, ::2]),  # non-contiguous
        RuntimeData.json({"a": [1, 2.5, None, True], "ü": "x"}, schema_type="thing"),
        RuntimeData.json(None),
        RuntimeData.json([]),
        RuntimeData.text("héllo wörld ✓", language="de"),
        RuntimeData.text(""),
        RuntimeData.binary(bytes(range(256)) * 3, mime_type="application/x-test"),
        RuntimeData.binary(b""),
    ]


@pytest.mark.parametrize("frame", samples(), ids=lambda f: repr(f)[:40])
def test_proto_round_trip_is_lossless(frame):
    frame.metadata["k"] = "v"
    wire = common_pb2.DataBuffer.FromString(to_proto(frame).SerializeToString())
    back = from_proto(wire)
    assert back == frame
    assert back.metadata == {"k": "v"}


@pytest.mark.parametrize("frame", samples(), ids=lambda f: repr(f)[:40])
def test_codec_round_trip_is_lossless(frame):
    frame.metadata["k"] = "v"
    frame.sequence, frame.source, frame.timestamp_us = 42, "node-1", 99
    back = codec.decode(codec.encode(frame))
    assert back == frame
    assert (back.sequence, back.source, back.timestamp_us, back.metadata) == (42, "node-1", 99, {"k": "v"})


def test_codec_end_of_stream_marker():
    buf = bytearray(codec.eos_prepared().size)
    codec.write_into(buf, codec.eos_prepared())
    assert codec.decode(buf) is None


def test_audio_properties():
    a = RuntimeData.audio(np.zeros(800, np.float32), 16000, channels=2)
    assert (a.samples.size, a.sample_rate, a.channels, a.frames) == (800, 16000, 2, 400)
    assert a.duration_s == pytest.approx(0.025)


@pytest.mark.parametrize("make", [
    lambda: RuntimeData.audio(np.zeros(3, np.float32), 16000, channels=2),
    lambda: RuntimeData.audio(np.zeros(4, np.float32), 0),
    lambda: RuntimeData.audio(np.zeros(4, np.uint8), 16000),
    lambda: RuntimeData.video(np.zeros(10, np.uint8), 2, 2, PixelFormat.RGB24),
    lambda: RuntimeData.tensor(np.zeros(3, np.float64)),
    lambda: RuntimeData.text(b"bytes"),  # type: ignore[arg-type]
])
def test_invalid_frames_are_rejected_with_typed_errors(make):
    with pytest.raises(TypeValidationError):
        make()


def buffer(**kw) -> common_pb2.DataBuffer:
    return common_pb2.DataBuffer(**kw)


@pytest.mark.parametrize("buf, field", [
    (buffer(audio=common_pb2.AudioBuffer(samples=b"\0" * 7, sample_rate=16000, channels=1,
                                         format=common_pb2.AUDIO_FORMAT_F32)), "audio.samples"),
    (buffer(audio=common_pb2.AudioBuffer(samples=b"\0" * 8, sample_rate=16000, channels=1,
                                         format=common_pb2.AUDIO_FORMAT_F32, num_samples=3)), "audio.num_samples"),
    (buffer(audio=common_pb2.AudioBuffer(samples=b"\0" * 12, sample_rate=16000, channels=2,
                                         format=common_pb2.AUDIO_FORMAT_F32)), "channels"),
    (buffer(audio=common_pb2.AudioBuffer(samples=b"\0" * 8, sample_rate=0, format=1)), "sample_rate"),
    (buffer(video=common_pb2.VideoFrame(pixel_data=b"\0" * 5, width=2, height=2, format=1)), "video.pixel_data"),
    (buffer(tensor=common_pb2.TensorBuffer(data=b"\0" * 10, shape=[2, 2], dtype=1)), "tensor.data"),
    (buffer(json=common_pb2.JsonData(json_payload="{nope")), "json.json_payload"),
    (buffer(text=common_pb2.TextBuffer(text_data=b"\xff\xfe")), "text.text_data"),
    (buffer(), "data_type"),
])
def test_wire_size_disagreements_are_typed_errors(buf, field):
    with pytest.raises(TypeValidationError, match=field.split(".")[-1]):
        from_proto(buf, node_id="n1")


def test_concat_rules():
    a = [RuntimeData.audio(np.full(4, i, np.float32), 8000) for i in range(3)]
    joined = concat(a)
    assert isinstance(joined, AudioData) and joined.samples.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert concat([RuntimeData.text("a"), RuntimeData.text("b")]).text == "ab"
    assert concat([RuntimeData.json(1), RuntimeData.json({"x": 2})]).value == [1, {"x": 2}]
    with pytest.raises(TypeValidationError):
        concat([RuntimeData.audio(np.zeros(2, np.float32), 8000), RuntimeData.audio(np.zeros(2, np.float32), 16000)])
