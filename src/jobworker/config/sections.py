"""The config's sections, [server] to [executors], and the whole Config they make."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from jobworker.config.fields import (
    LISTEN_HELP,
    AbsolutePathText,
    CgroupName,
    ConfigPath,
    Duration,
    Listen,
    MetricsListen,
    OptionalPath,
    Section,
    Size,
    UnixUser,
    duration_setting,
    int_setting,
    setting,
    size_setting,
)
from jobworker.model import LIMIT_FIELDS, Limits

Role = Literal["admin", "user", "viewer", "none"]  # model.ROLES, spelled out for typing (tested)

_MiB = 1 << 20
_MAX_MESSAGE_BYTES = 3 * _MiB  # what fits in one gRPC message (4 MiB) with room to spare


class ServerConfig(Section):
    """[server]: where the server listens and keeps its files; restart to change."""

    listen: Listen = setting("127.0.0.1:50051", LISTEN_HELP)
    data_dir: ConfigPath = setting(Path("var/data"), "a non-empty path")
    shutdown_grace: Duration = duration_setting("10s")
    keepalive_interval: Duration = duration_setting("30s", at_least="1s")
    max_streams: int = int_setting(1000, 1, 1_000_000)
    max_streams_per_identity: int = int_setting(0, 0, 1_000_000)  # 0: only max_streams
    max_uploads_per_identity: int = int_setting(4, 1, 10_000)
    upload_timeout: Duration = duration_setting("5m", positive=True)
    cgroup_root: CgroupName = setting("jobworker", 'a folder name (no "/"), such as "jobworker"')


class TlsConfig(Section):
    """[tls]: PEM files; re-read when they or the config change."""

    ca_cert: ConfigPath = setting(Path("var/certs/ca.pem"), "a non-empty path")
    server_cert: ConfigPath = setting(Path("var/certs/server.pem"), "a non-empty path")
    server_key: ConfigPath = setting(Path("var/certs/server-key.pem"), "a non-empty path")
    crl: OptionalPath = setting(None, '"" (none) or a path')


class MetricsConfig(Section):
    """[metrics]: the Prometheus endpoint; "" turns it off."""

    listen: MetricsListen = setting("127.0.0.1:9464", f'"" (off) or {LISTEN_HELP}')


class LoggingConfig(Section):
    """[logging]: level is reloadable, format is not."""

    level: Literal["debug", "info", "warning", "error"] = setting(
        "info", '"debug", "info", "warning" or "error"'
    )
    format: Literal["json", "console"] = setting("json", '"json" or "console"')


class DefaultLimits(Section):
    """[jobs.default_limits]: limits of a job that sets none; 0 means no limit."""

    cpu_millis: int = int_setting(0, 0, 1_000_000_000)
    memory_bytes: Size = size_setting(0, 0)
    pids_max: int = int_setting(4096, 0, 1_000_000_000)
    io_read_bytes_per_second: Size = size_setting(0, 0)
    io_write_bytes_per_second: Size = size_setting(0, 0)

    def to_limits(self) -> Limits:
        """These defaults as the domain model's Limits."""
        return Limits(**{f: getattr(self, f) for f in LIMIT_FIELDS})


class JobsConfig(Section):
    """[jobs]: scheduling and per-job limits; reloadable."""

    max_concurrent: int = int_setting(8, 1, 10_000)
    default_timeout: Duration = duration_setting("1h", positive=True)
    kill_grace: Duration = duration_setting("5s")
    max_jobs_per_batch: int = int_setting(10_000, 1, 1_000_000)
    log_tail_bytes: Size = size_setting("64KiB", 0, _MAX_MESSAGE_BYTES)
    default_limits: DefaultLimits = Field(default_factory=DefaultLimits)
    max_stdin_bytes: Size = size_setting("1MiB", 0, _MAX_MESSAGE_BYTES)
    max_argv_bytes: Size = size_setting("128KiB", 1, _MAX_MESSAGE_BYTES)
    max_batch_bytes: Size = size_setting("64MiB", 1)
    max_queued_jobs: int = int_setting(100_000, 1, 100_000_000)
    max_queued_jobs_per_identity: int = int_setting(0, 0, 100_000_000)  # 0: only max_queued_jobs
    max_running_per_identity: int = int_setting(0, 0, 10_000)  # 0: only max_concurrent
    fair_share: bool = setting(True, "true or false")
    # "keep": running jobs go on when the server stops or dies (contract 6.3).
    on_server_stop: Literal["keep", "stop"] = setting("keep", '"keep" or "stop"')
    max_log_bytes: Size = size_setting("1GiB", 0)
    max_args: int = int_setting(10_000, 1, 1_000_000)
    working_dir: AbsolutePathText = setting("/", 'an absolute path, such as "/" or "/tmp"')
    min_free_disk: Size = size_setting("64MiB", 0)
    run_as: UnixUser = setting(
        "", 'a Unix user of this host, or "" ("nobody" when the server is root, else its own)'
    )
    run_as_identity: dict[str, UnixUser] = setting({}, "a Unix user of this host")

    def unix_user_for(self, identity: str) -> str:
        """The Unix user the jobs of `identity` run as ("": the server's own). Unset or "",
        that is "nobody" when the server is root: root only where the config says "root"."""
        user = self.run_as_identity.get(identity) or self.run_as
        if user:
            return user
        return "nobody" if os.geteuid() == 0 else ""

    def root_keys(self) -> list[str]:
        """The keys that let jobs run as root (for the server's warning), in config order."""
        if os.geteuid() != 0:
            return []
        keys = ["jobs.run_as"] if self.run_as == "root" else []
        return keys + [
            f"jobs.run_as_identity.{name}"
            for name, user in self.run_as_identity.items()
            if user == "root"
        ]


class AuthConfig(Section):
    """[auth]: roles by identity (the client certificate's common name); reloadable."""

    default_role: Literal["user", "none"] = setting("user", '"user" or "none"')
    roles: dict[str, Role] = setting({}, 'a role: "admin", "user", "viewer" or "none"')

    def role_of(self, identity: str) -> Role:
        """The role of `identity`: its own entry, else the default role."""
        return self.roles.get(identity, self.default_role)


class RetentionConfig(Section):
    """[retention]: how long ended batches are kept; reloadable."""

    max_age: Duration = duration_setting("7d", positive=True)


class RayExecutorConfig(Section):
    """[executors.NAME] with kind = "ray": jobs run as Ray tasks on an existing cluster."""

    kind: Literal["ray"] = setting("ray", '"ray"')
    address: Listen = setting("127.0.0.1:6379", "the cluster's GCS address, host:port")
    cpus_per_job: float = setting(1.0, "a number of CPUs above 0", gt=0)
    token_file: OptionalPath = setting(None, '"" (Ray\'s own, ~/.ray/auth_token) or a path')


class ExecutorsConfig(Section):
    """[executors]: `default` and one table per named executor; restart to change."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, RayExecutorConfig] = Field(init=False)  # the named tables
    default: str = setting("local", '"local" or the name of an [executors.NAME] table')

    @model_validator(mode="after")
    def _known_default(self) -> ExecutorsConfig:
        named = self.named()
        if "local" in named:
            raise ValueError('"local" is the built-in executor: name the table otherwise')
        if self.default != "local" and self.default not in named:
            raise ValueError(f"default = {self.default!r} names no [executors.NAME] table")
        return self

    def named(self) -> dict[str, RayExecutorConfig]:
        """The [executors.NAME] tables by name."""
        return dict(self.__pydantic_extra__ or {})


class Config(Section):
    """The whole config; `source` is the file it came from and takes no part in ==."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    executors: ExecutorsConfig = Field(default_factory=ExecutorsConfig)
    source: Path | None = Field(default=None, exclude=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in SECTIONS)

    __hash__ = None  # type: ignore[assignment]  # roles is a dict; a Config is compared, not hashed


SECTIONS: tuple[str, ...] = tuple(name for name in Config.model_fields if name != "source")
