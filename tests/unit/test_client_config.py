"""Client profiles and contexts, credential checks, and the client-only install."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

from jobworker import certs
from jobworker.client.config import (
    ClientConfig,
    CredentialsError,
    load_context,
    profile_path,
    write_profile,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    certs.init_pki(folder)
    certs.issue_client(folder, "alice")
    certs.issue_client(folder, "bob")
    return folder


def test_profile_path_follows_xdg_and_the_override() -> None:
    assert profile_path({"HOME": "/h"}) == Path("/h/.config/jobworker/client.toml")
    assert profile_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/jobworker/client.toml")
    assert profile_path({"JOBWORKER_CLIENT_CONFIG": "/p.toml", "HOME": "/h"}) == Path("/p.toml")


def test_no_profile_and_no_context_means_the_defaults(tmp_path: Path) -> None:
    assert load_context(None, {"HOME": str(tmp_path)}) == ClientConfig()
    with pytest.raises(CredentialsError, match="context 'lab' asked for, but there is no"):
        load_context("lab", {"HOME": str(tmp_path)})


def _env(path: Path) -> dict[str, str]:
    return {"JOBWORKER_CLIENT_CONFIG": str(path)}


def test_contexts_paths_and_precedence(tmp_path: Path) -> None:
    profile = tmp_path / "conf" / "client.toml"
    profile.parent.mkdir()
    profile.write_text(
        'current = "a"\n'
        '[contexts.a]\nserver = "a:1"\nca = "certs/ca.pem"\ncert = "/abs/c.pem"\n'
        '[contexts.b]\nserver = "b:2"\nserver_name = "bee"\n'
    )
    a = load_context(None, _env(profile))
    assert (a.server, a.ca, a.cert) == ("a:1", profile.parent / "certs/ca.pem", Path("/abs/c.pem"))
    assert a.key == Path("var/certs/admin-key.pem")
    b = ClientConfig.from_env(None, _env(profile) | {"JOBWORKER_CONTEXT": "b"})
    assert (b.server, b.server_name_override) == ("b:2", "bee")
    # JOBWORKER_* wins over the context, an explicit context over JOBWORKER_CONTEXT.
    env = _env(profile) | {"JOBWORKER_CONTEXT": "b", "JOBWORKER_SERVER": "env:3"}
    assert ClientConfig.from_env("a", env).server == "env:3"
    assert ClientConfig.from_env("a", env).ca == profile.parent / "certs/ca.pem"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('current = "x"\n[contexts.a]\n', "no context 'x' (contexts: a)"),
        ("[contexts.a]\nsrever = 'x'\n", "contexts.a: unknown key 'srever'"),
        ("[contexts.a]\nserver = 5\n", "contexts.a.server: must be a string"),
        ("current = [", "invalid TOML"),
    ],
)
def test_profile_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    profile = tmp_path / "client.toml"
    profile.write_text(text)
    with pytest.raises(CredentialsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_context(None, _env(profile))


def test_write_profile_makes_a_ready_private_file(pki: Path, tmp_path: Path) -> None:
    path = write_profile(
        tmp_path / "alice.toml",
        context="lab",
        server="jobs:50051",
        ca_pem=(pki / "ca.pem").read_bytes(),
        cert_pem=(pki / "alice.pem").read_bytes(),
        key_pem=(pki / "alice-key.pem").read_bytes(),
    )
    assert path.stat().st_mode & 0o777 == 0o600
    config = load_context(None, _env(path))
    assert config.server == "jobs:50051"
    credentials = config.load_credentials()
    assert credentials.key == (pki / "alice-key.pem").read_bytes().strip() + b"\n"
    with pytest.raises(FileExistsError):
        write_profile(path, context="x", server="s", ca_pem=b"", cert_pem=b"", key_pem=b"")


def test_every_credential_problem_at_once(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    certs.init_pki(other)
    config = ClientConfig(ca=pki / "ca.pem", cert=other / "admin.pem", key=pki / "bob-key.pem")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=4000)
    with pytest.raises(CredentialsError) as caught:
        config.load_credentials(now=later)
    text = str(caught.value)
    assert "does not belong to the certificate" in text
    assert "is not signed by the CA" in text
    assert text.count("expired on") == 2  # the CA's and the certificate's
    assert "not a PEM" not in text


def test_garbage_files_are_named(tmp_path: Path) -> None:
    for name in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / name).write_text("garbage")
    config = ClientConfig(ca=tmp_path / "ca.pem", cert=tmp_path / "c.pem", key=tmp_path / "k.pem")
    with pytest.raises(CredentialsError) as caught:
        config.load_credentials()
    text = str(caught.value)
    assert f"CA certificate {tmp_path / 'ca.pem'} is not a PEM certificate" in text
    assert f"client key {tmp_path / 'k.pem'} is not an unencrypted PEM private key" in text


def test_client_commands_need_no_server_dependency(tmp_path: Path) -> None:
    # A client-only install has none of these: the client commands must not import them.
    code = (
        "import sys\n"
        "for name in ('structlog', 'prometheus_client', 'watchfiles', 'grpc_health',"
        " 'grpc_reflection'):\n"
        "    sys.modules[name] = None\n"
        "from jobworker.cli import main\n"
        "from jobworker import Client\n"
        "main(['status', 'x', '--server', '127.0.0.1:1', '--ca', 'nope.pem'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert done.returncode == 4, done.stderr
    assert "CA certificate not found: nope.pem" in done.stderr
