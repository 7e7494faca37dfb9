"""Live output figures (issues 4 and 13): one follower's throughput, fan-out, line latency
(idle, and while the server runs other work)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc import aio

from bench.context import Context
from bench.harness import (
    IDENTITY,
    MiB,
    ServerProcess,
    aio_channel,
    client_identities,
    median,
    percentile,
    read_rss,
    schedule,
    stub,
)
from bench.load import Pacer
from bench.result import Result
from jobworker.store.follow import CHUNK
from jobworker.v1 import jobworker_pb2 as pb

MB = 1_000_000  # throughput is in MB/s (10^6 bytes a second)
# Jobs run as nobody under a root server: a venv's python under /root is out of its reach.
JOB_PYTHON = next(
    (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)),
    sys.executable,
)


@dataclass
class Received:
    """What one follower got: bytes, and when the first and last of them came."""

    nbytes: int = 0
    first: float = 0.0
    last: float = 0.0
    messages: int = 0

    @property
    def rate(self) -> float:
        """MB/s from the first to the last byte."""
        span = self.last - self.first
        return self.nbytes / span / MB if span > 0 else float("nan")


async def consume(call: aio.UnaryStreamCall, got: Received) -> Received:
    """Read a stream of StreamBatchLogsResponse to its end, counting chunk bytes (both sides
    of a comparison use this same loop)."""
    async for message in call:
        if message.WhichOneof("event") == "chunk":
            now = time.perf_counter()
            if not got.nbytes:
                got.first = now
            got.nbytes += len(message.chunk.data)
            got.last = now
            got.messages += 1
    return got


def writer_job(nbytes: int) -> pb.JobSpec:
    """A job that writes `nbytes` zero bytes to stdout."""
    return pb.JobSpec(name="writer", argv=["head", "-c", str(nbytes), "/dev/zero"])


def follow_call(channel: aio.Channel, cid: str) -> aio.UnaryStreamCall:
    request = pb.StreamBatchLogsRequest(correlation_id=cid, follow=True)
    return stub(channel).StreamBatchLogs(request, timeout=600)  # type: ignore[no-any-return]


# --- the plain gRPC baseline server -----------------------------------------------------------


class BaselineServer:
    """`python -m bench.baseline_server` in its own process, like jobworker's server."""

    def __init__(self, ctx: Context, getbatch: Path | None = None) -> None:
        extra = [str(getbatch)] if getbatch else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.baseline_server", str(ctx.pki), *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, GRPC_ENABLE_FORK_SUPPORT="false"),
        )
        assert self.proc.stdout is not None
        hello = json.loads(self.proc.stdout.readline())
        self.address = str(hello["address"])

    def stream(self, channel: aio.Channel, path: Path) -> aio.UnaryStreamCall:
        method = channel.unary_stream(
            "/bench.Baseline/StreamFile",
            request_serializer=lambda b: b,
            response_deserializer=pb.StreamBatchLogsResponse.FromString,
        )
        return method(str(path).encode(), timeout=600)  # type: ignore[no-any-return]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # EOF: it stops
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def stdout_file(server: ServerProcess, cid: str, index: int = 0) -> Path:
    """Where the contract stores a job's stdout."""
    import tomllib

    data_dir = Path(tomllib.loads(server.config.read_text())["server"]["data_dir"])
    return data_dir / "batches" / cid / "jobs" / str(index) / "stdout"


# --- 4. follow_throughput ---------------------------------------------------------------------


async def _follow_once(server: ServerProcess, ctx: Context, nbytes: int) -> tuple[Received, str]:
    async with aio_channel(server.address, ctx.pki) as channel:
        await channel.channel_ready()
        cid = await schedule(stub(channel), [writer_job(nbytes)])
        got = await consume(follow_call(channel, cid), Received())
    if got.nbytes != nbytes:
        raise RuntimeError(f"follower got {got.nbytes} bytes of {nbytes}")
    return got, cid


async def _replay_once(server: ServerProcess, ctx: Context, cid: str) -> Received:
    """jobworker streaming the same job once it has ended: no writer competing for CPU."""
    async with aio_channel(server.address, ctx.pki) as channel:
        await channel.channel_ready()
        return await consume(follow_call(channel, cid), Received())


async def _baseline_once(base: BaselineServer, ctx: Context, path: Path) -> Received:
    async with aio_channel(base.address, ctx.pki) as channel:
        await channel.channel_ready()
        return await consume(base.stream(channel, path), Received())


def follow_throughput(ctx: Context) -> Result:
    """One follower of a job writing 1 GiB, against a plain grpc.aio stream of the same file."""
    nbytes = ctx.sizes.follow_bytes
    server = ctx.server("follow").start()
    ctx.note_limits(server)
    base = BaselineServer(ctx)
    runs: list[float] = []
    base_runs: list[float] = []
    rss: list[float] = []
    replay: list[float] = []
    try:
        for _ in range(ctx.sizes.reps):
            # Start with no dirty data of earlier benchmarks (or repetitions) being written
            # back meanwhile: the live run should compete only with its own writer.
            os.sync()
            got, cid = asyncio.run(_follow_once(server, ctx, nbytes))
            rss.append(read_rss(server.pid) / MiB)
            path = stdout_file(server, cid)
            plain = asyncio.run(_baseline_once(base, ctx, path))
            again = asyncio.run(_replay_once(server, ctx, cid))
            if plain.nbytes != nbytes or again.nbytes != nbytes:
                raise RuntimeError(f"got {plain.nbytes} and {again.nbytes} bytes of {nbytes}")
            runs.append(got.rate)
            base_runs.append(plain.rate)
            replay.append(again.rate)
            ctx.log(
                f"jobworker live {got.rate:7.1f} MB/s ({got.messages} messages), "
                f"replay {again.rate:7.1f} MB/s | plain grpc.aio {plain.rate:7.1f} MB/s"
            )
            path.unlink()  # a GiB a repetition: free the disk and the page cache
    finally:
        base.close()
        server.stop()
    ratio = median(runs) / median(base_runs)
    return Result(
        name="follow_throughput",
        metric=f"MB/s, one follower of a job writing {nbytes // MiB} MiB (first to last byte)",
        runs=runs,
        baseline_metric="MB/s, plain grpc.aio stream of the same file, same mTLS, "
        f"{CHUNK // 1024} KiB messages",
        baseline_runs=base_runs,
        aim="ratio >= 0.7",
        met=ratio >= 0.7,
        extra={
            "server_rss_after_mib": rss,
            "replay_mbps": replay,
            "replay_ratio": median(replay) / median(base_runs),
            "replay_note": "jobworker streaming the ended job (no writer running), same client",
        },
    )


# --- 5. fanout_50 -----------------------------------------------------------------------------


async def _fanout_once(
    server: ServerProcess, ctx: Context, followers: int, nbytes: int
) -> list[Received]:
    """`followers` clients, each on its own connection, follow one job writing `nbytes`."""
    channels = [aio_channel(server.address, ctx.pki) for _ in range(followers)]
    try:
        await asyncio.gather(*(c.channel_ready() for c in channels))
        cid = await schedule(stub(channels[0]), [writer_job(nbytes)])
        got = await asyncio.gather(*(consume(follow_call(c, cid), Received()) for c in channels))
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    short = [g.nbytes for g in got if g.nbytes != nbytes]
    if short:
        raise RuntimeError(f"{len(short)} followers got fewer than {nbytes} bytes: {short[:5]}")
    return list(got)


def fanout_50(ctx: Context) -> Result:
    """50 followers of one job writing 64 MiB: MB/s delivered in all, and per follower."""
    n, nbytes = ctx.sizes.fanout_followers, ctx.sizes.fanout_bytes
    server = ctx.server("fanout").start()
    ctx.note_limits(server)
    runs: list[float] = []
    single: list[float] = []
    per_min: list[float] = []
    per_median: list[float] = []
    try:
        for _ in range(ctx.sizes.reps):
            (one,) = asyncio.run(_fanout_once(server, ctx, 1, nbytes))
            single.append(one.rate)
            got = asyncio.run(_fanout_once(server, ctx, n, nbytes))
            span = max(g.last for g in got) - min(g.first for g in got)
            total = sum(g.nbytes for g in got) / span / MB
            rates = [g.rate for g in got]
            runs.append(total)
            per_min.append(min(rates))
            per_median.append(median(rates))
            ctx.log(
                f"1 follower {one.rate:7.1f} MB/s | {n} followers: {total:7.1f} MB/s in all, "
                f"each min {min(rates):.1f} / median {median(rates):.1f} MB/s"
            )
    finally:
        server.stop()
    return Result(
        name="fanout_50",
        metric=f"MB/s delivered in all, {n} followers of one job writing {nbytes // MiB} MiB",
        runs=runs,
        baseline_metric="MB/s of a single follower of the same job, same run",
        baseline_runs=single,
        ratio_meaning="total with all followers / one follower alone",
        aim="(no aim: reported)",
        extra={"per_follower_min_mbps": per_min, "per_follower_median_mbps": per_median},
    )


# --- 6. line_latency --------------------------------------------------------------------------

WRITER = (
    "import sys, time\n"
    "n, every, delay = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])\n"
    "time.sleep(delay)\n"
    "for i in range(n):\n"
    "    sys.stdout.write(f'{i} {time.time_ns()}\\n')\n"
    "    sys.stdout.flush()\n"
    "    time.sleep(every)\n"
)
EVERY = 0.02
TICKER = "ticker"  # the identity of the line latency's job


def writer_argv(lines: int) -> list[str]:
    # An absolute interpreter: a job's PATH is the server's minimal one. 0.3 s of delay lets
    # the follower attach before the first line.
    return [JOB_PYTHON, "-I", "-c", WRITER, str(lines), str(EVERY), "0.3"]


class Lines:
    """Splits received bytes into lines; each line's latency in ms from its timestamp."""

    def __init__(self) -> None:
        self.partial = b""
        self.latencies: list[float] = []

    def feed(self, data: bytes, now_ns: int) -> None:
        *complete, self.partial = (self.partial + data).split(b"\n")
        for line in complete:
            written = int(line.split()[1])
            self.latencies.append((now_ns - written) / 1e6)


async def _latency_once(
    server: ServerProcess, ctx: Context, lines: int, identity: str = IDENTITY
) -> list[float]:
    got = Lines()
    async with aio_channel(server.address, ctx.pki, identity=identity) as channel:
        await channel.channel_ready()
        cid = await schedule(stub(channel), [pb.JobSpec(name="ticker", argv=writer_argv(lines))])
        async for message in follow_call(channel, cid):
            if message.WhichOneof("event") == "chunk" and message.chunk.stream == 1:
                got.feed(message.chunk.data, time.time_ns())
    if len(got.latencies) != lines:
        raise RuntimeError(f"got {len(got.latencies)} lines of {lines}")
    return got.latencies


def _pipe_once(lines: int) -> list[float]:
    """The floor: the same writer on a pipe read directly by this process."""
    got = Lines()
    proc = subprocess.Popen(writer_argv(lines), stdout=subprocess.PIPE, close_fds=True)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while data := os.read(fd, 65536):
        got.feed(data, time.time_ns())
    proc.stdout.close()
    proc.wait(30)
    return got.latencies


def line_latency(ctx: Context) -> list[Result]:
    """p50 and p99 from a job's write of a line to a follower's receipt, with the server idle
    and while it runs `loaded_rate` jobs/s of other work; the server keeps its data on disk.

    The other work comes from `python -m bench.load pace` (its own process: batches of 50
    `true`); the ticker is scheduled by an identity of its own, so that fair share gives it
    the next free slot rather than a place behind the other work's queue."""
    lines, rate = ctx.sizes.latency_lines, ctx.sizes.loaded_rate
    client_identities(ctx.pki, [TICKER])
    server = ctx.server("latency", on_disk=True).start()
    ctx.note_limits(server)
    idle = Latencies()
    loaded = Latencies()
    achieved: list[float] = []
    try:
        time.sleep(1.0)  # let the fresh server settle: at idle
        for _ in range(ctx.sizes.reps):
            idle.add(asyncio.run(_latency_once(server, ctx, lines)), _pipe_once(lines))
            ctx.log(f"idle:   {idle.line()}")
            pacer = Pacer(server.address, ctx, rate)
            try:
                time.sleep(1.0)  # the other work under way
                during = asyncio.run(_latency_once(server, ctx, lines, TICKER))
            finally:
                report = pacer.close()
            loaded.add(during, _pipe_once(lines))
            achieved.append(report["ended"] / report["seconds"])
            ctx.log(
                f"loaded: {loaded.line()} | other work: {achieved[-1]:.0f} jobs/s ended "
                f"({report['scheduled']} scheduled in {report['seconds']:.1f}s)"
            )
    finally:
        server.stop()
    what = f"{lines} lines every {EVERY * 1000:.0f} ms a run, data on disk"
    return [
        idle.result(
            "line_latency",
            f"p99 ms, write to receipt, server idle, {what}",
            "p99 < 10 ms",
            10.0,
        ),
        loaded.result(
            "line_latency_loaded",
            f"p99 ms, write to receipt, while the server runs {rate} jobs/s of `true` "
            f"(asked; the rate achieved is in the JSON), {what}",
            "p99 < 5 ms",
            5.0,
            {"other_work_jobs_per_s": achieved, "other_work_asked_jobs_per_s": rate},
        ),
    ]


@dataclass
class Latencies:
    """Line latencies of repetitions: jobworker's and the pipe's."""

    runs: list[float] = field(default_factory=list)  # p99 of each repetition
    base: list[float] = field(default_factory=list)
    p50s: list[float] = field(default_factory=list)
    pooled: list[float] = field(default_factory=list)
    floor_pooled: list[float] = field(default_factory=list)
    last_max: float = 0.0
    last_floor_p50: float = 0.0

    def add(self, latencies: list[float], floor: list[float]) -> None:
        self.pooled += latencies
        self.floor_pooled += floor
        self.runs.append(percentile(latencies, 99))
        self.p50s.append(percentile(latencies, 50))
        self.base.append(percentile(floor, 99))
        self.last_max = max(latencies)
        self.last_floor_p50 = percentile(floor, 50)

    def line(self) -> str:
        return (
            f"jobworker p50 {self.p50s[-1]:.2f} ms, p99 {self.runs[-1]:.2f} ms, max "
            f"{self.last_max:.2f} ms | pipe p50 {self.last_floor_p50:.3f} ms, "
            f"p99 {self.base[-1]:.3f} ms"
        )

    def result(
        self, name: str, metric: str, aim: str, limit: float, extra: dict[str, Any] | None = None
    ) -> Result:
        return Result(
            name=name,
            metric=metric,
            runs=self.runs,
            baseline_metric="p99 ms of the same writer on a pipe read by the bench directly",
            baseline_runs=self.base,
            ratio_meaning="p99 / pipe p99 (lower is better)",
            aim=aim,
            met=median(self.runs) < limit,
            extra={
                "p50_ms": self.p50s,
                "p50_median_ms": median(self.p50s),
                "pooled_p50_ms": percentile(self.pooled, 50),
                "pooled_p99_ms": percentile(self.pooled, 99),
                "pooled_max_ms": max(self.pooled),
                "pipe_pooled_p50_ms": percentile(self.floor_pooled, 50),
                "pipe_pooled_p99_ms": percentile(self.floor_pooled, 99),
                **(extra or {}),
            },
        )
