# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Byte-level hot paths: the frame codec and audio sample-format conversion.

Frame layout (little-endian), written into a caller-provided buffer or a raw
shared-memory address:

    0  u32 magic 'RMF1'     4 u8 version   5 u8 kind   6 u8 elem   7 u8 ndim
    8  u64 sequence (all ones = none)      16 u64 timestamp_us
    24 u32 a (sample rate | width)         28 u32 b (channels | height)
    32 u32 meta_len                        36 u32 header checksum (FNV-1a)
    40 u64 payload_len                     48 u64 extra (frame number)
    56 u64 flags
    64 ndim x u64 shape, then meta bytes, then padding to 64, then payload.

The checksum covers bytes 0..35, 40..63, the shape and the meta bytes, so a
truncated or corrupted header is rejected instead of being trusted.
Payload copies run without the GIL.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int16_t, int32_t
from libc.string cimport memcpy
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE, PyBUF_ANY_CONTIGUOUS
from cpython.bytes cimport PyBytes_FromStringAndSize

DEF MAGIC = 0x31464D52  # 'RMF1' little-endian
DEF VERSION = 1
DEF FIXED = 64
DEF ALIGN = 64
DEF MAX_NDIM = 16

MAGIC_VALUE = MAGIC
HEADER_FIXED_SIZE = FIXED
MAX_DIMS = MAX_NDIM
NO_SEQUENCE = 0xFFFFFFFFFFFFFFFF


class FrameError(ValueError):
    """A frame buffer is truncated, corrupt or too small for its content."""


cdef inline size_t _align(size_t n) nogil:
    return (n + ALIGN - 1) & ~(<size_t>ALIGN - 1)


cdef inline uint32_t _fnv1a(const uint8_t* p, size_t n, uint32_t h) nogil:
    cdef size_t i
    for i in range(n):
        h = (h ^ p[i]) * 16777619u
    return h


cdef inline uint32_t _header_checksum(const uint8_t* base, size_t var_len) nogil:
    cdef uint32_t h = 2166136261u
    h = _fnv1a(base, 36, h)
    h = _fnv1a(base + 40, 24 + var_len, h)
    return h


cdef inline void _put_u32(uint8_t* p, uint32_t v) nogil:
    memcpy(p, &v, 4)


cdef inline void _put_u64(uint8_t* p, uint64_t v) nogil:
    memcpy(p, &v, 8)


cdef inline uint32_t _get_u32(const uint8_t* p) nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint64_t _get_u64(const uint8_t* p) nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cpdef size_t payload_offset(size_t ndim, size_t meta_len):
    """Offset of the payload for a frame with `ndim` dims and `meta_len` meta bytes."""
    return _align(FIXED + 8 * ndim + meta_len)


cpdef size_t encoded_size(size_t ndim, size_t meta_len, size_t payload_len):
    """Total bytes a frame occupies."""
    return payload_offset(ndim, meta_len) + payload_len


cdef size_t _write_header(uint8_t* dst, size_t capacity, int kind, int elem, uint64_t sequence,
                         uint64_t timestamp_us, uint32_t a, uint32_t b, uint64_t extra,
                         uint64_t flags, tuple shape, bytes meta, size_t plen) except? 0:
    """Write the header of a frame whose payload is (or will be) at its offset; returns the offset."""
    cdef size_t ndim = len(shape)
    cdef size_t meta_len = len(meta)
    cdef size_t off, i
    if ndim > MAX_NDIM:
        raise FrameError(f"too many dimensions: {ndim} > {MAX_NDIM}")
    off = payload_offset(ndim, meta_len)
    if off + plen > capacity:
        raise FrameError(f"buffer too small: need {off + plen} bytes, have {capacity}")
    _put_u32(dst, MAGIC)
    dst[4] = VERSION
    dst[5] = <uint8_t>kind
    dst[6] = <uint8_t>elem
    dst[7] = <uint8_t>ndim
    _put_u64(dst + 8, sequence)
    _put_u64(dst + 16, timestamp_us)
    _put_u32(dst + 24, a)
    _put_u32(dst + 28, b)
    _put_u32(dst + 32, <uint32_t>meta_len)
    _put_u64(dst + 40, plen)
    _put_u64(dst + 48, extra)
    _put_u64(dst + 56, flags)
    for i in range(ndim):
        _put_u64(dst + FIXED + 8 * i, <uint64_t>shape[i])
    if meta_len:
        memcpy(dst + FIXED + 8 * ndim, <const char*>meta, meta_len)
    _put_u32(dst + 36, _header_checksum(dst, 8 * ndim + meta_len))
    return off


cdef size_t _encode(uint8_t* dst, size_t capacity, int kind, int elem, uint64_t sequence,
                    uint64_t timestamp_us, uint32_t a, uint32_t b, uint64_t extra,
                    uint64_t flags, tuple shape, bytes meta, object payload) except? 0:
    cdef Py_buffer pb
    cdef size_t off, plen
    cdef const uint8_t* src
    PyObject_GetBuffer(payload, &pb, PyBUF_SIMPLE | PyBUF_ANY_CONTIGUOUS)
    try:
        plen = <size_t>pb.len
        off = _write_header(dst, capacity, kind, elem, sequence, timestamp_us, a, b, extra, flags,
                            shape, meta, plen)
        src = <const uint8_t*>pb.buf
        with nogil:
            if plen:
                memcpy(dst + off, src, plen)
        return off + plen
    finally:
        PyBuffer_Release(&pb)


def header_to_address(size_t address, size_t capacity, int kind, int elem, uint64_t sequence,
                      uint64_t timestamp_us, uint32_t a, uint32_t b, uint64_t extra,
                      uint64_t flags, tuple shape, bytes meta, size_t payload_len):
    """Write only the header at a raw address whose payload was written in place; returns
    the payload offset (the caller checks it is where the payload is)."""
    if address == 0:
        raise FrameError("null destination address")
    return _write_header(<uint8_t*>address, capacity, kind, elem, sequence, timestamp_us,
                         a, b, extra, flags, shape, meta, payload_len)


def encode_into(object dst, int kind, int elem, uint64_t sequence, uint64_t timestamp_us,
                uint32_t a, uint32_t b, uint64_t extra, uint64_t flags, tuple shape,
                bytes meta, object payload):
    """Encode a frame into the writable buffer `dst`; returns bytes written."""
    cdef Py_buffer db
    PyObject_GetBuffer(dst, &db, PyBUF_SIMPLE | PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
    try:
        return _encode(<uint8_t*>db.buf, <size_t>db.len, kind, elem, sequence, timestamp_us,
                       a, b, extra, flags, shape, meta, payload)
    finally:
        PyBuffer_Release(&db)


def encode_to_address(size_t address, size_t capacity, int kind, int elem, uint64_t sequence,
                      uint64_t timestamp_us, uint32_t a, uint32_t b, uint64_t extra,
                      uint64_t flags, tuple shape, bytes meta, object payload):
    """Encode a frame at a raw address (a loaned shared-memory sample)."""
    if address == 0:
        raise FrameError("null destination address")
    return _encode(<uint8_t*>address, capacity, kind, elem, sequence, timestamp_us,
                   a, b, extra, flags, shape, meta, payload)


cdef tuple _decode(const uint8_t* src, size_t length):
    cdef size_t ndim, meta_len, off, i
    cdef uint64_t plen
    if length < FIXED:
        raise FrameError(f"truncated frame: {length} bytes, header needs {FIXED}")
    if _get_u32(src) != MAGIC:
        raise FrameError("bad magic: not a frame")
    if src[4] != VERSION:
        raise FrameError(f"unsupported frame version {src[4]}")
    ndim = src[7]
    meta_len = _get_u32(src + 32)
    if ndim > MAX_NDIM:
        raise FrameError(f"corrupt header: {ndim} dimensions")
    if FIXED + 8 * ndim + meta_len > length:
        raise FrameError("truncated frame: header extends past the buffer")
    if _get_u32(src + 36) != _header_checksum(src, 8 * ndim + meta_len):
        raise FrameError("corrupt header: checksum mismatch")
    plen = _get_u64(src + 40)
    off = payload_offset(ndim, meta_len)
    if off > length or plen > length - off:
        raise FrameError(f"truncated frame: payload of {plen} bytes does not fit in {length}")
    shape = tuple([_get_u64(src + FIXED + 8 * i) for i in range(ndim)])
    meta = PyBytes_FromStringAndSize(<const char*>(src + FIXED + 8 * ndim), meta_len)
    return (src[5], src[6], _get_u64(src + 8), _get_u64(src + 16), _get_u32(src + 24),
            _get_u32(src + 28), _get_u64(src + 48), _get_u64(src + 56), shape, meta,
            off, plen)


def decode(object src):
    """Decode a frame header from a buffer.

    Returns (kind, elem, sequence, timestamp_us, a, b, extra, flags, shape,
    meta, payload_offset, payload_len); the payload is src[offset:offset+len].
    """
    cdef Py_buffer sb
    PyObject_GetBuffer(src, &sb, PyBUF_SIMPLE | PyBUF_ANY_CONTIGUOUS)
    try:
        return _decode(<const uint8_t*>sb.buf, <size_t>sb.len)
    finally:
        PyBuffer_Release(&sb)


def decode_at_address(size_t address, size_t length):
    """Decode a frame header at a raw address (a received shared-memory sample)."""
    if address == 0:
        raise FrameError("null source address")
    return _decode(<const uint8_t*>address, length)


def copy_from_address(size_t address, object dst):
    """Copy len(dst) bytes from a raw address into a writable buffer, GIL released."""
    cdef Py_buffer db
    PyObject_GetBuffer(dst, &db, PyBUF_SIMPLE | PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
    try:
        with nogil:
            memcpy(db.buf, <const void*>address, <size_t>db.len)
    finally:
        PyBuffer_Release(&db)


def copy_to_address(size_t address, size_t capacity, object src):
    """Copy a whole buffer to a raw address (a loaned sample of at least
    `capacity` bytes), GIL released; returns the bytes written."""
    cdef Py_buffer sb
    PyObject_GetBuffer(src, &sb, PyBUF_SIMPLE | PyBUF_ANY_CONTIGUOUS)
    try:
        if <size_t>sb.len > capacity:
            raise FrameError(f"frame of {sb.len} bytes does not fit in {capacity}")
        with nogil:
            memcpy(<void*>address, sb.buf, <size_t>sb.len)
        return sb.len
    finally:
        PyBuffer_Release(&sb)


cdef class SharedView:
    """Buffer over foreign memory that keeps its owner alive.

    Read-only unless `writable`: receive-side shared memory is mapped
    read-only, and exposing it writable would let numpy write into it and
    crash the process. A loaned (send-side) sample is writable.
    """
    cdef size_t address
    cdef Py_ssize_t length
    cdef object owner
    cdef bint writable
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __cinit__(self, size_t address, Py_ssize_t length, object owner, bint writable=False):
        self.address = address
        self.length = length
        self.owner = owner
        self.writable = writable

    def __getbuffer__(self, Py_buffer* view, int flags):
        if (flags & PyBUF_WRITABLE) and not self.writable:
            raise BufferError("shared frame memory is read-only")
        self.shape[0] = self.length
        self.strides[0] = 1
        view.buf = <void*>self.address
        view.obj = self
        view.len = self.length
        view.readonly = 0 if self.writable else 1
        view.itemsize = 1
        view.format = "B"
        view.ndim = 1
        view.shape = self.shape
        view.strides = self.strides
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer* view):
        pass

    @property
    def owner(self):
        return self.owner


# ---- audio sample-format conversion (interleaved, any channel count) ----

def i16_to_f32(const int16_t[::1] src, float[::1] dst):
    """int16 → float32 in [-1, 1): x / 32768."""
    cdef Py_ssize_t i, n = src.shape[0]
    if dst.shape[0] < n:
        raise ValueError("destination too small")
    with nogil:
        for i in range(n):
            dst[i] = src[i] * (1.0 / 32768.0)


def f32_to_i16(const float[::1] src, int16_t[::1] dst):
    """float32 → int16, scaled by 32768 with saturation (clips out-of-range input)."""
    cdef Py_ssize_t i, n = src.shape[0]
    cdef float v
    if dst.shape[0] < n:
        raise ValueError("destination too small")
    with nogil:
        for i in range(n):
            v = src[i] * 32768.0
            if v >= 32767.0:
                dst[i] = 32767
            elif v <= -32768.0:
                dst[i] = -32768
            elif v != v:
                dst[i] = 0
            else:
                dst[i] = <int16_t>(v + 0.5 if v >= 0 else v - 0.5)


def i32_to_f32(const int32_t[::1] src, float[::1] dst):
    """int32 → float32 in [-1, 1): x / 2**31."""
    cdef Py_ssize_t i, n = src.shape[0]
    if dst.shape[0] < n:
        raise ValueError("destination too small")
    with nogil:
        for i in range(n):
            dst[i] = <float>(src[i] * (1.0 / 2147483648.0))


def f32_to_i32(const float[::1] src, int32_t[::1] dst):
    """float32 → int32, scaled by 2**31 with saturation."""
    cdef Py_ssize_t i, n = src.shape[0]
    cdef double v
    if dst.shape[0] < n:
        raise ValueError("destination too small")
    with nogil:
        for i in range(n):
            v = <double>src[i] * 2147483648.0
            if v >= 2147483647.0:
                dst[i] = 2147483647
            elif v <= -2147483648.0:
                dst[i] = -2147483647 - 1
            elif v != v:
                dst[i] = 0
            else:
                dst[i] = <int32_t>(v + 0.5 if v >= 0 else v - 0.5)


def i16_to_i32(const int16_t[::1] src, int32_t[::1] dst):
    """int16 → int32 (shift left by 16)."""
    cdef Py_ssize_t i, n = src.shape[0]
    if dst.shape[0] < n:
        raise ValueError("destination too small")
    with nogil:
        for i in range(n):
            dst[i] = (<int32_t>src[i]) * 65536


def i32_to_i16(const int32_t[::1] src, int16_t[::1] dst):
    """int32 → int16 (arithmetic shift right by 16, truncating)."""
    cdef Py_ssize_t i, n = src.shape[0]
    if dst.shape[0] < n:
        raise ValueError("destination too small")
    with nogil:
        for i in range(n):
            dst[i] = <int16_t>(src[i] >> 16)
