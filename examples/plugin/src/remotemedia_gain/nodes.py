"""GainNode: audio times a gain, in a node process of its own.

The module imports only what the node needs (the engine's node contract,
its data types and errors, numpy): node processes preload it from the
zygote, so whatever it imports at the top every node process pays for.
"""

from __future__ import annotations

import numpy as np

from engine.data import AudioData, DataKind, RuntimeData
from engine.errors import NodeExecutionError, TypeValidationError
from engine.node import Node


class GainNode(Node):
    """Multiplies float32 audio by `gain`; a result past full scale fails (or saturates)."""

    node_type = "GainNode"
    #: its own process by default; a manifest's `executor: "native"` may move it in
    multiprocess = True
    input_types = (DataKind.AUDIO,)
    output_types = (DataKind.AUDIO,)
    params_schema = {
        "type": "object",
        "properties": {
            "gain": {"type": "number", "default": 1.0, "description": "factor applied to every sample"},
            "on_clip": {
                "enum": ["error", "saturate"],
                "default": "error",
                "description": "a sample past full scale (|x| > 1): fail the node, or limit it to ±1",
            },
        },
        "additionalProperties": False,
    }

    def initialize(self) -> None:
        self.gain = float(self.params.get("gain", 1.0))
        self.saturate = self.params.get("on_clip", "error") == "saturate"

    def process(self, frame: RuntimeData) -> AudioData:
        if not isinstance(frame, AudioData):
            raise TypeValidationError(f"GainNode takes audio, got {frame.kind.name.lower()}",
                                      node_id=self.node_id)
        if frame.samples.dtype != np.float32:
            raise TypeValidationError(f"GainNode takes float32 audio, got {frame.samples.dtype}",
                                      node_id=self.node_id)
        # The output frame is asked for first and written in place: in a node
        # process it lies in the shared memory that carries it back.
        out = self.new_audio(frame.samples.size, frame.sample_rate, frame.channels)
        np.multiply(frame.samples, np.float32(self.gain), out=out.samples)
        if self.saturate:
            np.clip(out.samples, -1.0, 1.0, out=out.samples)
        elif out.samples.size and (peak := float(np.abs(out.samples).max())) > 1.0:
            raise NodeExecutionError(
                f"gain {self.gain:g} clips the audio (peak {peak:.2f} > 1.0); lower the gain "
                'or set on_clip = "saturate"', node_id=self.node_id)
        return out
