"""What the hardware allows: the capacity bound on the large model's share after it is ready,
and the cooperative-vs-edge-only comparisons judged in the same run.

The capacity bound (formula, also in BENCHMARKS.md):

    C     = sum over bursts b of  B * (W_b / t_s + 1)          cloud answers possible
    W_b   = last arrival of burst b - cloud ready of burst b    post-ready window (bursts
            whose cloud is ready after their last arrival have none and add nothing)
    N     = requests arriving after the cloud is ready
    N_pref = those of N that prefer the cloud: all of them when a cloud forward is no slower
             than an edge one, else the non-critical ones (latency-critical requests go to the
             side that answers soonest: the edge)
    bound = min(N_pref, C) / N

B is the cloud worker's batch capacity (dispatches per forward; 1 when it does not batch), t_s
the measured (median) time of one cloud forward after ready. The `+ 1` is the forward that can
start at the last arrival. It is an upper bound: it ignores the backlog of requests queued for
the cloud before it was ready, which eat into C too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.handoff.common import CLASSES, ratio

TARGET_REACHED_OF_BOUND = 0.95
TARGET_CRITICAL_P99_RATIO = 1.1


def capacity_bound(
    windows_s: Sequence[float],
    service_s: float,
    batch: int,
    after_ready: int,
    prefer_cloud: int,
) -> dict[str, float | None]:
    """The bound above: `windows_s` are the W_b (one per burst with a ready cloud)."""
    if service_s <= 0 or batch < 1:
        raise ValueError(f"service_s {service_s!r} and batch {batch!r} must be positive")
    if not 0 <= prefer_cloud <= after_ready:
        raise ValueError(f"prefer_cloud {prefer_cloud} not in [0, after_ready {after_ready}]")
    # A cloud ready after its burst's last arrival (W < 0) has no post-ready window: nothing.
    capacity = sum(batch * (w / service_s + 1) for w in windows_s if w >= 0)
    bound = None if after_ready == 0 else min(prefer_cloud, capacity) / after_ready
    return {"cloud_capacity_requests": capacity, "bound": bound}


def run_capacity_bound(
    summary: dict[str, Any], service_s: float | None, edge_s: float | None
) -> dict[str, Any] | None:
    """The bound for one policy run (its summary, see policies.summarize_policy), against the
    share it reached. None without a measured cloud service time."""
    if not service_s:
        return None
    log = summary["request_log"]
    windows, after, prefer = [], 0, 0
    cloud_faster = edge_s is None or service_s <= edge_s
    for burst in summary["bursts"]:
        ready = burst.get("cloud_ready_s")
        if ready is None:
            continue
        rows = [r for r in log if r["burst"] == burst["burst"]]
        if rows:
            windows.append(max(r["arrival_s"] for r in rows) - ready)
        post = [r for r in rows if r["arrival_s"] >= ready]
        after += len(post)
        prefer += sum(1 for r in post if cloud_faster or r["cls"] != "critical")
    batch = max(
        (int(r["timings"].get("batch_size", 1)) for r in log if r["role"] == "cloud"), default=1
    )
    out: dict[str, Any] = capacity_bound(windows, service_s, batch, after, prefer)
    reached = summary["large_share_after_ready"]
    out.update(
        service_s=service_s,
        batch=batch,
        windows_s=windows,
        after_ready=after,
        prefer_cloud=prefer,
        cloud_faster_than_edge=cloud_faster,
        reached=reached,
        reached_of_bound=ratio(reached, out["bound"]),
    )
    return out


def compare_modes(coop: dict[str, Any], edge: dict[str, Any]) -> dict[str, Any]:
    """Cooperative against edge-only in the same run: the latency-critical p99 ratio, and
    deadline attainment per class (cooperation must never be worse for any class)."""
    crit = ratio(coop["by_class"]["critical"]["p99_s"], edge["by_class"]["critical"]["p99_s"])
    classes: dict[str, dict[str, Any]] = {}
    for cls in CLASSES:
        c, e = coop["by_class"][cls], edge["by_class"][cls]
        share_c = c["attained"] / c["sent"] if c["sent"] else None
        share_e = e["attained"] / e["sent"] if e["sent"] else None
        classes[cls] = {
            "cooperative": share_c,
            "edge_only": share_e,
            "not_worse": None if share_c is None or share_e is None else share_c >= share_e,
        }
    verdicts = [v["not_worse"] for v in classes.values() if v["not_worse"] is not None]
    return {
        "critical_p99_s": {
            "cooperative": coop["by_class"]["critical"]["p99_s"],
            "edge_only": edge["by_class"]["critical"]["p99_s"],
        },
        "critical_p99_ratio": crit,
        "critical_p99_ok": None if crit is None else crit <= TARGET_CRITICAL_P99_RATIO,
        "overall_p99_ratio": ratio(coop["latency_ok"]["p99_s"], edge["latency_ok"]["p99_s"]),
        "attainment_by_class": classes,
        "never_worse": all(verdicts) if verdicts else None,
    }
