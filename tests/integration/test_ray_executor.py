"""RayExecutor against a real two-node Ray cluster (tests/integration/ray_cluster.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobworker.engine.executor import ExecutorUnavailable, Known, Launch, SpawnError
from jobworker.engine.jobrun import outcome
from jobworker.engine.queues import Run
from jobworker.engine.ray_executor import RayExecutor, RayHandle
from jobworker.model import JobSpec, JobState, Limits
from tests.integration.ray_cluster import RayCluster, why_not

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(why_not()), reason=f"Ray cluster: {why_not()}"),
    pytest.mark.timeout(240),
]


@pytest.fixture
async def executor(cluster: RayCluster, tmp_path: Path) -> RayExecutor:
    ex = RayExecutor(
        "cluster",
        cluster.address,
        1,
        token_file=cluster.token_file,
        log_path=tmp_path / "bridge.log",
    )
    yield ex  # type: ignore[misc]
    await ex.close(stop_jobs=True)


_KEYS = iter(range(1_000_000))


def launch(tmp: Path, *argv: str, stdin: bytes = b"", **spec: object) -> Launch:
    """A Launch with its job folder (empty stdout and stderr, as the store makes them)."""
    key = f"ray-test-{next(_KEYS)}"
    job_dir = tmp / key
    job_dir.mkdir()
    for name in ("stdout", "stderr"):
        (job_dir / name).touch()
    if stdin:
        (job_dir / "stdin").write_bytes(stdin)
    limits = spec.pop("limits", Limits())
    job = JobSpec(name=key, argv=argv, stdin=stdin, **spec)  # type: ignore[arg-type]
    return Launch(key, 1, job, limits, job_dir, "", bool(stdin))  # type: ignore[arg-type]


def processes_with(marker: str) -> list[int]:
    """Pids of this host's processes whose command line holds `marker` (every node of the
    test cluster is on this host)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    found.append(int(name))
    return found


async def test_output_is_byte_exact_with_exit_code(executor: RayExecutor, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096 + b"no newline at the end \x00\xff"
    source = tmp_path / "data"
    source.write_bytes(data)
    job = launch(tmp_path, "sh", "-c", f"cat {source}; cat {source} >&2; exit 3")
    handle = await executor.start(job)
    end = await handle.wait()
    assert end.exit_code == 3 and end.signal == 0 and not end.lost
    assert (job.job_dir / "stdout").read_bytes() == data
    assert (job.job_dir / "stderr").read_bytes() == data
    assert handle.node and handle.pid > 0


async def test_env_stdin_and_working_dir(executor: RayExecutor, tmp_path: Path) -> None:
    job = launch(
        tmp_path,
        "sh",
        "-c",
        'cat; echo "$GREETING"; pwd',
        stdin=b"from stdin\n",
        env={"GREETING": "hello"},
        working_dir="/tmp",
    )
    end = await (await executor.start(job)).wait()
    assert end.exit_code == 0
    assert (job.job_dir / "stdout").read_bytes() == b"from stdin\nhello\n/tmp\n"


async def test_a_follower_sees_output_live(executor: RayExecutor, tmp_path: Path) -> None:
    job = launch(tmp_path, "sh", "-c", "echo first; sleep 3; echo second")
    handle = await executor.start(job)
    deadline = time.monotonic() + 2.5
    while (job.job_dir / "stdout").read_bytes() != b"first\n":
        assert time.monotonic() < deadline, "the first line did not arrive while it ran"
        await asyncio.sleep(0.02)
    assert not handle.ended
    await handle.wait()
    assert (job.job_dir / "stdout").read_bytes() == b"first\nsecond\n"


async def test_64_mib_streams_whole(executor: RayExecutor, tmp_path: Path) -> None:
    source = tmp_path / "big"
    with source.open("wb") as file:
        file.write(os.urandom(64 << 20))
    job = launch(tmp_path, "cat", str(source))
    end = await (await executor.start(job)).wait()
    assert end.exit_code == 0
    digest = hashlib.sha256
    out = job.job_dir / "stdout"
    assert out.stat().st_size == 64 << 20
    assert digest(out.read_bytes()).digest() == digest(source.read_bytes()).digest()


async def test_stop_ends_the_whole_tree(executor: RayExecutor, tmp_path: Path) -> None:
    marker = f"300.{os.getpid()}1"  # sleep takes fractions: a command line no one else has
    job = launch(tmp_path, "sh", "-c", f"sleep {marker} & sleep {marker}; echo never")
    handle = await executor.start(job)
    await asyncio.sleep(0.5)
    assert len(processes_with(marker)) >= 2
    end = await handle.stop(grace=2.0)
    assert end.signal == signal.SIGTERM and end.exit_code is None
    deadline = time.monotonic() + 5
    while processes_with(marker):
        assert time.monotonic() < deadline, "a process of the job outlived its stop"
        await asyncio.sleep(0.1)


async def test_kill_when_term_is_ignored(executor: RayExecutor, tmp_path: Path) -> None:
    job = launch(tmp_path, "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done")
    handle = await executor.start(job)
    while not (job.job_dir / "stdout").read_bytes():
        await asyncio.sleep(0.05)
    started = time.monotonic()
    end = await handle.stop(grace=1.0)
    assert end.signal == signal.SIGKILL
    assert time.monotonic() - started >= 1.0


async def test_jobs_spread_over_both_nodes(
    cluster: RayCluster, executor: RayExecutor, tmp_path: Path
) -> None:
    handles = await asyncio.gather(
        *(executor.start(launch(tmp_path, "sleep", "1")) for _ in range(2))
    )
    assert {h.node for h in handles} == {cluster.head_ip, cluster.node_ip}
    for handle in handles:
        assert (await handle.wait()).exit_code == 0


async def test_cpus_are_a_ray_resource(executor: RayExecutor, tmp_path: Path) -> None:
    # Two nodes of one CPU. Three jobs of one CPU: the last starts only once one has ended.
    whole = await asyncio.gather(
        *(executor.start(launch(tmp_path, "sleep", "1")) for _ in range(3))
    )
    assert sum(h.ended for h in whole) >= 1
    await asyncio.gather(*(h.wait() for h in whole))
    # Four of half a CPU run at once: all have started while none has ended.
    half = Limits(cpu_millis=500)
    halves = await asyncio.gather(
        *(executor.start(launch(tmp_path, "sleep", "8", limits=half)) for _ in range(4))
    )
    assert not any(h.ended for h in halves)
    await asyncio.gather(*(h.stop(1.0) for h in halves))


def cgroup_dirs(job: Launch, controllers: tuple[str, ...]) -> list[Path]:
    """The job's cgroup folders on the head (this host, outside the test's namespace: the
    second node, inside it, sees no /sys/fs/cgroup and enforces memory by prlimit)."""
    name = f"{job.key}_{job.attempt}"  # ray_limits names it after the job's id
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return [Path("/sys/fs/cgroup/jobworker-ray", name)]
    return [Path("/sys/fs/cgroup", c, "jobworker-ray", name) for c in controllers]


async def on_each_node(
    cluster: RayCluster, executor: RayExecutor, jobs: list[Launch]
) -> dict[str, tuple[Launch, RayHandle]]:
    """Two jobs of one CPU each, started together: one per node, by node IP."""
    handles = await asyncio.gather(*(executor.start(job) for job in jobs))
    placed = {h.node: (job, h) for job, h in zip(jobs, handles, strict=True)}
    assert set(placed) == {cluster.head_ip, cluster.node_ip}
    return placed  # type: ignore[return-value]


needs_cgroups = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/sys/fs/cgroup").is_dir(), reason="needs root and cgroups"
)


@needs_cgroups
async def test_memory_limit_oom_kills_on_the_node(
    cluster: RayCluster, executor: RayExecutor, tmp_path: Path
) -> None:
    hog = f"sleep 1; exec {sys.executable} -c 'b = bytearray(300 << 20); print(len(b))'"
    limits = Limits(cpu_millis=1000, memory_bytes=64 << 20)
    jobs = [launch(tmp_path, "sh", "-c", hog, limits=limits) for _ in range(2)]
    placed = await on_each_node(cluster, executor, jobs)
    job, handle = placed[cluster.head_ip]
    end = await handle.wait()
    assert end.oom_killed and end.signal == signal.SIGKILL, end
    state, message = outcome(Run(0), end, limits)
    assert (state, message) == (JobState.FAILED, "killed: out of memory (limit 64 MiB)")
    assert not any(d.exists() for d in cgroup_dirs(job, ("memory", "cpu")))
    # The second node has no cgroups: prlimit --as fails the allocation instead.
    job, handle = placed[cluster.node_ip]
    end = await handle.wait()
    assert end.exit_code == 1 and not end.oom_killed
    assert b"MemoryError" in (job.job_dir / "stderr").read_bytes()


@needs_cgroups
async def test_pids_max_fails_a_fork_past_it(
    cluster: RayCluster, executor: RayExecutor, tmp_path: Path
) -> None:
    forks = "sleep 1; for i in 1 2 3 4 5 6 7 8; do sleep 30 & done; wait"
    limits = Limits(cpu_millis=1000, pids_max=4)
    jobs = [launch(tmp_path, "sh", "-c", forks, limits=limits) for _ in range(2)]
    placed = await on_each_node(cluster, executor, jobs)
    job, handle = placed[cluster.head_ip]
    end = await asyncio.wait_for(handle.wait(), 20)
    assert end.exit_code not in (None, 0), end
    assert b"fork" in (job.job_dir / "stderr").read_bytes().lower()
    assert not any(d.exists() for d in cgroup_dirs(job, ("pids", "cpu")))
    await placed[cluster.node_ip][1].stop(1.0)  # no pids limit there: its sleeps run on


@needs_cgroups
async def test_a_pids_limit_alone_is_enforced_without_a_join_step(
    cluster: RayCluster, executor: RayExecutor, tmp_path: Path
) -> None:
    # The default limits' case: the job is forked straight into its pids group (no `sh`
    # link), and the Ray worker's thread that forked it goes back to its own groups.
    forks = 'echo "$PPID"; sleep 1; for i in 1 2 3 4 5 6 7 8; do sleep 30 & done; wait'
    limits = Limits(pids_max=4)
    jobs = [launch(tmp_path, "sh", "-c", forks, limits=limits) for _ in range(2)]
    placed = await on_each_node(cluster, executor, jobs)
    job, handle = placed[cluster.head_ip]
    (folder,) = cgroup_dirs(job, ("pids",))
    assert str(handle.pid) in (folder / "cgroup.procs").read_text().split()
    assert (folder / "pids.max").read_text().strip() == "4"
    cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[:2] == [b"sh", b"-c"]  # the job itself: no join shell before it
    end = await asyncio.wait_for(handle.wait(), 20)
    assert end.exit_code not in (None, 0), end
    assert b"fork" in (job.job_dir / "stderr").read_bytes().lower()
    assert not folder.exists()
    worker = int((job.job_dir / "stdout").read_text().split()[0])
    for task in Path(f"/proc/{worker}/task").iterdir():
        assert "jobworker-ray" not in (task / "cgroup").read_text(), task
    await placed[cluster.node_ip][1].stop(1.0)  # no cgroups there: its sleeps run on


@needs_cgroups
async def test_a_job_is_in_its_cgroup_while_it_runs(
    cluster: RayCluster, executor: RayExecutor, tmp_path: Path
) -> None:
    limits = Limits(cpu_millis=1000, memory_bytes=256 << 20, pids_max=50)
    jobs = [launch(tmp_path, "sleep", "3", limits=limits) for _ in range(2)]
    placed = await on_each_node(cluster, executor, jobs)
    job, handle = placed[cluster.head_ip]
    dirs = cgroup_dirs(job, ("memory", "cpu", "pids"))
    for folder in dirs:
        assert str(handle.pid) in (folder / "cgroup.procs").read_text().split(), folder
    limit_files = {"memory.limit_in_bytes": str(256 << 20), "pids.max": "50"}
    limit_files |= {"cpu.cfs_quota_us": "100000", "memory.max": str(256 << 20)}
    for folder in dirs:
        for name, value in limit_files.items():
            if (folder / name).exists():
                assert (folder / name).read_text().strip() == value, (folder, name)
    assert (await handle.wait()).exit_code == 0
    assert not any(d.exists() for d in dirs)
    assert (await placed[cluster.node_ip][1].wait()).exit_code == 0


async def test_a_request_no_node_can_meet_fails_to_start(
    executor: RayExecutor, tmp_path: Path
) -> None:
    with pytest.raises(SpawnError, match="no node of the Ray cluster offers 64 CPUs"):
        await executor.start(launch(tmp_path, "true", limits=Limits(cpu_millis=64_000)))
    with pytest.raises(SpawnError, match="memory"):
        await executor.start(launch(tmp_path, "true", limits=Limits(memory_bytes=1 << 50)))


async def test_a_command_that_cannot_start(executor: RayExecutor, tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match=r"cannot execute /no/such/command: .* \(on node"):
        await executor.start(launch(tmp_path, "/no/such/command"))
    with pytest.raises(SpawnError, match="working directory /no/such/dir"):
        await executor.start(launch(tmp_path, "true", working_dir="/no/such/dir"))


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to nobody needs root")
async def test_runs_as_the_launch_user(executor: RayExecutor, tmp_path: Path) -> None:
    job = launch(tmp_path, "id", "-u")
    job = Launch(job.key, 1, job.spec, job.limits, job.job_dir, "nobody", False)
    end = await (await executor.start(job)).wait()
    assert end.exit_code == 0, (job.job_dir / "stderr").read_bytes()
    assert (job.job_dir / "stdout").read_bytes() == b"65534\n"


async def test_unreachable_cluster_is_unavailable_naming_it(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there
    ex = RayExecutor("gone", address, 1, connect_timeout=30)
    began = time.monotonic()
    with pytest.raises(ExecutorUnavailable, match=f"Ray cluster at {address} is unreachable"):
        await ex.start(launch(tmp_path, "true"))
    with pytest.raises(ExecutorUnavailable, match=address):  # remembered: fails at once
        await ex.start(launch(tmp_path, "true"))
    assert time.monotonic() - began < 15
    await ex.close(stop_jobs=True)


async def test_a_worker_dying_as_its_job_starts_leaves_no_process(
    executor: RayExecutor, tmp_path: Path
) -> None:
    # The job kills its task's worker (its parent) within the task's first 50 ms, before
    # the task hands it to its node's agent: the agent, told at the start, kills it.
    marker = f"300.{os.getpid()}4"
    script = f"sleep 0.02; kill -9 $PPID; sleep {marker} & sleep {marker}"
    handle = await executor.start(launch(tmp_path, "sh", "-c", script))
    end = await asyncio.wait_for(handle.wait(), 60)
    assert outcome(Run(0), end, Limits())[0] == JobState.LOST
    assert end.lost == (
        f"its Ray worker died as the job started (on node {handle.node}); its processes were killed"
    )
    deadline = time.monotonic() + 5
    while processes_with(marker):
        assert time.monotonic() < deadline, "a process of the job outlived its worker"
        await asyncio.sleep(0.1)


async def test_a_restarted_server_reports_lost_and_kills_leftovers(
    cluster: RayCluster, executor: RayExecutor, tmp_path: Path
) -> None:
    marker = f"300.{os.getpid()}2"
    handle = await executor.start(launch(tmp_path, "sh", "-c", f"sleep {marker}; :"))
    assert isinstance(handle, RayHandle)
    known = Known(handle.job_id.split("/")[0], 1, handle.pid, handle.pid_start, node=handle.node)
    link = executor._link
    assert link is not None
    link.process.kill()  # the server died with its bridge: Ray ends the task's worker
    end = await handle.wait()
    assert "lost" in end.lost and cluster.address in end.lost
    after = RayExecutor(
        "cluster", cluster.address, 1, token_file=cluster.token_file, log_path=tmp_path / "b2"
    )
    try:
        recovered = await after.recover([known])
    finally:
        await after.close(stop_jobs=True)
    attempt, info = recovered[known.key]
    assert attempt == 1 and not isinstance(info, RayHandle)
    assert info.lost.startswith(f"server restarted while it ran on node {handle.node}")  # type: ignore[union-attr]
    # Its node's agent kills it once Ray kills its task's worker: before the restarted
    # server's reap gets there, or the reap does.
    assert "a Ray job is not taken back after a restart" in info.lost  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while processes_with(marker):
        assert time.monotonic() < deadline, "the job outlived its server and bridge"
        await asyncio.sleep(0.2)


async def test_a_lost_node_makes_its_job_lost(
    cluster: RayCluster, executor: RayExecutor, tmp_path: Path
) -> None:
    marker = f"300.{os.getpid()}3"
    handles = await asyncio.gather(
        *(executor.start(launch(tmp_path, "sleep", marker)) for _ in range(2))
    )
    on_node = next(h for h in handles if h.node == cluster.node_ip)
    cluster.kill_node()
    try:
        end = await asyncio.wait_for(on_node.wait(), 60)
        assert end.lost.startswith(f"node lost: {cluster.node_ip}"), end.lost
    finally:
        # On a real lost node the machine is gone; here its jobs live on this host.
        with contextlib.suppress(ProcessLookupError):
            os.kill(on_node.pid, signal.SIGKILL)
        cluster.start_node()
    other = next(h for h in handles if h is not on_node)
    assert (await other.stop(1.0)).signal == signal.SIGTERM
    subprocess.run(["true"], check=True)
