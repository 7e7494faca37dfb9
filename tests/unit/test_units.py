"""Durations and sizes: what people write, what they read, and what is refused."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobworker.units import format_duration, format_size, parse_duration, parse_size, shorten


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("7d", 604_800.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s5ms", 93_784.005),
        ("0s", 0.0),
        ("1.5h", 5400.0),
        (" 5s ", 5.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "-5s", "5x", "5 s", "s", "1.5", "1h-30m", "5S", "inf"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r'such as "500ms"'):
        parse_duration(text)


def test_parse_duration_refuses_numbers() -> None:
    with pytest.raises(ValueError, match="not a string"):
        parse_duration(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (5, "5s"),
        (90, "1m30s"),
        (0.25, "250ms"),
        (7200, "2h"),
        (604_800, "7d"),
        (3600 + 1.5, "1h1s500ms"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_duration_refuses_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_duration(-1)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (4096, 4096),
        ("100B", 100),
        ("64KiB", 65_536),
        ("512MiB", 512 << 20),
        ("1GiB", 1 << 30),
        ("1.5GiB", 3 << 29),
        ("10MB", 10_000_000),
        ("2kb", 2000),
        ("64 MiB", 64 << 20),
        ("1024", 1024),
    ],
)
def test_parse_size(value: int | str, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [-1, "", "-1KiB", "1XB", "KiB", "1.5B", "0.1KiB", True, 1.5])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ValueError, match=r'"64KiB"'):
        parse_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1536, "1.5 KiB"),
        (64 << 20, "64 MiB"),
        (3 << 29, "1.5 GiB"),
        (10_000_000, "10 MB"),
        (1_234_567, "1234567 B"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=1 << 50))
def test_size_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=0, max_value=10**10))
def test_duration_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10**12))
def test_duration_round_trip_millis(millis: int) -> None:
    assert round(parse_duration(format_duration(millis / 1000)) * 1000) == millis


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=3000), st.integers(0, 1200))
def test_shorten_fits_any_text_in_its_limit(text: str, limit: int) -> None:
    short = shorten(text, limit)
    assert len(short.encode()) <= limit
    if len(text.encode()) <= limit:
        assert short == text


def test_shorten_keeps_both_ends_and_says_what_it_cut() -> None:
    text = "job 'n" + "n" * 20_000 + "': name: at most 64 characters"
    short = shorten(text, 200)
    assert short.startswith("job 'nnn")
    assert short.endswith("': name: at most 64 characters")
    assert "chars cut]" in short
    assert len(short) <= 200
    assert shorten("\U0001f600" * 1000, 101).endswith("\U0001f600")  # no half characters
