"""The gRPC servicer: decode, make one call, encode. Errors map in server/errors.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from jobworker.engine.service import BatchService
from jobworker.server import convert
from jobworker.server.audit import set_correlation_id
from jobworker.server.identity import current_caller
from jobworker.server.reader import BatchReader
from jobworker.server.uploads import Uploads
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

Context = aio.ServicerContext[Any, Any]


class JobWorkerService(pb_grpc.JobWorkerServiceServicer):
    """The six RPCs of jobworker.v1.JobWorkerService (the wire's names)."""

    def __init__(self, core: BatchService, uploads: Uploads, reader: BatchReader) -> None:
        self.core = core
        self.uploads = uploads
        self.reader = reader

    async def ScheduleBatch(
        self, request_iterator: AsyncIterator[pb.ScheduleBatchRequest], context: Context
    ) -> pb.ScheduleBatchResponse:
        batch, deduplicated = await self.uploads.schedule(
            current_caller(), request_iterator, context
        )
        set_correlation_id(batch.cid)
        return pb.ScheduleBatchResponse(
            correlation_id=batch.cid,
            job_names=[s.name for s in batch.specs],
            deduplicated=deduplicated,
        )

    async def GetBatch(self, request: pb.GetBatchRequest, context: Context) -> pb.GetBatchResponse:
        set_correlation_id(request.correlation_id)
        tail = request.log_tail_bytes if request.HasField("log_tail_bytes") else None
        batch = await self.reader.get(
            current_caller(), request.correlation_id, request.job_names, tail
        )
        return pb.GetBatchResponse(batch=batch)

    async def CancelBatch(
        self, request: pb.CancelBatchRequest, context: Context
    ) -> pb.CancelBatchResponse:
        set_correlation_id(request.correlation_id)
        grace = convert.grace_from_pb(request)
        caller = current_caller()
        batch = await self.core.cancel(caller, request.correlation_id, request.job_names, grace)
        return pb.CancelBatchResponse(batch=self.reader.canceled(caller, batch))

    async def DeleteBatch(
        self, request: pb.DeleteBatchRequest, context: Context
    ) -> pb.DeleteBatchResponse:
        set_correlation_id(request.correlation_id)
        # The audit line names the batch deleted, not the prefix that named it.
        set_correlation_id(await self.core.delete(current_caller(), request.correlation_id))
        return pb.DeleteBatchResponse()

    async def ListBatches(
        self, request: pb.ListBatchesRequest, context: Context
    ) -> pb.ListBatchesResponse:
        page = self.core.list(
            current_caller(),
            page_size=request.page_size,
            page_token=request.page_token,
            labels=request.labels,
            states=convert.states_from_pb(request.states),
        )
        return pb.ListBatchesResponse(
            batches=[convert.summary_to_pb(b) for b in page.batches],
            next_page_token=page.next_token,
        )

    def StreamBatchLogs(  # returns the reader's iterator itself: no generator layer
        self, request: pb.StreamBatchLogsRequest, context: Context
    ) -> AsyncIterator[pb.StreamBatchLogsResponse]:
        set_correlation_id(request.correlation_id)
        return self.reader.follow(current_caller(), request)
