"""The gRPC servicer: decode, make one call into the core, encode. Errors map in auth.py."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from grpc import aio

from jobworker.engine.core import JobWorker
from jobworker.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from jobworker.model import BatchState
from jobworker.server import convert
from jobworker.server.audit import set_correlation_id
from jobworker.server.identity import current_caller
from jobworker.store.batches import BatchView
from jobworker.store.inotify import Inotify
from jobworker.store.logs import Cursor, Follower, tail_offsets
from jobworker.units import format_duration
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from jobworker.validate import BatchBuilder

MAX_GRACE = 86_400  # a day: longer, and a CancelBatch call would wait that long
# A GetBatch answer about more jobs than this is built on a worker thread (GetBatch).
BUILD_INLINE_JOBS = 500


class Settings:
    """What the servicer reads from the live config at each call: [jobs] and [server]."""

    def __init__(self, jobs: Any, server: Any) -> None:
        self.jobs = jobs
        self.server = server

    @property
    def max_streams(self) -> int:
        """server.max_streams: StreamBatchLogs calls open at once, all identities together."""
        return int(self.server.max_streams)


class PerIdentity:
    """Calls of each identity in flight, held against a per-identity cap."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, identity: str, limit: int, refusal: str) -> Iterator[None]:
        """One more call of `identity` while inside; RESOURCE_EXHAUSTED(`refusal`) when it
        already has `limit` (0: no cap)."""
        count = self.counts.get(identity, 0)
        if limit and count >= limit:
            raise ResourceExhausted(refusal)
        self.counts[identity] = count + 1
        try:
            yield
        finally:
            left = self.counts[identity] - 1
            if left:
                self.counts[identity] = left
            else:
                del self.counts[identity]


class JobWorkerService(pb_grpc.JobWorkerServiceServicer):
    """The six RPCs of jobworker.v1.JobWorkerService."""

    def __init__(
        self,
        core: JobWorker,
        settings: Callable[[], Settings],
        inotify: Inotify | None,
        closing: Callable[[], bool],
        on_stream: Callable[[int], None] | None = None,
    ) -> None:
        self.core = core
        self.settings = settings
        self.inotify = inotify
        self.closing = closing
        self.on_stream = on_stream or (lambda _delta: None)
        self.streams = 0
        self.uploads_of = PerIdentity()
        self.streams_of = PerIdentity()

    async def ScheduleBatch(  # the wire's names
        self,
        request_iterator: AsyncIterator[pb.ScheduleBatchRequest],
        context: aio.ServicerContext[Any, Any],
    ) -> pb.ScheduleBatchResponse:
        caller = current_caller()
        if not caller.can_schedule:  # before reading the stream: no validation for nothing
            raise PermissionDenied(f"role {caller.role!r} of {caller.identity!r} may not schedule")
        settings = self.settings()
        cap, timeout = settings.server.max_uploads_per_identity, settings.server.upload_timeout
        refusal = (
            f"{caller.identity!r} has {cap} ScheduleBatch calls in flight, "
            f"server.max_uploads_per_identity ({cap})"
        )
        with self.uploads_of.hold(caller.identity, cap, refusal):
            try:
                async with asyncio.timeout(timeout):
                    builder = await _receive(request_iterator, BatchBuilder(settings.jobs))
            except TimeoutError:
                # What was received goes with the builder: nothing of the upload is kept.
                raise ResourceExhausted(
                    f"the batch's stream did not end within server.upload_timeout "
                    f"({format_duration(timeout)})"
                ) from None
            options, specs = builder.finish()
            # grpc.aio ends the request iterator normally when the client cancels; sending
            # the headers surfaces the cancellation before anything is stored.
            await context.send_initial_metadata(())
            batch, deduplicated = await self.core.schedule(caller, options, specs)
        set_correlation_id(batch.cid)
        return pb.ScheduleBatchResponse(
            correlation_id=batch.cid,
            job_names=[s.name for s in batch.specs],
            deduplicated=deduplicated,
        )

    async def GetBatch(
        self, request: pb.GetBatchRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GetBatchResponse:
        set_correlation_id(request.correlation_id)
        caller = current_caller()
        batch = self.core.get(caller, request.correlation_id)
        redact = not caller.can_read_secrets(batch.owner)
        indexes = batch.select(request.job_names)
        tail = (
            request.log_tail_bytes
            if request.HasField("log_tail_bytes")
            else self.settings().jobs.log_tail_bytes
        )
        waiting = self.core.engine.waiting(batch.cid)
        if len(indexes) <= BUILD_INLINE_JOBS:
            return pb.GetBatchResponse(
                batch=convert.batch_to_pb(batch, indexes, tail, redact=redact, waiting=waiting)
            )
        # Thousands of jobs: their log tails and messages would hold the event loop, and
        # every job's start and end with it, for a large part of a second. Built on a
        # worker thread from the batch as it stands now (the loop takes turns meanwhile).
        return await asyncio.to_thread(
            _get_batch_response, batch.view(), indexes, tail, redact, waiting
        )

    async def CancelBatch(
        self, request: pb.CancelBatchRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.CancelBatchResponse:
        set_correlation_id(request.correlation_id)
        grace = None
        if request.HasField("grace_period"):
            g = request.grace_period
            if g.seconds < 0 or not 0 <= g.nanos < 1_000_000_000 or g.seconds > MAX_GRACE:
                raise InvalidArgument(
                    f"grace_period: must be a valid duration from 0s to {MAX_GRACE}s"
                )
            grace = g.seconds + g.nanos / 1e9
        caller = current_caller()
        batch = await self.core.cancel(caller, request.correlation_id, request.job_names, grace)
        redact = not caller.can_read_secrets(batch.owner)
        return pb.CancelBatchResponse(batch=convert.batch_to_pb(batch, strict=False, redact=redact))

    async def DeleteBatch(
        self, request: pb.DeleteBatchRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.DeleteBatchResponse:
        set_correlation_id(request.correlation_id)
        # The audit line names the batch deleted, not the prefix that named it.
        set_correlation_id(await self.core.delete(current_caller(), request.correlation_id))
        return pb.DeleteBatchResponse()

    async def ListBatches(
        self, request: pb.ListBatchesRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListBatchesResponse:
        states = []
        for s in request.states:
            try:
                states.append(BatchState(s))
            except ValueError as exc:
                raise InvalidArgument(f"states: {s} is not a batch state") from exc
        page = self.core.list(
            current_caller(),
            page_size=request.page_size,
            page_token=request.page_token,
            labels=request.labels,
            states=states,
        )
        return pb.ListBatchesResponse(
            batches=[convert.summary_to_pb(b) for b in page.batches],
            next_page_token=page.next_token,
        )

    async def StreamBatchLogs(
        self, request: pb.StreamBatchLogsRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamBatchLogsResponse]:
        set_correlation_id(request.correlation_id)
        caller = current_caller()
        batch = self.core.get(caller, request.correlation_id)
        selected = batch.select(request.job_names)
        cursor = Cursor.decode(batch.cid, request.cursor) if request.cursor else Cursor(batch.cid)
        settings = self.settings()
        limit = settings.max_streams
        if self.streams >= limit:
            raise ResourceExhausted(f"server.max_streams ({limit}) streams are open")
        mine = settings.server.max_streams_per_identity
        refusal = (
            f"{caller.identity!r} has {mine} streams open, server.max_streams_per_identity ({mine})"
        )
        floors = None
        if request.HasField("tail_lines") and not request.cursor:
            folders = {i: batch.job_dir(i) for i in selected if batch.statuses[i].start_time}
            floors = await asyncio.to_thread(tail_offsets, folders, request.tail_lines)
        with self.streams_of.hold(caller.identity, mine, refusal):
            follower = Follower(
                batch,
                selected,
                cursor,
                self.inotify,
                self.closing,
                floors,
                functools.partial(self.core.engine.sample_logs, batch.cid),
            )
            self.streams += 1
            self.on_stream(1)
            try:
                # aclosing: a client that goes away closes the follower at once, files and all.
                async with contextlib.aclosing(follower.items(request.follow)) as items:
                    async for item in items:
                        yield convert.item_to_pb(batch, item, cursor.encode())
            finally:
                self.streams -= 1
                self.on_stream(-1)


async def _receive(
    requests: AsyncIterator[pb.ScheduleBatchRequest], builder: BatchBuilder
) -> BatchBuilder:
    """Validate a ScheduleBatch stream message by message into `builder`, until it ends."""
    async for request in requests:
        item = request.WhichOneof("item")
        if item == "options":
            builder.add_options(convert.options_from_pb(request.options))
        elif item == "job":
            j = request.job
            # Counted on the wire message, before a str is made for each of its items.
            builder.check_counts(j.name, len(j.argv), len(j.env), len(j.depends_on))
            builder.add_job(convert.spec_from_pb(len(builder.specs), j))
        else:
            raise InvalidArgument(f"message {len(builder.specs)}: neither options nor job is set")
    return builder


def _get_batch_response(
    view: BatchView,
    indexes: Sequence[int],
    tail: int | None,
    redact: bool,
    waiting: Mapping[int, str],
) -> pb.GetBatchResponse:
    batch = convert.batch_to_pb(view, indexes, tail, redact=redact, waiting=waiting)
    return pb.GetBatchResponse(batch=batch)
