"""Shared-memory frame channels with credit-based backpressure.

One direction of one node's data path: a publisher writes encoded frames
straight into loaned samples and rings the peer's inbox (EV_DATA); the
subscriber drains. The subscriber buffer holds `channel_capacity` frames.
When it is full, `send()` returns 0 (DiscardData, no safe overflow): the
producer then asks for credit (EV_WANT_CREDIT) and waits; the consumer
answers with EV_CREDIT as soon as it has taken a frame out (or at once if it
is idle). Nothing is overwritten, nothing blocks with the GIL held, no one
polls.

`Inbox` turns a process's iceoryx2 Listener into loop callbacks: readable
events on the listener's socket fd (no thread, no polling); if that fd cannot
be found, a helper thread blocked in the listener's wait forwards the events.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable

from .. import _fastpath
from ..data import DataKind
from . import codec, shm_budget
from .iox import EV_CREDIT, EV_DATA, EV_SPAN, EV_WANT_CREDIT, assume_init, event_id, loan_slice


class Inbox:
    """Delivers the event ids a listener received to `on_events`, on the loop."""

    def __init__(self, listener, fd: int | None, on_events: Callable[[set[int]], None]) -> None:
        self._listener = listener
        self._fd = fd
        self._on_events = on_events
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self._fd is not None:
            loop.add_reader(self._fd, self._readable)
        else:
            self._thread = threading.Thread(target=self._wait_loop, name="iox-inbox", daemon=True)
            self._thread.start()

    @property
    def fd(self) -> int | None:
        """The listener's socket, when found (None: events come through a helper thread)."""
        return self._fd

    def poll(self) -> None:
        """Take pending events now (without waiting for the loop's callback)."""
        self._readable()

    def _readable(self) -> None:
        acts = self._listener.try_wait()
        if acts:
            self._on_events({a.id.as_value for a in acts})

    def _wait_loop(self) -> None:
        import iceoryx2 as iox2

        timeout = iox2.Duration.from_millis(100)
        while not self._stop.is_set():
            acts = self._listener.timed_wait(timeout)
            if acts and self._loop is not None and not self._stop.is_set():
                ids = {a.id.as_value for a in acts}
                try:
                    self._loop.call_soon_threadsafe(self._on_events, ids)
                except RuntimeError:  # loop closed
                    return

    def detach(self) -> None:
        if self._loop is not None and self._fd is not None:
            try:
                self._loop.remove_reader(self._fd)
            except (ValueError, RuntimeError):
                pass
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        self._loop = None


class FrameSender:
    """Producer end: publisher + a notifier on the consumer's inbox (as inbox slot `slot`)."""

    def __init__(self, pub, notifier, slot: int = 0) -> None:
        self.pub = pub
        self.notifier = notifier
        self.credit = asyncio.Event()
        self.closed = False  # the consumer is gone: nothing will free room
        self._ev_data = event_id(slot * EV_SPAN + EV_DATA)
        self._ev_want = event_id(slot * EV_SPAN + EV_WANT_CREDIT)
        #: called with a frame's size before the first frame that makes the
        #: publisher grow its segment (may raise: no room in /dev/shm)
        self.grow_check: Callable[[int], None] | None = None
        self._slice = shm_budget.INITIAL_SLICE  # the segment's slice length so far

    def _grows(self, size: int) -> None:
        if self.grow_check is not None:
            self.grow_check(size)
        self._slice = shm_budget.next_slice(size)

    def send_loaned(self, sample) -> bool:
        """Send a loaned sample already holding an encoded frame; False = the
        consumer's buffer was full (the sample is gone back to the pool)."""
        if assume_init(sample).send() == 0:
            return False
        self.notifier.notify_with_custom_event_id(self._ev_data)
        return True

    def try_send(self, p: codec.Prepared | codec.Encoded) -> bool:
        """Send one frame if the consumer has room; a frame still encoded
        (codec.Encoded) is copied as it is."""
        if type(p) is codec.Encoded:
            size = len(p.data)
            if size > self._slice:
                self._grows(size)
            sample = loan_slice(self.pub, size)
            _fastpath.copy_to_address(sample.payload_ptr, size, p.data)
        else:
            size = p.size
            if size > self._slice:
                self._grows(size)
            sample = loan_slice(self.pub, size)
            codec.write_to_address(sample.payload_ptr, size, p)
        if assume_init(sample).send() == 0:
            return False
        self.notifier.notify_with_custom_event_id(self._ev_data)
        return True

    async def send(self, p: codec.Prepared | codec.Encoded, *, drop_when_full: bool = False) -> bool:
        """Send one frame; wait for credit while the consumer's buffer is full.

        With `drop_when_full` a full buffer refuses the frame instead (returns
        False; the caller counts the drop).
        """
        while not self.try_send(p):
            if drop_when_full:
                return False
            if self.closed:
                raise ChannelClosed("the consumer of this channel is gone")
            self.credit.clear()
            self.ask_credit()
            await self.credit.wait()
        return True

    def close(self) -> None:
        """The consumer is gone: a send waiting for room fails instead of waiting forever
        (a consumer's subscriber that no longer exists looks like a full buffer)."""
        self.closed = True
        self.credit.set()

    def ask_credit(self) -> None:
        """Ask the consumer to say (EV_CREDIT) when it has taken a frame out."""
        self.notifier.notify_with_custom_event_id(self._ev_want)

    def on_credit(self) -> None:
        self.credit.set()


class ChannelClosed(Exception):
    """A frame could not be sent: the channel's consumer is gone."""


class FrameReceiver:
    """Consumer end: subscriber + a notifier on the producer's inbox (as inbox slot `slot`).

    Frames are copied out of shared memory, except, when asked, payloads of
    at least BORROW_MIN_BYTES: those are read-only views over the received
    sample, which stays borrowed until the last view is gone (then returned
    on the receiving thread by `return_borrowed()`). At most BORROW_LIMIT
    samples are borrowed at once; past that, frames are copied again.
    """

    def __init__(self, sub, notifier, slot: int = 0) -> None:
        self.sub = sub
        self.notifier = notifier
        self.want_credit = False
        self._ev_credit = event_id(slot * EV_SPAN + EV_CREDIT)
        self.borrowed = 0
        self._returned: collections.deque = collections.deque()

    def receive(self, borrow: bool = False):
        """Next frame, codec.EOS, or None when empty."""
        sample = self.sub.receive()
        if sample is None:
            return None
        length = sample.header.number_of_elements
        if borrow and length >= BORROW_MIN_BYTES and self.borrowed < BORROW_LIMIT:
            self.borrowed += 1
            try:
                frame = codec.decode_from_address(sample.payload_ptr, length, _Borrowed(self, sample))
            except BaseException:
                self.return_borrowed()  # the loan's view is gone with the error
                raise
        else:
            try:
                frame = codec.decode_from_address(sample.payload_ptr, length)
            finally:
                sample.delete()
        self.freed()
        return EOS if frame is None else frame

    def receive_encoded(self):
        """Next frame without decoding its payload (a codec.Encoded; a JSON
        frame decoded), codec.EOS, or None when empty."""
        sample = self.sub.receive()
        if sample is None:
            return None
        length = sample.header.number_of_elements
        try:
            address = sample.payload_ptr
            header = _fastpath.decode_at_address(address, length)
            if header[0] == codec.KIND_EOS:
                frame: object = EOS
            elif header[0] == DataKind.JSON:
                frame = codec.decode_from_address(address, length)
            else:
                data = bytearray(length)
                _fastpath.copy_from_address(address, data)
                frame = codec.Encoded(data, header)
        finally:
            sample.delete()
        self.freed()
        return frame

    def return_borrowed(self) -> None:
        """Give back the samples whose frames are gone (call on the receiving thread)."""
        while self._returned:
            self._returned.popleft().delete()
            self.borrowed -= 1

    def freed(self) -> None:
        if self.want_credit:
            self.want_credit = False
            self.notifier.notify_with_custom_event_id(self._ev_credit)


#: smallest payload worth lending instead of copying, and how many samples may be lent at once
BORROW_MIN_BYTES = 64 * 1024
BORROW_LIMIT = 4


class _Borrowed:
    """Owner of a borrowed sample's memory: when the last view of it is gone,
    the sample is queued for return (by whichever thread drops it)."""

    __slots__ = ("_receiver", "_sample")

    def __init__(self, receiver: FrameReceiver, sample) -> None:
        self._receiver = receiver
        self._sample = sample

    def __del__(self) -> None:
        self._receiver._returned.append(self._sample)  # deque.append is thread-safe


class _Eos:
    def __repr__(self) -> str:
        return "EOS"


EOS = _Eos()
