"""Batches on a Ray cluster through the real server: BatchOptions.executor picks it, logs
land in the contract's files, GetBatch and the follower name the node, cancel ends the
tree there, an unreachable cluster is UNAVAILABLE. The cluster: tests/integration/
ray_cluster.py (a real `ray start --head` and a second node in a network namespace); one
test makes a cluster of its own and kills its head under a followed job."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import grpc
import pytest

from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.integration.conftest import (
    Server,
    ServerFactory,
    data_dir_of,
    get_job,
    job,
    options,
    rpc_error,
    schedule,
    wait_batch,
    wait_job,
    wait_until,
)
from tests.integration.ray_cluster import RayCluster, start_cluster, why_not
from tests.integration.test_ray_executor import processes_with

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(why_not()), reason=f"Ray cluster: {why_not()}"),
    pytest.mark.timeout(240),
]


def _server(make_server: ServerFactory, cluster: RayCluster) -> Server:
    table = {"kind": "ray", "address": cluster.address, "token_file": str(cluster.token_file)}
    return make_server(executors__cluster=table)


def test_a_batch_on_the_cluster_writes_its_logs_here_and_names_its_node(
    make_server: ServerFactory, cluster: RayCluster
) -> None:
    srv = _server(make_server, cluster)
    stub = srv.stub("alice")
    script = "printf 'out\\n'; printf 'err' >&2; exit 3"
    cid = schedule(stub, options(executor="cluster"), job("sh", "-c", script, name="r"))
    done = wait_batch(stub, cid.correlation_id, 120, log_tail_bytes=1024)
    r = done.jobs[0]
    assert (r.state, r.exit_code, r.message) == (pb.JOB_STATE_FAILED, 3, "exited with status 3")
    assert r.node in (cluster.head_ip, cluster.node_ip)
    assert (r.stdout.data, r.stderr.data) == (b"out\n", b"err")
    folder = data_dir_of(srv) / "batches" / cid.correlation_id / "jobs" / "0"
    assert (folder / "stdout").read_bytes() == b"out\n"  # the contract's files, on this host
    request = pb.StreamBatchLogsRequest(correlation_id=cid.correlation_id)
    changes = [r.state_change for r in stub.StreamBatchLogs(request) if r.HasField("state_change")]
    running = [c for c in changes if c.state == pb.JOB_STATE_RUNNING]
    assert running and running[0].node == r.node


def test_cancel_ends_the_jobs_tree_on_its_node(
    make_server: ServerFactory, cluster: RayCluster
) -> None:
    srv = _server(make_server, cluster)
    stub = srv.stub("alice")
    marker = "jobworker-ray-cancel-4417"
    script = f"sleep 300 & exec sleep 301 # {marker}"
    cid = schedule(stub, options(executor="cluster"), job("sh", "-c", script, name="long"))
    wait_job(stub, cid.correlation_id, "long", pb.JOB_STATE_RUNNING, 120)
    stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid.correlation_id))
    done = wait_batch(stub, cid.correlation_id, 60)
    assert done.jobs[0].state == pb.JOB_STATE_CANCELED
    wait_until(lambda: not processes_with(marker), 30, "the job's processes gone")


def test_an_unreachable_cluster_is_unavailable_naming_its_address(
    make_server: ServerFactory,
) -> None:
    srv = make_server(executors__far={"kind": "ray", "address": "127.0.0.1:9"})
    stub = srv.stub("alice")
    error = rpc_error(lambda: schedule(stub, options(executor="far"), job("true")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "Ray cluster at 127.0.0.1:9 is unreachable" in error.details()
    local = schedule(stub, job("true")).correlation_id  # the local executor still serves
    assert wait_batch(stub, local).state == pb.BATCH_STATE_SUCCEEDED


def test_a_cluster_timeout_is_timed_out_while_a_local_batch_runs_beside_it(
    make_server: ServerFactory, cluster: RayCluster
) -> None:
    import socket

    from google.protobuf.duration_pb2 import Duration

    srv = _server(make_server, cluster)
    stub = srv.stub("alice")
    slow = job("sleep", "30", name="slow", timeout=Duration(seconds=2))
    remote = schedule(stub, options(executor="cluster"), slow).correlation_id
    local = schedule(stub, job("echo", "here", name="here")).correlation_id
    here = wait_batch(stub, local, 60, log_tail_bytes=100).jobs[0]
    assert (here.state, here.stdout.data, here.node) == (
        pb.JOB_STATE_SUCCEEDED,
        b"here\n",
        socket.gethostname(),
    )
    timed_out = wait_batch(stub, remote, 120).jobs[0]
    assert timed_out.state == pb.JOB_STATE_TIMED_OUT
    assert timed_out.message == "timed out after 2s"
    assert timed_out.node in (cluster.head_ip, cluster.node_ip)


def test_a_cluster_whose_head_goes_away_leaves_its_job_lost_and_its_follower_ended(
    make_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A cluster of its own: its head is killed (GCS, raylet and the Ray processes there).
    doomed = start_cluster(tmp_path_factory.mktemp("rayhead"), cpus=1, index=1)
    seconds = f"302.{os.getpid()}"  # the job's sleep is found by it and killed after
    marker = f"sleep\0{seconds}"
    try:
        srv = _server(make_server, doomed)
        stub = srv.stub("alice")
        script = f"echo started; exec sleep {seconds}"
        cid = schedule(stub, options(executor="cluster"), job("sh", "-c", script, name="j"))
        cid = cid.correlation_id
        wait_job(stub, cid, "j", pb.JOB_STATE_RUNNING, 120)
        follower = _Follower(stub, cid)
        wait_until(lambda: follower.data == b"started\n", 30, "the follower's first line")
        doomed.kill_node("head")
        follower.thread.join(120)
        assert not follower.thread.is_alive(), "the follower's stream did not end"
        lost = get_job(stub, cid, "j")
        assert lost.state == pb.JOB_STATE_LOST
        assert f"Ray cluster at {doomed.address} lost" in lost.message, lost.message
        assert follower.states[-1] == pb.JOB_STATE_LOST
    finally:
        doomed.stop()
        for pid in processes_with(marker):  # on a real cluster its machine went with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class _Follower:
    """StreamBatchLogs(follow) in a thread: the bytes and the state changes it got."""

    def __init__(self, stub: pb_grpc.JobWorkerServiceStub, cid: str) -> None:
        self.data = b""
        self.states: list[int] = []
        request = pb.StreamBatchLogsRequest(correlation_id=cid, follow=True)
        self._stream = stub.StreamBatchLogs(request, timeout=200)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for message in self._stream:
            if message.HasField("chunk"):
                self.data += message.chunk.data
            elif message.HasField("state_change"):
                self.states.append(message.state_change.state)
