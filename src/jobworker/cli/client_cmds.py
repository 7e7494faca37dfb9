"""The client commands: submit, status, logs, cancel, list."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
