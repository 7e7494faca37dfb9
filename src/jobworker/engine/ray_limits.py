"""A Ray job's limits on its node (ray_node.py): a cgroup of its own where the node allows.

Only the standard library: pickled by value with ray_node (a node needs Ray, not jobworker).

Where the task's worker runs as root and the node has a cgroup hierarchy it can write
(cgroup v2 unified, or v1 memory, cpu and pids controllers under /sys/fs/cgroup/<name>),
the job gets a group of its own under PARENT in each hierarchy that enforces one of its
limits: memory_bytes as the memory limit (no swap), cpu_millis as a CFS quota, pids_max
as pids.max. The job joins it before its first instruction through a join shell (JOIN, as
engine/chain.py does locally), or, when its only group is a v1 pids group (the default
pids_max), is born in it: the forking thread joins the group for the fork and goes back
(NodeGroup.thread_joined, as engine/spawn.py forks in place), one exec less a job. The
group is removed once the job's tree is gone.
Elsewhere memory falls back to `prlimit --as` (an address-space rlimit, as locally), and
what is not enforced is logged on the node; the job starts all the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from typing import Any

ROOT = "/sys/fs/cgroup"
PARENT = "jobworker-ray"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
V1 = {"memory": "memory", "cpu": "cpu", "pids": "pids"}  # limit -> v1 controller's folder
CFS_PERIOD_US = 100_000
CFS_MIN_QUOTA_US = 1_000
CFS_MAX_PERIOD_US = 1_000_000
REMOVE_SECONDS = 5.0  # for the group's last processes to die before its folder goes
STALE_SECONDS = 60.0  # an empty group this old was left by a task whose worker was killed

# The join shell: its own pid into every cgroup.procs file named before "--", then the
# job's chain with its stdin opened by path (the first argument). Until that exec its fd 0
# is a gate pipe to the task: a join failure is named there (exit 125, nothing of the
# job's runs), and the exec closes it.
JOIN = (
    'in=$1; shift; for f; do shift; [ "$f" = -- ] && break; '
    'echo $$ 2>/dev/null > "$f" || { echo "$f" >&0; exit 125; }; done; exec "$@" < "$in"'
)

log = logging.getLogger("jobworker.ray_node")


def wanted(limits: Mapping[str, int]) -> list[str]:
    """The limits (cpu, memory, pids) `limits` asks for."""
    fields = {"cpu": "cpu_millis", "memory": "memory_bytes", "pids": "pids_max"}
    return [name for name, field in fields.items() if limits.get(field)]


def cfs(cpu_millis: int) -> tuple[int, int]:
    """(quota_us, period_us) for `cpu_millis` thousandths of a core (cgroups/writes.cfs)."""
    period = CFS_PERIOD_US
    quota = cpu_millis * period // 1000
    if quota < CFS_MIN_QUOTA_US:  # below the kernel's minimum quota: stretch the period
        period = min(CFS_MAX_PERIOD_US, CFS_MIN_QUOTA_US * 1000 // cpu_millis)
        quota = max(CFS_MIN_QUOTA_US, cpu_millis * period // 1000)
    return quota, period


def _writes(name: str, v2: bool, limits: Mapping[str, int]) -> list[tuple[str, str]]:
    """(file, value) pairs that set limit `name`; a file starting with "?" may be missing."""
    if name == "cpu":
        quota, period = cfs(limits["cpu_millis"])
        if v2:
            return [("cpu.max", f"{quota} {period}")]
        return [("cpu.cfs_period_us", str(period)), ("cpu.cfs_quota_us", str(quota))]
    if name == "memory":
        memory = str(limits["memory_bytes"])
        if v2:  # no swap: past the limit is an OOM kill, not a slow crawl through swap
            return [("memory.max", memory), ("?memory.swap.max", "0")]
        return [
            ("memory.limit_in_bytes", memory),
            ("?memory.memsw.limit_in_bytes", memory),
            ("?memory.swappiness", "0"),
        ]
    return [("pids.max", str(limits["pids_max"]))]


def _write(path: str, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""


def _keyed(text: str) -> dict[str, int]:
    """ "key value" lines (memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


class NodeGroup:
    """One job's cgroup folders on its node (one per hierarchy), and what they enforce."""

    def __init__(self, v2: bool) -> None:
        self.v2 = v2
        self.dirs: dict[str, str] = {}  # limit name -> its folder (one folder for all on v2)
        self.enforced: set[str] = set()
        self.by_thread = False  # the job is forked in its group (thread_joined), no join shell

    def forkable(self, limits: Mapping[str, int]) -> bool:
        """True when the job can be forked in its group by a thread that joins it for the
        fork: v1 (threads may sit in other groups than their process), a pids group only
        (a memory or cpu group would charge or throttle the forking thread), and room for
        the thread and the child."""
        return not self.v2 and set(self.dirs) == {"pids"} and limits["pids_max"] >= 2

    @contextlib.contextmanager
    def thread_joined(self) -> Iterator[None]:
        """The calling thread, and only it, in the job's pids group for the block; a child
        forked meanwhile is born there. Back home afterwards (else to the root group)."""
        home = _thread_home("pids")
        _write(self.dirs["pids"] + "/tasks", "0")  # "0": the writing thread itself
        try:
            yield
        finally:
            try:
                _write(home, "0")
            except OSError:  # its own group went away meanwhile: the root takes it
                try:
                    _write(f"{ROOT}/{V1['pids']}/tasks", "0")
                except OSError as exc:  # the job started all the same: never fail it now
                    log.warning("a forking thread stays in %s: %s", self.dirs["pids"], exc)

    def procs_files(self) -> list[str]:
        return [f"{d}/cgroup.procs" for d in dict.fromkeys(self.dirs.values())]

    def oom_killed(self) -> bool:
        """True when the kernel OOM-killed a process of the job for its memory limit."""
        if "memory" not in self.enforced:
            return False
        if self.v2:
            return _keyed(_read(self.dirs["memory"] + "/memory.events")).get("oom_kill", 0) > 0
        return _keyed(_read(self.dirs["memory"] + "/memory.oom_control")).get("oom_kill", 0) > 0

    def memory_peak(self) -> int:
        """Peak memory charged to the group (0 when not measured)."""
        if "memory" not in self.dirs:
            return 0
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        text = _read(f"{self.dirs['memory']}/{name}").strip()
        return int(text) if text.isdigit() else 0

    def remove(self) -> None:
        """Kill what is left in the group, then remove its folders (best effort: a folder
        that cannot go is logged)."""
        deadline = time.monotonic() + REMOVE_SECONDS
        for folder in dict.fromkeys(self.dirs.values()):
            while True:
                pids = [int(p) for p in _read(f"{folder}/cgroup.procs").split()]
                for pid in pids:
                    if pid == os.getpid():  # a forking thread that did not get home
                        continue
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    os.rmdir(folder)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        log.warning("cannot remove cgroup %s: %s", folder, exc)
                        break
                    time.sleep(0.01)  # its processes are still dying


def _thread_home(controller: str) -> str:
    """The `tasks` file of the calling thread's own group in the v1 `controller`."""
    for line in _read("/proc/thread-self/cgroup").splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return f"{ROOT}/{V1[controller]}{path.rstrip('/')}/tasks"
    return f"{ROOT}/{V1[controller]}/tasks"


def _name(job_id: str) -> str:
    """The group's folder name: the job's id with only safe characters."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", job_id).lstrip(".")
    return name or "job"


def _v2_parent() -> str | None:
    """PARENT in the unified hierarchy with memory, cpu and pids delegated to its children
    (those the node has), or None when the node has no writable v2 hierarchy."""
    if not os.path.exists(f"{ROOT}/cgroup.controllers"):
        return None
    parent = f"{ROOT}/{PARENT}"
    try:
        os.makedirs(parent, exist_ok=True)
        available = set(_read(f"{ROOT}/cgroup.controllers").split())
        enable = " ".join(f"+{c}" for c in ("memory", "cpu", "pids") if c in available)
        for folder in (ROOT, parent):
            if enable:
                _write(f"{folder}/cgroup.subtree_control", enable)
    except OSError as exc:
        log.warning("no cgroup for jobs on this node (%s): %s", parent, exc)
        return None
    return parent


# Not functools.cache: a cache wrapper pickles by reference, which a node without
# jobworker cannot import.
_swept: set[str] = set()  # parent folders this worker has swept


def _sweep(parent: str) -> None:
    """Once per worker and parent: remove the empty groups that killed workers left (a
    group in use is not empty, and a new one is not STALE_SECONDS old)."""
    if parent in _swept:
        return
    _swept.add(parent)
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir() and time.time() - entry.stat().st_mtime > STALE_SECONDS:
                    os.rmdir(entry.path)  # EBUSY while processes are in it


def make_group(job_id: str, limits: Mapping[str, int]) -> NodeGroup | None:
    """The job's group with its limits set, or None (not root, no hierarchy, nothing
    asked). A limit that cannot be set is logged and left out."""
    names = wanted(limits)
    if not names or os.geteuid() != 0 or not os.path.isdir(ROOT):
        return None
    v2_parent = _v2_parent()
    group = NodeGroup(v2_parent is not None)
    for name in names:
        if v2_parent is not None:
            folder = f"{v2_parent}/{_name(job_id)}"
            if name not in _read(f"{v2_parent}/cgroup.controllers").split():
                continue
        else:
            hierarchy = f"{ROOT}/{V1[name]}"
            if not os.path.isfile(f"{hierarchy}/cgroup.procs"):
                continue
            folder = f"{hierarchy}/{PARENT}/{_name(job_id)}"
        try:
            _sweep(os.path.dirname(folder))
            os.makedirs(folder, exist_ok=True)
            group.dirs[name] = folder
            for file, value in _writes(name, group.v2, limits):
                if file.startswith("?"):
                    with contextlib.suppress(OSError):
                        _write(f"{folder}/{file[1:]}", value)
                else:
                    _write(f"{folder}/{file}", value)
        except OSError as exc:
            log.warning("limit %s not enforced for job %s: %s", name, job_id, exc)
            continue
        group.enforced.add(name)
    return group if group.dirs else None


def limited(
    job_id: str, limits: Mapping[str, int], command: list[str], stdin: str
) -> tuple[list[str], NodeGroup | None]:
    """`command` wrapped so the job runs within its limits: through the join shell (which
    opens `stdin`, a path, as the job's) when it has a group it cannot be forked in
    (group.by_thread), with `prlimit --as` for memory where no group holds it. The job's
    words only follow a "--", quoted."""
    group = make_group(job_id, limits)
    enforced = group.enforced if group is not None else set()
    if "memory" in wanted(limits) and "memory" not in enforced:
        prlimit = shutil.which("prlimit", path=BASE_PATH)
        if prlimit is not None:
            command = [prlimit, f"--as={limits['memory_bytes']}", "--", *command]
            enforced = enforced | {"memory"}
    missing = [name for name in wanted(limits) if name not in enforced]
    if missing:
        log.warning("job %s: limits not enforced on this node: %s", job_id, ", ".join(missing))
    if group is not None and group.forkable(limits):
        group.by_thread = True
    elif group is not None:
        join = ["/bin/sh", "-c", JOIN, "jobworker-join", stdin, *group.procs_files(), "--"]
        command = join + command
    return command, group


def finish(group: NodeGroup | None, exit_info: dict[str, Any]) -> dict[str, Any]:
    """The job's end with what its group knows (OOM kill, peak memory); the group removed
    (its tree is killed first)."""
    if group is None:
        return exit_info
    oom, peak = group.oom_killed(), group.memory_peak()
    group.remove()
    return exit_info | {"oom_killed": oom, "max_rss": peak or exit_info.get("max_rss", 0)}
