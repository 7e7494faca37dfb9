"""supervisor.ledger: the supervisor's durable record of every job it took on.

One JSON line per step ("begin", "started", "ended", "ack"), appended before the step
takes effect, so that whatever dies when, no job starts twice and no end is lost
(docs/ARCHITECTURE.md, "The ledger"). Replayed at start; compacted once it has grown.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from jobworker.supervisor import protocol as p

log = structlog.get_logger()

_COMPACT_BYTES = 4 * 1024 * 1024  # rewritten past this, at an ack
_MAX_READ = 256 * 1024 * 1024


@dataclass
class Record:
    """What the ledger says of one job's latest attempt."""

    key: str
    attempt: int
    begun: float  # when its start began (seconds since the epoch)
    started: p.Message | None = None  # the "started" message: pid, start ticks, cgroup...
    ended: dict[str, Any] | None = None  # protocol.exit_to_json of its end


class Ledger:
    """The open ledger of one supervisor (data_dir/supervisor.ledger)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = _open_append(path)
        except OSError as exc:  # a FIFO or a link put there: moved aside, a new one begun
            aside = path.with_name(f"{path.name}.damaged-{os.getpid()}")
            os.rename(path, aside)
            log.warning("ledger_moved_aside", path=str(path), moved_to=str(aside), error=str(exc))
            self._fd = _open_append(path)
        self.size = os.fstat(self._fd).st_size

    def replay(self) -> dict[str, Record]:
        """Every job the ledger has not seen acknowledged, by key (damaged lines skipped)."""
        records: dict[str, Record] = {}
        for number, line in enumerate(_read_lines(self.path), 1):
            try:
                _fold(records, json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ledger_line_skipped", path=str(self.path), line=number, error=str(exc))
        return records

    def write(self, record: p.Message) -> None:
        """Append one step; OSError (a full disk) is the caller's to handle."""
        line = p.encode(record)
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(line)

    @property
    def due(self) -> bool:
        """Grown enough to be rewritten (compact)."""
        return self.size > _COMPACT_BYTES

    def compact(self, live: list[p.Message]) -> None:
        """Rewrite the ledger with the live records only (atomically: rename). The
        caller's own records are the source: no copy of each line is kept in memory."""
        tmp = self.path.with_suffix(".tmp")
        data = b"".join(p.encode(record) for record in live)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = _open_append(self.path)
        self.size = len(data)

    def close(self, *, empty: bool) -> None:
        """`empty`: nothing is live any more, the file goes."""
        os.close(self._fd)
        if empty:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _fold(records: dict[str, Record], m: dict[str, Any]) -> None:
    op, key, attempt = m["op"], str(m["key"]), int(m["attempt"])
    if op == "begin":
        records[key] = Record(key, attempt, float(m["time"]))
        return
    record = records.get(key)
    if record is None or record.attempt != attempt:
        return
    if op == "started":
        record.started = m
    elif op == "ended":
        record.ended = dict(m["exit"])
    elif op == "ack":
        del records[key]


def _open_append(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    fd = os.open(path, flags, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def _read_lines(path: Path) -> list[bytes]:
    """The ledger's whole lines; only a regular file is read (never a FIFO, never a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            log.warning("ledger_unreadable", path=str(path), error="not a regular file")
            return []
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            if sum(map(len, chunks)) > _MAX_READ:
                log.warning("ledger_unreadable", path=str(path), error="too large")
                return []
        return b"".join(chunks).split(b"\n")[:-1]  # a torn last line is dropped
    finally:
        os.close(fd)
