"""After a restart: the jobs the executors still know (running, or ended while no server was
there), matched to the batches whose journals left them running."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import structlog

from jobworker.engine.events import Recorder
from jobworker.engine.executor import Executor, ExitInfo, Handle, Known
from jobworker.engine.jobrun import job_key
from jobworker.engine.logwatch import log_sizes
from jobworker.model import JobState, Usage
from jobworker.store.batches import BatchRecord

log = structlog.get_logger("jobworker.engine")

# A RUNNING job its executor gave no word of (an executor must answer for each it is asked).
_UNANSWERED = ExitInfo(None, 0, Usage(), 0.0, False, lost="its executor does not know it")


class Recovery:
    """What the executors answered, by job key: each batch takes back its own jobs, and
    what none takes back is released."""

    def __init__(self) -> None:
        self._found: dict[str, tuple[int, Handle | ExitInfo]] = {}
        self._reported_by: dict[str, Executor] = {}

    @classmethod
    async def ask(
        cls,
        executors: Mapping[str, Executor],
        batches: Sequence[BatchRecord],
        executor_name: Callable[[BatchRecord], str],
    ) -> Recovery:
        """Ask each executor about the jobs of `batches` the journals left RUNNING there."""
        known: dict[str, list[Known]] = {name: [] for name in executors}
        for batch in batches:
            for i, st in enumerate(batch.statuses):
                if st.state is JobState.RUNNING:
                    item = Known(job_key(batch, i), st.attempt, st.pid, st.pid_start, st.cgroup)
                    known.setdefault(executor_name(batch), []).append(item)
        recovery = cls()
        for name, executor in executors.items():
            answer = await executor.recover(known.get(name, []))
            recovery._found.update(answer)
            recovery._reported_by.update(dict.fromkeys(answer, executor))
        return recovery

    def take_back(self, batch: BatchRecord, record: Recorder) -> dict[int, Handle | ExitInfo]:
        """The jobs of `batch` its executor still knows, by index; a job it started just
        before the server died (QUEUED in the journal) is recorded RUNNING now."""
        found = self._found
        adopted: dict[int, Handle | ExitInfo] = {}
        for i, st in enumerate(batch.statuses):
            if st.state is JobState.RUNNING:
                attempt, item = found.pop(job_key(batch, i), (st.attempt, _UNANSWERED))
                adopted[i] = item
            elif st.state is JobState.QUEUED and job_key(batch, i) in found:
                attempt, item = found[job_key(batch, i)]
                if attempt != st.attempt + 1 or isinstance(item, ExitInfo):
                    continue
                del found[job_key(batch, i)]
                record.running(batch, i, item, attempt, log_sizes(batch.job_dir(i)))
                adopted[i] = item
        return adopted

    def release_rest(self) -> None:
        """Once every batch has taken back its jobs: those left, the journal says ended (or
        their batch is gone), are killed if still running and forgotten by their executor."""
        for key, (attempt, left) in self._found.items():
            if isinstance(left, ExitInfo):
                continue
            if not left.ended:
                log.warning("job_unrecorded_killed", key=key, pid=left.pid)
                left.kill()
            self._reported_by[key].forget(key, attempt)
