"""`jobworker certs`: the CA, the server's certificate and client certificates."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import click

DEFAULT_DIR = "var/certs"

_dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DIR,
    show_default=True,
    help="Folder that holds the CA, server and client certificates.",
)
_days_option = click.option(
    "--days",
    type=click.IntRange(min=1, max=3650),
    default=825,
    show_default=True,
    help="Validity of the issued certificate(s), in days.",
)
_host_option = click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME",
    help="Extra DNS name or IP address for the server certificate (repeatable); "
    "localhost, 127.0.0.1, ::1 and this host's names are always included.",
)


def _wrote(paths: tuple[Path, ...] | list[Path]) -> None:
    for path in paths:
        click.echo(f"wrote {path}")


@click.group()
def certs() -> None:
    """Create the CA and the server's certificate; issue client certificates."""


@certs.command("init")
@_dir_option
@_host_option
@_days_option
def init_cmd(directory: Path, hosts: tuple[str, ...], days: int) -> None:
    """Create the CA, the server's certificate and the admin's client certificate."""
    # cryptography is imported here, not at the top, so other commands start fast.
    from jobworker import certs as lib

    try:
        paths = lib.init_pki(directory, hosts, days)
    except lib.CertsError as e:
        raise click.ClickException(str(e)) from None
    _wrote([*paths.files(), paths.crl])
    click.echo(
        f"the CA key is in {paths.ca_key.parent}/, which the server never needs: keep it "
        "there (0700) or offline"
    )
    click.echo(
        f"the client identity is the certificate's common name: {paths.admin_cert} is "
        f"{lib.ADMIN_NAME!r}; give it a role in the config"
    )


@certs.command("issue")
@click.argument("name")
@_dir_option
@_days_option
@click.option(
    "--profile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a ready client profile to this file (server address, CA, certificate "
    "and key; mode 0600): copy it to ~/.config/jobworker/client.toml on the client's machine.",
)
@click.option(
    "--server",
    metavar="ADDRESS",
    help="The server's address as the client reaches it, for --profile "
    "[default: this host's name, port 50051].",
)
@click.option(
    "--context",
    metavar="NAME",
    help="The profile's context name, for --profile [default: the server's host name].",
)
def issue_cmd(
    name: str,
    directory: Path,
    days: int,
    profile: Path | None,
    server: str | None,
    context: str | None,
) -> None:
    """Issue a client certificate whose common name (the identity) is NAME."""
    from jobworker import certs as lib

    if profile is None and (server or context):
        raise click.UsageError("--server and --context go with --profile")
    if profile is not None and profile.exists():  # checked before a certificate is made
        raise click.ClickException(f"{profile} exists; refusing to overwrite it")
    try:
        cert_path, key_path = lib.issue_client(directory, name, days)
    except lib.CertsError as e:
        raise click.ClickException(str(e)) from None
    _wrote([cert_path, key_path])
    if profile is not None:
        _write_profile(profile, directory, cert_path, key_path, server, context)


def _write_profile(
    profile: Path,
    directory: Path,
    cert_path: Path,
    key_path: Path,
    server: str | None,
    context: str | None,
) -> None:
    from jobworker.client import write_profile

    address = server or f"{socket.gethostname()}:50051"
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        write_profile(
            profile,
            context=context or host or "default",
            server=address,
            ca_pem=(directory / "ca.pem").read_bytes(),
            cert_pem=cert_path.read_bytes(),
            key_pem=key_path.read_bytes(),
        )
    except OSError as e:
        raise click.ClickException(f"cannot write the profile {profile}: {e.strerror}") from None
    _wrote([profile])
    click.echo(
        f"copy {profile} to ~/.config/jobworker/client.toml on the client's machine; it "
        "holds a private key"
    )


@certs.command("renew-server")
@_dir_option
@_host_option
@_days_option
def renew_server_cmd(directory: Path, hosts: tuple[str, ...], days: int) -> None:
    """Reissue the server's certificate from the existing CA; a running server reloads it."""
    from jobworker import certs as lib

    try:
        cert_path, key_path = lib.issue_server(directory, hosts, days)
    except lib.CertsError as e:
        raise click.ClickException(str(e)) from None
    _wrote([cert_path, key_path])


@certs.command("revoke")
@click.argument("target", metavar="NAME|SERIAL")
@_dir_option
def revoke_cmd(target: str, directory: Path) -> None:
    """Revoke every certificate of identity NAME (or the one of SERIAL, in hex) in crl.pem.

    A server whose [tls] crl names that file refuses the certificate from its next call
    and ends its open calls within a second: no reload needed."""
    from jobworker import certs as lib

    try:
        revoked, crl = lib.revoke(directory, target)
    except lib.CertsError as e:
        raise click.ClickException(str(e)) from None
    for r in revoked:
        where = f" ({r.path})" if r.path else ""
        click.echo(f"revoked serial {r.serial:x} CN={r.common_name or '?'}{where}")
    _wrote([crl])


@certs.command("show")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show_cmd(directory: Path, as_json: bool) -> None:
    """List the certificates in the folder with common name, expiry and SANs."""
    from jobworker import certs as lib

    try:
        infos = [lib.describe(p) for p in lib.list_certificates(directory)]
    except lib.CertsError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    if not infos:
        click.echo(f"no certificates in {directory}")
        return
    rows = [
        (
            Path(i["path"]).name,
            i["common_name"],
            i["serial"],
            ",".join(i["usages"]) or "-",
            i["not_after"][:10] + (" EXPIRED" if i["expired"] else ""),
            " ".join(i["sans"]) or "-",
        )
        for i in infos
    ]
    header = ("FILE", "COMMON NAME", "SERIAL", "USAGE", "EXPIRES", "SANS")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]))
