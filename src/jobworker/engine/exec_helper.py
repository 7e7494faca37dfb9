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
from collections.abc import Sequence
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


# Each tried in turn until one builds and answers its usage check: without a C library
# (x86-64 and arm64: no start-up cost, jobworker-exec.c), static, then plain.
VARIANTS: tuple[list[str], ...] = (
    [
        "-DJW_NOLIBC",
        "-static",
        "-nostdlib",
        "-ffreestanding",
        "-fno-stack-protector",
        "-fno-pie",
        "-no-pie",
    ],
    ["-static"],  # no dynamic loader, no LD_* to heed
    [],
)


def build(target: Path | None = None, variants: Sequence[list[str]] = VARIANTS) -> Path:
    """Compile the helper (the first of `variants` this compiler and machine allow) to
    `target`."""
    target = target or default_path()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) found: install one (Debian: gcc, libc6-dev)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{NAME}.partial")
    base = [compiler, "-O2", "-Wall", "-Werror", "-o", str(partial), str(SOURCE)]
    errors = []
    for extra in variants:
        done = subprocess.run([*base, *extra], capture_output=True, text=True, check=False)
        problem = done.stderr.strip() if done.returncode else _answers_usage(partial)
        if not problem:
            break
        errors.append(f"{' '.join(extra) or 'plain'}: {problem}")
    else:
        raise RuntimeError(f"{compiler} failed:\n" + "\n".join(errors))
    os.chmod(partial, 0o700)  # only root runs it
    os.replace(partial, target)
    return target


def _answers_usage(path: Path) -> str:
    """ "" when the built program runs and says its usage, as it must; else what it did."""
    try:
        done = subprocess.run([str(path)], check=False, capture_output=True, timeout=10, text=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the built program does not run: {exc}"
    if done.returncode != 125 or "usage: jobworker-exec" not in done.stderr:
        return f"the built program exits {done.returncode}: {done.stderr.strip()[:200]!r}"
    return ""


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
