"""The config file: defaults, the committed file, error messages, paths and reloads."""

from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest
from pydantic import BaseModel

from jobworker.config import (
    RELOADABLE,
    Config,
    DefaultLimits,
    JobsConfig,
    changed_keys,
    is_reloadable,
    load_config,
    parse_config,
    restart_needed,
)
from jobworker.config.messages import key_lines
from jobworker.errors import ConfigError
from jobworker.model import Limits

REPO = Path(__file__).resolve().parents[2]

# Section 3 of the contract, verbatim but for what section 6.2 adds and changes
# (pids_max): the built-in defaults must be exactly these.
CONTRACT_TOML = """\
[server]
listen = "127.0.0.1:50051"       # host:port; port 0 picks a free port (logged)
data_dir = "var/data"            # everything the server stores, relative to the config file's folder
shutdown_grace = "10s"
max_streams_per_identity = 0     # reloadable: 0 = only the global max_streams

[tls]                            # PEM files, relative to the config file's folder
ca_cert = "var/certs/ca.pem"     # client certificates must chain to this CA
server_cert = "var/certs/server.pem"
server_key = "var/certs/server-key.pem"
crl = ""                         # reloadable: PEM certificate revocation list signed by the CA; "" = none

[metrics]
listen = "127.0.0.1:9464"        # Prometheus text format at /metrics; "" turns it off

[logging]
level = "info"                   # reloadable
format = "json"                  # "json" or "console"

[jobs]
max_concurrent = 8               # reloadable: jobs running at once, all batches together
default_timeout = "1h"           # reloadable
kill_grace = "5s"                # reloadable: between SIGTERM and SIGKILL
max_jobs_per_batch = 10000       # reloadable
log_tail_bytes = "64KiB"         # reloadable: GetBatch's default tail per stream
run_as = ""                      # reloadable. "": when the server runs as root, jobs run as "nobody";
max_log_bytes = "1GiB"           # reloadable: per job and stream; past it the job is stopped, FAILED,
fair_share = true                # reloadable: free slots go round-robin between identities with
max_queued_jobs_per_identity = 0 # reloadable: 0 = only the global max_queued_jobs
max_running_per_identity = 0     # reloadable: 0 = only max_concurrent

[jobs.default_limits]            # reloadable; 0 means no limit
cpu_millis = 0
memory_bytes = 0
pids_max = 4096                  # reloadable: a default, so that no job can fork-bomb the host

[auth]                           # reloadable
default_role = "user"            # role of any identity not listed below: "user" or "none"

[auth.roles]                     # identity (certificate common name) = role
# alice = "admin"                # admin: every batch; user: own batches; viewer: read every batch, schedule nothing; none: refused

[retention]                      # reloadable
max_age = "7d"                   # ended batches older than this are deleted with their logs
"""  # noqa: E501


def test_builtin_defaults_are_the_contracts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.source is None
    assert config.server.listen == "127.0.0.1:50051"
    assert config.server.data_dir == tmp_path / "var/data"
    assert config.server.shutdown_grace == 10.0
    assert config.server.keepalive_interval == 30.0
    assert config.server.max_streams == 1000
    assert config.tls.ca_cert == tmp_path / "var/certs/ca.pem"
    assert config.tls.server_cert == tmp_path / "var/certs/server.pem"
    assert config.tls.server_key == tmp_path / "var/certs/server-key.pem"
    assert config.metrics.listen == "127.0.0.1:9464"
    assert (config.logging.level, config.logging.format) == ("info", "json")
    jobs = config.jobs
    assert (jobs.max_concurrent, jobs.default_timeout, jobs.kill_grace) == (8, 3600.0, 5.0)
    assert (jobs.max_jobs_per_batch, jobs.log_tail_bytes) == (10_000, 65_536)
    assert jobs.default_limits.to_limits() == Limits(pids_max=4096)
    assert (jobs.run_as, jobs.max_log_bytes, jobs.fair_share) == ("", 1 << 30, True)
    assert (jobs.max_queued_jobs_per_identity, jobs.max_running_per_identity) == (0, 0)
    assert (config.server.max_streams_per_identity, config.tls.crl) == (0, None)
    assert (jobs.max_stdin_bytes, jobs.max_argv_bytes) == (1 << 20, 128 << 10)
    assert (jobs.max_queued_jobs, jobs.working_dir, jobs.min_free_disk) == (100_000, "/", 64 << 20)
    assert (config.auth.default_role, config.auth.roles) == ("user", {})
    assert config.retention.max_age == 7 * 86_400.0
    assert parse_config(CONTRACT_TOML, tmp_path) == config
    assert Config() == config


def test_committed_file_is_the_defaults_with_an_admin() -> None:
    """config/jobworker.toml names every key, each with its default (the models are the
    one source), but for the CLI's admin role."""
    path = REPO / "config" / "jobworker.toml"
    named = key_lines(path.read_text())

    def keys(model: type[BaseModel], loc: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        for name, info in model.model_fields.items():
            if name == "source":
                continue
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from keys(kind, (*loc, name))
            else:
                yield (*loc, name)

    assert [k for k in keys(Config, ()) if k not in named] == []
    config = load_config(path)
    assert config.source == path
    assert config.server.data_dir == REPO / "var/data"
    assert config.tls.ca_cert == REPO / "var/certs/ca.pem"
    assert config.tls.server_key == REPO / "var/certs/server-key.pem"
    assert config.auth.roles == {"admin": "admin"}
    assert changed_keys(parse_config("", REPO), config) == ["auth.roles.admin"]


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("/etc/jobworker"), source=Path("/etc/jobworker/config.toml"))
    message = str(caught.value)
    assert message.startswith("/etc/jobworker/config.toml: ")
    assert "pydantic" not in message
    assert "Input should" not in message
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[jobs]\nmax_concurrent = 0\n",
            "jobs.max_concurrent = 0 (line 2): must be an integer from 1 to 10000",
        ),
        ('[jobs]\n\ndefault_timeout = "1 hour"\n', 'jobs.default_timeout = "1 hour" (line 3)'),
        ('[jobs]\ndefault_timeout = "0s"\n', 'jobs.default_timeout = "0s" (line 2)'),
        ("[jobs]\nkill_grace = 5\n", "jobs.kill_grace = 5 (line 2): must be a duration"),
        ('[retention]\nmax_age = "-1d"\n', 'retention.max_age = "-1d" (line 2)'),
        ('[jobs]\nlog_tail_bytes = "64KB!"\n', 'jobs.log_tail_bytes = "64KB!" (line 2)'),
        ('[jobs]\nmax_stdin_bytes = "4MiB"\n', 'jobs.max_stdin_bytes = "4MiB" (line 2)'),
        (
            "[jobs.default_limits]\nmemory_bytes = -1\n",
            "jobs.default_limits.memory_bytes = -1 (line 2): must be a size",
        ),
        (
            '[jobs]\nmax_concurrent = "8"\n',
            'jobs.max_concurrent = "8" (line 2): must be an integer',
        ),
        ("[jobs]\nmax_concurrent = true\n", "jobs.max_concurrent = true (line 2)"),
        ("[server]\nlisten = 50051\n", "server.listen = 50051 (line 2): must be host:port"),
        ('[server]\nlisten = "localhost"\n', 'server.listen = "localhost" (line 2)'),
        ('[server]\nlisten = "::1:50051"\n', 'server.listen = "::1:50051" (line 2)'),
        ('[server]\nlisten = "[::g]:1"\n', 'server.listen = "[::g]:1" (line 2)'),
        ('[metrics]\nlisten = "x:65536"\n', 'metrics.listen = "x:65536" (line 2)'),
        ('[auth.roles]\nalice = "boss"\n', 'auth.roles.alice = "boss" (line 2): must be a role'),
        ('[auth]\ndefault_role = "admin"\n', 'auth.default_role = "admin" (line 2): must be'),
        ('[logging]\nlevel = "loud"\n', 'logging.level = "loud" (line 2): must be "debug"'),
        ('[jobs]\nworking_dir = "tmp"\n', 'jobs.working_dir = "tmp" (line 2): must be an absolute'),
        ("jobs = 5\n", "jobs = 5 (line 1): must be a table"),
        ('server.listen = "nope"\n', 'server.listen = "nope" (line 1)'),
        (
            "[jobs]\ndefault_limits = { pids_max = -1 }\n",
            "jobs.default_limits.pids_max = -1 (line 2)",
        ),
    ],
)
def test_bad_value_names_key_value_line_and_what_is_allowed(text: str, expected: str) -> None:
    assert expected in _error(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\nmax_concurrent = 3\n", "unknown key max_concurrent (line 2); known sections: server,"),
        ("[sever]\n", "unknown key sever (line 1); known sections: server, tls,"),
        (
            "[jobs]\nmax_concurent = 3\n",
            "unknown key jobs.max_concurent (line 2); known keys in [jobs]: max_concurrent,",
        ),
        (
            "[jobs.default_limits]\nmemory = 3\n",
            "unknown key jobs.default_limits.memory (line 2); known keys in [jobs.default_limits]",
        ),
        ('source = "x"\n', "unknown key source (line 1)"),
    ],
)
def test_unknown_keys_are_errors(text: str, expected: str) -> None:
    assert expected in _error(text)


def test_several_errors_in_line_order() -> None:
    message = _error(
        '[jobs]\nmax_concurrent = 0\n[server]\nlisten = "x"\n[auth.roles]\n"a.b" = 1\n'
    )
    first, second, third = message.split("; ")
    assert "jobs.max_concurrent = 0 (line 2)" in first
    assert 'server.listen = "x" (line 4)' in second
    assert 'auth.roles."a.b" = 1 (line 6)' in third


def test_toml_syntax_error_keeps_line_and_column() -> None:
    assert "(at line 3, column 5)" in _error("[jobs]\nmax_concurrent = 8\n[job\n")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.toml")


def test_relative_paths_resolve_against_the_files_folder(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "jobworker.toml"
    path.parent.mkdir()
    path.write_text('[server]\ndata_dir = "data"\n[tls]\nca_cert = "/abs/ca.pem"\n')
    config = load_config(path)
    assert config.server.data_dir == tmp_path / "etc" / "data"
    assert config.tls.ca_cert == Path("/abs/ca.pem")
    assert config.tls.server_cert == tmp_path / "etc" / "var/certs/server.pem"
    assert load_config(path).source == path


def test_units_in_the_file() -> None:
    config = parse_config(
        '[jobs]\ndefault_timeout = "1h30m"\nlog_tail_bytes = 1024\nmin_free_disk = "1.5GiB"\n'
        '[server]\nlisten = "[::1]:0"\nshutdown_grace = "500ms"\n[metrics]\nlisten = ""\n',
        Path("/"),
    )
    assert config.jobs.default_timeout == 5400.0
    assert (config.jobs.log_tail_bytes, config.jobs.min_free_disk) == (1024, 3 << 29)
    assert (config.server.listen, config.server.shutdown_grace) == ("[::1]:0", 0.5)
    assert config.metrics.listen == ""


def test_config_is_frozen_and_source_is_not_compared() -> None:
    one = parse_config("", Path("/srv"), source=Path("/srv/a.toml"))
    two = parse_config("", Path("/srv"), source=Path("/srv/b.toml"))
    assert one == two
    with pytest.raises(pydantic.ValidationError):
        one.jobs.max_concurrent = 3  # type: ignore[misc]


def test_python_callers_may_give_seconds() -> None:
    jobs = JobsConfig(kill_grace=0.1, default_timeout="2m")
    assert (jobs.kill_grace, jobs.default_timeout) == (0.1, 120.0)


def test_default_limits_to_limits() -> None:
    limits = DefaultLimits(memory_bytes="1GiB", pids_max=10, io_write_bytes_per_second=5)
    assert limits.to_limits() == Limits(
        memory_bytes=1 << 30, pids_max=10, io_write_bytes_per_second=5
    )


def test_role_of() -> None:
    auth = parse_config(
        '[auth]\ndefault_role = "none"\n[auth.roles]\nbob = "viewer"\n', Path("/")
    ).auth
    assert (auth.role_of("bob"), auth.role_of("eve")) == ("viewer", "none")


def test_restart_needed_and_changed_keys() -> None:
    old = parse_config("", Path("/srv"))
    listen = parse_config('[server]\nlisten = "0.0.0.0:1"\n', Path("/srv"))
    assert restart_needed(old, listen) == ["server.listen"]
    more = parse_config("[jobs]\nmax_concurrent = 2\n", Path("/srv"))
    assert restart_needed(old, more) == []
    assert changed_keys(old, more) == ["jobs.max_concurrent"]
    roles = parse_config('[auth.roles]\nalice = "admin"\n[tls]\nca_cert = "x.pem"', Path("/srv"))
    assert changed_keys(old, roles) == ["tls.ca_cert", "auth.roles.alice"]
    assert restart_needed(old, roles) == []
    assert changed_keys(old, old) == []


def test_reloadable_keys() -> None:
    assert {"logging.level", "jobs", "auth", "retention"} <= RELOADABLE
    assert is_reloadable("jobs.default_limits.pids_max")
    assert is_reloadable("logging.level")
    assert not is_reloadable("logging.format")
    assert not is_reloadable("server.data_dir")
    assert not is_reloadable("metrics.listen")


def test_config_roles_and_default_limits_are_the_models() -> None:
    """Each fact once: the config's roles and [jobs.default_limits] keys are the model's."""
    import typing

    from jobworker.config import DefaultLimits, Role
    from jobworker.model import LIMIT_FIELDS, ROLES

    assert typing.get_args(Role) == ROLES
    assert tuple(DefaultLimits.model_fields) == LIMIT_FIELDS
