"""The handoff benchmark's capacity bound and mode comparison (benchmarks/handoff/bound.py):
pure functions, no processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.handoff.bound import capacity_bound, compare_modes, run_capacity_bound


def test_capacity_bound_formula() -> None:
    # 2 s after ready at 0.5 s a forward, batch 1: 2/0.5 + 1 = 5 answers possible.
    out = capacity_bound([2.0], 0.5, 1, after_ready=20, prefer_cloud=14)
    assert out["cloud_capacity_requests"] == pytest.approx(5.0)
    assert out["bound"] == pytest.approx(5 / 20)
    # Capacity to spare: the mix bounds it (critical requests go to the edge).
    out = capacity_bound([2.0, 1.0], 0.01, 4, after_ready=20, prefer_cloud=14)
    assert out["cloud_capacity_requests"] == pytest.approx(4 * (201 + 101))
    assert out["bound"] == pytest.approx(14 / 20)
    # A cloud ready after the last arrival: nothing after ready, no capacity, no bound.
    late = capacity_bound([-1.0], 0.1, 1, after_ready=0, prefer_cloud=0)
    assert late["bound"] is None and late["cloud_capacity_requests"] == 0
    assert capacity_bound([-1.0, 0.0], 0.1, 2, 1, 1)["cloud_capacity_requests"] == 2
    with pytest.raises(ValueError):
        capacity_bound([1.0], 0.0, 1, after_ready=1, prefer_cloud=1)
    with pytest.raises(ValueError):
        capacity_bound([1.0], 0.1, 1, after_ready=1, prefer_cloud=2)


def _row(arrival: float, cls: str, role: str) -> dict[str, Any]:
    return {"burst": 0, "arrival_s": arrival, "cls": cls, "role": role, "timings": {}}


def test_run_capacity_bound_counts_post_ready_requests() -> None:
    log = [_row(0.0, "critical", "edge"), _row(1.0, "normal", "cloud"),
           _row(1.5, "critical", "edge"), _row(2.0, "quality", "cloud")]  # fmt: skip
    summary = {"request_log": log, "bursts": [{"burst": 0, "cloud_ready_s": 1.0}],
               "large_share_after_ready": 2 / 3}  # fmt: skip
    slow = run_capacity_bound(summary, service_s=0.05, edge_s=0.01)
    assert slow is not None
    assert (slow["after_ready"], slow["prefer_cloud"], slow["batch"]) == (3, 2, 1)
    assert slow["bound"] == pytest.approx(2 / 3) and slow["reached_of_bound"] == pytest.approx(1)
    fast = run_capacity_bound(summary, service_s=0.005, edge_s=0.01)
    assert fast is not None and fast["bound"] == pytest.approx(1.0)
    assert run_capacity_bound(summary, service_s=None, edge_s=0.01) is None


def _summary(p99: float, attained: dict[str, int]) -> dict[str, Any]:
    return {
        "latency_ok": {"p99_s": p99},
        "by_class": {cls: {"p99_s": p99, "attained": n, "sent": 10} for cls, n in attained.items()},
    }


def test_compare_modes() -> None:
    edge = _summary(0.2, {"critical": 9, "normal": 8, "quality": 10})
    coop = _summary(0.21, {"critical": 9, "normal": 9, "quality": 10})
    out = compare_modes(coop, edge)
    assert out["critical_p99_ratio"] == pytest.approx(1.05) and out["critical_p99_ok"]
    assert out["never_worse"] is True
    worse = compare_modes(_summary(0.3, {"critical": 8, "normal": 9, "quality": 10}), edge)
    assert worse["never_worse"] is False and worse["critical_p99_ok"] is False
    assert worse["attainment_by_class"]["critical"]["not_worse"] is False


def test_what_if_profile(tmp_path: Path) -> None:
    from benchmarks.handoff.standin_cloud import DEFAULT_PROFILE
    from benchmarks.handoff.what_if import load_profile

    assert load_profile(None) == DEFAULT_PROFILE
    path = tmp_path / "gpu.json"
    path.write_text('{"service_s": 0.004, "source": "measured on an H100"}')
    assert load_profile(path) == {"service_s": 0.004, "source": "measured on an H100"}
    path.write_text('{"service_s": 0}')
    with pytest.raises(SystemExit):
        load_profile(path)
