"""jobworker-exec, the small static program that drops a job to its user in one exec.

It replaces `setpriv ... -- env -i ...` (two execs of dynamically linked programs) in the
exec chain of a job that runs as another user; without it that chain still works, slower.
`make build` builds it with `python -m jobworker.engine.exec_helper`, which deployments
run too (docs/operations.md). Root runs it, so it is used only when root owns it and
nobody else may write it or the folders above it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("jobworker-exec.c")
NAME = "jobworker-exec"


def default_path() -> Path:
    """Where the helper lives: beside the interpreter's installation (the venv)."""
    return Path(sys.prefix) / "libexec" / "jobworker" / NAME


def unusable(path: Path) -> str:
    """Why root must not run `path` ("" when it may): a missing file, or one that
    someone other than root could have written."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode) or not info.st_mode & stat.S_IXUSR:
        return f"{path}: not an executable file"
    for place in (path, *path.parents):
        try:
            info = os.stat(place)
        except OSError as exc:
            return f"{place}: {exc.strerror}"
        if info.st_uid != 0:
            return f"{place}: owned by uid {info.st_uid}, not root"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            if place != path and info.st_mode & stat.S_ISVTX:
                continue  # a sticky root folder (/tmp): others cannot replace what is in it
            return f"{place}: writable by others than root"
    return ""


def find() -> str | None:
    """The helper's path when root may run it, else None."""
    path = default_path()
    return None if unusable(path) else str(path)


def build(target: Path | None = None) -> Path:
    """Compile the helper (statically where the C library allows) to `target`."""
    target = target or default_path()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) found: install one (Debian: gcc, libc6-dev)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{NAME}.partial")
    base = [compiler, "-O2", "-Wall", "-Werror", "-o", str(partial), str(SOURCE)]
    for extra in (["-static"], []):  # static: no dynamic loader, no LD_* to heed, faster
        done = subprocess.run([*base, *extra], capture_output=True, text=True, check=False)
        if done.returncode == 0:
            break
    else:
        raise RuntimeError(f"{compiler} failed:\n{done.stderr.strip()}")
    os.chmod(partial, 0o700)  # only root runs it
    os.replace(partial, target)
    return target


def main() -> None:
    """`python -m jobworker.engine.exec_helper [TARGET]`: build the helper."""
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    try:
        path = build(target)
    except (OSError, RuntimeError) as exc:
        sys.exit(f"cannot build {NAME}: {exc}")
    problem = unusable(path)
    print(f"built {path}" + (f" (root will not use it: {problem})" if problem else ""))


if __name__ == "__main__":
    main()
