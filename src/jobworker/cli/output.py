"""Where the client commands print: the consoles, the --json shape, colour; and whether a
batch they show succeeded, which decides their exit code."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

# rich and protobuf are imported inside the functions: `jobworker --help` stays fast.
if TYPE_CHECKING:
    from rich.console import Console

    from jobworker.v1 import jobworker_pb2 as pb

_PIPE_WIDTH = 1000


def stdout_console() -> Console:
    from rich.console import Console

    # Piped: one table row a line, however long, for grep and awk.
    width = None if sys.stdout.isatty() else _PIPE_WIDTH
    return Console(highlight=False, width=width)


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def print_json(value: object) -> None:
    """A value of jobworker.client.types in the documented --json shape."""
    from jobworker.client.jsonshape import to_json

    click.echo(json.dumps(to_json(value), indent=2, ensure_ascii=False))


def batch_json(batch: pb.Batch) -> None:
    from jobworker.client import convert

    print_json(convert.batch(batch))


def use_color() -> bool:
    """Colour only for a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def selected_succeeded(batch: pb.Batch, job_names: Sequence[str]) -> bool:
    """Whether the batch succeeded; with a selection of jobs, whether they all did."""
    from jobworker.v1 import jobworker_pb2 as pb

    if job_names:
        selected = set(job_names)
        chosen = [job for job in batch.jobs if job.spec.name in selected]
        return bool(chosen) and all(job.state == pb.JOB_STATE_SUCCEEDED for job in chosen)
    return batch.state == pb.BATCH_STATE_SUCCEEDED
