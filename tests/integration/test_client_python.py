"""The Python client of docs/client.md against a real server: its examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobworker import AsyncClient, Client
from jobworker.cli.batchfile import load_batch_file
from jobworker.client import ClientConfig, ClientError, CredentialsError

from .conftest import Server

DOC = Path(__file__).resolve().parents[2] / "docs" / "client.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def _config(server: Server, identity: str = "alice") -> ClientConfig:
    return ClientConfig(
        server=server.address,
        ca=server.pki / "ca.pem",
        cert=server.pki / f"{identity}.pem",
        key=server.pki / f"{identity}-key.pem",
    )


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_docs_python_example_runs(server: Server, index: int, tmp_path: Path) -> None:
    code = _blocks("python")[index]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWORKER_")} | {
        "JOBWORKER_SERVER": server.address,
        "JOBWORKER_CA": str(server.pki / "ca.pem"),
        "JOBWORKER_CERT": str(server.pki / "alice.pem"),
        "JOBWORKER_KEY": str(server.pki / "alice-key.pem"),
        "XDG_CONFIG_HOME": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr.decode()


def test_docs_batch_file_example_is_valid(tmp_path: Path) -> None:
    (example,) = _blocks("yaml")
    (tmp_path / "batch.yaml").write_text(example)
    (tmp_path / "test-input.txt").write_text("input\n")
    options, jobs = load_batch_file(tmp_path / "batch.yaml")
    assert options is not None
    assert options.max_parallel == 4
    assert [job.name for job in jobs] == ["build", "test", "notify"]
    assert jobs[1].retry.max_attempts == 3
    assert jobs[1].stdin == b"input\n"


def test_run_returns_the_whole_output_and_errors_are_client_errors(server: Server) -> None:
    with Client(_config(server)) as client:
        result = client.run(["sh", "-c", "head -c 300000 /dev/zero; echo err >&2"])
        assert result.succeeded
        assert len(result.stdout.data) == 300_000
        assert result.stderr.text == "err\n"
        assert result.duration is not None
        with pytest.raises(ClientError) as caught:
            client.get("no-such-batch")
        assert caught.value.code_name == "NOT_FOUND"


def test_follow_yields_dataclasses_and_wait_returns_the_batch(server: Server) -> None:
    with Client(_config(server)) as client:
        submitted = client.submit([["sh", "-c", "echo a; sleep 0.2; echo b"]])
        events = list(client.follow(submitted.correlation_id))
        data = b"".join(e.data for e in events if e.type == "chunk")
        assert data == b"a\nb\n"
        assert [e.state for e in events if e.type == "state"][-1] == "succeeded"
        batch = client.wait(submitted.correlation_id)
        assert batch.succeeded
        assert batch.jobs[0].argv == ["sh", "-c", "echo a; sleep 0.2; echo b"]
        canceled = client.submit([["sleep", "60"]])
        assert client.cancel(canceled.correlation_id).state == "canceled"


def test_credentials_are_checked_before_connecting(server: Server, tmp_path: Path) -> None:
    config = ClientConfig(
        server=server.address,
        ca=tmp_path / "nope.pem",
        cert=server.pki / "alice.pem",
        key=server.pki / "bob-key.pem",
    )
    with pytest.raises(CredentialsError) as caught:
        Client(config)
    assert "CA certificate not found" in str(caught.value)


async def test_async_client(server: Server) -> None:
    async with AsyncClient(_config(server)) as client:
        result = await client.run(["echo", "hi"], stdin=b"")
        assert (result.exit_code, result.stdout.data) == (0, b"hi\n")
        summaries = await client.list(limit=1)
        assert len(summaries) == 1
