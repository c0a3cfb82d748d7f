"""engine._fastpath: the codec is the identity, corrupt input is rejected cleanly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import _fastpath as fp

FrameError = fp.FrameError

header_fields = st.tuples(
    st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.lists(st.integers(0, 2**64 - 1), max_size=fp.MAX_DIMS).map(tuple),
    st.binary(max_size=300), st.binary(max_size=5000),
)


def encode(fields) -> bytearray:
    kind, elem, seq, ts, a, b, extra, flags, shape, meta, payload = fields
    buf = bytearray(fp.encoded_size(len(shape), len(meta), len(payload)))
    n = fp.encode_into(buf, kind, elem, seq, ts, a, b, extra, flags, shape, meta, payload)
    assert n == len(buf)
    return buf


@settings(max_examples=300, deadline=None)
@given(header_fields)
def test_encode_decode_identity(fields):
    buf = encode(fields)
    out = fp.decode(buf)
    kind, elem, seq, ts, a, b, extra, flags, shape, meta, payload = fields
    assert out[:10] == (kind, elem, seq, ts, a, b, extra, flags, shape, meta)
    off, plen = out[10], out[11]
    assert off % 64 == 0
    assert bytes(buf[off:off + plen]) == payload


@settings(max_examples=200, deadline=None)
@given(header_fields, st.data())
def test_truncation_is_rejected(fields, data):
    buf = encode(fields)
    cut = data.draw(st.integers(0, len(buf) - 1))
    if cut < len(buf) - len(fields[-1]) or fields[-1]:
        with pytest.raises(FrameError):
            fp.decode(bytes(buf[:cut]))


@settings(max_examples=300, deadline=None)
@given(header_fields, st.data())
def test_header_corruption_is_rejected(fields, data):
    buf = encode(fields)
    header_len = 64 + 8 * len(fields[8]) + len(fields[9])
    pos = data.draw(st.integers(0, header_len - 1))
    flip = data.draw(st.integers(1, 255))
    buf[pos] ^= flip
    with pytest.raises(FrameError):
        fp.decode(buf)


def test_destination_too_small():
    with pytest.raises(FrameError, match="too small"):
        fp.encode_into(bytearray(70), 1, 1, 0, 0, 0, 0, 0, 0, (), b"", b"x" * 100)


def test_random_garbage_never_crashes():
    rng = np.random.default_rng(3)
    for n in (0, 1, 63, 64, 65, 200, 4096):
        for _ in range(50):
            with pytest.raises(FrameError):
                fp.decode(rng.integers(0, 256, n, dtype=np.uint8).tobytes())


def test_shared_view_is_read_only():
    owner = bytearray(b"abcdef")
    addr = np.frombuffer(owner, np.uint8).ctypes.data
    view = fp.SharedView(addr, 6, owner)
    arr = np.frombuffer(view, np.uint8)
    assert bytes(arr) == b"abcdef" and not arr.flags.writeable
    with pytest.raises((ValueError, BufferError)):
        arr[0] = 1
    assert view.owner is owner


def test_audio_conversions():
    x = np.array([-1.0, -0.5, 0.0, 0.5, 0.999, 1.5, -2.0], np.float32)
    i16 = np.empty(x.size, np.int16)
    fp.f32_to_i16(x, i16)
    assert i16.tolist() == [-32768, -16384, 0, 16384, 32735, 32767, -32768]
    back = np.empty(x.size, np.float32)
    fp.i16_to_f32(i16, back)
    assert np.allclose(back[:5], x[:5], atol=1 / 32768)
    i32 = np.empty(x.size, np.int32)
    fp.f32_to_i32(x, i32)
    assert i32[0] == -2**31 and i32[5] == 2**31 - 1 and i32[3] == 2**30
    f = np.empty(x.size, np.float32)
    fp.i32_to_f32(i32, f)
    assert np.allclose(f[:5], x[:5], atol=1e-6)
    w = np.empty(x.size, np.int32)
    fp.i16_to_i32(i16, w)
    n = np.empty(x.size, np.int16)
    fp.i32_to_i16(w, n)
    assert n.tolist() == i16.tolist()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-32768, 32767), max_size=500))
def test_i16_f32_round_trip_exact(values):
    a = np.array(values, np.int16)
    f = np.empty(a.size, np.float32)
    fp.i16_to_f32(a, f)
    b = np.empty(a.size, np.int16)
    fp.f32_to_i16(f, b)
    assert b.tolist() == a.tolist()
