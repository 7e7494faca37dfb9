"""The server process: wiring, TLS, health, signals, live reload and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import signal
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc import aio
from grpc_health.v1 import _async as health_aio  # health.aio; grpc_health-stubs lack it
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jobworker import __version__, certs
from jobworker import logging as jwlogging
from jobworker.config import Config, changed_keys, is_reloadable, load_config, restart_needed
from jobworker.engine.core import JobWorker
from jobworker.engine.scheduler import Engine
from jobworker.errors import ConfigError, NotFound
from jobworker.metrics import Metrics
from jobworker.server.auth import AuthInterceptor
from jobworker.server.identity import Revocations
from jobworker.server.service import JobWorkerService, Settings
from jobworker.store.batches import BatchStore
from jobworker.store.inotify import Inotify
from jobworker.supervisor.client import LocalExecutor
from jobworker.v1 import jobworker_pb2 as pb

log = structlog.get_logger("jobworker.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobWorkerService"].full_name
FLUSH_INTERVAL = 0.2  # journal group commit: a power cut loses at most this much
CRL_INTERVAL = 1.0  # how often tls.crl is looked at: open calls of a revoked cert end by then
SWEEP_INTERVAL = 60.0  # at most; a short retention.max_age is swept a tenth as often
_LEVEL_ORDER = ["debug", "info", "warning", "error"]


class TlsFiles:
    """Server credentials re-read from their files when they change (no restart)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._stamp = self._mtimes()
        try:
            self.initial = self._load()
        except certs.CertsError as exc:
            raise ConfigError(f"[tls]: {exc}") from None

    def _paths(self) -> tuple[Path, Path, Path]:
        t = self.config.tls
        return t.server_key, t.server_cert, t.ca_cert

    def _mtimes(self) -> tuple[tuple[str, int, int, int], ...]:
        # Path and inode too: files copied with their mtimes (cp -p) still count as new.
        stamps = []
        for path in self._paths():
            st = path.stat()
            stamps.append((str(path), st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def _load(self) -> Any:
        key_path, cert_path, ca_path = self._paths()
        cert, key = certs.read_pair(cert_path, key_path)  # refuses a key of another cert
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=ca_path.read_bytes()
        )

    def fetch(self) -> Any:
        """Called by gRPC at each new handshake: a new configuration, or None to keep it."""
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return None
            new = self._load()
        except (OSError, certs.CertsError) as exc:
            # A rotation half done (new cert, old key) or a file missing: keep serving with
            # what we have and look again at the next handshake.
            log.warning("tls_reload_failed", error=str(exc))
            return None
        self._stamp = stamp
        log.info("tls_reloaded", **describe_cert(self.config.tls.server_cert))
        return new

    def credentials(self) -> grpc.ServerCredentials:
        """Dynamic credentials that require a client certificate from our CA."""
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=True
        )


def describe_cert(path: Path) -> dict[str, Any]:
    """What an operator wants to see of a certificate in a log line."""
    try:
        info = certs.describe(path)
    except (OSError, ValueError, certs.CertsError) as exc:
        return {"server_cert": str(path), "error": str(exc)}
    return {"server_cert": str(path), "serial": info["serial"], "not_after": info["not_after"]}


def check_tls(config: Config) -> None:
    """ConfigError unless the [tls] files can be read and the key matches the certificate."""
    t = config.tls
    try:
        certs.read_pair(t.server_cert, t.server_key)
        t.ca_cert.read_bytes()
    except (OSError, certs.CertsError) as exc:
        raise ConfigError(f"{config.source}: [tls]: {exc}") from None


def applicable(running: Config, new: Config) -> Config:
    """`new`, with each key that needs a restart kept as the running server has it."""

    def merge(old: Any, value: Any, loc: tuple[str, ...]) -> Any:
        if loc and is_reloadable(".".join(loc)):
            return value
        if isinstance(old, dict) and isinstance(value, dict) and old.keys() == value.keys():
            return {k: merge(old[k], value[k], (*loc, k)) for k in value}
        return old

    merged = merge(running.model_dump(), new.model_dump(), ())
    return Config.model_validate(merged).model_copy(update={"source": new.source})


class App:
    """One jobworker server."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.closing = False
        self.port = 0
        self.metrics_address = ""
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        self._data_lock: int | None = None  # fd of data_dir/server.lock while serving
        self.metrics = Metrics()
        self._file_stamp = self._config_stamp()  # the config file as last read
        # Called after each reload with the config applied, or None when it failed.
        self.observers: list[Callable[[Config | None], None]] = [self._count_reload]
        _warn_root_jobs(config.jobs.root_keys())

    # -- the live config, as the parts read it

    def role_of(self, identity: str) -> str:
        """The role the current config gives `identity`."""
        return self.config.auth.role_of(identity)

    def settings(self) -> Settings:
        """What the servicer reads at each call."""
        return Settings(self.config.jobs, self.config.server)

    # -- life cycle

    async def start(self) -> None:
        """Load the store, recover, and start serving; logs one line when ready."""
        cfg = self.config
        # Unreadable or mismatched certificates stop the start before any job is recovered.
        self.tls = TlsFiles(cfg)
        self.revocations = Revocations(cfg.tls.crl, cfg.tls.ca_cert)
        self.auth = AuthInterceptor(self.role_of, [self.metrics.observe_rpc], self.revocations)
        data_dir = cfg.server.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._data_lock = lock_data_dir(data_dir)
        # Listen before anything else: a port in use stops the start before recovery, which
        # would start queued jobs only for the failed start to stop them and record them LOST.
        self.server = self._listen(cfg)
        if cfg.metrics.listen:
            # Before server_ready: whoever waits for that line can scrape at once.
            try:
                self.metrics_address = self.metrics.serve(cfg.metrics.listen)
            except OSError as exc:
                raise OSError(f"cannot serve metrics on {cfg.metrics.listen}: {exc}") from exc
            log.info("metrics_ready", address=self.metrics_address, path="/metrics")
        self.store = BatchStore(data_dir, min_free_disk=cfg.jobs.min_free_disk)
        jwlogging.set_enricher(self._add_owner)
        batches = self.store.load()
        local = LocalExecutor(
            data_dir,
            cfg.server.cgroup_root,
            lambda: self.config.jobs.working_dir,
            log_level=cfg.logging.level,
            log_format=cfg.logging.format,
        )
        await local.open()
        # The metrics listen from the first event: recovery ends jobs LOST and starts others.
        self.engine = Engine(
            self.store, {local.name: local}, cfg.jobs, listeners=[self.metrics.on_job_event]
        )
        self.metrics.watch(
            queued=lambda: self.engine.queued,
            running=lambda: self.engine.running,
            batches=lambda: len(self.store),
            max_concurrent=lambda: self.config.jobs.max_concurrent,
        )
        self.core = JobWorker(self.store, self.engine)
        for batch in batches:
            if not batch.ended:  # folders for the jobs still to run, as at scheduling
                self.store.make_folders(batch)
        await self.engine.recover(batches)
        self.inotify = Inotify()

        self.service = JobWorkerService(
            self.core,
            self.settings,
            self.inotify,
            lambda: self.closing,
            on_stream=self.metrics.on_stream,
        )
        from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

        # generated without type hints (protoc's grpc plugin writes no .pyi for it)
        pb_grpc.add_JobWorkerServiceServicer_to_server(self.service, self.server)  # type: ignore[no-untyped-call]
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._own(self._flush_loop(), "journal flush")
        self._own(self._sweep_loop(), "retention sweep")
        self._own(self._watch_config(), "config watch")
        self._own(self._watch_crl(), "crl watch")
        # One turn of the loop: the watch task sets up its inotify watch in its first step, so
        # a change made as soon as server_ready is logged is seen.
        await asyncio.sleep(0)
        host = cfg.server.listen.rsplit(":", 1)[0]
        log.info(
            "server_ready",
            address=f"{host}:{self.port}",
            version=__version__,
            data_dir=str(data_dir),
            batches=len(self.store),
            config=str(cfg.source) if cfg.source else None,
            pid=os.getpid(),
        )
        jwlogging.flush()  # at once, not with the next info lines: tools wait for this one

    def _listen(self, cfg: Config) -> aio.Server:
        """The gRPC server, bound to server.listen (OSError when it cannot be)."""
        keepalive_ms = int(cfg.server.keepalive_interval * 1000)
        server = aio.server(
            interceptors=[self.auth],
            options=[
                ("grpc.keepalive_time_ms", keepalive_ms),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # A client may ping every 5 s on a quiet call (ours ping every 30 s, client.py);
                # one that pings more often is told GOAWAY after 2 strikes, not served for ever.
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                # gRPC sets SO_REUSEPORT by default: a second server on the same port would
                # start and share its connections. It must fail to listen instead.
                ("grpc.so_reuseport", 0),
            ],
        )
        try:
            self.port = server.add_secure_port(cfg.server.listen, self.tls.credentials())
        except RuntimeError:  # grpcio's "Failed to bind": in use, or not an address of ours
            self.port = 0
        if self.port == 0:
            raise OSError(
                f"cannot listen on {cfg.server.listen}: gRPC could not bind it (the port is "
                "in use, or the address is not one of this host's)"
            )
        return server

    async def run(self, *, signals: bool = True) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads the config.

        `signals`: install the handlers on this loop (it must run on the main thread);
        else the caller delivers them with on_signal() (serve() does, from the main thread).
        """
        loop = asyncio.get_running_loop()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            # The handlers stay while draining: a second SIGTERM (an impatient operator)
            # must not kill the server with its jobs half stopped.
            await self.shutdown()
            if signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)

    def on_signal(self, sig: int) -> None:
        """SIGHUP reloads; SIGTERM and SIGINT stop. Call on the loop's thread."""
        if sig != signal.SIGHUP:
            self._stop.set()
        elif not self.closing:
            self._own(self.reload("SIGHUP"), "reload")

    def stop(self) -> None:
        """Ask run() to shut down."""
        self._stop.set()

    async def shutdown(self) -> None:
        """Drain: refuse new work, end streams UNAVAILABLE, stop jobs, flush, close.

        Also after a start() that failed half way: whatever it had made is stopped, so
        jobs that recovery had started are not left running without a supervisor."""
        log.info("server_draining")
        self.closing = True
        health = getattr(self, "health", None)
        if health is not None:
            for name in ("", SERVICE_NAME):
                await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        store: BatchStore | None = getattr(self, "store", None)
        for batch in store or ():
            batch.changed.notify()  # followers see `closing` and end with UNAVAILABLE
        grace = self.config.server.shutdown_grace
        stopping = []
        if (engine := getattr(self, "engine", None)) is not None:
            stop_jobs = self.config.jobs.on_server_stop == "stop"
            kill_grace = min(self.config.jobs.kill_grace, grace)
            stopping.append(engine.shutdown(kill_grace, stop_jobs=stop_jobs))
        if (server := getattr(self, "server", None)) is not None:
            stopping.append(server.stop(grace))
        await asyncio.gather(*stopping)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if store is not None:
            store.close()
        if (inotify := getattr(self, "inotify", None)) is not None:
            inotify.close()
        await asyncio.to_thread(self.metrics.close)  # last: a final scrape sees the end
        if self._data_lock is not None:
            os.close(self._data_lock)  # another server may use the data_dir from now on
            self._data_lock = None
        jwlogging.set_enricher(None)
        log.info("server_stopped")

    # -- reload

    async def reload(self, why: str) -> bool:
        """Load the config file again; a bad file changes nothing. True when applied."""
        async with self._reload_lock:
            path = self.config.source
            if path is None:
                log.info("config_reload_skipped", reason="no config file", trigger=why)
                return False
            running = self.config
            self._file_stamp = self._config_stamp()  # before reading: a later edit is seen
            try:
                new = await asyncio.to_thread(load_config, path)
                if new.tls != running.tls:
                    await asyncio.to_thread(check_tls, new)
            except ConfigError as exc:
                # The message names the file, each bad key, its line and what is allowed;
                # a stack would add nothing an operator can use.
                log.error("config_reload_failed", trigger=why, config=str(path), error=str(exc))
                self._notify(None)
                return False
            # Keys that need a restart keep their running values (and are named each time,
            # until a restart applies them): what runs is what the config object says.
            pending = restart_needed(running, new)
            applied = applicable(running, new)
            changed = changed_keys(running, applied)
            self.config = applied
            self.tls.config = applied
            self.store.min_free_disk = applied.jobs.min_free_disk
            self.engine.update_settings(applied.jobs)
            self.revocations.configure(applied.tls.crl, applied.tls.ca_cert)
            levels = sorted((running.logging.level, applied.logging.level), key=_LEVEL_ORDER.index)
            jwlogging.set_level(levels[0])  # the more verbose: this line shows under either
            log.info("config_reloaded", trigger=why, config=str(path), changed=changed)
            jwlogging.set_level(applied.logging.level)
            if applied.jobs.root_keys() != running.jobs.root_keys():
                _warn_root_jobs(applied.jobs.root_keys())
            if pending:
                log.warning(
                    "config_restart_needed",
                    keys=pending,
                    message="these keys take effect only after a restart; "
                    "the server runs with their old values",
                )
            self._end_refused_calls(why)
            self._notify(applied)
            return True

    def _end_refused_calls(self, why: str) -> None:
        """End the open calls (followers, uploads) whose identity lost its right to them."""
        if ended := self.auth.recheck():
            log.info("open_calls_ended", trigger=why, count=ended)

    def _config_stamp(self) -> tuple[int, int, int] | None:
        # lstat: a symlinked config changes when the link does (or on SIGHUP), the same
        # as the folder watch sees it.
        path = self.config.source
        try:
            st = os.lstat(path) if path is not None else None
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size) if st else None

    def _notify(self, new: Config | None) -> None:
        for observe in self.observers:
            observe(new)

    def _count_reload(self, new: Config | None) -> None:
        self.metrics.config_reloaded(new is not None)

    def _add_owner(self, event: jwlogging.EventDict) -> None:
        """Lines about a batch name the identity it belongs to (the caller who scheduled it)."""
        cid = event.get("correlation_id")
        if not cid or "identity" in event:
            return
        try:
            event["identity"] = self.store.get(str(cid)).owner
        except NotFound:
            return

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
            try:
                self.store.retry_pending()
                await asyncio.to_thread(self.store.sync)
            except Exception:  # the group commit must go on
                log.exception("journal_flush_failed")

    async def _sweep_loop(self) -> None:
        while True:
            max_age = self.config.retention.max_age
            try:
                await self.core.sweep(max_age)
            except Exception:  # retention must go on
                log.exception("retention_sweep_failed")
            await asyncio.sleep(min(SWEEP_INTERVAL, max(0.1, max_age / 10)))

    async def _watch_crl(self) -> None:
        # Calls look at the CRL themselves; open ones are checked here once it changed.
        while True:
            await asyncio.sleep(CRL_INTERVAL)
            if self.revocations.refresh():
                self._end_refused_calls("crl changed")

    async def _watch_config(self) -> None:
        path = self.config.source
        if path is None:
            return
        import watchfiles

        # Watch the folder, not the file: editors replace a file by rename, which a watch
        # on the file loses. Not recursive: data_dir may well live below the config's folder.
        # Every few seconds without events, compare the file with what was last read: an
        # event lost (a full inotify queue, a network file system) is caught up.
        async for changes in watchfiles.awatch(
            path.parent,
            watch_filter=lambda _kind, changed: Path(changed) == path,
            debounce=200,
            step=50,
            recursive=False,
            rust_timeout=5_000,
            yield_on_timeout=True,
        ):
            if changes or self._config_stamp() != self._file_stamp:
                await self.reload("file changed")


DATA_DIR_LOCK = "server.lock"


def lock_data_dir(data_dir: Path) -> int:
    """Hold `data_dir`/server.lock (an flock) for as long as this server runs; its fd.

    Two servers on one data_dir would both run its queued jobs and write its journals. The
    lock goes with the process, even on kill -9, so a crash never leaves it stale. OSError
    naming the other server's pid when it holds the lock.
    """
    path = data_dir / DATA_DIR_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OSError(
            f"data_dir {data_dir} is in use by another jobworker server (pid {holder}); "
            "each server needs a data_dir of its own"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def serve(config_path: Path | None) -> None:
    """Run a server in the foreground until SIGTERM or SIGINT (the `serve` command).

    The event loop runs on a thread of its own ("jobworker-loop"); the main thread only
    waits and hands signals over. The loop's thread forks jobs, and moves for that moment
    into a job's cgroup v1 groups (engine/spawn.py): cgroup v1 charges the memory of the
    whole process to the memory group of its main thread, which must therefore never move.
    """
    config = load_config(config_path)
    jwlogging.setup(config.logging.level, config.logging.format)
    app = App(config)
    loop = asyncio.new_event_loop()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with asyncio.Runner(loop_factory=lambda: loop) as runner:
                runner.run(app.run(signals=False))
        except BaseException as exc:  # noqa: BLE001 - raised again on the main thread
            failure.append(exc)
        finally:
            jwlogging.flush()  # lines held back: the loop that would write them is ending

    def deliver(sig: int, _frame: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server has ended
            loop.call_soon_threadsafe(app.on_signal, sig)

    # The kernel may hand a signal to any thread; CPython then runs the handler on the main
    # thread, but only once that thread wakes up. A wake-up fd makes sure it does: the main
    # thread sleeps in select() on it, not in a join() nothing would interrupt.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, deliver)

    finished = threading.Event()

    def run_then_wake() -> None:
        try:
            run()
        finally:
            finished.set()
            with contextlib.suppress(BlockingIOError):  # full: the main thread wakes anyway
                os.write(wake_w, b"\0")

    thread = threading.Thread(target=run_then_wake, name="jobworker-loop")
    try:
        thread.start()
        while not finished.is_set():
            select.select([wake_r], [], [])
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)  # handlers run as the main thread comes back here
        thread.join()
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
    if failure:
        raise failure[0]


def _warn_root_jobs(keys: list[str]) -> None:
    """At start, and at a reload that changes them: the config keys that run jobs as root."""
    if keys:
        log.warning(
            "jobs_run_as_root",
            keys=keys,
            message="jobs of these identities run as root: they can read the server's keys "
            "and every batch on disk, and leave their cgroups",
        )
