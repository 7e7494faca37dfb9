"""ListBatches paging on a real store: newest first, stable, and within one gRPC message."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from jobworker.engine.service import BatchService
from jobworker.model import BatchOptions, Caller, JobSpec, frozen_map
from jobworker.server.convert import summary_to_pb
from jobworker.store.batches import BatchStore
from jobworker.v1 import jobworker_pb2 as pb
from tests.unit.store.new_batch import new_batch

ALICE = Caller("alice", "user")


def _core(tmp_path: Path) -> tuple[BatchService, BatchStore]:
    store = BatchStore(tmp_path)
    return BatchService(store, scheduler=None), store  # type: ignore[arg-type]  # list needs none


def test_pages_end_early_rather_than_pass_the_message_limit(tmp_path: Path) -> None:
    core, store = _core(tmp_path)
    labels = frozen_map({f"key{i:02d}": "v" * 256 for i in range(64)})  # the most labels allow
    for _ in range(200):
        new_batch(store, "alice", BatchOptions(labels=labels), (JobSpec("j", ("true",)),))
    seen: list[str] = []
    token = ""
    while True:
        page = core.list(ALICE, page_size=1000, page_token=token, labels={}, states=())
        reply = pb.ListBatchesResponse(
            batches=[summary_to_pb(b) for b in page.batches], next_page_token=page.next_token
        )
        assert 0 < reply.ByteSize() < 4 << 20
        seen += [b.cid for b in page.batches]
        token = page.next_token
        if not token:
            break
    assert seen == [b.cid for b in store.newest_first()]
    assert len(set(seen)) == 200


def test_other_identities_batches_are_not_listed(tmp_path: Path) -> None:
    core, store = _core(tmp_path)
    mine = new_batch(store, "alice", BatchOptions(), (JobSpec("j", ("true",)),))
    new_batch(store, "bob", BatchOptions(), (JobSpec("j", ("true",)),))
    page = core.list(ALICE, page_size=0, page_token="", labels={}, states=())
    assert [b.cid for b in page.batches] == [mine.cid]
    admin = core.list(Caller("root", "admin"), page_size=0, page_token="", labels={}, states=())
    assert len(admin.batches) == 2


class _SlowStore(BatchStore):
    """A real store whose writes take a while (a slow disk), to catch the caller mid-commit."""

    def persist(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return super().persist(*args, **kwargs)


class _Queue:
    """Stands in for the scheduler: these tests are about the commit, not running jobs."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def check_capacity(self, jobs: int, owner: str = "") -> None:
        pass

    async def check_executor(self, name: str) -> None:
        pass

    def submit(self, batch: Any) -> None:
        self.submitted.append(batch.cid)


async def test_a_retry_after_a_cancelled_schedule_finds_the_first_batch(tmp_path: Path) -> None:
    store, queue = _SlowStore(tmp_path), _Queue()
    core = BatchService(store, queue)  # type: ignore[arg-type]
    options = BatchOptions(idempotency_key="retry-me")
    specs = (JobSpec("j", ("true",)),)
    first = asyncio.create_task(core.schedule(ALICE, options, specs))
    await asyncio.sleep(0.05)  # writing has begun
    first.cancel()  # the client's deadline passed
    with pytest.raises(asyncio.CancelledError):
        await first
    batch, deduplicated = await core.schedule(ALICE, options, specs)
    assert deduplicated
    assert len(store) == 1
    assert queue.submitted == [batch.cid]
