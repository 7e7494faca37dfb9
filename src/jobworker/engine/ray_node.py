"""What runs on a Ray cluster's node for one job: its task (ray_agent.py: the node's agent).

Only the standard library and ray: the bridge pickles this module, ray_agent and
ray_limits by value (cloudpickle.register_pickle_by_value), so a node needs Ray, not
jobworker.

A job's task is a plain Ray task, holding the job's CPUs and memory while the job runs. It
starts the job's argv in its own session with pipes as stdout and stderr, within its
limits where the node allows (ray_limits.py: a cgroup of its own, removed once the job's
leader is reaped, with what is left in it; its OOM kill in the job's end). A job that ends
within FIRST_SECONDS having written little comes back whole in the task's answer: its
start, its output and its end, {"info", "output", "exit"}. Any other is handed to its
node's agent (ray_agent.py), which reads its pipes from then on and queues its events for
the bridge; the task waits for the job's leader to exit, kills what is left of its process
group, reaps it, tells the agent how it ended, and answers {"exit"}. {"failed": message}:
the job could not start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray

from jobworker.engine.ray_agent import agent_handle, signal_tree, start_ticks

# Its names, not the module: a module pickles by reference, which a node without jobworker
# cannot import (the functions pickle by value with it).
from jobworker.engine.ray_limits import NodeGroup, finish, limited, wanted

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PIPE_SIZE = 1 << 20  # asked of the kernel for each pipe (F_SETPIPE_SZ)
AGENT_TIMEOUT = 60.0  # seconds to wait for the node's agent to be up (it may be new)
# A job that ends this soon comes back whole in its task's answer (no agent, no pull)...
FIRST_SECONDS = 0.05
FIRST_BYTES = 32 << 10  # ...unless it writes more first: its agent then reads it live


class _Failed(Exception):
    """The job could not start; the message says why, for a person."""


def run_job(bridge: str, job: Mapping[str, Any]) -> dict[str, Any]:
    """The job's task (module doc). `job`: id, argv, env, cwd, stdin (bytes or None), user,
    limits (one argument: Ray pays per argument)."""
    try:
        agent = _agent()
        proc, pipes, group = _spawn(job)
    except _Failed as exc:
        return {"failed": str(exc)}
    proc.returncode = 0  # reaped by _reap: keep Popen from waiting for it again
    pid, pid_start = proc.pid, start_ticks(proc.pid)
    info = {"pid": pid, "pid_start": pid_start, "node": _node(), "node_id": _node_id()}
    info["time"] = time.time()
    output: list[tuple[str, bytes]] = []
    ended: dict[str, Any] | None = None
    # Told to the agent at once, so that a worker dying in the next FIRST_SECONDS leaves no
    # job unwatched (the agent then kills it and says so). A lost agent shows below.
    with contextlib.suppress(OSError):
        agent.send({"op": "begun", "bridge": bridge, "id": job["id"], "info": info})
    try:
        output, ended = _first(pid, pipes, group)
        if ended is not None and not pipes:
            return {"info": info, "output": output, "exit": ended}  # all of it in one answer
        message = {"op": "job", "bridge": bridge, "id": job["id"], "info": info, "exit": ended}
        try:
            agent.send(message, pipes, output)
        finally:
            for fd in pipes:
                os.close(fd)
        if ended is None:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except BaseException as exc:  # the agent gone, or ray.cancel: the job goes too
        if ended is None:
            signal_tree(pid, pid_start, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):  # reaped in _first already
                ended = _reap(pid, group)
        if not isinstance(exc, OSError):
            raise
        if ended is not None:  # what it wrote after its first FIRST_BYTES is lost
            return {"info": info, "output": output, "exit": ended}
        return {"failed": f"the node's jobworker agent went away (on node {_node()}): {exc}"}
    if ended is None:
        ended = _reap(pid, group)
        with contextlib.suppress(OSError):  # the agent's loss is the bridge's to notice
            agent.send({"op": "exit", "bridge": bridge, "id": job["id"], "exit": ended})
    return {"exit": ended}


def _first(
    pid: int, pipes: dict[int, str], group: NodeGroup | None
) -> tuple[list[tuple[str, bytes]], Any]:
    """What the job writes in its first FIRST_SECONDS (until FIRST_BYTES), and how it ended
    if it did meanwhile (else None). Pipes found at their end are closed and leave `pipes`."""
    output: list[tuple[str, bytes]] = []
    size, ended = 0, None
    deadline = time.monotonic() + FIRST_SECONDS
    pidfd = os.pidfd_open(pid)
    sel = selectors.DefaultSelector()
    try:
        for fd in [*pipes, pidfd]:
            sel.register(fd, selectors.EVENT_READ)
        while (pipes or ended is None) and size < FIRST_BYTES:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            for key, _ in sel.select(timeout):
                if key.fd == pidfd:
                    sel.unregister(pidfd)
                    ended = _reap(pid, group)
                    continue
                try:
                    data = os.read(key.fd, FIRST_BYTES)
                except BlockingIOError:
                    continue
                if data:
                    output.append((pipes[key.fd], data))
                    size += len(data)
                else:  # end of file
                    sel.unregister(key.fd)
                    os.close(key.fd)
                    del pipes[key.fd]
    finally:
        sel.close()
        os.close(pidfd)
    return output, ended


class _Channel:
    """This worker's connection to its node's agent (one per worker process)."""

    def __init__(self, name: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(name)
        self.broken = False

    def send(
        self,
        message: dict[str, Any],
        pipes: Mapping[int, str] | None = None,
        output: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """One message: JSON, a newline, the output it lists; the pipes' fds with it."""
        fds = list(pipes or {})
        message |= {"pipes": list((pipes or {}).values())}
        message |= {"output": [(kind, len(data)) for kind, data in output]}
        data = json.dumps(message).encode() + b"\n" + b"".join(d for _, d in output)
        try:
            socket.send_fds(self.sock, [data], fds)
        except OSError:
            self.broken = True
            self.sock.close()
            raise


_channels: dict[str, _Channel] = {}  # by node id: this worker's, kept for its next tasks


def _agent() -> _Channel:
    """The node's agent, connected (made first if the node has none)."""
    channel = _channels.get(_node_id())
    if channel is None or channel.broken:
        try:
            handle = agent_handle(_node_id())
            channel = _Channel(ray.get(handle.address.remote(), timeout=AGENT_TIMEOUT))
        except Exception as exc:  # noqa: BLE001  # any Ray or socket error: said to a person
            raise _Failed(f"the node's jobworker agent cannot be reached ({exc})") from None
        _channels[_node_id()] = channel
    return channel


# Not functools.cache: a cache wrapper pickles by reference, which a node without
# jobworker cannot import.
_here: dict[str, str] = {}  # a worker stays on its node: asked of Ray once per worker


def _node() -> str:
    """This node's IP."""
    if "ip" not in _here:
        _here["ip"] = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    return _here["ip"]


def _node_id() -> str:
    if "id" not in _here:
        _here["id"] = str(ray.get_runtime_context().get_node_id())
    return _here["id"]


def _spawn(
    job: Mapping[str, Any],
) -> tuple[subprocess.Popen[bytes], dict[int, str], NodeGroup | None]:
    """Popen the job in its own session within its limits (ray_limits.py); the read ends of
    its pipes, by fd: "o" or "e"; its cgroup (None: it has none)."""
    argv, cwd, limits = job["argv"], job["cwd"], job.get("limits") or {}
    command, popen_env, popen_cwd = _command(argv, job["env"], cwd, job["user"])
    if wanted(limits) and command[0] != "setpriv":
        _check_exec(argv[0], popen_env, cwd)  # a wrapper's exec would hide a start failure
    stdin_fd = _stdin_fd(job["stdin"])
    stdin_path = f"/proc/{os.getpid()}/fd/{stdin_fd}" if job["stdin"] else os.devnull
    command, group = limited(job["id"], limits, command, stdin_path)
    gated = group is not None and not group.by_thread  # through the join shell
    gate_r, gate_w = os.pipe2(os.O_CLOEXEC) if gated else (-1, stdin_fd)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    for fd in (out_r, err_r):
        with contextlib.suppress(OSError):  # a smaller pipe only costs speed
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        os.set_blocking(fd, False)  # the agent's reads
    joined = group.thread_joined() if group is not None and group.by_thread else None
    try:
        with joined or contextlib.nullcontext():
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=gate_w,
                    stdout=out_w,
                    stderr=err_w,
                    cwd=popen_cwd,
                    env=popen_env,
                    close_fds=True,
                    start_new_session=True,
                )
            except (OSError, ValueError) as exc:
                raise _Failed(_spawn_message(exc, argv[0], cwd)) from None
    except (_Failed, OSError) as exc:  # OSError: the thread could not join the job's group
        for fd in (out_r, err_r, *([gate_r, stdin_fd] if gated else [])):
            os.close(fd)
        if group is not None:
            group.remove()
        if isinstance(exc, _Failed):
            raise
        raise _Failed(f"cannot put the job in its cgroup ({exc}) on node {_node()}") from None
    finally:
        for fd in (out_w, err_w, gate_w):  # gate_w: stdin_fd when there is no gate
            os.close(fd)
    if gated and group is not None:
        try:
            _joined(proc, gate_r, group)
        except _Failed:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(stdin_fd)  # the join shell has opened it by then
    return proc, {out_r: "o", err_r: "e"}, group


def _joined(proc: subprocess.Popen[bytes], gate: int, group: NodeGroup) -> None:
    """Wait for the join shell's exec (its end of the gate closes); _Failed, the job
    reaped and its group removed, when it could not join its cgroup."""
    failed = b""
    try:
        while data := os.read(gate, 4096):
            failed += data
    finally:
        os.close(gate)
    if failed:
        proc.wait()
        group.remove()
        where = failed.decode(errors="replace").strip()
        raise _Failed(f"cannot put the job in its cgroup ({where}) on node {_node()}")


def _check_exec(argv0: str, env: Mapping[str, str], cwd: str) -> None:
    """_Failed when `argv0` cannot be executed in `cwd`, as Popen would fail the start."""
    if not os.path.isdir(cwd):
        raise _Failed(f"working directory {cwd}: no such directory (on node {_node()})")
    if "/" in argv0:
        path = os.path.join(cwd, argv0)
        found = os.access(path, os.X_OK) and not os.path.isdir(path)
    else:
        found = shutil.which(argv0, path=env.get("PATH", BASE_PATH)) is not None
    if not found:
        raise _Failed(f"cannot execute {argv0}: No such file or directory (on node {_node()})")


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


def _reap(pid: int, group: NodeGroup | None) -> dict[str, Any]:
    """Kill what is left of the job's group (its leader is a zombie: the group id cannot be
    reused yet), then reap the leader with its usage; its cgroup, if any, is removed."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    signaled = os.WIFSIGNALED(status)
    ended = {
        "exit_code": None if signaled else os.waitstatus_to_exitcode(status),
        "signal": os.WTERMSIG(status) if signaled else 0,
        "user_cpu": usage.ru_utime,
        "system_cpu": usage.ru_stime,
        # Not ru_maxrss: exec keeps the high-water mark of the Ray worker it was forked
        # from (~100 MB); only a memory cgroup's peak is the job's own.
        "max_rss": 0,
    }
    return finish(group, ended)
