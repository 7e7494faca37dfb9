"""The CLI of issue 14 against a real server: profiles, plain-word TLS errors, exit codes,
wait/retry, views, stdin, progress and the --json shape checked against its schema."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives import serialization

from jobworker import certs
from jobworker.client import write_profile
from jobworker.client.jsonshape import json_schema

from .conftest import Server, ServerFactory


def cli(
    *args: str,
    env: dict[str, str],
    stdin: bytes | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`jobworker ARGS` as a user runs it, with exactly the environment given (no
    JOBWORKER_* of the test runner's); stdin empty (/dev/null) unless given."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JOBWORKER_", "GRPC_"))}
    done = subprocess.run(
        [sys.executable, "-m", "jobworker", *args],
        env=base | {"NO_COLOR": "1"} | env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode()
    )


def flags(server: Server, identity: str = "alice", pki: Path | None = None) -> dict[str, str]:
    folder = pki or server.pki
    return {
        "JOBWORKER_SERVER": server.address,
        "JOBWORKER_CA": str(folder / "ca.pem"),
        "JOBWORKER_CERT": str(folder / f"{identity}.pem"),
        "JOBWORKER_KEY": str(folder / f"{identity}-key.pem"),
        "XDG_CONFIG_HOME": "/nonexistent",
    }


def assert_plain(stderr: str) -> None:
    """No gRPC C-core log line and no traceback reached the user."""
    assert "Traceback" not in stderr
    for noise in ("ssl_transport_security", "handshaker", "E0000", "I0000", "WARNING: All log"):
        assert noise not in stderr, stderr


# -- set-up and TLS mistakes --------------------------------------------------------------


def test_profile_from_write_profile_works_from_another_directory(
    server: Server, tmp_path: Path
) -> None:
    # What `certs issue bob --profile FILE` will call: a ready file for another machine.
    cert, key = certs.issue_client(server.pki, "profiled")
    config_dir = tmp_path / "home" / ".config" / "jobworker"
    config_dir.mkdir(parents=True)
    write_profile(
        config_dir / "client.toml",
        context="lab",
        server=server.address,
        ca_pem=(server.pki / "ca.pem").read_bytes(),
        cert_pem=cert.read_bytes(),
        key_pem=key.read_bytes(),
    )
    assert (config_dir / "client.toml").stat().st_mode & 0o077 == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"HOME": str(tmp_path / "home")}
    submitted = cli("submit", "--", "true", env=env, cwd=elsewhere)
    assert submitted.returncode == 0, submitted.stderr
    # The same context by name, and a missing one named in plain words.
    listed = cli("list", "--context", "lab", "--json", env=env, cwd=elsewhere)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["batches"][0]["owner"] == "profiled"
    wrong = cli("list", "--context", "prod", env=env, cwd=elsewhere)
    assert wrong.returncode == 4
    assert "no context 'prod' (contexts: lab)" in wrong.stderr
    # A flag wins over the profile: this server address has nobody listening.
    flagged = cli("list", "--server", "127.0.0.1:1", env=env, cwd=elsewhere)
    assert flagged.returncode == 4
    assert "nothing is listening at 127.0.0.1:1" in flagged.stderr


def test_profile_paths_are_relative_to_the_profile(server: Server, tmp_path: Path) -> None:
    profile = tmp_path / "cfg" / "client.toml"
    profile.parent.mkdir()
    for name in ("ca.pem", "alice.pem", "alice-key.pem"):
        (profile.parent / name).write_bytes((server.pki / name).read_bytes())
    profile.write_text(
        f'current = "a"\n[contexts.a]\nserver = "{server.address}"\n'
        'ca = "ca.pem"\ncert = "alice.pem"\nkey = "alice-key.pem"\n'
    )
    result = cli("list", env={"JOBWORKER_CLIENT_CONFIG": str(profile)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def _other_pki(tmp_path: Path) -> Path:
    other = tmp_path / "other-pki"
    certs.init_pki(other)
    certs.issue_client(other, "alice")
    return other


def test_certificate_of_another_ca_is_explained(server: Server, tmp_path: Path) -> None:
    other = _other_pki(tmp_path)
    # Our CA file, another CA's client certificate: found before connecting.
    mixed = flags(server) | {
        "JOBWORKER_CERT": str(other / "alice.pem"),
        "JOBWORKER_KEY": str(other / "alice-key.pem"),
    }
    result = cli("list", env=mixed)
    assert result.returncode == 4
    assert "is not signed by the CA" in result.stderr
    assert_plain(result.stderr)
    # Another CA altogether: the server's certificate is not one our CA vouches for.
    result = cli("list", env=flags(server, pki=other))
    assert result.returncode == 4
    assert result.stderr.startswith(f"jobworker: cannot reach {server.address}: ")
    assert "has a certificate your CA does not vouch for" in result.stderr
    assert result.stderr.count("\n") == 1
    assert_plain(result.stderr)


def test_mismatched_key_is_reported_with_every_other_problem(
    server: Server, tmp_path: Path
) -> None:
    env = flags(server) | {
        "JOBWORKER_KEY": str(server.pki / "bob-key.pem"),
        "JOBWORKER_CA": str(tmp_path / "missing-ca.pem"),
    }
    result = cli("list", env=env)
    assert result.returncode == 4
    assert f"CA certificate not found: {tmp_path / 'missing-ca.pem'}" in result.stderr
    # With the CA there, the key's mismatch is reported, in words, before any connection.
    result = cli("list", env=flags(server) | {"JOBWORKER_KEY": env["JOBWORKER_KEY"]})
    assert result.returncode == 4
    assert "bob-key.pem does not belong to the certificate" in result.stderr
    assert_plain(result.stderr)


def test_expired_certificate_is_reported(server: Server, tmp_path: Path) -> None:
    ca_cert, ca_key = certs.load_ca(server.pki)
    now = dt.datetime.now(dt.UTC)
    cert, key = certs.sign_certificate(
        ca_cert,
        ca_key,
        "alice",
        server=False,
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    (tmp_path / "old.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "old-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    env = flags(server) | {
        "JOBWORKER_CERT": str(tmp_path / "old.pem"),
        "JOBWORKER_KEY": str(tmp_path / "old-key.pem"),
    }
    result = cli("status", "whatever", env=env)
    assert result.returncode == 4
    assert f"{tmp_path / 'old.pem'} expired on " in result.stderr
    assert_plain(result.stderr)


def test_revoked_certificate_is_explained(
    make_server: ServerFactory, pki: Path, tmp_path: Path
) -> None:
    own = tmp_path / "pki"
    shutil.copytree(pki, own)
    certs.issue_client(own, "carol")
    server = make_server(tls={"crl": str(own / "crl.pem")})
    env = flags(server, "carol", pki=own)
    assert cli("list", env=env).returncode == 0
    revoked = cli("certs", "revoke", "carol", "--dir", str(own), env={})
    assert revoked.returncode == 0, revoked.stderr
    done = cli("list", env=env)
    assert done.returncode == 4, (done.stdout, done.stderr)
    assert "refused this client's certificate" in done.stderr
    assert "revoked" in done.stderr
    assert_plain(done.stderr)


def test_metrics_port_is_not_a_jobworker_server(make_server: ServerFactory) -> None:
    server = make_server(metrics={"listen": "127.0.0.1:0"})
    server.wait_for_log("metrics_ready")
    env = flags(server) | {"JOBWORKER_SERVER": f"127.0.0.1:{server.metrics_port}"}
    result = cli("list", env=env)
    assert result.returncode == 4
    assert "does not speak TLS: not a jobworker server's port" in result.stderr
    assert "WRONG_VERSION_NUMBER" not in result.stderr
    assert_plain(result.stderr)


# -- exit codes, verbs and views ------------------------------------------------------------


def test_exit_codes_of_section_6_5(server: Server) -> None:
    env = flags(server)
    assert cli("status", "no-such-batch", env=env).returncode == 3
    assert cli("submit", "--", "true", env=flags(server, "viewer")).returncode == 5
    assert cli("list", env=flags(server, "nobody")).returncode == 5
    assert cli("submit", "-w", "relative", "--", "true", env=env).returncode == 2
    assert cli("submit", "--bogus-flag", env=env).returncode == 2


def test_wait_retry_and_status_views(server: Server) -> None:
    env = flags(server)
    batch = {
        "jobs": [
            {"name": "build", "command": "echo built"},
            {"name": "flaky", "command": "exit 3", "depends_on": ["build"]},
            {"name": "report", "argv": ["echo", "a long argument list"], "depends_on": "flaky"},
        ]
    }
    submitted = cli("submit", "-f", "-", env=env, stdin=json.dumps(batch).encode())
    cid = submitted.stdout.strip()
    waited = cli("wait", cid, env=env)
    assert waited.returncode == 1
    lines = waited.stdout.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("#"))
    assert header.split() == [
        "#", "name", "state", "exit", "duration", "cpu", "mem", "command", "message"
    ]  # fmt: skip
    assert "echo built" in next(line for line in lines if " build " in line)
    assert "echo 'a long argument list'" in waited.stdout
    # retry --failed: only the jobs that did not succeed, the met dependency dropped.
    retried = cli("retry", cid, "--failed", "--json", env=env)
    assert retried.returncode == 0, retried.stderr
    again = json.loads(retried.stdout)
    assert again["job_names"] == ["flaky", "report"]
    status = cli("wait", again["correlation_id"], "--json", env=env)
    assert status.returncode == 1
    (new,) = json.loads(status.stdout)["batches"]
    assert new["labels"]["retry-of"] == cid
    assert [job["depends_on"] for job in new["jobs"]] == [[], ["flaky"]]
    assert [job["state"] for job in new["jobs"]] == ["failed", "skipped"]
    ok = cli("submit", "--", "true", env=env).stdout.strip()
    assert cli("wait", ok, "--quiet", env=env).returncode == 0


def test_list_shows_short_ids_unless_wide(server: Server) -> None:
    env = flags(server)
    cid = cli("submit", "--label", "view=short", "--", "true", env=env).stdout.strip()
    cli("wait", cid, "-q", env=env)
    short = cli("list", "--label", "view=short", env=env).stdout.splitlines()
    assert short[1].split()[0] == cid[:8]
    wide = cli("list", "--label", "view=short", "--wide", env=env).stdout.splitlines()
    assert wide[1].split()[0] == cid


def test_piped_stdin_goes_to_the_job_with_i_and_is_never_dropped(server: Server) -> None:
    env = flags(server)
    refused = cli("submit", "--follow", "--", "cat", env=env, stdin=b"hi\n")
    assert refused.returncode == 2
    assert "pass -i to send it to the job" in refused.stderr
    sent = cli("submit", "--follow", "-i", "--", "cat", env=env, stdin=b"hi\n")
    assert sent.returncode == 0, sent.stderr
    assert "job-0 | hi" in sent.stdout.splitlines()


def test_follow_of_a_big_batch_shows_a_progress_line(server: Server) -> None:
    env = flags(server)
    jobs = ["-c", "echo noisy"] * 11 + ["-c", "echo broken; exit 4"]
    result = cli("submit", "--follow", "--progress", *jobs, env=env)
    assert result.returncode == 1
    # Only the failure's output and end, not a line per job and state change.
    assert result.stdout.splitlines() == [
        "job-11 | broken",
        "job-11 | -- exited 4 (FAILED)",
    ]
    assert "12/12 done, 1 failed, 0 running" in result.stderr
    quiet = cli("submit", "--follow", "--quiet", "-c", "echo x", env=env)
    assert quiet.returncode == 0
    assert quiet.stdout == ""


def test_timestamps_prefix_each_line(server: Server) -> None:
    env = flags(server)
    cid = cli("submit", "-c", "echo one; echo two", env=env).stdout.strip()
    cli("wait", cid, "-q", env=env)
    result = cli("logs", cid, "--timestamps", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for line, word in zip(lines, ("one", "two"), strict=True):
        stamp, rest = line.split(" ", 1)
        assert dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).year >= 2024
        assert rest == f"job-0 | {word}"


# -- --json ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    data = json_schema()
    jsonschema.Draft202012Validator.check_schema(data)
    return data


def check(schema: dict[str, Any], name: str, document: object) -> None:
    jsonschema.validate(document, {"$ref": f"#/$defs/{name}", "$defs": schema["$defs"]})


def test_every_json_output_matches_the_schema(server: Server, schema: dict[str, Any]) -> None:
    env = flags(server)
    out = cli("submit", "--json", "-c", "printf 'ok\\n'", "-c", "printf '\\377'; exit 2", env=env)
    submitted = json.loads(out.stdout)
    check(schema, "Submitted", submitted)
    cid = submitted["correlation_id"]
    waited = json.loads(cli("wait", cid, "--json", env=env).stdout)
    check(schema, "BatchResults", waited)
    status = cli("status", cid, "--json", env=env)
    batch = json.loads(status.stdout)
    check(schema, "Batch", batch)
    assert list(batch) == list(schema["$defs"]["Batch"]["properties"])  # fixed key order
    assert batch["state"] == "failed"
    first, second = batch["jobs"]
    assert first["stdout"] == {"data": "ok\n", "encoding": "utf-8", "total_bytes": 3,
                               "truncated": False}  # fmt: skip
    assert (second["stdout"]["data"], second["stdout"]["encoding"]) == ("/w==", "base64")
    assert isinstance(first["duration"], float)
    assert isinstance(first["cpu_seconds"], float)
    assert first["max_rss_bytes"] > 0
    for line in cli("logs", cid, "--json", env=env).stdout.splitlines():
        event = json.loads(line)
        check(schema, "LogChunk" if event["type"] == "chunk" else "StateChange", event)
    check(schema, "BatchList", json.loads(cli("list", "--json", env=env).stdout))
    running = cli("submit", "--", "sleep", "60", env=env).stdout.strip()
    check(schema, "Batch", json.loads(cli("cancel", running, "--json", env=env).stdout))


def test_schema_commands_print_valid_schemas() -> None:
    for what in ("batch", "json"):
        result = cli("schema", what, env={})
        assert result.returncode == 0, result.stderr
        jsonschema.Draft202012Validator.check_schema(json.loads(result.stdout))
