from . import common_pb2 as _common_pb2
from . import execution_pb2 as _execution_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamErrorType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_ERROR_UNSPECIFIED: _ClassVar[StreamErrorType]
    STREAM_ERROR_INIT_REQUIRED: _ClassVar[StreamErrorType]
    STREAM_ERROR_INVALID_SEQUENCE: _ClassVar[StreamErrorType]
    STREAM_ERROR_BUFFER_OVERFLOW: _ClassVar[StreamErrorType]
    STREAM_ERROR_TIMEOUT: _ClassVar[StreamErrorType]
    STREAM_ERROR_CLIENT_DISCONNECT: _ClassVar[StreamErrorType]
    STREAM_ERROR_EXECUTION: _ClassVar[StreamErrorType]
STREAM_ERROR_UNSPECIFIED: StreamErrorType
STREAM_ERROR_INIT_REQUIRED: StreamErrorType
STREAM_ERROR_INVALID_SEQUENCE: StreamErrorType
STREAM_ERROR_BUFFER_OVERFLOW: StreamErrorType
STREAM_ERROR_TIMEOUT: StreamErrorType
STREAM_ERROR_CLIENT_DISCONNECT: StreamErrorType
STREAM_ERROR_EXECUTION: StreamErrorType

class StreamRequest(_message.Message):
    __slots__ = ("init", "data_chunk", "audio_chunk", "control")
    INIT_FIELD_NUMBER: _ClassVar[int]
    DATA_CHUNK_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CHUNK_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    init: StreamInit
    data_chunk: DataChunk
    audio_chunk: AudioChunk
    control: StreamControl
    def __init__(self, init: _Optional[_Union[StreamInit, _Mapping]] = ..., data_chunk: _Optional[_Union[DataChunk, _Mapping]] = ..., audio_chunk: _Optional[_Union[AudioChunk, _Mapping]] = ..., control: _Optional[_Union[StreamControl, _Mapping]] = ...) -> None: ...

class StreamInit(_message.Message):
    __slots__ = ("manifest", "data_inputs", "resource_limits", "client_version", "expected_chunk_size")
    class DataInputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.DataBuffer
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.DataBuffer, _Mapping]] = ...) -> None: ...
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DATA_INPUTS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    manifest: _execution_pb2.PipelineManifest
    data_inputs: _containers.MessageMap[str, _common_pb2.DataBuffer]
    resource_limits: _common_pb2.ResourceLimits
    client_version: str
    expected_chunk_size: int
    def __init__(self, manifest: _Optional[_Union[_execution_pb2.PipelineManifest, _Mapping]] = ..., data_inputs: _Optional[_Mapping[str, _common_pb2.DataBuffer]] = ..., resource_limits: _Optional[_Union[_common_pb2.ResourceLimits, _Mapping]] = ..., client_version: _Optional[str] = ..., expected_chunk_size: _Optional[int] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("node_id", "buffer", "named_buffers", "sequence", "timestamp_ms")
    class NamedBuffersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.DataBuffer
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.DataBuffer, _Mapping]] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    NAMED_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    buffer: _common_pb2.DataBuffer
    named_buffers: _containers.MessageMap[str, _common_pb2.DataBuffer]
    sequence: int
    timestamp_ms: int
    def __init__(self, node_id: _Optional[str] = ..., buffer: _Optional[_Union[_common_pb2.DataBuffer, _Mapping]] = ..., named_buffers: _Optional[_Mapping[str, _common_pb2.DataBuffer]] = ..., sequence: _Optional[int] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("node_id", "buffer", "sequence", "timestamp_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    buffer: _common_pb2.AudioBuffer
    sequence: int
    timestamp_ms: int
    def __init__(self, node_id: _Optional[str] = ..., buffer: _Optional[_Union[_common_pb2.AudioBuffer, _Mapping]] = ..., sequence: _Optional[int] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class StreamControl(_message.Message):
    __slots__ = ("command",)
    class Command(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        COMMAND_UNSPECIFIED: _ClassVar[StreamControl.Command]
        COMMAND_CLOSE: _ClassVar[StreamControl.Command]
        COMMAND_CANCEL: _ClassVar[StreamControl.Command]
    COMMAND_UNSPECIFIED: StreamControl.Command
    COMMAND_CLOSE: StreamControl.Command
    COMMAND_CANCEL: StreamControl.Command
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    command: StreamControl.Command
    def __init__(self, command: _Optional[_Union[StreamControl.Command, str]] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("ready", "result", "error", "metrics", "closed", "init_progress")
    READY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    INIT_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ready: StreamReady
    result: ChunkResult
    error: _common_pb2.ErrorResponse
    metrics: StreamMetrics
    closed: StreamClosed
    init_progress: InitProgress
    def __init__(self, ready: _Optional[_Union[StreamReady, _Mapping]] = ..., result: _Optional[_Union[ChunkResult, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ErrorResponse, _Mapping]] = ..., metrics: _Optional[_Union[StreamMetrics, _Mapping]] = ..., closed: _Optional[_Union[StreamClosed, _Mapping]] = ..., init_progress: _Optional[_Union[InitProgress, _Mapping]] = ...) -> None: ...

class StreamReady(_message.Message):
    __slots__ = ("session_id", "recommended_chunk_size", "max_buffer_latency_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BUFFER_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    recommended_chunk_size: int
    max_buffer_latency_ms: int
    def __init__(self, session_id: _Optional[str] = ..., recommended_chunk_size: _Optional[int] = ..., max_buffer_latency_ms: _Optional[int] = ...) -> None: ...

class ChunkResult(_message.Message):
    __slots__ = ("sequence", "data_outputs", "processing_time_ms", "total_items_processed")
    class DataOutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.DataBuffer
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.DataBuffer, _Mapping]] = ...) -> None: ...
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DATA_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITEMS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    data_outputs: _containers.MessageMap[str, _common_pb2.DataBuffer]
    processing_time_ms: float
    total_items_processed: int
    def __init__(self, sequence: _Optional[int] = ..., data_outputs: _Optional[_Mapping[str, _common_pb2.DataBuffer]] = ..., processing_time_ms: _Optional[float] = ..., total_items_processed: _Optional[int] = ...) -> None: ...

class StreamMetrics(_message.Message):
    __slots__ = ("session_id", "chunks_processed", "average_latency_ms", "total_items", "buffer_items", "chunks_dropped", "peak_memory_bytes", "data_type_breakdown", "cache_hits", "cache_misses", "cached_nodes_count", "cache_hit_rate")
    class DataTypeBreakdownEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITEMS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_ITEMS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_TYPE_BREAKDOWN_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    CACHED_NODES_COUNT_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    chunks_processed: int
    average_latency_ms: float
    total_items: int
    buffer_items: int
    chunks_dropped: int
    peak_memory_bytes: int
    data_type_breakdown: _containers.ScalarMap[str, int]
    cache_hits: int
    cache_misses: int
    cached_nodes_count: int
    cache_hit_rate: float
    def __init__(self, session_id: _Optional[str] = ..., chunks_processed: _Optional[int] = ..., average_latency_ms: _Optional[float] = ..., total_items: _Optional[int] = ..., buffer_items: _Optional[int] = ..., chunks_dropped: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ..., data_type_breakdown: _Optional[_Mapping[str, int]] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., cached_nodes_count: _Optional[int] = ..., cache_hit_rate: _Optional[float] = ...) -> None: ...

class StreamClosed(_message.Message):
    __slots__ = ("session_id", "final_metrics", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FINAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    final_metrics: _common_pb2.ExecutionMetrics
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., final_metrics: _Optional[_Union[_common_pb2.ExecutionMetrics, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class StreamErrorResponse(_message.Message):
    __slots__ = ("base_error", "stream_error_type", "failing_sequence", "session_id")
    BASE_ERROR_FIELD_NUMBER: _ClassVar[int]
    STREAM_ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    FAILING_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    base_error: _common_pb2.ErrorResponse
    stream_error_type: StreamErrorType
    failing_sequence: int
    session_id: str
    def __init__(self, base_error: _Optional[_Union[_common_pb2.ErrorResponse, _Mapping]] = ..., stream_error_type: _Optional[_Union[StreamErrorType, str]] = ..., failing_sequence: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class InitProgress(_message.Message):
    __slots__ = ("node_id", "phase", "percent", "message", "elapsed_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    phase: str
    percent: float
    message: str
    elapsed_ms: int
    def __init__(self, node_id: _Optional[str] = ..., phase: _Optional[str] = ..., percent: _Optional[float] = ..., message: _Optional[str] = ..., elapsed_ms: _Optional[int] = ...) -> None: ...
