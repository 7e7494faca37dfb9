"""Batches read back at start-up (BatchStore.load): nothing on disk is trusted, and
nothing that holds a job's output is lost."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from jobworker.model import BatchOptions, JobEvent, JobSpec, JobState, frozen_map
from jobworker.store.codec import (
    FORMAT_VERSION,
    as_time,
    event_from_line,
    event_to_line,
    parse_meta,
    record_from_meta,
)
from jobworker.store.damage import (
    NotRegular,
    Quarantine,
    kind_of,
    read_regular,
    start_traces,
)
from jobworker.store.files import JOURNAL, META, STDIN, TRASH, write_atomic
from jobworker.store.records import BatchRecord

log = structlog.get_logger("jobworker.store")

DAMAGED_LABEL = "jobworker/damaged"  # on a batch whose batch.json was unusable: which file
MAX_DAMAGED_JOBS = 100_000  # jobs shown at most for a batch whose batch.json is gone
_JOB_FILES = (STDIN, "stdout", "stderr", "stdout.times", "stderr.times")


def load_batches(root: Path) -> list[BatchRecord]:
    """The batches under `root`, read back as BatchStore.load says, oldest first."""
    recovery = _Recovery(root.parent)
    with os.scandir(root) as found:
        entries = list(found)
    loaded: list[BatchRecord] = []
    for entry in entries:
        path = root / entry.name
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError:
            continue  # gone since the listing
        if entry.name.startswith(TRASH) and stat.S_ISDIR(mode):
            shutil.rmtree(path, ignore_errors=True)  # a delete the last run did not finish
            continue
        if not stat.S_ISDIR(mode) or not _is_cid(entry.name):
            # Not a batch the server made: left as it is, never followed or opened.
            log.warning("stray_entry_skipped", path=str(path), kind=kind_of(mode))
            continue
        batch: BatchRecord | None
        try:
            batch = recovery.load(path)
        except Exception as exc:  # a bug must neither lose the batch nor stop the start
            log.exception("batch_load_failed", path=str(path))
            try:
                batch = recovery.damaged(path, f"it could not be loaded ({exc})")
            except Exception:
                log.exception("batch_skipped", path=str(path))
                batch = None
        if batch is not None:
            loaded.append(batch)
    loaded.sort(key=lambda b: b.order)
    return loaded


class _Recovery:
    """Reads batch folders back at one start; what it cannot use goes to quarantine."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.quarantine = Quarantine(data_dir)

    def load(self, path: Path) -> BatchRecord | None:
        """The batch in folder `path` (None when it never held one, and is removed)."""
        cid = path.name
        try:
            batch = _read_meta(path)
        except FileNotFoundError:
            if _never_committed(path):
                # Crashed between mkdir and the metadata's rename: nothing was scheduled.
                log.warning("incomplete_batch_removed", path=str(path))
                shutil.rmtree(path, ignore_errors=True)
                return None
            earlier = self.quarantine.earlier(cid, META)
            why = f"{META} is missing"
            if earlier is not None:
                why += f" (an earlier start moved it to {self._shown(earlier)})"
            return self.damaged(path, why)
        except _Unusable as exc:
            moved = self.quarantine.move(path / META, cid, META, exc.why) if exc.move else None
            return self.damaged(path, exc.why, moved)
        journal = _read_journal(path / JOURNAL, cid, self.quarantine)
        problems = list(journal.problems)
        for event in _in_order(journal.events, len(batch.specs), problems):
            seq = len(batch.events)  # numbered again after a lost or a skipped line
            batch._apply(event if event.seq == seq else dataclasses.replace(event, seq=seq))
        if problems[len(journal.problems) :] or journal.bad_lines:
            _repair_journal(path / JOURNAL, batch, journal, problems, self.quarantine)
        elif journal.torn:
            log.warning("journal_tail_dropped", path=str(path / JOURNAL), bytes=journal.torn)
            with contextlib.suppress(OSError):
                os.truncate(path / JOURNAL, journal.good)
        self._check_folders(batch, problems)
        return batch

    def _check_folders(self, batch: BatchRecord, problems: list[str]) -> None:
        """Look at the job folders: move aside what is not a folder or a regular file where
        one should be, log the folders of jobs that ran and are gone, and record LOST the
        queued jobs whose folder shows they had started (their start never recorded)."""
        jobs = batch.path / "jobs"
        names = _list_jobs(jobs, batch.cid, self.quarantine)
        traced: dict[int, str] = {}
        for i, status in enumerate(batch.statuses):
            folder = jobs / str(i)
            is_dir = names.get(str(i))
            if is_dir is None:
                if status.start_time is not None:  # it ran: its logs are gone
                    log.error(
                        "job_folder_missing",
                        path=str(folder),
                        correlation_id=batch.cid,
                        job_index=i,
                        state=status.state.name,
                    )
                continue
            if not is_dir:
                try:
                    why = f"a {kind_of(os.lstat(folder).st_mode)}, not a folder"
                except OSError:
                    continue
                self.quarantine.move(folder, batch.cid, f"jobs.{i}", why)
                continue
            if status.state.ended:
                # Its files are read safely when asked for (store/logs.py): looking into
                # every ended job's folder would cost every start.
                continue
            _check_job_files(folder, batch.cid, i, self.quarantine)
            if status.state is JobState.QUEUED:
                traces = start_traces(folder, status.log_sizes)
                if traces:
                    traced[i] = traces
        batch.traced, batch.damage = traced, problems

    def damaged(self, path: Path, why: str, moved: Path | None = None) -> BatchRecord:
        """A batch whose batch.json cannot be used: what its journal and folders tell,
        every job LOST with a message naming the damage, labelled DAMAGED_LABEL. Memory
        only: its files stay as they are (but for what is moved to self.quarantine)."""
        cid = path.name
        if moved is not None:
            why += f"; moved to {self._shown(moved)}"
        journal = _read_journal(path / JOURNAL, cid, self.quarantine)
        count = 0
        for event in journal.events:
            if event.index < MAX_DAMAGED_JOBS:
                count = max(count, event.index + 1)
        with contextlib.suppress(OSError), os.scandir(path / "jobs") as found:
            for entry in found:
                if entry.name.isdigit() and str(int(entry.name)) == entry.name:
                    count = max(count, min(int(entry.name) + 1, MAX_DAMAGED_JOBS))
        count = max(count, 1)
        times = [e.time for e in journal.events]
        try:
            created = min(times) if times else as_time(os.lstat(path).st_mtime)
        except (OSError, ValueError):
            created = 0.0
        batch = BatchRecord(
            cid=cid,
            owner="",  # unknown: only those who may see every batch see it
            create_time=created,
            options=BatchOptions(labels=frozen_map({DAMAGED_LABEL: META})),
            specs=tuple(JobSpec(f"job-{i}", ()) for i in range(count)),
            path=path,
        )
        for event in _in_order(journal.events, count, []):
            batch._apply(dataclasses.replace(event, seq=len(batch.events)))
        now = time.time()
        for i, status in enumerate(list(batch.statuses)):
            message = f"record damaged: {why}"
            if status.state is not JobState.QUEUED:
                message += f"; last recorded {status.state.name}"
                if status.message:
                    message += f" ({status.message})"
            event = JobEvent(
                seq=len(batch.events),
                index=i,
                state=JobState.LOST,
                time=now,
                exit_code=status.exit_code,
                signal=status.signal,
                message=message,
                usage=status.usage,
                attempt=max(1, status.attempt),
            )
            batch._apply(event)
        log.error("batch_damaged", path=str(path), correlation_id=cid, why=why, jobs=count)
        self._check_folders(batch, [])
        return batch

    def _shown(self, path: Path) -> str:
        """`path` relative to data_dir: what a job's message names."""
        try:
            return str(path.relative_to(self.data_dir))
        except ValueError:
            return str(path)


class _Unusable(Exception):
    """batch.json cannot be used: why, and whether to move it to quarantine."""

    def __init__(self, why: str, move: bool = True) -> None:
        super().__init__(why)
        self.why = why
        self.move = move


def _read_meta(path: Path) -> BatchRecord:
    """The batch whose folder is `path`, from its batch.json, every field checked (no job
    event applied yet); FileNotFoundError when there is none, else _Unusable."""
    try:
        raw = read_regular(path / META)
    except FileNotFoundError:
        raise
    except OSError as exc:
        move = isinstance(exc, NotRegular) or exc.errno == errno.EFBIG  # not an I/O error
        raise _Unusable(f"{META} is unusable: {exc.strerror}", move) from exc
    try:
        meta = parse_meta(raw)
    except (ValueError, RecursionError) as exc:
        raise _Unusable(f"{META} is not a JSON object ({_short(exc)})") from exc
    version = meta.get("version")
    if version != FORMAT_VERSION:  # another version's: left in place for it
        why = f"{META} has format version {version!r:.40}, this server reads {FORMAT_VERSION}"
        raise _Unusable(why, move=False)
    try:
        return record_from_meta(meta, path)
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise _Unusable(f"{META} is damaged ({_short(exc)})") from exc


def _is_cid(name: str) -> bool:
    """True for a name the server gives a batch folder: a UUID's canonical text."""
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _never_committed(path: Path) -> bool:
    """True when the batch folder `path` holds only what a crash before batch.json's rename
    leaves (batch.json.tmp, jobs/<i>/stdin): no batch was scheduled, no job ran."""
    try:
        with os.scandir(path) as top:
            for entry in top:
                if entry.name == META + ".tmp" and entry.is_file(follow_symlinks=False):
                    continue
                if entry.name != "jobs" or not entry.is_dir(follow_symlinks=False):
                    return False
                with os.scandir(entry.path) as jobs:
                    for job in jobs:
                        if not job.is_dir(follow_symlinks=False):
                            return False
                        with os.scandir(job.path) as files:
                            for f in files:
                                if f.name != STDIN or not f.is_file(follow_symlinks=False):
                                    return False
    except OSError:
        return False
    return True


def _list_jobs(jobs: Path, cid: str, quarantine: Quarantine) -> dict[str, bool]:
    """The entries of a batch's jobs/ folder, each with whether it is a folder (empty when
    there is none; anything else there is moved to quarantine)."""
    try:
        mode = os.lstat(jobs).st_mode
        if not stat.S_ISDIR(mode):
            quarantine.move(jobs, cid, "jobs", f"a {kind_of(mode)}, not a folder")
            return {}
        with os.scandir(jobs) as found:
            return {e.name: e.is_dir(follow_symlinks=False) for e in found}
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.error("job_folders_unreadable", path=str(jobs), error=str(exc))
        return {}


def _check_job_files(folder: Path, cid: str, index: int, quarantine: Quarantine) -> None:
    """Move aside whatever stands in a job's folder where a regular file belongs (a FIFO
    would block the job's start, a symlink would send its output elsewhere)."""
    for name in _JOB_FILES:
        try:
            mode = os.lstat(folder / name).st_mode
        except OSError:
            continue
        if not stat.S_ISREG(mode):
            why = f"a {kind_of(mode)}, not a regular file"
            quarantine.move(folder / name, cid, f"jobs.{index}.{name}", why)


@dataclass
class _Journal:
    """A journal as read: its events, and what was wrong with it."""

    events: list[JobEvent] = field(default_factory=list)
    good: int = 0  # bytes of whole, readable lines before a torn last one
    torn: int = 0  # bytes of a torn last line (a crash mid-append)
    bad_lines: int = 0
    problems: list[str] = field(default_factory=list)
    regular: bool = True  # False once a non-regular file was moved away


def _read_journal(path: Path, cid: str, quarantine: Quarantine) -> _Journal:
    """The journal's events, in file order; reads only a regular file (anything else is
    moved to quarantine). A torn last line (a crash mid-append) is dropped; a damaged
    line elsewhere is skipped and counted: the lines after it are still good."""
    out = _Journal()
    try:
        data = read_regular(path)
    except FileNotFoundError:
        return out
    except OSError as exc:
        why = f"the journal is unusable: {exc.strerror}"
        out.problems.append(why)
        if isinstance(exc, NotRegular) or exc.errno == errno.EFBIG:
            out.regular = False
            quarantine.move(path, cid, JOURNAL, why)
        else:
            log.error("journal_unreadable", path=str(path), error=str(exc))
        return out
    if not data:
        out.problems.append("the journal is empty")
        log.warning("journal_empty", path=str(path))
        return out
    lines = data.splitlines(keepends=True)
    for n, line in enumerate(lines, 1):
        if n == len(lines) and not line.endswith(b"\n"):
            out.torn = len(line)
            break
        try:
            out.events.append(event_from_line(line))
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            out.bad_lines += 1
            if out.bad_lines <= 3:
                out.problems.append(f"line {n} of the journal is damaged")
        out.good += len(line)
    return out


def _in_order(events: list[JobEvent], jobs: int, problems: list[str]) -> Iterator[JobEvent]:
    """The events that can be applied to a batch of `jobs` jobs: each names one of its
    jobs and comes after the one before (QUEUED events 0..jobs-1 are implicit). A gap (a
    lost line) is noted in `problems`, and the events after it are kept."""
    last = jobs - 1
    for event in events:
        if event.index >= jobs:
            problems.append(f"event {event.seq} names job {event.index}, of {jobs}")
        elif event.seq <= last:
            problems.append(f"event {event.seq} out of order")
        else:
            if event.seq != last + 1:
                problems.append(f"events {last + 1} to {event.seq - 1} missing")
            last = event.seq
            yield event


def _repair_journal(
    path: Path, batch: BatchRecord, journal: _Journal, problems: list[str], quarantine: Quarantine
) -> None:
    """Keep the damaged journal in quarantine and put in its place the events it held that
    could be used (numbered again from the batch's jobs' count), so that what is appended
    from now on reads back at the next start."""
    why = "; ".join(problems[:5])
    kept = quarantine.keep(path, batch.cid, JOURNAL, why) if journal.regular else None
    lines = b"".join(event_to_line(e) for e in batch.events[len(batch.specs) :])
    try:
        write_atomic(path, lines)
    except OSError as exc:
        log.error("journal_repair_failed", path=str(path), why=why, error=str(exc))
        return
    log.error(
        "journal_damaged",
        path=str(path),
        why=why,
        moved_to=str(kept) if kept else None,
        events_kept=len(batch.events) - len(batch.specs),
    )
