"""The tables the client commands print: a batch's header and job table, the batch list."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rich.console import Console
from rich.table import Table
from rich.text import Text

from jobworker.cli.formatting import (
    batch_state_name,
    command_text,
    cpu_text,
    elapsed,
    format_exit,
    format_labels,
    format_time,
    job_state_name,
    jobs_summary,
    memory_text,
    short_id,
    waiting_for,
)
from jobworker.v1 import jobworker_pb2 as pb

_STATE_STYLES = {
    "queued": "dim",
    "running": "yellow",
    "succeeded": "green",
    "failed": "bold red",
    "timed_out": "red",
    "canceled": "magenta",
    "skipped": "dim",
    "lost": "red",
}


def state_text(name: str) -> Text:
    """A short state name in its colour ("failed #2": the second attempt)."""
    return Text(name, style=_STATE_STYLES.get(name.partition(" ")[0], ""))


def batch_header(batch: pb.Batch, now: float | None = None) -> Text:
    """Two lines above a job table: the batch's id and state; owner, times, labels."""
    header = Text()
    header.append("batch ", style="bold")
    header.append(batch.correlation_id, style="bold")
    header.append("  ")
    header.append_text(state_text(batch_state_name(batch.state)))
    details = [f"owner {batch.owner}", f"created {format_time(batch.create_time)}"]
    took = elapsed(batch, "create_time", "end_time", now)
    if took:
        details.append(f"{'took' if batch.HasField('end_time') else 'running for'} {took}")
    if batch.options.labels:
        details.append(f"labels {format_labels(batch.options.labels.items())}")
    header.append("\n" + "  ".join(details), style="dim")
    return header


_JOB_COLUMNS = ("#", "name", "state", "exit", "duration", "cpu", "mem", "command", "message")
_NODE_AT = 3  # the "node" column, where shown (_shows_node), comes after "state"
_RIGHT = frozenset({"#", "exit", "duration", "cpu", "mem"})
# Past this many jobs a table is laid out by hand: rich measures every cell (~0.5 ms a row).
PLAIN_TABLE_JOBS = 1000


def _shows_node(batch: pb.Batch, wide: bool) -> bool:
    """Where each job ran is shown for a batch of a cluster executor, and with --wide."""
    return wide or batch.options.executor not in ("", "local")


def _columns(node: bool) -> tuple[str, ...]:
    if not node:
        return _JOB_COLUMNS
    return (*_JOB_COLUMNS[:_NODE_AT], "node", *_JOB_COLUMNS[_NODE_AT:])


def _job_cells(
    job: pb.Job, states: Mapping[str, int], now: float | None, wide: bool, node: bool = False
) -> list[str]:
    state = job_state_name(job.state)
    cells = [
        str(job.index),
        job.spec.name,
        state if job.attempt <= 1 else f"{state} #{job.attempt}",
        format_exit(job),
        elapsed(job, "start_time", "end_time", now),
        cpu_text(job),
        memory_text(job),
        command_text(job.spec.argv, wide),
        job.message or waiting_for(job, states),
    ]
    if node:
        cells.insert(_NODE_AT, job.node)
    return cells


def plain_job_table(batch: pb.Batch, now: float | None = None, wide: bool = False) -> str:
    """The job table as plain text, columns padded, one line a job, for big batches."""
    states = {job.spec.name: job.state for job in batch.jobs}
    node = _shows_node(batch, wide)
    columns = _columns(node)
    rows = [list(columns)] + [_job_cells(job, states, now, wide, node) for job in batch.jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) - 1)]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if name in _RIGHT else cell.ljust(width)
            for name, cell, width in zip(columns, row, widths, strict=False)
        ]
        lines.append(" ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def job_table(batch: pb.Batch, now: float | None = None, wide: bool = False) -> Table:
    """One row a job: index, name, state, exit, duration, CPU, peak memory, command, message."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    node = _shows_node(batch, wide)
    for name in _columns(node):
        if name == "command":
            table.add_column(name, overflow="fold" if wide else "ellipsis")
        elif name == "message":
            table.add_column(name, overflow="fold")
        else:
            table.add_column(name, justify="right" if name in _RIGHT else "left")
    states = {job.spec.name: job.state for job in batch.jobs}
    for job in batch.jobs:
        cells = _job_cells(job, states, now, wide, node)
        table.add_row(
            *cells[:2], state_text(cells[2]), *cells[3:-2], Text(cells[-2]), Text(cells[-1])
        )
    return table


def print_batch(console: Console, batch: pb.Batch, logs: bool = False, wide: bool = False) -> None:
    """The batch's header and job table; with `logs`, each job's log tails below."""
    console.print(batch_header(batch), soft_wrap=True)
    if len(batch.jobs) > PLAIN_TABLE_JOBS:
        console.file.write(plain_job_table(batch, wide=wide))
    else:
        console.print(job_table(batch, wide=wide))
    if logs:
        for job in batch.jobs:
            for stream, tail in (("stdout", job.stdout), ("stderr", job.stderr)):
                if tail.data:
                    console.print(Text(f"== {tail_title(job.spec.name, stream, tail)}", "bold"))
                    console.print(
                        Text(tail.data.decode("utf-8", "replace").rstrip("\n")),
                        highlight=False,
                        markup=False,
                    )


def tail_title(name: str, stream: str, tail: pb.LogTail) -> str:
    """ "build stdout (last 100 of 5000 bytes)" or "build stdout (12 bytes)"."""
    if tail.truncated:
        return f"{name} {stream} (last {len(tail.data)} of {tail.total_bytes} bytes)"
    return f"{name} {stream} ({tail.total_bytes} bytes)"


def batches_table(
    summaries: Iterable[pb.BatchSummary], now: float | None = None, wide: bool = False
) -> Table:
    """One row a batch: id (short unless `wide`), owner, state, jobs, labels, created,
    duration."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    # An id is no use cut short by the table: it never wraps.
    table.add_column("id", no_wrap=True)
    for name in ("owner", "state", "jobs", "labels", "created"):
        table.add_column(name)
    table.add_column("duration", justify="right")
    for summary in summaries:
        table.add_row(
            short_id(summary.correlation_id, wide),
            Text(summary.owner),
            state_text(batch_state_name(summary.state)),
            jobs_summary(summary),
            Text(format_labels(summary.labels.items())),
            format_time(summary.create_time),
            elapsed(summary, "create_time", "end_time", now),
        )
    return table
