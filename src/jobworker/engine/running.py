"""A running job: watch its main process, reap it, stop or kill its tree, release its groups.

Reaped through a pidfd on the event loop, since os.wait4 gives the rusage asyncio's child
watchers do not. Nothing here sleeps on the loop: a v1 group is often busy a moment after
its last process exited, so its removal is retried from loop callbacks, after the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable

import structlog

from jobworker.engine.cgroups.backend import CgroupBackend
from jobworker.engine.cgroups.group import JobCgroup
from jobworker.engine.executor import ExitInfo
from jobworker.model import Usage

_log = structlog.get_logger()

_LEFTOVER_POLL = 0.005  # seconds between checks that a killed job's cgroup emptied
_LEFTOVER_TIMEOUT = 5.0
_REMOVE_FIRST_RETRY = 0.005  # seconds until a busy cgroup's removal is retried, doubling...
_REMOVE_MAX_RETRY = 0.1  # ...up to this
_REMOVE_TIMEOUT = 5.0  # then cgroup_remove_failed is logged and the group left behind


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
            group.remove_blocking(timeout=1.0)  # runs in a thread (Scheduler.recover)
    return killed


def ticks_between(before_ns: int, after_ns: int) -> int | None:
    """The start time /proc/<pid>/stat gives a process forked between two CLOCK_BOOTTIME
    readings (the kernel's start_boottime in clock ticks, rounded down), when both fall
    in the same tick; None when a tick boundary lies between them."""
    tick = before_ns // _TICK_NS
    return tick if after_ns // _TICK_NS == tick else None


class Process:
    """A running job: its main process, its cgroup, and the single result of its end."""

    # Slots: one of these per running job, in the supervisor (memory_per_running_job).
    __slots__ = (
        "_deadline", "_done", "_loop", "_pidfd", "_reaped", "_released",
        "_rusage", "_status", "_timer", "cgroup", "pid", "pid_start", "start_time",
    )  # fmt: skip

    def __init__(
        self,
        popen: subprocess.Popen[bytes] | None,
        cgroup: JobCgroup,
        start_time: float,
        start_ticks: int | None = None,
        *,
        releases: set[asyncio.Future[None]] | None = None,
        pid: int = 0,
    ) -> None:
        """Watch `popen` through a pidfd; Spawner.spawn makes these. On OSError nothing is
        open.

        `start_ticks`: the process's start time as /proc/<pid>/stat gives it, when the
        caller knows it (chain.popen, from the clock around the fork: cheaper than a /proc
        read while the child is still in its exec); else it is read here.
        `releases`: a set that holds the future of released() until it resolves (the
        Spawner's, which drain() waits for). `popen` None: a child this process did not
        Popen (the supervisor's, kept across its re-exec), given by `pid`.
        """
        self.pid = popen.pid if popen is not None else pid
        if start_ticks is None:
            start_ticks = process_start_ticks(self.pid) or 0
        self.pid_start = start_ticks
        self.start_time = start_time
        self.cgroup = cgroup
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[ExitInfo] = self._loop.create_future()
        self._released: asyncio.Future[None] = self._loop.create_future()
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
        if releases is not None:  # only now: unwatched, _released would never resolve
            releases.add(self._released)
            self._released.add_done_callback(releases.discard)
        if popen is not None:
            # Reaped here from now on, by wait4 on the pidfd: the Popen must never wait for
            # (or, from its finalizer, reap) that pid again, and is not kept (memory per job).
            popen.returncode = 0

    @property
    def ended(self) -> bool:
        """True once the job's result is known (what wait() returns)."""
        return self._done.done()

    async def wait(self) -> ExitInfo:
        """The job's end, once it has ended and nothing of it is left; same result for all."""
        return await asyncio.shield(self._done)

    def on_end(self, callback: Callable[[ExitInfo], None]) -> None:
        """Call `callback` with what wait() returns, once the job has ended."""
        self._done.add_done_callback(lambda done: callback(done.result()))

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
        if peak is not None:  # wait4's max RSS starts at the parent's peak (ARCHITECTURE.md)
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


def abandon(
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
