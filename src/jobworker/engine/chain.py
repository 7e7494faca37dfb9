"""The exec chain: what runs between the fork and the job's own code, and the fork itself.

Through a join shell (cgroup v2; cpu or memory limits): a short exec chain

    /bin/sh -c JOIN jobworker-job <stderr file> <cgroup.procs files...> -- [prlimit ARGS --] argv

The shell writes its own pid into every cgroup.procs file, so the job is in its groups
before a line of user code runs. Until its final exec the shell's fd 2 is a "gate" pipe
to the server; the exec reopens fd 2 as the job's stderr file (O_APPEND, by absolute path),
which closes the gate. If joining fails, the shell names the file on the gate and exits
125 without running anything. The spawner waits for the gate to close (read_gate, about a
millisecond) and turns a named failure into SpawnError: a job never runs outside its
cgroup, and the caller never mistakes a join failure for the job's own exit status 125.

argv[0] as the program sees it is the one the client gave: the shell's exec searches the
job's PATH from the job's environment relative to the job's working directory, which is
exactly what the spawner resolved against beforehand (an argv[0] starting with "-" is
replaced by its resolved path, since dash's exec has no "--").

Running as another user (jobs.run_as; "nobody" by default when the server is root): the
exec chain ends in a last link, last_link(), that holds everything the client controls:

    [join shell ... --] [prlimit ARGS --] jobworker-exec ENVFD U G GROUPS DIR argv

Every step before the drop runs as root, so none of them gets a byte of the job's: they
run with a fixed environment (FIXED_ENV) in "/" (Popen's cwd), and by absolute paths.
jobworker-exec (engine/jobworker-exec.c, static: no dynamic loader reads LD_*) reads the
job's variables from a memory file, so no secret shows in a command line, drops to the
user after the job is in its cgroups, enters the job's directory as the user (a folder the
user may not enter fails there, never read as root) and execs argv in the job's PATH.
Where the helper is missing (exec_helper.py) the same is done by two programs, slower:

    setpriv --reuid=U --regid=G --groups=... -- env -i --chdir=DIR -- NAME=VALUE... argv

GNU env reads options up to "--"; after it, words with "=" are variables and the first
without is the command (even "-x"), so there an argv[0] with "=" is refused, and the
job's variables show in the chain's argv for the milliseconds until its exec.

Which shell joins, and what environment it sees, when the job runs as the server's own
user (no drop: the server is not root, or the config says "root"): the join shell runs
before the job is in its cgroups. bash imports functions (BASH_FUNC_echo%%=...) and
options (SHELLOPTS) from its environment, even as sh; dash imports neither (nor IFS; the
script quotes everything anyway), so with dash the shell gets the job's environment and
its exec hands it on at no extra cost. join_shell() decides once, at startup: /bin/sh if
it resolves to dash, else /bin/dash or /usr/bin/dash. Only on a host without dash does the
shell get a fixed environment and exec `/usr/bin/env -i NAME=VALUE... command`. (Such a
job has the server's own rights anyway: it runs as root only where the config says so.)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from jobworker.engine.cgroups.backend import PRLIMIT
from jobworker.engine.cgroups.group import JobCgroup
from jobworker.engine.checks import Account
from jobworker.engine.executor import SpawnError
from jobworker.engine.running import ticks_between
from jobworker.engine.stdio import why
from jobworker.model import JobSpec

_log = structlog.get_logger()

SETPRIV = "/usr/bin/setpriv"  # util-linux: drops to a job's Unix user after it joined its cgroups

_SH = "/bin/sh"
_DASH = ("/bin/dash", "/usr/bin/dash")
_ENV = "/usr/bin/env"
# The environment of every step that runs before the job's own (module doc): the server's.
FIXED_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
# $1: the job's stderr file; then cgroup.procs files; "--"; the command. Until the exec, fd 2
# is the gate pipe: whatever reaches it is a failure; the exec swaps in the real stderr.
_JOIN_SCRIPT = (
    'e="$1"; shift; for f; do [ "$f" = -- ] && break; '
    'echo "$$" 2>/dev/null >"$f" || { printf "cannot join cgroup: %s" "$f" >&2; exit 125; }; '
    "shift; done; "
    'shift; exec "$@" 2>>"$e"'
)


class JoinFailed(SpawnError):
    """The forking thread could not move into the job's groups: nothing was started."""


def join_shell() -> tuple[str, bool]:
    """The shell for the join step, and whether it may see the job's environment (module doc).

    True with dash: /bin/sh when it resolves to dash, else /bin/dash or /usr/bin/dash.
    Otherwise (/bin/sh, False): the shell gets a fixed environment and env(1) the job's.
    """
    if os.path.basename(os.path.realpath(_SH)) == "dash":
        return _SH, True
    for path in _DASH:
        if os.access(path, os.X_OK):
            return path, True
    _log.warning("join_shell_not_dash", shell=os.path.realpath(_SH), cost="one exec per job")
    return _SH, False


@dataclass(frozen=True, slots=True)
class Prepared:
    """What spawn() checked and opened before making the cgroup."""

    cwd: str
    env: dict[str, str]
    resolved: str  # argv[0] resolved against the job's PATH
    job_dir: Path  # absolute
    stdio: tuple[int, int, int]
    # The drop to another user (last_link), else (): jobworker-exec and its arguments but
    # ENVFD, or setpriv ... -- env ... argv where the helper is missing.
    last: tuple[str, ...] = ()
    env_block: bytes | None = None  # the job's environment, for jobworker-exec's ENVFD


def popen_job(
    spec: JobSpec, cgroup: JobCgroup, prepared: Prepared, shell: str, shell_sees_env: bool
) -> tuple[subprocess.Popen[bytes], int | None, int]:
    """Popen the job (through the join shell when it has cgroups); its start ticks when
    known (popen) and the gate fd or -1."""
    if prepared.env_block is None:
        return _popen_job(spec, cgroup, prepared, (shell, shell_sees_env), prepared.last, ())
    env_fd = env_memfd(prepared.env_block)
    try:
        last = (prepared.last[0], str(env_fd), *prepared.last[1:])
        return _popen_job(spec, cgroup, prepared, (shell, shell_sees_env), last, (env_fd,))
    finally:
        os.close(env_fd)


def env_memfd(block: bytes) -> int:
    """A memory file holding `block`, read from its start (jobworker-exec's ENVFD)."""
    try:
        fd = os.memfd_create("jobworker-env", os.MFD_CLOEXEC)
    except OSError as exc:
        raise SpawnError(f"cannot pass the job's environment: {why(exc)}") from exc
    try:
        with memoryview(block) as view:
            written = 0
            while written < len(view):
                written += os.pwrite(fd, view[written:], written)
    except OSError as exc:
        os.close(fd)
        raise SpawnError(f"cannot pass the job's environment: {why(exc)}") from exc
    return fd


def _popen_job(
    spec: JobSpec,
    cgroup: JobCgroup,
    prepared: Prepared,
    join: tuple[str, bool],
    last: tuple[str, ...],
    fds: tuple[int, ...],
) -> tuple[subprocess.Popen[bytes], int | None, int]:
    """popen_job with the last link complete and the descriptors it needs passed."""
    cwd, env, resolved, stdio = prepared.cwd, prepared.env, prepared.resolved, prepared.stdio
    shell, shell_sees_env = join
    argv0 = resolved if spec.argv[0].startswith("-") else spec.argv[0]
    prefix = [PRLIMIT, *cgroup.rlimit_args, "--"] if cgroup.rlimit_args else []
    if last:  # dropped to the job's user in the last link: every step before
        command = [*prefix, *last]  # it runs where and with what we choose
        cwd, env = "/", dict(FIXED_ENV)
    else:
        command = [*prefix, argv0, *spec.argv[1:]]
    if cgroup.by_thread or not cgroup.groups:  # no join step
        executable = command[0] if prefix or last else resolved
        if cgroup.by_thread:
            try:
                with cgroup.thread_joined():  # the child is born in the job's groups
                    return *popen(command, executable, cwd, env, stdio, fds), -1
            except OSError as exc:  # the thread could not join: nothing was started
                raise JoinFailed(f"cannot join cgroup {cgroup.key}: {why(exc)}") from exc
        return *popen(command, executable, cwd, env, stdio, fds), -1
    shell_env = env
    if not last and not shell_sees_env:  # no dash (module doc)
        if "=" in argv0:  # env(1) would take it for an assignment
            argv0 = resolved
        command = [_ENV, "-i", *_assignments(env), *prefix, argv0, *spec.argv[1:]]
        shell_env = dict(FIXED_ENV)
    procs = [str(p) for p in cgroup.procs_files]
    args = [shell, "-c", _JOIN_SCRIPT, "jobworker-job", str(prepared.job_dir / "stderr")]
    args += [*procs, "--", *command]
    try:
        gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
    except OSError as exc:
        raise SpawnError(f"cannot create a pipe for the job: {why(exc)}") from exc
    try:
        os.set_blocking(gate_r, False)
        child, ticks = popen(args, shell, cwd, shell_env, (stdio[0], stdio[1], gate_w), fds)
    except BaseException:
        os.close(gate_r)
        raise
    finally:
        os.close(gate_w)
    return child, ticks, gate_r


def last_link(
    spec: JobSpec, cwd: str, env: Mapping[str, str], who: Account, helper: str | None
) -> tuple[tuple[str, ...], bytes | None]:
    """The drop to `who` and the exec of the job's argv, with the environment block for
    jobworker-exec (None for setpriv and env(1), where the helper is missing)."""
    if helper is None:
        return setpriv_link(spec, cwd, env, who), None
    groups = ",".join(map(str, who.groups)) or "-"
    block = b"".join(os.fsencode(f"{assignment}\0") for assignment in _assignments(env))
    if block.count(0) != len(env):
        raise SpawnError("invalid argv or environment: a variable's value contains NUL")
    return (helper, str(who.uid), str(who.gid), groups, cwd, *spec.argv), block


def setpriv_link(spec: JobSpec, cwd: str, env: Mapping[str, str], who: Account) -> tuple[str, ...]:
    """setpriv, as root, drops to `who`; then env(1), as `who`, clears the environment,
    enters the job's directory and sets the job's variables, and execs its argv (module doc,
    "Running as another user")."""
    if "=" in spec.argv[0]:
        raise SpawnError(
            f"argv[0] {spec.argv[0][:200]!r} contains '=': a job that runs as another user "
            "cannot run it (env(1) would take it for a variable); name the command by a "
            "path without '=' (a symlink)"
        )
    groups = ",".join(map(str, who.groups))
    drop = [SETPRIV, f"--reuid={who.uid}", f"--regid={who.gid}"]
    drop.append(f"--groups={groups}" if groups else "--clear-groups")
    # "--" before the assignments: after it no variable name is read as an option, and
    # the first word without "=" (argv[0], even "-x") is the command.
    last = [_ENV, "-i", f"--chdir={cwd}", "--", *_assignments(env)]
    return (*drop, "--", *last, *spec.argv)


def _assignments(env: Mapping[str, str]) -> list[str]:
    """NAME=VALUE arguments for env(1); SpawnError for a name env(1) would misread."""
    for name in env:
        if not name or "=" in name or "\0" in name:
            raise SpawnError(f"invalid argv or environment: bad variable name {name!r}")
    return [f"{name}={value}" for name, value in env.items()]


def popen(
    args: list[str],
    executable: str,
    cwd: str,
    env: dict[str, str],
    stdio: tuple[int, int, int],
    fds: tuple[int, ...] = (),
) -> tuple[subprocess.Popen[bytes], int | None]:
    """Popen the way that keeps CPython on vfork+exec: no preexec_fn, user or groups; the
    child and its start time in clock ticks when the clock tells it (ticks_between)."""
    try:
        before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        popen = subprocess.Popen(
            args,
            executable=executable,
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
            cwd=cwd,
            env=env,
            close_fds=True,
            pass_fds=fds,
            start_new_session=True,
        )
        return popen, ticks_between(before, time.clock_gettime_ns(time.CLOCK_BOOTTIME))
    except OSError as exc:
        if exc.filename is None:  # the parent's side failed (its pipe: EMFILE, ENFILE)
            raise SpawnError(f"cannot start the job: {why(exc)}") from exc
        if exc.filename == cwd:  # the child's chdir (the directory went since _prepare)
            raise SpawnError(f"working directory {cwd}: {why(exc)}") from exc
        raise SpawnError(f"cannot execute {executable}: {why(exc)}") from exc
    except ValueError as exc:  # a NUL in argv or env, an "=" in an env name
        raise SpawnError(f"invalid argv or environment: {exc}") from exc


async def read_gate(fd: int) -> str:
    """Everything written to the gate pipe until it closes (at the job's exec)."""
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    closed: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            while chunk := os.read(fd, 4096):
                chunks.append(chunk)
        except BlockingIOError:
            return
        if not closed.done():
            closed.set_result(None)

    readable()  # often the job has exec'd already
    try:
        if not closed.done():
            loop.add_reader(fd, readable)
            try:
                await closed
            finally:
                loop.remove_reader(fd)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")
