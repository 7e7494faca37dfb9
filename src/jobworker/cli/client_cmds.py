"""The client commands that show batches: status, cancel, list (submit: submit.py; logs:
logs.py; wait, retry, delete: verbs.py)."""

from __future__ import annotations

import click

from jobworker.cli.options import (
    EXIT_FAILED,
    EXIT_OK,
    Connection,
    connection_options,
    json_option,
    wide_option,
)
from jobworker.cli.output import batch_json, print_json, selected_succeeded, stdout_console
from jobworker.cli.params import UINT32_MAX, duration_seconds, pairs

_BATCH_STATE_NAMES = ("running", "succeeded", "failed", "canceled")


@click.command()
@click.argument("cid", metavar="CORRELATION_ID")
@click.option("--job", "jobs", multiple=True, metavar="NAME", help="Only this job; repeatable.")
@click.option(
    "--logs", "show_logs", is_flag=True, help="Print the jobs' log tails below the table."
)
@click.option(
    "--tail",
    type=click.IntRange(0, UINT32_MAX),
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
        batch_json(batch)
    else:
        print_batch(stdout_console(), batch, logs=show_logs, wide=wide)
    raise click.exceptions.Exit(EXIT_OK if selected_succeeded(batch, ()) else EXIT_FAILED)


@click.command()
@click.argument("cid", metavar="CORRELATION_ID")
@click.option("--job", "jobs", multiple=True, metavar="NAME", help="Only this job; repeatable.")
@click.option(
    "--grace",
    metavar="DURATION",
    callback=duration_seconds,
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
        batch_json(batch)
    else:
        print_batch(stdout_console(), batch, wide=wide)


@click.command("list")
@click.option(
    "-l",
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    callback=pairs,
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
        print_json(types.BatchList([convert.summary(summary) for summary in summaries]))
        return
    if not summaries:
        click.echo("no batches", err=True)
        return
    stdout_console().print(batches_table(summaries, wide=wide))
    if more:
        click.echo(f"(the newest {limit}; more with --limit N or --all)", err=True)


COMMANDS: list[click.Command] = [status, cancel, list_]
