"""A job's stdio: its stdin file or /dev/null, and its log files opened for appending.

The kernel writes the job's output straight to its files (DESIGN.md, "Output goes straight
to the files"): the server copies no byte and a follower reads the files. Every open here
raises SpawnError naming the path, and leaves nothing open behind it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from jobworker.engine.executor import SpawnError


def why(exc: OSError) -> str:
    """What went wrong, as the OS says it (strerror), for a SpawnError's message."""
    return exc.strerror or str(exc)


def open_stdio(
    job_dir: Path, stdin: bytes, devnull: int, stdin_file: bool = True
) -> tuple[int, int, int]:
    """fds 0, 1, 2 for the job: its stdin file or /dev/null, and the appended log files.

    `stdin` bytes are written to the job's stdin file first (callers other than the
    store, which has written the file already, pass them); else the stdin file is read
    if there is one (`stdin_file` False: there is none), else /dev/null (`devnull`, an fd
    shared by all jobs: never closed here; -1 once closed). The folder is usually made
    ahead by the store (make_folders); made here when it is not there yet.

    SpawnError naming the path when one cannot be made; nothing is left open then.
    """
    fds: list[int] = []
    try:
        for name in ("stdout", "stderr"):
            fds.append(_open_log(job_dir, name))
        if stdin:
            fds.insert(0, _write_stdin(job_dir / "stdin", stdin))
        else:
            # The store writes a batch's stdin files when it commits the batch; a job
            # without one reads /dev/null.
            source = f"{job_dir}/stdin"
            try:
                if not stdin_file:
                    raise FileNotFoundError(source)
                fds.insert(0, os.open(source, os.O_RDONLY | os.O_CLOEXEC))
            except FileNotFoundError:
                if devnull < 0:  # Popen would read -1 as PIPE
                    raise SpawnError("cannot start the job: the spawner is closed") from None
                fds.insert(0, devnull)
            except OSError as exc:
                raise SpawnError(f"cannot open {source} for the job: {why(exc)}") from exc
    except BaseException:
        for fd in fds:
            if fd != devnull:
                os.close(fd)
        raise
    return fds[0], fds[1], fds[2]


def _open_log(job_dir: Path, name: str) -> int:
    """The job's log file `name`, opened for appending (its folder made when missing)."""
    path = f"{job_dir}/{name}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o600)
    except (FileNotFoundError, NotADirectoryError):  # no folder (or a file in the way)
        try:
            job_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SpawnError(f"cannot create the job directory {job_dir}: {why(exc)}") from exc
    except OSError as exc:
        raise SpawnError(f"cannot open {name} for the job: {path}: {why(exc)}") from exc
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        raise SpawnError(f"cannot open {name} for the job: {path}: {why(exc)}") from exc


def _write_stdin(path: Path, data: bytes) -> int:
    """Write the job's stdin file (a partial one is removed); an fd reading it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SpawnError(f"cannot write stdin for the job to {path}: {why(exc)}") from exc
