"""An executor that starts jobs in the test's own process, through the spawner the job
supervisor uses: the scheduler's tests with real processes, without a supervisor process
(that one is tested end to end in tests/integration/test_supervisor.py)."""

from __future__ import annotations

from collections.abc import Sequence

from jobworker.engine.executor import ExitInfo, Handle, Known, Launch
from jobworker.engine.running import Process
from jobworker.engine.spawn import Spawner


class DirectJob:
    """A Process seen as a Handle."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.pid, self.pid_start = process.pid, process.pid_start
        self.start_time = process.start_time
        self.cgroup = process.cgroup.name if process.cgroup.slot is not None else ""
        self.node = ""

    @property
    def ended(self) -> bool:
        return self.process.ended

    async def wait(self) -> ExitInfo:
        return await self.process.wait()

    async def stop(self, grace: float) -> ExitInfo:
        return await self.process.stop(grace)

    def kill(self) -> None:
        self.process.kill()


class DirectExecutor:
    name = "local"

    def __init__(self, spawner: Spawner) -> None:
        self.spawner = spawner

    async def start(self, launch: Launch) -> Handle:
        process = await self.spawner.spawn(
            launch.spec,
            launch.limits,
            launch.job_dir,
            launch.key,
            launch.user,
            stdin_file=launch.stdin_file,
        )
        return DirectJob(process)

    async def ready(self) -> None:
        pass

    async def recover(self, known: Sequence[Known]) -> dict[str, tuple[int, Handle | ExitInfo]]:
        return {}

    def forget(self, key: str, attempt: int) -> None:
        pass

    async def close(self, *, stop_jobs: bool) -> None:
        await self.spawner.drain()
        self.spawner.close()
