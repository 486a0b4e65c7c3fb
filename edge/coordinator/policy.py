"""The handoff policy: where a request should run, from estimates of both sides.

Pure functions of a snapshot, so they are tested without sockets or sleeping:

    edge  estimate = queue + edge compute
    cloud estimate = max(residency ETA, queue) + cloud compute + network

where a side's queue is the requests queued there that are dispatched before this one (those
of its priority or a more urgent one), when the coordinator says (`queued_by_priority`).

A side whose workers batch (they report `batch_marginal` m: cloud/batching.py) runs up to
B = capacity / workers requests as one forward costing compute_s x f(k), f(k) = 1 + (k - 1) m;
its compute is that of the batch the request would join (k = min(B, the work running and queued
per worker, this request included): every request of a batch waits for the whole forward), and
its queue drains B requests per worker per full batch. Without m: one request per slot, as above.

* latency-critical (0): the side that answers soonest; never waits for a cloud that is not
  ready, and is never sent to one by the default compute time (DEFAULT_CLOUD_COMPUTE_S): a cloud
  counts as sooner than the edge only once it measured its own. (Right after a CPU worker's
  load, with nothing measured, the 0.2 s default beat a backed-up edge: critical requests with
  0.5 s deadlines went to a worker whose first forwards took 0.5–1.4 s, and timed out there —
  benchmarks/handoff, 2026-12-03.)
* normal (1): the cloud when it is ready, has a slot that no request queued for it waits for,
  and its estimate fits the deadline; else the edge. Normal work is served well by the edge, so
  it does not queue for a cloud slower than the edge: the cloud's slots (one per CPU worker) go
  to the work that asked for the large model. (Normal work is dispatched before quality work,
  and queued for a busy cloud it took every slot that came free and swelled the queue that
  quality work's estimate counts, so that quality work was moved to the edge: 0 of 8 quality
  requests went to a ready cloud in a measured `cicada demo`.) A ready cloud that answers sooner
  than the edge even after its queue (a GPU worker: milliseconds a forward) does take normal
  work when it fits: with one 5 ms stand-in cloud slot, the ~10 % of normal requests that found
  it busy went to a 180 ms edge (benchmarks/handoff what-if: 79 % of post-ready requests to the
  cloud; 98–99 % since).
* quality-seeking (2): the cloud as soon as its estimate fits the deadline (it may start on a
  loading worker: stage-pipelined execution), else the edge — and, where an edge is ready,
  only while the deadline also leaves the edge's estimate after the cloud's (c + e <= time
  left). A request is decided again whenever a slot frees, so one held for a cloud that falls
  behind its estimate (its forwards slowed by another process, a cold start longer than its
  ETA) moves to the edge while the edge can still answer it in time, not once the cloud's
  estimate no longer fits: by then the edge, busy with the more urgent classes, could not
  either (9 quality requests expired queued in one cooperative round with another process on
  the cloud's core that edge-only met; benchmarks/handoff, 2026-12-03).

With no edge at all, normal and quality work may still go to a loading cloud if it fits;
otherwise the answer is UNAVAILABLE (nobody can serve it) or TIMEOUT (nobody in time). Either
side may be not `ready` (its workers cold or loading, with an ETA): latency-critical work
never waits for one, other work only when its estimate (ETA included) fits the deadline.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from cicada.common.defaults import CRITICAL, NORMAL, QUALITY

DEFAULT_EDGE_COMPUTE_S = 0.01
DEFAULT_CLOUD_COMPUTE_S = 0.2
DEFAULT_NETWORK_S = 0.002


class Route(enum.Enum):
    EDGE = "edge"
    CLOUD = "cloud"
    UNAVAILABLE = "unavailable"  # no worker at all for the model
    TOO_LATE = "too_late"  # nobody can finish within the deadline


@dataclass(frozen=True)
class SideView:
    """One side (edge or cloud) of one model, as the coordinator sees it now."""

    workers: int  # registered, not draining
    capacity: int  # total concurrent slots of those workers
    inflight: int  # running now
    queued: int  # waiting in the coordinator for this side
    compute_s: float  # seconds per request
    ready: bool = True  # some worker is `ready` (a cloud one: every stage resident)
    eta_s: float = 0.0  # if none is: seconds until the soonest will be
    network_s: float = 0.0
    # False: `compute_s` is a default, no worker has measured one. Then a request that would
    # queue behind others cannot be estimated, and is not held for this side: the default
    # (0.2 s, an idle machine's forward) was ten times too short for a busy 2-core machine,
    # and a cold cloud was promised ten quality requests that all ended on the edge, late.
    compute_measured: bool = True
    # Workers that batch: what each request a forward adds costs, as a fraction of compute_s.
    batch_marginal: float | None = None
    # `queued` by priority (index: 0 latency-critical ...), when known: a request of priority p
    # waits only for those of priority <= p, which are dispatched before it. Counting the whole
    # queue made a backed-up edge look slower than a 0.5 s CPU cloud to latency-critical work,
    # which then timed out on the cloud where the edge would have served it in ~0.15 s.
    queued_by_priority: tuple[int, ...] = ()

    def ahead_of(self, priority: int | None) -> int:
        """Queued requests that go before one of `priority` (None: all of them)."""
        if priority is None or not self.queued_by_priority:
            return self.queued
        return sum(self.queued_by_priority[: priority + 1])

    def batch_cost(self, k: int) -> float:
        """What a forward of k requests costs, in units of compute_s (k without batching)."""
        m = 1.0 if self.batch_marginal is None else self.batch_marginal
        return 1.0 + (k - 1) * m

    @property
    def available(self) -> bool:
        return self.workers > 0 and self.capacity > 0

    def queue_s(self, priority: int | None = None) -> float:
        if not self.available:
            return math.inf
        ahead = max(0, self.inflight + self.ahead_of(priority) - self.capacity + 1)
        if ahead and not self.compute_measured:
            return math.inf
        if self.batch_marginal is None:
            return ahead * self.compute_s / self.capacity
        per_worker = max(1, self.capacity // max(1, self.workers))  # B
        return ahead * self.compute_s * self.batch_cost(per_worker) / self.capacity

    @property
    def idle_slot(self) -> bool:
        """A slot is free that none of the requests queued for this side waits for."""
        return self.available and self.inflight + self.queued < self.capacity

    def estimate(self, priority: int | None = None) -> float:
        """When a request of `priority` (None: behind everything queued) would be answered."""
        if not self.available:
            return math.inf
        compute = self.compute_s
        if self.batch_marginal is not None:  # the batch it would join, running work counted
            per_worker = max(1, self.capacity // max(1, self.workers))
            ahead = self.inflight + self.ahead_of(priority) + 1
            k = min(per_worker, -(-ahead // max(1, self.workers)))
            compute *= self.batch_cost(k)
        return max(self.eta_s, self.queue_s(priority)) + compute + self.network_s


@dataclass(frozen=True)
class Decision:
    route: Route
    edge_estimate_s: float
    cloud_estimate_s: float


def choose(priority: int, remaining_s: float | None, edge: SideView, cloud: SideView) -> Decision:
    """Route one request with `remaining_s` of its deadline left (None: no deadline)."""
    e, c = edge.estimate(priority), cloud.estimate(priority)

    def fits(estimate: float) -> bool:
        return math.isfinite(estimate) and (remaining_s is None or estimate <= remaining_s)

    def decide(route: Route) -> Decision:
        return Decision(route, e, c)

    if not edge.available and not cloud.available:
        return decide(Route.UNAVAILABLE)
    if remaining_s is not None and remaining_s <= 0:
        return decide(Route.TOO_LATE)
    edge_now = edge.available and edge.ready
    # Sooner than the edge only by a compute time the cloud measured, not by the default.
    # (Normal work's `c < e` needs no such test: it matters only for a busy cloud, and an
    # unmeasured busy cloud's estimate is already infinite.)
    cloud_sooner = c < e and cloud.compute_measured
    if priority <= CRITICAL:
        if cloud.available and cloud.ready and (cloud_sooner or not edge_now):
            return decide(Route.CLOUD)
        if edge_now:
            return decide(Route.EDGE)
        return decide(Route.UNAVAILABLE)  # nobody ready: critical work never waits
    if priority == NORMAL and cloud.ready and (cloud.idle_slot or c < e) and fits(c):
        return decide(Route.CLOUD)
    # (An edge whose estimate is unknown, nothing measured behind a queue, offers no fallback
    # to keep time for.)
    edge_fallback = edge_now and math.isfinite(e)
    if priority >= QUALITY and fits(c) and (not edge_fallback or fits(c + e)):
        return decide(Route.CLOUD)
    if edge_now or (edge.available and fits(e)):
        return decide(Route.EDGE)
    if fits(c):
        return decide(Route.CLOUD)
    return decide(Route.TOO_LATE if cloud.available or edge.available else Route.UNAVAILABLE)
