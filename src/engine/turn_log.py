"""TurnLog: one summary of each turn of a session, said once the turn is over.

A voice session works in turns (see engine.turns). The session shows its
TurnLog every turn event it delivers and every frame of a turn (metadata
`turn_id`) that a node emits; from them it keeps, per turn:

- the transcript: the `transcript` metadata a reply carries, else the
  turn's first text frame (the recognizer's);
- the end-of-turn probability (the `eou` event, or the commit's own);
- how it ended: `commit`, or `cancel` and the reason the event gives;
- the first audio: from the end of the user's speech (the commit's time
  less its `silence_ms`: when the pause began, a few tens of ms after the
  last sound) to the turn's first audio frame out of the session after its
  commit (the reply: a TTS holds a turn's audio until its commit);
- whether the reply was interrupted, and how much of it had played (the
  TTS's `played` event).

A turn is over when it is cancelled, when its reply is interrupted, when its
reply has played out (real time from its first audio, as the TTS reckons
playback, plus `SETTLE_S` without more of it), when a later turn is
committed, `NO_REPLY_S` after its commit if no reply audio came, or with the
session. It is then logged, one INFO line through the session's logger
(session id in the record, the fields as extras: JSON logs carry them), and
handed to the observer's `turn_ended` (the server's turn latency histogram).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .data import DataKind, RuntimeData
from .turns import TurnEvent

#: a reply with nothing more for this long after it played out is over
SETTLE_S = 2.0
#: a committed turn whose reply has not begun this long after the commit is over without one
NO_REPLY_S = 30.0
#: turns followed at once (a session has one or two under way)
_KEEP = 64


@dataclass(frozen=True, slots=True)
class TurnReport:
    """A turn as it ended."""

    turn_id: str
    outcome: str  # "commit", "cancel", or "open" (the session ended before either)
    reason: str  # why it was cancelled ("speech resumed", ...)
    transcript: str
    eou_probability: float | None
    #: end of the user's speech → the reply's first audio out of the session (None: no reply)
    first_audio_ms: float | None
    #: the reply's audio sent out
    reply_audio_ms: float
    interrupted: bool
    #: of an interrupted reply, what had been played
    played_ms: float | None

    def fields(self) -> dict[str, Any]:
        """The report as log record extras (JSON logs carry them as fields)."""
        return {"turn_id": self.turn_id, "outcome": self.outcome, "reason": self.reason,
                "transcript": self.transcript, "eou_probability": self.eou_probability,
                "first_audio_ms": self.first_audio_ms, "reply_audio_ms": self.reply_audio_ms,
                "interrupted": self.interrupted, "played_ms": self.played_ms}

    def line(self) -> str:
        said = f"{self.transcript!r}" if self.transcript else "(no transcript)"
        if self.outcome == "cancel":
            return f"turn {self.turn_id} cancelled ({self.reason or 'no reason given'}): {said}"
        eou = "-" if self.eou_probability is None else f"{self.eou_probability:.4g}"
        head = (f"turn {self.turn_id} {'committed' if self.outcome == 'commit' else 'unfinished'}: {said}, "
                f"end-of-turn probability {eou}")
        if self.first_audio_ms is None:
            return f"{head}; no reply audio"
        sent = self.reply_audio_ms / 1000
        if self.interrupted:
            played = "?" if self.played_ms is None else f"{self.played_ms / 1000:.1f}"
            end = f"interrupted after {played} s of {sent:.1f} s sent"
        else:
            end = f"reply of {sent:.1f} s, not interrupted"
        return f"{head}; first audio {self.first_audio_ms:.0f} ms after the end of speech; {end}"


@dataclass(slots=True)
class _Turn:
    transcript: str = ""
    eou: float | None = None
    outcome: str = "open"
    reason: str = ""
    committed_at: float | None = None  # perf_counter
    speech_end: float | None = None
    first_audio: float | None = None
    audio_s: float = 0.0
    interrupted: bool = False
    played_ms: float | None = None
    evented: bool = False  # a turn event came for it: a turn of the voice loop, worth a line
    timer: asyncio.TimerHandle | None = None


class TurnLog:
    """The turns of one session (see the module's text); fed by the session on its loop."""

    def __init__(self, log: logging.LoggerAdapter, on_end: Callable[[TurnReport], Any] | None = None) -> None:
        self._log = log
        self._on_end = on_end
        self._turns: collections.OrderedDict[str, _Turn] = collections.OrderedDict()
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()

    # ------------------------------------------------------------ input

    def frame(self, turn_id: str, frame: Any, sink: bool) -> None:
        """A frame of `turn_id` emitted by a node (`sink`: it leaves the session).
        `frame` may still be encoded (codec.Encoded: kind and metadata read, payload not)."""
        t = self._turn(turn_id)
        if t is None:
            return
        transcript = frame.metadata.get("transcript")
        if transcript:
            t.transcript = transcript
        elif not t.transcript and frame.kind is DataKind.TEXT:
            t.transcript = _text(frame).strip()
        if sink and frame.kind is DataKind.AUDIO and t.outcome == "commit":
            first = t.first_audio is None
            if first:
                t.first_audio = time.perf_counter()
            t.audio_s += getattr(frame, "duration_s", 0.0)
            self._arm(turn_id, t, again=first)  # the first audio brings the check forward

    def event(self, event: TurnEvent) -> None:
        t = self._turn(event.turn_id) if event.turn_id else None
        if t is None:
            return
        t.evented = True
        kind, data = event.kind, event.data
        if kind == "eou":
            t.eou = _number(data.get("probability"), t.eou)
        elif kind == "commit":
            now = time.perf_counter()
            t.outcome, t.committed_at = "commit", now
            t.eou = _number(data.get("eou_probability"), t.eou)
            t.speech_end = now - (_number(data.get("silence_ms"), 0.0) or 0.0) / 1000
            for other in [k for k, o in self._turns.items() if k != event.turn_id and o.outcome == "commit"]:
                self._end(other)  # a later turn is committed: earlier replies are over
            self._arm(event.turn_id, t)
        elif kind == "cancel":
            t.outcome, t.reason = "cancel", str(data.get("reason", ""))
            self._end(event.turn_id)
        elif kind == "played" and data.get("interrupted"):
            t.interrupted, t.played_ms = True, _number(data.get("played_ms"), None)
            self._end(event.turn_id)

    def close(self) -> None:
        """The session ended: every turn still followed is over."""
        for turn_id in list(self._turns):
            self._end(turn_id)

    # ------------------------------------------------------------ turns

    def _turn(self, turn_id: str) -> _Turn | None:
        t = self._turns.get(turn_id)
        if t is None and turn_id not in self._ended:
            t = self._turns[turn_id] = _Turn()
            while len(self._turns) > _KEEP:
                self._end(next(iter(self._turns)))
        return t

    def _arm(self, turn_id: str, t: _Turn, again: bool = False) -> None:
        """Check when the turn's reply would be over (once armed, the check re-arms itself
        for a later time; `again` sets it anew, for an earlier one)."""
        if again and t.timer is not None:
            t.timer.cancel()
            t.timer = None
        if t.timer is None:
            t.timer = asyncio.get_running_loop().call_later(
                max(0.0, _due(t) - time.perf_counter()), self._check, turn_id)

    def _check(self, turn_id: str) -> None:
        t = self._turns.get(turn_id)
        if t is None:
            return
        t.timer = None
        if time.perf_counter() >= _due(t):
            self._end(turn_id)
        else:
            self._arm(turn_id, t)  # more of the reply came meanwhile

    def _end(self, turn_id: str) -> None:
        t = self._turns.pop(turn_id, None)
        if t is None:
            return
        self._ended[turn_id] = None
        while len(self._ended) > 4 * _KEEP:
            self._ended.popitem(last=False)
        if t.timer is not None:
            t.timer.cancel()
        if not t.evented:
            return
        first = None
        if t.first_audio is not None and t.speech_end is not None:
            first = round((t.first_audio - t.speech_end) * 1000, 1)
        report = TurnReport(turn_id, t.outcome, t.reason, t.transcript, t.eou, first,
                            round(t.audio_s * 1000, 1), t.interrupted, t.played_ms)
        # a speculative start the speaker talked over, with nothing heard yet, is not news
        quiet = t.outcome == "cancel" and not t.transcript
        self._log.log(logging.DEBUG if quiet else logging.INFO, "%s", report.line(), extra=report.fields())
        if self._on_end is not None:
            try:
                self._on_end(report)
            except Exception:
                self._log.exception("turn observer failed")


def _due(t: _Turn) -> float:
    if t.first_audio is None:
        return (t.committed_at or time.perf_counter()) + NO_REPLY_S
    return t.first_audio + t.audio_s + SETTLE_S


def _number(value: Any, default: float | None) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _text(frame: Any) -> str:
    if isinstance(frame, RuntimeData):
        return getattr(frame, "text", "")
    decoded = frame.decode()  # still encoded (between two node processes): a text frame is small
    return getattr(decoded, "text", "")


__all__ = ["NO_REPLY_S", "SETTLE_S", "TurnLog", "TurnReport"]
