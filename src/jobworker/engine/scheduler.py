"""The scheduler: fair share between identities, limits, dependencies, timeouts, cancel.

Free slots go to the identity (batch owner) served least recently among those with a job
that may start (round-robin, a newcomer first), FIFO across that identity's batches; with
jobs.fair_share false, FIFO across all batches. Each identity keeps a heap of its batches
that may start a job, so a dispatch looks at identities and their first batch, never at
queued jobs. Every walk over dependencies uses a worklist: a 10,000-job chain is valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import signal as signals
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from jobworker import logging as jwlogging
from jobworker.config import JobsConfig
from jobworker.engine.executor import (
    Executor,
    ExecutorUnavailable,
    ExitInfo,
    Handle,
    Known,
    Launch,
    SpawnError,
)
from jobworker.errors import InvalidArgument, ResourceExhausted, Unavailable
from jobworker.model import JobEvent, JobState, Limits, Usage
from jobworker.store.batches import BatchRecord, BatchStore
from jobworker.store.logs import append_time, seal_times, times_path
from jobworker.units import format_duration, format_size

log = structlog.get_logger("jobworker.engine")

EventListener = Callable[[BatchRecord, JobEvent], None]


_FAILURES = frozenset({JobState.FAILED, JobState.TIMED_OUT, JobState.LOST})
# Never follows a link planted in a job's folder, never blocks on a FIFO there.
_APPEND_REGULAR = (
    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
)
# A RUNNING job its executor gave no word of (an executor must answer for each it is asked).
_UNANSWERED = ExitInfo(None, 0, Usage(), 0.0, False, lost="its executor does not know it")
_STREAMS = ("stdout", "stderr")
# How often the sizes of running jobs' log files are sampled, for their write-time indexes
# (LogChunk.time, within 100 ms) and against jobs.max_log_bytes: one timer for all jobs, two
# stat calls a job, spread out further only past _LOG_STATS_PER_SECOND (2,000 running jobs).
# A writer gets past the limit by what it writes in one interval, and, if it ignores
# SIGTERM, in kill_grace more.
_LOG_CHECK_INTERVAL = 0.1
_LOG_STATS_PER_SECOND = 40_000


@dataclass(eq=False, slots=True)
class _Run:
    """A job that was handed to the supervisor: its task and, once spawned, its process."""

    index: int
    attempt: int = 1  # 1 for the first (RetryPolicy)
    base: tuple[int, int] = (0, 0)  # its log files' sizes as it started: earlier attempts'
    task: asyncio.Task[None] | None = None
    process: Handle | None = None
    reason: JobState | None = None  # why it is being stopped: CANCELED, TIMED_OUT or LOST
    message: str = ""
    grace: float = 0.0  # the grace period of that stop
    timeout: float = 0.0
    user: str = ""  # the Unix user it runs as ("": the server's own)
    logs: tuple[str, str] = ("", "")  # paths of its stdout and stderr files
    seen: list[int] = field(default_factory=lambda: [0, 0])  # their sizes at the last sample
    times: list[int] = field(default_factory=lambda: [-1, -1])  # their write-time index fds


@dataclass(eq=False)
class _BatchRun:
    """Scheduling state of a batch that has jobs left: never persisted, rebuilt at start."""

    batch: BatchRecord
    seq: int  # submission order: FIFO between batches
    ready: deque[int] = field(default_factory=deque)
    unmet: dict[int, int] = field(default_factory=dict)  # waiting job -> deps not yet succeeded
    dependents: dict[int, list[int]] = field(default_factory=dict)
    runs: dict[int, _Run] = field(default_factory=dict)
    # Jobs waiting out a retry's backoff (counted as queued); None: no timer (shutting down).
    waiting: dict[int, asyncio.TimerHandle | None] = field(default_factory=dict)
    # Jobs a cancel is ending in one sweep: they end CANCELED, not SKIPPED by each other.
    canceling: set[int] = field(default_factory=set)
    offered: bool = False  # in its owner's heap of batches that may start a job

    @property
    def can_start(self) -> bool:
        limit = self.batch.options.max_parallel
        return bool(self.ready) and (limit == 0 or len(self.runs) < limit)


@dataclass(eq=False)
class _Owner:
    """One identity's part of the scheduler: its counts and its batches that may start a job."""

    name: str
    queued: int = 0
    running: int = 0
    served: int = 0  # the dispatch tick of its last start (0: never); the least recent goes first
    batches: list[tuple[int, _BatchRun]] = field(default_factory=list)  # a heap by seq

    def next_batch(self) -> _BatchRun | None:
        """Its first batch in FIFO order that may start a job; drops those that may not."""
        while self.batches:
            br = self.batches[0][1]
            if br.can_start:
                return br
            heapq.heappop(self.batches)
            br.offered = False
        return None


class Scheduler:
    """Runs the jobs of every batch under the global and per-batch limits."""

    def __init__(
        self,
        store: BatchStore,
        executors: Mapping[str, Executor],
        settings: JobsConfig,
        listeners: Iterable[EventListener] = (),
        *,
        default_executor: str = "local",
    ) -> None:
        self.store = store
        self.executors = dict(executors)
        self.default_executor = default_executor
        self.settings = settings
        self.listeners = list(listeners)
        self._active: dict[str, _BatchRun] = {}  # batches with jobs left, in FIFO order
        self._owners: dict[str, _Owner] = {}  # identities with jobs queued or running
        self._startable: dict[str, _Owner] = {}  # those with batches in their heap
        self._seqs = itertools.count()
        self._tick = 0  # starts so far: the clock of _Owner.served
        self._watched: dict[_Run, None] = {}  # running jobs whose log sizes are checked
        self._log_timer: asyncio.TimerHandle | None = None
        self._running = 0
        self._queued = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._held = False  # while a cancel sweeps a batch, nothing new starts

    # -- figures

    @property
    def running(self) -> int:
        """Jobs running now."""
        return self._running

    @property
    def queued(self) -> int:
        """Jobs waiting to run (ready or waiting for dependencies)."""
        return self._queued

    def has_jobs_left(self, cid: str) -> bool:
        """True while batch `cid` has a job queued, waiting to retry or running."""
        return cid in self._active

    def sample_logs(self, cid: str, index: int) -> None:
        """Index job `index`'s output up to now (a stream without follow sends what exists
        when it starts, not only what the 100 ms sampler has seen)."""
        br = self._active.get(cid)
        run = br.runs.get(index) if br is not None else None
        if run is not None and run.logs[0]:
            now = time.time()
            self._sample(run, 0, now)
            self._sample(run, 1, now)

    # -- inputs

    def update_settings(self, settings: JobsConfig) -> None:
        """Take new [jobs] settings; a raised max_concurrent starts queued jobs at once."""
        self.settings = settings
        self._dispatch()

    def check_capacity(self, jobs: int, owner: str = "") -> None:
        """ResourceExhausted when `jobs` more of `owner` would overflow the server's queue or
        the owner's quota; Unavailable when closing."""
        if self._closing:
            raise Unavailable("server is shutting down")
        limit = self.settings.max_queued_jobs
        if self._queued + jobs > limit:
            raise ResourceExhausted(
                f"server's queue is full: {self._queued} jobs queued, "
                f"{jobs} more would pass jobs.max_queued_jobs ({limit})"
            )
        limit = self.settings.max_queued_jobs_per_identity
        queued = self._owners[owner].queued if owner in self._owners else 0
        if limit and queued + jobs > limit:
            raise ResourceExhausted(
                f"queue of {owner!r} is full: {queued} jobs queued, "
                f"{jobs} more would pass jobs.max_queued_jobs_per_identity ({limit})"
            )

    async def check_executor(self, name: str) -> None:
        """InvalidArgument when `name` ("": the default) names no configured executor;
        Unavailable when it cannot start jobs now (its cluster cannot be reached)."""
        if name and name not in self.executors:
            configured = ", ".join(sorted(self.executors))
            raise InvalidArgument(
                f"options: executor {name!r} names no configured executor "
                f"(configured: {configured})"
            )
        try:
            await self.executors[name or self.default_executor].ready()
        except ExecutorUnavailable as exc:
            raise Unavailable(exc.message) from None

    def submit(
        self, batch: BatchRecord, adopted: Mapping[int, Handle | ExitInfo] | None = None
    ) -> None:
        """Queue every job of a newly stored (or recovered) batch; `adopted`: after a
        restart, its jobs still running (or ended while no server was there), by index."""
        br = _BatchRun(batch, next(self._seqs))
        names = batch.names
        owner = self._owner(batch.owner)
        for i, spec in enumerate(batch.specs):
            status = batch.statuses[i]
            if status.state is not JobState.QUEUED:
                continue
            self._queued += 1
            owner.queued += 1
            unmet = 0
            for dep in spec.depends_on:
                j = names[dep]
                br.dependents.setdefault(j, []).append(i)
                if batch.statuses[j].state is not JobState.SUCCEEDED:
                    unmet += 1
            if status.retry_at:  # a retry waiting for its backoff (before a restart, too)
                self._wait_retry(br, i, status.retry_at - time.time())
            elif unmet:
                br.unmet[i] = unmet
            else:
                br.ready.append(i)
        for i, found in (adopted or {}).items():
            self._adopt(br, owner, i, found)
        if not br.ready and not br.unmet and not br.waiting and not br.runs:
            self._forget_if_idle(owner)
            return
        self._active[batch.cid] = br
        self._offer(br)
        self._replay_endings(br)

    def _replay_endings(self, br: _BatchRun) -> None:
        """A recovered batch can hold jobs that ended badly (LOST at the restart, say):
        their dependents are skipped and fail_fast holds, as if it had just happened."""
        batch = br.batch
        with self._hold():
            for j in list(br.dependents):
                state = batch.statuses[j].state
                if state.ended and state is not JobState.SUCCEEDED:
                    self._skip_dependents(br, j)
            if batch.options.fail_fast:
                failed = next(
                    (j for j, st in enumerate(batch.statuses) if st.state in _FAILURES), None
                )
                if failed is not None:
                    self._fail_fast(br, failed, batch.statuses[failed].state)
            self._finish_if_done(br)

    async def cancel(
        self, batch: BatchRecord, indexes: Iterable[int], grace: float | None, message: str
    ) -> None:
        """Cancel the selected jobs; returns once every one of them has ended."""
        br = self._active.get(batch.cid)
        if br is None:
            return
        grace = self.settings.kill_grace if grace is None else grace
        waits: list[asyncio.Task[None]] = []
        selected = sorted(indexes)
        with self._hold():
            br.canceling = {i for i in selected if i not in br.runs}
            for i in selected:
                run = br.runs.get(i)
                if run is not None:
                    if run.task is not None:
                        waits.append(run.task)
                    self._stop(run, JobState.CANCELED, message, grace)
                elif not batch.statuses[i].state.ended:
                    self._end_unstarted(br, i, JobState.CANCELED, message)
            br.canceling = set()
        if waits:
            await asyncio.wait(waits)

    async def recover(self, batches: Iterable[BatchRecord]) -> None:
        """After a restart: take back the jobs that still run (or ended while no server
        was there) from their executors; those whose trees are gone are LOST. Queue the rest."""
        batches = list(batches)
        known: dict[str, list[Known]] = {name: [] for name in self.executors}
        for batch in batches:
            for i, st in enumerate(batch.statuses):
                if st.state is JobState.RUNNING:
                    item = Known(_key(batch, i), st.attempt, st.pid, st.pid_start, st.cgroup)
                    known.setdefault(self._executor_name(batch), []).append(item)
        found: dict[str, tuple[int, Handle | ExitInfo]] = {}
        reported_by: dict[str, Executor] = {}
        for name, executor in self.executors.items():
            answer = await executor.recover(known.get(name, []))
            found.update(answer)
            reported_by.update(dict.fromkeys(answer, executor))
        for batch in batches:
            adopted = self._take_back(batch, found)
            # Jobs whose folders show a start no executor knows of: never run again.
            traced = {i: t for i, t in batch.traced.items() if i not in adopted}
            if traced:
                self.store.record_lost(batch, traced)
            batch.traced = {}
            if not batch.ended:
                self.submit(batch, adopted)
        for key, (attempt, left) in found.items():  # the journal says they ended (or gone)
            if isinstance(left, ExitInfo):
                continue
            if not left.ended:
                log.warning("job_unrecorded_killed", key=key, pid=left.pid)
                left.kill()
            reported_by[key].forget(key, attempt)

    def _take_back(
        self, batch: BatchRecord, found: dict[str, tuple[int, Handle | ExitInfo]]
    ) -> dict[int, Handle | ExitInfo]:
        """The jobs of `batch` its executor still knows, by index; a job it started just
        before the server died (QUEUED in the journal) is recorded RUNNING now."""
        adopted: dict[int, Handle | ExitInfo] = {}
        for i, st in enumerate(batch.statuses):
            if st.state is JobState.RUNNING:
                attempt, item = found.pop(_key(batch, i), (st.attempt, _UNANSWERED))
                adopted[i] = item
            elif st.state is JobState.QUEUED and _key(batch, i) in found:
                attempt, item = found[_key(batch, i)]
                if attempt != st.attempt + 1 or isinstance(item, ExitInfo):
                    continue
                del found[_key(batch, i)]
                self._emit_running(batch, i, item, attempt, _log_sizes(batch.job_dir(i)))
                adopted[i] = item
        return adopted

    def _adopt(self, br: _BatchRun, owner: _Owner, i: int, found: Handle | ExitInfo) -> None:
        status = br.batch.statuses[i]
        run = _Run(i, attempt=status.attempt, base=status.log_sizes)
        br.runs[i] = run
        self._running += 1
        owner.running += 1
        name = f"job {br.batch.cid}/{i}"
        run.task = self._spawn_task(self._run_job(br, run, found), name)

    async def shutdown(self, grace: float | None = None, *, stop_jobs: bool = True) -> None:
        """Stop dispatching, then either stop running jobs (TERM, grace, KILL), recorded
        LOST, or (`stop_jobs` False) leave them running for the next server; wait."""
        self._closing = True
        if self._log_timer is not None:
            self._log_timer.cancel()
            self._log_timer = None
        grace = self.settings.kill_grace if grace is None else grace
        for br in list(self._active.values()):
            for run in list(br.runs.values()):
                if stop_jobs:
                    self._stop(run, JobState.LOST, "server shut down while it ran", grace)
                elif run.task is not None:
                    run.task.cancel()  # nothing recorded: the next server takes it back
        while self._tasks:
            await asyncio.wait(list(self._tasks))
        for executor in self.executors.values():
            await executor.close(stop_jobs=stop_jobs)

    # -- scheduling

    def _executor_name(self, batch: BatchRecord) -> str:
        return batch.options.executor or self.default_executor

    def _executor(self, batch: BatchRecord) -> Executor:
        return self.executors[self._executor_name(batch)]

    @contextlib.contextmanager
    def _hold(self) -> Iterator[None]:
        """Defer dispatching until a sweep over many jobs is done, then dispatch once."""
        held, self._held = self._held, True
        try:
            yield
        finally:
            self._held = held
        self._dispatch()

    def _dispatch(self) -> None:
        if self._closing or self._held:
            return
        limit = self.settings.max_concurrent
        while self._running < limit:
            br = self._pick()
            if br is None:
                break
            self._start(br, br.ready.popleft())

    def waiting(self, cid: str) -> dict[int, str]:
        """Why each ready job of batch `cid` has not started: its place in the batch's FIFO
        and what is full now ("queue: 3 ahead in this batch; all slots busy ...")."""
        br = self._active.get(cid)
        if br is None or not br.ready:
            return {}
        full = self._full(br)
        return {i: f"queue: {n} ahead in this batch{full}" for n, i in enumerate(br.ready)}

    def _full(self, br: _BatchRun) -> str:
        limit = self.settings.max_concurrent
        if self._running >= limit:
            return f"; all slots busy (jobs.max_concurrent {limit})"
        parallel = br.batch.options.max_parallel
        if parallel and len(br.runs) >= parallel:
            return f"; the batch's max_parallel ({parallel}) is reached"
        quota = self.settings.max_running_per_identity
        owner = self._owners.get(br.batch.owner)
        if quota and owner is not None and owner.running >= quota:
            return f"; jobs.max_running_per_identity ({quota}) is reached"
        return ""

    def _pick(self) -> _BatchRun | None:
        """The batch whose job starts next: a scan over identities with a batch that may
        start a job (their first batch each), not over jobs."""
        quota = self.settings.max_running_per_identity
        fair = self.settings.fair_share
        best: _BatchRun | None = None
        best_key = 0
        for owner in list(self._startable.values()):
            br = owner.next_batch()
            if br is None:
                del self._startable[owner.name]
                self._forget_if_idle(owner)
                continue
            if quota and owner.running >= quota:
                continue
            key = owner.served if fair else br.seq
            if best is None or key < best_key:
                best, best_key = br, key
        return best

    def _offer(self, br: _BatchRun) -> None:
        """Put `br` in its owner's heap if it may start a job (after anything that can let it)."""
        if br.offered or not br.can_start:
            return
        br.offered = True
        owner = self._owner(br.batch.owner)
        heapq.heappush(owner.batches, (br.seq, br))
        self._startable[owner.name] = owner

    def _owner(self, name: str) -> _Owner:
        owner = self._owners.get(name)
        if owner is None:
            owner = self._owners[name] = _Owner(name)
        return owner

    def _forget_if_idle(self, owner: _Owner) -> None:
        if not owner.queued and not owner.running and not owner.batches:
            self._owners.pop(owner.name, None)
            self._startable.pop(owner.name, None)

    def _start(self, br: _BatchRun, index: int) -> None:
        status = br.batch.statuses[index]
        run = _Run(index, attempt=status.attempt + 1, base=status.log_sizes)
        br.runs[index] = run
        self._running += 1
        self._queued -= 1
        owner = self._owners[br.batch.owner]
        owner.running += 1
        owner.queued -= 1
        self._tick += 1
        owner.served = self._tick
        run.task = self._spawn_task(self._run_job(br, run), f"job {br.batch.cid}/{index}")

    def _spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_job(
        self, br: _BatchRun, run: _Run, adopted: Handle | ExitInfo | None = None
    ) -> None:
        """Start the job (or take back `adopted`, after a restart) and see it to its end."""
        batch, i = br.batch, run.index
        spec = batch.specs[i]
        limits = spec.limits.over(self.settings.default_limits.to_limits())
        run.timeout = spec.timeout or self.settings.default_timeout
        run.user = self.settings.unix_user_for(batch.owner)
        executor = self._executor(batch)
        try:
            if isinstance(adopted, ExitInfo):  # its tree is gone, nothing says how it ended
                # Its output since the last sample before the restart: first seen now.
                await asyncio.to_thread(seal_times, batch.job_dir(i), time.time())
                self._finish_run(br, run, JobState.LOST, message=adopted.lost)
                return
            if adopted is None:
                process = await self._start_job(br, run, executor, limits)
                if process is None:
                    return
                self._emit_running(batch, i, process, run.attempt, run.base)
            else:
                process = adopted
            run.process = process
            await self._supervise(br, run, process, limits)
            executor.forget(_key(batch, i), run.attempt)
        except Exception:  # one job's bug must not stop the scheduler
            log.exception("job_supervision_failed", **_ids(batch, i))
            if run.process is not None:  # never leave a process behind, whatever failed
                run.process.kill()
                await run.process.wait()
                executor.forget(_key(batch, i), run.attempt)
            if br.runs.get(i) is run:
                self._finish_run(br, run, JobState.FAILED, message="internal error running the job")

    async def _start_job(
        self, br: _BatchRun, run: _Run, executor: Executor, limits: Limits
    ) -> Handle | None:
        """The started job, or None when it could not start (then recorded FAILED)."""
        batch, i = br.batch, run.index
        lost = _lost_stdin(batch, i)
        if lost:
            self._finish_run(br, run, JobState.FAILED, message=lost)
            return None
        launch = Launch(
            _key(batch, i),
            run.attempt,
            batch.specs[i],
            limits,
            batch.job_dir(i),
            run.user,
            stdin_file=bool(batch.stdin_sizes[i]),
        )
        try:
            return await executor.start(launch)
        except SpawnError as exc:
            ids = _ids(batch, i)
            jwlogging.line("info", "job_spawn_failed", {**ids, "message": exc.message})
            self._finish_run(br, run, JobState.FAILED, message=exc.message)
            return None

    def _emit_running(
        self, batch: BatchRecord, i: int, process: Handle, attempt: int, base: tuple[int, int]
    ) -> None:
        self._emit(
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

    async def _supervise(self, br: _BatchRun, run: _Run, process: Handle, limits: Limits) -> None:
        """From the job's start (recorded) to its recorded end: timeout, log sizes, outcome."""
        batch = br.batch
        # One info line a job, at its end (like an access log); the start is for debugging.
        jwlogging.line(
            "debug",
            "job_started",
            {**_ids(batch, run.index), "pid": process.pid, "unix_user": run.user or None},
        )
        if run.reason is not None:  # cancelled while it was being spawned
            self._stop(run, run.reason, run.message, run.grace)
        self._watch_logs(batch, run)
        # A timer rather than asyncio.wait_for: one handle instead of a task's worth of
        # futures and callbacks, on the path every job takes.
        # (A job taken back after a restart has had part of its time.)
        left = run.timeout - max(0.0, time.time() - process.start_time)
        timer = asyncio.get_running_loop().call_later(left, self._time_out, run)
        try:
            info = await process.wait()
        finally:
            timer.cancel()
        state, message = self._outcome(run, info, limits)
        self._finish_run(
            br,
            run,
            state,
            message=message,
            exit_code=info.exit_code,
            signal=info.signal,
            time_=info.end_time,
            info=info,
        )
        ended = {
            **_ids(batch, run.index),
            "state": state.name,
            "exit_code": info.exit_code,
            "signal": info.signal,
            "pid": process.pid,
            "unix_user": run.user or None,
            "seconds": round(max(0.0, info.end_time - process.start_time), 3),
        }
        jwlogging.line("info", "job_ended", ended)

    @staticmethod
    def _outcome(run: _Run, info: ExitInfo, limits: Limits) -> tuple[JobState, str]:
        if info.lost:  # nothing saw how it ended (its executor died with it)
            return JobState.LOST, info.lost
        if run.reason is not None:
            return run.reason, run.message
        if info.oom_killed:
            return (
                JobState.FAILED,
                f"killed: out of memory (limit {format_size(limits.memory_bytes)})",
            )
        if info.exit_code == 0:
            return JobState.SUCCEEDED, "exited with status 0"
        if info.exit_code is not None:
            return JobState.FAILED, f"exited with status {info.exit_code}"
        return JobState.FAILED, f"killed by signal {_signal_name(info.signal)}"

    def _time_out(self, run: _Run) -> None:
        if run.process is not None and run.process.ended:
            return  # it ended in the same loop turn: its own result stands (as wait_for's)
        message = f"timed out after {format_duration(run.timeout)}"
        self._stop(run, JobState.TIMED_OUT, message, self.settings.kill_grace)

    def _watch_logs(self, batch: BatchRecord, run: _Run) -> None:
        """Check the job's log sizes against jobs.max_log_bytes while it runs: the output
        goes from the process straight into its files, so the sizes are polled."""
        folder = batch.job_dir(run.index)
        run.logs = (f"{folder}/stdout", f"{folder}/stderr")
        run.seen = list(run.base)
        self._watched[run] = None
        if self._log_timer is None and not self._closing:
            loop = asyncio.get_running_loop()
            self._log_timer = loop.call_later(_LOG_CHECK_INTERVAL, self._check_logs)

    def _check_logs(self) -> None:
        """Sample every running job's log sizes: index what grew with the time it was first
        seen; stop (FAILED) a job with a stream past jobs.max_log_bytes in this attempt."""
        self._log_timer = None
        limit = self.settings.max_log_bytes
        now = time.time()
        for run in list(self._watched):
            for k in (0, 1):
                size = self._sample(run, k, now)
                if limit and size - run.base[k] > limit:
                    del self._watched[run]
                    message = (
                        f"stopped: {_STREAMS[k]} passed jobs.max_log_bytes ({format_size(limit)})"
                    )
                    self._stop(run, JobState.FAILED, message, self.settings.kill_grace)
                    break
        if self._watched and not self._closing:
            delay = max(_LOG_CHECK_INTERVAL, 2 * len(self._watched) / _LOG_STATS_PER_SECOND)
            self._log_timer = asyncio.get_running_loop().call_later(delay, self._check_logs)

    @staticmethod
    def _sample(run: _Run, k: int, now: float) -> int:
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

    def _seal_logs(self, run: _Run) -> None:
        """The last sample of an attempt that ended, then its index files are closed."""
        if run.logs[0]:
            now = time.time()
            for k in (0, 1):
                self._sample(run, k, now)
                if run.times[k] >= 0:
                    os.close(run.times[k])
                    run.times[k] = -1

    def _stop(self, run: _Run, reason: JobState, message: str, grace: float) -> None:
        """Ask a running job to stop; the first reason given is the one recorded."""
        if run.reason is None:
            run.reason, run.message, run.grace = reason, message, grace
        process = run.process
        if process is not None:
            self._spawn_task(_stop_quietly(process, grace), f"stop pid {process.pid}")

    def _finish_run(
        self,
        br: _BatchRun,
        run: _Run,
        state: JobState,
        *,
        message: str,
        exit_code: int | None = None,
        signal: int = 0,
        time_: float | None = None,
        info: ExitInfo | None = None,
    ) -> None:
        del br.runs[run.index]
        self._watched.pop(run, None)
        self._seal_logs(run)
        self._running -= 1
        owner = self._owners[br.batch.owner]
        owner.running -= 1
        usage = info.usage if info else None
        ending: dict[str, Any] = {"exit_code": exit_code, "signal": signal, "time_": time_}
        if self._emit_retry(br.batch, run.index, run.attempt, state, message, usage, **ending):
            self._queued += 1
            owner.queued += 1
            delay = br.batch.statuses[run.index].retry_at - time.time()
            self._wait_retry(br, run.index, delay)
            self._dispatch()
            return
        self._emit(
            br.batch, run.index, state, message=message, usage=usage, attempt=run.attempt, **ending
        )
        self._after_end(br, run.index, state)
        self._forget_if_idle(owner)

    def _emit_retry(
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
        self._emit(
            batch,
            i,
            JobState.QUEUED,
            message=said,
            attempt=attempt + 1,
            retry_at=time.time() + delay,
            offsets=_log_sizes(batch.job_dir(i)),
            usage=usage,
            **ending,
        )
        return True

    def _wait_retry(self, br: _BatchRun, i: int, delay: float) -> None:
        """Hold job `i` back until its backoff is over, then make it ready."""
        if self._closing:  # it runs after the restart, when its time has come
            br.waiting[i] = None
            return
        loop = asyncio.get_running_loop()
        br.waiting[i] = loop.call_later(max(0.0, delay), self._retry_due, br, i)

    def _retry_due(self, br: _BatchRun, i: int) -> None:
        if br.waiting.pop(i, None) is None:
            return
        br.ready.append(i)
        self._offer(br)
        self._dispatch()

    def _end_unstarted(self, br: _BatchRun, i: int, state: JobState, message: str) -> None:
        """End a job that never started (cancelled or skipped), and what follows from it."""
        self._drop(br, i, state, message)
        self._after_end(br, i, state)

    def _drop(self, br: _BatchRun, i: int, state: JobState, message: str) -> None:
        """Record the end of a job that never started; nothing more."""
        if i in br.waiting:  # a retry waiting for its backoff: it never runs
            handle = br.waiting.pop(i)
            if handle is not None:
                handle.cancel()
        elif i in br.unmet:
            del br.unmet[i]
        elif br.ready and br.ready[0] == i:  # a sweep in index order: no search
            br.ready.popleft()
        else:
            with contextlib.suppress(ValueError):
                br.ready.remove(i)
        self._queued -= 1
        self._owners[br.batch.owner].queued -= 1
        self._emit(br.batch, i, state, message=message, attempt=br.batch.statuses[i].attempt)

    def _after_end(self, br: _BatchRun, i: int, state: JobState) -> None:
        batch = br.batch
        if state is JobState.SUCCEEDED:
            for d in br.dependents.get(i, ()):
                if d in br.unmet:
                    br.unmet[d] -= 1
                    if not br.unmet[d]:
                        del br.unmet[d]
                        br.ready.append(d)
        elif not self._closing:  # jobs left queued at shutdown run after the restart
            self._skip_dependents(br, i)
            # Not from SKIPPED or CANCELED: the job whose failure caused those is the one
            # to name, and it has already triggered fail_fast itself.
            if batch.options.fail_fast and state in _FAILURES:
                self._fail_fast(br, i, state)
        self._finish_if_done(br)
        self._offer(br)
        self._dispatch()

    def _fail_fast(self, br: _BatchRun, i: int, state: JobState) -> None:
        batch = br.batch
        reason = f"canceled: job {batch.specs[i].name} {state.name.lower()} (fail_fast)"
        with self._hold():
            br.canceling = {j for j, st in enumerate(batch.statuses) if not st.state.ended}
            for j, status in enumerate(batch.statuses):
                if status.state.ended:
                    continue
                run = br.runs.get(j)
                if run is not None:
                    self._stop(run, JobState.CANCELED, reason, self.settings.kill_grace)
                else:
                    self._end_unstarted(br, j, JobState.CANCELED, reason)
            br.canceling = set()

    def _skip_dependents(self, br: _BatchRun, i: int) -> None:
        """Skip every job that depends on job `i`, directly or not (a worklist, no recursion)."""
        batch = br.batch
        work = [i]
        while work:
            j = work.pop()
            name, state = batch.specs[j].name, batch.statuses[j].state
            message = f"skipped: dependency {name} did not succeed ({state.name.lower()})"
            for d in br.dependents.get(j, ()):
                if not batch.statuses[d].state.ended and d not in br.runs and d not in br.canceling:
                    self._drop(br, d, JobState.SKIPPED, message)
                    work.append(d)

    def _finish_if_done(self, br: _BatchRun) -> None:
        if not br.ready and not br.unmet and not br.runs and not br.waiting:
            self._active.pop(br.batch.cid, None)

    def _emit(
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


def _ids(batch: BatchRecord, index: int) -> dict[str, Any]:
    """The fields of every line about a job (jwlogging.line: no logger bound per job; made
    when a line is written, not held by each running job)."""
    return {
        "correlation_id": batch.cid,
        "job_index": index,
        "job_name": batch.specs[index].name,
        "identity": batch.owner,
    }


def _key(batch: BatchRecord, index: int) -> str:
    """The job's key at its executor (and the name of its cgroup)."""
    return f"{batch.cid}-{index}"


def _log_sizes(folder: Any) -> tuple[int, int]:
    """The sizes of a job's stdout and stderr files (0 for one not there)."""
    sizes = []
    for name in _STREAMS:
        try:
            sizes.append(os.stat(f"{folder}/{name}").st_size)
        except OSError:
            sizes.append(0)
    return sizes[0], sizes[1]


def _lost_stdin(batch: BatchRecord, index: int) -> str:
    """Why job `index` cannot get the stdin it was scheduled with, or "" when it can."""
    expected = batch.stdin_sizes[index]
    if not expected:
        return ""
    path = batch.job_dir(index) / "stdin"
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        size = -1
    if size == expected:
        return ""
    return f"stdin lost: {path} should hold {expected} bytes (was the data_dir changed?)"


async def _stop_quietly(process: Handle, grace: float) -> None:
    try:
        await process.stop(grace)
    except Exception:
        log.exception("job_stop_failed", pid=process.pid)


def _signal_name(number: int) -> str:
    try:
        return signals.Signals(number).name
    except ValueError:
        return str(number)
