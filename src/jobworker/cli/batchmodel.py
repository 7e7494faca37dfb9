"""The batch file's fields as pydantic models: the checks, the JSON Schema and the wire form."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from google.protobuf.duration_pb2 import Duration
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from jobworker.client.convert import job_state_pb
from jobworker.units import DURATION_HELP, parse_duration, parse_size
from jobworker.v1 import jobworker_pb2 as pb

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def _scalar(value: object) -> object:
    # YAML reads `sleep 1` items and `PORT: 8080` values as numbers; they mean text.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        # pydantic reports ValueError as the field's error; a TypeError would escape.
        raise ValueError(f"must be a string, not {value!r} (quote it)")  # noqa: TRY004
    return value


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f'must be a duration such as "5s", not {value!r}')  # noqa: TRY004
    seconds = float(value) if not isinstance(value, str) else parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be more than 0, not {value!r}")
    return seconds


def _bytes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f'must be bytes or a size such as "64MiB", not {value!r}')  # noqa: TRY004
    size = parse_size(value)
    if size > UINT64_MAX:
        raise ValueError(f"{value!r} is too large")
    return size


Text = Annotated[str, BeforeValidator(_scalar), WithJsonSchema({"type": ["string", "number"]})]
Seconds = Annotated[
    float,
    BeforeValidator(_seconds),
    WithJsonSchema({"type": ["string", "number"], "description": f"seconds, or {DURATION_HELP}"}),
]
Size = Annotated[
    int,
    BeforeValidator(_bytes),
    WithJsonSchema(
        {"type": ["integer", "string"], "description": 'bytes, or a size such as "64MiB"'}
    ),
]
Uint32 = Annotated[int, Field(strict=True, ge=0, le=UINT32_MAX)]
EndState = Literal["failed", "timed_out", "lost"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    """Resource limits; unset fields take the server's defaults."""

    cpu_millis: Uint32 | None = Field(None, description="thousandths of a core: 1500 = 1.5")
    memory_bytes: Size | None = None
    pids_max: Uint32 | None = None
    io_read_bytes_per_second: Size | None = None
    io_write_bytes_per_second: Size | None = None


class Retry(_Strict):
    """Try a job again when an attempt ends badly."""

    max_attempts: Uint32 = Field(description="attempts in all, the first included")
    initial_backoff: Seconds | None = Field(None, description="default 1s; doubles each time")
    max_backoff: Seconds | None = Field(None, description="default 5m")
    retry_on: list[EndState] = Field(
        default_factory=list, description="default: failed and timed_out"
    )


class Job(_Strict):
    """One job: `argv` (run without a shell) or `command` (run by `sh -c`)."""

    name: StrictStr = Field("", description='unique in the batch; default "job-<index>"')
    argv: list[Text] | None = Field(None, min_length=1)
    command: StrictStr | None = None
    env: dict[str, Text] = Field(default_factory=dict)
    working_dir: StrictStr = Field("", description="an absolute path")
    stdin: StrictStr | None = None
    stdin_file: StrictStr | None = Field(None, description="relative to the batch file")
    timeout: Seconds | None = None
    limits: Limits | None = None
    depends_on: list[StrictStr] = Field(default_factory=list)
    retry: Retry | None = None

    @field_validator("depends_on", mode="before")
    @classmethod
    def _one_name(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("working_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError(f"must be an absolute path, not {value!r}")
        return value

    @field_validator("command")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _one_of_each(self) -> Job:
        for first, second in (("argv", "command"), ("stdin", "stdin_file")):
            if getattr(self, first) is not None and getattr(self, second) is not None:
                raise ValueError(f"{first}, {second}: give one of them, not both")
        if self.argv is None and self.command is None:
            raise ValueError("argv: missing; give argv (a list) or command (a string)")
        return self

    def to_pb(self, stdin_file: bytes | None) -> pb.JobSpec:
        """The wire JobSpec; `stdin_file` holds the bytes of the file named, if any."""
        argv = self.argv if self.argv is not None else ["sh", "-c", self.command or ""]
        job = pb.JobSpec(
            name=self.name,
            argv=argv,
            env=self.env,
            working_dir=self.working_dir,
            stdin=stdin_file if stdin_file is not None else (self.stdin or "").encode(),
            depends_on=self.depends_on,
        )
        if self.timeout is not None:
            job.timeout.CopyFrom(_duration(self.timeout))
        if self.limits is not None:
            job.limits.CopyFrom(pb.ResourceLimits(**self.limits.model_dump(exclude_none=True)))
        if self.retry is not None:
            job.retry.CopyFrom(_retry_pb(self.retry))
        return job


class Options(_Strict):
    """Batch-wide options."""

    labels: dict[str, Text] = Field(default_factory=dict)
    max_parallel: Uint32 = Field(0, description="0: no limit of the batch's own")
    fail_fast: StrictBool = False
    idempotency_key: StrictStr = ""
    executor: StrictStr = Field("", description='"local" or a configured executor')

    def to_pb(self) -> pb.BatchOptions:
        """The wire BatchOptions."""
        return pb.BatchOptions(**self.model_dump())


class BatchFile(_Strict):
    """A jobworker batch file (YAML or JSON): options and jobs; a bare list is the jobs."""

    options: Options | None = None
    jobs: list[Job] = Field(min_length=1)


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1_000_000_000))
    return duration


def _retry_pb(retry: Retry) -> pb.RetryPolicy:
    policy = pb.RetryPolicy(
        max_attempts=retry.max_attempts,
        retry_on=[job_state_pb(state) for state in retry.retry_on],
    )
    if retry.initial_backoff is not None:
        policy.initial_backoff.CopyFrom(_duration(retry.initial_backoff))
    if retry.max_backoff is not None:
        policy.max_backoff.CopyFrom(_duration(retry.max_backoff))
    return policy


_PLAIN: dict[str, str] = {
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "missing": "missing",
    "too_short": "must be a non-empty list",
    "literal_error": "must be one of failed, timed_out, lost",
}


def error_text(error: ErrorDetails, data: dict[str, Any]) -> str:
    """One pydantic error as `jobs[1] (build): limits.pids_max: must be ...`."""
    loc = list(error["loc"])
    kind = error["type"]
    where = ""
    if len(loc) >= 2 and loc[0] == "jobs" and isinstance(loc[1], int):
        where = _job_where(data, loc[1])
        loc = loc[2:]
    elif loc and loc[0] == "options":
        where, loc = "options: ", loc[1:]
    if kind == "extra_forbidden":
        return f"{where}{_path(loc[:-1])}unknown field {loc[-1]!r}"
    message = error["msg"].removeprefix("Value error, ")
    if kind in {"less_than_equal", "greater_than_equal"}:
        message = f"must be an integer from 0 to {UINT32_MAX}"
    elif kind in _PLAIN:
        message = _PLAIN[kind]
    if kind not in {"missing", "value_error"} and "input" in error:
        message += f", not {error['input']!r}"
    if kind == "value_error" and message.startswith(("argv", "stdin")):
        return f"{where}{message}"  # the model's own check names its fields
    field = _path(loc)
    return f"{where}{field}{message}" if field else f"{where}{message}"


def _job_where(data: dict[str, Any], index: int) -> str:
    jobs = data.get("jobs")
    job = jobs[index] if isinstance(jobs, list) and index < len(jobs) else None
    name = job.get("name") if isinstance(job, dict) else None
    return f"jobs[{index}] ({name}): " if isinstance(name, str) and name else f"jobs[{index}]: "


def _path(loc: list[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return f"{text}: " if text else ""
