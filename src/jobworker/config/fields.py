"""The value types and field helpers of config sections: what a file may write, in our words."""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo

from jobworker.units import DURATION_HELP, SIZE_HELP, format_size, parse_duration, parse_size

LISTEN_HELP = 'host:port with a port from 0 to 65535, such as "127.0.0.1:50051" or "[::1]:50051"'


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
        raise ValueError(f"must be {LISTEN_HELP}")
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
MetricsListen = Annotated[str, AfterValidator(_check_metrics_listen)]
CgroupName = Annotated[str, AfterValidator(_check_cgroup_name)]
UnixUser = Annotated[str, AfterValidator(_check_unix_user)]
AbsolutePathText = Annotated[str, AfterValidator(_check_absolute)]


def setting(
    default: Any,
    allowed: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> Any:
    """A field whose errors say `must be <allowed>`."""
    return Field(default, ge=ge, gt=gt, le=le, json_schema_extra={"allowed": f"must be {allowed}"})


def int_setting(default: int, low: int, high: int) -> Any:
    """An integer field from `low` to `high`."""
    return setting(default, f"an integer from {low} to {high}", ge=low, le=high)


def size_setting(default: int | str, low: int, high: int | None = None) -> Any:
    """A size field ("64KiB") of at least `low` bytes, and at most `high` when given."""
    if high is not None:
        allowed = f"{SIZE_HELP}, from {format_size(low)} to {format_size(high)}"
    else:
        allowed = f"{SIZE_HELP}, at least {format_size(low)}" if low else SIZE_HELP
    return setting(default, allowed, ge=low, le=high)


def duration_setting(default: str, *, positive: bool = False, at_least: str = "") -> Any:
    """A duration field ("5s"), in seconds: 0 or more, more than 0, or at least `at_least`."""
    if at_least:
        return setting(
            default, f"{DURATION_HELP}, at least {at_least}", ge=parse_duration(at_least)
        )
    if positive:
        return setting(default, f"{DURATION_HELP}, more than 0s", gt=0)
    return setting(default, DURATION_HELP, ge=0)


class Section(BaseModel):
    """The base of every section."""

    # strict: TOML's types are what they are; "8" is not an integer, true is not 1.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, validate_default=True)
