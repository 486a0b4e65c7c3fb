"""Fixtures of the coordinator's in-process tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.edge.test_coordinator import Harness


@pytest.fixture
def h() -> Iterator[Harness]:
    """A coordinator driven in this process over real sockets (`Harness`), closed after."""
    harness = Harness()
    yield harness
    harness.close()
