"""Integration fixtures: a real server process on a free port with real mTLS certificates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from jobworker import certs
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

IDENTITIES = ("alice", "bob", "viewer", "nobody")
ROLES = {"admin": "admin", "viewer": "viewer", "nobody": "none"}


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate and client certificates made by jobworker's own code."""
    directory = tmp_path_factory.mktemp("certs")
    certs.init_pki(directory)
    for name in IDENTITIES:
        certs.issue_client(directory, name)
    return directory


def write_config(path: Path, pki: Path, data_dir: Path, **sections: dict[str, object]) -> Path:
    """A config file for a test server: port 0, metrics off unless asked, the test's roles."""
    base: dict[str, dict[str, object]] = {
        "server": {"listen": "127.0.0.1:0", "data_dir": str(data_dir), "shutdown_grace": "5s"},
        "tls": {
            "ca_cert": str(pki / "ca.pem"),
            "server_cert": str(pki / "server.pem"),
            "server_key": str(pki / "server-key.pem"),
        },
        "metrics": {"listen": ""},
        "jobs": {"kill_grace": "1s"},
        "auth.roles": dict(ROLES),
    }
    for name, values in sections.items():
        base.setdefault(name.replace("__", "."), {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Server:
    """A jobworker server process and what it logged."""

    config: Path
    pki: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    metrics_port: int = 0
    lines: list[dict[str, object]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        self._ready.clear()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobworker", "serve", "--config", str(self.config)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError("server did not become ready:\n" + "\n".join(self.raw[-30:]))
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            self.raw.append(text)
            try:
                line = json.loads(text)
            except ValueError:
                continue
            self.lines.append(line)
            if line.get("event") == "server_ready":
                self.port = int(str(line["address"]).rsplit(":", 1)[1])
                self._ready.set()
            if line.get("event") == "metrics_ready":
                self.metrics_port = int(str(line["address"]).rsplit(":", 1)[1])

    def events(self, name: str) -> list[dict[str, object]]:
        return [line for line in list(self.lines) if line.get("event") == name]

    def wait_for_log(self, name: str, timeout: float = 10.0, count: int = 1) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no log line {name!r} within {timeout}s:\n" + "\n".join(self.raw[-20:]))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def kill(self) -> None:
        """SIGKILL the server process (only it: jobs are in their own sessions)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)

    def channel(self, identity: str = "alice", *, pki: Path | None = None) -> grpc.Channel:
        directory = pki or self.pki
        creds = grpc.ssl_channel_credentials(
            root_certificates=(self.pki / "ca.pem").read_bytes(),
            private_key=(directory / f"{identity}-key.pem").read_bytes(),
            certificate_chain=(directory / f"{identity}.pem").read_bytes(),
        )
        return grpc.secure_channel(self.address, creds)

    def stub(self, identity: str = "alice") -> pb_grpc.JobWorkerServiceStub:
        return pb_grpc.JobWorkerServiceStub(self.channel(identity))


ServerFactory = Callable[..., Server]


@pytest.fixture
def make_server(tmp_path: Path, pki: Path) -> Iterator[ServerFactory]:
    """Start servers with a config of the test's choosing; all are stopped at the end."""
    started: list[Server] = []

    def factory(data_dir: Path | None = None, **sections: dict[str, object]) -> Server:
        config = write_config(
            tmp_path / f"jobworker-{len(started)}.toml",
            pki,
            data_dir or tmp_path / "data",
            **sections,
        )
        server = Server(config, pki)
        started.append(server)
        return server.start()

    yield factory
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Server]:
    """One server shared by a module's tests."""
    tmp = tmp_path_factory.mktemp("server")
    config = write_config(tmp / "jobworker.toml", pki, tmp / "data")
    srv = Server(config, pki).start()
    yield srv
    srv.stop()


def job(*argv: str, name: str = "", **kwargs: object) -> pb.ScheduleBatchRequest:
    """One JobSpec message of a ScheduleBatch stream."""
    return pb.ScheduleBatchRequest(job=pb.JobSpec(name=name, argv=list(argv), **kwargs))  # type: ignore[arg-type]


def options(**kwargs: object) -> pb.ScheduleBatchRequest:
    """The BatchOptions message of a ScheduleBatch stream."""
    return pb.ScheduleBatchRequest(options=pb.BatchOptions(**kwargs))  # type: ignore[arg-type]


def wait_batch(
    stub: pb_grpc.JobWorkerServiceStub, cid: str, timeout: float = 30.0, **kwargs: object
) -> pb.Batch:
    """Poll GetBatch (tests only) until the batch has ended."""
    deadline = time.monotonic() + timeout
    while True:
        batch = stub.GetBatch(pb.GetBatchRequest(correlation_id=cid, **kwargs)).batch  # type: ignore[arg-type]
        if batch.state != pb.BATCH_STATE_RUNNING or time.monotonic() > deadline:
            return batch
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
