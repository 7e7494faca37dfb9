"""The CLI pieces that wait on the server side of issue 14, through the real command and a
real server: `certs issue --profile`, `delete`, prefixes, `logs --tail/--timestamps`."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

from jobworker.v1 import jobworker_pb2 as pb

from .conftest import PY, Server
from .test_client_cli import cli, flags


def test_certs_issue_profile_is_used_from_another_directory(server: Server, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    shutil.copytree(server.pki, pki)
    profile = tmp_path / "carol.toml"
    issued = cli(
        "certs", "issue", "carol", "--dir", str(pki), "--profile", str(profile),
        "--server", server.address, "--context", "lab",
        env={},
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    assert f"wrote {profile}" in issued.stdout
    assert profile.stat().st_mode & 0o077 == 0
    # On "another machine": only the profile in its place, cwd elsewhere, no JOBWORKER_* but
    # the context's name.
    home = tmp_path / "home"
    (home / ".config" / "jobworker").mkdir(parents=True)
    shutil.move(profile, home / ".config" / "jobworker" / "client.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"HOME": str(home), "JOBWORKER_CONTEXT": "lab"}
    submitted = cli("submit", "--follow", "--", "true", env=env, cwd=elsewhere)
    assert submitted.returncode == 0, submitted.stderr
    listed = cli("list", "--context", "lab", "--json", env={"HOME": str(home)}, cwd=elsewhere)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["batches"][0]["owner"] == "carol"
    # A second issue to the same profile file is refused before any certificate is made.
    again = cli(
        "certs", "issue", "dave", "--dir", str(pki), "--profile",
        str(home / ".config" / "jobworker" / "client.toml"), env={},
    )  # fmt: skip
    assert again.returncode != 0
    assert "refusing to overwrite" in again.stderr
    assert not (pki / "dave.pem").exists()
    assert flags(server)  # the module's helpers are shared with test_client_cli


def _ended_batch(server: Server, script: str) -> str:
    submitted = cli("submit", "--json", "--", PY, "-c", script, env=flags(server))
    assert submitted.returncode == 0, submitted.stderr
    cid = str(json.loads(submitted.stdout)["correlation_id"])
    waited = cli("wait", cid, env=flags(server))
    assert waited.returncode == 0, waited.stderr
    return cid


def test_logs_tail_and_timestamps(server: Server) -> None:
    cid = _ended_batch(server, "for i in range(5): print(f'line {i}')")
    tailed = cli("logs", cid[:8], "--tail", "2", "--no-prefix", env=flags(server))
    assert tailed.returncode == 0, tailed.stderr
    assert tailed.stdout == "line 3\nline 4\n"
    stamped = cli("logs", cid, "--tail", "2", "--timestamps", "--no-prefix", env=flags(server))
    assert stamped.returncode == 0, stamped.stderr
    lines = stamped.stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["line 3", "line 4"]
    for line in lines:
        when = dt.datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00"))
        assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 120


def test_tail_lines_over_the_wire_per_stream(server: Server) -> None:
    script = (
        "import sys\n"
        "for i in range(50): print(f'out {i}'); print(f'err {i}', file=sys.stderr)\n"
        "sys.stdout.write('partial')\n"
    )
    cid = _ended_batch(server, script)
    request = pb.StreamBatchLogsRequest(correlation_id=cid, tail_lines=3)
    got: dict[int, bytes] = {}
    states = []
    for r in server.stub().StreamBatchLogs(request, timeout=30):
        if r.HasField("chunk"):
            got[r.chunk.stream] = got.get(r.chunk.stream, b"") + r.chunk.data
        else:
            states.append(r.state_change.state)
    assert got == {1: b"out 48\nout 49\npartial", 2: b"err 47\nerr 48\nerr 49\n"}
    assert states[-1] == pb.JOB_STATE_SUCCEEDED  # the state changes come all the same


def test_delete_and_short_prefix_through_the_cli(server: Server) -> None:
    cid = _ended_batch(server, "pass")
    short = cli("status", cid[:5], env=flags(server))
    assert short.returncode == 2, short.stderr
    assert "shorter than 8 characters" in short.stderr
    deleted = cli("delete", cid[:8], env=flags(server))
    assert deleted.returncode == 0, deleted.stderr
    gone = cli("status", cid, env=flags(server))
    assert gone.returncode == 3, gone.stderr


def test_delete_of_a_running_batch_says_to_cancel_first(server: Server) -> None:
    submitted = cli(
        "submit", "--json", "--", PY, "-c", "import time; time.sleep(60)", env=flags(server)
    )
    cid = str(json.loads(submitted.stdout)["correlation_id"])
    try:
        refused = cli("delete", cid, env=flags(server))
        assert refused.returncode == 1, refused.stderr
        assert "cancel it first" in refused.stderr
    finally:
        assert cli("cancel", cid, env=flags(server)).returncode in (0, 1)
    assert cli("delete", cid, env=flags(server)).returncode == 0
