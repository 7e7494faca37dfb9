"""Views of issue 14 without a server: short ids, commands, waiting reasons, timestamps,
the progress line, retry plans, the --json shape, batch file lines and exit codes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from jobworker.cli import formatting, loglines, tables
from jobworker.cli.batchfile import BatchFileError, load_batch_file
from jobworker.cli.options import exit_code_of
from jobworker.cli.progress import ProgressPrinter
from jobworker.client import convert
from jobworker.client.jsonshape import encode_bytes, to_json
from jobworker.v1 import jobworker_pb2 as pb


def test_short_ids_and_commands() -> None:
    cid = "5c9f9eea-1234-4bcd-8000-000000000000"
    assert formatting.short_id(cid) == "5c9f9eea"
    assert formatting.short_id(cid, wide=True) == cid
    assert formatting.command_text(["sh", "-c", "make  test\n"]) == "make test"
    assert formatting.command_text(["echo", "a b"]) == "echo 'a b'"
    long = ["python", "-m", "pytest", "-k", "x" * 60]
    assert len(formatting.command_text(long)) == formatting.COMMAND_WIDTH
    assert formatting.command_text(long).endswith("…")
    assert formatting.command_text(long, wide=True).endswith("x" * 60)
    assert formatting.compact_size(512) == "512B"
    assert formatting.compact_size(3 * 2**20 + 2**19) == "3.5M"


def test_a_queued_job_says_what_it_waits_for() -> None:
    batch = pb.Batch(
        jobs=[
            pb.Job(spec=pb.JobSpec(name="build"), state=pb.JOB_STATE_RUNNING),
            pb.Job(spec=pb.JobSpec(name="lint"), state=pb.JOB_STATE_SUCCEEDED),
            pb.Job(
                spec=pb.JobSpec(name="test", depends_on=["build", "lint"]),
                state=pb.JOB_STATE_QUEUED,
            ),
        ]
    )
    states = {job.spec.name: job.state for job in batch.jobs}
    assert formatting.waiting_for(batch.jobs[2], states) == "after build"
    assert formatting.waiting_for(batch.jobs[0], states) == ""


def _ts(seconds: int, millis: int) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=millis * 1_000_000)


def test_timestamps_are_those_of_the_chunk_that_began_the_line() -> None:
    prefixer = loglines.LinePrefixer(["a"], timestamps=True)
    assert prefixer.feed("a", pb.LOG_STREAM_STDOUT, b"one\ntw", _ts(0, 5)) == [
        "1970-01-01T00:00:00.005Z a | one\n"
    ]
    assert prefixer.feed("a", pb.LOG_STREAM_STDOUT, b"o\n", _ts(60, 0)) == [
        "1970-01-01T00:00:00.005Z a | two\n"
    ]
    assert prefixer.flush("a") == []
    assert prefixer.feed("a", pb.LOG_STREAM_STDOUT, b"x", None) == []
    assert prefixer.flush("a") == ["-                        a | x\n"]


def _change(name: str, state: int, **fields: object) -> pb.StreamBatchLogsResponse:
    return pb.StreamBatchLogsResponse(
        state_change=pb.JobStateChange(job_name=name, state=state, **fields)  # type: ignore[arg-type]
    )


def _chunk(name: str, data: bytes) -> pb.StreamBatchLogsResponse:
    return pb.StreamBatchLogsResponse(
        chunk=pb.LogChunk(job_name=name, stream=pb.LOG_STREAM_STDOUT, data=data)
    )


def test_progress_line_counts_and_prints_only_failures() -> None:
    out, err = io.StringIO(), io.StringIO()
    now = [0.0]
    printer = ProgressPrinter(
        ["a", "b", "c"], out, err, live=True, failures_only=True, quiet=False,
        clock=lambda: now[0],
    )  # fmt: skip
    for response in [
        _change("a", pb.JOB_STATE_RUNNING),
        _chunk("a", b"fine\n"),
        _change("b", pb.JOB_STATE_RUNNING),
        _chunk("b", b"bad\n"),
        _change("a", pb.JOB_STATE_SUCCEEDED, exit_code=0),
        _change("b", pb.JOB_STATE_FAILED, exit_code=2),
    ]:
        now[0] += 1
        printer.handle(response)
    assert out.getvalue() == "b | bad\nb | -- exited 2 (FAILED)\n"
    assert printer.line() == "2/3 done, 1 failed, 0 running, 0.3 jobs/s"
    assert "\r\x1b[2K1/3 done" in err.getvalue()
    printer.close()
    assert err.getvalue().endswith("\r\x1b[2K2/3 done, 1 failed, 0 running, 0.3 jobs/s\n")


def test_retry_plan_keeps_options_and_dependencies_that_still_make_sense() -> None:
    batch = pb.Batch(
        correlation_id="old",
        options=pb.BatchOptions(labels={"t": "1"}, fail_fast=True, idempotency_key="k"),
        jobs=[
            pb.Job(spec=pb.JobSpec(name="a", argv=["a"]), state=pb.JOB_STATE_SUCCEEDED),
            pb.Job(
                spec=pb.JobSpec(name="b", argv=["b"], depends_on=["a"]),
                state=pb.JOB_STATE_FAILED,
            ),
            pb.Job(
                spec=pb.JobSpec(name="c", argv=["c"], depends_on=["a", "b"]),
                state=pb.JOB_STATE_SKIPPED,
            ),
        ],
    )
    options, jobs = convert.retry_plan(batch, failed_only=True)
    assert [(j.name, list(j.depends_on)) for j in jobs] == [("b", []), ("c", ["b"])]
    assert dict(options.labels) == {"t": "1", "retry-of": "old"}
    assert options.fail_fast and not options.idempotency_key
    _, every = convert.retry_plan(batch, failed_only=False)
    assert [list(j.depends_on) for j in every] == [[], ["a"], ["a", "b"]]


def test_json_shape_of_a_job() -> None:
    job = pb.Job(
        index=1,
        spec=pb.JobSpec(name="x", argv=["x"]),
        state=pb.JOB_STATE_TIMED_OUT,
        start_time=_ts(10, 0),
        end_time=_ts(12, 500),
        stdout=pb.LogTail(data=b"\xff", total_bytes=1),
    )
    data = to_json(convert.job_result(job))
    assert list(data)[:5] == ["index", "name", "argv", "depends_on", "state"]
    assert data["state"] == "timed_out"
    assert data["exit_code"] is None
    assert data["start_time"] == "1970-01-01T00:00:10Z"
    assert data["duration"] == 2.5
    assert data["stdout"] == {"data": "/w==", "encoding": "base64", "total_bytes": 1,
                              "truncated": False}  # fmt: skip
    assert encode_bytes("é".encode()) == ("é", "utf-8")


def test_batch_file_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(
        "jobs:\n"
        "  - name: build\n"
        "    argv: [make]\n"
        "    limits:\n"
        "      memory_bytes: lots\n"
        "  - name: test\n"
        "    comand: make test\n"
    )
    with pytest.raises(BatchFileError) as caught:
        load_batch_file(path)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith(f"{path}:5: jobs[0] (build): limits.memory_bytes: ")
    assert f"{path}:7: jobs[1] (test): unknown field 'comand'" in lines


def test_batch_file_retry_policy(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(
        '{"jobs": [{"argv": ["x"], "retry": {"max_attempts": 3, "initial_backoff": "2s",'
        ' "retry_on": ["failed", "lost"]}}]}'
    )
    _, (job,) = load_batch_file(path)
    assert job.retry.max_attempts == 3
    assert job.retry.initial_backoff.seconds == 2
    assert list(job.retry.retry_on) == [pb.JOB_STATE_FAILED, pb.JOB_STATE_LOST]
    path.write_text('{"jobs": [{"argv": ["x"], "retry": {"max_attempts": 2, "retry_on": ["x"]}}]}')
    with pytest.raises(BatchFileError, match=r"b\.json:1: jobs\[0\]: retry\.retry_on\[0\]: "):
        load_batch_file(path)


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        ("NOT_FOUND", 3),
        ("UNAVAILABLE", 4),
        ("UNAUTHENTICATED", 4),
        ("PERMISSION_DENIED", 5),
        ("INVALID_ARGUMENT", 2),
        ("FAILED_PRECONDITION", 1),
        ("RESOURCE_EXHAUSTED", 1),
    ],
)
def test_exit_codes_of_status_codes(code: str, exit_code: int) -> None:
    assert exit_code_of(code) == exit_code


def test_a_big_batch_gets_the_same_columns_laid_out_by_hand() -> None:
    jobs = [pb.Job(index=0, spec=pb.JobSpec(name="gate", argv=["sleep", "9"]), state=2)]
    jobs += [
        pb.Job(
            index=i,
            spec=pb.JobSpec(name=f"j{i}", argv=["true"], depends_on=["gate"]),
            state=pb.JOB_STATE_QUEUED,
        )
        for i in range(1, tables.PLAIN_TABLE_JOBS + 1)
    ]
    out = io.StringIO()
    from rich.console import Console

    tables.print_batch(Console(file=out, width=80), pb.Batch(correlation_id="b", jobs=jobs))
    lines = out.getvalue().splitlines()
    assert lines[2].split() == list(tables._JOB_COLUMNS)
    assert len(lines) == 3 + len(jobs)
    assert lines[-1].split() == [str(tables.PLAIN_TABLE_JOBS), f"j{tables.PLAIN_TABLE_JOBS}",
                                 "queued", "true", "after", "gate"]  # fmt: skip
