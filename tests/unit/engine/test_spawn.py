"""Tests of the spawner and of running jobs: real processes and, where the host has them,
real cgroups."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from jobworker.engine import chain, exec_helper
from jobworker.engine.cgroups.backend import CgroupBackend
from jobworker.engine.cgroups.group import JobCgroup
from jobworker.engine.cgroups.hierarchy import Hierarchy
from jobworker.engine.chain import join_shell, last_link
from jobworker.engine.checks import resolve_executable
from jobworker.engine.executor import ExitInfo, SpawnError
from jobworker.engine.running import Process, kill_stale, process_start_ticks
from jobworker.engine.spawn import Spawner
from jobworker.model import JobSpec, Limits

ROOT = os.geteuid() == 0
PYTHON3 = shutil.which("python3")


@pytest.fixture(scope="module")
def backend() -> Iterator[CgroupBackend]:
    """The host's best backend, with parent groups of its own so parallel runs never meet."""
    backend = CgroupBackend.detect(f"jobworker-test-process-{os.getpid()}")
    yield backend
    backend.cleanup_stale()
    backend.close()  # removes the pooled groups, then the parents


@pytest.fixture
def per_job(backend: CgroupBackend) -> Iterator[CgroupBackend]:
    """The backend with pooling off: every job gets groups of its own named by its key (as
    jobs with limits do), for the tests of their making and removal."""
    backend.pooling = False
    yield backend
    backend.pooling = True


@pytest.fixture
def sup(backend: CgroupBackend) -> Iterator[Spawner]:
    spawner = Spawner(backend)
    yield spawner
    spawner.close()


_counter = iter(range(1_000_000))


def _key() -> str:
    return f"t{os.getpid()}-{next(_counter)}"


def _spec(*argv: str, **kw: object) -> JobSpec:
    return replace(JobSpec(name="job", argv=argv), **kw)  # type: ignore[arg-type]


def _needs(backend: CgroupBackend, limit: str) -> None:
    if limit not in backend.enforceable():
        pytest.skip(f"backend {backend.name} cannot enforce {limit} limits here")


def _needs_cgroup(backend: CgroupBackend) -> None:
    if backend.name == "none":
        pytest.skip("no usable cgroups here (needs root and a cgroup mount)")


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting for init to reap it."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return data.rsplit(b")", 1)[1].split()[0] != b"Z"


async def _wait_for_lines(path: Path, count: int, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= count:
            return [int(x) for x in lines]
        assert time.monotonic() < deadline, f"{path} has {lines}"
        await asyncio.sleep(0.02)


NO_LIMITS = Limits()


async def _run(
    sup: Spawner, spec: JobSpec, job_dir: Path, limits: Limits = NO_LIMITS, user: str = ""
) -> tuple[Process, ExitInfo]:
    process = await sup.spawn(spec, limits, job_dir, _key(), user)
    return process, await process.wait()


async def test_output_bytes_land_in_the_files_exactly(sup: Spawner, tmp_path: Path) -> None:
    script = r"printf 'a\000b\nc\377'; printf 'e\001' >&2"
    _, info = await _run(sup, _spec("sh", "-c", script), tmp_path / "j")
    assert info.exit_code == 0
    assert (tmp_path / "j" / "stdout").read_bytes() == b"a\x00b\nc\xff"
    assert (tmp_path / "j" / "stderr").read_bytes() == b"e\x01"
    assert stat.S_IMODE((tmp_path / "j" / "stdout").stat().st_mode) == 0o600  # the server's alone


async def test_output_is_appended(sup: Spawner, tmp_path: Path) -> None:
    (tmp_path / "stdout").write_bytes(b"before\n")
    await _run(sup, _spec("echo", "after"), tmp_path)
    assert (tmp_path / "stdout").read_bytes() == b"before\nafter\n"


async def test_stdin_is_fed_from_a_private_file(sup: Spawner, tmp_path: Path) -> None:
    data = b"hello\x00world\n" * 1000
    _, info = await _run(sup, _spec("cat", stdin=data), tmp_path)
    assert info.exit_code == 0
    assert (tmp_path / "stdout").read_bytes() == data
    assert stat.S_IMODE((tmp_path / "stdin").stat().st_mode) == 0o600


async def test_no_stdin_reads_dev_null(sup: Spawner, tmp_path: Path) -> None:
    _, info = await _run(sup, _spec("cat"), tmp_path)
    assert info.exit_code == 0
    assert (tmp_path / "stdout").read_bytes() == b""
    assert not (tmp_path / "stdin").exists()


async def test_environment_is_minimal_plus_the_spec(
    sup: Spawner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBWORKER_SERVER_MARKER", "secret-4711")
    spec = _spec("env", env={"FOO": "bar baz", "LANG": "en_US.UTF-8"})
    await _run(sup, spec, tmp_path)
    env = dict(line.split("=", 1) for line in (tmp_path / "stdout").read_text().splitlines())
    assert "JOBWORKER_SERVER_MARKER" not in env
    assert env["FOO"] == "bar baz"
    assert env["LANG"] == "en_US.UTF-8"
    assert env["PATH"] == sup.base_path
    assert env["HOME"] == os.path.expanduser("~")
    assert set(env) <= {"FOO", "LANG", "PATH", "HOME", "PWD"}  # sh of the exec chain adds PWD


async def test_argv0_is_the_users(sup: Spawner, tmp_path: Path) -> None:
    await _run(sup, _spec("sh", "-c", "cat /proc/$$/cmdline", "name0"), tmp_path)
    assert (tmp_path / "stdout").read_bytes() == b"sh\0-c\0cat /proc/$$/cmdline\0name0\0"


async def test_working_dir_and_relative_executable(sup: Spawner, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    script = work / "hello.sh"
    script.write_text("#!/bin/sh\npwd\n")
    script.chmod(0o755)
    _, info = await _run(sup, _spec("./hello.sh", working_dir=str(work)), tmp_path / "j")
    assert info.exit_code == 0
    assert (tmp_path / "j" / "stdout").read_text() == f"{work}\n"


async def test_default_working_dir(backend: CgroupBackend, tmp_path: Path) -> None:
    sup = Spawner(backend, default_working_dir=str(tmp_path))
    await _run(sup, _spec("pwd"), tmp_path / "j")
    assert (tmp_path / "j" / "stdout").read_text() == f"{tmp_path}\n"


@pytest.mark.parametrize(
    ("argv", "working_dir", "message"),
    [
        (("frobnicate-no-such",), "", "executable not found: frobnicate-no-such"),
        (("./nope",), "", "executable not found: ./nope"),
        (("true",), "/nope/not/here", "working directory not found: /nope/not/here"),
        (("true",), "/etc/passwd", "not a directory: /etc/passwd"),
        (("/etc/passwd",), "", "permission denied: /etc/passwd"),
        (("/etc",), "", "is a directory: /etc"),
    ],
)
async def test_spawn_errors_name_the_path(
    sup: Spawner, tmp_path: Path, argv: tuple[str, ...], working_dir: str, message: str
) -> None:
    with pytest.raises(SpawnError) as caught:
        await sup.spawn(_spec(*argv, working_dir=working_dir), Limits(), tmp_path, _key())
    assert caught.value.message == message
    assert str(caught.value) == message


async def test_a_directory_or_command_gone_since_checked_is_still_named(
    backend: CgroupBackend, tmp_path: Path
) -> None:
    """Checks are trusted for a while (a second by default: a batch of one command checks
    once): what is gone meanwhile fails the exec, and the message still names it."""
    sup = Spawner(backend, check_ttl=3600)
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    tool = bin_dir / "tool"
    tool.write_text("#!/bin/sh\nexit 3\n")
    tool.chmod(0o755)
    env = {"PATH": str(bin_dir)}
    _, info = await _run(sup, _spec("tool", working_dir=str(work), env=env), tmp_path / "a")
    assert info.exit_code == 3
    tool.unlink()
    with pytest.raises(SpawnError) as caught:
        await sup.spawn(_spec("tool", working_dir=str(work), env=env), Limits(), tmp_path, _key())
    assert caught.value.message == f"cannot execute {tool}: No such file or directory"
    work.rmdir()
    with pytest.raises(SpawnError) as caught:
        await sup.spawn(_spec("true", working_dir=str(work)), Limits(), tmp_path, _key())
    assert caught.value.message == f"working directory {work}: No such file or directory"


async def test_stdin_is_the_stored_file_or_dev_null(sup: Spawner, tmp_path: Path) -> None:
    """The store writes a job's stdin file; a job the engine knows has none reads /dev/null
    (one fd shared by all such jobs, kept open across spawns) without a look."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stdin").write_bytes(b"from the file\n")
    _, info = await _run(sup, _spec("cat"), tmp_path / "a")
    assert (info.exit_code, (tmp_path / "a" / "stdout").read_bytes()) == (0, b"from the file\n")
    for name in ("b", "c"):  # twice: the shared /dev/null is not closed after a spawn
        (tmp_path / name).mkdir()
        (tmp_path / name / "stdin").write_bytes(b"not read\n")
        process = await sup.spawn(
            _spec("cat"), NO_LIMITS, tmp_path / name, _key(), stdin_file=False
        )
        assert (await process.wait()).exit_code == 0
        assert (tmp_path / name / "stdout").read_bytes() == b""


def test_resolve_searches_path_like_execvp(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "tool").write_text("")  # not executable: skipped, as execvp does
    (tmp_path / "b" / "tool").write_text("")
    (tmp_path / "b" / "tool").chmod(0o755)
    assert resolve_executable("tool", f"{tmp_path}/a:{tmp_path}/b", "/") == f"{tmp_path}/b/tool"
    with pytest.raises(SpawnError, match=f"permission denied: {tmp_path}/a/tool"):
        resolve_executable("tool", f"{tmp_path}/a", "/")
    assert resolve_executable("tool", "b", str(tmp_path)) == f"{tmp_path}/b/tool"


async def test_exit_code_and_signal(sup: Spawner, tmp_path: Path) -> None:
    _, info = await _run(sup, _spec("sh", "-c", "exit 7"), tmp_path / "a")
    assert (info.exit_code, info.signal) == (7, 0)
    _, info = await _run(sup, _spec("sh", "-c", "kill -TERM $$"), tmp_path / "b")
    assert (info.exit_code, info.signal) == (None, signal.SIGTERM)
    assert not info.oom_killed
    assert info.end_time >= time.time() - 60


async def test_usage_counts_cpu_and_memory(sup: Spawner, tmp_path: Path) -> None:
    busy = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"
    process, info = await _run(sup, _spec("sh", "-c", busy), tmp_path)
    assert info.exit_code == 0
    assert info.usage.user_cpu > 0.05
    assert info.usage.max_rss_bytes > 0
    assert info.end_time >= process.start_time


async def test_pid_and_start_time_are_recorded(sup: Spawner, tmp_path: Path) -> None:
    process = await sup.spawn(_spec("sleep", "10"), Limits(), tmp_path, _key())
    try:
        assert process.pid_start == process_start_ticks(process.pid)
        assert process.pid_start > 0
    finally:
        await process.stop(1.0)
    assert process_start_ticks(process.pid) is None or not _alive(process.pid)


def test_start_ticks_from_the_clock_match_proc() -> None:
    """chain.popen reads the start time from CLOCK_BOOTTIME around the fork instead of /proc
    when no tick boundary lies between: it must be what /proc/<pid>/stat says, every time."""
    known = 0
    for _ in range(200):
        fds = (os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY))
        try:
            child, ticks = chain.popen(["true"], "/bin/true", "/", {}, (fds[0], fds[1], fds[1]))
        finally:
            for fd in fds:
                os.close(fd)
        try:
            if ticks is not None:
                known += 1
                assert ticks == process_start_ticks(child.pid)
        finally:
            child.wait()
    assert known > 100  # a fork takes far less than the 10 ms of a tick


def test_process_start_ticks_of_missing_pid() -> None:
    assert process_start_ticks(2**22 + 1) is None
    assert process_start_ticks(os.getpid()) == process_start_ticks(os.getpid())


async def test_stop_kills_the_whole_tree(
    sup: Spawner, backend: CgroupBackend, tmp_path: Path
) -> None:
    _needs_cgroup(backend)
    pids = tmp_path / "pids"
    script = (
        'trap "" TERM; sleep 1000 & echo $! >> "$1"; '
        'setsid sleep 1000 & echo $! >> "$1"; sleep 1000 & echo $! >> "$1"; wait'
    )
    process = await sup.spawn(
        _spec("sh", "-c", script, "sh", str(pids)), Limits(), tmp_path, _key()
    )
    children = await _wait_for_lines(pids, 3)
    assert set(children) <= set(process.cgroup.pids())
    started = time.monotonic()
    info = await process.stop(0.3)
    assert time.monotonic() - started < 3
    assert (info.exit_code, info.signal) == (None, signal.SIGKILL)  # TERM was ignored
    for pid in [process.pid, *children]:
        assert not _alive(pid), pid
    await asyncio.wait_for(process.released(), 6)
    assert _left_in(process.cgroup) == []


def _left_in(group: JobCgroup) -> list[str]:
    """Pids in a released job's groups: they are gone, or (pooled) back in the pool empty."""
    return [p.read_text() for p in group.procs_files if p.exists() and p.read_text()]


async def test_stop_that_terms_in_time(sup: Spawner, tmp_path: Path) -> None:
    process = await sup.spawn(_spec("sleep", "1000"), Limits(), tmp_path, _key())
    info = await process.stop(5.0)
    assert (info.exit_code, info.signal) == (None, signal.SIGTERM)


async def test_stop_while_waiting_and_stop_is_idempotent(sup: Spawner, tmp_path: Path) -> None:
    process = await sup.spawn(_spec("sleep", "1000"), Limits(), tmp_path, _key())
    waiter = asyncio.create_task(process.wait())
    first, second = await asyncio.gather(process.stop(1.0), process.stop(1.0))
    assert await waiter is first
    assert second is first
    assert await process.stop(1.0) is first
    assert await process.wait() is first


async def test_stop_after_exit_returns_the_result(sup: Spawner, tmp_path: Path) -> None:
    process, info = await _run(sup, _spec("sh", "-c", "exit 3"), tmp_path)
    assert await process.stop(0.1) is info


async def test_cancelled_waiter_does_not_disturb_the_result(sup: Spawner, tmp_path: Path) -> None:
    process = await sup.spawn(_spec("sleep", "0.2"), Limits(), tmp_path, _key())
    waiter = asyncio.create_task(process.wait())
    await asyncio.sleep(0.01)
    waiter.cancel()
    info = await process.wait()
    assert info.exit_code == 0


async def test_leftovers_are_killed_when_the_main_process_exits(
    sup: Spawner, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    script = 'sleep 1000 & echo $! > "$1"; setsid sleep 1000 & echo $! >> "$1"; exit 0'
    process, info = await _run(sup, _spec("sh", "-c", script, "sh", str(pids)), tmp_path)
    assert info.exit_code == 0
    children = await _wait_for_lines(pids, 2)
    assert not _alive(children[0])  # same process group
    if process.cgroup.procs_files:  # the setsid one is only found through the cgroup
        assert not _alive(children[1])
    else:
        os.kill(children[1], signal.SIGKILL)


async def test_cgroups_are_removed_after_each_job(
    sup: Spawner, backend: CgroupBackend, tmp_path: Path
) -> None:
    _needs_cgroup(backend)
    limits = Limits(cpu_millis=1000, memory_bytes=256 << 20, pids_max=100)
    process, info = await _run(sup, _spec("true"), tmp_path, limits)
    assert info.exit_code == 0
    assert process.cgroup.procs_files
    await asyncio.wait_for(process.released(), 6)
    assert _left_in(process.cgroup) == []


# Two ways in: a job with a cpu or memory limit (or on cgroup v2) goes through the join
# shell; any other job on a v1 host (a pids limit too) is forked by a thread that sits in
# the job's groups.
JOIN_SHELL = Limits(memory_bytes=256 << 20)


def _thread_groups(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/cgroup").read_text()


@pytest.mark.parametrize("limits", [NO_LIMITS, JOIN_SHELL], ids=["forked-in-place", "shell"])
async def test_the_job_is_in_its_cgroups(
    sup: Spawner, backend: CgroupBackend, tmp_path: Path, limits: Limits
) -> None:
    _needs_cgroup(backend)
    key = _key()
    process = await sup.spawn(_spec("cat", "/proc/self/cgroup"), limits, tmp_path, key)
    await process.wait()
    lines = (tmp_path / "stdout").read_text().splitlines()
    joined = [line for line in lines if line.endswith(f"/{process.cgroup.name}")]
    assert len(joined) == len(process.cgroup.procs_files) >= 1
    if backend.name == "cgroup-v1":
        assert process.cgroup.by_thread == (limits is NO_LIMITS)
    # Every spawn thread is back in the server's own groups.
    own = Path("/proc/self/cgroup").read_text()
    spawners = [t for t in threading.enumerate() if t.name.startswith("jobworker-spawn")]
    assert spawners
    for thread in spawners:
        assert thread.native_id is not None
        assert _thread_groups(thread.native_id) == own


async def test_cpu_time_counts_the_whole_tree(
    sup: Spawner, backend: CgroupBackend, tmp_path: Path
) -> None:
    """A detached grandchild's CPU is in no rusage the server sees; the group counts it."""
    _needs_cgroup(backend)
    accounted = any(h.v2 for h in backend.hierarchies if backend.name == "cgroup-v2") or any(
        "cpuacct" in h.names and "cpu" not in h.names for h in backend.hierarchies
    )
    if not accounted:
        pytest.skip("no per-job CPU accounting here (cpuacct co-mounted with cpu, or none)")
    mark = tmp_path / "mark"
    burn = "i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done"
    # The grandchild is orphaned at once (its parent subshell exits): nobody waits for it.
    script = f"(setsid sh -c '{burn}; echo done > \"$0\"' {mark} &); "
    script += f"while [ ! -s {mark} ]; do sleep 0.05; done"
    _, info = await _run(sup, _spec("sh", "-c", script), tmp_path / "j")
    assert info.exit_code == 0
    assert mark.read_text() == "done\n"
    # rusage (what wait4 saw) holds only `sh` and its sleeps: a few milliseconds
    assert info.usage.user_cpu + info.usage.system_cpu >= 0.1, info.usage


def test_a_loop_on_its_own_thread_forks_its_jobs_itself_and_goes_home(
    backend: CgroupBackend, tmp_path: Path
) -> None:
    """How `jobworker serve` runs: the event loop on a thread that is not the main one
    forks each job itself, in the job's groups, and leaves them at once."""
    _needs_cgroup(backend)
    own = Path("/proc/self/cgroup").read_text()
    key = _key()
    seen: dict[str, object] = {}

    async def main() -> None:
        sup = Spawner(backend)
        try:
            process = await sup.spawn(_spec("cat", "/proc/self/cgroup"), NO_LIMITS, tmp_path, key)
            await process.wait()
            await asyncio.wait_for(process.released(), 6)
            seen["by_thread"] = process.cgroup.by_thread
            seen["name"] = process.cgroup.name
            seen["groups"] = len(process.cgroup.procs_files)
            seen["home"] = Path(f"/proc/self/task/{threading.get_native_id()}/cgroup").read_text()
            seen["spawn_threads"] = len(sup._pool._threads)  # none was needed
        finally:
            sup.close()

    thread = threading.Thread(target=lambda: asyncio.run(main()))
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert seen["home"] == own
    assert seen["spawn_threads"] == 0
    lines = (tmp_path / "stdout").read_text().splitlines()
    joined = [x for x in lines if x.endswith(f"/{seen['name']}")]
    assert len(joined) == seen["groups"] >= 1
    if backend.name == "cgroup-v1":
        assert seen["by_thread"]


@pytest.mark.skipif(PYTHON3 is None, reason="needs python3 to allocate memory")
async def test_memory_limit_oom_kills(sup: Spawner, backend: CgroupBackend, tmp_path: Path) -> None:
    _needs(backend, "memory")
    spec = _spec("python3", "-c", "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])")
    process, info = await _run(sup, spec, tmp_path, Limits(memory_bytes=64 << 20))
    assert process.cgroup.enforced.memory_bytes == 64 << 20
    assert info.oom_killed
    assert info.signal == signal.SIGKILL
    assert 0 < info.usage.max_rss_bytes <= 80 << 20


@pytest.mark.skipif(PYTHON3 is None, reason="needs python3 to allocate memory")
async def test_memory_within_limit_is_not_oom(
    sup: Spawner, backend: CgroupBackend, tmp_path: Path
) -> None:
    _needs(backend, "memory")
    spec = _spec("python3", "-c", "b = bytearray(20 << 20); b[::4096] = b'x' * len(b[::4096])")
    _, info = await _run(sup, spec, tmp_path, Limits(memory_bytes=128 << 20))
    assert (info.exit_code, info.oom_killed) == (0, False)
    assert info.usage.max_rss_bytes >= 20 << 20


async def test_pids_limit_stops_forks(sup: Spawner, backend: CgroupBackend, tmp_path: Path) -> None:
    _needs(backend, "pids")
    script = "for i in $(seq 50); do sleep 1 & done; wait"
    process, _ = await _run(sup, _spec("sh", "-c", script), tmp_path, Limits(pids_max=10))
    assert process.cgroup.enforced.pids_max == 10
    assert "fork" in (tmp_path / "stderr").read_text().lower()


async def test_cpu_limit_throttles(sup: Spawner, backend: CgroupBackend, tmp_path: Path) -> None:
    _needs(backend, "cpu")
    process = await sup.spawn(
        _spec("sh", "-c", "while :; do :; done"), Limits(cpu_millis=200), tmp_path, _key()
    )
    await asyncio.sleep(1.0)
    info = await process.stop(1.0)
    used = info.usage.user_cpu + info.usage.system_cpu
    assert 0.05 < used < 0.45, used  # about 0.2 s of a 1 s run; a shared machine is noisy


async def test_rlimit_backend_limits_address_space(tmp_path: Path) -> None:
    backend = CgroupBackend("none", rlimits=os.access("/usr/bin/prlimit", os.X_OK))
    if not backend.rlimits:
        pytest.skip("no /usr/bin/prlimit here")
    sup = Spawner(backend)
    limits = Limits(memory_bytes=512 << 20, cpu_millis=100)
    process, info = await _run(sup, _spec("sh", "-c", "ulimit -v"), tmp_path, limits)
    assert info.exit_code == 0
    assert (tmp_path / "stdout").read_text() == f"{512 << 10}\n"
    assert process.cgroup.unenforced == ("cpu_millis",)


async def test_no_cgroup_backend_runs_jobs(tmp_path: Path) -> None:
    sup = Spawner(CgroupBackend("none"))
    _, info = await _run(sup, _spec("sh", "-c", "echo $0", "x0"), tmp_path)
    assert info.exit_code == 0
    assert (tmp_path / "stdout").read_text() == "x0\n"


class _BrokenBackend(CgroupBackend):
    """A backend whose groups cannot be joined."""

    def create(self, key: str, limits: Limits) -> JobCgroup:
        missing = Path("/nonexistent-jobworker") / key
        return JobCgroup(key, ((Hierarchy("unified", missing.parent), missing),))


async def test_failing_to_join_the_cgroup_runs_nothing(tmp_path: Path) -> None:
    sup = Spawner(_BrokenBackend("cgroup-v2"))
    marker = tmp_path / "ran"
    with pytest.raises(SpawnError, match="cannot join cgroup: /nonexistent-jobworker/"):
        await sup.spawn(_spec("touch", str(marker)), Limits(), tmp_path, _key())
    assert not marker.exists()
    assert (tmp_path / "stderr").read_bytes() == b""


@pytest.mark.skipif(not ROOT, reason="cgroups need root")
async def test_a_spawn_thread_that_cannot_join_runs_nothing_and_goes_home(
    backend: CgroupBackend, tmp_path: Path
) -> None:
    """The second v1 group vanishes before the thread joins it: nothing runs, and the
    thread leaves the first group it had joined."""
    v1 = [h for h in backend.hierarchies if not h.v2]
    if len(v1) < 2:
        pytest.skip("needs two cgroup v1 hierarchies")
    key = _key()
    first = v1[0].parent / key
    first.mkdir()
    gone = v1[1].parent / key

    class _Vanishing(CgroupBackend):
        def create(self, key: str, limits: Limits) -> JobCgroup:
            return JobCgroup(key, ((v1[0], first), (v1[1], gone)), by_thread=True, homes=self.homes)

    sup = Spawner(_Vanishing("cgroup-v1"))
    marker = tmp_path / "ran"
    try:
        with pytest.raises(SpawnError, match=f"cannot join cgroup {key}: No such file"):
            await sup.spawn(_spec("touch", str(marker)), Limits(), tmp_path, key)
        assert not marker.exists()
        assert not first.exists()  # removed: the thread had left it (else EBUSY)
    finally:
        sup.close()


@pytest.mark.skipif(not ROOT, reason="cgroups need root")
async def test_kill_stale_kills_a_matching_process(
    sup: Spawner, backend: CgroupBackend, tmp_path: Path
) -> None:
    key = _key()
    process: Process = await sup.spawn(_spec("sleep", "1000"), Limits(), tmp_path, key)
    assert kill_stale(process.pid, process.pid_start, key, backend)
    info = await process.wait()
    assert info.signal == signal.SIGKILL


def test_kill_stale_spares_a_reused_pid(backend: CgroupBackend) -> None:
    proc = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    try:
        start = process_start_ticks(proc.pid)
        assert start is not None
        assert not kill_stale(proc.pid, start + 1, None, backend)
        assert proc.poll() is None
        assert kill_stale(proc.pid, start, None, backend)
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    assert not kill_stale(proc.pid, start, None, backend)  # gone: nothing to kill


@pytest.mark.skipif(not ROOT, reason="cgroups need root")
async def test_kill_stale_empties_the_cgroup_of_a_gone_main_process(
    sup: Spawner, backend: CgroupBackend, tmp_path: Path
) -> None:
    _needs_cgroup(backend)
    group = backend.create(_key(), Limits())
    script = 'echo $$ > "$1"; setsid sleep 1000 & echo $! > "$2"'
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(["sh", "-c", script, "sh", str(group.procs_files[0]), str(pidfile)])
    assert proc.wait(timeout=5) == 0
    (orphan,) = await _wait_for_lines(pidfile, 1)
    assert not kill_stale(proc.pid, 12345, group.name, backend)  # a pooled group's name
    deadline = time.monotonic() + 5
    while _alive(orphan) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not _alive(orphan)
    assert backend.open(group.name) is None


async def test_many_concurrent_jobs(sup: Spawner, tmp_path: Path) -> None:
    async def one(i: int) -> int | None:
        _, info = await _run(sup, _spec("sh", "-c", f"echo {i}"), tmp_path / str(i))
        return info.exit_code

    codes = await asyncio.gather(*(one(i) for i in range(40)))
    assert codes == [0] * 40
    assert all((tmp_path / str(i) / "stdout").read_text() == f"{i}\n" for i in range(40))


async def test_invalid_environment_is_a_spawn_error(
    sup: Spawner, backend: CgroupBackend, tmp_path: Path
) -> None:
    key = _key()
    with pytest.raises(SpawnError, match="invalid argv or environment"):
        await sup.spawn(_spec("true", env={"A": "x\0y"}), JOIN_SHELL, tmp_path, key)
    assert backend.open(key) is None


# ---- failures after the cgroup is made leave nothing behind -----------------------------------


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@contextlib.contextmanager
def _only_free_fds(free: int) -> Iterator[None]:
    """Lower RLIMIT_NOFILE and fill the fd table so that exactly `free` more fds can open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(_open_fds()) + 64, hard))
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
                break
        for _ in range(free):  # the highest ones: the kernel hands out the lowest free fd
            os.close(fillers.pop())
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(
    ("limits", "pooled", "free", "message"),
    [
        # stdio takes 2 (stdin is the one /dev/null fd all jobs share), writing pids.max 1
        # (and then closes it): the gate pipe fails
        (JOIN_SHELL, False, 3, "cannot create a pipe for the job: Too many open files"),
        (JOIN_SHELL, False, 5, "cannot start the job: Too many open files"),  # Popen's pipe
        # stdio takes 2: the thread cannot open a group's tasks file (its way home is
        # held open), so it never left
        (NO_LIMITS, False, 2, "cannot join cgroup {key}: Too many open files"),
        # stdio 2, one at a time to join: then Popen's own pipe (two) fails
        (NO_LIMITS, False, 3, "cannot start the job: Too many open files"),
        # a pooled group's tasks files are open already: joining needs no fd at all
        (NO_LIMITS, True, 2, "cannot start the job: Too many open files"),
    ],
)
async def test_emfile_after_the_cgroup_is_made_leaves_nothing(
    sup: Spawner,
    backend: CgroupBackend,
    tmp_path: Path,
    limits: Limits,
    pooled: bool,
    free: int,
    message: str,
) -> None:
    _needs_cgroup(backend)
    if limits is NO_LIMITS and backend.name != "cgroup-v1":
        pytest.skip("jobs are forked in place only on a cgroup v1 host")
    backend.pooling = pooled
    try:
        await _emfile_leaves_nothing(sup, backend, tmp_path, limits, free, message)
    finally:
        backend.pooling = True


async def _emfile_leaves_nothing(
    sup: Spawner, backend: CgroupBackend, tmp_path: Path, limits: Limits, free: int, message: str
) -> None:
    await _run(sup, _spec("true"), tmp_path / "warm")  # the thread and its way home exist
    key = _key()
    before = _open_fds()
    with _only_free_fds(free), pytest.raises(SpawnError) as caught:
        await sup.spawn(
            _spec("touch", str(tmp_path / "ran")), limits, tmp_path, key, stdin_file=False
        )
    assert caught.value.message == message.format(key=key)
    assert backend.open(key) is None
    assert _open_fds() == before
    assert not (tmp_path / "ran").exists()


async def test_pidfd_open_failure_kills_and_reaps_the_child(
    sup: Spawner, backend: CgroupBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mocked: os.pidfd_open cannot be made to fail for real here. The EMFILE it would
    meet cannot be arranged, since Popen itself needs two more fds just before it."""
    started: list[int] = []

    def failing(pid: int, flags: int = 0) -> int:
        started.append(pid)
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "pidfd_open", failing)
    key = _key()
    before = _open_fds()
    with pytest.raises(SpawnError, match="cannot watch the job's process: Too many open files"):
        await sup.spawn(_spec("sleep", "1000"), JOIN_SHELL, tmp_path, key)
    (pid,) = started
    with pytest.raises(ChildProcessError):  # reaped: no zombie, no untracked child
        os.waitpid(pid, os.WNOHANG)
    assert not _alive(pid)
    assert backend.open(key) is None
    assert _open_fds() == before
    await asyncio.wait_for(sup.drain(), 5.0)  # nothing of it left for drain() to wait for


@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root")
async def test_enospc_writing_stdin_is_a_spawn_error(
    sup: Spawner, backend: CgroupBackend, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "jobworker-test", str(small)]
    if subprocess.run(mount, check=False, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        key = _key()
        before = _open_fds()
        with pytest.raises(SpawnError) as caught:
            await sup.spawn(_spec("cat", stdin=b"x" * (1 << 20)), Limits(), small / "j", key)
        stdin = small / "j" / "stdin"
        assert caught.value.message == (
            f"cannot write stdin for the job to {stdin}: No space left on device"
        )
        assert not stdin.exists()  # the partial file is not left to fill the disk
        assert backend.open(key) is None
        assert _open_fds() == before
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.parametrize("bad", ["stdout", "stderr", "dir"])
async def test_unopenable_job_files_are_spawn_errors_naming_them(
    sup: Spawner, backend: CgroupBackend, tmp_path: Path, bad: str
) -> None:
    job_dir = tmp_path / "j"
    if bad == "dir":
        tmp_path.joinpath("file").write_text("")
        job_dir = tmp_path / "file" / "j"
        message = f"cannot create the job directory {job_dir}: Not a directory"
    else:
        (job_dir / bad).mkdir(parents=True)
        message = f"cannot open {bad} for the job: {job_dir / bad}: Is a directory"
    key = _key()
    before = _open_fds()
    with pytest.raises(SpawnError) as caught:
        await sup.spawn(_spec("true"), Limits(), job_dir, key)
    assert caught.value.message == message.format(key=key)
    assert backend.open(key) is None
    assert _open_fds() == before


# ---- the cgroup's removal never blocks the loop nor delays the result -------------------------


async def test_a_busy_cgroup_neither_blocks_the_loop_nor_delays_the_result(
    sup: Spawner, per_job: CgroupBackend, tmp_path: Path
) -> None:
    """The job leaves a child group in its groups: they stay busy (EBUSY) after it ends,
    as a v1 group often is for a moment after its last exit."""
    _needs_cgroup(per_job)
    key = _key()
    subs = [h.parent / key / "sub" for h in per_job.hierarchies]
    script = 'for d; do mkdir "$d" 2>/dev/null; done; exit 0'
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.002)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    try:
        process = await sup.spawn(
            _spec("sh", "-c", script, "sh", *map(str, subs)), Limits(), tmp_path, key
        )
        info = await process.wait()
        assert any(sub.is_dir() for sub in subs)
        await asyncio.sleep(0.1)  # retries happen meanwhile, never sleeping on the loop
        assert max(gaps) < 0.1, max(gaps)
        assert info.exit_code == 0
        assert per_job.open(key) is not None  # the result came while the group was busy
    finally:
        ticking.cancel()
        for sub in subs:
            with contextlib.suppress(FileNotFoundError):
                sub.rmdir()
    await asyncio.wait_for(process.released(), 1.0)
    assert per_job.open(key) is None


# ---- the join shell never runs the job's environment as code ----------------------------------


def test_join_shell_is_dash_where_there_is_one() -> None:
    if not any(os.access(p, os.X_OK) for p in ("/bin/dash", "/usr/bin/dash")):
        pytest.skip("no dash here")
    shell, sees_env = join_shell()
    assert sees_env
    assert os.path.basename(os.path.realpath(shell)) == "dash"


BASH = shutil.which("bash")


@pytest.mark.skipif(BASH is None, reason="needs bash")
async def test_a_non_dash_join_shell_never_sees_the_jobs_environment(
    backend: CgroupBackend, tmp_path: Path
) -> None:
    """With bash as the join shell, an imported function (BASH_FUNC_echo%%) would replace
    the shell's `echo $$ > cgroup.procs`: user code outside the cgroup. Shown first with bash
    given the job's environment, then checked with the fixed environment plus env(1)."""
    _needs_cgroup(backend)
    assert BASH is not None
    marker = tmp_path / "pwned"
    env = {
        "BASH_FUNC_echo%%": f"() {{ builtin echo pwned > {marker}; }}",
        "SHELLOPTS": "xtrace",
        "FOO": "bar baz=qux",
    }
    unsafe = Spawner(backend, shell=(BASH, True))
    only_function = {"BASH_FUNC_echo%%": env["BASH_FUNC_echo%%"]}
    await _run(unsafe, _spec("true", env=only_function), tmp_path / "unsafe", JOIN_SHELL)
    assert marker.exists()  # the hazard is real: the function ran and nothing joined
    marker.unlink()

    safe = Spawner(backend, shell=(BASH, False))
    _, info = await _run(safe, _spec("env", env=env), tmp_path / "env", JOIN_SHELL)
    assert info.exit_code == 0
    assert not marker.exists()
    assert (tmp_path / "env" / "stderr").read_bytes() == b""  # no xtrace either
    lines = (tmp_path / "env" / "stdout").read_text().splitlines()
    job_env = dict(line.split("=", 1) for line in lines)
    assert job_env["FOO"] == "bar baz=qux"
    assert job_env["BASH_FUNC_echo%%"] == env["BASH_FUNC_echo%%"]  # the job still gets it
    assert job_env["PATH"] == safe.base_path
    assert set(job_env) == {*env, "PATH", "HOME", "LANG"}

    key = _key()
    spec = _spec("cat", "/proc/self/cgroup", env=env)
    process = await safe.spawn(spec, JOIN_SHELL, tmp_path / "cg", key)
    assert (await process.wait()).exit_code == 0
    lines = (tmp_path / "cg" / "stdout").read_text().splitlines()
    joined = [line for line in lines if line.endswith(f"/{key}")]
    assert len(joined) == len(process.cgroup.procs_files) >= 1


@pytest.mark.skipif(BASH is None, reason="needs bash")
async def test_without_dash_an_env_name_env1_would_misread_is_refused(
    backend: CgroupBackend, tmp_path: Path
) -> None:
    _needs_cgroup(backend)
    assert BASH is not None
    key = _key()
    safe = Spawner(backend, shell=(BASH, False))
    with pytest.raises(SpawnError, match="invalid argv or environment"):
        await safe.spawn(_spec("true", env={"": "x"}), JOIN_SHELL, tmp_path, key)
    assert backend.open(key) is None


async def test_a_pooled_group_removed_from_outside_is_replaced(
    backend: CgroupBackend, sup: Spawner, tmp_path: Path
) -> None:
    """Someone removes the idle pooled groups (an operator cleaning up by hand): the next
    job still runs, in groups made afresh, and reports its usage from them."""
    _needs_cgroup(backend)
    if not backend.pooling or backend.name != "cgroup-v1":
        pytest.skip("groups are pooled for jobs forked in place: cgroup v1 hosts only")
    first, info = await _run(sup, _spec("true"), tmp_path / "a")
    assert info.exit_code == 0
    await first.released()  # its groups are back in the pool, empty
    removed = 0
    for hierarchy in backend.hierarchies:
        for group in hierarchy.parent.glob("pool-*"):
            with contextlib.suppress(OSError):  # busy: a group in use elsewhere
                group.rmdir()
                removed += 1
    assert removed
    script = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done"
    second, info = await _run(sup, _spec("sh", "-c", script), tmp_path / "b")
    assert info.exit_code == 0, info
    assert second.cgroup.name != first.cgroup.name  # new groups, not the removed ones
    assert info.usage.user_cpu + info.usage.system_cpu > 0.01


async def test_the_forking_threads_own_cpu_is_not_the_jobs(
    backend: CgroupBackend, sup: Spawner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job forked in place is born in its groups because the forking thread sits in them
    for the fork; that thread's CPU time there (Popen's own work) is the server's, and
    is not reported as the job's."""
    _needs_cgroup(backend)
    if backend.name != "cgroup-v1":
        pytest.skip("jobs are forked in place on cgroup v1 hosts only")
    real = chain.popen

    def slow_popen(*args: Any, **kwargs: Any) -> Any:
        burn_until = time.thread_time() + 0.1  # the thread's CPU, inside the job's groups
        while time.thread_time() < burn_until:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(chain, "popen", slow_popen)
    process, info = await _run(sup, _spec("true"), tmp_path / "j")
    assert process.cgroup.by_thread or process.cgroup.name.startswith("pool-")
    assert info.exit_code == 0
    assert info.usage.user_cpu + info.usage.system_cpu < 0.05  # `true`: ~1 ms; not the 0.1 s


# ---- jobs as another user: nothing of the job's reaches a root process ----------------------

NOBODY = "nobody"


def _nobody() -> Any:
    import pwd

    return pwd.getpwnam(NOBODY)


@pytest.fixture(params=["helper", "setpriv"])
def dropping(backend: CgroupBackend, request: pytest.FixtureRequest) -> Iterator[Spawner]:
    """A spawner that drops to a job's user through jobworker-exec, or through setpriv and
    env(1) as on a host without the helper."""
    helper = exec_helper.find()
    if request.param == "helper" and helper is None:
        pytest.fail(f"no usable jobworker-exec: {exec_helper.unusable(exec_helper.default_path())}")
    spawner = Spawner(backend, exec_helper=helper if request.param == "helper" else False)
    yield spawner
    spawner.close()


@pytest.mark.skipif(not ROOT, reason="dropping to another user needs root")
@pytest.mark.parametrize("limits", [NO_LIMITS, JOIN_SHELL], ids=["forked-in-place", "shell"])
async def test_no_byte_of_a_job_as_nobody_reaches_a_root_process(
    dropping: Spawner,
    backend: CgroupBackend,
    tmp_path: Path,
    shared: Path,
    preload: Any,
    limits: Limits,
) -> None:
    _needs_cgroup(backend)
    # Decoys where a step run by name or by a relative path would find them.
    for name in ("setpriv", "env", "prlimit", "sh", "dash"):
        decoy = shared / name
        decoy.write_text(f"#!/bin/sh\necho decoy {name} ran >&2\nexit 99\n")
        decoy.chmod(0o755)
    env = {"LD_PRELOAD": str(preload.library), "PATH": f".:{shared}:/usr/bin:/bin"}
    spec = _spec("id", "-u", env=env, working_dir=str(shared))
    process = await dropping.spawn(spec, limits, tmp_path, _key(), NOBODY)
    info = await process.wait()
    assert (info.exit_code, (tmp_path / "stdout").read_text()) == (0, f"{_nobody().pw_uid}\n")
    assert (tmp_path / "stderr").read_text() == ""
    loads = preload.loads()
    assert [load for load in loads if load.uid == 0 or load.euid == 0] == []
    assert [(load.uid, load.exe, load.cwd) for load in loads] == [
        (_nobody().pw_uid, "/usr/bin/id", str(shared))
    ]


@pytest.mark.skipif(not ROOT, reason="dropping to another user needs root")
@pytest.mark.parametrize("limits", [NO_LIMITS, JOIN_SHELL], ids=["forked-in-place", "shell"])
async def test_a_job_as_nobody_gets_its_env_dir_and_argv_exactly(
    dropping: Spawner, backend: CgroupBackend, tmp_path: Path, shared: Path, limits: Limits
) -> None:
    _needs_cgroup(backend)
    (shared / "-tool").symlink_to("/usr/bin/cat")  # argv[0] starting with "-"
    env = {"-x": "1", "FOO": "a b=c", "PATH": f"{shared}:/usr/bin:/bin", "EMPTY": ""}
    (shared / "A=B").touch()  # cat reads it, relative to the working directory
    spec = _spec("-tool", "/proc/self/cmdline", "--", "A=B", env=env, working_dir=str(shared))
    _, info = await _run(dropping, spec, tmp_path / "argv", limits, NOBODY)
    assert info.exit_code == 0
    assert (tmp_path / "argv" / "stdout").read_bytes() == b"-tool\0/proc/self/cmdline\0--\0A=B\0"
    process = await dropping.spawn(_spec("env", env=env), limits, tmp_path / "env", _key(), NOBODY)
    assert (await process.wait()).exit_code == 0
    lines = (tmp_path / "env" / "stdout").read_text().splitlines()
    assert dict(line.split("=", 1) for line in lines) == {
        **env,
        "HOME": _nobody().pw_dir,
        "USER": NOBODY,
        "LOGNAME": NOBODY,
        "LANG": "C.UTF-8",
    }
    script = "id -u; id -g; pwd"
    spec = _spec("sh", "-c", script, working_dir=str(shared))
    process = await dropping.spawn(spec, limits, tmp_path / "who", _key(), NOBODY)
    assert (await process.wait()).exit_code == 0
    who = _nobody()
    expected = f"{who.pw_uid}\n{who.pw_gid}\n{shared}\n"
    assert (tmp_path / "who" / "stdout").read_text() == expected


@pytest.mark.skipif(not ROOT, reason="dropping to another user needs root")
async def test_what_the_user_cannot_reach_fails_with_a_message_naming_it(
    dropping: Spawner, backend: CgroupBackend, tmp_path: Path, shared: Path
) -> None:
    private = shared / "priv"
    (private / "pub").mkdir(parents=True)
    (private / "pub").chmod(0o755)
    private.chmod(0o700)  # root may enter it, nobody may not
    tool = private / "pub" / "tool"
    tool.write_text("#!/bin/sh\necho ran\n")
    tool.chmod(0o755)
    dropping.default_working_dir = str(shared)
    (shared / "a=b").symlink_to("/usr/bin/true")
    cases = [
        (
            _spec("true", working_dir="priv/pub"),
            f"working directory {private}/pub: permission denied for Unix user nobody",
        ),
        (_spec(str(tool)), f"permission denied for Unix user nobody: {tool}"),
        (
            _spec("tool", env={"PATH": str(private / "pub")}),
            f"permission denied for Unix user nobody: {tool}",
        ),
    ]
    if dropping.exec_helper is None:  # env(1) would read it as a variable
        cases.append((_spec("a=b", env={"PATH": str(shared)}), "argv[0] 'a=b' contains '='"))
    for spec, message in cases:
        key = _key()
        with pytest.raises(SpawnError) as caught:
            await dropping.spawn(spec, NO_LIMITS, tmp_path, key, NOBODY)
        assert message in caught.value.message
        assert backend.open(key) is None
    assert not (tmp_path / "stdout").exists()  # nothing started
    # The same job as the server's own user (root) runs.
    _, info = await _run(dropping, _spec(str(tool), working_dir="priv/pub"), tmp_path)
    assert (info.exit_code, (tmp_path / "stdout").read_text()) == (0, "ran\n")
    if dropping.exec_helper is not None:  # the helper takes any argv[0]
        spec = _spec("a=b", env={"PATH": str(shared)})
        _, info = await _run(dropping, spec, tmp_path / "eq", NO_LIMITS, NOBODY)
        assert info.exit_code == 0


@pytest.mark.skipif(not ROOT, reason="dropping to another user needs root")
def test_the_helper_takes_the_jobs_environment_by_fd_never_in_its_command_line(
    dropping: Spawner, tmp_path: Path
) -> None:
    env = {"SECRET": "hunter2-token", "PATH": "/usr/bin:/bin"}
    who = dropping.account(NOBODY)
    assert who is not None
    last, block = last_link(_spec("true", env=env), "/", env, who, dropping.exec_helper)
    if dropping.exec_helper is None:  # setpriv and env(1) take it as arguments
        assert block is None and "SECRET=hunter2-token" in last
        return
    assert block == b"SECRET=hunter2-token\0PATH=/usr/bin:/bin\0"
    assert not [arg for arg in last if "hunter2" in arg]
    assert last[0] == dropping.exec_helper


@pytest.mark.skipif(not ROOT, reason="only root runs the helper")
def test_a_helper_others_could_have_written_is_not_used(tmp_path: Path) -> None:
    helper = exec_helper.build(tmp_path / "bin" / "jobworker-exec")
    assert exec_helper.unusable(helper) == ""
    (tmp_path / "bin").chmod(0o777)
    assert exec_helper.unusable(helper) == f"{tmp_path / 'bin'}: writable by others than root"
    (tmp_path / "bin").chmod(0o755)
    os.chown(helper, 65534, 65534)
    assert exec_helper.unusable(helper) == f"{helper}: owned by uid 65534, not root"
    assert (
        exec_helper.unusable(tmp_path / "none") == f"{tmp_path / 'none'}: No such file or directory"
    )


@pytest.mark.skipif(not ROOT, reason="needs root")
def test_root_and_the_servers_own_user_drop_nothing(sup: Spawner) -> None:
    assert sup.account("") is None
    assert sup.account("root") is None  # the server's own uid: no setpriv, no env(1)
    who = sup.account(NOBODY)
    assert who is not None and who.uid == _nobody().pw_uid
    with pytest.raises(SpawnError, match="no Unix user 'no-such-user-here'"):
        sup.account("no-such-user-here")
