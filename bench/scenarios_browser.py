"""Talking to the engine from a browser, measured where a person hears it.

`browser_voice` runs the server and Debian's Chromium (Playwright, its fake
microphone playing espeak-ng questions from a WAV) in a network namespace
with only loopback up, the page served by the engine itself. The page
measures on the Web Audio clock: the end of each question's speech (its
microphone level) → the first reply audio heard (an AnalyserNode on the
remote track). In the same run the server reports its own figure for the
same turns (end of speech, from the turn's commit, → the first reply frame
handed to the WebRTC track), so the transport's share is the difference.
Barge-in as heard: the onset of a question spoken over a reply → the reply
silent in the page. Then a connected session's idle cost: the engine's
process tree, 10 s with the microphone open and nobody speaking.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.harness import pct, scenario
from bench.scenarios_speech import QUESTIONS

TESTS = Path(__file__).resolve().parent.parent / "tests"
BARGE = [("Tell me a long story about a dragon.", "What is two plus two?"),
         ("Describe the ocean in great detail.", "Where do penguins live?"),
         ("Tell me everything about the moon.", "What color is grass?"),
         ("Explain how trains work, step by step.", "Name a yellow fruit.")]


def _barge_ins(seen: dict) -> list[float]:
    """Onset of each interrupting question → the reply silent in the page (s)."""
    onsets, silences = seen["onsets"], seen["silences"]
    interrupted = [e["at"] for e in seen["events"] if e["type"] == "interrupted"]
    out = []
    for at in interrupted:  # the onset that caused it: the last one before the event
        onset = max((o for o in onsets if o <= at), default=None)
        quiet = min((q for q in silences if q >= (onset or at)), default=None)
        if onset is not None and quiet is not None:
            out.append(quiet - onset)
    return out


@scenario("browser_voice")
def browser_voice() -> dict:
    sys.path.insert(0, str(TESTS))
    from webrtc_client import in_loopback_netns

    seen = in_loopback_netns("bench", json.dumps(QUESTIONS), json.dumps(BARGE), timeout_s=900)
    turns = list(seen["turns"].values())
    both = [t for t in turns if "heard_ms" in t and "server_ms" in t]
    heard = [t["heard_ms"] / 1000 for t in both]
    server = [t["server_ms"] / 1000 for t in both]
    transport = [h - s for h, s in zip(heard, server, strict=True)]
    barge = _barge_ins(seen)
    h50, h95 = pct(heard, .5), pct(heard, .95)
    t50 = pct(transport, .5)
    b50 = pct(barge, .5) if barge else float("nan")
    idle = seen["idle_core_share"]
    return {
        "series": {
            "page: end of speech → first reply audio heard": {"values": heard, "unit": "s"},
            "server: end of speech → first reply audio sent": {"values": server, "unit": "s"},
            "transport's share (heard − sent)": {"values": transport, "unit": "s"},
            "barge-in as heard: onset → reply silent": {"values": barge, "unit": "s"},
        },
        "derived": {"turns measured": f"{len(both)} of {len(QUESTIONS) + 2 * len(BARGE)} questions",
                    "interruptions heard": len(barge),
                    "idle connected session, engine process tree (share of one core)": round(idle, 4)},
        "targets": {
            "heard p50 ≤ 550 ms": f"{'met' if h50 <= 0.55 else 'MISSED'} ({h50 * 1e3:.0f} ms)",
            "heard p95 ≤ 800 ms": f"{'met' if h95 <= 0.8 else 'MISSED'} ({h95 * 1e3:.0f} ms)",
            "transport adds ≤ 100 ms (p50)": f"{'met' if t50 <= 0.1 else 'MISSED'} ({t50 * 1e3:.0f} ms)",
            "barge-in as heard p50 ≤ 350 ms": f"{'met' if b50 <= 0.35 else 'MISSED'} ({b50 * 1e3:.0f} ms)",
            "idle session ≤ 5 % of a core": f"{'met' if idle <= 0.05 else 'MISSED'} ({idle * 100:.1f} %)",
        },
        "notes": "Chromium (Debian) with a fake microphone in a loopback-only network namespace; espeak-ng "
                 "questions; the page's own measurements (Web Audio clock) and the server's timing events",
    }
