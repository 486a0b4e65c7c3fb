"""The handoff benchmark's rounds (benchmarks/handoff/rounds.py): pooling the runs of one policy
and judging each round alone. Pure functions over summaries that summarize_policy builds, no
processes."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import pytest

from benchmarks.handoff.policies import Outcome, summarize_policy
from benchmarks.handoff.rounds import compare_rounds, pool_summaries


def _run(policy: str, latencies: list[float], ready: float | None, role: str) -> dict[str, Any]:
    """One policy run of one burst: critical requests 0.1 s apart, all OK."""
    rows = [
        Outcome(index=i, burst=0, cls="critical", deadline_s=0.5, sent_priority=0,
                sent_deadline_s=0.5, arrival_s=0.1 * i, scheduled_s=0.1 * i, latency_s=lat,
                status="OK", role=role if ready is not None and 0.1 * i >= ready else "edge",
                ids=[f"{policy}-{lat}-{i}"], timings={"compute_s": lat / 2}, ready_s=ready)
        for i, lat in enumerate(latencies)
    ]  # fmt: skip
    summary = summarize_policy(policy, rows)
    summary.update(
        integrity={"sent": len(rows), "outcomes": len(rows), "lost": 0, "duplicates": 0},
        bursts=[{"burst": 0, "cloud_ready_s": ready, "cold_start_s": ready}],
        loadavg_before=0.5,
        cpu={"wall_s": 10.0, "machine_busy_cores": 1.0, "benchmark_cores": 0.8,
             "other_busy_cores": 0.2},
        coordinator_metrics={"malformed": 0},
        request_log=[asdict(o) for o in rows],
    )  # fmt: skip
    return summary


def test_pooling_takes_every_request_of_every_round() -> None:
    first = _run("edge-only", [0.10, 0.12, 0.30], None, "edge")
    second = _run("edge-only", [0.11, 0.13, 0.14, 0.50], None, "edge")
    second["cpu"] = {"wall_s": 30.0, "machine_busy_cores": 2.0, "benchmark_cores": 1.2,
                     "other_busy_cores": 0.8}  # fmt: skip
    pooled = pool_summaries("edge-only", [first, second])
    every = [0.10, 0.12, 0.30, 0.11, 0.13, 0.14, 0.50]
    assert pooled["requests"] == 7 and len(pooled["request_log"]) == 7
    assert pooled["by_class"]["critical"]["p99_s"] == pytest.approx(np.percentile(every, 99))
    assert pooled["integrity"] == {"sent": 7, "outcomes": 7, "lost": 0, "duplicates": 0}
    # Bursts are numbered on across rounds, and the rows follow their burst.
    assert [(b["burst"], b["round"]) for b in pooled["bursts"]] == [(0, 0), (1, 1)]
    assert sorted({r["burst"] for r in pooled["request_log"]}) == [0, 1]
    # CPU shares weighted by wall time: (0.2 x 10 + 0.8 x 30) / 40.
    assert pooled["cpu"]["other_busy_cores"] == pytest.approx(0.65)
    assert pooled["cpu"]["wall_s"] == 40.0
    assert pooled["rounds"] == 2
    # One round is that round, unchanged; no rounds is an error.
    assert pool_summaries("edge-only", [first])["request_log"] == first["request_log"]
    with pytest.raises(ValueError):
        pool_summaries("edge-only", [])


def test_pooled_post_ready_figures_stay_per_round() -> None:
    """Each round's rows keep their own ready time, so 'after ready' and the capacity bound's
    windows are counted per burst of each round."""
    a = _run("cooperative", [0.1] * 10, 0.45, "cloud")  # ready after 5 arrivals
    b = _run("cooperative", [0.1] * 10, 0.75, "cloud")  # after 8
    pooled = pool_summaries("cooperative", [a, b])
    assert pooled["arrived_after_ready"] == 5 + 2
    assert pooled["large_share_after_ready"] == pytest.approx(1.0)


def test_each_round_is_judged_alone() -> None:
    edge = [_run("edge-only", [0.2, 0.2, 0.2], None, "edge") for _ in range(2)]
    coop = [_run("cooperative", [0.2, 0.2, 0.2], 0.05, "cloud"),
            _run("cooperative", [0.2, 0.2, 0.4], 0.05, "cloud")]  # fmt: skip
    rounds = compare_rounds({"edge-only": edge, "cooperative": coop}, [])
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["critical_p99_ratio"] == pytest.approx(1.0)
    assert rounds[1]["critical_p99_ratio"] > 1.1
    assert all("what_if" not in r for r in rounds)


def test_a_burner_keeps_to_the_cores_asked_and_is_gone_after() -> None:
    import os

    import psutil

    from benchmarks.handoff.common import burner

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("pinning a burner apart needs two cores")
    pin = (set(cores[:-1]), {cores[-1]})
    with burner(None, pin) as none:
        assert none is None
    for where, expected in (("cloud", pin[1]), ("edge", pin[0]), ("free", None)):
        with burner(where, pin) as burning:
            proc = psutil.Process(burning["pid"])
            assert proc.is_running() and burning["where"] == where
            if expected is not None:
                assert set(proc.cpu_affinity()) == expected == set(burning["cores"])
        assert not proc.is_running()  # killed and reaped
    with pytest.raises(ValueError, match="pinning"), burner("edge", None):
        pass
