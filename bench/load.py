"""Load (issue 13): many clients at once, and a steady stream of other work.

The figure: `clients` clients, each with a certificate and a TLS connection of its own,
for `seconds`, each in a closed loop with no pause: ScheduleBatch of a small batch (one
call in ten) or GetBatch of one of its own batches (the others); p50/p99 of each and
calls/s in all. Then the same clients paced, PACED_RATE calls a second each: how fast the
server answers under a load it can carry. The clients run in worker processes (`python -m
bench.load worker`), so that the bench's own loop does not limit them. The baseline: the
same clients against a plain grpc.aio server that parses the same messages and answers
GetBatch with a response jobworker gave (bench/baseline_server.py).

`python -m bench.load pace` schedules batches of `true` at a steady rate until its stdin
closes (line latency under load), then counts the jobs that ended meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from grpc import aio

from bench.context import ROOT, Context
from bench.harness import (
    aio_channel,
    client_identities,
    percentile,
    schedule,
    stub,
    wait_batches_ended,
)
from bench.result import Result
from jobworker.v1 import jobworker_pb2 as pb

JOBWORKER = "jobworker.v1.JobWorkerService"
BASELINE = "bench.Baseline"
SCHEDULE_SHARE = 0.1  # of a client's calls; the others are GetBatch
BATCH = [pb.JobSpec(argv=["true"]), pb.JobSpec(argv=["true"])]  # what a client schedules
WORKERS = 2  # client processes (the machine has 2 cores)
PACED_RATE = 1.0  # calls a second of each client in the paced run


# --- the worker: clients in one process -----------------------------------------------------


async def _client(
    args: argparse.Namespace, identity: str, go: asyncio.Event, out: dict[str, Any]
) -> None:
    channel = aio_channel(args.address, Path(args.pki), identity=identity)
    get = channel.unary_unary(
        f"/{args.service}/GetBatch",
        request_serializer=pb.GetBatchRequest.SerializeToString,
        response_deserializer=pb.GetBatchResponse.FromString,
    )
    put = channel.stream_unary(
        f"/{args.service}/ScheduleBatch",
        request_serializer=pb.ScheduleBatchRequest.SerializeToString,
        response_deserializer=pb.ScheduleBatchResponse.FromString,
    )
    requests = [pb.ScheduleBatchRequest(options=pb.BatchOptions())]
    requests += [pb.ScheduleBatchRequest(job=job) for job in BATCH]
    rng = random.Random(identity)
    cids: list[str] = []
    try:
        await channel.channel_ready()
        out["connected"] += 1
        await go.wait()
        # Paced: a call every `interval` s from a random phase (the next at once when one
        # took longer); closed loop with no pause when the interval is 0.
        due = time.monotonic() + rng.random() * args.interval
        while time.monotonic() < out["deadline"]:
            if args.interval:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                due += args.interval
            scheduling = not cids or rng.random() < SCHEDULE_SHARE
            start = time.perf_counter()
            try:
                if scheduling:
                    response = await put(iter(requests), timeout=60)
                    cids.append(response.correlation_id)
                else:
                    await get(pb.GetBatchRequest(correlation_id=rng.choice(cids)), timeout=60)
            except aio.AioRpcError as exc:
                out["errors"][f"{'schedule' if scheduling else 'get'} {exc.code().name}"] += 1
                await asyncio.sleep(0.05)
                continue
            took = (time.perf_counter() - start) * 1000
            out["schedule" if scheduling else "get"].append(took)
    finally:
        await channel.close()


async def _worker(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"get": [], "schedule": [], "errors": Counter(), "connected": 0}
    go = asyncio.Event()
    identities = args.identities.split(",")
    tasks = [asyncio.create_task(_client(args, name, go, out)) for name in identities]
    while out["connected"] < len(identities):
        await asyncio.sleep(0.05)
        failed = [t for t in tasks if t.done() and t.exception()]
        if failed:
            raise RuntimeError(f"a client could not connect: {failed[0].exception()}")
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    cpu0 = time.process_time()
    out["deadline"] = time.monotonic() + args.seconds
    out["started"] = time.time()
    go.set()
    await asyncio.gather(*tasks)
    out["ended"] = time.time()
    out["cpu_s"] = time.process_time() - cpu0
    del out["deadline"], out["connected"]
    return out


# --- the pacer: steady work for the line latency figure -------------------------------------


async def _pace(args: argparse.Namespace) -> dict[str, Any]:
    """Batches of `batch` `true` jobs, `rate` jobs a second, until stdin closes."""
    loop = asyncio.get_running_loop()
    closed = loop.run_in_executor(None, sys.stdin.read)
    jobs = [pb.JobSpec(argv=["true"]) for _ in range(args.batch)]
    period = args.batch / args.rate
    cids: list[str] = []
    async with aio_channel(args.address, Path(args.pki)) as channel:
        client = stub(channel)
        await channel.channel_ready()
        print("ready", flush=True)
        t0 = time.time()
        tick = time.monotonic()
        while not closed.done():
            cids.append(await schedule(client, jobs))
            tick += period
            await asyncio.wait([closed], timeout=max(0.0, tick - time.monotonic()))
        t1 = time.time()
        ended = 0
        for cid in cids:  # how many jobs ended while the pacer ran: the rate achieved
            batch = (
                await client.GetBatch(
                    pb.GetBatchRequest(correlation_id=cid, log_tail_bytes=0), timeout=60
                )
            ).batch
            ends = [j.end_time.ToNanoseconds() / 1e9 for j in batch.jobs if j.HasField("end_time")]
            ended += sum(1 for end in ends if t0 <= end <= t1)
    return {"scheduled": len(cids) * args.batch, "ended": ended, "seconds": t1 - t0}


class Pacer:
    """`python -m bench.load pace` in its own process, for as long as it is open."""

    def __init__(self, address: str, ctx: Context, rate: int, batch: int = 50) -> None:
        argv = [sys.executable, "-m", "bench.load", "pace", "--address", address]
        argv += ["--pki", str(ctx.pki), "--rate", str(rate), "--batch", str(batch)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError("the pacer did not start")

    def close(self) -> dict[str, Any]:
        """Stop it; what it scheduled and how many of its jobs ended while it ran."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        report = self.proc.stdout.read()
        self.proc.wait(120)
        return json.loads(report)  # type: ignore[no-any-return]


# --- the figure -----------------------------------------------------------------------------


def run_clients(
    ctx: Context,
    address: str,
    service: str,
    identities: list[str],
    seconds: float,
    interval: float = 0.0,
) -> dict[str, Any]:
    """The clients, split over WORKERS processes, started together; their merged figures."""
    procs = []
    for k in range(WORKERS):
        argv = [sys.executable, "-m", "bench.load", "worker", "--address", address]
        argv += ["--pki", str(ctx.pki), "--service", service, "--seconds", str(seconds)]
        argv += ["--interval", str(interval)]
        argv += ["--identities", ",".join(identities[k::WORKERS])]
        procs.append(
            subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
            )
        )
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a load worker did not connect its clients")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outs = []
        for proc in procs:
            assert proc.stdout is not None
            outs.append(json.loads(proc.stdout.read()))
            proc.wait(60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    merged: dict[str, Any] = {"get": [], "schedule": [], "errors": Counter(), "cpu_s": 0.0}
    for out in outs:
        merged["get"] += out["get"]
        merged["schedule"] += out["schedule"]
        merged["errors"].update(out["errors"])
        merged["cpu_s"] += out["cpu_s"]
    span = max(o["ended"] for o in outs) - min(o["started"] for o in outs)
    calls = len(merged["get"]) + len(merged["schedule"]) + sum(merged["errors"].values())
    merged["calls_per_s"] = calls / span
    merged["span_s"] = span
    return merged


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    get, put = run["get"], run["schedule"]
    return {
        "get_p50_ms": percentile(get, 50),
        "get_p99_ms": percentile(get, 99),
        "schedule_p50_ms": percentile(put, 50),
        "schedule_p99_ms": percentile(put, 99),
        "get_calls": len(get),
        "schedule_calls": len(put),
        "calls_per_s": run["calls_per_s"],
        "errors": dict(run["errors"]),
        "clients_cpu_s": run["cpu_s"],
        "span_s": run["span_s"],
    }


async def _canned_getbatch(address: str, ctx: Context) -> bytes:
    """What jobworker answers to GetBatch for a batch like the clients': the baseline's
    answer, byte for byte."""
    async with aio_channel(address, ctx.pki) as channel:
        client = stub(channel)
        cid = await schedule(client, BATCH)
        await wait_batches_ended(client, timeout=60, interval=0.05)
        response = await client.GetBatch(pb.GetBatchRequest(correlation_id=cid), timeout=30)
    return response.SerializeToString()  # type: ignore[no-any-return]


def load(ctx: Context) -> list[Result]:
    """200 clients mixing ScheduleBatch and GetBatch: in a closed loop for 60 s (as issue 13
    measured), and paced at PACED_RATE calls a second each; a plain gRPC server likewise."""
    from bench.streams import BaselineServer  # the follow figure's baseline server

    n, seconds = ctx.sizes.load_clients, ctx.sizes.load_seconds
    short = max(5.0, seconds / 3)
    identities = [f"load-{i:03d}" for i in range(n)]
    client_identities(ctx.pki, identities)
    runs: dict[str, dict[str, Any]] = {}
    server = ctx.server("load", on_disk=True).start()
    ctx.note_limits(server)
    try:
        canned = ctx.fresh_dir("load-baseline") / "getbatch.bin"
        canned.write_bytes(asyncio.run(_canned_getbatch(server.address, ctx)))
        # Paced first: the closed loop leaves a queue of jobs the server runs for a while.
        ctx.log(f"{n} clients, {PACED_RATE:g} calls/s each, {short:.0f}s against jobworker")
        runs["ours_paced"] = _summary(
            run_clients(ctx, server.address, JOBWORKER, identities, short, 1 / PACED_RATE)
        )
        ctx.log(f"{n} clients, closed loop, {seconds:.0f}s against jobworker")
        runs["ours"] = _summary(run_clients(ctx, server.address, JOBWORKER, identities, seconds))
    finally:
        server.stop()
    base = BaselineServer(ctx, canned)
    try:
        ctx.log(f"the same against the plain grpc.aio server, {short:.0f}s each")
        runs["plain_paced"] = _summary(
            run_clients(ctx, base.address, BASELINE, identities, short, 1 / PACED_RATE)
        )
        runs["plain"] = _summary(run_clients(ctx, base.address, BASELINE, identities, short))
    finally:
        base.close()
    for key, fig in runs.items():
        ctx.log(
            f"{key:11}: {fig['calls_per_s']:.0f} calls/s; GetBatch p50 {fig['get_p50_ms']:.1f} ms, "
            f"p99 {fig['get_p99_ms']:.1f} ms ({fig['get_calls']}); ScheduleBatch p50 "
            f"{fig['schedule_p50_ms']:.1f} ms, p99 {fig['schedule_p99_ms']:.1f} ms "
            f"({fig['schedule_calls']}); errors {fig['errors'] or 'none'}"
        )
    closed = f"{n} clients (own certificates and connections), closed loop, {seconds:.0f}s"
    paced = (
        f"{n} clients, {PACED_RATE:g} calls/s each ({n * PACED_RATE:.0f}/s offered), {short:.0f}s"
    )
    plain = f"against a plain grpc.aio server, {short:.0f}s"
    lower = "p99 / plain server's p99 (lower is better)"
    ours, mix = runs["ours"], "1 call in 10 a ScheduleBatch of 2 `true` jobs"
    return [
        Result(
            name="load_getbatch_p99",
            metric=f"GetBatch p99 ms, {closed}, {mix}",
            runs=[ours["get_p99_ms"]],
            baseline_metric=f"GetBatch p99 ms, the same clients {plain}",
            baseline_runs=[runs["plain"]["get_p99_ms"]],
            ratio_meaning=lower,
            aim="p99 < 100 ms",
            met=ours["get_p99_ms"] < 100 and not ours["errors"],
            extra=runs,
        ),
        Result(
            name="load_schedule_p99",
            metric=f"ScheduleBatch p99 ms, {closed}",
            runs=[ours["schedule_p99_ms"]],
            baseline_metric=f"ScheduleBatch p99 ms, the same clients {plain}",
            baseline_runs=[runs["plain"]["schedule_p99_ms"]],
            ratio_meaning=lower,
            aim="p99 < 250 ms",
            met=ours["schedule_p99_ms"] < 250 and not ours["errors"],
        ),
        Result(
            name="load_calls_per_s",
            metric=f"calls/s in all, {closed}",
            runs=[ours["calls_per_s"]],
            baseline_metric=f"calls/s, the same clients {plain}",
            baseline_runs=[runs["plain"]["calls_per_s"]],
            aim="(reported)",
        ),
        Result(
            name="load_paced_getbatch_p99",
            metric=f"GetBatch p99 ms, {paced}",
            runs=[runs["ours_paced"]["get_p99_ms"]],
            baseline_metric=f"GetBatch p99 ms, the same paced clients {plain}",
            baseline_runs=[runs["plain_paced"]["get_p99_ms"]],
            ratio_meaning=lower,
            aim="(reported; < 100 ms)",
        ),
        Result(
            name="load_paced_schedule_p99",
            metric=f"ScheduleBatch p99 ms, {paced}",
            runs=[runs["ours_paced"]["schedule_p99_ms"]],
            baseline_metric=f"ScheduleBatch p99 ms, the same paced clients {plain}",
            baseline_runs=[runs["plain_paced"]["schedule_p99_ms"]],
            ratio_meaning=lower,
            aim="(reported; < 250 ms)",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    parser.add_argument("mode", choices=("worker", "pace"))
    parser.add_argument("--address", required=True)
    parser.add_argument("--pki", required=True)
    parser.add_argument("--service", default=JOBWORKER)
    parser.add_argument("--identities", default="")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.0, help="worker: s between calls")
    parser.add_argument("--rate", type=int, default=500, help="pace: jobs a second")
    parser.add_argument("--batch", type=int, default=50, help="pace: jobs a batch")
    args = parser.parse_args()
    result = asyncio.run(_worker(args) if args.mode == "worker" else _pace(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
