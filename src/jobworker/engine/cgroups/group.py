"""One job's cgroups: its processes (found, counted, killed), its usage, their removal.

A JobCgroup is what the spawner and the running Process hold of a job's groups; the
backend makes it (CgroupBackend.create), and after a restart finds it again by the job's
key (CgroupBackend.open).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from jobworker.engine.cgroups.files import keyed, pread, read, write
from jobworker.engine.cgroups.hierarchy import Hierarchy, Homes, mount_of
from jobworker.engine.cgroups.pool import Slot
from jobworker.model import Limits

_log = structlog.get_logger()


@dataclass(eq=False, slots=True)
class JobCgroup:
    """The cgroup(s) of one job: one group per hierarchy, the limits put on them."""

    key: str
    groups: tuple[tuple[Hierarchy, Path], ...] = ()
    enforced: Limits = field(default_factory=Limits)
    rlimit_args: tuple[str, ...] = ()
    unenforced: tuple[str, ...] = ()  # Limits field names of requested limits not enforced
    _dirs: dict[str, str] = field(init=False, repr=False)  # kind -> group directory
    _memory_v2: bool = field(init=False, repr=False)
    _pending: list[str] | None = field(init=False, repr=False, default=None)  # not yet removed
    # The backend's keys of groups made and not yet removed (None outside a backend).
    _live: set[str] | None = field(default=None, repr=False, kw_only=True)
    # True when every group is v1 and no limit can throttle or OOM-kill the forking thread
    # (CgroupBackend.create): the job is born in its groups (thread_joined).
    by_thread: bool = field(default=False, kw_only=True)
    # A pooled set of groups the job borrows (CgroupBackend.create); remove() gives it back.
    slot: Slot | None = field(default=None, repr=False, kw_only=True)
    # The backend's way back to this process's own groups, for by_thread groups.
    homes: Homes | None = field(default=None, repr=False, kw_only=True)
    name: str = field(init=False)  # the groups' directory name: the key, or the slot's

    _empty: bool = field(init=False, repr=False, default=False)  # populated() said no
    # CPU time (ns) the forking thread spent in the groups (thread_joined): ours, not the
    # job's, though the group's cpuacct counts it too. cpu_seconds takes it off.
    _forker_ns: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        if self.slot is not None:  # worked out once for the slot, not per job
            self._dirs = self.slot.dirs  # read-only
            self._memory_v2, self.name = False, self.slot.name
            return
        self._dirs = {h.kind: str(path) for h, path in self.groups}
        self._memory_v2 = any(h.v2 and "memory" in h.controllers for h, _ in self.groups)
        self.name = self.key

    @property
    def procs_files(self) -> tuple[Path, ...]:
        """One cgroup.procs file per hierarchy, for a new pid (made when asked: a running
        job keeps no copy)."""
        return tuple(path / "cgroup.procs" for _, path in self.groups)

    def populated(self) -> bool:
        """True while a process is left in the job's tracking group (one read, at job end).

        Once it says no, it stays no without another read: nothing enters an empty group
        but by our own writes, and those happen only before the job starts."""
        if self._empty:
            return False
        tracker = self._dirs.get("unified") or self._dirs.get("freezer")
        if tracker is None:
            populated = bool(self.pids())
        else:
            populated = bool(read(tracker + "/cgroup.procs").strip())
        self._empty = not populated
        return populated

    def pids(self) -> list[int]:
        """Every pid in any of the job's groups."""
        seen: set[int] = set()
        for path in self._dirs.values():
            seen.update(int(line) for line in read(path + "/cgroup.procs").split())
        return sorted(seen)

    def kill(self) -> None:
        """SIGKILL every process of the job: cgroup.kill where there is one, else pid by pid."""
        unified = self._dirs.get("unified")
        if unified is not None:
            try:
                write(unified + "/cgroup.kill", "1")
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    _log.warning("cgroup_kill_failed", key=self.key, error=str(exc))
            else:
                return
        self._kill_one_by_one()

    def _kill_one_by_one(self) -> None:
        """Freeze (when the freezer is there), SIGKILL each pid, thaw; a few rounds for forkers."""
        freezer = self._dirs.get("freezer")
        me = os.getpid()
        for _ in range(10):
            # Never this process: a thread stranded in the job's groups after its fork
            # (spawn_thread_not_home) would freeze us with them, so then none is frozen.
            freeze = freezer is not None and me not in self.pids()
            if freeze:
                with contextlib.suppress(OSError):
                    write(f"{freezer}/freezer.state", "FROZEN")
            pids = [pid for pid in self.pids() if pid != me]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if freeze:
                with contextlib.suppress(OSError):
                    write(f"{freezer}/freezer.state", "THAWED")
            if not pids:
                return

    def oom_killed(self) -> bool:
        """True when the kernel OOM-killed a process of the job for its memory limit."""
        if not self.enforced.memory_bytes:  # an accounting-only group is never OOM-killed
            return False
        memory = self._dirs.get("memory")
        if memory is not None:
            return keyed(read(memory + "/memory.oom_control")).get("oom_kill", 0) > 0
        if self._memory_v2:
            events = read(self._dirs["unified"] + "/memory.events")
            return keyed(events).get("oom_kill", 0) > 0
        return False

    def memory_peak(self) -> int | None:
        """Peak memory charged to the job's group (incl. page cache), when it is accounted."""
        memory = self._dirs.get("memory")
        text = ""
        if self.slot is not None and self.slot.peak >= 0:
            text = pread(self.slot.peak)
        elif memory is not None:
            text = read(memory + "/memory.max_usage_in_bytes")
        elif self._memory_v2:
            text = read(self._dirs["unified"] + "/memory.peak")
        return int(text) if text.strip().isdigit() else None

    def cpu_seconds(self) -> tuple[float, float] | None:
        """(user, system) CPU seconds of every process that ran in the group, when known."""
        unified = self._dirs.get("unified")
        if unified is not None:
            stat = keyed(read(unified + "/cpu.stat"))
            if "user_usec" not in stat:
                return None
            return stat["user_usec"] / 1e6, stat.get("system_usec", 0) / 1e6
        acct = next((str(p) for h, p in self.groups if "cpuacct" in h.names), None)
        if acct is None or not self._dirs:
            return None
        # "cpu user system" per CPU, in ns: one read instead of usage_user and usage_sys.
        if self.slot is not None and self.slot.acct_all >= 0:
            text = pread(self.slot.acct_all)
        else:
            text = read(acct + "/cpuacct.usage_all")
        user, system = 0, 0
        if not text:
            return None
        try:
            for line in text.splitlines()[1:]:
                _, u, s = line.split()
                user, system = user + int(u), system + int(s)
        except ValueError:
            return None
        total = user + system
        if self._forker_ns and total:  # the forking thread's share: off both, in proportion
            keep = max(0, total - self._forker_ns) / total
            user, system = round(user * keep), round(system * keep)
        return user / 1e9, system / 1e9

    @contextlib.contextmanager
    def thread_joined(self) -> Iterator[None]:
        """Move the calling thread, and only it, into the job's (v1) groups for the block.

        A child forked meanwhile is born in the job's groups: no join step. Afterwards the
        thread goes back home (`homes`), else to the hierarchy's root. OSError when it
        cannot join (it is back home then) or has no `homes`. Its CPU time in the block
        goes to _forker_ns, which cpu_seconds() takes off the job's figure.
        """
        # "0" is the writing thread itself: the kernel then skips the global lock a write
        # of a tid takes, which every fork and exit on the host takes too.
        me = b"0"
        slot, way_home = self.slot, self.homes
        if way_home is None:
            raise OSError(errno.EINVAL, f"no way home from the groups of {self.key}")
        if slot is not None:
            homes = way_home.get(slot.hierarchies, slot.homes_key)
        else:
            homes = way_home.get([h for h, _ in self.groups])
        joined = 0
        try:
            if slot is not None:  # its tasks files are open already
                for fd in slot.tasks:
                    os.write(fd, me)
                    joined += 1
            else:
                for path in self._dirs.values():
                    write(path + "/tasks", me)
                    joined += 1
            started = time.thread_time_ns()
            try:
                yield
            finally:
                self._forker_ns += time.thread_time_ns() - started
        finally:
            for (hierarchy, _), home in zip(self.groups[:joined], homes, strict=False):
                try:
                    os.write(home, me)
                except OSError as exc:  # the group went away meanwhile: the root then
                    _log.error("spawn_thread_not_home", kind=hierarchy.kind, error=str(exc))
                    with contextlib.suppress(OSError):
                        write(mount_of(hierarchy) / "tasks", me)

    def remove(self) -> tuple[str, ...]:
        """Try once to remove every group not removed yet; the paths still busy (EBUSY).

        Never sleeps nor raises, since it runs on the event loop at every job's end: the
        caller retries busy groups (Process) or uses remove_blocking; other errors are
        logged. A reusable pooled slot goes back to its pool instead; either way this
        JobCgroup sees nothing of the groups afterwards (another job may hold them).
        """
        if self.slot is not None:
            slot, self.slot = self.slot, None
            if not self.populated() and slot.pool.put(slot):
                self._dirs, self._pending = {}, []
                return ()
            slot.close()  # removed below, like any job's groups
        pending = self._pending if self._pending is not None else list(self._dirs.values())
        left: list[str] = []
        for path in pending:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    left.append(path)
                else:
                    _log.warning("cgroup_remove_failed", path=path, error=str(exc))
        self._pending = left
        if not left and self._live is not None:
            self._live.discard(self.name)
        return tuple(left)

    def remove_blocking(self, timeout: float = 0.2) -> bool:
        """remove(), retried every 5 ms while groups are busy, up to `timeout` seconds.

        Sleeps: only for threads (kill_stale, cleanup_stale) or groups that cannot be busy.
        True when every group is gone; else logs cgroup_remove_failed.
        """
        deadline = time.monotonic() + timeout
        while busy := self.remove():
            if time.monotonic() >= deadline:
                _log.warning("cgroup_remove_failed", paths=list(busy), error="busy")
                return False
            time.sleep(0.005)
        return True
