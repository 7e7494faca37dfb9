"""A log stream as the client commands print it: lines prefixed with their job's name
(LinePrefixer, LogPrinter), or a job's bytes as is (RawPrinter)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO, TextIO

import click
from google.protobuf.timestamp_pb2 import Timestamp

from jobworker.cli.formatting import job_state_name, signal_name
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
