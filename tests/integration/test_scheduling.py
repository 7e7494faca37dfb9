"""Issue 11, items 3 and 6, through a real server: long dependency chains, fair share between
identities, per-identity quotas and jobs.max_log_bytes.

The jobs here need no root and write nowhere but their own stdout and stderr: the server may
run them as `nobody`."""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path

import grpc
import pytest

from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.integration.conftest import (
    PY,
    Server,
    ServerFactory,
    alive,
    data_dir_of,
    job,
    kill_pids,
    rpc_error,
    schedule,
    wait_batch,
    wait_job,
    wait_until,
)

CHAIN = 10_000


def _chain(head: list[str], *, second: list[str] | None = None) -> list[pb.ScheduleBatchRequest]:
    """A chain of CHAIN jobs, each depending on the one before: `head` first, then `true`s."""
    out = [job(*head, name="j0")]
    for i in range(1, CHAIN):
        argv = second if (i == 1 and second) else ["true"]
        out.append(job(*argv, name=f"j{i}", depends_on=[f"j{i - 1}"]))
    return out


def _states(stub: pb_grpc.JobWorkerServiceStub, cid: str) -> list[int]:
    batch = stub.GetBatch(pb.GetBatchRequest(correlation_id=cid, log_tail_bytes=0)).batch
    return [j.state for j in batch.jobs]


_SLEEPER = ["sh", "-c", "echo $$; exec sleep 600"]  # says its pid on stdout, then sleeps


def _pid_of(srv: Server, cid: str, index: int) -> int:
    """The pid a _SLEEPER job wrote to its stdout file."""
    out = data_dir_of(srv) / "batches" / cid / "jobs" / str(index) / "stdout"
    return int(str(wait_until(lambda: out.exists() and out.read_text().strip(), 30, "a pid")))


def _still_serves(stub: pb_grpc.JobWorkerServiceStub) -> None:
    reply = schedule(stub, job("sh", "-c", "echo fine", name="after"))
    batch = wait_batch(stub, reply.correlation_id, 60)
    assert batch.state == pb.BATCH_STATE_SUCCEEDED
    assert batch.jobs[0].stdout.data == b"fine\n"


# --- dependency chains (item 3) -------------------------------------------------------------
# Before the fix: the skips recursed (_after_end -> _skip_dependents -> _end_unstarted), so a
# chain of more than ~330 jobs raised RecursionError; the batch stayed RUNNING with thousands
# of jobs QUEUED, and a restart with such a chain on disk failed in recovery.


def test_a_10000_job_chain_whose_head_fails_ends_and_survives_a_restart(
    make_server: ServerFactory,
) -> None:
    srv = make_server(jobs={"max_jobs_per_batch": CHAIN})
    stub = srv.stub("alice")
    reply = schedule(stub, *_chain(["false"]))
    batch = wait_batch(stub, reply.correlation_id, 60, log_tail_bytes=0)
    states = [j.state for j in batch.jobs]
    assert states[0] == pb.JOB_STATE_FAILED
    assert states.count(pb.JOB_STATE_SKIPPED) == CHAIN - 1, states.count(pb.JOB_STATE_QUEUED)
    assert batch.state == pb.BATCH_STATE_FAILED
    assert "dependency j9998 did not succeed (skipped)" in batch.jobs[-1].message
    assert not srv.events("job_supervision_failed")

    srv.stop()
    srv.start()
    stub = srv.stub("alice")
    assert _states(stub, reply.correlation_id) == states
    _still_serves(stub)


def test_a_restart_in_the_middle_of_a_10000_job_chain_starts_and_serves(
    make_server: ServerFactory,
) -> None:
    """The second job runs when the server and its supervisor are killed: at the restart it
    is LOST and recovery skips the 9,998 behind it."""
    srv = make_server(jobs={"max_jobs_per_batch": CHAIN})
    stub = srv.stub("alice")
    reply = schedule(stub, *_chain(["true"], second=_SLEEPER))
    cid = reply.correlation_id
    wait_job(stub, cid, "j1", pb.JOB_STATE_RUNNING, 60)
    pid = _pid_of(srv, cid, 1)
    srv.crash()
    try:
        srv.start(timeout=120)
        stub = srv.stub("alice")
        batch = wait_batch(stub, cid, 60, log_tail_bytes=0)
        states = [j.state for j in batch.jobs]
        assert states[:2] == [pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_LOST]
        assert states.count(pb.JOB_STATE_SKIPPED) == CHAIN - 2
        assert batch.state == pb.BATCH_STATE_FAILED
        wait_until(lambda: not alive(pid), 30, "the lost job's sleep killed")
        _still_serves(stub)
    finally:
        kill_pids([pid])


def test_cancelling_only_the_first_job_of_a_long_chain_skips_the_rest(
    make_server: ServerFactory,
) -> None:
    srv = make_server(jobs={"max_jobs_per_batch": CHAIN})
    stub = srv.stub("alice")
    reply = schedule(stub, *_chain(_SLEEPER))
    cid = reply.correlation_id
    wait_job(stub, cid, "j0", pb.JOB_STATE_RUNNING, 60)
    pid = _pid_of(srv, cid, 0)
    try:
        stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid, job_names=["j0"]))
        batch = wait_batch(stub, cid, 60, log_tail_bytes=0)
        states = [j.state for j in batch.jobs]
        assert states[0] == pb.JOB_STATE_CANCELED
        assert states.count(pb.JOB_STATE_SKIPPED) == CHAIN - 1, states.count(pb.JOB_STATE_QUEUED)
        assert batch.state == pb.BATCH_STATE_CANCELED
        assert not srv.events("job_supervision_failed")
        assert not alive(pid)
        _still_serves(stub)
    finally:
        kill_pids([pid])


# --- fair share (item 6) --------------------------------------------------------------------


def _starts(stub: pb_grpc.JobWorkerServiceStub, cid: str) -> list[int]:
    """Start times (ns) of the jobs of `cid` that have started."""
    batch = stub.GetBatch(pb.GetBatchRequest(correlation_id=cid, log_tail_bytes=0)).batch
    return [j.start_time.ToNanoseconds() for j in batch.jobs if j.HasField("start_time")]


def test_fair_share_a_second_identity_is_not_held_behind_a_big_batch(
    make_server: ServerFactory,
) -> None:
    """Before the fix (FIFO across batches) bob's job waited for all 200 of alice's."""
    srv = make_server(jobs={"max_concurrent": 2})  # fair_share: the default
    alice, bob = srv.stub("alice"), srv.stub("bob")
    big = schedule(alice, *[job("sleep", "0.2", name=f"a{i}") for i in range(200)])
    try:
        wait_until(lambda: len(_starts(alice, big.correlation_id)) >= 2, 30, "alice's jobs run")
        small = schedule(bob, job("true", name="b"))
        # Every start of alice's before bob's job must have happened by now: bob's is
        # queued, and the next free slot is his.
        started = len(_starts(alice, big.correlation_id))
        done = wait_batch(bob, small.correlation_id, 60)
        assert done.state == pb.BATCH_STATE_SUCCEEDED
        mine = done.jobs[0].start_time.ToNanoseconds()
        before = [t for t in _starts(alice, big.correlation_id) if t < mine]
        assert len(before) <= started < 200, (len(before), started)
    finally:
        alice.CancelBatch(pb.CancelBatchRequest(correlation_id=big.correlation_id))


def test_fair_share_false_keeps_fifo_across_batches(make_server: ServerFactory) -> None:
    srv = make_server(jobs={"max_concurrent": 1, "fair_share": False})
    alice, bob = srv.stub("alice"), srv.stub("bob")
    big = schedule(alice, *[job("sleep", "0.1", name=f"a{i}") for i in range(6)])
    small = schedule(bob, job("true", name="b"))
    done = wait_batch(bob, small.correlation_id, 60)
    assert wait_batch(alice, big.correlation_id, 60).state == pb.BATCH_STATE_SUCCEEDED
    mine = done.jobs[0].start_time.ToNanoseconds()
    assert all(t < mine for t in _starts(alice, big.correlation_id))


def test_fair_share_is_round_robin_and_fifo_within_an_identity(
    make_server: ServerFactory,
) -> None:
    srv = make_server(jobs={"max_concurrent": 1})
    alice, bob = srv.stub("alice"), srv.stub("bob")
    block = schedule(alice, job("sleep", "600", name="block"))
    wait_job(alice, block.correlation_id, "block", pb.JOB_STATE_RUNNING)
    a1 = schedule(alice, *[job("true", name=f"a{i}") for i in range(3)])
    a2 = schedule(alice, job("true", name="a3"))
    b = schedule(bob, *[job("true", name=f"b{i}") for i in range(3)])
    alice.CancelBatch(pb.CancelBatchRequest(correlation_id=block.correlation_id))  # a slot frees
    started: list[tuple[int, str]] = []
    for stub, reply in ((alice, a1), (alice, a2), (bob, b)):
        batch = wait_batch(stub, reply.correlation_id, 60)
        assert batch.state == pb.BATCH_STATE_SUCCEEDED
        started += [(j.start_time.ToNanoseconds(), j.spec.name) for j in batch.jobs]
    order = [name for _, name in sorted(started)]
    # bob had not been served, so he goes first; then turns; alice's batches in order.
    assert order == ["b0", "a0", "b1", "a1", "b2", "a2", "a3"]


# --- per-identity quotas (item 6) -----------------------------------------------------------


def test_max_queued_jobs_per_identity(make_server: ServerFactory) -> None:
    srv = make_server(jobs={"max_concurrent": 1, "max_queued_jobs_per_identity": 5})
    alice, bob = srv.stub("alice"), srv.stub("bob")
    first = schedule(alice, *[job("sleep", "600", name=f"a{i}") for i in range(5)])
    try:
        wait_job(alice, first.correlation_id, "a0", pb.JOB_STATE_RUNNING)  # 4 left queued
        err = rpc_error(lambda: schedule(alice, job("true"), job("true")))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details() == (
            "queue of 'alice' is full: 4 jobs queued, 2 more would pass "
            "jobs.max_queued_jobs_per_identity (5)"
        )
        schedule(alice, job("true", name="fits"))  # 5 queued: at the quota, not past it
        err = rpc_error(lambda: schedule(alice, job("true")))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        schedule(bob, *[job("true") for _ in range(5)])  # another identity's quota is its own
    finally:
        alice.CancelBatch(pb.CancelBatchRequest(correlation_id=first.correlation_id))


def test_max_running_per_identity(make_server: ServerFactory) -> None:
    srv = make_server(jobs={"max_concurrent": 4, "max_running_per_identity": 1})
    alice, bob = srv.stub("alice"), srv.stub("bob")
    a = schedule(alice, *[job("sleep", "1", name=f"a{i}") for i in range(3)])
    b = schedule(bob, job("sleep", "1", name="b0"))
    runs = wait_batch(alice, a.correlation_id, 60).jobs
    other = wait_batch(bob, b.correlation_id, 60).jobs[0]
    spans = sorted((j.start_time.ToNanoseconds(), j.end_time.ToNanoseconds()) for j in runs)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, spans  # one of alice's at a time
    assert other.start_time.ToNanoseconds() < spans[-1][0]  # bob's ran beside alice's


def test_a_queued_job_says_why_it_waits(make_server: ServerFactory) -> None:
    srv = make_server(jobs={"max_concurrent": 4, "max_running_per_identity": 1})
    alice = srv.stub("alice")
    cid = schedule(alice, *[job("sleep", "30", name=f"s{i}") for i in range(3)]).correlation_id
    try:
        wait_job(alice, cid, "s0", pb.JOB_STATE_RUNNING, 30)
        jobs = alice.GetBatch(pb.GetBatchRequest(correlation_id=cid), timeout=10).batch.jobs
        held = "jobs.max_running_per_identity (1) is reached"
        assert jobs[1].message == f"queue: 0 ahead in this batch; {held}", jobs[1]
        assert jobs[2].message == f"queue: 1 ahead in this batch; {held}", jobs[2]
        assert jobs[0].message == ""  # running: no reason to wait
    finally:
        alice.CancelBatch(pb.CancelBatchRequest(correlation_id=cid), timeout=30)


def test_a_reload_raising_max_running_per_identity_starts_jobs_at_once(
    make_server: ServerFactory,
) -> None:
    srv = make_server(jobs={"max_concurrent": 4, "max_running_per_identity": 1})
    alice = srv.stub("alice")
    a = schedule(alice, *[job("sleep", "600", name=f"a{i}") for i in range(2)])
    try:
        wait_job(alice, a.correlation_id, "a0", pb.JOB_STATE_RUNNING)
        time.sleep(0.3)
        assert _states(alice, a.correlation_id)[1] == pb.JOB_STATE_QUEUED
        text = srv.config.read_text().replace(
            "max_running_per_identity = 1", "max_running_per_identity = 0"
        )
        srv.config.write_text(text)
        srv.signal(signal.SIGHUP)
        wait_job(alice, a.correlation_id, "a1", pb.JOB_STATE_RUNNING, 30)
    finally:
        alice.CancelBatch(pb.CancelBatchRequest(correlation_id=a.correlation_id))


# --- max_log_bytes (item 6) -----------------------------------------------------------------


# Writes 64 KiB chunks with a pause between them (~6 MiB/s): without a limit it writes on
# until its timeout, and that must not fill the disk. `sleep` is a child that would outlive it.
_WRITER = """
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "600"])
out, other = (1, 2) if sys.argv[1] == "stdout" else (2, 1)
os.write(other, b"%d\\n" % child.pid)
while True:
    os.write(out, b"x" * 65536)
    time.sleep(0.01)
"""


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_job_writing_past_max_log_bytes_is_stopped(
    make_server: ServerFactory, stream: str
) -> None:
    """Before the fix the job wrote on until its timeout (TIMED_OUT, the file far past 1 MiB)."""
    srv = make_server(jobs={"max_log_bytes": "1MiB"})
    stub = srv.stub("alice")
    other = "stderr" if stream == "stdout" else "stdout"
    writer = job(PY, "-c", _WRITER, stream, name="loud", timeout=_seconds(20))
    cid = schedule(stub, writer).correlation_id
    job_dir = data_dir_of(srv) / "batches" / cid / "jobs" / "0"
    pids: list[int] = []
    try:
        # The job's folder is made by a store thread while the batch starts: it may not exist yet.
        pids = [int(str(wait_until(lambda: _text(job_dir / other), 30, "pid")))]
        batch = wait_batch(stub, cid, 60, log_tail_bytes=0)
        loud = batch.jobs[0]
        assert loud.state == pb.JOB_STATE_FAILED, loud
        assert loud.message == f"stopped: {stream} passed jobs.max_log_bytes (1 MiB)"
        assert (job_dir / stream).stat().st_size >= 1 << 20
        wait_until(lambda: not alive(pids[0]), 30, "the job's child gone")
        assert batch.state == pb.BATCH_STATE_FAILED
    finally:
        kill_pids(pids)


def test_output_under_max_log_bytes_is_left_alone(make_server: ServerFactory) -> None:
    srv = make_server(jobs={"max_log_bytes": "1MiB"})
    stub = srv.stub("alice")
    write = "import sys; sys.stdout.write('x' * (1 << 20)); sys.stderr.write('y' * (1 << 20))"
    reply = schedule(stub, job(PY, "-c", write, name="exact"))
    batch = wait_batch(stub, reply.correlation_id, 60, log_tail_bytes=0)
    assert batch.jobs[0].state == pb.JOB_STATE_SUCCEEDED, batch.jobs[0].message


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _seconds(value: float) -> object:
    from google.protobuf.duration_pb2 import Duration

    d = Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d
