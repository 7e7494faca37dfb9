"""Crash safety through the real server: kill -9, torn journals, SIGTERM, retention, disk full."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc

from jobworker.v1 import jobworker_pb2 as pb
from tests.integration.conftest import (
    PY,
    ServerFactory,
    alive,
    data_dir_of,
    get_job,
    job,
    kill_pids,
    options,
    read_pids,
    rpc_error,
    schedule,
    serve_expecting_failure,
    wait_batch,
    wait_job,
    wait_until,
    write_config,
)

# Writes some output, then the pids of itself, of a child that ignores SIGTERM and of one in a
# session of its own (only its cgroup finds it), then sleeps.
RUNNER = r"""
import os, subprocess, sys, time
pidfile = sys.argv[1]
sys.stdout.write("output so far\n")
sys.stdout.flush()
sys.stderr.write("err so far")
sys.stderr.flush()
ready = pidfile + ".child"
child = subprocess.Popen([sys.executable, "-c",
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "open(sys.argv[1], 'w').close()\n"
    "time.sleep(1000)\n", ready])
escaped = subprocess.Popen(["sleep", "1000"], start_new_session=True)  # not in the group
while not os.path.exists(ready):
    time.sleep(0.01)
with open(pidfile + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\n{child.pid}\n{escaped.pid}\n")
os.rename(pidfile + ".tmp", pidfile)
time.sleep(1000)
"""


def _runner(pidfile: Path, name: str = "runner") -> pb.ScheduleBatchRequest:
    return job(PY, "-c", RUNNER, str(pidfile), name=name)


def _wait_pids(pidfile: Path) -> list[int]:
    return wait_until(lambda: read_pids(pidfile), what=f"pids in {pidfile}")  # type: ignore[return-value]


def _wait_runner_gone(pids: list[int]) -> None:
    """The runner's processes are gone: all three where the server has cgroups (root),
    else the two of its process group (the escaped one only a cgroup finds)."""
    _wait_gone(pids if os.geteuid() == 0 else pids[:2])


def _wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    wait_until(
        lambda: not any(alive(p) for p in pids),
        timeout,
        f"processes {[p for p in pids if alive(p)]} gone",
    )


def _full(stub: object, cid: str) -> pb.Batch:
    return stub.GetBatch(pb.GetBatchRequest(correlation_id=cid, log_tail_bytes=1 << 20)).batch  # type: ignore[attr-defined,no-any-return]


def test_a_crash_of_server_and_supervisor_then_restart(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server(jobs={"max_concurrent": 1})
    stub = srv.stub("alice")
    data = data_dir_of(srv)

    earlier = schedule(
        stub, job("sh", "-c", "printf 'earlier out'; printf 'earlier err' >&2", name="e")
    )
    failed = schedule(stub, job("sh", "-c", "exit 5", name="f"))
    assert wait_batch(stub, earlier.correlation_id).state == pb.BATCH_STATE_SUCCEEDED
    assert wait_batch(stub, failed.correlation_id).state == pb.BATCH_STATE_FAILED
    before = {cid: _full(stub, cid) for cid in (earlier.correlation_id, failed.correlation_id)}

    pidfile = tmp_path / "pids"
    marker = tmp_path / "queued-ran"
    running = schedule(
        stub,
        _runner(pidfile),
        job("touch", str(tmp_path / "second"), name="next"),
        job("touch", str(tmp_path / "never"), name="after-runner", depends_on=["runner"]),
    )
    queued = schedule(stub, job("sh", "-c", f"touch {marker}; echo queued-done", name="queued"))
    pids = _wait_pids(pidfile)
    try:
        wait_job(stub, running.correlation_id, "runner", pb.JOB_STATE_RUNNING)
        assert get_job(stub, queued.correlation_id, "queued").state == pb.JOB_STATE_QUEUED

        srv.crash()
        assert all(alive(p) for p in pids)  # orphaned, not killed: the next start kills them
        srv.start()
        stub = srv.stub("alice")

        for cid, batch in before.items():
            assert _full(stub, cid) == batch
        runner = get_job(stub, running.correlation_id, "runner")
        assert runner.state == pb.JOB_STATE_LOST
        assert "the job supervisor died while it ran" in runner.message
        assert runner.HasField("start_time")
        assert runner.HasField("end_time")
        _wait_runner_gone(pids)  # its cgroup, found by the name the journal recorded

        done = wait_batch(stub, queued.correlation_id, 60)
        assert done.state == pb.BATCH_STATE_SUCCEEDED
        assert done.jobs[0].stdout.data == b"queued-done\n"
        assert marker.exists()
        rest = wait_batch(stub, running.correlation_id, 60)
        assert rest.state == pb.BATCH_STATE_FAILED  # LOST is not success
        assert get_job(stub, running.correlation_id, "next").state == pb.JOB_STATE_SUCCEEDED
        skipped = get_job(stub, running.correlation_id, "after-runner")
        assert skipped.state == pb.JOB_STATE_SKIPPED
        assert "runner" in skipped.message
        assert not (tmp_path / "never").exists()
        runner = rest.jobs[0]
        assert runner.stdout.data == b"output so far\n"
        assert runner.stderr.data == b"err so far"
        job_dir = data / "batches" / running.correlation_id / "jobs" / "0"
        assert (job_dir / "stdout").read_bytes() == b"output so far\n"
        assert (job_dir / "stderr").read_bytes() == b"err so far"
        listed = {
            b.correlation_id: b.state
            for b in stub.ListBatches(pb.ListBatchesRequest(page_size=100)).batches
        }
        assert listed == {
            earlier.correlation_id: pb.BATCH_STATE_SUCCEEDED,
            failed.correlation_id: pb.BATCH_STATE_FAILED,
            running.correlation_id: pb.BATCH_STATE_FAILED,
            queued.correlation_id: pb.BATCH_STATE_SUCCEEDED,
        }
    finally:
        kill_pids(pids)


def test_restart_keeps_every_batch_and_new_ones_come_after(make_server: ServerFactory) -> None:
    srv = make_server()
    stub = srv.stub("alice")
    cids = [
        schedule(stub, options(idempotency_key=f"k{i}"), job("echo", str(i))).correlation_id
        for i in range(3)
    ]
    for cid in cids:
        wait_batch(stub, cid)
    before = [_full(stub, cid) for cid in cids]
    srv.stop()
    srv.start()
    stub = srv.stub("alice")
    assert [_full(stub, cid) for cid in cids] == before
    again = schedule(stub, options(idempotency_key="k1"), job("false"))
    assert again.deduplicated
    assert again.correlation_id == cids[1]
    new = schedule(stub, job("true")).correlation_id
    wait_batch(stub, new)
    listed = [b.correlation_id for b in stub.ListBatches(pb.ListBatchesRequest()).batches]
    assert listed == [new, *reversed(cids)]


def test_torn_journal_tail_loads(make_server: ServerFactory) -> None:
    srv = make_server()
    stub = srv.stub("alice")
    reply = schedule(stub, job("echo", "one", name="one"), job("echo", "two", name="two"))
    cid = reply.correlation_id
    before = wait_batch(stub, cid, log_tail_bytes=1 << 20)
    assert before.state == pb.BATCH_STATE_SUCCEEDED
    srv.stop()
    journal = data_dir_of(srv) / "batches" / cid / "journal"
    assert journal.exists()
    with journal.open("ab") as f:
        f.write(b'{"q":99,"i":1,"s":"FAIL')  # a crash mid-append: no newline
    srv.start()
    stub = srv.stub("alice")
    assert _full(stub, cid) == before
    # The server goes on appending to the same journal after the torn tail.
    again = schedule(stub, job("true")).correlation_id
    assert wait_batch(stub, again).state == pb.BATCH_STATE_SUCCEEDED
    srv.stop()
    srv.start()
    stub = srv.stub("alice")
    assert _full(stub, cid) == before


def test_torn_journal_of_a_running_job(make_server: ServerFactory, tmp_path: Path) -> None:
    srv = make_server()
    stub = srv.stub("alice")
    pidfile = tmp_path / "pids"
    reply = schedule(stub, _runner(pidfile))
    cid = reply.correlation_id
    pids = _wait_pids(pidfile)
    try:
        wait_job(stub, cid, "runner", pb.JOB_STATE_RUNNING)
        srv.crash()
        journal = data_dir_of(srv) / "batches" / cid / "journal"
        with journal.open("ab") as f:
            f.write(b"\x00\xff garbage")
        srv.start()
        stub = srv.stub("alice")
        runner = wait_batch(stub, cid).jobs[0]
        assert runner.state == pb.JOB_STATE_LOST
        assert "the job supervisor died while it ran" in runner.message
        _wait_runner_gone(pids)
    finally:
        kill_pids(pids)


def test_sigterm_leaves_no_job_process_behind(make_server: ServerFactory, tmp_path: Path) -> None:
    srv = make_server(jobs={"max_concurrent": 1})
    stub = srv.stub("alice")
    pidfile = tmp_path / "pids"
    marker = tmp_path / "queued-ran"
    running = schedule(stub, _runner(pidfile))
    queued = schedule(stub, job("touch", str(marker), name="queued"))
    pids = _wait_pids(pidfile)
    try:
        wait_job(stub, running.correlation_id, "runner", pb.JOB_STATE_RUNNING)
        assert srv.stop() == 0
        _wait_runner_gone(pids)
        assert not marker.exists()

        srv.start()
        stub = srv.stub("alice")
        runner = wait_batch(stub, running.correlation_id).jobs[0]
        assert runner.state == pb.JOB_STATE_LOST
        assert "shut down" in runner.message
        assert runner.stdout.data == b"output so far\n"
        done = wait_batch(stub, queued.correlation_id)
        assert done.state == pb.BATCH_STATE_SUCCEEDED
        assert marker.exists()
    finally:
        kill_pids(pids)


def test_retention_deletes_old_ended_batches(make_server: ServerFactory) -> None:
    srv = make_server(retention={"max_age": "1s"})
    stub = srv.stub("alice")
    data = data_dir_of(srv)
    reply = schedule(stub, job("echo", "old"))
    cid = reply.correlation_id
    batch = wait_batch(stub, cid)
    assert batch.state == pb.BATCH_STATE_SUCCEEDED
    folder = data / "batches" / cid
    assert (folder / "jobs" / "0" / "stdout").read_bytes() == b"old\n"
    srv.stop()
    ended = batch.end_time.ToNanoseconds() / 1e9
    wait_until(lambda: time.time() > ended + 2, what="the batch to be older than max_age")
    srv.start()  # the sweep runs when the server starts, then every SWEEP_INTERVAL
    stub = srv.stub("alice")
    err = rpc_error(lambda: stub.GetBatch(pb.GetBatchRequest(correlation_id=cid)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert cid not in {b.correlation_id for b in stub.ListBatches(pb.ListBatchesRequest()).batches}
    assert not folder.exists()
    fresh = schedule(stub, job("echo", "new")).correlation_id
    assert wait_batch(stub, fresh).state == pb.BATCH_STATE_SUCCEEDED


def test_full_disk_refuses_new_batches_and_keeps_serving(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server(jobs={"min_free_disk": "1000TiB"})
    stub = srv.stub("alice")
    marker = tmp_path / "ran"
    err = rpc_error(lambda: schedule(stub, job("touch", str(marker))))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "min_free_disk" in err.details()
    assert "disk" in err.details()
    err = rpc_error(lambda: schedule(stub, job("touch", str(marker))))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert list(stub.ListBatches(pb.ListBatchesRequest()).batches) == []
    assert not marker.exists()
    assert srv.proc is not None
    assert srv.proc.poll() is None

    # Room again (the limit lowered, reloaded): scheduling works without a restart.
    write_config(srv.config, srv.pki, data_dir_of(srv), jobs={"min_free_disk": "1MiB"})
    srv.signal(signal.SIGHUP)
    srv.wait_for_log("config_reloaded")
    reply = schedule(stub, job("touch", str(marker)))
    assert wait_batch(stub, reply.correlation_id).state == pb.BATCH_STATE_SUCCEEDED
    assert marker.exists()


def test_fail_fast_holds_for_a_job_lost_in_a_crash(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server()
    stub = srv.stub("alice")
    pidfile = tmp_path / "pids"
    marker = tmp_path / "second-ran"
    reply = schedule(
        stub,
        options(fail_fast=True, max_parallel=1),
        _runner(pidfile),
        job("touch", str(marker), name="second"),
    )
    pids = _wait_pids(pidfile)
    srv.crash()
    srv.start()
    stub = srv.stub("alice")
    batch = wait_batch(stub, reply.correlation_id)
    jobs = {j.spec.name: j for j in batch.jobs}
    assert jobs["runner"].state == pb.JOB_STATE_LOST
    assert jobs["second"].state == pb.JOB_STATE_CANCELED
    assert "runner" in jobs["second"].message
    assert batch.state == pb.BATCH_STATE_FAILED
    assert not marker.exists()
    _wait_gone(pids)


def test_a_start_that_cannot_listen_touches_no_job(
    make_server: ServerFactory, tmp_path: Path, pki: Path
) -> None:
    """The port is taken: the server stops before recovery, so the job that was running
    is not recorded LOST (nor killed) and the queued one does not run."""
    srv = make_server(jobs={"max_concurrent": 1})
    stub = srv.stub("alice")
    pidfile = tmp_path / "pids"
    marker = tmp_path / "queued-ran"
    batch = schedule(stub, _runner(pidfile), job("touch", str(marker), name="queued"))
    pids = _wait_pids(pidfile)
    try:
        wait_job(stub, batch.correlation_id, "runner", pb.JOB_STATE_RUNNING)
        srv.kill()
        journal = data_dir_of(srv) / "batches" / batch.correlation_id / "journal"
        before = journal.read_bytes()
        holder = make_server(data_dir=tmp_path / "other")
        config = write_config(
            tmp_path / "busy-port.toml",
            pki,
            data_dir_of(srv),
            server={"listen": f"127.0.0.1:{holder.port}"},
        )
        serve_expecting_failure(config, f"cannot listen on 127.0.0.1:{holder.port}")
        assert journal.read_bytes() == before
        assert not marker.exists()
        assert all(alive(p) for p in pids)
    finally:
        kill_pids(pids)
        srv.start()  # recovery removes the killed server's job groups; the fixture stops it
