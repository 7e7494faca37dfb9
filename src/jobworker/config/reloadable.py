"""Which keys take effect without a restart, and which keys a new config changed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jobworker.config.messages import dotted
from jobworker.config.sections import Config

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
    return [dotted(loc) for loc in _diff(old.model_dump(), new.model_dump(), ())]


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
