"""What the client commands print: job tables, prefixed log lines, raw bytes, JSON."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO, TextIO

import click
from google.protobuf.json_format import MessageToDict
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
    """A short state name in its colour."""
    return Text(name, style=_STATE_STYLES.get(name, ""))


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


def job_table(batch: pb.Batch, now: float | None = None) -> Table:
    """One row a job: index, name, state, exit, duration, message."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("name")
    table.add_column("state")
    table.add_column("exit", justify="right")
    table.add_column("duration", justify="right")
    table.add_column("message", overflow="fold")
    for job in batch.jobs:
        table.add_row(
            str(job.index),
            Text(job.spec.name),
            state_text(job_state_name(job.state)),
            format_exit(job),
            elapsed(job, "start_time", "end_time", now),
            Text(job.message),
        )
    return table


def print_batch(console: Console, batch: pb.Batch, logs: bool = False) -> None:
    """The batch's header and job table; with `logs`, each job's log tails below."""
    console.print(batch_header(batch), soft_wrap=True)
    console.print(job_table(batch))
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


def batches_table(summaries: Iterable[pb.BatchSummary], now: float | None = None) -> Table:
    """One row a batch: correlation id, owner, state, jobs, labels, created, duration."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    # An id is no use cut short: it never wraps.
    table.add_column("correlation id", no_wrap=True)
    for name in ("owner", "state", "jobs", "labels", "created"):
        table.add_column(name)
    table.add_column("duration", justify="right")
    for summary in summaries:
        table.add_row(
            summary.correlation_id,
            Text(summary.owner),
            state_text(batch_state_name(summary.state)),
            jobs_summary(summary),
            Text(format_labels(summary.labels.items())),
            format_time(summary.create_time),
            elapsed(summary, "create_time", "end_time", now),
        )
    return table


def message_to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data, with the .proto's field names; bytes are base64."""
    return MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


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
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.color = color
        self.prefix = prefix
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

    def format(self, job: str, stream: int, text: str) -> str:
        """One line with its prefix, ending with a newline."""
        if not self.prefix:
            return text + "\n"
        self._learn(job)
        mark = STDERR_MARK if stream == pb.LOG_STREAM_STDERR else STDOUT_MARK
        name = job.ljust(self._width)
        if self.color:
            name = click.style(name, fg=self._colors[job])
            mark = click.style(mark, fg="red" if mark == STDERR_MARK else self._colors[job])
        return f"{name} {mark} {text}\n"

    def feed(self, job: str, stream: int, data: bytes) -> list[str]:
        """The complete lines that `data` finishes, formatted; the rest waits."""
        self._learn(job)
        buffer = self._buffers.setdefault(_Key(job, stream), bytearray())
        buffer += data
        lines = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            lines.append(self.format(job, stream, _decode(buffer[start:end])))
            start = end + 1
        while len(buffer) - start >= self.max_line_bytes:
            piece = buffer[start : start + self.max_line_bytes]
            lines.append(self.format(job, stream, _decode(piece)))
            start += self.max_line_bytes
        del buffer[:start]
        return lines

    def flush(self, job: str) -> list[str]:
        """The job's partial lines, as if its streams had ended."""
        lines = []
        for stream in (pb.LOG_STREAM_STDOUT, pb.LOG_STREAM_STDERR):
            buffer = self._buffers.pop(_Key(job, stream), None)
            if buffer:
                lines.append(self.format(job, stream, _decode(buffer)))
        return lines

    def flush_all(self) -> list[str]:
        """Every partial line left, in the order the jobs were first seen."""
        jobs = dict.fromkeys(key.job for key in self._buffers)
        return [line for job in jobs for line in self.flush(job)]


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
            lines = self.prefixer.feed(chunk.job_name, chunk.stream, chunk.data)
        elif event == "state_change":
            change = response.state_change
            # An ended job writes nothing more: its partial lines are complete.
            ended = change.state in _ENDED_JOB_STATES
            lines = self.prefixer.flush(change.job_name) if ended else []
            if self.states:
                text = state_change_text(change)
                lines.append(self.prefixer.format(change.job_name, pb.LOG_STREAM_STDOUT, text))
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
