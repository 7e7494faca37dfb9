"""The CLI pieces that wait on the server side of issue 14, through the real command and a
real server: `certs issue --profile`, `delete`, prefixes, `logs --tail/--timestamps`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .conftest import Server
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
