"""Nodes for tests and benchmarks (registered only with test nodes enabled).

Failure injection lives here, in the node process, not in the engine: a
CrashNode really exits, raises, kills itself or hangs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

import numpy as np
import orjson
import xxhash

from engine.data import (
    AudioData,
    BinaryData,
    JsonData,
    RuntimeData,
    TensorData,
    TextData,
    VideoData,
)
from engine.node import Node


def payload_bytes(frame: RuntimeData) -> bytes | memoryview:
    if isinstance(frame, AudioData):
        return memoryview(frame.samples).cast("B")
    if isinstance(frame, TensorData):
        return memoryview(frame.array.reshape(-1)).cast("B")
    if isinstance(frame, VideoData):
        return memoryview(frame.pixels)
    if isinstance(frame, TextData):
        return frame.text.encode("utf-8")
    if isinstance(frame, BinaryData):
        return frame.data
    if isinstance(frame, JsonData):
        return orjson.dumps(frame.value, option=orjson.OPT_SORT_KEYS)
    raise TypeError(type(frame).__name__)


def checksum(frame: RuntimeData) -> str:
    return xxhash.xxh3_64_hexdigest(payload_bytes(frame))


class _ProcessNode(Node):
    multiprocess = True
    blocking = True


class EchoNode(_ProcessNode):
    """Returns its input (large inputs lent, not copied: see Node.zero_copy_inputs)."""

    node_type = "EchoNode"
    zero_copy_inputs = True
    params_schema = {"type": "object", "properties": {}, "additionalProperties": False}

    def process(self, frame: RuntimeData) -> RuntimeData:
        return frame


class SleepNode(_ProcessNode):
    """Sleeps `sleep_ms` per item (releases the CPU), then returns the input."""

    node_type = "SleepNode"
    params_schema = {
        "type": "object",
        "properties": {"sleep_ms": {"type": "number", "minimum": 0, "maximum": 600_000, "default": 10}},
        "additionalProperties": False,
    }
    param_aliases = {"sleepMs": "sleep_ms"}

    def process(self, frame: RuntimeData) -> RuntimeData:
        time.sleep(self.params["sleep_ms"] / 1000)
        return frame


class CpuBurnNode(_ProcessNode):
    """Spends `burn_ms` of pure-Python CPU per item (holds the GIL), returns the input."""

    node_type = "CpuBurnNode"
    params_schema = {
        "type": "object",
        "properties": {"burn_ms": {"type": "number", "minimum": 0, "maximum": 600_000, "default": 10}},
        "additionalProperties": False,
    }
    param_aliases = {"burnMs": "burn_ms"}

    def process(self, frame: RuntimeData) -> RuntimeData:
        deadline = time.thread_time() + self.params["burn_ms"] / 1000
        x = 0
        while time.thread_time() < deadline:
            for i in range(200):
                x += i * i
        return frame


class CrashNode(_ProcessNode):
    """Passes `after` items through, then fails the way `mode` says."""

    node_type = "CrashNode"
    params_schema = {
        "type": "object",
        "properties": {
            "after": {"type": "integer", "minimum": 0, "default": 0},
            "mode": {"enum": ["exit", "signal", "exception", "hang"], "default": "exception"},
            "exit_code": {"type": "integer", "minimum": 1, "maximum": 255, "default": 3},
            "in_init": {"type": "boolean", "default": False},
        },
        "additionalProperties": False,
    }

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self.count = 0

    def _crash(self) -> None:
        mode = self.params["mode"]
        if mode == "exit":
            os._exit(self.params["exit_code"])
        if mode == "signal":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "hang":
            while True:  # holds the GIL, as a stuck model would
                time.sleep(0.001)
        raise RuntimeError(f"CrashNode {self.node_id} failing on purpose after {self.count} items")

    def initialize(self) -> None:
        if self.params["in_init"]:
            self._crash()

    def process(self, frame: RuntimeData) -> RuntimeData:
        if self.count >= self.params["after"]:
            self._crash()
        self.count += 1
        return frame


class SlowInitNode(_ProcessNode):
    """Takes `init_ms` to initialize, reporting progress in `steps` steps."""

    node_type = "SlowInitNode"
    params_schema = {
        "type": "object",
        "properties": {
            "init_ms": {"type": "number", "minimum": 0, "maximum": 600_000, "default": 200},
            "steps": {"type": "integer", "minimum": 1, "maximum": 100, "default": 4},
        },
        "additionalProperties": False,
    }
    param_aliases = {"initMs": "init_ms"}

    def initialize(self) -> None:
        steps = self.params["steps"]
        for i in range(steps):
            self.report_progress("loading", 100.0 * i / steps, f"step {i + 1}/{steps}")
            time.sleep(self.params["init_ms"] / 1000 / steps)
        self.report_progress("loaded", 100.0, "ready")

    def process(self, frame: RuntimeData) -> RuntimeData:
        return frame


class ChecksumNode(_ProcessNode):
    """Emits the xxh3-64 checksum of each input's payload as JSON."""

    node_type = "ChecksumNode"
    zero_copy_inputs = True
    output_types = (JsonData.kind,)
    params_schema = {"type": "object", "properties": {}, "additionalProperties": False}

    def process(self, frame: RuntimeData) -> JsonData:
        return JsonData({"checksum": checksum(frame), "kind": frame.kind.name.lower(),
                         "bytes": frame.nbytes, "pid": os.getpid()})


class InitProbeNode(_ProcessNode):
    """Says where it runs: each input → {"pid", "inits" (initialize() calls in
    this process so far), "node_id", "tag"}; logs a line per input (prewarm tests)."""

    node_type = "InitProbeNode"
    output_types = (JsonData.kind,)
    params_schema = {"type": "object", "properties": {"tag": {"type": "string", "default": ""}},
                     "additionalProperties": False}
    inits = 0

    def initialize(self) -> None:
        type(self).inits += 1
        self.report_progress("loading", 50.0, f"init {type(self).inits} in process {os.getpid()}")

    def process(self, frame: RuntimeData) -> JsonData:
        logging.getLogger("initprobe").info("probe %s handled a frame", self.node_id)
        return JsonData({"pid": os.getpid(), "inits": type(self).inits, "node_id": self.node_id,
                         "tag": self.params["tag"]})


class GenerateNode(_ProcessNode):
    """For each input, a uint8 tensor of `bytes` bytes, every byte (sequence % 251).

    With `in_place` it asks for the output frame first and fills it where it
    will be sent from (Node.new_tensor); otherwise it fills a new array that
    is then sent by copy. `meta` (optional) goes into the frame's metadata.
    """

    node_type = "GenerateNode"
    output_types = (TensorData.kind,)
    params_schema = {
        "type": "object",
        "properties": {"bytes": {"type": "integer", "minimum": 0, "maximum": 1 << 30, "default": 1024},
                       "in_place": {"type": "boolean", "default": True},
                       "meta": {"type": "string", "default": ""}},
        "additionalProperties": False,
    }

    def process(self, frame: RuntimeData) -> TensorData:
        n, value = self.params["bytes"], (frame.sequence or 0) % 251
        if self.params["in_place"]:
            out = self.new_tensor((n,), np.uint8)
        else:
            out = TensorData(np.empty(n, np.uint8))
        out.array.fill(value)
        if self.params["meta"]:
            out.metadata["note"] = self.params["meta"]
        return out


class HoldNode(_ProcessNode):
    """Keeps every input; at end of stream emits, per input, its checksum and
    whether its payload was writable (a lent input is not). With `zero_copy`
    large inputs are lent (Node.zero_copy_inputs): a node that keeps them
    must still see them intact after many later frames."""

    node_type = "HoldNode"
    output_types = (JsonData.kind,)
    params_schema = {"type": "object", "properties": {"zero_copy": {"type": "boolean", "default": True}},
                     "additionalProperties": False}

    def __init__(self, node_id: str, params: dict[str, Any]) -> None:
        super().__init__(node_id, params)
        self.zero_copy_inputs = params["zero_copy"]
        self.held: list[RuntimeData] = []

    def process(self, frame: RuntimeData) -> None:
        self.held.append(frame)

    def flush(self) -> list[JsonData]:
        out = [JsonData({"checksum": checksum(f), "writable": not memoryview(payload_bytes(f)).readonly})
               for f in self.held]
        self.held.clear()
        return out


class TurnProbeNode(Node):
    """Turn events under test (see engine.turns). Text frames addressed to this
    node (`"<node id> <command> ..."`) are commands:

    - `work TURN N`: N text outputs tagged with TURN, each after `burn_ms` of
      CPU, stopping as soon as TURN is superseded (a streaming generator);
    - `event KIND TURN`: sends that turn event;
    - `tagged TURN`: one text output tagged with TURN.

    Every other frame passes through. Each event it receives comes out as
    JSON {"saw": kind, "turn_id": ..., "source": ..., "data": ...}, so a test
    sees what reached it; an event of kind `fail` makes it raise. Async, so events arrive while a `work` runs; with
    `executor: native` the same class runs in the engine.
    """

    node_type = "TurnProbeNode"
    multiprocess = True
    params_schema = {
        "type": "object",
        "properties": {"burn_ms": {"type": "number", "minimum": 0, "maximum": 1000, "default": 5}},
        "additionalProperties": False,
    }

    async def process(self, frame: RuntimeData):  # noqa: ANN201 - an async generator of frames
        words = frame.text.split() if isinstance(frame, TextData) else []
        if len(words) < 2 or words[0] != self.node_id:
            yield frame
            return
        command, args = words[1], words[2:]
        if command == "event":
            yield self.turn_event(args[0], args[1], sent_by=self.node_id)
        elif command == "tagged":
            yield TextData(f"{self.node_id}:{args[0]}", metadata={"turn_id": args[0]})
        elif command == "work":
            turn, n = args[0], int(args[1])
            for i in range(n):
                if self.superseded(turn):
                    return
                deadline = time.thread_time() + self.params["burn_ms"] / 1000
                while time.thread_time() < deadline:
                    pass
                yield TextData(f"{turn}:{i}", metadata={"turn_id": turn})
                await asyncio.sleep(0)  # lets an arriving event in between two steps

    def on_turn_event(self, event: Any) -> JsonData:
        if event.kind == "fail":
            raise RuntimeError(f"asked to fail by {event.source}")
        return JsonData({"saw": event.kind, "turn_id": event.turn_id, "source": event.source,
                         "data": dict(event.data), "at": self.node_id})
