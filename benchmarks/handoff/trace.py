"""Part A's bursty trace: Poisson arrivals in bursts, with mixed priorities."""

from __future__ import annotations

import random
from dataclasses import dataclass

from benchmarks.handoff.common import CLASSES, MIX

# -- A: policies on a bursty trace -----------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    index: int
    burst: int
    offset_s: float  # from the burst's first request
    cls: str
    priority: int
    deadline_s: float


def make_trace(bursts: int, per_burst: int, rate: float, seed: int) -> list[Arrival]:
    """Poisson arrivals at `rate` req/s within each burst; classes drawn from MIX."""
    rng = random.Random(seed)
    names, weights = zip(*MIX, strict=True)
    trace: list[Arrival] = []
    for b in range(bursts):
        t = 0.0
        for _ in range(per_burst):
            cls = rng.choices(names, weights)[0]
            priority, deadline = CLASSES[cls]
            trace.append(Arrival(len(trace), b, t, cls, priority, deadline))
            t += rng.expovariate(rate)
    return trace
