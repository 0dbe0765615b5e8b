"""Fixtures shared by the firmware tests that run a real emulated board against tests/fwpeer.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fwpeer import Rig


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A board linked to its test gateway peer (Hello done); closed after the test."""
    r = Rig(tmp_path)
    try:
        yield r.up()
    finally:
        r.close()
