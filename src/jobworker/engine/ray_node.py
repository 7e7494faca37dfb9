"""What runs on a Ray cluster's nodes: a job's task and each node's agent.

Only the standard library and ray: the bridge pickles this module by value
(cloudpickle.register_pickle_by_value), so a node needs Ray, not jobworker.

A job's task starts the job's argv in its own session with pipes as stdout and stderr and
yields, in order: ("started", info) or ("failed", message); then ("o" | "e", bytes) as the
job writes them; then ("ended", info). Each node's agent (a detached actor, one per node)
signals a job's process tree (stop, kill) and kills the tree of a job whose task's worker
died under it (its owner, the bridge, went away): Ray kills the worker, not the job's
session.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import pwd
import select
import selectors
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ray

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READ_MAX = 8 << 20  # bytes read from a pipe before yielding them
BIG_READ = 256 << 10  # a read this large means a fast writer: wait for more (_read)
COALESCE_SECONDS = 0.002
PIPE_SIZE = 1 << 20  # asked of the kernel for each pipe (F_SETPIPE_SZ)
DRAIN_SECONDS = 2.0  # after the job's end, for what is still in its pipes
WATCH_SECONDS = 1.0  # the agent's sweep for jobs whose worker died

Event = tuple[str, Any]


class _Failed(Exception):
    """The job could not start; the message says why, for a person."""


def run_job(
    argv: Sequence[str], env: Mapping[str, str], cwd: str, stdin: bytes | None, user: str
) -> Iterator[Event]:
    """The job's events (module doc); a Ray streaming generator task."""
    try:
        proc, pipes = _spawn(argv, env, cwd, stdin, user)
    except _Failed as exc:
        yield ("failed", str(exc))
        return
    info = {
        "pid": proc.pid,
        "pid_start": start_ticks(proc.pid),
        "node": _node(),
        "node_id": _node_id(),
        "worker_pid": os.getpid(),
        "worker_start": start_ticks(os.getpid()),
    }
    yield ("started", info)
    yield from _pump(proc, pipes)


@functools.cache
def _node() -> str:
    """This node's IP (a worker stays on its node: asked of Ray once per worker)."""
    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


@functools.cache
def _node_id() -> str:
    return str(ray.get_runtime_context().get_node_id())


def _spawn(
    argv: Sequence[str], env: Mapping[str, str], cwd: str, stdin: bytes | None, user: str
) -> tuple[subprocess.Popen[bytes], dict[int, str]]:
    """Popen the job in its own session; its pipes' read ends, by fd, with their stream."""
    command, popen_env, popen_cwd = _command(argv, env, cwd, user)
    stdin_fd = _stdin_fd(stdin)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    for fd in (out_r, err_r):
        with contextlib.suppress(OSError):  # a smaller pipe only costs speed
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        os.set_blocking(fd, False)
    try:
        proc = subprocess.Popen(
            command,
            stdin=stdin_fd,
            stdout=out_w,
            stderr=err_w,
            cwd=popen_cwd,
            env=popen_env,
            close_fds=True,
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        os.close(out_r)
        os.close(err_r)
        raise _Failed(_spawn_message(exc, argv[0], cwd)) from None
    finally:
        for fd in (out_w, err_w, stdin_fd):
            os.close(fd)
    return proc, {out_r: "o", err_r: "e"}


def _spawn_message(exc: Exception, argv0: str, cwd: str) -> str:
    if isinstance(exc, ValueError):  # a NUL in argv or env
        return f"invalid argv or environment: {exc}"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, OSError) and exc.filename == cwd:
        return f"working directory {cwd}: {reason} (on node {_node()})"
    return f"cannot execute {argv0}: {reason} (on node {_node()})"


def _command(
    argv: Sequence[str], env: Mapping[str, str], cwd: str, user: str
) -> tuple[list[str], dict[str, str], str]:
    """Popen's argv, env and cwd: the job's own, or setpriv dropping to `user` (when Ray runs
    as root there and `user` is another) with env(1) setting the job's env and directory."""
    if not argv:
        raise _Failed("empty argv")
    full = {"PATH": BASE_PATH, "HOME": "/", "LANG": "C.UTF-8"}
    if not user:
        return list(argv), full | dict(env), cwd
    try:
        who = pwd.getpwnam(user)
    except KeyError:
        raise _Failed(f"no Unix user {user!r} on node {_node()} (jobs.run_as)") from None
    full |= {"HOME": who.pw_dir, "USER": who.pw_name, "LOGNAME": who.pw_name} | dict(env)
    if who.pw_uid == os.geteuid():
        return list(argv), full, cwd
    if os.geteuid() != 0:
        raise _Failed(
            f"cannot run as {user!r} on node {_node()}: Ray runs there as uid {os.geteuid()}"
        )
    if "=" in argv[0] or any(not name or "=" in name for name in full):
        raise _Failed("invalid argv or environment: '=' in argv[0] or a variable's name")
    if not os.path.isdir(cwd):
        raise _Failed(f"working directory {cwd}: no such directory (on node {_node()})")
    groups = ",".join(map(str, os.getgrouplist(who.pw_name, who.pw_gid)))
    drop = ["setpriv", f"--reuid={who.pw_uid}", f"--regid={who.pw_gid}"]
    drop.append(f"--groups={groups}" if groups else "--clear-groups")
    assignments = [f"{name}={value}" for name, value in full.items()]
    command = [*drop, "--", "env", "-i", f"--chdir={cwd}", "--", *assignments, *argv]
    return command, {"PATH": BASE_PATH, "LANG": "C.UTF-8"}, "/"


def _stdin_fd(stdin: bytes | None) -> int:
    """An fd for the job's stdin: its bytes in a memfd, or /dev/null."""
    if not stdin:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    fd = os.memfd_create("jobworker-stdin", os.MFD_CLOEXEC)
    view = memoryview(stdin)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _pump(proc: subprocess.Popen[bytes], pipes: dict[int, str]) -> Iterator[Event]:
    """Yield the job's output as it comes, then its end (what is left of its group killed)."""
    pidfd = os.pidfd_open(proc.pid)
    sel = selectors.DefaultSelector()
    for fd in pipes:
        sel.register(fd, selectors.EVENT_READ)
    sel.register(pidfd, selectors.EVENT_READ)
    ended: dict[str, Any] | None = None
    deadline = 0.0
    try:
        # Until the leader exits (a job may close its stdout and stderr long before), then
        # until its pipes end or DRAIN_SECONDS pass.
        while pipes or ended is None:
            timeout = None if ended is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                break  # a process that left the session holds a pipe: stop reading it
            for key, _ in sel.select(timeout):
                if key.fd == pidfd:
                    sel.unregister(pidfd)
                    ended = _reap(proc.pid)
                    deadline = time.monotonic() + DRAIN_SECONDS
                    continue
                data = _read(key.fd)
                if data:
                    yield (pipes[key.fd], data)
                else:  # end of file
                    sel.unregister(key.fd)
                    os.close(key.fd)
                    del pipes[key.fd]
    finally:
        sel.close()
        os.close(pidfd)
        for fd in pipes:
            os.close(fd)
    proc.returncode = 0  # reaped by _reap: keep Popen from waiting again
    assert ended is not None
    yield ("ended", ended)


def _read(fd: int) -> bytes:
    """What the pipe holds now, up to READ_MAX; b"" at end of file. A fast writer (a full
    pipe's worth read) gets a few ms more to fill the chunk: fewer, larger objects."""
    parts: list[bytes] = []
    size = 0
    while size < READ_MAX:
        try:
            data = os.read(fd, READ_MAX - size)
        except BlockingIOError:
            if size < BIG_READ or not select.select([fd], [], [], COALESCE_SECONDS)[0]:
                break
            continue
        if not data:
            break
        parts.append(data)
        size += len(data)
    return b"".join(parts)


def _reap(pid: int) -> dict[str, Any]:
    """Kill what is left of the job's group (its leader is a zombie: the group id cannot be
    reused yet), then reap the leader with its usage."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    signaled = os.WIFSIGNALED(status)
    return {
        "exit_code": None if signaled else os.waitstatus_to_exitcode(status),
        "signal": os.WTERMSIG(status) if signaled else 0,
        "user_cpu": usage.ru_utime,
        "system_cpu": usage.ru_stime,
        # Not ru_maxrss: exec keeps the high-water mark of the Ray worker it was forked
        # from (~100 MB); without a cgroup on the node, peak memory is not measured.
        "max_rss": 0,
    }


def start_ticks(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks); 0 when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return 0
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _parents() -> dict[int, int]:
    """Every process's parent, by pid."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as file:
                    stat = file.read()
            except OSError:
                continue
            parents[int(name)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    return parents


def signal_tree(pid: int, pid_start: int, sig: int) -> bool:
    """Send `sig` to the job's process group and to every descendant of its leader (those
    that left its session too); False when the leader is gone (or its pid reused)."""
    if start_ticks(pid) != pid_start:
        return False
    parents = _parents()
    tree, frontier = set(), [pid]
    while frontier:  # a worklist, never recursion
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for child in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, sig)
    return True


class NodeAgent:
    """One per node (a detached actor, no CPU): signals jobs; kills a job whose worker died."""

    def __init__(self) -> None:
        self._watched: dict[int, tuple[int, int, int]] = {}  # pid: (start, worker, its start)
        self._sweeper: asyncio.Task[None] | None = None

    async def signal(self, pid: int, pid_start: int, sig: int) -> bool:
        """signal_tree() on this node."""
        return signal_tree(pid, pid_start, sig)

    async def watch(self, pid: int, pid_start: int, worker: int, worker_start: int) -> None:
        """Kill the job's tree if its worker dies before it ends."""
        self._watched[pid] = (pid_start, worker, worker_start)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            for pid, (start, worker, worker_start) in list(self._watched.items()):
                if start_ticks(pid) != start:
                    del self._watched[pid]  # ended (its task reaped it)
                elif start_ticks(worker) != worker_start:
                    signal_tree(pid, start, signal.SIGKILL)
                    del self._watched[pid]
