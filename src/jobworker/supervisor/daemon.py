"""`jobworker supervise`: the job supervisor, the parent of every local job.

Jobs belong to the host, not to one server process (contract 6.3): the server hands each
job to this small process (no gRPC, no store, one event loop), which starts it in its
cgroups, reaps it, and keeps how it ended until the server says that is journaled. A
server that stops or dies leaves it running; the next server connects and takes the jobs
back. It leaves once no server is connected and no job runs, handing unacknowledged ends
on in STATE_FILE. SIGHUP re-execs it (an upgrade): the children stay its children, the
lock and the listening socket are inherited, and the new program adopts the jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import stat
import struct
import sys
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from jobworker import logging as jwlogging
from jobworker.engine.cgroups.backend import CgroupBackend
from jobworker.engine.cgroups.group import JobCgroup
from jobworker.engine.executor import ExitInfo, SpawnError
from jobworker.engine.running import Process, kill_stale, process_start_ticks
from jobworker.engine.spawn import Spawner
from jobworker.supervisor import protocol as p

log = structlog.get_logger()

_FIRST_CONNECT_WAIT = 10.0  # seconds a new supervisor waits for a server before leaving
_STOP_GRACE = 10.0  # SIGTERM to the supervisor: each job's TERM-to-KILL grace


@dataclass(eq=False)
class _Entry:
    """A job this supervisor started: its process until it ends, then how it ended."""

    key: str
    attempt: int
    process: Process | None = None
    started: p.Message | None = None
    ended: ExitInfo | None = None
    task: asyncio.Task[None] | None = None


class Daemon:
    """The supervisor's state: its jobs, its one server connection, its cgroups."""

    def __init__(self, data_dir: Path, backend: CgroupBackend, listener: socket.socket) -> None:
        self.data_dir = data_dir
        self.backend = backend
        self.spawner = Spawner(backend, default_working_dir="/")
        self.listener = listener
        self.jobs: dict[str, _Entry] = {}
        self._conn: asyncio.StreamWriter | None = None
        self._starting: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._serving: set[asyncio.Task[Any]] = set()  # connection handlers
        self._leave = asyncio.Event()
        self._reexec = False
        self._exit_when_idle = False
        # Not idle before a server had the time to connect (it started this process).
        self._waiting_for_server = True

    # -- life cycle

    async def run(self, resume: bool) -> bool:
        """Serve until nothing is left to do; True when the caller should re-exec."""
        await self._restore(resume)
        server = await asyncio.start_unix_server(self._serve, sock=self.listener, limit=p.MAX_LINE)
        log.info("supervisor_ready", pid=os.getpid(), jobs=len(self.jobs), resumed=resume)
        jwlogging.flush()
        async with server:
            asyncio.get_running_loop().call_later(_FIRST_CONNECT_WAIT, self._first_wait_over)
            await self._leave.wait()
            if self._conn is not None:
                self._conn.close()
            if self._serving:
                await asyncio.wait(list(self._serving))
        if self._starting:
            await asyncio.wait(list(self._starting))
        self._save_state()
        if not self._reexec:
            await self.spawner.drain()
            await asyncio.to_thread(self.spawner.close)
            if not self._running():
                await asyncio.to_thread(self.backend.close)
        return self._reexec

    def on_signal(self, sig: int) -> None:
        """SIGHUP: re-exec, jobs kept. SIGTERM/SIGINT: stop every job, then leave."""
        if sig == signal.SIGHUP:
            self._request_reexec()
            return
        log.info("supervisor_stopping_jobs", jobs=self._running())
        self._exit_when_idle = True
        for entry in self.jobs.values():
            if entry.process is not None and not entry.process.ended:
                self._own(entry.process.stop(_STOP_GRACE))
        self._check_idle()

    def _request_reexec(self) -> None:
        log.info("supervisor_reexec", jobs=self._running())
        self._reexec = True
        self._leave.set()

    def _running(self) -> int:
        return sum(1 for e in self.jobs.values() if e.ended is None)

    def _first_wait_over(self) -> None:
        self._waiting_for_server = False
        self._check_idle()

    def _check_idle(self) -> None:
        alone = self._conn is None and not self._waiting_for_server
        if (alone or self._exit_when_idle) and not self._running() and not self._starting:
            self._leave.set()

    # -- the state handed on (STATE_FILE)

    async def _restore(self, resume: bool) -> None:
        """Take the state a predecessor left: ended jobs always; running ones only after a
        re-exec (the same pid: they are this process's children). Kill what no one owns."""
        state = _read_state(self.data_dir / p.STATE_FILE)
        mine = resume and state.get("pid") == os.getpid()
        for item in state.get("jobs", ()):
            try:
                self._restore_one(item, mine)
            except (KeyError, TypeError, ValueError, OSError) as exc:
                log.warning("supervisor_state_entry_skipped", entry=str(item)[:200], error=str(exc))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.data_dir / p.STATE_FILE)
        owned = {e.started.get("cgroup") or e.key for e in self.jobs.values() if e.started}
        killed = await asyncio.to_thread(_kill_orphans, self.backend, owned)
        if killed:
            log.warning("orphan_jobs_killed", cgroups=killed)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.backend.cleanup_stale, frozenset(owned))

    def _restore_one(self, item: dict[str, Any], mine: bool) -> None:
        entry = _Entry(str(item["key"]), int(item["attempt"]), started=item.get("started"))
        if item.get("ended") is not None:
            entry.ended = p.exit_from(item["ended"])
        elif mine and entry.started is not None:
            started = entry.started
            pid, ticks = int(started["pid"]), int(started["pid_start"])
            if process_start_ticks(pid) != ticks:
                return  # not ours any more; _kill_orphans cleans its group
            group = self.backend.open(str(started.get("cgroup") or entry.key))
            if group is None:  # no cgroups here (or removed from outside)
                group = JobCgroup(entry.key)
            entry.process = self.spawner.adopt(pid, ticks, float(started["start_time"]), group)
            entry.task = asyncio.get_running_loop().create_task(self._await_end(entry))
        else:  # a running job of a supervisor that died: nobody will reap it
            if entry.started is not None:
                started = entry.started
                kill_stale(int(started["pid"]), int(started["pid_start"]), None, self.backend)
            return  # its group is killed with the other orphans'
        self.jobs[entry.key] = entry

    def _save_state(self) -> None:
        jobs = [
            {
                "key": e.key,
                "attempt": e.attempt,
                "started": e.started,
                "ended": None if e.ended is None else p.exit_to_json(e.ended),
            }
            for e in self.jobs.values()
            if e.started is not None and (e.ended is not None or self._reexec)
        ]
        if not jobs:
            return
        path = self.data_dir / p.STATE_FILE
        tmp = path.with_suffix(".tmp")
        data = json.dumps({"pid": os.getpid(), "version": p.VERSION, "jobs": jobs}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    # -- the server's connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)
        try:
            if not _same_user(writer):
                log.warning("supervisor_peer_refused", reason="another user")
                return
            hello = p.decode(await reader.readline())
            if hello.get("op") != "hello" or hello.get("version") != p.VERSION:
                writer.write(p.encode({"op": "error", "message": f"speaks version {p.VERSION}"}))
                return
            await self._take_connection(writer)
            while line := await reader.readline():
                self._dispatch(p.decode(line))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("supervisor_bad_message", error=str(exc)[:200])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if self._conn is writer:
                self._conn = None
                log.info("server_disconnected", running=self._running())
            writer.close()
            self._check_idle()

    async def _take_connection(self, writer: asyncio.StreamWriter) -> None:
        if self._conn is not None:  # a new server: the old one is gone or going
            self._conn.close()
        self._conn = writer
        self._waiting_for_server = False
        if self._starting:  # the new server's view must include every job started
            await asyncio.wait(list(self._starting))
        jobs = []
        for e in self.jobs.values():
            if e.started is not None:
                ended = None if e.ended is None else p.exit_to_json(e.ended)
                jobs.append({**e.started, "ended": ended})
        backend = {"name": self.backend.name, "detail": self.backend.describe()}
        hello = {"op": "hello", "version": p.VERSION, "pid": os.getpid(), "backend": backend}
        self._send({**hello, "jobs": jobs})
        log.info("server_connected", jobs=len(jobs))

    def _send(self, message: p.Message) -> None:
        if self._conn is not None and not self._conn.is_closing():
            self._conn.write(p.encode(message))

    def _dispatch(self, m: p.Message) -> None:
        op = m["op"]
        entry = self.jobs.get(str(m.get("key", "")))
        if op == "spawn":
            self._spawn(m)
        elif op in ("stop", "kill") and entry is not None and entry.ended is not None:
            self._send(_ended(entry))  # it ended already: the server may not know yet
        elif op == "stop" and entry is not None and entry.process is not None:
            self._own(entry.process.stop(float(m["grace"])))
        elif op == "kill" and entry is not None and entry.process is not None:
            entry.process.kill()
        elif op == "ack" and entry is not None and entry.attempt == int(m["attempt"]):
            if entry.ended is not None:
                del self.jobs[entry.key]
        elif op == "reap":
            self._own(self._reap(m))
        elif op == "exit":
            self._exit_when_idle = True
            self._check_idle()
        elif op == "reexec":
            self._request_reexec()

    def _own(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- jobs

    def _spawn(self, m: p.Message) -> None:
        key, attempt = str(m["key"]), int(m["attempt"])
        entry = self.jobs.get(key)
        if entry is not None:  # a server that retries after a reconnect: answer again
            if entry.attempt == attempt and entry.started is not None:
                self._send(entry.started)
                if entry.ended is not None:
                    self._send(_ended(entry))
                return
            if entry.ended is None:
                self._send({"op": "failed", "key": key, "attempt": attempt, "message": "busy"})
                return
        entry = self.jobs[key] = _Entry(key, attempt)
        task = asyncio.get_running_loop().create_task(self._start(entry, m))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start(self, entry: _Entry, m: p.Message) -> None:
        try:
            process = await self.spawner.spawn(
                p.spec_from(m),
                p.limits_from(m["limits"]),
                Path(m["job_dir"]),
                entry.key,
                str(m["user"]),
                stdin_file=bool(m["stdin_file"]),
            )
        except (SpawnError, ValueError, KeyError, TypeError) as exc:
            message = exc.message if isinstance(exc, SpawnError) else f"bad request: {exc}"
            del self.jobs[entry.key]
            self._send(
                {"op": "failed", "key": entry.key, "attempt": entry.attempt, "message": message}
            )
            return
        entry.process = process
        slot = process.cgroup.slot is not None
        entry.started = {
            "op": "started",
            "key": entry.key,
            "attempt": entry.attempt,
            "pid": process.pid,
            "pid_start": process.pid_start,
            "start_time": process.start_time,
            "cgroup": process.cgroup.name if slot else "",
        }
        self._send(entry.started)
        entry.task = asyncio.get_running_loop().create_task(self._await_end(entry))

    async def _await_end(self, entry: _Entry) -> None:
        assert entry.process is not None
        entry.ended = await entry.process.wait()
        self._send(_ended(entry))
        self._check_idle()

    async def _reap(self, m: p.Message) -> None:
        """Kill what is left of jobs a server knows of and this supervisor does not."""
        results = []
        for item in m["jobs"]:
            known = p.known_from(item)
            if known.key in self.jobs:
                continue
            killed = await asyncio.to_thread(
                kill_stale, known.pid, known.pid_start, known.cgroup or known.key, self.backend
            )
            results.append({"key": known.key, "attempt": known.attempt, "killed": killed})
        self._send({"op": "reaped", "id": m.get("id", 0), "jobs": results})


def _ended(entry: _Entry) -> p.Message:
    assert entry.ended is not None
    return {
        "op": "ended",
        "key": entry.key,
        "attempt": entry.attempt,
        "exit": p.exit_to_json(entry.ended),
    }


def _same_user(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.geteuid())


def _read_state(path: Path) -> dict[str, Any]:
    """The predecessor's state, or {}: only a regular file is opened, garbage is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("supervisor_state_unreadable", path=str(path), error=str(exc))
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            log.warning("supervisor_state_unreadable", path=str(path), error="not a file")
            return {}
        with os.fdopen(os.dup(fd), "rb") as f:
            state = json.loads(f.read(p.MAX_LINE))
    except (OSError, ValueError) as exc:
        log.warning("supervisor_state_unreadable", path=str(path), error=str(exc)[:200])
        return {}
    finally:
        os.close(fd)
    return state if isinstance(state, dict) else {}


def _kill_orphans(backend: CgroupBackend, owned: set[str]) -> list[str]:
    """SIGKILL every process in a job group under the root that no job here owns: a
    supervisor that died left them (they have nobody to report their end to)."""
    killed = []
    for hierarchy in backend.hierarchies:
        with contextlib.suppress(OSError):
            for group_dir in hierarchy.parent.iterdir():
                name = group_dir.name
                if not group_dir.is_dir() or name in owned or name in killed:
                    continue
                group = backend.open(name)
                if group is not None and group.pids():
                    group.kill()
                    group.remove_blocking(timeout=1.0)
                    killed.append(name)
    return killed


# -- the process


def main(argv: list[str] | None = None) -> int:
    """`jobworker supervise --data-dir D --cgroup-root R`; see the module doc."""
    parser = argparse.ArgumentParser(prog="jobworker supervise")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cgroup-root", default="jobworker")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="json")
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lock-fd", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--listen-fd", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    jwlogging.setup(args.log_level, args.log_format)
    data_dir = args.data_dir.absolute()
    lock = args.lock_fd if args.lock_fd >= 0 else _lock(data_dir)
    if lock < 0:
        return 0  # another supervisor serves this data_dir: the server connects to it
    listener = socket.socket(fileno=args.listen_fd) if args.listen_fd >= 0 else _listen(data_dir)
    _write_pid(data_dir)
    # The asyncio server closes its socket when it ends; a re-exec hands on this copy.
    listen_copy = os.dup(listener.fileno())
    backend = CgroupBackend.detect(args.cgroup_root)
    daemon = Daemon(data_dir, backend, listener)
    reexec = _run_loop(daemon, args.resume)
    if not reexec:
        os.close(listen_copy)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(data_dir / p.PID_FILE)
        log.info("supervisor_stopped")
        jwlogging.flush()
        return 0
    jwlogging.flush()
    os.set_inheritable(lock, True)
    os.set_inheritable(listen_copy, True)
    args_out = [
        sys.executable, "-m", "jobworker.supervisor", "--data-dir", str(data_dir),
        "--cgroup-root", args.cgroup_root, "--log-level", args.log_level,
        "--log-format", args.log_format, "--resume",
        "--lock-fd", str(lock), "--listen-fd", str(listen_copy),
    ]  # fmt: skip
    os.execv(sys.executable, args_out)  # noqa: S606 - our own program, by absolute path


def _run_loop(daemon: Daemon, resume: bool) -> bool:
    """The loop on a thread of its own, as the server's (cgroup v1 charges memory to the
    main thread's group, and the spawner forks on the loop's thread: server/app.py)."""
    loop = asyncio.new_event_loop()
    result: list[bool] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(loop.run_until_complete(daemon.run(resume)))
            # Left after a re-exec request: watchers of jobs the next program adopts.
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        except BaseException as exc:  # noqa: BLE001 - raised again on the main thread
            failure.append(exc)
        finally:
            loop.close()

    def deliver(sig: int, _frame: object) -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(daemon.on_signal, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, deliver)
    thread = threading.Thread(target=run, name="jobworker-supervisor")
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # wakes for signals: CPython runs handlers on the main thread
    if failure:
        raise failure[0]
    return result[0]


def _lock(data_dir: Path) -> int:
    """flock data_dir/supervisor.lock; -1 when another supervisor holds it."""
    fd = os.open(data_dir / p.LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


def _listen(data_dir: Path) -> socket.socket:
    """The socket, made anew (under the lock: a file left there is a dead one's)."""
    path = data_dir / p.SOCKET
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


def _write_pid(data_dir: Path) -> None:
    path = data_dir / p.PID_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
