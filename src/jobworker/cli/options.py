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
    from jobworker.client import Client, ClientConfig

# The same defaults as jobworker.client's; repeated so that `--help` imports no grpc.
DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_CA = "var/certs/ca.pem"
DEFAULT_CERT = "var/certs/admin.pem"
DEFAULT_KEY = "var/certs/admin-key.pem"

# Exit codes of the client commands.
EXIT_OK = 0
EXIT_FAILED = 1  # the request failed, or the batch did not succeed
EXIT_USAGE = 2  # click's own code for a bad command line
EXIT_RUNNING = 3  # `status`: the batch has not ended yet
EXIT_INTERRUPTED = 130

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass(frozen=True)
class Connection:
    """The connection settings of one command, from flags or JOBWORKER_* variables."""

    server: str = DEFAULT_SERVER
    ca: Path = Path(DEFAULT_CA)
    cert: Path = Path(DEFAULT_CERT)
    key: Path = Path(DEFAULT_KEY)
    server_name: str | None = None

    def config(self) -> ClientConfig:
        """The client's config."""
        from jobworker.client import ClientConfig

        return ClientConfig(
            server=self.server,
            ca=self.ca,
            cert=self.cert,
            key=self.key,
            server_name_override=self.server_name or None,
        )

    @contextmanager
    def client(self) -> Iterator[Client]:
        """A connected client; a failure of the client exits the command with a message."""
        from jobworker.client import Client

        with client_errors(self.server), Client(self.config()) as client:
            yield client


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print `jobworker: message` on stderr and exit with `code`."""
    click.echo(f"jobworker: {message}", err=True)
    raise click.exceptions.Exit(code)


@contextmanager
def client_errors(server: str) -> Iterator[None]:
    """Turn the client's errors into one line on stderr and exit code 1."""
    from jobworker.cli.batchfile import BatchFileError
    from jobworker.client import ClientError, CredentialsError

    try:
        yield
    except ClientError as err:
        if err.unreachable:
            fail(f"cannot reach {server}: {err.code_name} ({err.details})")
        fail(str(err))
    except (CredentialsError, BatchFileError) as err:
        fail(str(err))


def connection_options(command: Callable[_P, _R]) -> Callable[..., _R]:
    """Add --server, --ca, --cert, --key and --server-name; pass them as `conn`."""

    @click.option(
        "--server",
        envvar="JOBWORKER_SERVER",
        default=DEFAULT_SERVER,
        show_default=True,
        metavar="HOST:PORT",
        help="The server's address [env: JOBWORKER_SERVER].",
    )
    @click.option(
        "--ca",
        envvar="JOBWORKER_CA",
        default=DEFAULT_CA,
        show_default=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="CA certificate the server's certificate must chain to [env: JOBWORKER_CA].",
    )
    @click.option(
        "--cert",
        envvar="JOBWORKER_CERT",
        default=DEFAULT_CERT,
        show_default=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="This client's certificate [env: JOBWORKER_CERT].",
    )
    @click.option(
        "--key",
        envvar="JOBWORKER_KEY",
        default=DEFAULT_KEY,
        show_default=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="This client's private key [env: JOBWORKER_KEY].",
    )
    @click.option(
        "--server-name",
        envvar="JOBWORKER_SERVER_NAME",
        default=None,
        metavar="NAME",
        help="Check the server's certificate against NAME instead of the host in --server "
        "[env: JOBWORKER_SERVER_NAME].",
    )
    @functools.wraps(command)
    def wrapper(
        *args: Any,
        server: str,
        ca: Path,
        cert: Path,
        key: Path,
        server_name: str | None,
        **kwargs: Any,
    ) -> _R:
        conn = Connection(server=server, ca=ca, cert=cert, key=key, server_name=server_name)
        try:
            # The wrapped command takes `conn` on top of its own click parameters.
            return command(*args, conn=conn, **kwargs)  # type: ignore[arg-type]
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (`| head`): nothing more to say, and nowhere to say it.
            _silence_stdout()
            raise click.exceptions.Exit(EXIT_OK) from None

    return wrapper


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
