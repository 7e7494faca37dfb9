import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BatchState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_STATE_UNSPECIFIED: _ClassVar[BatchState]
    BATCH_STATE_RUNNING: _ClassVar[BatchState]
    BATCH_STATE_SUCCEEDED: _ClassVar[BatchState]
    BATCH_STATE_FAILED: _ClassVar[BatchState]
    BATCH_STATE_CANCELED: _ClassVar[BatchState]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_TIMED_OUT: _ClassVar[JobState]
    JOB_STATE_CANCELED: _ClassVar[JobState]
    JOB_STATE_SKIPPED: _ClassVar[JobState]
    JOB_STATE_LOST: _ClassVar[JobState]

class LogStream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOG_STREAM_UNSPECIFIED: _ClassVar[LogStream]
    LOG_STREAM_STDOUT: _ClassVar[LogStream]
    LOG_STREAM_STDERR: _ClassVar[LogStream]
BATCH_STATE_UNSPECIFIED: BatchState
BATCH_STATE_RUNNING: BatchState
BATCH_STATE_SUCCEEDED: BatchState
BATCH_STATE_FAILED: BatchState
BATCH_STATE_CANCELED: BatchState
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_TIMED_OUT: JobState
JOB_STATE_CANCELED: JobState
JOB_STATE_SKIPPED: JobState
JOB_STATE_LOST: JobState
LOG_STREAM_UNSPECIFIED: LogStream
LOG_STREAM_STDOUT: LogStream
LOG_STREAM_STDERR: LogStream

class ScheduleBatchRequest(_message.Message):
    __slots__ = ("options", "job")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    options: BatchOptions
    job: JobSpec
    def __init__(self, options: _Optional[_Union[BatchOptions, _Mapping]] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class BatchOptions(_message.Message):
    __slots__ = ("labels", "max_parallel", "fail_fast", "idempotency_key", "executor")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    FAIL_FAST_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    max_parallel: int
    fail_fast: bool
    idempotency_key: str
    executor: str
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ..., max_parallel: _Optional[int] = ..., fail_fast: _Optional[bool] = ..., idempotency_key: _Optional[str] = ..., executor: _Optional[str] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "argv", "env", "working_dir", "stdin", "timeout", "limits", "depends_on", "retry")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    name: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    working_dir: str
    stdin: bytes
    timeout: _duration_pb2.Duration
    limits: ResourceLimits
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    retry: RetryPolicy
    def __init__(self, name: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., working_dir: _Optional[str] = ..., stdin: _Optional[bytes] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., limits: _Optional[_Union[ResourceLimits, _Mapping]] = ..., depends_on: _Optional[_Iterable[str]] = ..., retry: _Optional[_Union[RetryPolicy, _Mapping]] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("max_attempts", "initial_backoff", "max_backoff", "retry_on")
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    RETRY_ON_FIELD_NUMBER: _ClassVar[int]
    max_attempts: int
    initial_backoff: _duration_pb2.Duration
    max_backoff: _duration_pb2.Duration
    retry_on: _containers.RepeatedScalarFieldContainer[JobState]
    def __init__(self, max_attempts: _Optional[int] = ..., initial_backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., retry_on: _Optional[_Iterable[_Union[JobState, str]]] = ...) -> None: ...

class ResourceLimits(_message.Message):
    __slots__ = ("cpu_millis", "memory_bytes", "pids_max", "io_read_bytes_per_second", "io_write_bytes_per_second")
    CPU_MILLIS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_MAX_FIELD_NUMBER: _ClassVar[int]
    IO_READ_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    IO_WRITE_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    cpu_millis: int
    memory_bytes: int
    pids_max: int
    io_read_bytes_per_second: int
    io_write_bytes_per_second: int
    def __init__(self, cpu_millis: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., pids_max: _Optional[int] = ..., io_read_bytes_per_second: _Optional[int] = ..., io_write_bytes_per_second: _Optional[int] = ...) -> None: ...

class ScheduleBatchResponse(_message.Message):
    __slots__ = ("correlation_id", "job_names", "deduplicated")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_NAMES_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    job_names: _containers.RepeatedScalarFieldContainer[str]
    deduplicated: bool
    def __init__(self, correlation_id: _Optional[str] = ..., job_names: _Optional[_Iterable[str]] = ..., deduplicated: _Optional[bool] = ...) -> None: ...

class GetBatchRequest(_message.Message):
    __slots__ = ("correlation_id", "log_tail_bytes", "job_names")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    LOG_TAIL_BYTES_FIELD_NUMBER: _ClassVar[int]
    JOB_NAMES_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    log_tail_bytes: int
    job_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, correlation_id: _Optional[str] = ..., log_tail_bytes: _Optional[int] = ..., job_names: _Optional[_Iterable[str]] = ...) -> None: ...

class GetBatchResponse(_message.Message):
    __slots__ = ("batch",)
    BATCH_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("correlation_id", "owner", "state", "options", "create_time", "end_time", "jobs")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    owner: str
    state: BatchState
    options: BatchOptions
    create_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, correlation_id: _Optional[str] = ..., owner: _Optional[str] = ..., state: _Optional[_Union[BatchState, str]] = ..., options: _Optional[_Union[BatchOptions, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("index", "spec", "state", "exit_code", "signal", "message", "start_time", "end_time", "usage", "stdout", "stderr", "attempt", "node")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    index: int
    spec: JobSpec
    state: JobState
    exit_code: int
    signal: int
    message: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    usage: ResourceUsage
    stdout: LogTail
    stderr: LogTail
    attempt: int
    node: str
    def __init__(self, index: _Optional[int] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., message: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., usage: _Optional[_Union[ResourceUsage, _Mapping]] = ..., stdout: _Optional[_Union[LogTail, _Mapping]] = ..., stderr: _Optional[_Union[LogTail, _Mapping]] = ..., attempt: _Optional[int] = ..., node: _Optional[str] = ...) -> None: ...

class LogTail(_message.Message):
    __slots__ = ("data", "total_bytes", "truncated")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_bytes: int
    truncated: bool
    def __init__(self, data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., truncated: _Optional[bool] = ...) -> None: ...

class ResourceUsage(_message.Message):
    __slots__ = ("user_cpu", "system_cpu", "max_rss_bytes")
    USER_CPU_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_CPU_FIELD_NUMBER: _ClassVar[int]
    MAX_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    user_cpu: _duration_pb2.Duration
    system_cpu: _duration_pb2.Duration
    max_rss_bytes: int
    def __init__(self, user_cpu: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., system_cpu: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_rss_bytes: _Optional[int] = ...) -> None: ...

class StreamBatchLogsRequest(_message.Message):
    __slots__ = ("correlation_id", "job_names", "cursor", "follow", "tail_lines", "packed")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_NAMES_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    job_names: _containers.RepeatedScalarFieldContainer[str]
    cursor: str
    follow: bool
    tail_lines: int
    packed: bool
    def __init__(self, correlation_id: _Optional[str] = ..., job_names: _Optional[_Iterable[str]] = ..., cursor: _Optional[str] = ..., follow: _Optional[bool] = ..., tail_lines: _Optional[int] = ..., packed: _Optional[bool] = ...) -> None: ...

class StreamBatchLogsResponse(_message.Message):
    __slots__ = ("chunk", "state_change", "cursor", "more")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    chunk: LogChunk
    state_change: JobStateChange
    cursor: str
    more: _containers.RepeatedCompositeFieldContainer[StreamBatchLogsResponse]
    def __init__(self, chunk: _Optional[_Union[LogChunk, _Mapping]] = ..., state_change: _Optional[_Union[JobStateChange, _Mapping]] = ..., cursor: _Optional[str] = ..., more: _Optional[_Iterable[_Union[StreamBatchLogsResponse, _Mapping]]] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("job_index", "job_name", "stream", "data", "time", "attempt")
    JOB_INDEX_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_index: int
    job_name: str
    stream: LogStream
    data: bytes
    time: _timestamp_pb2.Timestamp
    attempt: int
    def __init__(self, job_index: _Optional[int] = ..., job_name: _Optional[str] = ..., stream: _Optional[_Union[LogStream, str]] = ..., data: _Optional[bytes] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ...) -> None: ...

class JobStateChange(_message.Message):
    __slots__ = ("job_index", "job_name", "state", "exit_code", "signal", "message", "time", "attempt", "node")
    JOB_INDEX_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    job_index: int
    job_name: str
    state: JobState
    exit_code: int
    signal: int
    message: str
    time: _timestamp_pb2.Timestamp
    attempt: int
    node: str
    def __init__(self, job_index: _Optional[int] = ..., job_name: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., message: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ..., node: _Optional[str] = ...) -> None: ...

class CancelBatchRequest(_message.Message):
    __slots__ = ("correlation_id", "job_names", "grace_period")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_NAMES_FIELD_NUMBER: _ClassVar[int]
    GRACE_PERIOD_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    job_names: _containers.RepeatedScalarFieldContainer[str]
    grace_period: _duration_pb2.Duration
    def __init__(self, correlation_id: _Optional[str] = ..., job_names: _Optional[_Iterable[str]] = ..., grace_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CancelBatchResponse(_message.Message):
    __slots__ = ("batch",)
    BATCH_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ...) -> None: ...

class ListBatchesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "labels", "states")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    labels: _containers.ScalarMap[str, str]
    states: _containers.RepeatedScalarFieldContainer[BatchState]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., states: _Optional[_Iterable[_Union[BatchState, str]]] = ...) -> None: ...

class ListBatchesResponse(_message.Message):
    __slots__ = ("batches", "next_page_token")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[BatchSummary]
    next_page_token: str
    def __init__(self, batches: _Optional[_Iterable[_Union[BatchSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class BatchSummary(_message.Message):
    __slots__ = ("correlation_id", "owner", "state", "labels", "create_time", "end_time", "job_count", "jobs_by_state")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class JobsByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_COUNT_FIELD_NUMBER: _ClassVar[int]
    JOBS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    owner: str
    state: BatchState
    labels: _containers.ScalarMap[str, str]
    create_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    job_count: int
    jobs_by_state: _containers.ScalarMap[str, int]
    def __init__(self, correlation_id: _Optional[str] = ..., owner: _Optional[str] = ..., state: _Optional[_Union[BatchState, str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., job_count: _Optional[int] = ..., jobs_by_state: _Optional[_Mapping[str, int]] = ...) -> None: ...

class DeleteBatchRequest(_message.Message):
    __slots__ = ("correlation_id",)
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    def __init__(self, correlation_id: _Optional[str] = ...) -> None: ...

class DeleteBatchResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
