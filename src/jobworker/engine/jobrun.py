"""One job's life at its executor: started (or taken back after a restart), its output
watched, timed out or stopped, and how it ended; the tasks that see the jobs to their end."""

from __future__ import annotations

import asyncio
import os
import signal as signals
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import structlog

from jobworker import logging as jwlogging
from jobworker.config import JobsConfig
from jobworker.engine.events import Recorder
from jobworker.engine.executor import Executor, ExitInfo, Handle, Launch, SpawnError
from jobworker.engine.logwatch import LogWatch
from jobworker.engine.queues import BatchRun, Run
from jobworker.model import JobState, Limits
from jobworker.store.batches import BatchRecord
from jobworker.store.logs import seal_times
from jobworker.units import format_duration, format_size

log = structlog.get_logger("jobworker.engine")


class Finish(Protocol):
    """Records a job's end in the scheduler, and what follows from it."""

    def __call__(
        self,
        br: BatchRun,
        run: Run,
        state: JobState,
        *,
        message: str,
        exit_code: int | None = None,
        signal: int = 0,
        time_: float | None = None,
        info: ExitInfo | None = None,
    ) -> None: ...


class JobRunner:
    """Sees each job it is given to its end in a task of its own, then tells `finish`.
    `settings` gives the [jobs] settings now; `executor_of`, the executor of a batch."""

    def __init__(
        self,
        settings: Callable[[], JobsConfig],
        executor_of: Callable[[BatchRecord], Executor],
        record: Recorder,
        logs: LogWatch,
        finish: Finish,
    ) -> None:
        self._settings = settings
        self._executor_of = executor_of
        self._record = record
        self._logs = logs
        self._finish = finish
        self._tasks: set[asyncio.Task[None]] = set()

    def run(self, br: BatchRun, run: Run, adopted: Handle | ExitInfo | None = None) -> None:
        """Start job `run` (or take back `adopted`, after a restart) in a task of its own."""
        name = f"job {br.batch.cid}/{run.index}"
        run.task = self._spawn_task(self._run_job(br, run, adopted), name)

    async def wait(self) -> None:
        """Until every job's task (and every stop) is done."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    def stop(self, run: Run, reason: JobState, message: str, grace: float) -> None:
        """Ask a running job to stop; the first reason given is the one recorded."""
        if run.reason is None:
            run.reason, run.message, run.grace = reason, message, grace
        process = run.process
        if process is not None:
            self._spawn_task(_stop_quietly(process, grace), f"stop pid {process.pid}")

    def _spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_job(
        self, br: BatchRun, run: Run, adopted: Handle | ExitInfo | None = None
    ) -> None:
        """Start the job (or take back `adopted`, after a restart) and see it to its end."""
        batch, i = br.batch, run.index
        spec = batch.specs[i]
        settings = self._settings()
        limits = spec.limits.over(settings.default_limits.to_limits())
        run.timeout = spec.timeout or settings.default_timeout
        run.user = settings.unix_user_for(batch.owner)
        executor = self._executor_of(batch)
        try:
            if isinstance(adopted, ExitInfo):  # its tree is gone, nothing says how it ended
                # Its output since the last sample before the restart: first seen now.
                await asyncio.to_thread(seal_times, batch.job_dir(i), time.time())
                self._finish(br, run, JobState.LOST, message=adopted.lost)
                return
            if adopted is None:
                process = await self._start_job(br, run, executor, limits)
                if process is None:
                    return
                self._record.running(batch, i, process, run.attempt, run.base)
            else:
                process = adopted
            run.process = process
            await self._supervise(br, run, process, limits)
            executor.forget(job_key(batch, i), run.attempt)
        except Exception:  # one job's bug must not stop the scheduler
            log.exception("job_supervision_failed", **_ids(batch, i))
            if run.process is not None:  # never leave a process behind, whatever failed
                run.process.kill()
                await run.process.wait()
                executor.forget(job_key(batch, i), run.attempt)
            if br.runs.get(i) is run:
                self._finish(br, run, JobState.FAILED, message="internal error running the job")

    async def _start_job(
        self, br: BatchRun, run: Run, executor: Executor, limits: Limits
    ) -> Handle | None:
        """The started job, or None when it could not start (then recorded FAILED)."""
        batch, i = br.batch, run.index
        lost = _lost_stdin(batch, i)
        if lost:
            self._finish(br, run, JobState.FAILED, message=lost)
            return None
        launch = Launch(
            job_key(batch, i),
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
            self._finish(br, run, JobState.FAILED, message=exc.message)
            return None

    async def _supervise(self, br: BatchRun, run: Run, process: Handle, limits: Limits) -> None:
        """From the job's start (recorded) to its recorded end: timeout, log sizes, outcome."""
        batch = br.batch
        # One info line a job, at its end (like an access log); the start is for debugging.
        jwlogging.line(
            "debug",
            "job_started",
            {**_ids(batch, run.index), "pid": process.pid, "unix_user": run.user or None},
        )
        if run.reason is not None:  # cancelled while it was being spawned
            self.stop(run, run.reason, run.message, run.grace)
        self._logs.watch(run, batch.job_dir(run.index))
        # A timer rather than asyncio.wait_for: one handle instead of a task's worth of
        # futures and callbacks, on the path every job takes.
        # (A job taken back after a restart has had part of its time.)
        left = run.timeout - max(0.0, time.time() - process.start_time)
        timer = asyncio.get_running_loop().call_later(left, self._time_out, run)
        try:
            info = await process.wait()
        finally:
            timer.cancel()
        state, message = outcome(run, info, limits)
        self._finish(
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

    def _time_out(self, run: Run) -> None:
        if run.process is not None and run.process.ended:
            return  # it ended in the same loop turn: its own result stands (as wait_for's)
        message = f"timed out after {format_duration(run.timeout)}"
        self.stop(run, JobState.TIMED_OUT, message, self._settings().kill_grace)


def outcome(run: Run, info: ExitInfo, limits: Limits) -> tuple[JobState, str]:
    """The state and message an ended job is recorded with."""
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


def job_key(batch: BatchRecord, index: int) -> str:
    """The job's key at its executor (and the name of its cgroup)."""
    return f"{batch.cid}-{index}"


def _ids(batch: BatchRecord, index: int) -> dict[str, Any]:
    """The fields of every line about a job (jwlogging.line: no logger bound per job; made
    when a line is written, not held by each running job)."""
    return {
        "correlation_id": batch.cid,
        "job_index": index,
        "job_name": batch.specs[index].name,
        "identity": batch.owner,
    }


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
