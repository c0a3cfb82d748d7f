"""The browser face without a browser: a real aiortc client against /api/offer,
server and client in a network namespace with only loopback up (every ICE
candidate and packet stays on 127.0.0.1). Each scenario runs in
tests/webrtc_client.py inside the namespace and reports what it saw."""

from __future__ import annotations

import asyncio

import pytest
from speech_audio import wer
from webrtc_client import in_loopback_netns

pytestmark = pytest.mark.speech


async def _run(scenario: str) -> dict:
    return await asyncio.to_thread(in_loopback_netns, scenario)


async def test_a_spoken_question_is_answered_over_webrtc_on_loopback():
    seen = await _run("answer")
    assert seen["pair"] == ["127.0.0.1", "127.0.0.1"], f"ICE paired {seen['pair']}"
    kinds = [e["type"] for e in seen["events"]]
    assert "transcript" in kinds and "reply" in kinds and "timing" in kinds, seen["events"]
    transcript = next(e["text"] for e in seen["events"] if e["type"] == "transcript")
    assert wer("What is the capital of France?", transcript) <= 0.34, transcript
    reply = " ".join(e["text"] for e in seen["events"] if e["type"] == "reply")
    assert seen["reply_peak"] > 0.05, "the reply audio is silent"
    assert wer(reply, seen["reply_heard"]) <= 0.5, (reply, seen["reply_heard"])
    assert seen["peers_left"] and seen["sessions_left"], seen
    assert seen["leaks"] == {}, seen["leaks"]


async def test_bad_offers_get_a_400_with_a_reason_and_leave_nothing():
    seen = await _run("bad_offers")
    for case in ("not json", "no sdp", "truncated sdp", "no audio", "unknown pipeline", "huge"):
        status, reason = seen[case]
        assert status == 400 and reason and "\n" not in reason, (case, status, reason)
    assert "unknown pipeline" in seen["unknown pipeline"][1]
    assert seen["sessions"] == 0 and seen["leaks"] == {}, seen


async def test_a_caller_gone_silent_at_the_transport_ends_its_session():
    seen = await _run("gone_silent")
    assert seen["ended"], seen
    assert seen["leaks"] == {}, seen["leaks"]


async def test_the_page_in_chromium_answers_and_is_interrupted(tmp_path):
    """Debian's Chromium with a fake microphone: a question, its answer shown and heard
    (with a latency), a second question spoken over the reply interrupts it; a reload ends
    the old session. The screenshot is docs/page.png's source."""
    shot = tmp_path / "page.png"
    seen = await asyncio.to_thread(in_loopback_netns, "browser", str(shot))
    assert seen["pair"] == ["127.0.0.1", "127.0.0.1"], f"ICE paired {seen['pair']}"
    kinds = [e["type"] for e in seen["events"]]
    assert "transcript" in kinds and "reply" in kinds and "interrupted" in kinds, kinds
    first = next(e["text"] for e in seen["events"] if e["type"] == "transcript")
    assert wer("What is the capital of France?", first) <= 0.34, first
    heard = [t["heard_ms"] for t in seen["turns"].values() if "heard_ms" in t]
    assert heard and all(ms > 0 for ms in heard), seen["turns"]
    assert "answered" in seen["page_text"] and "interrupted" in seen["page_text"], seen["page_text"]
    assert not seen["error_shown"] and seen["old_session_gone"] and seen["sessions_left"], seen
    assert seen["leaks"] == {}, seen["leaks"]
    assert shot.stat().st_size > 10_000


def test_the_pages_default_pipeline_is_the_speech_example():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shipped = (root / "src" / "engine" / "web" / "voice.json").read_text()
    assert shipped == (root / "examples" / "speech_to_speech.json").read_text(), \
        "src/engine/web/voice.json is the installed copy of examples/speech_to_speech.json: copy it again"


def test_http_settings(tmp_path):
    from engine.config import RuntimeConfig
    from engine.errors import ValidationError

    p = tmp_path / "runtime.toml"
    p.write_text('[http]\nport = 8080\npipelines = { voice = "builtin:voice", mine = "mine.json" }\n')
    cfg = RuntimeConfig.load(p, env={})
    assert cfg.http.port == 8080 and cfg.http.pipelines["mine"] == str(tmp_path / "mine.json")
    assert RuntimeConfig().http.port == 0, "off by default: engines sharing a machine must not collide"
    with pytest.raises(ValidationError, match="http.pipelines"):
        RuntimeConfig.load({"http": {"pipelines": ["x"]}}, env={})
    with pytest.raises(ValidationError, match="http.idle_secs: must be a number"):
        RuntimeConfig.load({"http": {"idle_secs": "soon"}}, env={})


async def test_audio_faster_than_real_time_in_odd_sizes_is_held_within_a_bound():
    seen = await _run("flood")
    assert seen["sent_x_real_time"] > 2, f"the client did not outpace real time: {seen}"
    assert seen["alive"] and seen["rss_growth_mb"] < 50, seen
    assert seen["ended"] and seen["leaks"] == {}, seen


async def test_more_offers_than_the_session_cap_get_a_503():
    seen = await _run("full")
    assert seen["second"].startswith("503: ") and "max_sessions" not in seen["second"].split(":")[0], seen
    assert "cap 1" in seen["second"] and seen["sessions"] == 1, seen
    assert seen["ended"] and seen["leaks"] == {}, seen
