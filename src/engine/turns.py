"""Turn events: small messages that every node of a session receives at once.

A conversation pipeline works in turns (a user's utterance and the reply to
it). Frames that belong to a turn carry metadata `turn_id`. A node tells the
rest of the session about a turn by returning `node.turn_event(kind,
turn_id, ...)` from process() (or from on_turn_event()); the engine does not
route that frame along the connections: it hands the event to every other
node of the session, ahead of the data queued for them (in a node process,
over its control lane), by calling `on_turn_event(event)`. Events travel
upstream as well as downstream, so a node can tell the nodes that feed it
(what part of a reply was played, say).

Two kinds void a turn: `cancel` (the turn was speculative and did not
happen) and `interrupt` (the user spoke over the reply). From then on,
everywhere in the session, queued inputs of that turn are dropped before a
node sees them, outputs of that turn are dropped instead of routed, and
`node.superseded(turn_id)` answers True, so a node that is generating for it
(an LLM between tokens, a TTS between chunks) stops. Every other kind
(`commit`, `eou`, `played`, ...) means what the nodes that send and read it
agree on; the engine only delivers it.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .data import JsonData, RuntimeData

#: the metadata key that ties a frame to its turn
TURN_ID = "turn_id"
#: the JsonData schema_type that marks a frame as a turn event
TURN_EVENT_SCHEMA = "turn_event"
#: event kinds after which a turn's work is void everywhere in the session
VOIDING = frozenset({"cancel", "interrupt"})


@dataclass(frozen=True, slots=True)
class TurnEvent:
    kind: str
    turn_id: str
    data: Mapping[str, Any] = field(default_factory=dict)
    #: the node that sent it (set by the engine)
    source: str = ""
    #: the sequence of the input that caused it (set by the engine)
    sequence: int | None = None

    @property
    def voids(self) -> bool:
        return self.kind in VOIDING

    def frame(self) -> JsonData:
        return JsonData({"kind": self.kind, "turn_id": self.turn_id, "data": dict(self.data)},
                        TURN_EVENT_SCHEMA)

    @staticmethod
    def of(frame: RuntimeData) -> TurnEvent | None:
        """The event a frame carries, or None for an ordinary frame."""
        if type(frame) is not JsonData or frame.schema_type != TURN_EVENT_SCHEMA:
            return None
        v = frame.value
        if not isinstance(v, dict) or not isinstance(v.get("kind"), str):
            return None
        return TurnEvent(v["kind"], str(v.get("turn_id", "")), v.get("data") or {},
                         frame.source or "", frame.sequence)


def turn_of(frame: RuntimeData) -> str:
    """The turn a frame belongs to ("" for none)."""
    return frame.metadata.get(TURN_ID, "") if frame.metadata else ""


class TurnLedger:
    """The turns voided so far (the most recent `keep` of them).

    One per session in the engine and one per node process; written by the
    thread that receives events, read by the node's thread (single dict
    operations, safe under the GIL).
    """

    def __init__(self, keep: int = 1024) -> None:
        self._void: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._keep = keep
        self.dropped = 0

    def note(self, event: TurnEvent) -> None:
        if event.voids and event.turn_id:
            self._void[event.turn_id] = None
            while len(self._void) > self._keep:
                self._void.popitem(last=False)

    def is_void(self, turn_id: str) -> bool:
        return bool(turn_id) and turn_id in self._void

    def passes(self, out: RuntimeData) -> bool:
        """Whether a node's output may go on: False (and counted) when its turn is
        void; a turn event the node sends is noted first, so its own cancel applies
        to it too."""
        if self.drops(out):
            return False
        if getattr(out, "schema_type", None) == TURN_EVENT_SCHEMA:
            event = TurnEvent.of(out)
            if event is not None:
                self.note(event)
        return True

    def drops(self, frame: RuntimeData) -> bool:
        """True (and counted) when `frame` belongs to a voided turn."""
        if not self._void or not frame.metadata:
            return False
        tid = frame.metadata.get(TURN_ID)
        if tid and tid in self._void:
            self.dropped += 1
            return True
        return False
