"""Who sees what, through the real server with each identity's own certificate."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.integration.conftest import (
    Server,
    get_job,
    job,
    kill_pids,
    read_pids,
    rpc_error,
    schedule,
    wait_batch,
    wait_job,
    wait_until,
)


def _sleeper(pidfile: Path) -> pb.ScheduleBatchRequest:
    script = f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; echo started; exec sleep 1000"
    return job("sh", "-c", script, name="sleeper")


@pytest.fixture
def alices(server: Server, tmp_path: Path) -> Iterator[str]:
    """A running batch of alice's (a job that sleeps until it is cancelled)."""
    stub = server.stub("alice")
    pidfile = tmp_path / "pid"
    cid = schedule(stub, _sleeper(pidfile)).correlation_id
    pids: list[int] = wait_until(lambda: read_pids(pidfile), what="alice's job")  # type: ignore[assignment]
    wait_job(stub, cid, "sleeper", pb.JOB_STATE_RUNNING)
    yield cid
    stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid))
    kill_pids(pids)


def _calls(stub: pb_grpc.JobWorkerServiceStub, cid: str) -> dict[str, Callable[[], object]]:
    return {
        "GetBatch": lambda: stub.GetBatch(pb.GetBatchRequest(correlation_id=cid)),
        "StreamBatchLogs": lambda: list(
            stub.StreamBatchLogs(pb.StreamBatchLogsRequest(correlation_id=cid))
        ),
        "CancelBatch": lambda: stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid)),
    }


def _listed(stub: pb_grpc.JobWorkerServiceStub) -> set[str]:
    reply = stub.ListBatches(pb.ListBatchesRequest(page_size=1000))
    return {b.correlation_id for b in reply.batches}


def test_another_users_batch_is_not_found(server: Server, alices: str) -> None:
    bob = server.stub("bob")
    unknown = str(uuid.uuid4())
    for (name, theirs), (_, missing) in zip(
        _calls(bob, alices).items(), _calls(bob, unknown).items(), strict=True
    ):
        err = rpc_error(theirs)
        ref = rpc_error(missing)
        assert err.code() == grpc.StatusCode.NOT_FOUND, name
        assert ref.code() == grpc.StatusCode.NOT_FOUND, name
        # Exactly like a batch that does not exist: the same words but for the id.
        assert err.details().replace(alices, "<cid>") == ref.details().replace(unknown, "<cid>")
    assert alices not in _listed(bob)
    alice = server.stub("alice")
    assert get_job(alice, alices, "sleeper").state == pb.JOB_STATE_RUNNING  # bob's cancel: nothing


def test_users_list_only_their_own(server: Server) -> None:
    alice, bob = server.stub("alice"), server.stub("bob")
    a = schedule(alice, job("true")).correlation_id
    b = schedule(bob, job("true")).correlation_id
    wait_batch(alice, a)
    wait_batch(bob, b)
    assert a in _listed(alice)
    assert b not in _listed(alice)
    assert b in _listed(bob)
    assert a not in _listed(bob)
    for summary in bob.ListBatches(pb.ListBatchesRequest(page_size=1000)).batches:
        assert summary.owner == "bob"
    assert wait_batch(bob, b).owner == "bob"


def test_viewer_reads_everything_and_changes_nothing(
    server: Server, alices: str, tmp_path: Path
) -> None:
    viewer = server.stub("viewer")
    bobs = schedule(server.stub("bob"), job("echo", "bob's")).correlation_id
    wait_batch(server.stub("bob"), bobs)

    batch = viewer.GetBatch(pb.GetBatchRequest(correlation_id=alices)).batch
    assert batch.owner == "alice"
    assert viewer.GetBatch(pb.GetBatchRequest(correlation_id=bobs)).batch.owner == "bob"
    listed = _listed(viewer)
    assert {alices, bobs} <= listed
    logs = list(viewer.StreamBatchLogs(pb.StreamBatchLogsRequest(correlation_id=bobs)))
    assert b"".join(r.chunk.data for r in logs if r.HasField("chunk")) == b"bob's\n"

    err = rpc_error(lambda: viewer.CancelBatch(pb.CancelBatchRequest(correlation_id=alices)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    marker = tmp_path / "viewer-ran"
    err = rpc_error(lambda: schedule(viewer, job("touch", str(marker))))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # Refused for the role, before anything in the stream is looked at.
    err = rpc_error(lambda: schedule(viewer, job(name="no argv")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _listed(viewer) == listed
    assert not marker.exists()
    assert get_job(server.stub("alice"), alices, "sleeper").state == pb.JOB_STATE_RUNNING


def test_admin_sees_and_cancels_everyones(server: Server, alices: str) -> None:
    admin = server.stub("admin")
    bobs = schedule(server.stub("bob"), job("true")).correlation_id
    assert {alices, bobs} <= _listed(admin)
    assert admin.GetBatch(pb.GetBatchRequest(correlation_id=alices)).batch.owner == "alice"
    logs = list(admin.StreamBatchLogs(pb.StreamBatchLogsRequest(correlation_id=alices)))
    assert b"started" in b"".join(r.chunk.data for r in logs if r.HasField("chunk"))
    answer = admin.CancelBatch(pb.CancelBatchRequest(correlation_id=alices)).batch
    assert answer.state == pb.BATCH_STATE_CANCELED
    assert answer.owner == "alice"
    assert "admin" in answer.jobs[0].message
    seen_by_alice = server.stub("alice").GetBatch(pb.GetBatchRequest(correlation_id=alices))
    assert seen_by_alice.batch.state == pb.BATCH_STATE_CANCELED
    own = schedule(admin, job("true")).correlation_id
    assert wait_batch(admin, own).owner == "admin"
    assert own not in _listed(server.stub("alice"))


def test_role_none_is_refused_everything(server: Server, alices: str, tmp_path: Path) -> None:
    nobody = server.stub("nobody")
    marker = tmp_path / "nobody-ran"
    calls: dict[str, Callable[[], object]] = {
        **_calls(nobody, alices),
        "ListBatches": lambda: nobody.ListBatches(pb.ListBatchesRequest()),
        "ScheduleBatch": lambda: schedule(nobody, job("touch", str(marker))),
    }
    for name, call in calls.items():
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (name, err.details())
    for name, call in _calls(nobody, str(uuid.uuid4())).items():
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (name, err.details())
    assert not marker.exists()
    assert get_job(server.stub("alice"), alices, "sleeper").state == pb.JOB_STATE_RUNNING
