"""A batch in memory: BatchRecord, which the event loop changes, and BatchView, a still of it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from jobworker.errors import NotFound
from jobworker.model import (
    BatchOptions,
    BatchState,
    JobEvent,
    JobSpec,
    JobState,
    JobStatus,
    batch_state,
)
from jobworker.store.notify import Notifier


@dataclass(eq=False)
class BatchRecord:
    """One batch in memory: its specs, every job's status and the ordered event list."""

    cid: str
    owner: str
    create_time: float
    options: BatchOptions
    specs: tuple[JobSpec, ...]
    path: Path
    statuses: list[JobStatus] = field(default_factory=list)
    events: list[JobEvent] = field(default_factory=list)
    counts: Counter[JobState] = field(default_factory=Counter)
    end_time: float | None = None
    names: dict[str, int] = field(default_factory=dict)
    changed: Notifier = field(default_factory=Notifier)
    stdin_sizes: list[int] = field(default_factory=list)  # bytes in jobs/<i>/stdin
    journal_fd: int = -1
    _job_dirs: list[Path] = field(default_factory=list, repr=False)
    journal_size: int = 0  # bytes of whole lines in the journal
    pending: list[bytes] = field(default_factory=list)  # lines not written yet (disk full)
    # After load: QUEUED jobs whose folder shows they started (what it shows), and why
    # the journal may not say so. The scheduler asks their executor first (BatchStore.record_lost).
    traced: dict[int, str] = field(default_factory=dict)
    damage: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = {spec.name: i for i, spec in enumerate(self.specs)}
        if not self.stdin_sizes:
            self.stdin_sizes = [0] * len(self.specs)
        if not self.statuses:
            self.statuses = [JobStatus() for _ in self.specs]
            self.events = [
                JobEvent(seq=i, index=i, state=JobState.QUEUED, time=self.create_time)
                for i in range(len(self.specs))
            ]
        self.counts = Counter(s.state for s in self.statuses)

    @property
    def order(self) -> tuple[float, str]:
        """Creation order, the same after a restart: what ListBatches pages by."""
        return (self.create_time, self.cid)

    @property
    def state(self) -> BatchState:
        """The batch's state, from its jobs' states."""
        return batch_state(self.counts.keys())

    @property
    def ended(self) -> bool:
        """True once every job has ended."""
        return self.end_time is not None

    def job_dir(self, index: int) -> Path:
        """The folder of job `index`: its stdout and stderr live there."""
        if not self._job_dirs:
            if self.end_time is not None:  # ended: rarely read, not worth a list
                return self.path / "jobs" / str(index)
            # Made once while the batch runs: it is asked for several times a job.
            jobs = self.path / "jobs"
            self._job_dirs = [jobs / str(i) for i in range(len(self.specs))]
        return self._job_dirs[index]

    def view(self) -> BatchView:
        """The batch as it stands now, to read on another thread (event loop only)."""
        return BatchView(
            cid=self.cid,
            owner=self.owner,
            create_time=self.create_time,
            options=self.options,
            specs=self.specs,
            path=self.path,
            statuses=tuple(self.statuses),
            stdin_sizes=tuple(self.stdin_sizes),
            state=self.state,
            end_time=self.end_time,
        )

    def select(self, names: Iterable[str]) -> list[int]:
        """Job indexes for `names` (every job when empty); NotFound names the unknown one."""
        wanted = list(names)
        if not wanted:
            return list(range(len(self.specs)))
        out = []
        for name in wanted:
            if name not in self.names:
                raise NotFound(f"batch {self.cid} has no job named {name!r}")
            out.append(self.names[name])
        return sorted(set(out))

    def _apply(self, event: JobEvent) -> None:
        old = self.statuses[event.index]
        self.counts[old.state] -= 1
        if not self.counts[old.state]:
            del self.counts[old.state]
        self.statuses[event.index] = old.apply(event)
        self.counts[event.state] += 1
        self.events.append(event)
        if JobState.QUEUED not in self.counts and JobState.RUNNING not in self.counts:
            self.end_time = event.time
            self._job_dirs = []  # an ended batch is rarely read: keep its memory small
        else:
            self.end_time = None


@dataclass(frozen=True, eq=False)
class BatchView:
    """A batch as it stood at one moment (BatchRecord.view): immutable, so any thread may
    read it while the event loop changes the batch (GetBatch builds big answers so)."""

    cid: str
    owner: str
    create_time: float
    options: BatchOptions
    specs: tuple[JobSpec, ...]
    path: Path
    statuses: tuple[JobStatus, ...]
    stdin_sizes: tuple[int, ...]
    state: BatchState
    end_time: float | None

    def job_dir(self, index: int) -> Path:
        """The folder of job `index`: its stdout and stderr live there."""
        return self.path / "jobs" / str(index)
