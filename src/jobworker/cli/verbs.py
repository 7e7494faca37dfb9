"""The client commands wait, retry and delete, and `jobworker schema`."""

from __future__ import annotations

import json
import sys

import click

from jobworker.cli.options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Connection,
    connection_options,
    json_option,
    wide_option,
)
from jobworker.cli.output import print_json, stdout_console


@click.command()
@click.argument("cids", nargs=-1, required=True, metavar="CORRELATION_ID...")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing; only the exit code tells.")
@wide_option
@json_option
@connection_options
def wait(
    *, conn: Connection, cids: tuple[str, ...], quiet: bool, wide: bool, as_json: bool
) -> None:
    """Wait until the batches have ended and print each one's table.

    \b
    Exit code as `status`: 0 every batch succeeded, 1 one did not; 3 one was not found,
    4 cannot connect, 5 not allowed. --json prints {"batches": [...]}.
    """
    from jobworker.cli.tables import print_batch
    from jobworker.client import convert, types

    ended = []
    with conn.client() as client:
        for cid in cids:
            try:
                # From the logs' current ends: the stream only says when the jobs end.
                for _ in client.follow(cid, tail_lines=0):
                    pass
            except KeyboardInterrupt:
                raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
            ended.append(client.get(cid, log_tail_bytes=0))
    if as_json:
        print_json(types.BatchResults([convert.batch(batch) for batch in ended]))
    elif not quiet:
        console = stdout_console()
        for batch in ended:
            print_batch(console, batch, wide=wide)
    succeeded = all(convert.batch_state(batch.state) == "succeeded" for batch in ended)
    raise click.exceptions.Exit(EXIT_OK if succeeded else EXIT_FAILED)


@click.command()
@click.argument("cid", metavar="CORRELATION_ID")
@click.option(
    "--failed",
    "failed_only",
    is_flag=True,
    help="Only the jobs that did not succeed (dependencies on jobs that did are dropped).",
)
@json_option
@connection_options
def retry(*, conn: Connection, cid: str, failed_only: bool, as_json: bool) -> None:
    """Schedule a batch's jobs again as a new batch and print the new id.

    The new batch has the old one's options and labels, plus the label retry-of=CID.
    """
    from jobworker.client import convert

    with conn.client() as client:
        options, jobs = convert.retry_plan(client.get(cid, log_tail_bytes=0), failed_only)
        if not jobs:
            click.echo(f"jobworker: every job of {cid} succeeded; nothing to retry", err=True)
            raise click.exceptions.Exit(EXIT_OK)
        response = client.schedule(jobs, options)
    if as_json:
        print_json(convert.submitted(response))
    else:
        click.echo(response.correlation_id)


@click.command()
@click.argument("cids", nargs=-1, required=True, metavar="CORRELATION_ID...")
@json_option
@connection_options
def delete(*, conn: Connection, cids: tuple[str, ...], as_json: bool) -> None:
    """Delete ended batches with their logs.

    Stops at the first batch that cannot be deleted (one still running is refused:
    cancel it first); those before it are deleted.
    """
    from jobworker.client import types

    deleted: list[str] = []
    try:
        with conn.client() as client:
            for cid in cids:
                client.delete(cid)
                deleted.append(cid)
                if not as_json:
                    click.echo(f"deleted {cid}")
    finally:
        if as_json:
            print_json(types.Deleted(deleted))


@click.command()
@click.argument("what", type=click.Choice(["batch", "json"]))
def schema(what: str) -> None:
    """Print a JSON Schema: of batch files (batch) or of the commands' --json output (json)."""
    if what == "batch":
        from jobworker.cli.batchfile import batch_file_schema

        data = batch_file_schema()
    else:
        from jobworker.client.jsonshape import json_schema

        data = json_schema()
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


COMMANDS: list[click.Command] = [wait, retry, delete, schema]
