"""The supervisor's ledger on real files: what a restarted supervisor reads back."""

from __future__ import annotations

import os
from pathlib import Path

from jobworker.supervisor.ledger import Ledger


def _steps(ledger: Ledger, key: str, *ops: str) -> None:
    for op in ops:
        record: dict[str, object] = {"op": op, "key": key, "attempt": 1}
        if op == "begin":
            record["time"] = 100.0
        if op == "started":
            record |= {"pid": 42, "pid_start": 7, "start_time": 100.5, "cgroup": ""}
        if op == "ended":
            record["exit"] = {"exit_code": 3, "signal": 0, "end_time": 101.0}
        ledger.write(record)


def test_a_replay_holds_every_job_not_acknowledged_with_its_last_step(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    _steps(ledger, "a", "begin")
    _steps(ledger, "b", "begin", "started")
    _steps(ledger, "c", "begin", "started", "ended")
    _steps(ledger, "d", "begin", "started", "ended", "ack")
    ledger.close(empty=False)
    records = Ledger(tmp_path / "ledger").replay()
    assert sorted(records) == ["a", "b", "c"]
    assert records["a"].started is None and records["a"].begun == 100.0
    assert records["b"].started is not None and records["b"].started["pid"] == 42
    assert records["b"].ended is None
    assert records["c"].ended == {"exit_code": 3, "signal": 0, "end_time": 101.0}


def test_a_torn_or_garbage_line_is_skipped_and_the_rest_read(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    _steps(ledger, "a", "begin")
    ledger.close(empty=False)
    with open(tmp_path / "ledger", "ab") as f:
        f.write(b"\xff garbage\n")
    ledger = Ledger(tmp_path / "ledger")
    _steps(ledger, "b", "begin", "started")
    ledger.close(empty=False)
    with open(tmp_path / "ledger", "ab") as f:
        f.write(b'{"op":"begin","key":"torn"')  # a crash mid-write
    assert sorted(Ledger(tmp_path / "ledger").replay()) == ["a", "b"]


def test_compaction_keeps_only_the_live_records(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    for i in range(50):
        _steps(ledger, f"done-{i}", "begin", "started", "ended", "ack")
    _steps(ledger, "live", "begin", "started")
    before = ledger.size
    live = [
        {"op": "begin", "key": "live", "attempt": 1, "time": 100.0},
        {"op": "started", "key": "live", "attempt": 1, "pid": 42, "pid_start": 7,
         "start_time": 100.5, "cgroup": ""},
    ]  # fmt: skip
    ledger.compact(live)
    assert ledger.size < before / 20
    _steps(ledger, "after", "begin")  # appends go to the new file
    ledger.close(empty=False)
    assert sorted(Ledger(tmp_path / "ledger").replay()) == ["after", "live"]


def test_a_fifo_in_its_place_is_moved_aside_never_opened_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "ledger")
    ledger = Ledger(tmp_path / "ledger")  # would block for ever if it opened the FIFO
    assert ledger.replay() == {}
    _steps(ledger, "a", "begin")
    ledger.close(empty=False)
    assert (tmp_path / "ledger").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".damaged-" in p.name]
