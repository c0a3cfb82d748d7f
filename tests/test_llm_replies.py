"""The LLM nodes' replies: a reply capped by max_tokens ends at its last complete
sentence (scripted exactly, then with the bundled model), and LlamaCppNode's
`model_path`, checked when the manifest is validated."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from chat_replies import BOOKS, SENTENCE_END, check_capped_at_a_sentence, said, written

from engine import RuntimeData
from engine.catalog import default_registry
from engine.errors import NodeExecutionError, ValidationError
from nodes.speech import models
from nodes.speech.chat import ChatNode


class ScriptedChat(ChatNode):
    """A chat node whose model writes `pieces` (one a token) and stops with `finish`."""

    node_type = "ScriptedChat"

    def __init__(self, pieces: list[str], finish: str, **params) -> None:
        super().__init__("llm", {"max_tokens": 64, **params})
        self.pieces, self.finish = pieces, finish

    async def deltas(self, user: str, received: str, max_tokens: int, turn: str,
                     finish: list[str | None]) -> AsyncIterator[str]:
        for piece in self.pieces[:max_tokens]:
            yield piece
        finish.append(self.finish if max_tokens > len(self.pieces) else "length")


async def reply(node: ChatNode, text: str = "Which books about Rome?") -> list[RuntimeData]:
    return [f async for f in node.process(RuntimeData.text(text))]


# ---------------------------------------------------------------- scripted


ROME = ["Here", " are", " some", " books", ":", " 1", ".", ' "', "Rome", ":", " The", " Complete", " History"]


async def test_a_capped_reply_drops_the_sentence_it_could_not_finish():
    node = ScriptedChat(ROME, "stop", max_tokens=len(ROME))
    frames = await reply(node)
    assert said(frames) == "Here are some books: 1.", said(frames)
    assert frames[-1].text == "" and frames[-1].metadata["final"] == "1"
    assert frames[-1].metadata["max_tokens_reached"] == "1"
    assert node.messages("Next?")[-2] == {"role": "assistant", "content": "Here are some books: 1."}, \
        "the history must hold what was said, not the dropped words"


async def test_an_uncapped_reply_keeps_its_last_words_and_a_capped_one_without_any_sentence_end_too():
    ended = await reply(ScriptedChat(ROME, "stop", max_tokens=100))  # the model stopped by itself
    assert said(ended) == 'Here are some books: 1. "Rome: The Complete History'
    assert "max_tokens_reached" not in ended[-1].metadata
    pieces = ["The", " history", " of", " Rome", " is", " long", " and"]
    capped = await reply(ScriptedChat(pieces, "stop", max_tokens=len(pieces)))
    assert said(capped) == "The history of Rome is long and", "with no sentence ended, the words are all the reply"
    assert capped[-1].metadata["max_tokens_reached"] == "1"


async def test_near_the_cap_a_clause_waits_for_its_sentence():
    """Within the last phrase's worth of tokens, a clause is not sent before its sentence ends:
    "The Odyssey" by Homer: would otherwise be spoken and its sentence never finished."""
    pieces = ["Three", " books", ".", " First", ",", ' "', "The", " Odyssey", '"', " by", " Homer", ":", " an",
              " epic", " poem"]
    near = await reply(ScriptedChat(pieces, "stop", max_tokens=len(pieces), min_phrase_words=1))
    assert said(near) == "Three books.", said(near)
    far = await reply(ScriptedChat(pieces, "stop", max_tokens=100, min_phrase_words=1))
    assert [f.text for f in far] == ["Three books.", "First,", '"The Odyssey" by Homer:', "an epic poem"], \
        "far from the cap, clauses stream as they come"


async def test_the_end_marker_follows_a_capped_reply():
    frames = await reply(ScriptedChat(ROME, "stop", max_tokens=len(ROME), end_marker="<|text_end|>"))
    assert [f.text for f in frames][-1] == "<|text_end|>"
    assert said(frames[:-1]) == "Here are some books: 1."
    assert frames[-1].metadata["max_tokens_reached"] == "1" and frames[-1].metadata["final"] == "1"


# ---------------------------------------------------------------- the bundled model


def _llama(**params):
    from nodes.speech.llm import LlamaCppNode

    return LlamaCppNode("llm", default_registry().get("LlamaCppNode").normalize_params(params))


@pytest.mark.speech
async def test_the_bundled_model_capped_mid_sentence_is_cut_at_its_last_sentence():
    node = _llama(max_tokens=32, system_prompt="You are a helpful assistant.")
    await asyncio.to_thread(node.initialize)
    await check_capped_at_a_sentence(node, BOOKS, 32)


@pytest.mark.speech
async def test_the_bundled_model_capped_before_any_sentence_end_keeps_its_words():
    node = _llama(max_tokens=6, system_prompt="You are a helpful assistant.")
    await asyncio.to_thread(node.initialize)
    raw, finish = await written(node, BOOKS, 6)
    assert finish == "length" and not SENTENCE_END.search(raw.strip()), raw
    frames = [f async for f in node.process(RuntimeData.text(BOOKS))]
    assert said(frames).split() == raw.split()
    assert frames[-1].metadata["max_tokens_reached"] == "1"


# ---------------------------------------------------------------- model_path


def _one(**params) -> dict:
    return {"version": "v1", "metadata": {"name": "model-path"},
            "nodes": [{"id": "brain", "node_type": "LlamaCppNode", "params": params}], "connections": []}


@pytest.mark.speech
async def test_model_path_loads_the_gguf_it_names(mp_engine):
    path = str(models.smollm2_path("test"))
    result = await mp_engine.execute(_one(model_path=path, max_tokens=24),
                                     {"brain": RuntimeData.text("What is the capital of France?")})
    frames = result.all_outputs["brain"]
    assert said(frames) and frames[-1].metadata["final"] == "1", frames


@pytest.mark.parametrize("kind", ["missing", "not a GGUF", "a folder"])
async def test_a_bad_model_path_fails_validation_naming_the_field(mp_engine, tmp_path, kind):
    if kind == "missing":
        path, expected = tmp_path / "nowhere.gguf", "does not exist"
    elif kind == "not a GGUF":
        path, expected = tmp_path / "notes.gguf", "is not a GGUF file"
        path.write_bytes(b"PK\x03\x04 a zip file, not a model")
    else:
        path, expected = tmp_path, "is not a file"
    with pytest.raises(ValidationError) as info:
        mp_engine.validate(_one(model_path=str(path)))
    [issue] = info.value.issues
    assert issue.node_id == "brain", issue
    assert issue.path.endswith("params.model_path"), issue
    assert f"param 'model_path': {path} {expected}" in issue.message, issue.message
    lfm2 = _one(model_path=str(path))  # the LFM2 node checks its file the same way
    lfm2["nodes"][0]["node_type"] = "LFM2Node"
    with pytest.raises(ValidationError, match=f"param 'model_path': {re.escape(str(path))} {expected}"):
        mp_engine.validate(lfm2)


@pytest.mark.speech
def test_a_node_made_without_a_manifest_checks_model_path_when_it_starts(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\0" * 16)
    node = _llama(model_path=str(bad))
    with pytest.raises(NodeExecutionError) as info:
        node.initialize()
    assert info.value.node_id == "llm" and info.value.context["field"] == "model_path"
    assert "is not a GGUF file" in str(info.value)


# ---------------------------------------------------------------- a sentence still being built


@pytest.mark.parametrize(("text", "building"), [
    ("Tell me about Rome,", True), ("Tell me about Rome and", True), ("I would like to talk about the", True),
    ("So what I want is:", True), ("Well...", True), ("What is the capital of France?", False),
    ("Tell me about Rome.", False), ("What are you waiting for?", False), ("Hello", False), ("", False)])
def test_a_transcript_ending_inside_a_sentence_is_unfinished(text, building):
    from nodes.speech.chat import unfinished

    assert unfinished(text) is building


@pytest.mark.speech
async def test_a_speculative_turn_cut_at_a_comma_scores_as_unfinished_whatever_the_model_says():
    """"Tell me about Rome," then a pause: the turn is not over (eou 0, so the accumulator waits
    its longest pause); the same words as a question are scored by the model."""
    from engine.turns import TurnEvent

    node = _llama(max_tokens=16)
    await asyncio.to_thread(node.initialize)
    scores = {}
    for turn, text in (("1", "Tell me about Rome,"), ("2", "Tell me about Rome and"),
                       ("3", "What is the capital of France?")):
        frame = RuntimeData.text(text, metadata={"turn_id": turn, "speculative": "1"})
        out = [f async for f in node.process(frame)]
        scores[turn] = next(TurnEvent.of(f).data["probability"] for f in out
                            if TurnEvent.of(f) is not None and TurnEvent.of(f).kind == "eou")
    assert scores["1"] == 0.0 and scores["2"] == 0.0
    assert scores["3"] > 0.0
