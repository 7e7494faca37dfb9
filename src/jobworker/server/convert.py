"""Translation between the wire messages and the domain model: pure, no I/O."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from jobworker.errors import InvalidArgument
from jobworker.model import (
    DEFAULT_RETRY_ON,
    LIMIT_FIELDS,
    RETRYABLE,
    BatchOptions,
    BatchState,
    JobEvent,
    JobSpec,
    JobState,
    JobStatus,
    Limits,
    RetryPolicy,
    Usage,
    frozen_map,
)
from jobworker.store.batches import BatchRecord, BatchView
from jobworker.store.follow import Chunk
from jobworker.store.logs import Tail
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.validate import BatchBuilder, default_name

MAX_GRACE = 86_400  # a day: longer, and a CancelBatch call would wait that long
REDACTED = "[redacted]"  # an env value shown to a caller who may not read it


def redacted_stdin(size: int) -> bytes:
    """What a caller who may not read a job's stdin sees of it: its size."""
    return f"[redacted: {size} bytes]".encode()


def options_from_pb(o: pb.BatchOptions) -> BatchOptions:
    """Domain options from the wire."""
    return BatchOptions(
        labels=frozen_map(o.labels),
        max_parallel=o.max_parallel,
        fail_fast=o.fail_fast,
        idempotency_key=o.idempotency_key,
        executor=o.executor,
    )


MAX_ATTEMPTS = 100  # RetryPolicy.max_attempts: more is a loop, not a retry
MAX_BACKOFF = 86_400.0  # a day


def _seconds(where: str, fld: str, d: Duration) -> float:
    if d.seconds < 0 or d.nanos < 0 or d.nanos >= 1_000_000_000:
        raise InvalidArgument(f"{where}: {fld} is not a valid duration")
    return d.seconds + d.nanos / 1e9


def grace_from_pb(r: pb.CancelBatchRequest) -> float | None:
    """CancelBatch's grace period in seconds (None: the server's kill_grace)."""
    if not r.HasField("grace_period"):
        return None
    g = r.grace_period
    if g.seconds < 0 or not 0 <= g.nanos < 1_000_000_000 or g.seconds > MAX_GRACE:
        raise InvalidArgument(f"grace_period: must be a valid duration from 0s to {MAX_GRACE}s")
    return g.seconds + g.nanos / 1e9


def states_from_pb(states: Iterable[int]) -> list[BatchState]:
    """ListBatches' state filter; INVALID_ARGUMENT names a number that is no batch state."""
    out = []
    for s in states:
        try:
            out.append(BatchState(s))
        except ValueError as exc:
            raise InvalidArgument(f"states: {s} is not a batch state") from exc
    return out


async def batch_from_pb(
    requests: AsyncIterator[pb.ScheduleBatchRequest], builder: BatchBuilder
) -> BatchBuilder:
    """Validate a ScheduleBatch stream message by message into `builder`, until it ends."""
    async for request in requests:
        item = request.WhichOneof("item")
        if item == "options":
            builder.add_options(options_from_pb(request.options))
        elif item == "job":
            j = request.job
            # Counted on the wire message, before a str is made for each of its items.
            builder.check_counts(j.name, len(j.argv), len(j.env), len(j.depends_on))
            builder.add_job(spec_from_pb(len(builder.specs), j))
        else:
            raise InvalidArgument(f"message {len(builder.specs)}: neither options nor job is set")
    return builder


def retry_from_pb(where: str, r: pb.RetryPolicy) -> RetryPolicy | None:
    """The domain policy (None: one attempt); INVALID_ARGUMENT names job and field."""
    if r.max_attempts > MAX_ATTEMPTS:
        raise InvalidArgument(
            f"{where}: retry.max_attempts is {r.max_attempts}, at most {MAX_ATTEMPTS}"
        )
    defaults = RetryPolicy()
    initial, most = defaults.initial_backoff, defaults.max_backoff
    if r.HasField("initial_backoff"):
        initial = _seconds(where, "retry.initial_backoff", r.initial_backoff)
    if r.HasField("max_backoff"):
        most = _seconds(where, "retry.max_backoff", r.max_backoff)
    for fld, value in (("initial_backoff", initial), ("max_backoff", most)):
        if value > MAX_BACKOFF:
            raise InvalidArgument(f"{where}: retry.{fld} is {value:g}s, at most 1 day")
    if r.HasField("initial_backoff") and r.HasField("max_backoff") and most < initial:
        raise InvalidArgument(
            f"{where}: retry.max_backoff ({most:g}s) is less than retry.initial_backoff "
            f"({initial:g}s)"
        )
    states = set()
    for value in r.retry_on:
        try:
            state = JobState(value)
        except ValueError:
            state = None
        if state not in RETRYABLE:
            shown = state.name if state is not None else str(value)
            raise InvalidArgument(
                f"{where}: retry.retry_on names {shown}: only FAILED, TIMED_OUT and LOST "
                "are retried"
            )
        states.add(state)
    if r.max_attempts <= 1:
        return None
    return RetryPolicy(
        max_attempts=r.max_attempts,
        initial_backoff=initial,
        max_backoff=max(most, initial),
        retry_on=frozenset(states) or DEFAULT_RETRY_ON,
    )


def retry_to_pb(r: RetryPolicy) -> pb.RetryPolicy:
    """The wire policy of a stored one."""
    return pb.RetryPolicy(
        max_attempts=r.max_attempts,
        initial_backoff=_dur(r.initial_backoff),
        max_backoff=_dur(r.max_backoff),
        retry_on=sorted(int(s) for s in r.retry_on),  # type: ignore[misc]
    )


def spec_from_pb(index: int, j: pb.JobSpec) -> JobSpec:
    """A domain JobSpec from the wire; INVALID_ARGUMENT names the field of a bad value."""
    timeout: float | None = None
    where = f"job {index} ({j.name!r})"
    if j.HasField("timeout"):
        timeout = _seconds(where, "timeout", j.timeout)
    retry = retry_from_pb(where, j.retry) if j.HasField("retry") else None
    limits = _NO_LIMITS
    if j.HasField("limits"):
        limits = Limits(**{f: getattr(j.limits, f) for f in LIMIT_FIELDS})
    return JobSpec(
        name=j.name or default_name(index),
        argv=tuple(j.argv),
        env=frozen_map(j.env) if j.env else _NO_ENV,
        working_dir=j.working_dir,
        stdin=j.stdin,
        timeout=timeout,
        limits=limits,
        depends_on=tuple(j.depends_on),
        retry=retry,
    )


# Shared by every job that sets none (both immutable): most jobs of a big batch.
_NO_LIMITS = Limits()
_NO_ENV = frozen_map()


def _ts(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _dur(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def spec_to_pb(s: JobSpec, *, redact: bool = False) -> pb.JobSpec:
    """The wire JobSpec of a stored spec; `redact`: env values replaced (keys kept)."""
    out = pb.JobSpec(
        name=s.name,
        argv=s.argv,
        env=dict.fromkeys(s.env, REDACTED) if redact else dict(s.env),
        working_dir=s.working_dir,
        stdin=s.stdin,
        depends_on=s.depends_on,
    )
    if s.timeout is not None:
        out.timeout.CopyFrom(_dur(s.timeout))
    if s.retry is not None:
        out.retry.CopyFrom(retry_to_pb(s.retry))
    if s.limits.any:
        out.limits.CopyFrom(pb.ResourceLimits(**{f: getattr(s.limits, f) for f in LIMIT_FIELDS}))
    return out


def options_to_pb(o: BatchOptions) -> pb.BatchOptions:
    """The wire options."""
    return pb.BatchOptions(
        labels=dict(o.labels),
        max_parallel=o.max_parallel,
        fail_fast=o.fail_fast,
        idempotency_key=o.idempotency_key,
        executor=o.executor,
    )


def _usage_to_pb(u: Usage | None) -> pb.ResourceUsage | None:
    if u is None:
        return None
    return pb.ResourceUsage(
        user_cpu=_dur(u.user_cpu), system_cpu=_dur(u.system_cpu), max_rss_bytes=u.max_rss_bytes
    )


def set_tails(job: pb.Job, stdout: Tail, stderr: Tail) -> None:
    """Put a job's log tails (which tell the logs' sizes too) in its wire Job."""
    for fld, t in ((job.stdout, stdout), (job.stderr, stderr)):
        fld.data, fld.total_bytes, fld.truncated = t.data, t.total, t.truncated


def job_to_pb(
    batch: BatchRecord | BatchView,
    index: int,
    status: JobStatus,
    *,
    sizes: tuple[int, int] | None = None,
    redact: bool = False,
    waiting: str = "",
) -> pb.Job:
    """The wire Job; `sizes`: its logs' (stdout, stderr) sizes; `redact`: its env values
    hidden; `waiting`: why a queued job has not started (its message when it has none)."""
    job = pb.Job(
        index=index,
        spec=spec_to_pb(batch.specs[index], redact=redact),
        state=int(status.state),  # type: ignore[arg-type]
        signal=status.signal,
        message=status.message or waiting,
        start_time=_ts(status.start_time),
        end_time=_ts(status.end_time),
        usage=_usage_to_pb(status.usage),
        attempt=status.attempt,
        node=status.node,
    )
    if status.exit_code is not None:
        job.exit_code = status.exit_code
    if sizes is not None:
        for fld, size in zip((job.stdout, job.stderr), sizes, strict=True):
            fld.total_bytes, fld.truncated = size, size > 0
    return job


def batch_to_pb(
    batch: BatchRecord | BatchView,
    chosen: Iterable[int],
    *,
    sizes: Mapping[int, tuple[int, int]] | None = None,
    redact: bool = False,
    waiting: Mapping[int, str] | None = None,
) -> pb.Batch:
    """The wire Batch with the `chosen` jobs (their logs' `sizes` if given); `redact` (a
    caller who may not read them): env values hidden; `waiting`: why each ready job waits."""
    waiting = waiting or {}
    sizes = sizes or {}
    return pb.Batch(
        correlation_id=batch.cid,
        owner=batch.owner,
        state=int(batch.state),  # type: ignore[arg-type]
        options=options_to_pb(batch.options),
        create_time=_ts(batch.create_time),
        end_time=_ts(batch.end_time),
        jobs=[
            job_to_pb(
                batch,
                i,
                batch.statuses[i],
                sizes=sizes.get(i),
                redact=redact,
                waiting=waiting.get(i, ""),
            )
            for i in chosen
        ],
    )


def summary_to_pb(batch: BatchRecord) -> pb.BatchSummary:
    """The wire BatchSummary."""
    return pb.BatchSummary(
        correlation_id=batch.cid,
        owner=batch.owner,
        state=int(batch.state),  # type: ignore[arg-type]
        labels=dict(batch.options.labels),
        create_time=_ts(batch.create_time),
        end_time=_ts(batch.end_time),
        job_count=len(batch.specs),
        jobs_by_state={f"JOB_STATE_{s.name}": n for s, n in batch.counts.items()},
    )


def item_to_pb(
    batch: BatchRecord, item: Chunk | JobEvent, cursor: str
) -> pb.StreamBatchLogsResponse:
    """One StreamBatchLogs response."""
    if isinstance(item, Chunk):
        seconds = int(item.time)
        # Built from plain values in one call: this runs once per message on the hot path.
        return pb.StreamBatchLogsResponse(
            chunk={
                "job_index": item.index,
                "job_name": batch.specs[item.index].name,
                "stream": item.stream,
                "data": item.data,
                "time": {"seconds": seconds, "nanos": int((item.time - seconds) * 1e9)},
                "attempt": item.attempt,
            },
            cursor=cursor,
        )
    change = pb.JobStateChange(
        job_index=item.index,
        job_name=batch.specs[item.index].name,
        state=int(item.state),  # type: ignore[arg-type]
        signal=item.signal,
        message=item.message,
        time=_ts(item.time),
        attempt=max(1, item.attempt),
        node=item.node,
    )
    if item.exit_code is not None:
        change.exit_code = item.exit_code
    return pb.StreamBatchLogsResponse(state_change=change, cursor=cursor)
