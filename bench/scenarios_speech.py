"""The voice loop: end of the user's speech → first reply audio; barge-in; sessions per machine.

`voice_loop` streams spoken questions (made by the engine's own TTS, with
silence around them and a little noise) in real time, 512 samples every
32 ms, through examples/speech_to_speech.json and measures, per question,
from the end of speech (the last sample above −40 dBFS, on the stream
clock: chunk k is sent at t0 + (k+1)·32 ms) to each stage of the turn it
started: the turn's end (the accumulator's commit), ASR done, the LLM's
first phrase, the first reply audio at the client. Each question waits for
the previous reply to have played out. In the same run a one-process
sequential baseline calls the same four models one after another (a VAD
silence of 320 ms ends the turn), and both report CPU per turn (every
process of the session: the engine's, its node processes'; the baseline's
one process), reply included.

It then measures barge-in (a question spoken over a reply: its onset →
the `interrupted` event, and → the last audio of the old turn, with the
manifest's pacing and without it), and how many concurrent voice sessions
this machine holds at first-audio p50 ≤ 600 ms. A PNG timeline of a few
turns, engine and baseline, is written next to the JSON.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import harness
from bench.harness import pct, scenario
from engine import Engine, RuntimeData
from engine.turns import TurnEvent, turn_of
from nodes.speech.spoken import wer

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
CHUNK_S = CHUNK / RATE
#: each question answered on its own (no conversation history), in every run
LLM_PARAMS = {"history_turns": 0}
STAGES = ("turn_end", "asr_done", "llm_first_phrase", "first_audio")
LABELS = {"turn_end": "turn end", "asr_done": "ASR done", "llm_first_phrase": "first LLM phrase",
          "first_audio": "first reply audio"}
#: a sample above this is speech (−40 dBFS)
LOUD = 0.01


def voice_manifest(**params: dict[str, Any]) -> dict:
    """The example manifest with `LLM_PARAMS`, and node params overridden by node id."""
    doc = json.loads(MANIFEST.read_text())
    for node in doc["nodes"]:
        node["params"].update(params.get(node["id"], {}))
        if node["id"] == "llm":
            node["params"].update(LLM_PARAMS)
    return doc


def make_node(doc: dict, node_id: str, **override: Any) -> Any:
    """The manifest's node `node_id` as a plain object, params normalized as the engine does."""
    from engine.catalog import default_registry

    decl = next(n for n in doc["nodes"] if n["id"] == node_id)
    spec = default_registry().get(decl["node_type"])
    assert spec is not None, decl["node_type"]
    return spec.cls(node_id, spec.normalize_params({**decl["params"], **override}))


@dataclass
class Spoken:
    """A question as a client streams it, and where its speech lies on the stream clock."""

    text: str
    audio: np.ndarray
    onset_s: float  # send time of the chunk with the first loud sample, from the first chunk's start
    end_s: float  # same, of the last loud sample

    @classmethod
    def make(cls, text: str, lead_s: float = LEAD_S, seed: int = 0) -> Spoken:
        from nodes.speech.spoken import spoken

        # the voice as people hear it, not one fixed take
        return cls.from_audio(text, spoken(text, variation=True), lead_s, seed)

    @classmethod
    def from_audio(cls, text: str, speech: np.ndarray, lead_s: float = LEAD_S, seed: int = 0) -> Spoken:
        """`text` as said in `speech` (16 kHz mono float32), streamed after `lead_s` of silence."""
        lead = np.zeros(int(lead_s * RATE), np.float32)
        audio = np.concatenate((lead, speech))
        audio = np.concatenate((audio, np.zeros(-audio.size % CHUNK, np.float32)))
        loud = np.flatnonzero(np.abs(speech) > LOUD) + lead.size
        audio += np.random.default_rng(seed).normal(0, 0.003, audio.size).astype(np.float32)
        return cls(text, audio, (loud[0] // CHUNK + 1) * CHUNK_S, (loud[-1] // CHUNK + 1) * CHUNK_S)


class Trace:
    """Session observer: when each turn event and each node's frame of a turn happened."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Any]] = []
        self.frames: list[tuple[float, str, str, Any]] = []

    def node_output(self, node_type: str, latency_s: float) -> None:
        pass

    def turn_event(self, event: Any) -> None:
        self.events.append((time.perf_counter(), event))

    def node_frame(self, node_id: str, frame: Any) -> None:
        turn = turn_of(frame)
        if turn:
            self.frames.append((time.perf_counter(), node_id, turn, frame))

    def timeline(self, since: float, t_end: float) -> str:
        """What happened after `since`, in ms from `t_end` (for a slow turn)."""
        rows, seen = [], set()
        for at, e in self.events:
            if at >= since:
                rows.append((at, f"{e.source} → {e.kind} {e.turn_id} {dict(e.data) or ''}"))
        for at, node, turn, f in self.frames:
            key = (node, turn, f.metadata.get("phrase_index"))
            if at >= since and key not in seen:
                seen.add(key)
                what = f.text if f.kind.name == "TEXT" else f.kind.name.lower()
                rows.append((at, f"{node} turn {turn}: {what!r}"))
        return "\n".join(f"      {(at - t_end) * 1000:7.0f} ms  {row}" for at, row in sorted(rows))

    def first(self, node_id: str, turn: str) -> tuple[float, Any] | None:
        hits = [(at, f) for at, n, tid, f in self.frames if n == node_id and tid == turn]
        return hits[0] if hits else None


def playout_end(audio: list[tuple[float, Any]]) -> float:
    """When a client that plays each (arrival time, audio frame) as it comes, in order, has played
    them all: a frame that arrives after the previous one ended starts late (an underrun)."""
    end = 0.0
    for t, f in audio:
        end = max(end, t) + f.duration_s
    return end


class VoiceClient:
    """Streams audio into a session on a real-time clock (silence when it has nothing to say)
    and collects what comes back, with arrival times."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.received: list[tuple[float, Any]] = []
        self._silence = np.zeros(CHUNK, np.float32)
        self._next = time.perf_counter()
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> VoiceClient:
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self._next = time.perf_counter()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.session.cancel()
        assert self._reader is not None
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        async for out in self.session:
            self.received.append((time.perf_counter(), out.data))

    async def _chunk(self, piece: np.ndarray) -> float:
        """Send one chunk when its 32 ms have passed; returns the time it was due."""
        self._next += CHUNK_S
        await asyncio.sleep(max(0.0, self._next - time.perf_counter()))
        await self.session.send("vad", RuntimeData.audio(piece, RATE))
        return self._next

    async def say(self, q: Spoken) -> float:
        """Stream `q`; returns the stream-clock time of its first chunk's start."""
        t0 = self._next
        for lo in range(0, q.audio.size, CHUNK):
            await self._chunk(q.audio[lo:lo + CHUNK])
        return t0

    async def silence_for(self, seconds: float) -> None:
        end = self._next + seconds
        while self._next < end:
            await self._chunk(self._silence)

    async def until_reply_played(self, since: float, limit_s: float = 15.0) -> None:
        """Silence until a reply came after `since` and has played out (real time from its first frame)."""
        deadline = time.perf_counter() + limit_s
        while time.perf_counter() < deadline:
            audio = [(t, f) for t, f in self.received if t >= since and f.kind.name == "AUDIO"]
            if audio:
                if time.perf_counter() > max(playout_end(audio), audio[-1][0] + 0.6) + 0.3:
                    return
            await self._chunk(self._silence)
        raise RuntimeError("no reply, or one that never ends")

    def audio_of(self, turn: str) -> list[tuple[float, Any]]:
        return [(t, f) for t, f in self.received if f.kind.name == "AUDIO" and turn_of(f) == turn]


def session_cpu_s(session: Any) -> dict[str, float]:
    """CPU seconds so far of this process ("engine", the bench's client included) and of each of
    the session's node processes."""
    out = {"engine": sum(psutil.Process().cpu_times()[:2])}
    for nid, runner in session.runners.items():
        pid = getattr(runner, "pid", None)
        if pid:
            try:
                out[nid] = sum(psutil.Process(pid).cpu_times()[:2])
            except psutil.NoSuchProcess:
                out[nid] = 0.0
    return out


@dataclass
class TurnResult:
    question: str
    stages: dict[str, float] = field(default_factory=dict)  # seconds after end of speech
    transcript: str = ""
    reply: str = ""
    reply_audio: np.ndarray | None = None
    reply_rate: int = 0
    reply_seconds: float = 0.0
    #: the first reply frame's metadata (asr_ms, llm_first_token_ms, tts_ms, ...)
    first_meta: dict = field(default_factory=dict)


def _turn_result(q: Spoken, t_end: float, trace: Trace, client: VoiceClient) -> TurnResult:
    """The turn that answered `q`: the one of the first reply audio after its end of speech."""
    res = TurnResult(q.text)
    audio = [(t, f) for t, f in client.received if f.kind.name == "AUDIO" and t >= t_end - 0.5]
    if not audio:
        raise RuntimeError(f"no reply audio for {q.text!r}")
    turn = turn_of(audio[0][1])
    audio = client.audio_of(turn)
    commit = [at for at, e in trace.events if e.kind == "commit" and e.turn_id == turn]
    res.stages["turn_end"] = commit[0] - t_end if commit else float("nan")
    for key, node in (("asr_done", "asr"), ("llm_first_phrase", "llm")):
        hit = trace.first(node, turn)
        res.stages[key] = hit[0] - t_end if hit else float("nan")
        if node == "asr" and hit:
            res.transcript = hit[1].text
    res.stages["first_audio"] = audio[0][0] - t_end
    res.reply = " ".join(f.metadata["text"] for _, f in audio if "text" in f.metadata)
    res.reply_audio = np.concatenate([f.samples for _, f in audio])
    res.reply_rate = audio[0][1].sample_rate
    res.first_meta = dict(audio[0][1].metadata)
    return res


async def engine_turns(questions: list[Spoken], manifest: dict, trace: Trace | None = None
                       ) -> tuple[list[TurnResult], dict[str, float], float]:
    """Each question in turn through one session: (results, CPU per turn ("total" and by
    process), session start-up s)."""
    trace = trace or Trace()
    async with Engine(observer=trace) as engine:
        t0 = time.perf_counter()
        session = engine.stream(manifest)
        await session.start()
        startup = time.perf_counter() - t0
        async with VoiceClient(session) as client:
            await client.silence_for(0.3)
            cpu0 = session_cpu_s(session)
            results = []
            for q in questions:
                t_start = await client.say(q)
                t_end = t_start + q.end_s
                await client.until_reply_played(t_end - 0.5)
                results.append(_turn_result(q, t_end, trace, client))
                r = results[-1]
                print(f"  {q.text!r}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r.stages.items()),
                      flush=True)
                if r.stages["first_audio"] > 0.5:
                    print(trace.timeline(t_start, t_end), flush=True)
            cpu1 = session_cpu_s(session)
    cpu = {k: (cpu1[k] - cpu0[k]) / len(questions) for k in cpu0}
    cpu["total"] = sum(cpu.values())
    return results, cpu, startup


# ---------------------------------------------------------------- the baseline


def baseline_turns(questions: list[Spoken], manifest: dict, cycle_s: float = 0.0
                   ) -> tuple[list[TurnResult], dict[str, float]]:
    """The same models in one process, called one after another as a simple voice bot does, on
    the same real-time clock: each 32 ms chunk goes through the VAD and the same accumulator
    (no speculation; 320 ms of silence ends the turn), then ASR, then the LLM streams its reply
    and each phrase is synthesized as it comes, while the audio that arrives meanwhile waits.
    Each question starts `cycle_s` after the previous one, at the earliest.
    Returns (results, CPU per turn: "total" and by stage)."""
    return asyncio.run(_baseline(questions, manifest, cycle_s))


async def _baseline(questions: list[Spoken], manifest: dict, cycle_s: float
                    ) -> tuple[list[TurnResult], dict[str, float]]:
    vad = make_node(manifest, "vad")
    turns = make_node(manifest, "utterances", speculative=False, endpointing_ms=320, barge_in=False)
    asr = make_node(manifest, "asr")
    llm = make_node(manifest, "llm", end_of_turn=False, pause_for_first_audio_ms=0)
    tts = make_node(manifest, "tts", chunk_ms=0, pace_ahead_ms=0)
    for node in (vad, turns, asr, llm, tts):
        node.initialize()
    cpu = dict.fromkeys(("total", "listening", "asr", "llm", "tts"), 0.0)
    results, clock, c_all = [], time.perf_counter(), time.process_time()
    silence = np.zeros(CHUNK, np.float32)
    for q in questions:
        res, t_end, lo, played_out, begun = TurnResult(q.text), clock + q.end_s, 0, None, clock
        while played_out is None or time.perf_counter() < max(played_out + 0.3, begun + cycle_s):
            clock += CHUNK_S
            await asyncio.sleep(max(0.0, clock - time.perf_counter()))
            piece = q.audio[lo:lo + CHUNK] if lo < q.audio.size else silence
            lo += CHUNK
            c0 = time.process_time()
            outs = [o for w in vad.process(RuntimeData.audio(piece, RATE)) for o in turns.process(w)]
            cpu["listening"] += time.process_time() - c0
            utterance = next((o for o in outs if TurnEvent.of(o) is None), None)
            if utterance is not None and played_out is None:
                res.stages["turn_end"] = time.perf_counter() - t_end
                res.reply_seconds = reply_s = await _baseline_reply(asr, llm, tts, utterance, res, t_end, cpu)
                played_out = t_end + res.stages["first_audio"] + reply_s
        results.append(res)
    cpu["total"] = time.process_time() - c_all
    return results, {k: v / len(questions) for k, v in cpu.items()}


async def _baseline_reply(asr: Any, llm: Any, tts: Any, utterance: Any, res: TurnResult, t_end: float,
                          cpu: dict[str, float]) -> float:
    """ASR, then the LLM's phrases each synthesized as it comes; returns the reply's seconds."""
    c0 = time.process_time()
    res.transcript, _ = asr.transcribe(utterance.samples)
    res.stages["asr_done"] = time.perf_counter() - t_end
    cpu["asr"] += time.process_time() - c0
    phrases, seconds = [], 0.0
    c0 = time.process_time()
    async for frame in llm.process(RuntimeData.text(res.transcript)):
        if not frame.text:
            continue
        if not phrases:
            res.stages["llm_first_phrase"] = time.perf_counter() - t_end
        c1 = time.process_time()
        cpu["llm"] += c1 - c0
        seconds += sum(a.size for a in tts.synthesize(frame.text)) / tts.rate
        c0 = time.process_time()
        cpu["tts"] += c0 - c1
        if not phrases:
            res.stages["first_audio"] = time.perf_counter() - t_end
        phrases.append(frame.text)
    cpu["llm"] += time.process_time() - c0
    res.reply = " ".join(phrases)
    return seconds


@contextlib.contextmanager
def own_processes(n: int) -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """`n` fresh processes started with the thread settings the engine gives its node processes
    (see executors.process), so a baseline is not slowed by idle pools spinning."""
    from engine.executors.process import THREAD_VARS

    saved = {v: os.environ.get(v) for v in THREAD_VARS}
    os.environ.update({v: os.environ.get(v) or "1" for v in THREAD_VARS})
    try:
        with concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
    finally:
        for v, value in saved.items():
            if value is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = value


def in_own_process(fn: Any, *args: Any) -> Any:
    """fn(*args) in a fresh process (see own_processes)."""
    with own_processes(1) as pool:
        return pool.submit(fn, *args).result()


# ---------------------------------------------------------------- barge-in


@dataclass
class BargeIn:
    onset_to_event: float
    onset_to_last_old_audio: float
    #: audio of the old turn the client had received but not yet played when the event came:
    #: how long a client that ignores the event would go on talking over the user
    unplayed_at_event: float
    old_audio_after_event: int
    answered: bool


async def barge_ins(questions: list[Spoken], interrupters: list[Spoken], manifest: dict,
                    after_s: list[float]) -> list[BargeIn]:
    """Ask each question, then, `after_s` into its reply, speak the interrupter over it."""
    trace = Trace()
    out = []
    async with Engine(observer=trace) as engine, engine.stream(manifest) as session:
        async with VoiceClient(session) as client:
            await client.silence_for(0.3)
            for q, b, wait in zip(questions, interrupters, after_s, strict=True):
                t_end = (await client.say(q)) + q.end_s
                while not [1 for t, f in client.received if t > t_end - 0.5 and f.kind.name == "AUDIO"]:
                    await client.silence_for(CHUNK_S)
                first_old = next(t for t, f in client.received if t > t_end - 0.5 and f.kind.name == "AUDIO")
                old_turn = turn_of(next(f for t, f in client.received if t == first_old))
                await client.silence_for(max(0.0, first_old + wait - client._next))
                t_b = await client.say(b)
                await client.until_reply_played(t_b + b.end_s - 0.5)
                out.append(_barge_in_result(client, old_turn, t_b + b.onset_s, t_b + b.end_s))
                print(f"  barge-in after {wait:.1f} s: onset → interrupted "
                      f"{out[-1].onset_to_event * 1000:.0f} ms, → last old audio "
                      f"{out[-1].onset_to_last_old_audio * 1000:.0f} ms", flush=True)
    return out


def _barge_in_result(client: VoiceClient, old_turn: str, onset: float, b_end: float) -> BargeIn:
    events = [(t, f) for t, f in client.received if f.kind.name == "JSON"
              and isinstance(f.value, dict) and f.value.get("event") == "interrupted"
              and f.value.get("turn_id") == old_turn]
    if not events:
        raise RuntimeError(f"turn {old_turn} was never interrupted")
    t_event = events[0][0]
    old = client.audio_of(old_turn)
    received = sum(f.duration_s for t, f in old if t <= t_event)
    answered = any(t > b_end - 0.5 and turn_of(f) != old_turn for t, f in client.received
                   if f.kind.name == "AUDIO")
    return BargeIn(t_event - onset, old[-1][0] - onset, max(0.0, received - (t_event - old[0][0])),
                   sum(1 for t, _ in old if t > t_event), answered)


# ---------------------------------------------------------------- sessions per machine


async def concurrent_sessions(n: int, questions: list[Spoken], manifest: dict) -> list[float]:
    """`n` voice sessions at once, each asking `questions` (rotated), their starts spread over
    one question's cycle so that turns begin at an even rate: every first-audio latency."""
    latencies: list[float] = []
    cycle_s = 5.0  # about one question and its reply

    async def one(i: int) -> None:
        trace = Trace()
        async with engine.stream(manifest, observer=trace) as session, VoiceClient(session) as client:
            await client.silence_for(0.3 + cycle_s * i / n)
            for q in questions[i % len(questions):] + questions[:i % len(questions)]:
                t_end = (await client.say(q)) + q.end_s
                await client.until_reply_played(t_end - 0.5, limit_s=30.0)
                latencies.append(_turn_result(q, t_end, trace, client).stages["first_audio"])

    async with Engine() as engine:
        await asyncio.gather(*(one(i) for i in range(n)))
    return latencies


# ---------------------------------------------------------------- the plot


def plot_timeline(engine: list[TurnResult], baseline: list[TurnResult], path: Path, turns: int = 4) -> None:
    """Per-stage marks from end of speech to first audio, engine and baseline, for a few turns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"turn_end": "tab:gray", "asr_done": "tab:blue", "llm_first_phrase": "tab:orange",
              "first_audio": "tab:green"}
    rows = []
    for i in range(min(turns, len(engine), len(baseline))):
        rows += [(f"{engine[i].question[:28]}… engine", engine[i]), ("baseline", baseline[i])]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.6))
    for y, (_, r) in enumerate(rows):
        ax.barh(y, r.stages["first_audio"] * 1000, color="tab:green", alpha=0.18, height=0.6)
        for key in STAGES:
            v = r.stages.get(key, float("nan"))
            if v == v:
                ax.plot(v * 1000, y, "o", color=colors[key], label=LABELS[key] if y == 0 else None)
    ax.axvline(400, color="tab:red", linestyle="--", linewidth=1, label="400 ms target")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms after the end of the user's speech")
    ax.set_title("Voice loop: when each stage of a turn is done")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the scenario


def _series(prefix: str, results: list[TurnResult]) -> dict[str, dict]:
    return {f"{prefix}: end of speech → {LABELS[k]}": {"values": [r.stages[k] for r in results], "unit": "s"}
            for k in STAGES}


def _round_trip_wer(results: list[TurnResult]) -> float:
    """Word error of each reply's audio heard back by ASR against the text it was made from."""
    import soxr

    from nodes.speech.whisper import WhisperNode

    asr = WhisperNode("check", {"window_s": 30, "cpu_threads": 2})
    asr.initialize()
    errors = []
    for r in results:
        if r.reply_audio is not None and r.reply:
            heard, _ = asr.transcribe(soxr.resample(r.reply_audio, r.reply_rate, RATE).astype(np.float32))
            errors.append(wer(r.reply, heard))
    return float(np.mean(errors)) if errors else float("nan")


def _sessions_held(manifest: dict, questions: list[Spoken], series: dict) -> int:
    held = 0
    for n in (1, 2, 3, 4, 5, 6, 8):
        lat = asyncio.run(concurrent_sessions(n, questions, manifest))
        series[f"{n} concurrent sessions: first reply audio"] = {"values": lat, "unit": "s"}
        print(f"  {n} sessions: first audio p50 {pct(lat, .5) * 1000:.0f} ms", flush=True)
        if pct(lat, .5) > 0.6:
            break
        held = n
    return held


def _barge_in_series(label: str, runs: list[BargeIn], series: dict) -> None:
    series[f"barge-in, {label}: onset → interrupted event"] = {
        "values": [b.onset_to_event for b in runs], "unit": "s"}
    series[f"barge-in, {label}: onset → last audio of the old turn"] = {
        "values": [b.onset_to_last_old_audio for b in runs], "unit": "s"}
    series[f"barge-in, {label}: old audio unplayed at the event"] = {
        "values": [b.unplayed_at_event for b in runs], "unit": "s"}


@scenario("voice_loop")
def voice_loop() -> dict:
    import uvloop

    manifest = voice_manifest()
    questions = [Spoken.make(q, seed=i) for i, q in enumerate(QUESTIONS)]
    engine, cpu_e, startup = uvloop.run(engine_turns(questions, manifest))
    base, cpu_b = in_own_process(baseline_turns, questions, manifest)
    cpu_engine, cpu_base = cpu_e["total"], cpu_b["total"]
    series = {**_series("engine", engine), **_series("sequential, one process", base)}
    pairs = list(zip(questions[:6], questions[6:], strict=True))
    barge: dict[str, list[BargeIn]] = {}
    for label, m in (("paced", manifest), ("not paced", voice_manifest(tts={"pace_ahead_ms": 0}))):
        print(f"  barge-in, reply audio {label}:", flush=True)
        barge[label] = uvloop.run(barge_ins([a for a, _ in pairs], [b for _, b in pairs], m,
                                            [0.4 + 0.1 * i for i in range(len(pairs))]))
        _barge_in_series(label, barge[label], series)
    held = _sessions_held(manifest, questions[:3], series)
    plot = harness.folder / "voice_loop.png"
    plot_timeline(engine, base, plot)
    asr_wer = float(np.mean([wer(r.question, r.transcript) for r in engine]))
    trip = _round_trip_wer(engine)
    p50, p95 = pct(series["engine: end of speech → first reply audio"]["values"], .5), \
        pct(series["engine: end of speech → first reply audio"]["values"], .95)
    b50 = pct([b.onset_to_event for b in barge["paced"]], .5)
    late = sum(b.old_audio_after_event for runs in barge.values() for b in runs)
    return {
        "own_plot": True,  # voice_loop.png, the stage timeline above
        "series": series,
        "derived": {"CPU per turn, engine (s)": cpu_engine, "CPU per turn, sequential (s)": cpu_base,
                    "CPU ratio engine / sequential": cpu_engine / cpu_base,
                    "CPU per turn, engine, by process (s)": {k: round(v, 3) for k, v in cpu_e.items()},
                    "CPU per turn, sequential, by stage (s)": {k: round(v, 3) for k, v in cpu_b.items()},
                    "reply audio per turn, engine / sequential (s)": [
                        round(float(np.mean([r.reply_audio.size / r.reply_rate for r in engine])), 2),
                        round(float(np.mean([r.reply_seconds for r in base])), 2)],
                    "transcript word error rate": asr_wer, "reply round-trip word error rate": trip,
                    "concurrent sessions at first-audio p50 ≤ 600 ms": held,
                    "session start-up (s)": startup},
        "targets": {
            "first audio p50 ≤ 400 ms": f"{'met' if p50 <= 0.4 else 'MISSED'} ({p50 * 1e3:.0f} ms; sequential "
                                        f"{pct([r.stages['first_audio'] for r in base], .5) * 1e3:.0f} ms)",
            "first audio p95 ≤ 600 ms": f"{'met' if p95 <= 0.6 else 'MISSED'} ({p95 * 1e3:.0f} ms)",
            "CPU per turn ≤ 1.2× sequential": f"{'met' if cpu_engine <= 1.2 * cpu_base else 'MISSED'} "
                                              f"({cpu_engine:.2f} s vs {cpu_base:.2f} s)",
            "transcript WER < 0.15": f"{'met' if asr_wer < 0.15 else 'MISSED'} ({asr_wer:.3f})",
            "barge-in: interrupted p50 ≤ 300 ms": f"{'met' if b50 <= 0.3 else 'MISSED'} ({b50 * 1e3:.0f} ms)",
            "barge-in: no old audio after the event": f"{'met' if late == 0 else 'MISSED'} ({late} frames)",
            "barge-in: the new question answered": f"{sum(b.answered for r in barge.values() for b in r)} of "
                                                   f"{sum(len(r) for r in barge.values())}",
        },
        "notes": f"{len(QUESTIONS)} questions spoken by Piper, streamed in real time, each after the previous "
                 f"reply played out; timeline plot {plot.name}; replies: "
                 + " | ".join(f"{r.question} → {r.reply}" for r in engine[:4]),
    }
