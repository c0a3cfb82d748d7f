"""remotemedia-engine: real-time media and AI pipelines, Python nodes in their
own processes, frames over shared memory, the remotemedia.v1 gRPC protocol.

The names below are imported on first use (PEP 562), so a node process,
which imports `engine.node` and `engine.data`, does not load the engine,
the manifest validator or the gRPC layer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name → the module that defines it
_EXPORTS = {
    **dict.fromkeys(("AudioData", "BinaryData", "DataKind", "JsonData", "PixelFormat", "RuntimeData",
                     "SampleFormat", "TensorData", "TensorDtype", "TextData", "VideoData"), "data"),
    **dict.fromkeys(("Engine", "ExecutionResult"), "engine"),
    **dict.fromkeys(("EngineError", "ErrorType", "InternalError", "NodeExecutionError",
                     "ResourceLimitError", "TypeValidationError", "ValidationError"), "errors"),
    "Node": "node",
    **dict.fromkeys(("InitProgress", "Output", "Session"), "session"),
}

__all__ = [
    "AudioData", "BinaryData", "DataKind", "Engine", "EngineError", "ErrorType",
    "ExecutionResult", "InitProgress", "InternalError", "JsonData", "Node",
    "NodeExecutionError", "Output", "PixelFormat", "ResourceLimitError", "RuntimeData",
    "SampleFormat", "Session", "TensorData", "TensorDtype", "TextData",
    "TypeValidationError", "ValidationError", "VideoData", "__version__",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from .data import (
        AudioData,
        BinaryData,
        DataKind,
        JsonData,
        PixelFormat,
        RuntimeData,
        SampleFormat,
        TensorData,
        TensorDtype,
        TextData,
        VideoData,
    )
    from .engine import Engine, ExecutionResult
    from .errors import (
        EngineError,
        ErrorType,
        InternalError,
        NodeExecutionError,
        ResourceLimitError,
        TypeValidationError,
        ValidationError,
    )
    from .node import Node
    from .session import InitProgress, Output, Session
