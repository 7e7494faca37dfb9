"""StreamBatchLogs: live output from the first byte, for any number of followers (issue 4)."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from jobworker.client.messages import unpacked
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

from .conftest import Server, ServerFactory, job, wait_batch, wait_until

# A job that writes 4,000 numbered lines over about two seconds, to stdout and stderr.
WRITER = (
    "import sys, time\n"
    "for i in range(4000):\n"
    "    sys.stdout.write(f'line {i:05d} ' + 'x' * (i % 50) + '\\n')\n"
    "    if i % 400 == 0:\n"
    "        sys.stderr.write(f'progress {i}\\n'); sys.stderr.flush()\n"
    "    if i % 100 == 0:\n"
    "        sys.stdout.flush(); time.sleep(0.05)\n"
)


def schedule(stub: pb_grpc.JobWorkerServiceStub, *jobs: pb.ScheduleBatchRequest) -> str:
    return stub.ScheduleBatch(iter(jobs), timeout=30).correlation_id


def stream(
    stub: pb_grpc.JobWorkerServiceStub, cid: str, **kwargs: object
) -> Iterator[pb.StreamBatchLogsResponse]:
    request = pb.StreamBatchLogsRequest(correlation_id=cid, **kwargs)  # type: ignore[arg-type]
    return iter(stub.StreamBatchLogs(request, timeout=120))


def collect(responses: Iterator[pb.StreamBatchLogsResponse]) -> dict[tuple[int, int], bytes]:
    """Bytes per (job, stream) in the order received."""
    out: dict[tuple[int, int], bytearray] = {}
    for r in responses:
        if r.HasField("chunk"):
            out.setdefault((r.chunk.job_index, r.chunk.stream), bytearray()).extend(r.chunk.data)
    return {k: bytes(v) for k, v in out.items()}


def on_disk(server: Server, cid: str, index: int, name: str) -> bytes:
    data_dir = Path(str(server.config.read_text().split('data_dir = "')[1].split('"')[0]))
    return (data_dir / "batches" / cid / "jobs" / str(index) / name).read_bytes()


def test_eight_followers_joining_at_different_times_get_every_byte_once(server: Server) -> None:
    stub = server.stub()
    cid = schedule(stub, job("python3", "-c", WRITER, name="writer"))
    results: list[dict[tuple[int, int], bytes]] = [{} for _ in range(8)]

    def follow(k: int) -> None:
        time.sleep(k * 0.25)
        results[k] = collect(stream(server.stub(), cid, follow=True))

    threads = [threading.Thread(target=follow, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batch = wait_batch(stub, cid)
    assert batch.state == pb.BATCH_STATE_SUCCEEDED
    stdout, stderr = on_disk(server, cid, 0, "stdout"), on_disk(server, cid, 0, "stderr")
    assert stdout.count(b"\n") == 4000
    for got in results:
        assert got[(0, pb.LOG_STREAM_STDOUT)] == stdout
        assert got[(0, pb.LOG_STREAM_STDERR)] == stderr


def test_events_come_in_order_with_end_state_after_all_bytes(server: Server) -> None:
    stub = server.stub()
    cid = schedule(
        stub,
        job("sh", "-c", "echo one; echo two >&2; exit 3", name="a"),
        job("true", name="b", depends_on=["a"]),
    )
    responses = list(stream(stub, cid, follow=True))
    events = [
        (r.state_change.job_name, pb.JobState.Name(r.state_change.state))
        for r in responses
        if r.HasField("state_change")
    ]
    assert events[:2] == [("a", "JOB_STATE_QUEUED"), ("b", "JOB_STATE_QUEUED")]
    assert ("a", "JOB_STATE_RUNNING") in events
    assert events[-2:] == [("a", "JOB_STATE_FAILED"), ("b", "JOB_STATE_SKIPPED")]
    last_chunk = max(i for i, r in enumerate(responses) if r.HasField("chunk"))
    end = next(
        i
        for i, r in enumerate(responses)
        if r.state_change.state == pb.JOB_STATE_FAILED and r.HasField("state_change")
    )
    assert last_chunk < end
    failed = responses[end].state_change
    assert failed.exit_code == 3
    assert "status 3" in failed.message


def test_follower_after_the_end_gets_everything(server: Server) -> None:
    stub = server.stub()
    cid = schedule(stub, job("python3", "-c", WRITER, name="w"), job("echo", "hi", name="e"))
    wait_batch(stub, cid)
    for follow in (True, False):
        responses = list(stream(stub, cid, follow=follow))
        got = collect(iter(responses))
        assert got[(0, pb.LOG_STREAM_STDOUT)] == on_disk(server, cid, 0, "stdout")
        assert got[(1, pb.LOG_STREAM_STDOUT)] == b"hi\n"
        ends = [r.state_change for r in responses if r.state_change.state == pb.JOB_STATE_SUCCEEDED]
        assert sorted(e.job_name for e in ends) == ["e", "w"]


def test_resume_from_any_cursor_repeats_and_skips_nothing(server: Server) -> None:
    stub = server.stub()
    cid = schedule(
        stub,
        job("python3", "-c", WRITER, name="w"),
        job("sh", "-c", "printf 'a\\0b'; printf err >&2", name="s"),
    )
    wait_batch(stub, cid)
    whole = list(stream(stub, cid))
    assert len(whole) > 6
    for k in (0, 1, len(whole) // 3, len(whole) // 2, len(whole) - 2):
        resumed = list(stream(stub, cid, cursor=whole[k].cursor))
        assert [r.SerializeToString() for r in whole[: k + 1] + resumed] == [
            r.SerializeToString() for r in whole
        ] or _same_content(whole[: k + 1] + resumed, whole)


def _same_content(a: list[pb.StreamBatchLogsResponse], b: list[pb.StreamBatchLogsResponse]) -> bool:
    # Chunk boundaries may differ between two reads; bytes and events may not.
    def shape(rs: list[pb.StreamBatchLogsResponse]) -> tuple[object, ...]:
        events = [
            (r.state_change.job_index, r.state_change.state)
            for r in rs
            if r.HasField("state_change")
        ]
        return (collect(iter(rs)), events)

    return shape(a) == shape(b)


def flat(responses: Iterator[pb.StreamBatchLogsResponse]) -> list[pb.StreamBatchLogsResponse]:
    """Packed responses as the ones they hold, in order, as the client library reads them;
    a response inside a pack holds no pack of its own."""
    out = [one for r in responses for one in unpacked(r)]
    assert not any(r.more for r in out)
    return out


def test_packed_responses_hold_what_one_by_one_responses_do(server: Server) -> None:
    stub = server.stub()
    jobs = [job("true", name=f"t{i}") for i in range(60)]
    cid = schedule(stub, *jobs, job("python3", "-c", WRITER, name="w"))
    wait_batch(stub, cid)
    for follow in (False, True):
        single = list(stream(stub, cid, follow=follow))
        packed = list(stream(stub, cid, follow=follow, packed=True))
        assert len(packed) * 10 < len(single)  # 61 jobs' 183 events and the writer's chunks
        unpacked = flat(iter(packed))
        assert [r.cursor for r in unpacked] == [r.cursor for r in single]
        assert [r.SerializeToString() for r in unpacked] == [r.SerializeToString() for r in single]


def test_resume_from_a_cursor_inside_a_pack_repeats_and_skips_nothing(server: Server) -> None:
    stub = server.stub()
    cid = schedule(stub, *(job("echo", f"job {i}", name=f"e{i}") for i in range(30)))
    wait_batch(stub, cid)
    whole = flat(stream(stub, cid, packed=True))
    assert len(whole) == 30 * 4  # QUEUED, RUNNING, its line, SUCCEEDED
    for k in (0, 7, 45, len(whole) - 2):
        resumed = flat(stream(stub, cid, cursor=whole[k].cursor, packed=True))
        assert _same_content(whole[: k + 1] + resumed, whole)


def test_a_packed_live_follower_gets_every_event_once(server: Server) -> None:
    stub = server.stub()
    cid = schedule(stub, *(job("echo", str(i), name=f"e{i}") for i in range(200)))
    live = flat(stream(stub, cid, follow=True, packed=True))
    after = list(stream(stub, cid))
    assert _same_content(live, after)
    ended = [r for r in live if r.state_change.state == pb.JOB_STATE_SUCCEEDED]
    assert sorted(r.state_change.job_index for r in ended) == list(range(200))


def test_resume_during_a_live_job(server: Server) -> None:
    stub = server.stub()
    cid = schedule(stub, job("python3", "-c", WRITER, name="w"))
    first: list[pb.StreamBatchLogsResponse] = []
    call = stub.StreamBatchLogs(pb.StreamBatchLogsRequest(correlation_id=cid, follow=True))
    for r in call:
        first.append(r)
        if sum(len(x.chunk.data) for x in first) > 20_000:
            break
    call.cancel()
    rest = list(stream(stub, cid, cursor=first[-1].cursor, follow=True))
    got = collect(iter(first + rest))
    assert got[(0, pb.LOG_STREAM_STDOUT)] == on_disk(server, cid, 0, "stdout")


def test_binary_output_arrives_intact(server: Server, tmp_path: Path) -> None:
    stub = server.stub()
    blob = bytes(range(256)) * 300 + b"\0\0end-without-newline"
    src = tmp_path / "blob"
    src.write_bytes(blob)
    os.chmod(tmp_path, 0o755)
    cid = schedule(stub, job("cat", str(src), name="cat"))
    got = collect(stream(stub, cid, follow=True))
    assert got[(0, pb.LOG_STREAM_STDOUT)] == blob


def test_job_names_select_jobs(server: Server) -> None:
    stub = server.stub()
    cid = schedule(stub, job("echo", "A", name="a"), job("echo", "B", name="b"))
    responses = list(stream(stub, cid, follow=True, job_names=["b"]))
    assert {r.chunk.job_name for r in responses if r.HasField("chunk")} == {"b"}
    assert {r.state_change.job_name for r in responses if r.HasField("state_change")} == {"b"}
    with pytest.raises(grpc.RpcError) as info:
        list(stream(stub, cid, job_names=["nope"]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_without_follow_ends_at_once_while_job_runs(server: Server) -> None:
    stub = server.stub()
    cid = schedule(stub, job("sh", "-c", "echo started; sleep 30", name="slow"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = collect(stream(stub, cid))
        if got.get((0, pb.LOG_STREAM_STDOUT)) == b"started\n":
            break
        time.sleep(0.05)
    assert got[(0, pb.LOG_STREAM_STDOUT)] == b"started\n"
    stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid), timeout=30)


def test_bad_cursor_is_invalid_argument(server: Server) -> None:
    stub = server.stub()
    cid = schedule(stub, job("true"))
    with pytest.raises(grpc.RpcError) as info:
        list(stream(stub, cid, cursor="not-a-cursor"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cursor" in (info.value.details() or "")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _inotify_watches(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except FileNotFoundError:
            continue
        count += info.count("inotify wd:")
    return count


@pytest.mark.slow
def test_a_follower_that_reads_nothing_does_not_hold_the_job_back(
    make_server: ServerFactory,
) -> None:
    server = make_server()
    assert server.proc is not None
    stub = server.stub()
    before = _rss(server.proc.pid)
    cid = schedule(stub, job("head", "-c", str(256 << 20), "/dev/zero", name="big"))
    call = stub.StreamBatchLogs(pb.StreamBatchLogsRequest(correlation_id=cid, follow=True))
    next(iter(call))  # joined, then reads nothing more
    batch = wait_batch(stub, cid, timeout=120)
    assert batch.state == pb.BATCH_STATE_SUCCEEDED
    assert batch.jobs[0].stdout.total_bytes == 256 << 20
    grown = _rss(server.proc.pid) - before
    assert grown < 64 << 20, f"server RSS grew by {grown >> 20} MiB"
    call.cancel()


def _streams_active(server: Server) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("jobworker_streams_active "):
                return float(line.split()[1])
    raise AssertionError("no jobworker_streams_active metric")


def test_dropped_streams_leave_nothing_behind(make_server: ServerFactory) -> None:
    server = make_server(metrics={"listen": "127.0.0.1:0"})
    assert server.proc is not None
    pid = server.proc.pid
    stub = server.stub()
    cid = schedule(stub, job("sh", "-c", "while :; do echo tick; sleep 0.01; done", name="t"))
    # Warm up one stream so lazily made things (channels, the watch on first use) exist.
    warm = stub.StreamBatchLogs(pb.StreamBatchLogsRequest(correlation_id=cid, follow=True))
    next(iter(warm))
    warm.cancel()
    time.sleep(0.5)
    fds, watches = _fds(pid), _inotify_watches(pid)
    for _ in range(100):
        call = stub.StreamBatchLogs(pb.StreamBatchLogsRequest(correlation_id=cid, follow=True))
        next(iter(call))
        call.cancel()
    deadline = time.monotonic() + 20
    while True:
        active = _streams_active(server)
        time.sleep(0.2)  # the scrape's own connection closes first
        now_fds, now_watches = _fds(pid), _inotify_watches(pid)
        if (active == 0 and now_fds <= fds and now_watches <= watches) or (
            time.monotonic() > deadline
        ):
            break
    assert active == 0  # every stream's handler task has ended
    assert now_fds <= fds
    assert now_watches <= watches

    def audited() -> int:
        return sum(line["method"] == "StreamBatchLogs" for line in server.events("rpc"))

    # Every dropped stream was ended (and audited) by the server; this harness reads the
    # server's lines on a thread of its own, so they are waited for.
    wait_until(lambda: audited() >= 100, what="100 StreamBatchLogs audit lines")
    stub.CancelBatch(pb.CancelBatchRequest(correlation_id=cid), timeout=30)


def test_shutdown_ends_open_streams_with_unavailable(make_server: ServerFactory) -> None:
    server = make_server()
    stub = server.stub()
    cid = schedule(stub, job("sleep", "30", name="s"))
    call = stub.StreamBatchLogs(pb.StreamBatchLogsRequest(correlation_id=cid, follow=True))
    it = iter(call)
    next(it)  # QUEUED
    server.signal(15)
    with pytest.raises(grpc.RpcError) as info:
        for _ in it:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.stop() == 0
