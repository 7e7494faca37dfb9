"""Protobuf messages to the client's dataclasses and back; the only place that knows both."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from jobworker.client import types as t
from jobworker.v1 import jobworker_pb2 as pb


def job_state(value: int) -> t.JobState:
    """ "succeeded" for JOB_STATE_SUCCEEDED."""
    return cast(t.JobState, pb.JobState.Name(value).removeprefix("JOB_STATE_").lower())


def batch_state(value: int) -> t.BatchState:
    """ "failed" for BATCH_STATE_FAILED."""
    return cast(t.BatchState, pb.BatchState.Name(value).removeprefix("BATCH_STATE_").lower())


def job_state_pb(name: str) -> pb.JobState:
    """JOB_STATE_FAILED for "failed"."""
    return cast(pb.JobState, pb.JobState.Value("JOB_STATE_" + name.upper()))


def batch_state_pb(name: str) -> pb.BatchState:
    """BATCH_STATE_FAILED for "failed"."""
    return cast(pb.BatchState, pb.BatchState.Value("BATCH_STATE_" + name.upper()))


def batch_states_pb(names: Sequence[str]) -> list[pb.BatchState]:
    """The BatchState values of short state names."""
    return [batch_state_pb(name) for name in names]


def _time(ts: Timestamp, present: bool) -> datetime | None:
    if not present or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1_000_000_000))
    return duration


def _between(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def _tail(tail: pb.LogTail) -> t.LogTail:
    return t.LogTail(data=tail.data, total_bytes=tail.total_bytes, truncated=tail.truncated)


def job_result(job: pb.Job) -> t.JobResult:
    """A Job as a JobResult."""
    start = _time(job.start_time, job.HasField("start_time"))
    end = _time(job.end_time, job.HasField("end_time"))
    usage = job.usage if job.HasField("usage") else None
    return t.JobResult(
        index=job.index,
        name=job.spec.name,
        argv=list(job.spec.argv),
        depends_on=list(job.spec.depends_on),
        state=job_state(job.state),
        exit_code=job.exit_code if job.HasField("exit_code") else None,
        signal=job.signal,
        message=job.message,
        attempt=job.attempt,
        node=job.node,
        start_time=start,
        end_time=end,
        duration=_between(start, end),
        cpu_seconds=(
            _seconds(usage.user_cpu) + _seconds(usage.system_cpu) if usage is not None else None
        ),
        max_rss_bytes=usage.max_rss_bytes if usage is not None else None,
        stdout=_tail(job.stdout),
        stderr=_tail(job.stderr),
    )


def batch(message: pb.Batch) -> t.Batch:
    """A Batch message as a Batch."""
    start = _time(message.create_time, message.HasField("create_time"))
    end = _time(message.end_time, message.HasField("end_time"))
    return t.Batch(
        correlation_id=message.correlation_id,
        owner=message.owner,
        state=batch_state(message.state),
        labels=dict(sorted(message.options.labels.items())),
        max_parallel=message.options.max_parallel,
        fail_fast=message.options.fail_fast,
        executor=message.options.executor,
        create_time=start,
        end_time=end,
        duration=_between(start, end),
        jobs=[job_result(job) for job in message.jobs],
    )


def summary(message: pb.BatchSummary) -> t.BatchSummary:
    """A BatchSummary message as a BatchSummary; jobs_by_state keyed by short state names."""
    start = _time(message.create_time, message.HasField("create_time"))
    end = _time(message.end_time, message.HasField("end_time"))
    by_state = {
        name.removeprefix("JOB_STATE_").lower(): count
        for name, count in message.jobs_by_state.items()
        if count
    }
    return t.BatchSummary(
        correlation_id=message.correlation_id,
        owner=message.owner,
        state=batch_state(message.state),
        labels=dict(sorted(message.labels.items())),
        create_time=start,
        end_time=end,
        duration=_between(start, end),
        job_count=message.job_count,
        jobs_by_state=dict(sorted(by_state.items())),
    )


def event(response: pb.StreamBatchLogsResponse) -> t.LogEvent | None:
    """A stream response as a LogChunk or a StateChange; None for an unknown kind."""
    kind = response.WhichOneof("event")
    if kind == "chunk":
        chunk = response.chunk
        return t.LogChunk(
            type="chunk",
            job_index=chunk.job_index,
            job_name=chunk.job_name,
            stream="stderr" if chunk.stream == pb.LOG_STREAM_STDERR else "stdout",
            data=chunk.data,
            attempt=chunk.attempt,
            time=_time(chunk.time, chunk.HasField("time")),
            cursor=response.cursor,
        )
    if kind == "state_change":
        change = response.state_change
        return t.StateChange(
            type="state",
            job_index=change.job_index,
            job_name=change.job_name,
            state=job_state(change.state),
            exit_code=change.exit_code if change.HasField("exit_code") else None,
            signal=change.signal,
            message=change.message,
            attempt=change.attempt,
            node=change.node,
            time=_time(change.time, change.HasField("time")),
            cursor=response.cursor,
        )
    return None


def job_spec(spec: t.JobSpec | Sequence[str]) -> pb.JobSpec:
    """A JobSpec (or a bare argv) as the message."""
    if not isinstance(spec, t.JobSpec):
        spec = t.JobSpec(argv=list(spec))
    message = pb.JobSpec(
        name=spec.name,
        argv=list(spec.argv),
        env=dict(spec.env),
        working_dir=spec.working_dir,
        stdin=spec.stdin,
        depends_on=list(spec.depends_on),
    )
    if spec.timeout is not None:
        message.timeout.CopyFrom(_duration(spec.timeout))
    if spec.limits is not None:
        for name, value in vars(spec.limits).items():
            if value is not None:
                setattr(message.limits, name, value)
    if spec.retry is not None:
        message.retry.CopyFrom(retry_policy(spec.retry))
    return message


def retry_policy(policy: t.RetryPolicy) -> pb.RetryPolicy:
    """A RetryPolicy as the message."""
    message = pb.RetryPolicy(
        max_attempts=policy.max_attempts,
        retry_on=[job_state_pb(state) for state in policy.retry_on],
    )
    if policy.initial_backoff is not None:
        message.initial_backoff.CopyFrom(_duration(policy.initial_backoff))
    if policy.max_backoff is not None:
        message.max_backoff.CopyFrom(_duration(policy.max_backoff))
    return message


def batch_options(options: t.BatchOptions) -> pb.BatchOptions:
    """BatchOptions as the message."""
    return pb.BatchOptions(
        labels=dict(options.labels),
        max_parallel=options.max_parallel,
        fail_fast=options.fail_fast,
        idempotency_key=options.idempotency_key,
        executor=options.executor,
    )


def submitted(response: pb.ScheduleBatchResponse) -> t.Submitted:
    """ScheduleBatch's answer."""
    return t.Submitted(
        correlation_id=response.correlation_id,
        job_names=list(response.job_names),
        deduplicated=response.deduplicated,
    )


def retry_plan(message: pb.Batch, failed_only: bool) -> tuple[pb.BatchOptions, list[pb.JobSpec]]:
    """The options and jobs that schedule `message`'s jobs again as a new batch.

    With `failed_only`, only the jobs that did not succeed; a dependency on a job that
    succeeded (and so is not scheduled again) is dropped, since it is already met.
    The idempotency key is not carried over: it would return the old batch.
    """
    chosen = [job for job in message.jobs if not failed_only or job.state != pb.JOB_STATE_SUCCEEDED]
    names = {job.spec.name for job in chosen}
    specs = []
    for job in chosen:
        spec = pb.JobSpec()
        spec.CopyFrom(job.spec)
        del spec.depends_on[:]
        spec.depends_on.extend(name for name in job.spec.depends_on if name in names)
        specs.append(spec)
    options = pb.BatchOptions()
    options.CopyFrom(message.options)
    options.idempotency_key = ""
    options.labels["retry-of"] = message.correlation_id
    return options, specs
