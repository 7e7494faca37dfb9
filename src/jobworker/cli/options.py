"""Options shared by the client commands: where the server is, which certificate, --json."""

from __future__ import annotations

import functools
import io
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import click

if TYPE_CHECKING:
    from jobworker.client.config import ClientConfig
    from jobworker.client.rpc import RpcClient

# Exit codes of the client commands (contract 6.5).
EXIT_OK = 0  # done; where a batch is shown, it succeeded
EXIT_FAILED = 1  # the batch did not succeed (or another request failure)
EXIT_USAGE = 2  # bad usage or input (click's own code for a bad command line)
EXIT_NOT_FOUND = 3
EXIT_CONNECT = 4  # cannot connect, or not authenticated
EXIT_DENIED = 5  # permission denied
EXIT_INTERRUPTED = 130

# gRPC status codes by exit code; any other failure of a request is EXIT_FAILED.
_EXIT_BY_CODE = {
    "NOT_FOUND": EXIT_NOT_FOUND,
    "UNAVAILABLE": EXIT_CONNECT,
    "UNAUTHENTICATED": EXIT_CONNECT,
    "PERMISSION_DENIED": EXIT_DENIED,
    "INVALID_ARGUMENT": EXIT_USAGE,
    "OUT_OF_RANGE": EXIT_USAGE,
}

_P = ParamSpec("_P")
_R = TypeVar("_R")


def quiet_grpc() -> None:
    """Keep gRPC's C-core log lines off the terminal; the CLI says what went wrong itself.

    Must run before grpc is first imported; a GRPC_VERBOSITY the user set wins."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    os.environ.setdefault("GRPC_TRACE", "")


@dataclass(frozen=True)
class Connection:
    """The connection settings of one command: flags and JOBWORKER_* variables (already
    merged by click) over the profile's context over the built-in defaults."""

    server: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    context: str | None = None

    def config(self) -> ClientConfig:
        """The client's config."""
        from jobworker.client.config import load_context

        return load_context(self.context or None).override(
            server=self.server,
            ca=self.ca,
            cert=self.cert,
            key=self.key,
            server_name=self.server_name,
        )

    @contextmanager
    def client(self) -> Iterator[RpcClient]:
        """A connected client; a failure of the client exits the command with a message."""
        from jobworker.client.rpc import RpcClient

        with client_errors(self) as state:
            config = self.config()
            state.append(config.server)
            with RpcClient(config) as client:
                yield client


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print `jobworker: message` on stderr and exit with `code`."""
    click.echo(f"jobworker: {message}", err=True)
    raise click.exceptions.Exit(code)


def exit_code_of(code_name: str) -> int:
    """The exit code for a request that failed with this gRPC status code."""
    return _EXIT_BY_CODE.get(code_name, EXIT_FAILED)


@contextmanager
def client_errors(conn: Connection | None = None) -> Iterator[list[str]]:
    """Turn the client's errors into a message on stderr and the exit code of 6.5.

    Yields a list the caller appends the server's address to, once it is known."""
    from jobworker.cli.batchfile import BatchFileError
    from jobworker.client.config import CredentialsError
    from jobworker.client.rpc import ClientError

    where: list[str] = []
    try:
        yield where
    except ClientError as err:
        server = where[0] if where else (conn.server if conn else None) or "the server"
        if err.unreachable:
            why = err.hint or f"UNAVAILABLE ({err.details})"
            fail(f"cannot reach {server}: {why}", EXIT_CONNECT)
        if err.code_name == "UNAUTHENTICATED":
            fail(f"{server} refused this client's certificate: {err.details}", EXIT_CONNECT)
        fail(str(err), exit_code_of(err.code_name))
    except CredentialsError as err:
        fail(str(err), EXIT_CONNECT)
    except BatchFileError as err:
        fail(str(err), EXIT_USAGE)


_CONNECTION_OPTIONS = (
    click.option(
        "--context",
        envvar="JOBWORKER_CONTEXT",
        default=None,
        metavar="NAME",
        help="Use this context of the client profile (~/.config/jobworker/client.toml, "
        "or JOBWORKER_CLIENT_CONFIG) [env: JOBWORKER_CONTEXT]; flags below win over it.",
    ),
    click.option(
        "--server",
        envvar="JOBWORKER_SERVER",
        default=None,
        metavar="HOST:PORT",
        help="The server's address [env: JOBWORKER_SERVER; default: the profile's, else "
        "127.0.0.1:50051].",
    ),
    click.option(
        "--ca",
        envvar="JOBWORKER_CA",
        default=None,
        type=click.Path(dir_okay=False, path_type=Path),
        help="CA certificate the server's certificate must chain to [env: JOBWORKER_CA; "
        "default: the profile's, else var/certs/ca.pem].",
    ),
    click.option(
        "--cert",
        envvar="JOBWORKER_CERT",
        default=None,
        type=click.Path(dir_okay=False, path_type=Path),
        help="This client's certificate [env: JOBWORKER_CERT; default: the profile's, "
        "else var/certs/admin.pem].",
    ),
    click.option(
        "--key",
        envvar="JOBWORKER_KEY",
        default=None,
        type=click.Path(dir_okay=False, path_type=Path),
        help="This client's private key [env: JOBWORKER_KEY; default: the profile's, "
        "else var/certs/admin-key.pem].",
    ),
    click.option(
        "--server-name",
        envvar="JOBWORKER_SERVER_NAME",
        default=None,
        metavar="NAME",
        help="Check the server's certificate against NAME instead of the host in --server "
        "[env: JOBWORKER_SERVER_NAME].",
    ),
)


def connection_options(command: Callable[_P, _R]) -> Callable[..., _R]:
    """Add --context, --server, --ca, --cert, --key and --server-name; pass them as `conn`."""

    @functools.wraps(command)
    def wrapper(
        *args: Any,
        context: str | None,
        server: str | None,
        ca: Path | None,
        cert: Path | None,
        key: Path | None,
        server_name: str | None,
        **kwargs: Any,
    ) -> _R:
        conn = Connection(server, ca, cert, key, server_name, context)
        quiet_grpc()
        try:
            # The wrapped command takes `conn` on top of its own click parameters.
            return command(*args, conn=conn, **kwargs)  # type: ignore[arg-type]
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (`| head`): nothing more to say, and nowhere to say it.
            _silence_stdout()
            raise click.exceptions.Exit(EXIT_OK) from None

    decorated: Callable[..., _R] = wrapper
    for option in reversed(_CONNECTION_OPTIONS):
        decorated = option(decorated)
    return decorated


def _silence_stdout() -> None:
    # Python would otherwise complain again when it flushes stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON instead of text for people."
)
wide_option = click.option(
    "--wide", is_flag=True, help="Full correlation ids and commands, however wide."
)
