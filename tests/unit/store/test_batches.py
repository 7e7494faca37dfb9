"""The batch store on real files: crash safety of metadata, journal and deletes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker.errors import NotFound
from jobworker.model import BatchOptions, JobEvent, JobSpec, JobState, Usage
from jobworker.store.batches import BatchStore
from jobworker.store.codec import event_from_line, event_to_line
from jobworker.store.files import JOURNAL, TRASH
from tests.unit.store.new_batch import new_batch

SPECS = (JobSpec("a", ("true",)), JobSpec("b", ("true",)))


def _event(store: BatchStore, batch: object, index: int, state: JobState) -> JobEvent:
    return JobEvent(
        seq=store.next_seq(batch),  # type: ignore[arg-type]
        index=index,
        state=state,
        time=time.time(),
        exit_code=0 if state is JobState.SUCCEEDED else None,
    )


def _run_all(store: BatchStore, batch: object) -> None:
    for i in range(len(SPECS)):
        store.append(batch, _event(store, batch, i, JobState.RUNNING))  # type: ignore[arg-type]
        store.append(batch, _event(store, batch, i, JobState.SUCCEEDED))  # type: ignore[arg-type]


def test_a_restart_sees_every_event(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch = new_batch(store, "alice", BatchOptions(labels={"k": "v"}), SPECS)
    _run_all(store, batch)
    store.close()
    again = BatchStore(tmp_path)
    (loaded,) = again.load()
    assert loaded.cid == batch.cid
    assert [s.state for s in loaded.statuses] == [JobState.SUCCEEDED] * 2
    assert loaded.options.labels == {"k": "v"}
    assert loaded.end_time == batch.end_time


def test_a_torn_last_line_is_dropped_and_cut_off(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch = new_batch(store, "alice", BatchOptions(), SPECS)
    store.append(batch, _event(store, batch, 0, JobState.RUNNING))
    store.close()
    journal = batch.path / JOURNAL
    good = journal.read_bytes()
    with journal.open("ab") as f:
        f.write(b'{"q":3,"i":0,"s":"SUCC')  # the crash came mid-write
    (loaded,) = BatchStore(tmp_path).load()
    assert loaded.statuses[0].state is JobState.RUNNING
    assert journal.read_bytes() == good


def test_a_damaged_line_is_kept_aside_and_later_events_survive(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch = new_batch(store, "alice", BatchOptions(), SPECS)
    _run_all(store, batch)
    store.close()
    journal = batch.path / JOURNAL
    lines = journal.read_bytes().splitlines(keepends=True)
    damaged = lines[0] + b"garbage\n" + b"".join(lines[1:])
    journal.write_bytes(damaged)

    first = BatchStore(tmp_path)
    (loaded,) = first.load()
    # The lines after the garbage are read too: nothing that ended runs again.
    assert [s.state for s in loaded.statuses] == [JobState.SUCCEEDED] * 2
    assert loaded.ended
    (aside,) = (tmp_path / "quarantine" / batch.cid).glob("journal.*")
    assert aside.read_bytes() == damaged  # kept for a person to look at
    assert journal.read_bytes() == b"".join(lines)  # the good lines, in place
    first.close()
    (again,) = BatchStore(tmp_path).load()
    assert [s.state for s in again.statuses] == [JobState.SUCCEEDED] * 2
    assert list((tmp_path / "quarantine" / batch.cid).iterdir()) == [aside]  # once


def test_stdin_is_kept_in_the_jobs_folder_not_in_memory(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    specs = (JobSpec("a", ("cat",), stdin=b"in\0put"), JobSpec("b", ("true",)))
    batch = new_batch(store, "alice", BatchOptions(), specs)
    assert [s.stdin for s in batch.specs] == [b"", b""]
    assert batch.stdin_sizes == [6, 0]
    assert (batch.job_dir(0) / "stdin").read_bytes() == b"in\0put"
    store.close()
    (loaded,) = BatchStore(tmp_path).load()
    assert loaded.stdin_sizes == [6, 0]


def test_a_deleted_batch_never_comes_back(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch = new_batch(store, "alice", BatchOptions(idempotency_key="k"), SPECS)
    _run_all(store, batch)
    trash = store.delete(batch)
    assert not batch.path.exists()
    assert (trash / "batch.json").exists()  # as if the server died before removing it
    again = BatchStore(tmp_path)
    assert again.load() == []
    assert not trash.exists()
    assert again.find_idempotent("alice", "k") is None


def test_prefixes_find_batches_by_id_after_new_loaded_and_deleted_ones(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    made = [new_batch(store, "alice", BatchOptions(), SPECS) for _ in range(40)]
    for batch in made:
        _run_all(store, batch)

    def found(prefix: str) -> list[str]:
        return [b.cid for b in store.with_prefix(prefix)]

    ids = sorted(b.cid for b in made)
    assert found("") == ids
    assert all(found(cid[:8]) == [c for c in ids if c.startswith(cid[:8])] for cid in ids)
    assert found("zz") == []  # past every id (they are hexadecimal)
    store.delete(made[0])
    assert found(made[0].cid) == []
    store.close()
    again = BatchStore(tmp_path)
    again.load()  # the ids sorted once, after loading
    assert [b.cid for b in again.with_prefix("")] == [c for c in ids if c != made[0].cid]
    late = new_batch(again, "bob", BatchOptions(), SPECS)
    assert [b.cid for b in again.with_prefix(late.cid[:12])] == [late.cid]
    kept = [c for c in ids if c != made[0].cid]
    assert [b.cid for b in again.with_prefix("")] == sorted([*kept, late.cid])


def test_a_batch_whose_folder_cannot_be_moved_is_kept_and_one_removed_by_hand_forgotten(
    tmp_path: Path,
) -> None:
    store = BatchStore(tmp_path)
    batch = new_batch(store, "alice", BatchOptions(), SPECS)
    _run_all(store, batch)
    blocker = tmp_path / "batches" / f"{TRASH}{batch.cid}" / "x"
    blocker.mkdir(parents=True)  # a non-empty folder where the trash goes: rename fails
    with pytest.raises(OSError):
        store.delete(batch)
    assert store.get(batch.cid) is batch and batch.path.exists()
    shutil.rmtree(blocker.parent)
    shutil.rmtree(batch.path)  # removed by hand while the server runs
    store.delete(batch)
    with pytest.raises(NotFound):
        store.get(batch.cid)


def test_job_folders_and_empty_logs_are_made_ahead_of_the_jobs(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    specs = tuple(JobSpec(f"j{i}", ("true",)) for i in range(50))
    batch = new_batch(store, "alice", BatchOptions(), specs)
    store.make_folders(batch).result(timeout=30)
    for i in range(len(specs)):
        for name in ("stdout", "stderr"):
            log = batch.path / "jobs" / str(i) / name
            assert log.read_bytes() == b""
            assert log.stat().st_mode & 0o777 == 0o600  # the server's alone: jobs get fds


def test_job_folders_never_bring_a_deleted_batch_back(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch = new_batch(store, "alice", BatchOptions(), SPECS)
    trash = store.delete(batch)
    store.make_folders(batch).result(timeout=30)
    assert not batch.path.exists()
    assert not (trash / "jobs").exists()


def test_a_folder_a_crash_left_before_the_commit_is_removed(tmp_path: Path) -> None:
    folder = tmp_path / "batches" / str(uuid.uuid4())
    (folder / "jobs" / "0").mkdir(parents=True)
    (folder / "jobs" / "0" / "stdin").write_bytes(b"in")
    (folder / "batch.json.tmp").write_bytes(b'{"vers')
    assert BatchStore(tmp_path).load() == []
    assert not folder.exists()


def test_a_folder_the_server_did_not_make_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "batches" / "half-made" / "jobs").mkdir(parents=True)
    assert BatchStore(tmp_path).load() == []
    assert (tmp_path / "batches" / "half-made" / "jobs").is_dir()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs: a disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_holds_journal_lines_back_and_loses_none(tiny_disk: Path) -> None:
    store = BatchStore(tiny_disk)
    batch = new_batch(store, "alice", BatchOptions(), SPECS)
    filler = tiny_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk to the last byte
        while os.write(fd, b"x" * 512):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    _run_all(store, batch)  # nothing fits: every line waits
    assert [s.state for s in batch.statuses] == [JobState.SUCCEEDED] * 2  # right in memory
    assert not (batch.path / JOURNAL).exists() or (batch.path / JOURNAL).stat().st_size == 0
    filler.unlink()
    store.retry_pending()
    store.close()
    (loaded,) = BatchStore(tiny_disk).load()
    assert [s.state for s in loaded.statuses] == [JobState.SUCCEEDED] * 2
    assert loaded.end_time == batch.end_time


def test_a_full_disk_refuses_a_new_batch_with_the_limit_named(tiny_disk: Path) -> None:
    from jobworker.errors import ResourceExhausted

    store = BatchStore(tiny_disk, min_free_disk=64 << 20)
    with pytest.raises(ResourceExhausted, match="min_free_disk"):
        new_batch(store, "alice", BatchOptions(), SPECS)
    assert store.load() == []


@given(
    seq=st.integers(0, 1 << 40),
    index=st.integers(0, 100_000),
    state=st.sampled_from(list(JobState)),
    time_=st.floats(0, 4e9, allow_nan=False),
    exit_code=st.none() | st.integers(-(1 << 31), (1 << 31) - 1),
    signal=st.integers(0, 64),
    message=st.text(),
    pid=st.integers(0, 1 << 22),
    pid_start=st.integers(0, 1 << 40),
    cgroup=st.text(),
    usage=st.none()
    | st.builds(
        Usage,
        st.floats(0, 1e6, allow_nan=False),
        st.floats(0, 1e6, allow_nan=False),
        st.integers(0, 1 << 50),
    ),
)
def test_journal_lines_are_the_json_they_say(
    seq: int,
    index: int,
    state: JobState,
    time_: float,
    exit_code: int | None,
    signal: int,
    message: str,
    pid: int,
    pid_start: int,
    cgroup: str,
    usage: Usage | None,
) -> None:
    """A journal line must be one line of valid JSON that reads back as the same event,
    whatever the message."""
    event = JobEvent(
        seq,
        index,
        state,
        time_,
        exit_code,
        signal,
        message,
        pid,
        pid_start if pid else 0,
        usage,
        cgroup,
        node=cgroup[::-1],  # any text, as a cluster's node names are
    )
    line = event_to_line(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    json.loads(line)  # valid JSON on its own
    assert event_from_line(line) == event


def test_job_folders_and_a_snapshot_stay_right_after_the_end(tmp_path: Path) -> None:
    """job_dir names the contract's jobs/<index> folder while the batch runs and after it
    ended (then without keeping a list of every job's path: ended batches are many); a
    view() taken before the end does not change with the batch."""
    store = BatchStore(tmp_path)
    batch = new_batch(store, "alice", BatchOptions(), SPECS)
    assert batch.job_dir(1) == batch.path / "jobs" / "1"
    before = batch.view()
    _run_all(store, batch)
    assert batch.end_time is not None
    assert [batch.job_dir(i) for i in range(2)] == [batch.path / "jobs" / str(i) for i in range(2)]
    assert batch._job_dirs == []
    assert [s.state for s in before.statuses] == [JobState.QUEUED] * 2
    assert before.end_time is None and before.job_dir(0) == batch.job_dir(0)
    after = batch.view()
    assert [s.state for s in after.statuses] == [JobState.SUCCEEDED] * 2
    assert after.state == batch.state and after.end_time == batch.end_time
    store.close()
