"""Running jobs (issue 13): a restart with 1,000 jobs running, and what they cost in memory.

One scenario gives three figures. A server (default config but for max_concurrent, data on
disk) is measured idle; it gets 1,000 `sleep 300` jobs in one batch and is measured again
once they all run; then it is killed (SIGKILL, by its pid) and a new server is started on
the same data_dir and port: the time from its start to its first answered GetBatch of that
batch. With issue 13's job supervisor (its pid in `data_dir/supervisor.pid`), the jobs go
on and the new server takes them back; without it they are reported LOST. Then the batch is
cancelled and the servers, and a supervisor still running, are stopped by their pids.

Baselines: the same start on an empty data_dir; a bare Python process holding as many
`sleep` children (Popen, two log files each), for memory.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from grpc import aio

from bench.context import Context
from bench.harness import (
    MiB,
    ServerProcess,
    aio_channel,
    free_port,
    median,
    read_pss,
    read_rss,
    schedule,
    stop_supervisor,
    stub,
    supervisor_pid,
    write_config,
)
from bench.result import Result
from jobworker.v1 import jobworker_pb2 as pb

KiB = 1024
SLEEP = ["sleep", "300"]
_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 20),
]

# The memory baseline: a bare Python parent of N `sleep` children, each with its two log
# files; says when it is idle and when they run, holds them until stdin closes, then kills its own.
HOLDER = """
import os, subprocess, sys
n, folder, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
print("idle", flush=True)
sys.stdin.readline()
procs = []
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
for i in range(n):
    out = os.open(f"{folder}/{i}.out", flags, 0o644)
    err = os.open(f"{folder}/{i}.err", flags, 0o644)
    procs.append(subprocess.Popen(argv, close_fds=True, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=err))
    os.close(out)
    os.close(err)
print("running", flush=True)
sys.stdin.read()
for p in procs:
    p.kill()
for p in procs:
    p.wait()
"""


def settled(pids: list[int], settle: float = 2.0) -> tuple[int, int]:
    """(PSS, RSS) of these processes together after `settle` s: medians of three samples."""
    time.sleep(settle)
    pss, rss = [], []
    for _ in range(3):
        pss.append(sum(read_pss(pid) for pid in pids))
        rss.append(sum(read_rss(pid) for pid in pids))
        time.sleep(0.2)
    return int(median(pss)), int(median(rss))


def processes(server: ServerProcess) -> list[int]:
    """The server and its job supervisor, when there is one (it may write its pid file just
    after the server is ready: a second's grace)."""
    deadline = time.monotonic() + 1.0
    while (pid := server.supervisor_pid()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return [server.pid] + ([pid] if pid is not None else [])


async def _states(client: Any, cid: str) -> dict[str, Any]:
    """How many of the batch's jobs are in each state, and the message of the first job that
    ended (under "why")."""
    batch = (
        await client.GetBatch(pb.GetBatchRequest(correlation_id=cid, log_tail_bytes=0), timeout=60)
    ).batch
    states: dict[str, Any] = dict(
        Counter(pb.JobState.Name(job.state).removeprefix("JOB_STATE_") for job in batch.jobs)
    )
    ended = [job.message for job in batch.jobs if job.HasField("end_time")]
    if ended:
        states["why"] = ended[0]
    return states


async def _start_running(server: ServerProcess, ctx: Context, n: int) -> tuple[str, float]:
    """Schedule `n` sleeps; return once all run: (cid, seconds it took)."""
    async with aio_channel(server.address, ctx.pki) as channel:
        client = stub(channel)
        start = time.monotonic()
        cid = await schedule(client, [pb.JobSpec(argv=SLEEP) for _ in range(n)])
        while True:
            states = await _states(client, cid)
            if states.get("RUNNING") == n:
                return cid, time.monotonic() - start
            if time.monotonic() - start > 120 or "why" in states:
                raise RuntimeError(f"the sleeps did not all start: {states}")
            await asyncio.sleep(0.2)


async def _first_getbatch(server: ServerProcess, ctx: Context, cid: str) -> float:
    """Seconds from the process's start to its first answer to GetBatch (a client dials from
    t=0, 10 ms reconnect backoff). NOT_FOUND counts as an answer (the empty baseline)."""
    async with aio_channel(server.address or "", ctx.pki, _FAST_RECONNECT) as channel:
        request = pb.GetBatchRequest(correlation_id=cid, log_tail_bytes=0)
        try:
            await stub(channel).GetBatch(request, wait_for_ready=True, timeout=120)
        except aio.AioRpcError as exc:
            if exc.code().name != "NOT_FOUND":
                raise
        return time.monotonic() - server.started_at


def _timed_start(ctx: Context, config: Path, address: str, cid: str) -> tuple[ServerProcess, float]:
    """A server started on `config`, and the seconds to its first answer to GetBatch."""
    server = ServerProcess(config, address=address)
    server.launch()
    try:
        first = asyncio.run(_first_getbatch(server, ctx, cid))
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server, first


async def _cancel(server: ServerProcess, ctx: Context, cid: str) -> dict[str, Any]:
    """Cancel the batch (a no-op once it ended) and wait for its end; the jobs' states."""
    async with aio_channel(server.address, ctx.pki) as channel:
        client = stub(channel)
        await client.CancelBatch(pb.CancelBatchRequest(correlation_id=cid), timeout=60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = await _states(client, cid)
            if not states.get("RUNNING") and not states.get("QUEUED"):
                return states
            await asyncio.sleep(0.2)
    raise RuntimeError(f"batch {cid} still running after cancel: {states}")


def _holder_memory(ctx: Context, n: int) -> tuple[int, int]:
    """(idle PSS, PSS with `n` children) of the bare Python parent."""
    folder = ctx.fresh_dir("holder", on_disk=True)
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", HOLDER, str(n), str(folder), *SLEEP],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        proc.stdout.readline()
        idle, _ = settled([proc.pid])
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.stdout.readline()
        loaded, _ = settled([proc.pid])
    finally:
        proc.stdin.close()  # it kills and reaps its own children
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return idle, loaded


def running(ctx: Context) -> list[Result]:
    n = ctx.sizes.running_jobs
    port = free_port()
    address = f"127.0.0.1:{port}"
    folder = ctx.fresh_dir("running", on_disk=True)
    sections: dict[str, dict[str, object]] = {"jobs": {"max_concurrent": n + 8}}
    config = write_config(folder / "jobworker.toml", ctx.pki, folder / "data", port, **sections)
    empty = write_config(folder / "empty.toml", ctx.pki, folder / "empty-data", port)
    runs: list[float] = []
    base_runs: list[float] = []
    idle_pss: list[float] = []
    per_job: list[float] = []
    rows: list[dict[str, Any]] = []
    supervisors: set[int] = set()
    for rep in range(ctx.sizes.reps):
        server, base = _timed_start(ctx, empty, address, "00000000")
        server.stop()
        server = ServerProcess(config).start()
        ctx.note_limits(server)
        second: ServerProcess | None = None
        cid = ""
        try:
            pids = processes(server)
            supervisors.update(pids[1:])
            idle, idle_rss = settled(pids)
            cid, took = asyncio.run(_start_running(server, ctx, n))
            loaded, loaded_rss = settled(processes(server))
            supervisor = supervisor_pid(server.data_dir)
            server.kill()  # SIGKILL, by its pid: jobs and supervisor are left as they are
            second, first = _timed_start(ctx, config, address, cid)
            after = asyncio.run(_states_once(second, ctx, cid))
            supervisors.update(processes(second)[1:])
            ended = asyncio.run(_cancel(second, ctx, cid))
        finally:
            if second is not None:
                second.stop()
            server.stop()
            for pid in supervisors:  # a supervisor left running: by the pid of its file
                stop_supervisor(pid if Path(f"/proc/{pid}").exists() else None)
        runs.append(first)
        base_runs.append(base)
        idle_pss.append(idle / MiB)
        per_job.append((loaded - idle) / n / KiB)
        rows.append(
            {
                "start_all_running_s": took,
                "supervisor_before_kill": supervisor,
                "states_after_restart": after,
                "states_after_cancel": ended,
                "idle_pss_mib": idle / MiB,
                "idle_rss_mib": idle_rss / MiB,
                "running_pss_mib": loaded / MiB,
                "running_rss_mib": loaded_rss / MiB,
                "processes": len(pids),
            }
        )
        ctx.log(
            f"rep {rep + 1}: {n} sleeps running in {took:.1f}s; PSS idle {idle / MiB:.1f} MiB, "
            f"with them {loaded / MiB:.1f} MiB (+{(loaded - idle) / n / KiB:.1f} KiB a job; "
            f"RSS {idle_rss / MiB:.1f} -> {loaded_rss / MiB:.1f}); restart to first GetBatch "
            f"{first:.2f}s (empty data_dir {base:.2f}s); jobs after restart {after}"
        )
    holder_idle, holder_loaded = _holder_memory(ctx, n)
    holder_per_job = (holder_loaded - holder_idle) / n / KiB
    ctx.log(
        f"bare Python parent: PSS idle {holder_idle / MiB:.1f} MiB, with {n} sleeps "
        f"{holder_loaded / MiB:.1f} MiB (+{holder_per_job:.1f} KiB a child)"
    )
    attached = rows[-1]["states_after_restart"].get("RUNNING", 0)
    note = f"{attached} of {n} jobs still RUNNING after the restart" + (
        "" if attached == n else f" (taken back by none: {rows[-1]['states_after_restart']})"
    )
    pss_note = "server" + (" + supervisor" if any(r["processes"] > 1 for r in rows) else "")
    return [
        Result(
            name="restart_running",
            metric=f"s from a new server's start to its first answered GetBatch, after a "
            f"SIGKILL with {n} `sleep 300` jobs running; {note}",
            runs=runs,
            baseline_metric="s to the first answered GetBatch on an empty data_dir",
            baseline_runs=base_runs,
            ratio_meaning="restart / empty start (lower is better)",
            aim="< 3 s",
            met=median(runs) < 3.0,
            extra={"reps": rows},
        ),
        Result(
            name="memory_idle",
            metric=f"PSS MiB of a fresh idle {pss_note}, data on disk",
            runs=idle_pss,
            baseline_metric="PSS MiB of a bare idle Python process (the memory baseline)",
            baseline_runs=[holder_idle / MiB],
            aim="< 100 MiB",
            met=median(idle_pss) < 100,
        ),
        Result(
            name="memory_per_running_job",
            metric=f"KiB more PSS ({pss_note}) a running job, with {n} `sleep` running",
            runs=per_job,
            baseline_metric=f"KiB more PSS a child of a bare Python parent of {n} `sleep` "
            "(Popen objects, two log files each)",
            baseline_runs=[holder_per_job],
            aim="< 16 KiB",
            met=median(per_job) < 16,
        ),
    ]


async def _states_once(server: ServerProcess, ctx: Context, cid: str) -> dict[str, Any]:
    async with aio_channel(server.address, ctx.pki) as channel:
        return await _states(stub(channel), cid)
