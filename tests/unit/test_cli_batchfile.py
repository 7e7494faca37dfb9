"""Batch files in YAML and JSON: every field, and errors that name the job and field."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from jobworker.cli.batchfile import BatchFileError, load_batch_file, parse_batch
from jobworker.v1 import jobworker_pb2 as pb

FULL_YAML = """\
options:
  labels: {team: infra, run: 42}
  max_parallel: 2
  fail_fast: true
  idempotency_key: nightly-1
jobs:
  - name: build
    argv: [make, -j, 4]
    env: {CC: gcc, LEVEL: 3}
    working_dir: /srv/src
    stdin: "hello\\n"
    timeout: 1m30s
    limits:
      cpu_millis: 1500
      memory_bytes: 64MiB
      pids_max: 100
      io_read_bytes_per_second: 1048576
      io_write_bytes_per_second: 2MiB
  - name: test
    command: make test | tee out.txt
    stdin_file: input.txt
    depends_on: [build]
    timeout: 5s
  - argv: [echo, unnamed]
"""


def _check_full(options: pb.BatchOptions | None, jobs: list[pb.JobSpec]) -> None:
    assert options is not None
    assert dict(options.labels) == {"team": "infra", "run": "42"}
    assert options.max_parallel == 2
    assert options.fail_fast is True
    assert options.idempotency_key == "nightly-1"
    assert len(jobs) == 3
    build, test, unnamed = jobs
    assert build.name == "build"
    assert list(build.argv) == ["make", "-j", "4"]
    assert dict(build.env) == {"CC": "gcc", "LEVEL": "3"}
    assert build.working_dir == "/srv/src"
    assert build.stdin == b"hello\n"
    assert build.timeout.ToNanoseconds() == 90 * 10**9
    assert build.limits.cpu_millis == 1500
    assert build.limits.memory_bytes == 64 * 2**20
    assert build.limits.pids_max == 100
    assert build.limits.io_read_bytes_per_second == 2**20
    assert build.limits.io_write_bytes_per_second == 2 * 2**20
    assert list(test.argv) == ["sh", "-c", "make test | tee out.txt"]
    assert test.stdin == b"from a file\x00\xff"
    assert list(test.depends_on) == ["build"]
    assert test.timeout.ToNanoseconds() == 5 * 10**9
    assert not test.HasField("limits")
    assert unnamed.name == ""
    assert not unnamed.HasField("timeout")


@pytest.fixture
def batch_dir(tmp_path: Path) -> Path:
    (tmp_path / "input.txt").write_bytes(b"from a file\x00\xff")
    return tmp_path


def test_yaml_with_every_field(batch_dir: Path) -> None:
    path = batch_dir / "batch.yaml"
    path.write_text(FULL_YAML)
    _check_full(*load_batch_file(path))


def test_json_with_every_field(batch_dir: Path) -> None:
    import yaml

    path = batch_dir / "batch.json"
    path.write_text(json.dumps(yaml.safe_load(FULL_YAML)))
    _check_full(*load_batch_file(path))


def test_stdin_file_is_relative_to_the_batch_file(batch_dir: Path, tmp_path: Path) -> None:
    sub = batch_dir / "sub"
    sub.mkdir()
    (sub / "input.txt").write_bytes(b"inner")
    (sub / "b.yml").write_text("jobs: [{argv: [cat], stdin_file: input.txt}]")
    _, jobs = load_batch_file(sub / "b.yml")
    assert jobs[0].stdin == b"inner"


@pytest.mark.parametrize(
    "text",
    [
        '{"jobs": [{"argv": ["true"]}]}',
        'jobs:\n  - argv: ["true"]\n',
        '  [{"argv": ["true"]}]',
    ],
)
def test_stdin_format_is_sniffed(text: str) -> None:
    options, jobs = load_batch_file("-", stdin=text.encode)
    assert options is None
    assert [list(job.argv) for job in jobs] == [["true"]]


def test_unknown_extension_is_sniffed(tmp_path: Path) -> None:
    path = tmp_path / "batch.txt"
    path.write_text("- command: echo hi\n")
    _, jobs = load_batch_file(path)
    assert list(jobs[0].argv) == ["sh", "-c", "echo hi"]


def test_bare_list_is_jobs_and_depends_on_may_be_a_string() -> None:
    options, jobs = parse_batch(
        [{"name": "a", "argv": ["true"]}, {"argv": ["true"], "depends_on": "a"}], Path()
    )
    assert options is None
    assert list(jobs[1].depends_on) == ["a"]


def test_timeout_as_number_of_seconds() -> None:
    _, jobs = parse_batch({"jobs": [{"argv": ["x"], "timeout": 2.5}]}, Path())
    assert jobs[0].timeout.ToMilliseconds() == 2500


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"name": "build", "argv": ["x"], "timeout": "soon"}, "jobs[1] (build): timeout: 'soon'"),
        ({"name": "build", "argv": ["x"], "timeout": "0s"}, "jobs[1] (build): timeout: must be"),
        ({"argv": ["x"], "limits": {"memory_bytes": "lots"}}, "jobs[1]: limits.memory_bytes: "),
        ({"argv": ["x"], "limits": {"cpu_millis": -1}}, "jobs[1]: limits.cpu_millis: must be"),
        ({"argv": ["x"], "limits": {"pids_max": 2**32}}, "jobs[1]: limits.pids_max: must be"),
        ({"argv": ["x"], "limits": {"cpus": 1}}, "jobs[1]: limits: unknown field 'cpus'"),
        ({"name": "t", "argv": "echo hi"}, "jobs[1] (t): argv: must be a list"),
        ({"name": "t", "argv": []}, "jobs[1] (t): argv: must be a non-empty list"),
        ({"name": "t"}, "jobs[1] (t): argv: missing"),
        ({"argv": ["x"], "command": "x"}, "jobs[1]: argv, command: give one"),
        ({"argv": ["x"], "stdin": "a", "stdin_file": "b"}, "jobs[1]: stdin, stdin_file: give one"),
        ({"argv": ["x"], "stdin_file": "nope.txt"}, "jobs[1]: stdin_file: cannot read"),
        ({"argv": ["x"], "working_dir": "rel"}, "jobs[1]: working_dir: must be an absolute"),
        ({"argv": ["x"], "env": {"A": None}}, "jobs[1]: env.A: must be a string"),
        ({"argv": ["x"], "env": ["A=1"]}, "jobs[1]: env: must be a mapping"),
        ({"argv": ["x", True]}, "jobs[1]: argv[1]: must be a string"),
        ({"argv": ["x"], "depends_on": [1]}, "jobs[1]: depends_on[0]: must be a string"),
        ({"argv": ["x"], "nmae": "typo"}, "jobs[1]: unknown field 'nmae'"),
        ({"name": 7, "argv": ["x"]}, "jobs[1]: name: must be a string"),
        ("echo hi", "jobs[1]: must be a mapping"),
    ],
)
def test_errors_name_the_job_and_field(job: object, message: str, tmp_path: Path) -> None:
    data = {"jobs": [{"name": "first", "argv": ["true"]}, job]}
    with pytest.raises(BatchFileError) as caught:
        parse_batch(data, tmp_path)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_parallel": -1}, "options: max_parallel: must be an integer"),
        ({"fail_fast": "yes"}, "options: fail_fast: must be true or false"),
        ({"labels": ["a"]}, "options: labels: must be a mapping"),
        ({"idempotency_key": 5}, "options: idempotency_key: must be a string"),
        ({"parallel": 2}, "options: unknown field 'parallel'"),
    ],
)
def test_option_errors_name_the_field(options: object, message: str) -> None:
    with pytest.raises(BatchFileError, match=message):
        parse_batch({"options": options, "jobs": [{"argv": ["x"]}]}, Path())


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("b.json", '{"jobs": [', "b.json: invalid JSON at line 1"),
        ("b.yaml", "jobs: [\n", "b.yaml: invalid YAML at line"),
        ("b.yaml", "jobs: []\n", "jobs: must be a non-empty list"),
        ("b.yaml", "hello\n", "must be a mapping with 'jobs'"),
        ("b.yaml", "jobs: [{argv: [x]}]\nextra: 1\n", "unknown field 'extra'"),
    ],
)
def test_file_level_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(BatchFileError, match=message):
        load_batch_file(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BatchFileError, match=r"cannot read batch file .*nope\.yaml"):
        load_batch_file(tmp_path / "nope.yaml")


def test_binary_file_is_refused() -> None:
    with pytest.raises(BatchFileError, match="not UTF-8"):
        load_batch_file("-", stdin=io.BytesIO(b"\xff\xfe").read)
