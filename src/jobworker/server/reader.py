"""Reading batches for the wire: GetBatch's answers under gRPC's message limit, and
StreamBatchLogs' followers with their caps."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from jobworker.config import Config
from jobworker.engine.service import BatchService
from jobworker.errors import ResourceExhausted
from jobworker.model import Caller
from jobworker.server import convert
from jobworker.server.identity import PerIdentity
from jobworker.store.batches import BatchRecord, BatchView
from jobworker.store.damage import STREAMS
from jobworker.store.follow import Chunk, Cursor, Follower
from jobworker.store.inotify import Inotify
from jobworker.store.logs import log_size, read_tail, tail_offsets
from jobworker.v1 import jobworker_pb2 as pb

MESSAGE_LIMIT = 4 * 1024 * 1024  # gRPC's default for a message a client receives
MESSAGE_MARGIN = 64 * 1024  # framing and what the size estimate does not see
# A GetBatch answer about more jobs is built on a worker thread (ARCHITECTURE.md).
BUILD_INLINE_JOBS = 500
# A packed StreamBatchLogs response holds at most this many events, and is sent once its
# chunks hold this many bytes (a chunk is at most follow.CHUNK): far under MESSAGE_LIMIT.
PACK_EVENTS = 1000
PACK_BYTES = 1024 * 1024


class BatchReader:
    """What GetBatch, CancelBatch and StreamBatchLogs send, read from memory and files."""

    def __init__(
        self,
        core: BatchService,
        config: Callable[[], Config],
        inotify: Inotify | None,
        closing: Callable[[], bool],
        on_stream: Callable[[int], None] | None = None,
    ) -> None:
        self.core = core
        self.config = config  # the live config, read at each call
        self.inotify = inotify
        self.closing = closing
        self.on_stream = on_stream or (lambda _delta: None)
        self.streams = 0
        self.streams_of = PerIdentity()

    async def get(
        self, caller: Caller, cid: str, names: Iterable[str], tail: int | None
    ) -> pb.Batch:
        """The batch with the named jobs (all: none named) and their logs' last `tail`
        bytes (None: jobs.log_tail_bytes)."""
        batch = self.core.get(caller, cid)
        indexes = batch.select(names)
        tail = self.config().jobs.log_tail_bytes if tail is None else tail
        waiting = self.core.scheduler.waiting(batch.cid)
        redact = not caller.can_read_secrets(batch.owner)
        if len(indexes) <= BUILD_INLINE_JOBS:
            return answer(batch, indexes, tail, redact=redact, waiting=waiting)
        # Thousands of jobs would hold the event loop (and every job's start and end) for
        # a large part of a second: built on a thread from the batch as it stands now.
        return await asyncio.to_thread(
            functools.partial(answer, redact=redact, waiting=waiting), batch.view(), indexes, tail
        )

    def canceled(self, caller: Caller, batch: BatchRecord) -> pb.Batch:
        """CancelBatch's answer: the whole batch, its specs left out if it must."""
        redact = not caller.can_read_secrets(batch.owner)
        return answer(batch, range(len(batch.specs)), 0, strict=False, redact=redact)

    async def follow(
        self, caller: Caller, request: pb.StreamBatchLogsRequest
    ) -> AsyncIterator[pb.StreamBatchLogsResponse]:
        """StreamBatchLogs' responses, from the request's cursor (or the tails it asks)."""
        batch = self.core.get(caller, request.correlation_id)
        selected = batch.select(request.job_names)
        cursor = Cursor.decode(batch.cid, request.cursor) if request.cursor else Cursor(batch.cid)
        server = self.config().server
        if self.streams >= server.max_streams:
            raise ResourceExhausted(f"server.max_streams ({server.max_streams}) streams are open")
        mine = server.max_streams_per_identity
        refusal = (
            f"{caller.identity!r} has {mine} streams open, server.max_streams_per_identity ({mine})"
        )
        with self.streams_of.hold(caller.identity, mine, refusal), self._counted():
            floors = None  # counted first: a refused stream costs no reading of tails
            if request.HasField("tail_lines") and not request.cursor:
                folders = {i: batch.job_dir(i) for i in selected if batch.statuses[i].start_time}
                floors = await asyncio.to_thread(tail_offsets, folders, request.tail_lines)
            sample = functools.partial(self.core.scheduler.sample_logs, batch.cid)
            follower = Follower(batch, selected, cursor, self.inotify, self.closing, floors, sample)
            # aclosing: a client that goes away closes the follower at once, files and all.
            items = follower.items(request.follow, pauses=request.packed)
            async with contextlib.aclosing(items):
                if not request.packed:
                    async for item in items:
                        if item is not None:
                            yield convert.item_to_pb(batch, item, cursor.encode())
                    return
                # Packed: what the follower has at once goes in one message (proto: more).
                pack: list[pb.StreamBatchLogsResponse] = []
                size = 0
                async for item in items:
                    if item is not None:
                        pack.append(convert.item_to_pb(batch, item, cursor.encode()))
                        size += len(item.data) if isinstance(item, Chunk) else 0
                        if len(pack) < PACK_EVENTS and size < PACK_BYTES:
                            continue
                    if pack:
                        yield _packed(pack)
                        pack, size = [], 0
                if pack:
                    yield _packed(pack)

    @contextlib.contextmanager
    def _counted(self) -> Any:
        self.streams += 1
        self.on_stream(1)
        try:
            yield
        finally:
            self.streams -= 1
            self.on_stream(-1)


def _packed(pack: list[pb.StreamBatchLogsResponse]) -> pb.StreamBatchLogsResponse:
    first = pack[0]
    first.more.extend(pack[1:])
    return first


def answer(
    batch: BatchRecord | BatchView,
    chosen: Sequence[int],
    tail: int,
    *,
    strict: bool = True,
    redact: bool = False,
    waiting: dict[int, str] | None = None,
) -> pb.Batch:
    """The wire Batch, kept under gRPC's 4 MiB whatever was asked.

    Tails are shortened first (each says truncated); stdin is echoed only when it fits; past
    that, `strict` answers RESOURCE_EXHAUSTED (ask for fewer jobs), else the specs are left
    out (CancelBatch must answer once it has cancelled). Blocking: reads the jobs' files."""
    tails = bool(tail and chosen)  # the tails tell the sizes too
    sizes = None if tails else {i: _sizes(batch, i) for i in chosen}
    out = convert.batch_to_pb(batch, chosen, sizes=sizes, redact=redact, waiting=waiting)
    budget = MESSAGE_LIMIT - MESSAGE_MARGIN
    size = out.ByteSize()
    if size > budget:
        if strict:
            raise ResourceExhausted(
                f"the answer would be {size} bytes, over gRPC's message limit "
                f"({MESSAGE_LIMIT} bytes); ask for fewer jobs with job_names"
            )
        for job in out.jobs:
            job.ClearField("spec")
        size = out.ByteSize()
    if strict:
        size = _echo_stdin(batch, chosen, out, budget - size, redact=redact)
    if tails:
        _fill_tails(batch, chosen, out, tail, budget, size)
    return out


def _sizes(batch: BatchRecord | BatchView, index: int) -> tuple[int, int]:
    folder = batch.job_dir(index)
    return log_size(f"{folder}/{STREAMS[0]}"), log_size(f"{folder}/{STREAMS[1]}")


def _fill_tails(
    batch: BatchRecord | BatchView,
    chosen: Sequence[int],
    out: pb.Batch,
    tail: int,
    budget: int,
    size: int,
) -> None:
    # Each tail also costs a tag and length bytes in its own and the enclosing messages
    # (the sizes are not in `size` yet: a varint each, within the 16 bytes a job).
    limit = min(tail, max(0, (budget - size) // (2 * len(chosen)) - 16))
    while True:
        for i, job in zip(chosen, out.jobs, strict=True):
            folder = batch.job_dir(i)
            convert.set_tails(
                job,
                read_tail(f"{folder}/{STREAMS[0]}", limit),
                read_tail(f"{folder}/{STREAMS[1]}", limit),
            )
        if limit == 0 or out.ByteSize() <= budget:
            return
        limit //= 2


def _echo_stdin(
    batch: BatchRecord | BatchView, chosen: Sequence[int], out: pb.Batch, room: int, *, redact: bool
) -> int:
    """Put the chosen jobs' stdin (or, `redact`, its size) in `out` if all fits in `room`
    bytes; the size of `out`."""
    sizes = [batch.stdin_sizes[i] for i in chosen]
    need = 32 * len(chosen) if redact else sum(sizes) + 8 * len(chosen)
    if not any(sizes) or need > room:
        return out.ByteSize()
    for i, size, job in zip(chosen, sizes, out.jobs, strict=True):
        if not size:
            continue
        if redact:
            job.spec.stdin = convert.redacted_stdin(size)
        else:
            with contextlib.suppress(FileNotFoundError):  # lost: the job said so
                job.spec.stdin = (batch.job_dir(i) / "stdin").read_bytes()
    return out.ByteSize()
