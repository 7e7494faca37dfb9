"""The engine on a real store and real processes, without a server (no cgroups: "none")."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from jobworker.config import JobsConfig
from jobworker.engine.limits import CgroupBackend
from jobworker.engine.process import Supervisor
from jobworker.engine.scheduler import Engine
from jobworker.model import BatchOptions, JobEvent, JobSpec, JobState
from jobworker.store.batches import BatchRecord, BatchStore


async def test_a_job_that_exits_in_its_deadlines_loop_turn_keeps_its_own_result(
    tmp_path: Path,
) -> None:
    """The job exits well within its timeout, but the event loop is held up past the
    deadline: its exit and its timer then come due in the same loop turn. The exit was
    first, so the job succeeded; it must not be recorded TIMED_OUT."""
    store = BatchStore(tmp_path)
    supervisor = Supervisor(CgroupBackend("none"))

    def hold_the_loop(batch: BatchRecord, event: JobEvent) -> None:
        if event.state is JobState.RUNNING:  # once the job's timer is set, block the loop:
            # meanwhile `true` exits and the 0.2 s deadline passes
            asyncio.get_running_loop().call_soon(time.sleep, 0.5)

    engine = Engine(store, supervisor, JobsConfig(), listeners=[hold_the_loop])
    spec = JobSpec("quick", ("true",), timeout=0.2)
    batch = store.create("alice", BatchOptions(), (spec,))
    engine.submit(batch)
    deadline = time.monotonic() + 10
    while not batch.statuses[0].state.ended:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await engine.shutdown()
    supervisor.close()
    store.close()
    assert batch.statuses[0].state is JobState.SUCCEEDED, batch.statuses[0]
    assert batch.statuses[0].exit_code == 0
