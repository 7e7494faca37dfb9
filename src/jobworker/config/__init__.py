"""The config file: TOML in, a validated frozen Config out; a reload is load, validate, swap.

`sections` holds the models, `fields` their value types, `loading` reads a file, `messages`
says what is wrong with one, and `reload` says which keys take effect without a restart."""

from jobworker.config.loading import load_config, parse_config
from jobworker.config.reloadable import RELOADABLE, changed_keys, is_reloadable, restart_needed
from jobworker.config.sections import (
    AuthConfig,
    Config,
    DefaultLimits,
    ExecutorsConfig,
    JobsConfig,
    LoggingConfig,
    MetricsConfig,
    RayExecutorConfig,
    RetentionConfig,
    Role,
    ServerConfig,
    TlsConfig,
)
from jobworker.errors import ConfigError

__all__ = [
    "RELOADABLE",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DefaultLimits",
    "ExecutorsConfig",
    "JobsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "RayExecutorConfig",
    "RetentionConfig",
    "Role",
    "ServerConfig",
    "TlsConfig",
    "changed_keys",
    "is_reloadable",
    "load_config",
    "parse_config",
    "restart_needed",
]
