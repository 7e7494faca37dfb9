"""Throughput of short jobs as users get it (issue 13): jobworker and its peers side by side.

The same N `true` jobs, 8 at a time, each writing its stdout and stderr to two files of its
own on disk (the folder beside `make run`'s data): jobworker through its real server
(mutual TLS on loopback, the default config), without and with a live follower; a bare
Python Popen loop (the baseline); task-spooler (`tsp -S 8`); GNU `parallel -j8`; `xargs
-P8`. The baseline runs again just before each other run, and each figure's ratio is the
median of its pairs' ratios: the machine is shared and its load changes within seconds.
Repetitions rotate the order.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.context import Context
from bench.harness import ServerProcess, median
from bench.jobs import WIDTH, fs_type, schedule_once, spawn_loop
from bench.result import Result

# How xargs, parallel and tsp run a job with its two log files: a shell that sets up the
# redirections and execs `true` (a shell's own `true` is a builtin: exec runs the binary).
JOB_SH = 'exec true >"$0.out" 2>"$0.err"'


def find_tsp() -> str | None:
    """task-spooler's client: Debian's package names it `tsp` (moreutils has a `ts` of its
    own, a timestamping filter, so a `ts` is used only if it says it is task-spooler)."""
    for name in ("tsp", "ts"):
        path = shutil.which(name)
        if path is None:
            continue
        out = subprocess.run([path, "-V"], check=False, capture_output=True, text=True, timeout=10)
        if "Task Spooler" in out.stdout + out.stderr:
            return path
    return None


def find_parallel() -> str | None:
    """GNU parallel (moreutils' `parallel` is another program)."""
    path = shutil.which("parallel")
    if path is None:
        return None
    out = subprocess.run(
        [path, "--version"], check=False, capture_output=True, text=True, timeout=30
    )
    return path if "GNU parallel" in out.stdout else None


def count_logs(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.suffix in (".out", ".err"))


def _check_logs(name: str, folder: Path, n: int) -> None:
    found = count_logs(folder)
    if found != 2 * n:
        raise RuntimeError(f"{name}: {found} log files in {folder}, expected {2 * n}")


def run_popen(n: int, folder: Path) -> float:
    """The baseline: a Python loop, Popen of `true` with its two log files, pidfd + wait4."""
    rate = spawn_loop(n, logs=folder)
    _check_logs("popen loop", folder, n)
    return rate


def run_xargs(n: int, folder: Path) -> float:
    numbers = "".join(f"{i}\n" for i in range(n)).encode()
    start = time.perf_counter()
    subprocess.run(
        ["xargs", f"-P{WIDTH}", "-n1", "sh", "-c", JOB_SH],
        input=numbers,
        cwd=folder,
        check=True,
        timeout=600,
    )
    rate = n / (time.perf_counter() - start)
    _check_logs("xargs", folder, n)
    return rate


def run_parallel(parallel: str, n: int, folder: Path) -> float:
    numbers = "".join(f"{i}\n" for i in range(n)).encode()
    private = folder.parent / f"{folder.name}-home"  # parallel's own files: not in ~
    private.mkdir()
    env = dict(os.environ, PARALLEL_HOME=str(private), TMPDIR=str(private))
    env["PARALLEL_SHELL"] = "/bin/sh"
    start = time.perf_counter()
    subprocess.run(
        [parallel, "--will-cite", f"-j{WIDTH}", "exec true >{}.out 2>{}.err"],
        input=numbers,
        cwd=folder,
        env=env,
        check=True,
        timeout=600,
    )
    rate = n / (time.perf_counter() - start)
    _check_logs("parallel", folder, n)
    return rate


def run_tsp(tsp: str, n: int, folder: Path) -> float:
    """A task-spooler server of its own (private TS_SOCKET and TMPDIR), 8 slots; the jobs
    enqueued by a shell loop, as a user does; timed to the last job's end.

    `tsp -n`: tsp keeps no output file of its own, the job writes its two (tsp's `-E`,
    stderr apart, is broken in Debian's 1.0.1: every job is killed by signal 9 and the
    server logs "Reading the size of the name")."""
    private = folder.parent / f"{folder.name}-tsp"
    private.mkdir()
    env = dict(
        os.environ,
        TS_SOCKET=str(private / "socket"),
        TMPDIR=str(private),
        TS_MAXFINISHED=str(n + 100),
        TS_SLOTS=str(WIDTH),
    )
    quoted = JOB_SH.replace("'", "'\\''")
    loop = (
        f"i=0; while [ $i -lt {n} ]; do {tsp} -n sh -c '{quoted}' $i >/dev/null; "
        f"i=$((i+1)); done; {tsp} -w {n - 1} >/dev/null"
    )
    subprocess.run([tsp, "-S", str(WIDTH)], env=env, check=True, capture_output=True)
    try:
        start = time.perf_counter()
        subprocess.run(["sh", "-c", loop], cwd=folder, env=env, check=False, timeout=600)
        # The last job added may end before others: wait until the list says all finished.
        while True:
            listing = subprocess.run(
                [tsp, "-l"], check=False, env=env, capture_output=True, text=True
            )
            if listing.stdout.count(" finished ") >= n:
                break
            time.sleep(0.01)
        rate = n / (time.perf_counter() - start)
    finally:
        # Stops the server of this socket only.
        subprocess.run([tsp, "-K"], check=False, env=env, capture_output=True, timeout=30)
    _check_logs("tsp", folder, n)
    return rate


def run_jobworker(
    server: ServerProcess,
    ctx: Context,
    n: int,
    *,
    follow: bool = False,
    tag: str = "",
    packed: bool = True,
) -> float:
    figures = asyncio.run(schedule_once(server, ctx, n, poll=not follow, tag=tag, packed=packed))
    return figures["jobs_per_s"]


def throughput(ctx: Context) -> list[Result]:
    """N `true` jobs with two log files each: jobworker, its peers, the bare Popen loop."""
    n = ctx.sizes.schedule_jobs
    peers_dir = ctx.fresh_dir("peers", on_disk=True)
    tsp, parallel = find_tsp(), find_parallel()
    if tsp is None:
        ctx.missing["tsp"] = (
            "task-spooler is not installed (no `tsp`, nor a `ts` that is task-spooler): "
            "`make bench-peers` installs it (apt-get install task-spooler)"
        )
    if parallel is None:
        ctx.missing["parallel"] = (
            "GNU parallel is not installed: `make bench-peers` installs it "
            "(apt-get install parallel)"
        )
    for name, why in ctx.missing.items():
        ctx.log(f"peer {name} NOT RUN: {why}")
    # jobworker with the default config (jobs run as `nobody` under a root server), data
    # on disk; the same as root (as every peer runs its jobs here) and on tmpfs: extras.
    server = ctx.server("throughput", on_disk=True).start()
    ctx.note_limits(server)
    root = ctx.server("throughput-root", on_disk=True, jobs={"run_as": "root"}).start()
    shm = Path("/dev/shm")
    tmpfs = None
    if os.access(shm, os.W_OK) and fs_type(shm) == "tmpfs" and fs_type(ctx.work) == "tmpfs":
        tmpfs = ctx.server("throughput-tmpfs").start()
    contenders: dict[str, Callable[[Path], float]] = {
        "popen": lambda d: run_popen(n, d),
        "jobworker": lambda d: run_jobworker(server, ctx, n),
        "jobworker_followed": lambda d: run_jobworker(server, ctx, n, follow=True),
        "jobworker_followed_plain": lambda d: run_jobworker(
            server, ctx, n, follow=True, tag="plain", packed=False
        ),
        "jobworker_root": lambda d: run_jobworker(root, ctx, n, tag="root"),
        "xargs": lambda d: run_xargs(n, d),
    }
    if tmpfs is not None:
        contenders["jobworker_tmpfs"] = lambda d: run_jobworker(tmpfs, ctx, n, tag="tmpfs")
    if tsp is not None:
        contenders["tsp"] = lambda d: run_tsp(tsp, n, d)
    if parallel is not None:
        contenders["parallel"] = lambda d: run_parallel(parallel, n, d)
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    paired: dict[str, list[float]] = {name: [] for name in contenders}  # its baseline runs
    order = [name for name in contenders if name != "popen"]
    ctx.log(f"data on {fs_type(peers_dir)} at {peers_dir}; {n} jobs, {WIDTH} at a time")
    try:
        spawn_loop(min(n, 50))  # warm the page cache and the interpreter's paths
        for rep in range(ctx.sizes.reps):
            shift = rep % len(order)
            for name in order[shift:] + order[:shift]:
                # The baseline again just before each contender: the machine is shared, and
                # its load changes within seconds (docs/benchmarks.md, "Noise").
                folder = peers_dir / f"popen-{name}-{rep}"
                folder.mkdir()
                paired[name].append(run_popen(n, folder))
                runs["popen"].append(paired[name][-1])
                folder = peers_dir / f"{name}-{rep}"
                folder.mkdir()
                runs[name].append(contenders[name](folder))
            ctx.log(
                f"rep {rep + 1}: "
                + ", ".join(
                    f"{name} {runs[name][-1]:.0f} ({runs[name][-1] / paired[name][-1]:.2f})"
                    for name in order
                )
                + " jobs/s (ratio to the baseline run just before)"
            )
    finally:
        server.stop()
        root.stop()
        if tmpfs is not None:
            tmpfs.stop()
    return _results(runs, paired, ctx, n)


def _results(
    runs: dict[str, list[float]], paired: dict[str, list[float]], ctx: Context, n: int
) -> list[Result]:
    def ratio(name: str) -> float:
        return median([a / b for a, b in zip(runs[name], paired[name], strict=True)])

    tsp = ratio("tsp") if runs.get("tsp") else None
    ours = median(runs["jobworker"])
    base_metric = (
        f"jobs/s, bare Python Popen loop, two log files a job, {WIDTH} in flight, run just "
        "before each run (ratio: the median of the pairs' ratios)"
    )
    what = f"{n} `true` jobs, {WIDTH} at a time, two log files each"
    results = [
        Result(
            name="throughput",
            metric=f"jobs/s, jobworker (default config, one batch, data on disk), {what}",
            runs=runs["jobworker"],
            baseline_metric=base_metric,
            baseline_runs=paired["jobworker"],
            paired=True,
            aim="ratio >= 0.8, >= tsp, 1,200/s",
            met=ratio("jobworker") >= 0.8
            and (tsp is None or ratio("jobworker") >= tsp)
            and ours >= 1200,
            extra={
                "ratio_to_tsp": ratio("jobworker") / tsp if tsp else None,
                "peers_missing": dict(ctx.missing),
                "all_runs": runs,
                "baseline_runs_before_each": paired,
            },
        ),
        Result(
            name="throughput_followed",
            metric=(
                "jobs/s, the same with one StreamBatchLogs follower as jobworker's client "
                f"follows (packed responses), to its end; {what}"
            ),
            runs=runs["jobworker_followed"],
            baseline_metric=base_metric,
            baseline_runs=paired["jobworker_followed"],
            paired=True,
            aim="ratio >= 0.6",
            met=ratio("jobworker_followed") >= 0.6,
        ),
    ]
    extras = {
        "jobworker_root": 'jobworker, jobs as root (`jobs.run_as = "root"`, as the peers run)',
        "jobworker_tmpfs": "jobworker, default config, data_dir on tmpfs (the peers' data on disk)",
        "jobworker_followed_plain": (
            "jobworker with one follower asking one event a message (a plain gRPC client)"
        ),
        "tsp": f"task-spooler, `tsp -S {WIDTH}`, jobs enqueued by a shell loop",
        "parallel": f"GNU `parallel -j{WIDTH}`",
        "xargs": f"`xargs -P{WIDTH} -n1`",
    }
    for name, label in extras.items():
        if runs.get(name):
            results.append(
                Result(
                    name=f"peer_{name}" if not name.startswith("jobworker") else name,
                    metric=f"jobs/s, {label}; {what}",
                    runs=runs[name],
                    baseline_metric=base_metric,
                    baseline_runs=paired[name],
                    paired=True,
                    aim="(reported)",
                )
            )
    return results
