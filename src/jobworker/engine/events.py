"""Recording what happens to jobs: each event appended to its batch's journal (the store),
then told to the listeners (the metrics)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from jobworker.engine.executor import Handle
from jobworker.engine.logwatch import log_sizes
from jobworker.model import JobEvent, JobState, Usage
from jobworker.store.batches import BatchRecord, BatchStore
from jobworker.units import format_duration

EventListener = Callable[[BatchRecord, JobEvent], None]


class Recorder:
    """Records job events; `listeners` is read at each event (the scheduler's own list)."""

    def __init__(self, store: BatchStore, listeners: list[EventListener]) -> None:
        self.store = store
        self.listeners = listeners

    def running(
        self, batch: BatchRecord, i: int, process: Handle, attempt: int, base: tuple[int, int]
    ) -> None:
        """Job `i` runs as `process`; `base`: its log files' sizes as it started."""
        self.emit(
            batch,
            i,
            JobState.RUNNING,
            time_=process.start_time,
            pid=process.pid,
            pid_start=process.pid_start,
            cgroup=process.cgroup,
            attempt=attempt,
            offsets=base,
            node=process.node,
        )

    def retry(
        self,
        batch: BatchRecord,
        i: int,
        attempt: int,
        state: JobState,
        message: str,
        usage: Usage | None = None,
        **ending: Any,
    ) -> bool:
        """Record that attempt `attempt`, ended in `state`, is followed by another after its
        backoff, when the job's policy says so (a QUEUED event saying when); else False."""
        policy = batch.specs[i].retry
        if policy is None or not policy.retries(state, attempt):
            return False
        delay = policy.backoff(attempt + 1)
        said = (
            f"{message}; retrying in {format_duration(delay)}, "
            f"attempt {attempt + 1} of {policy.max_attempts}"
        )
        self.emit(
            batch,
            i,
            JobState.QUEUED,
            message=said,
            attempt=attempt + 1,
            retry_at=time.time() + delay,
            offsets=log_sizes(batch.job_dir(i)),
            usage=usage,
            **ending,
        )
        return True

    def emit(
        self,
        batch: BatchRecord,
        index: int,
        state: JobState,
        *,
        message: str = "",
        exit_code: int | None = None,
        signal: int = 0,
        time_: float | None = None,
        pid: int = 0,
        pid_start: int = 0,
        usage: Usage | None = None,
        cgroup: str = "",
        attempt: int = 1,
        retry_at: float = 0.0,
        offsets: tuple[int, int] = (0, 0),
        node: str = "",
    ) -> None:
        event = JobEvent(
            seq=self.store.next_seq(batch),
            index=index,
            state=state,
            time=time.time() if time_ is None else time_,
            exit_code=exit_code,
            signal=signal,
            message=message,
            pid=pid,
            pid_start=pid_start,
            usage=usage,
            cgroup=cgroup,
            attempt=attempt,
            retry_at=retry_at,
            offsets=offsets,
            node=node,
        )
        self.store.append(batch, event)
        for listener in self.listeners:
            listener(batch, event)
