"""remotemedia-engine: real-time media and AI pipelines, Python nodes in their
own processes, frames over shared memory, the remotemedia.v1 gRPC protocol."""

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

__version__ = "0.1.0"

__all__ = [
    "AudioData", "BinaryData", "DataKind", "Engine", "EngineError", "ErrorType",
    "ExecutionResult", "InitProgress", "InternalError", "JsonData", "Node",
    "NodeExecutionError", "Output", "PixelFormat", "ResourceLimitError", "RuntimeData",
    "SampleFormat", "Session", "TensorData", "TensorDtype", "TextData",
    "TypeValidationError", "ValidationError", "VideoData", "__version__",
]
