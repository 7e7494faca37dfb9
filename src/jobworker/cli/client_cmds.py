"""The client commands: submit, status, logs, cancel, list (wait, retry, delete: verbs.py)."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import click

from jobworker.cli.options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Connection,
    connection_options,
    fail,
    json_option,
    wide_option,
)

# grpc, protobuf and rich are imported inside the commands: `jobworker --help` stays fast.
if TYPE_CHECKING:
    from google.protobuf.duration_pb2 import Duration
    from rich.console import Console

    from jobworker.client.rpc import RpcClient as Client
    from jobworker.v1 import jobworker_pb2 as pb

_UINT32_MAX = 2**32 - 1
_PIPE_WIDTH = 1000
_BATCH_STATE_NAMES = ("running", "succeeded", "failed", "canceled")
_PROGRESS_MIN_JOBS = 10


class _Printer(Protocol):
    def handle(self, response: pb.StreamBatchLogsResponse) -> None: ...
    def close(self) -> None: ...


def _pairs(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    """KEY=VALUE options into a dict; a later KEY wins."""
    pairs = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", ctx=ctx, param=param)
        pairs[key] = item
    return pairs


def _duration_seconds(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> float | None:
    from jobworker.units import parse_duration

    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    if seconds <= 0:
        raise click.BadParameter("must be more than 0", ctx=ctx, param=param)
    return seconds


def _timeout_duration(seconds: float) -> Duration:
    from google.protobuf.duration_pb2 import Duration

    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1_000_000_000))
    return duration


def _stdout_console() -> Console:
    from rich.console import Console

    # Piped: one table row a line, however long, for grep and awk.
    width = None if sys.stdout.isatty() else _PIPE_WIDTH
    return Console(highlight=False, width=width)


def _stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _print_json(value: object) -> None:
    """A value of jobworker.client.types in the documented --json shape."""
    from jobworker.client.jsonshape import to_json

    click.echo(json.dumps(to_json(value), indent=2, ensure_ascii=False))


def _batch_json(batch: pb.Batch) -> None:
    from jobworker.client import convert

    _print_json(convert.batch(batch))


def _use_color() -> bool:
    """Colour only for a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _say_reconnect(cursor: str, err: Exception) -> None:
    click.echo(f"jobworker: stream broke ({err}), reconnecting from cursor", err=True)


def _print_stream(
    client: Client,
    cid: str,
    job_names: Sequence[str],
    printer: _Printer,
    follow: bool,
    tail_lines: int | None = None,
) -> None:
    responses: Iterator[pb.StreamBatchLogsResponse] = (
        client.follow(cid, job_names, on_reconnect=_say_reconnect, tail_lines=tail_lines)
        if follow
        else client.stream(cid, job_names, tail_lines=tail_lines)
    )
    try:
        for response in responses:
            printer.handle(response)
    finally:
        printer.close()


def _line_printer(
    names: Iterable[str], no_prefix: bool, follow: bool, timestamps: bool = False
) -> _Printer:
    from jobworker.cli.loglines import LinePrefixer, LogPrinter

    prefixer = LinePrefixer(names, color=_use_color(), prefix=not no_prefix, timestamps=timestamps)
    return LogPrinter(sys.stdout, prefixer, states=follow and not no_prefix, live=follow)


def _selected_succeeded(batch: pb.Batch, job_names: Sequence[str]) -> bool:
    """Whether the batch succeeded; with a selection of jobs, whether they all did."""
    from jobworker.v1 import jobworker_pb2 as pb

    if job_names:
        selected = set(job_names)
        chosen = [job for job in batch.jobs if job.spec.name in selected]
        return bool(chosen) and all(job.state == pb.JOB_STATE_SUCCEEDED for job in chosen)
    return batch.state == pb.BATCH_STATE_SUCCEEDED


def _interrupted(cid: str) -> None:
    click.echo(
        f"jobworker: interrupted; batch {cid} goes on (`jobworker cancel {cid}` stops it)",
        err=True,
    )


# -- submit -------------------------------------------------------------------------------


def _command_line_jobs(
    argv: Sequence[str], commands: Sequence[str], names: Sequence[str]
) -> list[pb.JobSpec]:
    from jobworker.v1 import jobworker_pb2 as pb

    argvs = [list(argv)] if argv else [["sh", "-c", command] for command in commands]
    if len(names) > len(argvs):
        raise click.UsageError(f"--name given {len(names)} times for {len(argvs)} job(s)")
    return [
        pb.JobSpec(name=names[i] if i < len(names) else "", argv=job_argv)
        for i, job_argv in enumerate(argvs)
    ]


def _batch_options(
    base: pb.BatchOptions | None,
    labels: dict[str, str],
    max_parallel: int | None,
    fail_fast: bool | None,
    idempotency_key: str | None,
    executor: str | None = None,
) -> pb.BatchOptions | None:
    """The batch file's options with the command line's on top; None when there are none."""
    from jobworker.v1 import jobworker_pb2 as pb

    options = pb.BatchOptions()
    if base is not None:
        options.CopyFrom(base)
    options.labels.update(labels)
    if max_parallel is not None:
        options.max_parallel = max_parallel
    if fail_fast is not None:
        options.fail_fast = fail_fast
    if idempotency_key is not None:
        options.idempotency_key = idempotency_key
    if executor is not None:
        options.executor = executor
    return options if options.ByteSize() or base is not None else None


def _apply_defaults(
    jobs: Iterable[pb.JobSpec],
    env: dict[str, str],
    workdir: str | None,
    timeout: float | None,
) -> None:
    """--env, --workdir and --timeout for each job that does not set its own."""
    for job in jobs:
        for key, value in env.items():
            job.env.setdefault(key, value)
        if workdir and not job.working_dir:
            job.working_dir = workdir
        if timeout is not None and not job.HasField("timeout"):
            job.timeout.CopyFrom(_timeout_duration(timeout))


@click.command(context_settings={"allow_interspersed_args": False})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, metavar="[--] [CMD [ARGS]...]")
@click.option(
    "-c",
    "--command",
    "commands",
    multiple=True,
    metavar="CMD",
    help="A job running `sh -c CMD`; repeat for more jobs.",
)
@click.option(
    "-f",
    "--file",
    "batch_file",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help='A batch file (YAML or JSON; "-" reads stdin) with options and jobs.',
)
@click.option(
    "-n",
    "--name",
    "names",
    multiple=True,
    metavar="NAME",
    help="The job's name; repeat to name the -c jobs in order. Default: job-<index>.",
)
@click.option(
    "-e",
    "--env",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_pairs,
    help="Add to each job's environment (the job's own env wins); repeatable.",
)
@click.option(
    "-w", "--workdir", metavar="PATH", help="Absolute working directory of each job lacking one."
)
@click.option(
    "--timeout",
    metavar="DURATION",
    callback=_duration_seconds,
    help='Timeout of each job lacking one, e.g. "30s", "5m".',
)
@click.option(
    "-l",
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_pairs,
    help="A label of the batch; repeatable.",
)
@click.option(
    "--max-parallel",
    type=click.IntRange(0, _UINT32_MAX),
    metavar="N",
    help="At most N of the batch's jobs run at once (0: no limit of its own).",
)
@click.option(
    "--fail-fast/--no-fail-fast",
    default=None,
    help="When a job does not succeed, cancel the jobs that have not ended.",
)
@click.option(
    "--idempotency-key",
    metavar="KEY",
    help="Submitting again with the same KEY returns the first batch's id.",
)
@click.option(
    "--executor",
    metavar="NAME",
    help='Where the jobs run: "local" (the server\'s host) or an executor the server '
    "configures under [executors], such as a Ray cluster. Default: the server's.",
)
@click.option(
    "--follow",
    is_flag=True,
    help="Then print the logs live and exit 0 if the batch succeeded, 1 if not.",
)
@click.option(
    "-i",
    "--stdin",
    "send_stdin",
    is_flag=True,
    help="Send this command's standard input to the job (one job only).",
)
@click.option("-q", "--quiet", is_flag=True, help="With --follow: no job output, only the result.")
@click.option(
    "--failures-only",
    is_flag=True,
    help="With --follow: only the output (its tail) and end of jobs that did not succeed.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="With --follow: one live progress line (done, failed, running, jobs/s) on stderr. "
    f"Default: on a terminal, for batches of {_PROGRESS_MIN_JOBS} jobs or more.",
)
@json_option
@connection_options
def submit(
    *,
    conn: Connection,
    argv: tuple[str, ...],
    commands: tuple[str, ...],
    batch_file: Path | None,
    names: tuple[str, ...],
    env: dict[str, str],
    workdir: str | None,
    timeout: float | None,
    labels: dict[str, str],
    max_parallel: int | None,
    fail_fast: bool | None,
    idempotency_key: str | None,
    executor: str | None,
    follow: bool,
    send_stdin: bool,
    quiet: bool,
    failures_only: bool,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Schedule a batch of jobs and print its correlation id.

    \b
    The jobs come from one of:
      jobworker submit [OPTIONS] -- CMD [ARGS]...   one job, run without a shell
      jobworker submit -c 'CMD' [-c 'CMD2']...      one job per -c, run by `sh -c`
      jobworker submit -f batch.yaml                a batch file (YAML or JSON)

    Only the id goes to stdout, so that `cid=$(jobworker submit -- make test)` works.
    With --follow, the logs follow and the exit code is the batch's: 0 if it
    succeeded, 1 if not; its job table goes to stderr.

    A job's standard input is empty unless -i sends this command's own; piped input
    without -i is refused (exit 2) rather than silently dropped.
    """
    _check_submit_flags(argv, commands, batch_file, names, send_stdin, follow, as_json)
    if (quiet or failures_only or progress) and not follow:
        raise click.UsageError("--quiet, --failures-only and --progress go with --follow")
    file_options, jobs = _gather_jobs(argv, commands, batch_file, names, send_stdin)
    _apply_defaults(jobs, env, workdir, timeout)
    options = _batch_options(
        file_options, labels, max_parallel, fail_fast, idempotency_key, executor
    )

    with conn.client() as client:
        response = client.schedule(jobs, options)
        if as_json:
            from jobworker.client import convert

            _print_json(convert.submitted(response))
            return
        if not follow:
            click.echo(response.correlation_id)
            return
        batch = _follow_submitted(client, response, progress, quiet, failures_only)
    _end_followed(batch, quiet)


def _end_followed(batch: pb.Batch, quiet: bool) -> None:
    """After --follow: the job table on stderr (with --quiet, only when one failed); exit
    with the batch's result."""
    from jobworker.cli.tables import print_batch

    succeeded = _selected_succeeded(batch, ())
    if not quiet or not succeeded:
        print_batch(_stderr_console(), batch)
    raise click.exceptions.Exit(EXIT_OK if succeeded else EXIT_FAILED)


def _gather_jobs(
    argv: Sequence[str],
    commands: Sequence[str],
    batch_file: Path | None,
    names: Sequence[str],
    send_stdin: bool,
) -> tuple[pb.BatchOptions | None, list[pb.JobSpec]]:
    from jobworker.cli.batchfile import BatchFileError, load_batch_file

    if batch_file is None:
        jobs = _command_line_jobs(argv, commands, names)
        _take_stdin(jobs, send_stdin)
        return None, jobs
    try:
        return load_batch_file(batch_file)
    except BatchFileError as err:
        fail(str(err), EXIT_USAGE)


def _follow_submitted(
    client: Client,
    response: pb.ScheduleBatchResponse,
    progress: bool | None,
    quiet: bool,
    failures_only: bool,
) -> pb.Batch:
    """Follow a batch just scheduled until it ends; the batch then."""
    cid = response.correlation_id
    click.echo(f"jobworker: batch {cid}", err=True)
    if progress is None:
        progress = sys.stderr.isatty() and len(response.job_names) >= _PROGRESS_MIN_JOBS
    try:
        printer = _follow_printer(response.job_names, progress, quiet, failures_only)
        _print_stream(client, cid, (), printer, follow=True)
    except KeyboardInterrupt:
        _interrupted(cid)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    return client.get(cid, log_tail_bytes=0)


def _check_submit_flags(
    argv: Sequence[str],
    commands: Sequence[str],
    batch_file: Path | None,
    names: Sequence[str],
    send_stdin: bool,
    follow: bool,
    as_json: bool,
) -> None:
    if sum(bool(source) for source in (argv, commands, batch_file)) != 1:
        raise click.UsageError("give the jobs with one of: -- CMD [ARGS], -c CMD, -f FILE")
    if follow and as_json:
        raise click.UsageError("--json and --follow do not go together")
    if batch_file is not None and names:
        raise click.UsageError("--name does not go with -f: name the jobs in the file")
    if batch_file is not None and send_stdin:
        raise click.UsageError("-i does not go with -f: give stdin or stdin_file in the file")


def _stdin_is_data() -> bool:
    """True when this command's stdin is a pipe, socket or file: input meant for someone."""
    import stat

    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)


def _take_stdin(jobs: list[pb.JobSpec], send_stdin: bool) -> None:
    if not send_stdin:
        if _stdin_is_data():
            fail(
                "standard input is a pipe or file, and a job gets none unless asked: "
                "pass -i to send it to the job (or </dev/null to send nothing)",
                EXIT_USAGE,
            )
        return
    if len(jobs) != 1:
        raise click.UsageError(f"-i sends stdin to one job; there are {len(jobs)}")
    jobs[0].stdin = sys.stdin.buffer.read()


def _follow_printer(
    names: Sequence[str], progress: bool, quiet: bool, failures_only: bool
) -> _Printer:
    if not (progress or quiet or failures_only):
        return _line_printer(names, no_prefix=False, follow=True)
    from jobworker.cli.progress import ProgressPrinter

    return ProgressPrinter(
        names,
        sys.stdout,
        sys.stderr,
        live=progress,
        # The progress line stands for the output of the jobs that succeed.
        failures_only=failures_only or (progress and not quiet),
        quiet=quiet,
    )


# -- status -------------------------------------------------------------------------------


@click.command()
@click.argument("cid", metavar="CORRELATION_ID")
@click.option("--job", "jobs", multiple=True, metavar="NAME", help="Only this job; repeatable.")
@click.option(
    "--logs", "show_logs", is_flag=True, help="Print the jobs' log tails below the table."
)
@click.option(
    "--tail",
    type=click.IntRange(0, _UINT32_MAX),
    metavar="BYTES",
    help="Log bytes per job and stream: default none in the table, the server's "
    "default (64 KiB) with --logs or --json.",
)
@wide_option
@json_option
@connection_options
def status(
    *,
    conn: Connection,
    cid: str,
    jobs: tuple[str, ...],
    show_logs: bool,
    tail: int | None,
    wide: bool,
    as_json: bool,
) -> None:
    """Print the state of a batch and of each of its jobs.

    \b
    Exit code: 0 the batch succeeded; 1 it failed, was cancelled or is still running
    (`jobworker wait` waits for it); 3 not found; 4 cannot connect; 5 not allowed.
    """
    from jobworker.cli.tables import print_batch

    log_tail_bytes = tail if tail is not None or show_logs or as_json else 0
    with conn.client() as client:
        batch = client.get(cid, jobs, log_tail_bytes)
    if as_json:
        _batch_json(batch)
    else:
        print_batch(_stdout_console(), batch, logs=show_logs, wide=wide)
    raise click.exceptions.Exit(EXIT_OK if _selected_succeeded(batch, ()) else EXIT_FAILED)


# -- logs ---------------------------------------------------------------------------------


class _JsonLinesPrinter:
    """One JSON object a line for each response: chunks and state changes."""

    def __init__(self, follow: bool) -> None:
        self.follow = follow

    def handle(self, response: pb.StreamBatchLogsResponse) -> None:
        from jobworker.client import convert
        from jobworker.client.jsonshape import to_json

        event = convert.event(response)
        if event is None:
            return
        click.echo(json.dumps(to_json(event), ensure_ascii=False))
        if self.follow:
            sys.stdout.flush()

    def close(self) -> None:
        sys.stdout.flush()


@click.command()
@click.argument("cid", metavar="CORRELATION_ID")
@click.option(
    "-f", "--follow", is_flag=True, help="Go on live until the jobs end; resume broken streams."
)
@click.option("--job", "jobs", multiple=True, metavar="NAME", help="Only this job; repeatable.")
@click.option(
    "--raw",
    is_flag=True,
    help="The bytes of one job as is: its stdout to stdout, its stderr to stderr.",
)
@click.option("--no-prefix", is_flag=True, help="Print the lines without the job's name.")
@click.option(
    "--tail",
    "tail_lines",
    type=click.IntRange(0, _UINT32_MAX),
    metavar="N",
    help="Start each job's stdout and stderr at its last N lines.",
)
@click.option(
    "-t",
    "--timestamps",
    is_flag=True,
    help="Begin each line with the time the job wrote it (RFC 3339, UTC).",
)
@json_option
@connection_options
def logs(
    *,
    conn: Connection,
    cid: str,
    follow: bool,
    jobs: tuple[str, ...],
    raw: bool,
    no_prefix: bool,
    tail_lines: int | None,
    timestamps: bool,
    as_json: bool,
) -> None:
    """Print the output of a batch's jobs, each line prefixed with its job's name.

    \b
    Lines a job wrote to stderr are marked `name ! line`, stdout `name | line`.
    With --follow, job state changes are printed too (`name | -- exited 0 (SUCCEEDED)`),
    and the exit code is 0 if the jobs succeeded, 1 if not.
    --raw needs exactly one job (--job NAME, or a batch of one job).
    --json prints each chunk and state change as one JSON object a line.
    """
    from jobworker.cli.loglines import RawPrinter

    if raw and (no_prefix or as_json or timestamps):
        raise click.UsageError("--raw does not go with --no-prefix, --timestamps or --json")
    with conn.client() as client:
        batch = client.get(cid, jobs, log_tail_bytes=0)
        names = [job.spec.name for job in batch.jobs]
        printer: _Printer
        if raw:
            if len(jobs) > 1:
                raise click.UsageError("--raw needs exactly one job: give --job once")
            if not jobs and len(names) != 1:
                raise click.UsageError(
                    f"--raw needs exactly one job; batch {cid} has {len(names)}: "
                    "choose one with --job NAME"
                )
            printer = RawPrinter(sys.stdout.buffer, sys.stderr.buffer, live=follow)
            jobs = jobs or (names[0],)
        elif as_json:
            printer = _JsonLinesPrinter(follow)
        else:
            printer = _line_printer(names, no_prefix, follow, timestamps)
        try:
            _print_stream(client, cid, jobs, printer, follow, tail_lines)
        except KeyboardInterrupt:
            if follow:
                # Stopping to watch stops nothing on the server.
                raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
            raise
        if not follow:
            return
        batch = client.get(cid, jobs, log_tail_bytes=0)
    raise click.exceptions.Exit(EXIT_OK if _selected_succeeded(batch, jobs) else EXIT_FAILED)


# -- cancel -------------------------------------------------------------------------------


@click.command()
@click.argument("cid", metavar="CORRELATION_ID")
@click.option("--job", "jobs", multiple=True, metavar="NAME", help="Only this job; repeatable.")
@click.option(
    "--grace",
    metavar="DURATION",
    callback=_duration_seconds,
    help="Between SIGTERM and SIGKILL; default: the server's.",
)
@wide_option
@json_option
@connection_options
def cancel(
    *,
    conn: Connection,
    cid: str,
    jobs: tuple[str, ...],
    grace: float | None,
    wide: bool,
    as_json: bool,
) -> None:
    """Cancel a batch's queued and running jobs (or only the --job ones).

    Waits until they have ended, then prints the batch.
    """
    from jobworker.cli.tables import print_batch

    with conn.client() as client:
        batch = client.cancel(cid, jobs, grace)
    if as_json:
        _batch_json(batch)
    else:
        print_batch(_stdout_console(), batch, wide=wide)


# -- list ---------------------------------------------------------------------------------


@click.command("list")
@click.option(
    "-l",
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_pairs,
    help="Only batches with this label; repeatable (all must match).",
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(_BATCH_STATE_NAMES, case_sensitive=False),
    help="Only batches in this state; repeatable (any may match).",
)
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    metavar="N",
    help="At most N batches, newest first.",
)
@click.option("--all", "show_all", is_flag=True, help="Every batch, whatever --limit says.")
@wide_option
@json_option
@connection_options
def list_(
    *,
    conn: Connection,
    labels: dict[str, str],
    states: tuple[str, ...],
    limit: int,
    show_all: bool,
    wide: bool,
    as_json: bool,
) -> None:
    """List the batches you may see, newest first."""
    from itertools import islice

    from jobworker.cli.tables import batches_table
    from jobworker.client import convert, types

    wanted = [convert.batch_state_pb(name.lower()) for name in states]
    page_size = 1000 if show_all else min(limit + 1, 1000)
    with conn.client() as client:
        found = client.iter_batches(page_size, labels, wanted)
        summaries = list(found if show_all else islice(found, limit + 1))
    more = not show_all and len(summaries) > limit
    summaries = summaries[: None if show_all else limit]
    if as_json:
        _print_json(types.BatchList([convert.summary(summary) for summary in summaries]))
        return
    if not summaries:
        click.echo("no batches", err=True)
        return
    _stdout_console().print(batches_table(summaries, wide=wide))
    if more:
        click.echo(f"(the newest {limit}; more with --limit N or --all)", err=True)


COMMANDS: list[click.Command] = [submit, status, logs, cancel, list_]
"""The commands of this module; verbs.py adds wait, retry, delete and schema."""
