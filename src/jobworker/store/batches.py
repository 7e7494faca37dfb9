"""Batches on disk: crash-safe metadata, an append-only journal of job events, recovery."""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from jobworker.errors import NotFound, ResourceExhausted
from jobworker.model import (
    BatchOptions,
    BatchState,
    JobEvent,
    JobSpec,
    JobState,
    JobStatus,
    Limits,
    RetryPolicy,
    Usage,
    batch_state,
    frozen_map,
)
from jobworker.store.notify import Notifier

log = structlog.get_logger("jobworker.store")

META = "batch.json"
STDIN = "stdin"  # in a job's folder: what the job reads; written when the batch is stored
TRASH = ".trash-"  # a batch folder being deleted: renamed first, so a crash never revives it
JOURNAL = "journal"
FORMAT_VERSION = 1


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


# --- encoding -------------------------------------------------------------------------


def _spec_to_json(spec: JobSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": spec.name, "argv": list(spec.argv)}
    if spec.env:
        out["env"] = dict(spec.env)
    if spec.working_dir:
        out["working_dir"] = spec.working_dir
    if spec.stdin:  # the bytes are in jobs/<i>/stdin; memory keeps only their size
        out["stdin_bytes"] = len(spec.stdin)
    if spec.timeout is not None:
        out["timeout"] = spec.timeout
    if spec.limits.any:
        out["limits"] = {k: getattr(spec.limits, k) for k in Limits.__slots__}
    if spec.depends_on:
        out["depends_on"] = list(spec.depends_on)
    if spec.retry is not None:
        r = spec.retry
        out["retry"] = {
            "max_attempts": r.max_attempts,
            "initial_backoff": r.initial_backoff,
            "max_backoff": r.max_backoff,
            "retry_on": sorted(s.name for s in r.retry_on),
        }
    return out


def _retry_from_json(d: Mapping[str, Any] | None) -> RetryPolicy | None:
    if d is None:
        return None
    return RetryPolicy(
        max_attempts=d["max_attempts"],
        initial_backoff=d["initial_backoff"],
        max_backoff=d["max_backoff"],
        retry_on=frozenset(JobState[name] for name in d["retry_on"]),
    )


def _spec_from_json(d: Mapping[str, Any]) -> JobSpec:
    return JobSpec(
        name=d["name"],
        argv=tuple(d["argv"]),
        env=frozen_map(d.get("env")),
        working_dir=d.get("working_dir", ""),
        timeout=d.get("timeout"),
        limits=Limits(**d["limits"]) if "limits" in d else Limits(),
        depends_on=tuple(d.get("depends_on", ())),
        retry=_retry_from_json(d.get("retry")),
    )


def _options_to_json(o: BatchOptions) -> dict[str, Any]:
    return {
        "labels": dict(o.labels),
        "max_parallel": o.max_parallel,
        "fail_fast": o.fail_fast,
        "idempotency_key": o.idempotency_key,
    }


def _options_from_json(d: Mapping[str, Any]) -> BatchOptions:
    return BatchOptions(
        labels=frozen_map(d.get("labels")),
        max_parallel=d.get("max_parallel", 0),
        fail_fast=d.get("fail_fast", False),
        idempotency_key=d.get("idempotency_key", ""),
    )


def _event_to_line(e: JobEvent) -> bytes:
    """One journal line: the JSON object json.dumps(..., separators=(",", ":")) would
    write, formatted by hand (it is written for every state change of every job)."""
    parts = [f'{{"q":{e.seq},"i":{e.index},"s":"{_STATE_NAMES[e.state]}","t":{e.time!r}']
    if e.exit_code is not None:
        parts.append(f',"x":{e.exit_code}')
    if e.signal:
        parts.append(f',"g":{e.signal}')
    if e.message:
        parts.append(f',"m":{_json_string(e.message)}')
    if e.pid:
        parts.append(f',"p":{e.pid},"ps":{e.pid_start}')
    if e.cgroup:
        parts.append(f',"c":{_json_string(e.cgroup)}')
    if e.usage is not None:
        u = e.usage
        parts.append(f',"u":[{u.user_cpu!r},{u.system_cpu!r},{u.max_rss_bytes}]')
    if e.attempt != 1:
        parts.append(f',"a":{e.attempt}')
    if e.retry_at:
        parts.append(f',"r":{e.retry_at!r}')
    if e.offsets != (0, 0):
        parts.append(f',"o":[{e.offsets[0]},{e.offsets[1]}]')
    parts.append("}\n")
    return "".join(parts).encode()


_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii
_STATE_NAMES = {s: s.name for s in JobState}  # Enum.name is a descriptor: slow per call


def _event_from_line(line: bytes) -> JobEvent:
    d = json.loads(line)
    u = d.get("u")
    return JobEvent(
        seq=d["q"],
        index=d["i"],
        state=JobState[d["s"]],
        time=d["t"],
        exit_code=d.get("x"),
        signal=d.get("g", 0),
        message=d.get("m", ""),
        pid=d.get("p", 0),
        pid_start=d.get("ps", 0),
        usage=Usage(u[0], u[1], u[2]) if u else None,
        cgroup=d.get("c", ""),
        attempt=d.get("a", 1),
        retry_at=d.get("r", 0.0),
        offsets=tuple(d["o"]) if "o" in d else (0, 0),
    )


def _make_folders(jobs: Path, count: int, stop: threading.Event) -> None:
    """BatchStore.make_folders, on its thread: stops at the first failure or at `stop`."""
    # mknod makes an empty file in one system call (open and close are two): each one lets
    # the event loop's thread take the GIL, and hands it back, a context switch each way.
    # The server's alone (it hands the open files to the job): no job, whatever its Unix
    # user, reads another's output here.
    regular = stat.S_IFREG | 0o600
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(jobs, 0o700)
        for i in range(count):
            if stop.is_set():
                return
            folder = f"{jobs}/{i}"
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700)
            for name in ("stdout", "stderr"):  # the contract's log files
                with contextlib.suppress(FileExistsError):
                    os.mknod(f"{folder}/{name}", regular)
    except OSError as exc:  # gone (deleted), or a full disk: the job's start reports it
        log.debug("job_folders_stopped", path=str(jobs), error=str(exc))


def _write_synced(path: Path, data: bytes) -> None:
    """Write `data` to a new file `path` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, data)
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _order(batch: BatchRecord) -> tuple[float, str]:
    return batch.order


def _enlist(ordered: list[BatchRecord], batch: BatchRecord) -> None:
    """Put `batch` in its place in `ordered`: at the end, unless the clock went back."""
    if not ordered or ordered[-1].order < batch.order:
        ordered.append(batch)
    else:
        bisect.insort(ordered, batch, key=_order)


def _unlist(ordered: list[BatchRecord], batch: BatchRecord) -> None:
    i = bisect.bisect_left(ordered, batch.order, key=_order)
    if i < len(ordered) and ordered[i] is batch:
        del ordered[i]


# --- the store --------------------------------------------------------------------------


class BatchStore:
    """Every batch under `data_dir/batches`, in memory and on disk."""

    def __init__(self, data_dir: Path, *, min_free_disk: int = 0) -> None:
        self.root = data_dir / "batches"
        self.min_free_disk = min_free_disk
        self._batches: dict[str, BatchRecord] = {}
        # Oldest first by BatchRecord.order, all of them and each owner's: ListBatches reads
        # a page from its end without sorting. Batches arrive in creation order (appends).
        self._ordered: list[BatchRecord] = []
        self._by_owner: dict[str, list[BatchRecord]] = {}
        self._idempotency: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()  # journal fds shared with the sync thread
        self._dirty: set[int] = set()
        self._closing: list[int] = []
        self._retry: set[BatchRecord] = set()
        # Makes job folders and empty log files ahead of the jobs (make_folders).
        self._folders = ThreadPoolExecutor(1, thread_name_prefix="jobworker-folders")
        self._folders_stop = threading.Event()

    # -- queries

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[BatchRecord]:
        return iter(self._batches.values())

    def get(self, cid: str) -> BatchRecord:
        """The batch `cid`, or NotFound."""
        batch = self._batches.get(cid)
        if batch is None:
            raise NotFound(f"batch {cid} not found")
        return batch

    def find_idempotent(self, owner: str, key: str) -> BatchRecord | None:
        """The batch `owner` scheduled earlier with idempotency `key`, if any."""
        cid = self._idempotency.get((owner, key))
        return self._batches.get(cid) if cid else None

    def newest_first(
        self, owner: str | None = None, before: tuple[float, str] | None = None
    ) -> Iterator[BatchRecord]:
        """The batches (of `owner`, if given) older than `before` (all, if None), newest
        first; each step costs the same however many batches there are."""
        ordered = self._ordered if owner is None else self._by_owner.get(owner, [])
        end = len(ordered) if before is None else bisect.bisect_left(ordered, before, key=_order)
        for i in range(end - 1, -1, -1):
            yield ordered[i]

    # -- writes

    def create(self, owner: str, options: BatchOptions, specs: tuple[JobSpec, ...]) -> BatchRecord:
        """Persist a new batch and keep it; ResourceExhausted when the disk is full."""
        batch = self.persist(owner, options, specs)
        self.register(batch)
        return batch

    def persist(self, owner: str, options: BatchOptions, specs: tuple[JobSpec, ...]) -> BatchRecord:
        """Write a new batch to disk, crash-safe, touching nothing in memory: safe to run in
        a worker thread. register() then makes it known."""
        self.root.mkdir(0o700, parents=True, exist_ok=True)
        self._check_free_space()
        cid = str(uuid.uuid4())
        path = self.root / cid
        now = time.time()
        meta = {
            "version": FORMAT_VERSION,
            "correlation_id": cid,
            "owner": owner,
            "create_time": now,
            "options": _options_to_json(options),
            "jobs": [_spec_to_json(s) for s in specs],
        }
        try:
            path.mkdir(0o700)
            for i, spec in enumerate(specs):  # before the metadata: its rename commits all
                if spec.stdin:
                    (path / "jobs").mkdir(0o700, exist_ok=True)
                    (path / "jobs" / str(i)).mkdir(0o700)
                    _write_synced(path / "jobs" / str(i) / STDIN, spec.stdin)
                    _fsync_dir(path / "jobs" / str(i))
            if any(spec.stdin for spec in specs):
                _fsync_dir(path / "jobs")
            _write_atomic(path / META, json.dumps(meta, separators=(",", ":")).encode())
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    f"disk full: cannot store the batch under {self.root}"
                ) from exc
            raise
        batch = BatchRecord(
            cid=cid,
            owner=owner,
            create_time=now,
            options=options,
            specs=tuple(dataclasses.replace(s, stdin=b"") if s.stdin else s for s in specs),
            path=path,
            stdin_sizes=[len(s.stdin) for s in specs],
        )
        return batch

    def register(self, batch: BatchRecord) -> None:
        """Make a persisted batch known (event loop only)."""
        self._add(batch)

    def make_folders(self, batch: BatchRecord) -> Future[None]:
        """Make the folders and empty stdout/stderr files of `batch`'s jobs, in job order,
        on a thread of the store's, while the jobs run.

        Creating an inode is a costly system call on some file systems (ext4 spends ~0.2 ms
        of CPU per file searching its inode bitmaps after many deletions): done here, on
        the other core, it leaves the event loop only opening existing files when a job
        starts. Best effort and never required: the job's start makes whatever is missing
        (and reports what cannot be made). Never re-makes a batch folder that is gone.
        """
        jobs, count = batch.path / "jobs", len(batch.specs)
        try:
            return self._folders.submit(_make_folders, jobs, count, self._folders_stop)
        except RuntimeError:  # the store is closing: the jobs' starts make them
            done: Future[None] = Future()
            done.set_result(None)
            return done

    def append(self, batch: BatchRecord, event: JobEvent) -> None:
        """Apply `event` to `batch` and append it to the batch's journal."""
        batch._apply(event)
        batch.pending.append(_event_to_line(event))
        self._write_pending(batch)
        batch.changed.notify()

    def _write_pending(self, batch: BatchRecord) -> None:
        """Append the batch's unwritten events, whole lines only; keep them on failure."""
        try:
            if batch.journal_fd < 0:
                batch.journal_fd = os.open(
                    batch.path / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
                )
                batch.journal_size = os.fstat(batch.journal_fd).st_size
            data = b"".join(batch.pending)
            written = os.write(batch.journal_fd, data)
            if written < len(data):  # a short write (disk full): never leave half a line
                os.ftruncate(batch.journal_fd, batch.journal_size)
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            # The state stays right in memory and on the wire; the lines are written when
            # the disk has room again (retry_pending), in order, so a restart loses none.
            if batch not in self._retry:
                log.error("journal_write_failed", correlation_id=batch.cid, error=str(exc))
            self._retry.add(batch)
            return
        batch.journal_size += written
        batch.pending.clear()
        self._retry.discard(batch)
        with self._lock:
            self._dirty.add(batch.journal_fd)
        if batch.ended:
            self._close_journal(batch)

    def retry_pending(self) -> None:
        """Try again to write the events a full disk held back (called periodically)."""
        for batch in list(self._retry):
            self._write_pending(batch)

    def next_seq(self, batch: BatchRecord) -> int:
        """The sequence number of `batch`'s next event."""
        return len(batch.events)

    def sync(self) -> None:
        """fsync the journals written since the last call, and close finished ones.

        Runs in a worker thread (group commit); the event loop only hands fds over."""
        with self._lock:  # only the hand-over; the slow part runs without it
            dirty, self._dirty = self._dirty, set()
            closing, self._closing = self._closing, []
        # Only this method closes journal fds, so every fd taken above stays valid here.
        for fd in dirty | set(closing):
            with contextlib.suppress(OSError):
                os.fsync(fd)
        for fd in closing:
            with contextlib.suppress(OSError):
                os.close(fd)

    def delete(self, batch: BatchRecord) -> Path:
        """Forget `batch`; its folder is renamed away at once (a crash never brings it
        back) and the returned path is for the caller to remove, off the event loop."""
        self._close_journal(batch)
        self._retry.discard(batch)
        if self._batches.pop(batch.cid, None) is not None:
            _unlist(self._ordered, batch)
            mine = self._by_owner[batch.owner]
            _unlist(mine, batch)
            if not mine:
                del self._by_owner[batch.owner]
        key = (batch.owner, batch.options.idempotency_key)
        if self._idempotency.get(key) == batch.cid:
            del self._idempotency[key]
        trash = self.root / f"{TRASH}{batch.cid}"
        batch.path.rename(trash)
        _fsync_dir(self.root)
        return trash

    def close(self) -> None:
        """Write what can be written, flush and close every open journal."""
        self._folders_stop.set()
        self._folders.shutdown(wait=True, cancel_futures=True)
        self.retry_pending()
        for batch in self._batches.values():
            self._close_journal(batch)
        self.sync()

    def _close_journal(self, batch: BatchRecord) -> None:
        if batch.journal_fd >= 0:
            fd, batch.journal_fd = batch.journal_fd, -1
            with self._lock:
                self._dirty.discard(fd)
                self._closing.append(fd)

    def _add(self, batch: BatchRecord) -> None:
        self._batches[batch.cid] = batch
        _enlist(self._ordered, batch)
        _enlist(self._by_owner.setdefault(batch.owner, []), batch)
        if batch.options.idempotency_key:
            self._idempotency[(batch.owner, batch.options.idempotency_key)] = batch.cid

    def _check_free_space(self) -> None:
        if not self.min_free_disk:
            return
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_disk:
            raise ResourceExhausted(
                f"disk full: {free} bytes free under {self.root}, "
                f"jobs.min_free_disk is {self.min_free_disk}"
            )

    # -- recovery

    def load(self) -> list[BatchRecord]:
        """Load every batch from disk, oldest first; incomplete folders are removed."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Jobs may run as several Unix users: none of them reads another's logs here.
        os.chmod(self.root, 0o700)
        loaded: list[BatchRecord] = []
        for path in self.root.iterdir():
            if path.name.startswith(TRASH):
                shutil.rmtree(path, ignore_errors=True)  # a delete the last run did not finish
                continue
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                loaded.append(self._load_one(path))
            except FileNotFoundError:
                # Crashed between mkdir and the metadata's rename: nothing was scheduled.
                log.warning("incomplete_batch_removed", path=str(path))
                shutil.rmtree(path, ignore_errors=True)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("batch_unreadable", path=str(path), error=str(exc))
        loaded.sort(key=lambda b: b.order)
        for batch in loaded:
            self._add(batch)
        return loaded

    def _load_one(self, path: Path) -> BatchRecord:
        meta = json.loads((path / META).read_bytes())
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('version')}, not {FORMAT_VERSION}")
        batch = BatchRecord(
            cid=meta["correlation_id"],
            owner=meta["owner"],
            create_time=meta["create_time"],
            options=_options_from_json(meta["options"]),
            specs=tuple(_spec_from_json(j) for j in meta["jobs"]),
            path=path,
            stdin_sizes=[j.get("stdin_bytes", 0) for j in meta["jobs"]],
        )
        for event, offset in _read_journal(path / JOURNAL):
            if event.seq != len(batch.events) or not 0 <= event.index < len(batch.specs):
                cut_journal(path / JOURNAL, offset, f"event {event.seq} out of order")
                break
            batch._apply(event)
        return batch


def _read_journal(path: Path) -> list[tuple[JobEvent, int]]:
    """The journal's events, each with the offset where its line starts.

    A torn last line (a crash mid-append) is dropped and cut off. A damaged line before
    the last is not skipped (what follows cannot be trusted in order): the file is kept
    aside for a person, and the journal cut back to the good lines before it, so that
    events appended from now on are read at the next start.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    events: list[tuple[JobEvent, int]] = []
    good = 0
    lines = data.splitlines(keepends=True)
    for n, line in enumerate(lines):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("unterminated")
            events.append((_event_from_line(line), good))
        except (ValueError, KeyError, TypeError, IndexError):
            if n == len(lines) - 1:
                log.warning("journal_tail_dropped", path=str(path), bytes=len(data) - good)
                os.truncate(path, good)
            else:
                cut_journal(path, good, f"damaged line {n + 1}")
            break
        good += len(line)
    return events


def cut_journal(path: Path, size: int, why: str) -> None:
    """Keep a copy of a damaged journal aside, then cut the journal to its first `size` bytes."""
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    shutil.copyfile(path, aside)
    os.truncate(path, size)
    log.error("journal_damaged", path=str(path), why=why, kept=str(aside), kept_bytes=size)
