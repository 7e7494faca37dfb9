"""The Ray driver, in a process of its own: `python -m jobworker.engine.ray_bridge ADDRESS`.

The server (ray_executor.RayExecutor) starts it and talks to it in JSON lines: commands on
its stdin, events on its stdout. It is a process apart because a Ray driver is a process
Ray may end: a driver that loses the cluster's GCS for `gcs_rpc_server_reconnect_timeout_s`
exits, and Ray's import, threads and logging stay out of the server.

Per job it submits ray_node.run_job as a plain task. A job that ends at once comes back
whole in the task's answer; any other's output, start and end come from its node's agent
(ray_agent.py): the bridge pulls each alive node's agent for the events of its jobs there,
all jobs of a node in one call, and appends output to the job's stdout and stderr files on
this host as it comes, so followers read them as they grow, exactly as for local jobs.
It exits when its stdin closes (the server went away); Ray then kills the job tasks it
owned, and each node's agent kills their process trees.

Commands: start (id, argv, env, cwd, stdin, user, out, err, cpus, memory, limits: the
job's cpu_millis, memory_bytes and pids_max, enforced on its node), signal (id, sig),
cancel (id), reap (id, node, pid, pid_start). Events: ready, fatal (message), started (id,
pid, pid_start, node), failed (id, message), ended (id, exit_code, signal, user_cpu,
system_cpu, max_rss, oom_killed, lost), ran (id, started: the started event's fields, and the ended
event's: a job that ended at once), reaped (id, found), gone (message: why it exits now).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

NAMESPACE = "jobworker"  # ray_agent.NAMESPACE (the bridge imports Ray's modules late)
CONNECT_TIMEOUT = 5.0  # the TCP check before ray.init
NODES_TTL = 2.0  # seconds the bridge trusts its view of the cluster's nodes (and new ones wait)
PULL_WAIT = 10.0  # seconds an agent holds a pull that has nothing to return
GCS_LOST = 20.0  # seconds without an answer from the cluster's GCS: the cluster is gone
END_WAIT = 12.0  # seconds past its task a job's end may take to come from its agent
BEGUN_WAIT = 3.0  # for the agent's word on a job whose task's worker died as it started


def local_address(host: str) -> str:
    """This host's address toward `host` (a UDP connect sends nothing): what Ray's nodes
    reach the driver at, instead of whatever Ray would pick (module doc of ray_executor)."""
    if ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return str(probe.getsockname()[0])


def check_reachable(address: str) -> None:
    """OSError naming the reason when nothing answers at host:port."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT):
        pass


@dataclass
class _Job:
    cmd: Mapping[str, Any]
    ref: Any = None  # the task's ObjectRef
    info: dict[str, Any] = field(default_factory=dict)  # its "started" event
    signals: list[int] = field(default_factory=list)  # asked before it started
    cancelled: bool = False
    fds: dict[str, int] = field(default_factory=dict)  # its stdout and stderr files, opened
    done: asyncio.Event = field(default_factory=asyncio.Event)  # its "ended" event is sent

    def write(self, kind: str, data: bytes) -> None:
        fd = self.fds.get(kind)
        if fd is None:
            path = self.cmd["out" if kind == "o" else "err"]
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = self.fds[kind] = os.open(path, flags, 0o644)
        _write_all(fd, data)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class Bridge:
    """The driver's state: jobs by id, and a pull of each node's agent."""

    def __init__(self, ray: Any, out_fd: int) -> None:
        self.ray = ray
        self.out_fd = out_fd
        self.token = uuid.uuid4().hex  # names this bridge's queue in every agent
        self.jobs: dict[str, _Job] = {}
        self.agents: dict[str, Any] = {}  # by node id
        self.pullers: dict[str, asyncio.Task[None]] = {}  # by node id
        self.tasks: set[asyncio.Task[None]] = set()
        self._nodes: list[dict[str, Any]] = []
        self._nodes_at = 0.0
        self._asking: asyncio.Future[None] | None = None
        self._out: list[bytes] = []
        from jobworker.engine import ray_agent, ray_node

        self.run_job = ray.remote(max_retries=0)(ray_node.run_job)
        self.agent_handle = ray_agent.agent_handle
        self._tasks: dict[tuple[float, int], Any] = {}  # run_job by its resources

    def emit(self, event: Mapping[str, Any]) -> None:
        """One event line to the server; the lines of one turn of the loop go together."""
        self._out.append((json.dumps(event, separators=(",", ":")) + "\n").encode())
        if len(self._out) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop yet: the "ready" line
                self.flush()

    def flush(self) -> None:
        data, self._out = b"".join(self._out), []
        _write_all(self.out_fd, data)

    def command(self, cmd: Mapping[str, Any]) -> None:
        """Act on one command line."""
        op = cmd.get("op")
        if op == "start":
            job = self.jobs[cmd["id"]] = _Job(cmd)
            self._spawn(self._run(job))
        elif op in ("signal", "cancel"):
            self._signal(cmd["id"], int(cmd.get("sig", signal.SIGKILL)), op == "cancel")
        elif op == "reap":
            self._spawn(self._reap(cmd))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def nodes(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Ray's node table (alive and dead), at most NODES_TTL old unless `fresh`."""
        if fresh or time.monotonic() - self._nodes_at > NODES_TTL:
            if self._asking is None:  # one question to the GCS for every job that waits
                self._asking = asyncio.ensure_future(self._ask_nodes())
            await asyncio.shield(self._asking)
        return self._nodes

    async def _ask_nodes(self) -> None:
        try:
            self._nodes = await asyncio.to_thread(self.ray.nodes)
            self._nodes_at = time.monotonic()
        finally:
            self._asking = None
        for node in self._nodes:
            if node["Alive"] and node["NodeID"] not in self.pullers:
                task = asyncio.get_running_loop().create_task(self._pull(node["NodeID"]))
                self.pullers[node["NodeID"]] = task

    async def watch_nodes(self) -> None:
        """Keep pulling every alive node's agent, new nodes' too. A GCS that stops answering
        ends the bridge (and its jobs, LOST) after GCS_LOST seconds, not Ray's minute."""
        answered = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(self.nodes(fresh=True)), NODES_TTL * 2)
                answered = time.monotonic()
            except Exception as exc:  # noqa: BLE001  # timeout or any Ray error alike
                if time.monotonic() - answered > GCS_LOST:
                    why = f"its GCS did not answer for {GCS_LOST:g}s ({_short(exc)})"
                    self.emit({"ev": "gone", "message": why})
                    self.flush()
                    os._exit(3)
            await asyncio.sleep(NODES_TTL)

    async def _pull(self, node_id: str) -> None:
        """The events of this bridge's jobs on the node, until its agent cannot be reached
        (the node is gone, or its agent: watch_nodes starts another puller)."""
        try:
            agent = self.agent(node_id)
            pull = agent.pull.remote(self.token, PULL_WAIT)
            while True:
                events = await pull
                pull = agent.pull.remote(self.token, PULL_WAIT)  # the next, while these are written
                for kind, job_id, value in events:
                    if (job := self.jobs.get(job_id)) is not None:
                        self._event(job, kind, value)
        except Exception as exc:  # noqa: BLE001  # any Ray error: logged, pulled again later
            print(f"node {node_id[:12]}: its agent: {_short(exc)}", file=sys.stderr)
            self.agents.pop(node_id, None)
            await asyncio.sleep(1.0)
        finally:
            self.pullers.pop(node_id, None)

    def _event(self, job: _Job, kind: str, value: Any) -> None:
        if kind in ("o", "e"):
            job.write(kind, value)
        elif kind == "started":
            self._started(job, value)
        elif kind == "ended" and not job.done.is_set():
            job.done.set()
            job.close()
            self.emit({"ev": "ended", "id": job.cmd["id"], **value})

    async def _run(self, job: _Job) -> None:
        cmd = job.cmd
        try:
            result = await self._submit(job)
            if "failed" in result:
                self.emit({"ev": "failed", "id": cmd["id"], "message": result["failed"]})
                return
            if "info" in result:  # it ended at once: all of it came in the task's answer
                job.info = result["info"]
                for kind, data in result["output"]:
                    job.write(kind, data)
                job.done.set()
                self.emit({"ev": "ran", "id": cmd["id"], "started": job.info, **result["exit"]})
                return
            # Its end comes from its agent once its output is read (a few ms later, or
            # DRAIN_SECONDS): the task's own word only if that never comes.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.done.wait(), END_WAIT)
            self._event(job, "ended", result["exit"])
        except Exception as exc:  # noqa: BLE001  # any Ray error: reported, the job ends
            if not job.info and type(exc).__name__ in ("WorkerCrashedError", "OutOfMemoryError"):
                # It may have started: its agent then says so, with a lost end (ray_agent).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(job.done.wait(), BEGUN_WAIT)
            if not job.info:
                self.emit({"ev": "failed", "id": cmd["id"], "message": _short(exc)})
            elif not job.done.is_set():
                lost = await self._lost(job, exc)
                self.emit({"ev": "ended", "id": cmd["id"], "exit_code": None, "lost": lost})
        finally:
            self.jobs.pop(cmd["id"], None)
            job.close()

    async def _submit(self, job: _Job) -> dict[str, Any]:
        cmd = job.cmd
        cpus, memory = float(cmd["cpus"]), int(cmd["memory"])
        await self._check_feasible(cpus, memory)
        stdin = None
        if cmd.get("stdin"):
            stdin = await asyncio.to_thread(_read_file, cmd["stdin"])
        what = {k: cmd[k] for k in ("id", "argv", "env", "cwd", "user", "limits")}
        what["stdin"] = stdin
        job.ref = self._task(cpus, memory).remote(self.token, what)
        if job.cancelled:
            self.ray.cancel(job.ref)
        result: dict[str, Any] = await job.ref
        return result

    def _task(self, cpus: float, memory: int) -> Any:
        """run_job with these resources (Ray's options() is too slow to call per job)."""
        task = self._tasks.get((cpus, memory))
        if task is None:
            options: dict[str, Any] = {"num_cpus": cpus}
            if memory:
                options["memory"] = memory
            task = self._tasks[(cpus, memory)] = self.run_job.options(**options)
        return task

    async def _check_feasible(self, cpus: float, memory: int) -> None:
        alive = [n for n in await self.nodes() if n.get("Alive")]
        fits = [
            n
            for n in alive
            if n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("memory", 0) >= memory
        ]
        if not fits:
            largest = max((n["Resources"].get("CPU", 0) for n in alive), default=0)
            raise RuntimeError(
                f"no node of the Ray cluster offers {cpus:g} CPUs and {memory} bytes of "
                f"memory ({len(alive)} nodes alive; the most CPUs a node has: {largest:g})"
            )

    def _started(self, job: _Job, info: dict[str, Any]) -> None:
        job.info = info
        self.emit({"ev": "started", "id": job.cmd["id"], **info})
        for sig in job.signals:
            self.agent(info["node_id"]).signal.remote(info["pid"], info["pid_start"], sig)

    def agent(self, node_id: str) -> Any:
        """The node's agent (made at its first use, or found by name)."""
        found = self.agents.get(node_id)
        if found is None:
            found = self.agents[node_id] = self.agent_handle(node_id)
        return found

    def _signal(self, job_id: str, sig: int, cancel: bool) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return  # ended meanwhile
        if job.info:
            self.agent(job.info["node_id"]).signal.remote(
                job.info["pid"], job.info["pid_start"], sig
            )
        elif cancel:
            job.cancelled = True
            if job.ref is not None:
                self.ray.cancel(job.ref)  # not started: never runs
        else:
            job.signals.append(sig)

    async def _lost(self, job: _Job, exc: Exception) -> str:
        """The message of a job whose task died: its node's loss if Ray says so."""
        node_id, node = job.info["node_id"], job.info["node"]
        deadline = time.monotonic() + 30.0  # Ray's health checks take a while to decide
        while time.monotonic() < deadline:
            for entry in await self.nodes(fresh=True):
                if entry["NodeID"] == node_id and not entry["Alive"]:
                    return f"node lost: {node} (Ray node {node_id[:12]}): {_short(exc)}"
            if not _maybe_node_loss(exc):
                break
            await asyncio.sleep(1.0)
        return f"Ray task died on node {node}: {_short(exc)}"

    async def _reap(self, cmd: Mapping[str, Any]) -> None:
        found = False
        try:
            for entry in await self.nodes(fresh=True):
                if entry["Alive"] and entry["NodeManagerAddress"] == cmd["node"]:
                    agent = self.agent(entry["NodeID"])
                    ref = agent.signal.remote(cmd["pid"], cmd["pid_start"], signal.SIGKILL)
                    found = bool(await ref) or found
        finally:
            self.emit({"ev": "reaped", "id": cmd["id"], "found": found})


def _maybe_node_loss(exc: Exception) -> bool:
    name = type(exc).__name__
    return (
        name in ("NodeDiedError", "WorkerCrashedError", "RaySystemError")
        or "node" in str(exc).lower()
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def _read_file(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def _serve(bridge: Bridge) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    watcher = loop.create_task(bridge.watch_nodes())
    while line := await reader.readline():
        bridge.command(json.loads(line))
    watcher.cancel()
    bridge.flush()


def main(argv: list[str]) -> int:
    """Connect to the cluster at argv[0], say ready (or fatal), serve until stdin closes."""
    address = argv[0]
    out_fd = os.dup(1)  # the protocol's; Ray's prints go to stderr
    os.dup2(2, 1)
    try:
        host = address.rpartition(":")[0].strip("[]")
        node_ip = local_address(host)
        if node_ip == "127.0.0.1":  # keep Ray on loopback (docs/cluster.md)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        check_reachable(address)
        import ray
        import ray.cloudpickle

        from jobworker.engine import ray_agent, ray_limits, ray_node

        for module in (ray_agent, ray_limits, ray_node):
            ray.cloudpickle.register_pickle_by_value(module)  # type: ignore[no-untyped-call]
        ray.init(
            address=address,
            _node_ip_address=node_ip,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        bridge = Bridge(ray, out_fd)
        bridge.emit({"ev": "ready", "nodes": len(ray.nodes())})  # type: ignore[no-untyped-call]
    except Exception as exc:  # noqa: BLE001  # whatever it is, the server is told why
        os.write(out_fd, (json.dumps({"ev": "fatal", "message": _short(exc)}) + "\n").encode())
        return 1
    asyncio.run(_serve(bridge))
    os._exit(0)  # the tasks it owns die with it; ray.shutdown() could wait on a lost GCS


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
