"""Integration fixtures: a real server process on a free port with real mTLS certificates."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from jobworker import certs
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.integration.ray_cluster import cluster  # noqa: F401 - one Ray cluster a session

IDENTITIES = ("alice", "bob", "viewer", "nobody")
_SERVER_NUMBERS = itertools.count()
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
        "server": {
            "listen": "127.0.0.1:0",
            "data_dir": str(data_dir),
            "shutdown_grace": "5s",
            # Each test server has cgroups of its own: parallel runs never clean up each other's.
            "cgroup_root": f"jobworker-test-{os.getpid()}-{next(_SERVER_NUMBERS)}",
        },
        "tls": {
            "ca_cert": str(pki / "ca.pem"),
            "server_cert": str(pki / "server.pem"),
            "server_key": str(pki / "server-key.pem"),
        },
        "metrics": {"listen": ""},
        # "stop": a test's jobs end with its server; tests of "keep" (the default) say so.
        "jobs": {"kill_grace": "1s", "on_server_stop": "stop"},
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
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
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

    def wait_for_log(
        self, name: str, timeout: float = 10.0, count: int = 1
    ) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(
            f"no log line {name!r} within {timeout}s:\n" + "\n".join(self.raw[-20:])
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            last = "\n".join(self.raw[-15:])
            raise AssertionError(
                f"server did not stop in {timeout}s; it said last:\n{last}"
            ) from None
        self._close_pipe()
        return code

    def _close_pipe(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL the server process (only it: jobs are in their own sessions)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipe()

    @property
    def data_dir(self) -> Path:
        with open(self.config, "rb") as f:
            return Path(tomllib.load(f)["server"]["data_dir"])

    def supervisor_pid(self) -> int:
        """The pid of the data_dir's job supervisor while one runs, else 0."""
        try:
            pid = int((self.data_dir / "supervisor.pid").read_text())
        except (OSError, ValueError):
            return 0
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return 0
        return pid if any(b"supervis" in part for part in cmdline) and alive(pid) else 0

    def stop_supervisor(self, timeout: float = 30.0) -> None:
        """SIGTERM the job supervisor left running (it stops its jobs, then leaves)."""
        pid = self.supervisor_pid()
        if not pid:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)

    def crash(self) -> None:
        """SIGKILL the server and its job supervisor, as a crash of the host would take
        both (the jobs are left orphaned, as they are not after a power cut)."""
        supervisor = self.supervisor_pid()
        self.kill()
        if supervisor:
            os.kill(supervisor, signal.SIGKILL)
            wait_gone = time.monotonic() + 10
            while alive(supervisor) and time.monotonic() < wait_gone:
                time.sleep(0.01)

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
    # A server started again on the same data_dir keeps its cgroup root, as in production:
    # it then removes what a killed run left there (pooled groups), and nothing is left.
    roots: dict[Path, str] = {}

    def factory(data_dir: Path | None = None, **sections: dict[str, object]) -> Server:
        directory = data_dir or tmp_path / "data"
        root = roots.setdefault(directory, f"jobworker-test-{os.getpid()}-{next(_SERVER_NUMBERS)}")
        sections["server"] = {"cgroup_root": root, **sections.get("server", {})}
        config = write_config(
            tmp_path / f"jobworker-{len(started)}.toml", pki, directory, **sections
        )
        server = Server(config, pki)
        started.append(server)
        return server.start()

    yield factory
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
    for server in started:  # jobs kept by "keep", or by a server killed with SIGKILL
        server.stop_supervisor()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Server]:
    """One server shared by a module's tests."""
    tmp = tmp_path_factory.mktemp("server")
    config = write_config(tmp / "jobworker.toml", pki, tmp / "data")
    srv = Server(config, pki).start()
    yield srv
    srv.stop()
    srv.stop_supervisor()


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


# --- Helpers for the batch tests (schedule, engine, recovery, access) ---

# An absolute python for jobs (their PATH is the server's minimal one) that the jobs' user
# can run: a root server runs jobs as nobody, and the test's own python may live where
# nobody cannot enter (/root).
PY = next(
    (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)),
    sys.executable,
)


@pytest.fixture
def tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The test's folder, where its jobs may write (markers, pid files). A root server runs
    jobs as nobody (contract 6.2), and pytest's own tmp folders are root's only (another
    pytest session resets them to 0700 at its start): as root, a folder of /tmp's kind
    (sticky: a job cannot replace the test's files), removed at the end."""
    if os.geteuid() != 0:
        yield tmp_path_factory.mktemp("test")
        return
    folder = Path(tempfile.mkdtemp(prefix="jobworker-test-"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def serve_expecting_failure(config: Path, *says: str) -> subprocess.CompletedProcess[str]:
    """`jobworker serve` with `config`, for a start that must fail: it exits non-zero, its
    stderr holds each of `says` and it never said server_ready. What it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "jobworker", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0, result.stderr
    for text in says:
        assert text in result.stderr, result.stderr
    assert "server_ready" not in result.stderr
    return result


def data_dir_of(server: Server) -> Path:
    """The data_dir a test server was configured with."""
    import tomllib

    return Path(tomllib.loads(server.config.read_text())["server"]["data_dir"])


def schedule(
    stub: pb_grpc.JobWorkerServiceStub, *requests: pb.ScheduleBatchRequest
) -> pb.ScheduleBatchResponse:
    """ScheduleBatch with these messages, in order."""
    return stub.ScheduleBatch(iter(requests))  # type: ignore[no-any-return]


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> object:
    """Poll `predicate` until it returns something truthy; that value. Fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def get_job(stub: pb_grpc.JobWorkerServiceStub, cid: str, name: str) -> pb.Job:
    """One job of a batch, by name, as GetBatch shows it."""
    batch = stub.GetBatch(pb.GetBatchRequest(correlation_id=cid, job_names=[name])).batch
    return batch.jobs[0]


def wait_job(
    stub: pb_grpc.JobWorkerServiceStub, cid: str, name: str, state: int, timeout: float = 30.0
) -> pb.Job:
    """Poll GetBatch until job `name` is in `state`."""
    found: list[pb.Job] = []

    def reached() -> bool:
        found[:] = [get_job(stub, cid, name)]
        return found[0].state == state

    try:
        wait_until(reached, timeout, f"job {name} in {pb.JobState.Name(state)}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {found[-1] if found else None}") from None
    return found[0]


def read_pids(path: Path) -> list[int]:
    """The pids a job wrote to `path`, one a line (complete lines only)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def kill_pids(pids: list[int]) -> None:
    """Clean-up only: SIGKILL processes a test job reported, if they are still there."""
    import contextlib

    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """The RpcError `call` raises (fails the test when it succeeds)."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, bytes | str):
            list(result)  # type: ignore[call-overload]
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded; an error was expected")
