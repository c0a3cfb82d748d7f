"""The RemoteMedia Next.js app's speech-to-speech page, as the server sees it.

`seed_app` drives the app's `simple-s2s` manifest (tests/fixtures/nextjs_app,
as the app builds it) over gRPC on 127.0.0.1 the way its `/s2s` route does:
one persistent stream, each turn one whole utterance (24 kHz float32, sent
when the speaker has finished, as the page uploads it). Between turns the
client waits as long as the question takes to say and for the reply to end.
It measures end of the utterance's upload → first audio result (and → first
text result), p50/p95. In the same run, the project's own voice loop
(examples/speech_to_speech.json, streamed in real time) answers the same
questions, from the end of speech to its first reply audio. The questions
are spoken by espeak-ng at 130-170 words a minute, a voice none of the
bundled models speaks with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.harness import pct, scenario
from bench.scenarios_speech import QUESTIONS, Spoken, engine_turns, voice_manifest
from engine._proto import streaming_pb2 as spb
from engine._proto import streaming_pb2_grpc
from engine.data import AudioData
from engine.manifest_proto import to_proto
from engine.server import EngineServer, wire
from nodes.speech.spoken import espeak

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "nextjs_app" / "simple-s2s.json"
RATE = 24_000


class _Stream:
    """One StreamPipeline call, read by a task: each result with the time it came."""

    def __init__(self, channel: grpc.aio.Channel, manifest: dict) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queue.put_nowait(spb.StreamRequest(init=spb.StreamInit(manifest=to_proto(manifest))))
        self.call = streaming_pb2_grpc.StreamingPipelineServiceStub(channel).StreamPipeline(self._requests())
        self.results: list[tuple[float, spb.ChunkResult]] = []
        self.ready = asyncio.Event()
        self.arrived = asyncio.Event()  # set at every result
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _requests(self):
        while (item := await self.queue.get()) is not None:
            yield item

    async def _read(self) -> None:
        async for resp in self.call:
            kind = resp.WhichOneof("response")
            if kind == "ready":
                self.ready.set()
            elif kind == "result":
                self.results.append((time.perf_counter(), resp.result))
                self.arrived.set()
            elif kind == "error":
                raise RuntimeError(f"the server answered with an error: {resp.error}")

    def send(self, node: str, frame: AudioData, seq: int) -> float:
        self.queue.put_nowait(spb.StreamRequest(data_chunk=spb.DataChunk(
            node_id=node, buffer=wire.to_proto(frame), sequence=seq)))
        return time.perf_counter()

    async def until(self, predicate: Any, timeout_s: float) -> None:
        """Until `predicate()` holds, checked at each result, for at most `timeout_s`."""
        deadline = time.perf_counter() + timeout_s
        while not predicate() and (left := deadline - time.perf_counter()) > 0:
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)

    async def quiet(self, seconds: float) -> None:
        """Until no result has come for `seconds` (the reply is over)."""
        while True:
            last = self.results[-1][0] if self.results else 0.0
            wait = last + seconds - time.perf_counter()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def close(self) -> None:
        self.queue.put_nowait(spb.StreamRequest(control=spb.StreamControl(command=spb.StreamControl.COMMAND_CLOSE)))
        self.queue.put_nowait(None)
        await self.reader


def _first(stream: _Stream, seq: int, kind: str, after: float) -> float:
    for t, r in stream.results:
        if r.sequence == seq and t >= after:
            first = next(iter(r.data_outputs.values()), None)  # the app reads the first output only
            if first is not None and first.WhichOneof("data_type") == kind:
                return t - after
    return float("nan")


#: the operator's choice of speed over Kokoro's voice: Piper serves KokoroTTSNode everywhere
PIPER_FOR_KOKORO = {"composites": {"KokoroTTSNode": {
    "override": True, "description": "Piper at 24 kHz in place of Kokoro",
    "nodes": [{"id": "tts", "node_type": "PiperTTSNode",
               "params": {"output_sample_rate": 24000, "emit_text": True, "threads": 2}}],
    "params": {"speed": "tts.speed"},
    "inert_params": {k: "Piper speaks here" for k in ("voice", "model_id", "device", "language", "lang_code")},
}}}


async def app_turns(utterances: list[np.ndarray], config: dict) -> tuple[list[float], list[float], float]:
    """(upload end → first audio, → first text, session start-up s) for each utterance."""
    manifest = json.loads(FIXTURE.read_text())
    server = EngineServer(config, host="127.0.0.1", port=0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            t0 = time.perf_counter()
            stream = _Stream(channel, manifest)
            await asyncio.wait_for(stream.ready.wait(), 120)
            startup = time.perf_counter() - t0
            audio_s, text_s = [], []
            for i, utt in enumerate(utterances):
                await asyncio.sleep(utt.size / RATE)  # the user speaks; the page records
                sent = stream.send("lfm2_audio", AudioData(utt, RATE, 1, metadata={"sessionId": "bench",
                                                                                     "reset": "false"}), i)
                await stream.until(lambda i=i, sent=sent: not np.isnan(_first(stream, i, "audio", sent)), 30)
                await stream.quiet(1.0)
                audio_s.append(_first(stream, i, "audio", sent))
                text_s.append(_first(stream, i, "text", sent))
                print(f"  app turn {i}: first audio {audio_s[-1] * 1e3:.0f} ms, first text "
                      f"{text_s[-1] * 1e3:.0f} ms", flush=True)
            await stream.close()
    finally:
        await server.aclose()
    return audio_s, text_s, startup


@scenario("seed_app")
def seed_app() -> dict:
    import uvloop

    wpm = [130 + (i * 10) % 50 for i in range(len(QUESTIONS))]
    app_audio = [espeak(q, RATE, wpm=w, lead_s=0, tail_s=0) for q, w in zip(QUESTIONS, wpm, strict=True)]
    series: dict[str, dict] = {}
    derived: dict[str, object] = {}
    p50s = {}
    for label, config in (("Kokoro-82M", {}), ("Piper for Kokoro", PIPER_FOR_KOKORO)):
        print(f"  the app's simple-s2s, KokoroTTSNode served by {label}:", flush=True)
        first_audio, first_text, startup = uvloop.run(app_turns(app_audio, config))
        answered = [v for v in first_audio if not np.isnan(v)]
        series[f"app simple-s2s ({label}): upload end → first audio"] = {"values": answered, "unit": "s"}
        series[f"app simple-s2s ({label}): upload end → first text"] = {
            "values": [v for v in first_text if not np.isnan(v)], "unit": "s"}
        derived[f"app turns answered ({label})"] = f"{len(answered)} of {len(first_audio)}"
        derived[f"app session start-up, {label} (s)"] = startup
        p50s[label] = (pct(answered, .5), pct(answered, .95))
    spoken = [Spoken.from_audio(q, espeak(q, 16_000, wpm=w, lead_s=0, tail_s=0), seed=i)
              for i, (q, w) in enumerate(zip(QUESTIONS, wpm, strict=True))]
    own, _cpu, _ = uvloop.run(engine_turns(spoken, voice_manifest()))
    series["speech example: end of speech → first reply audio"] = {
        "values": [r.stages["first_audio"] for r in own], "unit": "s"}
    return {
        "series": series,
        "derived": derived,
        "targets": {f"first audio under 500 ms (p50), {label}": f"{'met' if p50 < 0.5 else 'MISSED'} "
                                                               f"({p50 * 1e3:.0f} ms; p95 {p95 * 1e3:.0f} ms)"
                    for label, (p50, p95) in p50s.items()},
        "notes": f"{len(QUESTIONS)} questions spoken by espeak-ng ({min(wpm)}-{max(wpm)} wpm); the app's manifest "
                 "is served by the LFM2AudioNode stand-in (Whisper tiny.en → SmolLM2), TextCollectorNode and "
                 "KokoroTTSNode: Kokoro-82M int8 (the default), or Piper in its place (runtime.toml "
                 "[composites.KokoroTTSNode] override = true). The app plays the first audio result of a turn "
                 "only, so that result is a whole sentence.",
    }
