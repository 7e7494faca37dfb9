"""Batches on disk: crash-safe metadata, an append-only journal of job events, recovery."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
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
    Usage,
    batch_state,
    frozen_map,
)
from jobworker.store.notify import Notifier

log = structlog.get_logger("jobworker.store")

META = "batch.json"
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
    seq: int  # creation order, for FIFO scheduling and stable listing
    statuses: list[JobStatus] = field(default_factory=list)
    events: list[JobEvent] = field(default_factory=list)
    counts: Counter[JobState] = field(default_factory=Counter)
    end_time: float | None = None
    names: dict[str, int] = field(default_factory=dict)
    changed: Notifier = field(default_factory=Notifier)
    journal_fd: int = -1

    def __post_init__(self) -> None:
        self.names = {spec.name: i for i, spec in enumerate(self.specs)}
        if not self.statuses:
            self.statuses = [JobStatus() for _ in self.specs]
            self.events = [
                JobEvent(seq=i, index=i, state=JobState.QUEUED, time=self.create_time)
                for i in range(len(self.specs))
            ]
        self.counts = Counter(s.state for s in self.statuses)

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
        return self.path / "jobs" / str(index)

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
        else:
            self.end_time = None


# --- encoding -------------------------------------------------------------------------


def _spec_to_json(spec: JobSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": spec.name, "argv": list(spec.argv)}
    if spec.env:
        out["env"] = dict(spec.env)
    if spec.working_dir:
        out["working_dir"] = spec.working_dir
    if spec.stdin:
        out["stdin"] = base64.b64encode(spec.stdin).decode("ascii")
    if spec.timeout is not None:
        out["timeout"] = spec.timeout
    if spec.limits.any:
        out["limits"] = {k: getattr(spec.limits, k) for k in Limits.__slots__}
    if spec.depends_on:
        out["depends_on"] = list(spec.depends_on)
    return out


def _spec_from_json(d: Mapping[str, Any]) -> JobSpec:
    return JobSpec(
        name=d["name"],
        argv=tuple(d["argv"]),
        env=frozen_map(d.get("env")),
        working_dir=d.get("working_dir", ""),
        stdin=base64.b64decode(d["stdin"]) if "stdin" in d else b"",
        timeout=d.get("timeout"),
        limits=Limits(**d["limits"]) if "limits" in d else Limits(),
        depends_on=tuple(d.get("depends_on", ())),
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
    d: dict[str, Any] = {"q": e.seq, "i": e.index, "s": e.state.name, "t": e.time}
    if e.exit_code is not None:
        d["x"] = e.exit_code
    if e.signal:
        d["g"] = e.signal
    if e.message:
        d["m"] = e.message
    if e.pid:
        d["p"] = e.pid
        d["ps"] = e.pid_start
    if e.usage is not None:
        d["u"] = [e.usage.user_cpu, e.usage.system_cpu, e.usage.max_rss_bytes]
    return json.dumps(d, separators=(",", ":")).encode() + b"\n"


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
    )


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the store --------------------------------------------------------------------------


class BatchStore:
    """Every batch under `data_dir/batches`, in memory and on disk."""

    def __init__(self, data_dir: Path, *, min_free_disk: int = 0) -> None:
        self.root = data_dir / "batches"
        self.min_free_disk = min_free_disk
        self._batches: dict[str, BatchRecord] = {}
        self._idempotency: dict[tuple[str, str], str] = {}
        self._seq = 0
        self._dirty: set[int] = set()

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

    def newest_first(self) -> list[BatchRecord]:
        """Every batch, newest first."""
        return sorted(self._batches.values(), key=lambda b: b.seq, reverse=True)

    # -- writes

    def create(self, owner: str, options: BatchOptions, specs: tuple[JobSpec, ...]) -> BatchRecord:
        """Persist a new batch (crash-safe); ResourceExhausted when the disk is full."""
        self.root.mkdir(parents=True, exist_ok=True)
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
            path.mkdir()
            _write_atomic(path / META, json.dumps(meta, separators=(",", ":")).encode())
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    f"disk full: cannot store the batch under {self.root}"
                ) from exc
            raise
        self._seq += 1
        batch = BatchRecord(
            cid=cid,
            owner=owner,
            create_time=now,
            options=options,
            specs=specs,
            path=path,
            seq=self._seq,
        )
        self._add(batch)
        return batch

    def append(self, batch: BatchRecord, event: JobEvent) -> None:
        """Apply `event` to `batch` and append it to the batch's journal."""
        batch._apply(event)
        try:
            if batch.journal_fd < 0:
                batch.journal_fd = os.open(
                    batch.path / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
                )
            os.write(batch.journal_fd, _event_to_line(event))
            self._dirty.add(batch.journal_fd)
        except OSError as exc:
            # The server goes on: the state is right in memory and on the wire; only
            # a crash before the disk has room again would lose this event.
            log.error("journal_write_failed", correlation_id=batch.cid, error=str(exc))
        if batch.ended:
            self._close_journal(batch)
        batch.changed.notify()

    def next_seq(self, batch: BatchRecord) -> int:
        """The sequence number of `batch`'s next event."""
        return len(batch.events)

    def flush(self) -> None:
        """fsync every journal written since the last flush (group commit)."""
        dirty, self._dirty = self._dirty, set()
        for fd in dirty:
            with contextlib.suppress(OSError):
                os.fsync(fd)

    def delete(self, batch: BatchRecord) -> None:
        """Forget `batch` and delete its folder with its logs."""
        self._close_journal(batch)
        self._batches.pop(batch.cid, None)
        key = (batch.owner, batch.options.idempotency_key)
        if self._idempotency.get(key) == batch.cid:
            del self._idempotency[key]
        shutil.rmtree(batch.path, ignore_errors=True)

    def close(self) -> None:
        """Flush and close every open journal."""
        self.flush()
        for batch in self._batches.values():
            self._close_journal(batch)

    def _close_journal(self, batch: BatchRecord) -> None:
        if batch.journal_fd >= 0:
            fd, batch.journal_fd = batch.journal_fd, -1
            self._dirty.discard(fd)
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)

    def _add(self, batch: BatchRecord) -> None:
        self._batches[batch.cid] = batch
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
        self.root.mkdir(parents=True, exist_ok=True)
        loaded: list[BatchRecord] = []
        for path in self.root.iterdir():
            if not path.is_dir():
                continue
            try:
                loaded.append(self._load_one(path))
            except FileNotFoundError:
                # Crashed between mkdir and the metadata's rename: nothing was scheduled.
                log.warning("incomplete_batch_removed", path=str(path))
                shutil.rmtree(path, ignore_errors=True)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("batch_unreadable", path=str(path), error=str(exc))
        loaded.sort(key=lambda b: (b.create_time, b.cid))
        for batch in loaded:
            self._seq += 1
            batch.seq = self._seq
            self._add(batch)
        return loaded

    def _load_one(self, path: Path) -> BatchRecord:
        meta = json.loads((path / META).read_bytes())
        batch = BatchRecord(
            cid=meta["correlation_id"],
            owner=meta["owner"],
            create_time=meta["create_time"],
            options=_options_from_json(meta["options"]),
            specs=tuple(_spec_from_json(j) for j in meta["jobs"]),
            path=path,
            seq=0,
        )
        for event in _read_journal(path / JOURNAL):
            if event.seq == len(batch.events) and 0 <= event.index < len(batch.specs):
                batch._apply(event)
        return batch


def _read_journal(path: Path) -> list[JobEvent]:
    """The journal's events; a torn last line (crash mid-append) is dropped and cut off."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    events: list[JobEvent] = []
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            events.append(_event_from_line(line))
        except (ValueError, KeyError, TypeError, IndexError):
            break
        good += len(line)
    if good < len(data):
        log.warning("journal_tail_dropped", path=str(path), bytes=len(data) - good)
        os.truncate(path, good)
    return events
