"""Smoke test for `python3 -m benchmarks.client_liveness`: it runs and reports both figures.
No timing is asserted (these machines are noisy); what must hold is that the calls were made
and a call with nobody listening failed with NoCoordinator before its timeout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_client_liveness_benchmark_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.client_liveness", "--calls", "20", "--rounds", "2",
         "--timeout", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert results["per_call_watched_s"] > 0 and results["per_call_unwatched_s"] > 0
    assert results["watched_over_unwatched"] > 0
    # Failed with NoCoordinator (the benchmark exits otherwise), and not by the timeout.
    assert 0 < results["error_after_over_timeout"] < 1
