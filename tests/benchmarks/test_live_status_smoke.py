"""Smoke test for the live page's cost benchmark (`python3 -m benchmarks.live_status --quick`):
it runs, measures both sides of its ratio and builds a full document. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cicada.edge.coordinator.live import LATENCY_SERIES

ROOT = Path(__file__).resolve().parents[2]


def test_quick_live_status_benchmark() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.live_status", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    observe = result["observe"]
    assert observe["observe_ns_with_live"] > 0 and observe["observe_ns_without_live"] > 0
    assert observe["ratio"] > 0
    document = result["status_json"]
    assert document["series"] == LATENCY_SERIES and document["json_bytes"] > 0
