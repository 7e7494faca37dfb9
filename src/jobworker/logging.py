"""Structured logging: JSON lines or console lines on stderr; the level can change live."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# structlog's method names, as levels ("exception" logs at error with the stack).
_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "msg": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}

EventDict = MutableMapping[str, Any]
Enricher = Callable[[EventDict], None]

# The level is read at each call, not baked into logger classes: a logger bound before a
# reload (a running job's, for one) follows the new level at its next line.
_state: dict[str, Any] = {"level": logging.INFO, "enricher": None}


def setup(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog, and stdlib logging for libraries, to write one format to stderr."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    _state["level"] = _LEVELS[level]
    processors: list[Any] = [
        _filter_by_level,
        structlog.contextvars.merge_contextvars,
        _enrich,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info if fmt == "json" else _noop,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        # Everything reaches _filter_by_level, which knows the live level.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _setup_stdlib(renderer, fmt)


def _setup_stdlib(renderer: Any, fmt: str) -> None:
    """Route libraries' stdlib logging through the same renderer: JSON stays JSON."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if fmt == "json" else _noop,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_state["level"])
    # watchfiles says "1 change detected" at info for every write near the config file.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """Change the level live (a reload): every logger, bound earlier or not, follows."""
    _state["level"] = _LEVELS[level]
    logging.getLogger().setLevel(_state["level"])


def current_level() -> str:
    """The level in force, by name."""
    level: int = _state["level"]
    return logging.getLevelName(level).lower()


def set_enricher(enricher: Enricher | None) -> None:
    """Install a function that may add fields (such as identity) to every line."""
    _state["enricher"] = enricher


def _filter_by_level(_logger: Any, method: str, event: EventDict) -> EventDict:
    if _METHOD_LEVELS.get(method, logging.INFO) < _state["level"]:
        raise structlog.DropEvent
    return event


def _enrich(_logger: Any, _method: str, event: EventDict) -> EventDict:
    enricher: Enricher | None = _state["enricher"]
    if enricher is not None:
        try:
            enricher(event)
        except Exception:  # noqa: BLE001 - a helper must never cost a log line
            event.setdefault("enrich_failed", True)
    return event


def _noop(_logger: Any, _name: str, event: EventDict) -> EventDict:
    return event
