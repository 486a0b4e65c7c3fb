"""Smoke test for the handoff benchmark (`python3 -m benchmarks.handoff --quick`).

It runs the real thing end to end (coordinator, edge agent and cloud worker processes on
loopback) with a tiny GPT-2. No timing is asserted: these machines are noisy. What must hold:
the run finishes, every policy is reported, every request got exactly one outcome, the
plot is written, and the figures against what the hardware allows (capacity bound, same-run
ratios, the stand-in-cloud what-if) are reported and consistent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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
        # No emulated cold start for the stand-in: the best chance that requests of the short
        # quick burst arrive after it is ready, so that its capacity bound is computed.
        [sys.executable, "-m", "benchmarks.handoff", "--quick", "--out", str(out),
         "--what-if-cold-start", "0", "--logs", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for policy in POLICIES:  # --logs kept every stack's logs
        assert (tmp_path / "logs" / policy / "coordinator.log").is_file(), policy

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
    _check_bounds(results)
    assert (out / "what_if.png").read_bytes()[:8] == PNG_MAGIC


def _check_bound(bound: dict[str, Any] | None) -> None:
    if bound is None:  # no cloud forward measured after ready (quick: the burst may end first)
        return
    assert bound["service_s"] > 0 and bound["batch"] >= 1
    assert 0 <= bound["prefer_cloud"] <= bound["after_ready"]
    if bound["after_ready"] == 0:
        assert bound["bound"] is None
        return
    assert 0.0 <= bound["bound"] <= 1.0
    assert bound["reached"] is None or 0.0 <= bound["reached"] <= 1.0
    if bound["reached"] is not None and bound["bound"] > 0:
        assert bound["reached_of_bound"] == pytest.approx(bound["reached"] / bound["bound"])


def _check_comparison(comp: dict[str, Any]) -> None:
    assert set(comp["attainment_by_class"]) == {"critical", "normal", "quality"}
    for v in comp["attainment_by_class"].values():
        for mode in ("cooperative", "edge_only"):
            assert v[mode] is None or 0.0 <= v[mode] <= 1.0
    if comp["critical_p99_ratio"] is not None:
        assert comp["critical_p99_ratio"] > 0
        assert comp["critical_p99_ok"] == (comp["critical_p99_ratio"] <= 1.1)


def _check_bounds(results: dict[str, Any]) -> None:
    assert "capacity_bound" in results["policies"]["cooperative"]
    _check_bound(results["policies"]["cooperative"]["capacity_bound"])
    _check_comparison(results["comparison"])
    what_if = results["what_if"]
    assert "WHAT-IF" in what_if["label"] and what_if["profile"]["service_s"] > 0
    _exactly_once(what_if["summary"]["integrity"])
    # None when no request arrived after the stand-in was ready: its imports can outlast the
    # quick burst on a loaded machine (no timing is asserted).
    assert "capacity_bound" in what_if
    _check_bound(what_if["capacity_bound"])
    _check_comparison(what_if["comparison"])
    assert any("WHAT-IF" in t["target"] for t in results["bound_targets"])
    for t in results["bound_targets"]:
        assert t["pass"] in (True, False, None) and t["measured"]
