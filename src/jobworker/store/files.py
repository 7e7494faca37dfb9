"""A batch's folder on disk: the names of its files, and how one is written crash-safe."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from jobworker.fsutil import fsync_dir

META = "batch.json"
STDIN = "stdin"  # in a job's folder: what the job reads; written when the batch is stored
TRASH = ".trash-"  # a batch folder being deleted: renamed first, so a crash never revives it
JOURNAL = "journal"


def write_synced(path: Path, data: bytes) -> None:
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, data)
    tmp.replace(path)
    fsync_dir(path.parent)
