"""What a batch costs the server: memory as charged, uploads and streams per identity,
what a viewer may see, and ListBatches paging over many batches."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from jobworker.v1 import jobworker_pb2 as pb

from .conftest import (
    Server,
    ServerFactory,
    job,
    schedule,
    wait_batch,
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
