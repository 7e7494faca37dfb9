"""The data_dir lock: one server per data_dir."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "server.lock"


@contextlib.contextmanager
def data_dir_locked(data_dir: Path) -> Iterator[None]:
    """Hold `data_dir`/server.lock (an flock, with our pid in it) while inside.

    Two servers on one data_dir would both run its queued jobs. The lock goes with the
    process, even on kill -9; OSError naming the other server's pid when it holds it."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OSError(
                f"data_dir {data_dir} is in use by another jobworker server (pid {holder}); "
                "each server needs a data_dir of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # another server may use the data_dir from now on
