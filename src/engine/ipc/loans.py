"""Output frames written in place: a node process's new arrays in loaned
shared-memory samples, and sending such a sample without a copy.

A node that asks for its output first (`Node.new_tensor`, `new_audio`) gets
an array lying in a sample loaned from its output channel, `META_ROOM` bytes
behind the sample's start; when the node returns the frame whose payload is
exactly that array, the header and meta are written in front of it and the
sample is sent as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _fastpath
from ..data import RuntimeData
from ..node import FrameMemory
from . import codec, iox
from .channel import FrameSender

#: bytes kept for a frame's meta (JSON: metadata, source, layout) in front of
#: an in-place payload; a frame whose meta outgrows it is sent by copy
META_ROOM = 1024


class Loan:
    """A loaned output sample whose payload a node writes in place."""

    __slots__ = ("sample", "address", "offset", "nbytes")

    def __init__(self, sample: Any, offset: int, nbytes: int) -> None:
        self.sample = sample
        self.address = sample.payload_ptr
        self.offset = offset
        self.nbytes = nbytes


class LoanedMemory(FrameMemory):
    """New output frames in the output channel's shared memory (see Node.new_tensor).

    Falls back to the heap when no sample can be loaned (the publisher's
    loan limit; the frame is then sent by copy like any other).
    """

    def __init__(self, sender: FrameSender) -> None:
        self.sender = sender
        self.lent = False  # any loan made yet (else no output can be in place)

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset = _fastpath.payload_offset(len(shape), META_ROOM)
        try:
            sample = iox.loan_slice(self.sender.pub, offset + nbytes)
        except Exception:  # noqa: BLE001 - loan limit or memory: the heap will do
            return super().array(shape, dtype)
        self.lent = True
        loan = Loan(sample, offset, nbytes)
        view = _fastpath.SharedView(loan.address + offset, nbytes, loan, True)
        return np.frombuffer(view, dtype=dtype, count=nbytes // dtype.itemsize if dtype.itemsize else 0).reshape(shape)


def _array_of(frame: RuntimeData) -> np.ndarray | None:
    arr = getattr(frame, "array", None)  # TensorData
    return getattr(frame, "samples", None) if arr is None else arr  # AudioData


def loan_of(frame: RuntimeData) -> Loan | None:
    """The loan a frame's payload lies in, if the whole payload is exactly that loan."""
    arr = _array_of(frame)
    if arr is None:
        return None
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if not isinstance(base, _fastpath.SharedView) or not isinstance(base.owner, Loan):
        return None
    loan = base.owner
    if loan.sample is None or arr.ctypes.data != loan.address + loan.offset or arr.nbytes != loan.nbytes \
            or not arr.flags.c_contiguous:
        return None
    return loan


def send_in_place(p: codec.Prepared, loan: Loan, out: RuntimeData, sender: FrameSender) -> bool:
    """Send a frame whose payload was written into its loaned sample; False = send it by copy."""
    if len(p.meta) > META_ROOM:
        return False  # the loan stays valid as the copy's source until it is collected
    payload_at = loan.address + loan.offset
    _fastpath.header_to_address(loan.address, loan.offset + loan.nbytes, p.kind, p.elem, p.sequence,
                                p.timestamp_us, p.a, p.b, p.extra, 0, p.shape,
                                p.meta.ljust(META_ROOM), loan.nbytes)  # JSON allows trailing blanks
    sample, loan.sample = loan.sample, None
    _array_of(out).flags.writeable = False  # type: ignore[union-attr]  # it is the consumer's now
    if sender.send_loaned(sample):
        return True
    # The channel was full, and the sample went back to the pool unsent.
    # Nothing in this process loans before this line, so the payload is
    # still there: take a copy and send it the usual way (with credit).
    p.payload = bytearray(loan.nbytes)
    _fastpath.copy_from_address(payload_at, p.payload)
    return False
