"""Logging: JSON lines, the live level (also for loggers made or bound earlier), enrichment."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
import threading

import pytest
import structlog

from jobworker import logging as jwlogging


@pytest.fixture(autouse=True)
def _reset() -> object:
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]


def test_json_lines_carry_event_level_time_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    jwlogging.setup("info", "json")
    structlog.get_logger("t").info("job_started", correlation_id="c1", job_index=0)
    (line,) = lines(capsys)
    assert line["event"] == "job_started"
    assert line["level"] == "info"
    assert line["correlation_id"] == "c1"
    assert str(line["timestamp"]).endswith("Z")


def test_the_level_changes_for_loggers_made_and_bound_before(
    capsys: pytest.CaptureFixture[str],
) -> None:
    jwlogging.setup("info", "json")
    module_logger = structlog.get_logger("made.early")  # a module-level proxy
    bound = module_logger.bind(correlation_id="c1")  # a running job's bound logger
    module_logger.debug("hidden")
    bound.debug("hidden")
    jwlogging.set_level("debug")
    module_logger.debug("shown_module")
    bound.debug("shown_bound")
    jwlogging.set_level("warning")
    module_logger.info("hidden")
    bound.info("hidden")
    bound.warning("shown_warning")
    assert [line["event"] for line in lines(capsys)] == [
        "shown_module",
        "shown_bound",
        "shown_warning",
    ]


def test_exceptions_log_at_error_with_the_stack(capsys: pytest.CaptureFixture[str]) -> None:
    jwlogging.setup("error", "json")
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger().exception("failed")
    (line,) = lines(capsys)
    assert line["level"] == "error"
    assert "ValueError: boom" in str(line["exception"])


def test_library_logging_comes_out_as_json_too(capsys: pytest.CaptureFixture[str]) -> None:
    jwlogging.setup("info", "json")
    logging.getLogger("some.library").warning("disk %s is slow", "sda")
    logging.getLogger("watchfiles.main").info("1 change detected")  # too chatty: dropped
    (line,) = lines(capsys)
    assert line["event"] == "disk sda is slow"
    assert line["level"] == "warning"
    assert line["logger"] == "some.library"


def test_console_format_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    jwlogging.setup("info", "console")
    structlog.get_logger().info("server_ready", address="127.0.0.1:1")
    err = capsys.readouterr().err
    assert "server_ready" in err and "address=127.0.0.1:1" in err
    with pytest.raises(ValueError):
        json.loads(err)


def test_the_enricher_adds_fields_and_cannot_break_a_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    jwlogging.setup("info", "json")

    def owner(event: jwlogging.EventDict) -> None:
        if event.get("correlation_id") == "c1":
            event.setdefault("identity", "alice")
        if event.get("correlation_id") == "bad":
            raise KeyError("bad")

    log = structlog.get_logger()
    with jwlogging.enriched(owner):
        log.info("job_ended", correlation_id="c1")
        log.info("rpc", correlation_id="c1", identity="admin")  # the caller wins
        log.info("job_ended", correlation_id="bad")
    log.info("job_ended", correlation_id="c1")  # out of the server's context: as logged
    first, second, third, fourth = lines(capsys)
    assert first["identity"] == "alice"
    assert second["identity"] == "admin"
    assert third["event"] == "job_ended" and third["enrich_failed"] is True
    assert "identity" not in fourth


class _Writes:
    """A stderr stand-in that records each write(2)-worth: what one flush() hands over."""

    def __init__(self) -> None:
        self.pending = ""
        self.flushed: list[str] = []

    def write(self, text: str) -> int:
        self.pending += text
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.flushed.append(self.pending)
            self.pending = ""


def test_info_lines_on_the_loop_are_written_together_and_warnings_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thousand jobs a second log a line each: info lines logged on the event loop go
    out together, within HOLD_SECONDS, not one write (and one reader wake-up) per line. A
    warning goes out at the end of its loop turn with what was held before it; lines from
    other threads go out at once, after what was held, in order; flush() writes at once."""
    stream = _Writes()
    monkeypatch.setattr("sys.stderr", stream)
    jwlogging.setup("info", "json")
    log = structlog.get_logger("t")

    def events(write: str) -> list[str]:
        return [json.loads(x)["event"] for x in write.splitlines()]

    async def main() -> None:
        log.info("one")
        log.info("two")
        await asyncio.sleep(0)
        assert stream.flushed == []  # held past the turn
        await asyncio.sleep(jwlogging.HOLD_SECONDS * 2)
        assert [events(w) for w in stream.flushed] == [["one", "two"]]
        log.info("three")
        log.warning("four")
        assert len(stream.flushed) == 1  # not before the end of this turn
        await asyncio.sleep(0)
        assert [events(w) for w in stream.flushed[1:]] == [["three", "four"]]
        log.info("five")
        thread = threading.Thread(target=lambda: log.info("from_thread"))
        thread.start()
        thread.join()
        assert events(stream.flushed[-1]) == ["five", "from_thread"]
        log.info("six")
        jwlogging.flush()
        assert events(stream.flushed[-1]) == ["six"]

    asyncio.run(main())
    log.info("no_loop")  # outside any loop: at once
    assert events(stream.flushed[-1]) == ["no_loop"]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_line_writes_what_a_bound_logger_writes(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """jwlogging.line (every job's end line, without a logger per job) runs the same
    processors: context variables, the enricher, level, timestamp, the format."""
    jwlogging.setup("info", fmt)
    structlog.contextvars.bind_contextvars(correlation_id="from-context", rpc="ScheduleBatch")
    ids = {"correlation_id": "c1", "job_index": 3, "job_name": "build"}
    fields = {"state": "SUCCEEDED", "exit_code": 0, "unix_user": None, "seconds": 0.25}
    with jwlogging.enriched(lambda event: event.setdefault("identity", "alice")):
        structlog.get_logger("jobworker.engine").bind(**ids).info("job_ended", **fields)
        jwlogging.line("info", "job_ended", {**ids, **fields})
    jwlogging.flush()
    by_logger, by_line = capsys.readouterr().err.splitlines()
    if fmt == "json":
        a, b = json.loads(by_logger), json.loads(by_line)
        assert a.pop("timestamp") and b.pop("timestamp")
        assert list(a.items()) == list(b.items())  # same fields, same order
        assert b["identity"] == "alice" and b["rpc"] == "ScheduleBatch"
        assert b["correlation_id"] == "c1"  # the job's own, not the RPC's
    else:  # console: the timestamp leads the line
        assert by_logger.split(" ", 1)[1] == by_line.split(" ", 1)[1]
        assert "job_ended" in by_line and "identity=alice" in by_line


def test_line_follows_the_live_level(capsys: pytest.CaptureFixture[str]) -> None:
    jwlogging.setup("info", "json")
    jwlogging.line("debug", "job_started", {"job_index": 0})
    jwlogging.set_level("debug")
    jwlogging.line("debug", "job_started", {"job_index": 1})
    jwlogging.set_level("warning")
    jwlogging.line("info", "job_ended", {"job_index": 1})
    jwlogging.flush()
    assert [(x["event"], x["job_index"]) for x in lines(capsys)] == [("job_started", 1)]


def test_timestamps_are_utc_iso_with_microseconds(capsys: pytest.CaptureFixture[str]) -> None:
    jwlogging.setup("info", "json")
    before = datetime.datetime.now(datetime.UTC)
    for _ in range(3):
        structlog.get_logger("t").info("tick")
    after = datetime.datetime.now(datetime.UTC)
    for line in lines(capsys):
        stamp = str(line["timestamp"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
        when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert before - datetime.timedelta(seconds=1) <= when <= after


def test_no_line_is_longer_than_1_kib(capsys: pytest.CaptureFixture[str]) -> None:
    jwlogging.setup("info", "json")
    log = structlog.get_logger("t")
    log.info("rpc", correlation_id="c" * 100_000, error="\x00" * 5000, names=["n" * 3000] * 5)
    jwlogging.line("info", "job_ended", {"job_name": "\u00e9" * 20_000, "job_index": 3})
    raw = capsys.readouterr().err.splitlines()
    assert len(raw) == 2
    assert all(len(line.encode()) <= 1024 for line in raw), [len(x) for x in raw]
    first, second = (json.loads(line) for line in raw)
    assert first["event"] == "rpc"
    assert str(first["correlation_id"]).startswith("ccc")
    assert "chars cut" in str(first["correlation_id"])
    assert second["job_index"] == 3
