"""Resource-limit backends: cgroup v2, cgroup v1 (hybrid hosts) and rlimits as the last resort."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog

from jobworker.model import Limits

_log = structlog.get_logger()
_T = TypeVar("_T")

_CGROUP_ROOT = Path("/sys/fs/cgroup")
PRLIMIT = "/usr/bin/prlimit"

# v1 hierarchies the backend uses, by the controller mounted there, and the limit each enforces.
# cpuacct enforces nothing: it counts a job's CPU time (the whole tree's, not only what
# wait4 sees); freezer tracks the job's processes and stops them for a kill.
_V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio", "freezer")
_LIMIT_OF = {"cpu": "cpu", "memory": "memory", "pids": "pids", "blkio": "io", "io": "io"}
_V2_CONTROLLERS = ("cpu", "memory", "pids", "io")

_CFS_PERIOD_US = 100_000
_CFS_MIN_QUOTA_US = 1_000
_CFS_MAX_PERIOD_US = 1_000_000

# Pooled groups (CgroupBackend: jobs without limits reuse them): at most this many kept free,
# and one is reused only while the memory still charged to it (page cache of files its
# jobs wrote, kernel objects) stays under this, so that the next job's peak is honest.
_POOL_MAX_FREE = 64
_POOL_MAX_LEFTOVER = 2 * 1024 * 1024

# Block devices that never carry a job's files: their throttles would only add noise.
_SKIPPED_BLOCK_PREFIXES = ("loop", "ram")


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """One mounted cgroup hierarchy the backend makes job groups in."""

    kind: str  # "unified" or the v1 controller name (cpu, cpuacct, memory, pids, ...)
    parent: Path  # the directory job groups are created in
    controllers: frozenset[str] = frozenset()  # limits it enforces: cpu, memory, pids, io
    mount: Path | None = None  # the hierarchy's root (where a thread's own group is found)
    names: frozenset[str] = frozenset()  # v1: every controller mounted there (cpu,cpuacct)

    @property
    def v2(self) -> bool:
        """True for the cgroup2 hierarchy."""
        return self.kind == "unified"


def _write(path: str | Path, value: str | bytes) -> None:
    """Write one value to a cgroup control file in one write(2)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode() if isinstance(value, str) else value)
    finally:
        os.close(fd)


def _read(path: str | Path, *, strict: bool = False) -> str:
    """A control file's contents, or "" when it is gone (unbuffered: read at every job end);
    `strict`: OSError instead of ""."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        if strict:
            raise
        return ""
    try:
        chunks = [os.read(fd, 65536)]
        while len(chunks[-1]) == 65536:  # a long file (cpuacct.usage_all on many CPUs)
            chunks.append(os.read(fd, 65536))
        return b"".join(chunks).decode()
    except OSError:
        if strict:
            raise
        return ""
    finally:
        os.close(fd)


def _open(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC)


def _pread(fd: int) -> str:
    """A control file's contents through an fd held open (from offset 0: read afresh); ""
    on an error. Not for cgroup.procs or tasks: v1 serves those from a list it keeps for
    a while per open file."""
    try:
        chunks = [os.pread(fd, 65536, 0)]
        while len(chunks[-1]) == 65536:
            chunks.append(os.pread(fd, 65536, 65536 * len(chunks)))
        return b"".join(chunks).decode()
    except OSError:
        return ""


def _keyed(text: str) -> dict[str, int]:
    """Parse "key value" lines (memory.events, cpu.stat, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def block_devices() -> tuple[str, ...]:
    """MAJ:MIN of every whole block device in /sys/block, loop and ram devices left out."""
    devices: list[str] = []
    with contextlib.suppress(OSError):
        for entry in sorted(Path("/sys/block").iterdir()):
            if entry.name.startswith(_SKIPPED_BLOCK_PREFIXES):
                continue
            dev = _read(entry / "dev").strip()
            if dev:
                devices.append(dev)
    return tuple(devices)


def _cfs(cpu_millis: int) -> tuple[int, int]:
    """(quota_us, period_us) for `cpu_millis` thousandths of a core."""
    period = _CFS_PERIOD_US
    quota = cpu_millis * period // 1000
    if quota < _CFS_MIN_QUOTA_US:  # below the kernel's minimum quota: stretch the period
        period = min(_CFS_MAX_PERIOD_US, _CFS_MIN_QUOTA_US * 1000 // cpu_millis)
        quota = max(_CFS_MIN_QUOTA_US, cpu_millis * period // 1000)
    return quota, period


@dataclass(eq=False)
class JobCgroup:
    """The cgroup(s) of one job: one group per hierarchy, the limits put on them."""

    key: str
    groups: tuple[tuple[Hierarchy, Path], ...] = ()
    enforced: Limits = field(default_factory=Limits)
    rlimit_args: tuple[str, ...] = ()
    unenforced: tuple[str, ...] = ()  # Limits field names of requested limits not enforced
    procs_files: tuple[Path, ...] = field(init=False)  # one per hierarchy, for a new pid
    _dirs: dict[str, str] = field(init=False, repr=False)  # kind -> group directory
    _memory_v2: bool = field(init=False, repr=False)
    _pending: list[str] | None = field(init=False, repr=False, default=None)  # not yet removed
    # The backend's keys of groups made and not yet removed (None outside a backend).
    _live: set[str] | None = field(default=None, repr=False, kw_only=True)
    # True when every group is v1 and the job has no cpu, memory or pids limit: it can be
    # born in its groups by forking from a thread moved into them (thread_joined).
    by_thread: bool = field(default=False, kw_only=True)
    # A pooled set of groups the job borrows (CgroupBackend.create); remove() gives it back.
    slot: _Slot | None = field(default=None, repr=False, kw_only=True)
    name: str = field(init=False)  # the groups' directory name: the key, or the slot's

    _empty: bool = field(init=False, repr=False, default=False)  # populated() said no
    # CPU time (ns) the forking thread spent in the groups (thread_joined): the server's,
    # not the job's, though the group's cpuacct counts it too. cpu_seconds takes it off.
    _forker_ns: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        if self.slot is not None:  # worked out once for the slot, not per job
            self.procs_files, self._dirs = self.slot.procs_files, dict(self.slot.dirs)
            self._memory_v2, self.name = False, self.slot.name
            return
        self.procs_files = tuple(path / "cgroup.procs" for _, path in self.groups)
        self._dirs = {h.kind: str(path) for h, path in self.groups}
        self._memory_v2 = any(h.v2 and "memory" in h.controllers for h, _ in self.groups)
        self.name = self.key

    def populated(self) -> bool:
        """True while a process is left in the job's tracking group (one read, at job end).

        Once it says no, it stays no without another read: nothing enters an empty group
        but by the server's own writes, and those happen only before the job starts."""
        if self._empty:
            return False
        tracker = self._dirs.get("unified") or self._dirs.get("freezer")
        if tracker is None:
            populated = bool(self.pids())
        else:
            populated = bool(_read(tracker + "/cgroup.procs").strip())
        self._empty = not populated
        return populated

    def pids(self) -> list[int]:
        """Every pid in any of the job's groups."""
        seen: set[int] = set()
        for path in self._dirs.values():
            seen.update(int(line) for line in _read(path + "/cgroup.procs").split())
        return sorted(seen)

    def kill(self) -> None:
        """SIGKILL every process of the job: cgroup.kill where there is one, else pid by pid."""
        unified = self._dirs.get("unified")
        if unified is not None:
            try:
                _write(unified + "/cgroup.kill", "1")
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
            # Never the server itself: while one of its threads forks a job, that thread is
            # in the job's groups. A group is killed only once its fork returned, but should
            # a thread ever be stranded there (spawn_thread_not_home), freezing the group
            # would freeze the server: then the pids are killed unfrozen.
            freeze = freezer is not None and me not in self.pids()
            if freeze:
                with contextlib.suppress(OSError):
                    _write(f"{freezer}/freezer.state", "FROZEN")
            pids = [pid for pid in self.pids() if pid != me]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if freeze:
                with contextlib.suppress(OSError):
                    _write(f"{freezer}/freezer.state", "THAWED")
            if not pids:
                return

    def oom_killed(self) -> bool:
        """True when the kernel OOM-killed a process of the job for its memory limit."""
        if not self.enforced.memory_bytes:  # an accounting-only group is never OOM-killed
            return False
        memory = self._dirs.get("memory")
        if memory is not None:
            return _keyed(_read(memory + "/memory.oom_control")).get("oom_kill", 0) > 0
        if self._memory_v2:
            events = _read(self._dirs["unified"] + "/memory.events")
            return _keyed(events).get("oom_kill", 0) > 0
        return False

    def memory_peak(self) -> int | None:
        """Peak memory charged to the job's group (incl. page cache), when it is accounted."""
        memory = self._dirs.get("memory")
        text = ""
        if self.slot is not None and self.slot.peak >= 0:
            text = _pread(self.slot.peak)
        elif memory is not None:
            text = _read(memory + "/memory.max_usage_in_bytes")
        elif self._memory_v2:
            text = _read(self._dirs["unified"] + "/memory.peak")
        return int(text) if text.strip().isdigit() else None

    def cpu_seconds(self) -> tuple[float, float] | None:
        """(user, system) CPU seconds of every process that ran in the group, when known."""
        unified = self._dirs.get("unified")
        if unified is not None:
            stat = _keyed(_read(unified + "/cpu.stat"))
            if "user_usec" not in stat:
                return None
            return stat["user_usec"] / 1e6, stat.get("system_usec", 0) / 1e6
        acct = next((str(p) for h, p in self.groups if "cpuacct" in h.names), None)
        if acct is None or not self._dirs:
            return None
        # "cpu user system" per CPU, in ns: one read instead of usage_user and usage_sys.
        if self.slot is not None and self.slot.acct_all >= 0:
            text = _pread(self.slot.acct_all)
        else:
            text = _read(acct + "/cpuacct.usage_all")
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

        A process the thread forks meanwhile (subprocess's vfork+exec) is born in the
        job's groups, so the job runs no instruction outside them and no join step is
        needed. Only for by_thread groups (CgroupBackend.create says why). Afterwards the
        thread goes back to the server's own group in each hierarchy (_HOMES), or to the
        hierarchy's root if that fails. OSError when the thread cannot join (it is back
        home then). The thread's CPU time in the block is kept (_forker_ns): the group's
        cpuacct counts it, and cpu_seconds() takes it off the job's figure.
        """
        # "0" is the writing thread itself. For it the kernel skips the global lock that
        # a write of a tid takes, which every fork and exit on the host also takes (read).
        me = b"0"
        slot = self.slot
        if slot is not None:
            homes = _HOMES.get(slot.hierarchies, slot.homes_key)
        else:
            homes = _HOMES.get([h for h, _ in self.groups])
        joined = 0
        try:
            if slot is not None:  # its tasks files are open already
                for fd in slot.tasks:
                    os.write(fd, me)
                    joined += 1
            else:
                for path in self._dirs.values():
                    _write(path + "/tasks", me)
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
                        _write(_mount(hierarchy) / "tasks", me)

    def remove(self) -> tuple[str, ...]:
        """Try once to remove every group not removed yet; the paths still busy (EBUSY).

        Never sleeps and never raises: it runs on the event loop at every job's end, where
        a v1 group is often still busy for a moment after its last process exited; the
        caller retries the busy ones later (Process) or uses remove_blocking (in a thread).
        A failure other than EBUSY is logged and not retried.

        A pooled slot goes back to its pool instead (emptied, its counters reset), unless
        a process is left in it or too much memory stays charged to it: then its groups
        are removed like any job's. Either way this JobCgroup is done with them: kill(),
        pids() and the figures see nothing from then on, since the slot may serve another
        job.
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


class _Slot:
    """A set of job groups (one per hierarchy) kept for reuse by jobs whose only limit is
    pids_max: made once, with the files a job's start and end touch held open
    (CgroupBackend.create).

    A job then costs no mkdir, no rmdir and no path walk: its forking thread writes "0"
    (itself) to the open `tasks` files, and the end reads the counters with pread. Between
    jobs put() resets the counters (cpuacct.usage, memory.max_usage_in_bytes); pids.max is
    written only when a job wants another value than the last one's (limit_pids).
    """

    def __init__(self, pool: _Pool, name: str, groups: tuple[tuple[Hierarchy, Path], ...]):
        self.pool = pool
        self.name = name
        self.groups = groups
        self.hierarchies = [h for h, _ in groups]
        self.homes_key = _homes_key(self.hierarchies)
        self.procs_files = tuple(path / "cgroup.procs" for _, path in groups)
        self.dirs = {h.kind: str(path) for h, path in groups}
        self.tasks: list[int] = []
        self.acct_all = self.acct_reset = self.peak = self.usage = self.pids = -1
        self.pids_value = b"max"  # what pids.max says (a new group's: no limit)
        try:
            for hierarchy, path in groups:
                self.tasks.append(_open(f"{path}/tasks", os.O_WRONLY))
                if "cpuacct" in hierarchy.names:
                    self.acct_all = _open(f"{path}/cpuacct.usage_all", os.O_RDONLY)
                    self.acct_reset = _open(f"{path}/cpuacct.usage", os.O_WRONLY)
                if hierarchy.kind == "memory":
                    self.peak = _open(f"{path}/memory.max_usage_in_bytes", os.O_RDWR)
                    self.usage = _open(f"{path}/memory.usage_in_bytes", os.O_RDONLY)
                if hierarchy.kind == "pids":
                    self.pids = _open(f"{path}/pids.max", os.O_WRONLY)
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
            if self.usage >= 0 and int(_pread(self.usage) or -1) > _POOL_MAX_LEFTOVER:
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


class _Pool:
    """The free slots of a backend, most recently used first."""

    def __init__(self) -> None:
        self._free: list[_Slot] = []
        self._lock = threading.Lock()  # jobs start on the loop's thread and spawn threads

    def take(self) -> _Slot | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def put(self, slot: _Slot) -> bool:
        """Keep `slot` for another job once reset; False when it cannot or is not wanted."""
        with self._lock:
            if len(self._free) >= _POOL_MAX_FREE:
                return False
        if not slot.reset():
            return False
        with self._lock:
            self._free.append(slot)
        return True

    def drain(self) -> list[_Slot]:
        """Every free slot, taken out of the pool."""
        with self._lock:
            free, self._free = self._free, []
        return free


class CgroupBackend:
    """Makes each job's cgroups and puts its limits on them; one per server."""

    def __init__(
        self,
        name: str,
        hierarchies: tuple[Hierarchy, ...] = (),
        *,
        rlimits: bool = False,
        devices: tuple[str, ...] = (),
    ) -> None:
        """A backend over `hierarchies`; use detect() to find what the host offers."""
        self.name = name
        self.hierarchies = hierarchies
        self.rlimits = rlimits  # prlimit is there to approximate what cgroups cannot enforce
        self.devices = devices
        # Names of the groups this server made and has not removed yet: never "stale".
        self._live: set[str] = set()
        self._lock: int | None = None  # an flock on a parent group: one server per root
        self._pool = _Pool()
        self._chosen: dict[frozenset[str], list[Hierarchy]] = {}  # _choose, by wanted limits
        self.pooling = True  # False: every job gets groups of its own, named by its key
        # Pooled groups are named pool-<this run's token>-<n>: never a name an earlier run
        # used, whose record may still name it after a crash (Engine.recover kills by it).
        self._pool_token = secrets.token_hex(4)
        self._pool_count = 0

    # ---- detection -------------------------------------------------------------------------

    @classmethod
    def detect(cls, root_name: str = "jobworker") -> CgroupBackend:
        """Probe which cgroup hierarchies work here (root, mkdir); else "none". Raises only
        CgroupRootInUse (another server holds `root_name`)."""
        rlimits = os.access(PRLIMIT, os.X_OK)
        try:
            backend = cls._probe(root_name, rlimits)
        except CgroupRootInUse:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed probe must not stop the server
            _log.warning("cgroup_probe_failed", error=repr(exc))
            backend = None
        return backend or cls("none", rlimits=rlimits)

    @classmethod
    def _probe(cls, root_name: str, rlimits: bool) -> CgroupBackend | None:
        if not root_name or "/" in root_name or root_name in (".", ".."):
            raise ValueError(f"invalid cgroup root name: {root_name!r}")
        if os.geteuid() != 0:
            return None
        mounts = _cgroup_mounts()
        own = _own_cgroups()
        hierarchies: list[Hierarchy] = []
        unified_mount = mounts.get("unified")
        if unified_mount is not None:
            available = set(_read(unified_mount / "cgroup.controllers").split())
            wanted = [c for c in _V2_CONTROLLERS if c in available]
            parent = _make_parent(unified_mount, own.get(""), root_name, wanted)
            if parent is not None:
                enabled = set(_read(parent / "cgroup.subtree_control").split())
                controllers = frozenset(_LIMIT_OF[c] for c in wanted if c in enabled)
                hierarchies.append(Hierarchy("unified", parent, controllers, unified_mount))
        used: set[Path] = set()
        for controller in _V1_CONTROLLERS:
            mount = mounts.get(controller)
            if mount is None or mount in used:  # co-mounted (cpu,cpuacct): one hierarchy
                continue
            used.add(mount)
            names = frozenset(c for c, m in mounts.items() if m == mount)
            parent = _make_parent(mount, own.get(controller), root_name, [])
            if parent is not None:
                limits = frozenset(_LIMIT_OF[c] for c in names if c in _LIMIT_OF)
                hierarchies.append(Hierarchy(controller, parent, limits, mount, names))
        if not hierarchies:
            return None
        lock = _lock_root(hierarchies[0].parent)
        v2_controllers = hierarchies[0].controllers if hierarchies[0].v2 else frozenset()
        has_v1 = any(not h.v2 for h in hierarchies)
        name = "cgroup-v2" if v2_controllers or not has_v1 else "cgroup-v1"
        backend = cls(name, tuple(hierarchies), rlimits=rlimits, devices=block_devices())
        backend._lock = lock
        return backend

    def enforceable(self) -> frozenset[str]:
        """The limits (cpu, memory, pids, io) some hierarchy enforces."""
        out: set[str] = set()
        for hierarchy in self.hierarchies:
            out |= hierarchy.controllers
        if "io" in out and not self.devices:
            out.discard("io")
        return frozenset(out)

    def describe(self) -> str:
        """One line for the startup log: the backend and the limits it enforces."""
        enforced = sorted(self.enforceable())
        if self.name == "none":
            how = "memory as a per-process address-space rlimit" if self.rlimits else "nothing"
            return f"none: no usable cgroups (needs root); enforces {how}; no tree tracking"
        groups = ", ".join(f"{h.kind}={h.parent}" for h in self.hierarchies)
        tracker = self._tracker()
        if tracker.v2:
            track, spawn = "cgroup.kill", "jobs join their groups through a shell"
        else:
            track = "freezer and SIGKILL" if tracker.kind == "freezer" else "pid-by-pid SIGKILL"
            spawn = "jobs without cpu or memory limits are forked straight into their "
            spawn += "groups (pooled and reused by jobs whose only limit is pids_max), others "
            spawn += "join through a shell"
        return (
            f"{self.name}: enforces {', '.join(enforced) or 'no limits'}; "
            f"kill via {track}; {spawn}; groups under {groups}"
        )

    def _unified(self) -> Hierarchy | None:
        return next((h for h in self.hierarchies if h.v2), None)

    def _tracker(self) -> Hierarchy:
        """The hierarchy every job has a group in, to find and kill its processes.

        cgroup2 when it carries the limits (cgroup.kill); on a v1 host the freezer, even
        when a controller-less cgroup2 is mounted too (hybrid): then every group of a job
        is v1 and the job can be forked straight into them (JobCgroup.thread_joined).
        """
        unified = self._unified()
        if unified is not None and (self.name == "cgroup-v2" or not self._v1("freezer")):
            return unified
        return self._v1("freezer") or unified or self.hierarchies[0]

    def _v1(self, name: str) -> Hierarchy | None:
        return next((h for h in self.hierarchies if not h.v2 and name in h.names), None)

    # ---- job groups --------------------------------------------------------------------------

    def create(self, key: str, limits: Limits) -> JobCgroup:
        """Make the job's group in every hierarchy it needs and apply `limits`.

        Raises OSError when a group cannot be made (nothing is left behind then).
        A limit that cannot be applied is recorded in `unenforced` and logged.
        """
        _check_key(key)
        if self.name == "none":
            return self._rlimits_only(key, limits)
        wanted = _wanted(limits)
        if self.pooling and wanted <= {"pids"} and limits.pids_max != 1:
            # No limit but pids_max (the default one) and forked in place (by_thread): a
            # pooled set of groups, with a pids group whether or not this job limits pids.
            pooled = self._choose({"pids"})
            if all(not h.v2 for h in pooled):
                return self._pooled(key, limits, pooled)
        chosen = self._choose(wanted)

        def apply(made: tuple[tuple[Hierarchy, Path], ...]) -> set[str]:
            names: set[str] = set()
            for hierarchy, path in made:
                names |= self._apply(hierarchy, path, limits, wanted)
            return names

        groups, enforced_names = self._made(key, chosen, apply)
        enforced = _only(limits, enforced_names)
        # Forked straight into its groups only when no group can stop or throttle the forking
        # thread: a cpu quota would throttle the event loop, and under a memory limit an OOM
        # during the exec may (on kernels that scan threads) pick the server. pids.max counts
        # the thread as one task for the moment it forks: no room for the job only at 1.
        # Jobs with those limits join through the shell.
        by_thread = all(not h.v2 for h, _ in groups) and not (
            enforced.cpu_millis or enforced.memory_bytes or enforced.pids_max == 1
        )
        unenforced = tuple(sorted(name for name in wanted if name not in enforced_names))
        rlimit_args: tuple[str, ...] = ()
        if "memory" in unenforced and self.rlimits:  # approximate with the address space
            rlimit_args = (f"--as={limits.memory_bytes}",)
            enforced = _with_memory(enforced, limits.memory_bytes)
            unenforced = tuple(n for n in unenforced if n != "memory")
        if unenforced:
            _log.warning("limits_not_enforced", key=key, limits=list(unenforced))
        return JobCgroup(
            key,
            groups,
            enforced,
            rlimit_args,
            _field_names(unenforced),
            _live=self._live,
            by_thread=by_thread,
        )

    def _pooled(self, key: str, limits: Limits, chosen: list[Hierarchy]) -> JobCgroup:
        """A pooled set of groups for a job whose only limit is pids_max (create)."""
        slot = self._pool.take() or self._new_slot(chosen)
        try:
            slot.limit_pids(limits.pids_max)
        except BaseException:
            slot.close()
            if JobCgroup(slot.name, slot.groups).remove_blocking(timeout=1.0):
                self._live.discard(slot.name)
            raise
        enforced = Limits()
        unenforced: tuple[str, ...] = ()
        if slot.pids >= 0:
            enforced = Limits(pids_max=limits.pids_max)
        elif limits.pids_max:  # no pids hierarchy on this host
            unenforced = ("pids_max",)
            _log.warning("limits_not_enforced", key=key, limits=["pids"])
        return JobCgroup(
            key, slot.groups, enforced, (), unenforced, _live=self._live, by_thread=True, slot=slot
        )

    def _new_slot(self, chosen: list[Hierarchy]) -> _Slot:
        """Make a set of groups for the pool; OSError when one cannot be made (none left)."""
        with self._pool._lock:
            self._pool_count += 1
            name = f"pool-{self._pool_token}-{self._pool_count}"
        _, slot = self._made(name, chosen, lambda made: _Slot(self._pool, name, made))
        return slot

    def _made(
        self,
        name: str,
        chosen: list[Hierarchy],
        fill: Callable[[tuple[tuple[Hierarchy, Path], ...]], _T],
    ) -> tuple[tuple[tuple[Hierarchy, Path], ...], _T]:
        """Make group `name` in every hierarchy of `chosen` and hand them to `fill`; when
        either fails, remove what was made (nothing joined it: never busy, so at once) and
        raise. The name counts as this server's (never stale) from the first mkdir."""
        added = name not in self._live
        self._live.add(name)
        made: list[tuple[Hierarchy, Path]] = []
        try:
            for hierarchy in chosen:
                path = hierarchy.parent / name
                os.mkdir(path)
                made.append((hierarchy, path))
            groups = tuple(made)
            return groups, fill(groups)
        except BaseException:
            JobCgroup(name, tuple(made)).remove_blocking()
            if added:
                self._live.discard(name)
            raise

    def _rlimits_only(self, key: str, limits: Limits) -> JobCgroup:
        wanted = _wanted(limits)
        args: tuple[str, ...] = ()
        enforced = Limits()
        if "memory" in wanted and self.rlimits:
            args = (f"--as={limits.memory_bytes}",)
            enforced = Limits(memory_bytes=limits.memory_bytes)
        unenforced = tuple(sorted(w for w in wanted if not (w == "memory" and args)))
        if unenforced:
            _log.warning("limits_not_enforced", key=key, limits=list(unenforced))
        return JobCgroup(key, (), enforced, args, _field_names(unenforced))

    def _choose(self, wanted: set[str]) -> list[Hierarchy]:
        """The tracking hierarchy plus, per wanted limit, the first one that enforces it
        (worked out once per set of limits: the hierarchies never change)."""
        key = frozenset(wanted)
        chosen = self._chosen.get(key)
        if chosen is None:
            chosen = self._chosen[key] = self._choose_anew(wanted)
        return list(chosen)

    def _choose_anew(self, wanted: set[str]) -> list[Hierarchy]:
        tracker = self._tracker()
        chosen = [tracker]
        # Memory is always accounted where it can be: wait4's max RSS of a child starts at
        # the server's own (see process.py), so the group's peak is the only honest figure.
        for name in sorted(wanted | {"memory"}):
            if any(name in h.controllers for h in chosen):
                continue
            match = next((h for h in self.hierarchies if name in h.controllers), None)
            if match is not None:
                chosen.append(match)
        # So is CPU time (cgroup2's cpu.stat is always there): it counts the whole tree. On
        # v1 only where cpuacct is mounted on its own: co-mounted with cpu, a group of its
        # own would also change the job's CPU weight (it would leave the server's cpu group).
        acct = self._v1("cpuacct")
        if not tracker.v2 and acct is not None and acct not in chosen and "cpu" not in acct.names:
            chosen.append(acct)
        return chosen

    def _apply(
        self, hierarchy: Hierarchy, path: Path, limits: Limits, wanted: set[str]
    ) -> set[str]:
        """Write the limits `hierarchy` enforces into `path`; the names that took."""
        done: set[str] = set()
        for name in sorted(wanted & hierarchy.controllers):
            writes = _limit_writes(name, hierarchy.v2, limits, self.devices)
            try:
                for file, value in writes:
                    if file.startswith("?"):  # best effort: absent on some kernels
                        with contextlib.suppress(OSError):
                            _write(path / file[1:], value)
                        continue
                    _write(path / file, value)
            except OSError as exc:
                _log.warning("limit_write_failed", path=str(path), limit=name, error=str(exc))
                continue
            if writes:
                done.add(name)
        return done

    def open(self, key: str) -> JobCgroup | None:
        """The existing groups of job `key` (after a restart), or None when there are none."""
        _check_key(key)
        groups = tuple((h, h.parent / key) for h in self.hierarchies if (h.parent / key).is_dir())
        return JobCgroup(key, groups, _live=self._live) if groups else None

    def cleanup_stale(self) -> int:
        """Remove job groups left by an earlier run that are empty; the number of jobs cleaned.

        Groups this backend made are skipped: an empty one may belong to a job whose join
        shell has not joined yet. Sleeps while a group is busy (remove_blocking).
        """
        keys: set[str] = set()
        for hierarchy in self.hierarchies:
            with contextlib.suppress(OSError):
                keys.update(p.name for p in hierarchy.parent.iterdir() if p.is_dir())
        removed = 0
        for key in sorted(keys - self._live):
            group = self.open(key)
            if group is None:
                continue
            if group.pids():
                _log.warning("stale_cgroup_busy", key=key, pids=group.pids())
                continue
            group.remove_blocking()
            if self.open(key) is None:
                removed += 1
        return removed

    def drop_pool(self) -> None:
        """Forget the free pooled groups: closed, and removed where they are still there
        (empty groups: never busy). For when a pooled group was found gone (removed from
        outside the server): the others may be gone too, and new ones are made instead."""
        for slot in self._pool.drain():
            slot.close()
            if JobCgroup(slot.name, slot.groups).remove_blocking(timeout=1.0):
                self._live.discard(slot.name)

    def close(self) -> None:
        """At shutdown: remove the pooled groups, then this server's parent groups if no job
        group is left in them. Sleeps while a group is busy (run it in a thread)."""
        self.drop_pool()
        # A slot never given back (a bug) must not keep the parents: removed when empty.
        for name in sorted(n for n in self._live if n.startswith("pool-")):
            group = self.open(name)
            if group is not None and not group.pids():
                _log.warning("cgroup_pool_slot_not_returned", name=name)
                group.remove_blocking(timeout=1.0)
        for hierarchy in self.hierarchies:
            with contextlib.suppress(OSError):
                hierarchy.parent.rmdir()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


class CgroupRootInUse(OSError):
    """Another server makes its job groups under the same cgroup_root."""


def _lock_root(parent: Path) -> int:
    """An flock on a parent group, held while the server runs: two servers on one
    cgroup_root would take each other's groups for stale ones and remove them."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CgroupRootInUse(
            f"cgroup_root {parent.name!r} is in use by another jobworker server "
            f"({parent}); give each server its own server.cgroup_root"
        ) from None
    return fd


def _mount(hierarchy: Hierarchy) -> Path:
    return hierarchy.mount or hierarchy.parent.parent


class _Homes:
    """Open `tasks` files of the server's own group in each v1 hierarchy, where a thread
    that forked a job goes back to (JobCgroup.thread_joined).

    Kept open, so that going home needs no new file descriptor (EMFILE cannot strand a
    thread in a job's group) and no path walk; /proc/self/cgroup (the main thread's
    groups: ~35 us to read) is read again at most once a second, so a server moved to
    other groups (by an administrator, systemd) sends its threads home there soon after.
    """

    REFRESH = 1.0  # seconds

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._own: dict[str, str] = {}
        self._read_at = float("-inf")
        self._fds: dict[Path, tuple[str, int]] = {}  # mount -> (the group, an fd of its tasks)
        # The last answer per list of hierarchies (_homes_key), good until the next read of
        # /proc.
        self._answers: dict[tuple[tuple[frozenset[str], Path], ...], list[int]] = {}

    def get(
        self,
        hierarchies: list[Hierarchy],
        key: tuple[tuple[frozenset[str], Path], ...] | None = None,
    ) -> list[int]:
        """An fd per hierarchy; OSError when one cannot be opened (nothing joined yet).
        `key`: _homes_key(hierarchies), when the caller keeps it."""
        if key is None:
            key = _homes_key(hierarchies)
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self.REFRESH:
                self._own = _own_cgroups(strict=True)
                self._read_at = now
                self._answers.clear()
            answer = self._answers.get(key)
            if answer is None:
                answer = self._answers[key] = self._fds_for(hierarchies)
            return answer

    def _fds_for(self, hierarchies: list[Hierarchy]) -> list[int]:
        """get() without the memo (the lock held)."""
        fds = []
        for hierarchy in hierarchies:
            group = next((self._own[n] for n in hierarchy.names if n in self._own), "/")
            mount = _mount(hierarchy)
            held = self._fds.get(mount)
            if held is None or held[0] != group:
                # A replaced fd stays open: another thread may be on its way home with
                # it, and a reused fd number would take the thread somewhere else.
                held = self._fds[mount] = (group, _open_home(mount, group))
            fds.append(held[1])
        return fds


_HOMES = _Homes()


def _homes_key(hierarchies: list[Hierarchy]) -> tuple[tuple[frozenset[str], Path], ...]:
    """What a thread's way home in each of `hierarchies` depends on: the controllers there
    and the mount. (Not the Hierarchy values: hashing those dataclasses costs ~2 us each,
    and this is looked up at every job's fork.)"""
    return tuple((h.names, _mount(h)) for h in hierarchies)


def _open_home(mount: Path, group: str) -> int:
    """An fd for the `tasks` file of `group` under `mount` (the root's when that group is
    gone); OSError when neither opens."""
    try:
        return os.open(f"{mount}{group.rstrip('/')}/tasks", os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return os.open(f"{mount}/tasks", os.O_WRONLY | os.O_CLOEXEC)


def _check_key(key: str) -> None:
    if not key or "/" in key or key in (".", "..") or "\0" in key:
        raise ValueError(f"invalid cgroup key: {key!r}")


def _wanted(limits: Limits) -> set[str]:
    wanted: set[str] = set()
    if limits.cpu_millis:
        wanted.add("cpu")
    if limits.memory_bytes:
        wanted.add("memory")
    if limits.pids_max:
        wanted.add("pids")
    if limits.io_read_bytes_per_second or limits.io_write_bytes_per_second:
        wanted.add("io")
    return wanted


def _only(limits: Limits, names: set[str]) -> Limits:
    """`limits` with the fields of limits not in `names` zeroed."""
    io = "io" in names
    return Limits(
        cpu_millis=limits.cpu_millis if "cpu" in names else 0,
        memory_bytes=limits.memory_bytes if "memory" in names else 0,
        pids_max=limits.pids_max if "pids" in names else 0,
        io_read_bytes_per_second=limits.io_read_bytes_per_second if io else 0,
        io_write_bytes_per_second=limits.io_write_bytes_per_second if io else 0,
    )


def _with_memory(limits: Limits, memory_bytes: int) -> Limits:
    return Limits(
        cpu_millis=limits.cpu_millis,
        memory_bytes=memory_bytes,
        pids_max=limits.pids_max,
        io_read_bytes_per_second=limits.io_read_bytes_per_second,
        io_write_bytes_per_second=limits.io_write_bytes_per_second,
    )


_FIELDS = {
    "cpu": ("cpu_millis",),
    "memory": ("memory_bytes",),
    "pids": ("pids_max",),
    "io": ("io_read_bytes_per_second", "io_write_bytes_per_second"),
}


def _field_names(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f for name in names for f in _FIELDS[name])


def _limit_writes(
    name: str, v2: bool, limits: Limits, devices: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(file, value) pairs that set limit `name`; a file starting with "?" may be missing."""
    if name == "cpu":
        quota, period = _cfs(limits.cpu_millis)
        if v2:
            return [("cpu.max", f"{quota} {period}")]
        return [("cpu.cfs_period_us", str(period)), ("cpu.cfs_quota_us", str(quota))]
    if name == "memory":
        memory = str(limits.memory_bytes)
        if v2:  # no swap: past the limit is an OOM kill, not a slow crawl through swap
            return [("memory.max", memory), ("?memory.swap.max", "0")]
        return [
            ("memory.limit_in_bytes", memory),
            ("?memory.memsw.limit_in_bytes", memory),
            ("?memory.swappiness", "0"),
        ]
    if name == "pids":
        return [("pids.max", str(limits.pids_max))]
    return _io_writes(v2, limits, devices)


def _io_writes(v2: bool, limits: Limits, devices: tuple[str, ...]) -> list[tuple[str, str]]:
    """io.max lines (v2) or blkio throttle lines (v1), one per block device."""
    read, write = limits.io_read_bytes_per_second, limits.io_write_bytes_per_second
    if v2:
        parts = (f"rbps={read}" if read else "", f"wbps={write}" if write else "")
        value = " ".join(p for p in parts if p)
        return [("io.max", f"{dev} {value}") for dev in devices]
    writes: list[tuple[str, str]] = []
    for dev in devices:
        if read:
            writes.append(("blkio.throttle.read_bps_device", f"{dev} {read}"))
        if write:
            writes.append(("blkio.throttle.write_bps_device", f"{dev} {write}"))
    return writes


def _cgroup_mounts() -> dict[str, Path]:
    """Mount points by controller ("unified" for cgroup2), from /proc/self/mountinfo."""
    mounts: dict[str, Path] = {}
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3 or fields[3] != "/":
            continue  # a bind of a sub-group: not a hierarchy root we can manage
        point = Path(fields[4])
        if rest[0] == "cgroup2":
            mounts.setdefault("unified", point)
        elif rest[0] == "cgroup":
            for option in rest[2].split(","):
                if option in _V1_CONTROLLERS:
                    mounts.setdefault(option, point)
    return mounts


def _own_cgroups(*, strict: bool = False) -> dict[str, str]:
    """This process's group per controller ("" for cgroup2), from /proc/self/cgroup (the
    main thread's); `strict`: OSError when it cannot be read, else {}."""
    own: dict[str, str] = {}
    text = _read("/proc/self/cgroup", strict=strict)
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _make_parent(mount: Path, own: str | None, root_name: str, enable: list[str]) -> Path | None:
    """The parent of job groups in one hierarchy: under its root, else under our own group."""
    candidates = [mount]
    if own and own != "/":
        candidates.append(mount / own.lstrip("/"))
    for base in candidates:
        parent = base / root_name
        try:
            if enable:  # cgroup2: the parent's children may only use what it enables
                _enable(base, enable)
            parent.mkdir(exist_ok=True)
            if enable:
                _enable(parent, enable)
            probe = parent / f".probe-{os.getpid()}"
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            _log.debug("cgroup_parent_unusable", path=str(parent), error=str(exc))
            continue
        return parent
    return None


def _enable(group: Path, controllers: list[str]) -> None:
    """Enable `controllers` for the children of a cgroup2 group, as far as it lets us."""
    for controller in controllers:
        with contextlib.suppress(OSError):
            _write(group / "cgroup.subtree_control", f"+{controller}")
