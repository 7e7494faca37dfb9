"""The server: its parts built once, in order, and closed in reverse by one exit stack."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from grpc import aio
from grpc_health.v1 import _async as health_aio  # health.aio; grpc_health-stubs lack it
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jobworker import __version__
from jobworker import logging as jwlogging
from jobworker.config import Config
from jobworker.engine.executor import Executor
from jobworker.engine.scheduler import Scheduler
from jobworker.engine.service import BatchService
from jobworker.errors import NotFound
from jobworker.metrics import Metrics
from jobworker.server.datadir import data_dir_locked
from jobworker.server.identity import Identities, Revocations
from jobworker.server.interceptor import Interceptor
from jobworker.server.reader import BatchReader
from jobworker.server.reload import Reloader, TlsFiles
from jobworker.server.service import JobWorkerService
from jobworker.server.uploads import Uploads
from jobworker.store.batches import BatchStore
from jobworker.store.inotify import Inotify
from jobworker.supervisor.client import LocalExecutor
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

log = structlog.get_logger("jobworker.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobWorkerService"].full_name
FLUSH_INTERVAL = 0.2  # journal group commit: a power cut loses at most this much
CRL_INTERVAL = 1.0  # how often tls.crl is looked at: open calls of a revoked cert end by then
SWEEP_INTERVAL = 60.0  # at most; a short retention.max_age is swept a tenth as often
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True, eq=False)
class Parts:
    """The running server's parts, each whole once made (App.build)."""

    tls: TlsFiles
    revocations: Revocations
    identities: Identities
    server: aio.Server
    port: int
    health: health_aio.HealthServicer
    store: BatchStore
    scheduler: Scheduler
    core: BatchService
    service: JobWorkerService


async def build_scheduler(
    config: Config, live: Callable[[], Config], store: BatchStore, metrics: Metrics
) -> Scheduler:
    """The scheduler and the executors that run its jobs (the local one: the data_dir's job
    supervisor, started when none runs); closed by the scheduler's shutdown."""
    local = LocalExecutor(
        config.server.data_dir,
        config.server.cgroup_root,
        lambda: live().jobs.working_dir,
        log_level=config.logging.level,
        log_format=config.logging.format,
    )
    await local.open()
    executors: dict[str, Executor] = {local.name: local}
    for name, table in config.executors.named().items():  # kind = "ray", the only other
        from jobworker.engine.ray_executor import RayExecutor  # Ray's users only pay for it

        executors[name] = RayExecutor(
            name,
            table.address,
            table.cpus_per_job,
            token_file=table.token_file,
            default_working_dir=config.jobs.working_dir,
            log_path=config.server.data_dir / f"executor-{name}.log",
        )
    # The metrics listen from the first event: recovery ends jobs LOST and starts others.
    return Scheduler(
        store,
        executors,
        config.jobs,
        listeners=[metrics.on_job_event],
        default_executor=config.executors.default,
    )


class App:
    """One jobworker server: run() builds it, serves until stopped, and takes it down."""

    def __init__(self, config: Config) -> None:
        self.reloader = Reloader(config)
        self.reloader.observers.append(self._count_reload)
        self.metrics = Metrics()
        self.closing = False
        self.port = 0
        self.metrics_address = ""
        self.parts: Parts | None = None  # while serving
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        _warn_root_jobs(config.jobs.root_keys())

    @property
    def config(self) -> Config:
        """The live config (a reload swaps it whole)."""
        return self.reloader.config

    # -- life cycle

    async def run(self, *, signals: bool = True) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads the config.

        `signals`: install the handlers on this loop (the main thread's); else the caller
        hands them to on_signal() (server/loop.py does)."""
        loop = asyncio.get_running_loop()
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if signals else ()
        for sig in handled:  # kept while draining: a second SIGTERM must not kill the server
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            async with contextlib.AsyncExitStack() as stack:
                stack.callback(log.info, "server_stopped")
                try:
                    self.parts = await self.build(stack)
                    await self._ready()
                    await self._stop.wait()
                finally:
                    log.info("server_draining")
                    self.closing = True
        finally:
            self.parts = None
            for sig in handled:
                loop.remove_signal_handler(sig)

    async def build(self, stack: contextlib.AsyncExitStack) -> Parts:
        """Every part, each closed by `stack`; a part that fails to start closes the rest."""
        cfg = self.config
        # Unreadable or mismatched certificates stop the start before any job is recovered.
        tls = TlsFiles(cfg)
        revocations = Revocations(cfg.tls.crl, cfg.tls.ca_cert)
        identities = Identities(self._role_of, revocations)
        interceptor = Interceptor(identities, [self.metrics.observe_rpc])
        cfg.server.data_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(data_dir_locked(cfg.server.data_dir))
        # Listen before recovery: a port in use must not start queued jobs only to stop them.
        server, port = _listen(cfg, interceptor, tls)
        health_servicer = health_aio.HealthServicer()
        self._serve_metrics(stack)
        store = BatchStore(cfg.server.data_dir, min_free_disk=cfg.jobs.min_free_disk)
        stack.enter_context(jwlogging.enriched(_owner_lookup(store)))
        stack.callback(store.close)
        batches = store.load()
        inotify = Inotify()  # before the scheduler: nothing between it and its drain fails
        stack.callback(inotify.close)
        scheduler = await build_scheduler(cfg, lambda: self.config, store, self.metrics)
        stack.push_async_callback(self._drain, server, health_servicer, store, scheduler)
        self.metrics.watch(
            queued=lambda: scheduler.queued,
            running=lambda: scheduler.running,
            batches=lambda: len(store),
            max_concurrent=lambda: self.config.jobs.max_concurrent,
        )
        core = BatchService(store, scheduler)
        for batch in batches:
            if not batch.ended:  # folders for the jobs still to run, as at scheduling
                store.make_folders(batch)
        await scheduler.recover(batches)
        live = lambda: self.config  # noqa: E731 - read at each call: a reload swaps it
        reader = BatchReader(core, live, inotify, lambda: self.closing, self.metrics.on_stream)
        service = JobWorkerService(core, Uploads(core, live), reader)
        _add_services(server, service, health_servicer)
        parts = Parts(
            tls=tls,
            revocations=revocations,
            identities=identities,
            server=server,
            port=port,
            health=health_servicer,
            store=store,
            scheduler=scheduler,
            core=core,
            service=service,
        )
        self.port = port
        self.reloader.apply = functools.partial(self._apply, parts)
        stack.push_async_callback(self._cancel_tasks)
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, _SERVING)
        self._own(self._flush_loop(store), "journal flush")
        self._own(self._sweep_loop(core), "retention sweep")
        self._own(self.reloader.watch(), "config watch")
        self._own(self._watch_crl(parts), "crl watch")
        return parts

    def _serve_metrics(self, stack: contextlib.AsyncExitStack) -> None:
        listen = self.config.metrics.listen
        stack.push_async_callback(asyncio.to_thread, self.metrics.close)  # a last scrape
        if not listen:
            return
        try:
            self.metrics_address = self.metrics.serve(listen)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {listen}: {exc}") from exc
        log.info("metrics_ready", address=self.metrics_address, path="/metrics")

    async def _ready(self) -> None:
        # One turn of the loop: the config watch sets up its watch in its first step.
        await asyncio.sleep(0)
        cfg = self.config
        assert self.parts is not None
        log.info(
            "server_ready",
            address=f"{cfg.server.listen.rsplit(':', 1)[0]}:{self.port}",
            version=__version__,
            data_dir=str(cfg.server.data_dir),
            batches=len(self.parts.store),
            config=str(cfg.source) if cfg.source else None,
            pid=os.getpid(),
        )
        jwlogging.flush()  # at once, not with the next info lines: tools wait for this one

    async def _drain(
        self,
        server: aio.Server,
        health_servicer: health_aio.HealthServicer,
        store: BatchStore,
        scheduler: Scheduler,
    ) -> None:
        """Refuse new work, end streams UNAVAILABLE, stop jobs and calls together."""
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, _NOT_SERVING)
        for batch in store:
            batch.changed.notify()  # followers see `closing` and end with UNAVAILABLE
        grace = self.config.server.shutdown_grace
        await asyncio.gather(
            scheduler.shutdown(
                min(self.config.jobs.kill_grace, grace),
                stop_jobs=self.config.jobs.on_server_stop == "stop",
            ),
            server.stop(grace),
        )

    def on_signal(self, sig: int) -> None:
        """SIGHUP reloads; SIGTERM and SIGINT stop. Call on the loop's thread."""
        if sig != signal.SIGHUP:
            self._stop.set()
        elif self.parts is None:
            log.info("config_reload_skipped", reason="server not serving", trigger="SIGHUP")
        elif not self.closing:
            self._own(self.reload("SIGHUP"), "reload")

    def stop(self) -> None:
        """Ask run() to shut down."""
        self._stop.set()

    # -- reload

    async def reload(self, why: str) -> bool:
        """Load the config file again; a bad file changes nothing. True when applied."""
        return await self.reloader.reload(why)

    def _apply(self, parts: Parts, running: Config, applied: Config, why: str) -> None:
        """Hand a reloaded config to the parts that keep settings of their own."""
        parts.tls.config = applied
        parts.store.min_free_disk = applied.jobs.min_free_disk
        parts.scheduler.update_settings(applied.jobs)
        parts.revocations.configure(applied.tls.crl, applied.tls.ca_cert)
        if applied.jobs.root_keys() != running.jobs.root_keys():
            _warn_root_jobs(applied.jobs.root_keys())
        _end_refused_calls(parts, why)

    def _role_of(self, identity: str) -> str:
        return self.config.auth.role_of(identity)  # the live config: no restart for roles

    def _count_reload(self, new: Config | None) -> None:
        self.metrics.config_reloaded(new is not None)

    # -- background tasks: owned, named, cancelled and awaited at shutdown

    def _own(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", task=task.get_name(), error=repr(task.exception()))

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _flush_loop(self, store: BatchStore) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                store.retry_pending()
                await asyncio.to_thread(store.sync)
            except Exception:  # the group commit must go on
                log.exception("journal_flush_failed")

    async def _sweep_loop(self, core: BatchService) -> None:
        while True:
            max_age = self.config.retention.max_age
            try:
                await core.sweep(max_age)
            except Exception:  # retention must go on
                log.exception("retention_sweep_failed")
            await asyncio.sleep(min(SWEEP_INTERVAL, max(0.1, max_age / 10)))

    async def _watch_crl(self, parts: Parts) -> None:
        # Calls look at the CRL themselves; open ones are checked here once it changed.
        while True:
            await asyncio.sleep(CRL_INTERVAL)
            if parts.revocations.refresh():
                _end_refused_calls(parts, "crl changed")


def _listen(cfg: Config, interceptor: Interceptor, tls: TlsFiles) -> tuple[aio.Server, int]:
    """The gRPC server bound to server.listen, and its port (OSError when it cannot bind)."""
    server = aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.keepalive_time_ms", int(cfg.server.keepalive_interval * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Our clients ping every 30 s; one pinging more than every 5 s gets GOAWAY.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            # On by default: a second server on the port would share it, not fail.
            ("grpc.so_reuseport", 0),
        ],
    )
    try:
        port = server.add_secure_port(cfg.server.listen, tls.credentials())
    except RuntimeError:  # grpcio's "Failed to bind": in use, or not an address of ours
        port = 0
    if port == 0:
        raise OSError(
            f"cannot listen on {cfg.server.listen}: gRPC could not bind it (the port is "
            "in use, or the address is not one of this host's)"
        )
    return server, port


def _add_services(
    server: aio.Server, service: JobWorkerService, health_servicer: health_aio.HealthServicer
) -> None:
    # generated without type hints (protoc's grpc plugin writes no .pyi for it)
    pb_grpc.add_JobWorkerServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )


def _end_refused_calls(parts: Parts, why: str) -> None:
    """End the open calls (followers, uploads) whose identity lost its right to them."""
    if ended := parts.identities.recheck():
        log.info("open_calls_ended", trigger=why, count=ended)


def _owner_lookup(store: BatchStore) -> Callable[[jwlogging.EventDict], None]:
    def add_owner(event: jwlogging.EventDict) -> None:
        """Lines about a batch name the identity it belongs to."""
        cid = event.get("correlation_id")
        if cid and "identity" not in event:
            with contextlib.suppress(NotFound):
                event["identity"] = store.get(str(cid)).owner

    return add_owner


def _warn_root_jobs(keys: list[str]) -> None:
    """At start, and at a reload that changes them: the config keys that run jobs as root."""
    if keys:
        log.warning(
            "jobs_run_as_root",
            keys=keys,
            message="jobs of these identities run as root: they can read the server's keys "
            "and every batch on disk, and leave their cgroups",
        )
