"""The bench's tools: certificates, a jobworker server process, channels, RSS, statistics."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from jobworker import certs
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

IDENTITY = "bench"
MiB = 1024 * 1024
GRPC_OPTIONS = [("grpc.max_receive_message_length", 8 * MiB)]


def make_pki(directory: Path) -> Path:
    """A CA, the server's certificate and the bench client's, made by jobworker's own code."""
    directory.mkdir(parents=True, exist_ok=True)
    certs.init_pki(directory)
    certs.issue_client(directory, IDENTITY)
    return directory


def free_port() -> int:
    """A loopback port free right now (for a server whose address must be known in advance)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_CGROUP_ROOTS = itertools.count()


def write_config(
    path: Path, pki: Path, data_dir: Path, port: int = 0, **sections: dict[str, object]
) -> Path:
    """A server config: loopback, the bench's certificates, the identity `bench` an admin,
    a cgroup root of its own (servers of the bench may run at once, and beside others')."""
    base: dict[str, dict[str, object]] = {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "data_dir": str(data_dir),
            "cgroup_root": f"jobworker-bench-{os.getpid()}-{next(_CGROUP_ROOTS)}",
        },
        "tls": {
            "ca_cert": str(pki / "ca.pem"),
            "server_cert": str(pki / "server.pem"),
            "server_key": str(pki / "server-key.pem"),
        },
        "metrics": {"listen": "127.0.0.1:0"},
        "logging": {"level": "info", "format": "json"},
        "jobs": {"max_concurrent": 8, "kill_grace": "1s"},
        "auth.roles": {IDENTITY: "admin"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def client_identities(pki: Path, names: Sequence[str]) -> None:
    """Client certificates for these identities (role: the server's default, `user`)."""
    for name in names:
        if not (pki / f"{name}.pem").exists():
            certs.issue_client(pki, name)


def channel_credentials(pki: Path, identity: str = IDENTITY) -> grpc.ChannelCredentials:
    """mTLS credentials of a client identity (the bench's own by default)."""
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{identity}-key.pem").read_bytes(),
        certificate_chain=(pki / f"{identity}.pem").read_bytes(),
    )


def aio_channel(
    address: str, pki: Path, extra: Sequence[tuple[str, Any]] = (), identity: str = IDENTITY
) -> aio.Channel:
    """An asyncio channel to `address` with the certificate of `identity`."""
    creds = channel_credentials(pki, identity)
    return aio.secure_channel(address, creds, options=[*GRPC_OPTIONS, *extra])


@dataclass
class ServerProcess:
    """A `python -m jobworker serve` process; its stderr JSON lines are read by a thread."""

    config: Path
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    started_at: float = 0.0  # time.monotonic() just before Popen
    ready_at: float = 0.0  # when the server_ready line was read
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw_tail: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to the server's environment
    _ready: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def settings(self) -> dict[str, Any]:
        return tomllib.loads(self.config.read_text())

    @property
    def data_dir(self) -> Path:
        return Path(self.settings["server"]["data_dir"])

    def supervisor_pid(self) -> int | None:
        """The job supervisor's pid from `data_dir/supervisor.pid`, while it runs (issue 13:
        the server starts it; until it lands there is no such file)."""
        return supervisor_pid(self.data_dir)

    def start(self, timeout: float = 60.0) -> ServerProcess:
        """Start the server and wait for its server_ready line."""
        self.launch()
        if not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError("server not ready:\n" + "\n".join(self.raw_tail[-20:]))
        return self

    def launch(self) -> None:
        """Start the process without waiting (wait_ready() or the event then)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", GRPC_ENABLE_FORK_SUPPORT="false")
        env.update(self.env)
        self._ready.clear()
        self.lines.clear()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobworker", "serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, name="server-log", daemon=True)
        self._reader.start()

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from launch to the server_ready line."""
        if not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError("server not ready:\n" + "\n".join(self.raw_tail[-20:]))
        return self.ready_at - self.started_at

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            self.raw_tail.append(text)
            del self.raw_tail[:-50]
            if '"event": "job_' in text:
                continue  # two a job, not parsed: the bench's CPU is the server's too (2 CPUs)
            try:
                line = json.loads(text)
            except ValueError:
                continue
            event = line.get("event")
            self.lines.append(line)
            if event == "server_ready":
                self.ready_at = time.monotonic()
                self.address = str(line["address"])
                self._ready.set()

    def event(self, name: str) -> dict[str, Any] | None:
        """The first log line with this event, if any."""
        return next((line for line in list(self.lines) if line.get("event") == name), None)

    def rss_bytes(self) -> int:
        """The server's resident set (VmRSS)."""
        return read_rss(self.pid)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; the exit code. Then its job supervisor, if one still runs (by
        the pid in its file), and its emptied cgroups."""
        if self.proc is None:
            return 0
        supervisor = self.supervisor_pid()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self._close()
        stop_supervisor(supervisor or self.supervisor_pid())
        remove_cgroups(str(self.settings["server"]["cgroup_root"]))
        return code

    def kill(self) -> None:
        """SIGKILL this server process (only it: its supervisor and jobs are left)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


def supervisor_pid(data_dir: Path) -> int | None:
    """The pid in `data_dir/supervisor.pid` if that process runs and is jobworker's."""
    try:
        pid = int((data_dir / "supervisor.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"jobworker" in cmdline else None  # not a recycled pid of another program


def stop_supervisor(pid: int | None, timeout: float = 10.0) -> None:
    """SIGTERM the supervisor by its pid, SIGKILL if it is still there after `timeout`."""
    if pid is None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)


def remove_cgroups(root: str) -> None:
    """rmdir the (empty) cgroups a bench server left under its own root, deepest first; a
    group that still holds a process stays."""
    for top in Path("/sys/fs/cgroup").glob(f"*/{root}"):
        for folder in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir():
                with contextlib.suppress(OSError):
                    folder.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def read_pss(pid: int) -> int:
    """Pss of `pid` in bytes (its share of pages shared with others), from smaps_rollup."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss for pid {pid}")


def read_rss(pid: int) -> int:
    """VmRSS of `pid` in bytes, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- client helpers ---------------------------------------------------------------------------


def stub(channel: aio.Channel) -> pb_grpc.JobWorkerServiceStub:
    """The service's stub on an asyncio channel."""
    return pb_grpc.JobWorkerServiceStub(channel)  # type: ignore[no-untyped-call]


async def schedule(
    client: pb_grpc.JobWorkerServiceStub,
    jobs: Sequence[pb.JobSpec],
    max_parallel: int = 0,
) -> str:
    """ScheduleBatch with these jobs; the correlation id."""
    return await send_batch(client, batch_requests(jobs, max_parallel))


def batch_requests(
    jobs: Sequence[pb.JobSpec], max_parallel: int = 0
) -> list[pb.ScheduleBatchRequest]:
    """The ScheduleBatch stream for these jobs: the options, then a message a job."""
    requests = [pb.ScheduleBatchRequest(options=pb.BatchOptions(max_parallel=max_parallel))]
    requests.extend(pb.ScheduleBatchRequest(job=j) for j in jobs)
    return requests


async def send_batch(
    client: pb_grpc.JobWorkerServiceStub, requests: Sequence[pb.ScheduleBatchRequest]
) -> str:
    """ScheduleBatch with a stream made beforehand; the correlation id."""
    response = await client.ScheduleBatch(iter(requests), timeout=120)
    return str(response.correlation_id)


async def follow_to_end(
    client: pb_grpc.JobWorkerServiceStub, cid: str, timeout: float, packed: bool = True
) -> int:
    """Follow a batch's stream until it ends (every job ended); the messages received.
    `packed`: as jobworker's client library asks (several events a message)."""
    count = 0
    call = client.StreamBatchLogs(
        pb.StreamBatchLogsRequest(correlation_id=cid, follow=True, packed=packed), timeout=timeout
    )
    async for _ in call:
        count += 1
    return count


async def wait_batches_ended(
    client: pb_grpc.JobWorkerServiceStub, timeout: float, interval: float = 0.25
) -> None:
    """Poll ListBatches (a few times a second) until no batch is running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = await client.ListBatches(
            pb.ListBatchesRequest(page_size=1, states=[pb.BATCH_STATE_RUNNING]), timeout=30
        )
        if not page.batches:
            return
        await asyncio.sleep(interval)
    raise TimeoutError(f"batches still running after {timeout}s")


# --- statistics and the machine -------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "loadavg_at_start": os.getloadavg(),
    }


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of `pid` itself and of its reaped children."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    # fields after ")": state is [0]; utime, stime, cutime, cstime are stat fields 14-17.
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / tick, (cutime + cstime) / tick
