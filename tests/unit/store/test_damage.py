"""A damaged data_dir costs no job and no log: the store's recovery on real files (issue 13)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from jobworker.model import BatchOptions, JobEvent, JobSpec, JobState, RetryPolicy
from jobworker.store.batches import BatchRecord, BatchStore
from jobworker.store.codec import event_to_line
from jobworker.store.damage import NotRegular, open_regular, start_traces
from jobworker.store.files import JOURNAL, META
from jobworker.store.logs import log_size, read_tail, seal_times, tail_offset
from jobworker.store.recovery import DAMAGED_LABEL
from tests.unit.store.new_batch import new_batch

SPECS = (
    JobSpec("a", ("echo", "a")),
    JobSpec("b", ("echo", "b"), depends_on=("a",)),
    JobSpec("c", ("echo", "c")),
)


@pytest.fixture(autouse=True)
def _plain_logs() -> None:
    structlog.reset_defaults()  # capture_logs needs the default (uncached) loggers


def _ran(store: BatchStore, batch: BatchRecord, index: int, output: bytes = b"out\n") -> None:
    """Job `index` ran and succeeded, writing `output`, as the engine records it."""
    folder = batch.path / "jobs" / str(index)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stdout").write_bytes(output)
    (folder / "stderr").write_bytes(b"")
    now = time.time()
    store.append(batch, JobEvent(store.next_seq(batch), index, JobState.RUNNING, now, pid=1))
    store.append(batch, JobEvent(store.next_seq(batch), index, JobState.SUCCEEDED, now, 0))


def _folders(batch: BatchRecord) -> None:
    """The empty job folders and logs made ahead of the jobs (BatchStore.make_folders)."""
    for i in range(len(batch.specs)):
        folder = batch.path / "jobs" / str(i)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("stdout", "stderr"):
            (folder / name).touch()


def _stored(tmp_path: Path, specs: tuple[JobSpec, ...] = SPECS) -> tuple[BatchStore, BatchRecord]:
    store = BatchStore(tmp_path)
    batch = new_batch(store, "alice", BatchOptions(), specs)
    _folders(batch)
    return store, batch


def _reload(tmp_path: Path) -> tuple[BatchRecord, list[dict[str, Any]]]:
    with capture_logs() as logs:
        store = BatchStore(tmp_path)
        (batch,) = store.load()
        if batch.traced:  # as the engine's recovery does for jobs no executor runs
            store.record_lost(batch, batch.traced)
    return batch, logs


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [line for line in logs if line["event"] == name]


def _quarantined(tmp_path: Path, cid: str) -> list[str]:
    folder = tmp_path / "quarantine" / cid
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- the journal --------------------------------------------------------------------------


def test_an_emptied_journal_runs_no_job_that_left_output(tmp_path: Path) -> None:
    store, batch = _stored(tmp_path)
    _ran(store, batch, 0)
    _ran(store, batch, 1)
    store.close()
    os.truncate(batch.path / JOURNAL, 0)

    loaded, logs = _reload(tmp_path)
    a, b, c = loaded.statuses
    assert a.state is JobState.LOST and b.state is JobState.LOST
    assert "record damaged" in a.message and "the journal is empty" in a.message
    assert "stdout holds 4 bytes" in a.message
    assert c.state is JobState.QUEUED  # no trace of a start: it may run
    assert _events(logs, "journal_empty")[0]["path"] == str(batch.path / JOURNAL)
    damaged = _events(logs, "job_record_damaged")
    assert [line["job_index"] for line in damaged] == [0, 1]
    assert damaged[0]["path"] == str(batch.path / "jobs" / "0")
    assert (batch.path / "jobs" / "0" / "stdout").read_bytes() == b"out\n"  # never deleted
    # The LOST events are journaled: the next start sees the same.
    again, logs = _reload(tmp_path)
    assert [s.state for s in again.statuses] == [JobState.LOST, JobState.LOST, JobState.QUEUED]
    assert not _events(logs, "job_record_damaged")


def test_a_dependency_of_a_job_that_started_ran_too(tmp_path: Path) -> None:
    """b depends on a: b's output shows a had succeeded, even though a wrote nothing."""
    store, batch = _stored(tmp_path)
    _ran(store, batch, 0, output=b"")
    _ran(store, batch, 1)
    store.close()
    os.truncate(batch.path / JOURNAL, 0)
    loaded, _ = _reload(tmp_path)
    a, b, c = loaded.statuses
    assert (a.state, b.state, c.state) == (JobState.LOST, JobState.LOST, JobState.QUEUED)
    assert "'b' that depends on it had started" in a.message


@pytest.mark.parametrize("cut", [1, 30, -1, -40])
def test_a_journal_cut_anywhere_reruns_no_job(tmp_path: Path, cut: int) -> None:
    store, batch = _stored(tmp_path)
    for i in range(3):
        _ran(store, batch, i)
    store.close()
    journal = batch.path / JOURNAL
    data = journal.read_bytes()
    journal.write_bytes(data[:cut])

    loaded, logs = _reload(tmp_path)
    for status in loaded.statuses:
        assert status.state is not JobState.QUEUED  # each wrote output: none runs again
    for i in range(3):
        assert (batch.path / "jobs" / str(i) / "stdout").read_bytes() == b"out\n"
    assert _events(logs, "journal_tail_dropped")[0]["path"] == str(journal)
    # Nothing from a torn line is kept in the journal; the next start agrees.
    again, _ = _reload(tmp_path)
    assert [s.state for s in again.statuses] == [s.state for s in loaded.statuses]


def test_a_lost_line_in_the_middle_keeps_the_lines_after_it(tmp_path: Path) -> None:
    store, batch = _stored(tmp_path)
    for i in range(3):
        _ran(store, batch, i)
    store.close()
    journal = batch.path / JOURNAL
    lines = journal.read_bytes().splitlines(keepends=True)
    # Line 2 (job 0's SUCCEEDED) overwritten by garbage of the same length.
    damaged = lines[0] + b"\x00" * (len(lines[1]) - 1) + b"\n" + b"".join(lines[2:])
    journal.write_bytes(damaged)

    loaded, logs = _reload(tmp_path)
    a, b, c = loaded.statuses
    assert a.state is JobState.RUNNING  # its end is lost: the engine records it LOST
    assert b.state is JobState.SUCCEEDED and c.state is JobState.SUCCEEDED
    (line,) = _events(logs, "journal_damaged")
    assert line["path"] == str(journal)
    assert "line 2" in line["why"] and "missing" in line["why"]
    (kept,) = _quarantined(tmp_path, batch.cid)
    assert kept.startswith("journal.")
    assert (tmp_path / "quarantine" / batch.cid / kept).read_bytes() == damaged
    # The journal in place reads back the same, numbered in order, with room to append.
    again, logs = _reload(tmp_path)
    assert [s.state for s in again.statuses] == [s.state for s in loaded.statuses]
    assert [e.seq for e in again.events] == list(range(len(again.events)))
    assert not _events(logs, "journal_damaged")


def test_hostile_journal_fields_are_damaged_lines_not_crashes(tmp_path: Path) -> None:
    store, batch = _stored(tmp_path)
    _ran(store, batch, 0)
    store.close()
    journal = batch.path / JOURNAL
    good = journal.read_bytes()
    hostile = [
        b'{"q":5,"i":2,"s":"SUCCEEDED","t":1.0,"x":99999999999}\n',  # not an int32
        b'{"q":5,"i":2,"s":"SUCCEEDED","t":NaN}\n',
        b'{"q":5,"i":2,"s":"SUCCEEDED","t":"soon"}\n',
        b'{"q":5,"i":2,"s":"NOPE","t":1.0}\n',
        b'{"q":5,"i":2,"s":"SUCCEEDED","t":1.0,"m":"\\ud800"}\n',
        b'{"q":5,"i":2,"s":"SUCCEEDED","t":1.0,"u":[1,2]}\n',
        b'{"q":5,"i":7,"s":"SUCCEEDED","t":1.0}\n',  # no job 7
        b'{"q":1,"i":2,"s":"SUCCEEDED","t":1.0}\n',  # out of order
        b"[" * 100_000 + b"\n",  # deeper than the parser goes
        b"[1,2]\n",
    ]
    journal.write_bytes(good + b"".join(hostile))
    loaded, logs = _reload(tmp_path)
    assert [s.state for s in loaded.statuses][::2] == [JobState.SUCCEEDED, JobState.QUEUED]
    assert _events(logs, "journal_damaged")


def test_a_journal_that_is_not_a_regular_file_is_moved_aside(tmp_path: Path) -> None:
    for kind in ("fifo", "symlink", "directory"):
        root = tmp_path / kind
        store, batch = _stored(root)
        _ran(store, batch, 0)
        store.close()
        journal = batch.path / JOURNAL
        journal.unlink()
        if kind == "fifo":
            os.mkfifo(journal)
        elif kind == "symlink":
            (root / "elsewhere").write_bytes(b"")
            journal.symlink_to(root / "elsewhere")
        else:
            journal.mkdir()
        loaded, logs = _reload(root)  # a FIFO must not block this
        assert loaded.statuses[0].state is JobState.LOST  # it left output: not run again
        (moved,) = _events(logs, "file_quarantined")
        assert moved["path"] == str(journal)
        assert not os.path.lexists(journal) or journal.is_file()
        assert _quarantined(root, batch.cid)[0].startswith("journal.")
        if kind == "symlink":
            assert (root / "elsewhere").read_bytes() == b""  # never written through


# --- batch.json ---------------------------------------------------------------------------


def test_a_batch_without_batch_json_shows_as_damaged(tmp_path: Path) -> None:
    store, batch = _stored(tmp_path)
    _ran(store, batch, 0)
    store.close()
    (batch.path / META).unlink()

    loaded, logs = _reload(tmp_path)
    assert loaded.cid == batch.cid
    assert loaded.options.labels == {DAMAGED_LABEL: META}
    assert loaded.owner == ""  # unknown: for those who may see every batch
    assert len(loaded.specs) == 3  # from its job folders
    assert loaded.ended
    assert all(s.state is JobState.LOST for s in loaded.statuses)
    a = loaded.statuses[0]
    assert "record damaged: batch.json is missing" in a.message
    assert "last recorded SUCCEEDED" in a.message
    assert a.exit_code == 0 and a.start_time is not None
    assert _events(logs, "batch_damaged")[0]["path"] == str(batch.path)
    assert (batch.path / "jobs" / "0" / "stdout").read_bytes() == b"out\n"
    assert (batch.path / JOURNAL).exists()  # left as it was
    # Memory only: the next start shows it the same way.
    again, _ = _reload(tmp_path)
    assert [s.state for s in again.statuses] == [JobState.LOST] * 3


def test_a_garbage_batch_json_is_quarantined_and_named(tmp_path: Path) -> None:
    store, batch = _stored(tmp_path)
    _ran(store, batch, 0)
    store.close()
    (batch.path / META).write_bytes(b"\x00garbage{")

    loaded, logs = _reload(tmp_path)
    assert loaded.options.labels == {DAMAGED_LABEL: META}
    (moved,) = _events(logs, "file_quarantined")
    assert moved["path"] == str(batch.path / META)
    (name,) = _quarantined(tmp_path, batch.cid)
    assert name.startswith("batch.json.")
    assert (tmp_path / "quarantine" / batch.cid / name).read_bytes() == b"\x00garbage{"
    assert f"quarantine/{batch.cid}/{name}" in loaded.statuses[0].message
    # The next start says where it went.
    again, _ = _reload(tmp_path)
    assert "an earlier start moved it to" in again.statuses[0].message


def _meta(batch: BatchRecord) -> dict[str, Any]:
    return json.loads((batch.path / META).read_bytes())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["jobs"][1].update(depends_on=["nobody"]),
        lambda m: m["jobs"][0].update(depends_on=["b"]),  # a cycle with b
        lambda m: m["jobs"][0].update(argv="echo"),
        lambda m: m["jobs"][0].update(argv=[]),
        lambda m: m["jobs"][0].update(timeout=1e300),
        lambda m: m["jobs"][0].update(limits={"cpu_millis": -1}),
        lambda m: m["jobs"][0].update(limits={"bogus": 1}),
        lambda m: m["jobs"][0].update(env={"A": 1}),
        lambda m: m["jobs"][0].update(retry={"max_attempts": 10**9}),
        lambda m: m["jobs"][2].update(name="a"),
        lambda m: m.update(create_time="yesterday"),
        lambda m: m.update(owner=""),
        lambda m: m.update(jobs={}),
        lambda m: m.update(correlation_id=str(uuid.uuid4())),
        lambda m: m["options"].update(labels=[]),
        lambda m: m["options"].update(max_parallel=-3),
    ],
)
def test_hostile_batch_json_fields_make_a_damaged_batch(tmp_path: Path, change: Any) -> None:
    store, batch = _stored(tmp_path)
    store.close()
    meta = _meta(batch)
    change(meta)
    (batch.path / META).write_text(json.dumps(meta))
    loaded, logs = _reload(tmp_path)
    assert loaded.options.labels == {DAMAGED_LABEL: META}
    assert all(s.state is JobState.LOST for s in loaded.statuses)
    assert "batch.json" in _events(logs, "batch_damaged")[0]["why"]


def test_another_versions_batch_json_stays_in_place(tmp_path: Path) -> None:
    store, batch = _stored(tmp_path)
    store.close()
    meta = _meta(batch)
    meta["version"] = 99
    (batch.path / META).write_text(json.dumps(meta))
    loaded, _ = _reload(tmp_path)
    assert "format version 99" in loaded.statuses[0].message
    assert (batch.path / META).exists()
    assert _quarantined(tmp_path, batch.cid) == []


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_batch_json_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    store, batch = _stored(tmp_path)
    store.close()
    meta = batch.path / META
    real = tmp_path / "real.json"
    meta.rename(real)
    if kind == "fifo":
        os.mkfifo(meta)
    elif kind == "symlink":
        meta.symlink_to(real)  # a good file, but never followed
    else:
        meta.mkdir()
    loaded, logs = _reload(tmp_path)
    assert loaded.options.labels == {DAMAGED_LABEL: META}
    assert _events(logs, "file_quarantined")[0]["path"] == str(meta)
    assert not os.path.lexists(meta)
    assert _quarantined(tmp_path, batch.cid)[0].startswith("batch.json.")


# --- folders and log files -------------------------------------------------------------------


def test_a_job_folder_gone_is_logged_and_nothing_runs_twice(tmp_path: Path) -> None:
    store, batch = _stored(tmp_path)
    _ran(store, batch, 0)
    store.close()
    for child in (batch.path / "jobs" / "0").iterdir():
        child.unlink()
    (batch.path / "jobs" / "0").rmdir()
    loaded, logs = _reload(tmp_path)
    assert loaded.statuses[0].state is JobState.SUCCEEDED  # its record stands
    (line,) = _events(logs, "job_folder_missing")
    assert line["path"] == str(batch.path / "jobs" / "0")
    assert read_tail(batch.path / "jobs" / "0" / "stdout", 100).data == b""


def test_what_stands_where_a_file_belongs_is_moved_aside(tmp_path: Path) -> None:
    store, batch = _stored(tmp_path)
    store.close()
    jobs = batch.path / "jobs"
    (jobs / "0" / "stdout").unlink()
    os.mkfifo(jobs / "0" / "stdout")  # would block the job's start
    (jobs / "2" / "stderr").unlink()
    (jobs / "2" / "stderr").symlink_to(tmp_path / "victim")  # would send output there
    for child in (jobs / "1").iterdir():
        child.unlink()
    (jobs / "1").rmdir()
    (jobs / "1").write_bytes(b"not a folder")
    loaded, logs = _reload(tmp_path)
    assert [s.state for s in loaded.statuses] == [JobState.QUEUED] * 3  # no trace: may run
    moved = {line["path"] for line in _events(logs, "file_quarantined")}
    assert moved == {str(jobs / "0" / "stdout"), str(jobs / "2" / "stderr"), str(jobs / "1")}
    names = _quarantined(tmp_path, batch.cid)
    assert [n.rsplit(".", 1)[0] for n in names] == ["jobs.0.stdout", "jobs.1", "jobs.2.stderr"]
    assert not os.path.lexists(jobs / "0" / "stdout") and not os.path.lexists(jobs / "1")


def test_log_readers_open_only_regular_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "real").write_bytes(b"secret\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for name in ("fifo", "link"):
        with capture_logs() as logs:
            assert read_tail(tmp_path / name, 100).data == b""  # no block, not followed
            assert tail_offset(tmp_path / name, 3) == 0
        assert _events(logs, "log_file_skipped")[0]["path"] == str(tmp_path / name)
        assert log_size(tmp_path / name) == 0
    assert read_tail(tmp_path / "real", 100).data == b"secret\n"
    with pytest.raises(NotRegular):
        open_regular(tmp_path / "fifo")
    (tmp_path / "job").mkdir()
    os.mkfifo(tmp_path / "job" / "stdout.times")
    (tmp_path / "job" / "stdout").write_bytes(b"x")
    seal_times(tmp_path / "job", 1.0)  # neither blocks nor writes into the FIFO


def test_start_traces_see_output_past_the_last_attempt(tmp_path: Path) -> None:
    (tmp_path / "stdout").write_bytes(b"12345")
    (tmp_path / "stderr").write_bytes(b"")
    assert start_traces(tmp_path) == "stdout holds 5 bytes"
    assert start_traces(tmp_path, (5, 0)) == ""  # a retry waiting: that was the last attempt
    (tmp_path / "stdout").write_bytes(b"12345678")
    assert start_traces(tmp_path, (5, 0)) == "stdout holds 8 bytes"
    (tmp_path / "stdout").write_bytes(b"")
    (tmp_path / "stderr.times").write_bytes(b"")
    assert start_traces(tmp_path) == "stderr.times exists"


def test_a_retry_waiting_is_lost_only_if_another_attempt_wrote(tmp_path: Path) -> None:
    specs = (JobSpec("a", ("false",), retry=RetryPolicy(3, 0.1, 1.0)),)
    for grew in (False, True):
        root = tmp_path / str(grew)
        store, batch = _stored(root, specs)
        (batch.path / "jobs" / "0" / "stdout").write_bytes(b"first\n")
        store.append(batch, JobEvent(1, 0, JobState.RUNNING, 1.0, pid=1))
        store.append(
            batch,
            JobEvent(2, 0, JobState.QUEUED, 2.0, 1, attempt=2, retry_at=2.5, offsets=(6, 0)),
        )
        store.close()
        if grew:
            with (batch.path / "jobs" / "0" / "stdout").open("ab") as f:
                f.write(b"second\n")  # the second attempt ran; its RUNNING line is lost
        loaded, _ = _reload(root)
        expected = JobState.LOST if grew else JobState.QUEUED
        assert loaded.statuses[0].state is expected


def test_stray_entries_are_skipped_never_followed(tmp_path: Path) -> None:
    store, batch = _stored(tmp_path)
    _ran(store, batch, 0)
    store.close()
    batches = tmp_path / "batches"
    other = str(uuid.uuid4())
    (batches / other).symlink_to(batch.path)  # a batch folder by another name
    os.mkfifo(batches / str(uuid.uuid4()))
    (batches / "notes.txt").write_text("hello")
    (batches / os.fsdecode(b"\xff\xfe")).mkdir()
    with capture_logs() as logs:
        (loaded,) = BatchStore(tmp_path).load()
    assert loaded.cid == batch.cid
    skipped = {line["path"] for line in _events(logs, "stray_entry_skipped")}
    assert str(batches / other) in skipped and str(batches / "notes.txt") in skipped
    assert (batches / "notes.txt").exists() and (batches / other).is_symlink()


def test_a_garbage_first_line_keeps_the_events_after_it(tmp_path: Path) -> None:
    """Damage repair writes the lines the store writes: the same format, read back."""
    store, batch = _stored(tmp_path)
    event = JobEvent(3, 0, JobState.RUNNING, 1.0, pid=9, pid_start=10, message="x\ny")
    (batch.path / JOURNAL).write_bytes(b"junk\n" + event_to_line(event))
    store.close()
    loaded, _ = _reload(tmp_path)
    assert loaded.statuses[0].state is JobState.RUNNING
    assert loaded.statuses[0].pid == 9


def test_appends_never_open_a_fifo_put_in_the_journals_place(tmp_path: Path) -> None:
    store, batch = _stored(tmp_path)
    os.mkfifo(batch.path / JOURNAL)  # appeared while the server runs: not moved
    with capture_logs() as logs:
        _ran(store, batch, 0)  # does not block; the lines wait in memory
    assert _events(logs, "journal_write_failed")
    assert batch.statuses[0].state is JobState.SUCCEEDED
    (batch.path / JOURNAL).unlink()
    store.retry_pending()
    store.close()
    loaded, _ = _reload(tmp_path)
    assert loaded.statuses[0].state is JobState.SUCCEEDED
