"""Fixtures shared by the real-process tests: the tiny GPT-2 assets, a `Stack` of `python -m
cicada ...` processes on loopback, and a `Client` of that stack's coordinator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cicada.testing import Stack, make_assets


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny GPT-2 packed, its ONNX edge model exported and an example input saved, once per
    session: {"package", "edge", "input"}. Shared: copy the dict before adding to it."""
    return make_assets(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A `Stack` in tmp_path (default heartbeat, 0.5 s) that kills every process it started."""
    with Stack(tmp_path) as s:
        yield s


@pytest.fixture
def client(stack: Stack) -> Iterator[object]:
    """A `Client` of `stack`'s coordinator (30 s timeout), closed after the test."""
    from cicada import Client

    with Client(stack.address, timeout=30) as c:
        yield c
