"""Where the server is and which certificate the client shows: flags, environment, profiles.

A profile file (`$XDG_CONFIG_HOME/jobworker/client.toml`) holds named contexts:

    current = "prod"
    [contexts.prod]
    server = "jobs.example.com:50051"
    ca = "prod/ca.pem"              # relative paths are relative to this file
    cert = "prod/alice.pem"
    key = "prod/alice-key.pem"
    # server_name = "jobs"          # when the server's certificate names another host
    # ca_data / cert_data / key_data: the PEM text itself instead of a path

Every file is checked before any connection, and every problem is reported at once.
"""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_CA = Path("var/certs/ca.pem")
DEFAULT_CERT = Path("var/certs/admin.pem")
DEFAULT_KEY = Path("var/certs/admin-key.pem")

PROFILE_ENV = "JOBWORKER_CLIENT_CONFIG"
CONTEXT_ENV = "JOBWORKER_CONTEXT"
_CONTEXT_KEYS = frozenset(
    {"server", "ca", "cert", "key", "server_name", "ca_data", "cert_data", "key_data"}
)
_SETUP_HINT = (
    "to set up a client: on the server's host run `jobworker certs issue NAME --profile "
    "FILE` and copy FILE to ~/.config/jobworker/client.toml (or pass --ca/--cert/--key)"
)


class CredentialsError(Exception):
    """The client's profile, certificate or key files are missing, unreadable or do not fit."""


@dataclass(frozen=True)
class Credentials:
    """The PEM bytes a channel presents and trusts."""

    ca: bytes
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class ClientConfig:
    """Where the server is and the client's certificate files (PEM).

    A `*_data` field, when set, is the PEM itself and wins over the path beside it.
    """

    server: str = DEFAULT_SERVER
    ca: Path = DEFAULT_CA
    cert: Path = DEFAULT_CERT
    key: Path = DEFAULT_KEY
    # The name the server's certificate is checked against, when not the host in `server`.
    server_name_override: str | None = None
    ca_data: bytes | None = field(default=None, repr=False)
    cert_data: bytes | None = field(default=None, repr=False)
    key_data: bytes | None = field(default=None, repr=False)
    # Where the settings came from, for messages: "context prod in ~/.config/...".
    source: str = ""

    @classmethod
    def from_env(
        cls, context: str | None = None, environ: Mapping[str, str] | None = None
    ) -> ClientConfig:
        """The profile's context (named, or JOBWORKER_CONTEXT, or the file's current one)
        with JOBWORKER_SERVER, _CA, _CERT, _KEY and _SERVER_NAME on top."""
        env = os.environ if environ is None else environ
        base = load_context(context or env.get(CONTEXT_ENV) or None, env)
        return base.override(
            server=env.get("JOBWORKER_SERVER") or None,
            ca=_path_or_none(env.get("JOBWORKER_CA")),
            cert=_path_or_none(env.get("JOBWORKER_CERT")),
            key=_path_or_none(env.get("JOBWORKER_KEY")),
            server_name=env.get("JOBWORKER_SERVER_NAME") or None,
        )

    def override(
        self,
        *,
        server: str | None = None,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        server_name: str | None = None,
    ) -> ClientConfig:
        """This config with the given settings on top; a path given drops the inline PEM."""
        config = self
        if server:
            config = replace(config, server=server)
        if ca is not None:
            config = replace(config, ca=ca, ca_data=None)
        if cert is not None:
            config = replace(config, cert=cert, cert_data=None)
        if key is not None:
            config = replace(config, key=key, key_data=None)
        if server_name:
            config = replace(config, server_name_override=server_name)
        return config

    def load_credentials(self, now: dt.datetime | None = None) -> Credentials:
        """Read and check the three PEMs; every problem found is in one CredentialsError."""
        from jobworker.client.tls import check_credentials

        problems: list[str] = []
        ca = self._read(self.ca_data, self.ca, "CA certificate", "--ca", problems)
        cert = self._read(self.cert_data, self.cert, "client certificate", "--cert", problems)
        key = self._read(self.key_data, self.key, "client key", "--key", problems)
        if ca is not None and cert is not None and key is not None:
            problems.extend(
                check_credentials(ca, cert, key, self._names(), now or dt.datetime.now(dt.UTC))
            )
        if problems:
            raise CredentialsError(self._explain(problems))
        if ca is None or cert is None or key is None:  # a problem was reported for it
            raise AssertionError("unreachable")
        return Credentials(ca, cert, key)

    def _names(self) -> tuple[str, str, str]:
        return tuple(  # type: ignore[return-value]
            "the profile's " + what if data is not None else str(path)
            for what, data, path in (
                ("ca_data", self.ca_data, self.ca),
                ("cert_data", self.cert_data, self.cert),
                ("key_data", self.key_data, self.key),
            )
        )

    def _read(
        self, data: bytes | None, path: Path, what: str, flag: str, problems: list[str]
    ) -> bytes | None:
        if data is not None:
            return data
        try:
            return path.read_bytes()
        except FileNotFoundError:
            problems.append(f"{what} not found: {path} (give another with {flag})")
        except OSError as err:
            problems.append(f"cannot read {what} {path}: {err.strerror}")
        return None

    def _explain(self, problems: list[str]) -> str:
        lines = ["the client's credentials are not usable:"]
        lines.extend(f"  - {problem}" for problem in problems)
        lines.append(f"  (settings from {self.source or 'the built-in defaults'})")
        if any("not found" in problem for problem in problems):
            lines.append(
                f"  {_SETUP_HINT}; in a checkout, `make build` or `jobworker certs init` "
                "makes var/certs"
            )
        return "\n".join(lines)


def _path_or_none(value: str | None) -> Path | None:
    return Path(value) if value else None


def profile_path(environ: Mapping[str, str] | None = None) -> Path:
    """JOBWORKER_CLIENT_CONFIG, or $XDG_CONFIG_HOME/jobworker/client.toml (~/.config by
    default)."""
    env = os.environ if environ is None else environ
    if env.get(PROFILE_ENV):
        return Path(env[PROFILE_ENV])
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "jobworker" / "client.toml"


def load_context(name: str | None, environ: Mapping[str, str] | None = None) -> ClientConfig:
    """The named context (or the file's `current` one) as a config; without a profile file
    and without a name, the built-in defaults."""
    path = profile_path(environ)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if name is None:
            return ClientConfig()
        raise CredentialsError(
            f"context {name!r} asked for, but there is no profile file {path}; {_SETUP_HINT}"
        ) from None
    except OSError as err:
        raise CredentialsError(f"cannot read profile {path}: {err.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise CredentialsError(f"profile {path}: invalid TOML: {err}") from None
    contexts = data.get("contexts", {})
    if not isinstance(contexts, dict):
        raise CredentialsError(f"profile {path}: contexts: must be a table of contexts")
    chosen = name or data.get("current")
    if chosen is None:
        if len(contexts) == 1:
            chosen = next(iter(contexts))
        else:
            return ClientConfig(source=f"{path} (no current context)")
    if not isinstance(chosen, str) or chosen not in contexts:
        known = ", ".join(sorted(contexts)) or "none"
        raise CredentialsError(f"profile {path}: no context {chosen!r} (contexts: {known})")
    return _context_config(path, chosen, contexts[chosen])


def _context_config(path: Path, name: str, values: object) -> ClientConfig:
    where = f"profile {path}: contexts.{name}"
    if not isinstance(values, dict):
        raise CredentialsError(f"{where}: must be a table")
    unknown = sorted(set(values) - _CONTEXT_KEYS)
    if unknown:
        raise CredentialsError(
            f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_CONTEXT_KEYS))}"
        )
    for key, value in values.items():
        if not isinstance(value, str):
            raise CredentialsError(f"{where}.{key}: must be a string")

    def file(key: str, default: Path) -> Path:
        # Relative to the profile, so that the profile works from any directory.
        return path.parent / values[key] if key in values else default

    def data(key: str) -> bytes | None:
        return values[key].encode() if key in values else None

    return ClientConfig(
        server=values.get("server", DEFAULT_SERVER),
        ca=file("ca", DEFAULT_CA),
        cert=file("cert", DEFAULT_CERT),
        key=file("key", DEFAULT_KEY),
        server_name_override=values.get("server_name") or None,
        ca_data=data("ca_data"),
        cert_data=data("cert_data"),
        key_data=data("key_data"),
        source=f"context {name!r} of {path}",
    )


def write_profile(
    path: Path,
    *,
    context: str,
    server: str,
    ca_pem: bytes,
    cert_pem: bytes,
    key_pem: bytes,
    server_name: str | None = None,
) -> Path:
    """Write a ready profile: one file holding the server's address and the identity's
    CA, certificate and key (inline PEM), with `context` as its current context.

    The file is created with mode 0600 (it holds a private key) and never overwritten.
    """
    lines = [
        "# A jobworker client profile; copy it to ~/.config/jobworker/client.toml.",
        f"current = {_toml_string(context)}",
        "",
        f"[contexts.{_toml_string(context)}]",
        f"server = {_toml_string(server)}",
    ]
    if server_name:
        lines.append(f"server_name = {_toml_string(server_name)}")
    for key, pem in (("ca_data", ca_pem), ("cert_data", cert_pem), ("key_data", key_pem)):
        lines.append(f'{key} = """\n{pem.decode("ascii").strip()}\n"""')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    return path


def _toml_string(value: str) -> str:
    import json

    # A JSON string of printable text is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=True)
