"""Checks of an LLM node's replies shared by tests/test_llm_replies.py and
tests/test_openai_chat.py: what was said, and a reply capped by max_tokens."""

from __future__ import annotations

import re

from engine import RuntimeData
from nodes.speech.chat import ChatNode, user_words

#: how a spoken phrase that ends a sentence ends
SENTENCE_END = re.compile(r"[.!?…][\"')\]]*$")
#: SmolLM2 answers this (system prompt "You are a helpful assistant.") with a numbered list
BOOKS = "Recommend three books about the history of Rome."


def said(frames: list[RuntimeData]) -> str:
    return " ".join(f.text for f in frames if f.text)


async def written(node: ChatNode, text: str, max_tokens: int) -> tuple[str, str | None]:
    """What the model writes for `text` in `max_tokens` tokens (greedy: what the reply is made of)."""
    finish: list[str | None] = []
    raw = "".join([d async for d in node.deltas(user_words(text), "", max_tokens, "", finish)])
    return raw, finish[0]


async def check_capped_at_a_sentence(node: ChatNode, text: str, max_tokens: int) -> None:
    """The reply to `text` is the model's own words up to its last complete sentence, and
    what the model wrote after that is an unfinished sentence."""
    raw, finish = await written(node, text, max_tokens)
    assert finish == "length", f"the model should have been stopped by max_tokens, not {finish!r}: {raw!r}"
    frames = [f async for f in node.process(RuntimeData.text(text))]
    spoken = said(frames)
    assert frames[-1].metadata.get("max_tokens_reached") == "1", frames[-1].metadata
    assert SENTENCE_END.search(spoken), f"the reply does not end at a sentence end: {spoken!r}"
    words, raw_words = spoken.split(), raw.split()
    assert raw_words[:len(words)] == words, f"the reply is not the model's words: {spoken!r} / {raw!r}"
    dropped = " ".join(raw_words[len(words):])
    assert dropped and not SENTENCE_END.search(dropped), f"nothing unfinished was dropped: {dropped!r}"
