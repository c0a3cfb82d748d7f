"""The voice loop on voices and questions it was never tuned on, and many conversations at once.

`voice_matrix` streams every cell of bench.matrix (24 questions × 5 voices,
half in noise) in real time over gRPC to a `remotemedia-engine serve`
process, one conversation per voice, each question after the previous
reply has played out, and scores each turn: end of speech → first reply
audio; the transcript the reply answers against the sequential baseline's
(Whisper on the whole utterance, as a loop that waits for 320 ms of
silence hears it); a question answered in two turns (ended at a comma or
a pause); a reply to a cut-off question; an `interrupted` nobody caused.
Also: a question followed by 0.3–2 s of silence and then the end of the
stream (a client sending a file) is answered; the sequential loop's
latency and CPU per turn on one voice; the engine's CPU while a connected
caller says nothing; session start, cold and from prewarmed processes.

`voice_density` holds N conversations at once (N = 1, 2, 4, 6, 8, 10),
each asking a matrix question every ~9 s, staggered, over gRPC; and in the
same run N copies of the sequential loop in N processes on the same
schedule. Per N: first-audio p50/p95, failed and wrong-transcript turns,
the server's CPU and PSS; the largest N within p50 ≤ 600 ms, p95 ≤ 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import harness
from bench.harness import pct, scenario
from bench.matrix import CHUNK, CHUNK_S, RATE, VOICES, Cell, cells
from bench.scenarios_server import Served, served
from bench.scenarios_speech import (
    baseline_turns,
    in_own_process,
    make_node,
    own_processes,
    voice_manifest,
)
from nodes.speech.spoken import wer, words

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from voice_call import VoiceCall  # noqa: E402  (the tests' gRPC voice client)

CYCLE_S = 9.0
#: a quiet room's noise under a microphone (−50 dBFS RMS)
ROOM_RMS = 10 ** (-50 / 20)


def prewarm_toml(manifest: dict, folder: str) -> str:
    """runtime.toml lines that keep `manifest`'s node processes initialized ahead (it is written
    to `folder`)."""
    path = Path(folder) / "prewarm.json"
    path.write_text(json.dumps(manifest))
    return f'prewarm_manifest = "{path}"\n'


# ---------------------------------------------------------------- one turn over gRPC


@dataclass
class Turn:
    cell: Cell
    first_audio_s: float = float("nan")  # end of speech → first reply audio; nan: no reply
    transcript: str = ""  # the user's words the reply answers
    replies: int = 0  # turns answered for this one question (2: it was split)
    interrupted: int = 0  # `interrupted` events while nobody spoke over a reply
    whole: str = ""  # the sequential baseline's transcript of the same audio

    @property
    def answered(self) -> bool:
        return bool(self.first_audio_s == self.first_audio_s)

    @property
    def worse_than_whole(self) -> bool:
        q = self.cell.question.text
        return wer(q, self.transcript) > wer(q, self.whole) + 1e-9

    @property
    def wrong(self) -> bool:
        """Answered from words worse than the whole utterance's by more than one word."""
        q = self.cell.question.text
        return (wer(q, self.transcript) - wer(q, self.whole)) * len(words(q)) > 1.01

    @property
    def truncated(self) -> bool:
        """Answered from fewer words than the whole utterance holds, and worse for it."""
        return self.answered and self.worse_than_whole and len(words(self.transcript)) < len(words(self.whole))


async def ask(call: VoiceCall, cell: Cell, limit_s: float = 20.0) -> Turn:
    """Say `cell`'s question, stream silence until its reply has played out; score the turn."""
    turn = Turn(cell)
    t_start = await call.say(cell.spoken.audio)
    t_end = t_start + cell.spoken.end_s
    try:
        await call.silence_until(lambda: call.played_out(t_end), "a reply", limit_s)
    except AssertionError:
        return turn
    audio = call.audio(after=t_end - 0.5)
    turn.first_audio_s = audio[0][0] - t_end
    turn.transcript = audio[0][1].metadata.get("transcript", "")
    turn.replies = len(call.turns(after=t_start))
    turn.interrupted = sum(1 for t, e in call.events() if t >= t_start and e.get("event") == "interrupted")
    return turn


class Gate:
    """Holds conversations (streaming silence) until all `n` are ready, then calls `opened`."""

    def __init__(self, n: int, opened: Any = None) -> None:
        self.n, self.opened, self.event = n, opened, asyncio.Event()

    async def wait(self, call: VoiceCall) -> None:
        self.n -= 1
        if self.n == 0:
            if self.opened is not None:
                self.opened()
            self.event.set()
        while not self.event.is_set():
            await call.silence(CHUNK_S)


async def conversation(address: str, manifest: dict, todo: list[Cell], delay_s: float = 0.0,
                       cycle_s: float = 0.0, gate: Gate | None = None, cpu: Any = None
                       ) -> tuple[list[Turn], float, float]:
    """One conversation over gRPC asking `todo` in turn (each `cycle_s` after the last, at
    least; after `gate` opens and `delay_s`); (turns, seconds from the call to `ready`, what
    `cpu()` grew by from before the first question to after the last reply)."""
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        t0 = time.perf_counter()
        async with VoiceCall(channel, manifest) as call:
            start_s = time.perf_counter() - t0
            if gate is not None:
                await gate.wait(call)
            await call.silence(0.3 + delay_s)
            cpu0 = cpu() if cpu else 0.0
            turns = []
            for cell in todo:
                begun = call._next
                turns.append(await ask(call, cell))
                await call.silence(max(0.0, begun + cycle_s - call._next))
            used = cpu() - cpu0 if cpu else 0.0
            await call.close()
    return turns, start_s, used


class TreeCpu:
    """CPU seconds of the server's process tree, processes that have exited included (sampled
    every 0.25 s while `sample()` runs: each process counts with its last reading)."""

    def __init__(self, s: Served) -> None:
        self.pid, self.last = s.pid, {}

    def read(self) -> float:
        for p in [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                self.last[p.pid] = t.user + t.system
        return sum(self.last.values())

    async def sample(self) -> None:
        while True:
            self.read()
            await asyncio.sleep(0.25)


def tree_pss_mb(s: Served) -> float:
    total = 0
    for p in [psutil.Process(s.pid), *psutil.Process(s.pid).children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total / 2**20


# ---------------------------------------------------------------- the sequential baseline's transcripts


def whole_transcripts(todo: list[Cell], manifest: dict) -> list[str]:
    """What the sequential loop hears: VAD, 320 ms of silence ends the turn, Whisper on the whole
    utterance (not in real time: the words do not depend on the clock)."""
    from engine.data import RuntimeData
    from engine.turns import TurnEvent

    asr = make_node(manifest, "asr")
    asr.initialize()
    out = []
    for c in todo:
        vad = make_node(manifest, "vad")
        vad.initialize()
        acc = make_node(manifest, "utterances", speculative=False, endpointing_ms=320, barge_in=False)
        a = c.spoken.audio
        frames = [o for lo in range(0, a.size, CHUNK) for w in vad.process(RuntimeData.audio(a[lo:lo + CHUNK], RATE))
                  for o in acc.process(w)] + acc.flush()
        out.append(" ".join(asr.transcribe(f.samples)[0] for f in frames if TurnEvent.of(f) is None))
    return out


# ---------------------------------------------------------------- voice_matrix


async def _idle_cpu(address: str, manifest: dict, seconds: float, s: Served, room_rms: float = 0.0) -> float:
    """Share of a core the server's process tree uses while a connected caller says nothing (in a
    room with `room_rms` of noise; 0: digital silence)."""
    import grpc

    async with grpc.aio.insecure_channel(address) as channel, VoiceCall(channel, manifest, room_rms) as call:
        await call.silence(6.0)  # the pool replaces the processes this session took
        cpu = TreeCpu(s)
        c0, t0 = cpu.read(), time.perf_counter()
        await call.silence(seconds)
        share = (cpu.read() - c0) / (time.perf_counter() - t0)
        await call.close()
    return share


async def _ended_streams(address: str, manifest: dict, todo: list[Cell]) -> list[float]:
    """Each cell in its own call: the question, its trailing silence, then the end of the input
    stream; seconds from end of speech to the first reply audio (nan: never answered)."""
    import grpc

    out = []
    async with grpc.aio.insecure_channel(address) as channel:
        for cell in todo:
            async with VoiceCall(channel, manifest) as call:
                await call.silence(0.3)
                t_end = await call.say(cell.spoken.audio) + cell.spoken.end_s
                await call.close()
                audio = call.audio(after=t_end - 0.5)
                out.append(audio[0][0] - t_end if audio else float("nan"))
    return out


def _per_voice(turns: list[Turn], series: dict) -> None:
    for v in VOICES:
        series[f"first audio, {v.name}"] = {
            "values": [t.first_audio_s for t in turns if t.cell.voice is v and t.answered], "unit": "s"}


@scenario("voice_matrix")
def voice_matrix() -> dict:
    import uvloop

    manifest = voice_manifest()
    per_voice = int(os.environ.get("BENCH_MATRIX_QUESTIONS", "0")) or None  # fewer, for a quick look
    todo = [c for v in VOICES for c in [c for c in cells() if c.voice is v][:per_voice]]
    wholes = whole_transcripts(todo, manifest)
    turns: list[Turn] = []
    cpu_turn: list[float] = []
    starts: dict[str, list[float]] = {"cold": [], "prewarmed": []}
    with tempfile.TemporaryDirectory() as tmp, served(extra_toml=prewarm_toml(manifest, tmp)) as s:
        for voice in VOICES:
            mine = [c for c in todo if c.voice is voice]
            # 3 s before the first question: the pool replaces the processes this session took
            got, start_s, used = uvloop.run(conversation(s.address, manifest, mine, 3.0, cpu=TreeCpu(s).read))
            cpu_turn.append(used / len(got))
            starts["prewarmed"].append(start_s)
            turns += got
            print(f"  {voice.name}: first audio p50 "
                  f"{pct([t.first_audio_s for t in got if t.answered], .5) * 1000:.0f} ms", flush=True)
        idle = uvloop.run(_idle_cpu(s.address, manifest, 10.0, s))
        idle_room = uvloop.run(_idle_cpu(s.address, manifest, 10.0, s, room_rms=ROOM_RMS))
        ended_cells = [c for c in todo if c.voice is VOICES[0]][:len(set(x.trailing_s for x in todo))]
        ended = uvloop.run(_ended_streams(s.address, manifest, ended_cells))
    with served() as s:
        for _ in range(3):
            _, start_s, _ = uvloop.run(conversation(s.address, manifest, []))
            starts["cold"].append(start_s)
    whole_of = dict(zip((id(c) for c in todo), wholes, strict=True))
    for t in turns:
        t.whole = whole_of[id(t.cell)]
    one_voice = [c.spoken for c in todo if c.voice is VOICES[0]]
    base, cpu_b = in_own_process(baseline_turns, one_voice, manifest)
    series: dict[str, dict] = {
        "engine: end of speech → first reply audio": {
            "values": [t.first_audio_s for t in turns if t.answered], "unit": "s"},
        "engine, not the bot's voice": {
            "values": [t.first_audio_s for t in turns if t.answered and not t.cell.voice.bots_own], "unit": "s"},
        f"sequential, {VOICES[0].name}": {"values": [r.stages["first_audio"] for r in base], "unit": "s"},
        "session start, prewarmed": {"values": starts["prewarmed"], "unit": "s"},
        "session start, cold": {"values": starts["cold"], "unit": "s"},
        "stream ended after the question: first audio": {"values": [x for x in ended if x == x], "unit": "s"},
    }
    _per_voice(turns, series)
    lat = series["engine: end of speech → first reply audio"]["values"]
    p50, p95 = pct(lat, .5), pct(lat, .95)
    wer_engine = float(np.mean([wer(t.cell.question.text, t.transcript) for t in turns]))
    wer_whole = float(np.mean([wer(t.cell.question.text, t.whole) for t in turns]))
    split = sum(t.replies > 1 for t in turns)
    trunc = sum(t.truncated for t in turns)
    false_int = sum(t.interrupted for t in turns)
    unanswered = sum(not t.answered for t in turns)
    cpu_engine = float(np.mean(cpu_turn))
    cpu_base = cpu_b["total"]
    plot = harness.folder / "voice_matrix.png"
    plot_matrix(turns, plot)
    return {
        "own_plot": True,
        "series": series,
        "derived": {
            "turns": len(turns), "unanswered": unanswered,
            "transcript WER, engine (answered words)": wer_engine,
            "transcript WER, sequential (whole utterance)": wer_whole,
            "WER by voice, engine / sequential": {
                v.name: [round(float(np.mean([wer(t.cell.question.text, t.transcript)
                                              for t in turns if t.cell.voice is v])), 3),
                         round(float(np.mean([wer(t.cell.question.text, t.whole)
                                              for t in turns if t.cell.voice is v])), 3)] for v in VOICES},
            "slow (> 650 ms), split, cut-off or interrupted turns": [
                f"{t.first_audio_s * 1e3:.0f} ms {t.cell.label} → {t.transcript!r} (whole: {t.whole!r})"
                f"{' SPLIT' if t.replies > 1 else ''}{' CUT' if t.truncated else ''}"
                f"{' INTERRUPTED' if t.interrupted else ''}"
                for t in turns if not t.first_audio_s <= 0.65 or t.replies > 1 or t.truncated or t.interrupted],
            "questions answered in two turns (a comma or pause ended one)": split,
            "replies to a cut-off question": trunc,
            "interrupted with nobody speaking": false_int,
            "answered after the stream ended 0.3-2 s after the question": f"{sum(x == x for x in ended)} of {len(ended)}",
            "CPU per turn, engine tree (s)": cpu_engine,
            f"CPU per turn, sequential, {VOICES[0].name} (s)": cpu_base,
            "idle while listening, engine tree (share of a core)": idle,
            "idle while listening in a room's noise (−50 dBFS), engine tree": idle_room,
        },
        "targets": {
            "first audio p50 ≤ 400 ms": f"{'met' if p50 <= 0.4 else 'MISSED'} ({p50 * 1e3:.0f} ms)",
            "first audio p95 ≤ 650 ms": f"{'met' if p95 <= 0.65 else 'MISSED'} ({p95 * 1e3:.0f} ms)",
            "WER ≤ sequential's": f"{'met' if wer_engine <= wer_whole + 1e-9 else 'MISSED'} "
                                  f"({wer_engine:.3f} vs {wer_whole:.3f})",
            "no reply to a cut-off question": f"{'met' if trunc == 0 else 'MISSED'} ({trunc})",
            "no turn ended at a comma or pause": f"{'met' if split == 0 else 'MISSED'} ({split})",
            "no interrupted for a finished reply": f"{'met' if false_int == 0 else 'MISSED'} ({false_int})",
            "idle ≤ 2.5 % of a core": f"{'met' if max(idle, idle_room) <= 0.025 else 'MISSED'} "
                                      f"({idle * 100:.1f} % digital silence, {idle_room * 100:.1f} % room noise)",
            "CPU per turn ≤ 1.1× sequential": f"{'met' if cpu_engine <= 1.1 * cpu_base else 'MISSED'} "
                                              f"({cpu_engine:.2f} s vs {cpu_base:.2f} s)",
            "session start ≤ 300 ms, prewarmed": f"{'met' if pct(starts['prewarmed'], .5) <= 0.3 else 'MISSED'} "
                                                 f"(p50 {pct(starts['prewarmed'], .5) * 1e3:.0f} ms; cold "
                                                 f"{pct(starts['cold'], .5) * 1e3:.0f} ms)",
        },
        "notes": f"{len(turns)} turns, plot {plot.name}; worst: " + " | ".join(
            f"{t.cell.label} → {t.transcript!r} (whole: {t.whole!r})" for t in turns if t.worse_than_whole)[:3000],
    }


def plot_matrix(turns: list[Turn], path: Path) -> None:
    """First-audio latency per voice (box), with the p50/p95 targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [[t.first_audio_s * 1000 for t in turns if t.cell.voice is v and t.answered] for v in VOICES]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.boxplot(data, vert=False, whis=(5, 95), showfliers=True)
    ax.set_yticks(range(1, len(VOICES) + 1), [v.name for v in VOICES], fontsize=8)
    ax.axvline(400, color="tab:green", linestyle="--", linewidth=1, label="p50 target 400 ms")
    ax.axvline(650, color="tab:red", linestyle="--", linewidth=1, label="p95 target 650 ms")
    ax.set_xlabel("end of speech → first reply audio (ms), over gRPC")
    ax.set_title("Voice matrix: first reply audio per voice (half of each voice's questions in noise)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- voice_density


@dataclass
class Level:
    n: int
    engine: list[Turn] = field(default_factory=list)
    sequential: list[float] = field(default_factory=list)
    cpu_share: float = 0.0  # the server's process tree, share of a core
    pss_mb: float = 0.0

    def ok(self, lat: list[float], failed: int) -> bool:
        return bool(lat) and failed == 0 and pct(lat, .5) <= 0.6 and pct(lat, .95) <= 1.0

    @property
    def engine_lat(self) -> list[float]:
        return [t.first_audio_s for t in self.engine if t.answered]

    @property
    def engine_failed(self) -> int:
        """Turns not answered, answered in two, or answered from words more than one word worse than
        the whole utterance's (Whisper's words vary a little with the audio around them)."""
        return sum(not t.answered or t.replies > 1 or t.wrong for t in self.engine)


def _sequential_copy(args: tuple[list, dict, float, int]) -> list[float]:
    todo, manifest, delay, cycle = args
    time.sleep(delay)
    results, _ = baseline_turns(todo, manifest, cycle_s=cycle)
    return [r.stages.get("first_audio", float("nan")) for r in results]


def _sequential_level(n: int, todo: list[list], manifest: dict) -> list[float]:
    with own_processes(n) as pool:
        jobs = [pool.submit(_sequential_copy, (todo[i], manifest, CYCLE_S * i / n, CYCLE_S)) for i in range(n)]
        return [x for j in jobs for x in j.result()]


@scenario("voice_density")
def voice_density() -> dict:
    import uvloop

    manifest = voice_manifest()
    todo = [c for c in cells() if not c.voice.bots_own]
    wholes = dict(zip((id(c) for c in todo), whole_transcripts(todo, manifest), strict=True))
    per_call = 4  # questions each conversation asks at every N
    levels: list[Level] = []
    limit = int(os.environ.get("BENCH_DENSITY_MAX", "10"))
    for n in (1, 2, 4, 6, 8, 10, 12):
        if n > limit:
            break
        mine = [[todo[(i * per_call + k * 7) % len(todo)] for k in range(per_call)] for i in range(n)]
        level = Level(n)
        with served() as s:
            mark: list[float] = []
            cpu = TreeCpu(s)

            def opened(s: Served = s, level: Level = level, mark: list = mark, cpu: TreeCpu = cpu) -> None:
                level.pss_mb = tree_pss_mb(s)  # every session started, none has spoken yet
                mark += [cpu.read(), time.perf_counter()]

            async def everyone(s: Served = s, mine: list = mine, n: int = n, opened: Any = opened,
                               cpu: TreeCpu = cpu) -> list:
                gate = Gate(n, opened)
                sampler = asyncio.get_running_loop().create_task(cpu.sample())
                try:
                    return await asyncio.gather(*(conversation(s.address, manifest, mine[i], CYCLE_S * i / n,
                                                               CYCLE_S, gate) for i in range(n)))
                finally:
                    sampler.cancel()

            for turns, _, _ in uvloop.run(everyone()):
                level.engine += turns
            level.cpu_share = (cpu.read() - mark[0]) / (time.perf_counter() - mark[1])
        for t in level.engine:
            t.whole = wholes[id(t.cell)]
        level.sequential = _sequential_level(n, [[c.spoken for c in m] for m in mine], manifest)
        levels.append(level)
        lat = level.engine_lat
        print(f"  N={n}: engine p50 {pct(lat, .5) * 1e3:.0f} p95 {pct(lat, .95) * 1e3:.0f} ms, "
              f"failed {level.engine_failed}; sequential p50 {pct(level.sequential, .5) * 1e3:.0f} ms; "
              f"CPU {level.cpu_share * 100:.0f} %, PSS {level.pss_mb:.0f} MB", flush=True)
        if pct(lat, .5) > 1.5:  # saturated: more conversations only wait longer
            break
    held = max((lv.n for lv in levels if lv.ok(lv.engine_lat, lv.engine_failed)), default=0)
    held_seq = max((lv.n for lv in levels if lv.ok([x for x in lv.sequential if x == x],
                                                     sum(x != x for x in lv.sequential))), default=0)
    series: dict[str, dict] = {}
    for lv in levels:
        series[f"N={lv.n}, engine: first audio"] = {"values": lv.engine_lat, "unit": "s"}
        series[f"N={lv.n}, sequential copies: first audio"] = {
            "values": [x for x in lv.sequential if x == x], "unit": "s"}
    plot = harness.folder / "voice_density.png"
    plot_density(levels, plot)
    pss_added = [(b.pss_mb - a.pss_mb) / (b.n - a.n) for a, b in zip(levels, levels[1:], strict=False)]
    return {
        "own_plot": True,
        "series": series,
        "derived": {
            "per N: engine failed or wrong turns": {lv.n: lv.engine_failed for lv in levels},
            "failed or wrong turns": [f"N={lv.n}: {t.cell.label} → {t.transcript!r} (whole: {t.whole!r})"
                                      f"{' SPLIT' if t.replies > 1 else ''}{'' if t.answered else ' UNANSWERED'}"
                                      for lv in levels for t in lv.engine
                                      if not t.answered or t.replies > 1 or t.wrong],
            "per N: sequential unanswered": {lv.n: int(sum(x != x for x in lv.sequential)) for lv in levels},
            "per N: server CPU (share of a core)": {lv.n: round(lv.cpu_share, 2) for lv in levels},
            "per N: server PSS (MB)": {lv.n: round(lv.pss_mb) for lv in levels},
            "PSS added per session (MB)": [round(x) for x in pss_added],
            "largest N, engine": held, "largest N, sequential copies": held_seq,
        },
        "targets": {
            "largest N at p50 ≤ 600 ms, p95 ≤ 1 s, no failed turn ≥ 8":
                f"{'met' if held >= 8 else 'MISSED'} (engine {held}, sequential copies {held_seq})",
            "PSS per extra session ≤ 300 MB": f"{'met' if pss_added and max(pss_added) <= 300 else 'MISSED'} "
                                              f"({', '.join(f'{x:.0f}' for x in pss_added)} MB)",
        },
        "notes": f"each conversation asks {per_call} matrix questions (espeak voices), one every "
                 f"{CYCLE_S:g} s, starts staggered over a cycle; plot {plot.name}",
    }


def plot_density(levels: list[Level], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [lv.n for lv in levels]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, get, color in (("engine", lambda lv: lv.engine_lat, "tab:blue"),
                              ("sequential copies", lambda lv: [x for x in lv.sequential if x == x], "tab:gray")):
        ax.plot(ns, [pct(get(lv), .5) * 1000 for lv in levels], "o-", color=color, label=f"{label} p50")
        ax.plot(ns, [pct(get(lv), .95) * 1000 for lv in levels], "s--", color=color, label=f"{label} p95")
    ax.axhline(600, color="tab:green", linewidth=1, linestyle=":", label="p50 bound 600 ms")
    ax.axhline(1000, color="tab:red", linewidth=1, linestyle=":", label="p95 bound 1 s")
    ax.set_xlabel("conversations at once")
    ax.set_ylabel("end of speech → first reply audio (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax2.bar([n - 0.3 for n in ns], [lv.cpu_share * 100 for lv in levels], width=0.6, color="tab:orange")
    ax2.set_ylabel("server CPU (% of a core)", color="tab:orange")
    ax3 = ax2.twinx()
    ax3.plot(ns, [lv.pss_mb for lv in levels], "o-", color="tab:purple")
    ax3.set_ylabel("server PSS (MB)", color="tab:purple")
    ax2.set_xlabel("conversations at once")
    fig.suptitle("Voice density: latency, CPU and memory per number of conversations (2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- voice_load


@contextlib.contextmanager
def burning_one_core() -> Any:
    """A process that keeps one core busy (a build, another service) while the block runs."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@scenario("voice_load")
def voice_load() -> dict:
    """One conversation, quiet and then with another process burning one of the two cores:
    first-audio latency and CPU per turn, each in the same run."""
    import uvloop

    manifest = voice_manifest()
    todo = [c for c in cells() if c.voice is VOICES[0]][:12]
    out: dict[str, tuple[list[Turn], float]] = {}
    with tempfile.TemporaryDirectory() as tmp, served(extra_toml=prewarm_toml(manifest, tmp)) as s:
        for label in ("quiet", "one core taken", "quiet again"):
            with burning_one_core() if label == "one core taken" else contextlib.nullcontext():
                turns, _, used = uvloop.run(conversation(s.address, manifest, todo, 3.0, cpu=TreeCpu(s).read))
            out[label] = (turns, used / len(turns))
            print(f"  {label}: p50 {pct([t.first_audio_s for t in turns if t.answered], .5) * 1e3:.0f} ms, "
                  f"CPU per turn {used / len(turns):.2f} s", flush=True)
    series = {f"{label}: first audio": {"values": [t.first_audio_s for t in turns if t.answered], "unit": "s"}
              for label, (turns, _) in out.items()}
    quiet = pct(series["quiet: first audio"]["values"] + series["quiet again: first audio"]["values"], .5)
    loaded = pct(series["one core taken: first audio"]["values"], .5)
    cpu_quiet = (out["quiet"][1] + out["quiet again"][1]) / 2
    cpu_loaded = out["one core taken"][1]
    return {
        "series": series,
        "derived": {"CPU per turn (s)": {k: round(v, 3) for k, (_, v) in out.items()},
                    "p50 ratio, one core taken / quiet": loaded / quiet},
        "targets": {
            "p50 with one core taken ≤ 1.5× quiet": f"{'met' if loaded <= 1.5 * quiet else 'MISSED'} "
                                                   f"({loaded * 1e3:.0f} vs {quiet * 1e3:.0f} ms)",
            "CPU per turn grows ≤ 20 %": f"{'met' if cpu_loaded <= 1.2 * cpu_quiet else 'MISSED'} "
                                         f"({cpu_loaded:.2f} vs {cpu_quiet:.2f} s)",
        },
        "notes": f"{len(todo)} matrix questions ({VOICES[0].name}), one conversation over gRPC, "
                 "three passes: quiet, a `while True` process running, quiet again",
    }
