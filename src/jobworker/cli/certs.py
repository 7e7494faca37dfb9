"""`jobworker certs`: the CA, the server's certificate and client certificates."""

from __future__ import annotations

import click


@click.group()
def certs() -> None:
    """Create the CA and the server's certificate; issue client certificates."""
