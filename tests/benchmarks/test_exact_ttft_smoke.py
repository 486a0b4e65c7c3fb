"""Smoke test for the exact-generation TTFT benchmark (`python3 -m benchmarks.exact_ttft
--quick`): real coordinator and edge agent processes; no timing is asserted, only that every
call was timed and the results file holds the ratio measured in the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_exact_ttft_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "exact"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.exact_ttft", "--quick", "--out", str(out),
         "--cache", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert [len(results["ttft_s"][k]) for k in ("edge-only", "exact")] == [6, 6]
    assert results["ratio_exact_over_edge_only"] > 0
    assert "exact / edge-only" in proc.stdout
