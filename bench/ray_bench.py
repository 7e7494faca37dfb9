"""The Ray executor's figures (issue 15): `python -m bench --only ray` (or this module).

On a two-node Ray cluster made here and stopped afterwards (tests/integration/ray_cluster.py:
the head on a veth, the second node in a network namespace, one CPU each; needs root):

- ray_throughput: N `true` jobs through RayExecutor against N plain Ray tasks that run the
  same `true` with subprocess.run, same cluster, each repetition paired (aim >= 0.5x);
- ray_follow_throughput: a follower (StreamBatchLogs, as `logs -f`) of one job writing M
  MiB on the Ray executor, against the same job on the local executor of the same server.

Without Ray (or root, or ip(8)) the section prints why and measures nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.context import Context
from bench.harness import MiB, ServerProcess, aio_channel, send_batch, stub
from bench.result import Result
from bench.streams import Received, consume, follow_call, writer_job
from jobworker.engine.executor import Launch
from jobworker.engine.ray_executor import RayExecutor
from jobworker.model import JobSpec, Limits
from jobworker.v1 import jobworker_pb2 as pb

if TYPE_CHECKING:
    from tests.integration.ray_cluster import RayCluster

JOBS = 1000  # the figure (fewer with --quick: the throughput batch's size)
FOLLOW_BYTES = 256 * MiB
PLAIN = """
import json, subprocess, sys, time, ray
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], log_to_driver=False)
@ray.remote(num_cpus=1, max_retries=0)
def true():
    subprocess.run(["true"], check=True)
ray.get([true.remote() for _ in range(3)])  # warm: workers started on both nodes
began = time.perf_counter()
ray.get([true.remote() for _ in range(int(sys.argv[3]))])
print(json.dumps({"seconds": time.perf_counter() - began}))
"""


def _launch(tmp: Path, key: str, *argv: str) -> Launch:
    job_dir = tmp / key
    job_dir.mkdir()
    for name in ("stdout", "stderr"):
        (job_dir / name).touch()
    return Launch(key, 1, JobSpec(name=key, argv=argv), Limits(), job_dir, "", False)


async def _ray_jobs(executor: RayExecutor, tmp: Path, n: int) -> float:
    """Seconds for `n` `true` jobs started at once through the executor, to their ends."""

    async def one(i: int, *argv: str) -> None:
        handle = await executor.start(_launch(tmp, f"t{i}", *argv))
        end = await handle.wait()
        assert end.exit_code == 0, end

    # Warm, as the plain run; jobs long enough to go through (and start) each node's agent.
    await asyncio.gather(*(one(-i, "sleep", "0.2") for i in range(1, 5)))
    began = time.perf_counter()
    await asyncio.gather(*(one(i, "true") for i in range(n)))
    return time.perf_counter() - began


def _plain_tasks(cluster: RayCluster, n: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PLAIN, cluster.address, cluster.head_ip, str(n)],
        env=cluster.env(),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out.splitlines()[-1])["seconds"])


def _throughput(ctx: Context, cluster: RayCluster, tmp: Path) -> Result:
    jobs = min(JOBS, ctx.sizes.schedule_jobs)
    runs: list[float] = []
    plain: list[float] = []

    async def measure() -> None:
        executor = RayExecutor("bench", cluster.address, 1, token_file=cluster.token_file)
        try:
            for rep in range(ctx.sizes.reps):
                folder = tmp / f"jobs-{rep}"
                folder.mkdir()
                plain.append(jobs / await asyncio.to_thread(_plain_tasks, cluster, jobs))
                runs.append(jobs / await _ray_jobs(executor, folder, jobs))
                ctx.log(f"RayExecutor {runs[-1]:.0f} jobs/s | plain Ray tasks {plain[-1]:.0f}/s")
                shutil.rmtree(folder)
        finally:
            await executor.close(stop_jobs=True)

    asyncio.run(measure())
    result = Result(
        name="ray_throughput",
        metric=f"jobs/s, {jobs} `true` jobs through the Ray executor (two-node local cluster)",
        runs=runs,
        baseline_metric=f"{jobs} plain Ray tasks running `true` with subprocess.run, same cluster",
        baseline_runs=plain,
        aim="ratio >= 0.5",
        paired=True,
    )
    result.met = (result.ratio or 0) >= 0.5
    return result


async def _follow_once(server: ServerProcess, ctx: Context, nbytes: int, executor: str) -> float:
    """MB/s of a follower of one job writing `nbytes`, first to last byte."""
    requests = [
        pb.ScheduleBatchRequest(options=pb.BatchOptions(executor=executor)),
        pb.ScheduleBatchRequest(job=writer_job(nbytes)),
    ]
    async with aio_channel(server.address, ctx.pki) as channel:
        await channel.channel_ready()
        cid = await send_batch(stub(channel), requests)
        got = await consume(follow_call(channel, cid), Received())
    if got.nbytes != nbytes:
        raise RuntimeError(f"the {executor} follower got {got.nbytes} bytes of {nbytes}")
    shutil.rmtree(server.data_dir / "batches" / cid, ignore_errors=True)
    return got.rate


def _follow(ctx: Context, cluster: RayCluster) -> Result:
    nbytes = min(FOLLOW_BYTES, ctx.sizes.follow_bytes)
    table = {"kind": "ray", "address": cluster.address, "token_file": str(cluster.token_file)}
    server = ctx.server("ray", **{"executors.cluster": table}).start()
    runs: list[float] = []
    local: list[float] = []
    try:
        asyncio.run(_follow_once(server, ctx, 1, "cluster"))  # the bridge and agents started
        for _ in range(ctx.sizes.reps):
            local.append(asyncio.run(_follow_once(server, ctx, nbytes, "local")))
            runs.append(asyncio.run(_follow_once(server, ctx, nbytes, "cluster")))
            ctx.log(f"follow: Ray job {runs[-1]:.0f} MB/s | local job {local[-1]:.0f} MB/s")
    finally:
        server.stop()
    return Result(
        name="ray_follow_throughput",
        metric=f"MB/s, one follower of a Ray job writing {nbytes // MiB} MiB (first to last byte)",
        runs=runs,
        baseline_metric="MB/s, the same job on the local executor of the same server",
        baseline_runs=local,
        aim="a figure (no aim)",
        paired=True,
    )


def ray(ctx: Context) -> list[Result]:
    """Both figures (module doc), or none with the reason printed."""
    try:  # the cluster the tests make (imported here: the rest of the bench needs no tests)
        from tests.integration.ray_cluster import start_cluster, why_not
    except ImportError as exc:
        print(f"  ray skipped: {exc}", flush=True)
        return []
    if why := why_not():
        print(f"  ray skipped: {why}", flush=True)
        return []
    # Short: Ray's socket paths live under it. On tmpfs where there is one: the figure sets
    # two executors side by side, and on this machine's disk a job folder made after a
    # churn of deletes costs up to 1 ms of CPU (docs/benchmarks.md, "Where the data goes"):
    # 0.36-0.50 there against 0.71-0.77 on tmpfs, in runs minutes apart.
    shm = Path("/dev/shm")
    tmp = Path(tempfile.mkdtemp(prefix="jwrb-", dir=shm if os.access(shm, os.W_OK) else None))
    try:
        cluster = start_cluster(tmp / "c", cpus=1)
        try:
            return [_throughput(ctx, cluster, tmp), _follow(ctx, cluster)]
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from bench.__main__ import RESULTS, main

    # Its own results file: a full run's latest.json stays as it was.
    sys.exit(main(["--only", "ray", "--out", str(RESULTS / "ray.json"), *sys.argv[1:]]))
