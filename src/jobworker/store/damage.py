"""Damaged files under data_dir: opening only regular files, quarantine, traces of a start."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import structlog

log = structlog.get_logger("jobworker.store")

QUARANTINE = "quarantine"  # under data_dir: what recovery could not use, moved aside
# Bytes read at most from one metadata file or journal: a sparse or hostile file of any
# size must not take the server's memory (real ones are far smaller).
MAX_READ = 4 << 30
_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotRegular(OSError):
    """A path that is there but is not a regular file (a FIFO, a symlink, a folder...)."""

    def __init__(self, path: str | Path, kind: str) -> None:
        super().__init__(errno.EINVAL, f"{kind}, not a regular file", str(path))
        self.kind = kind


_KINDS = (
    (stat.S_ISREG, "regular file"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "device"),
    (stat.S_ISBLK, "device"),
)


def kind_of(mode: int) -> str:
    """What an inode is, in words: "FIFO", "symlink", "directory"..."""
    return next((name for test, name in _KINDS if test(mode)), "unknown file type")


def open_regular(path: str | Path, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """Open `path` only if it is a regular file: never follows a symlink, never blocks on
    a FIFO. FileNotFoundError when missing, NotRegular when something else is there."""
    try:
        fd = os.open(path, flags | _OPEN, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise NotRegular(path, "symlink") from exc
        if exc.errno == errno.EISDIR:
            raise NotRegular(path, "directory") from exc
        if exc.errno == errno.ENXIO:  # a FIFO without a reader, opened to write; a socket
            raise NotRegular(path, _lkind(path)) from exc
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegular(path, kind_of(st.st_mode))
    return fd


def _lkind(path: str | Path) -> str:
    try:
        return kind_of(os.lstat(path).st_mode)
    except OSError:
        return "unknown file type"


def read_regular(path: str | Path, limit: int = MAX_READ) -> bytes:
    """The bytes of the regular file `path` (see open_regular); OSError(EFBIG) past `limit`."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise OSError(errno.EFBIG, f"{size} bytes, more than {limit} read at most", str(path))
        parts = []
        while size > 0:  # the size can change under us: read what is there, up to it
            part = os.read(fd, min(size, 1 << 24))
            if not part:
                break
            parts.append(part)
            size -= len(part)
        return b"".join(parts)
    finally:
        os.close(fd)


class Quarantine:
    """`data_dir/quarantine/<cid>/<name>.<time>`: where recovery moves what it cannot use,
    so that a person can look at it; nothing there is ever overwritten or read again."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / QUARANTINE

    def _target(self, cid: str, name: str) -> Path:
        folder = self.root / cid
        folder.mkdir(0o700, parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = folder / f"{name}.{stamp}"
        n = 1
        while os.path.lexists(target):  # the server alone writes here (data_dir is locked)
            n += 1
            target = folder / f"{name}.{stamp}.{n}"
        return target

    def move(self, path: Path, cid: str, name: str, why: str) -> Path | None:
        """Move `path` (whatever it is: a symlink is moved, not followed) into quarantine
        and log it; None (logged) when it cannot be moved."""
        try:
            target = self._target(cid, name)
            os.rename(path, target)
        except OSError as exc:
            log.error("quarantine_failed", path=str(path), why=why, error=str(exc))
            return None
        log.error("file_quarantined", path=str(path), why=why, moved_to=str(target))
        return target

    def keep(self, path: Path, cid: str, name: str, why: str) -> Path | None:
        """Put a hard link of the regular file `path` in quarantine: it stays where it is,
        for the caller to replace; None (logged) when it cannot be linked."""
        try:
            target = self._target(cid, name)
            os.link(path, target, follow_symlinks=False)
        except OSError as exc:
            log.error("quarantine_failed", path=str(path), why=why, error=str(exc))
            return None
        return target

    def earlier(self, cid: str, name: str) -> Path | None:
        """The newest file an earlier start put in quarantine for `cid` as `name`, if any."""
        try:
            found = sorted(p for p in (self.root / cid).iterdir() if p.name.startswith(name + "."))
        except OSError:
            return None
        return found[-1] if found else None


STREAMS = ("stdout", "stderr")
TIMES = ".times"


def start_traces(folder: Path, log_sizes: tuple[int, int] = (0, 0)) -> str:
    """What in a job's folder shows that it started after its logs held `log_sizes` bytes
    (the end of its last recorded attempt): "" when nothing does. Reads no file."""
    found = []
    for k, stream in enumerate(STREAMS):
        try:
            st = os.lstat(folder / stream)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size > log_sizes[k]:
            found.append(f"{stream} holds {st.st_size} bytes")
        # The write-time index is made when the server first sees a job's output.
        if log_sizes == (0, 0) and os.path.lexists(folder / f"{stream}{TIMES}"):
            found.append(f"{stream}{TIMES} exists")
    return ", ".join(found)
