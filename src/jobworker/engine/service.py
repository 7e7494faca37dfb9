"""The application service: what each RPC does on the domain model, and who may do it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog

from jobworker.engine.scheduler import Scheduler
from jobworker.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from jobworker.model import BatchOptions, BatchState, Caller, JobSpec
from jobworker.store.batches import BatchRecord, BatchStore

log = structlog.get_logger("jobworker.core")

DEFAULT_PAGE = 50
MAX_PAGE = 1000
PAGE_BYTES = 3 * 1024 * 1024  # a page ends early rather than pass gRPC's 4 MiB message limit
MIN_PREFIX = 8  # the shortest correlation id prefix accepted (contract 6.1)


@dataclass(frozen=True)
class Page:
    """One page of ListBatches."""

    batches: list[BatchRecord]
    next_token: str


class BatchService:
    """Schedules, reads, cancels and lists batches on behalf of a caller."""

    def __init__(self, store: BatchStore, scheduler: Scheduler) -> None:
        self.store = store
        self.scheduler = scheduler
        self._lock = asyncio.Lock()

    async def schedule(
        self, caller: Caller, options: BatchOptions, specs: tuple[JobSpec, ...]
    ) -> tuple[BatchRecord, bool]:
        """Store and queue a validated batch; (batch, deduplicated)."""
        require_scheduler(caller)
        # Shielded as a whole: once past the checks, the batch is committed in memory and
        # queued even if the caller goes away, and the lock is held until it is, so a
        # retry with the same idempotency key finds it (what is on disk is what runs).
        task = asyncio.ensure_future(self._schedule(caller.identity, options, specs))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_orphan_failure)
            raise

    async def _schedule(
        self, owner: str, options: BatchOptions, specs: tuple[JobSpec, ...]
    ) -> tuple[BatchRecord, bool]:
        # One batch at a time from the idempotency check to register(): two retries of one
        # batch cannot both get past the check while the first is being written.
        async with self._lock:
            if options.idempotency_key:
                earlier = self.store.find_idempotent(owner, options.idempotency_key)
                if earlier is not None:
                    return earlier, True
            await self.scheduler.check_executor(options.executor)
            self.scheduler.check_capacity(len(specs), owner)
            return await self._commit(owner, options, specs), False

    async def _commit(
        self, owner: str, options: BatchOptions, specs: tuple[JobSpec, ...]
    ) -> BatchRecord:
        # Writing (fsync, maybe thousands of stdin files) happens off the event loop.
        batch = await asyncio.to_thread(self.store.persist, owner, options, specs)
        self.store.register(batch)
        log.info("batch_scheduled", correlation_id=batch.cid, identity=owner, jobs=len(specs))
        self.store.make_folders(batch)
        self.scheduler.submit(batch)
        return batch

    def get(self, caller: Caller, cid: str) -> BatchRecord:
        """The batch `cid` (or the one batch the caller may see whose id starts with it, at
        least MIN_PREFIX characters) if the caller may see it; NotFound otherwise, exactly
        as if missing; INVALID_ARGUMENT for an ambiguous or too short prefix."""
        self._require_reader(caller)
        try:
            batch = self.store.get(cid)
        except NotFound:
            return self._by_prefix(caller, cid)
        if not caller.can_see(batch.owner):
            return self._by_prefix(caller, cid)
        return batch

    def _by_prefix(self, caller: Caller, prefix: str) -> BatchRecord:
        if not prefix:
            raise NotFound("batch  not found")
        matches = []
        for batch in self.store.with_prefix(prefix):
            if caller.can_see(batch.owner):
                matches.append(batch.cid)
                if len(matches) > 1:
                    break
        if not matches:
            raise NotFound(f"batch {prefix} not found")
        if len(prefix) < MIN_PREFIX:
            raise InvalidArgument(
                f"correlation_id: prefix {prefix!r} is shorter than {MIN_PREFIX} characters"
            )
        if len(matches) > 1:
            raise InvalidArgument(
                f"correlation_id: prefix {prefix!r} matches more than one batch "
                f"({matches[0]}, {matches[1]}); give more characters"
            )
        return self.store.get(matches[0])

    async def delete(self, caller: Caller, cid: str) -> str:
        """Delete an ended batch with its folder, at once; its full id."""
        batch = self.get(caller, cid)
        if not caller.can_change(batch.owner):
            raise PermissionDenied(
                f"role {caller.role!r} of {caller.identity!r} may not delete batch {batch.cid}"
            )
        if not batch.ended or self.scheduler.has_jobs_left(batch.cid):
            left = sum(1 for s in batch.statuses if not s.state.ended)
            raise FailedPrecondition(
                f"batch {batch.cid} has {left} jobs queued or running: cancel it first"
            )
        log.info("batch_delete", correlation_id=batch.cid, identity=caller.identity)
        try:
            trash = self.store.delete(batch)
        except OSError as exc:  # the batch is kept: a retry may succeed
            log.error("batch_delete_failed", correlation_id=batch.cid, error=str(exc))
            raise Unavailable(f"batch {batch.cid} was not deleted: {exc}") from exc
        await asyncio.to_thread(shutil.rmtree, trash, True)
        return batch.cid

    async def cancel(
        self, caller: Caller, cid: str, names: Iterable[str], grace: float | None
    ) -> BatchRecord:
        """Cancel the selected jobs and return once they have ended."""
        batch = self.get(caller, cid)
        if not caller.can_change(batch.owner):
            raise PermissionDenied(
                f"role {caller.role!r} of {caller.identity!r} may not cancel batch {batch.cid}"
            )
        indexes = batch.select(names)
        log.info(
            "batch_cancel",
            correlation_id=batch.cid,
            identity=caller.identity,
            jobs=len(indexes),
        )
        await self.scheduler.cancel(batch, indexes, grace, f"canceled by {caller.identity}")
        return batch

    def list(
        self,
        caller: Caller,
        *,
        page_size: int,
        page_token: str,
        labels: Mapping[str, str],
        states: Iterable[BatchState],
    ) -> Page:
        """The batches the caller may see, newest first, in stable pages."""
        self._require_reader(caller)
        if page_size > MAX_PAGE:
            raise InvalidArgument(f"page_size {page_size} is over the maximum ({MAX_PAGE})")
        size = page_size or DEFAULT_PAGE
        before = _decode_token(page_token) if page_token else None
        wanted = set(states)
        out: list[BatchRecord] = []
        more = False
        room = PAGE_BYTES
        # A user sees only their own batches: walk those alone, from the token on.
        owner = None if caller.can_see_all else caller.identity
        for batch in self.store.newest_first(owner, before):
            if not caller.can_see(batch.owner):
                continue
            if wanted and batch.state not in wanted:
                continue
            if any(batch.options.labels.get(k) != v for k, v in labels.items()):
                continue
            room -= _summary_size(batch)
            if len(out) == size or (out and room < 0):
                more = True
                break
            out.append(batch)
        token = _encode_token(out[-1].order) if more else ""
        return Page(out, token)

    async def sweep(self, max_age: float, now: float | None = None) -> int:
        """Delete ended batches older than `max_age` seconds with their logs; how many."""
        cutoff = (time.time() if now is None else now) - max_age
        old = [b for b in self.store if b.end_time is not None and b.end_time < cutoff]
        trash = []
        for batch in old:
            log.info("batch_expired", correlation_id=batch.cid, identity=batch.owner)
            try:
                trash.append(self.store.delete(batch))
            except OSError as exc:  # kept: the next sweep tries again
                log.warning("batch_delete_failed", correlation_id=batch.cid, error=str(exc))
        for path in trash:  # thousands of files for a big batch: not on the event loop
            await asyncio.to_thread(shutil.rmtree, path, True)
        return len(old)

    @staticmethod
    def _require_reader(caller: Caller) -> None:
        if caller.role == "none":
            raise PermissionDenied(f"identity {caller.identity!r} has role 'none'")


def require_scheduler(caller: Caller) -> None:
    """PermissionDenied unless the caller may schedule batches."""
    if not caller.can_schedule:
        raise PermissionDenied(f"role {caller.role!r} of {caller.identity!r} may not schedule")


def _log_orphan_failure(task: asyncio.Future[tuple[BatchRecord, bool]]) -> None:
    """A schedule whose caller went away failed on its own: say so, once."""
    if not task.cancelled() and task.exception() is not None:
        log.error("schedule_failed_after_cancel", error=repr(task.exception()))


def _summary_size(batch: BatchRecord) -> int:
    """About how many bytes the batch's BatchSummary takes on the wire (an upper bound)."""
    labels = sum(len(k.encode()) + len(v.encode()) + 8 for k, v in batch.options.labels.items())
    return 256 + len(batch.owner.encode()) + labels


def _encode_token(order: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(f"v2:{order[0]!r}:{order[1]}".encode()).decode()


def _decode_token(token: str) -> tuple[float, str]:
    try:
        version, created, cid = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        if version != "v2":
            raise ValueError(version)
        return float(created), cid
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument("page_token: not a token from a previous response") from exc
