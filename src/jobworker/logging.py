"""Structured logging: JSON lines or console lines on stderr; the level can change live."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, TextIO

import structlog

from jobworker.units import ECHO_LIMIT, shorten

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
_state: dict[str, Any] = {"level": logging.INFO}
# Set by a server for the tasks and threads it starts: lines of another server in the same
# process (tests) or of none are left alone.
_enricher: contextvars.ContextVar[Enricher | None] = contextvars.ContextVar(
    "jobworker_log_enricher", default=None
)


def setup(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog, and stdlib logging for libraries, to write one format to stderr."""
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_to_json)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    _state["level"] = _LEVELS[level]
    processors: list[Any] = [
        _filter_by_level,
        structlog.contextvars.merge_contextvars,
        _enrich,
        structlog.processors.add_log_level,
        _timestamp,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info if fmt == "json" else _noop,
        _shorten_fields,
        renderer,
    ]
    sink = _Sink(sys.stderr)
    _state["sink"] = sink
    _state["processors"] = tuple(processors)
    structlog.configure(
        processors=processors,
        # Everything reaches _filter_by_level, which knows the live level.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=lambda *_: sink,
        cache_logger_on_first_use=False,
    )
    _setup_stdlib(renderer, fmt, sink)


def line(level: str, event: str, fields: dict[str, Any]) -> None:
    """Log `event` with `fields` (taken over: it becomes the line) through setup()'s
    processors, with the same output as a logger: every job's end makes a line, and binding
    a logger per job costs about as much as the processors."""
    if _LEVELS[level] < _state["level"]:
        return
    processors: tuple[Any, ...] = _state.get("processors", ())
    if not processors:  # setup() not called: structlog's own defaults
        structlog.get_logger().log(_LEVELS[level], event, **fields)
        return
    sink = _state["sink"]
    fields["event"] = event
    event_dict: Any = fields
    try:
        for processor in processors:
            event_dict = processor(sink, level, event_dict)
    except structlog.DropEvent:
        return
    getattr(sink, level)(event_dict)


def flush() -> None:
    """Write the log lines held back (_Sink) now: an RPC's audit line, server_ready, the end."""
    sink: _Sink | None = _state.get("sink")
    if sink is not None:
        sink.flush()


# How long info and debug lines logged on the event loop may wait to be written with
# later ones; warnings and errors go out at the end of their loop turn.
HOLD_SECONDS = 0.05
_HOLD_LINES = 2000  # or fewer lines: a burst is written at the end of its turn


class _Sink:
    """Where log lines go: stderr, in few writes, since each write wakes whatever reads
    stderr. Info and debug lines logged on an event loop wait up to HOLD_SECONDS; a warning
    or an error goes at the end of its loop turn, other threads' lines at once, all in order.

    Also structlog's logger (msg() and the level methods) and the stdlib handler's stream.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._held: list[str] = []
        self._lock = threading.Lock()
        # The flush scheduled on an event loop, if any: its loop, and its loop time.
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._flush_at = 0.0
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        self.write(message + "\n")

    def urgent(self, message: str) -> None:
        self.write(message + "\n", urgent=True)

    debug = info = log = msg
    warning = warn = error = err = exception = critical = fatal = urgent

    def write(self, text: str, *, urgent: bool = False) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # another thread's line
            loop = None
        with self._lock:
            self._held.append(text)
            if loop is not None:
                delay = 0.0 if urgent or len(self._held) >= _HOLD_LINES else HOLD_SECONDS
                if self._schedule(loop, delay):
                    return
        self.flush()

    def _schedule(self, loop: asyncio.AbstractEventLoop, delay: float) -> bool:
        """Have `loop` flush within `delay` seconds; False when it cannot (closing).

        A flush scheduled earlier and no longer needed still runs, and finds little or
        nothing to write: cheaper than cancelling it, and safe from any thread."""
        at = loop.time() + delay
        if self._flush_loop is loop and self._flush_at <= at:
            return True  # one as soon as that is coming
        try:
            if delay:
                loop.call_later(delay, self.flush)
            else:
                loop.call_soon(self.flush)
        except RuntimeError:  # the loop is closing: no turn is left
            return False
        self._flush_loop, self._flush_at = loop, at
        return True

    def flush(self) -> None:
        with self._lock:
            held, self._held, self._flush_loop = self._held, [], None
            if held:
                try:
                    self._stream.write("".join(held))
                    self._stream.flush()
                except (OSError, ValueError):  # stderr closed or gone: nowhere to log
                    pass


def _setup_stdlib(renderer: Any, fmt: str, sink: _Sink) -> None:
    """Route libraries' stdlib logging through the same renderer: JSON stays JSON."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.format_exc_info if fmt == "json" else _noop,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sink)
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


@contextlib.contextmanager
def enriched(enricher: Enricher) -> Iterator[None]:
    """Within, `enricher` may add fields (such as identity) to every line of this context
    and of the tasks and worker threads started from it."""
    token = _enricher.set(enricher)
    try:
        yield
    finally:
        try:
            _enricher.reset(token)
        except ValueError:  # left from another context: this one ends with its owner
            _enricher.set(None)


def _json_default(obj: Any) -> Any:
    """What JSONRenderer falls back to: an object's __structlog__(), else its repr."""
    method = getattr(obj, "__structlog__", None)
    return method() if callable(method) else repr(obj)


# One encoder for every line: json.dumps(..., default=...) would make one per line.
_ENCODER = json.JSONEncoder(default=_json_default)


def _to_json(event_dict: EventDict, **_dumps_kw: Any) -> str:
    """JSONRenderer's serializer (its `default` is _ENCODER's own); a line longer than
    ECHO_LIMIT has its longest fields shortened until it fits (contract 6.1)."""
    text = _ENCODER.encode(event_dict)
    if len(text) <= ECHO_LIMIT or "exception" in event_dict:
        return text
    return _fit(dict(event_dict), text)


# A field's share of a line; a line's own fields (its name, time, level) are never cut.
FIELD_LIMIT = 512
_UNCUT = frozenset({"event", "timestamp", "level", "exception"})


def _shorten_fields(_logger: Any, _method: str, event: EventDict) -> EventDict:
    """Every long string field (client input echoed: a name, an id) cut to FIELD_LIMIT.

    The stack of a server bug ("exception") is the server's own text and kept whole."""
    for key, value in event.items():
        if isinstance(value, str) and len(value) > FIELD_LIMIT // 4 and key not in _UNCUT:
            event[key] = shorten(value, FIELD_LIMIT)
    return event


def _fit(fields: dict[str, Any], text: str) -> str:
    """`fields` encoded with their longest values shortened until the line fits."""
    for _ in range(len(fields)):
        over = len(text) - ECHO_LIMIT
        sizes = {
            k: len(_ENCODER.encode(v))
            for k, v in fields.items()
            if k not in _UNCUT and isinstance(v, str | list | dict | tuple)
        }
        if over <= 0 or not sizes:
            break
        key = max(sizes, key=sizes.__getitem__)
        value = fields[key] if isinstance(fields[key], str) else _ENCODER.encode(fields[key])
        # JSON takes up to 6 bytes for one byte of UTF-8 ("\u0000"): aim low, then look again.
        fields[key] = shorten(value, max(32, (sizes[key] - over) // 6))
        text = _ENCODER.encode(fields)
    return text


def _timestamp(_logger: Any, _method: str, event: EventDict) -> EventDict:
    """timestamp: UTC ISO 8601 with microseconds, as "2026-11-28T03:02:15.730676Z"."""
    now = time.time()
    whole = int(now)
    second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    event["timestamp"] = f"{second}.{int((now - whole) * 1_000_000):06d}Z"
    return event


def _filter_by_level(_logger: Any, method: str, event: EventDict) -> EventDict:
    if _METHOD_LEVELS.get(method, logging.INFO) < _state["level"]:
        raise structlog.DropEvent
    return event


def _enrich(_logger: Any, _method: str, event: EventDict) -> EventDict:
    enricher = _enricher.get()
    if enricher is not None:
        try:
            enricher(event)
        except Exception:  # noqa: BLE001 - a helper must never cost a log line
            event.setdefault("enrich_failed", True)
    return event


def _noop(_logger: Any, _name: str, event: EventDict) -> EventDict:
    return event
