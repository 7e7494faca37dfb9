"""A real two-node Ray cluster for tests and the bench (docs/cluster.md, "Testing").

The head runs on this host's side of a veth pair, the second node inside a network
namespace made here, so every byte stays on addresses this code made (never the host's
own external address, which Ray picks by default). Each node is `ray start --block` in a
session of its own, stopped by its process group: never `ray stop`, which stops every Ray
on the machine. The namespace is removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))
# Faster than Ray's defaults at telling a dead node (the node-lost test waits for it).
HEAD_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def why_not() -> str:
    """Why this host cannot run the cluster ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root (a network namespace for the second node)"
    if shutil.which("ip") is None:
        return "needs ip(8) (iproute2)"
    try:
        import ray  # noqa: F401
    except ImportError:
        return "needs the ray extra (pip install 'jobworker[ray]')"
    return ""


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def session_pids(sid: int) -> list[int]:
    """The processes of session `sid` (Ray's workers take process groups of their own but
    stay in the session of the `ray start` that made their raylet)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2 :].split()[3]) == sid:
                pids.append(int(name))
    return pids


def _kill_session(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    for pid in session_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@dataclass
class RayCluster:
    """The head at head_ip:port, the second node at node_ip in namespace `ns`."""

    tmp: Path
    ns: str
    head_ip: str
    node_ip: str
    port: int
    token_file: Path
    cpus: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    def env(self) -> dict[str, str]:
        """What a driver or node needs: token auth with this cluster's token."""
        return os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    def _common(self, name: str, ip: str) -> list[str]:
        return [
            f"--node-ip-address={ip}",
            f"--temp-dir={self.tmp / name}",
            f"--num-cpus={self.cpus}",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={_free_port('127.0.0.1')}",
            "--block",
        ]

    def start_head(self) -> None:
        argv = [RAY, "start", "--head", f"--port={self.port}", "--include-dashboard=false"]
        argv.append(f"--ray-client-server-port={_free_port(self.head_ip)}")
        self._start("head", [*argv, *self._common("head", self.head_ip)], self.env() | HEAD_ENV)

    def start_node(self) -> None:
        """Start (or start again) the second node inside the namespace."""
        argv = ["ip", "netns", "exec", self.ns, RAY, "start", f"--address={self.address}"]
        self._start("node", [*argv, *self._common("node", self.node_ip)], self.env())

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = (self.tmp / f"{name}.log").open("ab")
        with log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.procs[name] = proc
        deadline = time.monotonic() + 90
        while b"Ray runtime started" not in (self.tmp / f"{name}.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.tmp / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"ray node {name} did not start:\n{tail}")
            time.sleep(0.2)

    def kill_node(self, name: str = "node") -> None:
        """SIGKILL a node's session (raylet, its workers): the node is lost."""
        proc = self.procs.pop(name)
        _kill_session(proc, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """SIGTERM each node's session, SIGKILL what is left; remove the namespace."""
        for name in ("node", "head"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            _kill_session(proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            _kill_session(proc, signal.SIGKILL)  # the session's leftovers too
            proc.wait()
        subprocess.run(["ip", "netns", "del", self.ns], check=False, capture_output=True)


def start_cluster(tmp: Path, cpus: int = 1, index: int = 0) -> RayCluster:
    """Namespace, veth pair, head and second node; stop() undoes it all. `index`: a
    cluster of its own beside the others this process made (names and subnet)."""
    n = (os.getpid() + index) % 200 + 20
    tag = f"{os.getpid()}{index or ''}"
    ns, outside, inside = f"jwray{tag}", f"jwr{tag}a", f"jwr{tag}b"
    head_ip, node_ip = f"10.231.{n}.1", f"10.231.{n}.2"
    tmp.mkdir(parents=True, exist_ok=True)
    token = tmp / "auth_token"
    token.write_text(uuid.uuid4().hex)
    token.chmod(0o600)
    cluster = RayCluster(tmp, ns, head_ip, node_ip, 0, token, cpus)
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _run("ip", "link", "set", inside, "netns", ns)
        _run("ip", "addr", "add", f"{head_ip}/24", "dev", outside)
        _run("ip", "link", "set", outside, "up")
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{node_ip}/24", "dev", inside)
        _run("ip", "netns", "exec", ns, "ip", "link", "set", inside, "up")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        cluster.port = _free_port(head_ip)
        cluster.start_head()
        cluster.start_node()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """Head on this host's side of a veth pair, a second node in a namespace; 1 CPU each.
    One for the whole session (test_ray_executor.py and test_ray_server.py share it)."""
    started = start_cluster(tmp_path_factory.mktemp("ray"), cpus=1)
    yield started
    started.stop()
