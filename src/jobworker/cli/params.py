"""Values of the client commands' options: KEY=VALUE pairs, durations, 32-bit counts."""

from __future__ import annotations

from collections.abc import Sequence

import click

# The largest value of a uint32 request field (--max-parallel, --tail).
UINT32_MAX = 2**32 - 1


def pairs(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    """KEY=VALUE options into a dict; a later KEY wins."""
    result = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", ctx=ctx, param=param)
        result[key] = item
    return result


def duration_seconds(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A duration option ("30s", "5m") in seconds, more than 0; None when not given."""
    from jobworker.units import parse_duration

    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    if seconds <= 0:
        raise click.BadParameter("must be more than 0", ctx=ctx, param=param)
    return seconds
