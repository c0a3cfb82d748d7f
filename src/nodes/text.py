"""TextCollectorNode: streamed text (LLM tokens or phrases) → whole sentences.

The RemoteMedia app puts it between a language model and TTS, so that TTS
speaks sentence by sentence. A sentence ends where `split_pattern` matches
and has at least `min_sentence_length` characters (a shorter one waits for
the next). At a reply's end (`<|text_end|>`, `<|audio_end|>`, metadata
`final`) or at end of stream, what is left goes out when
`yield_partial_on_end`. Special tokens (`<|...|>`) are never passed on.

Turn-aware: text is buffered per `turn_id`; a cancelled or interrupted
turn's buffer is dropped.
"""

from __future__ import annotations

import re
from typing import Any

from engine.data import DataKind, RuntimeData, TextData
from engine.errors import TypeValidationError
from engine.node import Node
from engine.turns import TurnEvent, turn_of

from .speech.common import SPECIAL_TOKENS

_ENDS = ("<|text_end|>", "<|audio_end|>", "<|im_end|>")


class TextCollectorNode(Node):
    """Collects streamed text into sentences (split_pattern), flushing the rest at a reply's end."""

    node_type = "TextCollectorNode"
    input_types = (DataKind.TEXT,)
    output_types = (DataKind.TEXT,)
    params_schema = {
        "type": "object",
        "properties": {
            "split_pattern": {"type": "string", "minLength": 1, "default": r"[.!?;\n]+",
                              "description": "a regular expression; a sentence ends where it matches"},
            "min_sentence_length": {"type": "integer", "minimum": 0, "maximum": 10_000, "default": 3,
                                    "description": "shorter sentences wait for the next one"},
            "yield_partial_on_end": {"type": "boolean", "default": True,
                                     "description": "at a reply's end or end of stream, send what is left"},
        },
        "additionalProperties": False,
    }

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        try:
            self._split = re.compile(params.get("split_pattern", r"[.!?;\n]+"))
        except re.error as exc:
            raise TypeValidationError(f"param 'split_pattern': not a regular expression: {exc}",
                                      node_id=node_id, context={"field": "split_pattern"}) from None
        self._min = int(params.get("min_sentence_length", 3))
        self._partial = bool(params.get("yield_partial_on_end", True))
        #: turn id ("" = none) → (text so far, metadata of its last piece)
        self._buffers: dict[str, tuple[str, dict[str, str]]] = {}

    def process(self, frame: RuntimeData) -> list[TextData]:
        if not isinstance(frame, TextData):
            raise TypeValidationError(f"{self.node_type} takes text, got {frame.kind.name.lower()}",
                                      node_id=self.node_id)
        turn = turn_of(frame)
        if turn and self.superseded(turn):
            self._buffers.pop(turn, None)
            return []
        ends = any(token in frame.text for token in _ENDS) or frame.metadata.get("final") == "1"
        piece = SPECIAL_TOKENS.sub("", frame.text)
        text, _ = self._buffers.get(turn, ("", {}))
        # phrases (metadata phrase_index) are whole words: join them with a space; tokens carry their own
        if text and piece and "phrase_index" in frame.metadata and not text[-1].isspace() and not piece[0].isspace():
            text += " "
        text += piece
        meta = {k: v for k, v in frame.metadata.items() if k != "final"}
        out = []
        start = 0
        for m in self._split.finditer(text):
            sentence = text[start:m.end()].strip()
            if len(sentence) >= self._min:
                out.append(TextData(sentence, language=frame.language, metadata=dict(meta)))
                start = m.end()
        rest = text[start:]
        if ends:
            self._buffers.pop(turn, None)
            if self._partial and rest.strip():
                out.append(TextData(rest.strip(), language=frame.language, metadata=dict(meta)))
        else:
            self._buffers[turn] = (rest, meta)
        return out

    def on_turn_event(self, event: TurnEvent) -> None:
        if event.voids:
            self._buffers.pop(event.turn_id, None)

    def flush(self) -> list[TextData]:
        out = [TextData(text.strip(), metadata=meta) for text, meta in self._buffers.values()
               if self._partial and text.strip()]
        self._buffers.clear()
        return out
