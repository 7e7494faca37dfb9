"""The gRPC servicer: decode, make one call into the core, encode. Errors map in auth.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from grpc import aio

from jobworker.engine.core import JobWorker
from jobworker.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from jobworker.model import BatchState
from jobworker.server import convert
from jobworker.server.auth import current_caller, set_correlation_id
from jobworker.store.batches import BatchView
from jobworker.store.inotify import Inotify
from jobworker.store.logs import Cursor, Follower
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from jobworker.validate import BatchBuilder, BatchLimits

MAX_GRACE = 86_400  # a day: longer, and a CancelBatch call would wait that long
# A GetBatch answer about more jobs than this is built on a worker thread (GetBatch).
BUILD_INLINE_JOBS = 500


class Settings:
    """What the servicer reads from the live config at each call."""

    def __init__(self, jobs: Any, max_streams: int) -> None:
        self.jobs = jobs
        self.max_streams = max_streams


class JobWorkerService(pb_grpc.JobWorkerServiceServicer):
    """The five RPCs of jobworker.v1.JobWorkerService."""

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

    async def ScheduleBatch(  # the wire's names
        self,
        request_iterator: AsyncIterator[pb.ScheduleBatchRequest],
        context: aio.ServicerContext[Any, Any],
    ) -> pb.ScheduleBatchResponse:
        caller = current_caller()
        if not caller.can_schedule:  # before reading the stream: no validation for nothing
            raise PermissionDenied(f"role {caller.role!r} of {caller.identity!r} may not schedule")
        limits: BatchLimits = self.settings().jobs
        builder = BatchBuilder(limits)
        async for request in request_iterator:
            item = request.WhichOneof("item")
            if item == "options":
                builder.add_options(convert.options_from_pb(request.options))
            elif item == "job":
                builder.add_job(convert.spec_from_pb(len(builder.specs), request.job))
            else:
                raise InvalidArgument(
                    f"message {len(builder.specs)}: neither options nor job is set"
                )
        options, specs = builder.finish()
        # grpc.aio ends the request iterator normally when the client cancels; sending the
        # headers surfaces the cancellation before anything is stored.
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
        batch = self.core.get(current_caller(), request.correlation_id)
        indexes = batch.select(request.job_names)
        tail = (
            request.log_tail_bytes
            if request.HasField("log_tail_bytes")
            else self.settings().jobs.log_tail_bytes
        )
        if len(indexes) <= BUILD_INLINE_JOBS:
            return pb.GetBatchResponse(batch=convert.batch_to_pb(batch, indexes, tail))
        # Thousands of jobs: their log tails and messages would hold the event loop, and
        # every job's start and end with it, for a large part of a second. Built on a
        # worker thread from the batch as it stands now (the loop takes turns meanwhile).
        return await asyncio.to_thread(_get_batch_response, batch.view(), indexes, tail)

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
        batch = await self.core.cancel(
            current_caller(), request.correlation_id, request.job_names, grace
        )
        return pb.CancelBatchResponse(batch=convert.batch_to_pb(batch, strict=False))

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
        batch = self.core.get(current_caller(), request.correlation_id)
        selected = batch.select(request.job_names)
        cursor = Cursor.decode(batch.cid, request.cursor) if request.cursor else Cursor(batch.cid)
        limit = self.settings().max_streams
        if self.streams >= limit:
            raise ResourceExhausted(f"server.max_streams ({limit}) streams are open")
        follower = Follower(batch, selected, cursor, self.inotify, self.closing)
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


def _get_batch_response(
    view: BatchView, indexes: Sequence[int], tail: int | None
) -> pb.GetBatchResponse:
    return pb.GetBatchResponse(batch=convert.batch_to_pb(view, indexes, tail))
