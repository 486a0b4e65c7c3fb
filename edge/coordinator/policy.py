"""The handoff policy: where a request should run, from estimates of both sides.

Pure functions of a snapshot, so they are tested without sockets or sleeping:

    edge  estimate = queue + edge compute
    cloud estimate = max(residency ETA, queue) + cloud compute + network

* latency-critical (0): the side that answers soonest; never waits for a cloud that is not
  ready.
* normal (1): the cloud when it is ready and its estimate fits the deadline, else the edge.
* quality-seeking (2): the cloud as soon as its estimate fits the deadline (it may start on a
  loading worker: stage-pipelined execution), else the edge.

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

    @property
    def available(self) -> bool:
        return self.workers > 0 and self.capacity > 0

    def queue_s(self) -> float:
        if not self.available:
            return math.inf
        ahead = max(0, self.inflight + self.queued - self.capacity + 1)
        return ahead * self.compute_s / self.capacity

    def estimate(self) -> float:
        if not self.available:
            return math.inf
        return max(self.eta_s, self.queue_s()) + self.compute_s + self.network_s


@dataclass(frozen=True)
class Decision:
    route: Route
    edge_estimate_s: float
    cloud_estimate_s: float


def choose(priority: int, remaining_s: float | None, edge: SideView, cloud: SideView) -> Decision:
    """Route one request with `remaining_s` of its deadline left (None: no deadline)."""
    e, c = edge.estimate(), cloud.estimate()

    def fits(estimate: float) -> bool:
        return math.isfinite(estimate) and (remaining_s is None or estimate <= remaining_s)

    def decide(route: Route) -> Decision:
        return Decision(route, e, c)

    if not edge.available and not cloud.available:
        return decide(Route.UNAVAILABLE)
    if remaining_s is not None and remaining_s <= 0:
        return decide(Route.TOO_LATE)
    edge_now = edge.available and edge.ready
    if priority <= CRITICAL:
        if cloud.available and cloud.ready and (c < e or not edge_now):
            return decide(Route.CLOUD)
        if edge_now:
            return decide(Route.EDGE)
        return decide(Route.UNAVAILABLE)  # nobody ready: critical work never waits
    if priority == NORMAL and cloud.ready and fits(c):
        return decide(Route.CLOUD)
    if priority >= QUALITY and fits(c):
        return decide(Route.CLOUD)
    if edge_now or (edge.available and fits(e)):
        return decide(Route.EDGE)
    if fits(c):
        return decide(Route.CLOUD)
    return decide(Route.TOO_LATE if cloud.available or edge.available else Route.UNAVAILABLE)
