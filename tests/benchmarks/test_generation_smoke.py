"""Smoke test for the generation benchmark (`python3 -m benchmarks.generation --quick`).

Real coordinator, edge agent and cloud worker processes with a tiny GPT-2. No timing is
asserted: what must hold is that every scenario streams every token, edge-only never touches
the cloud and cloud-only never the edge, and the results file says so; and the
cooperative run hands the generation over to the cloud.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a whole quick benchmark run (~35 s)
def test_quick_generation_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "generation"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.generation", "--quick", "--out", str(out),
         "--cache", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    tokens = results["tokens"]
    (edge_only,) = results["runs"]["edge-only"]
    (cloud_only,) = results["runs"]["cloud-only"]
    (cooperative,) = results["runs"]["cooperative"]
    assert edge_only["cloud_tokens"] == 0 and edge_only["handoff_at_token"] is None
    assert cloud_only["cloud_tokens"] == tokens and cloud_only["handoff_at_token"] == 0
    # The quick run paces the edge (results["edge_token_interval_s"]) so that it cannot finish
    # before the cloud worker is up: the cooperative run must hand off, once, mid-stream.
    assert results["edge_token_interval_s"] > 0
    assert 0 < cooperative["cloud_tokens"] < tokens, cooperative
    assert cooperative["handoff_at_token"] == tokens - cooperative["cloud_tokens"], cooperative
    assert 0 < cooperative["handoff_at_s"] <= cooperative["total_s"], cooperative
    for run in (edge_only, cloud_only, cooperative):
        assert 0 < run["ttft_s"] <= run["total_s"]
    assert set(results["ratios"]) >= {"ttft_cooperative_over_edge_only", "cloud_share_cooperative"}
