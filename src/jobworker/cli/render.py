"""What the client commands print: job tables, prefixed log lines, raw bytes, JSON."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO, TextIO

import click
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table
from rich.text import Text

from jobworker.v1 import jobworker_pb2 as pb

# Colours of the job prefixes, in job order, like `docker compose logs`; red marks stderr.
PALETTE = (
    "cyan",
    "yellow",
    "green",
    "magenta",
    "blue",
    "bright_cyan",
    "bright_yellow",
    "bright_green",
    "bright_magenta",
    "bright_blue",
)
STDOUT_MARK = "|"
STDERR_MARK = "!"
# A line longer than this is printed in pieces, so a job that never writes a newline
# cannot make the client hold its whole output.
MAX_LINE_BYTES = 64 * 1024

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
_ENDED_JOB_STATES = frozenset(
    {
        pb.JOB_STATE_SUCCEEDED,
        pb.JOB_STATE_FAILED,
        pb.JOB_STATE_TIMED_OUT,
        pb.JOB_STATE_CANCELED,
        pb.JOB_STATE_SKIPPED,
        pb.JOB_STATE_LOST,
    }
)


def job_state_name(state: int) -> str:
    """A JobState as a short word: "succeeded", "timed_out"."""
    return _short(pb.JobState.Name(state), "JOB_STATE_") if state in _JOB_STATES else str(state)


def batch_state_name(state: int) -> str:
    """A BatchState as a short word: "running", "failed"."""
    if state not in _BATCH_STATES:
        return str(state)
    return _short(pb.BatchState.Name(state), "BATCH_STATE_")


_JOB_STATES = frozenset(pb.JobState.values())
_BATCH_STATES = frozenset(pb.BatchState.values())


def _short(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def signal_name(number: int) -> str:
    """ "SIGKILL" for 9; "signal 99" for a number Python does not know."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def format_exit(job: pb.Job | pb.JobStateChange) -> str:
    """The exit code, or the name of the signal that ended the process, or ""."""
    if job.signal:
        return signal_name(job.signal)
    if job.HasField("exit_code"):
        return str(job.exit_code)
    return ""


def human_duration(seconds: float) -> str:
    """A short duration for tables: "0.25s", "4.2s", "3m07s", "2h05m", "3d04h"."""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def elapsed(message: Message, start: str, end: str, now: float | None = None) -> str:
    """How long from the `start` timestamp field to `end` (or now, if not ended); "" if unset."""
    if not message.HasField(start):
        return ""
    begin = _seconds(getattr(message, start))
    if message.HasField(end):
        return human_duration(_seconds(getattr(message, end)) - begin)
    return human_duration((time.time() if now is None else now) - begin) + "+"


def format_time(ts: Timestamp | None) -> str:
    """A timestamp in local time, to the second; "" when unset."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return ""
    when = datetime.fromtimestamp(_seconds(ts), tz=UTC).astimezone()
    return when.strftime("%Y-%m-%d %H:%M:%S")


def format_labels(labels: Iterable[tuple[str, str]]) -> str:
    """Labels as "k=v,k2=v2", sorted."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels))


def state_text(name: str) -> Text:
    """A short state name in its colour ("failed #2": the second attempt)."""
    return Text(name, style=_STATE_STYLES.get(name.partition(" ")[0], ""))


def state_change_text(change: pb.JobStateChange) -> str:
    """A job's state change in words: "-- started", "-- exited 0 (SUCCEEDED)"."""
    if change.state == pb.JOB_STATE_QUEUED:
        text = "-- queued"
    elif change.state == pb.JOB_STATE_RUNNING:
        text = "-- started"
    elif change.signal:
        text = f"-- killed by {signal_name(change.signal)} ({job_state_name(change.state).upper()})"
    elif change.HasField("exit_code"):
        text = f"-- exited {change.exit_code} ({job_state_name(change.state).upper()})"
    else:
        text = f"-- {job_state_name(change.state).replace('_', ' ')}"
    # The server's message repeats the exit status in words; say it once.
    redundant = change.HasField("exit_code") and change.message == (
        f"exited with status {change.exit_code}"
    )
    return f"{text}: {change.message}" if change.message and not redundant else text


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


SHORT_ID = 8
COMMAND_WIDTH = 40


def short_id(cid: str, wide: bool = False) -> str:
    """The first 8 characters of a correlation id (a unique prefix is accepted for it)."""
    return cid if wide else cid[:SHORT_ID]


def command_text(argv: Iterable[str], wide: bool = False) -> str:
    """argv joined as a shell would read it, shortened with "…" unless `wide`."""
    import shlex

    args = list(argv)
    # `sh -c 'make test'` reads best as the script itself.
    text = args[2] if len(args) == 3 and args[:2] == ["sh", "-c"] else shlex.join(args)
    text = " ".join(text.split())
    if wide or len(text) <= COMMAND_WIDTH:
        return text
    return text[: COMMAND_WIDTH - 1] + "…"


def compact_size(n: int) -> str:
    """A size in a few characters: "512B", "3.2M", "1.0G"."""
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def cpu_text(job: pb.Job) -> str:
    """CPU time used (user + system), "" before the job has any."""
    if not job.HasField("usage"):
        return ""
    seconds = job.usage.user_cpu.ToNanoseconds() + job.usage.system_cpu.ToNanoseconds()
    return human_duration(seconds / 1e9) if job.state != pb.JOB_STATE_QUEUED else ""


def memory_text(job: pb.Job) -> str:
    """Peak memory, "" when not recorded."""
    rss = job.usage.max_rss_bytes if job.HasField("usage") else 0
    return compact_size(rss) if rss else ""


def waiting_for(job: pb.Job, states: Mapping[str, int]) -> str:
    """Why a queued job has not started, where the client can tell: "after build".

    `states`: each job's state by name (made once a table: a batch may have 10,000 jobs)."""
    if job.state != pb.JOB_STATE_QUEUED:
        return ""
    pending = [
        name
        for name in job.spec.depends_on
        if states.get(name, pb.JOB_STATE_QUEUED) != pb.JOB_STATE_SUCCEEDED
    ]
    return f"after {', '.join(pending)}" if pending else ""


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


def jobs_summary(summary: pb.BatchSummary) -> str:
    """The jobs of a batch in a few words: "3/5 ok, 1 failed, 1 running"."""
    counts = {
        _short(name, "JOB_STATE_"): count for name, count in summary.jobs_by_state.items() if count
    }
    parts = [f"{counts.pop('succeeded', 0)}/{summary.job_count} ok"]
    parts.extend(f"{count} {name.replace('_', ' ')}" for name, count in sorted(counts.items()))
    return ", ".join(parts)


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


@dataclass(frozen=True)
class _Key:
    job: str
    stream: int


class LinePrefixer:
    """Splits each job's output into lines, buffering partial ones per (job, stream).

    Each complete line comes back formatted as `name  | text` (stderr: `name  ! text`),
    the names padded to the longest, coloured per job when `color` is on.
    """

    def __init__(
        self,
        names: Iterable[str] = (),
        *,
        color: bool = False,
        prefix: bool = True,
        timestamps: bool = False,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.color = color
        self.prefix = prefix
        self.timestamps = timestamps
        # When the first byte of each buffered partial line was written.
        self._started: dict[_Key, Timestamp | None] = {}
        self.max_line_bytes = max_line_bytes
        self._colors: dict[str, str] = {}
        self._width = 0
        self._buffers: dict[_Key, bytearray] = {}
        for name in names:
            self._learn(name)

    def _learn(self, name: str) -> None:
        if name not in self._colors:
            self._colors[name] = PALETTE[len(self._colors) % len(PALETTE)]
            self._width = max(self._width, len(name))

    def format(self, job: str, stream: int, text: str, when: Timestamp | None = None) -> str:
        """One line with its prefix (and time, with `timestamps`), ending with a newline."""
        stamp = f"{line_time(when)} " if self.timestamps else ""
        if not self.prefix:
            return stamp + text + "\n"
        self._learn(job)
        mark = STDERR_MARK if stream == pb.LOG_STREAM_STDERR else STDOUT_MARK
        name = job.ljust(self._width)
        if self.color:
            name = click.style(name, fg=self._colors[job])
            mark = click.style(mark, fg="red" if mark == STDERR_MARK else self._colors[job])
        return f"{stamp}{name} {mark} {text}\n"

    def feed(self, job: str, stream: int, data: bytes, when: Timestamp | None = None) -> list[str]:
        """The complete lines that `data` finishes, formatted; the rest waits.

        A line's time is that of the chunk that held its first byte."""
        self._learn(job)
        key = _Key(job, stream)
        buffer = self._buffers.setdefault(key, bytearray())
        first = self._started.get(key) if buffer else when
        buffer += data
        lines = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            lines.append(self.format(job, stream, _decode(buffer[start:end]), first))
            start, first = end + 1, when
        while len(buffer) - start >= self.max_line_bytes:
            piece = buffer[start : start + self.max_line_bytes]
            lines.append(self.format(job, stream, _decode(piece), first))
            start, first = start + self.max_line_bytes, when
        del buffer[:start]
        self._started[key] = first
        return lines

    def flush(self, job: str) -> list[str]:
        """The job's partial lines, as if its streams had ended."""
        lines = []
        for stream in (pb.LOG_STREAM_STDOUT, pb.LOG_STREAM_STDERR):
            key = _Key(job, stream)
            buffer = self._buffers.pop(key, None)
            when = self._started.pop(key, None)
            if buffer:
                lines.append(self.format(job, stream, _decode(buffer), when))
        return lines

    def flush_all(self) -> list[str]:
        """Every partial line left, in the order the jobs were first seen."""
        jobs = dict.fromkeys(key.job for key in self._buffers)
        return [line for job in jobs for line in self.flush(job)]


def line_time(ts: Timestamp | None) -> str:
    """A log line's time for --timestamps: RFC 3339 in UTC to the millisecond."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return "-".ljust(24)
    when = datetime.fromtimestamp(ts.seconds, tz=UTC).replace(microsecond=ts.nanos // 1000)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.nanos // 1_000_000:03d}Z"


def _decode(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", "replace").removesuffix("\r")


class LogPrinter:
    """Prints a StreamBatchLogs stream as prefixed lines on a text stream."""

    def __init__(
        self, out: TextIO, prefixer: LinePrefixer, *, states: bool = False, live: bool = False
    ) -> None:
        self.out = out
        self.prefixer = prefixer
        self.states = states
        self.live = live

    def handle(self, response: pb.StreamBatchLogsResponse) -> None:
        """Print what one response completes."""
        event = response.WhichOneof("event")
        if event == "chunk":
            chunk = response.chunk
            when = chunk.time if chunk.HasField("time") else None
            lines = self.prefixer.feed(chunk.job_name, chunk.stream, chunk.data, when)
        elif event == "state_change":
            change = response.state_change
            # An ended job writes nothing more: its partial lines are complete.
            ended = change.state in _ENDED_JOB_STATES
            lines = self.prefixer.flush(change.job_name) if ended else []
            if self.states:
                text = state_change_text(change)
                when = change.time if change.HasField("time") else None
                lines.append(
                    self.prefixer.format(change.job_name, pb.LOG_STREAM_STDOUT, text, when)
                )
        else:
            return
        self._write(lines)

    def close(self) -> None:
        """Print the partial lines left."""
        self._write(self.prefixer.flush_all())
        self.out.flush()

    def _write(self, lines: list[str]) -> None:
        if lines:
            self.out.write("".join(lines))
            if self.live:
                self.out.flush()


class RawPrinter:
    """Writes the bytes of a job's stdout to `stdout` and of its stderr to `stderr`, as is."""

    def __init__(self, stdout: BinaryIO, stderr: BinaryIO, *, live: bool = False) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.live = live

    def handle(self, response: pb.StreamBatchLogsResponse) -> None:
        """Write one response's bytes, if it carries any."""
        if response.WhichOneof("event") != "chunk":
            return
        chunk = response.chunk
        out = self.stderr if chunk.stream == pb.LOG_STREAM_STDERR else self.stdout
        out.write(chunk.data)
        if self.live:
            out.flush()

    def close(self) -> None:
        """Flush both streams."""
        self.stdout.flush()
        self.stderr.flush()
