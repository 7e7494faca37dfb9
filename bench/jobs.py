"""Batch figures (issues 2 and 3): memory on record, restart time; the baseline spawn loop
and one timed batch, which bench.peers and bench.ab use."""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

from bench.context import Context
from bench.harness import (
    MiB,
    aio_channel,
    batch_requests,
    cpu_seconds,
    follow_to_end,
    free_port,
    median,
    read_rss,
    schedule,
    send_batch,
    stub,
    wait_batches_ended,
    write_config,
)
from bench.harness import ServerProcess as Server
from bench.result import Result
from jobworker.v1 import jobworker_pb2 as pb

TRUE = shutil.which("true") or "/bin/true"
WIDTH = 8  # jobs.max_concurrent of the schedule benchmark, and the baseline's processes in flight


# --- the spawn loop and one batch (bench.peers, bench.ab) -------------------------------------


def spawn_loop(n: int, width: int = WIDTH, logs: Path | None = None) -> float:
    """The baseline: spawn and reap `n` `true` processes, `width` in flight; processes/s.

    Popen with close_fds and /dev/null for stdin (as a job gets), reaped with os.wait4 on
    the pid whose pidfd became readable (the server reaps the same way). With `logs`, each
    process writes its stdout and stderr to two files of its own there, `<i>.out` and
    `<i>.err`, made just before its Popen.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    start = time.perf_counter()
    running: dict[int, tuple[subprocess.Popen[bytes], int]] = {}  # pidfd -> (process, pidfd)
    poller = select.poll()
    started = done = 0
    while done < n:
        while started < n and len(running) < width:
            if logs is None:
                proc = subprocess.Popen([TRUE], close_fds=True, stdin=subprocess.DEVNULL)
            else:
                out = os.open(logs / f"{started}.out", flags, 0o644)
                err = os.open(logs / f"{started}.err", flags, 0o644)
                try:
                    proc = subprocess.Popen(
                        [TRUE], close_fds=True, stdin=subprocess.DEVNULL, stdout=out, stderr=err
                    )
                finally:
                    os.close(out)
                    os.close(err)
            pidfd = os.pidfd_open(proc.pid)
            running[pidfd] = (proc, pidfd)
            poller.register(pidfd, select.POLLIN)
            started += 1
        for fd, _mask in poller.poll(10_000):
            proc, _ = running.pop(fd)
            poller.unregister(fd)
            os.close(fd)
            _, status, _ = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            done += 1
    return n / (time.perf_counter() - start)


def _machine_ticks() -> tuple[int, int]:
    """(all, idle) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


async def schedule_once(
    server: Server, ctx: Context, n: int, *, poll: bool = False, tag: str = "", packed: bool = True
) -> dict[str, float]:
    """One batch of `n` `true` jobs: jobs/s from ScheduleBatch to the batch's end.

    With `poll`: the end is the batch's end_time as the server recorded it (same host,
    same clock), found by asking ListBatches ten times a second: no observer in the way,
    and no polling delay in the figure. Without: the end is the end of a StreamBatchLogs
    follower of the batch, which also makes the server send three events a job. Also
    where the CPU went meanwhile.
    """
    # The stream's messages are made before the clock starts (the baseline's argv lists
    # are not timed either): the figure starts when the client starts sending.
    requests = batch_requests([pb.JobSpec(argv=["true"]) for _ in range(n)])
    async with aio_channel(server.address, ctx.pki) as channel:
        client = stub(channel)
        await channel.channel_ready()
        supervisor = server.supervisor_pid()
        cpu0, _ = cpu_seconds(server.pid)
        sup0, children0 = cpu_seconds(supervisor) if supervisor else (0.0, 0.0)
        ticks0, me0 = _machine_ticks(), os.times()
        start, wall = time.perf_counter(), time.time()
        cid = await send_batch(client, requests)
        scheduled = time.perf_counter()
        if poll:
            await wait_batches_ended(client, timeout=600, interval=0.1)
            page = await client.ListBatches(pb.ListBatchesRequest(page_size=1), timeout=30)
            (summary,) = page.batches
            assert summary.correlation_id == cid
            elapsed = summary.end_time.ToNanoseconds() / 1e9 - wall
        else:
            await follow_to_end(client, cid, timeout=600, packed=packed)
            elapsed = time.perf_counter() - start
        cpu1, _ = cpu_seconds(server.pid)
        sup1, children1 = cpu_seconds(supervisor) if supervisor else (0.0, 0.0)
        ticks1, me1 = _machine_ticks(), os.times()
    total, idle = ticks1[0] - ticks0[0], ticks1[1] - ticks0[1]
    figures = {
        "jobs_per_s": n / elapsed,
        "schedule_rpc_s": scheduled - start,
        "server_cpu_ms_per_job": (cpu1 - cpu0) / n * 1000,
        "supervisor_cpu_ms_per_job": (sup1 - sup0) / n * 1000,
        "jobs_cpu_ms_per_job": (children1 - children0) / n * 1000,
        "bench_cpu_ms_per_job": (me1.user + me1.system - me0.user - me0.system) / n * 1000,
        "machine_busy": (total - idle) / total if total else float("nan"),
    }
    label = f" ({tag})" if tag else "         " if poll else " (follow)"
    if tag and not poll:
        label = f" (follow, {tag})"
    ctx.log(
        f"jobworker{label:9}: {figures['jobs_per_s']:7.1f} jobs/s  "
        f"(CPU per job: server {figures['server_cpu_ms_per_job']:.2f} ms, supervisor "
        f"{figures['supervisor_cpu_ms_per_job']:.2f} ms, job processes "
        f"{figures['jobs_cpu_ms_per_job']:.2f} ms, bench {figures['bench_cpu_ms_per_job']:.2f}"
        f" ms; machine {figures['machine_busy']:.0%} busy)"
    )
    return figures


def fs_type(path: Path) -> str:
    """The type of the file system `path` is on (tmpfs, ext4, ...), from /proc/self/mounts."""
    best, kind = "", "?"
    target = str(path.resolve())
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


# --- 2. memory_10k_ended --------------------------------------------------------------------


async def _populate(server: Server, ctx: Context, batches: int, per_batch: int) -> float:
    """Schedule `batches` batches of `per_batch` `true` jobs, as many RPCs in flight as the
    server's default server.max_uploads_per_identity lets one identity have; wait for all."""
    start = time.perf_counter()
    async with aio_channel(server.address, ctx.pki) as channel:
        client = stub(channel)
        gate = asyncio.Semaphore(4)
        jobs = [pb.JobSpec(argv=["true"]) for _ in range(per_batch)]

        async def one() -> str:
            async with gate:
                return await schedule(client, jobs)

        cids = await asyncio.gather(*(one() for _ in range(batches)))
        await wait_batches_ended(client, timeout=1800)
    ctx.record_info = {"batches": batches, "jobs_per_batch": per_batch, "first_cid": cids[0]}
    return time.perf_counter() - start


def _settled_rss(pid: int, settle: float = 2.0) -> int:
    """RSS after `settle` seconds of idle: the median of three samples."""
    time.sleep(settle)
    samples = []
    for _ in range(3):
        samples.append(read_rss(pid))
        time.sleep(0.2)
    return int(median(samples))


def _hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_10k_ended(ctx: Context) -> Result:
    """Server RSS with the record batches ended on disk, against a fresh idle server."""
    s = ctx.sizes
    server = ctx.server("record")
    server.start()
    ctx.note_limits(server)
    try:
        idle = _settled_rss(server.pid)
        ctx.log(f"idle RSS of a fresh server: {idle / MiB:.1f} MiB")
        took = _populate_record(server, ctx)
        loaded = _settled_rss(server.pid)
        hwm = _hwm(server.pid)
        ctx.log(
            f"RSS with {s.record_batches * s.record_batch_jobs} ended jobs on record: "
            f"{loaded / MiB:.1f} MiB (peak {hwm / MiB:.1f} MiB; made in {took:.1f}s)"
        )
    finally:
        server.stop()
    jobs = s.record_batches * s.record_batch_jobs
    return Result(
        name="memory_10k_ended",
        metric=f"server RSS MiB, {jobs} ended jobs on record "
        f"({s.record_batches} batches x {s.record_batch_jobs})",
        runs=[loaded / MiB],
        baseline_metric="RSS MiB of a fresh idle server (issue 2's figure)",
        baseline_runs=[idle / MiB],
        ratio_meaning="RSS with the jobs / idle RSS",
        aim="< 100 MiB",
        met=loaded / MiB < 100,
        extra={
            "peak_rss_mib": hwm / MiB,
            "populate_seconds": took,
            "jobs_per_second_populating": jobs / took,
        },
    )


def _populate_record(server: Server, ctx: Context) -> float:
    s = ctx.sizes
    took = asyncio.run(_populate(server, ctx, s.record_batches, s.record_batch_jobs))
    config_dir = server.config.parent
    ctx.record_dir = config_dir / "data"
    return took


def ensure_record(ctx: Context) -> Path:
    """The data folder with the record batches, made now if memory_10k_ended did not run."""
    if ctx.record_dir is None:
        ctx.log("making the record batches for the restart benchmark")
        server = ctx.server("record").start()
        ctx.note_limits(server)
        try:
            _populate_record(server, ctx)
        finally:
            server.stop()
    assert ctx.record_dir is not None
    return ctx.record_dir


# --- 3. restart_1000_batches ----------------------------------------------------------------

_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 20),
]


async def _first_rpc(server: Server, ctx: Context, address: str) -> float:
    """Seconds from the process's start to its first answered RPC (a client dials from t=0)."""
    async with aio_channel(address, ctx.pki, _FAST_RECONNECT) as channel:
        client = stub(channel)
        await client.ListBatches(
            pb.ListBatchesRequest(page_size=1), wait_for_ready=True, timeout=120
        )
        return time.monotonic() - server.started_at


def _start_timed(ctx: Context, config: Path, address: str) -> tuple[float, float, int]:
    """(to server_ready, to first RPC, RSS once ready) of one server start; then it stops."""
    server = Server(config)
    server.launch()
    try:
        to_rpc = asyncio.run(_first_rpc(server, ctx, address))
        to_ready = server.wait_ready()
        rss = read_rss(server.pid)
    finally:
        server.stop()
    return to_ready, to_rpc, rss


def restart_1000_batches(ctx: Context) -> Result:
    """Start time with the record batches on disk, against a start on an empty data folder."""
    record = ensure_record(ctx)
    folder = ctx.fresh_dir("restart")
    port = free_port()
    address = f"127.0.0.1:{port}"
    loaded = write_config(folder / "loaded.toml", ctx.pki, record, port)
    empty = write_config(folder / "empty.toml", ctx.pki, folder / "empty-data", port)
    runs: list[float] = []
    base: list[float] = []
    ready: list[float] = []
    base_ready: list[float] = []
    rss: list[float] = []
    _start_timed(ctx, empty, address)  # warm: imports in the page cache
    for _ in range(ctx.sizes.restart_reps):
        r0, f0, _ = _start_timed(ctx, empty, address)
        r1, f1, m1 = _start_timed(ctx, loaded, address)
        base_ready.append(r0)
        base.append(f0)
        ready.append(r1)
        runs.append(f1)
        rss.append(m1 / MiB)
        ctx.log(
            f"empty: ready {r0:.3f}s, first RPC {f0:.3f}s | "
            f"{ctx.record_info.get('batches')} batches: ready {r1:.3f}s, first RPC {f1:.3f}s, "
            f"RSS {m1 / MiB:.1f} MiB"
        )
    return Result(
        name="restart_1000_batches",
        metric=f"s from process start to first answered RPC, {ctx.record_info.get('batches')} "
        f"batches x {ctx.record_info.get('jobs_per_batch')} jobs on disk",
        runs=runs,
        baseline_metric="s from process start to first answered RPC, empty data_dir",
        baseline_runs=base,
        ratio_meaning="loaded start / empty start (lower is better)",
        aim="< 2 s to serving",
        met=median(runs) < 2.0,
        extra={
            "to_server_ready_s": ready,
            "to_server_ready_median_s": median(ready),
            "empty_to_server_ready_s": base_ready,
            "rss_after_restart_mib": rss,
        },
    )
