"""The Spawner: starts a job's process in its cgroups, with its files as stdio.

How a job starts (DESIGN.md, "Never fork the gRPC process the slow way"): subprocess.Popen
without preexec_fn/user/group, so CPython uses vfork+exec and gRPC's at-fork handlers never
run. The job must be in its cgroups before it runs a line of its own code. Two ways:

Forked in place (cgroup v1, the usual case there): the thread that forks moves itself, and
only itself, into the job's v1 groups (writes "0", itself, to each `tasks` file), forks,
and moves back (JobCgroup.thread_joined). A child is born in its parent thread's groups, so
the job never runs outside them, and there is no extra exec. Not for cgroup v2 (it moves
whole processes), nor for a job with a cpu or memory limit: the forking thread would be
throttled by the quota, or (on kernels whose memory-cgroup OOM killer scans threads)
mistaken for the culprit of an OOM during the exec. A pids limit is no obstacle: the
thread counts as one task for the moment it forks (only pids_max = 1 leaves no room).

Through a join shell (cgroup v2; cpu or memory limits): engine/chain.py.

Where a job is forked: on the event loop's own thread when that is not the process's main
thread (the supervisor runs its loop on a thread of its own, supervisor/run.py), since
cgroup v1 charges the process's memory to the memory group of its main thread, which must
never move; handing the fork to another thread costs more than it saves (ARCHITECTURE.md,
"Where the fork happens"). A loop on the main thread (tests, embedders), a job with stdin
bytes to write first, and a job of a Unix user not looked up in the last _ACCOUNT_TTL
seconds (NSS may be slow) use the spawn threads.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from jobworker.engine import exec_helper
from jobworker.engine.cgroups.backend import CgroupBackend
from jobworker.engine.cgroups.group import JobCgroup
from jobworker.engine.chain import JoinFailed, Prepared, join_shell, last_link, popen_job, read_gate
from jobworker.engine.checks import Account, check_dir, home_dir, resolve_executable
from jobworker.engine.executor import SpawnError
from jobworker.engine.running import Process, abandon
from jobworker.engine.stdio import open_stdio, why
from jobworker.model import JobSpec, Limits

_log = structlog.get_logger()

SPAWN_THREADS = 4  # jobs started at once when not forked on the loop's thread (module doc)
# How long _prepare trusts a working directory it checked and a command it resolved. A
# directory or command gone meanwhile fails the exec instead: the job is FAILED all the
# same, with "cannot execute PATH: No such file or directory" (the message names it too).
_CHECK_TTL = 1.0
_CHECK_CACHE_SIZE = 1024
_ACCOUNT_TTL = 10.0  # how long a looked-up Unix account (uid, groups, home) is trusted


class _PooledGroupGone(JoinFailed):
    """JoinFailed, in a pooled set of groups (Spawner._launch tries new ones)."""


# What _launch started: the child, its cgroup, its start ticks (None: read them from /proc)
# and the join shell's gate fd (-1 without one).
_Launched = tuple[subprocess.Popen[bytes], JobCgroup, int | None, int]

# Process-wide: cgroup v1 charges the process's memory to its main thread's groups.
_MAIN_THREAD = threading.main_thread()


def _exec_helper(wanted: str | bool) -> str | None:
    """Spawner's exec_helper: jobworker-exec's path, or None to drop through setpriv."""
    if wanted is not True:
        return wanted or None
    found = exec_helper.find()
    if found is None and os.geteuid() == 0:
        _log.warning(
            "exec_helper_missing",
            why=exec_helper.unusable(exec_helper.default_path()),
            effect="jobs as other users start through setpriv and env(1), slower",
            fix="python -m jobworker.engine.exec_helper (make build does it)",
        )
    return found


class Spawner:
    """Starts job processes in their cgroups with their files as stdio."""

    def __init__(
        self,
        backend: CgroupBackend,
        *,
        default_working_dir: str = "/",
        base_path: str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        shell: tuple[str, bool] | None = None,
        check_ttl: float = _CHECK_TTL,
        exec_helper: str | bool = True,
    ) -> None:
        """A spawner putting jobs into `backend`'s cgroups; `shell`: see join_shell();
        `check_ttl`: how long a checked directory or resolved command is trusted;
        `exec_helper`: jobworker-exec's path, True to look for it, False for setpriv."""
        self.backend = backend
        self.default_working_dir = default_working_dir
        self.base_path = base_path
        self.shell, self.shell_sees_env = shell or join_shell()
        self.exec_helper = _exec_helper(exec_helper)
        self._home = home_dir()
        self._pool = ThreadPoolExecutor(SPAWN_THREADS, thread_name_prefix="jobworker-spawn")
        try:  # the stdin of every job without one (one open and close less per job)
            self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self._pool.shutdown(wait=False)
            raise
        # Cleanups still under way, held here so that they run to their end and drain()
        # can wait for them: jobs whose cgroups are being removed (Process.released) and
        # cancelled spawns being undone (_abandon_launched).
        self._cleanups: set[asyncio.Future[None]] = set()
        # What _prepare found usable, until when (_CHECK_TTL): a batch of a thousand jobs
        # of one command checks its directory and searches its PATH once, not 1,000 times.
        self.check_ttl = check_ttl
        # By (working directory, uid or -1): until when.
        self._checked: dict[tuple[str, int], float] = {}
        # By (argv[0], PATH, working directory, uid or -1): (the path, until when).
        self._resolved: dict[tuple[str, str, str, int], tuple[str, float]] = {}
        # By user name: the account (None: no drop) and until when (account()).
        self._accounts: dict[str, tuple[Account | None, float]] = {}

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
                launched.add_done_callback(self._abandon_launched)
                raise
        try:
            process = Process(popen, cgroup, time.time(), ticks, releases=self._cleanups)
        except BaseException as exc:
            if gate >= 0:
                os.close(gate)
            await asyncio.shield(abandon(loop, popen, cgroup))
            if isinstance(exc, OSError):
                raise SpawnError(f"cannot watch the job's process: {why(exc)}") from exc
            raise
        if gate < 0:
            return process
        try:
            failed = await read_gate(gate)
        except BaseException:
            process.kill()  # cancelled: the pidfd reader still reaps and cleans up
            raise
        if failed:
            process.kill()
            await process.wait()
            await process.released()
            raise SpawnError(failed.strip())
        return process

    def adopt(self, pid: int, start_ticks: int, start_time: float, cgroup: JobCgroup) -> Process:
        """Watch a child this process did not spawn here (kept across the supervisor's
        re-exec); OSError when it cannot be watched."""
        return Process(None, cgroup, start_time, start_ticks, releases=self._cleanups, pid=pid)

    async def drain(self) -> None:
        """Wait until every ended job's cgroups are removed (or given up on): at shutdown,
        before the backend removes its parent groups."""
        loop = asyncio.get_running_loop()
        pending = [f for f in self._cleanups if f.get_loop() is loop]
        if pending:
            await asyncio.wait(pending)

    def close(self) -> None:
        """Stop the spawn threads and close /dev/null (at shutdown, once no job is being
        started; one without stdin started later fails with SpawnError)."""
        self._pool.shutdown(wait=True)
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1

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
    ) -> Prepared:
        """Check the command and directory (as `user` sees them when the job drops to it),
        open the job's files (on the loop's thread or a spawn thread)."""
        if not spec.argv:
            raise SpawnError("empty argv")
        cwd = os.path.join(self.default_working_dir, spec.working_dir)
        now = time.monotonic()
        who = self.account(user, now)
        uid = who.uid if who is not None else -1
        if self._checked.get((cwd, uid), 0.0) < now:
            check_dir(cwd, who)
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
        last, block = last_link(spec, cwd, env, who, self.exec_helper) if who else ((), None)
        stdio = open_stdio(job_dir, spec.stdin, self._devnull, stdin_file)
        return Prepared(cwd, env, found[0], job_dir, stdio, last, block)

    def account(self, user: str, now: float | None = None) -> Account | None:
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
        who: Account | None = None
        if entry.pw_uid != os.geteuid():
            groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
            who = Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)
        if len(self._accounts) >= _CHECK_CACHE_SIZE:
            self._accounts.clear()
        self._accounts[user] = (who, now + _ACCOUNT_TTL)
        return who

    def account_known(self, user: str) -> bool:
        """True when account(user) needs no lookup now (spawn() may fork on the loop)."""
        cached = self._accounts.get(user)
        return not user or (cached is not None and cached[1] >= time.monotonic())

    def _launch(self, spec: JobSpec, limits: Limits, key: str, prepared: Prepared) -> _Launched:
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
                if fd != self._devnull:  # shared by every job without stdin, kept open
                    os.close(fd)

    def _launch_once(
        self, spec: JobSpec, limits: Limits, key: str, prepared: Prepared
    ) -> _Launched:
        """_launch's one attempt: _PooledGroupGone when a pooled group could not be joined."""
        try:
            cgroup = self.backend.create(key, limits)
        except OSError as exc:
            raise SpawnError(f"cannot create cgroup {key}: {why(exc)}") from exc
        pooled = cgroup.slot is not None
        try:
            popen, ticks, gate = popen_job(spec, cgroup, prepared, self.shell, self.shell_sees_env)
        except BaseException as exc:
            if cgroup.by_thread:  # a child was born in it and failed to exec (reaped):
                cgroup.remove_blocking(timeout=1.0)  # v1 may say busy for a moment
            else:
                cgroup.remove()  # nothing ever joined it: never busy
            if pooled and isinstance(exc, JoinFailed):
                raise _PooledGroupGone(f"{exc.message} (pooled groups {cgroup.name})") from exc
            raise
        return popen, cgroup, ticks, gate

    def _abandon_launched(self, launched: asyncio.Future[_Launched]) -> None:
        """spawn() was cancelled while its thread started the job: stop what it started."""
        if launched.cancelled() or launched.exception() is not None:
            return  # nothing was left: _launch cleans up its own failures
        popen, cgroup, _, gate = launched.result()
        if gate >= 0:
            os.close(gate)
        self._cleanups.add(abandoned := abandon(asyncio.get_running_loop(), popen, cgroup))
        abandoned.add_done_callback(self._cleanups.discard)
