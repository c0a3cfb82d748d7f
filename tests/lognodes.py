"""Nodes for tests/test_node_logs.py: they speak in every way a node can.

Importable by node processes (the zygote is given the test run's sys.path).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import warnings

from engine.data import RuntimeData
from engine.node import Node

log = logging.getLogger("lognodes.chatty")


class ChattyNode(Node):
    """Logs, warns and prints (Python and C) on initialize() and per frame; echoes."""

    node_type = "LogChattyNode"
    multiprocess = True
    blocking = True
    params_schema = {"type": "object", "properties": {}, "additionalProperties": False}

    def initialize(self) -> None:
        log.info("loading for %s", self.node_id)

    def process(self, frame: RuntimeData) -> RuntimeData:
        text = frame.text  # type: ignore[attr-defined]
        log.info("got %s", text)
        warnings.warn(f"careful with {text}", stacklevel=1)
        print(f"printed {text}")
        print(f"to stderr {text}", file=sys.stderr)
        os.write(1, f"fd 1 {text}\n".encode())
        ctypes.CDLL(None).puts(f"C puts {text}".encode())
        try:
            raise ValueError(text)
        except ValueError:
            log.exception("failed on purpose with %s", text)
        return frame


class FloodNode(Node):
    """Logs and prints `lines` times per frame, as fast as it can; echoes."""

    node_type = "LogFloodNode"
    multiprocess = True
    blocking = True
    params_schema = {
        "type": "object",
        "properties": {"lines": {"type": "integer", "minimum": 0, "default": 20_000}},
        "additionalProperties": False,
    }

    def process(self, frame: RuntimeData) -> RuntimeData:
        flood = logging.getLogger("lognodes.flood")
        for i in range(self.params["lines"]):
            flood.info("record %d", i)
            print("line", i)
        return frame
