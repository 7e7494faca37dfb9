"""Batch files: the options and jobs of one batch in YAML or JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.duration_pb2 import Duration

from jobworker.units import parse_duration, parse_size
from jobworker.v1 import jobworker_pb2 as pb

_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1

_TOP_KEYS = frozenset({"options", "jobs"})
_OPTION_KEYS = frozenset({"labels", "max_parallel", "fail_fast", "idempotency_key"})
_JOB_KEYS = frozenset(
    {
        "name",
        "argv",
        "command",
        "env",
        "working_dir",
        "stdin",
        "stdin_file",
        "timeout",
        "limits",
        "depends_on",
    }
)
_LIMIT_KEYS = frozenset(
    {
        "cpu_millis",
        "memory_bytes",
        "pids_max",
        "io_read_bytes_per_second",
        "io_write_bytes_per_second",
    }
)


class BatchFileError(ValueError):
    """The batch file is invalid; the message names the job (index and name) and the field."""


def load_batch_file(
    path: str | Path, stdin: Callable[[], bytes] | None = None
) -> tuple[pb.BatchOptions | None, list[pb.JobSpec]]:
    """Read and parse a batch file; "-" reads standard input.

    The format comes from the extension (.json, .yaml, .yml) or, failing that, from
    the content: JSON when it starts with "{" or "[", YAML otherwise.
    """
    if str(path) == "-":
        read = stdin or sys.stdin.buffer.read
        raw = read()
        name, base_dir, suffix = "<stdin>", Path.cwd(), ""
    else:
        file = Path(path)
        try:
            raw = file.read_bytes()
        except OSError as err:
            raise BatchFileError(f"cannot read batch file {file}: {err.strerror}") from None
        name, base_dir, suffix = str(file), file.parent, file.suffix.lower()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BatchFileError(f"{name}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_batch(_decode(text, name, suffix), base_dir, source=name)


def _decode(text: str, name: str, suffix: str) -> object:
    is_json = suffix == ".json" or (
        suffix not in {".yaml", ".yml"} and text.lstrip()[:1] in {"{", "["}
    )
    if is_json:
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise BatchFileError(
                f"{name}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise BatchFileError(f"{name}: invalid YAML{where}: {problem}") from None


def parse_batch(
    data: object, base_dir: Path, source: str = "batch file"
) -> tuple[pb.BatchOptions | None, list[pb.JobSpec]]:
    """Options and jobs from decoded YAML/JSON; a bare list is a list of jobs."""
    if isinstance(data, list):
        data = {"jobs": data}
    if not isinstance(data, dict):
        raise BatchFileError(f"{source}: must be a mapping with 'jobs' (and 'options')")
    _check_keys(data, _TOP_KEYS, "")
    options = _parse_options(data["options"]) if data.get("options") is not None else None
    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise BatchFileError(f"{source}: jobs: must be a non-empty list of jobs")
    return options, [_parse_job(index, job, base_dir) for index, job in enumerate(jobs)]


def _check_keys(data: Mapping[Any, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(str(key) for key in data if key not in allowed)
    if unknown:
        raise BatchFileError(
            f"{where}unknown field {unknown[0]!r}; known fields: {', '.join(sorted(allowed))}"
        )


def _parse_options(data: object) -> pb.BatchOptions:
    where = "options: "
    if not isinstance(data, dict):
        raise BatchFileError(f"{where}must be a mapping")
    _check_keys(data, _OPTION_KEYS, where)
    options = pb.BatchOptions()
    if "labels" in data:
        options.labels.update(_string_map(data["labels"], f"{where}labels"))
    if "max_parallel" in data:
        options.max_parallel = _uint(data["max_parallel"], _UINT32_MAX, f"{where}max_parallel")
    if "fail_fast" in data:
        value = data["fail_fast"]
        if not isinstance(value, bool):
            raise BatchFileError(f"{where}fail_fast: must be true or false, not {value!r}")
        options.fail_fast = value
    if "idempotency_key" in data:
        options.idempotency_key = _string(data["idempotency_key"], f"{where}idempotency_key")
    return options


def _parse_job(index: int, data: object, base_dir: Path) -> pb.JobSpec:
    if not isinstance(data, dict):
        raise BatchFileError(f"jobs[{index}]: must be a mapping with argv or command")
    name = data.get("name")
    where = f"jobs[{index}] ({name}): " if isinstance(name, str) and name else f"jobs[{index}]: "
    _check_keys(data, _JOB_KEYS, where)
    for first, second in (("argv", "command"), ("stdin", "stdin_file")):
        if first in data and second in data:
            raise BatchFileError(f"{where}{first}, {second}: give one of them, not both")
    if "argv" not in data and "command" not in data:
        raise BatchFileError(f"{where}argv: missing; give argv (a list) or command (a string)")
    job = pb.JobSpec()
    if "name" in data:
        job.name = _string(data["name"], f"{where}name")
    for field, parse in _JOB_FIELDS.items():
        if field in data:
            parse(job, data[field], where, base_dir)
    return job


def _job_argv(job: pb.JobSpec, value: object, where: str, base_dir: Path) -> None:
    if isinstance(value, str) or not isinstance(value, list) or not value:
        raise BatchFileError(f"{where}argv: must be a non-empty list of strings")
    job.argv.extend(_scalar(item, f"{where}argv[{i}]") for i, item in enumerate(value))


def _job_command(job: pb.JobSpec, value: object, where: str, base_dir: Path) -> None:
    command = _string(value, f"{where}command")
    if not command.strip():
        raise BatchFileError(f"{where}command: must not be empty")
    job.argv.extend(["sh", "-c", command])


def _job_env(job: pb.JobSpec, value: object, where: str, base_dir: Path) -> None:
    job.env.update(_string_map(value, f"{where}env"))


def _job_working_dir(job: pb.JobSpec, value: object, where: str, base_dir: Path) -> None:
    working_dir = _string(value, f"{where}working_dir")
    if not working_dir.startswith("/"):
        raise BatchFileError(f"{where}working_dir: must be an absolute path, not {value!r}")
    job.working_dir = working_dir


def _job_stdin(job: pb.JobSpec, value: object, where: str, base_dir: Path) -> None:
    job.stdin = _string(value, f"{where}stdin").encode("utf-8")


def _job_stdin_file(job: pb.JobSpec, value: object, where: str, base_dir: Path) -> None:
    path = base_dir / _string(value, f"{where}stdin_file")
    try:
        job.stdin = path.read_bytes()
    except OSError as err:
        raise BatchFileError(f"{where}stdin_file: cannot read {path}: {err.strerror}") from None


def _job_timeout(job: pb.JobSpec, value: object, where: str, base_dir: Path) -> None:
    job.timeout.CopyFrom(parse_timeout(value, f"{where}timeout"))


def _job_limits(job: pb.JobSpec, value: object, where: str, base_dir: Path) -> None:
    where = f"{where}limits"
    if not isinstance(value, dict):
        raise BatchFileError(f"{where}: must be a mapping")
    _check_keys(value, _LIMIT_KEYS, f"{where}: ")
    limits = pb.ResourceLimits()
    if "cpu_millis" in value:
        limits.cpu_millis = _uint(value["cpu_millis"], _UINT32_MAX, f"{where}.cpu_millis")
    if "pids_max" in value:
        limits.pids_max = _uint(value["pids_max"], _UINT32_MAX, f"{where}.pids_max")
    if "memory_bytes" in value:
        limits.memory_bytes = _size(value["memory_bytes"], f"{where}.memory_bytes")
    if "io_read_bytes_per_second" in value:
        limits.io_read_bytes_per_second = _size(
            value["io_read_bytes_per_second"], f"{where}.io_read_bytes_per_second"
        )
    if "io_write_bytes_per_second" in value:
        limits.io_write_bytes_per_second = _size(
            value["io_write_bytes_per_second"], f"{where}.io_write_bytes_per_second"
        )
    job.limits.CopyFrom(limits)


def _job_depends_on(job: pb.JobSpec, value: object, where: str, base_dir: Path) -> None:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list):
        raise BatchFileError(f"{where}depends_on: must be a list of job names")
    job.depends_on.extend(_string(name, f"{where}depends_on[{i}]") for i, name in enumerate(names))


_JOB_FIELDS: dict[str, Callable[[pb.JobSpec, object, str, Path], None]] = {
    "argv": _job_argv,
    "command": _job_command,
    "env": _job_env,
    "working_dir": _job_working_dir,
    "stdin": _job_stdin,
    "stdin_file": _job_stdin_file,
    "timeout": _job_timeout,
    "limits": _job_limits,
    "depends_on": _job_depends_on,
}


def parse_timeout(value: object, where: str) -> Duration:
    """A positive duration from "5s" style text (or a number of seconds)."""
    if isinstance(value, bool):
        raise BatchFileError(f'{where}: must be a duration such as "5s", not {value!r}')
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        try:
            seconds = parse_duration(_string(value, where))
        except ValueError as err:
            raise BatchFileError(f"{where}: {err}") from None
    if seconds <= 0:
        raise BatchFileError(f"{where}: must be more than 0, not {value!r}")
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1_000_000_000))
    return duration


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise BatchFileError(f"{where}: must be a string, not {value!r}")
    return value


def _scalar(value: object, where: str) -> str:
    # YAML reads `sleep 1` items and `PORT: 8080` values as numbers; they mean text.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BatchFileError(f"{where}: must be a string, not {value!r} (quote it)")
    return str(value)


def _string_map(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise BatchFileError(f"{where}: must be a mapping of strings to strings")
    result = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise BatchFileError(f"{where}: key {key!r} must be a non-empty string")
        result[key] = _scalar(item, f"{where}.{key}")
    return result


def _uint(value: object, maximum: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise BatchFileError(f"{where}: must be an integer from 0 to {maximum}, not {value!r}")
    return value


def _size(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BatchFileError(f'{where}: must be bytes or a size such as "64MiB", not {value!r}')
    try:
        size = parse_size(value)
    except ValueError as err:
        raise BatchFileError(f"{where}: {err}") from None
    if size > _UINT64_MAX:
        raise BatchFileError(f"{where}: {value!r} is too large")
    return size
