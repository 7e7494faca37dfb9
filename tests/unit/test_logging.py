"""Logging: JSON lines, the live level (also for loggers made or bound earlier), enrichment."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest
import structlog

from jobworker import logging as jwlogging


@pytest.fixture(autouse=True)
def _reset() -> object:
    yield
    jwlogging.set_enricher(None)
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
    assert jwlogging.current_level() == "warning"


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

    jwlogging.set_enricher(owner)
    log = structlog.get_logger()
    log.info("job_ended", correlation_id="c1")
    log.info("rpc", correlation_id="c1", identity="admin")  # the caller wins
    log.info("job_ended", correlation_id="bad")
    first, second, third = lines(capsys)
    assert first["identity"] == "alice"
    assert second["identity"] == "admin"
    assert third["event"] == "job_ended" and third["enrich_failed"] is True


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


def test_lines_of_one_event_loop_turn_are_written_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thousand jobs a second log two lines each: one write per loop turn, not per line;
    lines from other threads go out at once, after what was held, in order."""
    stream = _Writes()
    monkeypatch.setattr("sys.stderr", stream)
    jwlogging.setup("info", "json")
    log = structlog.get_logger("t")

    async def main() -> list[str]:
        log.info("one")
        log.info("two")
        assert stream.flushed == []  # held for the end of this turn
        await asyncio.sleep(0)
        after_turn = list(stream.flushed)
        log.info("three")
        thread = threading.Thread(target=lambda: log.info("from_thread"))
        thread.start()
        thread.join()
        return after_turn

    after_turn = asyncio.run(main())
    assert [[json.loads(x)["event"] for x in w.splitlines()] for w in after_turn] == [
        ["one", "two"]
    ]
    assert [json.loads(x)["event"] for x in stream.flushed[1].splitlines()] == [
        "three",
        "from_thread",
    ]
    log.info("no_loop")  # outside any loop: at once
    assert json.loads(stream.flushed[-1])["event"] == "no_loop"
