"""Durations and sizes as people write them in config files: "1h30m", "64KiB"."""

from __future__ import annotations

import re
from fractions import Fraction

_DURATION_UNITS: dict[str, int] = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
DURATION_HELP = (
    'a duration: a number with a unit ms, s, m, h or d, such as "500ms", "5s", "10m", '
    '"1h30m" or "7d"'
)

_BINARY_UNITS: dict[str, int] = {"TiB": 1 << 40, "GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10}
_SI_UNITS: dict[str, int] = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "kB": 10**3}
_SIZE_UNITS: dict[str, int] = {
    unit.lower(): factor for unit, factor in (_BINARY_UNITS | _SI_UNITS | {"B": 1}).items()
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
SIZE_HELP = (
    'a size: an integer of bytes or a string such as "100B", "64KiB", "512MiB", "1.5GiB" or "10MB"'
)


def parse_duration(value: str) -> float:
    """Seconds in a duration string such as "500ms", "5s", "1h30m"; a bare number is refused."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string; must be {DURATION_HELP}")  # noqa: TRY004
    text = value.strip()
    if not _DURATION.fullmatch(text):
        raise ValueError(f"{value!r} is not {DURATION_HELP}")
    millis = sum(
        (Fraction(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text)),
        Fraction(0),
    )
    return float(millis / 1000)


def format_duration(seconds: float) -> str:
    """A duration as people write it: "5s", "1m30s", "250ms", "2h"; exact to the millisecond."""
    if seconds < 0:
        raise ValueError(f"{seconds!r} is negative; a duration is 0 or more")
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    parts = []
    for unit, factor in _DURATION_UNITS.items():
        count, millis = divmod(millis, factor)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parse_size(value: int | str) -> int:
    """Bytes in an integer or a string such as "64KiB", "512MiB", "1.5GiB", "10MB", "100B"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not {SIZE_HELP}")  # noqa: TRY004
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is negative; must be {SIZE_HELP}")
        return value
    match = _SIZE.fullmatch(value.strip())
    factor = _SIZE_UNITS.get(match.group(2).lower() or "b") if match else None
    if match is None or factor is None:
        raise ValueError(f"{value!r} is not {SIZE_HELP}")
    size = Fraction(match.group(1)) * factor
    if size.denominator != 1:
        raise ValueError(f"{value!r} is not a whole number of bytes; must be {SIZE_HELP}")
    return int(size)


def format_size(n: int) -> str:
    """A size as people read it: "64 MiB", "1.5 GiB", "1 MB", "512 B"; always exact."""
    if n < 0:
        raise ValueError(f"{n!r} is negative; a size is 0 or more")
    # Binary units first: limits are usually powers of two. Then SI, then plain bytes,
    # with at most two decimals so that parse_size(format_size(n)) == n.
    for unit, factor in (_BINARY_UNITS | _SI_UNITS).items():
        if unit == "kB" or n < factor or (n * 100) % factor:
            continue
        whole, rest = divmod(n, factor)
        decimals = f"{rest * 100 // factor:02d}".rstrip("0")
        return f"{whole}.{decimals} {unit}" if decimals else f"{whole} {unit}"
    return f"{n} B"


ECHO_LIMIT = 1024
"""Bytes of UTF-8 a status message, log line or audit line may take (contract 6.1)."""


def shorten(text: str, limit: int = 200) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, keeping its start and end.

    What is cut is said in the middle ("...[12345 chars cut]..."): a message that echoes a
    client's 20,000-character name still ends with the field's limit."""
    if limit < 0:
        raise ValueError(f"{limit!r} is negative; a limit is 0 or more")
    if len(text) <= limit // 4 or len(text.encode(errors="surrogatepass")) <= limit:
        return text
    cut = len(text)
    marker = f"...[{cut} chars cut]..."
    room = limit - len(marker)
    if room < 2:
        return text.encode(errors="surrogatepass")[:limit].decode(errors="ignore")
    # Cut as bytes; a character split at either cut is dropped whole.
    data = text.encode(errors="surrogatepass")
    head = data[: room // 2].decode(errors="ignore")
    tail = data[len(data) - (room - room // 2) :].decode(errors="ignore")
    cut = len(text) - len(head) - len(tail)
    return f"{head}...[{cut} chars cut]...{tail}"
