"""The scheduler: one FIFO queue across batches, limits, dependencies, timeouts, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal as signals
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from jobworker import logging as jwlogging
from jobworker.engine.process import ExitInfo, Process, SpawnError, Supervisor, kill_stale
from jobworker.errors import ResourceExhausted, Unavailable
from jobworker.model import JobEvent, JobState, Limits, Usage
from jobworker.store.batches import BatchRecord, BatchStore
from jobworker.units import format_duration, format_size

log = structlog.get_logger("jobworker.engine")

EventListener = Callable[[BatchRecord, JobEvent], None]


_FAILURES = frozenset({JobState.FAILED, JobState.TIMED_OUT, JobState.LOST})


class JobSettings(Protocol):
    """The reloadable [jobs] settings the scheduler reads each time it decides."""

    @property
    def max_concurrent(self) -> int: ...
    @property
    def default_timeout(self) -> float: ...
    @property
    def kill_grace(self) -> float: ...
    @property
    def max_queued_jobs(self) -> int: ...
    @property
    def default_limits(self) -> _LimitsSource: ...
    def unix_user_for(self, identity: str) -> str: ...


class _LimitsSource(Protocol):
    def to_limits(self) -> Limits: ...


@dataclass(eq=False)
class _Run:
    """A job that was handed to the supervisor: its task and, once spawned, its process."""

    index: int
    task: asyncio.Task[None] | None = None
    process: Process | None = None
    reason: JobState | None = None  # why it is being stopped: CANCELED, TIMED_OUT or LOST
    message: str = ""
    grace: float = 0.0  # the grace period of that stop
    timeout: float = 0.0
    user: str = ""  # the Unix user it runs as ("": the server's own)


@dataclass(eq=False)
class _BatchRun:
    """Scheduling state of a batch that has jobs left: never persisted, rebuilt at start."""

    batch: BatchRecord
    ready: deque[int] = field(default_factory=deque)
    unmet: dict[int, int] = field(default_factory=dict)  # waiting job -> deps not yet succeeded
    dependents: dict[int, list[int]] = field(default_factory=dict)
    runs: dict[int, _Run] = field(default_factory=dict)
    # Jobs a cancel is ending in one sweep: they end CANCELED, not SKIPPED by each other.
    canceling: set[int] = field(default_factory=set)

    @property
    def can_start(self) -> bool:
        limit = self.batch.options.max_parallel
        return bool(self.ready) and (limit == 0 or len(self.runs) < limit)


class Engine:
    """Runs the jobs of every batch under the global and per-batch limits."""

    def __init__(
        self,
        store: BatchStore,
        supervisor: Supervisor,
        settings: JobSettings,
        listeners: Iterable[EventListener] = (),
    ) -> None:
        self.store = store
        self.supervisor = supervisor
        self.settings = settings
        self.listeners = list(listeners)
        self._active: dict[str, _BatchRun] = {}  # batches with jobs left, in FIFO order
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

    # -- inputs

    def update_settings(self, settings: JobSettings) -> None:
        """Take new [jobs] settings; a raised max_concurrent starts queued jobs at once."""
        self.settings = settings
        self._dispatch()

    def check_capacity(self, jobs: int) -> None:
        """ResourceExhausted when `jobs` more would overflow the queue, Unavailable when closing."""
        if self._closing:
            raise Unavailable("server is shutting down")
        limit = self.settings.max_queued_jobs
        if self._queued + jobs > limit:
            raise ResourceExhausted(
                f"server's queue is full: {self._queued} jobs queued, "
                f"{jobs} more would pass jobs.max_queued_jobs ({limit})"
            )

    def submit(self, batch: BatchRecord) -> None:
        """Queue every job of a newly stored (or recovered) batch."""
        br = _BatchRun(batch)
        names = batch.names
        for i, spec in enumerate(batch.specs):
            status = batch.statuses[i]
            if status.state is not JobState.QUEUED:
                continue
            self._queued += 1
            unmet = 0
            for dep in spec.depends_on:
                j = names[dep]
                br.dependents.setdefault(j, []).append(i)
                if batch.statuses[j].state is not JobState.SUCCEEDED:
                    unmet += 1
            if unmet:
                br.unmet[i] = unmet
            else:
                br.ready.append(i)
        if not br.ready and not br.unmet:
            return
        self._active[batch.cid] = br
        # A recovered batch can hold jobs that ended badly (LOST at the restart, say):
        # their dependents are skipped and fail_fast holds, as if it had just happened.
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
        """After a restart: RUNNING jobs become LOST (killed if still alive); queue the rest."""
        for batch in batches:
            for i, status in enumerate(batch.statuses):
                if status.state is not JobState.RUNNING:
                    continue
                killed = await asyncio.to_thread(
                    kill_stale,
                    status.pid,
                    status.pid_start,
                    status.cgroup or f"{batch.cid}-{i}",
                    self.supervisor.backend,
                )
                message = "server restarted while it ran"
                if killed:
                    message += "; its processes were killed"
                self._emit(batch, i, JobState.LOST, message=message)
            if not batch.ended:
                self.submit(batch)

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop dispatching, stop running jobs (TERM, grace, KILL), record them LOST, wait."""
        self._closing = True
        grace = self.settings.kill_grace if grace is None else grace
        for br in list(self._active.values()):
            for run in list(br.runs.values()):
                self._stop(run, JobState.LOST, "server shut down while it ran", grace)
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    # -- scheduling

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
        for br in list(self._active.values()):
            if self._running >= limit:
                break
            while self._running < limit and br.can_start:
                self._start(br, br.ready.popleft())

    def _start(self, br: _BatchRun, index: int) -> None:
        run = _Run(index)
        br.runs[index] = run
        self._running += 1
        self._queued -= 1
        run.task = self._spawn_task(self._run_job(br, run), f"job {br.batch.cid}/{index}")

    def _spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_job(self, br: _BatchRun, run: _Run) -> None:
        batch, i = br.batch, run.index
        spec = batch.specs[i]
        # The fields of every line about this job (jwlogging.line: no logger bound per job).
        ids: dict[str, Any] = {
            "correlation_id": batch.cid,
            "job_index": i,
            "job_name": spec.name,
            "identity": batch.owner,
        }
        limits = spec.limits.over(self.settings.default_limits.to_limits())
        run.timeout = spec.timeout or self.settings.default_timeout
        run.user = self.settings.unix_user_for(batch.owner)
        try:
            lost = _lost_stdin(batch, i)
            if lost:
                self._finish_run(br, run, JobState.FAILED, message=lost)
                return
            try:
                process = await self.supervisor.spawn(
                    spec,
                    limits,
                    batch.job_dir(i),
                    f"{batch.cid}-{i}",
                    run.user,
                    stdin_file=bool(batch.stdin_sizes[i]),
                )
            except SpawnError as exc:
                jwlogging.line("info", "job_spawn_failed", {**ids, "message": exc.message})
                self._finish_run(br, run, JobState.FAILED, message=exc.message)
                return
            run.process = process
            self._emit(
                batch,
                i,
                JobState.RUNNING,
                time_=process.start_time,
                pid=process.pid,
                pid_start=process.pid_start,
                cgroup=process.cgroup.name if process.cgroup.slot is not None else "",
            )
            # One info line a job, at its end (like an access log); the start is for debugging.
            jwlogging.line(
                "debug", "job_started", {**ids, "pid": process.pid, "unix_user": run.user or None}
            )
            if run.reason is not None:  # cancelled while it was being spawned
                self._stop(run, run.reason, run.message, run.grace)
            # A timer rather than asyncio.wait_for: one handle instead of a task's worth of
            # futures and callbacks, on the path every job takes.
            timer = asyncio.get_running_loop().call_later(run.timeout, self._time_out, run)
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
                **ids,
                "state": state.name,
                "exit_code": info.exit_code,
                "signal": info.signal,
                "pid": process.pid,
                "unix_user": run.user or None,
                "seconds": round(max(0.0, info.end_time - process.start_time), 3),
            }
            jwlogging.line("info", "job_ended", ended)
        except Exception:  # one job's bug must not stop the scheduler
            log.exception("job_supervision_failed", **ids)
            if run.process is not None:  # never leave a process behind, whatever failed
                run.process.kill()
                await run.process.wait()
            if br.runs.get(i) is run:
                self._finish_run(br, run, JobState.FAILED, message="internal error running the job")

    @staticmethod
    def _outcome(run: _Run, info: ExitInfo, limits: Limits) -> tuple[JobState, str]:
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
        self._running -= 1
        self._emit(
            br.batch,
            run.index,
            state,
            message=message,
            exit_code=exit_code,
            signal=signal,
            time_=time_,
            usage=info.usage if info else None,
        )
        self._after_end(br, run.index, state)

    def _end_unstarted(self, br: _BatchRun, i: int, state: JobState, message: str) -> None:
        """End a job that never started (cancelled or skipped)."""
        if i in br.unmet:
            del br.unmet[i]
        else:
            with contextlib.suppress(ValueError):
                br.ready.remove(i)
        self._queued -= 1
        self._emit(br.batch, i, state, message=message)
        self._after_end(br, i, state)

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
        batch = br.batch
        name, state = batch.specs[i].name, batch.statuses[i].state
        for d in br.dependents.get(i, ()):
            if not batch.statuses[d].state.ended and d not in br.runs and d not in br.canceling:
                message = f"skipped: dependency {name} did not succeed ({state.name.lower()})"
                self._end_unstarted(br, d, JobState.SKIPPED, message)

    def _finish_if_done(self, br: _BatchRun) -> None:
        if not br.ready and not br.unmet and not br.runs:
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
        )
        self.store.append(batch, event)
        for listener in self.listeners:
            listener(batch, event)


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


async def _stop_quietly(process: Process, grace: float) -> None:
    try:
        await process.stop(grace)
    except Exception:
        log.exception("job_stop_failed", pid=process.pid)


def _signal_name(number: int) -> str:
    try:
        return signals.Signals(number).name
    except ValueError:
        return str(number)
