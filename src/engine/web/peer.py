"""One browser conversation: an aiortc peer connection bound to one session.

In: the microphone's Opus frames, decoded to mono in the event loop's thread
as aiortc's receiver hands them over (`MicrophoneDecoder`: no decoder thread
and no hop back per 20 ms) → float32 → resampled once (soxr, streaming) to
the pipeline's rate → frames of `chunk` samples to its audio source node.

Out: the pipeline's reply audio → 48 kHz s16 → `ReplyTrack`, which hands
aiortc one 20 ms frame per 20 ms of the RTP clock (nothing at all between
replies), so the browser's jitter buffer is the only playout buffer;
an `interrupted` event empties it at once. JSON events go over the data
channel `events`: `transcript`, `reply` (each phrase as it is spoken),
`interrupted`, `timing` (end of speech → first reply audio, as the server
sent it), `error`, `closed`.

The peer ends its session when the connection fails or closes, when the
caller goes silent at the transport level (no RTP for `idle_secs`: a closed
tab may send nothing an ICE agent notices for many seconds), and when the
session ends; every exit path closes both.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import time
import uuid
from typing import Any

import numpy as np
import orjson
import soxr

from ..data import AudioData, JsonData, RuntimeData, TextData
from ..errors import EngineError
from ..turns import TurnEvent, turn_of
from .media import RATE_OUT, MicrophoneDecoder, make_reply_track, pcm_of

log = logging.getLogger("engine.web")

#: decoded microphone frames a peer lets wait (aiortc's queue has no bound): ~1 s of 20 ms frames.
#: A caller that sends faster than the pipeline takes has its oldest audio dropped past this.
MAX_WAITING_FRAMES = 50
#: the level (RMS, −40 dBFS) above which the caller's audio is sound: the end of speech that
#: the server's `timing` event counts from is when the last frame above it came (the page
#: measures its own with the same level)
LOUD_RMS = 0.01


class VoicePeer:
    """A peer connection and its session; `start()` answers the offer, `aclose()` ends both."""

    def __init__(self, face: Any, session: Any, source: str, rate: int, chunk: int, idle_secs: float,
                 prefetch: int = 1) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.id = uuid.uuid4().hex[:12]
        self.face = face
        self.session = session
        self.source = source
        self.rate = rate
        self.chunk = chunk
        self.idle_secs = idle_secs
        self.prefetch = prefetch
        # no STUN/TURN server: aiortc would otherwise ask a public STUN server
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.track = make_reply_track()
        self.track.on_first_audio = self._first_audio
        self.channel: Any = None
        self._pending: list[bytes] = []  # events before the data channel opened (bounded)
        self._tasks: set[asyncio.Task] = set()
        self._closed = asyncio.Event()
        self._closing = False
        self._last_rtp = time.monotonic()
        self._speech_end: dict[str, float] = {}  # turn → end of speech (monotonic), from the commit event
        self._transcribed: set[str] = set()
        self._mic: collections.deque[tuple[np.ndarray, int] | None] = collections.deque()  # decoded, waiting
        self._mic_ready = asyncio.Event()
        self._loud_at = 0.0  # when the caller's last frame louder than LOUD_RMS came (monotonic)
        self.dropped_frames = 0
        self.log = logging.LoggerAdapter(log, {"session_id": session.id, "node_id": "-"})

    # ------------------------------------------------------------ set-up

    async def answer(self, sdp: str, kind: str) -> dict[str, str]:
        from aiortc import RTCSessionDescription

        pc = self.pc

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            self.channel = channel
            for message in self._pending:
                channel.send(message.decode())
            self._pending.clear()

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            self.log.info("peer %s: connection %s", self.id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.aclose(f"connection {pc.connectionState}")

        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        if not any(t.kind == "audio" for t in pc.getTransceivers()):
            raise ValueError("the offer has no audio")
        for t in pc.getTransceivers():
            if t.kind == "audio":
                t.direction = "sendrecv"
                pc.addTrack(self.track)
                self._shorten_jitter_buffer(t.receiver)
                self._take_microphone(t.receiver)
                break
        await pc.setLocalDescription(await pc.createAnswer())  # gathers every candidate (no trickle)
        self._last_rtp = time.monotonic()  # the caller's silence is counted from the answer on
        self._spawn(self._send_microphone(), "microphone")
        self._spawn(self._read_outputs(), "outputs")
        self._spawn(self._watch_transport(), "watchdog")
        return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "pc_id": self.id}

    def _shorten_jitter_buffer(self, receiver: Any) -> None:
        """aiortc decodes an audio packet only once 4 more have come (80 ms) and has no
        setting for it: its receiver's buffer is replaced, before any packet, by one that
        holds `prefetch` (name-mangled attribute: checked, so an aiortc that renames it
        leaves its own buffer and says so)."""
        from aiortc.jitterbuffer import JitterBuffer

        name = "_RTCRtpReceiver__jitter_buffer"
        if not isinstance(getattr(receiver, name, None), JitterBuffer):
            self.log.warning("peer %s: aiortc's receiver has no %s: its jitter buffer is kept", self.id, name)
            return
        setattr(receiver, name, JitterBuffer(capacity=16, prefetch=self.prefetch))

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"peer {self.id} {name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not self._closing:
            self.log.warning("peer %s: %s ended: %s", self.id, task.get_name(), exc)
            self._spawn(self.aclose(f"{task.get_name()} failed: {exc}"), "close")

    # ------------------------------------------------------------ media in

    def _take_microphone(self, receiver: Any) -> None:
        """Route the caller's audio to `_heard`: decoded by `MicrophoneDecoder` in this thread
        as aiortc's receiver hands over each frame or, if this aiortc's receiver is not as
        expected, read from its track (decoded in aiortc's thread)."""
        name = "_RTCRtpReceiver__decoder_queue"
        if isinstance(getattr(receiver, name, None), queue.Queue) and not getattr(receiver, "_RTCRtpReceiver__started", True):
            setattr(receiver, name, MicrophoneDecoder(self._heard, self.log))
            return
        self.log.warning("peer %s: aiortc's receiver has no %s: its decoder thread is kept", self.id, name)
        self._spawn(self._read_track(receiver.track), "microphone track")

    async def _read_track(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                self._heard(None)
                return
            self._heard(pcm_of(frame))

    def _heard(self, audio: tuple[np.ndarray, int] | None) -> None:
        """One decoded frame of the caller's audio (mono float32, its rate), or None: the track ended."""
        self._last_rtp = now = time.monotonic()
        if audio is not None and float(np.dot(audio[0], audio[0])) > LOUD_RMS ** 2 * audio[0].size:
            self._loud_at = now
        if audio is not None and len(self._mic) >= MAX_WAITING_FRAMES:  # faster than real time: keep the newest
            self._mic.popleft()
            self.dropped_frames += 1
            if self.dropped_frames == 1:
                self.log.warning("peer %s: the browser sends audio faster than the pipeline takes it; "
                                 "dropping its oldest frames past %d", self.id, MAX_WAITING_FRAMES)
        self._mic.append(audio)
        self._mic_ready.set()

    async def _send_microphone(self) -> None:
        """The caller's audio → resampled once (soxr, streaming) → `chunk`-sample frames to the source node."""
        resampler: soxr.ResampleStream | None = None
        rate_in = 0
        pending = np.zeros(0, np.float32)
        while True:
            await self._mic_ready.wait()
            self._mic_ready.clear()
            while self._mic:
                audio = self._mic.popleft()
                if audio is None:
                    await self.aclose("the microphone track ended")
                    return
                x, rate = audio
                if resampler is None or rate_in != rate:
                    rate_in = rate
                    resampler = soxr.ResampleStream(rate_in, self.rate, 1, dtype="float32", quality="HQ")
                y = resampler.resample_chunk(x)
                pending = np.concatenate((pending, y)) if pending.size else y
                while pending.size >= self.chunk:
                    piece, pending = pending[:self.chunk].copy(), pending[self.chunk:]
                    await self.session.send(self.source, AudioData(piece, self.rate, 1))

    async def _watch_transport(self) -> None:
        """End the session when the caller has gone silent (no RTP for idle_secs)."""
        while not self._closed.is_set():
            silent = time.monotonic() - self._last_rtp
            if silent > self.idle_secs:
                await self.aclose(f"no audio from the browser for {silent:.1f} s")
                return
            try:
                await asyncio.wait_for(self._closed.wait(), max(0.1, self.idle_secs - silent))
            except TimeoutError:
                pass

    # ------------------------------------------------------------ media and events out

    async def _read_outputs(self) -> None:
        resample: dict[int, soxr.ResampleStream] = {}
        try:
            async for out in self.session:
                self._on_output(out.data, resample)
        except EngineError as exc:
            self.send_event({"type": "error", "error_type": exc.error_type.name, "node": exc.node_id,
                             "message": exc.message})
            await self.aclose(f"session failed: {exc}")
            return
        await self.aclose("the session ended")

    def _on_output(self, data: RuntimeData, resample: dict[int, soxr.ResampleStream]) -> None:
        turn = turn_of(data)
        if isinstance(data, AudioData):
            transcript = data.metadata.get("transcript")
            if transcript and turn not in self._transcribed:
                self._transcribed.add(turn)
                self.send_event({"type": "transcript", "turn_id": turn, "text": transcript})
            if data.metadata.get("text"):
                self.send_event({"type": "reply", "turn_id": turn, "text": data.metadata["text"]})
            x = data.samples.astype(np.float32)
            if data.channels > 1:
                x = x.reshape(-1, data.channels).mean(axis=1)
            if data.sample_rate != RATE_OUT:
                rs = resample.get(data.sample_rate)
                if rs is None:
                    rs = resample[data.sample_rate] = soxr.ResampleStream(data.sample_rate, RATE_OUT, 1,
                                                                          dtype="float32", quality="HQ")
                x = rs.resample_chunk(x)
            self.track.add((np.clip(x, -1, 1) * 32767).astype(np.int16), turn)
        elif isinstance(data, JsonData) and isinstance(data.value, dict) and data.value.get("event") == "interrupted":
            self.track.clear(data.value.get("turn_id"))
            self.send_event({"type": "interrupted", "turn_id": data.value.get("turn_id"),
                             "played_ms": data.value.get("played_ms")})
        elif isinstance(data, TextData) and data.text.strip():
            self.send_event({"type": "reply", "turn_id": turn, "text": data.text})

    def turn_event(self, event: TurnEvent) -> None:
        """The session's turn events (the peer is its observer): when speech ended."""
        if event.kind == "commit":
            # the end of speech as the page measures it: the last frame louder than LOUD_RMS, when
            # it came (the VAD's pause may begin before the last sound or, more often, after it)
            # (a turn spoken more quietly than that has its pause's start instead)
            pause_start = time.monotonic() - float(event.data.get("silence_ms", 0)) / 1000
            utterance_start = pause_start - float(event.data.get("utterance_ms", 0)) / 1000
            self._speech_end[event.turn_id] = self._loud_at if self._loud_at > utterance_start else pause_start
            while len(self._speech_end) > 64:
                self._speech_end.pop(next(iter(self._speech_end)))

    def _first_audio(self, turn: str) -> None:
        end = self._speech_end.pop(turn, None)
        if end is not None:
            self.send_event({"type": "timing", "turn_id": turn,
                             "server_first_audio_ms": round((time.monotonic() - end) * 1000)})

    def send_event(self, event: dict[str, Any]) -> None:
        message = orjson.dumps(event)
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            ch.send(message.decode())
        elif len(self._pending) < 64:
            self._pending.append(message)

    # ------------------------------------------------------------ the end

    async def aclose(self, reason: str = "closed") -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self.log.info("peer %s: closing (%s)", self.id, reason)
        try:
            self.send_event({"type": "closed", "reason": reason})
            await self.session.cancel()
        except Exception as exc:  # the session may be failing already: it is closed either way
            self.log.debug("peer %s: session close: %s", self.id, exc)
        self.track.stop()
        await self.pc.close()
        current = asyncio.current_task()
        others = [t for t in self._tasks if t is not current]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        self._closed.set()
        self.face.forget(self)

    async def wait_closed(self) -> None:
        await self._closed.wait()
