"""Checks before a job starts: its Unix account, its working directory, its command.

They run before anything is made or forked, so that a job that cannot start fails with a
message that names the path and why (not a bare exit status 127 or 126), and, for a job
that drops to another Unix user, judge as that user would be judged (mode bits), never as
root. The kernel decides in the end; these only make the message clear.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass

from jobworker.engine.executor import SpawnError


@dataclass(frozen=True, slots=True)
class Account:
    """A Unix user a job drops to (Spawner.account)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary, as initgroups(3) would set them
    home: str


def home_dir() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return "/"


def check_dir(path: str, who: Account | None = None) -> None:
    """SpawnError naming `path` unless it is a directory the job can enter (as `who`, when
    the job drops to that user: env(1) enters it as them, so that is what counts)."""
    if who is not None and _blocked(path, who, is_dir=True):
        raise SpawnError(f"working directory {path}: permission denied for Unix user {who.name}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SpawnError(f"working directory not found: {path}") from None
    except OSError as exc:
        raise SpawnError(f"working directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SpawnError(f"not a directory: {path}")
    if who is None and not os.access(path, os.X_OK):
        raise SpawnError(f"permission denied: {path}")


def _blocked(path: str, who: Account, *, is_dir: bool) -> bool:
    """True when `who` may not search one of the folders on the way to `path` (symlinks
    resolved), nor `path` itself when `is_dir`, by mode bits. A folder that is not there
    blocks nothing: the caller's stat says what is wrong."""
    real = os.path.realpath(path)
    folders = [real] if is_dir else []
    parent = os.path.dirname(real)
    while True:
        folders.append(parent)
        if parent == "/":
            break
        parent = os.path.dirname(parent)
    for folder in reversed(folders):
        try:
            st = os.stat(folder)
        except OSError:
            return False
        if stat.S_ISDIR(st.st_mode) and not _may(st, who, 1):
            return True
    return False


def _may(st: os.stat_result, who: Account, bits: int) -> bool:
    """Whether the mode bits of `st` grant `who` every one of `bits` (4 r, 2 w, 1 x)."""
    if st.st_uid == who.uid:
        mode = st.st_mode >> 6
    elif st.st_gid == who.gid or st.st_gid in who.groups:
        mode = st.st_mode >> 3
    else:
        mode = st.st_mode
    return mode & bits == bits


def resolve_executable(name: str, path: str, cwd: str, who: Account | None = None) -> str:
    """The file `name` runs as: searched in `path` (relative entries and a name with a slash
    taken relative to `cwd`), as execvp would, and as `who` would when given; SpawnError
    naming it when there is none."""
    if "/" in name:
        candidate = os.path.join(cwd, name)
        problem = _unexecutable(candidate, who)
        if problem:
            raise SpawnError(f"{problem}: {name}")
        return candidate
    denied = ""
    for entry in path.split(":"):
        candidate = os.path.join(cwd, entry or ".", name)
        problem = _unexecutable(candidate, who)
        if not problem:
            return candidate
        if problem != "executable not found" and not denied:
            denied = f"{problem}: {candidate}"
    raise SpawnError(denied or f"executable not found: {name}")


def _unexecutable(path: str, who: Account | None = None) -> str:
    """Why `path` cannot be executed (by `who`, when given), or "" when it can."""
    denied = f"permission denied for Unix user {who.name}" if who is not None else ""
    if who is not None and _blocked(path, who, is_dir=False):
        return denied
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "executable not found"
    except OSError as exc:
        return exc.strerror or "cannot execute"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if who is not None:
        can = stat.S_ISREG(st.st_mode) and _may(st, who, 1)
    else:
        can = stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK)
    return "" if can else denied or "permission denied"
