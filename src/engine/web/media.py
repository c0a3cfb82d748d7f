"""A browser peer's audio, either way: what aiortc hands over and what it is handed.

- `MicrophoneDecoder` stands in for aiortc's receiver decoder queue: the
  caller's Opus frames decoded to mono in the event loop's thread as they
  come (no decoder thread, no hop back per 20 ms), `pcm_of` as samples.
- `make_reply_track()`: the reply's audio track, 20 ms frames paced by the
  RTP clock, nothing at all between replies (so the browser's jitter buffer
  is the only playout buffer), emptied at once on an interruption.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import time
from typing import Any

import numpy as np

RATE_OUT = 48_000
FRAME_OUT = 960  # 20 ms at 48 kHz: Opus's frame
#: most reply audio a peer holds for its track (a runaway pipeline cannot grow it past this)
MAX_QUEUED_S = 120.0


def make_reply_track() -> Any:
    """The reply's audio track: 20 ms frames on the RTP clock; silence between replies.
    (Its class is made here: aiortc and av are imported only when a browser connects.)"""
    from aiortc import MediaStreamTrack
    from av import AudioFrame

    class _ReplyTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self._queue: collections.deque[tuple[np.ndarray, str]] = collections.deque()  # 20 ms pieces
            self._start: float | None = None
            self._pts = 0
            self.on_first_audio: Any = None  # called with a turn id when its first frame goes out
            self._started_turns: collections.OrderedDict[str, None] = collections.OrderedDict()
            self.playing_turn = ""
            self._audio = asyncio.Event()  # set while there is audio to send (or the track ended)

        @property
        def queued_s(self) -> float:
            return len(self._queue) * FRAME_OUT / RATE_OUT

        def add(self, samples: np.ndarray, turn: str) -> None:
            """Queue 48 kHz s16 mono samples of `turn`, in 20 ms frames (the last one padded
            with silence: a reply's frames come 100 ms at a time, its end at any length)."""
            if self.queued_s > MAX_QUEUED_S:
                return
            pad = -samples.size % FRAME_OUT
            x = np.concatenate((samples, np.zeros(pad, np.int16))) if pad else samples
            for lo in range(0, x.size, FRAME_OUT):
                self._queue.append((x[lo:lo + FRAME_OUT], turn))
            if self._queue:
                self._audio.set()

        def stop(self) -> None:
            super().stop()
            self._audio.set()  # a recv() waiting for audio ends

        def clear(self, turn: str | None = None) -> None:
            """Drop what is queued (of `turn` only, if given): the reply was interrupted."""
            if turn is None:
                self._queue.clear()
            else:
                self._queue = collections.deque(p for p in self._queue if p[1] != turn)

        async def recv(self) -> Any:
            if self.readyState != "live":
                from aiortc.mediastreams import MediaStreamError

                raise MediaStreamError
            if not self._queue:
                # Nothing to say: send nothing (as Opus DTX would) rather than encode and
                # encrypt 50 frames of silence a second; the next reply starts at once,
                # its RTP timestamp where the clock is by then.
                self._audio.clear()
                await self._audio.wait()
                if self.readyState != "live":
                    from aiortc.mediastreams import MediaStreamError

                    raise MediaStreamError
                now = time.monotonic()
                if self._start is None:
                    self._start = now
                self._pts = max(self._pts, round((now - self._start) * RATE_OUT / FRAME_OUT) * FRAME_OUT)
            else:
                wait = self._start + self._pts / RATE_OUT - time.monotonic()  # type: ignore[operator]
                if wait > 0:
                    await asyncio.sleep(wait)
            if self._queue:
                samples, turn = self._queue.popleft()
                if turn and turn not in self._started_turns:
                    self._started_turns[turn] = None
                    while len(self._started_turns) > 64:
                        self._started_turns.popitem(last=False)
                    if self.on_first_audio is not None:
                        self.on_first_audio(turn)
                self.playing_turn = turn
            else:
                samples, self.playing_turn = np.zeros(FRAME_OUT, np.int16), ""
            frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = RATE_OUT
            frame.pts = self._pts
            frame.time_base = fractions.Fraction(1, RATE_OUT)
            self._pts += FRAME_OUT
            return frame

    return _ReplyTrack()


def pcm_of(frame: Any) -> tuple[np.ndarray, int]:
    """A decoded audio frame → (mono float32 samples, rate); a stereo frame's left channel (a
    microphone's two channels are the same). Packed s16, the decoders' format, is read from
    the frame's buffer as it is (`to_ndarray` costs a copy and a stack, 50 packets a second)."""
    channels = len(frame.layout.channels)
    if frame.format.name == "s16":
        pcm = np.frombuffer(frame.planes[0], np.int16)[:frame.samples * channels]
        x = pcm.reshape(-1, channels)[:, 0] if channels > 1 else pcm
    else:  # planar: one row per channel; packed: one row of interleaved samples
        pcm = frame.to_ndarray()
        x = pcm[0] if frame.format.is_planar else pcm.reshape(-1, channels)[:, 0]
    x = x.astype(np.float32) * (1 / 32768) if pcm.dtype == np.int16 else x.astype(np.float32)
    return x, frame.sample_rate


class MicrophoneDecoder:
    """Stands in for aiortc's decoder queue: its receiver puts each complete audio frame in a
    queue.Queue that a thread of its own decodes and hands back to the event loop (a thread hop,
    a wake-up and a scheduled coroutine per 20 ms of audio). This decodes as the frame is put,
    in the loop's thread (Opus to mono, ~30 µs), and hands the samples to `deliver`. aiortc's
    thread finds it empty at once (`get` → None) and ends; `put(None)`, the receiver stopping,
    ends the caller's audio. Codecs other than Opus (G.711) go through aiortc's own decoders."""

    def __init__(self, deliver: Any, log: Any) -> None:
        self.deliver = deliver
        self.log = log
        self._decoders: dict[str, Any] = {}

    def get(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _decoder(self, codec: Any) -> Any:
        """codec → a function from an encoded frame to decoded frames."""
        decode = self._decoders.get(codec.name)
        if decode is None:
            if codec.name.lower() == "opus":
                from av import CodecContext, Packet

                ctx = CodecContext.create("libopus", "r")
                ctx.format, ctx.layout, ctx.sample_rate = "s16", "mono", 48_000

                def decode(encoded: Any) -> list:
                    return ctx.decode(Packet(encoded.data))
            else:
                from aiortc.codecs import get_decoder

                decode = get_decoder(codec).decode
            self._decoders[codec.name] = decode
        return decode

    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        if item is None:
            self.deliver(None)
            return
        codec, encoded = item
        from av import FFmpegError

        try:
            frames = self._decoder(codec)(encoded)
        except FFmpegError as exc:  # a bad frame: the next one decodes (Opus keeps its own state)
            self.log.debug("microphone: %s frame not decoded: %s", codec.name, exc)
            return
        for frame in frames:
            self.deliver(pcm_of(frame))
