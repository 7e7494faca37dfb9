"""ScheduleBatch and GetBatch through the real server: results, logs, validation, limits."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from jobworker.server.reader import BUILD_INLINE_JOBS
from jobworker.v1 import jobworker_pb2 as pb
from tests.integration.conftest import (
    PY,
    Server,
    ServerFactory,
    data_dir_of,
    get_job,
    job,
    options,
    rpc_error,
    schedule,
    wait_batch,
    wait_until,
)

KIB = 1024


def _list_all(stub: object, **kwargs: object) -> list[pb.BatchSummary]:
    return list(stub.ListBatches(pb.ListBatchesRequest(page_size=1000, **kwargs)).batches)  # type: ignore[attr-defined]


def _cids(stub: object, **kwargs: object) -> set[str]:
    return {b.correlation_id for b in _list_all(stub, **kwargs)}


# --- scheduling and results ---------------------------------------------------------------


def test_batch_gets_one_uuid_and_the_job_names(server: Server) -> None:
    stub = server.stub("alice")
    reply = schedule(
        stub,
        job("true", name="build"),
        job("true"),
        job("true", name="test"),
        job("true"),
    )
    assert uuid.UUID(reply.correlation_id).version == 4
    assert str(uuid.UUID(reply.correlation_id)) == reply.correlation_id
    assert list(reply.job_names) == ["build", "job-1", "test", "job-3"]
    assert not reply.deduplicated
    batch = wait_batch(stub, reply.correlation_id)
    assert batch.correlation_id == reply.correlation_id
    assert batch.owner == "alice"
    assert [j.spec.name for j in batch.jobs] == ["build", "job-1", "test", "job-3"]
    assert [j.index for j in batch.jobs] == [0, 1, 2, 3]
    assert batch.state == pb.BATCH_STATE_SUCCEEDED


def test_get_batch_shows_each_result(server: Server) -> None:
    stub = server.stub("alice")
    busy = (
        "import time\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        "print('busy done')\n"
    )
    reply = schedule(
        stub,
        job("sh", "-c", "echo to-out; echo to-err >&2; exit 3", name="fails"),
        job(PY, "-c", busy, name="busy"),
        job("sh", "-c", "kill -KILL $$", name="killed"),
    )
    batch = wait_batch(stub, reply.correlation_id, timeout=60)
    assert batch.state == pb.BATCH_STATE_FAILED
    assert batch.HasField("end_time")
    fails, busy_job, killed = batch.jobs

    assert fails.state == pb.JOB_STATE_FAILED
    assert fails.HasField("exit_code")
    assert fails.exit_code == 3
    assert fails.signal == 0
    assert "3" in fails.message
    assert fails.stdout.data == b"to-out\n"
    assert fails.stderr.data == b"to-err\n"
    assert fails.stdout.total_bytes == 7
    assert not fails.stdout.truncated

    assert busy_job.state == pb.JOB_STATE_SUCCEEDED
    assert busy_job.exit_code == 0
    assert busy_job.stdout.data == b"busy done\n"
    assert busy_job.usage.user_cpu.ToNanoseconds() > 0
    assert busy_job.usage.max_rss_bytes > 0

    assert killed.state == pb.JOB_STATE_FAILED
    assert not killed.HasField("exit_code")
    assert killed.signal == 9
    assert "SIGKILL" in killed.message

    create = batch.create_time.ToNanoseconds()
    for j in batch.jobs:
        assert j.HasField("start_time"), j
        assert j.HasField("end_time"), j
        assert create <= j.start_time.ToNanoseconds() <= j.end_time.ToNanoseconds()
        assert j.end_time.ToNanoseconds() <= batch.end_time.ToNanoseconds()


def test_log_tail_bytes_default_explicit_and_zero(server: Server) -> None:
    stub = server.stub("alice")
    size = 100_000
    script = (
        f"import sys\ndata = bytes(i % 251 for i in range({size}))\nsys.stdout.buffer.write(data)\n"
    )
    reply = schedule(stub, job(PY, "-c", script, name="big"), job("true", name="quiet"))
    cid = reply.correlation_id
    assert wait_batch(stub, cid).state == pb.BATCH_STATE_SUCCEEDED
    data = bytes(i % 251 for i in range(size))

    def get(**kwargs: object) -> pb.Batch:
        return stub.GetBatch(pb.GetBatchRequest(correlation_id=cid, **kwargs)).batch  # type: ignore[arg-type]

    big, quiet = get().jobs  # default: 64 KiB per stream
    assert big.stdout.data == data[-64 * KIB :]
    assert big.stdout.total_bytes == size
    assert big.stdout.truncated
    assert quiet.stdout == pb.LogTail(data=b"", total_bytes=0, truncated=False)
    assert big.stderr == pb.LogTail(data=b"", total_bytes=0, truncated=False)

    big, _ = get(log_tail_bytes=10).jobs
    assert big.stdout.data == data[-10:]
    assert big.stdout.total_bytes == size
    assert big.stdout.truncated

    big, _ = get(log_tail_bytes=size).jobs  # exactly everything: not truncated
    assert big.stdout.data == data
    assert not big.stdout.truncated

    big, _ = get(log_tail_bytes=10 * size).jobs
    assert big.stdout.data == data
    assert not big.stdout.truncated

    big, quiet = get(log_tail_bytes=0).jobs  # sizes only
    assert big.stdout.data == b""
    assert big.stdout.total_bytes == size
    assert big.stdout.truncated
    assert quiet.stdout.data == b""
    assert quiet.stdout.total_bytes == 0
    assert not quiet.stdout.truncated


def test_get_batch_job_names_filter(server: Server) -> None:
    stub = server.stub("alice")
    reply = schedule(
        stub,
        job("echo", "a", name="a"),
        job("echo", "b", name="b"),
        job("echo", "c", name="c"),
    )
    cid = reply.correlation_id
    wait_batch(stub, cid)
    only = stub.GetBatch(pb.GetBatchRequest(correlation_id=cid, job_names=["c", "a"])).batch
    assert sorted((j.index, j.spec.name, j.stdout.data) for j in only.jobs) == [
        (0, "a", b"a\n"),
        (2, "c", b"c\n"),
    ]
    assert get_job(stub, cid, "b").stdout.data == b"b\n"


def test_a_big_batch_answers_the_same_as_its_jobs_one_by_one(server: Server) -> None:
    """More jobs than BUILD_INLINE_JOBS: the answer is built off the event loop, from a
    snapshot; it says what small answers about the same jobs say (results and tails)."""
    stub = server.stub("alice")
    count = BUILD_INLINE_JOBS + 100
    jobs = [job("sh", "-c", f"echo out{i}; echo err{i} >&2; exit {i % 3}") for i in range(count)]
    reply = schedule(stub, options(max_parallel=8), *jobs)
    wait_batch(stub, reply.correlation_id, log_tail_bytes=0)
    whole = stub.GetBatch(pb.GetBatchRequest(correlation_id=reply.correlation_id)).batch
    assert len(whole.jobs) == count
    assert whole.state == pb.BATCH_STATE_FAILED
    for first in range(0, count, 97):
        names = [f"job-{i}" for i in range(first, min(first + 97, count))]
        small = stub.GetBatch(
            pb.GetBatchRequest(correlation_id=reply.correlation_id, job_names=names)
        )
        for j in small.batch.jobs:
            assert whole.jobs[j.index] == j
            assert j.stdout.data == f"out{j.index}\n".encode()
            assert j.stderr.data == f"err{j.index}\n".encode()
            assert j.exit_code == j.index % 3


# --- a stream that does not complete schedules nothing ------------------------------------


def _marker_job(marker: Path, name: str) -> pb.ScheduleBatchRequest:
    return job("touch", str(marker), name=name)


def _run_sentinel(stub: object) -> None:
    """A batch scheduled after: FIFO means anything queued before has started by its end."""
    reply = schedule(stub, job("true", name="sentinel"))  # type: ignore[arg-type]
    assert wait_batch(stub, reply.correlation_id).state == pb.BATCH_STATE_SUCCEEDED  # type: ignore[arg-type]


def test_stream_cancelled_midway_schedules_nothing(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    label = uuid.uuid4().hex
    markers = [tmp_path / "ran-0", tmp_path / "ran-1"]
    before = _cids(stub)
    sent = threading.Event()
    release = threading.Event()

    def requests() -> Iterator[pb.ScheduleBatchRequest]:
        yield options(labels={"test": label})
        yield _marker_job(markers[0], "one")
        yield _marker_job(markers[1], "two")
        sent.set()
        release.wait(60)  # the client never half-closes: its call is cancelled meanwhile

    future = stub.ScheduleBatch.future(requests())
    try:
        assert sent.wait(30)
        time.sleep(0.5)  # let the server receive the two jobs (not an assertion)
        assert future.cancel()
    finally:
        release.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()

    _run_sentinel(stub)
    assert not any(m.exists() for m in markers)
    assert _list_all(stub, labels={"test": label}) == []
    after = _cids(stub)
    assert len(after - before) == 1  # only the sentinel


def test_stream_failing_in_the_client_schedules_nothing(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    label = uuid.uuid4().hex
    markers = [tmp_path / "ran-0", tmp_path / "ran-1"]

    def requests() -> Iterator[pb.ScheduleBatchRequest]:
        yield options(labels={"test": label})
        yield _marker_job(markers[0], "one")
        yield _marker_job(markers[1], "two")
        raise RuntimeError("the client breaks down midway")

    err = rpc_error(lambda: stub.ScheduleBatch(requests()))
    assert err.code() != grpc.StatusCode.OK
    _run_sentinel(stub)
    assert not any(m.exists() for m in markers)
    assert _list_all(stub, labels={"test": label}) == []


# --- validation ------------------------------------------------------------------------------

LONG = "n" * 129
INVALID = [
    pytest.param(
        [job("true", name="a"), job(name="b")],
        ["job 1", "b", "argv"],
        id="empty-argv",
    ),
    pytest.param(
        [job("true", name="a"), job("true"), job("")],
        ["job 2", "job-2", "argv"],
        id="empty-argv0-unnamed",
    ),
    pytest.param(
        [job("true", name="a"), job("echo", "x\0y", name="b")],
        ["job 1", "b", "argv", "NUL"],
        id="nul-in-argv",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name="b", env={"K": "v\0w"})],
        ["job 1", "b", "env", "NUL"],
        id="nul-in-env-value",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name="b", env={"K\0": "v"})],
        ["job 1", "b", "env"],
        id="nul-in-env-name",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name="b", working_dir="/tmp/x\0y")],
        ["job 1", "b", "working_dir", "NUL"],
        id="nul-in-working-dir",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name="b", env={"": "v"})],
        ["job 1", "b", "env"],
        id="empty-env-name",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name="b", env={"A=B": "v"})],
        ["job 1", "b", "env", "A=B"],
        id="env-name-with-equals",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name="b", working_dir="relative/dir")],
        ["job 1", "b", "working_dir", "relative/dir"],
        id="relative-working-dir",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name="a")],
        ["job 1", "'a'", "name"],
        id="duplicate-name",
    ),
    pytest.param(
        [job("true"), job("true", name="job-0")],
        ["job 1", "job-0", "name"],
        id="duplicate-of-generated-name",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name=LONG)],
        ["job 1", LONG, "name", "128"],
        id="overlong-name",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name="b", depends_on=["zzz"])],
        ["job 1", "b", "depends_on", "zzz"],
        id="unknown-dependency",
    ),
    pytest.param(
        [job("true", name="a", depends_on=["b"]), job("true", name="b", depends_on=["a"])],
        ["depends_on", "cycle"],
        id="dependency-cycle",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name="b", depends_on=["b"])],
        ["job 1", "b", "depends_on"],
        id="self-dependency",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name="b", timeout=Duration(seconds=-1))],
        ["job 1", "b", "timeout"],
        id="negative-timeout",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name="b", limits=pb.ResourceLimits(cpu_millis=10**6))],
        ["job 1", "b", "cpu_millis"],
        id="cpu-over-host",
    ),
    pytest.param(
        [job("true", name="a"), job("true", name="b", limits=pb.ResourceLimits(memory_bytes=1000))],
        ["job 1", "b", "memory_bytes"],
        id="memory-below-minimum",
    ),
    pytest.param([], ["job"], id="no-jobs"),
    pytest.param([options(labels={"k": "v"})], ["job"], id="options-only"),
    pytest.param(
        [job("true", name="a"), options(fail_fast=True)],
        ["options", "first"],
        id="options-not-first",
    ),
    pytest.param(
        [options(), options()],
        ["options"],
        id="options-twice",
    ),
]


@pytest.mark.parametrize(("requests", "words"), INVALID)
def test_invalid_batch_is_refused_naming_job_and_field(
    server: Server, tmp_path: Path, requests: list[pb.ScheduleBatchRequest], words: list[str]
) -> None:
    stub = server.stub("alice")
    before = _cids(stub)
    err = rpc_error(lambda: schedule(stub, *requests))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    for word in words:
        assert word in err.details(), (word, err.details())
    assert _cids(stub) == before


def test_cycle_message_names_a_job_on_the_cycle(server: Server) -> None:
    stub = server.stub("alice")
    err = rpc_error(
        lambda: schedule(
            stub,
            job("true", name="free"),
            job("true", name="a", depends_on=["b"]),
            job("true", name="b", depends_on=["a"]),
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details()
    assert "job 1 ('a')" in details or "job 2 ('b')" in details, details


def test_invalid_batch_starts_nothing(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    marker = tmp_path / "ran"
    err = rpc_error(lambda: schedule(stub, _marker_job(marker, "first"), job(name="broken")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    _run_sentinel(stub)
    assert not marker.exists()


def test_limits_give_resource_exhausted_naming_the_limit(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server(
        jobs={
            "max_jobs_per_batch": 3,
            "max_stdin_bytes": "1KiB",
            "max_argv_bytes": "1KiB",
            "max_batch_bytes": "2KiB",
        }
    )
    stub = srv.stub("alice")
    marker = tmp_path / "ran"

    err = rpc_error(lambda: schedule(stub, *[_marker_job(marker, f"j{i}") for i in range(4)]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_jobs_per_batch" in err.details()
    assert "3" in err.details()

    err = rpc_error(lambda: schedule(stub, job("cat", name="big-stdin", stdin=b"x" * 1025)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_stdin_bytes" in err.details()
    assert "big-stdin" in err.details()

    err = rpc_error(lambda: schedule(stub, job("echo", "y" * 1100, name="big-argv")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_argv_bytes" in err.details()
    assert "big-argv" in err.details()

    # Each job within its limits (900 bytes and "cat" as a str, 72), the three past the batch's.
    blob = b"x" * 900
    err = rpc_error(
        lambda: schedule(stub, *(job("cat", name=f"c{i}", stdin=blob) for i in range(3)))
    )
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_batch_bytes" in err.details()
    assert "c2" in err.details()

    # At the limits, the same batches are fine; nothing of the refused ones ran.
    reply = schedule(
        stub,
        job("cat", name="stdin", stdin=b"x" * 1024),
        job("true", name="two"),
        job("true", name="three"),
    )
    assert wait_batch(stub, reply.correlation_id).state == pb.BATCH_STATE_SUCCEEDED
    assert not marker.exists()
    assert _cids(stub) == {reply.correlation_id}


# --- idempotency and labels -------------------------------------------------------------------


def test_idempotency_key_is_per_identity(server: Server) -> None:
    alice, bob = server.stub("alice"), server.stub("bob")
    key = f"key-{uuid.uuid4().hex}"
    first = schedule(alice, options(idempotency_key=key), job("true", name="once"))
    assert not first.deduplicated
    again = schedule(alice, options(idempotency_key=key), job("false", name="other"))
    assert again.deduplicated
    assert again.correlation_id == first.correlation_id
    assert list(again.job_names) == ["once"]
    batch = wait_batch(alice, first.correlation_id)
    assert [j.spec.name for j in batch.jobs] == ["once"]
    assert batch.options.idempotency_key == key

    theirs = schedule(bob, options(idempotency_key=key), job("true", name="bobs"))
    assert not theirs.deduplicated
    assert theirs.correlation_id != first.correlation_id
    assert wait_batch(bob, theirs.correlation_id).owner == "bob"

    other = schedule(alice, options(idempotency_key=key + "-2"), job("true"))
    assert not other.deduplicated
    assert other.correlation_id != first.correlation_id


def test_labels_round_trip_and_filter_list(server: Server) -> None:
    stub = server.stub("alice")
    run = uuid.uuid4().hex
    one = schedule(stub, options(labels={"run": run, "kind": "build"}), job("true"))
    two = schedule(stub, options(labels={"run": run, "kind": "test"}), job("true"))
    schedule(stub, options(labels={"kind": "build"}), job("true"))
    batch = wait_batch(stub, one.correlation_id)
    assert dict(batch.options.labels) == {"run": run, "kind": "build"}
    wait_batch(stub, two.correlation_id)

    listed = _list_all(stub, labels={"run": run})
    assert [b.correlation_id for b in listed] == [two.correlation_id, one.correlation_id]
    assert dict(listed[1].labels) == {"run": run, "kind": "build"}
    assert [b.correlation_id for b in _list_all(stub, labels={"run": run, "kind": "build"})] == [
        one.correlation_id
    ]
    assert _list_all(stub, labels={"run": run, "kind": "deploy"}) == []


# --- what the job gets and what is kept of it -------------------------------------------------


def test_logs_on_disk_are_the_exact_bytes(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    expected_out = tmp_path / "expected-stdout"
    script = (
        "import os, sys\n"
        "data = os.urandom(200000) + b'\\0\\1\\2abc\\r\\n\\0tail-no-newline'\n"
        f"open({str(expected_out)!r}, 'wb').write(data)\n"
        "sys.stdout.buffer.write(data)\n"
    )
    reply = schedule(
        stub,
        job(PY, "-c", script, name="random"),
        job("printf", "\\0\\1\\2abc", name="printf"),
        job("sh", "-c", "printf 'e\\0rr' >&2; printf out", name="both"),
    )
    cid = reply.correlation_id
    batch = wait_batch(stub, cid, log_tail_bytes=1 << 20)
    assert batch.state == pb.BATCH_STATE_SUCCEEDED, batch
    jobs_dir = data_dir_of(server) / "batches" / cid / "jobs"
    expected = expected_out.read_bytes()
    assert (jobs_dir / "0" / "stdout").read_bytes() == expected
    assert (jobs_dir / "0" / "stderr").read_bytes() == b""
    assert (jobs_dir / "1" / "stdout").read_bytes() == b"\x00\x01\x02abc"
    assert (jobs_dir / "2" / "stdout").read_bytes() == b"out"
    assert (jobs_dir / "2" / "stderr").read_bytes() == b"e\x00rr"
    random, printf, both = batch.jobs
    assert random.stdout.data == expected
    assert random.stdout.total_bytes == len(expected)
    assert printf.stdout.data == b"\x00\x01\x02abc"
    assert both.stderr.data == b"e\x00rr"


def test_stdin_is_fed_and_dev_null_when_empty(server: Server) -> None:
    stub = server.stub("alice")
    given = b"line one\n\x00binary\xff no newline"
    reply = schedule(
        stub,
        job("cat", name="fed", stdin=given),
        job("cat", name="empty"),
        job("sh", "-c", "readlink /proc/$$/fd/0", name="what"),
    )
    batch = wait_batch(stub, reply.correlation_id)
    fed, empty, what = batch.jobs
    assert fed.state == pb.JOB_STATE_SUCCEEDED
    assert fed.stdout.data == given
    assert empty.state == pb.JOB_STATE_SUCCEEDED
    assert empty.stdout.data == b""
    assert what.stdout.data == b"/dev/null\n"


def test_env_is_minimal_plus_spec(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBWORKER_TEST_SERVER_SECRET", "must-not-leak")
    srv = make_server()
    stub = srv.stub("alice")
    reply = schedule(stub, job("env", name="env", env={"FOO": "bar", "EMPTY": ""}))
    batch = wait_batch(stub, reply.correlation_id)
    assert batch.state == pb.BATCH_STATE_SUCCEEDED
    lines = batch.jobs[0].stdout.data.decode().splitlines()
    env = dict(line.split("=", 1) for line in lines)
    assert "JOBWORKER_TEST_SERVER_SECRET" not in env
    assert env["FOO"] == "bar"
    assert env["EMPTY"] == ""
    assert env["LANG"]
    assert env["HOME"]
    assert "/usr/bin" in env["PATH"].split(":")
    shell_noise = {"PWD", "SHLVL", "_", "OLDPWD"}
    # A root server runs the job as nobody, with that user's USER and LOGNAME.
    user = {"USER", "LOGNAME"} if os.geteuid() == 0 else set()
    assert set(env) - shell_noise == {"PATH", "HOME", "LANG", "FOO", "EMPTY", *user}


def test_working_dir_is_honoured(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    (tmp_path / "here.txt").write_text("found")
    reply = schedule(
        stub,
        job("pwd", name="pwd", working_dir=str(tmp_path)),
        job("cat", "here.txt", name="relative", working_dir=str(tmp_path)),
    )
    batch = wait_batch(stub, reply.correlation_id)
    assert batch.jobs[0].stdout.data == f"{os.path.realpath(tmp_path)}\n".encode()
    assert batch.jobs[1].stdout.data == b"found"


def test_jobs_that_cannot_start_fail_naming_the_path(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    plain = tmp_path / "not-executable.sh"
    plain.write_text("#!/bin/sh\necho never\n")
    plain.chmod(0o644)
    missing_dir = tmp_path / "no" / "such" / "dir"
    reply = schedule(
        stub,
        job("no-such-program-xyzzy", name="missing"),
        job("/opt/nowhere/frobnicate", name="missing-abs"),
        job("true", name="nodir", working_dir=str(missing_dir)),
        job(str(plain), name="noexec"),
        job("true", name="fine"),
    )
    batch = wait_batch(stub, reply.correlation_id)
    assert batch.state == pb.BATCH_STATE_FAILED
    missing, missing_abs, nodir, noexec, fine = batch.jobs
    for j in (missing, missing_abs, nodir, noexec):
        assert j.state == pb.JOB_STATE_FAILED, j
        assert not j.HasField("exit_code"), j
        assert j.HasField("end_time"), j
    assert "no-such-program-xyzzy" in missing.message
    assert "not found" in missing.message
    assert "/opt/nowhere/frobnicate" in missing_abs.message
    assert str(missing_dir) in nodir.message
    assert str(plain) in noexec.message
    assert "permission" in noexec.message.lower()
    assert fine.state == pb.JOB_STATE_SUCCEEDED


def test_get_of_unknown_batch_is_not_found(server: Server) -> None:
    stub = server.stub("alice")
    err = rpc_error(lambda: stub.GetBatch(pb.GetBatchRequest(correlation_id=str(uuid.uuid4()))))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_busy_job_output_visible_while_running(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    release = tmp_path / "release"
    script = f"printf started; while [ ! -e {release} ]; do sleep 0.05; done; printf ' done'"
    reply = schedule(stub, job("sh", "-c", script, name="slow"))
    cid = reply.correlation_id
    try:
        wait_until(
            lambda: get_job(stub, cid, "slow").stdout.data == b"started", what="partial output"
        )
        running = get_job(stub, cid, "slow")
        assert running.state == pb.JOB_STATE_RUNNING
        assert running.HasField("start_time")
        assert not running.HasField("end_time")
        assert not running.HasField("exit_code")
    finally:
        release.touch()
    assert wait_batch(stub, cid).jobs[0].stdout.data == b"started done"


def test_queue_limit_gives_resource_exhausted(make_server: ServerFactory, tmp_path: Path) -> None:
    srv = make_server(jobs={"max_queued_jobs": 2})
    stub = srv.stub("alice")
    marker = tmp_path / "ran"
    err = rpc_error(lambda: schedule(stub, *[_marker_job(marker, f"j{i}") for i in range(3)]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queued_jobs" in err.details()
    reply = schedule(stub, job("true"), job("true"))
    assert wait_batch(stub, reply.correlation_id).state == pb.BATCH_STATE_SUCCEEDED
    assert not marker.exists()


def test_tails_are_shortened_to_fit_one_message(server: Server) -> None:
    stub = server.stub("alice")
    size = 3 << 20
    script = (
        f"import sys; sys.stdout.buffer.write(b'x' * {size}); "
        f"sys.stderr.buffer.write(b'y' * {size})"
    )
    reply = schedule(stub, job(PY, "-c", script, name="huge"))
    cid = reply.correlation_id
    wait_batch(stub, cid, log_tail_bytes=0)
    batch = stub.GetBatch(pb.GetBatchRequest(correlation_id=cid, log_tail_bytes=size)).batch
    huge = batch.jobs[0]
    assert huge.state == pb.JOB_STATE_SUCCEEDED
    assert huge.stdout.total_bytes == size
    assert huge.stderr.total_bytes == size
    assert huge.stdout.truncated
    assert huge.stderr.truncated
    assert 0 < len(huge.stdout.data) < size
    assert set(huge.stdout.data) == {ord("x")}
    assert set(huge.stderr.data) == {ord("y")}
    assert batch.ByteSize() < 4 << 20


def test_large_stdin_specs_still_fit_one_get_batch_answer(server: Server) -> None:
    stub = server.stub("alice")
    blob = b"s" * (1 << 20)  # jobs.max_stdin_bytes, six times over in one batch
    reply = schedule(stub, *(job("cat", name=f"cat{i}", stdin=blob) for i in range(6)))
    batch = wait_batch(stub, reply.correlation_id, log_tail_bytes=0)
    assert batch.state == pb.BATCH_STATE_SUCCEEDED
    batch = stub.GetBatch(pb.GetBatchRequest(correlation_id=reply.correlation_id)).batch
    assert batch.ByteSize() < 4 << 20
    assert all(j.stdout.total_bytes == len(blob) for j in batch.jobs)
    assert all(j.stdout.data == blob[-len(j.stdout.data) :] for j in batch.jobs)
    assert all(j.spec.stdin == b"" for j in batch.jobs)  # left out to fit; the rest is there
    assert all(j.stdout.truncated for j in batch.jobs)
    assert [j.spec.name for j in batch.jobs] == [f"cat{i}" for i in range(6)]
    one = stub.GetBatch(
        pb.GetBatchRequest(correlation_id=reply.correlation_id, job_names=["cat0"])
    ).batch
    assert one.jobs[0].spec.stdin == blob


def test_list_batches_pages_are_stable_and_newest_first(server: Server) -> None:
    stub = server.stub("alice")
    run = uuid.uuid4().hex
    cids = [
        schedule(stub, options(labels={"page": run}), job("true")).correlation_id for _ in range(5)
    ]
    newest_first = list(reversed(cids))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = stub.ListBatches(
            pb.ListBatchesRequest(page_size=2, page_token=token, labels={"page": run})
        )
        pages += 1
        seen += [b.correlation_id for b in page.batches]
        if pages == 1:  # a batch scheduled meanwhile shows neither twice nor out of order
            schedule(stub, options(labels={"page": run}), job("true"))
        token = page.next_page_token
        if not token:
            break
    assert seen == newest_first
    assert pages == 3
    for summary in _list_all(stub, labels={"page": run}):
        assert summary.job_count == 1
        assert summary.owner == "alice"
        assert summary.HasField("create_time")

    err = rpc_error(lambda: stub.ListBatches(pb.ListBatchesRequest(page_size=1001)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in err.details()
    err = rpc_error(lambda: stub.ListBatches(pb.ListBatchesRequest(page_token="garbage!")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in err.details()


def test_an_unknown_executor_is_refused_naming_it_and_the_configured_ones(server: Server) -> None:
    stub = server.stub("alice")
    error = rpc_error(lambda: schedule(stub, options(executor="nope"), job("true")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "executor 'nope' names no configured executor (configured: local)" in error.details()
    too_long = rpc_error(lambda: schedule(stub, options(executor="x" * 65), job("true")))
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "executor is 65 characters, at most 64" in too_long.details()


def test_a_local_job_names_this_host_as_its_node(server: Server) -> None:
    import socket

    stub = server.stub("alice")
    cid = schedule(stub, options(executor="local"), job("true", name="here")).correlation_id
    done = wait_batch(stub, cid)
    assert done.options.executor == "local"
    assert done.jobs[0].node == socket.gethostname()
