"""engine.turn_log without models: what a turn's one line says, fed as a session feeds it."""

from __future__ import annotations

import logging

import numpy as np

from engine import RuntimeData
from engine.logs import ContextAdapter
from engine.server.metrics import ServerMetrics
from engine.turn_log import TurnLog, TurnReport
from engine.turns import TurnEvent


def _log(caplog) -> tuple[TurnLog, list[TurnReport]]:
    caplog.set_level(logging.INFO, logger="engine.session")
    reports: list[TurnReport] = []
    adapter = ContextAdapter(logging.getLogger("engine.session"), {"session_id": "s1", "node_id": "-"})
    return TurnLog(adapter, reports.append), reports


def _text(text: str, turn: str, **meta: str) -> RuntimeData:
    return RuntimeData.text(text, metadata={"turn_id": turn, **meta})


def _audio(turn: str, seconds: float) -> RuntimeData:
    return RuntimeData.audio(np.zeros(int(22050 * seconds), np.float32), 22050, metadata={"turn_id": turn})


async def test_a_turn_that_is_answered_and_interrupted(caplog):
    turns, reports = _log(caplog)
    turns.frame("7", _text(" What time is it? ", "7", speculative="1"), sink=False)  # the recognizer's
    turns.event(TurnEvent("eou", "7", {"probability": 0.25}))
    turns.frame("7", _audio("7", 0.5), sink=True)  # before the commit: not the reply
    turns.event(TurnEvent("commit", "7", {"silence_ms": 200, "eou_probability": 0.5}))
    turns.frame("7", _text("It is", "7", transcript="What time is it?"), sink=False)
    turns.frame("7", _audio("7", 0.5), sink=True)
    turns.frame("7", _audio("7", 0.5), sink=True)
    assert not reports, "the reply is still playing"
    turns.event(TurnEvent("interrupt", "7", {"speech_ms": 160}))
    turns.event(TurnEvent("played", "7", {"played_ms": 420, "interrupted": True, "text": "It"}))
    (r,) = reports
    assert (r.turn_id, r.outcome, r.transcript, r.eou_probability) == ("7", "commit", "What time is it?", 0.5)
    assert r.interrupted and r.played_ms == 420 and r.reply_audio_ms == 1000.0
    assert 200 <= r.first_audio_ms < 10_000  # from the pause's start, 200 ms before the commit
    (rec,) = [x for x in caplog.records if x.name == "engine.session"]
    assert rec.session_id == "s1" and rec.turn_id == "7" and rec.levelno == logging.INFO
    assert rec.getMessage().startswith("turn 7 committed: 'What time is it?', end-of-turn probability 0.5; "
                                       "first audio "), rec.getMessage()
    assert rec.getMessage().endswith("interrupted after 0.4 s of 1.0 s sent")
    turns.event(TurnEvent("speaking", "7"))
    turns.frame("7", _audio("7", 0.5), sink=True)
    turns.close()
    assert len(reports) == 1, "a turn is reported once"


async def test_cancelled_superseded_and_unfinished_turns(caplog):
    turns, reports = _log(caplog)
    turns.frame("0", _text("What is", "0"), sink=False)
    turns.event(TurnEvent("cancel", "0", {"reason": "speech resumed"}))
    turns.event(TurnEvent("commit", "1", {"silence_ms": 400}))
    turns.frame("1", _audio("1", 2.0), sink=True)
    turns.event(TurnEvent("commit", "2", {"silence_ms": 400}))  # a later turn: the first reply is over
    turns.frame("3", _text("no events for me", "3"), sink=False)  # a tagged frame, no voice turn
    turns.event(TurnEvent("eou", "4", {"probability": 0.001}))
    turns.close()
    assert [(r.turn_id, r.outcome) for r in reports] == [("0", "cancel"), ("1", "commit"), ("2", "commit"),
                                                        ("4", "open")]
    cancelled, answered, unanswered, unfinished = reports
    assert cancelled.reason == "speech resumed" and cancelled.transcript == "What is"
    assert answered.first_audio_ms is not None and not answered.interrupted and answered.played_ms is None
    assert unanswered.first_audio_ms is None and unfinished.eou_probability == 0.001
    lines = [x.getMessage() for x in caplog.records if x.name == "engine.session"]
    assert lines[0] == "turn 0 cancelled (speech resumed): 'What is'"
    assert lines[1].endswith("reply of 2.0 s, not interrupted")
    assert lines[2] == "turn 2 committed: (no transcript), end-of-turn probability -; no reply audio"
    assert lines[3].startswith("turn 4 unfinished: ")


def test_the_turn_latency_histogram_counts_answered_turns():
    metrics = ServerMetrics()
    for first_audio_ms in (350.0, 1200.0, None):
        metrics.turn_ended(TurnReport("1", "commit", "", "hi", None, first_audio_ms, 1000.0, False, None))
    get = metrics.registry.get_sample_value
    assert get("remotemedia_turn_latency_seconds_count") == 2
    assert get("remotemedia_turn_latency_seconds_bucket", {"le": "0.4"}) == 1
    assert abs(get("remotemedia_turn_latency_seconds_sum") - 1.55) < 1e-9


async def test_a_transcript_read_between_two_node_processes(mp_engine, make_manifest, caplog):
    """Between two node processes a frame stays encoded (codec.Encoded): the turn's first text
    is still read for its line, and a cancel sent from a node process ends the turn."""
    caplog.set_level(logging.INFO, logger="engine.session")
    m = make_manifest([{"id": "probe", "node_type": "TurnProbeNode"}, {"id": "echo", "node_type": "EchoNode"}])
    async with mp_engine.stream(m) as session:
        assert session.forwards_encoded("probe"), "the probe's frames should stay encoded on their way"
        await session.send("probe", RuntimeData.text("probe tagged 5"))
        got = await anext(session)
        assert got.data.text == "probe:5"
        await session.send("probe", RuntimeData.text("probe event cancel 5"))
        await session.close()
        async for _ in session:
            pass
    lines = [r for r in caplog.records if getattr(r, "turn_id", None) == "5"]
    assert [r.getMessage() for r in lines] == ["turn 5 cancelled (no reason given): 'probe:5'"]
    assert lines[0].session_id == session.id
