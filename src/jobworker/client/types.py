"""The plain dataclasses the Python client takes and returns; protobuf stays inside.

Field order is the key order of the CLI's `--json`; states are lowercase words,
durations are seconds (float) and times are timezone-aware datetimes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

JobState = Literal[
    "queued", "running", "succeeded", "failed", "timed_out", "canceled", "skipped", "lost"
]
BatchState = Literal["running", "succeeded", "failed", "canceled"]
Stream = Literal["stdout", "stderr"]
ENDED_JOB_STATES: frozenset[str] = frozenset(
    {"succeeded", "failed", "timed_out", "canceled", "skipped", "lost"}
)


@dataclass(frozen=True)
class Limits:
    """Resource limits of a job; None takes the server's default."""

    cpu_millis: int | None = None
    memory_bytes: int | None = None
    pids_max: int | None = None
    io_read_bytes_per_second: int | None = None
    io_write_bytes_per_second: int | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts in all (the first included) and the backoff between them, in seconds."""

    max_attempts: int
    initial_backoff: float | None = None
    max_backoff: float | None = None
    # Which endings are retried; empty: failed and timed_out.
    retry_on: tuple[JobState, ...] = ()


@dataclass(frozen=True)
class JobSpec:
    """One job to run: argv without a shell (use ["sh", "-c", "..."] for one)."""

    argv: Sequence[str]
    name: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = ""
    stdin: bytes = b""
    timeout: float | None = None
    limits: Limits | None = None
    depends_on: Sequence[str] = ()
    retry: RetryPolicy | None = None


@dataclass(frozen=True)
class BatchOptions:
    """Batch-wide options; see the .proto's BatchOptions."""

    labels: Mapping[str, str] = field(default_factory=dict)
    max_parallel: int = 0
    fail_fast: bool = False
    idempotency_key: str = ""
    executor: str = ""


@dataclass(frozen=True)
class Submitted:
    """What ScheduleBatch answered."""

    correlation_id: str
    job_names: list[str]
    deduplicated: bool


@dataclass(frozen=True)
class LogTail:
    """The last bytes of one stream of a job, and how many it wrote in all."""

    data: bytes
    total_bytes: int
    truncated: bool

    @property
    def text(self) -> str:
        """The bytes as text (undecodable bytes replaced)."""
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class JobResult:
    """A job of a batch as it stands."""

    index: int
    name: str
    argv: list[str]
    depends_on: list[str]
    state: JobState
    exit_code: int | None
    signal: int
    message: str
    attempt: int
    node: str
    start_time: datetime | None
    end_time: datetime | None
    duration: float | None
    cpu_seconds: float | None
    max_rss_bytes: int | None
    stdout: LogTail
    stderr: LogTail

    @property
    def succeeded(self) -> bool:
        """True when the job exited with status 0."""
        return self.state == "succeeded"

    @property
    def ended(self) -> bool:
        """True once the job will not change any more."""
        return self.state in ENDED_JOB_STATES


@dataclass(frozen=True)
class Batch:
    """A batch with its jobs."""

    correlation_id: str
    owner: str
    state: BatchState
    labels: dict[str, str]
    max_parallel: int
    fail_fast: bool
    executor: str
    create_time: datetime | None
    end_time: datetime | None
    duration: float | None
    jobs: list[JobResult]

    @property
    def succeeded(self) -> bool:
        """True when every job succeeded."""
        return self.state == "succeeded"

    @property
    def ended(self) -> bool:
        """True once every job has ended."""
        return self.state != "running"


@dataclass(frozen=True)
class BatchSummary:
    """One row of ListBatches."""

    correlation_id: str
    owner: str
    state: BatchState
    labels: dict[str, str]
    create_time: datetime | None
    end_time: datetime | None
    duration: float | None
    job_count: int
    jobs_by_state: dict[str, int]


@dataclass(frozen=True)
class LogChunk:
    """Bytes a job wrote to one of its streams."""

    type: Literal["chunk"]
    job_index: int
    job_name: str
    stream: Stream
    data: bytes
    attempt: int
    time: datetime | None
    cursor: str


@dataclass(frozen=True)
class StateChange:
    """A job moved to another state."""

    type: Literal["state"]
    job_index: int
    job_name: str
    state: JobState
    exit_code: int | None
    signal: int
    message: str
    attempt: int
    node: str
    time: datetime | None
    cursor: str


LogEvent = LogChunk | StateChange


@dataclass(frozen=True)
class BatchList:
    """What `jobworker list --json` prints."""

    batches: list[BatchSummary]


@dataclass(frozen=True)
class BatchResults:
    """What `jobworker wait --json` prints: each batch as it ended."""

    batches: list[Batch]


@dataclass(frozen=True)
class Deleted:
    """What `jobworker delete --json` prints."""

    deleted: list[str]
