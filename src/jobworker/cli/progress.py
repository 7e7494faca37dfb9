"""`submit --follow` of a big batch: one live progress line instead of a line per event."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TextIO

from jobworker.cli.loglines import LinePrefixer, state_change_text
from jobworker.v1 import jobworker_pb2 as pb

# Output kept per running job for --failures-only: the tail printed if the job fails.
KEEP_BYTES = 16 * 1024
_FAILED_STATES = frozenset(
    {pb.JOB_STATE_FAILED, pb.JOB_STATE_TIMED_OUT, pb.JOB_STATE_CANCELED, pb.JOB_STATE_LOST}
)
_ENDED = frozenset({*_FAILED_STATES, pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_SKIPPED})
_REDRAW_EVERY = 0.2


class ProgressPrinter:
    """Counts jobs by state and draws `12/200 done, 1 failed, 4 running, 3.1 jobs/s`.

    On a terminal (`live`) the line is redrawn in place on `err`; otherwise it is printed
    once at the end. With `failures_only`, the output of each job that does not succeed
    (its last KEEP_BYTES) and its state change go to `out` when it ends; with `quiet`,
    nothing but the progress.
    """

    def __init__(
        self,
        names: Iterable[str],
        out: TextIO,
        err: TextIO,
        *,
        live: bool,
        failures_only: bool,
        quiet: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.names = list(names)
        self.out, self.err = out, err
        self.live, self.failures_only, self.quiet = live, failures_only, quiet
        self.clock = clock
        self.started = clock()
        self.last_draw = 0.0
        self.states: dict[str, int] = dict.fromkeys(self.names, pb.JOB_STATE_QUEUED)
        self.kept: dict[tuple[str, int], bytearray] = {}
        self.prefixer = LinePrefixer(self.names)

    def handle(self, response: pb.StreamBatchLogsResponse) -> None:
        """Count one event; print a failure; redraw the line now and then."""
        event = response.WhichOneof("event")
        if event == "chunk" and self.failures_only and not self.quiet:
            chunk = response.chunk
            kept = self.kept.setdefault((chunk.job_name, chunk.stream), bytearray())
            kept += chunk.data
            del kept[: max(0, len(kept) - KEEP_BYTES)]
        elif event == "state_change":
            self._changed(response.state_change)
        if self.live and self.clock() - self.last_draw >= _REDRAW_EVERY:
            self._draw()

    def _changed(self, change: pb.JobStateChange) -> None:
        self.states[change.job_name] = change.state
        if change.state not in _ENDED:
            return
        kept = [self.kept.pop((change.job_name, s), b"") for s in (1, 2)]
        if change.state in _FAILED_STATES and self.failures_only and not self.quiet:
            lines = []
            for stream, data in zip(
                (pb.LOG_STREAM_STDOUT, pb.LOG_STREAM_STDERR), kept, strict=True
            ):
                lines += self.prefixer.feed(change.job_name, stream, bytes(data))
            lines += self.prefixer.flush(change.job_name)
            lines.append(
                self.prefixer.format(
                    change.job_name, pb.LOG_STREAM_STDOUT, state_change_text(change)
                )
            )
            self._clear()
            self.out.write("".join(lines))
            self.out.flush()

    def line(self) -> str:
        """The progress line's text."""
        counts: dict[int, int] = {}
        for state in self.states.values():
            counts[state] = counts.get(state, 0) + 1
        done = sum(counts.get(state, 0) for state in _ENDED)
        failed = sum(counts.get(state, 0) for state in _FAILED_STATES)
        running = counts.get(pb.JOB_STATE_RUNNING, 0)
        rate = done / max(self.clock() - self.started, 1e-3)
        parts = [f"{done}/{len(self.states)} done", f"{failed} failed", f"{running} running"]
        skipped = counts.get(pb.JOB_STATE_SKIPPED, 0)
        if skipped:
            parts.append(f"{skipped} skipped")
        return ", ".join(parts) + f", {rate:.1f} jobs/s"

    def _draw(self) -> None:
        self.last_draw = self.clock()
        self.err.write("\r\x1b[2K" + self.line())
        self.err.flush()

    def _clear(self) -> None:
        if self.live:
            self.err.write("\r\x1b[2K")
            self.err.flush()

    def close(self) -> None:
        """The final progress line, on a line of its own."""
        self._clear()
        self.err.write(self.line() + "\n")
        self.err.flush()
