"""ScheduleBatch's upload: a stream validated as it arrives, capped per identity and in time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from grpc import aio

from jobworker.config import Config
from jobworker.engine.service import BatchService, require_scheduler
from jobworker.errors import ResourceExhausted
from jobworker.model import Caller
from jobworker.server import convert
from jobworker.server.identity import PerIdentity
from jobworker.store.batches import BatchRecord
from jobworker.units import format_duration
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.validate import BatchBuilder


class Uploads:
    """Receives batches: nothing of an upload is kept until its stream ends whole."""

    def __init__(self, core: BatchService, config: Callable[[], Config]) -> None:
        self.core = core
        self.config = config  # the live config, read at each call
        self.uploads_of = PerIdentity()

    async def schedule(
        self,
        caller: Caller,
        requests: AsyncIterator[pb.ScheduleBatchRequest],
        context: aio.ServicerContext[Any, Any],
    ) -> tuple[BatchRecord, bool]:
        """Receive, validate and schedule a ScheduleBatch stream's batch; (batch, deduplicated)."""
        require_scheduler(caller)  # before reading the stream: no validation for nothing
        cfg = self.config()
        cap, timeout = cfg.server.max_uploads_per_identity, cfg.server.upload_timeout
        refusal = (
            f"{caller.identity!r} has {cap} ScheduleBatch calls in flight, "
            f"server.max_uploads_per_identity ({cap})"
        )
        with self.uploads_of.hold(caller.identity, cap, refusal):
            try:
                async with asyncio.timeout(timeout):
                    builder = await convert.batch_from_pb(requests, BatchBuilder(cfg.jobs))
            except TimeoutError:
                raise ResourceExhausted(
                    f"the batch's stream did not end within server.upload_timeout "
                    f"({format_duration(timeout)})"
                ) from None
            options, specs = builder.finish()
            # grpc.aio ends the request iterator normally when the client cancels; sending
            # the headers surfaces the cancellation before anything is stored.
            await context.send_initial_metadata(())
            return await self.core.schedule(caller, options, specs)
