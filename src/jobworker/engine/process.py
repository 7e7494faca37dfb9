"""The supervisor of job processes: spawn into cgroups without forking gRPC, reap, stop, kill.

How a job starts (DESIGN.md, "Never fork the gRPC process the slow way"): subprocess.Popen
without preexec_fn/user/group, so CPython uses vfork+exec and gRPC's at-fork handlers never
run. The job must be in its cgroups before it runs a line of its own code. Two ways:

Forked in place (cgroup v1, the usual case there): the thread that forks moves itself, and
only itself, into the job's v1 groups (writes "0", itself, to each `tasks` file), forks,
and moves back (JobCgroup.thread_joined). A child is born in its parent thread's groups, so the job
never runs outside them, and there is no extra exec. Not for cgroup v2 (it moves whole
processes), nor for a job with a cpu or memory limit: the forking thread would be
throttled by the quota, or (on kernels whose memory-cgroup OOM killer scans threads)
mistaken for the culprit of an OOM during the exec. A pids limit is no obstacle: the
thread counts as one task for the moment it forks (only pids_max = 1 leaves no room).

Through a join shell (cgroup v2; cpu or memory limits): a short exec chain

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

Running as another user (jobs.run_as; "nobody" by default when the server is root): the
exec chain ends in a last link, _last_link(), that holds everything the client controls:

    [join shell ... --] [prlimit ARGS --] setpriv --reuid=U --regid=G --groups=... --
        env -i --chdir=DIR -- NAME=VALUE... argv

Every step before env(1) runs as root, so none of them gets a byte of the job's: they run
with a fixed environment (_FIXED_ENV) in "/" (Popen's cwd), and by absolute paths. setpriv
drops to the user only after the job is in its cgroups; env(1), as the user, empties the
environment, enters the job's working directory (a folder the user may not enter fails
there, as it should, never read as root), sets the job's variables and execs argv, which
it searches in the job's PATH. GNU env reads options up to "--"; after it, words with "="
are variables and the first without is the command (even "-x"). An argv[0] with "=" cannot
be told from a variable: refused. The job's variables show in the chain's argv
(/proc/<pid>/cmdline) for the milliseconds until its exec. spawn() checks the directory
and the command beforehand as the user would see them (mode bits), for a clear message.

Which shell joins, and what environment it sees, when the job runs as the server's own
user (no drop: the server is not root, or the config says "root"): the join shell runs
before the job is in its cgroups. bash imports functions (BASH_FUNC_echo%%=...) and
options (SHELLOPTS) from its environment, even as sh; dash imports neither (nor IFS; the
script quotes everything anyway), so with dash the shell gets the job's environment and
its exec hands it on at no extra cost. join_shell() decides once, at startup: /bin/sh if
it resolves to dash, else /bin/dash or /usr/bin/dash. Only on a host without dash does the
shell get a fixed environment and exec `/usr/bin/env -i NAME=VALUE... command`. (Such a
job has the server's own rights anyway: it runs as root only where the config says so.)

Max RSS: wait4's ru_maxrss of a child started from the server begins at the server's own
peak RSS (at exec the kernel folds the old mm's high-water mark, here the vfork parent's,
into the child's). Where the job's memory is accounted by a cgroup (it has a memory limit,
or cgroup v2 with the memory controller) the figure is capped by the group's peak;
otherwise it is an upper bound that can be the server's RSS.

Where a job is forked: on the event loop's own thread when that is not the process's main
thread (`jobworker serve` runs its loop on a thread of its own, server/app.py), since cgroup
v1 charges the process's memory to the memory group of its main thread, which must never
move. The checks, file opens, cgroup mkdirs and the vfork (the loop waits until the child
has exec'd, ~0.1-0.3 ms) cost less there than handing them to a thread: each GIL handover
between threads is a futex wake and two context switches, and they cost more than the work
(measured: server CPU per job 2.1 ms inline against 3.3 ms through the spawn threads). A
loop on the main thread (tests, embedders), a job with stdin bytes to write first, and a
job of a Unix user not looked up in the last _ACCOUNT_TTL seconds (NSS may be slow) use
the spawn threads.

Reaping uses a pidfd watched by the event loop (no threads, no asyncio child watcher);
os.wait4 gives the status and rusage. The job's result does not wait for its cgroups to be
removed: a v1 group is often busy for a moment after its last process exited, so removal is
retried from loop callbacks (Process.released() waits for it). Nothing here sleeps on the
event loop; the job's files are prepared (stdin written) in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from jobworker.engine.cgroups.backend import PRLIMIT, CgroupBackend
from jobworker.engine.cgroups.group import JobCgroup
from jobworker.engine.executor import ExitInfo, SpawnError
from jobworker.model import JobSpec, Limits, Usage

_log = structlog.get_logger()

SETPRIV = "/usr/bin/setpriv"  # util-linux: drops to a job's Unix user after it joined its cgroups

_SH = "/bin/sh"
_DASH = ("/bin/dash", "/usr/bin/dash")
_ENV = "/usr/bin/env"
# The environment of every step that runs before the job's own (module doc): the server's.
_FIXED_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
# $1: the job's stderr file; then cgroup.procs files; "--"; the command. Until the exec, fd 2
# is the gate pipe: whatever reaches it is a failure; the exec swaps in the real stderr.
_JOIN_SCRIPT = (
    'e="$1"; shift; for f; do [ "$f" = -- ] && break; '
    'echo "$$" 2>/dev/null >"$f" || { printf "cannot join cgroup: %s" "$f" >&2; exit 125; }; '
    "shift; done; "
    'shift; exec "$@" 2>>"$e"'
)
SPAWN_THREADS = 4  # jobs started at once when not forked on the loop's thread (module doc)
# How long _prepare trusts a working directory it checked and a command it resolved. A
# directory or command gone meanwhile fails the exec instead: the job is FAILED all the
# same, with "cannot execute PATH: No such file or directory" (the message names it too).
_CHECK_TTL = 1.0
_CHECK_CACHE_SIZE = 1024
_ACCOUNT_TTL = 10.0  # how long a looked-up Unix account (uid, groups, home) is trusted
_LEFTOVER_POLL = 0.005  # seconds between checks that a killed job's cgroup emptied
_LEFTOVER_TIMEOUT = 5.0
_REMOVE_FIRST_RETRY = 0.005  # seconds until a busy cgroup's removal is retried, doubling...
_REMOVE_MAX_RETRY = 0.1  # ...up to this
_REMOVE_TIMEOUT = 5.0  # then cgroup_remove_failed is logged and the group left behind


class _JoinFailed(SpawnError):
    """The forking thread could not move into the job's groups: nothing was started."""


class _PooledGroupGone(_JoinFailed):
    """_JoinFailed, in a pooled set of groups (Supervisor._launch tries new ones)."""


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


_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")  # /proc/<pid>/stat's start time unit


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat), or None."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
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
            group.remove_blocking(timeout=1.0)  # runs in a thread (Engine.recover)
    return killed


def _ticks_between(before_ns: int, after_ns: int) -> int | None:
    """The start time /proc/<pid>/stat gives a process forked between two CLOCK_BOOTTIME
    readings (the kernel's start_boottime in clock ticks, rounded down), when both fall
    in the same tick; None when a tick boundary lies between them."""
    tick = before_ns // _TICK_NS
    return tick if after_ns // _TICK_NS == tick else None


class Process:
    """A running job: its main process, its cgroup, and the single result of its end."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        cgroup: JobCgroup,
        start_time: float,
        start_ticks: int | None = None,
    ) -> None:
        """Watch `popen` through a pidfd; spawn() makes these. On OSError nothing is open.

        `start_ticks`: the process's start time as /proc/<pid>/stat gives it, when the
        caller knows it (_popen, from the clock around the fork: a /proc read costs ~40 us
        on the loop, while the child is still in its exec); else it is read here.
        """
        self.pid = popen.pid
        if start_ticks is None:
            start_ticks = process_start_ticks(self.pid) or 0
        self.pid_start = start_ticks
        self.start_time = start_time
        self.cgroup = cgroup
        self._popen = popen
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[ExitInfo] = self._loop.create_future()
        self._released: asyncio.Future[None] = self._loop.create_future()
        _RELEASING.add(self._released)
        self._released.add_done_callback(_RELEASING.discard)
        self._reaped = False
        self._status: tuple[int | None, int, float] = (None, 0, 0.0)  # exit code, signal, end
        self._rusage: tuple[float, float, int] = (0.0, 0.0, 0)  # user, system, max rss
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._pidfd = os.pidfd_open(self.pid)
        try:
            self._loop.add_reader(self._pidfd, self._on_exit)
        except BaseException:
            os.close(self._pidfd)
            raise

    @property
    def ended(self) -> bool:
        """True once the job's result is known (what wait() returns)."""
        return self._done.done()

    async def wait(self) -> ExitInfo:
        """The job's end, once it has ended and nothing of it is left; same result for all."""
        return await asyncio.shield(self._done)

    async def released(self) -> None:
        """Once the job has ended and its cgroups are removed (or given up on, logged)."""
        await asyncio.shield(self._released)

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
        """Once the cgroup is empty (or after a timeout): usage, OOM, resolve, then remove."""
        self._timer = None
        # An empty cgroup stays empty (nothing can join it but by our writes): no kill needed.
        if self.cgroup.populated() and time.monotonic() < self._deadline:
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
        # Read above, so the result never waits for the rmdir (retried from callbacks).
        _release(self._loop, self.cgroup, self._released)
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


def _release(
    loop: asyncio.AbstractEventLoop,
    cgroup: JobCgroup,
    done: asyncio.Future[None],
    delay: float = _REMOVE_FIRST_RETRY,
    deadline: float | None = None,
) -> None:
    """Remove `cgroup` without blocking: busy groups are retried from loop callbacks, with
    a growing delay, up to _REMOVE_TIMEOUT; then logged. `done` resolves at the end."""
    busy = cgroup.remove()
    if deadline is None:
        deadline = time.monotonic() + _REMOVE_TIMEOUT
    if busy and time.monotonic() < deadline:
        next_delay = min(delay * 2, _REMOVE_MAX_RETRY)
        loop.call_later(delay, _release, loop, cgroup, done, next_delay, deadline)
        return
    if busy:
        _log.warning("cgroup_remove_failed", key=cgroup.key, paths=list(busy), error="busy")
    if not done.done():
        done.set_result(None)


def _abandon(
    loop: asyncio.AbstractEventLoop, popen: subprocess.Popen[bytes], cgroup: JobCgroup
) -> asyncio.Future[None]:
    """Kill a child spawn() cannot watch, reap it and remove its cgroup, all from loop
    callbacks (no sleeping, and done even if the caller is cancelled); resolves when done."""
    done: asyncio.Future[None] = loop.create_future()
    deadline = time.monotonic() + _LEFTOVER_TIMEOUT
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)  # unreaped: the group id is still the job's

    def step() -> None:
        cgroup.kill()
        reaped = popen.poll() is not None  # waitpid(WNOHANG)
        if not reaped and time.monotonic() < deadline:
            loop.call_later(_LEFTOVER_POLL, step)
            return
        if not reaped:  # Popen's finalizer reaps it at a later Popen
            _log.warning("job_not_reaped", pid=popen.pid)
        _release(loop, cgroup, done)

    step()
    return done


# What _launch started: the child, its cgroup, its start ticks (None: read them from /proc)
# and the join shell's gate fd (-1 without one).
_Launched = tuple[subprocess.Popen[bytes], JobCgroup, int | None, int]


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What spawn() checked and opened before making the cgroup."""

    cwd: str
    env: dict[str, str]
    resolved: str  # argv[0] resolved against the job's PATH
    job_dir: Path  # absolute
    stdio: tuple[int, int, int]
    # setpriv ... -- env ... argv (_last_link) when the job runs as another user, else ()
    last: tuple[str, ...] = ()


class Supervisor:
    """Starts job processes in their cgroups with their files as stdio."""

    def __init__(
        self,
        backend: CgroupBackend,
        *,
        default_working_dir: str = "/",
        base_path: str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        shell: tuple[str, bool] | None = None,
        check_ttl: float = _CHECK_TTL,
    ) -> None:
        """A supervisor putting jobs into `backend`'s cgroups; `shell`: see join_shell();
        `check_ttl`: how long a checked directory or resolved command is trusted."""
        self.backend = backend
        self.default_working_dir = default_working_dir
        self.base_path = base_path
        self.shell, self.shell_sees_env = shell or join_shell()
        self._home = _home()
        self._pool = ThreadPoolExecutor(SPAWN_THREADS, thread_name_prefix="jobworker-spawn")
        # What _prepare found usable, until when (_CHECK_TTL): a batch of a thousand jobs
        # of one command checks its directory and searches its PATH once, not 1,000 times.
        self.check_ttl = check_ttl
        # By (working directory, uid or -1): until when.
        self._checked: dict[tuple[str, int], float] = {}
        # By (argv[0], PATH, working directory, uid or -1): (the path, until when).
        self._resolved: dict[tuple[str, str, str, int], tuple[str, float]] = {}
        # By user name: the account (None: no drop) and until when (account()).
        self._accounts: dict[str, tuple[_Account | None, float]] = {}

    def environment(self, spec_env: Mapping[str, str]) -> dict[str, str]:
        """The job's environment: a minimal base (not the server's) plus the spec's."""
        env = {"PATH": self.base_path, "HOME": self._home, "LANG": "C.UTF-8"}
        env.update(spec_env)
        return env

    async def spawn(
        self,
        spec: JobSpec,
        limits: Limits,
        job_dir: Path,
        key: str,
        user: str = "",
        *,
        stdin_file: bool = True,
    ) -> Process:
        """Start `spec` in cgroup `key` with its output in `job_dir`, as Unix `user` ("": the
        server's own); SpawnError if it cannot. `stdin_file`: False when the job's folder
        holds no stdin file (the store knows): it reads /dev/null without looking.

        When this returns, the process is in its cgroups (or never ran user code). On any
        failure nothing is left: no fd, no cgroup, no process.
        """
        loop = asyncio.get_running_loop()
        if (
            not spec.stdin
            and self.account_known(user)
            and threading.current_thread() is not _MAIN_THREAD
        ):
            # On the loop's own thread (module doc, "Where a job is forked"): a few file
            # system calls and a vfork, cheaper than handing the work to a thread. (Not
            # with stdin bytes to write, nor a user to look up: NSS may be slow.)
            popen, cgroup, ticks, gate = self._start(spec, limits, job_dir, key, user, stdin_file)
        else:
            launched = loop.run_in_executor(
                self._pool, self._start, spec, limits, job_dir, key, user, stdin_file
            )
            try:
                popen, cgroup, ticks, gate = await asyncio.shield(launched)
            except asyncio.CancelledError:
                launched.add_done_callback(_abandon_launched)
                raise
        try:
            process = Process(popen, cgroup, time.time(), ticks)
        except BaseException as exc:
            if gate >= 0:
                os.close(gate)
            await asyncio.shield(_abandon(loop, popen, cgroup))
            if isinstance(exc, OSError):
                raise SpawnError(f"cannot watch the job's process: {_why(exc)}") from exc
            raise
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
            await process.released()
            raise SpawnError(failed.strip())
        return process

    async def drain(self) -> None:
        """Wait until every ended job's cgroups are removed (or given up on): at shutdown,
        before the backend removes its parent groups."""
        loop = asyncio.get_running_loop()
        pending = [f for f in _RELEASING | _ABANDONED if f.get_loop() is loop]
        if pending:
            await asyncio.wait(pending)

    def close(self) -> None:
        """Stop the spawn threads (at shutdown, once no job is being started)."""
        self._pool.shutdown(wait=True)

    def _start(
        self,
        spec: JobSpec,
        limits: Limits,
        job_dir: Path,
        key: str,
        user: str,
        stdin_file: bool = True,
    ) -> _Launched:
        """prepare and launch (on the loop's thread or a spawn thread)."""
        return self._launch(spec, limits, key, self._prepare(spec, job_dir, user, stdin_file))

    def _prepare(
        self, spec: JobSpec, job_dir: Path, user: str = "", stdin_file: bool = True
    ) -> _Prepared:
        """Check the command and directory (as `user` sees them when the job drops to it),
        open the job's files (on the loop's thread or a spawn thread)."""
        if not spec.argv:
            raise SpawnError("empty argv")
        cwd = os.path.join(self.default_working_dir, spec.working_dir)
        now = time.monotonic()
        who = self.account(user, now)
        uid = who.uid if who is not None else -1
        if self._checked.get((cwd, uid), 0.0) < now:
            _check_dir(cwd, who)
            if len(self._checked) >= _CHECK_CACHE_SIZE:
                self._checked.clear()
            self._checked[(cwd, uid)] = now + self.check_ttl
        if who is not None:
            env = self.environment({"HOME": who.home, "USER": who.name, "LOGNAME": who.name})
            env.update(spec.env)
        else:
            env = self.environment(spec.env)
        search = (spec.argv[0], env.get("PATH", ""), cwd, uid)
        found = self._resolved.get(search)
        if found is None or found[1] < now:
            if len(self._resolved) >= _CHECK_CACHE_SIZE:
                self._resolved.clear()
            resolved = resolve_executable(spec.argv[0], search[1], cwd, who)
            found = self._resolved[search] = (resolved, now + self.check_ttl)
        if not job_dir.is_absolute():  # the exec chain reopens stderr by path
            job_dir = Path(os.path.abspath(job_dir))
        last = _last_link(spec, cwd, env, who) if who is not None else ()
        stdio = _open_stdio(job_dir, spec.stdin, stdin_file)
        return _Prepared(cwd, env, found[0], job_dir, stdio, last)

    def account(self, user: str, now: float | None = None) -> _Account | None:
        """The Unix account a job of `user` drops to, or None when it runs as the server's
        own (user "" or the server's own uid, root when the config says "root"). Looked up
        at most once per _ACCOUNT_TTL; SpawnError when there is no such user."""
        if not user:
            return None
        if now is None:
            now = time.monotonic()
        cached = self._accounts.get(user)
        if cached is not None and cached[1] >= now:
            return cached[0]
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise SpawnError(f"no Unix user {user!r} on this host (jobs.run_as)") from None
        who: _Account | None = None
        if entry.pw_uid != os.geteuid():
            groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
            who = _Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)
        if len(self._accounts) >= _CHECK_CACHE_SIZE:
            self._accounts.clear()
        self._accounts[user] = (who, now + _ACCOUNT_TTL)
        return who

    def account_known(self, user: str) -> bool:
        """True when account(user) needs no lookup now (spawn() may fork on the loop)."""
        cached = self._accounts.get(user)
        return not user or (cached is not None and cached[1] >= time.monotonic())

    def _launch(self, spec: JobSpec, limits: Limits, key: str, prepared: _Prepared) -> _Launched:
        """Make the cgroup and Popen: the child, its cgroup, its start ticks, the gate fd
        (-1: none).

        Always closes the stdio fds; on failure also removes the cgroup (no child is left).
        """
        try:
            try:
                return self._launch_once(spec, limits, key, prepared)
            except _PooledGroupGone as exc:
                # Removed from outside the server while it waited in the pool; nothing was
                # started. The other free ones may be gone too: again, in new groups.
                _log.warning("cgroup_pool_group_gone", error=exc.message)
                self.backend.drop_pool()
                return self._launch_once(spec, limits, key, prepared)
        finally:
            for fd in prepared.stdio:
                if fd != _DEVNULL.fd:  # shared by every job without stdin, never closed
                    os.close(fd)

    def _launch_once(
        self, spec: JobSpec, limits: Limits, key: str, prepared: _Prepared
    ) -> _Launched:
        """_launch's one attempt: _PooledGroupGone when a pooled group could not be joined."""
        try:
            cgroup = self.backend.create(key, limits)
        except OSError as exc:
            raise SpawnError(f"cannot create cgroup {key}: {_why(exc)}") from exc
        pooled = cgroup.slot is not None
        try:
            popen, ticks, gate = self._popen_joining(spec, cgroup, prepared)
        except BaseException as exc:
            if cgroup.by_thread:  # a child was born in it and failed to exec (reaped):
                cgroup.remove_blocking(timeout=1.0)  # v1 may say busy for a moment
            else:
                cgroup.remove()  # nothing ever joined it: never busy
            if pooled and isinstance(exc, _JoinFailed):
                raise _PooledGroupGone(f"{exc.message} (pooled groups {cgroup.name})") from exc
            raise
        return popen, cgroup, ticks, gate

    def _popen_joining(
        self, spec: JobSpec, cgroup: JobCgroup, prepared: _Prepared
    ) -> tuple[subprocess.Popen[bytes], int | None, int]:
        """Popen the job (through the join shell when it has cgroups); its start ticks when
        known (_popen) and the gate fd or -1."""
        cwd, env, resolved, stdio = prepared.cwd, prepared.env, prepared.resolved, prepared.stdio
        argv0 = resolved if spec.argv[0].startswith("-") else spec.argv[0]
        prefix = [PRLIMIT, *cgroup.rlimit_args, "--"] if cgroup.rlimit_args else []
        if prepared.last:  # dropped to the job's user in the last link: every step before
            command = [*prefix, *prepared.last]  # it runs where and with what we choose
            cwd, env = "/", dict(_FIXED_ENV)
        else:
            command = [*prefix, argv0, *spec.argv[1:]]
        if not cgroup.procs_files or cgroup.by_thread:  # no join step
            executable = command[0] if prefix or prepared.last else resolved
            if cgroup.by_thread:
                try:
                    with cgroup.thread_joined():  # the child is born in the job's groups
                        return *_popen(command, executable, cwd, env, stdio), -1
                except OSError as exc:  # the thread could not join: nothing was started
                    raise _JoinFailed(f"cannot join cgroup {cgroup.key}: {_why(exc)}") from exc
            return *_popen(command, executable, cwd, env, stdio), -1
        shell_env = env
        if not prepared.last and not self.shell_sees_env:  # no dash (module doc)
            if "=" in argv0:  # env(1) would take it for an assignment
                argv0 = resolved
            command = [_ENV, "-i", *_assignments(env), *prefix, argv0, *spec.argv[1:]]
            shell_env = dict(_FIXED_ENV)
        procs = [str(p) for p in cgroup.procs_files]
        args = [self.shell, "-c", _JOIN_SCRIPT, "jobworker-job", str(prepared.job_dir / "stderr")]
        args += [*procs, "--", *command]
        try:
            gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            raise SpawnError(f"cannot create a pipe for the job: {_why(exc)}") from exc
        try:
            os.set_blocking(gate_r, False)
            popen, ticks = _popen(args, self.shell, cwd, shell_env, (stdio[0], stdio[1], gate_w))
        except BaseException:
            os.close(gate_r)
            raise
        finally:
            os.close(gate_w)
        return popen, ticks, gate_r


@dataclass(frozen=True, slots=True)
class _Account:
    """A Unix user a job drops to (Supervisor.account)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary, as initgroups(3) would set them
    home: str


def _last_link(spec: JobSpec, cwd: str, env: Mapping[str, str], who: _Account) -> tuple[str, ...]:
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


def _popen(
    args: list[str],
    executable: str,
    cwd: str,
    env: dict[str, str],
    stdio: tuple[int, int, int],
) -> tuple[subprocess.Popen[bytes], int | None]:
    """Popen the way that keeps CPython on vfork+exec: no preexec_fn, user or groups; the
    child and its start time in clock ticks when the clock tells it (_ticks_between)."""
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
            start_new_session=True,
        )
        return popen, _ticks_between(before, time.clock_gettime_ns(time.CLOCK_BOOTTIME))
    except OSError as exc:
        if exc.filename is None:  # the parent's side failed (its pipe: EMFILE, ENFILE)
            raise SpawnError(f"cannot start the job: {_why(exc)}") from exc
        if exc.filename == cwd:  # the child's chdir (the directory went since _prepare)
            raise SpawnError(f"working directory {cwd}: {_why(exc)}") from exc
        raise SpawnError(f"cannot execute {executable}: {_why(exc)}") from exc
    except ValueError as exc:  # a NUL in argv or env, an "=" in an env name
        raise SpawnError(f"invalid argv or environment: {exc}") from exc


def _abandon_launched(
    launched: asyncio.Future[_Launched],
) -> None:
    """spawn() was cancelled while its thread started the job: stop what it started."""
    if launched.cancelled() or launched.exception() is not None:
        return  # nothing was left: _launch cleans up its own failures
    popen, cgroup, _, gate = launched.result()
    if gate >= 0:
        os.close(gate)
    _ABANDONED.add(abandoned := _abandon(asyncio.get_running_loop(), popen, cgroup))
    abandoned.add_done_callback(_ABANDONED.discard)


_MAIN_THREAD = threading.main_thread()

# Cleanups of cancelled spawns, held here so that they run to their end.
_ABANDONED: set[asyncio.Future[None]] = set()
# Jobs whose cgroups are still being removed (Supervisor.drain waits for them).
_RELEASING: set[asyncio.Future[None]] = set()


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


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


def _check_dir(path: str, who: _Account | None = None) -> None:
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


def _blocked(path: str, who: _Account, *, is_dir: bool) -> bool:
    """True when `who` may not search one of the folders on the way to `path` (symlinks
    resolved), nor `path` itself when `is_dir`. Mode bits only, as the kernel reads them
    for a user (owner, else group, else other): a check before the start, so that the
    message is clear; the kernel decides in the end. A folder that is not there, or is
    not a folder, blocks nothing here (the caller's stat says what is wrong)."""
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


def _may(st: os.stat_result, who: _Account, bits: int) -> bool:
    """Whether the mode bits of `st` grant `who` every one of `bits` (4 r, 2 w, 1 x)."""
    if st.st_uid == who.uid:
        mode = st.st_mode >> 6
    elif st.st_gid == who.gid or st.st_gid in who.groups:
        mode = st.st_mode >> 3
    else:
        mode = st.st_mode
    return mode & bits == bits


def resolve_executable(name: str, path: str, cwd: str, who: _Account | None = None) -> str:
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


def _unexecutable(path: str, who: _Account | None = None) -> str:
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


def _open_stdio(job_dir: Path, stdin: bytes, stdin_file: bool = True) -> tuple[int, int, int]:
    """fds 0, 1, 2 for the job: its stdin file or /dev/null, and the appended log files.

    `stdin` bytes are written to the job's stdin file first (callers other than the
    store, which has written the file already, pass them); else the stdin file is read
    if there is one (`stdin_file` False: there is none), else /dev/null (one fd shared
    by all jobs: _DEVNULL). The folder is usually made ahead by the store (make_folders);
    made here when it is not there yet.

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
                fds.insert(0, _DEVNULL.get())
            except OSError as exc:
                raise SpawnError(f"cannot open {source} for the job: {_why(exc)}") from exc
    except BaseException:
        for fd in fds:
            if fd != _DEVNULL.fd:
                os.close(fd)
        raise
    return fds[0], fds[1], fds[2]


class _DevNull:
    """One read-only fd of /dev/null for this process, opened at first use, never closed:
    the stdin of every job that has none (one open and close less per job)."""

    def __init__(self) -> None:
        self.fd = -1
        self._lock = threading.Lock()

    def get(self) -> int:
        if self.fd < 0:
            with self._lock:
                if self.fd < 0:
                    try:
                        self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                    except OSError as exc:
                        raise SpawnError(
                            f"cannot open {os.devnull} for the job: {_why(exc)}"
                        ) from exc
        return self.fd


_DEVNULL = _DevNull()


def _open_log(job_dir: Path, name: str) -> int:
    """The job's log file `name`, opened for appending (its folder made when missing)."""
    path = f"{job_dir}/{name}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except (FileNotFoundError, NotADirectoryError):  # no folder (or a file in the way)
        try:
            job_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SpawnError(f"cannot create the job directory {job_dir}: {_why(exc)}") from exc
    except OSError as exc:
        raise SpawnError(f"cannot open {name} for the job: {path}: {_why(exc)}") from exc
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        raise SpawnError(f"cannot open {name} for the job: {path}: {_why(exc)}") from exc


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
        raise SpawnError(f"cannot write stdin for the job to {path}: {_why(exc)}") from exc
