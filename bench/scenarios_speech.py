"""The voice loop: end of the user's speech → first reply audio.

`voice_loop` streams 2-second spoken questions (made by the engine's own
TTS, with silence around them and a little noise) in real time, 512 samples
every 32 ms, through examples/speech_to_speech.json (VAD → utterances →
Whisper → SmolLM2 → Piper, each model in its own process) and times, from
the moment the last speech sample was sent, the first reply audio chunk,
with a per-stage breakdown taken from the session's observer. The baseline,
in the same run, calls the same four models one after another in one
process, as a simple voice bot would.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np

from bench.harness import pct, scenario
from engine import Engine, RuntimeData

MANIFEST = Path(__file__).resolve().parent.parent / "examples" / "speech_to_speech.json"
QUESTIONS = [
    "Could you tell me the capital of France?", "How many legs does a spider really have?",
    "What color is the sky on a sunny day?", "Can you please tell me a short joke?",
    "What do you get when you add two and two?", "Where do most of the penguins live?",
    "Which planet is the largest in our system?", "Please name a fruit that is usually yellow.",
    "What day of the week comes after Monday?", "Why is the water in the ocean salty?",
    "What do cows usually eat on a farm?", "Who wrote the play called Romeo and Juliet?",
]
CHUNK, RATE, LEAD_S = 512, 16000, 0.5
#: each question answered on its own (no conversation history), in both runs
LLM_PARAMS = {"max_tokens": 48, "history_turns": 0}


def _manifest() -> dict:
    doc = json.loads(MANIFEST.read_text())
    for node in doc["nodes"]:
        if node["id"] == "llm":
            node["params"].update(LLM_PARAMS)
    return doc


class StageClock:
    """Session observer: when each node type emitted."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []

    def node_output(self, node_type: str, latency_s: float) -> None:
        self.events.append((time.perf_counter(), node_type))

    def last_before(self, node_type: str, t: float, after: float) -> float | None:
        hits = [e for e, n in self.events if n == node_type and after <= e <= t]
        return hits[-1] if hits else None

    def first_after(self, node_type: str, t: float) -> float | None:
        hits = [e for e, n in self.events if n == node_type and e >= t]
        return hits[0] if hits else None


async def _pipeline_runs() -> tuple[dict[str, list[float]], list[str], float]:
    from nodes.speech.spoken import question, speech_seconds

    clock = StageClock()
    stages: dict[str, list[float]] = {k: [] for k in ("first_audio", "vad_end", "asr_done", "llm_first_phrase")}
    replies: list[str] = []
    async with Engine(observer=clock) as engine:
        t0 = time.perf_counter()
        session = engine.stream(_manifest())
        await session.start()
        startup = time.perf_counter() - t0
        arrivals: asyncio.Queue = asyncio.Queue()

        async def consume() -> None:
            async for out in session:
                arrivals.put_nowait((time.perf_counter(), out.data))

        reader = asyncio.get_running_loop().create_task(consume())
        silence = np.zeros(CHUNK, np.float32)
        for q in QUESTIONS:
            audio = question(q, lead_s=LEAD_S, tail_s=0.0)
            start = time.perf_counter()
            end_of_speech = start + LEAD_S + speech_seconds(q)
            i = 0
            first: tuple[float, object] | None = None
            while first is None or time.perf_counter() < first[0] + 1.5:
                due = start + i * CHUNK / RATE
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                lo = i * CHUNK
                piece = audio[lo:lo + CHUNK] if lo < audio.size else silence
                if piece.size < CHUNK:
                    piece = np.concatenate((piece, silence[:CHUNK - piece.size]))
                await session.send("vad", RuntimeData.audio(piece, RATE))
                i += 1
                while not arrivals.empty():
                    item = arrivals.get_nowait()
                    if first is None and item[0] > end_of_speech - 0.5:
                        first = item
                if first is None and time.perf_counter() > end_of_speech + 10:
                    raise RuntimeError(f"no reply to {q!r}")
            t_audio = first[0]
            window = end_of_speech - 1.0
            stages["first_audio"].append(t_audio - end_of_speech)
            for key, node_type in (("vad_end", "AudioBufferAccumulatorNode"), ("asr_done", "WhisperNode")):
                t = clock.last_before(node_type, t_audio, window)
                stages[key].append((t - end_of_speech) if t is not None else float("nan"))
            asr_t = clock.last_before("WhisperNode", t_audio, window)
            llm_t = clock.first_after("LlamaCppNode", asr_t) if asr_t is not None else None
            stages["llm_first_phrase"].append((llm_t - end_of_speech) if llm_t is not None else float("nan"))
            replies.append(first[1].metadata.get("text", ""))  # type: ignore[attr-defined]
            print(f"  {q!r}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in stages.items()), flush=True)
            while not arrivals.empty():
                arrivals.get_nowait()
        await session.cancel()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return stages, replies, startup


def _baseline_runs() -> dict[str, list[float]]:
    """The same models, called one after another in one process."""
    from nodes.speech.llm import LlamaCppNode
    from nodes.speech.spoken import question, speech_seconds
    from nodes.speech.tts import PiperTTSNode
    from nodes.speech.vad import SileroVADNode
    from nodes.speech.whisper import WhisperNode

    vad = SileroVADNode("vad", {"min_silence_duration_ms": 320})
    asr, llm, tts = WhisperNode("asr", {}), LlamaCppNode("llm", LLM_PARAMS), PiperTTSNode("tts", {})
    for node in (vad, asr, llm, tts):
        node.initialize()
    out: dict[str, list[float]] = {k: [] for k in ("first_audio", "vad_end", "asr_done", "llm_first_phrase")}

    async def first_phrase(text: str) -> str:
        gen = llm.process(RuntimeData.text(text))
        try:
            async for frame in gen:
                return frame.text  # type: ignore[attr-defined]
        finally:
            await gen.aclose()
        return ""

    for q in QUESTIONS:
        audio = question(q, lead_s=LEAD_S, tail_s=1.5)
        vad._reset()
        speech_end = LEAD_S + speech_seconds(q)
        t_audio, collected, vad_end = 0.0, [], None
        for lo in range(0, audio.size - CHUNK + 1, CHUNK):
            (frame,) = vad.process(RuntimeData.audio(audio[lo:lo + CHUNK], RATE))
            t_audio += CHUNK / RATE
            if frame.metadata.get("vad_speech") == "1" or frame.metadata.get("vad_event"):
                collected.append(frame.samples)
            if frame.metadata.get("vad_event") == "speech_end":
                vad_end = t_audio - speech_end
                break
        assert vad_end is not None, q
        t = time.perf_counter()
        text, _ = asr.transcribe(np.concatenate(collected))
        asr_s = time.perf_counter() - t
        phrase = asyncio.run(first_phrase(text))
        llm_s = time.perf_counter() - t
        tts.synthesize(phrase.split(".")[0] + ".")
        total_s = time.perf_counter() - t
        out["vad_end"].append(vad_end)
        out["asr_done"].append(vad_end + asr_s)
        out["llm_first_phrase"].append(vad_end + llm_s)
        out["first_audio"].append(vad_end + total_s)
    return out


@scenario("voice_loop")
def voice_loop() -> dict:
    import uvloop

    stages, replies, startup = uvloop.run(_pipeline_runs())
    base = _baseline_runs()
    labels = {"first_audio": "first reply audio", "vad_end": "VAD end of turn (commit)",
              "asr_done": "ASR done", "llm_first_phrase": "LLM first phrase"}
    series = {}
    for key in ("first_audio", "vad_end", "asr_done", "llm_first_phrase"):
        series[f"engine: end of speech → {labels[key]}"] = {"values": stages[key], "unit": "s"}
    for key in ("first_audio", "vad_end", "asr_done", "llm_first_phrase"):
        series[f"sequential, one process: end of speech → {labels[key]}"] = {"values": base[key], "unit": "s"}
    p50 = pct(stages["first_audio"], .5)
    return {"series": series,
            "notes": f"{len(QUESTIONS)} questions of 1.9–2.5 s spoken by Piper, streamed in real time; "
                     f"session start-up (4 models, warm-up included) {startup:.2f} s; replies: "
                     + " | ".join(replies[:4]),
            "targets": {"p50 ≤ 500 ms": f"{'met' if p50 <= 0.5 else 'MISSED'} ({p50 * 1e3:.0f} ms; sequential "
                                        f"baseline {pct(base['first_audio'], .5) * 1e3:.0f} ms)"}}
