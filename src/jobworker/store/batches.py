"""The batch store: every batch in memory and on disk, its batch.json written crash-safe,
its job events appended to its journal, its folder renamed away when it is deleted."""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import structlog

from jobworker.errors import NotFound, ResourceExhausted
from jobworker.fsutil import fsync_dir
from jobworker.model import BatchOptions, JobEvent, JobSpec, JobState
from jobworker.store.codec import event_to_line, meta_to_bytes
from jobworker.store.damage import open_regular
from jobworker.store.files import JOURNAL, META, STDIN, TRASH, write_atomic, write_synced
from jobworker.store.records import BatchRecord, BatchView
from jobworker.store.recovery import load_batches

# BatchRecord and BatchView are imported from here by the rest of the code.
__all__ = ["BatchRecord", "BatchStore", "BatchView"]

log = structlog.get_logger("jobworker.store")


def _make_folders(jobs: Path, count: int, stop: threading.Event) -> None:
    """BatchStore.make_folders, on its thread: stops at the first failure or at `stop`."""
    # The server's alone (it hands the open files to the job): no job, whatever its Unix
    # user, reads another's output here.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
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
                    os.close(os.open(f"{folder}/{name}", flags, 0o600))
    except OSError as exc:  # gone (deleted), or a full disk: the job's start reports it
        log.debug("job_folders_stopped", path=str(jobs), error=str(exc))


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
        # Every id, sorted: a prefix is found by bisection, not by a walk over all batches
        # (with_prefix: ids a client made up cost it O(log n), not O(n)).
        self._cids: list[str] = []
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

    def with_prefix(self, prefix: str) -> Iterator[BatchRecord]:
        """The batches whose id starts with `prefix`, in the order of their ids."""
        cids = self._cids
        i = bisect.bisect_left(cids, prefix)
        while i < len(cids) and cids[i].startswith(prefix):
            yield self._batches[cids[i]]
            i += 1

    # -- writes

    def persist(self, owner: str, options: BatchOptions, specs: tuple[JobSpec, ...]) -> BatchRecord:
        """Write a new batch to disk, crash-safe, touching nothing in memory: safe to run in
        a worker thread. register() then makes it known."""
        self.root.mkdir(0o700, parents=True, exist_ok=True)
        self._check_free_space()
        cid = str(uuid.uuid4())
        path = self.root / cid
        now = time.time()
        try:
            path.mkdir(0o700)
            for i, spec in enumerate(specs):  # before the metadata: its rename commits all
                if spec.stdin:
                    (path / "jobs").mkdir(0o700, exist_ok=True)
                    (path / "jobs" / str(i)).mkdir(0o700)
                    write_synced(path / "jobs" / str(i) / STDIN, spec.stdin)
                    fsync_dir(path / "jobs" / str(i))
            if any(spec.stdin for spec in specs):
                fsync_dir(path / "jobs")
            write_atomic(path / META, meta_to_bytes(cid, owner, now, options, specs))
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

    def register(self, batch: BatchRecord, *, sort_id: bool = True) -> None:
        """Make a persisted (or loaded) batch known (event loop only). `sort_id` False: the
        caller sorts the ids once it has registered them all (load)."""
        self._batches[batch.cid] = batch
        if sort_id:
            bisect.insort(self._cids, batch.cid)
        _enlist(self._ordered, batch)
        _enlist(self._by_owner.setdefault(batch.owner, []), batch)
        if batch.options.idempotency_key:
            self._idempotency[(batch.owner, batch.options.idempotency_key)] = batch.cid

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
        batch.pending.append(event_to_line(event))
        self._write_pending(batch)
        batch.changed.notify()

    def _write_pending(self, batch: BatchRecord) -> None:
        """Append the batch's unwritten events, whole lines only; keep them on failure."""
        try:
            if batch.journal_fd < 0:
                # Never a FIFO (it would block the event loop) nor through a symlink.
                batch.journal_fd = open_regular(
                    batch.path / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND
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
        back) and the returned path is for the caller to remove, off the event loop.
        OSError, with the batch kept, when the folder cannot be moved."""
        trash = self.root / f"{TRASH}{batch.cid}"
        with contextlib.suppress(FileNotFoundError):  # removed by hand: forgetting is all
            batch.path.rename(trash)
            fsync_dir(self.root)
        self._close_journal(batch)
        self._retry.discard(batch)
        if self._batches.pop(batch.cid, None) is not None:
            i = bisect.bisect_left(self._cids, batch.cid)
            if i < len(self._cids) and self._cids[i] == batch.cid:
                del self._cids[i]
            _unlist(self._ordered, batch)
            mine = self._by_owner[batch.owner]
            _unlist(mine, batch)
            if not mine:
                del self._by_owner[batch.owner]
        key = (batch.owner, batch.options.idempotency_key)
        if self._idempotency.get(key) == batch.cid:
            del self._idempotency[key]
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
        """Load every batch from disk, oldest first.

        Nothing on disk is trusted, and nothing that holds a job's output is deleted: what
        cannot be used is moved to data_dir/quarantine (logged with its path and why), a
        job whose record of a start or an end was lost but whose folder shows it started
        is recorded LOST rather than run again, and a batch whose batch.json is unusable is
        kept as a damaged batch (its jobs LOST, labelled DAMAGED_LABEL), never dropped.
        Only a folder that never held a committed batch (a crash before batch.json's
        rename: no log, no journal) is removed.
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Jobs may run as several Unix users: none of them reads another's logs here.
        os.chmod(self.root, 0o700)
        loaded = load_batches(self.root)
        for batch in loaded:
            self.register(batch, sort_id=False)
        self._cids = sorted(self._batches)
        return loaded

    def record_lost(self, batch: BatchRecord, traced: dict[int, str]) -> None:
        """Record LOST the queued jobs that `traced` shows had started (and no executor
        runs: the scheduler asked), and the queued jobs they depend on (a job starts only
        after its dependencies succeeded): they never run again."""
        problems = batch.damage
        why = "; ".join(problems[:3]) if problems else "its start was not recorded"
        lost = dict(traced)
        work = list(traced)
        while work:
            i = work.pop()
            for dep in batch.specs[i].depends_on:
                j = batch.names[dep]
                if j not in lost and batch.statuses[j].state is JobState.QUEUED:
                    lost[j] = f"job {batch.specs[i].name!r} that depends on it had started"
                    work.append(j)
        now = time.time()
        for i in sorted(lost):
            folder = batch.path / "jobs" / str(i)
            log.error(
                "job_record_damaged",
                path=str(folder),
                correlation_id=batch.cid,
                job_index=i,
                why=why,
                traces=lost[i],
            )
            message = f"record damaged: {why}; it had started ({lost[i]}), so it is not run again"
            attempt = batch.statuses[i].attempt + 1
            event = JobEvent(
                seq=self.next_seq(batch),
                index=i,
                state=JobState.LOST,
                time=now,
                message=message,
                attempt=attempt,
            )
            self.append(batch, event)
