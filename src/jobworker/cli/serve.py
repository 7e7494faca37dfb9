"""`jobworker serve`: run the server in the foreground."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML config file; without it, the built-in defaults.",
)
def serve(config_path: Path | None) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully."""
    from jobworker.errors import ConfigError
    from jobworker.server.loop import serve as run_server

    try:
        run_server(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from exc


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def supervise(ctx: click.Context) -> None:
    """The job supervisor: the parent of every job, started by the server (docs/operations.md)."""
    from jobworker.supervisor.run import main as run_supervisor

    raise SystemExit(run_supervisor(list(ctx.args)))
