"""What the scheduler asks of whatever runs a job: start it, stop it, learn how it ended.

Two executors stand behind this interface: the local one (jobs on this host, through the
job supervisor process, jobworker/supervisor/) and the Ray one (jobs as tasks on a Ray
cluster). The scheduler and its parts (engine/scheduler.py, jobrun.py, recovery.py) know
only these types.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from jobworker.model import JobSpec, Limits, Usage


class SpawnError(Exception):
    """A job could not be started; the message names the path or resource at fault."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ExecutorUnavailable(SpawnError):
    """The executor cannot start jobs now (its cluster cannot be reached): the server
    answers UNAVAILABLE with the message, which names the cluster's address."""


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a job's main process ended, with the job's resource usage.

    `lost`: not "" when nothing recorded how it ended (its executor died with it, a
    cluster node was lost); the job is then LOST with this message.
    """

    exit_code: int | None  # None when killed by a signal
    signal: int
    usage: Usage
    end_time: float
    oom_killed: bool
    lost: str = ""


@dataclass(frozen=True, slots=True)
class Launch:
    """One attempt of one job, as the scheduler hands it to an executor."""

    key: str  # "<correlation id>-<index>": unique per job, names its cgroup
    attempt: int  # 1 for the first
    spec: JobSpec
    limits: Limits  # the spec's, over the configured defaults
    job_dir: Path  # its stdout and stderr files go here, appended
    user: str  # the Unix user it runs as ("": the server's own)
    stdin_file: bool  # False: the job's folder holds no stdin file (it reads /dev/null)


@dataclass(frozen=True, slots=True)
class Known:
    """A job the journal says was started (or may have been) before a restart."""

    key: str
    attempt: int
    pid: int = 0
    pid_start: int = 0
    cgroup: str = ""
    node: str = ""


class Handle(Protocol):
    """A started job: where it runs, and its single end."""

    @property
    def pid(self) -> int: ...
    @property
    def pid_start(self) -> int: ...  # /proc start ticks: tells a reused pid from the job's
    @property
    def start_time(self) -> float: ...
    @property
    def cgroup(self) -> str: ...  # the group's name to record when not named by key, else ""
    @property
    def node(self) -> str: ...  # the cluster node it runs on; "" on this host
    @property
    def ended(self) -> bool: ...

    async def wait(self) -> ExitInfo:
        """The job's end, once nothing of it is left; the same result for every caller."""
        ...

    async def stop(self, grace: float) -> ExitInfo:
        """SIGTERM its process tree; after `grace` seconds SIGKILL whatever is left."""
        ...

    def kill(self) -> None:
        """SIGKILL its whole process tree now."""
        ...


class Executor(Protocol):
    """Runs jobs. start() raises SpawnError for a job that cannot start."""

    name: str

    async def start(self, launch: Launch) -> Handle: ...

    async def ready(self) -> None:
        """ExecutorUnavailable when it cannot start jobs now (a cluster out of reach)."""
        ...

    async def recover(self, known: Sequence[Known]) -> dict[str, tuple[int, Handle | ExitInfo]]:
        """After a server restart: by key, (attempt, handle) for every job this executor
        still knows of, running or ended (then its handle has ended), whether listed in
        `known` or not (started just before the server died: not journaled yet); and for
        each listed one it does not know, its leftovers killed and an ExitInfo with `lost`."""
        ...

    def forget(self, key: str, attempt: int) -> None:
        """The job's end is recorded: the executor need not keep it for a restart."""
        ...

    async def close(self, *, stop_jobs: bool) -> None:
        """At shutdown, once the scheduler has stopped starting jobs. `stop_jobs`: False
        leaves running jobs running for the next server (jobs.on_server_stop = "keep")."""
        ...
