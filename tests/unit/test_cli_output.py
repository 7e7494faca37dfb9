"""What the client commands print: prefixed lines, raw bytes, tables, JSON."""

from __future__ import annotations

import io

from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console

from jobworker.cli import formatting, loglines, tables
from jobworker.cli.loglines import LinePrefixer, LogPrinter, RawPrinter
from jobworker.v1 import jobworker_pb2 as pb

OUT = pb.LOG_STREAM_STDOUT
ERR = pb.LOG_STREAM_STDERR


def _chunk(
    name: str, data: bytes, stream: int = OUT, cursor: str = ""
) -> pb.StreamBatchLogsResponse:
    return pb.StreamBatchLogsResponse(
        chunk=pb.LogChunk(job_name=name, stream=stream, data=data), cursor=cursor
    )


def _change(name: str, state: int, **fields: object) -> pb.StreamBatchLogsResponse:
    return pb.StreamBatchLogsResponse(
        state_change=pb.JobStateChange(job_name=name, state=state, **fields)  # type: ignore[arg-type]
    )


def test_lines_are_prefixed_with_padded_names() -> None:
    prefixer = LinePrefixer(["build", "t"])
    assert prefixer.feed("t", OUT, b"one\ntwo\n") == ["t     | one\n", "t     | two\n"]
    assert prefixer.feed("build", ERR, b"oops\n") == ["build ! oops\n"]


def test_partial_lines_wait_per_job_and_stream() -> None:
    prefixer = LinePrefixer(["a", "b"])
    assert prefixer.feed("a", OUT, b"hel") == []
    assert prefixer.feed("b", OUT, b"other\n") == ["b | other\n"]
    assert prefixer.feed("a", ERR, b"err-") == []
    assert prefixer.feed("a", OUT, b"lo\nwor") == ["a | hello\n"]
    assert prefixer.flush("a") == ["a | wor\n", "a ! err-\n"]
    assert prefixer.flush_all() == []


def test_utf8_split_across_chunks_and_invalid_bytes() -> None:
    prefixer = LinePrefixer(["a"])
    snowman = "☃".encode()
    assert prefixer.feed("a", OUT, snowman[:1]) == []
    assert prefixer.feed("a", OUT, snowman[1:] + b"\r\n\xff\n") == ["a | ☃\n", "a | \ufffd\n"]


def test_long_line_comes_out_in_pieces() -> None:
    prefixer = LinePrefixer(["a"], max_line_bytes=4)
    assert prefixer.feed("a", OUT, b"abcdefghij") == ["a | abcd\n", "a | efgh\n"]
    assert prefixer.flush("a") == ["a | ij\n"]


def test_no_prefix_and_colour() -> None:
    assert LinePrefixer(["a"], prefix=False).feed("a", OUT, b"x\n") == ["x\n"]
    plain = LinePrefixer(["a"]).feed("a", OUT, b"x\n")[0]
    coloured = LinePrefixer(["a"], color=True).feed("a", OUT, b"x\n")[0]
    assert "\x1b[" not in plain
    assert "\x1b[" in coloured
    assert coloured.endswith(" x\n")


def test_unknown_job_names_widen_the_prefix() -> None:
    prefixer = LinePrefixer()
    assert prefixer.feed("ab", OUT, b"x\n") == ["ab | x\n"]
    assert prefixer.feed("abcd", OUT, b"y\n") == ["abcd | y\n"]


def test_log_printer_flushes_ended_jobs_and_prints_states() -> None:
    out = io.StringIO()
    printer = LogPrinter(out, LinePrefixer(["build", "test"]), states=True)
    printer.handle(_change("build", pb.JOB_STATE_RUNNING))
    printer.handle(_chunk("build", b"compiling"))
    printer.handle(_chunk("test", b"waiting"))
    printer.handle(_change("build", pb.JOB_STATE_SUCCEEDED, exit_code=0))
    printer.handle(_change("test", pb.JOB_STATE_FAILED, signal=9, message="killed: out of memory"))
    printer.close()
    assert out.getvalue() == (
        "build | -- started\n"
        "build | compiling\n"
        "build | -- exited 0 (SUCCEEDED)\n"
        "test  | waiting\n"
        "test  | -- killed by SIGKILL (FAILED): killed: out of memory\n"
    )


def test_log_printer_without_states_keeps_only_output() -> None:
    out = io.StringIO()
    printer = LogPrinter(out, LinePrefixer(["a"], prefix=False))
    printer.handle(_chunk("a", b"1\n2"))
    printer.handle(_change("a", pb.JOB_STATE_SUCCEEDED, exit_code=0))
    printer.handle(_chunk("a", b"never mind"))
    printer.close()
    assert out.getvalue() == "1\n2\nnever mind\n"


def test_raw_printer_is_binary_safe() -> None:
    stdout, stderr = io.BytesIO(), io.BytesIO()
    printer = RawPrinter(stdout, stderr)
    every_byte = bytes(range(256))
    printer.handle(_chunk("a", every_byte[:100]))
    printer.handle(_chunk("a", b"\x00err\xff", stream=ERR))
    printer.handle(_change("a", pb.JOB_STATE_SUCCEEDED, exit_code=0))
    printer.handle(_chunk("a", every_byte[100:]))
    printer.close()
    assert stdout.getvalue() == every_byte
    assert stderr.getvalue() == b"\x00err\xff"


def test_state_change_words() -> None:
    text = loglines.state_change_text
    assert text(pb.JobStateChange(state=pb.JOB_STATE_QUEUED)) == "-- queued"
    assert text(pb.JobStateChange(state=pb.JOB_STATE_FAILED, exit_code=3)) == (
        "-- exited 3 (FAILED)"
    )
    assert text(
        pb.JobStateChange(state=pb.JOB_STATE_SKIPPED, message="dependency build failed")
    ) == ("-- skipped: dependency build failed")
    assert text(pb.JobStateChange(state=pb.JOB_STATE_TIMED_OUT, signal=15)) == (
        "-- killed by SIGTERM (TIMED_OUT)"
    )
    assert text(pb.JobStateChange(state=pb.JOB_STATE_LOST)) == "-- lost"
    assert text(
        pb.JobStateChange(state=pb.JOB_STATE_SUCCEEDED, exit_code=0, message="exited with status 0")
    ) == ("-- exited 0 (SUCCEEDED)")


def test_exit_column_and_durations() -> None:
    assert formatting.format_exit(pb.Job(exit_code=0)) == "0"
    assert formatting.format_exit(pb.Job(signal=9)) == "SIGKILL"
    assert formatting.format_exit(pb.Job(signal=99)) == "signal 99"
    assert formatting.format_exit(pb.Job()) == ""
    assert formatting.human_duration(0.25) == "0.25s"
    assert formatting.human_duration(4.24) == "4.2s"
    assert formatting.human_duration(187) == "3m07s"
    assert formatting.human_duration(7500) == "2h05m"
    assert formatting.human_duration(3 * 86400 + 4 * 3600) == "3d04h"


def _ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def _batch() -> pb.Batch:
    return pb.Batch(
        correlation_id="b-123",
        owner="alice",
        state=pb.BATCH_STATE_FAILED,
        options=pb.BatchOptions(labels={"team": "infra"}),
        create_time=_ts(1_700_000_000),
        end_time=_ts(1_700_000_065),
        jobs=[
            pb.Job(
                index=0,
                spec=pb.JobSpec(name="build"),
                state=pb.JOB_STATE_SUCCEEDED,
                exit_code=0,
                start_time=_ts(1_700_000_001),
                end_time=_ts(1_700_000_005),
                stdout=pb.LogTail(data=b"built [ok]\n", total_bytes=11),
            ),
            pb.Job(
                index=1,
                spec=pb.JobSpec(name="test"),
                state=pb.JOB_STATE_FAILED,
                signal=9,
                message="killed: out of memory (limit 64 MiB)",
                start_time=_ts(1_700_000_005),
                end_time=_ts(1_700_000_065),
                stderr=pb.LogTail(data=b"...boom\n", total_bytes=5000, truncated=True),
            ),
            pb.Job(index=2, spec=pb.JobSpec(name="deploy"), state=pb.JOB_STATE_SKIPPED),
        ],
    )


def _render(*things: object) -> str:
    console = Console(record=True, width=120, file=io.StringIO())
    for thing in things:
        console.print(thing)
    return console.export_text()


def test_job_table_shows_each_job() -> None:
    text = _render(tables.batch_header(_batch()), tables.job_table(_batch()))
    lines = text.splitlines()
    assert "batch b-123" in lines[0]
    assert "failed" in lines[0]
    assert "owner alice" in lines[1]
    assert "took 1m05s" in lines[1]
    assert "labels team=infra" in lines[1]
    build = next(line for line in lines if " build " in line)
    assert build.split() == ["0", "build", "succeeded", "0", "4.0s"]
    test = next(line for line in lines if " test " in line)
    assert "SIGKILL" in test
    assert "1m00s" in test
    assert "killed: out of memory (limit 64 MiB)" in test
    assert "skipped" in next(line for line in lines if "deploy" in line)


def test_print_batch_with_logs_shows_tails_without_markup() -> None:
    console = Console(record=True, width=100, file=io.StringIO())
    tables.print_batch(console, _batch(), logs=True)
    text = console.export_text()
    assert "build stdout (11 bytes)" in text
    assert "built [ok]" in text
    assert "test stderr (last 8 of 5000 bytes)" in text
    assert "...boom" in text


def test_running_job_duration_counts_to_now() -> None:
    job = pb.Job(start_time=_ts(100))
    assert formatting.elapsed(job, "start_time", "end_time", now=110.0) == "10.0s+"
    assert formatting.elapsed(pb.Job(), "start_time", "end_time") == ""


def test_batches_table_and_summary() -> None:
    summary = pb.BatchSummary(
        correlation_id="b-9",
        owner="bob",
        state=pb.BATCH_STATE_RUNNING,
        labels={"b": "2", "a": "1"},
        create_time=_ts(1_700_000_000),
        job_count=5,
        jobs_by_state={"JOB_STATE_SUCCEEDED": 3, "JOB_STATE_FAILED": 1, "JOB_STATE_RUNNING": 1},
    )
    assert formatting.jobs_summary(summary) == "3/5 ok, 1 failed, 1 running"
    text = _render(tables.batches_table([summary], now=1_700_000_030.0))
    header, row = text.splitlines()[:2]
    assert header.split()[:2] == ["id", "owner"]
    assert row.split()[:8] == ["b-9", "bob", "running", "3/5", "ok,", "1", "failed,", "1"]
    assert "a=1,b=2" in row
    assert row.rstrip().endswith("30.0s+")


def test_the_node_column_shows_for_a_cluster_batch_and_with_wide() -> None:
    from jobworker.cli.tables import plain_job_table
    from jobworker.v1 import jobworker_pb2 as pb

    job = pb.Job(index=0, spec=pb.JobSpec(name="a", argv=["true"]), node="10.0.0.7")
    local = pb.Batch(jobs=[job])
    cluster = pb.Batch(jobs=[job], options=pb.BatchOptions(executor="cluster"))
    assert "node" not in plain_job_table(local).splitlines()[0]
    for table in (plain_job_table(cluster), plain_job_table(local, wide=True)):
        header, row = table.splitlines()
        assert header.split()[:4] == ["#", "name", "state", "node"]
        assert "10.0.0.7" in row
