"""Tests of the cgroup backends against the host's real cgroups (skipped where there are none)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobworker.engine.cgroups.backend import CgroupBackend
from jobworker.engine.cgroups.group import JobCgroup
from jobworker.engine.cgroups.hierarchy import CgroupRootInUse, Hierarchy
from jobworker.engine.cgroups.writes import cfs
from jobworker.model import Limits

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="cgroups need root")


def _own_backend(name: str) -> Iterator[CgroupBackend]:
    backend = CgroupBackend.detect(name)
    yield backend
    backend.cleanup_stale()
    backend.close()  # removes the parent groups once empty, lets go of the root's lock


@pytest.fixture(scope="module")
def backend() -> Iterator[CgroupBackend]:
    """A backend with its own parent groups, so parallel test runs never meet."""
    yield from _own_backend(f"jobworker-test-limits-{os.getpid()}")


@pytest.fixture
def fresh_backend(request: pytest.FixtureRequest) -> Iterator[CgroupBackend]:
    """A backend of this test's own, for tests that end it and detect it again as a
    restarted server would; skips where there are no usable cgroups."""
    test = request.node.name.removeprefix("test_")[:24]
    own = _own_backend(f"jobworker-test-{test}-{os.getpid()}")
    backend = next(own)
    if backend.name == "none":
        pytest.skip("no usable cgroups here")
    yield backend
    for _ in own:  # its teardown
        pass


def _needs(backend: CgroupBackend, limit: str) -> None:
    if limit not in backend.enforceable():
        pytest.skip(f"backend {backend.name} cannot enforce {limit} here")


def test_detect_names_one_of_three_backends(backend: CgroupBackend) -> None:
    assert backend.name in {"cgroup-v2", "cgroup-v1", "none"}
    line = backend.describe()
    assert line.startswith(backend.name)
    assert "\n" not in line


def _hybrid_host() -> bool:
    controllers = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    return Path("/sys/fs/cgroup/memory").is_dir() and controllers.exists()


@needs_root
@pytest.mark.skipif(not _hybrid_host(), reason="not a cgroup v1 hybrid host like the dev box")
def test_hybrid_host_gets_v1_backend(backend: CgroupBackend) -> None:
    assert backend.name == "cgroup-v1"
    assert {"cpu", "memory", "pids"} <= backend.enforceable()


def test_detect_never_raises_and_falls_back_to_none() -> None:
    assert CgroupBackend.detect("bad/name").name == "none"


@pytest.mark.skipif(ROOT, reason="checks the fallback of an unprivileged server")
def test_unprivileged_gets_none() -> None:
    assert CgroupBackend.detect("jobworker-test").name == "none"


def test_cfs_quota_and_period() -> None:
    assert cfs(1500) == (150_000, 100_000)
    assert cfs(200) == (20_000, 100_000)
    quota, period = cfs(1)  # below the kernel's minimum quota: a longer period instead
    assert quota >= 1000
    assert period <= 1_000_000
    assert abs(quota / period - 0.001) < 0.0005


def test_invalid_key_is_refused(backend: CgroupBackend) -> None:
    for key in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="invalid cgroup key"):
            backend.create(key, Limits())


@needs_root
def test_create_applies_limits_and_remove_cleans_up(backend: CgroupBackend) -> None:
    if backend.name == "none":
        pytest.skip("no usable cgroups here")
    limits = Limits(
        cpu_millis=200,
        memory_bytes=64 << 20,
        pids_max=10,
        io_read_bytes_per_second=1 << 20,
        io_write_bytes_per_second=2 << 20,
    )
    group = backend.create("apply-1", limits)
    try:
        dirs = [path.parent for path in group.procs_files]
        assert all(d.is_dir() for d in dirs)
        expected = Limits(
            cpu_millis=200 if "cpu" in backend.enforceable() else 0,
            memory_bytes=limits.memory_bytes
            if "memory" in backend.enforceable() or backend.rlimits
            else 0,
            pids_max=10 if "pids" in backend.enforceable() else 0,
            io_read_bytes_per_second=(1 << 20) if "io" in backend.enforceable() else 0,
            io_write_bytes_per_second=(2 << 20) if "io" in backend.enforceable() else 0,
        )
        assert group.enforced == expected
        files = {p.name: p for d in dirs for p in d.iterdir()}
        if backend.name == "cgroup-v1":
            assert files["cpu.cfs_quota_us"].read_text().strip() == "20000"
            assert files["cpu.cfs_period_us"].read_text().strip() == "100000"
            assert files["memory.limit_in_bytes"].read_text().strip() == str(64 << 20)
            assert files["pids.max"].read_text().strip() == "10"
            if "io" in backend.enforceable():
                read = files["blkio.throttle.read_bps_device"].read_text()
                assert f"{backend.devices[0]} {1 << 20}" in read
        elif backend.name == "cgroup-v2":
            assert files["memory.max"].read_text().strip() == str(64 << 20)
            assert files["pids.max"].read_text().strip() == "10"
    finally:
        assert group.remove_blocking()
    assert not any(path.parent.exists() for path in group.procs_files)


@needs_root
def test_no_limits_makes_the_tracking_and_memory_accounting_groups(backend: CgroupBackend) -> None:
    if backend.name == "none":
        pytest.skip("no usable cgroups here")
    group = backend.create("track-1", Limits())
    try:
        accounting = any(h.kind == "memory" for h in backend.hierarchies)
        kinds = [h.kind for h, _ in group.groups]
        if backend.name == "cgroup-v1" and any(h.kind == "freezer" for h in backend.hierarchies):
            # v1 (also hybrid): the freezer tracks, memory and cpuacct account; no cgroup2
            assert kinds[0] == "freezer"
            assert "memory" in kinds
            assert any("cpuacct" in h.names for h, _ in group.groups)
            assert group.by_thread
            assert group.cpu_seconds() == (0.0, 0.0)
        elif backend.name == "cgroup-v2":
            assert kinds == ["unified"]
            assert not group.by_thread
        assert group.memory_peak() is not None or not accounting
        assert group.enforced == Limits()
        assert group.unenforced == ()
    finally:
        group.remove()


def test_none_backend_approximates_memory_with_rlimit_and_records_the_rest() -> None:
    backend = CgroupBackend("none", rlimits=True)
    group = backend.create("k-1", Limits(cpu_millis=500, memory_bytes=1 << 30, pids_max=5))
    assert group.procs_files == ()
    assert group.rlimit_args == (f"--as={1 << 30}",)
    assert group.enforced == Limits(memory_bytes=1 << 30)
    assert set(group.unenforced) == {"cpu_millis", "pids_max"}
    assert group.pids() == []
    assert not group.oom_killed()
    group.kill()
    group.remove()


def test_none_backend_without_prlimit_enforces_nothing() -> None:
    group = CgroupBackend("none").create("k-2", Limits(memory_bytes=1 << 30))
    assert group.rlimit_args == ()
    assert group.enforced == Limits()
    assert group.unenforced == ("memory_bytes",)


@needs_root
def test_kill_and_pids_of_a_group(backend: CgroupBackend) -> None:
    if backend.name == "none":
        pytest.skip("no usable cgroups here")
    backend.pooling = False  # a group of its own, removed at the end
    try:
        group = backend.create("kill-1", Limits())
    finally:
        backend.pooling = True
    procs = group.procs_files[0]
    script = 'echo $$ > "$1"; setsid sleep 1000 & sleep 1000'
    proc = subprocess.Popen(["sh", "-c", script, "sh", str(procs)], start_new_session=True)
    try:
        _wait_for(lambda: len(group.pids()) >= 3)
        assert proc.pid in group.pids()
        group.kill()
        assert proc.wait(timeout=5) == -9
        _wait_for(lambda: not group.pids())
    finally:
        proc.kill()
        proc.wait()
        assert group.remove_blocking(timeout=2.0)
    assert not procs.parent.exists()


@needs_root
def test_kill_without_cgroup_kill_uses_freezer_and_pids(backend: CgroupBackend) -> None:
    v1 = tuple(h for h in backend.hierarchies if not h.v2)
    if not any(h.kind == "freezer" for h in v1):
        pytest.skip("no cgroup v1 freezer here")
    group = CgroupBackend("cgroup-v1", v1).create("kill-2", Limits())
    procs = group.procs_files[0]
    assert procs.parent.parent.parent.name == "freezer"
    script = 'echo $$ > "$1"; for i in 1 2 3; do setsid sleep 1000 & done; sleep 1000'
    proc = subprocess.Popen(["sh", "-c", script, "sh", str(procs)], start_new_session=True)
    try:
        _wait_for(lambda: len(group.pids()) >= 5)
        group.kill()
        assert proc.wait(timeout=5) == -9
        _wait_for(lambda: not group.pids())
    finally:
        proc.kill()
        proc.wait()
        group.remove_blocking(timeout=2.0)


@needs_root
def test_cleanup_stale_removes_empty_groups_and_keeps_busy_ones(
    fresh_backend: CgroupBackend,
) -> None:
    backend, name = fresh_backend, fresh_backend.hierarchies[0].parent.name
    backend.pooling = False
    backend.create("old-1", Limits(pids_max=5))
    busy = backend.create("old-2", Limits())
    proc = subprocess.Popen(
        ["sh", "-c", 'echo $$ > "$1"; exec sleep 1000', "sh", str(busy.procs_files[0])]
    )
    try:
        _wait_for(lambda: proc.pid in busy.pids())
        with pytest.raises(CgroupRootInUse, match=f"cgroup_root '{name}' is in use"):
            CgroupBackend.detect(name)  # a second server on the same root
        backend.close()  # the first server ends (its groups stay)...
        again = CgroupBackend.detect(name)  # ...and a restarted one takes the root
        assert again.cleanup_stale() == 1
        assert again.open("old-1") is None
        reopened = again.open("old-2")
        assert reopened is not None
        reopened.kill()
        proc.wait(timeout=5)
        _wait_for(lambda: not reopened.pids())
        assert again.cleanup_stale() == 1
        again.close()
    finally:
        proc.kill()
        proc.wait()


@needs_root
def test_remove_never_sleeps_and_names_the_busy_groups(backend: CgroupBackend) -> None:
    """A group with a child group stays busy (EBUSY) like a v1 group right after its last
    exit: remove() must try once and report it, not sleep on the caller's event loop."""
    if backend.name == "none":
        pytest.skip("no usable cgroups here")
    backend.pooling = False
    try:
        group = backend.create("busy-1", Limits())
    finally:
        backend.pooling = True
    first = group.procs_files[0].parent
    (first / "sub").mkdir()
    try:
        started = time.monotonic()
        assert group.remove() == (str(first),)
        assert group.remove() == (str(first),)  # only the busy one is tried again
        assert time.monotonic() - started < 0.05
        assert first.is_dir()
        assert not any(p.parent.exists() for p in group.procs_files[1:])
        assert not group.remove_blocking(timeout=0.02)
    finally:
        (first / "sub").rmdir()
    assert group.remove() == ()
    assert not first.exists()
    assert group.remove_blocking()


@needs_root
def test_cleanup_stale_spares_groups_this_backend_made(fresh_backend: CgroupBackend) -> None:
    """An empty group of this run may be a job's whose join shell has not joined yet."""
    backend = fresh_backend
    backend.pooling = False
    group = backend.create("live-1", Limits())
    try:
        backend.cleanup_stale()
        assert backend.open("live-1") is not None
    finally:
        assert group.remove_blocking()
    backend.create("live-2", Limits())
    reopened = backend.open("live-2")
    assert reopened is not None
    assert reopened.remove_blocking()  # removed by any handle: no longer this run's
    backend.create("live-2", Limits())
    backend.close()  # as if it had crashed: a restarted server finds the group stale
    again = CgroupBackend.detect(backend.hierarchies[0].parent.name)
    assert again.cleanup_stale() == 1
    again.close()
    assert backend.cleanup_stale() == 0  # the group is gone: nothing left to spare


def test_hierarchy_v2_flag() -> None:
    assert Hierarchy("unified", Path("/x")).v2
    assert not Hierarchy("memory", Path("/x")).v2
    assert JobCgroup("k").procs_files == ()


def _wait_for(condition: object, timeout: float = 5.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@needs_root
def test_a_kill_never_signals_the_server_while_one_of_its_threads_is_in_the_group() -> None:
    """A thread that forks a job sits in the job's groups for that moment, so the group's
    cgroup.procs lists the server itself. Run in a child process: were the server
    signalled, the child would die of SIGKILL instead of printing."""
    name = f"jobworker-test-self-{os.getpid()}"
    script = f"""
import threading
from jobworker.engine.cgroups.backend import CgroupBackend
from jobworker.model import Limits
backend = CgroupBackend.detect({name!r})
group = backend.create("self-1", Limits())
if not group.by_thread:
    print("no v1 groups")
    raise SystemExit(0)
inside, done = threading.Event(), threading.Event()
def hold():
    with group.thread_joined():
        inside.set()
        done.wait(10)
thread = threading.Thread(target=hold)
thread.start()
inside.wait(10)
group.kill()
done.set()
thread.join()
assert group.remove_blocking(1.0)
backend.close()
print("alive")
"""
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = child.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        # It signalled itself while its thread sat frozen: thaw it so that it can die.
        for state in Path("/sys/fs/cgroup/freezer").glob(f"{name}/*/freezer.state"):
            state.write_text("THAWED")
        child.kill()
        out, err = child.communicate(timeout=30)
    finally:
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            for group in (hierarchy / name / "self-1", hierarchy / name):
                with contextlib.suppress(OSError):
                    group.rmdir()
    if out == "no v1 groups\n":
        pytest.skip("jobs are forked into their groups only on a cgroup v1 host")
    assert (child.returncode, out) == (0, "alive\n"), err


@needs_root
def test_a_forking_thread_goes_home_to_where_the_server_was_moved() -> None:
    """An administrator moves the server to other groups: a thread that forks a job after
    that goes back there, not to the server's old groups. In a child process."""
    name = f"jobworker-test-home-{os.getpid()}"
    script = f"""
import os, threading, time
from pathlib import Path
from jobworker.engine.cgroups.backend import CgroupBackend
from jobworker.engine.cgroups.hierarchy import Homes
from jobworker.model import Limits
backend = CgroupBackend.detect({name!r})
freezer = next((h for h in backend.hierarchies if h.kind == "freezer"), None)
group = backend.create("home-1", Limits())
if freezer is None or not group.by_thread:
    print("no v1 groups")
    raise SystemExit(0)
def fork_once(result):
    with group.thread_joined():
        pass
    lines = Path("/proc/thread-self/cgroup").read_text().splitlines()
    result.append([x for x in lines if ":freezer:" in x][0].split(":", 2)[2])
def in_a_thread():
    result = []
    thread = threading.Thread(target=fork_once, args=(result,))
    thread.start()
    thread.join()
    return result[0]
before = in_a_thread()
moved = freezer.parent / "moved-here"
moved.mkdir()
(moved / "cgroup.procs").write_text(str(os.getpid()))
time.sleep(Homes.REFRESH + 0.1)
after = in_a_thread()
(freezer.mount / "cgroup.procs").write_text(str(os.getpid()))
moved.rmdir()
assert group.remove_blocking(1.0)
backend.close()
print(before, after)
"""
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            for group in (hierarchy / name / "moved-here", hierarchy / name / "home-1"):
                with contextlib.suppress(OSError):
                    group.rmdir()
            with contextlib.suppress(OSError):
                (hierarchy / name).rmdir()
    if out.stdout == "no v1 groups\n":
        pytest.skip("jobs are forked into their groups only on a cgroup v1 host")
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.split()
    assert before != after
    assert after == f"/{name}/moved-here"


def test_a_control_file_longer_than_one_read_is_read_whole(tmp_path: Path) -> None:
    """cpuacct.usage_all has a line per CPU: past ~1,400 CPUs it is longer than 64 KiB."""
    from jobworker.engine.cgroups.files import read

    lines = "cpu user system\n" + "".join(f"{i} {i * 7} {i * 3}\n" for i in range(5000))
    (tmp_path / "usage_all").write_text(lines)
    assert len(lines) > 65536
    assert read(tmp_path / "usage_all") == lines


# ---- pooled groups: jobs without limits reuse sets of groups ---------------------------------


def _pooled(backend: CgroupBackend) -> None:
    if backend.name != "cgroup-v1":
        pytest.skip("groups are pooled for jobs forked in place: cgroup v1 hosts only")


def _run_in(group: JobCgroup, script: str) -> None:
    """Run `sh -c script` inside every group of `group` (it joins them first) to its end."""
    join = 'for f in "$@"; do echo $$ > "$f"; done; '
    argv = ["sh", "-c", join + script, "sh", *map(str, group.procs_files)]
    subprocess.run(argv, check=True, timeout=30)


@needs_root
def test_a_pooled_group_is_reused_with_its_counters_reset(backend: CgroupBackend) -> None:
    _pooled(backend)
    group = backend.create("pool-a", Limits())
    assert group.slot is not None and group.by_thread
    assert group.name.startswith("pool-") and group.name != group.key
    burn = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; "
    grow = "x=$(head -c 20000000 /dev/zero | tr '\\0' a); "
    _run_in(group, burn + grow)
    cpu, peak = group.cpu_seconds(), group.memory_peak()
    dirs = [p.parent for p in group.procs_files]
    if cpu is not None:
        assert sum(cpu) > 0.05
    assert peak is not None and peak > 20_000_000
    assert group.remove() == ()
    assert all(d.is_dir() for d in dirs)  # kept, empty, for the next job
    assert group.pids() == [] and group.cpu_seconds() is None  # done with them
    again = backend.create("pool-b", Limits())
    try:
        assert again.name == group.name  # the same groups...
        cpu, peak = again.cpu_seconds(), again.memory_peak()
        if cpu is not None:
            assert sum(cpu) < 0.01  # ...with the counters of the job before gone
        assert peak is not None and peak < 4 << 20
    finally:
        assert again.remove() == ()


@needs_root
def test_a_pooled_group_with_a_process_left_is_removed_not_reused(
    backend: CgroupBackend,
) -> None:
    _pooled(backend)
    group = backend.create("pool-c", Limits())
    script = 'for f in "$@"; do echo $$ > "$f"; done; exec sleep 1000'
    proc = subprocess.Popen(["sh", "-c", script, "sh", *map(str, group.procs_files)])
    try:
        _wait_for(lambda: proc.pid in group.pids())
        busy = group.remove()  # the job's end timed out with a process left: not reused
        assert busy
        assert group.pids() == [proc.pid]
        other = backend.create("pool-d", Limits())
        assert other.name != group.name
        assert other.remove() == ()
    finally:
        proc.kill()
        proc.wait()
    assert group.remove_blocking(timeout=2.0)
    assert all(not p.parent.exists() for p in group.procs_files)
    assert backend.open(group.name) is None


@needs_root
def test_a_pooled_group_still_charged_memory_is_removed_not_reused(
    backend: CgroupBackend, tmp_path: Path
) -> None:
    """A job's files in tmpfs stay charged to its memory group after it ends: the next
    job's peak would start there, so the group is not reused."""
    _pooled(backend)
    group = backend.create("pool-e", Limits())
    if not any(h.kind == "memory" for h, _ in group.groups):
        group.remove()
        pytest.skip("no memory hierarchy here")
    shm = Path("/dev/shm") / f"jobworker-test-{os.getpid()}"
    try:
        _run_in(group, f"head -c 8000000 /dev/urandom > {shm}")
        assert group.remove_blocking(timeout=2.0)
        assert backend.open(group.name) is None
    finally:
        shm.unlink(missing_ok=True)


@needs_root
def test_close_removes_the_pooled_groups(fresh_backend: CgroupBackend) -> None:
    _pooled(fresh_backend)
    group = fresh_backend.create("pool-f", Limits())
    assert group.remove() == ()
    parents = [h.parent for h in fresh_backend.hierarchies]
    fresh_backend.close()
    assert not any(p.exists() for p in parents)


@needs_root
def test_a_pids_limit_alone_keeps_a_job_pooled_with_its_pids_max(backend: CgroupBackend) -> None:
    """pids_max defaults to 4096: such a job still borrows a pooled set of groups and is
    forked in place; the slot's pids.max is set to each job's value."""
    _pooled(backend)
    if "pids" not in backend.enforceable():
        pytest.skip("no pids hierarchy here")
    first = backend.create("pids-a", Limits(pids_max=4096))
    assert first.slot is not None and first.by_thread
    assert first.enforced == Limits(pids_max=4096) and first.unenforced == ()
    pids_dir = next(path for h, path in first.groups if h.kind == "pids")
    assert (pids_dir / "pids.max").read_text().strip() == "4096"
    _run_in(first, "for i in 1 2 3; do sleep 0.01 & done; wait")
    first.remove()
    second = backend.create("pids-b", Limits(pids_max=7))  # the same slot, a new value
    assert second.name == first.name
    assert (pids_dir / "pids.max").read_text().strip() == "7"
    forks = "n=0; for i in $(seq 20); do sleep 5 & n=$((n+1)); done 2>/dev/null; echo $n"
    with pytest.raises(subprocess.CalledProcessError):  # the shell cannot fork past 7
        _run_in(second, forks)
    second.kill()
    second.remove_blocking(timeout=5.0)
    third = backend.create("pids-c", Limits())  # no pids limit: "max" again
    try:
        assert third.enforced == Limits() and third.by_thread
        if third.name == first.name:
            assert (pids_dir / "pids.max").read_text().strip() == "max"
    finally:
        third.remove()


@needs_root
def test_pids_max_one_is_never_forked_in_place(backend: CgroupBackend) -> None:
    """The forking thread counts as a task: at pids_max = 1 the job could not be forked."""
    if backend.name == "none" or "pids" not in backend.enforceable():
        pytest.skip("no pids hierarchy here")
    group = backend.create("pids-one", Limits(pids_max=1))
    try:
        assert group.slot is None and not group.by_thread
        assert group.enforced.pids_max == 1
    finally:
        assert group.remove_blocking()
