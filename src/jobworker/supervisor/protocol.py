"""The server <-> job supervisor protocol: one JSON object per line on a Unix socket.

Versioned: the server's first line is {"op": "hello", "version": N}; a supervisor that
speaks another version answers {"op": "error"} and closes, and the server then says so
(an upgrade that changes the protocol drains the old supervisor first, docs/operations.md).

Server -> supervisor: hello, spawn, stop, kill, ack (the end is journaled: forget it),
reap (jobs the journal says ran but the supervisor does not know: kill what is left),
exit (leave once no job runs), reexec (replace the supervisor's program, children kept).
Supervisor -> server: hello (with every job it knows), started, failed, ended, reaped,
error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobworker.engine.executor import ExitInfo, Known
from jobworker.model import JobSpec, Limits, Usage

VERSION = 1
SOCKET = "supervisor.sock"  # in data_dir; mode 0600, and the peer's uid is checked
PID_FILE = "supervisor.pid"
LOCK_FILE = "supervisor.lock"  # flock: one supervisor per data_dir
LEDGER_FILE = "supervisor.ledger"  # every job's steps, until the server has its end
LOG_FILE = "supervisor.log"
MAX_LINE = 64 * 1024 * 1024  # a hello with every running job's record stays far below

Message = dict[str, Any]


class Outbox:
    """Messages to the other process, written once per loop turn in one write (each write
    wakes the other side). Bound to one connection at a time: what was meant for a
    replaced connection goes to it (or is lost with it), never to its successor."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self._lines: list[bytes] = []

    def use(self, writer: asyncio.StreamWriter | None) -> None:
        self.flush()
        self.writer = writer

    def send(self, message: Message) -> None:
        writer = self.writer
        if writer is not None and not writer.is_closing():
            if not self._lines:
                asyncio.get_running_loop().call_soon(self.flush, writer)
            self._lines.append(encode(message))

    def flush(self, writer: asyncio.StreamWriter | None = None) -> None:
        """Write what was sent; a turn's flush after its connection was replaced finds
        nothing of its own (use() wrote it)."""
        if writer is not None and writer is not self.writer:
            return
        lines, self._lines = self._lines, []
        if lines and self.writer is not None and not self.writer.is_closing():
            self.writer.write(b"".join(lines))


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message:
    """A message; ValueError when the line is not a JSON object with an "op"."""
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError("not a protocol message")  # noqa: TRY004 - one error for bad lines
    return message


def spawn_message(
    key: str,
    attempt: int,
    spec: JobSpec,
    limits: Limits,
    job_dir: Path,
    user: str,
    stdin_file: bool,
) -> Message:
    # The store keeps stdin in the job's folder (spec.stdin is b"" in memory): not sent.
    return {
        "op": "spawn",
        "key": key,
        "attempt": attempt,
        "argv": list(spec.argv),
        "env": dict(spec.env),
        "cwd": spec.working_dir,
        "limits": limits_to_json(limits),
        "job_dir": str(job_dir),
        "user": user,
        "stdin_file": stdin_file,
    }


def spec_from(message: Mapping[str, Any]) -> JobSpec:
    env = message["env"]
    argv = message["argv"]
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ValueError("env: not a map of strings")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv: not a list of strings")
    return JobSpec(name="", argv=tuple(argv), env=env, working_dir=str(message["cwd"]))


def limits_to_json(limits: Limits) -> dict[str, int]:
    return {name: getattr(limits, name) for name in Limits.__dataclass_fields__}


def limits_from(data: Mapping[str, Any]) -> Limits:
    return Limits(**{name: int(data.get(name, 0)) for name in Limits.__dataclass_fields__})


def exit_to_json(info: ExitInfo) -> dict[str, Any]:
    u = info.usage
    return {
        "exit_code": info.exit_code,
        "signal": info.signal,
        "end_time": info.end_time,
        "oom_killed": info.oom_killed,
        "usage": [u.user_cpu, u.system_cpu, u.max_rss_bytes],
        "lost": info.lost,
    }


def exit_from(data: Mapping[str, Any]) -> ExitInfo:
    user, system, rss = data["usage"]
    code = data["exit_code"]
    return ExitInfo(
        exit_code=None if code is None else int(code),
        signal=int(data["signal"]),
        usage=Usage(user_cpu=float(user), system_cpu=float(system), max_rss_bytes=int(rss)),
        end_time=float(data["end_time"]),
        oom_killed=bool(data["oom_killed"]),
        lost=str(data.get("lost", "")),
    )


def known_to_json(known: Known) -> dict[str, Any]:
    return {
        "key": known.key,
        "attempt": known.attempt,
        "pid": known.pid,
        "pid_start": known.pid_start,
        "cgroup": known.cgroup,
    }


def known_from(data: Mapping[str, Any]) -> Known:
    return Known(
        key=str(data["key"]),
        attempt=int(data["attempt"]),
        pid=int(data.get("pid", 0)),
        pid_start=int(data.get("pid_start", 0)),
        cgroup=str(data.get("cgroup", "")),
    )
