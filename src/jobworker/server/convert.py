"""Translation between the wire messages and the domain model; nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from jobworker.errors import InvalidArgument, ResourceExhausted
from jobworker.model import (
    DEFAULT_RETRY_ON,
    RETRYABLE,
    BatchOptions,
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
from jobworker.store.logs import Chunk, Tail, log_size, read_tail
from jobworker.v1 import jobworker_pb2 as pb

MESSAGE_LIMIT = 4 * 1024 * 1024  # gRPC's default for a message a client receives
MESSAGE_MARGIN = 64 * 1024  # framing and what the size estimate does not see
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
    )


MAX_ATTEMPTS = 100  # RetryPolicy.max_attempts: more is a loop, not a retry
MAX_BACKOFF = 86_400.0  # a day


def _seconds(where: str, fld: str, d: Duration) -> float:
    if d.seconds < 0 or d.nanos < 0 or d.nanos >= 1_000_000_000:
        raise InvalidArgument(f"{where}: {fld} is not a valid duration")
    return d.seconds + d.nanos / 1e9


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
        lim = j.limits
        limits = Limits(
            cpu_millis=lim.cpu_millis,
            memory_bytes=lim.memory_bytes,
            pids_max=lim.pids_max,
            io_read_bytes_per_second=lim.io_read_bytes_per_second,
            io_write_bytes_per_second=lim.io_write_bytes_per_second,
        )
    return JobSpec(
        name=j.name or f"job-{index}",  # the default name (validate.BatchBuilder.add_job)
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
        out.limits.CopyFrom(
            pb.ResourceLimits(
                cpu_millis=s.limits.cpu_millis,
                memory_bytes=s.limits.memory_bytes,
                pids_max=s.limits.pids_max,
                io_read_bytes_per_second=s.limits.io_read_bytes_per_second,
                io_write_bytes_per_second=s.limits.io_write_bytes_per_second,
            )
        )
    return out


def options_to_pb(o: BatchOptions) -> pb.BatchOptions:
    """The wire options."""
    return pb.BatchOptions(
        labels=dict(o.labels),
        max_parallel=o.max_parallel,
        fail_fast=o.fail_fast,
        idempotency_key=o.idempotency_key,
    )


def _usage_to_pb(u: Usage | None) -> pb.ResourceUsage | None:
    if u is None:
        return None
    return pb.ResourceUsage(
        user_cpu=_dur(u.user_cpu), system_cpu=_dur(u.system_cpu), max_rss_bytes=u.max_rss_bytes
    )


def _set_tail(field: pb.LogTail, t: Tail) -> None:
    field.data, field.total_bytes, field.truncated = t.data, t.total, t.truncated


def job_to_pb(
    batch: BatchRecord | BatchView,
    index: int,
    status: JobStatus,
    *,
    sizes: bool = True,
    redact: bool = False,
    waiting: str = "",
) -> pb.Job:
    """The wire Job with the sizes of its logs (`sizes` False: without; batch_to_pb reads
    the tails then, which tell the sizes too); `redact`: its env values hidden; `waiting`:
    why a queued job has not started (its message when it has none)."""
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
    )
    if status.exit_code is not None:
        job.exit_code = status.exit_code
    if sizes:
        folder = batch.job_dir(index)
        for name, fld in (("stdout", job.stdout), ("stderr", job.stderr)):
            size = log_size(f"{folder}/{name}")
            fld.total_bytes, fld.truncated = size, size > 0
    return job


def batch_to_pb(
    batch: BatchRecord | BatchView,
    indexes: Iterable[int] | None = None,
    tail_limit: int | None = None,
    *,
    strict: bool = True,
    redact: bool = False,
    waiting: Mapping[int, str] | None = None,
) -> pb.Batch:
    """The wire Batch, kept under gRPC's 4 MiB message limit whatever was asked.

    Tails are shortened first (each says truncated); jobs' stdin is echoed only when it
    fits; past that, `strict` answers RESOURCE_EXHAUSTED (ask for fewer jobs), and
    otherwise the specs are left out (CancelBatch must answer once it has cancelled).
    `redact` (a caller who may not read them): env values and stdin hidden, stdin's size
    told instead. `waiting`: why each ready job waits (Engine.waiting).
    """
    waiting = waiting or {}
    chosen = list(range(len(batch.specs)) if indexes is None else indexes)
    tails = bool(tail_limit and chosen)  # every chosen job's tails: they tell the sizes
    out = pb.Batch(
        correlation_id=batch.cid,
        owner=batch.owner,
        state=int(batch.state),  # type: ignore[arg-type]
        options=options_to_pb(batch.options),
        create_time=_ts(batch.create_time),
        end_time=_ts(batch.end_time),
        jobs=[
            job_to_pb(batch, i, st, sizes=not tails, redact=redact, waiting=waiting.get(i, ""))
            for i, st in ((i, batch.statuses[i]) for i in chosen)
        ],
    )
    budget = MESSAGE_LIMIT - MESSAGE_MARGIN
    size = out.ByteSize()
    if size > budget:
        if strict:
            raise ResourceExhausted(
                f"the answer would be {size} bytes, over gRPC's message limit "
                f"({MESSAGE_LIMIT} bytes); ask for fewer jobs with job_names"
            )
        for job in out.jobs:
            job.ClearField("spec")
        size = out.ByteSize()
    if strict:
        size = _echo_stdin(batch, chosen, out, budget - size, redact=redact)
    if tail_limit and chosen:  # (tails)
        # Each tail also costs a tag and length bytes in its own and the enclosing messages.
        # (The sizes are not in `size` yet: a varint each, within the 16 bytes a job.)
        limit = min(tail_limit, max(0, (budget - size) // (2 * len(chosen)) - 16))
        while True:
            for i, job in zip(chosen, out.jobs, strict=True):
                folder = batch.job_dir(i)
                _set_tail(job.stdout, read_tail(f"{folder}/stdout", limit))
                _set_tail(job.stderr, read_tail(f"{folder}/stderr", limit))
            if limit == 0 or out.ByteSize() <= budget:
                break
            limit //= 2
    return out


def _echo_stdin(
    batch: BatchRecord | BatchView, chosen: list[int], out: pb.Batch, room: int, *, redact: bool
) -> int:
    """Put the chosen jobs' stdin (or, `redact`, its size) in `out` if all fits in `room`
    bytes; the size of `out`."""
    sizes = [batch.stdin_sizes[i] for i in chosen]
    need = 32 * len(chosen) if redact else sum(sizes) + 8 * len(chosen)
    if not any(sizes) or need > room:
        return out.ByteSize()
    for i, size, job in zip(chosen, sizes, out.jobs, strict=True):
        if not size:
            continue
        if redact:
            job.spec.stdin = redacted_stdin(size)
        else:
            with contextlib.suppress(FileNotFoundError):  # lost: the job said so
                job.spec.stdin = (batch.job_dir(i) / "stdin").read_bytes()
    return out.ByteSize()


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
    )
    if item.exit_code is not None:
        change.exit_code = item.exit_code
    return pb.StreamBatchLogsResponse(state_change=change, cursor=cursor)
