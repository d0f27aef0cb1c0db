"""Fixtures of the integration tests; the machinery lives in harness.py."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from harness import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
