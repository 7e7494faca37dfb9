"""The engine on a real store and real processes, without a server (no cgroups: "none")."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from jobworker.config import JobsConfig
from jobworker.engine.cgroups.backend import CgroupBackend
from jobworker.engine.executor import ExitInfo, Known, Launch
from jobworker.engine.scheduler import Scheduler
from jobworker.engine.spawn import Spawner
from jobworker.errors import ResourceExhausted
from jobworker.model import BatchOptions, JobEvent, JobSpec, JobState, Usage
from jobworker.store.batches import BatchRecord, BatchStore
from tests.unit.engine.direct import DirectExecutor
from tests.unit.store.new_batch import new_batch


async def test_a_job_that_exits_in_its_deadlines_loop_turn_keeps_its_own_result(
    tmp_path: Path,
) -> None:
    """The job exits well within its timeout, but the event loop is held up past the
    deadline: its exit and its timer then come due in the same loop turn. The exit was
    first, so the job succeeded; it must not be recorded TIMED_OUT."""
    store = BatchStore(tmp_path)
    executor = DirectExecutor(Spawner(CgroupBackend("none")))

    def hold_the_loop(batch: BatchRecord, event: JobEvent) -> None:
        if event.state is JobState.RUNNING:  # once the job's timer is set, block the loop:
            # meanwhile `true` exits and the 0.2 s deadline passes
            asyncio.get_running_loop().call_soon(time.sleep, 0.5)

    engine = Scheduler(store, {"local": executor}, JobsConfig(), listeners=[hold_the_loop])
    spec = JobSpec("quick", ("true",), timeout=0.2)
    batch = new_batch(store, "alice", BatchOptions(), (spec,))
    engine.submit(batch)
    deadline = time.monotonic() + 10
    while not batch.statuses[0].state.ended:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await engine.shutdown()
    store.close()
    assert batch.statuses[0].state is JobState.SUCCEEDED, batch.statuses[0]
    assert batch.statuses[0].exit_code == 0


# --- the dispatcher, against a fake supervisor ----------------------------------------------
# A fake: it starts no process, so each test decides when every job ends and the order of
# starts is exact. Real processes run through the same Scheduler in tests/integration.


class FakeProcess:
    """What the Scheduler uses of a Process; ends when the test (or a stop) says so."""

    def __init__(self, key: str, number: int) -> None:
        self.key = key
        self.pid = 4_000_000 + number  # above pid_max: never a real process
        self.pid_start = 0
        self.start_time = time.time()
        self.cgroup = ""
        self.node = ""
        self.done: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()

    @property
    def ended(self) -> bool:
        return self.done.done()

    def finish(self, code: int | None = 0, sig: int = 0) -> None:
        if not self.done.done():
            info = ExitInfo(code, sig, Usage(), time.time(), oom_killed=False)
            self.done.set_result(info)

    async def wait(self) -> ExitInfo:
        return await asyncio.shield(self.done)

    async def stop(self, grace: float) -> ExitInfo:
        self.finish(None, signal.SIGTERM)
        return await self.wait()

    def kill(self) -> None:
        self.finish(None, signal.SIGKILL)


class FakeExecutor:
    """An Executor handing out FakeProcesses; keeps those still running, oldest first."""

    name = "local"

    def __init__(self) -> None:
        self.live: list[FakeProcess] = []
        self.started: list[str] = []  # job names in the order they started
        self.count = 0
        self.known: dict[str, tuple[int, FakeProcess | ExitInfo]] = {}  # what recover says
        self.asked: list[Known] = []
        self.forgotten: list[tuple[str, int]] = []
        self.closed: list[bool] = []

    async def start(self, launch: Launch) -> FakeProcess:
        self.count += 1
        process = FakeProcess(launch.key, self.count)
        self.live.append(process)
        self.started.append(launch.spec.name)
        return process

    async def ready(self) -> None:
        pass

    async def recover(self, known: Sequence[Known]) -> dict[str, tuple[int, Any]]:
        self.asked.extend(known)
        found: dict[str, tuple[int, Any]] = dict(self.known)
        for k in known:
            if k.key not in found:
                lost = ExitInfo(None, 0, Usage(), time.time(), False, lost="gone")
                found[k.key] = (k.attempt, lost)
        return found

    def forget(self, key: str, attempt: int) -> None:
        self.forgotten.append((key, attempt))

    async def close(self, *, stop_jobs: bool) -> None:
        self.closed.append(stop_jobs)

    async def next_live(self) -> FakeProcess:
        deadline = time.monotonic() + 10
        while True:
            self.live = [p for p in self.live if not p.ended]
            if self.live:
                return self.live[0]
            assert time.monotonic() < deadline, f"no job started after {self.started}"
            await asyncio.sleep(0)


def _engine(tmp_path: Path, **settings: object) -> tuple[BatchStore, FakeExecutor, Scheduler]:
    store = BatchStore(tmp_path)
    supervisor = FakeExecutor()
    engine = Scheduler(store, {"local": supervisor}, JobsConfig(**settings))  # type: ignore[arg-type]
    return store, supervisor, engine


def _batch(store: BatchStore, owner: str, *names: str, **options: object) -> BatchRecord:
    specs = tuple(JobSpec(n, ("true",)) for n in names)
    return new_batch(store, owner, BatchOptions(**options), specs)  # type: ignore[arg-type]


async def _run_out(supervisor: FakeExecutor, batches: list[BatchRecord]) -> None:
    """End each job, oldest first, as soon as it runs, until every batch has ended."""
    deadline = time.monotonic() + 30
    while not all(b.ended for b in batches):
        supervisor.live = [p for p in supervisor.live if not p.ended]
        if supervisor.live:
            supervisor.live[0].finish(0)
        assert time.monotonic() < deadline, f"not done after {supervisor.started}"
        await asyncio.sleep(0)


async def test_fair_share_is_round_robin_newcomers_first_fifo_within_an_identity(
    tmp_path: Path,
) -> None:
    store, supervisor, engine = _engine(tmp_path, max_concurrent=1)
    batches = [
        _batch(store, "alice", "a0", "a1", "a2"),
        _batch(store, "alice", "a3"),
        _batch(store, "bob", "b0", "b1", "b2"),
        _batch(store, "carol", "c0"),
    ]
    for batch in batches:
        engine.submit(batch)
    await _run_out(supervisor, batches)
    await engine.shutdown()
    assert supervisor.started == ["a0", "b0", "c0", "a1", "b1", "a2", "b2", "a3"]


async def test_fair_share_false_is_fifo_across_batches(tmp_path: Path) -> None:
    store, supervisor, engine = _engine(tmp_path, max_concurrent=1, fair_share=False)
    batches = [
        _batch(store, "alice", "a0", "a1"),
        _batch(store, "bob", "b0"),
        _batch(store, "alice", "a2"),
    ]
    for batch in batches:
        engine.submit(batch)
    await _run_out(supervisor, batches)
    await engine.shutdown()
    assert supervisor.started == ["a0", "a1", "b0", "a2"]


async def test_a_reload_switches_fair_share(tmp_path: Path) -> None:
    store, supervisor, engine = _engine(tmp_path, max_concurrent=1, fair_share=False)
    batches = [_batch(store, "alice", "a0", "a1", "a2"), _batch(store, "bob", "b0")]
    for batch in batches:
        engine.submit(batch)
    (await supervisor.next_live()).finish(0)  # a0; FIFO: a1 next
    await supervisor.next_live()
    engine.update_settings(JobsConfig(max_concurrent=1, fair_share=True))
    await _run_out(supervisor, batches)
    await engine.shutdown()
    assert supervisor.started == ["a0", "a1", "b0", "a2"]


async def test_max_parallel_and_max_running_per_identity_hold(tmp_path: Path) -> None:
    store, supervisor, engine = _engine(tmp_path, max_concurrent=10, max_running_per_identity=2)
    batches = [
        _batch(store, "alice", "a0", "a1", "a2", "a3"),
        _batch(store, "bob", "b0", "b1", "b2", max_parallel=1),
    ]
    for batch in batches:
        engine.submit(batch)
    await asyncio.sleep(0)
    assert sorted(supervisor.started) == ["a0", "a1", "b0"]
    assert engine.running == 3
    # A reload that lifts the quota starts alice's other two at once; bob's max_parallel holds.
    engine.update_settings(JobsConfig(max_concurrent=10))
    await asyncio.sleep(0)
    assert sorted(supervisor.started) == ["a0", "a1", "a2", "a3", "b0"]
    await _run_out(supervisor, batches)
    await engine.shutdown()
    assert supervisor.started[-2:] == ["b1", "b2"]


async def test_max_queued_jobs_per_identity(tmp_path: Path) -> None:
    store, _, engine = _engine(tmp_path, max_concurrent=1, max_queued_jobs_per_identity=3)
    engine.submit(_batch(store, "alice", "a0", "a1", "a2"))  # a0 runs: 2 queued
    engine.check_capacity(1, "alice")
    with pytest.raises(ResourceExhausted) as caught:
        engine.check_capacity(2, "alice")
    assert str(caught.value) == (
        "queue of 'alice' is full: 2 jobs queued, 2 more would pass "
        "jobs.max_queued_jobs_per_identity (3)"
    )
    engine.check_capacity(3, "bob")
    await engine.shutdown()


def _chain(store: BatchStore, n: int, **options: object) -> BatchRecord:
    specs = [JobSpec("j0", ("false",))]
    specs += [JobSpec(f"j{i}", ("true",), depends_on=(f"j{i - 1}",)) for i in range(1, n)]
    return new_batch(store, "alice", BatchOptions(**options), tuple(specs))  # type: ignore[arg-type]


@pytest.mark.parametrize("fail_fast", [False, True])
async def test_a_10000_job_chain_whose_head_fails(tmp_path: Path, fail_fast: bool) -> None:
    """Before the fix: RecursionError after ~330 skips, the rest QUEUED for ever."""
    store, supervisor, engine = _engine(tmp_path)
    batch = _chain(store, 10_000, fail_fast=fail_fast)
    engine.submit(batch)
    (await supervisor.next_live()).finish(1)
    await _run_out(supervisor, [batch])
    states = [s.state for s in batch.statuses]
    assert states[0] is JobState.FAILED
    assert states.count(JobState.SKIPPED) == 9_999
    assert engine.queued == engine.running == 0
    await engine.shutdown()


async def test_recovery_of_a_10000_job_chain_with_a_failed_head(tmp_path: Path) -> None:
    """The head's FAILED is on disk, the skips are not (a crash between): submit skips them."""
    store, supervisor, engine = _engine(tmp_path)
    batch = _chain(store, 10_000)
    event = JobEvent(seq=store.next_seq(batch), index=0, state=JobState.FAILED, time=time.time())
    store.append(batch, event)
    engine.submit(batch)
    assert batch.ended
    assert [s.state for s in batch.statuses].count(JobState.SKIPPED) == 9_999
    assert engine.queued == 0
    assert supervisor.started == []
    await engine.shutdown()


async def test_a_job_past_max_log_bytes_is_stopped(tmp_path: Path) -> None:
    """The fake process writes nothing: the test grows the job's stderr file itself."""
    store, supervisor, engine = _engine(tmp_path, max_log_bytes=1024)
    batch = _batch(store, "alice", "loud", "quiet")
    engine.submit(batch)
    await supervisor.next_live()
    folder = batch.job_dir(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stderr").write_bytes(b"x" * 1024)  # at the limit: allowed
    await asyncio.sleep(0.6)
    assert not batch.statuses[0].state.ended
    with open(folder / "stderr", "ab") as f:
        f.write(b"y")
    deadline = time.monotonic() + 10
    while not batch.statuses[0].state.ended:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert batch.statuses[0].state is JobState.FAILED
    assert batch.statuses[0].message == "stopped: stderr passed jobs.max_log_bytes (1 KiB)"
    await engine.shutdown()


# --- a restart: jobs taken back from their executor ---------------------------------------


async def _left_running(tmp_path: Path, *names: str) -> tuple[BatchRecord, list[FakeProcess]]:
    """A batch whose jobs started; the server then stopped with jobs.on_server_stop "keep"."""
    store, supervisor, engine = _engine(tmp_path)
    batch = _batch(store, "alice", *names)
    engine.submit(batch)
    while len(supervisor.live) < len(names):
        await asyncio.sleep(0)
    await engine.shutdown(stop_jobs=False)
    store.close()
    assert supervisor.closed == [False]
    assert [st.state for st in batch.statuses] == [JobState.RUNNING] * len(names)
    return batch, supervisor.live


async def _restarted(tmp_path: Path, supervisor: FakeExecutor) -> tuple[BatchRecord, Scheduler]:
    store = BatchStore(tmp_path)
    (batch,) = store.load()
    engine = Scheduler(store, {"local": supervisor}, JobsConfig())  # type: ignore[arg-type]
    await engine.recover([batch])
    return batch, engine


async def _ended(batch: BatchRecord) -> None:
    deadline = time.monotonic() + 10
    while not batch.ended:
        assert time.monotonic() < deadline, batch.statuses
        await asyncio.sleep(0)


async def test_a_job_still_running_after_a_restart_is_taken_back_not_run_again(
    tmp_path: Path,
) -> None:
    before, (process,) = await _left_running(tmp_path, "long")
    assert not process.ended  # "keep": the shutdown stopped nothing
    supervisor = FakeExecutor()
    supervisor.known = {f"{before.cid}-0": (1, process)}
    batch, _ = await _restarted(tmp_path, supervisor)
    assert [k.key for k in supervisor.asked] == [f"{before.cid}-0"]
    assert batch.statuses[0].state is JobState.RUNNING
    process.finish(7)
    await _ended(batch)
    assert supervisor.started == []  # never started twice
    assert batch.statuses[0].state is JobState.FAILED
    assert batch.statuses[0].message == "exited with status 7"
    assert supervisor.forgotten == [(f"{before.cid}-0", 1)]  # after the end was journaled


async def test_a_job_that_ended_while_no_server_ran_gets_its_own_result(tmp_path: Path) -> None:
    before, (process,) = await _left_running(tmp_path, "quick")
    process.finish(0)  # while no server is there: the executor keeps the result
    supervisor = FakeExecutor()
    supervisor.known = {f"{before.cid}-0": (1, process)}
    batch, _ = await _restarted(tmp_path, supervisor)
    await _ended(batch)
    assert batch.statuses[0].state is JobState.SUCCEEDED
    assert batch.statuses[0].exit_code == 0


async def test_a_job_its_executor_lost_is_lost_with_the_executors_reason(tmp_path: Path) -> None:
    await _left_running(tmp_path, "gone", "next")
    batch, _ = await _restarted(tmp_path, FakeExecutor())
    await _ended(batch)
    assert [st.state for st in batch.statuses] == [JobState.LOST, JobState.LOST]
    assert batch.statuses[0].message == "gone"


async def test_a_job_started_just_before_the_server_died_is_recorded_running(
    tmp_path: Path,
) -> None:
    """The executor started it, the journal never heard: it is not started a second time."""
    store, _, _ = _engine(tmp_path)
    before = _batch(store, "alice", "racing")
    store.close()
    process = FakeProcess(f"{before.cid}-0", 1)
    supervisor = FakeExecutor()
    supervisor.known = {f"{before.cid}-0": (1, process)}
    batch, _ = await _restarted(tmp_path, supervisor)
    assert batch.statuses[0].state is JobState.RUNNING
    assert batch.statuses[0].pid == process.pid
    process.finish(0)
    await _ended(batch)
    assert supervisor.started == []
    assert batch.statuses[0].state is JobState.SUCCEEDED
