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
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from jobworker.errors import NotFound, ResourceExhausted
from jobworker.fsutil import fsync_dir
from jobworker.model import (
    BatchOptions,
    JobEvent,
    JobSpec,
    JobState,
    Limits,
    RetryPolicy,
    Usage,
    frozen_map,
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
FORMAT_VERSION = 1


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


# Everything read back from disk is checked as if a stranger wrote it: a wrong type or an
# out-of-range number would otherwise fail later, far from the file (in the scheduler, or
# when a reply is encoded), and take the server down. Each check raises ValueError.

_INT32 = (1 << 31) - 1
_MAX_TIME = 1e11  # seconds since the epoch: far past any real time, inside a Timestamp
_MAX_SECONDS = 366 * 86400.0  # a timeout or a backoff
_MAX_ATTEMPTS = 100


def _int(value: object, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{value!r:.40} is not an integer from {lo} to {hi}")
    return value


def _num(value: object, lo: float = 0.0, hi: float = _MAX_TIME) -> float:
    if type(value) is not float and type(value) is not int:
        raise ValueError(f"{value!r:.40} is not a number")
    if not lo <= value <= hi:  # NaN fails too
        raise ValueError(f"{value!r:.40} is not from {lo} to {hi}")
    return value


def _str(value: object) -> str:
    if type(value) is not str:
        raise ValueError(f"{value!r:.40} is not a string")
    if not value.isascii():
        value.encode()  # a lone surrogate (JSON allows "\ud800") cannot go on the wire
    return value


def _obj(value: object) -> dict[str, Any]:
    if type(value) is not dict:
        raise ValueError(f"{value!r:.40} is not an object")
    return value


def _strings(value: object) -> list[str]:
    if type(value) is not list:
        raise ValueError(f"{value!r:.40} is not a list")
    return [_str(v) for v in value]


def _str_map(value: object) -> Mapping[str, str]:
    return frozen_map({_str(k): _str(v) for k, v in _obj(value).items()})


def _retry_from_json(value: object) -> RetryPolicy | None:
    if value is None:
        return None
    d = _obj(value)
    return RetryPolicy(
        max_attempts=_int(d["max_attempts"], 1, _MAX_ATTEMPTS),
        initial_backoff=_num(d["initial_backoff"], 0.0, _MAX_SECONDS),
        max_backoff=_num(d["max_backoff"], 0.0, _MAX_SECONDS),
        retry_on=frozenset(JobState[name] for name in _strings(d["retry_on"])),
    )


def _limits_from_json(value: object) -> Limits:
    d = _obj(value)
    unknown = set(d) - set(Limits.__slots__)
    if unknown:
        raise ValueError(f"unknown limits {sorted(unknown)!r:.80}")
    return Limits(**{k: _int(v) for k, v in d.items()})


def _spec_from_json(value: object) -> JobSpec:
    d = _obj(value)
    argv = tuple(_strings(d["argv"]))
    if not argv:
        raise ValueError("empty argv")
    timeout = d.get("timeout")
    return JobSpec(
        name=_str(d["name"]),
        argv=argv,
        env=_str_map(d.get("env", {})),
        working_dir=_str(d.get("working_dir", "")),
        timeout=None if timeout is None else _num(timeout, 0.0, _MAX_SECONDS),
        limits=_limits_from_json(d["limits"]) if "limits" in d else Limits(),
        depends_on=tuple(_strings(d.get("depends_on", []))),
        retry=_retry_from_json(d.get("retry")),
    )


def _check_graph(specs: tuple[JobSpec, ...]) -> None:
    """ValueError unless names are unique and dependencies name other jobs, without a cycle
    (the scheduler trusts both); a worklist, not recursion: a long chain is a valid batch."""
    names = {spec.name: i for i, spec in enumerate(specs)}
    if len(names) != len(specs):
        raise ValueError("two jobs have the same name")
    waiting = [0] * len(specs)
    dependents: dict[int, list[int]] = {}
    for i, spec in enumerate(specs):
        for dep in spec.depends_on:
            j = names.get(dep)
            if j is None or j == i:
                raise ValueError(f"job {i} depends on {dep!r:.80}, not another job")
            waiting[i] += 1
            dependents.setdefault(j, []).append(i)
    ready = [i for i, n in enumerate(waiting) if not n]
    done = 0
    while ready:
        j = ready.pop()
        done += 1
        for i in dependents.get(j, ()):
            waiting[i] -= 1
            if not waiting[i]:
                ready.append(i)
    if done != len(specs):
        raise ValueError("the jobs' dependencies make a cycle")


def _options_to_json(o: BatchOptions) -> dict[str, Any]:
    return {
        "labels": dict(o.labels),
        "max_parallel": o.max_parallel,
        "fail_fast": o.fail_fast,
        "idempotency_key": o.idempotency_key,
        "executor": o.executor,
    }


def _options_from_json(value: object) -> BatchOptions:
    d = _obj(value)
    fail_fast = d.get("fail_fast", False)
    if type(fail_fast) is not bool:
        raise ValueError(f"fail_fast {fail_fast!r:.40} is not a boolean")
    return BatchOptions(
        labels=_str_map(d.get("labels", {})),
        max_parallel=_int(d.get("max_parallel", 0), 0, _INT32),
        fail_fast=fail_fast,
        idempotency_key=_str(d.get("idempotency_key", "")),
        executor=_str(d.get("executor", "")),
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
    if e.node:
        parts.append(f',"n":{_json_string(e.node)}')
    parts.append("}\n")
    return "".join(parts).encode()


_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii
_STATE_NAMES = {s: s.name for s in JobState}  # Enum.name is a descriptor: slow per call


def _event_from_line(line: bytes) -> JobEvent:
    """A journal line's event; ValueError (or KeyError, TypeError) when it is not one.

    Read for every event at every start: the checks of the fields every line has are
    written out, and the others checked only when present."""
    d = json.loads(line)
    if type(d) is not dict:
        raise ValueError("not an object")
    seq, index, when = d["q"], d["i"], d["t"]
    if type(seq) is not int or type(index) is not int or seq < 0 or index < 0:
        raise ValueError("q and i are not counts")
    if (type(when) is not float and type(when) is not int) or not 0 <= when <= _MAX_TIME:
        raise ValueError("t is not a time")
    state = _STATE_BY_NAME[d["s"]]
    if len(d) == 4:
        return JobEvent(seq, index, state, when)
    x, u, o = d.get("x"), d.get("u"), d.get("o")
    if u is not None and (type(u) is not list or len(u) != 3):
        raise ValueError("usage is not [user, system, rss]")
    if o is not None and (type(o) is not list or len(o) != 2):
        raise ValueError("offsets are not [stdout, stderr]")
    return JobEvent(
        seq=seq,
        index=index,
        state=state,
        time=when,
        exit_code=None if x is None else _int(x, -_INT32 - 1, _INT32),
        signal=_int(d["g"], 0, _INT32) if "g" in d else 0,
        message=_str(d["m"]) if "m" in d else "",
        pid=_int(d["p"], 0, _INT32) if "p" in d else 0,
        pid_start=_int(d["ps"]) if "ps" in d else 0,
        usage=Usage(_num(u[0], 0.0, 1e10), _num(u[1], 0.0, 1e10), _int(u[2])) if u else None,
        cgroup=_str(d["c"]) if "c" in d else "",
        node=_str(d["n"]) if "n" in d else "",
        attempt=_int(d["a"], 1, (1 << 32) - 1) if "a" in d else 1,
        retry_at=_num(d["r"]) if "r" in d else 0.0,
        offsets=(_int(o[0]), _int(o[1])) if o else (0, 0),
    )


_STATE_BY_NAME = {s.name: s for s in JobState}


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
                    fsync_dir(path / "jobs" / str(i))
            if any(spec.stdin for spec in specs):
                fsync_dir(path / "jobs")
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
        batch.pending.append(_event_to_line(event))
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
            created = min(times) if times else _num(os.lstat(path).st_mtime)
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
        meta = _obj(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        raise _Unusable(f"{META} is not a JSON object ({_short(exc)})") from exc
    version = meta.get("version")
    if version != FORMAT_VERSION:  # another version's: left in place for it
        why = f"{META} has format version {version!r:.40}, this server reads {FORMAT_VERSION}"
        raise _Unusable(why, move=False)
    try:
        if meta["correlation_id"] != path.name:
            raise ValueError(f"it names batch {meta['correlation_id']!r:.60}")
        jobs = meta["jobs"]
        if type(jobs) is not list or not jobs:
            raise ValueError("jobs is not a list of jobs")
        specs = tuple(_spec_from_json(j) for j in jobs)
        _check_graph(specs)
        owner = _str(meta["owner"])
        if not owner:
            raise ValueError("no owner")
        return BatchRecord(
            cid=path.name,
            owner=owner,
            create_time=_num(meta["create_time"]),
            options=_options_from_json(meta["options"]),
            specs=specs,
            path=path,
            stdin_sizes=[_int(j.get("stdin_bytes", 0)) for j in jobs],
        )
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
            out.events.append(_event_from_line(line))
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
    lines = b"".join(_event_to_line(e) for e in batch.events[len(batch.specs) :])
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
