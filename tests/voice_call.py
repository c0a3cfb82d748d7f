"""A voice-loop client over gRPC, as a real one talks: audio in 32 ms chunks on a
real-time clock (silence while it has nothing to say), replies read as they come."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from grpc_client import CLOSE, init, proto_manifest_from_dict

from bench.scenarios_speech import playout_end
from engine import RuntimeData
from engine._proto import streaming_pb2 as spb
from engine._proto import streaming_pb2_grpc as spb_grpc
from engine.server import wire
from engine.turns import turn_of

CHUNK, RATE = 512, 16000
CHUNK_S = CHUNK / RATE


class VoiceCall:
    def __init__(self, channel: Any, manifest: dict, room_rms: float = 0.0) -> None:
        """`room_rms`: a room's noise (RMS) under everything sent, silence included (0: digital silence)."""
        self.call = spb_grpc.StreamingPipelineServiceStub(channel).StreamPipeline()
        self.manifest = manifest
        self.responses: list[tuple[float, spb.StreamResponse]] = []
        self.outputs: list[tuple[float, RuntimeData]] = []  # tts outputs, with arrival times
        self._seq = 0
        self._next = 0.0
        self._reader: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._room = room_rms
        self._rng = np.random.default_rng(0)

    async def __aenter__(self) -> VoiceCall:
        await self.call.write(init(proto_manifest_from_dict(self.manifest)))
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await asyncio.wait_for(self._ready.wait(), 60)
        self._next = time.perf_counter()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._reader is not None and not self._reader.done():
            self.call.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        import grpc

        while (resp := await self.call.read()) is not grpc.aio.EOF:
            now = time.perf_counter()
            self.responses.append((now, resp))
            kind = resp.WhichOneof("response")
            if kind in ("ready", "error"):
                self._ready.set()
            if kind == "result" and "tts" in resp.result.data_outputs:
                self.outputs.append((now, wire.from_proto(resp.result.data_outputs["tts"])))

    async def _send(self, piece: np.ndarray) -> None:
        self._next += CHUNK_S
        await asyncio.sleep(max(0.0, self._next - time.perf_counter()))
        if self._room:
            piece = piece + self._rng.normal(0, self._room, piece.size).astype(np.float32)
        c = spb.DataChunk(node_id="vad", sequence=self._seq)
        wire.to_proto(RuntimeData.audio(piece, RATE), c.buffer)
        self._seq += 1
        await self.call.write(spb.StreamRequest(data_chunk=c))

    async def say(self, audio: np.ndarray) -> float:
        """Stream `audio` in real time; returns the clock time of its first sample."""
        start = self._next
        audio = np.concatenate((audio, np.zeros(-audio.size % CHUNK, np.float32)))
        for lo in range(0, audio.size, CHUNK):
            await self._send(audio[lo:lo + CHUNK])
        return start

    async def silence(self, seconds: float) -> None:
        end = self._next + seconds
        while self._next < end:
            await self._send(np.zeros(CHUNK, np.float32))

    async def silence_until(self, predicate: Any, what: str, limit_s: float = 20.0) -> None:
        deadline = time.perf_counter() + limit_s
        while not predicate():
            if time.perf_counter() > deadline:
                raise AssertionError(f"no {what} after {limit_s:g} s of streaming")
            if self._reader is not None and self._reader.done():
                raise AssertionError(f"the call ended before {what}: {self.kinds()}")
            await self.silence(CHUNK_S)

    async def close(self) -> list[spb.StreamResponse]:
        await self.call.write(CLOSE)
        await self.call.done_writing()
        assert self._reader is not None
        await self._reader
        return [r for _, r in self.responses]

    # ------------------------------------------------------------ what came back

    def kinds(self) -> list[str]:
        return [r.WhichOneof("response") for _, r in self.responses]

    def audio(self, after: float = 0.0) -> list[tuple[float, RuntimeData]]:
        return [(t, f) for t, f in self.outputs if t >= after and f.kind.name == "AUDIO"]

    async def speak_over_the_reply(self, first: np.ndarray, second: np.ndarray) -> tuple[float, str, float]:
        """Say `first`, let its reply play 0.4 s, say `second` over it, and wait until the second's
        own reply has played out: (first's start, the first reply's turn, second's start)."""
        start = await self.say(first)
        await self.silence_until(lambda: self.audio(after=start), "a reply")
        (old,) = self.turns(after=start)
        await self.silence(0.4)  # the reply is playing
        barge = await self.say(second)
        await self.silence_until(lambda: len(self.turns(after=start)) == 2 and self.played_out(barge),
                                 "a reply to the second question")
        return start, old, barge

    def played_out(self, since: float) -> bool:
        """A reply came after `since` and has played out (each frame played as it came, in order)."""
        audio = self.audio(after=since)
        if not audio:
            return False
        return time.perf_counter() > max(playout_end(audio), audio[-1][0] + 0.5) + 0.2

    def turns(self, after: float = 0.0) -> list[str]:
        """The turns that reply audio came for, in order."""
        out: list[str] = []
        for _, f in self.audio(after):
            if turn_of(f) not in out:
                out.append(turn_of(f))
        return out

    def events(self) -> list[tuple[float, dict]]:
        return [(t, f.value) for t, f in self.outputs if f.kind.name == "JSON"]

    def reply(self, turn: str) -> tuple[np.ndarray, str, str, int]:
        """(audio, the words it says, the user's words it answers, rate) of one turn's reply."""
        frames = [f for _, f in self.outputs if f.kind.name == "AUDIO" and turn_of(f) == turn]
        assert frames, f"no audio for turn {turn}"
        return (np.concatenate([f.samples for f in frames]),
                " ".join(f.metadata["text"] for f in frames if "text" in f.metadata),
                frames[0].metadata.get("transcript", ""), frames[0].sample_rate)
