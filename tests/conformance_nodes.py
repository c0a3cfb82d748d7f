"""Nodes for the executor conformance suite (tests/test_conformance.py).

They live in the tests' folder on purpose, as a user's own nodes live in an
app's folder: a node process must import them by module name from the
embedding app's import path. Each exercises one form of the node contract
(engine.node): a list of outputs of every kind, sync and async generators,
an async process(), failures of every kind at every stage, bad returns.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from engine.data import JsonData, RuntimeData, TextData
from engine.errors import (
    InternalError,
    NodeExecutionError,
    ResourceLimitError,
    TypeValidationError,
    ValidationError,
)
from engine.node import Node


def _text(frame: RuntimeData) -> str:
    return frame.text if isinstance(frame, TextData) else frame.kind.name.lower()


class _Conformance(Node):
    multiprocess = True
    blocking = True
    params_schema = {"type": "object", "properties": {}, "additionalProperties": False}

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self.count = 0


class ListNode(_Conformance):
    """Per input, a list of five outputs: the input itself, then text, JSON,
    tensor and audio frames (the last two written in place). A text input
    "skip" gives nothing. The text output sets its own sequence and source,
    which the node's host must overwrite. Flush: a JSON count."""

    node_type = "ConformanceListNode"

    def process(self, frame: RuntimeData) -> list[RuntimeData] | None:
        if _text(frame) == "skip":
            return None
        self.count += 1
        n = self.count
        text = TextData(f"{self.node_id}:{_text(frame)}", language="en",
                        metadata={"n": str(n), "from": frame.kind.name}, timestamp_us=1000 + n,
                        sequence=10_000 + n, source="not-this-node")
        tensor = self.new_tensor((2, 3), np.int32, layout="HW")
        tensor.array[...] = np.arange(6, dtype=np.int32).reshape(2, 3) * n
        audio = self.new_audio(8, 16000, channels=2)
        audio.samples[:] = np.linspace(-1, 1, 8, dtype=np.float32) / n
        return [frame, text, JsonData({"n": n, "text": _text(frame), "nested": {"list": [1, 2.5, None]}},
                                      schema_type="conformance"), tensor, audio]

    def flush(self) -> JsonData:
        return JsonData({"seen": self.count})


class SyncGenNode(_Conformance):
    """A sync generator: `n` text outputs per input (n = the input's text
    length, at most 5); flush yields two more."""

    node_type = "ConformanceSyncGenNode"

    def process(self, frame: RuntimeData):  # noqa: ANN201 - a generator of frames
        for i in range(min(5, len(_text(frame)))):
            yield TextData(f"{_text(frame)}#{i}", metadata={"i": str(i)})

    def flush(self):  # noqa: ANN201
        yield TextData("flushed#0")
        yield None  # skipped by the host
        yield TextData("flushed#1")


class AsyncGenNode(_Conformance):
    """An async generator that yields to the loop between outputs; flush too."""

    node_type = "ConformanceAsyncGenNode"

    async def process(self, frame: RuntimeData):  # noqa: ANN201 - an async generator of frames
        for i in range(3):
            await asyncio.sleep(0)
            yield JsonData({"input": _text(frame), "i": i})

    async def flush(self):  # noqa: ANN201
        await asyncio.sleep(0)
        yield TextData("async flushed")


class AsyncNode(_Conformance):
    """An async process() that returns one frame (None for "skip"); async initialize."""

    node_type = "ConformanceAsyncNode"

    async def initialize(self) -> None:
        await asyncio.sleep(0)
        self.prefix = f"{self.node_id}>"

    async def process(self, frame: RuntimeData) -> TextData | None:
        await asyncio.sleep(0)
        if _text(frame) == "skip":
            return None
        return TextData(self.prefix + _text(frame).upper())


#: what FailNode raises, by the `error` param
ERRORS: dict[str, Any] = {
    "RuntimeError": RuntimeError,
    "TypeValidationError": TypeValidationError,
    "ResourceLimitError": ResourceLimitError,
    "InternalError": InternalError,
    "ValidationError": ValidationError,
    "NodeExecutionError": NodeExecutionError,
}


class FailNode(_Conformance):
    """Raises `error` in `stage` (initialize, process or flush). Until then it
    keeps its inputs and emits nothing, so the failure is all that comes out."""

    node_type = "ConformanceFailNode"
    params_schema = {
        "type": "object",
        "properties": {
            "stage": {"enum": ["initialize", "process", "flush"]},
            "error": {"enum": sorted(ERRORS)},
        },
        "required": ["stage", "error"],
        "additionalProperties": False,
    }

    def _fail(self, stage: str) -> None:
        if self.params["stage"] == stage:
            raise ERRORS[self.params["error"]](f"{self.node_id} fails in {stage} on purpose "
                                               f"after {self.count} items")

    def initialize(self) -> None:
        self._fail("initialize")

    def process(self, frame: RuntimeData) -> None:
        self._fail("process")
        self.count += 1

    def flush(self) -> None:
        self._fail("flush")


class BadReturnNode(_Conformance):
    """process() returns what a node must not: `returns` says what."""

    node_type = "ConformanceBadReturnNode"
    params_schema = {
        "type": "object",
        "properties": {"returns": {"enum": ["int", "ndarray", "list_of_str"]}},
        "required": ["returns"],
        "additionalProperties": False,
    }

    def process(self, frame: RuntimeData) -> Any:
        what = self.params["returns"]
        if what == "int":
            return 42
        if what == "ndarray":
            return np.zeros(4, np.float64)
        return ["not", "frames"]


NODES: list[type[Node]] = [ListNode, SyncGenNode, AsyncGenNode, AsyncNode, FailNode, BadReturnNode]
