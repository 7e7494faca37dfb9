"""The server process: wiring, TLS, health, signals, live reload and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jobworker import __version__
from jobworker import logging as jwlogging
from jobworker.config import Config, changed_keys, load_config, restart_needed
from jobworker.engine.core import JobWorker
from jobworker.engine.limits import CgroupBackend
from jobworker.engine.process import Supervisor
from jobworker.engine.scheduler import Engine
from jobworker.errors import ConfigError
from jobworker.server.auth import AuthInterceptor
from jobworker.server.service import JobWorkerService, Settings
from jobworker.store.batches import BatchStore
from jobworker.store.inotify import Inotify
from jobworker.v1 import jobworker_pb2 as pb

log = structlog.get_logger("jobworker.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobWorkerService"].full_name
FLUSH_INTERVAL = 0.2  # journal group commit: a power cut loses at most this much
SWEEP_INTERVAL = 60.0


class TlsFiles:
    """Server credentials re-read from their files when they change (no restart)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._stamp = self._mtimes()
        self.initial = self._load()

    def _paths(self) -> tuple[Path, Path, Path]:
        t = self.config.tls
        return t.server_key, t.server_cert, t.ca_cert

    def _mtimes(self) -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in self._paths())

    def _load(self) -> Any:
        key, cert, ca = (p.read_bytes() for p in self._paths())
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> Any:
        """Called by gRPC at each new handshake: a new configuration, or None to keep it."""
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return None
            new = self._load()
        except OSError as exc:  # a file mid-rotation: keep serving with what we have
            log.warning("tls_reload_failed", error=str(exc))
            return None
        self._stamp = stamp
        log.info("tls_reloaded", server_cert=str(self.config.tls.server_cert))
        return new

    def credentials(self) -> grpc.ServerCredentials:
        """Dynamic credentials that require a client certificate from our CA."""
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=True
        )


class App:
    """One jobworker server."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.closing = False
        self.port = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        self.observers: list[Callable[[Config], None]] = []

    # -- the live config, as the parts read it

    def role_of(self, identity: str) -> str:
        """The role the current config gives `identity`."""
        auth = self.config.auth
        return auth.roles.get(identity, auth.default_role)

    def settings(self) -> Settings:
        """What the servicer reads at each call."""
        return Settings(self.config.jobs, self.config.server.max_streams)

    # -- life cycle

    async def start(self) -> None:
        """Load the store, recover, and start serving; logs one line when ready."""
        cfg = self.config
        data_dir = cfg.server.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = BatchStore(data_dir, min_free_disk=cfg.jobs.min_free_disk)
        batches = self.store.load()
        backend = CgroupBackend.detect()
        log.info("limits_backend", backend=backend.name, detail=backend.describe())
        self.supervisor = Supervisor(backend, default_working_dir=cfg.jobs.working_dir)
        self.engine = Engine(self.store, self.supervisor, cfg.jobs)
        self.core = JobWorker(self.store, self.engine)
        await self.engine.recover(batches)
        self.inotify = Inotify()

        self.tls = TlsFiles(cfg)
        keepalive_ms = int(cfg.server.keepalive_interval * 1000)
        self.server = aio.server(
            interceptors=[AuthInterceptor(self.role_of)],
            options=[
                ("grpc.keepalive_time_ms", keepalive_ms),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ],
        )
        self.service = JobWorkerService(
            self.core, self.settings, self.inotify, lambda: self.closing
        )
        from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

        pb_grpc.add_JobWorkerServiceServicer_to_server(self.service, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_secure_port(cfg.server.listen, self.tls.credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.server.listen}")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._own(self._flush_loop(), "journal flush")
        self._own(self._sweep_loop(), "retention sweep")
        self._own(self._watch_config(), "config watch")
        host = cfg.server.listen.rsplit(":", 1)[0]
        log.info(
            "server_ready",
            address=f"{host}:{self.port}",
            version=__version__,
            data_dir=str(data_dir),
            batches=len(self.store),
            pid=os.getpid(),
        )

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads the config."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._own(self.reload("SIGHUP"), "reload"))
        await self.start()
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.shutdown()

    def stop(self) -> None:
        """Ask run() to shut down."""
        self._stop.set()

    async def shutdown(self) -> None:
        """Drain: refuse new work, end streams UNAVAILABLE, stop jobs, flush, close."""
        log.info("server_draining")
        self.closing = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        for batch in self.store:
            batch.changed.notify()  # followers see `closing` and end with UNAVAILABLE
        grace = self.config.server.shutdown_grace
        await asyncio.gather(
            self.engine.shutdown(min(self.config.jobs.kill_grace, grace)),
            self.server.stop(grace),
        )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.store.close()
        self.inotify.close()
        log.info("server_stopped")

    # -- reload

    async def reload(self, why: str) -> bool:
        """Load the config file again; a bad file changes nothing. True when applied."""
        async with self._reload_lock:
            path = self.config.source
            if path is None:
                log.info("config_reload_skipped", reason="no config file", trigger=why)
                return False
            try:
                new = await asyncio.to_thread(load_config, path)
            except ConfigError as exc:
                log.error("config_reload_failed", trigger=why, error=str(exc))
                self._notify(None)
                return False
            old = self.config
            changed = changed_keys(old, new)
            needs_restart = restart_needed(old, new)
            self.config = new
            self.tls.config = new
            if (old.logging.level, old.logging.format) != (new.logging.level, new.logging.format):
                jwlogging.set_level(new.logging.level, old.logging.format)
            self.store.min_free_disk = new.jobs.min_free_disk
            self.engine.update_settings(new.jobs)
            log.info("config_reloaded", trigger=why, changed=changed)
            if needs_restart:
                log.warning("config_restart_needed", keys=needs_restart)
            self._notify(new)
            return True

    def _notify(self, new: Config | None) -> None:
        for observe in self.observers:
            observe(new)  # type: ignore[arg-type]

    # -- background tasks

    def _own(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        if task in self._tasks and task.done():
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", task=task.get_name(), error=repr(task.exception()))

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await asyncio.to_thread(self.store.flush)

    async def _sweep_loop(self) -> None:
        while True:
            self.core.sweep(self.config.retention.max_age)
            await asyncio.sleep(SWEEP_INTERVAL)

    async def _watch_config(self) -> None:
        path = self.config.source
        if path is None:
            return
        import watchfiles

        # Watch the folder: editors replace the file by rename, which a file watch loses.
        async for changes in watchfiles.awatch(path.parent, debounce=200, step=50):
            if any(Path(p) == path for _kind, p in changes):
                await self.reload("file changed")


def serve(config_path: Path | None) -> None:
    """Run a server in the foreground until SIGTERM or SIGINT (the `serve` command)."""
    config = load_config(config_path)
    jwlogging.setup(config.logging.level, config.logging.format)
    app = App(config)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(app.run())
