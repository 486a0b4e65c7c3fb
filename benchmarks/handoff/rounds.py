"""Rounds (`--rounds R`): the policies run alternately, round after round, and each policy's
requests are pooled before they are judged.

Why. The targets compare cooperative with edge-only "in the same run", but one run of each is
two runs half a minute apart on a VM whose edge forward drifts between them (its median 75–88
ms from one policy run to the next, 2026-12-03), and the p99 of one burst's 91 latency-critical
requests is its second-worst one. With R rounds the policies alternate (edge-only, cooperative,
the what-if, edge-only, ...), so that drift falls on both alike, and each percentile is taken
over R times the requests. Each round is also compared on its own (`results["rounds"]`, printed
beside the pooled verdicts), so that pooling hides no round.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from benchmarks.handoff.bound import compare_modes, run_capacity_bound
from benchmarks.handoff.policies import Outcome, summarize_policy

CPU_SHARES = ("machine_busy_cores", "benchmark_cores", "other_busy_cores")  # common.CpuWindow


def pool_summaries(policy: str, summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One summary (policies.summarize_policy and what run_policy adds) over the runs of one
    policy: every request of every round, bursts numbered on across rounds (each keeps its
    `round`), integrity counts summed, CPU shares weighted by each run's wall time."""
    if not summaries:
        raise ValueError("no runs to pool")
    if len(summaries) == 1:
        return dict(summaries[0])
    rows: list[dict[str, Any]] = []
    bursts: list[dict[str, Any]] = []
    for r, s in enumerate(summaries):
        offset = len(bursts)
        bursts += [{**b, "burst": b["burst"] + offset, "round": r} for b in s["bursts"]]
        rows += [{**row, "burst": row["burst"] + offset, "round": r} for row in s["request_log"]]
    fields = set(Outcome.__dataclass_fields__)
    pooled = summarize_policy(policy, [Outcome(**{k: v for k, v in row.items() if k in fields})
                                       for row in rows])  # fmt: skip
    counts: Counter[str] = Counter()
    for s in summaries:
        counts.update(s["integrity"])
    walls = [s["cpu"]["wall_s"] for s in summaries]

    def weighted(key: str) -> float | None:
        values = [s["cpu"][key] for s in summaries]
        if any(v is None for v in values) or sum(walls) <= 0:
            return None
        return sum(v * w for v, w in zip(values, walls, strict=True)) / sum(walls)

    pooled.update(
        integrity=dict(counts),
        bursts=bursts,
        rounds=len(summaries),
        loadavg_before=summaries[0]["loadavg_before"],
        cpu={"wall_s": sum(walls)} | {k: weighted(k) for k in CPU_SHARES},
        coordinator_metrics=[s["coordinator_metrics"] for s in summaries],
        quiet_wait=[s.get("quiet_wait") for s in summaries],
        request_log=rows,
    )
    return pooled


def compare_rounds(
    runs: dict[str, list[dict[str, Any]]], what_ifs: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each round judged on its own: cooperative (and the what-if) against that round's
    edge-only."""
    out: list[dict[str, Any]] = []
    for r, (coop, edge) in enumerate(zip(runs["cooperative"], runs["edge-only"], strict=True)):
        comp = compare_modes(coop, edge)
        bound = run_capacity_bound(
            coop, coop["cloud_compute_median_s"], coop["edge_compute_median_s"]
        )
        row: dict[str, Any] = {
            "round": r,
            "critical_p99_s": comp["critical_p99_s"],
            "critical_p99_ratio": comp["critical_p99_ratio"],
            "never_worse": comp["never_worse"],
            "reached_of_bound": None if bound is None else bound["reached_of_bound"],
            "edge_compute_median_s": {
                "cooperative": coop["edge_compute_median_s"],
                "edge_only": edge["edge_compute_median_s"],
            },
            "cold_start_s": [b.get("cold_start_s") for b in coop["bursts"]],
        }
        if r < len(what_ifs):
            w = what_ifs[r]["comparison"]
            row["what_if"] = {
                "critical_p99_ratio": w["critical_p99_ratio"],
                "overall_p99_ratio": w["overall_p99_ratio"],
                "never_worse": w["never_worse"],
            }
        out.append(row)
    return out
