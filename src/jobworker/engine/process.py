"""The supervisor of job processes: spawn into cgroups without forking gRPC, reap, stop, kill.

How a job starts (DESIGN.md, "Never fork the gRPC process the slow way"): subprocess.Popen
without preexec_fn/user/group, so CPython uses vfork+exec and gRPC's at-fork handlers never
run. What must happen between fork and the job's exec is done by a short exec chain:

    /bin/sh -c JOIN jobworker-job <stderr file> <cgroup.procs files...> -- [prlimit ARGS --] argv

The shell writes its own pid into every cgroup.procs file, so the job is in its groups
before a line of user code runs. Until its final exec the shell's fd 2 is a "gate" pipe
to the server; the exec reopens fd 2 as the job's stderr file (O_APPEND, by absolute path),
which closes the gate. If joining fails, the shell names the file on the gate and exits
125 without running anything. spawn() waits for the gate to close (about a millisecond)
and turns a named failure into SpawnError: a job never runs outside its cgroup, and the
caller never mistakes a join failure for the job's own exit status 125.

argv[0] as the program sees it is the one the client gave: the shell's exec searches the
job's PATH from the job's environment relative to the job's working directory, which is
exactly what spawn() resolved against beforehand (an argv[0] starting with "-" is replaced
by its resolved path, since dash's exec has no "--").

Max RSS: wait4's ru_maxrss of a child started from the server begins at the server's own
peak RSS (at exec the kernel folds the old mm's high-water mark, here the vfork parent's,
into the child's). Where the job's memory is accounted by a cgroup (it has a memory limit,
or cgroup v2 with the memory controller) the figure is capped by the group's peak;
otherwise it is an upper bound that can be the server's RSS.

Reaping uses a pidfd watched by the event loop (no threads, no asyncio child watcher);
os.wait4 gives the status and rusage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from jobworker.engine.limits import PRLIMIT, CgroupBackend, JobCgroup
from jobworker.model import JobSpec, Limits, Usage

_log = structlog.get_logger()

_SHELL = "/bin/sh"
# $1: the job's stderr file; then cgroup.procs files; "--"; the command. Until the exec, fd 2
# is the gate pipe: whatever reaches it is a failure; the exec swaps in the real stderr.
_JOIN_SCRIPT = (
    'e=$1; shift; for f; do [ "$f" = -- ] && break; '
    'echo $$ 2>/dev/null >"$f" || { printf "cannot join cgroup: %s" "$f" >&2; exit 125; }; '
    "shift; done; "
    'shift; exec "$@" 2>>"$e"'
)
_LEFTOVER_POLL = 0.005  # seconds between checks that a killed job's cgroup emptied
_LEFTOVER_TIMEOUT = 5.0


class SpawnError(Exception):
    """A job could not be started; the message names the path or resource at fault."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a job's main process ended, with the job's resource usage."""

    exit_code: int | None  # None when killed by a signal
    signal: int
    usage: Usage
    end_time: float
    oom_killed: bool


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def kill_stale(pid: int, pid_start: int, cgroup_key: str | None, backend: CgroupBackend) -> bool:
    """After a crash: SIGKILL the job's process group if `pid` is still that same process.

    True when the process (same pid, same start time) was found and killed. A pid reused
    by another process is never signalled. The job's cgroup, named by its key and so
    certainly the job's, is killed and removed whether or not the main process is left.
    """
    killed = False
    if pid > 0 and process_start_ticks(pid) == pid_start:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # the job ran as a session (and group) leader
            killed = True
        if not killed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed = True
    if cgroup_key:
        group = backend.open(cgroup_key)
        if group is not None:
            group.kill()
            group.remove(timeout=1.0)
    return killed


class Process:
    """A running job: its main process, its cgroup, and the single result of its end."""

    def __init__(
        self, popen: subprocess.Popen[bytes], cgroup: JobCgroup, start_time: float
    ) -> None:
        """Watch `popen` through a pidfd; spawn() makes these."""
        self.pid = popen.pid
        self.pid_start = process_start_ticks(self.pid) or 0
        self.start_time = start_time
        self.cgroup = cgroup
        self._popen = popen
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[ExitInfo] = self._loop.create_future()
        self._reaped = False
        self._status: tuple[int | None, int, float] = (None, 0, 0.0)  # exit code, signal, end
        self._rusage: tuple[float, float, int] = (0.0, 0.0, 0)  # user, system, max rss
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._pidfd = os.pidfd_open(self.pid)
        self._loop.add_reader(self._pidfd, self._on_exit)

    async def wait(self) -> ExitInfo:
        """The job's end, once it has ended and nothing of it is left; same result for all."""
        return await asyncio.shield(self._done)

    async def stop(self, grace: float) -> ExitInfo:
        """SIGTERM the process group; after `grace` seconds SIGKILL it and the cgroup."""
        if not self._reaped:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._done), grace)
            if not self._reaped:
                self.kill()
        return await asyncio.shield(self._done)

    def kill(self) -> None:
        """SIGKILL the process group and everything in the cgroup, now."""
        self._signal_group(signal.SIGKILL)
        self.cgroup.kill()

    def _signal_group(self, sig: int) -> None:
        """Signal the process group; only until the main process is reaped: while it is
        unreaped, its pid (the group id) cannot belong to anyone else."""
        if self._reaped:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _on_exit(self) -> None:
        """The pidfd is readable: the main process is a zombie. Kill the rest, then reap."""
        try:
            if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return  # not ended after all
            self._signal_group(signal.SIGKILL)  # a job never leaves a process behind
            _, status, rusage = os.wait4(self.pid, 0)  # a zombie: returns at once
        except ChildProcessError:  # someone else reaped it (a waitpid(-1) child watcher)
            _log.warning("job_reaped_elsewhere", pid=self.pid)
            status, rusage = -1, None
        self._reaped = True
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        exit_code: int | None
        if status == -1:
            exit_code, sig = None, 0
        elif os.WIFSIGNALED(status):
            exit_code, sig = None, os.WTERMSIG(status)
        else:
            exit_code, sig = os.waitstatus_to_exitcode(status), 0
        self._popen.returncode = -sig if exit_code is None else exit_code
        self._status = (exit_code, sig, time.time())
        if rusage is not None:
            self._rusage = (rusage.ru_utime, rusage.ru_stime, rusage.ru_maxrss * 1024)
        self._deadline = time.monotonic() + _LEFTOVER_TIMEOUT
        self._finish()

    def _finish(self) -> None:
        """Once the cgroup is empty (or after a timeout): usage, OOM, remove, resolve."""
        self._timer = None
        # An empty cgroup stays empty (nothing can join it but by our writes): no kill needed.
        if self.cgroup.pids() and time.monotonic() < self._deadline:
            self.cgroup.kill()
            self._timer = self._loop.call_later(_LEFTOVER_POLL, self._finish)
            return
        exit_code, sig, end_time = self._status
        user, system, rss = self._rusage
        tree = self.cgroup.cpu_seconds()
        if tree is not None:  # the cgroup also counts processes wait4 never saw
            user, system = max(user, tree[0]), max(system, tree[1])
        peak = self.cgroup.memory_peak()
        if peak is not None:  # wait4's max RSS starts at the server's (module doc)
            rss = min(rss, peak)
        oom = self.cgroup.oom_killed()
        self.cgroup.remove()
        if not self._done.done():
            self._done.set_result(
                ExitInfo(
                    exit_code=exit_code,
                    signal=sig,
                    usage=Usage(user_cpu=user, system_cpu=system, max_rss_bytes=rss),
                    end_time=end_time,
                    oom_killed=oom,
                )
            )


class Supervisor:
    """Starts job processes in their cgroups with their files as stdio."""

    def __init__(
        self,
        backend: CgroupBackend,
        *,
        default_working_dir: str = "/",
        base_path: str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ) -> None:
        """A supervisor putting jobs into `backend`'s cgroups."""
        self.backend = backend
        self.default_working_dir = default_working_dir
        self.base_path = base_path
        self._home = _home()

    def environment(self, spec_env: Mapping[str, str]) -> dict[str, str]:
        """The job's environment: a minimal base (not the server's) plus the spec's."""
        env = {"PATH": self.base_path, "HOME": self._home, "LANG": "C.UTF-8"}
        env.update(spec_env)
        return env

    async def spawn(self, spec: JobSpec, limits: Limits, job_dir: Path, key: str) -> Process:
        """Start `spec` in cgroup `key` with its output in `job_dir`; SpawnError if it cannot.

        When this returns, the process is in its cgroups (or never ran user code).
        """
        process, gate = self._launch(spec, limits, job_dir, key)
        if gate < 0:
            return process
        try:
            failed = await _read_gate(gate)
        except BaseException:
            process.kill()  # cancelled: the pidfd reader still reaps and cleans up
            raise
        if failed:
            process.kill()
            await process.wait()
            raise SpawnError(failed.strip())
        return process

    def _launch(
        self, spec: JobSpec, limits: Limits, job_dir: Path, key: str
    ) -> tuple[Process, int]:
        """Check, open the files, make the cgroup, Popen; the process and its gate fd (or -1)."""
        if not spec.argv:
            raise SpawnError("empty argv")
        cwd = os.path.join(self.default_working_dir, spec.working_dir)
        _check_dir(cwd)
        env = self.environment(spec.env)
        resolved = resolve_executable(spec.argv[0], env.get("PATH", ""), cwd)
        job_dir = Path(os.path.abspath(job_dir))  # the exec chain reopens stderr by path
        stdio = _open_stdio(job_dir, spec.stdin)
        try:
            try:
                cgroup = self.backend.create(key, limits)
            except OSError as exc:
                raise SpawnError(f"cannot create cgroup {key}: {exc.strerror}") from exc
            argv0 = resolved if spec.argv[0].startswith("-") else spec.argv[0]
            argv = [argv0, *spec.argv[1:]]
            prefix = [PRLIMIT, *cgroup.rlimit_args, "--"] if cgroup.rlimit_args else []
            if not cgroup.procs_files:
                executable = PRLIMIT if prefix else resolved
                process = _popen(
                    [*prefix, *argv],
                    executable=executable,
                    cwd=cwd,
                    env=env,
                    stdio=stdio,
                    cgroup=cgroup,
                )
                return process, -1
            procs = [str(p) for p in cgroup.procs_files]
            args = [_SHELL, "-c", _JOIN_SCRIPT, "jobworker-job", str(job_dir / "stderr")]
            args += [*procs, "--", *prefix, *argv]
            gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(gate_r, False)
            try:
                gated = (stdio[0], stdio[1], gate_w)
                process = _popen(
                    args, executable=_SHELL, cwd=cwd, env=env, stdio=gated, cgroup=cgroup
                )
            except BaseException:
                os.close(gate_r)
                raise
            finally:
                os.close(gate_w)
            return process, gate_r
        finally:
            for fd in stdio:
                os.close(fd)


def _popen(
    args: list[str],
    *,
    executable: str,
    cwd: str,
    env: dict[str, str],
    stdio: tuple[int, int, int],
    cgroup: JobCgroup,
) -> Process:
    """Popen the way that keeps CPython on vfork+exec: no preexec_fn, user or groups."""
    try:
        popen = subprocess.Popen(
            args,
            executable=executable,
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
            cwd=cwd,
            env=env,
            close_fds=True,
            start_new_session=True,
        )
    except OSError as exc:
        cgroup.remove()
        raise SpawnError(f"cannot execute {executable}: {exc.strerror}") from exc
    except ValueError as exc:  # a NUL in argv or env, an "=" in an env name
        cgroup.remove()
        raise SpawnError(f"invalid argv or environment: {exc}") from exc
    except BaseException:
        cgroup.remove()
        raise
    return Process(popen, cgroup, time.time())


async def _read_gate(fd: int) -> str:
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


def _home() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return "/"


def _check_dir(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SpawnError(f"working directory not found: {path}") from None
    except OSError as exc:
        raise SpawnError(f"working directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SpawnError(f"not a directory: {path}")
    if not os.access(path, os.X_OK):
        raise SpawnError(f"permission denied: {path}")


def resolve_executable(name: str, path: str, cwd: str) -> str:
    """The file `name` runs as: searched in `path` (relative entries and a name with a slash
    taken relative to `cwd`), as execvp would; SpawnError naming it when there is none."""
    if "/" in name:
        candidate = os.path.join(cwd, name)
        problem = _unexecutable(candidate)
        if problem:
            raise SpawnError(f"{problem}: {name}")
        return candidate
    denied = ""
    for entry in path.split(":"):
        candidate = os.path.join(cwd, entry or ".", name)
        problem = _unexecutable(candidate)
        if not problem:
            return candidate
        if problem != "executable not found" and not denied:
            denied = f"{problem}: {candidate}"
    raise SpawnError(denied or f"executable not found: {name}")


def _unexecutable(path: str) -> str:
    """Why `path` cannot be executed, or "" when it can."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "executable not found"
    except OSError as exc:
        return exc.strerror or "cannot execute"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        return "permission denied"
    return ""


def _open_stdio(job_dir: Path, stdin: bytes) -> tuple[int, int, int]:
    """fds 0, 1, 2 for the job: its stdin file or /dev/null, and the appended log files."""
    job_dir.mkdir(parents=True, exist_ok=True)
    fds: list[int] = []
    try:
        if stdin:
            stdin_path = job_dir / "stdin"
            fd = os.open(stdin_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(stdin)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            fds.append(os.open(stdin_path, os.O_RDONLY | os.O_CLOEXEC))
        else:
            fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        for name in ("stdout", "stderr"):
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            fds.append(os.open(job_dir / name, flags, 0o644))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds[0], fds[1], fds[2]
