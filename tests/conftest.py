"""Fixtures for the tests of jobs that run as another user (unit and integration)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.preload import Preload, build_preload


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every user may enter (pytest's tmp is root's only): only the modes of what
    is inside decide what a job as nobody may read there."""
    folder = Path(tempfile.mkdtemp(prefix="jobworker-shared-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def preload() -> Iterator[Preload]:
    """A preload library that records the uid and executable of every process it enters."""
    built = build_preload()
    yield built
    built.remove()
