"""The protobuf-level client of jobworker: `RpcClient` (blocking) and `AsyncRpcClient`.

The CLI and the dataclass clients of `jobworker.client` are built on these."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.duration_pb2 import Duration

from jobworker.client.config import ClientConfig, Credentials
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

MAX_RECEIVE_MESSAGE_BYTES = 8 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    # Notice a dead server on a quiet follow stream: ping every 30s, without the default
    # cap of two pings between data frames. The server permits this rate
    # (server/app.py: min_recv_ping_interval_without_data_ms, max_ping_strikes).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
    # gRPC's own reconnect backoff grows to 120s; follow() retries for 60s at most
    # 5s apart, and each retry must find the channel willing to connect again.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)

# A broken stream worth resuming: the transport failed, not the request.
_RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
# grpcio reports some connection losses mid-stream with these codes and words.
_BROKEN_TRANSPORT_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
_BROKEN_TRANSPORT_WORDS = (
    "stream removed",
    "rst_stream",
    "connection reset",
    "socket closed",
    "broken pipe",
    "goaway",
)

_T = TypeVar("_T")


class ClientError(Exception):
    """A request failed; `code_name` is the gRPC status code's name, e.g. "NOT_FOUND".

    `hint`, when set, says in plain words why the server could not be reached.
    """

    def __init__(self, code_name: str, details: str, hint: str = "") -> None:
        super().__init__(f"{code_name}: {details}")
        self.code_name = code_name
        self.details = details
        self.hint = hint

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> ClientError:
        """Wrap an error of grpc or grpc.aio."""
        code, details = _code_and_details(err)
        return cls(code.name if code is not None else "UNKNOWN", details)

    @property
    def unreachable(self) -> bool:
        """True when the server could not be reached or the connection broke."""
        return self.code_name == "UNAVAILABLE"


@dataclass(frozen=True)
class Backoff:
    """How `follow` retries a broken stream: delays double up to `maximum`."""

    initial: float = 0.2
    maximum: float = 5.0
    # Give up once the failures in a row have lasted this long.
    give_up_after: float = 60.0


@dataclass
class _Retry:
    """The state of one run of failures in a row."""

    backoff: Backoff
    clock: Callable[[], float]
    delay: float = 0.0
    failing_since: float | None = None

    def succeeded(self) -> None:
        self.delay = 0.0
        self.failing_since = None

    def next_delay(self, err: grpc.RpcError) -> float:
        """The delay before the next attempt, or raise the error when it is final."""
        if not is_broken_stream(err):
            raise ClientError.from_rpc_error(err) from None
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
        elif now - self.failing_since >= self.backoff.give_up_after:
            error = ClientError.from_rpc_error(err)
            raise ClientError(
                error.code_name,
                f"{error.details} (gave up after {self.backoff.give_up_after:g}s of retries)",
            ) from None
        self.delay = (
            self.backoff.initial if self.delay == 0.0 else min(self.delay * 2, self.backoff.maximum)
        )
        return self.delay


def _code_and_details(err: grpc.RpcError) -> tuple[grpc.StatusCode | None, str]:
    code = getattr(err, "code", None)
    details = getattr(err, "details", None)
    # Both grpc's _InactiveRpcError and grpc.aio's AioRpcError have these, synchronous.
    status = code() if callable(code) else None
    text = details() if callable(details) else None
    return (
        status if isinstance(status, grpc.StatusCode) else None,
        text if isinstance(text, str) else str(err),
    )


def is_broken_stream(err: grpc.RpcError) -> bool:
    """True when the error is the connection's, so the same request may be retried."""
    code, details = _code_and_details(err)
    if code in _RETRYABLE_CODES:
        return True
    lowered = details.lower()
    return code in _BROKEN_TRANSPORT_CODES and any(w in lowered for w in _BROKEN_TRANSPORT_WORDS)


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1_000_000_000))
    return duration


def _schedule_requests(
    jobs: Iterable[pb.JobSpec], options: pb.BatchOptions | None
) -> Iterator[pb.ScheduleBatchRequest]:
    if options is not None:
        yield pb.ScheduleBatchRequest(options=options)
    for job in jobs:
        yield pb.ScheduleBatchRequest(job=job)


def _get_request(
    cid: str, job_names: Sequence[str], log_tail_bytes: int | None
) -> pb.GetBatchRequest:
    request = pb.GetBatchRequest(correlation_id=cid, job_names=job_names)
    if log_tail_bytes is not None:
        request.log_tail_bytes = log_tail_bytes
    return request


def _cancel_request(
    cid: str, job_names: Sequence[str], grace: float | None
) -> pb.CancelBatchRequest:
    request = pb.CancelBatchRequest(correlation_id=cid, job_names=job_names)
    if grace is not None:
        request.grace_period.CopyFrom(_duration(grace))
    return request


def _list_request(
    page_size: int,
    page_token: str,
    labels: Mapping[str, str] | None,
    states: Sequence[pb.BatchState],
) -> pb.ListBatchesRequest:
    return pb.ListBatchesRequest(
        page_size=page_size, page_token=page_token, labels=labels or {}, states=states
    )


def _stream_request(
    cid: str, job_names: Sequence[str], cursor: str, follow: bool, tail_lines: int | None = None
) -> pb.StreamBatchLogsRequest:
    request = pb.StreamBatchLogsRequest(
        correlation_id=cid, job_names=job_names, cursor=cursor, follow=follow
    )
    # A tail counts from where the call starts; a resumed stream goes on from its cursor.
    if tail_lines is not None and not cursor:
        request.tail_lines = tail_lines
    return request


def _explained(config: ClientConfig, credentials: Credentials, err: ClientError) -> ClientError:
    """`err` with a hint of why the server could not be reached, when it is that."""
    if not err.unreachable or err.hint:
        return err
    from jobworker.client.tls import explain_unreachable

    err.hint = (
        explain_unreachable(
            config.server,
            credentials.ca,
            credentials.cert,
            credentials.key,
            config.server_name_override,
        )
        or ""
    )
    return err


OnReconnect = Callable[[str, Exception], None]


def channel_credentials(credentials: Credentials) -> grpc.ChannelCredentials:
    """gRPC's credentials from checked PEMs."""
    return grpc.ssl_channel_credentials(
        root_certificates=credentials.ca,
        private_key=credentials.key,
        certificate_chain=credentials.cert,
    )


def channel_options(config: ClientConfig) -> list[tuple[str, int | str]]:
    """The options of every channel to the server."""
    options = list(CHANNEL_OPTIONS)
    if config.server_name_override:
        options.append(("grpc.ssl_target_name_override", config.server_name_override))
    return options


@dataclass
class RpcClient:
    """A blocking client of protobuf messages; use it as a context manager or call close()."""

    config: ClientConfig = field(default_factory=ClientConfig)
    channel: grpc.Channel | None = None
    backoff: Backoff = field(default_factory=Backoff)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._credentials: Credentials | None = None
        if self.channel is None:
            self._credentials = self.config.load_credentials()
            self.channel = grpc.secure_channel(
                self.config.server,
                channel_credentials(self._credentials),
                options=channel_options(self.config),
            )
        # The generated stub is untyped; each method below states what it returns.
        self._stub: Any = pb_grpc.JobWorkerServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if self.channel is not None:
            self.channel.close()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., _T], request: object, timeout: float | None) -> _T:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as err:
            raise self.error(err) from None

    def error(self, err: grpc.RpcError) -> ClientError:
        """The ClientError of `err`, with a hint of why the server is unreachable."""
        error = ClientError.from_rpc_error(err)
        if self._credentials is None:
            return error
        return _explained(self.config, self._credentials, error)

    def schedule(
        self,
        jobs: Iterable[pb.JobSpec],
        options: pb.BatchOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.ScheduleBatchResponse:
        """Schedule one batch: `options` first, then the jobs, in one client stream."""
        response: pb.ScheduleBatchResponse = self._call(
            self._stub.ScheduleBatch, _schedule_requests(jobs, options), timeout
        )
        return response

    def get(
        self,
        cid: str,
        job_names: Sequence[str] = (),
        log_tail_bytes: int | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.Batch:
        """The batch with its jobs; `log_tail_bytes` None: the server's default tail."""
        response: pb.GetBatchResponse = self._call(
            self._stub.GetBatch, _get_request(cid, job_names, log_tail_bytes), timeout
        )
        return response.batch

    def cancel(
        self,
        cid: str,
        job_names: Sequence[str] = (),
        grace: float | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.Batch:
        """Cancel the selected jobs (every job by default); `grace` in seconds."""
        response: pb.CancelBatchResponse = self._call(
            self._stub.CancelBatch, _cancel_request(cid, job_names, grace), timeout
        )
        return response.batch

    def delete(self, cid: str, *, timeout: float | None = None) -> None:
        """Delete an ended batch with its logs."""
        self._call(self._stub.DeleteBatch, pb.DeleteBatchRequest(correlation_id=cid), timeout)

    def list(
        self,
        page_size: int = 0,
        page_token: str = "",
        labels: Mapping[str, str] | None = None,
        states: Sequence[pb.BatchState] = (),
        *,
        timeout: float | None = None,
    ) -> pb.ListBatchesResponse:
        """One page of the batches the caller may see, newest first."""
        response: pb.ListBatchesResponse = self._call(
            self._stub.ListBatches,
            _list_request(page_size, page_token, labels, states),
            timeout,
        )
        return response

    def iter_batches(
        self,
        page_size: int = 0,
        labels: Mapping[str, str] | None = None,
        states: Sequence[pb.BatchState] = (),
        *,
        timeout: float | None = None,
    ) -> Iterator[pb.BatchSummary]:
        """Every batch the caller may see, newest first, page after page."""
        token = ""
        while True:
            page = self.list(page_size, token, labels, states, timeout=timeout)
            yield from page.batches
            token = page.next_page_token
            if not token:
                return

    def stream(
        self,
        cid: str,
        job_names: Sequence[str] = (),
        cursor: str = "",
        follow: bool = False,
        tail_lines: int | None = None,
    ) -> Iterator[pb.StreamBatchLogsResponse]:
        """The batch's output and state changes from `cursor`; errors are ClientError."""
        try:
            yield from self._stream_raw(cid, job_names, cursor, follow, tail_lines)
        except grpc.RpcError as err:
            raise self.error(err) from None

    def _stream_raw(
        self,
        cid: str,
        job_names: Sequence[str],
        cursor: str,
        follow: bool,
        tail_lines: int | None = None,
    ) -> Iterator[pb.StreamBatchLogsResponse]:
        call = self._stub.StreamBatchLogs(
            _stream_request(cid, job_names, cursor, follow, tail_lines)
        )
        try:
            yield from call
        finally:
            # Ends the server's side too when the caller stops early.
            call.cancel()

    def follow(
        self,
        cid: str,
        job_names: Sequence[str] = (),
        cursor: str = "",
        on_reconnect: OnReconnect | None = None,
        tail_lines: int | None = None,
    ) -> Iterator[pb.StreamBatchLogsResponse]:
        """Follow live until the server ends the stream with OK, resuming broken streams.

        A stream broken by the transport (UNAVAILABLE, connection reset) is reopened
        from the last cursor received, after `on_reconnect(cursor, error)` and a delay
        that doubles from `backoff.initial` to `backoff.maximum`; after
        `backoff.give_up_after` seconds of failures in a row the error is raised.
        Any other error (NOT_FOUND, PERMISSION_DENIED, ...) is raised at once.
        """
        retry = _Retry(self.backoff, self.clock)
        while True:
            try:
                for response in self._stream_raw(cid, job_names, cursor, True, tail_lines):
                    retry.succeeded()
                    cursor = response.cursor or cursor
                    yield response
            except grpc.RpcError as err:
                delay = retry.next_delay(err)
                if on_reconnect is not None:
                    on_reconnect(cursor, ClientError.from_rpc_error(err))
                self.sleep(delay)
            else:
                return


@dataclass
class AsyncRpcClient:
    """The same requests on grpc.aio; use `async with` or await close()."""

    config: ClientConfig = field(default_factory=ClientConfig)
    channel: grpc.aio.Channel | None = None
    backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._credentials: Credentials | None = None
        if self.channel is None:
            self._credentials = self.config.load_credentials()
            self.channel = grpc.aio.secure_channel(
                self.config.server,
                channel_credentials(self._credentials),
                options=channel_options(self.config),
            )
        # The generated stub is untyped; each method below states what it returns.
        self._stub: Any = pb_grpc.JobWorkerServiceStub(self.channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if self.channel is not None:
            await self.channel.close(None)

    async def __aenter__(self) -> AsyncRpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: object) -> Any:
        try:
            return await method(request)
        except grpc.RpcError as err:
            raise await self.error(err) from None

    async def error(self, err: grpc.RpcError) -> ClientError:
        """The ClientError of `err`, with a hint of why the server is unreachable."""
        error = ClientError.from_rpc_error(err)
        if self._credentials is None:
            return error
        return await asyncio.to_thread(_explained, self.config, self._credentials, error)

    async def schedule(
        self,
        jobs: Iterable[pb.JobSpec],
        options: pb.BatchOptions | None = None,
    ) -> pb.ScheduleBatchResponse:
        """Schedule one batch: `options` first, then the jobs, in one client stream."""
        response: pb.ScheduleBatchResponse = await self._call(
            self._stub.ScheduleBatch, _schedule_requests(jobs, options)
        )
        return response

    async def get(
        self,
        cid: str,
        job_names: Sequence[str] = (),
        log_tail_bytes: int | None = None,
    ) -> pb.Batch:
        """The batch with its jobs; `log_tail_bytes` None: the server's default tail."""
        response: pb.GetBatchResponse = await self._call(
            self._stub.GetBatch, _get_request(cid, job_names, log_tail_bytes)
        )
        return response.batch

    async def cancel(
        self,
        cid: str,
        job_names: Sequence[str] = (),
        grace: float | None = None,
    ) -> pb.Batch:
        """Cancel the selected jobs (every job by default); `grace` in seconds."""
        response: pb.CancelBatchResponse = await self._call(
            self._stub.CancelBatch, _cancel_request(cid, job_names, grace)
        )
        return response.batch

    async def delete(self, cid: str) -> None:
        """Delete an ended batch with its logs."""
        await self._call(self._stub.DeleteBatch, pb.DeleteBatchRequest(correlation_id=cid))

    async def list(
        self,
        page_size: int = 0,
        page_token: str = "",
        labels: Mapping[str, str] | None = None,
        states: Sequence[pb.BatchState] = (),
    ) -> pb.ListBatchesResponse:
        """One page of the batches the caller may see, newest first."""
        response: pb.ListBatchesResponse = await self._call(
            self._stub.ListBatches, _list_request(page_size, page_token, labels, states)
        )
        return response

    async def iter_batches(
        self,
        page_size: int = 0,
        labels: Mapping[str, str] | None = None,
        states: Sequence[pb.BatchState] = (),
    ) -> AsyncIterator[pb.BatchSummary]:
        """Every batch the caller may see, newest first, page after page."""
        token = ""
        while True:
            page = await self.list(page_size, token, labels, states)
            for summary in page.batches:
                yield summary
            token = page.next_page_token
            if not token:
                return

    async def stream(
        self,
        cid: str,
        job_names: Sequence[str] = (),
        cursor: str = "",
        follow: bool = False,
        tail_lines: int | None = None,
    ) -> AsyncIterator[pb.StreamBatchLogsResponse]:
        """The batch's output and state changes from `cursor`; errors are ClientError."""
        try:
            async for response in self._stream_raw(cid, job_names, cursor, follow, tail_lines):
                yield response
        except grpc.RpcError as err:
            raise await self.error(err) from None

    async def _stream_raw(
        self,
        cid: str,
        job_names: Sequence[str],
        cursor: str,
        follow: bool,
        tail_lines: int | None = None,
    ) -> AsyncIterator[pb.StreamBatchLogsResponse]:
        call = self._stub.StreamBatchLogs(
            _stream_request(cid, job_names, cursor, follow, tail_lines)
        )
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def follow(
        self,
        cid: str,
        job_names: Sequence[str] = (),
        cursor: str = "",
        on_reconnect: OnReconnect | None = None,
        tail_lines: int | None = None,
    ) -> AsyncIterator[pb.StreamBatchLogsResponse]:
        """Like Client.follow: live until OK, resuming broken streams from the cursor."""
        retry = _Retry(self.backoff, self.clock)
        while True:
            try:
                async for response in self._stream_raw(cid, job_names, cursor, True, tail_lines):
                    retry.succeeded()
                    cursor = response.cursor or cursor
                    yield response
            except grpc.RpcError as err:
                delay = retry.next_delay(err)
                if on_reconnect is not None:
                    on_reconnect(cursor, ClientError.from_rpc_error(err))
                await asyncio.sleep(delay)
            else:
                return
