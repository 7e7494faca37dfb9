"""A bad config file's errors: each key as the file wrote it, its line, and what it must be."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from jobworker.config.sections import Config, ExecutorsConfig, RayExecutorConfig


def describe(
    error: ErrorDetails, data: Mapping[str, Any], lines: Mapping[tuple[str, ...], int]
) -> tuple[int, str]:
    """One pydantic error as (line, `key = value (line N): must be ...`), in our words."""
    loc = tuple(str(part) for part in error["loc"])
    line = _line(loc, lines) or 0
    if error["type"] == "extra_forbidden":
        return line, unknown_key(loc, lines)
    value = _raw(data, loc, error["input"])
    at = f" (line {line})" if line else ""
    return line, f"{dotted(loc)} = {_show(value)}{at}: {_allowed(error, loc)}"


def unknown_key(loc: tuple[str, ...], lines: Mapping[tuple[str, ...], int]) -> str:
    line = _line(loc, lines)
    at = f" (line {line})" if line else ""
    model = _model_at(loc[:-1])
    known = ", ".join(name for name in model.model_fields if name != "source") if model else ""
    if len(loc) == 1:
        return f"unknown key {dotted(loc)}{at}; known sections: {known}"
    return f"unknown key {dotted(loc)}{at}; known keys in [{dotted(loc[:-1])}]: {known}"


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


def dotted(loc: tuple[str, ...]) -> str:
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


def key_lines(text: str) -> dict[tuple[str, ...], int]:
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
