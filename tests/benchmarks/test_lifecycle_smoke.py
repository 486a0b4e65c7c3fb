"""Smoke test for the lifecycle benchmark (`python3 -m benchmarks.lifecycle --quick`).

It runs the real thing end to end (coordinators that launch cloud workers as processes, from a
warm pool, and as Ray actors where Ray is installed) with a tiny GPT-2. No timing is asserted:
these machines are noisy. What must hold: the run finishes, both launchers answered from zero
with positive times and went back to zero, the keep-warm comparison ran with exactly one reply
per request, and the target is reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.lifecycle import TARGET_POOL_SAVING_S

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~75-95 s here (three launchers, Ray included, and two traces)
def test_quick_lifecycle_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "lifecycle"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.lifecycle", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "gpt2-tiny" and results["quick"]
    summary = results["first_answer"]["summary"]
    for launcher in ("process", "pool"):
        row = summary[launcher]
        assert row["n"] == 1 and row["all_ok"], row
        assert row["first_answer_s"] > 0, row
        assert row["reply_to_zero_s"] is not None and row["reply_to_zero_s"] > 0, row
    # Ray is measured or skipped with a reason, never silently missing.
    assert "ray" in summary or results["first_answer"]["skipped"].get("ray")
    timed = [r for r in results["first_answer"]["runs"] if r["timed"]]
    assert {r["launcher"] for r in timed} >= {"process", "pool"}
    assert all(r["worker_parent_is_pool"] for r in timed if r["launcher"] == "pool")

    policies = results["keep_warm"]["policies"]
    assert set(policies) == {"fixed", "lazy"}
    for row in policies.values():
        assert row["requests"] > 0 and row["exactly_once"], row
        assert row["cold_starts"] >= 1, row
        assert row["worker_seconds"] > 0, row
    # The target is a timing claim for gpt2-medium, not asserted here (the tiny model's saving
    # sits near the 1 s line). What must hold: it was measured, the pool did save time (it
    # forks with torch imported; a cold process imports it), and the verdict is the one the
    # measurement gives: a "FAIL" or "n/a" that does not follow from the numbers fails here.
    assert results["targets"]
    for t in results["targets"]:
        saving = t["saving_s"]
        assert saving is not None and saving > 0, t
        expected = "PASS" if saving >= TARGET_POOL_SAVING_S else "FAIL"
        assert t["verdict"] == f"{expected} (not the target model)", t
