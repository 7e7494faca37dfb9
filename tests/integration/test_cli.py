"""The `jobworker` client commands against a real server, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Server


def run(
    server: Server, *args: str, identity: str = "alice", stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = dict(
        os.environ,
        JOBWORKER_SERVER=server.address,
        JOBWORKER_CA=str(server.pki / "ca.pem"),
        JOBWORKER_CERT=str(server.pki / f"{identity}.pem"),
        JOBWORKER_KEY=str(server.pki / f"{identity}-key.pem"),
        NO_COLOR="1",
    )
    return subprocess.run(
        [sys.executable, "-m", "jobworker", *args],
        env=env,
        # Piped stdin without -i is refused: a test gives none unless it means to.
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=False,
    )


def submit(server: Server, *args: str) -> str:
    out = run(server, "submit", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().strip()


def test_submit_prints_the_correlation_id_and_status_shows_the_jobs(server: Server) -> None:
    cid = submit(server, "-c", "echo hello", "-c", "exit 4")
    assert len(cid) == 36
    status = run(server, "status", cid, "--json")
    while json.loads(status.stdout)["state"] == "running":
        status = run(server, "status", cid, "--json")
    batch = json.loads(status.stdout)
    assert [j["state"] for j in batch["jobs"]] == ["succeeded", "failed"]
    assert status.returncode == 1  # the batch did not succeed
    table = run(server, "status", cid)
    text = table.stdout.decode()
    assert "job-0" in text
    assert "failed" in text
    assert "exited with status 4" in text


def test_submit_follow_streams_output_and_exits_with_the_batch_result(server: Server) -> None:
    ok = run(server, "submit", "--follow", "-c", "echo out; echo err >&2")
    assert ok.returncode == 0, ok.stderr
    assert b"out" in ok.stdout
    bad = run(server, "submit", "--follow", "--", "sh", "-c", "echo before; exit 9")
    assert bad.returncode == 1
    assert b"before" in bad.stdout


def test_logs_prefixes_lines_with_the_job_name_and_raw_is_byte_exact(server: Server) -> None:
    batch_file = {
        "jobs": [
            {"name": "build", "command": "printf 'compiled\\nlinked\\n'"},
            {"name": "bin", "argv": ["printf", "\\000\\001tail-no-newline"]},
        ]
    }
    out = run(server, "submit", "-f", "-", stdin=json.dumps(batch_file).encode())
    assert out.returncode == 0, out.stderr
    cid = out.stdout.decode().strip()
    logs = run(server, "logs", cid, "--follow")
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.decode(errors="replace").splitlines()
    assert any(line.startswith("build") and line.endswith("compiled") for line in lines)
    raw = run(server, "logs", cid, "--job", "bin", "--raw")
    assert raw.stdout == b"\0\1tail-no-newline"


def test_cancel_and_list(server: Server) -> None:
    cid = submit(server, "--label", "suite=cli", "--", "sleep", "60")
    cancel = run(server, "cancel", cid, "--json")
    assert cancel.returncode == 0, cancel.stderr
    batch = json.loads(cancel.stdout)
    assert batch["jobs"][0]["state"] == "canceled"
    listed = run(server, "list", "--label", "suite=cli", "--json")
    ids = [b["correlation_id"] for b in json.loads(listed.stdout)["batches"]]
    assert ids == [cid]


def test_errors_name_the_problem_and_exit_non_zero(server: Server, tmp_path: Path) -> None:
    missing = run(server, "status", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 3
    assert b"NOT_FOUND" in missing.stderr
    viewer = run(server, "submit", "--", "true", identity="viewer")
    assert viewer.returncode == 5
    assert b"PERMISSION_DENIED" in viewer.stderr
    invalid = run(server, "submit", "-w", "relative/dir", "--", "true")
    assert invalid.returncode == 2
    assert b"working_dir" in invalid.stderr


@pytest.mark.parametrize("identity", ["nobody"])
def test_role_none_is_refused_by_every_command(server: Server, identity: str) -> None:
    out = run(server, "list", identity=identity)
    assert out.returncode == 5
    assert b"PERMISSION_DENIED" in out.stderr
