"""The client commands through click, against a fake service over real mutual TLS."""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jobworker.cli import main
from jobworker.v1 import jobworker_pb2 as pb
from tests.unit.test_client_cursor import (
    EVENTS,
    FakeService,
    change,
    chunk,
    socket_closed_port,
    start_fake_server,
)

ENV_NAMES = (
    "JOBWORKER_SERVER",
    "JOBWORKER_CA",
    "JOBWORKER_CERT",
    "JOBWORKER_KEY",
    "JOBWORKER_SERVER_NAME",
    "JOBWORKER_CONTEXT",
    "JOBWORKER_CLIENT_CONFIG",
    "NO_COLOR",
)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1, and a client certificate for alice."""
    folder = tmp_path_factory.mktemp("certs")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test CA", ca_key, "test CA", ca_key, ca=True)
    for name, server in (("server", True), ("alice", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(name, key, "test CA", ca_key, server=server)
        (folder / f"{name}.pem").write_bytes(_pem_cert(cert))
        (folder / f"{name}-key.pem").write_bytes(_pem_key(key))
    (folder / "ca.pem").write_bytes(_pem_cert(ca))
    return folder


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def address(service: FakeService, certs: Path) -> Iterator[str]:
    credentials = grpc.ssl_server_credentials(
        [((certs / "server-key.pem").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    server, address = start_fake_server(service, credentials)
    yield address
    server.stop(None)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    # No profile of the person running the tests.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def env(certs: Path, address: str) -> dict[str, str]:
    return {
        "JOBWORKER_SERVER": address,
        "JOBWORKER_CA": str(certs / "ca.pem"),
        "JOBWORKER_CERT": str(certs / "alice.pem"),
        "JOBWORKER_KEY": str(certs / "alice-key.pem"),
    }


def run(args: list[str], env: dict[str, str] | None = None, input: Any = None) -> Result:
    return CliRunner().invoke(main, args, env=env, input=input, catch_exceptions=False)


# -- connection options, errors and exit codes --------------------------------------------


def test_closed_port_exits_4_saying_nothing_listens(env: dict[str, str]) -> None:
    with socket_closed_port() as port:
        result = run(["status", "b-1", "--server", f"127.0.0.1:{port}"], env)
    assert result.exit_code == 4
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"jobworker: cannot reach 127.0.0.1:{port}: nothing is listening at 127.0.0.1:{port}"
    )
    assert result.stderr.count("\n") == 1


def test_flag_wins_over_env_and_env_over_default(env: dict[str, str]) -> None:
    with socket_closed_port() as flag_port, socket_closed_port() as env_port:
        env = env | {"JOBWORKER_SERVER": f"127.0.0.1:{env_port}"}
        by_flag = run(["list", "--server", f"127.0.0.1:{flag_port}"], env)
        by_env = run(["list"], env)
    assert by_flag.exit_code == by_env.exit_code == 4
    assert f"cannot reach 127.0.0.1:{flag_port}:" in by_flag.stderr
    assert f"cannot reach 127.0.0.1:{env_port}:" in by_env.stderr


def test_missing_certificate_is_named(tmp_path: Path, env: dict[str, str]) -> None:
    result = run(["list", "--cert", str(tmp_path / "bob.pem")], env)
    assert result.exit_code == 4
    assert "client certificate not found" in result.stderr
    assert "bob.pem" in result.stderr
    assert "make build" in result.stderr
    assert "jobworker certs issue NAME --profile" in result.stderr


def test_default_certificate_paths_are_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run(["list"])
    assert result.exit_code == 4
    # Every missing file at once, not one a run.
    for name in ("var/certs/ca.pem", "var/certs/admin.pem", "var/certs/admin-key.pem"):
        assert f"not found: {name}" in result.stderr


def test_untrusted_client_certificate_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue("mallory", key, "mallory", key)
    (tmp_path / "m.pem").write_bytes(_pem_cert(cert))
    (tmp_path / "m-key.pem").write_bytes(_pem_key(key))
    result = run(
        ["list", "--cert", str(tmp_path / "m.pem"), "--key", str(tmp_path / "m-key.pem")], env
    )
    # Found before any connection: the certificate is not signed by the CA.
    assert result.exit_code == 4
    assert "m.pem (issued by 'CN=mallory') is not signed by the CA" in result.stderr


def test_rpc_error_is_one_line(env: dict[str, str]) -> None:
    result = run(["status", "nope"], env)
    assert result.exit_code == 3
    assert result.stderr == "jobworker: NOT_FOUND: batch nope not found\n"


@pytest.mark.parametrize(
    "args",
    [
        ["submit"],
        ["submit", "-c", "true", "--", "true"],
        ["submit", "-c", "true", "-n", "a", "-n", "b"],
        ["submit", "--follow", "--json", "--", "true"],
        ["submit", "--label", "novalue", "--", "true"],
        ["submit", "--timeout", "soon", "--", "true"],
        ["list", "--state", "sleeping"],
        ["logs", "b-1", "--raw", "--json"],
    ],
)
def test_usage_errors_exit_2(args: list[str], env: dict[str, str]) -> None:
    result = run(args, env)
    assert result.exit_code == 2, result.output


def test_help_does_not_import_grpc() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from jobworker.cli import main\n"
        "try: main(['--help'])\n"
        "except SystemExit: pass\n"
        "assert 'grpc' not in sys.modules and 'rich' not in sys.modules, 'heavy import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# -- submit -------------------------------------------------------------------------------


def test_submit_prints_just_the_id(env: dict[str, str], service: FakeService) -> None:
    result = run(["submit", "--label", "a=1", "--timeout", "5s", "--", "echo", "-n", "hi"], env)
    assert result.exit_code == 0, result.output
    assert result.stdout == "b-1\n"
    options, job = service.schedule_requests[0]
    assert dict(options.options.labels) == {"a": "1"}
    assert list(job.job.argv) == ["echo", "-n", "hi"]
    assert job.job.timeout.seconds == 5


def test_submit_without_dashes_keeps_the_command_s_options(
    env: dict[str, str], service: FakeService
) -> None:
    assert run(["submit", "ls", "-l", "--json"], env).exit_code == 0
    (job,) = service.schedule_requests[0]
    assert list(job.job.argv) == ["ls", "-l", "--json"]


def test_submit_commands_json(env: dict[str, str], service: FakeService) -> None:
    result = run(
        [
            "submit",
            "--json",
            "-c",
            "make",
            "-c",
            "make test",
            "-n",
            "build",
            "--fail-fast",
            "--max-parallel",
            "1",
            "--idempotency-key",
            "k1",
            "-e",
            "A=1",
        ],
        env,
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "correlation_id": "b-1",
        "job_names": ["build", "job-1"],
        "deduplicated": False,
    }
    options, first, second = service.schedule_requests[0]
    assert options.options == pb.BatchOptions(fail_fast=True, max_parallel=1, idempotency_key="k1")
    assert list(first.job.argv) == ["sh", "-c", "make"]
    assert list(second.job.argv) == ["sh", "-c", "make test"]
    assert dict(second.job.env) == {"A": "1"}


def test_submit_batch_file_from_stdin_with_overrides(
    env: dict[str, str], service: FakeService
) -> None:
    text = (
        "options: {labels: {team: a}, max_parallel: 3}\n"
        "jobs:\n- {name: x, command: 'true', timeout: 1s}\n- {name: y, argv: ['true']}\n"
    )
    result = run(["submit", "-f", "-", "--label", "run=2", "--timeout", "9s"], env, input=text)
    assert result.exit_code == 0, result.output
    options, x, y = service.schedule_requests[0]
    assert dict(options.options.labels) == {"team": "a", "run": "2"}
    assert options.options.max_parallel == 3
    assert x.job.timeout.seconds == 1
    assert y.job.timeout.seconds == 9


def test_submit_bad_batch_file_exits_2(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("jobs: [{name: build, argv: [x], timeout: soon}]\n")
    result = run(["submit", "-f", str(path)], env)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"jobworker: {path}:1: jobs[0] (build): timeout: ")


def test_submit_follow_exits_with_the_batch_result(
    env: dict[str, str], service: FakeService
) -> None:
    service.next_events = EVENTS
    service.next_state = pb.BATCH_STATE_FAILED
    result = run(["submit", "--follow", "-n", "a", "--", "true"], env)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "a | -- started",
        "a | one",
        "a | two",
        "a | three",
        "a | -- exited 0 (SUCCEEDED)",
    ]
    assert "jobworker: batch b-1" in result.stderr
    assert "failed" in result.stderr


# -- status -------------------------------------------------------------------------------


def _add_batch(service: FakeService, state: int) -> None:
    service.add(
        pb.Batch(
            correlation_id="b-7",
            owner="alice",
            state=state,
            jobs=[
                pb.Job(
                    index=0,
                    spec=pb.JobSpec(name="build"),
                    state=pb.JOB_STATE_SUCCEEDED,
                    exit_code=0,
                    stdout=pb.LogTail(data=b"built\n", total_bytes=6),
                ),
                pb.Job(index=1, spec=pb.JobSpec(name="test"), state=pb.JOB_STATE_FAILED, signal=9),
            ],
        ),
        [
            chunk("build", b"compiling\nlinking"),
            chunk("test", b"\x00\xffbinary"),
            chunk("test", b"oops\n", pb.LOG_STREAM_STDERR),
            change("build", pb.JOB_STATE_SUCCEEDED, exit_code=0),
        ],
    )


@pytest.mark.parametrize(
    ("state", "code"),
    [
        (pb.BATCH_STATE_SUCCEEDED, 0),
        (pb.BATCH_STATE_FAILED, 1),
        (pb.BATCH_STATE_CANCELED, 1),
        (pb.BATCH_STATE_RUNNING, 1),
    ],
)
def test_status_exit_code_follows_the_batch(
    env: dict[str, str], service: FakeService, state: int, code: int
) -> None:
    _add_batch(service, state)
    result = run(["status", "b-7"], env)
    assert result.exit_code == code
    assert "batch b-7" in result.stdout
    assert "SIGKILL" in result.stdout
    assert "built" not in result.stdout
    assert service.get_requests[-1].log_tail_bytes == 0


def test_status_logs_and_json(env: dict[str, str], service: FakeService) -> None:
    _add_batch(service, pb.BATCH_STATE_SUCCEEDED)
    result = run(["status", "b-7", "--logs", "--tail", "100"], env)
    assert "built" in result.stdout
    assert service.get_requests[-1].log_tail_bytes == 100
    result = run(["status", "b-7", "--json"], env)
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["correlation_id"] == "b-7"
    assert data["jobs"][1]["state"] == "failed"
    assert data["jobs"][0]["stdout"] == {
        "data": "built\n",
        "encoding": "utf-8",
        "total_bytes": 6,
        "truncated": False,
    }
    assert not service.get_requests[-1].HasField("log_tail_bytes")


# -- logs ---------------------------------------------------------------------------------


def test_logs_prefix_lines(env: dict[str, str], service: FakeService) -> None:
    _add_batch(service, pb.BATCH_STATE_SUCCEEDED)
    result = run(["logs", "b-7"], env)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "build | compiling",
        "test  ! oops",
        "build | linking",  # complete once build has ended
        "test  | \x00\ufffdbinary",  # complete once the stream has ended
    ]
    assert "\x1b[" not in result.stdout


def test_logs_no_prefix_and_json(env: dict[str, str], service: FakeService) -> None:
    _add_batch(service, pb.BATCH_STATE_SUCCEEDED)
    result = run(["logs", "b-7", "--no-prefix", "--job", "build"], env)
    assert result.stdout == "compiling\nlinking\n"
    assert list(service.stream_requests[-1].job_names) == ["build"]
    result = run(["logs", "b-7", "--json"], env)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["type"] == "chunk"
    assert lines[0]["job_name"] == "build"
    assert lines[0]["cursor"] == "1"
    binary = lines[1]
    assert (binary["data"], binary["encoding"]) == ("AP9iaW5hcnk=", "base64")
    assert lines[3]["type"] == "state"
    assert lines[3]["state"] == "succeeded"


def test_logs_raw_writes_bytes(env: dict[str, str], service: FakeService) -> None:
    _add_batch(service, pb.BATCH_STATE_SUCCEEDED)
    result = run(["logs", "b-7", "--raw", "--job", "test"], env)
    assert result.exit_code == 0
    assert result.stdout_bytes == b"\x00\xffbinary"
    assert result.stderr_bytes == b"oops\n"


def test_logs_raw_needs_one_job(env: dict[str, str], service: FakeService) -> None:
    _add_batch(service, pb.BATCH_STATE_SUCCEEDED)
    result = run(["logs", "b-7", "--raw"], env)
    assert result.exit_code == 2
    assert "--raw needs exactly one job" in result.stderr


def test_logs_follow_reconnects_and_exits_with_result(
    env: dict[str, str], service: FakeService
) -> None:
    service.add(
        pb.Batch(
            correlation_id="b-1",
            state=pb.BATCH_STATE_FAILED,
            jobs=[pb.Job(spec=pb.JobSpec(name="a"), state=pb.JOB_STATE_SUCCEEDED)],
        ),
        EVENTS,
    )
    service.breaks = [2]
    result = run(["logs", "-f", "b-1"], env)
    assert result.stdout.splitlines() == [
        "a | -- started",
        "a | one",
        "a | two",
        "a | three",
        "a | -- exited 0 (SUCCEEDED)",
    ]
    assert (
        "jobworker: stream broke (UNAVAILABLE: connection reset by peer (fake)), "
        "reconnecting from cursor" in result.stderr
    )
    assert result.exit_code == 1
    # With --job, the selected jobs' own result counts.
    service.breaks = []
    assert run(["logs", "-f", "b-1", "--job", "a"], env).exit_code == 0


# -- cancel and list ----------------------------------------------------------------------


def test_cancel_prints_the_table_or_json(env: dict[str, str], service: FakeService) -> None:
    _add_batch(service, pb.BATCH_STATE_RUNNING)
    result = run(["cancel", "b-7", "--job", "test", "--grace", "2s"], env)
    assert result.exit_code == 0, result.output
    assert "canceled" in result.stdout
    request = service.cancel_requests[0]
    assert list(request.job_names) == ["test"]
    assert request.grace_period.seconds == 2
    result = run(["cancel", "b-7", "--json"], env)
    assert json.loads(result.stdout)["state"] == "canceled"


def test_list_table_limit_and_json(env: dict[str, str], service: FakeService) -> None:
    service.summaries = [
        pb.BatchSummary(
            correlation_id=f"b-{i}",
            owner="alice",
            state=pb.BATCH_STATE_SUCCEEDED,
            job_count=2,
            jobs_by_state={"JOB_STATE_SUCCEEDED": 2},
            labels={"team": "a"},
        )
        for i in range(30)
    ]
    result = run(["list", "--limit", "5", "--label", "team=a", "--state", "succeeded"], env)
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [f"b-{i}" for i in range(5)]
    assert "2/2 ok" in rows[0]
    assert "more with --limit N or --all" in result.stderr
    request = service.list_requests[0]
    assert dict(request.labels) == {"team": "a"}
    assert list(request.states) == [pb.BATCH_STATE_SUCCEEDED]
    result = run(["list", "--all", "--json"], env)
    assert len(json.loads(result.stdout)["batches"]) == 30


def test_list_empty(env: dict[str, str]) -> None:
    result = run(["list"], env)
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr == "no batches\n"


def test_cli_help_names_the_client_s_defaults() -> None:
    from jobworker import client

    text = run(["list", "--help"]).stdout
    for default in (client.DEFAULT_SERVER, client.DEFAULT_CA, client.DEFAULT_CERT):
        assert str(default) in " ".join(text.split())


# -- verbs of issue 14 whose end-to-end tests come with the server side ------------------


def test_delete_stops_at_the_first_refusal(env: dict[str, str], service: FakeService) -> None:
    _add_batch(service, pb.BATCH_STATE_SUCCEEDED)
    service.add(pb.Batch(correlation_id="b-8", state=pb.BATCH_STATE_RUNNING))
    result = run(["delete", "b-7", "b-8", "--json"], env)
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"deleted": ["b-7"]}
    assert "FAILED_PRECONDITION: batch is running" in result.stderr
    assert "b-7" not in service.batches
    assert run(["delete", "b-7"], env).exit_code == 3


def test_logs_tail_asks_for_lines_and_a_resumed_stream_does_not(
    env: dict[str, str], service: FakeService
) -> None:
    service.add(
        pb.Batch(
            correlation_id="b-1",
            state=pb.BATCH_STATE_SUCCEEDED,
            jobs=[pb.Job(spec=pb.JobSpec(name="a"), state=pb.JOB_STATE_SUCCEEDED)],
        ),
        EVENTS,
    )
    service.breaks = [2]
    result = run(["logs", "b-1", "-f", "--tail", "5"], env)
    assert result.exit_code == 0, result.output
    first, resumed = service.stream_requests
    assert first.HasField("tail_lines")
    assert first.tail_lines == 5
    assert resumed.cursor == "2"
    assert not resumed.HasField("tail_lines")
    run(["logs", "b-1"], env)
    assert not service.stream_requests[-1].HasField("tail_lines")


def test_wait_asks_for_no_old_output_and_exits_as_status(
    env: dict[str, str], service: FakeService
) -> None:
    _add_batch(service, pb.BATCH_STATE_FAILED)
    result = run(["wait", "b-7", "--json"], env)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["batches"][0]["state"] == "failed"
    assert service.stream_requests[-1].tail_lines == 0
    assert run(["wait", "nope"], env).exit_code == 3


def test_piped_stdin_without_i_is_refused_only_for_a_real_pipe(
    env: dict[str, str], service: FakeService
) -> None:
    # CliRunner's stdin is no file descriptor: nothing to refuse, nothing sent.
    assert run(["submit", "--", "cat"], env, input="data").exit_code == 0
    assert run(["submit", "-i", "--", "cat"], env, input="data").exit_code == 0
    assert service.schedule_requests[-1][0].job.stdin == b"data"
    result = run(["submit", "-i", "-c", "a", "-c", "b"], env, input="x")
    assert result.exit_code == 2
    assert "-i sends stdin to one job; there are 2" in result.stderr
