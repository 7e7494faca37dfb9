"""What a batch costs the server: memory as charged, uploads and streams per identity,
what a viewer may see, and ListBatches paging over many batches."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from jobworker.v1 import jobworker_pb2 as pb

from .conftest import (
    Server,
    ServerFactory,
    job,
    options,
    rpc_error,
    schedule,
    wait_batch,
    wait_until,
)

MiB = 1 << 20
ARGS = 43_690  # "true" and 43,689 two-byte arguments: 128 KiB a job as bytes with NULs count
JOBS = 40


def _rss(server: Server) -> int:
    """The server process's resident memory in bytes, from /proc/<pid>/status."""
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def _settled_rss(server: Server) -> int:
    """RSS once it stops moving (freed memory goes back in steps); the last reading."""
    last = _rss(server)
    for _ in range(20):
        time.sleep(0.25)
        now = _rss(server)
        if abs(now - last) < MiB:
            return now
        last = now
    return last


def _warm_up(server: Server) -> None:
    stub = server.stub("alice")
    reply = schedule(stub, job("true", "x" * 100, name="warm"))
    wait_batch(stub, reply.correlation_id)
    stub.ListBatches(pb.ListBatchesRequest())


def _held(arg: str) -> int:
    """What one argument really holds: its str (pymalloc rounds to 16 bytes) and a slot."""
    return (sys.getsizeof(arg) + 15) // 16 * 16 + 8


def _big_batch() -> Iterator[pb.ScheduleBatchRequest]:
    args = ["ab"] * (ARGS - 1)
    for i in range(JOBS):
        yield job("true", *args, name=f"wide{i}")


@pytest.mark.parametrize(
    "jobs",
    [
        {},  # the defaults
        {"max_args": 50_000, "max_argv_bytes": "3MiB", "max_batch_bytes": "16MiB"},
        {"max_args": 50_000, "max_argv_bytes": "3MiB", "max_batch_bytes": "256MiB"},
    ],
    ids=["defaults", "raised-16MiB", "raised-256MiB"],
)
def test_memory_of_a_wide_batch_stays_within_twice_what_it_is_charged(
    make_server: ServerFactory, jobs: dict[str, object]
) -> None:
    # Before the fix: each "ab" was charged 3 bytes but held as a str of 51 (plus its slot),
    # so 40 such jobs (5 MiB as charged) grew the server by ~147 MiB and were kept.
    srv = make_server(jobs=jobs)
    _warm_up(srv)
    before = _settled_rss(srv)
    stub = srv.stub("alice")
    error: grpc.RpcError | None = None
    try:
        stub.ScheduleBatch(_big_batch(), timeout=120)
    except grpc.RpcError as exc:
        error = exc
    stored = error is None
    if error is not None:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "jobs.max_" in str(error.details()), error.details()
    after = _settled_rss(srv)
    growth = after - before
    limit = int(str(srv_limit(srv, "max_batch_bytes")))
    charged = JOBS * sum(_held(a) for a in ("true", *["ab"] * (ARGS - 1)))
    print(
        f"\n{jobs or 'defaults'}: stored={stored} rss {before / MiB:.1f} -> {after / MiB:.1f} "
        f"MiB, growth {growth / MiB:.1f} MiB, charged {charged / MiB:.1f} MiB"
    )
    assert growth < 2 * limit  # whatever happened, the limit bounds the memory
    if stored:
        assert growth < 2 * charged
    assert stored == (jobs.get("max_batch_bytes") == "256MiB")


def srv_limit(server: Server, key: str) -> int:
    """A [jobs] size limit of the server's config file, in bytes (default if not set)."""
    import tomllib

    from jobworker.config import JobsConfig
    from jobworker.units import parse_size

    value = tomllib.loads(server.config.read_text()).get("jobs", {}).get(key)
    return parse_size(value) if value is not None else int(getattr(JobsConfig(), key))


# --- jobs.max_args ------------------------------------------------------------------------


def test_max_args_counts_argv_and_env_of_one_job(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    # Before: no such limit; 10,001 empty arguments were 10 KiB as bytes counted, and taken.
    srv = make_server()
    stub = srv.stub("alice")
    err = rpc_error(lambda: schedule(stub, job("true", *[""] * 10_000, name="many")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "job 0 ('many')" in err.details()
    assert "jobs.max_args (10000)" in err.details()

    srv = make_server(tmp_path / "other", jobs={"max_args": 100})
    stub = srv.stub("alice")
    env = {f"V{i}": "x" for i in range(41)}
    err = rpc_error(
        lambda: schedule(stub, job("true", name="ok"), job("true", *["a"] * 59, name="b", env=env))
    )
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "job 1 ('b')" in err.details()
    assert "101 items" in err.details()
    assert "jobs.max_args (100)" in err.details()
    # At the limit: fine.
    env.pop("V40")
    reply = schedule(stub, job("true", *["a"] * 59, name="b", env=env))
    assert wait_batch(stub, reply.correlation_id).state == pb.BATCH_STATE_SUCCEEDED


def test_max_argv_bytes_counts_what_an_argument_holds(make_server: ServerFactory) -> None:
    # Before: 2,000 arguments "ab" were charged 6,000 bytes; they hold ~144,000.
    srv = make_server(jobs={"max_argv_bytes": "64KiB"})
    stub = srv.stub("alice")
    err = rpc_error(lambda: schedule(stub, job("true", *["ab"] * 2_000, name="wide")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "job 0 ('wide')" in err.details()
    assert "jobs.max_argv_bytes (65536)" in err.details()
    reply = schedule(stub, job("true", *["ab"] * 800, name="narrow"))
    assert wait_batch(stub, reply.correlation_id).state == pb.BATCH_STATE_SUCCEEDED


# --- uploads ------------------------------------------------------------------------------


class _Held:
    """A ScheduleBatch request stream that sends one job, then waits until released."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent = threading.Event()
        self.release = threading.Event()

    def __iter__(self) -> Iterator[pb.ScheduleBatchRequest]:
        yield job("true", name=self.name)
        self.sent.set()
        self.release.wait(60)


def test_uploads_per_identity_are_capped(make_server: ServerFactory) -> None:
    # Before: no cap; every upload of an identity was taken in, however many were open.
    srv = make_server(server={"max_uploads_per_identity": 2})
    alice, bob = srv.stub("alice"), srv.stub("bob")
    held = [_Held(f"held{i}") for i in range(2)]
    try:
        calls = [alice.ScheduleBatch.future(iter(h), timeout=60) for h in held]
        for h in held:
            assert h.sent.wait(10)
        refused: list[grpc.RpcError] = []

        def third_refused() -> bool:
            try:
                schedule(alice, options(labels={"third": "yes"}), job("true"))
            except grpc.RpcError as exc:
                refused.append(exc)
                return True
            return False

        wait_until(third_refused, 15, "a third upload of alice refused")
        assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server.max_uploads_per_identity (2)" in refused[0].details()
        # Another identity is not held back by alice's uploads.
        reply = schedule(bob, job("true"))
        assert wait_batch(bob, reply.correlation_id).state == pb.BATCH_STATE_SUCCEEDED
    finally:
        for h in held:
            h.release.set()
    names = {c.result().job_names[0] for c in calls}
    assert names == {"held0", "held1"}
    reply = schedule(alice, job("true"))  # the slots are free again
    assert wait_batch(alice, reply.correlation_id).state == pb.BATCH_STATE_SUCCEEDED


def test_an_upload_that_never_ends_is_cut_at_upload_timeout(make_server: ServerFactory) -> None:
    # Before: the server waited for as long as the client kept the stream open, holding
    # what it had received (here the client's own 20 s deadline ended it).
    srv = make_server(server={"upload_timeout": "1s"})
    stub = srv.stub("alice")
    held = _Held("never")
    try:
        err = rpc_error(lambda: stub.ScheduleBatch(iter(held), timeout=20))
    finally:
        held.release.set()
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "server.upload_timeout (1s)" in err.details()
    listed = stub.ListBatches(pb.ListBatchesRequest()).batches
    assert not listed  # nothing of the upload was kept
    reply = schedule(stub, job("true"))  # a prompt upload is fine
    assert wait_batch(stub, reply.correlation_id).state == pb.BATCH_STATE_SUCCEEDED


# --- streams per identity -----------------------------------------------------------------


def _follow(server: Server, identity: str, cid: str) -> tuple[object, pb.StreamBatchLogsResponse]:
    """An open follow stream and its first message (the server holds the stream by then)."""
    call = server.stub(identity).StreamBatchLogs(
        pb.StreamBatchLogsRequest(correlation_id=cid, follow=True), timeout=60
    )
    return call, next(call)


def test_streams_per_identity_are_capped(make_server: ServerFactory) -> None:
    # Before: only the global max_streams; one identity could hold every stream.
    srv = make_server(server={"max_streams_per_identity": 1})
    alice, bob = srv.stub("alice"), srv.stub("bob")
    mine = schedule(alice, job("sleep", "60", name="long")).correlation_id
    theirs = schedule(bob, job("sleep", "60", name="long")).correlation_id
    first, _ = _follow(srv, "alice", mine)
    try:
        err = rpc_error(lambda: _follow(srv, "alice", mine))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server.max_streams_per_identity (1)" in err.details()
        other, _ = _follow(srv, "bob", theirs)  # each identity has its own
        watcher, _ = _follow(srv, "viewer", mine)
        other.cancel()  # type: ignore[attr-defined]
        watcher.cancel()  # type: ignore[attr-defined]
    finally:
        first.cancel()  # type: ignore[attr-defined]

    def reopened() -> bool:
        try:
            call, _ = _follow(srv, "alice", mine)
        except grpc.RpcError:
            return False
        call.cancel()  # type: ignore[attr-defined]
        return True

    wait_until(reopened, 15, "alice's stream slot freed")
    for stub, cid in ((alice, mine), (bob, theirs)):
        stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid))


# --- what a viewer sees -------------------------------------------------------------------

SECRET = "s3cret-token-value"
STDIN = b"password=hunter2-input\n"


def test_viewers_see_env_values_and_stdin_redacted(make_server: ServerFactory) -> None:
    # Before: a viewer's GetBatch showed API_TOKEN's value and the job's stdin.
    srv = make_server()
    alice = srv.stub("alice")
    reply = schedule(
        alice,
        job("true", name="secret", env={"API_TOKEN": SECRET, "MODE": "x"}, stdin=STDIN),
        job("true", name="plain"),
    )
    cid = reply.correlation_id
    wait_batch(alice, cid)
    for who in ("alice", "admin"):
        batch = srv.stub(who).GetBatch(pb.GetBatchRequest(correlation_id=cid)).batch
        assert dict(batch.jobs[0].spec.env) == {"API_TOKEN": SECRET, "MODE": "x"}, who
        assert batch.jobs[0].spec.stdin == STDIN, who

    viewer = srv.stub("viewer")
    answer = viewer.GetBatch(pb.GetBatchRequest(correlation_id=cid))
    spec = answer.batch.jobs[0].spec
    assert dict(spec.env) == {"API_TOKEN": "[redacted]", "MODE": "[redacted]"}
    assert spec.stdin == f"[redacted: {len(STDIN)} bytes]".encode()
    assert answer.batch.jobs[1].spec.stdin == b""  # a job without stdin shows none
    assert list(spec.argv) == ["true"]  # the rest is there
    listed = viewer.ListBatches(pb.ListBatchesRequest())
    streamed = list(viewer.StreamBatchLogs(pb.StreamBatchLogsRequest(correlation_id=cid)))
    for message in (answer, listed, *streamed):
        wire = message.SerializeToString()
        assert SECRET.encode() not in wire
        assert b"hunter2" not in wire


# --- ListBatches over many batches --------------------------------------------------------


def _pages(stub: object, size: int) -> tuple[list[str], int]:
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page = stub.ListBatches(  # type: ignore[attr-defined]
            pb.ListBatchesRequest(page_size=size, page_token=token)
        )
        pages += 1
        seen += [b.correlation_id for b in page.batches]
        token = page.next_page_token
        if not token:
            return seen, pages


def test_list_batches_pages_many_batches_in_order(make_server: ServerFactory) -> None:
    srv = make_server()
    alice, bob = srv.stub("alice"), srv.stub("bob")
    mine: list[str] = []
    every: list[str] = []
    for i in range(150):
        for stub, kept in ((alice, mine), (bob, None)):
            cid = schedule(stub, job("true", name=f"n{i}")).correlation_id
            every.append(cid)
            if kept is not None:
                kept.append(cid)
    for server_life in ("first", "after a restart"):
        seen, pages = _pages(srv.stub("alice"), 7)
        assert seen == mine[::-1], server_life  # only alice's, newest first, once each
        assert pages == -(-len(mine) // 7)
        seen, pages = _pages(srv.stub("admin"), 64)
        assert seen == every[::-1], server_life
        assert pages == -(-len(every) // 64)
        if server_life == "first":
            srv.stop()
            srv.start()
