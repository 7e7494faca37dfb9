"""Each Ray node's jobworker agent: it reads the output of the node's jobs and signals them.

Only the standard library and ray: the bridge pickles this module by value, as ray_node.

One agent per node: a detached actor with no CPU (`jobworker-agent-v2-<node id>` in Ray
namespace `jobworker`), made by the first bridge or job task that needs it. A job's task
(ray_node.run_job) of a job that did not end at once hands it the job's pid, what the job
wrote so far and the read ends of its stdout and stderr pipes over a Unix socket
(SCM_RIGHTS), and later says how the job's leader ended. The agent reads
the pipes and queues, per bridge, the job's events in order: ("started", id, info), then
("o" | "e", id, bytes) as the job writes them, then ("ended", id, exit) once its pipes end
(or DRAIN_SECONDS after its leader). A bridge pulls its queue from every node's agent, all
jobs of a node in one call; the events of many jobs travel together.

A task's connection closing before its job ended means Ray killed the task's worker (its
owner, the bridge, went away), or the worker died: the agent kills the job's tree, since
Ray kills only the worker, not the job's session. A task tells the agent of its job as it
starts ("begun"), so a worker that dies before the handover leaves no job unwatched
either: the agent kills it and queues its start and a lost end for the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

AGENT_NAME = "jobworker-agent-v2-{node_id}"
NAMESPACE = "jobworker"
READ_MAX = 4 << 20  # bytes read from one pipe in one go
QUEUE_MAX = 32 << 20  # bytes queued for a bridge before the agent stops reading pipes
GATHER_SECONDS = 0.01  # an event waits this long for others to go with it...
GATHER_BYTES = 1 << 20  # ...unless this much output is queued
DRAIN_SECONDS = 2.0  # after the job's leader ended, for what is still in its pipes
MESSAGE_MAX = 128 << 10  # a task's message: JSON and under 2 * ray_node.FIRST_BYTES of output
QUEUE_TTL = 300.0  # seconds a bridge's queue is kept while nobody pulls it

Event = tuple[str, str, Any]


_made: dict[str, Any] = {}  # not functools.cache, which pickles by reference (ray_node)


def _actor_class() -> Any:
    if "agent" not in _made:
        _made["agent"] = ray.remote(NodeAgent)
    return _made["agent"]


def agent_handle(node_id: str) -> Any:
    """The agent of node `node_id`, made there if it has none yet."""
    strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
        node_id=node_id, soft=False
    )
    return (
        _actor_class()
        .options(
            name=AGENT_NAME.format(node_id=node_id),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            scheduling_strategy=strategy,
        )
        .remote()
    )


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


@dataclass
class _Queue:
    """One bridge's events, oldest first; consecutive output of one stream is merged."""

    events: list[list[Any]] = field(default_factory=list)
    size: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pulled: float = field(default_factory=time.monotonic)
    paused: set[_Run] = field(default_factory=set)

    def put(self, kind: str, job_id: str, value: Any) -> None:
        output = kind in ("o", "e")
        last = self.events[-1] if self.events else None
        if output and last is not None and last[:2] == [kind, job_id]:
            last[2].append(value)  # joined once, in take()
        else:
            self.events.append([kind, job_id, [value] if output else value])
        if output:
            self.size += len(value)
        self.ready.set()

    def take(self) -> list[Event]:
        # bytearray: Ray pickles it out of band, without a copy into the pickle
        events = [(k, i, bytearray().join(v) if k in ("o", "e") else v) for k, i, v in self.events]
        self.events, self.size = [], 0
        self.ready.clear()
        self.pulled = time.monotonic()
        return events


@dataclass(eq=False)
class _Run:
    """A job of this node, from its task's word until its ended event is queued."""

    bridge: str
    job_id: str
    pid: int
    pid_start: int
    pipes: dict[int, str]  # read end: "o" or "e"
    exit: dict[str, Any] | None = None
    timer: asyncio.TimerHandle | None = None


class NodeAgent:
    """One per node (module doc): reads its jobs' pipes, queues their events, signals them."""

    def __init__(self) -> None:
        self._listener: socket.socket | None = None
        self._name = ""
        self._queues: dict[str, _Queue] = {}
        self._runs: dict[tuple[str, str], _Run] = {}
        self._by_conn: dict[socket.socket, set[_Run]] = {}
        # The latest job each task's connection began and has not handed over ("begun"; a
        # worker runs one task at a time). One that ended at once stays until replaced.
        self._begun: dict[socket.socket, dict[str, Any]] = {}

    async def address(self) -> str:
        """The Unix socket (abstract, named afresh per agent) job tasks connect to."""
        if self._listener is None:
            self._name = f"\0jobworker-agent-{uuid.uuid4().hex}"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            listener.bind(self._name)
            listener.listen(64)
            listener.setblocking(False)
            asyncio.get_running_loop().add_reader(listener, self._accept, listener)
            self._listener = listener
        return self._name

    async def signal(self, pid: int, pid_start: int, sig: int) -> bool:
        """signal_tree() on this node."""
        return signal_tree(pid, pid_start, sig)

    async def pull(self, bridge: str, wait: float) -> list[Event]:
        """The bridge's queued events, waiting up to `wait` seconds for one."""
        queue = self._queue(bridge)
        if not queue.events:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.ready.wait(), wait)
        if queue.size < GATHER_BYTES:  # more events in one answer: a pull costs Ray a call
            await asyncio.sleep(GATHER_SECONDS)
        events = queue.take()
        loop = asyncio.get_running_loop()
        for run in queue.paused:
            for fd in run.pipes:
                loop.add_reader(fd, self._read, run, fd)
        queue.paused.clear()
        return events

    def _queue(self, bridge: str) -> _Queue:
        queue = self._queues.get(bridge)
        if queue is None:
            now = time.monotonic()
            for old in [b for b, q in self._queues.items() if now - q.pulled > QUEUE_TTL]:
                del self._queues[old]  # its bridge is gone (its jobs went with their tasks)
            queue = self._queues[bridge] = _Queue()
        return queue

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = listener.accept()
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            uid = struct.unpack("3i", creds)[1]
            if uid not in (0, os.geteuid()):  # only Ray's own user hands us jobs
                conn.close()
                return
            conn.setblocking(False)
            self._by_conn[conn] = set()
            asyncio.get_running_loop().add_reader(conn, self._message, conn)

    def _message(self, conn: socket.socket) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(conn, MESSAGE_MAX, 2)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._worker_gone(conn)
                return
            head, _, output = data.partition(b"\n")
            message = json.loads(head)
            if message["op"] == "begun":
                self._begun[conn] = message
            elif message["op"] == "job":
                self._begun.pop(conn, None)
                self._job(conn, message, fds, output)
            elif message["op"] == "exit":
                self._exit(conn, message)

    def _job(
        self, conn: socket.socket, message: dict[str, Any], fds: list[int], output: bytes
    ) -> None:
        """A job handed over by its task: its pipes, what it wrote before, maybe its end."""
        info = message["info"]
        run = _Run(message["bridge"], message["id"], info["pid"], info["pid_start"], {})
        run.pipes = dict(zip(fds, message["pipes"], strict=True))
        self._runs[(run.bridge, run.job_id)] = run
        queue = self._queue(run.bridge)
        queue.put("started", run.job_id, info)
        view = memoryview(output)
        for kind, size in message["output"]:
            queue.put(kind, run.job_id, bytes(view[:size]))
            view = view[size:]
        loop = asyncio.get_running_loop()
        for fd in fds:
            loop.add_reader(fd, self._read, run, fd)
        if message["exit"] is None:
            self._by_conn[conn].add(run)
        else:
            self._exit(conn, message)

    def _exit(self, conn: socket.socket, message: dict[str, Any]) -> None:
        run = self._runs.get((message["bridge"], message["id"]))
        if run is None:
            return
        self._by_conn.get(conn, set()).discard(run)
        run.exit = message["exit"]
        if run.pipes:
            run.timer = asyncio.get_running_loop().call_later(DRAIN_SECONDS, self._end, run)
        else:
            self._end(run)

    def _read(self, run: _Run, fd: int) -> None:
        try:
            data = os.read(fd, READ_MAX)
        except BlockingIOError:
            return
        queue = self._queue(run.bridge)
        if data:
            queue.put(run.pipes[fd], run.job_id, data)
            if queue.size > QUEUE_MAX and run not in queue.paused:
                queue.paused.add(run)  # the bridge is behind: resumed at its next pull
                for pipe in run.pipes:
                    asyncio.get_running_loop().remove_reader(pipe)
            return
        self._close(run, fd)
        if not run.pipes and run.exit is not None:
            self._end(run)

    def _close(self, run: _Run, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        del run.pipes[fd]

    def _end(self, run: _Run) -> None:
        """Queue the job's end; a pipe still open (held by a process that left the job's
        session) is no longer read."""
        if self._runs.pop((run.bridge, run.job_id), None) is None:
            return
        for fd in list(run.pipes):
            self._close(run, fd)
        if run.timer is not None:
            run.timer.cancel()
        queue = self._queue(run.bridge)
        queue.paused.discard(run)
        if run.exit is not None:
            queue.put("ended", run.job_id, run.exit)

    def _worker_gone(self, conn: socket.socket) -> None:
        asyncio.get_running_loop().remove_reader(conn)
        conn.close()
        for run in self._by_conn.pop(conn, set()):
            if run.exit is None:  # its task's worker died under it: its tree goes too
                signal_tree(run.pid, run.pid_start, signal.SIGKILL)
                self._end(run)  # no ended event: the bridge has the task's error
        begun = self._begun.pop(conn, None)
        if begun is None:
            return
        info = begun["info"]
        if signal_tree(info["pid"], info["pid_start"], signal.SIGKILL):  # still running
            why = f"its Ray worker died as the job started (on node {info['node']}); "
            queue = self._queue(begun["bridge"])
            queue.put("started", begun["id"], info)
            lost = {"exit_code": None, "lost": why + "its processes were killed"}
            queue.put("ended", begun["id"], lost)
