"""Jobs run as the Unix user the config gives their owner (jobs.run_as, run_as_identity)."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from jobworker.v1 import jobworker_pb2 as pb
from tests.integration.conftest import (
    ServerFactory,
    alive,
    job,
    read_pids,
    schedule,
    wait_batch,
    wait_job,
    wait_until,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def _stdout(batch: pb.Batch, name: str) -> str:
    return next(j for j in batch.jobs if j.spec.name == name).stdout.data.decode()


def test_jobs_run_as_the_configured_user(make_server: ServerFactory) -> None:
    nobody = pwd.getpwnam("nobody")
    srv = make_server(jobs={"run_as": "nobody"}, jobs__run_as_identity={"bob": "root"})
    script = 'id -un; id -u; echo "$HOME"; touch /root/jobworker-should-not-exist || echo denied'
    alices = schedule(srv.stub("alice"), job("sh", "-c", script, name="who"))
    bobs = schedule(srv.stub("bob"), job("id", "-un", name="who"))
    alice_batch = wait_batch(srv.stub("alice"), alices.correlation_id)
    assert _stdout(alice_batch, "who").split() == [
        "nobody",
        str(nobody.pw_uid),
        nobody.pw_dir,
        "denied",
    ]
    assert not os.path.exists("/root/jobworker-should-not-exist")
    bob_batch = wait_batch(srv.stub("bob"), bobs.correlation_id)
    assert _stdout(bob_batch, "who") == "root\n"

    def users() -> set[object]:
        return {line.get("unix_user") for line in srv.events("job_ended")} - {None}

    # The harness reads the server's lines on a thread of its own: wait for them.
    wait_until(lambda: users() == {"nobody", "root"}, timeout=10, what="job_ended lines")


def test_a_job_as_another_user_is_still_stopped_whole(make_server: ServerFactory) -> None:
    srv = make_server(jobs={"run_as": "nobody"})
    stub = srv.stub("alice")
    shared = Path(tempfile.mkdtemp(prefix="jobworker-test-"))  # pytest's tmp is root-only
    os.chmod(shared, 0o777)  # the job, as nobody, writes its pids here
    pidfile = shared / "pids"
    script = f"sleep 300 & echo $! >> {pidfile}; echo $$ >> {pidfile}; wait"
    reply = schedule(stub, job("sh", "-c", script, name="tree"))
    pids = wait_until(lambda: len(read_pids(pidfile)) == 2 and read_pids(pidfile), what="pids")
    wait_job(stub, reply.correlation_id, "tree", pb.JOB_STATE_RUNNING)
    assert all(alive(p) for p in pids)  # type: ignore[union-attr]
    stub.CancelBatch(pb.CancelBatchRequest(correlation_id=reply.correlation_id))
    batch = wait_batch(stub, reply.correlation_id)
    assert batch.jobs[0].state == pb.JOB_STATE_CANCELED
    wait_until(lambda: not any(alive(p) for p in pids), what="the job's processes gone")  # type: ignore[union-attr]
    shutil.rmtree(shared)


def test_an_unknown_user_is_refused_at_load(make_server: ServerFactory) -> None:
    with pytest.raises(RuntimeError, match=r"jobs.run_as"):
        make_server(jobs={"run_as": "no-such-user-here"})
