"""What a job is charged, and the store's listing order kept without sorting."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jobworker.config import JobsConfig
from jobworker.errors import InvalidArgument, ResourceExhausted
from jobworker.model import BatchOptions, JobSpec, frozen_map
from jobworker.store import batches as store_module
from jobworker.store.batches import BatchStore
from jobworker.validate import BatchBuilder, argv_cost, spec_cost
from tests.unit.store.new_batch import new_batch


def _limits(max_batch_bytes: int = 1 << 20) -> JobsConfig:
    return JobsConfig(max_jobs_per_batch=100, max_batch_bytes=max_batch_bytes, max_args=10)


def test_an_argument_is_charged_the_str_it_becomes_not_its_bytes() -> None:
    wide = JobSpec("j", ("true", *["ab"] * 1000))
    # Each str is at least sys.getsizeof bytes plus a tuple slot: never less than that.
    floor = sum(sys.getsizeof(a) + 8 for a in wide.argv)
    assert argv_cost(wide) >= floor > 50 * len(wide.argv)
    env = JobSpec("j", ("true",), env=frozen_map({"K": "v" * 100}))
    assert argv_cost(env) >= argv_cost(JobSpec("j", ("true",))) + sys.getsizeof("v" * 100)
    both = JobSpec("j", ("true",), stdin=b"x" * 500, depends_on=("a",))
    assert spec_cost(both) == argv_cost(both) + 500 + argv_cost(JobSpec("a", ("a",)))


def test_max_args_is_checked_before_the_strings_are_made() -> None:
    builder = BatchBuilder(_limits())
    builder.check_counts("ok", 6, 4, 0)  # at the limit
    with pytest.raises(ResourceExhausted, match=r"job 0 \('big'\).*11 items.*jobs.max_args \(10\)"):
        builder.check_counts("big", 6, 5, 0)
    with pytest.raises(InvalidArgument, match="depends_on names 100 jobs"):
        builder.check_counts("deps", 1, 0, 100)
    with pytest.raises(ResourceExhausted, match=r"jobs\.max_args"):  # add_job checks it too
        builder.add_job(JobSpec("j", ("true", *["a"] * 10)))


def test_the_batch_total_names_what_it_holds_and_the_limit() -> None:
    builder = BatchBuilder(_limits(max_batch_bytes=4000))
    builder.add_job(JobSpec("a", ("true",), stdin=b"x" * 1900))
    with pytest.raises(ResourceExhausted, match=r"job 1 \('b'\).*jobs.max_batch_bytes \(4000\)"):
        builder.add_job(JobSpec("b", ("true",), stdin=b"x" * 1990))


def test_listing_order_survives_a_clock_step_and_deletes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wall clock is stepped by hand here (a test cannot step the host's clock).
    clock = iter([100.0, 200.0, 150.0, 300.0, 250.0])
    monkeypatch.setattr(store_module.time, "time", lambda: next(clock))
    store = BatchStore(tmp_path)
    made = [
        new_batch(store, owner, BatchOptions(), (JobSpec("j", ("true",)),))
        for owner in ("alice", "bob", "alice", "bob", "alice")
    ]
    by_time = sorted(made, key=lambda b: b.create_time, reverse=True)
    assert list(store.newest_first()) == by_time
    assert [b.create_time for b in store.newest_first("alice")] == [250.0, 150.0, 100.0]
    assert [b.create_time for b in store.newest_first("bob", (300.0, ""))] == [200.0]
    assert list(store.newest_first("carol")) == []
    for batch in (made[1], made[4]):
        store.delete(batch)
    assert [b.create_time for b in store.newest_first()] == [300.0, 150.0, 100.0]
    assert [b.create_time for b in store.newest_first("bob")] == [300.0]
    store.close()
    again = BatchStore(tmp_path)
    again.load()  # a restart loads them in the same order
    assert [b.cid for b in again.newest_first()] == [b.cid for b in store.newest_first()]
    again.close()
