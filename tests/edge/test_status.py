"""`cicada status` reads a running coordinator's /metrics (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from cicada import Client
from cicada.testing import ROOT, Stack


def test_status_shows_workers_and_outcomes(
    tiny_package: dict[str, Path], stack: Stack, client: Client
) -> None:
    assets = tiny_package
    stack.coordinator()
    stack.edge("gpt2", assets["edge"], name="edge-a")
    stack.wait_workers("edge")
    for _ in range(3):
        client.invoke("gpt2", np.load(assets["input"]), priority=0)
    out = subprocess.run(
        [sys.executable, "-m", "cicada", "status", "--metrics", stack.metrics_url, "--json"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    snapshot = json.loads(out.stdout)
    assert {"model": "gpt2", "role": "edge", "state": "ready", "count": 1} in snapshot["workers"]
    ok = [r for r in snapshot["requests"] if r["route"] == "edge" and r["status"] == "OK"]
    assert ok and ok[0]["count"] == 3
    assert "edge-a" in snapshot["residency"]
    table = subprocess.run(
        [sys.executable, "-m", "cicada", "status", "--metrics", stack.metrics_url],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "edge" in table.stdout and "gpt2" in table.stdout


def test_status_says_what_to_do_when_nothing_listens(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cicada", "status", "--metrics", "http://127.0.0.1:9/metrics"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "is the coordinator running" in out.stderr


def test_worker_counts_of_an_unreachable_coordinator_are_an_error(stack: Stack) -> None:
    """"No workers" must mean the coordinator said so: with nobody on the metrics port, the
    count raises rather than reading 0 (every "no workers left" check would pass on it)."""
    import pytest

    from cicada.common.errors import CicadaError

    with pytest.raises(CicadaError, match="cannot read"):
        stack.workers("cloud")
