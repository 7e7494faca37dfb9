"""`jobworker supervise`: the job supervisor, the parent of every local job.

Jobs belong to the host, not to one server process (contract 6.3): this small process (no
gRPC, no store) starts, reaps and records them until the server has journaled each end,
and outlives a server that stops or dies (docs/ARCHITECTURE.md, "The job supervisor").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from jobworker import logging as jwlogging
from jobworker.engine.cgroups.backend import CgroupBackend
from jobworker.engine.cgroups.group import JobCgroup
from jobworker.engine.executor import ExitInfo, SpawnError
from jobworker.engine.running import Process, kill_stale
from jobworker.engine.spawn import Spawner
from jobworker.model import Usage
from jobworker.supervisor import protocol as p
from jobworker.supervisor.ledger import Ledger, Record

log = structlog.get_logger()

_FIRST_CONNECT_WAIT = 10.0  # seconds a new supervisor waits for a server before leaving
_STOP_GRACE = 10.0  # SIGTERM to the supervisor: each job's TERM-to-KILL grace


@dataclass(eq=False, slots=True)
class _Entry:
    """A job this supervisor started: its process until it ends, then how it ended."""

    key: str
    attempt: int
    begun: float = 0.0  # when its start began (the ledger's "begin")
    process: Process | None = None
    started: p.Message | None = None
    ended: ExitInfo | None = None


class Daemon:
    """The supervisor's state: its jobs, its one server connection, its cgroups."""

    def __init__(self, data_dir: Path, backend: CgroupBackend, listener: socket.socket) -> None:
        self.data_dir = data_dir
        self.ledger = Ledger(data_dir / p.LEDGER_FILE)
        self.backend = backend
        self.spawner = Spawner(backend, default_working_dir="/")
        self.listener = listener
        self.jobs: dict[str, _Entry] = {}
        self._conn: asyncio.StreamWriter | None = None
        self._outbox = p.Outbox()
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
        await self._restore()
        server = await asyncio.start_unix_server(self._serve, sock=self.listener, limit=p.MAX_LINE)
        log.info("supervisor_ready", pid=os.getpid(), jobs=len(self.jobs), resumed=resume)
        jwlogging.flush()
        async with server:
            asyncio.get_running_loop().call_later(_FIRST_CONNECT_WAIT, self._first_wait_over)
            await self._leave.wait()
            self._outbox.flush()
            if self._conn is not None:
                self._conn.close()
            if self._serving:
                await asyncio.wait(list(self._serving))
        if self._starting:
            await asyncio.wait(list(self._starting))
        self.ledger.close(empty=not self.jobs)
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

    # -- the ledger (supervisor/ledger.py)

    async def _restore(self) -> None:
        """Take back what the ledger records: ended jobs; running ones that are this
        process's children (a re-exec keeps them); the others may have run and are gone
        or orphaned: killed, and recorded lost. Then kill what no job owns."""
        for record in self.ledger.replay().values():
            try:
                self._restore_one(record)
            except (KeyError, TypeError, ValueError, OSError) as exc:
                log.warning("ledger_record_skipped", key=record.key, error=str(exc)[:200])
        owned = {
            str(e.started.get("cgroup") or e.key)
            for e in self.jobs.values()
            if e.process is not None and e.started is not None
        }
        killed = await asyncio.to_thread(_kill_orphans, self.backend, owned)
        if killed:
            log.warning("orphan_jobs_killed", cgroups=killed)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.backend.cleanup_stale, frozenset(owned))

    def _restore_one(self, record: Record) -> None:
        entry = _Entry(record.key, record.attempt, record.begun)
        self.jobs[entry.key] = entry
        started = record.started
        if started is None:  # began, not known to have started: it may have run
            entry.started = _started_unknown(record)
            self._end(entry, _lost("the job supervisor stopped while starting it", record.begun))
            return
        entry.started = started
        if record.ended is not None:
            entry.ended = p.exit_from(record.ended)
            return
        pid, ticks = int(started["pid"]), int(started["pid_start"])
        if _child(pid, ticks):
            group = self.backend.open(str(started.get("cgroup") or entry.key))
            if group is None:  # no cgroups here (or removed from outside)
                group = JobCgroup(entry.key)
            entry.process = self.spawner.adopt(pid, ticks, float(started["start_time"]), group)
            self._watch(entry, entry.process)
            return
        # A running job of a supervisor that died: nobody could reap it.
        cgroup = str(started.get("cgroup") or entry.key)
        killed = kill_stale(pid, ticks, cgroup, self.backend)
        why = "the job supervisor died while it ran; "
        why += "its processes were killed" if killed else "nothing was left of it"
        self._end(entry, _lost(why, time.time()))

    def _end(self, entry: _Entry, info: ExitInfo) -> None:
        """Record the end (the ledger first), tell the server when one is connected."""
        entry.ended = info
        message = _ended(entry)
        self._write(message)
        self._send(message)

    def _compact(self) -> None:
        live: list[p.Message] = []
        for e in self.jobs.values():
            live.append(_begin(e))
            if e.started is not None:
                live.append(e.started)
            if e.ended is not None:
                live.append(_ended(e))
        try:
            self.ledger.compact(live)
        except OSError as exc:
            log.error("ledger_compact_failed", path=str(self.ledger.path), error=str(exc))

    def _write(self, record: p.Message) -> None:
        try:
            self.ledger.write(record)
        except OSError as exc:  # a full disk: the server still hears it while connected
            log.error("ledger_write_failed", path=str(self.ledger.path), error=str(exc))

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
                self._use(None)
                log.info("server_disconnected", running=self._running())
            writer.close()
            self._check_idle()

    async def _take_connection(self, writer: asyncio.StreamWriter) -> None:
        old = self._conn
        self._use(writer)
        if old is not None:  # a new server: the old one is gone or going
            old.close()
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
        self._outbox.send(message)

    def _use(self, conn: asyncio.StreamWriter | None) -> None:
        self._outbox.use(conn)  # the old server's messages to the old server
        self._conn = conn

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
                self._write({"op": "ack", "key": entry.key, "attempt": entry.attempt})
                if self.ledger.due:
                    self._compact()
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
        entry = _Entry(key, attempt, time.time())
        # On disk before the job can run a line: a crash from here on never starts it twice.
        try:
            self.ledger.write(_begin(entry))
        except OSError as exc:  # a full disk: a start not recorded is a start not made
            message = f"cannot record the job's start in {self.ledger.path}: {exc.strerror}"
            self._send({"op": "failed", "key": key, "attempt": attempt, "message": message})
            return
        self.jobs[key] = entry
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
            self._write({"op": "ack", "key": entry.key, "attempt": entry.attempt})  # never ran
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
        self._write(entry.started)
        self._send(entry.started)
        self._watch(entry, process)

    def _watch(self, entry: _Entry, process: Process) -> None:
        """Record the job's end when it comes (a callback: no task held per running job)."""

        def ended(info: ExitInfo) -> None:
            self._end(entry, info)
            self._check_idle()

        process.on_end(ended)

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


def _begin(entry: _Entry) -> p.Message:
    return {"op": "begin", "key": entry.key, "attempt": entry.attempt, "time": entry.begun}


def _lost(why: str, when: float) -> ExitInfo:
    return ExitInfo(None, 0, Usage(), when, False, lost=why)


def _started_unknown(record: Record) -> p.Message:
    """A "started" message for a job whose start was begun and not seen through."""
    return {
        "op": "started",
        "key": record.key,
        "attempt": record.attempt,
        "pid": 0,
        "pid_start": 0,
        "start_time": record.begun,
        "cgroup": "",
    }


def _child(pid: int, ticks: int) -> bool:
    """True when `pid` is still the process of that start time, and this one's child
    (after a re-exec: execve keeps the children)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return int(fields[1]) == os.getpid() and int(fields[19]) == ticks


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
