"""tail_offset: where the last N lines of a log begin, read backwards in blocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobworker.store import logs
from jobworker.store.logs import tail_offset


@pytest.mark.parametrize(
    ("data", "lines", "tail"),
    [
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc", 2, b"b\nc"),  # a last line without its newline is a line
        (b"a\nb\nc\n", 3, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 10, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 0, b""),
        (b"", 5, b""),
        (b"\n\n\n", 2, b"\n\n"),
        (b"no newline at all", 1, b"no newline at all"),
    ],
)
def test_tail_offset(tmp_path: Path, data: bytes, lines: int, tail: bytes) -> None:
    path = tmp_path / "stdout"
    path.write_bytes(data)
    assert data[tail_offset(path, lines) :] == tail


def test_lines_across_many_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "TAIL_BLOCK", 7)  # lines cross block edges everywhere
    data = b"".join(f"line {i}\n".encode() for i in range(1000))
    path = tmp_path / "stdout"
    path.write_bytes(data)
    for n in (1, 2, 13, 999, 1000, 1001):
        expected = b"".join(f"line {i}\n".encode() for i in range(max(0, 1000 - n), 1000))
        assert data[tail_offset(path, n) :] == expected


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert tail_offset(tmp_path / "nothing", 3) == 0
