"""A job's and a batch's values as the short words the tables and log lines show: state
names, exits, durations, times, sizes, commands."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from jobworker.v1 import jobworker_pb2 as pb


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


def jobs_summary(summary: pb.BatchSummary) -> str:
    """The jobs of a batch in a few words: "3/5 ok, 1 failed, 1 running"."""
    counts = {
        _short(name, "JOB_STATE_"): count for name, count in summary.jobs_by_state.items() if count
    }
    parts = [f"{counts.pop('succeeded', 0)}/{summary.job_count} ok"]
    parts.extend(f"{count} {name.replace('_', ' ')}" for name, count in sorted(counts.items()))
    return ", ".join(parts)
