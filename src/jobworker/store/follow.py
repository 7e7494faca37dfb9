"""Followers for StreamBatchLogs: a batch's events and its jobs' bytes from a cursor on,
live until the jobs end."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from jobworker.errors import InvalidArgument, Unavailable
from jobworker.model import JobEvent, JobState
from jobworker.store.batches import BatchRecord
from jobworker.store.damage import STREAMS
from jobworker.store.inotify import Inotify
from jobworker.store.logs import (
    TimeIndex,
    log_size,
    open_log,
    times_path,
)

log = structlog.get_logger("jobworker.store")

CHUNK = 512 * 1024  # per message: large enough for throughput, far under gRPC's 4 MiB
ROUND = 4  # full chunks of one stream sent in a row before the others get a turn
COALESCE = 0.001  # after a short read of a live job, let it write a little more first


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes a job wrote to one stream."""

    index: int
    stream: int  # 1 stdout, 2 stderr (the wire enum)
    data: bytes
    time: float
    attempt: int = 1


Item = Chunk | JobEvent


class Cursor:
    """Where a follower stands: the next batch event and the offsets of jobs running there.

    A job's end event is sent only after all of its bytes, so jobs that ended before
    `seq` need no offsets and jobs not yet started start at zero: the cursor stays
    small however large the batch.
    """

    def __init__(self, cid: str, seq: int = 0, offsets: dict[int, list[int]] | None = None):
        self.cid = cid
        self.seq = seq
        self.offsets = offsets or {}

    def encode(self) -> str:
        """The opaque text a client sends back to resume (plain ASCII, cheap to make)."""
        running = ",".join(f"{i}:{o[0]}:{o[1]}" for i, o in self.offsets.items())
        return f"1.{self.cid[:8]}.{self.seq}.{running}"

    @classmethod
    def decode(cls, cid: str, text: str) -> Cursor:
        """Parse a cursor; INVALID_ARGUMENT when it is malformed or belongs to another batch."""
        try:
            version, prefix, seq_text, running = text.split(".")
            seq = int(seq_text)
            if version != "1" or seq < 0:
                raise ValueError(version)
            parsed: dict[int, list[int]] = {}
            for entry in filter(None, running.split(",")):
                i, o, e = (int(x) for x in entry.split(":"))
                if min(i, o, e) < 0:
                    raise ValueError(entry)
                parsed[i] = [o, e]
        except ValueError as exc:
            raise InvalidArgument("cursor: not a cursor from a previous response") from exc
        if prefix != cid[:8]:
            raise InvalidArgument("cursor: belongs to another batch")
        return cls(cid, seq, parsed)


class Follower:
    """Reads one batch's events and logs in order for one stream, waking on changes."""

    def __init__(
        self,
        batch: BatchRecord,
        selected: list[int],
        cursor: Cursor,
        inotify: Inotify | None,
        closing: Callable[[], bool],
        floors: dict[int, tuple[int, int]] | None = None,
        sample: Callable[[int], None] | None = None,
    ) -> None:
        self.batch = batch
        # StreamBatchLogsRequest.tail_lines: per job, the offsets below which nothing is sent.
        self.floors = floors or {}
        # Indexes a running job's output up to now, so that what exists is sent at once.
        self.sample = sample
        self.selected = set(selected)
        self.cursor = cursor
        self.inotify = inotify
        self.closing = closing
        self._watches: dict[int, int] = {}  # job index -> inotify key
        self._fds: dict[tuple[int, int], int] = {}  # (job index, stream) -> open log file
        # Without follow, a stream sends what exists when it starts: events up to here, and
        # each file up to its size at the first read, so a busy job cannot keep it going.
        self._end_seq: int | None = None
        self._end_size: dict[tuple[int, int], int] | None = None
        self._attempts: dict[int, int] = {}  # job index -> the attempt its bytes belong to
        self._times: dict[tuple[int, int], TimeIndex] = {}  # (job index, stream) -> its index
        if cursor.seq > len(batch.events):
            raise InvalidArgument("cursor: points past the batch's end")
        # Jobs running as of the cursor's event: keep their offsets, start new ones at 0.
        running: dict[int, list[int]] = {}
        for event in batch.events[: cursor.seq]:
            if event.index not in self.selected:
                continue
            if event.state is JobState.RUNNING:
                running[event.index] = cursor.offsets.get(event.index) or self._start(event)
                self._attempts[event.index] = event.attempt
            elif event.state.ended or event.attempt > 1:  # ended, or an attempt did
                running.pop(event.index, None)
        cursor.offsets = running

    async def items(self, follow: bool, pauses: bool = False) -> AsyncGenerator[Item | None, None]:
        """Every event and chunk from the cursor on; live until the selected jobs end.
        With `pauses`, None before each wait: what came since is all there is for now."""
        if not follow:
            self._end_seq = len(self.batch.events)
            self._end_size = {}
        try:
            while True:
                self._check_open()
                waiter = self.batch.changed.waiter()
                progressed = short = False
                for index in list(self.cursor.offsets):
                    async for chunk in self._read(index, drain=False):
                        progressed = True
                        short = short or len(chunk.data) < CHUNK
                        self._check_open()
                        yield chunk
                async for item in self._events():
                    progressed = True
                    self._check_open()  # not the jobs the shutdown stops: the stream ends first
                    yield item
                if self._done():
                    return
                if progressed:
                    if pauses:
                        yield None
                    await self._after_progress(coalesce=short and follow)
                elif not follow:
                    return
                elif not self._sync_watches():  # a watch added just now: look once more
                    if pauses:
                        yield None
                    await asyncio.wait([waiter])
        finally:
            self._release()

    def _check_open(self) -> None:
        """Unavailable once the server is shutting down: checked before every item, since a
        follower is often mid-way (waiting for its last write) when the shutdown begins."""
        if self.closing():
            raise Unavailable("server is shutting down")

    async def _after_progress(self, *, coalesce: bool) -> None:
        # Data is flowing: no wake-ups are needed meanwhile, and a busy writer's inotify
        # events would cost the event loop more than the reads.
        self._drop_watches()
        if coalesce:  # a writer we caught up with: many tiny messages cost more than 1 ms
            await asyncio.sleep(COALESCE)

    def _done(self) -> bool:
        batch = self.batch
        if self.cursor.seq != len(batch.events):
            return False
        if len(self.selected) == len(batch.statuses):  # every job: not a scan of them all
            return batch.ended
        return all(batch.statuses[i].state.ended for i in self.selected)

    async def _events(self) -> AsyncIterator[Item]:
        events = self.batch.events
        while self.cursor.seq < (len(events) if self._end_seq is None else self._end_seq):
            event = events[self.cursor.seq]
            if event.index in self.selected:
                if event.state is JobState.RUNNING:
                    # A retry's output follows the earlier attempts' in the same files.
                    self.cursor.offsets[event.index] = self._start(event)
                    self._attempts[event.index] = event.attempt
                elif event.index in self.cursor.offsets and (
                    event.state.ended or event.attempt > 1
                ):
                    # An attempt's end (a retry's QUEUED names where it ended): its bytes
                    # first, and no byte of the next attempt with them.
                    until = None if event.state.ended else event.offsets
                    chunks = self._read(event.index, drain=True, until=until, when=event.time)
                    async for chunk in chunks:
                        yield chunk
                    del self.cursor.offsets[event.index]
                    self._close_files(event.index)
            self.cursor.seq += 1
            if event.index in self.selected:
                yield event

    def _start(self, event: JobEvent) -> list[int]:
        """The offsets where an attempt's output begins for this follower."""
        floor = self.floors.get(event.index)
        if floor is None:
            return list(event.offsets)
        return [max(event.offsets[0], floor[0]), max(event.offsets[1], floor[1])]

    async def _read(
        self,
        index: int,
        *,
        drain: bool,
        until: tuple[int, int] | None = None,
        when: float = 0.0,
    ) -> AsyncIterator[Chunk]:
        """Chunks of job `index` past its offsets, each within one record of its write-time
        index: a round per stream, or, if `drain` (the attempt has ended), everything (up
        to the offsets `until`, when given; bytes no sampler saw get the end's time `when`)."""
        offsets = self.cursor.offsets[index]
        attempt = self._attempts.get(index, 1)
        for k in range(len(STREAMS)):
            times = self._times.get((index, k))
            if times is None:
                folder = self.batch.job_dir(index)
                times = self._times[(index, k)] = TimeIndex(times_path(folder, STREAMS[k]))
            for _ in itertools.count() if drain else range(ROUND):
                size = CHUNK if until is None else min(CHUNK, until[k] - offsets[k])
                if size <= 0:
                    break
                seen = times.covering(offsets[k])
                if seen is None and self.sample is not None:
                    # First seen now, by this reader: indexed at once, so that a live
                    # follower does not wait for the sampler's next round.
                    self.sample(index)
                    seen = times.covering(offsets[k])
                if seen is not None:
                    size, at = min(size, seen[0] - offsets[k]), seen[1]
                elif drain:
                    at = when
                else:  # a job no sampler watches (not running here): sent at its end
                    break
                data = self._pread(index, k, offsets[k], size)
                if not data:
                    break
                offsets[k] += len(data)
                yield Chunk(index, k + 1, data, at, attempt)
                if len(data) < size:
                    break

    def _pread(self, index: int, k: int, offset: int, size: int = CHUNK) -> bytes:
        fd = self._fds.get((index, k))
        if fd is None:
            path = os.path.join(self.batch.job_dir(index), STREAMS[k])
            # Most streams of most jobs stay empty: one stat, not open+read+close.
            if log_size(path) <= offset:
                return b""
            fd = open_log(path)
            if fd is None:
                return b""
            self._fds[(index, k)] = fd
        if self._end_size is not None:
            end = self._end_size.setdefault((index, k), os.fstat(fd).st_size)
            size = min(size, end - offset)
        return os.pread(fd, size, offset) if size > 0 else b""

    def _sync_watches(self) -> bool:
        """Watch the folders of the running jobs; True when a watch was added just now."""
        if self.inotify is None:
            return False
        added = False
        for index in self.cursor.offsets:
            if index not in self._watches:
                folder = self.batch.job_dir(index)
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    self._watches[index] = self.inotify.watch(folder, self.batch.changed)
                    added = True
        for index in [i for i in self._watches if i not in self.cursor.offsets]:
            self.inotify.unwatch(self.batch.job_dir(index), self._watches.pop(index))
        return added

    def _close_files(self, index: int) -> None:
        for k in range(len(STREAMS)):
            fd = self._fds.pop((index, k), None)
            if fd is not None:
                os.close(fd)
            times = self._times.pop((index, k), None)
            if times is not None:
                times.close()

    def _release(self) -> None:
        """Give back the watches and files this follower holds."""
        self._drop_watches()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for times in self._times.values():
            times.close()
        self._times.clear()

    def _drop_watches(self) -> None:
        if self.inotify is not None:
            for index, key in self._watches.items():
                self.inotify.unwatch(self.batch.job_dir(index), key)
        self._watches.clear()
