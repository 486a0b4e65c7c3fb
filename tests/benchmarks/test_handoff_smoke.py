"""Smoke test for the handoff benchmark (`python3 -m benchmarks.handoff --quick`).

It runs the real thing end to end (coordinator, edge agent and cloud worker processes on
loopback) with a tiny GPT-2. No timing is asserted: these machines are noisy. What must hold:
the run finishes, every policy is reported, every request got exactly one outcome, and the
plot is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ("cloud-only", "edge-only", "cooperative")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _exactly_once(counts: dict[str, int]) -> None:
    assert counts["sent"] > 0
    assert counts["sent"] == counts["outcomes"] == counts["unique_outcome_ids"], counts
    assert counts["unique_sent_ids"] == counts["sent"], counts
    assert counts["lost"] == 0 and counts["duplicates"] == 0, counts


@pytest.mark.slow  # a whole quick benchmark run (~35 s)
def test_quick_handoff_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "handoff"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.handoff", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert set(results["policies"]) == set(POLICIES)
    for policy in POLICIES:
        summary = results["policies"][policy]
        _exactly_once(summary["integrity"])
        assert summary["integrity"]["requests"] == summary["requests"] > 0
        assert len(summary["request_log"]) == summary["requests"]
        # Every trace request ends with a recorded status (OK or an explicit error).
        assert all(r["status"] for r in summary["request_log"]), policy
    assert results["policies"]["edge-only"]["large_share"] == 0
    for burst in results["policies"]["cooperative"]["bursts"]:
        assert burst["cloud_exit_code"] == 0  # SIGTERM drained it cleanly

    coordinator = results["coordinator"]
    assert coordinator["overhead"]["direct"]["n"] > 0
    assert coordinator["overhead"]["via_coordinator"]["n"] > 0
    assert coordinator["overhead"]["relay"]["n"] > 0
    for run in coordinator["throughput"] + coordinator["throughput_stand_in"]:
        _exactly_once(run["integrity"])
    assert coordinator["throughput_stand_in"]
    # B3 drives Coordinator internals with a stand-in socket and reports (not raises) errors.
    assert "error" not in coordinator["logic"], coordinator["logic"]["error"]
    assert coordinator["logic"]["by_backlog"]
    assert {t["target"] for t in results["targets"]}  # every target is reported

    png = out / "handoff.png"
    assert png.exists() and png.read_bytes()[:8] == PNG_MAGIC
