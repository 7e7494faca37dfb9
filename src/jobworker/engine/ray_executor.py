"""The Ray executor: jobs run as Ray tasks on the nodes of an existing Ray cluster.

The server never imports Ray. It starts a bridge process (engine/ray_bridge.py, the Ray
driver) at the first job and talks to it in JSON lines: the bridge submits each job as a
plain task (engine/ray_node.py), whose node's agent (engine/ray_agent.py) reads its
output, and appends what the job writes to its stdout and stderr files under data_dir as
it comes, so followers, GetBatch and tails work as for local jobs. A Handle's `node` is
the IP address of the node the job runs on (Ray's NodeManagerAddress); its pid is the
job's pid there. Stop and kill go through the node's agent, which signals the job's
process group and every descendant of its leader. A job's cpu and memory limits are Ray
resource requests; they and pids_max go with it to its node, which enforces them where it
allows (ray_limits.py).

When the bridge cannot connect, start() raises ExecutorUnavailable naming the address;
when the bridge dies (the cluster's GCS stopped answering, the bridge was killed), every
running job ends LOST with a message, and the next start() starts a new bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jobworker.engine.executor import (
    ExecutorUnavailable,
    ExitInfo,
    Handle,
    Known,
    Launch,
    SpawnError,
)
from jobworker.model import Usage

RETRY_AFTER = 5.0  # seconds a failed connection is remembered: starts fail fast meanwhile
STOP_BRIDGE = 10.0  # seconds the bridge has to exit at close before it is killed


def lost_exit(message: str) -> ExitInfo:
    """How a job ended when nothing recorded it: LOST with `message`."""
    return ExitInfo(None, 0, Usage(), time.time(), False, lost=message)


class RayHandle:
    """A job started on a node of the cluster (executor.Handle)."""

    cgroup = ""

    def __init__(self, link: _Link, job_id: str) -> None:
        self._link = link
        self.job_id = job_id
        self.pid = 0
        self.pid_start = 0
        self.node = ""
        self.start_time = 0.0
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[ExitInfo] = loop.create_future()

    @property
    def ended(self) -> bool:
        return self.done.done()

    async def wait(self) -> ExitInfo:
        """The job's end (executor.Handle.wait)."""
        return await asyncio.shield(self.done)

    async def stop(self, grace: float) -> ExitInfo:
        """SIGTERM the job's tree on its node; SIGKILL after `grace` seconds."""
        if not self.ended:
            self._link.send({"op": "signal", "id": self.job_id, "sig": int(signal.SIGTERM)})
            try:
                return await asyncio.wait_for(asyncio.shield(self.done), grace)
            except TimeoutError:
                self.kill()
        return await asyncio.shield(self.done)

    def kill(self) -> None:
        """SIGKILL the job's tree on its node now."""
        if not self.ended:
            self._link.send({"op": "signal", "id": self.job_id, "sig": int(signal.SIGKILL)})


class _Link:
    """One bridge process and its jobs."""

    def __init__(self, process: asyncio.subprocess.Process, address: str) -> None:
        self.process = process
        self.address = address
        self.jobs: dict[str, RayHandle] = {}
        self.reaps: dict[str, asyncio.Future[bool]] = {}
        self.ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.why = ""  # the bridge's own word on why it is about to exit
        self.reader = asyncio.get_running_loop().create_task(
            self._read(), name=f"jobworker-ray-bridge-{process.pid}"
        )

    @property
    def alive(self) -> bool:
        return not self.reader.done()

    def send(self, command: Mapping[str, Any]) -> None:
        """One command line to the bridge (dropped when it has gone: its jobs end LOST)."""
        stdin = self.process.stdin
        if stdin is not None and self.alive and not stdin.is_closing():
            stdin.write(json.dumps(command, separators=(",", ":")).encode() + b"\n")

    async def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            while line := await stdout.readline():
                self._event(json.loads(line))
        finally:
            code = await self.process.wait()
            self._gone(self.why or f"its Ray driver process (the bridge) exited with status {code}")

    def _event(self, event: Mapping[str, Any]) -> None:
        kind = event["ev"]
        if kind == "ready":
            self.ready.set_result("")
        elif kind == "fatal":
            self.ready.set_result(str(event["message"]))
        elif kind == "gone":
            self.why = str(event["message"])
        elif kind == "reaped":
            future = self.reaps.pop(event["id"], None)
            if future is not None and not future.done():
                future.set_result(bool(event["found"]))
        elif (job := self.jobs.get(event["id"])) is not None:
            _job_event(self.jobs, job, event)

    def _gone(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_result(why)
        for job in self.jobs.values():
            if not job.started.done():
                job.started.set_exception(
                    ExecutorUnavailable(f"Ray cluster at {self.address}: {why}")
                )
            elif not job.done.done():
                job.done.set_result(lost_exit(f"Ray cluster at {self.address} lost: {why}"))
        self.jobs.clear()
        for future in self.reaps.values():
            if not future.done():
                future.set_result(False)


def _job_event(jobs: dict[str, RayHandle], job: RayHandle, event: Mapping[str, Any]) -> None:
    kind = event["ev"]
    if kind in ("started", "ran"):
        started = event["started"] if kind == "ran" else event
        job.pid, job.pid_start = int(started["pid"]), int(started["pid_start"])
        # The node's clock when it started the job (its news comes later: a job's first
        # 50 ms on the node), never later than now here.
        job.node = str(started["node"])
        job.start_time = min(float(started.get("time", 0.0)) or time.time(), time.time())
        job.started.set_result(None)
    if kind == "failed":
        jobs.pop(job.job_id, None)
        job.started.set_exception(SpawnError(str(event["message"])))
    elif kind in ("ended", "ran"):
        jobs.pop(job.job_id, None)
        usage = Usage(
            float(event.get("user_cpu", 0.0)),
            float(event.get("system_cpu", 0.0)),
            int(event.get("max_rss", 0)),
        )
        code = event.get("exit_code")
        info = ExitInfo(
            None if code is None else int(code),
            int(event.get("signal", 0)),
            usage,
            time.time(),
            bool(event.get("oom_killed", False)),
            lost=str(event.get("lost", "")),
        )
        if not job.started.done():  # cannot happen in order; never leave start() waiting
            job.started.set_result(None)
        job.done.set_result(info)


class RayExecutor:
    """Runs jobs on the Ray cluster at `address` (executor.Executor)."""

    def __init__(
        self,
        name: str,
        address: str,
        cpus_per_job: float = 1.0,
        *,
        token_file: Path | None = None,
        default_working_dir: str = "/",
        log_path: Path | None = None,
        connect_timeout: float = 60.0,
    ) -> None:
        """`token_file`: the cluster's auth token (Ray's token auth; None: Ray's own default,
        ~/.ray/auth_token); `log_path`: where the bridge's (Ray's) own log lines go."""
        self.name = name
        self.address = address
        self.cpus_per_job = cpus_per_job
        self.token_file = token_file
        self.default_working_dir = default_working_dir
        self.log_path = log_path
        self.connect_timeout = connect_timeout
        self._link: _Link | None = None
        self._lock = asyncio.Lock()
        self._failed: tuple[float, str] | None = None

    def resources(self, launch: Launch) -> tuple[float, int]:
        """The Ray resources a job asks for: (CPUs, memory bytes). Ray takes fractions of a
        CPU up to 1 and whole CPUs above."""
        cpus = launch.limits.cpu_millis / 1000 if launch.limits.cpu_millis else self.cpus_per_job
        if cpus > 1:
            cpus = float(math.ceil(cpus))
        return cpus, launch.limits.memory_bytes

    def enforceable(self) -> frozenset[str]:
        """The limits a job's node enforces where it allows (root, a writable cgroup
        hierarchy: ray_limits.py); elsewhere memory only, as an address-space rlimit, and
        the node logs what it does not enforce. This side cannot see each node."""
        return frozenset({"cpu", "memory", "pids"})

    async def start(self, launch: Launch) -> Handle:
        """Start the job on some node; returns once it runs there (it may wait in Ray's
        queue for resources first). SpawnError when it cannot start there,
        ExecutorUnavailable when the cluster cannot be reached."""
        link = await self._connect()
        job_id = f"{launch.key}/{launch.attempt}"
        job = link.jobs[job_id] = RayHandle(link, job_id)
        link.send(self._start_command(job_id, launch))
        try:
            await asyncio.shield(job.started)
        except asyncio.CancelledError:
            link.send({"op": "cancel", "id": job_id})
            raise
        return job

    def _start_command(self, job_id: str, launch: Launch) -> dict[str, Any]:
        spec, job_dir = launch.spec, Path(os.path.abspath(launch.job_dir))
        cpus, memory = self.resources(launch)
        return {
            "op": "start",
            "id": job_id,
            "argv": list(spec.argv),
            "env": dict(spec.env),
            "cwd": os.path.join(self.default_working_dir, spec.working_dir),
            "stdin": str(job_dir / "stdin") if launch.stdin_file else None,
            "user": launch.user,
            "out": str(job_dir / "stdout"),
            "err": str(job_dir / "stderr"),
            "cpus": cpus,
            "memory": memory,
            "limits": {
                "cpu_millis": launch.limits.cpu_millis,
                "memory_bytes": launch.limits.memory_bytes,
                "pids_max": launch.limits.pids_max,
            },
        }

    async def ready(self) -> None:
        """ExecutorUnavailable, naming the address, when the cluster cannot be reached."""
        await self._connect()

    async def _connect(self) -> _Link:
        async with self._lock:
            if self._link is not None and self._link.alive:
                return self._link
            if self._failed is not None and time.monotonic() - self._failed[0] < RETRY_AFTER:
                raise ExecutorUnavailable(self._failed[1])
            try:
                self._link = await self._open()
            except ExecutorUnavailable as exc:
                self._failed = (time.monotonic(), exc.message)
                raise
            self._failed = None
            return self._link

    async def _open(self) -> _Link:
        env = dict(os.environ)
        if self.token_file is not None:
            env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}
        with contextlib.ExitStack() as stack:
            log: Any = subprocess.DEVNULL
            if self.log_path is not None:
                log = stack.enter_context(self.log_path.open("ab"))
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "jobworker.engine.ray_bridge",
                self.address,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,  # a terminal's ^C reaches the server, which stops it
                limit=1 << 20,
            )
        link = _Link(process, self.address)
        try:
            why = await asyncio.wait_for(asyncio.shield(link.ready), self.connect_timeout)
        except TimeoutError:
            why = f"no answer in {self.connect_timeout:g}s"
        if why:
            await _end(link)
            raise ExecutorUnavailable(f"Ray cluster at {self.address} is unreachable: {why}")
        return link

    async def recover(self, known: Sequence[Known]) -> dict[str, tuple[int, Handle | ExitInfo]]:
        """A Ray job is not taken back after a server restart (its task died with the old
        bridge): each known one is LOST, its leftovers on its node killed."""
        if not known:
            return {}
        try:
            link = await self._connect()
        except ExecutorUnavailable as exc:
            why = f"{exc.message}: its processes there were not checked"
            return {k.key: (k.attempt, lost_exit(_restarted(k, why))) for k in known}
        loop = asyncio.get_running_loop()
        found: dict[str, asyncio.Future[bool]] = {}
        for k in known:
            if k.pid and k.node:
                rid = f"reap/{k.key}"
                found[k.key] = link.reaps[rid] = loop.create_future()
                command = {"op": "reap", "id": rid, "node": k.node, "pid": k.pid}
                link.send(command | {"pid_start": k.pid_start})
        if found:
            await asyncio.wait(found.values(), timeout=30.0)
        result: dict[str, tuple[int, Handle | ExitInfo]] = {}
        for k in known:
            future = found.get(k.key)
            killed = future is not None and future.done() and future.result()
            why = "a Ray job is not taken back after a restart" + (
                "; what was left of it was killed" if killed else ""
            )
            result[k.key] = (k.attempt, lost_exit(_restarted(k, why)))
        return result

    def forget(self, key: str, attempt: int) -> None:
        """Nothing is kept for a restart (recover)."""

    async def close(self, *, stop_jobs: bool) -> None:
        """Stop the bridge; its running jobs end with it (their tasks fate-share with their
        owner), LOST. `stop_jobs`: SIGKILL them first and wait for their ends."""
        link, self._link = self._link, None
        if link is None:
            return
        if stop_jobs and link.alive:
            jobs = list(link.jobs.values())
            for job in jobs:
                job.kill()
            if jobs:
                await asyncio.wait([asyncio.shield(j.done) for j in jobs], timeout=STOP_BRIDGE)
        await _end(link)


def _restarted(known: Known, why: str) -> str:
    where = f" on node {known.node}" if known.node else ""
    return f"server restarted while it ran{where}: {why}"


async def _end(link: _Link) -> None:
    """Close the bridge's stdin (it exits), kill it if it does not, await its reader."""
    if link.process.stdin is not None:
        link.process.stdin.close()
    try:
        await asyncio.wait_for(asyncio.shield(link.reader), STOP_BRIDGE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            link.process.kill()
        await link.reader
