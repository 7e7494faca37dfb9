"""server/convert.py: wire <-> model, pure functions, no server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from jobworker.config import JobsConfig
from jobworker.errors import InvalidArgument
from jobworker.model import BatchState, JobEvent, JobSpec, JobState, Limits, RetryPolicy
from jobworker.server import convert
from jobworker.store.follow import Chunk
from jobworker.store.logs import Tail
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.validate import BatchBuilder


def test_a_spec_survives_the_wire_both_ways() -> None:
    wire = pb.JobSpec(
        name="build",
        argv=["make", "-j2"],
        env={"A": "1"},
        working_dir="/tmp",
        stdin=b"in",
        depends_on=["fetch"],
        limits=pb.ResourceLimits(cpu_millis=500, memory_bytes=1 << 30, pids_max=7),
        retry=pb.RetryPolicy(max_attempts=3),
    )
    wire.timeout.FromSeconds(90)
    spec = convert.spec_from_pb(0, wire)
    assert spec.limits == Limits(cpu_millis=500, memory_bytes=1 << 30, pids_max=7)
    assert spec.timeout == 90.0 and spec.retry == RetryPolicy(max_attempts=3)
    back = convert.spec_to_pb(spec)  # the stored policy with its defaults filled in
    assert back.retry.max_backoff.seconds == 300 and back.limits == wire.limits
    assert convert.spec_from_pb(0, back) == spec


def test_an_unnamed_job_gets_the_default_name_and_no_limits() -> None:
    spec = convert.spec_from_pb(4, pb.JobSpec(argv=["true"]))
    assert spec.name == "job-4"
    assert spec.limits == Limits() and not convert.spec_to_pb(spec).HasField("limits")


def test_redacted_env_keeps_the_keys() -> None:
    spec = JobSpec("j", ("env",), env={"TOKEN": "secret"})  # type: ignore[arg-type]
    assert dict(convert.spec_to_pb(spec, redact=True).env) == {"TOKEN": convert.REDACTED}


@pytest.mark.parametrize(
    ("retry", "message"),
    [
        (pb.RetryPolicy(max_attempts=101), "at most 100"),
        (pb.RetryPolicy(max_attempts=2, retry_on=[pb.JOB_STATE_SUCCEEDED]), "names SUCCEEDED"),
        (pb.RetryPolicy(max_attempts=2, retry_on=[99]), "names 99"),
    ],
)
def test_a_bad_retry_policy_names_job_and_field(retry: pb.RetryPolicy, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        convert.spec_from_pb(2, pb.JobSpec(name="x", argv=["true"], retry=retry))
    assert str(info.value).startswith("job 2 ('x'): retry.")


def test_backoffs_are_checked() -> None:
    retry = pb.RetryPolicy(max_attempts=2)
    retry.initial_backoff.FromSeconds(10)
    retry.max_backoff.FromSeconds(5)
    with pytest.raises(InvalidArgument, match=r"less than retry\.initial_backoff"):
        convert.retry_from_pb("job 0", retry)
    assert convert.retry_from_pb("job 0", pb.RetryPolicy(max_attempts=1)) is None


def test_a_negative_timeout_is_invalid() -> None:
    wire = pb.JobSpec(argv=["true"])
    wire.timeout.seconds = -1
    with pytest.raises(InvalidArgument, match="timeout is not a valid duration"):
        convert.spec_from_pb(0, wire)


def test_grace_period() -> None:
    assert convert.grace_from_pb(pb.CancelBatchRequest()) is None
    request = pb.CancelBatchRequest()
    request.grace_period.FromMilliseconds(1500)
    assert convert.grace_from_pb(request) == 1.5
    request.grace_period.FromSeconds(convert.MAX_GRACE + 1)
    with pytest.raises(InvalidArgument, match="grace_period"):
        convert.grace_from_pb(request)


def test_states_filter() -> None:
    assert convert.states_from_pb([1, 3]) == [BatchState.RUNNING, BatchState.FAILED]
    with pytest.raises(InvalidArgument, match="states: 9 is not a batch state"):
        convert.states_from_pb([9])


async def _stream(*items: pb.ScheduleBatchRequest) -> AsyncIterator[pb.ScheduleBatchRequest]:
    for item in items:
        yield item


async def test_a_stream_becomes_a_validated_batch() -> None:
    builder = await convert.batch_from_pb(
        _stream(
            pb.ScheduleBatchRequest(options=pb.BatchOptions(fail_fast=True)),
            pb.ScheduleBatchRequest(job=pb.JobSpec(argv=["true"])),
            pb.ScheduleBatchRequest(job=pb.JobSpec(name="b", argv=["true"], depends_on=["job-0"])),
        ),
        BatchBuilder(JobsConfig()),
    )
    options, specs = builder.finish()
    assert options.fail_fast and [s.name for s in specs] == ["job-0", "b"]


async def test_an_empty_message_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="neither options nor job"):
        await convert.batch_from_pb(_stream(pb.ScheduleBatchRequest()), BatchBuilder(JobsConfig()))


class _Batch:
    specs = (JobSpec("a", ("true",)),)


def test_a_chunk_and_an_event_as_responses() -> None:
    batch = _Batch()
    chunk = convert.item_to_pb(batch, Chunk(0, 1, b"hi", 12.5, attempt=2), "c1")  # type: ignore[arg-type]
    assert chunk.cursor == "c1" and chunk.chunk.data == b"hi" and chunk.chunk.job_name == "a"
    assert (chunk.chunk.time.seconds, chunk.chunk.time.nanos, chunk.chunk.attempt) == (12, 5e8, 2)
    event = JobEvent(seq=1, index=0, state=JobState.FAILED, time=1.0, exit_code=3, attempt=0)
    change = convert.item_to_pb(batch, event, "c2").state_change  # type: ignore[arg-type]
    assert (change.state, change.exit_code, change.attempt) == (pb.JOB_STATE_FAILED, 3, 1)


def test_tails_tell_the_sizes() -> None:
    job = pb.Job()
    convert.set_tails(job, Tail(b"end", 100, True), Tail(b"", 0, False))
    assert (job.stdout.data, job.stdout.total_bytes, job.stdout.truncated) == (b"end", 100, True)
    assert job.stderr.total_bytes == 0 and not job.stderr.truncated
