"""The resource-limit backend: cgroup v2, cgroup v1 (hybrid hosts), rlimits as the last
resort. It chooses, per set of limits, the hierarchies a job's groups go in, makes them
(or lends pooled ones), and cleans up what an earlier run left.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from jobworker.engine.cgroups.files import write
from jobworker.engine.cgroups.group import JobCgroup
from jobworker.engine.cgroups.hierarchy import (
    CgroupRootInUse,
    Hierarchy,
    Homes,
    find_hierarchies,
    lock_root,
)
from jobworker.engine.cgroups.pool import Pool, Slot
from jobworker.engine.cgroups.writes import (
    block_devices,
    field_names,
    limit_writes,
    only_limits,
    wanted_limits,
    with_memory,
)
from jobworker.model import Limits

_log = structlog.get_logger()
_T = TypeVar("_T")

PRLIMIT = "/usr/bin/prlimit"


class CgroupBackend:
    """Makes each job's cgroups and puts its limits on them; one per job supervisor."""

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
        # Names of the groups this backend made and has not removed yet: never "stale".
        self._live: set[str] = set()
        self._lock: int | None = None  # an flock on a parent group: one owner per root
        self.homes = Homes()  # where a thread that forked a job goes back to (by_thread)
        self._pool = Pool()
        self._chosen: dict[frozenset[str], list[Hierarchy]] = {}  # _choose, by wanted limits
        self.pooling = True  # False: every job gets groups of its own, named by its key
        # Pooled groups are named pool-<this run's token>-<n>: never a name an earlier run
        # used, whose record may still name it after a crash (Scheduler.recover kills by it).
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
        except Exception as exc:  # noqa: BLE001 - a failed probe must not stop the supervisor
            _log.warning("cgroup_probe_failed", error=repr(exc))
            backend = None
        return backend or cls("none", rlimits=rlimits)

    @classmethod
    def _probe(cls, root_name: str, rlimits: bool) -> CgroupBackend | None:
        if not root_name or "/" in root_name or root_name in (".", ".."):
            raise ValueError(f"invalid cgroup root name: {root_name!r}")
        if os.geteuid() != 0:
            return None
        hierarchies = find_hierarchies(root_name)
        if not hierarchies:
            return None
        lock = lock_root(hierarchies[0].parent)
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
        wanted = wanted_limits(limits)
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
        enforced = only_limits(limits, enforced_names)
        # Forked straight into its groups only where no limit can throttle or OOM-kill the
        # forking thread, and pids.max leaves it room (engine/spawn.py's module doc).
        by_thread = all(not h.v2 for h, _ in groups) and not (
            enforced.cpu_millis or enforced.memory_bytes or enforced.pids_max == 1
        )
        unenforced = tuple(sorted(name for name in wanted if name not in enforced_names))
        rlimit_args: tuple[str, ...] = ()
        if "memory" in unenforced and self.rlimits:  # approximate with the address space
            rlimit_args = (f"--as={limits.memory_bytes}",)
            enforced = with_memory(enforced, limits.memory_bytes)
            unenforced = tuple(n for n in unenforced if n != "memory")
        if unenforced:
            _log.warning("limits_not_enforced", key=key, limits=list(unenforced))
        return JobCgroup(
            key,
            groups,
            enforced,
            rlimit_args,
            field_names(unenforced),
            _live=self._live,
            by_thread=by_thread,
            homes=self.homes,
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
            key,
            slot.groups,
            enforced,
            (),
            unenforced,
            _live=self._live,
            by_thread=True,
            slot=slot,
            homes=self.homes,
        )

    def _new_slot(self, chosen: list[Hierarchy]) -> Slot:
        """Make a set of groups for the pool; OSError when one cannot be made (none left)."""
        with self._pool._lock:
            self._pool_count += 1
            name = f"pool-{self._pool_token}-{self._pool_count}"
        _, slot = self._made(name, chosen, lambda made: Slot(self._pool, name, made))
        return slot

    def _made(
        self,
        name: str,
        chosen: list[Hierarchy],
        fill: Callable[[tuple[tuple[Hierarchy, Path], ...]], _T],
    ) -> tuple[tuple[tuple[Hierarchy, Path], ...], _T]:
        """Make group `name` in every hierarchy of `chosen` and hand them to `fill`; when
        either fails, remove what was made (nothing joined it: never busy, so at once) and
        raise. The name counts as this backend's (never stale) from the first mkdir."""
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
        wanted = wanted_limits(limits)
        args: tuple[str, ...] = ()
        enforced = Limits()
        if "memory" in wanted and self.rlimits:
            args = (f"--as={limits.memory_bytes}",)
            enforced = Limits(memory_bytes=limits.memory_bytes)
        unenforced = tuple(sorted(w for w in wanted if not (w == "memory" and args)))
        if unenforced:
            _log.warning("limits_not_enforced", key=key, limits=list(unenforced))
        return JobCgroup(key, (), enforced, args, field_names(unenforced))

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
        # its parent's peak (ARCHITECTURE.md), so the group's peak is the only honest one.
        for name in sorted(wanted | {"memory"}):
            if any(name in h.controllers for h in chosen):
                continue
            match = next((h for h in self.hierarchies if name in h.controllers), None)
            if match is not None:
                chosen.append(match)
        # So is CPU time (cgroup2's cpu.stat is always there): it counts the whole tree. On
        # v1 only where cpuacct is mounted on its own: co-mounted with cpu, a group of its
        # own would also change the job's CPU weight (it would leave its parent's cpu group).
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
            writes = limit_writes(name, hierarchy.v2, limits, self.devices)
            try:
                for file, value in writes:
                    if file.startswith("?"):  # best effort: absent on some kernels
                        with contextlib.suppress(OSError):
                            write(path / file[1:], value)
                        continue
                    write(path / file, value)
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

    def cleanup_stale(self, owned: frozenset[str] = frozenset()) -> int:
        """Remove job groups left by an earlier run that are empty; the number of jobs cleaned.

        Groups this backend made are skipped: an empty one may belong to a job whose join
        shell has not joined yet; so are `owned` ones (of jobs a re-exec'd supervisor
        adopted). Sleeps while a group is busy (remove_blocking).
        """
        keys: set[str] = set()
        for hierarchy in self.hierarchies:
            with contextlib.suppress(OSError):
                keys.update(p.name for p in hierarchy.parent.iterdir() if p.is_dir())
        removed = 0
        for key in sorted(keys - self._live - owned):
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
        outside): the others may be gone too, and new ones are made instead."""
        for slot in self._pool.drain():
            slot.close()
            if JobCgroup(slot.name, slot.groups).remove_blocking(timeout=1.0):
                self._live.discard(slot.name)

    def close(self) -> None:
        """At shutdown: remove the pooled groups, then the parent groups if no job
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
        self.homes.close()


def _check_key(key: str) -> None:
    if not key or "/" in key or key in (".", "..") or "\0" in key:
        raise ValueError(f"invalid cgroup key: {key!r}")
