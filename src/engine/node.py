"""The node contract shared by native and process execution.

A node class declares its type name, whether it runs in its own process by
default, its input/output data kinds and a JSON Schema for its params, and
implements:

- `initialize()`  load models; may call `self.report_progress(...)`;
- `process(frame)` returns None, one frame, a list of frames, or an async
  generator of frames (streaming nodes); may be sync or async;
- `flush()`        end of stream: emit what is buffered (same return forms);
- `cleanup()`      release resources;
- `on_turn_event(event)` (optional) another node of the session sent a turn
  event (see engine.turns); same return forms as process().

A node that computes a large output can ask for the frame first
(`new_tensor`, `new_audio`) and write its result into it: in a node process
the array lies in the shared-memory sample that will carry it, so returning
it sends it without a copy, whatever its size.

The same class runs in the engine process or in a worker process; outputs
must be identical either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .data import AudioData, DataKind, JsonData, RuntimeData, TensorData
from .turns import TurnEvent, TurnLedger

ProgressCallback = Callable[[str, float, str], None]


@dataclass(frozen=True)
class ParamUnavailable:
    """Why a node cannot run here when the cause is one param's value (a model
    name that is not installed, a path that holds no model): what `unavailable()`
    returns instead of a plain string, so that validation reports the problem at
    that param, naming it."""

    param: str
    reason: str

    def __str__(self) -> str:
        return f"param {self.param!r}: {self.reason}"


class FrameMemory:
    """Where a node's new output frames live: the heap. A node process
    installs one that lends shared memory instead (see ipc.loans.LoanedMemory)."""

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.empty(shape, dtype)


HEAP = FrameMemory()


class Node:
    node_type: ClassVar[str] = ""
    #: run in a worker process by default (the multiprocess executor)
    multiprocess: ClassVar[bool] = False
    #: a manifest's `executor` field may move this node to the other executor
    executor_overridable: ClassVar[bool] = True
    #: in-process execution: run sync process()/flush() in a thread
    blocking: ClassVar[bool] = False
    input_types: ClassVar[tuple[DataKind, ...]] = (DataKind.ANY,)
    output_types: ClassVar[tuple[DataKind, ...]] = (DataKind.ANY,)
    params_schema: ClassVar[dict[str, Any]] = {"type": "object"}
    #: alternative spellings of params used by existing manifests → canonical name
    param_aliases: ClassVar[dict[str, str]] = {}
    #: params existing clients send that mean nothing on this server (e.g. a
    #: `device` for a node that runs on CPU): accepted, left out of `params`,
    #: and reported once in the session's log, with why
    inert_params: ClassVar[dict[str, str]] = {}
    #: in a node process, large inputs (64 KiB and up) arrive as read-only
    #: views over the shared memory they came in, without a copy; the memory
    #: is lent until the frame is dropped, so a node that keeps many inputs
    #: gets copies past a few. Off: every input is a private, writable copy.
    zero_copy_inputs: ClassVar[bool] = False

    @classmethod
    def unavailable(cls, params: dict[str, Any]) -> str | ParamUnavailable | None:
        """Why this node cannot run on this machine with `params` (its model or a
        package is missing), said at validation before any process starts;
        None when it can. A ParamUnavailable names the param at fault (a model
        that is not installed). Must be cheap: no model is loaded here."""
        return None

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        self.node_id = node_id
        self.params = params
        self._progress: ProgressCallback | None = None
        self._memory: FrameMemory = HEAP
        #: the turns voided so far; the node's host shares its own ledger here
        self._turns = TurnLedger()

    def report_progress(self, phase: str, percent: float, message: str = "") -> None:
        """Report initialization progress to the session's caller."""
        if self._progress is not None:
            self._progress(phase, float(percent), message)

    def initialize(self) -> Any:
        """Load models and allocate resources (sync or async)."""
        return None

    def new_tensor(self, shape: Iterable[int], dtype: Any = np.float32, layout: str = "") -> TensorData:
        """An output tensor frame to fill in place (its values are uninitialized).

        Return it from process() (once) and it is sent without a copy; after
        that it belongs to the engine: do not keep or write to its array.
        """
        return TensorData(self._memory.array(tuple(int(d) for d in shape), np.dtype(dtype)), layout)

    def new_audio(self, samples: int, sample_rate: int, channels: int = 1, dtype: Any = np.float32) -> AudioData:
        """An output audio frame of `samples` interleaved samples to fill in place (see new_tensor)."""
        return AudioData(self._memory.array((int(samples),), np.dtype(dtype)), sample_rate, channels)

    def process(self, frame: RuntimeData) -> Any:
        raise NotImplementedError

    def on_turn_event(self, event: TurnEvent) -> Any:
        """Another node of the session sent a turn event (see engine.turns).

        Called ahead of the inputs queued for this node: between two frames
        for a node with a plain process(), and while a running async
        process() is waiting for an async one. Returns outputs like process().
        """
        return None

    def turn_event(self, kind: str, turn_id: str, **data: Any) -> JsonData:
        """A frame to return from process() or on_turn_event(): the event `kind`
        for `turn_id`, delivered to every other node of the session (`data`
        must be JSON values)."""
        return TurnEvent(kind, turn_id, data).frame()

    def superseded(self, turn_id: str) -> bool:
        """True once `turn_id` was cancelled or interrupted anywhere in the session:
        stop working for it (the engine drops its outputs anyway)."""
        return self._turns.is_void(turn_id)

    def flush(self) -> Any:
        """Called once at end of stream; return what is still buffered."""
        return None

    def cleanup(self) -> Any:
        return None
