"""The domain model: batches, jobs, their specs and states; frozen values, no I/O."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class JobState(enum.IntEnum):
    """A job's state; the numbers are the wire enum's."""

    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    TIMED_OUT = 5
    CANCELED = 6
    SKIPPED = 7
    LOST = 8

    @property
    def ended(self) -> bool:
        """True for every state a job never leaves."""
        return self not in (JobState.QUEUED, JobState.RUNNING)


class BatchState(enum.IntEnum):
    """A batch's state; the numbers are the wire enum's."""

    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    CANCELED = 4


_FAILED_STATES = frozenset({JobState.FAILED, JobState.TIMED_OUT, JobState.LOST})


def batch_state(states: Iterable[JobState]) -> BatchState:
    """The state of a batch whose jobs are in `states`."""
    seen = set(states)
    if JobState.QUEUED in seen or JobState.RUNNING in seen:
        return BatchState.RUNNING
    if seen <= {JobState.SUCCEEDED}:
        return BatchState.SUCCEEDED
    if seen & _FAILED_STATES:
        return BatchState.FAILED
    if JobState.CANCELED in seen:
        return BatchState.CANCELED
    return BatchState.FAILED


def frozen_map(items: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """A read-only copy of a str->str mapping."""
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one job; 0 means no limit."""

    cpu_millis: int = 0
    memory_bytes: int = 0
    pids_max: int = 0
    io_read_bytes_per_second: int = 0
    io_write_bytes_per_second: int = 0

    def over(self, defaults: Limits) -> Limits:
        """These limits with each unset (0) field taken from `defaults`."""
        if not self.any:  # most jobs: no dict and no new object
            return defaults
        return Limits(**{f: getattr(self, f) or getattr(defaults, f) for f in LIMIT_FIELDS})

    @property
    def any(self) -> bool:
        """True when at least one limit is set."""
        return any(getattr(self, f) for f in LIMIT_FIELDS)


LIMIT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Limits))
"""The names of the Limits fields; the wire's ResourceLimits and the config use the same."""


DEFAULT_RETRY_ON = frozenset({JobState.FAILED, JobState.TIMED_OUT})
RETRYABLE = frozenset({JobState.FAILED, JobState.TIMED_OUT, JobState.LOST})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often a job runs again after an attempt ends badly (contract 6.4)."""

    max_attempts: int = 1  # in all, the first included
    initial_backoff: float = 1.0  # seconds before the second attempt; doubles each time
    max_backoff: float = 300.0
    retry_on: frozenset[JobState] = DEFAULT_RETRY_ON

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt` (2 for the first retry)."""
        return min(self.max_backoff, self.initial_backoff * 2.0 ** min(attempt - 2, 60))

    def retries(self, state: JobState, attempt: int) -> bool:
        """True when an attempt numbered `attempt` that ended in `state` runs again."""
        return state in self.retry_on and attempt < self.max_attempts


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What to run: a validated job as the client sent it (name filled in)."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=frozen_map)
    working_dir: str = ""
    stdin: bytes = b""
    timeout: float | None = None  # seconds; None: the server's default
    limits: Limits = field(default_factory=Limits)  # unset fields: the server's defaults
    depends_on: tuple[str, ...] = ()
    retry: RetryPolicy | None = None  # None: one attempt


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """Batch-wide options."""

    labels: Mapping[str, str] = field(default_factory=frozen_map)
    max_parallel: int = 0
    fail_fast: bool = False
    idempotency_key: str = ""
    executor: str = ""  # the configured executor that runs its jobs; "": the default


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU time in seconds and peak memory of a job's processes."""

    user_cpu: float = 0.0
    system_cpu: float = 0.0
    max_rss_bytes: int = 0


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One state change of one job, as journaled and streamed; seq orders a batch's events."""

    seq: int
    index: int
    state: JobState
    time: float  # seconds since the epoch
    exit_code: int | None = None
    signal: int = 0
    message: str = ""
    pid: int = 0  # RUNNING: the process, with its start time in clock ticks since boot
    pid_start: int = 0
    usage: Usage | None = None  # end states of jobs that ran
    cgroup: str = ""  # RUNNING: its groups' name when not the job's key (a pooled set)
    # The attempt it belongs to (1 for the first); a QUEUED event of a retry names the
    # attempt to come, with when it may start and the log sizes where it will begin.
    attempt: int = 1
    retry_at: float = 0.0  # QUEUED for a retry: not before this time (seconds since epoch)
    # RUNNING: the stdout and stderr sizes where the attempt began; QUEUED for a retry:
    # where the attempt before it ended.
    offsets: tuple[int, int] = (0, 0)
    node: str = ""  # RUNNING: where it runs (the host's name, or a cluster node)


@dataclass(frozen=True, slots=True)
class JobStatus:
    """Where a job stands: the fold of its events."""

    state: JobState = JobState.QUEUED
    exit_code: int | None = None
    signal: int = 0
    message: str = ""
    start_time: float | None = None
    end_time: float | None = None
    usage: Usage | None = None
    pid: int = 0
    pid_start: int = 0
    cgroup: str = ""  # while RUNNING (JobEvent.cgroup): what a restart kills by name
    attempt: int = 0  # attempts started so far
    retry_at: float = 0.0  # QUEUED for a retry: when it may start
    # Where the running (or, QUEUED for a retry, the next) attempt's output begins.
    log_sizes: tuple[int, int] = (0, 0)
    node: str = ""  # where it ran or runs (JobEvent.node)

    def apply(self, event: JobEvent) -> JobStatus:
        """The status after `event`."""
        if event.state is JobState.QUEUED:
            if event.attempt <= 1:
                return JobStatus()
            # A retry: what the last attempt did stays to be seen until the next starts.
            return JobStatus(
                exit_code=event.exit_code,
                signal=event.signal,
                message=event.message,
                start_time=self.start_time,
                usage=event.usage,
                attempt=event.attempt - 1,
                retry_at=event.retry_at,
                log_sizes=event.offsets,
            )
        if event.state is JobState.RUNNING:
            return JobStatus(
                state=JobState.RUNNING,
                start_time=event.time,
                pid=event.pid,
                pid_start=event.pid_start,
                cgroup=event.cgroup,
                attempt=event.attempt,
                log_sizes=event.offsets,  # where this attempt's output begins
                node=event.node,
            )
        return JobStatus(
            state=event.state,
            exit_code=event.exit_code,
            signal=event.signal,
            message=event.message,
            start_time=self.start_time,
            end_time=event.time,
            usage=event.usage,
            pid=self.pid,
            pid_start=self.pid_start,
            attempt=event.attempt,  # the scheduler's count: a failed spawn is an attempt too
            node=self.node,
        )


ROLES = ("admin", "user", "viewer", "none")  # config.Role checks config against these


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the client certificate's common name and the role the config gives it."""

    identity: str
    role: str  # one of ROLES

    def can_see(self, owner: str) -> bool:
        """True when this caller may read a batch owned by `owner`."""
        return self.role in ("admin", "viewer") or (self.role == "user" and owner == self.identity)

    @property
    def can_see_all(self) -> bool:
        """True when this caller may read every identity's batches."""
        return self.role in ("admin", "viewer")

    def can_read_secrets(self, owner: str) -> bool:
        """True when this caller may see the env values and stdin of `owner`'s batches:
        its owner (while allowed to schedule) and admins; viewers see them redacted."""
        return self.can_change(owner)

    def can_change(self, owner: str) -> bool:
        """True when this caller may cancel a batch owned by `owner`."""
        return self.role == "admin" or (self.role == "user" and owner == self.identity)

    @property
    def can_schedule(self) -> bool:
        """True when this caller may schedule batches."""
        return self.role in ("admin", "user")
