from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_FORMAT_UNSPECIFIED: _ClassVar[AudioFormat]
    AUDIO_FORMAT_F32: _ClassVar[AudioFormat]
    AUDIO_FORMAT_I16: _ClassVar[AudioFormat]
    AUDIO_FORMAT_I32: _ClassVar[AudioFormat]

class PixelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_FORMAT_UNSPECIFIED: _ClassVar[PixelFormat]
    PIXEL_FORMAT_RGB24: _ClassVar[PixelFormat]
    PIXEL_FORMAT_RGBA32: _ClassVar[PixelFormat]
    PIXEL_FORMAT_YUV420P: _ClassVar[PixelFormat]
    PIXEL_FORMAT_GRAY8: _ClassVar[PixelFormat]

class TensorDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_DTYPE_UNSPECIFIED: _ClassVar[TensorDtype]
    TENSOR_DTYPE_F32: _ClassVar[TensorDtype]
    TENSOR_DTYPE_F16: _ClassVar[TensorDtype]
    TENSOR_DTYPE_I32: _ClassVar[TensorDtype]
    TENSOR_DTYPE_I8: _ClassVar[TensorDtype]
    TENSOR_DTYPE_U8: _ClassVar[TensorDtype]

class DataTypeHint(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_HINT_UNSPECIFIED: _ClassVar[DataTypeHint]
    DATA_TYPE_HINT_AUDIO: _ClassVar[DataTypeHint]
    DATA_TYPE_HINT_VIDEO: _ClassVar[DataTypeHint]
    DATA_TYPE_HINT_TENSOR: _ClassVar[DataTypeHint]
    DATA_TYPE_HINT_JSON: _ClassVar[DataTypeHint]
    DATA_TYPE_HINT_TEXT: _ClassVar[DataTypeHint]
    DATA_TYPE_HINT_BINARY: _ClassVar[DataTypeHint]
    DATA_TYPE_HINT_ANY: _ClassVar[DataTypeHint]

class ErrorType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_TYPE_UNSPECIFIED: _ClassVar[ErrorType]
    ERROR_TYPE_VALIDATION: _ClassVar[ErrorType]
    ERROR_TYPE_NODE_EXECUTION: _ClassVar[ErrorType]
    ERROR_TYPE_RESOURCE_LIMIT: _ClassVar[ErrorType]
    ERROR_TYPE_AUTHENTICATION: _ClassVar[ErrorType]
    ERROR_TYPE_VERSION_MISMATCH: _ClassVar[ErrorType]
    ERROR_TYPE_INTERNAL: _ClassVar[ErrorType]
    ERROR_TYPE_TYPE_VALIDATION: _ClassVar[ErrorType]

class ExecutionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXECUTION_STATUS_UNSPECIFIED: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_SUCCESS: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_PARTIAL_SUCCESS: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_FAILED: _ClassVar[ExecutionStatus]

class NodeStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATUS_UNSPECIFIED: _ClassVar[NodeStatus]
    NODE_STATUS_SUCCESS: _ClassVar[NodeStatus]
    NODE_STATUS_SKIPPED: _ClassVar[NodeStatus]
    NODE_STATUS_FAILED: _ClassVar[NodeStatus]
AUDIO_FORMAT_UNSPECIFIED: AudioFormat
AUDIO_FORMAT_F32: AudioFormat
AUDIO_FORMAT_I16: AudioFormat
AUDIO_FORMAT_I32: AudioFormat
PIXEL_FORMAT_UNSPECIFIED: PixelFormat
PIXEL_FORMAT_RGB24: PixelFormat
PIXEL_FORMAT_RGBA32: PixelFormat
PIXEL_FORMAT_YUV420P: PixelFormat
PIXEL_FORMAT_GRAY8: PixelFormat
TENSOR_DTYPE_UNSPECIFIED: TensorDtype
TENSOR_DTYPE_F32: TensorDtype
TENSOR_DTYPE_F16: TensorDtype
TENSOR_DTYPE_I32: TensorDtype
TENSOR_DTYPE_I8: TensorDtype
TENSOR_DTYPE_U8: TensorDtype
DATA_TYPE_HINT_UNSPECIFIED: DataTypeHint
DATA_TYPE_HINT_AUDIO: DataTypeHint
DATA_TYPE_HINT_VIDEO: DataTypeHint
DATA_TYPE_HINT_TENSOR: DataTypeHint
DATA_TYPE_HINT_JSON: DataTypeHint
DATA_TYPE_HINT_TEXT: DataTypeHint
DATA_TYPE_HINT_BINARY: DataTypeHint
DATA_TYPE_HINT_ANY: DataTypeHint
ERROR_TYPE_UNSPECIFIED: ErrorType
ERROR_TYPE_VALIDATION: ErrorType
ERROR_TYPE_NODE_EXECUTION: ErrorType
ERROR_TYPE_RESOURCE_LIMIT: ErrorType
ERROR_TYPE_AUTHENTICATION: ErrorType
ERROR_TYPE_VERSION_MISMATCH: ErrorType
ERROR_TYPE_INTERNAL: ErrorType
ERROR_TYPE_TYPE_VALIDATION: ErrorType
EXECUTION_STATUS_UNSPECIFIED: ExecutionStatus
EXECUTION_STATUS_SUCCESS: ExecutionStatus
EXECUTION_STATUS_PARTIAL_SUCCESS: ExecutionStatus
EXECUTION_STATUS_FAILED: ExecutionStatus
NODE_STATUS_UNSPECIFIED: NodeStatus
NODE_STATUS_SUCCESS: NodeStatus
NODE_STATUS_SKIPPED: NodeStatus
NODE_STATUS_FAILED: NodeStatus

class DataBuffer(_message.Message):
    __slots__ = ("audio", "video", "tensor", "json", "text", "binary", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BINARY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    audio: AudioBuffer
    video: VideoFrame
    tensor: TensorBuffer
    json: JsonData
    text: TextBuffer
    binary: BinaryBuffer
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, audio: _Optional[_Union[AudioBuffer, _Mapping]] = ..., video: _Optional[_Union[VideoFrame, _Mapping]] = ..., tensor: _Optional[_Union[TensorBuffer, _Mapping]] = ..., json: _Optional[_Union[JsonData, _Mapping]] = ..., text: _Optional[_Union[TextBuffer, _Mapping]] = ..., binary: _Optional[_Union[BinaryBuffer, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AudioBuffer(_message.Message):
    __slots__ = ("samples", "sample_rate", "channels", "format", "num_samples")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: bytes
    sample_rate: int
    channels: int
    format: AudioFormat
    num_samples: int
    def __init__(self, samples: _Optional[bytes] = ..., sample_rate: _Optional[int] = ..., channels: _Optional[int] = ..., format: _Optional[_Union[AudioFormat, str]] = ..., num_samples: _Optional[int] = ...) -> None: ...

class VideoFrame(_message.Message):
    __slots__ = ("pixel_data", "width", "height", "format", "frame_number", "timestamp_us")
    PIXEL_DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FRAME_NUMBER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    pixel_data: bytes
    width: int
    height: int
    format: PixelFormat
    frame_number: int
    timestamp_us: int
    def __init__(self, pixel_data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., format: _Optional[_Union[PixelFormat, str]] = ..., frame_number: _Optional[int] = ..., timestamp_us: _Optional[int] = ...) -> None: ...

class TensorBuffer(_message.Message):
    __slots__ = ("data", "shape", "dtype", "layout")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: TensorDtype
    layout: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[TensorDtype, str]] = ..., layout: _Optional[str] = ...) -> None: ...

class JsonData(_message.Message):
    __slots__ = ("json_payload", "schema_type")
    JSON_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_TYPE_FIELD_NUMBER: _ClassVar[int]
    json_payload: str
    schema_type: str
    def __init__(self, json_payload: _Optional[str] = ..., schema_type: _Optional[str] = ...) -> None: ...

class TextBuffer(_message.Message):
    __slots__ = ("text_data", "encoding", "language")
    TEXT_DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    text_data: bytes
    encoding: str
    language: str
    def __init__(self, text_data: _Optional[bytes] = ..., encoding: _Optional[str] = ..., language: _Optional[str] = ...) -> None: ...

class BinaryBuffer(_message.Message):
    __slots__ = ("data", "mime_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ...) -> None: ...

class ExecutionMetrics(_message.Message):
    __slots__ = ("wall_time_ms", "cpu_time_ms", "memory_used_bytes", "node_metrics", "serialization_time_ms", "proto_to_runtime_ms", "runtime_to_proto_ms", "data_type_breakdown")
    class NodeMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: NodeMetrics
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[NodeMetrics, _Mapping]] = ...) -> None: ...
    class DataTypeBreakdownEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    WALL_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    CPU_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    NODE_METRICS_FIELD_NUMBER: _ClassVar[int]
    SERIALIZATION_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    PROTO_TO_RUNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_TO_PROTO_MS_FIELD_NUMBER: _ClassVar[int]
    DATA_TYPE_BREAKDOWN_FIELD_NUMBER: _ClassVar[int]
    wall_time_ms: float
    cpu_time_ms: float
    memory_used_bytes: int
    node_metrics: _containers.MessageMap[str, NodeMetrics]
    serialization_time_ms: float
    proto_to_runtime_ms: float
    runtime_to_proto_ms: float
    data_type_breakdown: _containers.ScalarMap[str, int]
    def __init__(self, wall_time_ms: _Optional[float] = ..., cpu_time_ms: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., node_metrics: _Optional[_Mapping[str, NodeMetrics]] = ..., serialization_time_ms: _Optional[float] = ..., proto_to_runtime_ms: _Optional[float] = ..., runtime_to_proto_ms: _Optional[float] = ..., data_type_breakdown: _Optional[_Mapping[str, int]] = ...) -> None: ...

class NodeMetrics(_message.Message):
    __slots__ = ("execution_time_ms", "memory_bytes", "items_processed", "custom_metrics")
    EXECUTION_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ITEMS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_METRICS_FIELD_NUMBER: _ClassVar[int]
    execution_time_ms: float
    memory_bytes: int
    items_processed: int
    custom_metrics: str
    def __init__(self, execution_time_ms: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., items_processed: _Optional[int] = ..., custom_metrics: _Optional[str] = ...) -> None: ...

class ErrorResponse(_message.Message):
    __slots__ = ("error_type", "message", "failing_node_id", "context", "stack_trace")
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAILING_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    STACK_TRACE_FIELD_NUMBER: _ClassVar[int]
    error_type: ErrorType
    message: str
    failing_node_id: str
    context: str
    stack_trace: str
    def __init__(self, error_type: _Optional[_Union[ErrorType, str]] = ..., message: _Optional[str] = ..., failing_node_id: _Optional[str] = ..., context: _Optional[str] = ..., stack_trace: _Optional[str] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("protocol_version", "runtime_version", "supported_node_types", "supported_protocols", "build_timestamp")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_NODE_TYPES_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_PROTOCOLS_FIELD_NUMBER: _ClassVar[int]
    BUILD_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    protocol_version: str
    runtime_version: str
    supported_node_types: _containers.RepeatedScalarFieldContainer[str]
    supported_protocols: _containers.RepeatedScalarFieldContainer[str]
    build_timestamp: str
    def __init__(self, protocol_version: _Optional[str] = ..., runtime_version: _Optional[str] = ..., supported_node_types: _Optional[_Iterable[str]] = ..., supported_protocols: _Optional[_Iterable[str]] = ..., build_timestamp: _Optional[str] = ...) -> None: ...

class ResourceLimits(_message.Message):
    __slots__ = ("max_memory_bytes", "max_timeout_ms", "max_audio_samples")
    MAX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_AUDIO_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    max_memory_bytes: int
    max_timeout_ms: int
    max_audio_samples: int
    def __init__(self, max_memory_bytes: _Optional[int] = ..., max_timeout_ms: _Optional[int] = ..., max_audio_samples: _Optional[int] = ...) -> None: ...

class NodeResult(_message.Message):
    __slots__ = ("node_id", "status", "error", "output_metadata")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_METADATA_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    status: NodeStatus
    error: ErrorResponse
    output_metadata: str
    def __init__(self, node_id: _Optional[str] = ..., status: _Optional[_Union[NodeStatus, str]] = ..., error: _Optional[_Union[ErrorResponse, _Mapping]] = ..., output_metadata: _Optional[str] = ...) -> None: ...
