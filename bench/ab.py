"""`python -m bench.ab A B`: schedule_throughput's batch on two versions of the server.

Noise on this shared machine moves a figure by more than most changes do (docs/
benchmarks.md, "Noise"): two runs an hour apart cannot tell a 3 % change. This runs two
servers at once, one per version, and alternates the same 1,000-job batch between them
(and the baseline spawn loop), so both see the same machine. A and B are each a git
revision (`HEAD~2`, a branch) or `.` for the working tree; prints jobs/s and server CPU a
job for each, with every run. The same code against itself differs by under 1 %.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import (
    ServerProcess,
    aio_channel,
    batch_requests,
    cpu_seconds,
    make_pki,
    send_batch,
    stub,
    wait_batches_ended,
    write_config,
)
from bench.jobs import WIDTH, spawn_loop
from jobworker.v1 import jobworker_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def source_tree(version: str, into: Path) -> Path:
    """The `src` folder of `version`: the working tree's for ".", else `git archive`d."""
    if version == ".":
        return ROOT / "src"
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", version, "src"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


async def one_batch(server: ServerProcess, pki: Path, jobs: int) -> tuple[float, float]:
    """(jobs/s from ScheduleBatch to the batch's recorded end, server CPU ms a job)."""
    requests = batch_requests([pb.JobSpec(argv=["true"]) for _ in range(jobs)])
    async with aio_channel(server.address, pki) as channel:
        client = stub(channel)
        await channel.channel_ready()
        cpu0 = cpu_seconds(server.pid)[0]
        wall = time.time()
        await send_batch(client, requests)
        await wait_batches_ended(client, timeout=600, interval=0.1)
        page = await client.ListBatches(pb.ListBatchesRequest(page_size=1), timeout=30)
        elapsed = page.batches[0].end_time.ToNanoseconds() / 1e9 - wall
        cpu = cpu_seconds(server.pid)[0] - cpu0
    return jobs / elapsed, cpu / jobs * 1000


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("a", help='a git revision, or "." for the working tree')
    parser.add_argument("b", help='a git revision, or "." for the working tree')
    parser.add_argument("--reps", type=int, default=6, help="batches on each (default 6)")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs a batch (default 1000)")
    args = parser.parse_args()
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # tmpfs: not the disk
    work = Path(tempfile.mkdtemp(prefix="jobworker-ab-", dir=shm))
    servers: list[ServerProcess] = []
    try:
        pki = make_pki(work / "pki")
        for k, version in enumerate((args.a, args.b)):
            src = source_tree(version, work / f"tree{k}")
            config = write_config(
                work / f"server{k}.toml",
                pki,
                work / f"data{k}",
                jobs={"max_concurrent": WIDTH},
                server={"cgroup_root": f"jobworker-ab-{os.getpid()}-{k}"},  # both at once
            )
            servers.append(ServerProcess(config, env={"PYTHONPATH": str(src)}).start())
        for server in servers:  # warm up: imports, pooled cgroups, the page cache
            asyncio.run(one_batch(server, pki, 200))
        runs: list[list[tuple[float, float]]] = [[] for _ in servers]
        base: list[float] = []
        for rep in range(args.reps):
            base.append(spawn_loop(args.jobs))
            order = list(range(len(servers)))
            for k in order if rep % 2 == 0 else order[::-1]:
                runs[k].append(asyncio.run(one_batch(servers[k], pki, args.jobs)))
            print(f"rep {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    baseline = statistics.median(base)
    print(f"baseline loop: {baseline:.0f} processes/s  runs {[round(x) for x in base]}")
    for version, rows in zip((args.a, args.b), runs, strict=True):
        rate = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        print(
            f"{version:>12}: {rate:.0f} jobs/s (ratio {rate / baseline:.3f}), server "
            f"{cpu:.3f} ms a job  runs {[round(r[0]) for r in rows]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
