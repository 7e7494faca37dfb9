"""A damaged data_dir through the real server (issue 13): every kind of damage leaves no
ended job run again, no log file deleted, a log line naming the path, and a server that
starts and serves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jobworker.v1 import jobworker_pb2 as pb
from tests.integration.conftest import (
    Server,
    ServerFactory,
    data_dir_of,
    job,
    schedule,
    wait_batch,
    wait_job,
)

DAMAGED_LABEL = "jobworker/damaged"


def _counted(marker: Path, name: str) -> pb.ScheduleBatchRequest:
    """A job that adds a line to `marker` each time it runs, and prints its name."""
    return job("sh", "-c", 'echo ran >> "$0"; echo "out $1"', str(marker), name, name=name)


def _runs(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def _logs(data: Path, cid: str) -> dict[str, bytes]:
    """Every log file of a batch, by its path under the batch's folder."""
    folder = data / "batches" / cid
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted((folder / "jobs").glob("*/std*"))
        if p.is_file() and not p.is_symlink()
    }


def _paths(srv: Server, event: str, key: str = "path") -> set[str]:
    return {str(line[key]) for line in srv.events(event)}


def _three_batches(srv: Server, tmp_path: Path) -> list[tuple[str, list[Path]]]:
    stub = srv.stub("alice")
    out = []
    for b in range(3):
        markers = [tmp_path / f"b{b}-j{j}" for j in range(4)]
        reply = schedule(stub, *(_counted(m, f"j{j}") for j, m in enumerate(markers)))
        assert wait_batch(stub, reply.correlation_id).state == pb.BATCH_STATE_SUCCEEDED
        out.append((reply.correlation_id, markers))
    return out


def test_a_damaged_journal_reruns_no_job_and_keeps_every_log(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server()
    data = data_dir_of(srv)
    batches = _three_batches(srv, tmp_path)
    srv.stop()
    logs = {cid: _logs(data, cid) for cid, _ in batches}
    journals = [data / "batches" / cid / "journal" for cid, _ in batches]
    os.truncate(journals[0], 0)  # emptied
    whole = journals[1].read_bytes()
    # Cut mid-line: a few bytes into the line after the middle (never at a line's end).
    journals[1].write_bytes(whole[: whole.index(b"\n", len(whole) // 2) + 6])
    lines = journals[2].read_bytes().splitlines(keepends=True)
    journals[2].write_bytes(b"".join(lines[:3]) + b"\x00garbage\xff\n" + b"".join(lines[3:]))

    srv.start()
    stub = srv.stub("alice")
    for cid, markers in batches:
        batch = wait_batch(stub, cid)
        assert batch.state != pb.BATCH_STATE_RUNNING
        for j, marker in enumerate(markers):
            assert _runs(marker) == 1, f"{cid} job {j} ran {_runs(marker)} times"
        assert _logs(data, cid) == logs[cid]  # no log file deleted or changed
    emptied = wait_batch(stub, batches[0][0])
    assert [j.state for j in emptied.jobs] == [pb.JOB_STATE_LOST] * 4
    for j in emptied.jobs:
        assert "record damaged" in j.message and "journal is empty" in j.message
    assert [j.stdout.data for j in emptied.jobs] == [f"out j{i}\n".encode() for i in range(4)]
    garbled = wait_batch(stub, batches[2][0])
    assert [j.state for j in garbled.jobs] == [pb.JOB_STATE_SUCCEEDED] * 4  # nothing lost
    # Each damage is logged with the journal's path.
    assert str(journals[0]) in _paths(srv, "journal_empty")
    assert str(journals[1]) in _paths(srv, "journal_tail_dropped")
    assert str(journals[2]) in _paths(srv, "journal_damaged")
    (kept,) = (data / "quarantine" / batches[2][0]).iterdir()
    assert b"garbage" in kept.read_bytes()
    # The server goes on serving, and a second start changes nothing.
    fresh = schedule(stub, job("echo", "new")).correlation_id
    assert wait_batch(stub, fresh).state == pb.BATCH_STATE_SUCCEEDED
    before = {cid: wait_batch(stub, cid) for cid, _ in batches}
    srv.stop()
    srv.start()
    stub = srv.stub("alice")
    for cid, markers in batches:
        assert wait_batch(stub, cid) == before[cid]
        assert all(_runs(m) == 1 for m in markers)


def _cli(srv: Server, *args: str, identity: str) -> str:
    env = dict(
        os.environ,
        JOBWORKER_SERVER=srv.address,
        JOBWORKER_CA=str(srv.pki / "ca.pem"),
        JOBWORKER_CERT=str(srv.pki / f"{identity}.pem"),
        JOBWORKER_KEY=str(srv.pki / f"{identity}-key.pem"),
        NO_COLOR="1",
        COLUMNS="200",
    )
    done = subprocess.run(
        [sys.executable, "-m", "jobworker", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=False,
    )
    return done.stdout.decode()


def test_a_batch_whose_batch_json_is_gone_or_garbage_shows_as_damaged(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server()
    data = data_dir_of(srv)
    batches = _three_batches(srv, tmp_path)
    srv.stop()
    (gone, _), (garbage, _), (fine, _) = batches
    logs = {cid: _logs(data, cid) for cid, _ in batches}
    (data / "batches" / gone / "batch.json").unlink()
    (data / "batches" / garbage / "batch.json").write_bytes(b'{"version": 1, "jobs": [tru')

    srv.start()
    stub = srv.stub("viewer")  # the owner is unknown: those who see every batch see it
    listed = {b.correlation_id: b for b in stub.ListBatches(pb.ListBatchesRequest()).batches}
    assert set(listed) == {gone, garbage, fine}
    for cid in (gone, garbage):
        summary = listed[cid]
        assert summary.state == pb.BATCH_STATE_FAILED
        assert summary.labels[DAMAGED_LABEL] == "batch.json"
        assert summary.jobs_by_state == {"JOB_STATE_LOST": 4}
        assert _logs(data, cid) == logs[cid]  # every log kept
        batch = stub.GetBatch(pb.GetBatchRequest(correlation_id=cid)).batch
        assert [j.stdout.data for j in batch.jobs] == [f"out j{i}\n".encode() for i in range(4)]
        assert all("record damaged: batch.json" in j.message for j in batch.jobs)
        assert "last recorded SUCCEEDED" in batch.jobs[0].message
    assert "missing" in stub.GetBatch(pb.GetBatchRequest(correlation_id=gone)).batch.jobs[0].message
    assert listed[fine].state == pb.BATCH_STATE_SUCCEEDED
    assert {str(data / "batches" / c) for c in (gone, garbage)} <= _paths(srv, "batch_damaged")
    assert str(data / "batches" / garbage / "batch.json") in _paths(srv, "file_quarantined")
    (kept,) = (data / "quarantine" / garbage).iterdir()
    assert kept.read_bytes() == b'{"version": 1, "jobs": [tru'
    # `jobworker list` shows them, marked.
    table = _cli(srv, "list", identity="viewer")
    for cid in (gone, garbage):
        row = next(line for line in table.splitlines() if line.startswith(cid[:8]))
        assert "damaged=batch.json" in row and "lost" in row
    fresh = schedule(srv.stub("alice"), job("echo", "new")).correlation_id
    assert wait_batch(srv.stub("alice"), fresh).state == pb.BATCH_STATE_SUCCEEDED


def test_fifos_and_symlinks_never_block_the_start_nor_are_followed(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server(jobs={"max_concurrent": 1})
    data = data_dir_of(srv)
    stub = srv.stub("alice")
    ended = _three_batches(srv, tmp_path)
    # A batch with a job still queued when the server stops.
    marker = tmp_path / "queued"
    waiting = schedule(stub, job("sleep", "30", name="sleeper"), _counted(marker, "queued"))
    cid = waiting.correlation_id
    wait_job(stub, cid, "sleeper", pb.JOB_STATE_RUNNING)
    srv.stop()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me\n")

    journal = data / "batches" / ended[0][0] / "journal"
    journal.unlink()
    os.mkfifo(journal)
    meta = data / "batches" / ended[1][0] / "batch.json"
    meta.unlink()
    os.mkfifo(meta)
    old_log = data / "batches" / ended[2][0] / "jobs" / "1" / "stdout"
    old_log.unlink()
    os.mkfifo(old_log)
    queued = data / "batches" / cid / "jobs" / "1"
    (queued / "stdout").unlink()
    os.mkfifo(queued / "stdout")
    (queued / "stderr").unlink()
    (queued / "stderr").symlink_to(victim)

    srv.start()  # within the fixture's timeout: nothing blocked
    stub = srv.stub("alice")
    moved = _paths(srv, "file_quarantined")
    assert {str(journal), str(meta), str(queued / "stdout"), str(queued / "stderr")} <= moved
    # The queued job runs once, into new regular files; the symlink's target is untouched.
    batch = wait_batch(stub, cid)
    second = batch.jobs[1]
    assert second.state == pb.JOB_STATE_SUCCEEDED
    assert second.stdout.data == b"out queued\n"
    assert _runs(marker) == 1
    assert victim.read_bytes() == b"keep me\n"
    # The batch whose journal was a FIFO: its jobs left output, so none ran again.
    assert all(_runs(m) == 1 for m in ended[0][1])
    first = wait_batch(stub, ended[0][0])
    assert [j.state for j in first.jobs] == [pb.JOB_STATE_LOST] * 4
    # An ended job's log that is a FIFO reads as empty, and the path is logged.
    third = stub.GetBatch(pb.GetBatchRequest(correlation_id=ended[2][0])).batch
    assert third.jobs[1].stdout.data == b""
    assert third.jobs[0].stdout.data == b"out j0\n"
    assert str(old_log) in _paths(srv, "log_file_skipped")
    viewer = srv.stub("viewer")
    damaged = viewer.GetBatch(pb.GetBatchRequest(correlation_id=ended[1][0])).batch
    assert all(j.state == pb.JOB_STATE_LOST for j in damaged.jobs)
    assert "FIFO" in damaged.jobs[0].message


def test_a_job_folder_gone_is_logged_and_its_job_not_run_again(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = make_server()
    data = data_dir_of(srv)
    ((cid, markers), *_) = _three_batches(srv, tmp_path)
    srv.stop()
    folder = data / "batches" / cid / "jobs" / "2"
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()
    srv.start()
    stub = srv.stub("alice")
    batch = wait_batch(stub, cid)
    assert [j.state for j in batch.jobs] == [pb.JOB_STATE_SUCCEEDED] * 4  # as recorded
    assert batch.jobs[2].stdout.data == b""
    assert batch.jobs[3].stdout.data == b"out j3\n"
    assert all(_runs(m) == 1 for m in markers)
    assert str(folder) in _paths(srv, "job_folder_missing")
