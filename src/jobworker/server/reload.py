"""Live reload: the config file (on change or SIGHUP) and the TLS files (at handshakes)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import structlog

from jobworker import certs
from jobworker import logging as jwlogging
from jobworker.config import Config, changed_keys, is_reloadable, load_config, restart_needed
from jobworker.errors import ConfigError

log = structlog.get_logger("jobworker.server")

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
            # A rotation half done (new cert, old key): keep serving, look again next time.
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


Apply = Callable[[Config, Config, str], None]  # (running, applied, trigger)


class Reloader:
    """Holds the live config; reload() swaps in the file's, keys needing a restart kept."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = asyncio.Lock()
        self._file_stamp = self._config_stamp()  # the file as last read
        # Called after each reload with the config applied, or None when it failed.
        self.observers: list[Callable[[Config | None], None]] = []
        self.apply: Apply | None = None  # hands an applied config to the running parts

    async def reload(self, why: str) -> bool:
        """Load the config file again; a bad file changes nothing. True when applied."""
        async with self._lock:
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
                # The message names the file, each bad key and its line: no stack.
                log.error("config_reload_failed", trigger=why, config=str(path), error=str(exc))
                self._notify(None)
                return False
            pending = restart_needed(running, new)
            applied = self.config = applicable(running, new)
            levels = sorted((running.logging.level, applied.logging.level), key=_LEVEL_ORDER.index)
            jwlogging.set_level(levels[0])  # the more verbose: this line shows under either
            changed = changed_keys(running, applied)
            log.info("config_reloaded", trigger=why, config=str(path), changed=changed)
            jwlogging.set_level(applied.logging.level)
            if pending:  # named at each reload until a restart applies them
                log.warning(
                    "config_restart_needed",
                    keys=pending,
                    message="these keys take effect only after a restart; "
                    "the server runs with their old values",
                )
            if self.apply is not None:
                self.apply(running, applied, why)
            self._notify(applied)
            return True

    def _config_stamp(self) -> tuple[int, int, int] | None:
        # lstat: a symlinked config changes when the link does, as the folder watch sees it.
        path = self.config.source
        try:
            st = os.lstat(path) if path is not None else None
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size) if st else None

    def _notify(self, new: Config | None) -> None:
        for observe in self.observers:
            observe(new)

    async def watch(self) -> None:
        """Reload whenever the config file changes, until cancelled."""
        path = self.config.source
        if path is None:
            return
        import watchfiles

        # The folder, not the file: editors replace a file by rename. Not recursive:
        # data_dir may live below it. A timeout compares stamps: lost events are caught up.
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
