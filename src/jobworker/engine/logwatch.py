"""Running jobs' output: their log files' sizes, sampled into the files' write-time indexes
(LogChunk.time) and checked against jobs.max_log_bytes.

The output goes from the process straight into its files, so the sizes are polled.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from jobworker.engine.queues import Run
from jobworker.store.logs import append_time, times_path
from jobworker.units import format_size

log = structlog.get_logger("jobworker.engine")

STREAMS = ("stdout", "stderr")
# Never follows a link planted in a job's folder, never blocks on a FIFO there.
_APPEND_REGULAR = (
    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
)
# How often the sizes of running jobs' log files are sampled, for their write-time indexes
# (LogChunk.time, within 100 ms) and against jobs.max_log_bytes: one timer for all jobs, two
# stat calls a job, spread out further only past _LOG_STATS_PER_SECOND (2,000 running jobs).
# A writer gets past the limit by what it writes in one interval, and, if it ignores
# SIGTERM, in kill_grace more.
_LOG_CHECK_INTERVAL = 0.1
_LOG_STATS_PER_SECOND = 40_000


class LogWatch:
    """One timer for every running job's log files. `limit` gives jobs.max_log_bytes now;
    `overflow` is told of a job with a stream past it (with why), once."""

    def __init__(self, limit: Callable[[], int], overflow: Callable[[Run, str], None]) -> None:
        self._limit = limit
        self._overflow = overflow
        self._watched: dict[Run, None] = {}  # running jobs whose log sizes are checked
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def watch(self, run: Run, folder: Path) -> None:
        """Check the sizes of the job's log files in `folder` while it runs."""
        run.logs = (f"{folder}/stdout", f"{folder}/stderr")
        run.seen = list(run.base)
        self._watched[run] = None
        if self._timer is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(_LOG_CHECK_INTERVAL, self._check)

    def release(self, run: Run) -> None:
        """The attempt ended: its last sample, then its index files are closed."""
        self._watched.pop(run, None)
        if run.logs[0]:
            now = time.time()
            for k in (0, 1):
                sample(run, k, now)
                if run.times[k] >= 0:
                    os.close(run.times[k])
                    run.times[k] = -1

    def close(self) -> None:
        """No more sampling (shutting down)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        """Sample every running job's log sizes: index what grew with the time it was first
        seen; report a job with a stream past jobs.max_log_bytes in this attempt."""
        self._timer = None
        limit = self._limit()
        now = time.time()
        for run in list(self._watched):
            for k in (0, 1):
                size = sample(run, k, now)
                if limit and size - run.base[k] > limit:
                    del self._watched[run]
                    message = (
                        f"stopped: {STREAMS[k]} passed jobs.max_log_bytes ({format_size(limit)})"
                    )
                    self._overflow(run, message)
                    break
        if self._watched and not self._closed:
            delay = max(_LOG_CHECK_INTERVAL, 2 * len(self._watched) / _LOG_STATS_PER_SECOND)
            self._timer = asyncio.get_running_loop().call_later(delay, self._check)


def sample_now(run: Run) -> None:
    """Index the job's output up to now, if it is watched."""
    if run.logs[0]:
        now = time.time()
        sample(run, 0, now)
        sample(run, 1, now)


def sample(run: Run, k: int, now: float) -> int:
    """The size of the job's stream `k`, recorded in its write-time index if it grew."""
    try:
        size = os.stat(run.logs[k]).st_size
    except OSError:  # not there: nothing written
        return 0
    if size > run.seen[k]:
        try:
            if run.times[k] < 0:  # made at the first output: most streams have none
                flags = _APPEND_REGULAR
                run.times[k] = os.open(times_path(*run.logs[k].rsplit("/", 1)), flags, 0o600)
            append_time(run.times[k], size, now)
            run.seen[k] = size
        except OSError as exc:  # disk full, say: the bytes then take their reader's time
            log.warning("log_times_write_failed", path=run.logs[k], error=str(exc))
    return size


def log_sizes(folder: Path) -> tuple[int, int]:
    """The sizes of a job's stdout and stderr files (0 for one not there)."""
    sizes = []
    for name in STREAMS:
        try:
            sizes.append(os.stat(f"{folder}/{name}").st_size)
        except OSError:
            sizes.append(0)
    return sizes[0], sizes[1]
