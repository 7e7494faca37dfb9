"""The Ray driver, in a process of its own: `python -m jobworker.engine.ray_bridge ADDRESS`.

The server (ray_executor.RayExecutor) starts it and talks to it in JSON lines: commands on
its stdin, events on its stdout. It is a process apart because a Ray driver is a process
Ray may end: a driver that loses the cluster's GCS for `gcs_rpc_server_reconnect_timeout_s`
exits, and Ray's import, threads and logging stay out of the server.

Per job it submits ray_node.run_job as a streaming task and appends what it yields to the
job's stdout and stderr files on this host as it comes, so followers read them as they
grow, exactly as for local jobs. It exits when its stdin closes (the server went away);
Ray then kills the job tasks it owned, and each node's agent kills their process trees.

Commands: start (id, argv, env, cwd, stdin, user, out, err, cpus, memory), signal (id, sig),
cancel (id), reap (id, node, pid, pid_start). Events: ready, fatal (message), started (id,
pid, pid_start, node), failed (id, message), ended (id, exit_code, signal, user_cpu,
system_cpu, max_rss, lost), reaped (id, found).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

AGENT_NAME = "jobworker-agent-v1-{node_id}"  # one detached actor per node
NAMESPACE = "jobworker"
BACKPRESSURE = 32  # chunks a job's task may yield ahead of the bridge
CONNECT_TIMEOUT = 5.0  # the TCP check before ray.init
WATCH_AFTER = 1.0  # seconds a job runs before its node's agent watches it (_watch)
NODES_TTL = 2.0  # seconds the bridge trusts its view of the cluster's nodes


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
    gen: Any = None  # the task's ObjectRefGenerator
    info: dict[str, Any] = field(default_factory=dict)  # its "started" event
    signals: list[int] = field(default_factory=list)  # asked before it started
    cancelled: bool = False


class Bridge:
    """The driver's state: jobs by id, nodes, agents."""

    def __init__(self, ray: Any, out_fd: int) -> None:
        self.ray = ray
        self.out_fd = out_fd
        self.jobs: dict[str, _Job] = {}
        self.agents: dict[str, Any] = {}  # by node id
        self.tasks: set[asyncio.Task[None]] = set()
        self._nodes: list[dict[str, Any]] = []
        self._nodes_at = 0.0
        from jobworker.engine import ray_node

        self.run_job = ray.remote(num_returns="streaming", max_retries=0)(ray_node.run_job)
        self.agent_class = ray.remote(ray_node.NodeAgent)

    def emit(self, event: Mapping[str, Any]) -> None:
        """One event line to the server."""
        data = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.out_fd, view) :]

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
            self._nodes = await asyncio.to_thread(self.ray.nodes)
            self._nodes_at = time.monotonic()
        return self._nodes

    async def _run(self, job: _Job) -> None:
        cmd = job.cmd
        try:
            await self._submit(job)
            await self._follow(job)
        except Exception as exc:  # noqa: BLE001  # any Ray error: reported, the job ends
            if not job.info:
                self.emit({"ev": "failed", "id": cmd["id"], "message": _short(exc)})
            else:
                lost = await self._lost(job, exc)
                self.emit({"ev": "ended", "id": cmd["id"], "exit_code": None, "lost": lost})
        finally:
            self.jobs.pop(cmd["id"], None)

    async def _submit(self, job: _Job) -> None:
        cmd = job.cmd
        cpus, memory = float(cmd["cpus"]), int(cmd["memory"])
        await self._check_feasible(cpus, memory)
        stdin = None
        if cmd.get("stdin"):
            stdin = await asyncio.to_thread(_read_file, cmd["stdin"])
        options: dict[str, Any] = {
            "num_cpus": cpus,
            "_generator_backpressure_num_objects": BACKPRESSURE,
        }
        if memory:
            options["memory"] = memory
        job.gen = self.run_job.options(**options).remote(
            cmd["argv"], cmd["env"], cmd["cwd"], stdin, cmd["user"]
        )
        if job.cancelled:
            self.ray.cancel(job.gen)

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

    async def _follow(self, job: _Job) -> None:
        cmd = job.cmd
        fds = {
            "o": os.open(cmd["out"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644),
            "e": os.open(cmd["err"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644),
        }
        try:
            async for ref in job.gen:
                kind, value = await ref
                if kind in fds:
                    _write_all(fds[kind], value)
                elif kind == "started":
                    self._started(job, value)
                elif kind == "failed":
                    self.emit({"ev": "failed", "id": cmd["id"], "message": value})
                    return
                elif kind == "ended":
                    self.emit({"ev": "ended", "id": cmd["id"], **value})
                    return
        finally:
            for fd in fds.values():
                os.close(fd)
        raise RuntimeError("the job's task ended without its exit status")

    def _started(self, job: _Job, info: dict[str, Any]) -> None:
        job.info = info
        self.emit({"ev": "started", "id": job.cmd["id"], **info})
        # Most jobs of a busy cluster end within a second: only longer ones cost the agent a
        # call (a job whose bridge dies within its first second can outlive it).
        asyncio.get_running_loop().call_later(WATCH_AFTER, self._watch, job)
        for sig in job.signals:
            self.agent(info["node_id"]).signal.remote(info["pid"], info["pid_start"], sig)

    def _watch(self, job: _Job) -> None:
        if job.cmd["id"] in self.jobs:
            info = job.info
            agent = self.agent(info["node_id"])
            agent.watch.remote(
                info["pid"], info["pid_start"], info["worker_pid"], info["worker_start"]
            )

    def agent(self, node_id: str) -> Any:
        """The node's agent (made at its first use, or found by name)."""
        found = self.agents.get(node_id)
        if found is None:
            strategy = self.ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            )
            found = self.agents[node_id] = self.agent_class.options(
                name=AGENT_NAME.format(node_id=node_id),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                scheduling_strategy=strategy,
            ).remote()
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
            if job.gen is not None:
                self.ray.cancel(job.gen)  # not started: never runs
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
    while line := await reader.readline():
        bridge.command(json.loads(line))


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

        from jobworker.engine import ray_node

        ray.cloudpickle.register_pickle_by_value(ray_node)  # type: ignore[no-untyped-call]
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
