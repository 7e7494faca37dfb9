"""`Client` and `AsyncClient`: jobworker for Python programs, in plain dataclasses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from itertools import islice

from jobworker.client import convert
from jobworker.client import types as t
from jobworker.client.config import ClientConfig
from jobworker.client.retry import OnReconnect
from jobworker.client.rpc import AsyncRpcClient, RpcClient

JobLike = t.JobSpec | Sequence[str]


def _config(config: ClientConfig | None, context: str | None) -> ClientConfig:
    return config if config is not None else ClientConfig.from_env(context)


def _job(
    argv: Sequence[str], stdin: bytes, env: Mapping[str, str] | None, **kw: object
) -> t.JobSpec:
    return t.JobSpec(argv=list(argv), stdin=stdin, env=dict(env or {}), **kw)  # type: ignore[arg-type]


class Client:
    """A blocking client; use it as a context manager or call close().

    Settings come from `config`, or else from the profile's context (`context`, else
    JOBWORKER_CONTEXT, else the profile's current one) with JOBWORKER_* on top.
    """

    def __init__(self, config: ClientConfig | None = None, *, context: str | None = None) -> None:
        self.rpc = RpcClient(_config(config, context))

    def close(self) -> None:
        """Close the connection."""
        self.rpc.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, jobs: Sequence[JobLike], options: t.BatchOptions | None = None) -> t.Submitted:
        """Schedule a batch; a job is a JobSpec or a bare argv."""
        response = self.rpc.schedule(
            [convert.job_spec(job) for job in jobs],
            convert.batch_options(options) if options is not None else None,
        )
        return convert.submitted(response)

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        env: Mapping[str, str] | None = None,
        working_dir: str = "",
        timeout: float | None = None,
        limits: t.Limits | None = None,
    ) -> t.JobResult:
        """Run one command and wait for it: its result with its whole stdout and stderr."""
        job = _job(argv, stdin, env, working_dir=working_dir, timeout=timeout, limits=limits)
        cid = self.submit([job]).correlation_id
        out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        for event in self.follow(cid):
            if isinstance(event, t.LogChunk):
                out[event.stream] += event.data
        result = self.get(cid, log_tail_bytes=0).jobs[0]
        return _with_output(result, bytes(out["stdout"]), bytes(out["stderr"]))

    def get(
        self, cid: str, jobs: Sequence[str] = (), *, log_tail_bytes: int | None = None
    ) -> t.Batch:
        """The batch as it stands; `log_tail_bytes` None: the server's default tail."""
        return convert.batch(self.rpc.get(cid, jobs, log_tail_bytes))

    def wait(self, cid: str, jobs: Sequence[str] = ()) -> t.Batch:
        """Wait until the batch (or the given jobs) has ended; the batch then, without logs.

        Follows the batch's stream from the logs' current end, so no output is sent."""
        for _ in self.rpc.follow(cid, jobs, tail_lines=0):
            pass
        return self.get(cid, jobs, log_tail_bytes=0)

    def follow(
        self,
        cid: str,
        jobs: Sequence[str] = (),
        *,
        cursor: str = "",
        tail_lines: int | None = None,
        on_reconnect: OnReconnect | None = None,
    ) -> Iterator[t.LogEvent]:
        """Output and state changes live until the jobs end; a broken stream resumes by
        itself from the last cursor (`on_reconnect` hears of it)."""
        for response in self.rpc.follow(cid, jobs, cursor, on_reconnect, tail_lines):
            event = convert.event(response)
            if event is not None:
                yield event

    def logs(
        self, cid: str, jobs: Sequence[str] = (), *, tail_lines: int | None = None
    ) -> Iterator[t.LogEvent]:
        """The output and state changes written so far, then the end."""
        for response in self.rpc.stream(cid, jobs, tail_lines=tail_lines):
            event = convert.event(response)
            if event is not None:
                yield event

    def cancel(self, cid: str, jobs: Sequence[str] = (), *, grace: float | None = None) -> t.Batch:
        """Cancel the batch's queued and running jobs (or the given ones); the batch then."""
        return convert.batch(self.rpc.cancel(cid, jobs, grace))

    def retry(self, cid: str, *, failed_only: bool = False) -> t.Submitted:
        """Schedule the batch's jobs (or those that did not succeed) again as a new batch."""
        options, jobs = convert.retry_plan(self.rpc.get(cid, log_tail_bytes=0), failed_only)
        return convert.submitted(self.rpc.schedule(jobs, options))

    def delete(self, cid: str) -> None:
        """Delete an ended batch with its logs."""
        self.rpc.delete(cid)

    def list(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        states: Sequence[t.BatchState] = (),
        limit: int | None = 50,
    ) -> list[t.BatchSummary]:
        """The batches you may see, newest first; `limit` None: all of them."""
        page = min(limit, 1000) if limit else 1000
        found = self.rpc.iter_batches(page, labels, convert.batch_states_pb(states))
        return [convert.summary(s) for s in islice(found, limit)]


def _with_output(result: t.JobResult, stdout: bytes, stderr: bytes) -> t.JobResult:
    from dataclasses import replace

    return replace(
        result,
        stdout=t.LogTail(stdout, result.stdout.total_bytes, truncated=False),
        stderr=t.LogTail(stderr, result.stderr.total_bytes, truncated=False),
    )


class AsyncClient:
    """The same as Client, on asyncio: `async with AsyncClient() as client: ...`."""

    def __init__(self, config: ClientConfig | None = None, *, context: str | None = None) -> None:
        self.rpc = AsyncRpcClient(_config(config, context))

    async def close(self) -> None:
        """Close the connection."""
        await self.rpc.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(
        self, jobs: Sequence[JobLike], options: t.BatchOptions | None = None
    ) -> t.Submitted:
        """Schedule a batch; a job is a JobSpec or a bare argv."""
        response = await self.rpc.schedule(
            [convert.job_spec(job) for job in jobs],
            convert.batch_options(options) if options is not None else None,
        )
        return convert.submitted(response)

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        env: Mapping[str, str] | None = None,
        working_dir: str = "",
        timeout: float | None = None,  # noqa: ASYNC109 (the job's own time limit)
        limits: t.Limits | None = None,
    ) -> t.JobResult:
        """Run one command and wait for it: its result with its whole stdout and stderr."""
        job = _job(argv, stdin, env, working_dir=working_dir, timeout=timeout, limits=limits)
        cid = (await self.submit([job])).correlation_id
        out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        async for event in self.follow(cid):
            if isinstance(event, t.LogChunk):
                out[event.stream] += event.data
        result = (await self.get(cid, log_tail_bytes=0)).jobs[0]
        return _with_output(result, bytes(out["stdout"]), bytes(out["stderr"]))

    async def get(
        self, cid: str, jobs: Sequence[str] = (), *, log_tail_bytes: int | None = None
    ) -> t.Batch:
        """The batch as it stands; `log_tail_bytes` None: the server's default tail."""
        return convert.batch(await self.rpc.get(cid, jobs, log_tail_bytes))

    async def wait(self, cid: str, jobs: Sequence[str] = ()) -> t.Batch:
        """Wait until the batch (or the given jobs) has ended; the batch then, without logs."""
        async for _ in self.rpc.follow(cid, jobs, tail_lines=0):
            pass
        return await self.get(cid, jobs, log_tail_bytes=0)

    async def follow(
        self,
        cid: str,
        jobs: Sequence[str] = (),
        *,
        cursor: str = "",
        tail_lines: int | None = None,
        on_reconnect: OnReconnect | None = None,
    ) -> AsyncIterator[t.LogEvent]:
        """Output and state changes live until the jobs end, resuming broken streams."""
        async for response in self.rpc.follow(cid, jobs, cursor, on_reconnect, tail_lines):
            event = convert.event(response)
            if event is not None:
                yield event

    async def cancel(
        self, cid: str, jobs: Sequence[str] = (), *, grace: float | None = None
    ) -> t.Batch:
        """Cancel the batch's queued and running jobs (or the given ones); the batch then."""
        return convert.batch(await self.rpc.cancel(cid, jobs, grace))

    async def retry(self, cid: str, *, failed_only: bool = False) -> t.Submitted:
        """Schedule the batch's jobs (or those that did not succeed) again as a new batch."""
        options, jobs = convert.retry_plan(await self.rpc.get(cid, log_tail_bytes=0), failed_only)
        return convert.submitted(await self.rpc.schedule(jobs, options))

    async def delete(self, cid: str) -> None:
        """Delete an ended batch with its logs."""
        await self.rpc.delete(cid)

    async def list(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        states: Sequence[t.BatchState] = (),
        limit: int | None = 50,
    ) -> list[t.BatchSummary]:
        """The batches you may see, newest first; `limit` None: all of them."""
        page = min(limit, 1000) if limit else 1000
        found: list[t.BatchSummary] = []
        async for summary in self.rpc.iter_batches(page, labels, convert.batch_states_pb(states)):
            if limit is not None and len(found) >= limit:
                break
            found.append(convert.summary(summary))
        return found
