"""What the live page costs the coordinator: `python3 -m benchmarks.live_status`.

* per request, on the broker's thread: `CoordinatorMetrics.observe` as the broker calls it
  (the Prometheus counter and histogram, plus the live rings) against the same call with the
  live rings switched off, measured interleaved in the same run; the ratio is the result;
* per page refresh, on an HTTP thread: building `/status.json` with every ring full (50 recent
  requests, 32 series of 240 points) and 16 workers, and its size.

No process or socket is involved: this isolates the bookkeeping. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.machine import machine_info
from cicada.common.protocol import Role, WorkerState
from cicada.edge.coordinator.live import LATENCY_SERIES
from cicada.edge.coordinator.metrics import CoordinatorMetrics


@dataclass
class _Worker:  # the attributes of registry.WorkerInfo the page reads
    name: str
    role: Role
    models: list[str]
    state: WorkerState = WorkerState.READY
    variant: str = "v"
    resident_stages: int = 26
    total_stages: int = 26
    eta_s: float | None = None
    compute_s: float | None = 0.01
    capacity: int = 2
    inflight: dict[str, Any] = field(default_factory=dict)
    batch_marginal: float | None = None
    phase: str | None = "ready"
    phase_s: float | None = 1.0
    read_stages: int = 26
    read_bytes: int = 1_420_000_000
    total_bytes: int = 1_420_000_000


SERVED = {"role": "edge", "worker": "edge-a", "variant": "v"}


def _per_call_ns(metrics: CoordinatorMetrics, n: int) -> float:
    observe = metrics.observe
    start = time.perf_counter_ns()
    for i in range(n):
        observe("gpt2", "edge", "OK", 0.004, priority=i % 3, served_by=SERVED)
    return (time.perf_counter_ns() - start) / n


def observe_cost(rounds: int, n: int) -> dict[str, Any]:
    with_live, without = CoordinatorMetrics(), CoordinatorMetrics()
    without.live.request_ended = lambda *a, **k: None  # type: ignore[method-assign]
    on, off = [], []
    for _ in range(rounds):  # interleaved: both see the same machine noise
        on.append(_per_call_ns(with_live, n))
        off.append(_per_call_ns(without, n))
    on_ns, off_ns = statistics.median(on), statistics.median(off)
    return {
        "observe_ns_with_live": round(on_ns),
        "observe_ns_without_live": round(off_ns),
        "ratio": round(on_ns / off_ns, 3),
        "live_ns_per_request": round(on_ns - off_ns),
    }


def snapshot_cost(rounds: int) -> dict[str, Any]:
    metrics = CoordinatorMetrics()
    models = [f"m{i}" for i in range(LATENCY_SERIES // 2)]
    for i in range(LATENCY_SERIES * 240):
        metrics.observe(models[i % len(models)], ("edge", "cloud")[(i // len(models)) % 2], "OK",
                        0.001 * (i % 50 + 1), priority=i % 3, served_by=SERVED)  # fmt: skip
    workers = [_Worker(f"w{i}", (Role.EDGE, Role.CLOUD)[i % 2], [models[i % len(models)]])
               for i in range(16)]  # fmt: skip
    metrics.set_workers(workers)
    for model in models:
        for priority in range(3):
            metrics.set_queue_depth(model, priority, priority)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        body = json.dumps(metrics.live.snapshot(), allow_nan=False, separators=(",", ":"))
        times.append(time.perf_counter() - start)
    return {
        "series": sum(len(m["latency"]) for m in metrics.live.snapshot()["models"]),
        "snapshot_ms": round(statistics.median(times) * 1000, 3),
        "json_bytes": len(body),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    opts = ap.parse_args(argv)
    rounds, n = (3, 2_000) if opts.quick else (15, 50_000)
    result = {
        "machine": machine_info(("prometheus-client",)),
        "observe": observe_cost(rounds, n),
        "status_json": snapshot_cost(rounds),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
