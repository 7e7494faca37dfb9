"""The scheduler's queues: its jobs, batches and identities in memory, and who starts next.

Never persisted: rebuilt from the store at start. Each identity keeps a heap of its batches
that may start a job, so picking the next job looks at identities and their first batch,
never at queued jobs.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from jobworker.config import JobsConfig
from jobworker.engine.executor import Handle
from jobworker.errors import ResourceExhausted
from jobworker.model import JobState
from jobworker.store.batches import BatchRecord


@dataclass(eq=False, slots=True)
class Run:
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
class BatchRun:
    """Scheduling state of a batch that has jobs left."""

    batch: BatchRecord
    seq: int  # submission order: FIFO between batches
    ready: deque[int] = field(default_factory=deque)
    unmet: dict[int, int] = field(default_factory=dict)  # waiting job -> deps not yet succeeded
    dependents: dict[int, list[int]] = field(default_factory=dict)
    runs: dict[int, Run] = field(default_factory=dict)
    # Jobs waiting out a retry's backoff (counted as queued); None: no timer (shutting down).
    waiting: dict[int, asyncio.TimerHandle | None] = field(default_factory=dict)
    # Jobs a cancel is ending in one sweep: they end CANCELED, not SKIPPED by each other.
    canceling: set[int] = field(default_factory=set)
    offered: bool = False  # in its owner's heap of batches that may start a job

    @property
    def can_start(self) -> bool:
        limit = self.batch.options.max_parallel
        return bool(self.ready) and (limit == 0 or len(self.runs) < limit)

    @property
    def idle(self) -> bool:
        """No job left: none ready, waiting for dependencies or a retry, or running."""
        return not self.ready and not self.unmet and not self.runs and not self.waiting


@dataclass(eq=False)
class Owner:
    """One identity's part of the scheduler: its counts and its batches that may start a job."""

    name: str
    queued: int = 0
    running: int = 0
    served: int = 0  # the dispatch tick of its last start (0: never); the least recent goes first
    batches: list[tuple[int, BatchRun]] = field(default_factory=list)  # a heap by seq

    def next_batch(self) -> BatchRun | None:
        """Its first batch in FIFO order that may start a job; drops those that may not."""
        while self.batches:
            br = self.batches[0][1]
            if br.can_start:
                return br
            heapq.heappop(self.batches)
            br.offered = False
        return None


class Queues:
    """The batches with jobs left, the identities with jobs queued or running, their counts,
    and the batch whose job starts next under fair share (or FIFO) and the quotas."""

    def __init__(self) -> None:
        self.active: dict[str, BatchRun] = {}  # batches with jobs left, in FIFO order
        self.owners: dict[str, Owner] = {}  # identities with jobs queued or running
        self._startable: dict[str, Owner] = {}  # those with batches in their heap
        self._seqs = itertools.count()
        self._tick = 0  # starts so far: the clock of Owner.served
        self.running = 0
        self.queued = 0

    def new_batch(self, batch: BatchRecord) -> BatchRun:
        """The scheduling state of a batch, last in FIFO order (not yet active)."""
        return BatchRun(batch, next(self._seqs))

    def owner(self, name: str) -> Owner:
        owner = self.owners.get(name)
        if owner is None:
            owner = self.owners[name] = Owner(name)
        return owner

    def count(self, owner: Owner, *, queued: int = 0, running: int = 0) -> None:
        """Change the queued and running counts of `owner` and of the whole server."""
        self.queued += queued
        owner.queued += queued
        self.running += running
        owner.running += running

    def served(self, owner: Owner) -> None:
        """`owner` has just started a job: it goes last in the round-robin."""
        self._tick += 1
        owner.served = self._tick

    def forget_if_idle(self, owner: Owner) -> None:
        if not owner.queued and not owner.running and not owner.batches:
            self.owners.pop(owner.name, None)
            self._startable.pop(owner.name, None)

    def offer(self, br: BatchRun) -> None:
        """Put `br` in its owner's heap if it may start a job (after anything that can let it)."""
        if br.offered or not br.can_start:
            return
        br.offered = True
        owner = self.owner(br.batch.owner)
        heapq.heappush(owner.batches, (br.seq, br))
        self._startable[owner.name] = owner

    def pick(self, settings: JobsConfig) -> BatchRun | None:
        """The batch whose job starts next: a scan over identities with a batch that may
        start a job (their first batch each), not over jobs."""
        quota = settings.max_running_per_identity
        fair = settings.fair_share
        best: BatchRun | None = None
        best_key = 0
        for owner in list(self._startable.values()):
            br = owner.next_batch()
            if br is None:
                del self._startable[owner.name]
                self.forget_if_idle(owner)
                continue
            if quota and owner.running >= quota:
                continue
            key = owner.served if fair else br.seq
            if best is None or key < best_key:
                best, best_key = br, key
        return best

    def waiting(self, cid: str, settings: JobsConfig) -> dict[int, str]:
        """Why each ready job of batch `cid` has not started: its place in the batch's FIFO
        and what is full now ("queue: 3 ahead in this batch; all slots busy ...")."""
        br = self.active.get(cid)
        if br is None or not br.ready:
            return {}
        full = self._full(br, settings)
        return {i: f"queue: {n} ahead in this batch{full}" for n, i in enumerate(br.ready)}

    def _full(self, br: BatchRun, settings: JobsConfig) -> str:
        limit = settings.max_concurrent
        if self.running >= limit:
            return f"; all slots busy (jobs.max_concurrent {limit})"
        parallel = br.batch.options.max_parallel
        if parallel and len(br.runs) >= parallel:
            return f"; the batch's max_parallel ({parallel}) is reached"
        quota = settings.max_running_per_identity
        owner = self.owners.get(br.batch.owner)
        if quota and owner is not None and owner.running >= quota:
            return f"; jobs.max_running_per_identity ({quota}) is reached"
        return ""

    def check_capacity(self, jobs: int, owner: str, settings: JobsConfig) -> None:
        """ResourceExhausted when `jobs` more of `owner` would overflow the server's queue or
        the owner's quota."""
        limit = settings.max_queued_jobs
        if self.queued + jobs > limit:
            raise ResourceExhausted(
                f"server's queue is full: {self.queued} jobs queued, "
                f"{jobs} more would pass jobs.max_queued_jobs ({limit})"
            )
        limit = settings.max_queued_jobs_per_identity
        queued = self.owners[owner].queued if owner in self.owners else 0
        if limit and queued + jobs > limit:
            raise ResourceExhausted(
                f"queue of {owner!r} is full: {queued} jobs queued, "
                f"{jobs} more would pass jobs.max_queued_jobs_per_identity ({limit})"
            )
