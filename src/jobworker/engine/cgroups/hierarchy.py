"""The host's cgroup hierarchies: where they are mounted, this process's own groups in them,
the parent groups job groups are made in, and the lock that keeps that parent one server's.

Found once at startup (find_hierarchies); a Homes keeps open this process's own `tasks`
files, where a thread that forked a job goes back to.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from jobworker.engine.cgroups.files import read, write

_log = structlog.get_logger()

# v1 hierarchies the backend uses, by the controller mounted there, and the limit each enforces.
# cpuacct enforces nothing: it counts a job's CPU time (the whole tree's, not only what
# wait4 sees); freezer tracks the job's processes and stops them for a kill.
_V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio", "freezer")
_LIMIT_OF = {"cpu": "cpu", "memory": "memory", "pids": "pids", "blkio": "io", "io": "io"}
_V2_CONTROLLERS = ("cpu", "memory", "pids", "io")


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


class CgroupRootInUse(OSError):
    """Another server makes its job groups under the same cgroup_root."""


def lock_root(parent: Path) -> int:
    """An flock on a parent group, held by the job supervisor while it runs: two servers
    on one cgroup_root would take each other's groups for stale ones and remove them."""
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


def mount_of(hierarchy: Hierarchy) -> Path:
    """The hierarchy's root: its mount point (else the parent's parent, for one made by hand)."""
    return hierarchy.mount or hierarchy.parent.parent


class Homes:
    """Open `tasks` files of this process's own group in each v1 hierarchy, where a thread
    that forked a job goes back to (JobCgroup.thread_joined).

    Kept open, so that EMFILE cannot strand a thread in a job's group; /proc/self/cgroup is
    read again at most once a second, so a process moved to other groups follows soon.
    """

    REFRESH = 1.0  # seconds

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._own: dict[str, str] = {}
        self._read_at = float("-inf")
        self._fds: dict[Path, tuple[str, int]] = {}  # mount -> (the group, an fd of its tasks)
        self._replaced: list[int] = []  # fds of groups this process was moved out of
        # The last answer per list of hierarchies (homes_key), good until the next read of
        # /proc.
        self._answers: dict[tuple[tuple[frozenset[str], Path], ...], list[int]] = {}

    def get(
        self,
        hierarchies: list[Hierarchy],
        key: tuple[tuple[frozenset[str], Path], ...] | None = None,
    ) -> list[int]:
        """An fd per hierarchy; OSError when one cannot be opened (nothing joined yet).
        `key`: homes_key(hierarchies), when the caller keeps it."""
        if key is None:
            key = homes_key(hierarchies)
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
            mount = mount_of(hierarchy)
            held = self._fds.get(mount)
            if held is None or held[0] != group:
                # A replaced fd stays open: another thread may be on its way home with
                # it, and a reused fd number would take the thread somewhere else.
                if held is not None:
                    self._replaced.append(held[1])
                held = self._fds[mount] = (group, _open_home(mount, group))
            fds.append(held[1])
        return fds

    def close(self) -> None:
        """Close every fd held (at shutdown, once no thread forks a job any more)."""
        with self._lock:
            for fd in [*self._replaced, *(fd for _, fd in self._fds.values())]:
                os.close(fd)
            self._replaced, self._fds = [], {}
            self._answers.clear()
            self._read_at = float("-inf")


def homes_key(hierarchies: list[Hierarchy]) -> tuple[tuple[frozenset[str], Path], ...]:
    """What a thread's way home in each of `hierarchies` depends on: the controllers there
    and the mount: cheaper to hash than the Hierarchy values, at every job's fork."""
    return tuple((h.names, mount_of(h)) for h in hierarchies)


def _open_home(mount: Path, group: str) -> int:
    """An fd for the `tasks` file of `group` under `mount` (the root's when that group is
    gone); OSError when neither opens."""
    try:
        return os.open(f"{mount}{group.rstrip('/')}/tasks", os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return os.open(f"{mount}/tasks", os.O_WRONLY | os.O_CLOEXEC)


def _cgroup_mounts() -> dict[str, Path]:
    """Mount points by controller ("unified" for cgroup2), from /proc/self/mountinfo."""
    mounts: dict[str, Path] = {}
    for line in read(Path("/proc/self/mountinfo")).splitlines():
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
    text = read("/proc/self/cgroup", strict=strict)
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
            write(group / "cgroup.subtree_control", f"+{controller}")


def find_hierarchies(root_name: str) -> list[Hierarchy]:
    """Every mounted hierarchy where a parent group `root_name` can be made (and a group in
    it, probed): cgroup2 first, with the controllers it lets its children use, then one per
    v1 mount (co-mounted controllers share one)."""
    mounts = _cgroup_mounts()
    own = _own_cgroups()
    hierarchies: list[Hierarchy] = []
    unified_mount = mounts.get("unified")
    if unified_mount is not None:
        available = set(read(unified_mount / "cgroup.controllers").split())
        wanted = [c for c in _V2_CONTROLLERS if c in available]
        parent = _make_parent(unified_mount, own.get(""), root_name, wanted)
        if parent is not None:
            enabled = set(read(parent / "cgroup.subtree_control").split())
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
    return hierarchies
