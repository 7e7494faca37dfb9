"""Batches on disk: crash-safe metadata, an append-only journal of job events, recovery."""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from jobworker.errors import NotFound, ResourceExhausted
from jobworker.fsutil import fsync_dir
from jobworker.model import (
    BatchOptions,
    JobEvent,
    JobSpec,
    JobState,
    frozen_map,
)
from jobworker.store.codec import (
    FORMAT_VERSION,
    as_time,
    event_from_line,
    event_to_line,
    meta_to_bytes,
    parse_meta,
    record_from_meta,
)
from jobworker.store.damage import (
    NotRegular,
    Quarantine,
    kind_of,
    open_regular,
    read_regular,
    start_traces,
)
from jobworker.store.records import BatchRecord, BatchView

# BatchRecord and BatchView are imported from here by the rest of the code.
__all__ = ["BatchRecord", "BatchStore", "BatchView"]

log = structlog.get_logger("jobworker.store")

META = "batch.json"
STDIN = "stdin"  # in a job's folder: what the job reads; written when the batch is stored
TRASH = ".trash-"  # a batch folder being deleted: renamed first, so a crash never revives it
JOURNAL = "journal"


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
    with contextlib.suppress(FileNotFoundError):  # a leftover: never opened (a FIFO blocks)
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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
    fsync_dir(path.parent)


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
        try:
            path.mkdir(0o700)
            for i, spec in enumerate(specs):  # before the metadata: its rename commits all
                if spec.stdin:
                    (path / "jobs").mkdir(0o700, exist_ok=True)
                    (path / "jobs" / str(i)).mkdir(0o700)
                    _write_synced(path / "jobs" / str(i) / STDIN, spec.stdin)
                    fsync_dir(path / "jobs" / str(i))
            if any(spec.stdin for spec in specs):
                fsync_dir(path / "jobs")
            _write_atomic(path / META, meta_to_bytes(cid, owner, now, options, specs))
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
        """Make a persisted (or loaded) batch known (event loop only)."""
        self._batches[batch.cid] = batch
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
        fsync_dir(self.root)
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
        quarantine = Quarantine(self.root.parent)
        with os.scandir(self.root) as found:
            entries = list(found)
        loaded: list[BatchRecord] = []
        for entry in entries:
            path = self.root / entry.name
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue  # gone since the listing
            if entry.name.startswith(TRASH) and stat.S_ISDIR(mode):
                shutil.rmtree(path, ignore_errors=True)  # a delete the last run did not finish
                continue
            if not stat.S_ISDIR(mode) or not _is_cid(entry.name):
                # Not a batch the server made: left as it is, never followed or opened.
                log.warning("stray_entry_skipped", path=str(path), kind=kind_of(mode))
                continue
            batch: BatchRecord | None
            try:
                batch = self._load_one(path, quarantine)
            except Exception as exc:  # a bug must neither lose the batch nor stop the start
                log.exception("batch_load_failed", path=str(path))
                try:
                    batch = self._damaged(path, f"it could not be loaded ({exc})", quarantine)
                except Exception:
                    log.exception("batch_skipped", path=str(path))
                    batch = None
            if batch is not None:
                loaded.append(batch)
        loaded.sort(key=lambda b: b.order)
        for batch in loaded:
            self.register(batch)
        return loaded

    def _load_one(self, path: Path, quarantine: Quarantine) -> BatchRecord | None:
        cid = path.name
        try:
            batch = _read_meta(path)
        except FileNotFoundError:
            if _never_committed(path):
                # Crashed between mkdir and the metadata's rename: nothing was scheduled.
                log.warning("incomplete_batch_removed", path=str(path))
                shutil.rmtree(path, ignore_errors=True)
                return None
            earlier = quarantine.earlier(cid, META)
            why = f"{META} is missing"
            if earlier is not None:
                why += f" (an earlier start moved it to {self._shown(earlier)})"
            return self._damaged(path, why, quarantine)
        except _Unusable as exc:
            moved = quarantine.move(path / META, cid, META, exc.why) if exc.move else None
            return self._damaged(path, exc.why, quarantine, moved)
        journal = _read_journal(path / JOURNAL, cid, quarantine)
        problems = list(journal.problems)
        for event in _in_order(journal.events, len(batch.specs), problems):
            seq = len(batch.events)  # numbered again after a lost or a skipped line
            batch._apply(event if event.seq == seq else dataclasses.replace(event, seq=seq))
        if problems[len(journal.problems) :] or journal.bad_lines:
            _repair_journal(path / JOURNAL, batch, journal, problems, quarantine)
        elif journal.torn:
            log.warning("journal_tail_dropped", path=str(path / JOURNAL), bytes=journal.torn)
            with contextlib.suppress(OSError):
                os.truncate(path / JOURNAL, journal.good)
        self._check_folders(batch, quarantine, problems)
        return batch

    def _check_folders(
        self, batch: BatchRecord, quarantine: Quarantine, problems: list[str]
    ) -> None:
        """Look at the job folders: move aside what is not a folder or a regular file where
        one should be, log the folders of jobs that ran and are gone, and record LOST the
        queued jobs whose folder shows they had started (their start never recorded)."""
        jobs = batch.path / "jobs"
        names = _list_jobs(jobs, batch.cid, quarantine)
        traced: dict[int, str] = {}
        for i, status in enumerate(batch.statuses):
            folder = jobs / str(i)
            is_dir = names.get(str(i))
            if is_dir is None:
                if status.start_time is not None:  # it ran: its logs are gone
                    log.error(
                        "job_folder_missing",
                        path=str(folder),
                        correlation_id=batch.cid,
                        job_index=i,
                        state=status.state.name,
                    )
                continue
            if not is_dir:
                try:
                    why = f"a {kind_of(os.lstat(folder).st_mode)}, not a folder"
                except OSError:
                    continue
                quarantine.move(folder, batch.cid, f"jobs.{i}", why)
                continue
            if status.state.ended:
                # Its files are read safely when asked for (store/logs.py): looking into
                # every ended job's folder would cost every start.
                continue
            _check_job_files(folder, batch.cid, i, quarantine)
            if status.state is JobState.QUEUED:
                traces = start_traces(folder, status.log_sizes)
                if traces:
                    traced[i] = traces
        batch.traced, batch.damage = traced, problems

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

    def _damaged(
        self, path: Path, why: str, quarantine: Quarantine, moved: Path | None = None
    ) -> BatchRecord:
        """A batch whose batch.json cannot be used: what its journal and folders tell,
        every job LOST with a message naming the damage, labelled DAMAGED_LABEL. Memory
        only: its files stay as they are (but for what is moved to quarantine)."""
        cid = path.name
        if moved is not None:
            why += f"; moved to {self._shown(moved)}"
        journal = _read_journal(path / JOURNAL, cid, quarantine)
        count = 0
        for event in journal.events:
            if event.index < MAX_DAMAGED_JOBS:
                count = max(count, event.index + 1)
        with contextlib.suppress(OSError), os.scandir(path / "jobs") as found:
            for entry in found:
                if entry.name.isdigit() and str(int(entry.name)) == entry.name:
                    count = max(count, min(int(entry.name) + 1, MAX_DAMAGED_JOBS))
        count = max(count, 1)
        times = [e.time for e in journal.events]
        try:
            created = min(times) if times else as_time(os.lstat(path).st_mtime)
        except (OSError, ValueError):
            created = 0.0
        batch = BatchRecord(
            cid=cid,
            owner="",  # unknown: only those who may see every batch see it
            create_time=created,
            options=BatchOptions(labels=frozen_map({DAMAGED_LABEL: META})),
            specs=tuple(JobSpec(f"job-{i}", ()) for i in range(count)),
            path=path,
        )
        for event in _in_order(journal.events, count, []):
            batch._apply(dataclasses.replace(event, seq=len(batch.events)))
        now = time.time()
        for i, status in enumerate(list(batch.statuses)):
            message = f"record damaged: {why}"
            if status.state is not JobState.QUEUED:
                message += f"; last recorded {status.state.name}"
                if status.message:
                    message += f" ({status.message})"
            event = JobEvent(
                seq=len(batch.events),
                index=i,
                state=JobState.LOST,
                time=now,
                exit_code=status.exit_code,
                signal=status.signal,
                message=message,
                usage=status.usage,
                attempt=max(1, status.attempt),
            )
            batch._apply(event)
        log.error("batch_damaged", path=str(path), correlation_id=cid, why=why, jobs=count)
        self._check_folders(batch, quarantine, [])
        return batch

    def _shown(self, path: Path) -> str:
        """`path` relative to data_dir: what a job's message names."""
        try:
            return str(path.relative_to(self.root.parent))
        except ValueError:
            return str(path)


DAMAGED_LABEL = "jobworker/damaged"  # on a batch whose batch.json was unusable: which file
MAX_DAMAGED_JOBS = 100_000  # jobs shown at most for a batch whose batch.json is gone
_JOB_FILES = (STDIN, "stdout", "stderr", "stdout.times", "stderr.times")


class _Unusable(Exception):
    """batch.json cannot be used: why, and whether to move it to quarantine."""

    def __init__(self, why: str, move: bool = True) -> None:
        super().__init__(why)
        self.why = why
        self.move = move


def _read_meta(path: Path) -> BatchRecord:
    """The batch whose folder is `path`, from its batch.json, every field checked (no job
    event applied yet); FileNotFoundError when there is none, else _Unusable."""
    try:
        raw = read_regular(path / META)
    except FileNotFoundError:
        raise
    except OSError as exc:
        move = isinstance(exc, NotRegular) or exc.errno == errno.EFBIG  # not an I/O error
        raise _Unusable(f"{META} is unusable: {exc.strerror}", move) from exc
    try:
        meta = parse_meta(raw)
    except (ValueError, RecursionError) as exc:
        raise _Unusable(f"{META} is not a JSON object ({_short(exc)})") from exc
    version = meta.get("version")
    if version != FORMAT_VERSION:  # another version's: left in place for it
        why = f"{META} has format version {version!r:.40}, this server reads {FORMAT_VERSION}"
        raise _Unusable(why, move=False)
    try:
        return record_from_meta(meta, path)
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise _Unusable(f"{META} is damaged ({_short(exc)})") from exc


def _is_cid(name: str) -> bool:
    """True for a name the server gives a batch folder: a UUID's canonical text."""
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _never_committed(path: Path) -> bool:
    """True when the batch folder `path` holds only what a crash before batch.json's rename
    leaves (batch.json.tmp, jobs/<i>/stdin): no batch was scheduled, no job ran."""
    try:
        with os.scandir(path) as top:
            for entry in top:
                if entry.name == META + ".tmp" and entry.is_file(follow_symlinks=False):
                    continue
                if entry.name != "jobs" or not entry.is_dir(follow_symlinks=False):
                    return False
                with os.scandir(entry.path) as jobs:
                    for job in jobs:
                        if not job.is_dir(follow_symlinks=False):
                            return False
                        with os.scandir(job.path) as files:
                            for f in files:
                                if f.name != STDIN or not f.is_file(follow_symlinks=False):
                                    return False
    except OSError:
        return False
    return True


def _list_jobs(jobs: Path, cid: str, quarantine: Quarantine) -> dict[str, bool]:
    """The entries of a batch's jobs/ folder, each with whether it is a folder (empty when
    there is none; anything else there is moved to quarantine)."""
    try:
        mode = os.lstat(jobs).st_mode
        if not stat.S_ISDIR(mode):
            quarantine.move(jobs, cid, "jobs", f"a {kind_of(mode)}, not a folder")
            return {}
        with os.scandir(jobs) as found:
            return {e.name: e.is_dir(follow_symlinks=False) for e in found}
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.error("job_folders_unreadable", path=str(jobs), error=str(exc))
        return {}


def _check_job_files(folder: Path, cid: str, index: int, quarantine: Quarantine) -> None:
    """Move aside whatever stands in a job's folder where a regular file belongs (a FIFO
    would block the job's start, a symlink would send its output elsewhere)."""
    for name in _JOB_FILES:
        try:
            mode = os.lstat(folder / name).st_mode
        except OSError:
            continue
        if not stat.S_ISREG(mode):
            why = f"a {kind_of(mode)}, not a regular file"
            quarantine.move(folder / name, cid, f"jobs.{index}.{name}", why)


@dataclass
class _Journal:
    """A journal as read: its events, and what was wrong with it."""

    events: list[JobEvent] = field(default_factory=list)
    good: int = 0  # bytes of whole, readable lines before a torn last one
    torn: int = 0  # bytes of a torn last line (a crash mid-append)
    bad_lines: int = 0
    problems: list[str] = field(default_factory=list)
    regular: bool = True  # False once a non-regular file was moved away


def _read_journal(path: Path, cid: str, quarantine: Quarantine) -> _Journal:
    """The journal's events, in file order; reads only a regular file (anything else is
    moved to quarantine). A torn last line (a crash mid-append) is dropped; a damaged
    line elsewhere is skipped and counted: the lines after it are still good."""
    out = _Journal()
    try:
        data = read_regular(path)
    except FileNotFoundError:
        return out
    except OSError as exc:
        why = f"the journal is unusable: {exc.strerror}"
        out.problems.append(why)
        if isinstance(exc, NotRegular) or exc.errno == errno.EFBIG:
            out.regular = False
            quarantine.move(path, cid, JOURNAL, why)
        else:
            log.error("journal_unreadable", path=str(path), error=str(exc))
        return out
    if not data:
        out.problems.append("the journal is empty")
        log.warning("journal_empty", path=str(path))
        return out
    lines = data.splitlines(keepends=True)
    for n, line in enumerate(lines, 1):
        if n == len(lines) and not line.endswith(b"\n"):
            out.torn = len(line)
            break
        try:
            out.events.append(event_from_line(line))
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            out.bad_lines += 1
            if out.bad_lines <= 3:
                out.problems.append(f"line {n} of the journal is damaged")
        out.good += len(line)
    return out


def _in_order(events: list[JobEvent], jobs: int, problems: list[str]) -> Iterator[JobEvent]:
    """The events that can be applied to a batch of `jobs` jobs: each names one of its
    jobs and comes after the one before (QUEUED events 0..jobs-1 are implicit). A gap (a
    lost line) is noted in `problems`, and the events after it are kept."""
    last = jobs - 1
    for event in events:
        if event.index >= jobs:
            problems.append(f"event {event.seq} names job {event.index}, of {jobs}")
        elif event.seq <= last:
            problems.append(f"event {event.seq} out of order")
        else:
            if event.seq != last + 1:
                problems.append(f"events {last + 1} to {event.seq - 1} missing")
            last = event.seq
            yield event


def _repair_journal(
    path: Path, batch: BatchRecord, journal: _Journal, problems: list[str], quarantine: Quarantine
) -> None:
    """Keep the damaged journal in quarantine and put in its place the events it held that
    could be used (numbered again from the batch's jobs' count), so that what is appended
    from now on reads back at the next start."""
    why = "; ".join(problems[:5])
    kept = quarantine.keep(path, batch.cid, JOURNAL, why) if journal.regular else None
    lines = b"".join(event_to_line(e) for e in batch.events[len(batch.specs) :])
    try:
        _write_atomic(path, lines)
    except OSError as exc:
        log.error("journal_repair_failed", path=str(path), why=why, error=str(exc))
        return
    log.error(
        "journal_damaged",
        path=str(path),
        why=why,
        moved_to=str(kept) if kept else None,
        events_kept=len(batch.events) - len(batch.specs),
    )
