"""The scheduler: fair share between identities, limits, dependencies, retries, cancel.

Free slots go to the identity (batch owner) served least recently among those with a job
that may start (round-robin, a newcomer first), FIFO across that identity's batches; with
jobs.fair_share false, FIFO across all batches (engine/queues.py picks the batch; each job
then runs in engine/jobrun.py). Every walk over dependencies uses a worklist: a 10,000-job
chain is valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from jobworker.config import JobsConfig
from jobworker.engine.events import EventListener, Recorder
from jobworker.engine.executor import Executor, ExecutorUnavailable, ExitInfo, Handle
from jobworker.engine.jobrun import JobRunner
from jobworker.engine.logwatch import LogWatch, sample_now
from jobworker.engine.queues import BatchRun, Owner, Queues, Run
from jobworker.engine.recovery import Recovery
from jobworker.errors import InvalidArgument, Unavailable
from jobworker.model import JobState
from jobworker.store.batches import BatchRecord, BatchStore

_FAILURES = frozenset({JobState.FAILED, JobState.TIMED_OUT, JobState.LOST})


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
        self._record = Recorder(store, self.listeners)
        self._queues = Queues()
        self._logs = LogWatch(lambda: self.settings.max_log_bytes, self._stop_for_logs)
        self._jobs = JobRunner(
            lambda: self.settings, self._executor, self._record, self._logs, self._finish_run
        )
        self._closing = False
        self._held = False  # while a cancel sweeps a batch, nothing new starts

    # -- figures

    @property
    def running(self) -> int:
        """Jobs running now."""
        return self._queues.running

    @property
    def queued(self) -> int:
        """Jobs waiting to run (ready or waiting for dependencies)."""
        return self._queues.queued

    def has_jobs_left(self, cid: str) -> bool:
        """True while batch `cid` has a job queued, waiting to retry or running."""
        return cid in self._queues.active

    def sample_logs(self, cid: str, index: int) -> None:
        """Index job `index`'s output up to now (a stream without follow sends what exists
        when it starts, not only what the 100 ms sampler has seen)."""
        br = self._queues.active.get(cid)
        run = br.runs.get(index) if br is not None else None
        if run is not None:
            sample_now(run)

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
        self._queues.check_capacity(jobs, owner, self.settings)

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
        queues = self._queues
        br = queues.new_batch(batch)
        names = batch.names
        owner = queues.owner(batch.owner)
        for i, spec in enumerate(batch.specs):
            status = batch.statuses[i]
            if status.state is not JobState.QUEUED:
                continue
            queues.count(owner, queued=1)
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
        if br.idle:
            queues.forget_if_idle(owner)
            return
        queues.active[batch.cid] = br
        queues.offer(br)
        self._replay_endings(br)

    def _replay_endings(self, br: BatchRun) -> None:
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
        br = self._queues.active.get(batch.cid)
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
                    self._jobs.stop(run, JobState.CANCELED, message, grace)
                elif not batch.statuses[i].state.ended:
                    self._end_unstarted(br, i, JobState.CANCELED, message)
            br.canceling = set()
        if waits:
            await asyncio.wait(waits)

    async def recover(self, batches: Iterable[BatchRecord]) -> None:
        """After a restart: take back the jobs that still run (or ended while no server
        was there) from their executors; those whose trees are gone are LOST. Queue the rest."""
        batches = list(batches)
        recovery = await Recovery.ask(self.executors, batches, self._executor_name)
        for batch in batches:
            adopted = recovery.take_back(batch, self._record)
            # Jobs whose folders show a start no executor knows of: never run again.
            traced = {i: t for i, t in batch.traced.items() if i not in adopted}
            if traced:
                self.store.record_lost(batch, traced)
            batch.traced = {}
            if not batch.ended:
                self.submit(batch, adopted)
        recovery.release_rest()

    def _adopt(self, br: BatchRun, owner: Owner, i: int, found: Handle | ExitInfo) -> None:
        status = br.batch.statuses[i]
        run = Run(i, attempt=status.attempt, base=status.log_sizes)
        br.runs[i] = run
        self._queues.count(owner, running=1)
        self._jobs.run(br, run, found)

    async def shutdown(self, grace: float | None = None, *, stop_jobs: bool = True) -> None:
        """Stop dispatching, then either stop running jobs (TERM, grace, KILL), recorded
        LOST, or (`stop_jobs` False) leave them running for the next server; wait."""
        self._closing = True
        self._logs.close()
        grace = self.settings.kill_grace if grace is None else grace
        for br in list(self._queues.active.values()):
            for run in list(br.runs.values()):
                if stop_jobs:
                    self._jobs.stop(run, JobState.LOST, "server shut down while it ran", grace)
                elif run.task is not None:
                    run.task.cancel()  # nothing recorded: the next server takes it back
        await self._jobs.wait()
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
        while self._queues.running < limit:
            br = self._queues.pick(self.settings)
            if br is None:
                break
            self._start(br, br.ready.popleft())

    def waiting(self, cid: str) -> dict[int, str]:
        """Why each ready job of batch `cid` has not started: its place in the batch's FIFO
        and what is full now ("queue: 3 ahead in this batch; all slots busy ...")."""
        return self._queues.waiting(cid, self.settings)

    def _start(self, br: BatchRun, index: int) -> None:
        status = br.batch.statuses[index]
        run = Run(index, attempt=status.attempt + 1, base=status.log_sizes)
        br.runs[index] = run
        owner = self._queues.owners[br.batch.owner]
        self._queues.count(owner, queued=-1, running=1)
        self._queues.served(owner)
        self._jobs.run(br, run)

    def _stop_for_logs(self, run: Run, message: str) -> None:
        self._jobs.stop(run, JobState.FAILED, message, self.settings.kill_grace)

    def _finish_run(
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
    ) -> None:
        del br.runs[run.index]
        self._logs.release(run)
        owner = self._queues.owners[br.batch.owner]
        self._queues.count(owner, running=-1)
        usage = info.usage if info else None
        ending: dict[str, Any] = {"exit_code": exit_code, "signal": signal, "time_": time_}
        if self._record.retry(br.batch, run.index, run.attempt, state, message, usage, **ending):
            self._queues.count(owner, queued=1)
            delay = br.batch.statuses[run.index].retry_at - time.time()
            self._wait_retry(br, run.index, delay)
            self._dispatch()
            return
        self._record.emit(
            br.batch, run.index, state, message=message, usage=usage, attempt=run.attempt, **ending
        )
        self._after_end(br, run.index, state)
        self._queues.forget_if_idle(owner)

    def _wait_retry(self, br: BatchRun, i: int, delay: float) -> None:
        """Hold job `i` back until its backoff is over, then make it ready."""
        if self._closing:  # it runs after the restart, when its time has come
            br.waiting[i] = None
            return
        loop = asyncio.get_running_loop()
        br.waiting[i] = loop.call_later(max(0.0, delay), self._retry_due, br, i)

    def _retry_due(self, br: BatchRun, i: int) -> None:
        if br.waiting.pop(i, None) is None:
            return
        br.ready.append(i)
        self._queues.offer(br)
        self._dispatch()

    def _end_unstarted(self, br: BatchRun, i: int, state: JobState, message: str) -> None:
        """End a job that never started (cancelled or skipped), and what follows from it."""
        self._drop(br, i, state, message)
        self._after_end(br, i, state)

    def _drop(self, br: BatchRun, i: int, state: JobState, message: str) -> None:
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
        self._queues.count(self._queues.owners[br.batch.owner], queued=-1)
        self._record.emit(br.batch, i, state, message=message, attempt=br.batch.statuses[i].attempt)

    def _after_end(self, br: BatchRun, i: int, state: JobState) -> None:
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
        self._queues.offer(br)
        self._dispatch()

    def _fail_fast(self, br: BatchRun, i: int, state: JobState) -> None:
        batch = br.batch
        reason = f"canceled: job {batch.specs[i].name} {state.name.lower()} (fail_fast)"
        with self._hold():
            br.canceling = {j for j, st in enumerate(batch.statuses) if not st.state.ended}
            for j, status in enumerate(batch.statuses):
                if status.state.ended:
                    continue
                run = br.runs.get(j)
                if run is not None:
                    self._jobs.stop(run, JobState.CANCELED, reason, self.settings.kill_grace)
                else:
                    self._end_unstarted(br, j, JobState.CANCELED, reason)
            br.canceling = set()

    def _skip_dependents(self, br: BatchRun, i: int) -> None:
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

    def _finish_if_done(self, br: BatchRun) -> None:
        if br.idle:
            self._queues.active.pop(br.batch.cid, None)
