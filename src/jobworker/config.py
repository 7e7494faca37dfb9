"""The config file: TOML in, a validated frozen Config out; a reload is load, validate, swap."""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import ErrorDetails

from jobworker.errors import ConfigError
from jobworker.model import LIMIT_FIELDS, Limits
from jobworker.units import DURATION_HELP, SIZE_HELP, format_size, parse_duration, parse_size

__all__ = [
    "RELOADABLE",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DefaultLimits",
    "ExecutorsConfig",
    "JobsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "RayExecutorConfig",
    "RetentionConfig",
    "Role",
    "ServerConfig",
    "TlsConfig",
    "changed_keys",
    "is_reloadable",
    "load_config",
    "parse_config",
    "restart_needed",
]

Role = Literal["admin", "user", "viewer", "none"]  # model.ROLES, spelled out for typing (tested)

_MiB = 1 << 20
_MAX_MESSAGE_BYTES = 3 * _MiB  # what fits in one gRPC message (4 MiB) with room to spare
_LISTEN_HELP = 'host:port with a port from 0 to 65535, such as "127.0.0.1:50051" or "[::1]:50051"'


# ---------------------------------------------------------------------------- value types


def _context(info: ValidationInfo) -> Mapping[str, Any]:
    return info.context if isinstance(info.context, Mapping) else {}


def _to_seconds(value: Any, info: ValidationInfo) -> Any:
    # A file must say its unit ("5" could be seconds or minutes); Python callers may pass seconds.
    if isinstance(value, int | float) and not isinstance(value, bool):
        if _context(info).get("from_file"):
            raise ValueError(f"must be {DURATION_HELP} (a bare number has no unit)")
        return value
    return parse_duration(value)


def _to_bytes(value: Any) -> Any:
    return parse_size(value)


def _to_path(value: Any, info: ValidationInfo) -> Path:
    if isinstance(value, str) and value and "\0" not in value:
        value = Path(value)
    if not isinstance(value, Path):
        raise ValueError("must be a non-empty path string")  # noqa: TRY004
    base = _context(info).get("base_dir") or Path.cwd()
    return Path(os.path.normpath(Path(base) / value.expanduser()))


def _to_optional_path(value: Any, info: ValidationInfo) -> Path | None:
    return None if value in ("", None) else _to_path(value, info)


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            host = ""
    elif not re.fullmatch(r"[A-Za-z0-9_.-]+", host):
        host = ""
    if not (sep and host and port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError(f"must be {_LISTEN_HELP}")
    return value


def _check_metrics_listen(value: str) -> str:
    return value if value == "" else _check_listen(value)


def _check_cgroup_name(value: str) -> str:
    if not value or "/" in value or value in (".", "..") or "\0" in value:
        raise ValueError("must be a folder name (no '/'), such as \"jobworker\"")
    return value


def _check_unix_user(value: str) -> str:
    if not value:
        return value
    try:
        uid = pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ValueError(f"no Unix user {value!r} on this host") from None
    if uid != os.geteuid() and os.geteuid() != 0:
        raise ValueError("running jobs as another user needs the server to run as root")
    if uid == 0 and value != "root":  # root only where the config says "root" (root_keys)
        raise ValueError(f'{value!r} has uid 0: say "root" for jobs to run as root')
    return value


def _check_absolute(value: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise ValueError('must be an absolute path, such as "/" or "/tmp"')
    return value


Duration = Annotated[float, BeforeValidator(_to_seconds)]
Size = Annotated[int, BeforeValidator(_to_bytes)]
ConfigPath = Annotated[Path, BeforeValidator(_to_path)]
OptionalPath = Annotated[Path | None, BeforeValidator(_to_optional_path)]
Listen = Annotated[str, AfterValidator(_check_listen)]


def _setting(
    default: Any,
    allowed: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> Any:
    """A field whose errors say `must be <allowed>`."""
    return Field(default, ge=ge, gt=gt, le=le, json_schema_extra={"allowed": f"must be {allowed}"})


def _int(default: int, low: int, high: int) -> Any:
    return _setting(default, f"an integer from {low} to {high}", ge=low, le=high)


def _size(default: int | str, low: int, high: int | None = None) -> Any:
    if high is not None:
        allowed = f"{SIZE_HELP}, from {format_size(low)} to {format_size(high)}"
    else:
        allowed = f"{SIZE_HELP}, at least {format_size(low)}" if low else SIZE_HELP
    return _setting(default, allowed, ge=low, le=high)


def _duration(default: str, *, positive: bool = False, at_least: str = "") -> Any:
    if at_least:
        return _setting(
            default, f"{DURATION_HELP}, at least {at_least}", ge=parse_duration(at_least)
        )
    if positive:
        return _setting(default, f"{DURATION_HELP}, more than 0s", gt=0)
    return _setting(default, DURATION_HELP, ge=0)


class _Section(BaseModel):
    # strict: TOML's types are what they are; "8" is not an integer, true is not 1.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, validate_default=True)


# ---------------------------------------------------------------------------- the sections


class ServerConfig(_Section):
    """[server]: where the server listens and keeps its files; restart to change."""

    listen: Listen = _setting("127.0.0.1:50051", _LISTEN_HELP)
    data_dir: ConfigPath = _setting(Path("var/data"), "a non-empty path")
    shutdown_grace: Duration = _duration("10s")
    keepalive_interval: Duration = _duration("30s", at_least="1s")
    max_streams: int = _int(1000, 1, 1_000_000)
    max_streams_per_identity: int = _int(0, 0, 1_000_000)  # 0: only max_streams
    max_uploads_per_identity: int = _int(4, 1, 10_000)
    upload_timeout: Duration = _duration("5m", positive=True)
    cgroup_root: Annotated[str, AfterValidator(_check_cgroup_name)] = _setting(
        "jobworker", 'a folder name (no "/"), such as "jobworker"'
    )


class TlsConfig(_Section):
    """[tls]: PEM files; re-read when they or the config change."""

    ca_cert: ConfigPath = _setting(Path("var/certs/ca.pem"), "a non-empty path")
    server_cert: ConfigPath = _setting(Path("var/certs/server.pem"), "a non-empty path")
    server_key: ConfigPath = _setting(Path("var/certs/server-key.pem"), "a non-empty path")
    crl: OptionalPath = _setting(None, '"" (none) or a path')


class MetricsConfig(_Section):
    """[metrics]: the Prometheus endpoint; "" turns it off."""

    listen: Annotated[str, AfterValidator(_check_metrics_listen)] = _setting(
        "127.0.0.1:9464", f'"" (off) or {_LISTEN_HELP}'
    )


class LoggingConfig(_Section):
    """[logging]: level is reloadable, format is not."""

    level: Literal["debug", "info", "warning", "error"] = _setting(
        "info", '"debug", "info", "warning" or "error"'
    )
    format: Literal["json", "console"] = _setting("json", '"json" or "console"')


class DefaultLimits(_Section):
    """[jobs.default_limits]: limits of a job that sets none; 0 means no limit."""

    cpu_millis: int = _int(0, 0, 1_000_000_000)
    memory_bytes: Size = _size(0, 0)
    pids_max: int = _int(4096, 0, 1_000_000_000)
    io_read_bytes_per_second: Size = _size(0, 0)
    io_write_bytes_per_second: Size = _size(0, 0)

    def to_limits(self) -> Limits:
        """These defaults as the domain model's Limits."""
        return Limits(**{f: getattr(self, f) for f in LIMIT_FIELDS})


class JobsConfig(_Section):
    """[jobs]: scheduling and per-job limits; reloadable."""

    max_concurrent: int = _int(8, 1, 10_000)
    default_timeout: Duration = _duration("1h", positive=True)
    kill_grace: Duration = _duration("5s")
    max_jobs_per_batch: int = _int(10_000, 1, 1_000_000)
    log_tail_bytes: Size = _size("64KiB", 0, _MAX_MESSAGE_BYTES)
    default_limits: DefaultLimits = Field(default_factory=DefaultLimits)
    max_stdin_bytes: Size = _size("1MiB", 0, _MAX_MESSAGE_BYTES)
    max_argv_bytes: Size = _size("128KiB", 1, _MAX_MESSAGE_BYTES)
    max_batch_bytes: Size = _size("64MiB", 1)
    max_queued_jobs: int = _int(100_000, 1, 100_000_000)
    max_queued_jobs_per_identity: int = _int(0, 0, 100_000_000)  # 0: only max_queued_jobs
    max_running_per_identity: int = _int(0, 0, 10_000)  # 0: only max_concurrent
    fair_share: bool = _setting(True, "true or false")
    # "keep": running jobs go on when the server stops or dies (contract 6.3).
    on_server_stop: Literal["keep", "stop"] = _setting("keep", '"keep" or "stop"')
    max_log_bytes: Size = _size("1GiB", 0)
    max_args: int = _int(10_000, 1, 1_000_000)
    working_dir: Annotated[str, AfterValidator(_check_absolute)] = _setting(
        "/", 'an absolute path, such as "/" or "/tmp"'
    )
    min_free_disk: Size = _size("64MiB", 0)
    run_as: Annotated[str, AfterValidator(_check_unix_user)] = _setting(
        "", 'a Unix user of this host, or "" ("nobody" when the server is root, else its own)'
    )
    run_as_identity: dict[str, Annotated[str, AfterValidator(_check_unix_user)]] = _setting(
        {}, "a Unix user of this host"
    )

    def unix_user_for(self, identity: str) -> str:
        """The Unix user the jobs of `identity` run as ("": the server's own). Unset or "",
        that is "nobody" when the server is root: root only where the config says "root"."""
        user = self.run_as_identity.get(identity) or self.run_as
        if user:
            return user
        return "nobody" if os.geteuid() == 0 else ""

    def root_keys(self) -> list[str]:
        """The keys that let jobs run as root (for the server's warning), in config order."""
        if os.geteuid() != 0:
            return []
        keys = ["jobs.run_as"] if self.run_as == "root" else []
        return keys + [
            f"jobs.run_as_identity.{name}"
            for name, user in self.run_as_identity.items()
            if user == "root"
        ]


class AuthConfig(_Section):
    """[auth]: roles by identity (the client certificate's common name); reloadable."""

    default_role: Literal["user", "none"] = _setting("user", '"user" or "none"')
    roles: dict[str, Role] = _setting({}, 'a role: "admin", "user", "viewer" or "none"')

    def role_of(self, identity: str) -> Role:
        """The role of `identity`: its own entry, else the default role."""
        return self.roles.get(identity, self.default_role)


class RetentionConfig(_Section):
    """[retention]: how long ended batches are kept; reloadable."""

    max_age: Duration = _duration("7d", positive=True)


class RayExecutorConfig(_Section):
    """[executors.NAME] with kind = "ray": jobs run as Ray tasks on an existing cluster."""

    kind: Literal["ray"] = _setting("ray", '"ray"')
    address: Listen = _setting("127.0.0.1:6379", "the cluster's GCS address, host:port")
    cpus_per_job: float = _setting(1.0, "a number of CPUs above 0", gt=0)
    token_file: OptionalPath = _setting(None, '"" (Ray\'s own, ~/.ray/auth_token) or a path')


class ExecutorsConfig(_Section):
    """[executors]: `default` and one table per named executor; restart to change."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, RayExecutorConfig] = Field(init=False)  # the named tables
    default: str = _setting("local", '"local" or the name of an [executors.NAME] table')

    @model_validator(mode="after")
    def _known_default(self) -> ExecutorsConfig:
        named = self.named()
        if "local" in named:
            raise ValueError('"local" is the built-in executor: name the table otherwise')
        if self.default != "local" and self.default not in named:
            raise ValueError(f"default = {self.default!r} names no [executors.NAME] table")
        return self

    def named(self) -> dict[str, RayExecutorConfig]:
        """The [executors.NAME] tables by name."""
        return dict(self.__pydantic_extra__ or {})


class Config(_Section):
    """The whole config; `source` is the file it came from and takes no part in ==."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    executors: ExecutorsConfig = Field(default_factory=ExecutorsConfig)
    source: Path | None = Field(default=None, exclude=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _SECTIONS)

    __hash__ = None  # type: ignore[assignment]  # roles is a dict; a Config is compared, not hashed


_SECTIONS: tuple[str, ...] = tuple(name for name in Config.model_fields if name != "source")


# ---------------------------------------------------------------------------- loading


def load_config(path: Path | None) -> Config:
    """The config in the file at `path`; with None, the built-in defaults."""
    if path is None:
        return parse_config("", Path.cwd())
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{path}: cannot read the config file: {reason}") from exc
    return parse_config(text, path.absolute().parent, source=path.absolute())


def parse_config(text: str, base_dir: Path, source: Path | None = None) -> Config:
    """The config in TOML `text`; relative paths are resolved against `base_dir`."""
    where = str(source) if source is not None else "config"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from exc
    if "source" in data:  # a field of Config, but not a key of the file
        lines = _key_lines(text)
        raise ConfigError(f"{where}: {_unknown_key(('source',), lines)}")
    # Sections the file leaves out are validated too, so that their default paths are
    # resolved against base_dir rather than the current directory.
    complete = {name: {} for name in _SECTIONS} | data
    context = {"base_dir": base_dir.absolute(), "from_file": True}
    try:
        config = Config.model_validate(complete, context=context)
    except ValidationError as exc:
        lines = _key_lines(text)
        problems = sorted(_describe(error, data, lines) for error in exc.errors())
        raise ConfigError(f"{where}: " + "; ".join(text for _, text in problems)) from None
    return config.model_copy(update={"source": source})


# ---------------------------------------------------------------------------- reloading

RELOADABLE: frozenset[str] = frozenset(
    {
        "logging.level",
        "jobs",
        "auth",
        "retention",
        "tls",
        "server.max_streams_per_identity",
        "server.max_uploads_per_identity",
        "server.upload_timeout",
    }
)
"""Dotted keys and sections that take effect without a restart (a key is reloadable when it
or a section holding it is listed). TLS files are re-read on reload, so their paths are too."""


def is_reloadable(key: str) -> bool:
    """True when the dotted `key` takes effect without a restart."""
    parts = key.split(".")
    return any(".".join(parts[:n]) in RELOADABLE for n in range(1, len(parts) + 1))


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between `old` and `new`, in file order."""
    return [_dotted(loc) for loc in _diff(old.model_dump(), new.model_dump(), ())]


def restart_needed(old: Config, new: Config) -> list[str]:
    """The changed dotted keys that take effect only after a restart."""
    return [key for key in changed_keys(old, new) if not is_reloadable(key)]


def _diff(old: Any, new: Any, loc: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    if isinstance(old, dict) and isinstance(new, dict):
        for name in list(old) + [name for name in new if name not in old]:
            yield from _diff(old.get(name, _MISSING), new.get(name, _MISSING), (*loc, name))
    elif old != new:
        yield loc


_MISSING = object()


# ---------------------------------------------------------------------------- error messages


def _describe(
    error: ErrorDetails, data: Mapping[str, Any], lines: Mapping[tuple[str, ...], int]
) -> tuple[int, str]:
    """One pydantic error as (line, `key = value (line N): must be ...`), in our words."""
    loc = tuple(str(part) for part in error["loc"])
    line = _line(loc, lines) or 0
    if error["type"] == "extra_forbidden":
        return line, _unknown_key(loc, lines)
    value = _raw(data, loc, error["input"])
    at = f" (line {line})" if line else ""
    return line, f"{_dotted(loc)} = {_show(value)}{at}: {_allowed(error, loc)}"


def _unknown_key(loc: tuple[str, ...], lines: Mapping[tuple[str, ...], int]) -> str:
    line = _line(loc, lines)
    at = f" (line {line})" if line else ""
    model = _model_at(loc[:-1])
    known = ", ".join(name for name in model.model_fields if name != "source") if model else ""
    if len(loc) == 1:
        return f"unknown key {_dotted(loc)}{at}; known sections: {known}"
    return f"unknown key {_dotted(loc)}{at}; known keys in [{_dotted(loc[:-1])}]: {known}"


def _allowed(error: ErrorDetails, loc: tuple[str, ...]) -> str:
    if error["type"] in ("model_type", "dict_type", "model_attributes_type"):
        return "must be a table"
    extra = _field_extra(loc)
    if isinstance(extra, str):
        return extra
    ctx = error.get("ctx") or {}
    if error["type"] == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if error["type"] == "literal_error":
        return "must be one of " + str(ctx.get("expected", "")).replace("'", '"')
    kinds = {"int_type": "an integer", "string_type": "a string", "float_type": "a number"}
    return f"must be {kinds.get(error['type'], 'a valid value')}"


def _model_at(loc: tuple[str, ...]) -> type[BaseModel] | None:
    """The model class of the section at `loc`, if it is one."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if field is None and model is ExecutorsConfig:  # a named table, not a field
            annotation = RayExecutorConfig
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _field_extra(loc: tuple[str, ...]) -> object:
    """The `allowed` text of the field at `loc` (or holding it, for a dict's entries)."""
    for depth in range(len(loc), 0, -1):
        model = _model_at(loc[: depth - 1])
        field = model.model_fields.get(loc[depth - 1]) if model else None
        if field is not None:
            extra = field.json_schema_extra
            return extra.get("allowed") if isinstance(extra, dict) else None
    return None


def _raw(data: Mapping[str, Any], loc: tuple[str, ...], fallback: Any) -> Any:
    """The value at `loc` as the file wrote it (pydantic's `input` may be already converted)."""
    value: Any = data
    for part in loc:
        if not isinstance(value, Mapping) or part not in value:
            return fallback
        value = value[part]
    return value


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{...}"
    if isinstance(value, str | Path):
        text = json.dumps(str(value), ensure_ascii=False)
        return text if len(text) <= 80 else text[:76] + '..."'
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _dotted(loc: tuple[str, ...]) -> str:
    """A key path as TOML writes it: jobs.max_concurrent, auth.roles."alice.example"."""
    return ".".join(part if _BARE_KEY.fullmatch(part) else json.dumps(part) for part in loc)


def _line(loc: tuple[str, ...], lines: Mapping[tuple[str, ...], int]) -> int | None:
    """The line of `loc`, or of the nearest table or inline table holding it."""
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in lines:
            return lines[loc[:depth]]
    return None


_KEY_PART = r'\s*(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')\s*'
_KEY_PATH = re.compile(rf"{_KEY_PART}(?:\.{_KEY_PART})*")
_TABLE = re.compile(rf"\[\[?({_KEY_PATH.pattern})\]\]?\s*(?:#.*)?")
_ASSIGNMENT = re.compile(rf"({_KEY_PATH.pattern})=")


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line numbers of the tables and keys in valid TOML `text`, by key path."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_string = False  # inside a multi-line string, nothing is a key
    for number, line in enumerate(text.splitlines(), start=1):
        was_in_string = in_string
        in_string ^= (line.count('"""') + line.count("'''")) % 2 == 1
        if was_in_string:
            continue
        stripped = line.strip()
        if match := _TABLE.fullmatch(stripped):
            table = _split_key(match.group(1))
            lines.setdefault(table, number)
        elif match := _ASSIGNMENT.match(stripped):
            lines.setdefault((*table, *_split_key(match.group(1))), number)
    return lines


def _split_key(path: str) -> tuple[str, ...]:
    parts = re.findall(_KEY_PART, path)
    return tuple(_unquote(part.strip()) for part in parts)


def _unquote(part: str) -> str:
    if part.startswith('"'):
        try:
            return str(json.loads(part))
        except ValueError:  # a TOML escape JSON lacks, such as \U0001F600
            return part[1:-1]
    if part.startswith("'"):
        return part[1:-1]
    return part
