"""`jobworker logs`, and the printing of a log stream that `submit --follow` shares."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import click

from jobworker.cli.options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Connection,
    connection_options,
    json_option,
)
from jobworker.cli.output import selected_succeeded, use_color
from jobworker.cli.params import UINT32_MAX

# grpc and protobuf are imported inside the functions: `jobworker --help` stays fast.
if TYPE_CHECKING:
    from jobworker.client.rpc import RpcClient as Client
    from jobworker.v1 import jobworker_pb2 as pb


class Printer(Protocol):
    """Prints a log stream one response at a time: loglines' printers, ProgressPrinter."""

    def handle(self, response: pb.StreamBatchLogsResponse) -> None: ...
    def close(self) -> None: ...


def _say_reconnect(cursor: str, err: Exception) -> None:
    click.echo(f"jobworker: stream broke ({err}), reconnecting from cursor", err=True)


def print_stream(
    client: Client,
    cid: str,
    job_names: Sequence[str],
    printer: Printer,
    follow: bool,
    tail_lines: int | None = None,
) -> None:
    """The batch's log stream through `printer`; with `follow`, live, resumed if it breaks."""
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


def line_printer(
    names: Iterable[str], no_prefix: bool, follow: bool, timestamps: bool = False
) -> Printer:
    from jobworker.cli.loglines import LinePrefixer, LogPrinter

    prefixer = LinePrefixer(names, color=use_color(), prefix=not no_prefix, timestamps=timestamps)
    return LogPrinter(sys.stdout, prefixer, states=follow and not no_prefix, live=follow)


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
    type=click.IntRange(0, UINT32_MAX),
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
        printer: Printer
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
            printer = line_printer(names, no_prefix, follow, timestamps)
        try:
            print_stream(client, cid, jobs, printer, follow, tail_lines)
        except KeyboardInterrupt:
            if follow:
                # Stopping to watch stops nothing on the server.
                raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
            raise
        if not follow:
            return
        batch = client.get(cid, jobs, log_tail_bytes=0)
    raise click.exceptions.Exit(EXIT_OK if selected_succeeded(batch, jobs) else EXIT_FAILED)


COMMANDS: list[click.Command] = [logs]
