"""Jobs outlive the server (contract 6.3): the job supervisor, restarts that take running
jobs back, a supervisor that dies, re-exec, and jobs.on_server_stop. Real servers, real
supervisor processes, real jobs and cgroups."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from google.protobuf.duration_pb2 import Duration

from jobworker.v1 import jobworker_pb2 as pb
from tests.integration.conftest import (
    PY,
    Server,
    ServerFactory,
    alive,
    data_dir_of,
    get_job,
    job,
    kill_pids,
    read_pids,
    schedule,
    wait_batch,
    wait_job,
    wait_until,
)

KEEP = {"on_server_stop": "keep"}

# Prints its pid to a file, then a numbered line every 50 ms (until a file appears: then
# exits with status 3), so a follower can tell a repeated or a missed byte.
TICKER = r"""
import os, sys, time
pidfile, stop = sys.argv[1], sys.argv[2]
with open(pidfile + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\n")
os.rename(pidfile + ".tmp", pidfile)
i = 0
while not os.path.exists(stop):
    print(f"line {i}", flush=True)
    i += 1
    time.sleep(0.05)
print("done", flush=True)
sys.exit(3)
"""


def _ticker(tmp_path: Path, name: str = "ticker") -> pb.ScheduleBatchRequest:
    return job(
        PY, "-c", TICKER, str(tmp_path / f"{name}.pid"), str(tmp_path / f"{name}.stop"), name=name
    )


def _follow(stub: object, cid: str, cursor: str = "", until: bytes = b"") -> tuple[bytes, str]:
    """Follow the batch's stdout from `cursor` until `until` was seen (or the end): the
    bytes and the last cursor."""
    out = b""
    last = cursor
    request = pb.StreamBatchLogsRequest(correlation_id=cid, follow=True, cursor=cursor)
    stream = stub.StreamBatchLogs(request, timeout=60)  # type: ignore[attr-defined]
    for response in stream:
        last = response.cursor
        if (
            response.WhichOneof("event") == "chunk"
            and response.chunk.stream == pb.LOG_STREAM_STDOUT
        ):
            out += response.chunk.data
            if until and until in out:
                stream.cancel()
                break
    return out, last


def _supervisor_pid(srv: Server) -> int:
    return int(wait_until(srv.supervisor_pid, 10, "a job supervisor"))  # type: ignore[arg-type]


def test_kill_9_of_the_server_leaves_jobs_running_and_the_next_server_takes_them_back(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server(jobs=KEEP)
    stub = srv.stub("alice")
    batch = schedule(stub, _ticker(tmp_path), job("sleep", "0.3", name="short"))
    cid = batch.correlation_id
    (pid,) = wait_until(lambda: read_pids(tmp_path / "ticker.pid"), what="the ticker's pid")  # type: ignore[misc]
    before, cursor = _follow(stub, cid, until=b"line 3\n")
    supervisor = _supervisor_pid(srv)
    try:
        srv.kill()
        time.sleep(0.6)  # "short" ends while no server runs
        assert alive(pid)  # the job goes on
        assert alive(supervisor)
        srv.start()
        stub = srv.stub("alice")
        assert srv.supervisor_pid() == supervisor  # the same one: nothing was restarted
        ticker = get_job(stub, cid, "ticker")
        assert ticker.state == pb.JOB_STATE_RUNNING
        short = wait_job(stub, cid, "short", pb.JOB_STATE_SUCCEEDED)
        assert short.exit_code == 0  # its own end, recorded by the next server
        (tmp_path / "ticker.stop").touch()
        after, _ = _follow(stub, cid, cursor)  # the follower of before the restart goes on
        done = wait_batch(stub, cid)
        ticker = done.jobs[0]
        assert ticker.state == pb.JOB_STATE_FAILED
        assert ticker.exit_code == 3
        assert ticker.message == "exited with status 3"
        whole = (data_dir_of(srv) / "batches" / cid / "jobs" / "0" / "stdout").read_bytes()
        assert before + after == whole  # nothing repeated, nothing missed
        lines = whole.decode().splitlines()
        assert lines[-1] == "done"
        assert lines[:-1] == [f"line {i}" for i in range(len(lines) - 1)]
    finally:
        kill_pids([pid])


def test_sigterm_with_keep_leaves_jobs_running_for_the_next_server(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server(jobs=KEEP)
    stub = srv.stub("alice")
    cid = schedule(stub, _ticker(tmp_path)).correlation_id
    (pid,) = wait_until(lambda: read_pids(tmp_path / "ticker.pid"), what="the ticker's pid")  # type: ignore[misc]
    try:
        assert srv.stop() == 0
        assert alive(pid)
        srv.start()
        stub = srv.stub("alice")
        assert get_job(stub, cid, "ticker").state == pb.JOB_STATE_RUNNING
        (tmp_path / "ticker.stop").touch()
        assert wait_batch(stub, cid).jobs[0].exit_code == 3
    finally:
        kill_pids([pid])


def test_sigterm_with_stop_leaves_no_job_process_and_no_supervisor(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server(jobs={"on_server_stop": "stop"})
    stub = srv.stub("alice")
    cid = schedule(stub, _ticker(tmp_path)).correlation_id
    (pid,) = wait_until(lambda: read_pids(tmp_path / "ticker.pid"), what="the ticker's pid")  # type: ignore[misc]
    supervisor = _supervisor_pid(srv)
    assert srv.stop() == 0
    assert not alive(pid)
    wait_until(lambda: not alive(supervisor), 10, "the supervisor gone")
    data = data_dir_of(srv)
    assert not (data / "supervisor.pid").exists()  # it left cleanly, and said so
    assert not (data / "supervisor.sock").exists()
    log = (data / "supervisor.log").read_text()
    assert "supervisor_stopped" in log and "Traceback" not in log
    srv.start()
    ticker = get_job(srv.stub("alice"), cid, "ticker")
    assert ticker.state == pb.JOB_STATE_LOST
    assert ticker.message == "server shut down while it ran"


def test_a_dead_supervisor_takes_its_jobs_trees_along_and_a_new_one_runs_new_jobs(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server(jobs=KEEP)
    stub = srv.stub("alice")
    # A job with a child in a session of its own: only its cgroup finds it.
    pidfile = tmp_path / "pids"
    script = f"sleep 1000 & setsid sleep 1001 & printf '%s\\n' $! $$ > {pidfile}.tmp; "
    script += f"mv {pidfile}.tmp {pidfile}; wait"
    cid = schedule(stub, job("sh", "-c", script, name="tree")).correlation_id
    pids = wait_until(lambda: read_pids(pidfile), what="the tree's pids")
    supervisor = _supervisor_pid(srv)
    try:
        os.kill(supervisor, signal.SIGKILL)
        tree = wait_job(stub, cid, "tree", pb.JOB_STATE_LOST)
        assert "job supervisor died" in tree.message
        wait_until(lambda: not any(alive(p) for p in pids), 15, "the job's tree gone")  # type: ignore[union-attr]
        assert srv.supervisor_pid() not in (0, supervisor)  # a new one
        new = schedule(stub, job("echo", "after", name="after")).correlation_id
        done = wait_batch(stub, new)
        assert done.state == pb.BATCH_STATE_SUCCEEDED
        assert done.jobs[0].stdout.data == b"after\n"
    finally:
        kill_pids(pids)  # type: ignore[arg-type]


def test_a_supervisor_re_exec_keeps_its_jobs(make_server: ServerFactory, tmp_path: Path) -> None:
    """SIGHUP re-execs the supervisor (an upgrade): the same pid, the job still its child,
    and the job's end is still seen, with its exit code."""
    srv = make_server(jobs=KEEP)
    stub = srv.stub("alice")
    cid = schedule(stub, _ticker(tmp_path)).correlation_id
    (pid,) = wait_until(lambda: read_pids(tmp_path / "ticker.pid"), what="the ticker's pid")  # type: ignore[misc]
    supervisor = _supervisor_pid(srv)
    log = data_dir_of(srv) / "supervisor.log"
    try:
        os.kill(supervisor, signal.SIGHUP)
        wait_until(lambda: b'"resumed": true' in log.read_bytes(), 15, "the re-exec'd supervisor")
        assert srv.supervisor_pid() == supervisor
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == supervisor  # its parent
        assert get_job(stub, cid, "ticker").state == pb.JOB_STATE_RUNNING
        (tmp_path / "ticker.stop").touch()
        done = wait_batch(stub, cid)
        assert done.jobs[0].state == pb.JOB_STATE_FAILED
        assert done.jobs[0].exit_code == 3
    finally:
        kill_pids([pid])


# Ignores SIGTERM, so only the KILL at the end of the grace ends it.
STUBBORN = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: print("term", flush=True))
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\n")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(0.05)
"""


def test_a_stop_under_way_when_the_supervisor_re_execs_still_ends_in_its_kill(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """Before: the re-exec'd supervisor had forgotten the stop, the job never got its KILL,
    and the cancel never answered."""
    srv = make_server(jobs=KEEP)
    stub = srv.stub("alice")
    pidfile = tmp_path / "stubborn.pid"
    cid = schedule(stub, job(PY, "-c", STUBBORN, str(pidfile), name="stubborn")).correlation_id
    (pid,) = wait_until(lambda: read_pids(pidfile), what="the job's pid")  # type: ignore[misc]
    supervisor = _supervisor_pid(srv)
    log = data_dir_of(srv) / "supervisor.log"
    try:
        grace = Duration(seconds=3)
        cancel = stub.CancelBatch.future(
            pb.CancelBatchRequest(correlation_id=cid, grace_period=grace), timeout=60
        )
        wait_until(lambda: _stdout(stub, cid) == b"term\n", what="the job's TERM")
        os.kill(supervisor, signal.SIGHUP)  # within the grace
        wait_until(lambda: b'"resumed": true' in log.read_bytes(), 15, "the re-exec'd supervisor")
        (ended,) = cancel.result(timeout=30).batch.jobs
        assert ended.state == pb.JOB_STATE_CANCELED
        assert ended.signal == signal.SIGKILL
        wait_until(lambda: not alive(pid), 5, "the job's end")
    finally:
        kill_pids([pid])


def _stdout(stub: object, cid: str) -> bytes:
    request = pb.GetBatchRequest(correlation_id=cid)
    return bytes(stub.GetBatch(request).batch.jobs[0].stdout.data)  # type: ignore[attr-defined]


def test_ten_kill_9_rounds_under_load_lose_no_job_and_run_none_twice(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """Batches keep coming while the server is killed ten times: every job ends SUCCEEDED
    and each ran exactly once (it appends a line to a file of its own)."""
    srv = make_server(jobs={**KEEP, "max_concurrent": 8})
    marks = tmp_path / "marks"
    marks.mkdir()
    marks.chmod(0o1777)
    cids = []
    count = 0
    for _ in range(10):
        stub = srv.stub("alice")
        for _ in range(3):
            jobs = []
            for _ in range(5):
                script = f"echo ran >> {marks}/{count}; sleep 0.{count % 4}"
                jobs.append(job("sh", "-c", script, name=f"j{count}"))
                count += 1
            cids.append(schedule(stub, *jobs).correlation_id)
        time.sleep(0.15)
        srv.kill()
        srv.start()
    stub = srv.stub("alice")
    for cid in cids:
        batch = wait_batch(stub, cid, 60)
        assert batch.state == pb.BATCH_STATE_SUCCEEDED, batch
        for j in batch.jobs:
            assert (marks / j.spec.name[1:]).read_text() == "ran\n", j.spec.name
