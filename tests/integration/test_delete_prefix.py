"""DeleteBatch and correlation id prefixes (contract 6.1, issue 14) through a real server."""

from __future__ import annotations

import json
import shutil

import grpc

from jobworker.v1 import jobworker_pb2 as pb

from .conftest import PY, Server, ServerFactory, data_dir_of, job, rpc_error, schedule, wait_batch


def _delete(server: Server, cid: str, identity: str = "alice") -> None:
    server.stub(identity).DeleteBatch(pb.DeleteBatchRequest(correlation_id=cid), timeout=30)


def test_delete_an_ended_batch_removes_it_and_its_folder_at_once(server: Server) -> None:
    stub = server.stub()
    cid = schedule(stub, job(PY, "-c", "print('hi')")).correlation_id
    assert wait_batch(stub, cid).state == pb.BATCH_STATE_SUCCEEDED
    folder = data_dir_of(server) / "batches" / cid
    assert folder.is_dir()
    # A viewer sees the batch but may not delete it; another user does not see it at all.
    assert rpc_error(lambda: _delete(server, cid, "viewer")).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert rpc_error(lambda: _delete(server, cid, "bob")).code() == grpc.StatusCode.NOT_FOUND
    _delete(server, cid[:8])  # a prefix does for the id
    assert not folder.exists()
    assert not any(p.name.endswith(cid) for p in folder.parent.iterdir())
    get = pb.GetBatchRequest(correlation_id=cid)
    assert rpc_error(lambda: stub.GetBatch(get)).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(lambda: _delete(server, cid)).code() == grpc.StatusCode.NOT_FOUND


def test_delete_a_running_batch_is_failed_precondition(server: Server) -> None:
    stub = server.stub()
    cid = schedule(stub, job(PY, "-c", "import time; time.sleep(60)")).correlation_id
    try:
        error = rpc_error(lambda: _delete(server, cid))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cancel" in (error.details() or "")
        assert (data_dir_of(server) / "batches" / cid).is_dir()
    finally:
        stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid), timeout=60)
    _delete(server, cid)


def test_prefixes_of_eight_or_more_characters_stand_for_the_id(server: Server) -> None:
    stub = server.stub()
    cid = schedule(stub, job(PY, "-c", "print('x')")).correlation_id
    wait_batch(stub, cid)
    batch = stub.GetBatch(pb.GetBatchRequest(correlation_id=cid[:8])).batch
    assert batch.correlation_id == cid
    logs = stub.StreamBatchLogs(pb.StreamBatchLogsRequest(correlation_id=cid[:10]), timeout=30)
    assert b"".join(r.chunk.data for r in logs if r.HasField("chunk")) == b"x\n"
    short = rpc_error(lambda: stub.GetBatch(pb.GetBatchRequest(correlation_id=cid[:7])))
    assert short.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "8 characters" in (short.details() or "")
    # Another identity's batch is not found by its prefix either.
    other = rpc_error(
        lambda: server.stub("bob").GetBatch(pb.GetBatchRequest(correlation_id=cid[:8]))
    )
    assert other.code() == grpc.StatusCode.NOT_FOUND
    missing = rpc_error(lambda: stub.GetBatch(pb.GetBatchRequest(correlation_id="nothere")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


def test_an_ambiguous_prefix_is_invalid_argument(make_server: ServerFactory) -> None:
    # Random ids sharing 8 characters would take billions of batches: a second batch is
    # made on disk as a copy of the first under an id sharing its first 12 characters,
    # and the server restarted on that data_dir loads both.
    server = make_server()
    stub = server.stub()
    cid = schedule(stub, job(PY, "-c", "pass")).correlation_id
    wait_batch(stub, cid)
    server.stop()
    root = data_dir_of(server) / "batches"
    twin = cid[:12] + ("0" if cid[12] != "0" else "1") + cid[13:]
    shutil.copytree(root / cid, root / twin)
    meta = json.loads((root / twin / "batch.json").read_text())
    meta["correlation_id"] = twin
    (root / twin / "batch.json").write_text(json.dumps(meta))
    server = make_server(data_dir_of(server))
    stub = server.stub()
    error = rpc_error(lambda: stub.GetBatch(pb.GetBatchRequest(correlation_id=cid[:12])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than one batch" in (error.details() or "")
    assert stub.GetBatch(pb.GetBatchRequest(correlation_id=cid[:13])).batch.correlation_id == cid
