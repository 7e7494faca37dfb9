"""Job logs: tails for GetBatch and the write-time indexes, read from the files (followers:
store/follow.py)."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

from jobworker.store.damage import STREAMS, TIMES, NotRegular, open_regular

log = structlog.get_logger("jobworker.store")


@dataclass(frozen=True, slots=True)
class Tail:
    """The last bytes of one stream of one job."""

    data: bytes
    total: int
    truncated: bool


# A log file is read only if it is a regular file: a FIFO put in its place would block
# the reader, a symlink would show another file. What is not is read as empty, and said
# once (the server's start moves such files aside for jobs still to run; see
# docs/operations.md, "Damaged data").
_skipped: set[str] = set()
_skipped_lock = threading.Lock()


def open_log(path: str | Path) -> int | None:
    """An fd on the log (or index) file `path` to read, or None when there is none or it
    is not a regular file (logged once per path)."""
    try:
        return open_regular(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a FIFO, a symlink, a file where the folder should be...
        with _skipped_lock:
            new = str(path) not in _skipped
            if new and len(_skipped) < 10_000:
                _skipped.add(str(path))
        if new:
            kind = exc.kind if isinstance(exc, NotRegular) else exc.strerror
            log.warning("log_file_skipped", path=str(path), why=kind)
        return None


def read_tail(path: str | Path, limit: int) -> Tail:
    """At most `limit` bytes of the end of `path`; a missing (or unusable) file is empty."""
    fd = open_log(path)
    if fd is None:
        return Tail(b"", 0, False)
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - limit)
        data = os.pread(fd, size - start, start) if limit else b""
    finally:
        os.close(fd)
    return Tail(data, size, start > 0 or (limit == 0 and size > 0))


# --- write times -----------------------------------------------------------------------------
# Beside each log, <stream>.times indexes when its bytes were first seen: one record each time
# the server's sampler (the scheduler's log timer) sees the log grown, (its size then, the
# time). Bytes below a record's size and at or past the one before it were first seen at
# its time; a follower cuts its chunks at records, so every replay shows the same times.

_RECORD = struct.Struct("<Qd")


def times_path(folder: str | Path, stream: str) -> str:
    """The write-time index of a job's `stream` ("stdout" or "stderr")."""
    return f"{folder}/{stream}{TIMES}"


def append_time(fd: int, size: int, when: float) -> None:
    """Record that the log held `size` bytes when first seen at `when`."""
    os.write(fd, _RECORD.pack(size, when))


def seal_times(folder: str | Path, when: float) -> None:
    """Index whatever a job's logs hold past their indexes' last records, as first seen at
    `when`: for a job that ended while no sampler watched it (a server restart)."""
    for stream in STREAMS:
        size = log_size(f"{folder}/{stream}")
        path = times_path(folder, stream)
        last = 0
        fd = open_log(path)
        if fd is not None:
            try:
                end = os.fstat(fd).st_size
                if end >= _RECORD.size:
                    last = _RECORD.unpack(os.pread(fd, _RECORD.size, end - _RECORD.size))[0]
            except (OSError, struct.error):
                pass
            finally:
                os.close(fd)
        if size > last:
            with contextlib.suppress(OSError):
                fd = open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                try:
                    append_time(fd, size, when)
                finally:
                    os.close(fd)


class TimeIndex:
    """Reads one stream's write-time index for a follower: mostly forwards, record by record."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self._next = 0  # the record after the current one
        self._start = self._end = 0  # the current record covers [start, end)
        self._time = 0.0

    def covering(self, offset: int) -> tuple[int, float] | None:
        """(end, time): byte `offset` and those after it up to `end` were first seen at
        `time`; None while the sampler has not seen the byte yet."""
        if self._start <= offset < self._end:
            return self._end, self._time
        if self.fd < 0:
            fd = open_log(self.path)
            if fd is None:
                return None
            self.fd = fd
        count = os.fstat(self.fd).st_size // _RECORD.size
        lo = self._next if offset >= self._end else 0
        hi = count
        while lo < hi:  # the first record whose size is past the offset
            mid = (lo + hi) // 2
            if self._read(mid)[0] > offset:
                hi = mid
            else:
                lo = mid + 1
        if lo == count:
            return None
        self._end, self._time = self._read(lo)
        self._start = self._read(lo - 1)[0] if lo else 0
        self._next = lo + 1
        return self._end, self._time

    def _read(self, number: int) -> tuple[int, float]:
        end, when = _RECORD.unpack(os.pread(self.fd, _RECORD.size, number * _RECORD.size))
        return int(end), float(when)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


TAIL_BLOCK = 64 * 1024  # read backwards in blocks this size to find the last lines


def tail_offset(path: str | Path, lines: int) -> int:
    """Where the last `lines` lines of `path` begin (a last line without its newline counts),
    found by reading backwards from the end in blocks: a big log costs no more than its tail."""
    fd = open_log(path)
    if fd is None:
        return 0
    try:
        end = os.fstat(fd).st_size
        if not end or not lines:
            return end
        # A newline that ends the file ends the last line; it does not begin another.
        need = lines + 1 if os.pread(fd, 1, end - 1) == b"\n" else lines
        while end > 0:
            start = max(0, end - TAIL_BLOCK)
            block = os.pread(fd, end - start, start)
            found = block.count(b"\n")
            if found >= need:
                cut = len(block)
                for _ in range(need):
                    cut = block.rfind(b"\n", 0, cut)
                return start + cut + 1
            need -= found
            end = start
        return 0
    finally:
        os.close(fd)


def tail_offsets(folders: dict[int, Path], lines: int) -> dict[int, tuple[int, int]]:
    """For each job folder, where the last `lines` lines of stdout and of stderr begin
    (jobs whose files are empty or missing left out). Blocking: for a worker thread."""
    out: dict[int, tuple[int, int]] = {}
    for index, folder in folders.items():
        pair = (tail_offset(folder / STREAMS[0], lines), tail_offset(folder / STREAMS[1], lines))
        if pair != (0, 0):
            out[index] = pair
    return out


def log_size(path: str | Path) -> int:
    """Bytes in a log file (0 when the job never started, or it is not a regular file)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0
