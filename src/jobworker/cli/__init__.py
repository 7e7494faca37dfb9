"""The `jobworker` command: serve, certs, and the client commands."""

from __future__ import annotations

import click

from jobworker import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="jobworker")
def main() -> None:
    """Run Linux processes on this host for remote clients, over gRPC with mutual TLS."""


def _register() -> None:
    # Each subcommand lives in its own module; they are added here in one place.
    from jobworker.cli import certs, client_cmds, logs, serve, submit, verbs

    main.add_command(serve.serve)
    main.add_command(serve.supervise)
    main.add_command(certs.certs)
    for command in [*submit.COMMANDS, *client_cmds.COMMANDS, *logs.COMMANDS, *verbs.COMMANDS]:
        main.add_command(command)


_register()
