"""The engine through the real server: limits, FIFO, dependencies, fail_fast, timeouts, cancel."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.integration.conftest import (
    PY,
    Server,
    ServerFactory,
    alive,
    get_job,
    job,
    kill_pids,
    options,
    read_pids,
    schedule,
    wait_batch,
    wait_job,
    wait_until,
)

# A job that counts the jobs of its group running beside it: it creates its marker in
# <dir>/running, waits up to HOLD seconds for TARGET markers to be there (so that jobs
# the limit allows to run together certainly meet), records the most it saw, and leaves.
COUNTER = r"""
import os, sys, time
folder, name, target, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
running = os.path.join(folder, "running")
mine = os.path.join(running, name)
with open(os.path.join(folder, "order"), "a") as f:
    f.write(f"start {name}\n")
open(mine, "w").close()
seen = 0
deadline = time.monotonic() + hold
while True:
    seen = max(seen, len(os.listdir(running)))
    if seen >= target or time.monotonic() > deadline:
        break
    time.sleep(0.01)
time.sleep(0.2)
seen = max(seen, len(os.listdir(running)))
with open(os.path.join(folder, "seen-" + name), "w") as f:
    f.write(str(seen))
with open(os.path.join(folder, "order"), "a") as f:
    f.write(f"end {name}\n")
os.unlink(mine)
"""

# Ignores SIGTERM, says it is ready, sleeps.
IGNORE_TERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "open(sys.argv[1], 'w').close()\n"
    "time.sleep(1000)\n"
)

# A process tree: a child that ignores SIGTERM, one that escaped into its own session
# (setsid) and ignores SIGTERM too; the pids of the three, once all are ready, in argv[1].
TREE = r"""
import os, subprocess, sys, time
out = sys.argv[1]
ignore = sys.argv[2]
ign = subprocess.Popen([sys.executable, "-c", ignore, out + ".ready1"])
esc = subprocess.Popen([sys.executable, "-c", ignore, out + ".ready2"], start_new_session=True)
while not (os.path.exists(out + ".ready1") and os.path.exists(out + ".ready2")):
    time.sleep(0.01)
with open(out + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\n{ign.pid}\n{esc.pid}\n")
os.rename(out + ".tmp", out)
time.sleep(1000)
"""


def _counter_job(
    folder: Path, name: str, target: int, hold: float = 3.0
) -> pb.ScheduleBatchRequest:
    (folder / "running").mkdir(parents=True, exist_ok=True)
    (folder / "running").chmod(0o777)  # the jobs run as nobody
    return job(PY, "-c", COUNTER, str(folder), name, str(target), str(hold), name=name)


def _seen(folder: Path, names: list[str]) -> list[int]:
    return [int((folder / f"seen-{n}").read_text()) for n in names]


def _order(folder: Path) -> list[str]:
    return (folder / "order").read_text().splitlines()


def _pid_job(pidfile: Path, name: str, then: str = "exec sleep 1000") -> pb.ScheduleBatchRequest:
    """A shell job that writes its pid, then runs `then`."""
    return job(
        "sh", "-c", f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; {then}", name=name
    )


def _stdout(stub: pb_grpc.JobWorkerServiceStub, cid: str) -> bytes:
    """The first job's stdout as GetBatch has it."""
    return bytes(stub.GetBatch(pb.GetBatchRequest(correlation_id=cid)).batch.jobs[0].stdout.data)


def _wait_pid(pidfile: Path) -> int:
    pids: list[int] = wait_until(lambda: read_pids(pidfile), what=f"pid in {pidfile}")  # type: ignore[assignment]
    return pids[0]


def _wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    wait_until(
        lambda: not any(alive(p) for p in pids),
        timeout,
        f"processes {[p for p in pids if alive(p)]} gone",
    )


def _grace(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


# --- limits and order -----------------------------------------------------------------------


def test_max_concurrent_holds_across_batches(make_server: ServerFactory, tmp_path: Path) -> None:
    srv = make_server(jobs={"max_concurrent": 2})
    stub = srv.stub("alice")
    names = ["a", "b", "c", "d"]
    one = schedule(stub, *[_counter_job(tmp_path, n, target=3) for n in names[:2]])
    two = schedule(stub, *[_counter_job(tmp_path, n, target=3) for n in names[2:]])
    for reply in (one, two):
        assert wait_batch(stub, reply.correlation_id, 90).state == pb.BATCH_STATE_SUCCEEDED
    seen = _seen(tmp_path, names)
    assert max(seen) == 2, seen  # two at once, never three


def test_max_concurrent_never_exceeded_as_the_server_reports(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server(jobs={"max_concurrent": 2})
    stub = srv.stub("alice")
    reply = schedule(stub, *[_counter_job(tmp_path, f"j{i}", target=2, hold=1) for i in range(5)])
    cid = reply.correlation_id
    most = 0
    while True:
        batch = stub.GetBatch(pb.GetBatchRequest(correlation_id=cid, log_tail_bytes=0)).batch
        most = max(most, sum(j.state == pb.JOB_STATE_RUNNING for j in batch.jobs))
        if batch.state != pb.BATCH_STATE_RUNNING:
            break
    assert batch.state == pb.BATCH_STATE_SUCCEEDED
    assert most <= 2
    assert max(_seen(tmp_path, [f"j{i}" for i in range(5)])) == 2


def test_max_parallel_limits_one_batch(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    names = ["p0", "p1", "p2"]
    reply = schedule(
        stub,
        options(max_parallel=1),
        *[_counter_job(tmp_path, n, target=2, hold=1) for n in names],
    )
    batch = wait_batch(stub, reply.correlation_id, 60)
    assert batch.state == pb.BATCH_STATE_SUCCEEDED
    assert batch.options.max_parallel == 1
    assert _seen(tmp_path, names) == [1, 1, 1]
    assert _order(tmp_path) == [f"{what} {n}" for n in names for what in ("start", "end")]
    for before, after in zip(batch.jobs, batch.jobs[1:], strict=False):
        assert before.end_time.ToNanoseconds() <= after.start_time.ToNanoseconds()


def test_max_parallel_of_one_batch_does_not_hold_back_others(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server(jobs={"max_concurrent": 2})
    stub = srv.stub("alice")
    release = tmp_path / "release"
    block = f"while [ ! -e {release} ]; do sleep 0.02; done"
    first = schedule(
        stub,
        options(max_parallel=1),
        job("sh", "-c", block, name="block"),
        job("true", name="after"),
    )
    try:
        wait_job(stub, first.correlation_id, "block", pb.JOB_STATE_RUNNING)
        second = schedule(stub, job("true", name="other"))
        assert wait_batch(stub, second.correlation_id).state == pb.BATCH_STATE_SUCCEEDED
        assert get_job(stub, first.correlation_id, "after").state == pb.JOB_STATE_QUEUED
    finally:
        release.touch()
    assert wait_batch(stub, first.correlation_id).state == pb.BATCH_STATE_SUCCEEDED


def test_fifo_across_batches(make_server: ServerFactory, tmp_path: Path) -> None:
    srv = make_server(jobs={"max_concurrent": 1})
    stub = srv.stub("alice")
    release = tmp_path / "release"
    order = tmp_path / "order"
    block = f"while [ ! -e {release} ]; do sleep 0.02; done"

    def note(name: str) -> pb.ScheduleBatchRequest:
        return job("sh", "-c", f"echo {name} >> {order}", name=name)

    a = schedule(stub, job("sh", "-c", block, name="block"), note("a1"), note("a2"))
    try:
        wait_job(stub, a.correlation_id, "block", pb.JOB_STATE_RUNNING)
        b = schedule(stub, note("b1"), note("b2"))
        c = schedule(stub, note("c1"))
        for cid in (b.correlation_id, c.correlation_id):
            batch = stub.GetBatch(pb.GetBatchRequest(correlation_id=cid)).batch
            assert {j.state for j in batch.jobs} == {pb.JOB_STATE_QUEUED}
    finally:
        release.touch()
    for reply in (a, b, c):
        assert wait_batch(stub, reply.correlation_id).state == pb.BATCH_STATE_SUCCEEDED
    assert order.read_text().split() == ["a1", "a2", "b1", "b2", "c1"]


# --- dependencies and fail_fast -------------------------------------------------------------


def test_depends_on_orders_jobs_and_skips_after_failure(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    order = tmp_path / "order"

    def note(name: str, *deps: str, code: int = 0) -> pb.ScheduleBatchRequest:
        script = f"sleep 0.2; echo {name} >> {order}; exit {code}"
        return job("sh", "-c", script, name=name, depends_on=list(deps))

    reply = schedule(
        stub,
        note("c", "b"),  # a dependency may come later in the stream
        note("b", "a"),
        note("a"),
        note("d", code=1),
        note("e", "d"),
        note("f", "e"),
        note("g", "a", "d"),
    )
    batch = wait_batch(stub, reply.correlation_id, 60)
    assert batch.state == pb.BATCH_STATE_FAILED
    jobs = {j.spec.name: j for j in batch.jobs}
    ran = order.read_text().split()
    assert [n for n in ran if n in "abc"] == ["a", "b", "c"]
    assert sorted(ran) == ["a", "b", "c", "d"]
    for before, after in (("a", "b"), ("b", "c")):
        assert jobs[after].state == pb.JOB_STATE_SUCCEEDED
        assert jobs[before].end_time.ToNanoseconds() <= jobs[after].start_time.ToNanoseconds()
    assert jobs["d"].state == pb.JOB_STATE_FAILED
    for name, dep in (("e", "d"), ("f", "e"), ("g", "d")):
        j = jobs[name]
        assert j.state == pb.JOB_STATE_SKIPPED, j
        assert dep in j.message, j.message
        assert not j.HasField("start_time")
        assert not j.HasField("exit_code")
        assert j.HasField("end_time")


def test_fail_fast_cancels_the_rest(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    pidfile = tmp_path / "pid"
    marker = tmp_path / "queued-ran"
    reply = schedule(
        stub,
        options(fail_fast=True, max_parallel=2),
        _pid_job(pidfile, "long"),
        job("sh", "-c", f"while [ ! -e {pidfile} ]; do sleep 0.02; done; exit 4", name="bad"),
        job("touch", str(marker), name="queued"),
        job("true", name="dependent", depends_on=["long"]),
    )
    batch = wait_batch(stub, reply.correlation_id, 60)
    jobs = {j.spec.name: j for j in batch.jobs}
    assert jobs["bad"].state == pb.JOB_STATE_FAILED
    assert jobs["bad"].exit_code == 4
    assert jobs["long"].state == pb.JOB_STATE_CANCELED
    assert jobs["queued"].state == pb.JOB_STATE_CANCELED
    assert not jobs["queued"].HasField("start_time")
    assert jobs["dependent"].state in (pb.JOB_STATE_CANCELED, pb.JOB_STATE_SKIPPED)
    assert "bad" in jobs["long"].message
    assert "bad" in jobs["queued"].message
    assert batch.state == pb.BATCH_STATE_FAILED
    assert not marker.exists()
    _wait_gone(read_pids(pidfile))


def test_fail_fast_names_the_job_that_failed_not_its_skipped_dependents(server: Server) -> None:
    stub = server.stub("alice")
    reply = schedule(
        stub,
        options(fail_fast=True),
        job("sh", "-c", "sleep 0.2; exit 1", name="a"),
        job("true", name="b", depends_on=["a"]),
        job("sleep", "30", name="c"),
    )
    batch = wait_batch(stub, reply.correlation_id, 60)
    jobs = {j.spec.name: j for j in batch.jobs}
    assert jobs["a"].state == pb.JOB_STATE_FAILED
    assert jobs["b"].state == pb.JOB_STATE_SKIPPED
    assert "dependency a" in jobs["b"].message
    assert jobs["c"].state == pb.JOB_STATE_CANCELED
    assert "job a failed" in jobs["c"].message


def test_an_absurd_grace_period_is_invalid(server: Server) -> None:
    stub = server.stub("alice")
    reply = schedule(stub, job("true"))
    for grace in (
        Duration(seconds=3 * 86_400),
        Duration(seconds=-1),
        Duration(nanos=2_000_000_000),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.CancelBatch(
                pb.CancelBatchRequest(correlation_id=reply.correlation_id, grace_period=grace)
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "grace_period" in (info.value.details() or "")


def test_without_fail_fast_the_others_go_on(server: Server) -> None:
    stub = server.stub("alice")
    reply = schedule(
        stub,
        options(max_parallel=1),
        job("false", name="bad"),
        job("true", name="good"),
    )
    batch = wait_batch(stub, reply.correlation_id)
    assert [j.state for j in batch.jobs] == [pb.JOB_STATE_FAILED, pb.JOB_STATE_SUCCEEDED]
    assert batch.state == pb.BATCH_STATE_FAILED


# --- timeouts ------------------------------------------------------------------------------


def test_timeout_stops_the_job(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    pidfile = tmp_path / "pid"
    spec = _pid_job(pidfile, "slow")
    spec.job.timeout.CopyFrom(Duration(seconds=1))
    ready = tmp_path / "ready"
    stubborn = job(PY, "-c", IGNORE_TERM, str(ready), name="stubborn", timeout=Duration(seconds=1))
    reply = schedule(stub, spec, stubborn, job("true", name="quick", timeout=Duration(seconds=30)))
    batch = wait_batch(stub, reply.correlation_id, 60)
    slow, ignoring, quick = batch.jobs
    assert slow.state == pb.JOB_STATE_TIMED_OUT
    assert slow.message == "timed out after 1s"
    assert slow.signal == signal.SIGTERM
    assert ignoring.state == pb.JOB_STATE_TIMED_OUT  # killed after kill_grace
    assert ignoring.message == "timed out after 1s"
    assert ignoring.signal == signal.SIGKILL
    assert quick.state == pb.JOB_STATE_SUCCEEDED
    assert batch.state == pb.BATCH_STATE_FAILED
    _wait_gone(read_pids(pidfile))


def test_default_timeout_from_config(make_server: ServerFactory, tmp_path: Path) -> None:
    srv = make_server(jobs={"default_timeout": "1s"})
    stub = srv.stub("alice")
    reply = schedule(stub, job("sleep", "60", name="slow"))
    batch = wait_batch(stub, reply.correlation_id, 60)
    assert batch.jobs[0].state == pb.JOB_STATE_TIMED_OUT
    assert batch.jobs[0].message == "timed out after 1s"


# --- cancel ---------------------------------------------------------------------------------


def test_cancel_answers_once_jobs_ended(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    pidfile = tmp_path / "pid"
    reply = schedule(stub, _pid_job(pidfile, "sleeper", then="printf hello; exec sleep 1000"))
    cid = reply.correlation_id
    pid = _wait_pid(pidfile)
    wait_job(stub, cid, "sleeper", pb.JOB_STATE_RUNNING)
    # The pid is written before the printf: cancel only once the output is there.
    wait_until(lambda: _stdout(stub, cid) == b"hello", what="the sleeper's output")
    answer = stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid)).batch
    alive_after = alive(pid)
    kill_pids([pid])
    assert not alive_after
    assert answer.correlation_id == cid
    assert answer.state == pb.BATCH_STATE_CANCELED
    assert answer.HasField("end_time")
    (sleeper,) = answer.jobs
    assert sleeper.state == pb.JOB_STATE_CANCELED
    assert sleeper.HasField("end_time")
    assert "alice" in sleeper.message
    assert sleeper.stdout.data == b""  # no log bytes in the answer
    after = stub.GetBatch(pb.GetBatchRequest(correlation_id=cid)).batch
    assert after.state == pb.BATCH_STATE_CANCELED
    assert after.jobs[0].stdout.data == b"hello"


def test_cancel_stops_queued_jobs_before_they_start(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    pidfile = tmp_path / "pid"
    markers = [tmp_path / "m1", tmp_path / "m2"]
    reply = schedule(
        stub,
        options(max_parallel=1),
        _pid_job(pidfile, "running"),
        job("touch", str(markers[0]), name="queued1"),
        job("touch", str(markers[1]), name="queued2"),
    )
    cid = reply.correlation_id
    pid = _wait_pid(pidfile)
    try:
        answer = stub.CancelBatch(
            pb.CancelBatchRequest(correlation_id=cid, grace_period=_grace(0.5))
        ).batch
    finally:
        kill_pids([pid])
    assert [j.state for j in answer.jobs] == [pb.JOB_STATE_CANCELED] * 3
    assert answer.state == pb.BATCH_STATE_CANCELED
    for j in answer.jobs[1:]:
        assert not j.HasField("start_time")
    schedule(stub, job("true"))  # whatever was queued would have had its turn by now
    assert wait_batch(stub, cid).state == pb.BATCH_STATE_CANCELED
    assert not any(m.exists() for m in markers)


def test_cancelled_batch_records_waiting_dependents_canceled(
    server: Server, tmp_path: Path
) -> None:
    """Every job the caller cancels is CANCELED, also one whose dependency it cancelled."""
    stub = server.stub("alice")
    pidfile = tmp_path / "pid"
    reply = schedule(
        stub,
        _pid_job(pidfile, "first"),
        job("true", name="second", depends_on=["first"]),
        job("true", name="third", depends_on=["second"]),
    )
    cid = reply.correlation_id
    pid = _wait_pid(pidfile)
    try:
        answer = stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid)).batch
    finally:
        kill_pids([pid])
    states = {j.spec.name: pb.JobState.Name(j.state) for j in answer.jobs}
    assert states == dict.fromkeys(("first", "second", "third"), "JOB_STATE_CANCELED")
    assert answer.state == pb.BATCH_STATE_CANCELED


def test_cancel_selected_jobs_only(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    pidfile = tmp_path / "pid"
    release = tmp_path / "release"
    reply = schedule(
        stub,
        _pid_job(pidfile, "a"),
        job("sh", "-c", f"while [ ! -e {release} ]; do sleep 0.02; done", name="b"),
        job("true", name="c", depends_on=["a"]),
    )
    cid = reply.correlation_id
    pid = _wait_pid(pidfile)
    wait_job(stub, cid, "b", pb.JOB_STATE_RUNNING)
    try:
        answer = stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid, job_names=["a"])).batch
        jobs = {j.spec.name: j for j in answer.jobs}
        assert jobs["a"].state == pb.JOB_STATE_CANCELED
        assert jobs["b"].state == pb.JOB_STATE_RUNNING
        assert jobs["c"].state == pb.JOB_STATE_SKIPPED
        assert "a" in jobs["c"].message
        assert answer.state == pb.BATCH_STATE_RUNNING
        assert not alive(pid)
    finally:
        release.touch()
        kill_pids([pid])
    batch = wait_batch(stub, cid)
    assert get_job(stub, cid, "b").state == pb.JOB_STATE_SUCCEEDED
    assert batch.state == pb.BATCH_STATE_CANCELED


def test_cancel_of_an_ended_batch_changes_nothing(server: Server) -> None:
    stub = server.stub("alice")
    reply = schedule(stub, job("true", name="done"), job("false", name="bad"))
    cid = reply.correlation_id
    before = wait_batch(stub, cid, log_tail_bytes=0)
    assert before.state == pb.BATCH_STATE_FAILED
    answer = stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid)).batch
    assert answer.state == pb.BATCH_STATE_FAILED
    assert [j.state for j in answer.jobs] == [pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED]
    assert answer.end_time == before.end_time
    after = stub.GetBatch(pb.GetBatchRequest(correlation_id=cid, log_tail_bytes=0)).batch
    assert after == before


def test_cancel_kills_the_whole_process_tree(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    pidfile = tmp_path / "pids"
    reply = schedule(stub, job(PY, "-c", TREE, str(pidfile), IGNORE_TERM, name="tree"))
    cid = reply.correlation_id
    pids: list[int] = wait_until(lambda: read_pids(pidfile), what="the tree's pids")  # type: ignore[assignment]
    try:
        assert len(pids) == 3
        assert all(alive(p) for p in pids)
        answer = stub.CancelBatch(
            pb.CancelBatchRequest(correlation_id=cid, grace_period=_grace(0.5))
        ).batch
        assert answer.jobs[0].state == pb.JOB_STATE_CANCELED
        main, ignoring, escaped = pids
        assert not alive(main)
        _wait_gone([ignoring], 10)
        _wait_gone([escaped], 10)
    finally:
        kill_pids(pids)


def test_grace_period_is_honoured(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    notes = tmp_path / "notes"
    ready = tmp_path / "ready"
    tidy = (
        "import signal, sys, time\n"
        "def term(*_):\n"
        f"    open({str(notes)!r}, 'a').write('term\\n')\n"
        "    time.sleep(1.5)\n"
        f"    open({str(notes)!r}, 'a').write('tidied\\n')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(1000)\n"
    )
    reply = schedule(stub, job(PY, "-c", tidy, name="tidy"))
    cid = reply.correlation_id
    wait_until(ready.exists, what="the job's handler")
    answer = stub.CancelBatch(
        pb.CancelBatchRequest(correlation_id=cid, grace_period=_grace(30))
    ).batch
    assert notes.read_text().split() == ["term", "tidied"]  # it had its grace period
    (tidy_job,) = answer.jobs
    assert tidy_job.state == pb.JOB_STATE_CANCELED
    assert tidy_job.exit_code == 0
    assert tidy_job.signal == 0

    ready2 = tmp_path / "ready2"
    reply = schedule(stub, job(PY, "-c", IGNORE_TERM, str(ready2), name="stubborn"))
    wait_until(ready2.exists, what="the job's handler")
    answer = stub.CancelBatch(
        pb.CancelBatchRequest(correlation_id=reply.correlation_id, grace_period=_grace(0.3))
    ).batch
    (stubborn,) = answer.jobs
    assert stubborn.state == pb.JOB_STATE_CANCELED
    assert stubborn.signal == signal.SIGKILL
    assert not stubborn.HasField("exit_code")


def test_cancel_without_grace_uses_kill_grace(server: Server, tmp_path: Path) -> None:
    stub = server.stub("alice")
    ready = tmp_path / "ready"
    reply = schedule(stub, job(PY, "-c", IGNORE_TERM, str(ready), name="stubborn"))
    wait_until(ready.exists, what="the job's handler")
    answer = stub.CancelBatch(pb.CancelBatchRequest(correlation_id=reply.correlation_id)).batch
    assert answer.jobs[0].state == pb.JOB_STATE_CANCELED
    assert answer.jobs[0].signal == signal.SIGKILL


@pytest.mark.parametrize(
    ("argvs", "cancel", "state"),
    [
        ([["true"], ["true"]], False, pb.BATCH_STATE_SUCCEEDED),
        ([["true"], ["sh", "-c", "exit 2"]], False, pb.BATCH_STATE_FAILED),
        ([["true"], ["sleep", "1000"]], True, pb.BATCH_STATE_CANCELED),
    ],
    ids=["succeeded", "failed", "canceled"],
)
def test_batch_states(server: Server, argvs: list[list[str]], cancel: bool, state: int) -> None:
    stub = server.stub("alice")
    label = uuid.uuid4().hex
    reply = schedule(stub, options(labels={"t": label}), *[job(*a) for a in argvs])
    cid = reply.correlation_id
    if cancel:
        wait_job(stub, cid, "job-1", pb.JOB_STATE_RUNNING)
        wait_job(stub, cid, "job-0", pb.JOB_STATE_SUCCEEDED)
        stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid, grace_period=_grace(0.5)))
    batch = wait_batch(stub, cid)
    assert batch.state == state
    (summary,) = stub.ListBatches(pb.ListBatchesRequest(labels={"t": label})).batches
    assert summary.state == state
    assert summary.job_count == 2
    assert sum(summary.jobs_by_state.values()) == 2
    assert dict(summary.jobs_by_state) == dict(
        _count(pb.JobState.Name(j.state) for j in batch.jobs)
    )
    filtered = stub.ListBatches(pb.ListBatchesRequest(labels={"t": label}, states=[state]))
    assert [b.correlation_id for b in filtered.batches] == [cid]
    other = [s for s in (pb.BATCH_STATE_SUCCEEDED, pb.BATCH_STATE_FAILED) if s != state]
    assert not stub.ListBatches(pb.ListBatchesRequest(labels={"t": label}, states=other)).batches


def _count(names: object) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:  # type: ignore[attr-defined]
        out[n] = out.get(n, 0) + 1
    return out
