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

from jobworker.client.channel import channel_credentials, channel_options, explained
from jobworker.client.config import ClientConfig, Credentials
from jobworker.client.errors import ClientError
from jobworker.client.messages import (
    cancel_request,
    get_request,
    list_request,
    schedule_requests,
    stream_request,
    unpacked,
)
from jobworker.client.retry import Backoff, OnReconnect, Retry
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

# ClientError with the clients: it is what every call of theirs raises.
__all__ = ["AsyncRpcClient", "ClientError", "RpcClient"]

_T = TypeVar("_T")


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
        return explained(self.config, self._credentials, error)

    def schedule(
        self,
        jobs: Iterable[pb.JobSpec],
        options: pb.BatchOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.ScheduleBatchResponse:
        """Schedule one batch: `options` first, then the jobs, in one client stream."""
        response: pb.ScheduleBatchResponse = self._call(
            self._stub.ScheduleBatch, schedule_requests(jobs, options), timeout
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
            self._stub.GetBatch, get_request(cid, job_names, log_tail_bytes), timeout
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
            self._stub.CancelBatch, cancel_request(cid, job_names, grace), timeout
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
            list_request(page_size, page_token, labels, states),
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
            stream_request(cid, job_names, cursor, follow, tail_lines)
        )
        try:
            for response in call:
                yield from unpacked(response)
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
        retry = Retry(self.backoff, self.clock)
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
        return await asyncio.to_thread(explained, self.config, self._credentials, error)

    async def schedule(
        self,
        jobs: Iterable[pb.JobSpec],
        options: pb.BatchOptions | None = None,
    ) -> pb.ScheduleBatchResponse:
        """Schedule one batch: `options` first, then the jobs, in one client stream."""
        response: pb.ScheduleBatchResponse = await self._call(
            self._stub.ScheduleBatch, schedule_requests(jobs, options)
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
            self._stub.GetBatch, get_request(cid, job_names, log_tail_bytes)
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
            self._stub.CancelBatch, cancel_request(cid, job_names, grace)
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
            self._stub.ListBatches, list_request(page_size, page_token, labels, states)
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
            stream_request(cid, job_names, cursor, follow, tail_lines)
        )
        try:
            async for response in call:
                for one in unpacked(response):
                    yield one
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
        """Like RpcClient.follow: live until OK, resuming broken streams from the cursor."""
        retry = Retry(self.backoff, self.clock)
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
