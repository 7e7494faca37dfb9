"""Pooled job groups: sets of groups made once and lent to one job after another.

Most jobs have no limit but the default pids_max; on cgroup v1 they can be forked
straight into their groups, and a pooled set spares each of them a mkdir, an rmdir and
the path walks of a new group (CgroupBackend.create).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from jobworker.engine.cgroups.files import open_fd, pread
from jobworker.engine.cgroups.hierarchy import Hierarchy, homes_key

# Pooled groups (CgroupBackend: jobs without limits reuse them): at most this many kept free,
# and one is reused only while the memory still charged to it (page cache of files its
# jobs wrote, kernel objects) stays under this, so that the next job's peak is honest.
_POOL_MAX_FREE = 64
_POOL_MAX_LEFTOVER = 2 * 1024 * 1024


class Slot:
    """A set of job groups (one per hierarchy) lent to one job after another, with the
    files a job's start and end touch held open: joining is a write, the figures a pread.
    """

    def __init__(self, pool: Pool, name: str, groups: tuple[tuple[Hierarchy, Path], ...]):
        self.pool = pool
        self.name = name
        self.groups = groups
        self.hierarchies = [h for h, _ in groups]
        self.homes_key = homes_key(self.hierarchies)
        self.dirs = {h.kind: str(path) for h, path in groups}
        self.tasks: list[int] = []
        self.acct_all = self.acct_reset = self.peak = self.usage = self.pids = -1
        self.pids_value = b"max"  # what pids.max says (a new group's: no limit)
        try:
            for hierarchy, path in groups:
                self.tasks.append(open_fd(f"{path}/tasks", os.O_WRONLY))
                if "cpuacct" in hierarchy.names:
                    self.acct_all = open_fd(f"{path}/cpuacct.usage_all", os.O_RDONLY)
                    self.acct_reset = open_fd(f"{path}/cpuacct.usage", os.O_WRONLY)
                if hierarchy.kind == "memory":
                    self.peak = open_fd(f"{path}/memory.max_usage_in_bytes", os.O_RDWR)
                    self.usage = open_fd(f"{path}/memory.usage_in_bytes", os.O_RDONLY)
                if hierarchy.kind == "pids":
                    self.pids = open_fd(f"{path}/pids.max", os.O_WRONLY)
        except BaseException:
            self.close()
            raise

    def limit_pids(self, pids_max: int) -> None:
        """Set pids.max for the next job (0: no limit); OSError when it cannot be."""
        value = str(pids_max).encode() if pids_max else b"max"
        if self.pids >= 0 and value != self.pids_value:
            os.write(self.pids, value)
            self.pids_value = value

    def reset(self) -> bool:
        """Ready the groups for the next job: False when they should not serve one."""
        try:
            if self.usage >= 0 and int(pread(self.usage) or -1) > _POOL_MAX_LEFTOVER:
                return False  # the next job's peak would start there
            if self.peak >= 0:
                os.write(self.peak, b"0")  # v1: the peak starts again from the usage now
            if self.acct_reset >= 0:
                os.write(self.acct_reset, b"0")
        except (OSError, ValueError):
            return False
        return True

    def close(self) -> None:
        """Close the held files (the groups stay)."""
        for fd in (*self.tasks, self.acct_all, self.acct_reset, self.peak, self.usage, self.pids):
            if fd >= 0:
                os.close(fd)
        self.tasks = []
        self.acct_all = self.acct_reset = self.peak = self.usage = self.pids = -1


class Pool:
    """The free slots of a backend, most recently used first."""

    def __init__(self) -> None:
        self._free: list[Slot] = []
        self._lock = threading.Lock()  # jobs start on the loop's thread and spawn threads

    def take(self) -> Slot | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def put(self, slot: Slot) -> bool:
        """Keep `slot` for another job once reset; False when it cannot or is not wanted."""
        with self._lock:
            if len(self._free) >= _POOL_MAX_FREE:
                return False
        if not slot.reset():
            return False
        with self._lock:
            self._free.append(slot)
        return True

    def drain(self) -> list[Slot]:
        """Every free slot, taken out of the pool."""
        with self._lock:
            free, self._free = self._free, []
        return free
