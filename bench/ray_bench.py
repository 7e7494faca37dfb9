"""The Ray executor's figures: `python -m bench.ray_bench [--jobs N] [--mib M]`.

On a two-node Ray cluster made here (tests/integration/ray_cluster.py: the head on a veth,
the second node in a network namespace, one CPU each; needs root):

- throughput of N `true` jobs through RayExecutor against N plain Ray tasks that run the
  same `true` with subprocess.run, same cluster, same run (the issue asks >= 0.5x);
- following one job that writes M MiB: through RayExecutor (bytes cross Ray's object
  store and the bridge into the job's file) against a local process writing its file
  directly (the local executor's way), each read by a follower as the file grows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobworker.engine.executor import Launch
from jobworker.engine.ray_executor import RayExecutor
from jobworker.model import JobSpec, Limits
from tests.integration.ray_cluster import RayCluster, start_cluster, why_not

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
    async def one(i: int) -> None:
        handle = await executor.start(_launch(tmp, f"t{i}", "true"))
        end = await handle.wait()
        assert end.exit_code == 0, end

    await asyncio.gather(*(one(i) for i in range(-3, 0)))  # warm, as the plain run
    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
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


async def _follow(path: Path, size: int, done: asyncio.Future[object]) -> float:
    """Read `path` as it grows until `size` bytes are read: seconds from now."""
    began = time.perf_counter()
    seen = 0
    with path.open("rb") as file:
        while seen < size:
            data = file.read(1 << 20)
            if data:
                seen += len(data)
            elif done.done() and os.fstat(file.fileno()).st_size == seen:
                raise RuntimeError(f"the job ended after {seen} of {size} bytes")
            else:
                await asyncio.sleep(0.001)
    return time.perf_counter() - began


async def _follow_ray(executor: RayExecutor, tmp: Path, mib: int) -> float:
    launch = _launch(tmp, "big", "head", "-c", f"{mib}M", "/dev/zero")
    began = time.perf_counter()
    handle = await executor.start(launch)
    done = asyncio.ensure_future(handle.wait())
    await _follow(launch.job_dir / "stdout", mib << 20, done)
    await done
    return time.perf_counter() - began


async def _follow_local(tmp: Path, mib: int) -> float:
    out = tmp / "local-stdout"
    began = time.perf_counter()
    with out.open("ab") as file:
        proc = await asyncio.create_subprocess_exec(
            "head", "-c", f"{mib}M", "/dev/zero", stdout=file, start_new_session=True
        )
    done = asyncio.ensure_future(proc.wait())
    await _follow(out, mib << 20, done)
    await done
    return time.perf_counter() - began


async def _measure(cluster: RayCluster, tmp: Path, jobs: int, mib: int) -> dict[str, float]:
    executor = RayExecutor("bench", cluster.address, 1, token_file=cluster.token_file)
    try:
        ray_seconds = await _ray_jobs(executor, tmp, jobs)
        plain_seconds = await asyncio.to_thread(_plain_tasks, cluster, jobs)
        follow_ray = await _follow_ray(executor, tmp, mib)
    finally:
        await executor.close(stop_jobs=True)
    follow_local = await _follow_local(tmp, mib)
    return {
        "jobs": jobs,
        "ray_executor_jobs_per_s": jobs / ray_seconds,
        "plain_ray_tasks_per_s": jobs / plain_seconds,
        "ratio": plain_seconds / ray_seconds,
        "mib": mib,
        "follow_ray_mib_per_s": mib / follow_ray,
        "follow_local_mib_per_s": mib / follow_local,
    }


def main() -> int:
    """Run both figures and print them (and as JSON with --json)."""
    parser = argparse.ArgumentParser(prog="python -m bench.ray_bench", description=__doc__)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if why_not():
        print(f"ray bench skipped: {why_not()}", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory(prefix="jwrb-") as folder:
        tmp = Path(folder)
        cluster = start_cluster(tmp / "c", cpus=1)  # short: Ray's socket paths
        try:
            figures = asyncio.run(_measure(cluster, tmp, args.jobs, args.mib))
        finally:
            cluster.stop()
    if args.json:
        print(json.dumps(figures))
    else:
        print(
            f"{args.jobs} true jobs: RayExecutor {figures['ray_executor_jobs_per_s']:.0f}/s, "
            f"plain Ray tasks {figures['plain_ray_tasks_per_s']:.0f}/s "
            f"(ratio {figures['ratio']:.2f}x)"
        )
        print(
            f"follow {args.mib} MiB: Ray job {figures['follow_ray_mib_per_s']:.0f} MiB/s, "
            f"local job {figures['follow_local_mib_per_s']:.0f} MiB/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
