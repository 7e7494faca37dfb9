"""Attempts and retry policies survive a restart: journal lines and batch.json (issue 14)."""

from __future__ import annotations

from pathlib import Path

from jobworker.model import BatchOptions, JobEvent, JobSpec, JobState, RetryPolicy
from jobworker.store.batches import BatchStore
from jobworker.store.codec import event_from_line, event_to_line
from tests.unit.store.new_batch import new_batch


def test_retry_fields_round_trip_through_a_journal_line() -> None:
    event = JobEvent(
        seq=7,
        index=1,
        state=JobState.QUEUED,
        time=1.5,
        exit_code=3,
        message="exited with status 3; retrying in 2s, attempt 2 of 3",
        attempt=2,
        retry_at=3.5,
        offsets=(10, 20),
    )
    assert event_from_line(event_to_line(event)) == event
    plain = JobEvent(seq=0, index=0, state=JobState.RUNNING, time=1.0, pid=5, pid_start=6)
    line = event_to_line(plain)
    assert b'"a"' not in line and b'"o"' not in line and b'"r"' not in line
    assert event_from_line(line) == plain


def test_a_restart_sees_the_policy_and_the_waiting_retry(tmp_path: Path) -> None:
    policy = RetryPolicy(3, 0.5, 4.0, frozenset({JobState.FAILED, JobState.LOST}))
    store = BatchStore(tmp_path)
    batch = new_batch(store, "alice", BatchOptions(), (JobSpec("a", ("false",), retry=policy),))
    store.append(batch, JobEvent(seq=1, index=0, state=JobState.RUNNING, time=1.0, pid=9))
    store.append(
        batch,
        JobEvent(
            seq=2,
            index=0,
            state=JobState.QUEUED,
            time=2.0,
            exit_code=1,
            message="retrying",
            attempt=2,
            retry_at=2.5,
            offsets=(4, 0),
        ),
    )
    store.close()
    (loaded,) = BatchStore(tmp_path).load()
    assert loaded.specs[0].retry == policy
    status = loaded.statuses[0]
    assert (status.state, status.attempt, status.retry_at) == (JobState.QUEUED, 1, 2.5)
    assert (status.exit_code, status.log_sizes) == (1, (4, 0))
    assert not loaded.ended


def test_backoff_doubles_up_to_its_maximum() -> None:
    policy = RetryPolicy(10, 1.0, 5.0)
    assert [policy.backoff(n) for n in range(2, 7)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.retries(JobState.FAILED, 9) and not policy.retries(JobState.FAILED, 10)
    assert not policy.retries(JobState.LOST, 1)  # not named: the default is FAILED, TIMED_OUT
