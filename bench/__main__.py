"""`python -m bench [--quick] [--only NAME]...`: run the benchmarks, print a table, write JSON.

Each NAME measures one figure or a few that share their setup (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import jobs, load, peers, ray_bench, running, streams
from bench.context import Context, Sizes, default_data_dir
from bench.harness import machine
from bench.jobs import fs_type
from bench.result import Result

BENCHMARKS: dict[str, Callable[[Context], Result | list[Result]]] = {
    # issue 13: data on disk beside `make run`'s, as users run it
    "throughput": peers.throughput,  # + throughput_followed and the peers
    "line_latency": streams.line_latency,  # idle, and line_latency_loaded
    "running": running.running,  # restart_running, memory_idle, memory_per_running_job
    "load": load.load,
    # issues 2, 3 and 4
    "memory_10k_ended": jobs.memory_10k_ended,
    "restart_1000_batches": jobs.restart_1000_batches,
    "follow_throughput": streams.follow_throughput,
    "fanout_50": streams.fanout_50,
    # issue 15: on a two-node Ray cluster of its own (skipped, saying why, without Ray)
    "ray": ray_bench.ray,
}
RESULTS = Path(__file__).resolve().parent / "results"
# Issue 13's figures keep their data in a fresh folder inside `make run`'s data_dir
# (config/jobworker.toml: var/data), on its file system, and remove it afterwards.
DISK = default_data_dir()
# The older figures (issues 2-4) keep theirs on tmpfs when there is one, so that they
# measure jobworker and not the state of the disk (docs/benchmarks.md, "Where the data goes").
SHM = Path("/dev/shm")
WORKDIR = SHM if os.access(SHM, os.W_OK) and fs_type(SHM) == "tmpfs" else DISK.parent / "bench"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--reps", type=int, help="repetitions (default: 3, quick: 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="JSON file")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=WORKDIR,
        help=f"where servers keep data (default: {WORKDIR})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    parser.add_argument(
        "--load-seconds",
        type=float,
        default=float(os.environ["BENCH_LOAD_SECONDS"])
        if "BENCH_LOAD_SECONDS" in os.environ
        else None,
        help="how long the load figure runs (default 60, quick 10; env BENCH_LOAD_SECONDS)",
    )
    return parser.parse_args(argv)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def table(results: list[Result]) -> str:
    """The results as a plain text table."""
    head = ("benchmark", "value", "runs", "baseline", "baseline runs", "ratio", "aim", "met")
    rows = [head]
    for r in results:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        rows.append(
            (
                r.name,
                fmt(r.value),
                " ".join(fmt(x) for x in r.runs),
                fmt(r.baseline),
                " ".join(fmt(x) for x in r.baseline_runs),
                fmt(r.ratio),
                r.aim,
                met,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for r in results:
        lines.append(f"{r.name}: {r.metric}")
        if r.baseline_metric:
            lines.append(f"    baseline: {r.baseline_metric}; ratio: {r.ratio_meaning}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sizes = Sizes.quick() if args.quick else Sizes.full()
    if args.reps:
        sizes = replace(sizes, reps=args.reps)
    if args.load_seconds:
        sizes = replace(sizes, load_seconds=args.load_seconds)
    names = args.only or list(BENCHMARKS)
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="jobworker-bench-", dir=args.workdir))
    DISK.mkdir(parents=True, exist_ok=True)
    disk = Path(tempfile.mkdtemp(prefix="bench-", dir=DISK))
    info: dict[str, Any] = {"machine": machine(), "quick": args.quick, "sizes": sizes.__dict__}
    print(f"machine: {json.dumps(info['machine'])}", flush=True)
    print(f"data: {disk} ({fs_type(disk)}), older figures {work} ({fs_type(work)})", flush=True)
    ctx = Context(work, sizes, disk=disk)
    results: list[Result] = []
    failed: dict[str, str] = {}
    started = time.monotonic()
    try:
        for name in names:
            print(f"\n== {name}", flush=True)
            t0 = time.monotonic()
            try:
                got = BENCHMARKS[name](ctx)
            except Exception as exc:  # one broken benchmark must not lose the others' figures
                traceback.print_exc()
                failed[name] = f"{type(exc).__name__}: {exc}"
                continue
            for result in got if isinstance(got, list) else [got]:
                result.seconds = time.monotonic() - t0
                results.append(result)
    finally:
        if args.keep:
            print(f"work folders kept: {work} {disk}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(disk, ignore_errors=True)
    info.update(
        data_dir=str(disk),
        data_fs=fs_type(DISK),
        peers_missing=ctx.missing,
        limits_backend=ctx.limits_line,
        seconds=time.monotonic() - started,
        results=[r.to_json() for r in results],
        failed=failed,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2, default=str) + "\n")
    print("\n" + table(results))
    if line := ctx.limits_line:
        print(f"\nlimits backend: {line.get('detail') or line.get('backend')}")
    m = info["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu']}), kernel {m['kernel']}, Python {m['python']}")
    print(f"results: {args.out}  ({info['seconds']:.0f}s)")
    for peer, why in ctx.missing.items():
        print(f"peer not run: {peer}: {why}", file=sys.stderr)
    for name, error in failed.items():
        print(f"FAILED {name}: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
