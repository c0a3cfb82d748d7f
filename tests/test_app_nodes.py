"""The RemoteMedia app's small nodes: TextCollectorNode and FastResampleNode."""

from __future__ import annotations

import numpy as np

from engine import RuntimeData
from engine.catalog import default_registry
from engine.turns import TurnEvent


def _node(node_type: str, **params):
    spec = default_registry().get(node_type)
    return spec.cls("n", spec.normalize_params(params))


def _texts(frames) -> list[str]:
    return [f.text for f in frames]


def test_text_collector_makes_sentences_of_tokens():
    node = _node("TextCollectorNode", splitPattern="[.!?;\n]+", minSentenceLength=3, yieldPartialOnEnd=True)
    out = []
    for token in ["Hel", "lo", " there", ". I", " am", " fine", "! Ok", ". And", " you"]:
        out += node.process(RuntimeData.text(token))
    assert _texts(out) == ["Hello there.", "I am fine!", "Ok."], out  # "Ok." is long enough (3)
    assert _texts(node.process(RuntimeData.text("<|text_end|>"))) == ["And you"]
    assert node.flush() == []


def test_text_collector_joins_short_sentences_and_phrases():
    node = _node("TextCollectorNode", min_sentence_length=10)
    out = node.process(RuntimeData.text("Hi. Yes.", metadata={"phrase_index": "0"}))
    out += node.process(RuntimeData.text("It is Paris.", metadata={"phrase_index": "1", "final": "1"}))
    assert _texts(out) == ["Hi. Yes. It is Paris."], out


def test_text_collector_drops_a_voided_turns_text_and_flushes_the_rest_at_the_end():
    node = _node("TextCollectorNode")
    node.process(RuntimeData.text("A cancelled", metadata={"turn_id": "1"}))
    node.process(RuntimeData.text("A kept", metadata={"turn_id": "2"}))
    node.on_turn_event(TurnEvent("cancel", "1"))
    assert _texts(node.flush()) == ["A kept"]
    quiet = _node("TextCollectorNode", yield_partial_on_end=False)
    quiet.process(RuntimeData.text("No end"))
    assert quiet.flush() == [] and _texts(quiet.process(RuntimeData.text("<|text_end|>"))) == []


def test_fast_resample_takes_the_rate_from_each_frame():
    node = _node("FastResampleNode", sourceRate=48000, targetRate=16000, quality="Medium", channels=1)
    x = np.sin(np.arange(44100, dtype=np.float32) / 10)
    out = node.process(RuntimeData.audio(x, 44100)) + node.flush()
    assert {f.sample_rate for f in out} == {16000}
    assert abs(sum(f.samples.size for f in out) - 16000) <= 2


def test_a_killed_kokoro_process_leaves_no_copy_of_espeak_behind():
    """phonemizer loads a copy of libespeak-ng from a temporary folder per wrapper; a node
    process that is killed never collects its wrappers: the copies are gone once loaded."""
    import signal
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    def copies() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("tmp*/libespeak-ng.so"))

    before = copies()
    script = ("from nodes.speech.kokoro import KokoroTTSNode\n"
              "n = KokoroTTSNode('tts', {})\nn.initialize()\nprint('ready', flush=True)\n"
              "import time\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert copies() == before, "a copy of espeak-ng stays on disk while the node runs"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert copies() == before
