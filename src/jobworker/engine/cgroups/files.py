"""Reading and writing cgroup control files: one syscall per value, never buffered.

Every job's start and end touches a few control files, so these skip Python's file
objects (a buffer, a decoder, a path walk per line) for bare os.open/os.read/os.write.
"""

from __future__ import annotations

import os
from pathlib import Path


def write(path: str | Path, value: str | bytes) -> None:
    """Write one value to a cgroup control file in one write(2)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode() if isinstance(value, str) else value)
    finally:
        os.close(fd)


def read(path: str | Path, *, strict: bool = False) -> str:
    """A control file's contents, or "" when it is gone (unbuffered: read at every job end);
    `strict`: OSError instead of ""."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        if strict:
            raise
        return ""
    try:
        chunks = [os.read(fd, 65536)]
        while len(chunks[-1]) == 65536:  # a long file (cpuacct.usage_all on many CPUs)
            chunks.append(os.read(fd, 65536))
        return b"".join(chunks).decode()
    except OSError:
        if strict:
            raise
        return ""
    finally:
        os.close(fd)


def open_fd(path: str, flags: int) -> int:
    """os.open, close-on-exec (the fds a pooled slot holds must not leak into jobs)."""
    return os.open(path, flags | os.O_CLOEXEC)


def pread(fd: int) -> str:
    """A control file's contents through an fd held open (from offset 0: read afresh); ""
    on an error. Not for cgroup.procs or tasks: v1 serves those from a list it keeps for
    a while per open file."""
    try:
        chunks = [os.pread(fd, 65536, 0)]
        while len(chunks[-1]) == 65536:
            chunks.append(os.pread(fd, 65536, 65536 * len(chunks)))
        return b"".join(chunks).decode()
    except OSError:
        return ""


def keyed(text: str) -> dict[str, int]:
    """Parse "key value" lines (memory.events, cpu.stat, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out
