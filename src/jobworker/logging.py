"""Structured logging: JSON lines or console lines on stderr; the level can change live."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def setup(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog (and stdlib logging, for libraries) for the server."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info if fmt == "json" else _noop,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=_LEVELS[level], stream=sys.stderr, format="%(name)s: %(message)s")


def set_level(level: str, fmt: str) -> None:
    """Change the level live (a reload): loggers made earlier follow at their next call."""
    setup(level, fmt)


def _noop(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return event
