"""ListBatches paging on a real store: newest first, stable, and within one gRPC message."""

from __future__ import annotations

from pathlib import Path

from jobworker.engine.core import JobWorker
from jobworker.model import BatchOptions, Caller, JobSpec, frozen_map
from jobworker.server.convert import summary_to_pb
from jobworker.store.batches import BatchStore
from jobworker.v1 import jobworker_pb2 as pb

ALICE = Caller("alice", "user")


def _core(tmp_path: Path) -> tuple[JobWorker, BatchStore]:
    store = BatchStore(tmp_path)
    return JobWorker(store, engine=None), store  # type: ignore[arg-type]  # list needs no engine


def test_pages_end_early_rather_than_pass_the_message_limit(tmp_path: Path) -> None:
    core, store = _core(tmp_path)
    labels = frozen_map({f"key{i:02d}": "v" * 256 for i in range(64)})  # the most labels allow
    for _ in range(200):
        store.create("alice", BatchOptions(labels=labels), (JobSpec("j", ("true",)),))
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
    mine = store.create("alice", BatchOptions(), (JobSpec("j", ("true",)),))
    store.create("bob", BatchOptions(), (JobSpec("j", ("true",)),))
    page = core.list(ALICE, page_size=0, page_token="", labels={}, states=())
    assert [b.cid for b in page.batches] == [mine.cid]
    admin = core.list(Caller("root", "admin"), page_size=0, page_token="", labels={}, states=())
    assert len(admin.batches) == 2
