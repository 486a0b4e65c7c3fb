"""The WHAT-IF run: the real coordinator and edge agent, the same trace, with a stand-in cloud
worker (standin_cloud.py) whose forward takes a GPU profile's time instead of this CPU's. It
shows the policy when the cloud is faster than the edge; it measures no GPU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from benchmarks.handoff.assets import Assets
from benchmarks.handoff.bound import compare_modes, run_capacity_bound
from benchmarks.handoff.common import median
from benchmarks.handoff.policies import PolicyOptions, StandInProfile, run_policy
from benchmarks.handoff.standin_cloud import DEFAULT_PROFILE
from benchmarks.handoff.trace import Arrival

WHAT_IF_LABEL = "WHAT-IF cooperative (stand-in GPU cloud)"
DEFAULT_COLD_START_S = 2.0  # when this run measured no cold start to copy


def load_profile(path: Path | None) -> dict[str, Any]:
    """The GPU profile: `path`'s JSON ({"service_s": seconds, "source": ...}) or the default."""
    if path is None:
        return dict(DEFAULT_PROFILE)
    data = json.loads(path.read_text())
    service = float(data["service_s"])
    if not 0 < service < 10:
        raise SystemExit(f"{path}: service_s {service!r} is not a forward time in seconds")
    return {"service_s": service, "source": str(data.get("source", path))}


async def run_what_if(
    policies: dict[str, dict[str, Any]],
    trace: list[Arrival],
    assets: Assets,
    opts: PolicyOptions,
    work: Path,
    profile_path: Path | None,
    cold_start_s: float | None = None,
) -> dict[str, Any]:
    """Cooperative with the stand-in cloud; judged against this run's edge-only. The stand-in's
    cold start copies the real cloud's (median, this run) so 'after ready' means the same,
    unless `cold_start_s` is given."""
    profile = load_profile(profile_path)
    colds = [
        b["cold_start_s"]
        for b in policies["cooperative"]["bursts"]
        if b.get("cold_start_s") is not None
    ]
    cold = cold_start_s if cold_start_s is not None else median(colds) or DEFAULT_COLD_START_S
    standin = StandInProfile(profile["service_s"], cold, profile["source"])
    summary = await run_policy(
        "cooperative", trace, assets, dataclasses.replace(opts, standin=standin), work
    )
    return judge_what_if(summary, policies["edge-only"], profile, [cold])


def judge_what_if(
    summary: dict[str, Any], edge: dict[str, Any], profile: dict[str, Any], colds: list[float]
) -> dict[str, Any]:
    """The what-if's figures: its capacity bound, and its comparison with `edge` (edge-only's
    summary) — for one run, or for the pooled runs of `--rounds` (rounds.py)."""
    cold = median(colds)
    cold = DEFAULT_COLD_START_S if cold is None else cold
    pooled = f" (pooled over {len(colds)} rounds)" if len(colds) > 1 else ""
    return {
        "label": WHAT_IF_LABEL,
        "note": "WHAT-IF, not a measurement of a GPU: real coordinator and edge agent, a "
        f"stand-in cloud worker process that sleeps {profile['service_s'] * 1e3:g} ms a "
        f"forward ({profile['source']}) after a {cold:.2f} s emulated cold start{pooled}",
        "profile": profile,
        "cold_start_s": cold,
        "cold_starts_s": colds,
        "summary": summary,
        "capacity_bound": run_capacity_bound(
            summary, summary["cloud_compute_median_s"], edge["edge_compute_median_s"]
        ),
        "comparison": compare_modes(summary, edge),
    }
