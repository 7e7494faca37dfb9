"""The client against a fake in-process service: errors, pages, and follow's resume by cursor."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from jobworker.client import AsyncRpcClient as AsyncClient
from jobworker.client import Backoff, ClientConfig, ClientError
from jobworker.client import RpcClient as Client
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc


class FakeService(pb_grpc.JobWorkerServiceServicer):
    """Just enough of the service for the client and the CLI; batches are made by hand."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: dict[str, pb.Batch] = {}
        # The events StreamBatchLogs sends for each batch; the cursor of event i is str(i + 1).
        self.events: dict[str, list[pb.StreamBatchLogsResponse]] = {}
        # For the next StreamBatchLogs calls, in order: break with UNAVAILABLE after this
        # many events (None: do not break).
        self.breaks: list[int | None] = []
        self.stream_requests: list[pb.StreamBatchLogsRequest] = []
        self.schedule_requests: list[list[pb.ScheduleBatchRequest]] = []
        self.get_requests: list[pb.GetBatchRequest] = []
        self.cancel_requests: list[pb.CancelBatchRequest] = []
        self.list_requests: list[pb.ListBatchesRequest] = []
        self.summaries: list[pb.BatchSummary] = []
        # What a newly scheduled batch streams, and the state it then reports.
        self.next_events: list[pb.StreamBatchLogsResponse] = []
        self.next_state: int = pb.BATCH_STATE_RUNNING
        # Events a message when the request asks for packed responses (as the server
        # does: the first response, the others in `more`); 1: one a message regardless.
        self.pack = 1

    def add(self, batch: pb.Batch, events: list[pb.StreamBatchLogsResponse] = ()) -> None:  # type: ignore[assignment]
        self.batches[batch.correlation_id] = batch
        self.events[batch.correlation_id] = [
            pb.StreamBatchLogsResponse(
                chunk=e.chunk if e.HasField("chunk") else None,
                state_change=e.state_change if e.HasField("state_change") else None,
                cursor=str(i + 1),
            )
            for i, e in enumerate(events)
        ]

    def _batch(self, cid: str, context: grpc.ServicerContext) -> pb.Batch:
        if cid not in self.batches:
            context.abort(grpc.StatusCode.NOT_FOUND, f"batch {cid} not found")
        return self.batches[cid]

    def ScheduleBatch(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        requests = list(request_iterator)
        self.schedule_requests.append(requests)
        jobs = [r.job for r in requests if r.HasField("job")]
        if not jobs:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a batch needs at least one job")
        names = [job.name or f"job-{i}" for i, job in enumerate(jobs)]
        cid = f"b-{len(self.batches) + 1}"
        self.add(
            pb.Batch(
                correlation_id=cid,
                owner="alice",
                state=self.next_state,
                jobs=[
                    pb.Job(index=i, spec=pb.JobSpec(name=n), state=pb.JOB_STATE_QUEUED)
                    for i, n in enumerate(names)
                ],
            ),
            self.next_events,
        )
        return pb.ScheduleBatchResponse(correlation_id=cid, job_names=names)

    def GetBatch(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.get_requests.append(request)
        batch = pb.Batch()
        batch.CopyFrom(self._batch(request.correlation_id, context))
        if request.job_names:
            kept = [job for job in batch.jobs if job.spec.name in request.job_names]
            del batch.jobs[:]
            batch.jobs.extend(kept)
        return pb.GetBatchResponse(batch=batch)

    def CancelBatch(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.cancel_requests.append(request)
        batch = self._batch(request.correlation_id, context)
        batch.state = pb.BATCH_STATE_CANCELED
        for job in batch.jobs:
            if not request.job_names or job.spec.name in request.job_names:
                job.state = pb.JOB_STATE_CANCELED
        return pb.CancelBatchResponse(batch=batch)

    def DeleteBatch(self, request: Any, context: grpc.ServicerContext) -> Any:
        batch = self._batch(request.correlation_id, context)
        if batch.state == pb.BATCH_STATE_RUNNING:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "batch is running")
        del self.batches[request.correlation_id]
        return pb.DeleteBatchResponse()

    def ListBatches(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.list_requests.append(request)
        start = int(request.page_token or 0)
        end = start + (request.page_size or 50)
        token = str(end) if end < len(self.summaries) else ""
        return pb.ListBatchesResponse(batches=self.summaries[start:end], next_page_token=token)

    def StreamBatchLogs(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with self.lock:
            self.stream_requests.append(request)
            limit = self.breaks.pop(0) if self.breaks else None
        events = self.events.get(request.correlation_id)
        if events is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"batch {request.correlation_id} not found")
        start = int(request.cursor or 0)
        size = self.pack if request.packed else 1
        chosen = [
            e
            for e in events[start:]
            if not (request.job_names and e.HasField("chunk"))
            or e.chunk.job_name in request.job_names
        ]
        messages = []
        for k in range(0, len(chosen), size):
            message = pb.StreamBatchLogsResponse()
            message.CopyFrom(chosen[k])
            message.more.extend(chosen[k + 1 : k + size])
            messages.append(message)
        for sent, message in enumerate(messages):
            if limit is not None and sent >= limit:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by peer (fake)")
            yield message
        if limit is not None and limit >= len(messages):
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by peer (fake)")


def start_fake_server(
    service: FakeService, credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_JobWorkerServiceServicer_to_server(service, server)
    address = "127.0.0.1:0"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


def chunk(name: str, data: bytes, stream: int = pb.LOG_STREAM_STDOUT) -> Any:
    return pb.StreamBatchLogsResponse(chunk=pb.LogChunk(job_name=name, stream=stream, data=data))


def change(name: str, state: int, **fields: Any) -> Any:
    return pb.StreamBatchLogsResponse(
        state_change=pb.JobStateChange(job_name=name, state=state, **fields)
    )


EVENTS = [
    change("a", pb.JOB_STATE_RUNNING),
    chunk("a", b"one\n"),
    chunk("a", b"two\n"),
    chunk("a", b"three\n"),
    change("a", pb.JOB_STATE_SUCCEEDED, exit_code=0),
]


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def address(service: FakeService) -> Iterator[str]:
    server, address = start_fake_server(service)
    yield address
    server.stop(None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(address: str, clock: FakeClock) -> Iterator[Client]:
    with Client(
        channel=grpc.insecure_channel(address), sleep=clock.sleep, clock=lambda: clock.now
    ) as client:
        yield client


def _batch(cid: str = "b-1") -> pb.Batch:
    return pb.Batch(correlation_id=cid, owner="alice", jobs=[pb.Job(spec=pb.JobSpec(name="a"))])


def _texts(responses: list[pb.StreamBatchLogsResponse]) -> list[str]:
    return [
        r.chunk.data.decode() if r.HasField("chunk") else pb.JobState.Name(r.state_change.state)
        for r in responses
    ]


def test_follow_resumes_from_the_last_cursor(
    client: Client, service: FakeService, clock: FakeClock
) -> None:
    service.add(_batch(), EVENTS)
    service.breaks = [2, 0, 1]
    reconnects: list[tuple[str, Exception]] = []
    got = list(client.follow("b-1", ["a"], on_reconnect=lambda c, e: reconnects.append((c, e))))
    # Every event exactly once, in order, across four streams.
    assert _texts(got) == ["JOB_STATE_RUNNING", "one\n", "two\n", "three\n", "JOB_STATE_SUCCEEDED"]
    assert [r.cursor for r in service.stream_requests] == ["", "2", "2", "3"]
    assert all(r.follow and list(r.job_names) == ["a"] for r in service.stream_requests)
    assert [cursor for cursor, _ in reconnects] == ["2", "2", "3"]
    assert str(reconnects[0][1]) == "UNAVAILABLE: connection reset by peer (fake)"
    # The delay doubles while failures follow each other, and starts again after a success.
    assert clock.sleeps == [0.2, 0.4, 0.2]


def test_follow_unpacks_packed_responses_and_resumes_after_the_last_one(
    client: Client, service: FakeService
) -> None:
    service.add(_batch(), EVENTS)
    service.pack = 2
    service.breaks = [1]  # one message (two events), then the connection breaks
    reconnects: list[str] = []
    got = list(client.follow("b-1", on_reconnect=lambda c, e: reconnects.append(c)))
    assert _texts(got) == ["JOB_STATE_RUNNING", "one\n", "two\n", "three\n", "JOB_STATE_SUCCEEDED"]
    assert [r.cursor for r in got] == ["1", "2", "3", "4", "5"]
    assert not any(r.more for r in got)
    assert all(r.packed for r in service.stream_requests)
    assert [r.cursor for r in service.stream_requests] == ["", "2"]
    assert reconnects == ["2"]


def test_follow_starts_from_a_given_cursor(client: Client, service: FakeService) -> None:
    service.add(_batch(), EVENTS)
    got = list(client.follow("b-1", cursor="3"))
    assert _texts(got) == ["three\n", "JOB_STATE_SUCCEEDED"]


def test_follow_gives_up_after_a_minute_of_failures(
    client: Client, service: FakeService, clock: FakeClock
) -> None:
    service.add(_batch(), EVENTS)
    service.breaks = [0] * 100
    reconnects: list[str] = []
    with pytest.raises(ClientError) as caught:
        list(client.follow("b-1", on_reconnect=lambda c, e: reconnects.append(c)))
    assert caught.value.code_name == "UNAVAILABLE"
    assert "gave up after 60s" in caught.value.details
    assert max(clock.sleeps) == 5.0
    assert 60 <= sum(clock.sleeps) < 66
    assert len(reconnects) == len(clock.sleeps)


def test_follow_does_not_retry_not_found(client: Client, clock: FakeClock) -> None:
    with pytest.raises(ClientError) as caught:
        list(client.follow("nope", on_reconnect=lambda c, e: pytest.fail("no reconnect")))
    assert str(caught.value) == "NOT_FOUND: batch nope not found"
    assert caught.value.code_name == "NOT_FOUND"
    assert clock.sleeps == []


def test_stream_without_follow_does_not_resume(client: Client, service: FakeService) -> None:
    service.add(_batch(), EVENTS)
    service.breaks = [1]
    stream = client.stream("b-1")
    assert next(stream).state_change.state == pb.JOB_STATE_RUNNING
    with pytest.raises(ClientError, match="UNAVAILABLE"):
        next(stream)


def test_schedule_sends_options_first(client: Client, service: FakeService) -> None:
    options = pb.BatchOptions(labels={"k": "v"}, fail_fast=True)
    jobs = [pb.JobSpec(name="x", argv=["true"]), pb.JobSpec(argv=["false"])]
    response = client.schedule(iter(jobs), options)
    assert response.correlation_id == "b-1"
    assert list(response.job_names) == ["x", "job-1"]
    sent = service.schedule_requests[0]
    assert [r.WhichOneof("item") for r in sent] == ["options", "job", "job"]
    assert sent[0].options == options
    client.schedule(jobs)
    assert [r.WhichOneof("item") for r in service.schedule_requests[1]] == ["job", "job"]


def test_errors_carry_the_code_name(client: Client) -> None:
    with pytest.raises(ClientError) as caught:
        client.schedule([])
    assert caught.value.code_name == "INVALID_ARGUMENT"
    assert str(caught.value) == "INVALID_ARGUMENT: a batch needs at least one job"
    with pytest.raises(ClientError, match=r"^NOT_FOUND: batch 123 not found$"):
        client.get("123")


def test_get_and_cancel_requests(client: Client, service: FakeService) -> None:
    service.add(_batch())
    client.get("b-1")
    client.get("b-1", ["a"], log_tail_bytes=0)
    assert not service.get_requests[0].HasField("log_tail_bytes")
    assert service.get_requests[1].HasField("log_tail_bytes")
    assert service.get_requests[1].log_tail_bytes == 0
    assert list(service.get_requests[1].job_names) == ["a"]
    batch = client.cancel("b-1", ["a"], grace=1.5)
    assert batch.jobs[0].state == pb.JOB_STATE_CANCELED
    assert service.cancel_requests[0].grace_period.ToMilliseconds() == 1500
    client.cancel("b-1")
    assert not service.cancel_requests[1].HasField("grace_period")


def test_iter_batches_goes_through_every_page(client: Client, service: FakeService) -> None:
    service.summaries = [pb.BatchSummary(correlation_id=f"b-{i}") for i in range(7)]
    got = [s.correlation_id for s in client.iter_batches(3, {"k": "v"}, [pb.BATCH_STATE_FAILED])]
    assert got == [f"b-{i}" for i in range(7)]
    assert [r.page_token for r in service.list_requests] == ["", "3", "6"]
    assert dict(service.list_requests[0].labels) == {"k": "v"}
    assert list(service.list_requests[0].states) == [pb.BATCH_STATE_FAILED]


def test_unreachable_server_is_unavailable(clock: FakeClock) -> None:
    with (
        socket_closed_port() as port,
        Client(channel=grpc.insecure_channel(f"127.0.0.1:{port}")) as client,
        pytest.raises(ClientError) as caught,
    ):
        client.get("b-1", timeout=10)
    assert caught.value.unreachable


def test_missing_certificate_names_the_file(tmp_path: Any) -> None:
    from jobworker.client import CredentialsError

    config = ClientConfig(ca=tmp_path / "ca.pem", cert=tmp_path / "c.pem", key=tmp_path / "k.pem")
    with pytest.raises(CredentialsError) as caught:
        Client(config)
    # Every missing file at once, then how to set up a client.
    text = str(caught.value)
    for name in ("ca.pem", "c.pem", "k.pem"):
        assert f"not found: {tmp_path / name}" in text
    assert "jobworker certs issue NAME --profile" in text


async def test_async_client_follows_and_resumes(address: str, service: FakeService) -> None:
    service.add(_batch(), EVENTS)
    service.breaks = [3]
    reconnects: list[str] = []
    client = AsyncClient(channel=grpc.aio.insecure_channel(address), backoff=Backoff(initial=0.01))
    async with client:
        got = [
            r async for r in client.follow("b-1", on_reconnect=lambda c, e: reconnects.append(c))
        ]
        assert _texts(got) == [
            "JOB_STATE_RUNNING",
            "one\n",
            "two\n",
            "three\n",
            "JOB_STATE_SUCCEEDED",
        ]
        assert reconnects == ["3"]
        batch = await client.get("b-1", log_tail_bytes=0)
        assert batch.correlation_id == "b-1"
        with pytest.raises(ClientError, match="NOT_FOUND"):
            await client.cancel("nope")
        response = await client.schedule([pb.JobSpec(argv=["true"])])
        assert response.job_names == ["job-0"]
        service.summaries = [pb.BatchSummary(correlation_id="x")]
        assert [s.correlation_id async for s in client.iter_batches()] == ["x"]


def socket_closed_port() -> Any:
    """A context manager giving a local port nobody listens on."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def closed() -> Iterator[int]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        yield port

    return closed()
