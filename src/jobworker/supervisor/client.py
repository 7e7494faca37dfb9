"""The local executor: the server's side of the job supervisor (supervisor/daemon.py).

It finds the supervisor of its data_dir (or starts one), hands it jobs and hears how they
end. When the connection breaks it reconnects; when the supervisor is gone it starts a new
one, which kills the orphaned job trees by their cgroups, and the jobs are LOST.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from jobworker.engine.executor import ExitInfo, Handle, Known, Launch, SpawnError
from jobworker.model import Usage
from jobworker.supervisor import protocol as p

log = structlog.get_logger()

_CONNECT_TIMEOUT = 10.0  # seconds for a supervisor to start listening
_CONNECT_POLL = 0.01
_DIED = "the job supervisor died while it ran; its processes were killed"
_HOST = socket.gethostname()


class LocalJob:
    """A job the supervisor started (a Handle)."""

    __slots__ = (
        "_done",
        "_executor",
        "_kill_at",
        "attempt",
        "cgroup",
        "key",
        "pid",
        "pid_start",
        "start_time",
    )

    def __init__(self, executor: LocalExecutor, started: p.Message) -> None:
        self._executor = executor
        self.key = str(started["key"])
        self.attempt = int(started["attempt"])
        self.pid = int(started["pid"])
        self.pid_start = int(started["pid_start"])
        self.start_time = float(started["start_time"])
        self.cgroup = str(started.get("cgroup", ""))
        self._done: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self._kill_at = 0.0  # once stopped: when its KILL is due (monotonic), else 0

    @property
    def node(self) -> str:
        return _HOST  # Job.node: the host's name for the local executor

    @property
    def ended(self) -> bool:
        return self._done.done()

    async def wait(self) -> ExitInfo:
        # Not shielded (a future and two callbacks more a running job): only the job's
        # task waits here, cancelled only by a shutdown that leaves the job running.
        return await self._done

    async def stop(self, grace: float) -> ExitInfo:
        kill_at = time.monotonic() + grace
        self._kill_at = min(self._kill_at or kill_at, kill_at)
        self._executor.send({"op": "stop", "key": self.key, "grace": grace})
        return await asyncio.shield(self._done)

    def restop(self) -> None:
        """Ask again for a stop asked before a reconnect: a re-exec'd supervisor has no
        memory of it, and the job would never get its KILL."""
        if self._kill_at and not self.ended:
            grace = max(0.0, self._kill_at - time.monotonic())
            self._executor.send({"op": "stop", "key": self.key, "grace": grace})

    def kill(self) -> None:
        self._executor.send({"op": "kill", "key": self.key})

    def _end(self, info: ExitInfo) -> None:
        if not self._done.done():
            self._done.set_result(info)


class LocalExecutor:
    """Jobs on this host, through the job supervisor of `data_dir`."""

    name = "local"

    def __init__(
        self,
        data_dir: Path,
        cgroup_root: str,
        working_dir: Callable[[], str],
        *,
        log_level: str = "info",
        log_format: str = "json",
    ) -> None:
        """`working_dir`: the current jobs.working_dir (reloadable), which a job's
        relative working_dir is taken from."""
        self.data_dir = data_dir.absolute()
        self.cgroup_root = cgroup_root
        self.working_dir = working_dir
        self._log = (log_level, log_format)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._jobs: dict[str, LocalJob] = {}
        self._pending: dict[str, tuple[p.Message, asyncio.Future[p.Message]]] = {}
        self._outbox = p.Outbox()
        self._reaps: dict[int, asyncio.Future[p.Message]] = {}
        self._reap_ids = 0
        self._hello: p.Message = {}
        self._children: list[subprocess.Popen[bytes]] = []
        self._closing = False
        self._connected = asyncio.Event()  # clear while reconnecting: start() waits
        self.supervisor_pid = 0

    # -- connection

    async def open(self) -> None:
        """Connect to the data_dir's supervisor, starting one when there is none."""
        await self._connect(start=True)
        backend = self._hello.get("backend") or {}
        log.info(
            "limits_backend",
            backend=backend.get("name"),
            detail=backend.get("detail"),
            supervisor_pid=self.supervisor_pid,
        )

    async def _connect(self, *, start: bool) -> None:
        path = str(self.data_dir / p.SOCKET)
        deadline = time.monotonic() + _CONNECT_TIMEOUT
        child: subprocess.Popen[bytes] | None = None
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=p.MAX_LINE)
                writer.write(p.encode({"op": "hello", "version": p.VERSION}))
                hello = p.decode(await reader.readline())
                break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise OSError(f"cannot reach the job supervisor at {path}{self._log_tail()}")
            if start and (child is None or child.poll() is not None):
                if child is not None and child.returncode:
                    raise OSError(
                        f"the job supervisor exited with {child.returncode}{self._log_tail()}"
                    )
                # (again when one found the lock held by a supervisor that was leaving)
                child = self._start_supervisor()
            await asyncio.sleep(_CONNECT_POLL)
        if hello.get("op") != "hello":
            writer.close()
            raise OSError(f"the job supervisor refused this server: {hello.get('message')}")
        self._hello = hello
        self._use(writer)
        self.supervisor_pid = int(hello.get("pid", 0))
        self._connected.set()
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader, writer))

    def _start_supervisor(self) -> subprocess.Popen[bytes]:
        level, fmt = self._log
        argv = [sys.executable, "-m", "jobworker.supervisor", "--data-dir", str(self.data_dir)]
        argv += ["--cgroup-root", self.cgroup_root, "--log-level", level, "--log-format", fmt]
        fd = os.open(self.data_dir / p.LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            child = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True
            )
        finally:
            os.close(fd)
        self._children.append(child)
        return child

    def _log_tail(self) -> str:
        try:
            with open(self.data_dir / p.LOG_FILE, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 600))
                tail = f.read().decode(errors="replace").strip().splitlines()[-3:]
        except OSError:
            return ""
        return f" (its log, {self.data_dir / p.LOG_FILE}, ends: {' | '.join(tail)})" if tail else ""

    def send(self, message: p.Message) -> None:
        self._outbox.send(message)

    def _use(self, writer: asyncio.StreamWriter | None) -> None:
        self._outbox.use(writer)
        self._writer = writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                self._dispatch(p.decode(line))
        except (OSError, ValueError) as exc:
            log.warning("supervisor_connection_error", error=str(exc)[:200])
        finally:
            writer.close()
        if not self._closing:
            self._use(None)
            self._connected.clear()
            await self._after_break()

    def _dispatch(self, m: p.Message) -> None:
        op, key = m["op"], str(m.get("key", ""))
        if op in ("started", "failed"):
            if op == "started":  # now, not when start() resumes: "ended" may come next
                self._jobs[key] = LocalJob(self, m)
            pending = self._pending.pop(key, None)
            if pending is not None and not pending[1].done():
                pending[1].set_result(m)
        elif op == "ended":
            job = self._jobs.get(key)
            if job is not None and job.attempt == int(m["attempt"]):
                job._end(p.exit_from(m["exit"]))
        elif op == "reaped":
            future = self._reaps.pop(int(m.get("id", 0)), None)
            if future is not None and not future.done():
                future.set_result(m)

    async def _after_break(self) -> None:
        """The connection broke: the same supervisor (re-exec'd) or a new one."""
        old = self.supervisor_pid
        self._reap_children()
        alive = _alive(old)
        log.warning("supervisor_connection_lost", supervisor_pid=old, alive=alive)
        try:
            try:
                await self._connect(start=not alive)
            except OSError:
                if not alive:
                    raise
                self._reap_children()  # it died while we waited for it: start another
                await self._connect(start=True)
        except OSError as exc:
            log.error("supervisor_unreachable", error=str(exc))
            self._fail_everything(str(exc))
            self._connected.set()  # start() finds no writer and fails at once
            return
        await self._reconcile(same=self.supervisor_pid == old)

    def _reap_children(self) -> None:
        """Reap supervisors this server started that have left (else a zombie looks alive)."""
        self._children = [c for c in self._children if c.poll() is None]

    async def _reconcile(self, *, same: bool) -> None:
        """After a reconnect: jobs the supervisor reports go on; the others are LOST."""
        reported = {str(j["key"]): j for j in self._hello.get("jobs", ())}
        lost = []
        for key, job in list(self._jobs.items()):
            item = reported.get(key)
            if item is not None and int(item["attempt"]) == job.attempt:
                if item.get("ended") is not None:
                    job._end(p.exit_from(item["ended"]))
                job.restop()
            else:
                lost.append(job)
        if lost:
            known = [Known(j.key, j.attempt, j.pid, j.pid_start, j.cgroup) for j in lost]
            await self._reap(known)
            for job in lost:
                job._end(_lost(_DIED))
        for key, (message, future) in list(self._pending.items()):
            item = reported.get(key)
            if item is not None and int(item["attempt"]) == int(message["attempt"]):
                job = self._jobs[key] = LocalJob(self, item)
                if item.get("ended") is not None:
                    job._end(p.exit_from(item["ended"]))
                future.set_result({**item, "op": "started"})
                del self._pending[key]
            elif same:
                self.send(message)  # it may never have been read: the supervisor dedups
            else:
                del self._pending[key]
                future.set_result({"op": "failed", "message": _DIED.replace("ran", "started")})
        if not same:
            log.warning("supervisor_replaced", supervisor_pid=self.supervisor_pid, lost=len(lost))

    def _fail_everything(self, why: str) -> None:
        for job in self._jobs.values():
            job._end(_lost(f"the job supervisor is unreachable: {why}"))
        for _message, future in self._pending.values():
            if not future.done():
                future.set_result({"op": "failed", "message": why})
        self._pending.clear()

    # -- the Executor interface

    async def start(self, launch: Launch) -> Handle:
        if not self._connected.is_set():  # reconnecting: jobs wait for it, not fail
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 2 * _CONNECT_TIMEOUT)
        if self._writer is None:  # it could not be reached: try again
            if self._closing:
                raise SpawnError("the server is shutting down")
            try:
                await self._connect(start=True)
            except OSError as exc:
                raise SpawnError(f"the job supervisor is not connected: {exc}") from None
        spec = launch.spec
        cwd = os.path.join(self.working_dir(), spec.working_dir)
        message = p.spawn_message(
            launch.key,
            launch.attempt,
            spec,
            launch.limits,
            launch.job_dir.absolute(),
            launch.user,
            launch.stdin_file,
        )
        message["cwd"] = cwd
        future: asyncio.Future[p.Message] = asyncio.get_running_loop().create_future()
        self._pending[launch.key] = (message, future)
        self.send(message)
        reply = await future
        if reply["op"] != "started":
            raise SpawnError(str(reply.get("message", "the job supervisor could not start it")))
        return self._jobs[launch.key]

    async def ready(self) -> None:
        """Always: a start waits for a supervisor being reconnected."""

    async def recover(self, known: Sequence[Known]) -> dict[str, tuple[int, Handle | ExitInfo]]:
        found: dict[str, tuple[int, Handle | ExitInfo]] = {}
        for item in self._hello.get("jobs", ()):
            job = self._jobs[str(item["key"])] = LocalJob(self, item)
            if item.get("ended") is not None:  # ended while no server was there
                job._end(p.exit_from(item["ended"]))
            found[job.key] = (job.attempt, job)
        unknown = [k for k in known if k.key not in found]
        if unknown:
            killed = await self._reap(unknown)
            for k in unknown:
                why = "the server and the job supervisor stopped while it ran"
                if killed.get(k.key):
                    why += "; its processes were killed"
                found[k.key] = (k.attempt, _lost(why))
        return found

    def forget(self, key: str, attempt: int) -> None:
        job = self._jobs.get(key)
        if job is not None and job.attempt == attempt:
            del self._jobs[key]
        self.send({"op": "ack", "key": key, "attempt": attempt})

    async def close(self, *, stop_jobs: bool) -> None:
        self._closing = True
        if stop_jobs:
            self.send({"op": "exit"})
        self._outbox.flush()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        for child in self._children:
            child.poll()  # reaped if it left; else it lives on, owned by init when we go

    async def _reap(self, known: Sequence[Known]) -> dict[str, bool]:
        self._reap_ids += 1
        ident = self._reap_ids
        future: asyncio.Future[p.Message] = asyncio.get_running_loop().create_future()
        self._reaps[ident] = future
        self.send({"op": "reap", "id": ident, "jobs": [p.known_to_json(k) for k in known]})
        reply = await future
        return {str(j["key"]): bool(j["killed"]) for j in reply.get("jobs", ())}


def _lost(why: str) -> ExitInfo:
    return ExitInfo(None, 0, Usage(), time.time(), False, lost=why)


def _alive(pid: int) -> bool:
    """True when `pid` runs and is no zombie (a dead supervisor whose parent, init in a
    container or this server, has not reaped it yet is gone all the same)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False
