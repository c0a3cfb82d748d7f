"""OpenAIChatNode: the voice loop's LLM on any OpenAI-compatible chat server.

llama.cpp's server, vLLM, Ollama (or OpenAI itself): the reply streams from
`POST {base_url}/chat/completions` with `stream: true`, through the `openai`
package's AsyncOpenAI (the `openai` extra). Frames in and out, phrases,
`final`, `transcript`, turn ids, history, `max_tokens` and its cut at the
last complete sentence are ChatNode's (chat.py), the same as LlamaCppNode's.

What differs from LlamaCppNode:

- No end-of-turn score. It needs the probability of the user's message
  ending after its last word, i.e. the model's next-token distribution at
  the end of the *user's* message; a chat-completions request only
  continues the assistant's. So no `eou` event goes out, and the
  accumulator ends every turn after its `endpointing_ms` pause (the pause
  used while no estimate has come). A speculative text is answered at once
  (`reply_before_commit`, as LlamaCppNode with `end_of_turn` off); its reply
  is dropped if the turn is cancelled, and TTS holds its audio until the
  commit either way.
- No pause for the first audio: a completion cannot be continued from a
  partial assistant message portably, and the server's cores are not TTS's.
- Cancelling or interrupting a turn closes its HTTP stream at once (the
  request's task is cancelled), so the server stops generating.

Errors are NodeExecutionError naming the node and, in `context["field"]`,
the param to look at: an unreachable server or one that goes away
mid-reply (`base_url`), a timeout (`timeout`), an HTTP error (`api_key` for
401/403, `model` for a model the server does not list, `base_url`
otherwise). The client never retries (`max_retries` 0): a late reply is
worse than a failed one in a conversation.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from engine.data import RuntimeData
from engine.errors import NodeExecutionError
from engine.node import ParamUnavailable
from engine.turns import TurnEvent

from . import models
from .chat import CHAT_ALIASES, CHAT_PARAMS, DONE, ChatNode, drain

#: the client insists on a key; local servers take any
_NO_KEY = "unused"


class OpenAIChatNode(ChatNode):
    """An LLM on an OpenAI-compatible chat-completions server (llama.cpp server, vLLM, Ollama), streaming phrases."""

    node_type = "OpenAIChatNode"
    multiprocess = True
    params_schema = {
        "type": "object",
        "properties": {
            "base_url": {"type": "string", "pattern": r"^https?://[^/\s?#]+(/[^\s?#]*)?$",
                         "description": "the server's OpenAI API root, e.g. http://127.0.0.1:8080/v1 "
                                        "(llama.cpp's llama-server, vLLM) or http://127.0.0.1:11434/v1 (Ollama)"},
            "model": {"type": "string", "default": "",
                      "description": "the model to ask for; empty = the first the server lists "
                                     "(GET /models, asked at start)"},
            "api_key": {"type": "string", "default": "",
                        "description": "the bearer token; prefer api_key_env (a manifest is not a secret store)"},
            "api_key_env": {"type": "string", "default": "", "pattern": r"^([A-Za-z_][A-Za-z0-9_]*)?$",
                            "description": "the environment variable holding the key (read by the node's "
                                           "process), used when api_key is empty; both empty = no key"},
            "system_prompt": CHAT_PARAMS["system_prompt"],
            "temperature": CHAT_PARAMS["temperature"],
            "max_tokens": CHAT_PARAMS["max_tokens"],
            "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 600, "default": 30,
                        "description": "seconds to connect, and to wait for each piece of the reply"},
            "history_turns": CHAT_PARAMS["history_turns"],
            "min_phrase_words": CHAT_PARAMS["min_phrase_words"],
            "max_phrase_words": CHAT_PARAMS["max_phrase_words"],
            "first_phrase_max_words": CHAT_PARAMS["first_phrase_max_words"],
            "reply_before_commit": {"type": "boolean", "default": True,
                                    "description": "answer a speculative text at once (false: wait for its "
                                                   "turn's commit: fewer requests, later replies)"},
            "end_marker": CHAT_PARAMS["end_marker"],
        },
        "required": ["base_url"],
        "additionalProperties": False,
    }
    param_aliases = {**CHAT_ALIASES, "baseUrl": "base_url", "apiKey": "api_key", "apiKeyEnv": "api_key_env"}

    @classmethod
    def unavailable(cls, params: dict[str, Any]) -> ParamUnavailable | str | None:
        if not models.installed("openai"):
            return ("it needs the Python package openai: install the openai extra (in a checkout's venv: "
                    ".venv/bin/pip install -e '.[openai]')")
        env = params.get("api_key_env") or ""
        if not params.get("api_key") and env and env not in os.environ:
            return ParamUnavailable("api_key_env", f"{env} is not set in the engine's environment "
                                                   "(a local server needs no key: leave api_key_env out)")
        return None

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._client: Any = None
        self._model = str(params.get("model") or "")
        #: the turn whose reply is streaming and the task that reads it (cancelled to close the stream)
        self._reading: tuple[str, asyncio.Task[None]] | None = None

    def _error(self, message: str, field: str | None, exc: BaseException | None = None,
               **context: Any) -> NodeExecutionError:
        cause = f" ({type(exc.__cause__ or exc).__name__}: {exc.__cause__ or exc})" if exc is not None else ""
        return NodeExecutionError(f"{self.node_type}: {message}{cause}", node_id=self.node_id,
                                  context={**({"field": field} if field else {}), **context})

    async def initialize(self) -> None:
        why = self.unavailable(self.params)  # validation said so already, unless the node was made by hand
        if why:
            raise self._error(str(why), "api_key_env" if models.installed("openai") else None)
        import openai

        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is not the node's news

        env = self.params.get("api_key_env") or ""
        key = self.params.get("api_key") or (os.environ.get(env, "") if env else "") or _NO_KEY
        self._client = openai.AsyncOpenAI(base_url=self.params["base_url"], api_key=key, max_retries=0,
                                          timeout=float(self.params.get("timeout", 30)))
        self.report_progress("connecting", 0, self.params["base_url"])
        try:
            self._model = await self._served_model(openai)
        except BaseException:
            await self._client.close()
            self._client = None
            raise
        self.report_progress("connected", 100, self._model)

    async def _served_model(self, openai: Any) -> str:
        """The model to ask for, once the server said which it serves (GET /models): a wrong
        base_url, key or model fails the session's start, not its first turn."""
        url, model = self.params["base_url"], self._model
        try:
            listed = [m.id async for m in self._client.models.list()]
        except openai.NotFoundError as exc:
            if not model:  # a wrong path, most often (the API root usually ends in /v1)
                raise self._error(f"GET {url}/models answered HTTP 404: check base_url (it usually ends "
                                  "in /v1), or name the model", "base_url", None, status=exc.status_code) from exc
            return model  # a server without GET /models: the model named is asked for as it is
        except Exception as exc:
            raise self.mapped(exc, started=False) from exc
        if not model:
            if not listed:
                raise self._error(f"{url} lists no model: set model", "model")
            return str(listed[0])
        if listed and model not in listed:
            raise self._error(f"{url} does not serve model {model!r}; it lists "
                              f"{', '.join(map(repr, listed[:10]))}", "model")
        return model

    def mapped(self, exc: BaseException, started: bool) -> NodeExecutionError:
        """A client or transport error as the node's typed error (`started`: the reply was streaming)."""
        import openai

        url = self.params["base_url"]
        if isinstance(exc, openai.APITimeoutError):
            return self._error(f"{url} did not answer within timeout={self.params.get('timeout', 30)} s",
                               "timeout", exc)
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            field = ("api_key" if status in (401, 403) else
                     "model" if status == 404 and "model" in str(exc.message).lower() else "base_url")
            return self._error(f"{url} answered HTTP {status}: {exc.message}", field, None, status=status)
        if isinstance(exc, openai.APIConnectionError) or not isinstance(exc, openai.OpenAIError):
            # the transport's (older clients raise its own errors mid-stream)
            if started:
                return self._error(f"{url} went away in the middle of a reply", "base_url", exc)
            return self._error(f"cannot reach {url}", "base_url", exc)
        # an error event in the stream, a reply the client cannot read
        return self._error(f"{url} failed the request", "base_url", exc)

    # ------------------------------------------------------------ ChatNode's hooks

    def reply_now(self, probability: float | None) -> bool:
        return bool(self.params.get("reply_before_commit", True))

    async def deltas(self, user: str, received: str, max_tokens: int, turn: str,
                     finish: list[str | None]) -> AsyncIterator[str]:
        """The reply's text pieces, read from the HTTP stream by a task of their own: cancelling
        that task (a cancelled or interrupted turn, see on_turn_event) closes the stream at once."""
        assert not received, "an OpenAIChatNode reply never pauses, so never continues"
        queue: asyncio.Queue[Any] = asyncio.Queue()  # bounded by max_tokens: one item a chunk
        reader = asyncio.get_running_loop().create_task(
            self._read(self.messages(user), max_tokens, queue, finish))
        self._reading = (turn, reader)
        try:
            async for item in drain(queue):
                yield item
        finally:
            self._reading = None
            reader.cancel()  # a no-op once it ended; else the consumer left early (an error, a close)
            await asyncio.wait([reader])
        if not finish:
            finish.append(None)  # stopped

    async def _read(self, messages: list[dict[str, str]], max_tokens: int, queue: asyncio.Queue[Any],
                    finish: list[str | None]) -> None:
        started = False
        try:
            stream = await self._client.chat.completions.create(
                model=self._model, messages=messages, max_tokens=max_tokens, stream=True,
                temperature=float(self.params.get("temperature", 0.0)))
            started = True
            try:
                async for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta is not None and choice.delta.content:
                            queue.put_nowait(choice.delta.content)
                        if choice.finish_reason and not finish:
                            finish.append(choice.finish_reason)
            finally:
                await stream.close()  # on a cancel too: the server sees the connection closed
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client's or, mid-stream with older clients, the transport's
            queue.put_nowait(self.mapped(exc, started))
        finally:
            queue.put_nowait(DONE)

    def on_turn_event(self, event: TurnEvent) -> AsyncIterator[RuntimeData] | None:
        if event.voids and self._reading is not None and self._reading[0] == event.turn_id:
            self._reading[1].cancel()
        return super().on_turn_event(event)

    async def cleanup(self) -> None:
        if self._reading is not None:  # a reply still streaming when the session closes
            self._reading[1].cancel()
            await asyncio.wait([self._reading[1]])
        if self._client is not None:
            await self._client.close()
            self._client = None
