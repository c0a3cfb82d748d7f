"""General-purpose nodes."""

from __future__ import annotations

from engine.data import RuntimeData
from engine.node import Node


class PassThroughNode(Node):
    """Emits every input unchanged."""

    node_type = "PassThroughNode"
    params_schema = {"type": "object", "properties": {}, "additionalProperties": True}

    def process(self, frame: RuntimeData) -> RuntimeData:
        return frame
