"""Follower and Cursor on real files, without a server: order, resumption, tails, cursors."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobworker.errors import InvalidArgument
from jobworker.model import BatchOptions, JobEvent, JobSpec, JobState
from jobworker.store.batches import BatchRecord, BatchStore
from jobworker.store.follow import Chunk, Cursor, Follower
from jobworker.store.logs import append_time, times_path
from tests.unit.store.new_batch import new_batch

SPECS = (JobSpec("a", ("true",)), JobSpec("b", ("true",)))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BatchStore]:
    s = BatchStore(tmp_path)
    yield s
    s.close()


def _batch(store: BatchStore) -> BatchRecord:
    batch = new_batch(store, "alice", BatchOptions(), SPECS)
    for i in range(len(SPECS)):
        batch.job_dir(i).mkdir(parents=True, exist_ok=True)
    return batch


def _event(store: BatchStore, batch: BatchRecord, index: int, state: JobState) -> None:
    store.append(
        batch,
        JobEvent(
            seq=store.next_seq(batch),
            index=index,
            state=state,
            time=time.time(),
            exit_code=0 if state is JobState.SUCCEEDED else None,
        ),
    )


def _write(batch: BatchRecord, index: int, stream: str, data: bytes, *, indexed: bool) -> None:
    folder = batch.job_dir(index)
    with open(folder / stream, "ab") as f:
        f.write(data)
    if indexed:  # what the scheduler's log timer does for a running job
        fd = os.open(times_path(folder, stream), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            append_time(fd, (folder / stream).stat().st_size, time.time())
        finally:
            os.close(fd)


def _run(batch: BatchRecord, store: BatchStore, index: int, out: bytes, err: bytes = b"") -> None:
    _event(store, batch, index, JobState.RUNNING)
    _write(batch, index, "stdout", out, indexed=False)
    if err:
        _write(batch, index, "stderr", err, indexed=False)
    _event(store, batch, index, JobState.SUCCEEDED)


async def _collect(follower: Follower, follow: bool = False) -> list[Chunk | JobEvent]:
    return [item async for item in follower.items(follow)]


def _follower(batch: BatchRecord, cursor: Cursor, selected: list[int] | None = None) -> Follower:
    chosen = list(range(len(batch.specs))) if selected is None else selected
    return Follower(batch, chosen, cursor, None, lambda: False)


def _summary(items: list[Chunk | JobEvent]) -> list[tuple[int, str]]:
    return [(i.index, i.data.decode() if isinstance(i, Chunk) else i.state.name) for i in items]


async def test_an_ended_batch_is_sent_in_order_each_end_after_its_bytes(
    store: BatchStore,
) -> None:
    batch = _batch(store)
    _run(batch, store, 0, b"out-a", b"err-a")
    _run(batch, store, 1, b"out-b")
    items = await _collect(_follower(batch, Cursor(batch.cid)))
    summary = _summary(items)
    assert summary[0] == (0, "QUEUED") and summary[1] == (1, "QUEUED")
    assert summary.index((0, "out-a")) < summary.index((0, "SUCCEEDED"))
    assert summary.index((0, "err-a")) < summary.index((0, "SUCCEEDED"))
    assert summary.index((1, "out-b")) < summary.index((1, "SUCCEEDED"))
    streams = {i.data: i.stream for i in items if isinstance(i, Chunk)}
    assert streams == {b"out-a": 1, b"err-a": 2, b"out-b": 1}


async def test_selected_jobs_only(store: BatchStore) -> None:
    batch = _batch(store)
    _run(batch, store, 0, b"out-a")
    _run(batch, store, 1, b"out-b")
    items = await _collect(_follower(batch, Cursor(batch.cid), [1]))
    assert {i.index for i in items} == {1}


async def test_a_cursor_resumes_without_repeating_or_skipping(store: BatchStore) -> None:
    batch = _batch(store)
    _event(store, batch, 0, JobState.RUNNING)
    _write(batch, 0, "stdout", b"first ", indexed=True)
    cursor = Cursor(batch.cid)
    follower = _follower(batch, cursor)
    seen = []
    async with asyncio.timeout(5):
        async for item in follower.items(False):
            seen.append(item)
    text = cursor.encode()
    _write(batch, 0, "stdout", b"second", indexed=True)
    _event(store, batch, 0, JobState.SUCCEEDED)
    resumed = Cursor.decode(batch.cid, text)
    rest = await _collect(_follower(batch, resumed))
    data = b"".join(i.data for i in seen + rest if isinstance(i, Chunk))
    assert data == b"first second"
    states = [i.state for i in seen + rest if isinstance(i, JobEvent) and i.index == 0]
    assert states == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]


async def test_following_wakes_on_new_events(store: BatchStore) -> None:
    batch = _batch(store)
    follower = _follower(batch, Cursor(batch.cid), [0])
    items: list[Chunk | JobEvent] = []

    async def follow() -> None:
        async for item in follower.items(True):
            items.append(item)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    assert _summary(items) == [(0, "QUEUED")]
    _run(batch, store, 0, b"late")
    async with asyncio.timeout(5):
        await task  # the selected job ended: the stream ends
    assert _summary(items) == [(0, "QUEUED"), (0, "RUNNING"), (0, "late"), (0, "SUCCEEDED")]


async def test_floors_leave_out_what_is_below_them(store: BatchStore) -> None:
    batch = _batch(store)
    _run(batch, store, 0, b"line1\nline2\n")
    follower = Follower(batch, [0], Cursor(batch.cid), None, lambda: False, {0: (6, 0)})
    chunks = [i.data for i in await _collect(follower) if isinstance(i, Chunk)]
    assert chunks == [b"line2\n"]


def test_cursor_round_trip() -> None:
    cursor = Cursor("0123456789abcdef", 7, {3: [10, 20], 5: [0, 4]})
    text = cursor.encode()
    assert text == "1.01234567.7.3:10:20,5:0:4"
    again = Cursor.decode("0123456789abcdef", text)
    assert (again.seq, again.offsets) == (7, {3: [10, 20], 5: [0, 4]})


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("garbage", "not a cursor"),
        ("2.01234567.0.", "not a cursor"),
        ("1.01234567.-1.", "not a cursor"),
        ("1.01234567.0.1:-1:0", "not a cursor"),
        ("1.ffffffff.0.", "another batch"),
    ],
)
def test_a_bad_cursor_is_invalid_argument(text: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        Cursor.decode("0123456789abcdef", text)


def test_a_cursor_past_the_end_is_invalid_argument(store: BatchStore) -> None:
    batch = _batch(store)
    with pytest.raises(InvalidArgument, match="past the batch's end"):
        _follower(batch, Cursor(batch.cid, seq=99))
