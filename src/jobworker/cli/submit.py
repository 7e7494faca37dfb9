"""`jobworker submit`: a batch's jobs from the command line or a batch file, scheduled and
maybe followed."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from jobworker.cli.logs import Printer, line_printer, print_stream
from jobworker.cli.options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Connection,
    connection_options,
    fail,
    json_option,
)
from jobworker.cli.output import print_json, selected_succeeded, stderr_console
from jobworker.cli.params import UINT32_MAX, duration_seconds, pairs

# grpc, protobuf and rich are imported inside the functions: `jobworker --help` stays fast.
if TYPE_CHECKING:
    from google.protobuf.duration_pb2 import Duration

    from jobworker.client.rpc import RpcClient as Client
    from jobworker.v1 import jobworker_pb2 as pb

_PROGRESS_MIN_JOBS = 10


def _timeout_duration(seconds: float) -> Duration:
    from google.protobuf.duration_pb2 import Duration

    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1_000_000_000))
    return duration


def _interrupted(cid: str) -> None:
    click.echo(
        f"jobworker: interrupted; batch {cid} goes on (`jobworker cancel {cid}` stops it)",
        err=True,
    )


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
    callback=pairs,
    help="Add to each job's environment (the job's own env wins); repeatable.",
)
@click.option(
    "-w", "--workdir", metavar="PATH", help="Absolute working directory of each job lacking one."
)
@click.option(
    "--timeout",
    metavar="DURATION",
    callback=duration_seconds,
    help='Timeout of each job lacking one, e.g. "30s", "5m".',
)
@click.option(
    "-l",
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    callback=pairs,
    help="A label of the batch; repeatable.",
)
@click.option(
    "--max-parallel",
    type=click.IntRange(0, UINT32_MAX),
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

            print_json(convert.submitted(response))
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

    succeeded = selected_succeeded(batch, ())
    if not quiet or not succeeded:
        print_batch(stderr_console(), batch)
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
        print_stream(client, cid, (), printer, follow=True)
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
) -> Printer:
    if not (progress or quiet or failures_only):
        return line_printer(names, no_prefix=False, follow=True)
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


COMMANDS: list[click.Command] = [submit]
