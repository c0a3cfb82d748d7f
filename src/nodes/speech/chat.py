"""ChatNode: what the LLM nodes of the voice loop share, whatever runs the model.

LlamaCppNode (llama.cpp in the node's process) and OpenAIChatNode (any
OpenAI-compatible server) answer the same frames the same way; only how a
completion is produced differs (`deltas()`), and whether the words of a
speculative turn can be scored for end of turn (`end_of_turn()`).

Each user text (one turn) is answered with a streamed completion; text goes
out at phrase boundaries (sentence ends, or clause punctuation once a phrase
has `min_phrase_words`; the first phrase is cut sooner, at
`first_phrase_max_words`), so speech synthesis starts on the first phrase.
Each phrase carries the turn's metadata plus `transcript` (the user text it
answers), `phrase_index`, `llm_first_token_ms` and, on the last, `final` =
"1".

A reply that reaches `max_tokens` ends at its last complete sentence: the
phrases already sent stay, and the words held back after the last sentence
end (an unfinished sentence, `1. "Rome: The Complete History`) are dropped,
neither spoken nor remembered. Within the last phrase's worth of tokens
before the cap, phrases are cut at sentence ends only, so that less of an
unfinished sentence has gone out when the cap comes (the first phrase is
never held: its latency is the reply's). A capped reply in which no
sentence ended at all keeps its words: they are all the reply has, and
dropping them would leave the question unanswered (silence) and the first
phrase, already spoken, hanging. The last frame of a capped reply carries
`max_tokens_reached` = "1".

Turns (see engine.turns and accumulator.py): a speculative text (metadata
`speculative` = "1", its turn not yet committed) is scored first where the
node can (an `eou` event: the probability that the words so far are a
finished turn), and answered at once or once committed (`reply_now()`). A
transcript that ends inside a sentence (at a comma, on "and" or "the": see
`unfinished()`) scores 0 without asking the model, so the accumulator waits
its longest pause before ending the turn. One that ends a sentence (ASR
heard its end: "?", ".", "!") has a low model score multiplied by
`sentence_end_factor` where the node takes it (up to SENTENCE_END_MAX_EOU):
the model scores the words only, and a misheard word ("What do these
make?") can make a finished question look unlikely to end there. One that
is only an opener ("Hello.", "Well", "Okay": see `opener()`) scores
OPENER_EOU, so a comma after it does not end the turn. A
cancelled or interrupted turn stops its completion. The conversation history
(system prompt + the last `history_turns` committed exchanges) lives in the
node instance, so it is per session; of an interrupted reply it keeps what
was played (the TTS node's `played` event), as a user would remember it.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from engine.data import RuntimeData, TextData
from engine.errors import TypeValidationError
from engine.node import Node
from engine.turns import TurnEvent, turn_of

from .common import TEXT, remember

_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*(\s|$)")
_CLAUSE_END = re.compile(r"[,;:—]+(\s|$)")
_TRAILING = re.compile(r"[\s.?!,;:…]+$")
#: a phrase that ends a sentence (it was cut at _SENTENCE_END)
_ENDS_SENTENCE = re.compile(r"[.!?…]+[\"')\]]*$")
#: a word count no phrase reaches (split_phrase then cuts at sentence ends only)
_NEVER = 1 << 30

#: the params every chat node takes, with the same meaning (a subclass lists them in its schema)
CHAT_PARAMS: dict[str, dict[str, Any]] = {
    "system_prompt": {"type": "string", "default": (
        "You are a helpful voice assistant. Reply in one short, complete sentence."),
        "description": "the system message of every conversation"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 0.0,
                    "description": "sampling temperature; 0 = greedy (the same reply every time)"},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4096, "default": 64,
                   "description": "the longest reply, in tokens; a reply that reaches it ends at its last "
                                  "complete sentence"},
    "history_turns": {"type": "integer", "minimum": 0, "maximum": 100, "default": 6,
                      "description": "committed exchanges kept as the conversation's history"},
    "min_phrase_words": {"type": "integer", "minimum": 1, "maximum": 50, "default": 3,
                         "description": "a phrase ends at clause punctuation once it has this many "
                                        "words (at a sentence end always)"},
    "max_phrase_words": {"type": "integer", "minimum": 2, "maximum": 200, "default": 14,
                         "description": "a phrase without punctuation is cut at this many words"},
    "first_phrase_max_words": {"type": "integer", "minimum": 2, "maximum": 200, "default": 6,
                               "description": "the first phrase is cut here (TTS starts sooner)"},
    "end_marker": {"type": "string", "default": "",
                   "description": "sent as a last text frame after each reply (e.g. <|text_end|>); "
                                  "empty = the reply's last phrase carries metadata final=1 only"},
}
CHAT_ALIASES = {"systemPrompt": "system_prompt", "maxTokens": "max_tokens", "max_new_tokens": "max_tokens",
                "historyTurns": "history_turns"}


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


#: words a sentence does not end on: a transcript ending in one is a sentence still being built
_CONTINUES = frozenset("""and or but so because if when while then than that which who whose where
    the a an to of in on at for with about from by into as my your our their his her its is are was were
    um uh er""".split())
_OPEN_END = re.compile(r"(,|;|:|—|-|\.\.\.|…)\s*$")


def unfinished(text: str) -> bool:
    """Whether a transcript ends inside a sentence: at a comma, a colon, a dash or trailing
    dots, or on a word no sentence ends on ("... and", "... the"); a question mark ends it."""
    text = text.strip()
    if not text:
        return False
    if _OPEN_END.search(text):
        return True
    if text.endswith("?"):
        return False
    last = re.sub(r"[^a-z']", "", text.split()[-1].lower())
    return last in _CONTINUES


#: words a turn often opens with before a comma and the question ("Hello, can you hear me?")
_OPENERS = frozenset("hello hi hey well okay ok so oh alright hmm".split())
#: the end-of-turn score of a transcript that is only such words: between likely and unlikely, so
#: the accumulator waits ~0.75 s (a pause at their comma lasts 120-450 ms) before answering them alone
OPENER_EOU = 0.003
#: `sentence_end_factor` lifts a low score up to this at most: out of the longest pauses, never into
#: the quickest (a comma's "Hello." must not end the turn at once)
SENTENCE_END_MAX_EOU = 0.1


def opener(text: str) -> bool:
    """Whether a transcript is only words a sentence often opens with ("Hello.", "Well,", "Okay")."""
    w = re.sub(r"[^a-z' ]", " ", text.lower()).split()
    return 0 < len(w) <= 2 and all(x in _OPENERS for x in w)


#: put in a `drain()` queue by its producer when it is done
DONE = object()


async def drain(queue: asyncio.Queue) -> AsyncIterator[Any]:
    """What a producer (a thread, a reading task) puts in `queue`, up to DONE; an exception
    it puts there is raised here."""
    while (item := await queue.get()) is not DONE:
        if isinstance(item, BaseException):
            raise item
        yield item


def user_words(text: str) -> str:
    """A user text as the model sees it: without the trailing punctuation ASR adds or leaves out."""
    return _TRAILING.sub("", text.strip())


@dataclass
class Exchange:
    turn_id: str
    user: str
    assistant: str


class ChatNode(Node):
    """Base of the voice loop's LLM nodes: phrases, the `max_tokens` cut, turns and history.

    A subclass implements `deltas()` and may override `end_of_turn()`,
    `reply_now()` and `pause_for_first_audio_s()`.
    """

    input_types = TEXT
    output_types = TEXT

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._history: list[Exchange] = []  # committed
        self._window_start = 0  # the first exchange of _history the prompt carries (see _window)
        self._answers: dict[str, Exchange] = {}  # answered, not yet committed
        self._played: dict[str, str] = {}  # what was played of an interrupted reply still being answered
        self._waiting: dict[str, TextData] = {}  # speculative texts to answer once committed
        self._committed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock: asyncio.Lock | None = None  # one reply at a time: a conversation is sequential
        self._cut = False  # stop the completion under way (to continue it later)
        self._first_audio: tuple[str, asyncio.Event] | None = None  # a paused reply waiting for its audio

    # ------------------------------------------------------------ what a subclass supplies

    def deltas(self, user: str, received: str, max_tokens: int, turn: str,
               finish: list[str | None]) -> AsyncIterator[str]:
        """The text pieces of one streamed reply to `user`, continuing `received` (the reply so
        far, "" unless a paused reply goes on); stops early once `self._cut` is set or the turn
        is superseded. Appends the completion's finish reason to `finish` ("stop", "length";
        None when it was stopped)."""
        raise NotImplementedError

    async def end_of_turn(self, user: str) -> float | None:
        """P(the user's message ends after `user`), or None: this node does not score."""
        return None

    def reply_now(self, probability: float | None) -> bool:
        """Whether a speculative text with this end-of-turn score is answered before its commit."""
        return True

    def pause_for_first_audio_s(self) -> float:
        """How long a reply waits, after its first phrase, for TTS to start speaking (0 = never)."""
        return 0.0

    # ------------------------------------------------------------ the conversation

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

    def _keep(self, ex: Exchange) -> None:
        self._history.append(ex)
        if len(self._history) > 100:
            drop = len(self._history) - 100
            del self._history[:drop]
            self._window_start = max(0, self._window_start - drop)

    # ------------------------------------------------------------ turns

    async def process(self, frame: RuntimeData) -> AsyncIterator[RuntimeData]:
        if not isinstance(frame, TextData):
            raise TypeValidationError(f"{self.node_type} takes text, got {frame.kind.name.lower()}",
                                      node_id=self.node_id)
        if frame.metadata.get("reset") == "true":  # the client starts the conversation over
            self._history.clear()
            self._window_start = 0
            self._answers.clear()
        user = user_words(frame.text)
        turn = turn_of(frame)
        if not user or self.superseded(turn):
            return
        if turn and frame.metadata.get("speculative") == "1" and turn not in self._committed:
            # a sentence the user is still building is not a finished turn, whatever a model says
            # (and a node without a model of its own can still say that much)
            if unfinished(frame.text):
                prob: float | None = 0.0
            elif opener(frame.text):
                prob = OPENER_EOU
            else:
                prob = await self.end_of_turn(user)
                if prob is not None and prob < SENTENCE_END_MAX_EOU and _ENDS_SENTENCE.search(frame.text.strip()):
                    prob = min(SENTENCE_END_MAX_EOU, prob * float(self.params.get("sentence_end_factor", 1.0)))
            if prob is not None:
                yield self.turn_event("eou", turn, probability=round(prob, 6))
            if not self.reply_now(prob) and turn not in self._committed:
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
                return self._answer(waiting, user_words(waiting.text))
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

    # ------------------------------------------------------------ phrases

    async def _complete(self, frame: TextData, user: str, reply: list[str]) -> AsyncIterator[TextData]:
        """Stream the reply to `user` as phrases (what was sent goes into `reply`).

        With a pause for the first audio, the completion is stopped once the
        first phrase is out and continued when TTS says it is speaking: on a
        small machine the rest of the reply would otherwise take the cores
        from the first phrase's synthesis.
        """
        turn = turn_of(frame)
        base = {**frame.metadata, "transcript": frame.text.strip()}
        min_words = int(self.params.get("min_phrase_words", 3))
        max_words = int(self.params.get("max_phrase_words", 14))
        first_max = int(self.params.get("first_phrase_max_words", 6))
        pause_s = self.pause_for_first_audio_s() if turn else 0.0
        budget = int(self.params.get("max_tokens", 64))
        received, buffer, index, first_ms, t0 = "", "", 0, None, time.perf_counter()
        sentence_ended, finish = False, None

        def phrase(text: str, final: bool, **extra: str) -> TextData:
            nonlocal index
            meta = {**base, "phrase_index": str(index), "llm_first_token_ms": f"{first_ms or 0:.1f}", **extra}
            if final:
                meta["final"] = "1"
            index += 1
            return TextData(text, language=frame.language, metadata=meta)

        while budget > 0:
            self._cut = False
            finished: list[str | None] = []
            held: list[TextData] = []  # phrases found after the cut, sent once the completion stopped
            async for delta in self.deltas(user, received, budget, turn, finished):
                first_ms = first_ms if first_ms is not None else (time.perf_counter() - t0) * 1000
                received, buffer, budget = received + delta, buffer + delta, budget - 1
                while (split := split_phrase(buffer, *self._cuts(index, budget, min_words, max_words,
                                                                 first_max))) is not None:
                    text, buffer = split
                    reply.append(text)
                    sentence_ended = sentence_ended or _ENDS_SENTENCE.search(text) is not None
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
            finish = finished[0] if finished else None
            if not self._cut or finish is not None or self.superseded(turn):
                break  # the reply ended (or the turn did)
            await self._wait_for_first_audio(turn, pause_s)
        # a pause spent the budget, or the model's own cap stopped it ("length")
        capped = finish == "length" or budget <= 0
        tail = buffer.strip()
        if capped and sentence_ended:
            tail = ""  # an unfinished sentence past the last one that ended: not spoken
        if tail:
            reply.append(tail)
        extra = {"max_tokens_reached": "1"} if capped else {}
        marker = self.params.get("end_marker", "")
        if marker:
            if tail:
                yield phrase(tail, final=False)
            yield phrase(marker, final=True, **extra)
        else:
            yield phrase(tail, final=True, **extra)  # the final marker, even when empty

    @staticmethod
    def _cuts(index: int, budget: int, min_words: int, max_words: int, first_max: int) -> tuple[int, int]:
        """(min words at a clause end, max words without punctuation) of the next phrase.

        The first phrase is cut soonest (TTS starts on it). Within the last
        phrase's worth of tokens of `max_tokens` (~4 tokens to 3 words), a
        phrase is cut at a sentence end only: the sentence may not end before
        the cap, and then none of it is spoken. It costs nothing audible: the
        reply is generated faster than it is spoken, so TTS is still busy
        with the phrases before it.
        """
        if index == 0:
            return min(min_words, 2), first_max
        if budget <= max_words * 4 // 3:
            return _NEVER, _NEVER
        return min_words, max_words

    async def _wait_for_first_audio(self, turn: str, timeout_s: float) -> None:
        event = asyncio.Event()
        self._first_audio = (turn, event)
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            self._first_audio = None
