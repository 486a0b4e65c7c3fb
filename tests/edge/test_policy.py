"""The handoff policy as a pure function: no sockets, no clock."""

from __future__ import annotations

import math
from typing import Any

from cicada.edge.coordinator.policy import CRITICAL, NORMAL, QUALITY, Route, SideView, choose

EDGE = SideView(workers=1, capacity=2, inflight=0, queued=0, compute_s=0.01)
NO_EDGE = SideView(workers=0, capacity=0, inflight=0, queued=0, compute_s=0.01)
COLD_CLOUD = SideView(workers=1, capacity=1, inflight=0, queued=0, compute_s=0.2, ready=False,
                      eta_s=2.0, network_s=0.002)  # fmt: skip
READY_CLOUD = SideView(workers=1, capacity=1, inflight=0, queued=0, compute_s=0.2, ready=True,
                       network_s=0.002)  # fmt: skip
NO_CLOUD = SideView(workers=0, capacity=0, inflight=0, queued=0, compute_s=0.2, ready=False,
                    eta_s=math.inf)  # fmt: skip


def test_estimates_follow_the_design_formula() -> None:
    assert EDGE.estimate() == 0.01  # queue 0 + compute
    assert COLD_CLOUD.estimate() == 2.0 + 0.2 + 0.002  # max(eta, queue) + compute + network
    busy = SideView(workers=1, capacity=1, inflight=1, queued=2, compute_s=0.2, network_s=0.0)
    assert busy.queue_s() == 3 * 0.2  # three ahead of the next one, one slot
    assert NO_CLOUD.estimate() == math.inf


def test_latency_critical_never_waits_for_a_cold_cloud() -> None:
    assert choose(CRITICAL, None, EDGE, COLD_CLOUD).route is Route.EDGE
    assert choose(CRITICAL, 10.0, NO_EDGE, COLD_CLOUD).route is Route.UNAVAILABLE
    # A ready cloud that answers sooner than a swamped edge does take critical work.
    swamped = SideView(workers=1, capacity=1, inflight=1, queued=50, compute_s=0.05)
    assert choose(CRITICAL, 1.0, swamped, READY_CLOUD).route is Route.CLOUD
    assert choose(CRITICAL, 1.0, EDGE, READY_CLOUD).route is Route.EDGE


def test_quality_work_goes_to_the_cloud_once_its_estimate_fits_the_deadline() -> None:
    assert choose(QUALITY, 5.0, EDGE, COLD_CLOUD).route is Route.CLOUD  # 2.2 s fits 5 s
    assert choose(QUALITY, 1.0, EDGE, COLD_CLOUD).route is Route.EDGE  # 2.2 s does not
    assert choose(QUALITY, None, EDGE, COLD_CLOUD).route is Route.CLOUD  # no deadline: wait
    assert choose(QUALITY, 1.0, EDGE, READY_CLOUD).route is Route.CLOUD


def test_normal_work_takes_the_cloud_only_when_it_is_ready() -> None:
    assert choose(NORMAL, 5.0, EDGE, COLD_CLOUD).route is Route.EDGE
    assert choose(NORMAL, 5.0, EDGE, READY_CLOUD).route is Route.CLOUD
    assert choose(NORMAL, 0.1, EDGE, READY_CLOUD).route is Route.EDGE  # 0.202 s > 0.1 s
    # No edge at all: a loading cloud is still better than nothing when it fits.
    assert choose(NORMAL, 5.0, NO_EDGE, COLD_CLOUD).route is Route.CLOUD
    assert choose(NORMAL, 1.0, NO_EDGE, COLD_CLOUD).route is Route.TOO_LATE


def test_normal_work_never_queues_for_the_cloud_that_quality_work_waits_for() -> None:
    """One cloud slot, busy, with a quality request queued for it: normal work takes the edge
    (where it was taking the slot ahead of the quality request, dispatched after it), while
    quality work still waits for the cloud when its estimate fits."""
    busy = SideView(workers=1, capacity=1, inflight=1, queued=0, compute_s=0.2, ready=True)
    waited_for = SideView(workers=1, capacity=1, inflight=0, queued=1, compute_s=0.2, ready=True)
    for cloud in (busy, waited_for):
        assert not cloud.idle_slot
        assert choose(NORMAL, 5.0, EDGE, cloud).route is Route.EDGE
        assert choose(QUALITY, 5.0, EDGE, cloud).route is Route.CLOUD
    assert READY_CLOUD.idle_slot and choose(NORMAL, 5.0, EDGE, READY_CLOUD).route is Route.CLOUD
    # Without an edge, normal work still waits for a busy cloud when it fits.
    assert choose(NORMAL, 5.0, NO_EDGE, busy).route is Route.CLOUD


def test_normal_work_queues_for_a_cloud_that_answers_sooner_than_the_edge() -> None:
    """A busy cloud that is faster than the edge even after its queue (a GPU worker) takes
    normal work; a busy cloud slower than the edge does not (the CPU case above)."""
    fast_busy = SideView(workers=1, capacity=1, inflight=1, queued=1, compute_s=0.005,
                         ready=True, network_s=0.002)  # fmt: skip
    slow_edge = SideView(workers=1, capacity=2, inflight=0, queued=0, compute_s=0.18)
    assert not fast_busy.idle_slot
    decision = choose(NORMAL, 2.0, slow_edge, fast_busy)
    assert decision.cloud_estimate_s < decision.edge_estimate_s
    assert decision.route is Route.CLOUD
    assert choose(NORMAL, 0.01, slow_edge, fast_busy).route is Route.EDGE  # does not fit
    cold_fast = SideView(workers=1, capacity=1, inflight=0, queued=0, compute_s=0.005,
                         ready=False, eta_s=0.05)  # fmt: skip
    assert choose(NORMAL, 2.0, slow_edge, cold_fast).route is Route.EDGE  # not ready


def test_an_unmeasured_cloud_holds_no_queue() -> None:
    """Until a cloud worker has measured its compute time, work that would queue behind others
    there is not held for it (the default says nothing of this machine); a free slot still
    takes it."""
    unmeasured = dict(workers=1, capacity=1, compute_s=0.2, ready=False, eta_s=1.0,
                      compute_measured=False)  # fmt: skip
    free = SideView(inflight=0, queued=0, **unmeasured)  # type: ignore[arg-type]
    taken = SideView(inflight=1, queued=0, **unmeasured)  # type: ignore[arg-type]
    assert choose(QUALITY, 8.0, EDGE, free).route is Route.CLOUD
    assert choose(QUALITY, 8.0, EDGE, taken).route is Route.EDGE
    measured = SideView(workers=1, capacity=1, inflight=1, queued=0, compute_s=0.2, ready=False,
                        eta_s=1.0)  # fmt: skip
    assert choose(QUALITY, 8.0, EDGE, measured).route is Route.CLOUD


def test_a_cloud_is_sooner_than_the_edge_only_by_a_compute_time_it_measured() -> None:
    """Latency-critical work goes to the cloud by the cloud's own measured compute time, never
    by the default: with none measured it stays on a backed-up edge, unless there is no edge."""
    backed_up = SideView(workers=1, capacity=2, inflight=2, queued=20, compute_s=0.09)
    guessed = SideView(workers=1, capacity=1, inflight=0, queued=0, compute_s=0.2, ready=True,
                       compute_measured=False)  # fmt: skip
    measured = SideView(workers=1, capacity=1, inflight=0, queued=0, compute_s=0.2, ready=True)
    assert guessed.estimate() < backed_up.estimate()
    assert choose(CRITICAL, 0.5, backed_up, guessed).route is Route.EDGE
    assert choose(CRITICAL, 0.5, backed_up, measured).route is Route.CLOUD
    assert choose(CRITICAL, 0.5, NO_EDGE, guessed).route is Route.CLOUD
    # An idle slot still takes normal work: that is how a cloud gets measured at all.
    assert choose(NORMAL, 2.0, backed_up, guessed).route is Route.CLOUD


def test_nobody_or_no_time_left() -> None:
    assert choose(NORMAL, 1.0, NO_EDGE, NO_CLOUD).route is Route.UNAVAILABLE
    assert choose(QUALITY, 0.0, EDGE, READY_CLOUD).route is Route.TOO_LATE
    assert choose(NORMAL, -1.0, EDGE, READY_CLOUD).route is Route.TOO_LATE


def test_decision_reports_both_estimates() -> None:
    decision = choose(QUALITY, 5.0, EDGE, COLD_CLOUD)
    assert decision.edge_estimate_s == EDGE.estimate()
    assert decision.cloud_estimate_s == COLD_CLOUD.estimate()


def test_a_batching_cloud_is_estimated_by_the_batch_a_request_would_join() -> None:
    # One worker batching up to 8; a batch of k costs 0.2 x (1 + (k - 1) x 0.25).
    def cloud(inflight: int, queued: int) -> SideView:
        return SideView(workers=1, capacity=8, inflight=inflight, queued=queued, compute_s=0.2,
                        network_s=0.0, batch_marginal=0.25)  # fmt: skip

    assert cloud(0, 0).estimate() == 0.2  # alone: a batch of one
    assert math.isclose(cloud(3, 0).estimate(), 0.2 * (1 + 3 * 0.25))  # joins a batch of 4
    assert math.isclose(cloud(7, 0).estimate(), 0.2 * (1 + 7 * 0.25))  # fills the batch of 8
    full = 0.2 * (1 + 7 * 0.25)
    # 12 ahead: 5 beyond the 8 slots must finish first, at a full batch's rate of 8 per forward.
    assert math.isclose(cloud(8, 4).queue_s(), 5 * full / 8)
    assert math.isclose(cloud(8, 4).estimate(), 5 * full / 8 + full)
    # Without batch_marginal the side is what it was: one request per slot (edge threads).
    plain = SideView(workers=1, capacity=8, inflight=3, queued=0, compute_s=0.2, network_s=0.0)
    assert plain.estimate() == 0.2
    # A quality request whose deadline fits the batch it would join goes to the cloud; one
    # whose deadline only a batch of one would meet does not.
    assert choose(QUALITY, 0.5, EDGE, cloud(3, 0)).route is Route.CLOUD
    assert choose(QUALITY, 0.3, EDGE, cloud(7, 0)).route is Route.EDGE


def test_the_registry_hands_the_policy_a_batching_workers_cost() -> None:
    from cicada.common.protocol import Heartbeat, Ready, Role
    from cicada.edge.coordinator.registry import Registry

    registry = Registry(ttl_s=10.0)
    registry.add(b"a", Ready(Role.CLOUD, "a", ["m"], capacity=8, compute_s=0.2), now=0.0)
    assert registry.side("m", Role.CLOUD).batch_marginal is None  # not measured yet
    worker = registry.get(b"a")
    assert worker is not None
    worker.update(Heartbeat(compute_s=0.2, batch_marginal=0.25))
    worker.update(Heartbeat(compute_s=0.2))  # a heartbeat without it keeps the last one
    registry.add(b"b", Ready(Role.CLOUD, "b", ["m"], capacity=4, batch_marginal=0.5), now=0.0)
    side = registry.side("m", Role.CLOUD)
    assert side.capacity == 12 and side.batch_marginal == 0.5  # the most pessimistic


def test_a_request_waits_only_for_the_queued_work_dispatched_before_it() -> None:
    """Queued work is dispatched by priority, so a latency-critical request waits for the
    critical work ahead of it, not for a backlog of quality work: with one 0.46 s cloud and a
    busy edge backed up with 20 quality requests, it stays on the edge (~0.14 s) instead of
    going to the cloud (where, in benchmarks/handoff, 0.5 s deadlines timed out)."""
    backlog = SideView(workers=1, capacity=2, inflight=2, queued=20, compute_s=0.09,
                       queued_by_priority=(0, 0, 20))  # fmt: skip
    cloud = SideView(workers=1, capacity=1, inflight=0, queued=0, compute_s=0.46, ready=True,
                     network_s=0.002, queued_by_priority=(0, 0, 0))  # fmt: skip
    assert math.isclose(backlog.estimate(CRITICAL), 0.09 / 2 + 0.09)
    assert math.isclose(backlog.estimate(QUALITY), 21 * 0.09 / 2 + 0.09) and backlog.estimate(
        QUALITY) == backlog.estimate()  # fmt: skip
    assert choose(CRITICAL, 0.5, backlog, cloud).route is Route.EDGE
    assert choose(QUALITY, 5.0, backlog, cloud).route is Route.CLOUD
    # Critical work ahead does count; without the split, the whole queue does (as before).
    critical_ahead = SideView(workers=1, capacity=2, inflight=2, queued=20, compute_s=0.09,
                              queued_by_priority=(20, 0, 0))  # fmt: skip
    assert choose(CRITICAL, 0.5, critical_ahead, cloud).route is Route.CLOUD
    unsplit = SideView(workers=1, capacity=2, inflight=2, queued=20, compute_s=0.09)
    assert choose(CRITICAL, 0.5, unsplit, cloud).route is Route.CLOUD


def test_the_coordinator_splits_each_sides_queue_by_priority() -> None:
    """The same case through a real Coordinator (no sockets): the views it builds count the
    queue by priority, and the critical request waits for the edge's next free slot."""
    import numpy as np

    from cicada.common.protocol import Ready, Request, Result, Role, Status, WorkerState
    from cicada.edge.coordinator.broker import Coordinator, CoordinatorConfig

    now = [1000.0]
    coord = Coordinator(CoordinatorConfig(heartbeat_interval=0.5), clock=lambda: now[0])
    coord._send = lambda identity, message: True  # type: ignore[method-assign]
    coord.register_worker(b"edge", Ready(role=Role.EDGE, worker="edge", models=["m"],
                                         capacity=2, compute_s=0.09), now[0])  # fmt: skip

    def request(rid: str, priority: int, timeout_s: float) -> None:
        coord.accept_request(b"client", Request(
            id=rid, model="m", inputs=[np.zeros(4, np.float32)], priority=priority,
            timeout_ms=int(timeout_s * 1000)), now[0])  # fmt: skip

    def worker_of(rid: str) -> bytes | None:
        (p,) = [p for p in coord.pending.values() if p.request.id == rid]
        return p.worker

    for i in range(2):
        request(f"busy{i}", CRITICAL, 5.0)
    coord.dispatch(now[0])
    assert worker_of("busy0") == worker_of("busy1") == b"edge"

    def cloud(**state: Any) -> None:
        ready = Ready(role=Role.CLOUD, worker="cloud", models=["m"], capacity=1,
                      total_stages=4, **state)  # fmt: skip
        coord.register_worker(b"cloud", ready, now[0])

    cloud(state=WorkerState.LOADING, eta_s=10.0)  # too late for 5 s: quality work takes the edge
    for i in range(20):
        request(f"q{i}", QUALITY, 5.0)
    coord.dispatch(now[0])
    assert coord.view("m", Role.EDGE).queued_by_priority == (0, 0, 20)
    cloud(state=WorkerState.READY, resident_stages=4, compute_s=0.46)
    request("urgent", CRITICAL, 0.5)
    coord.dispatch(now[0])
    assert worker_of("urgent") is None  # waits for the edge, not sent to the 0.46 s cloud
    edge = coord.workers[b"edge"]
    first = next(iter(edge.inflight))
    coord.complete(b"edge", Result(id=first, status=Status.OK,
                                   outputs=[np.ones(2, np.float32)]), now[0])  # fmt: skip
    coord.dispatch(now[0])
    assert worker_of("urgent") == b"edge"  # the edge's next free slot


def test_quality_work_leaves_a_late_cloud_while_the_edge_can_still_answer_it() -> None:
    """Held for the cloud only while the time left covers the cloud's estimate and then the
    edge's: a cloud that falls behind loses the request to the edge in time for the edge,
    not once its own estimate no longer fits (when the edge could not make it either)."""
    busy_edge = SideView(workers=1, capacity=2, inflight=2, queued=4, compute_s=0.1)  # e 0.35 s
    busy_cloud = SideView(workers=1, capacity=1, inflight=1, queued=3, compute_s=0.8)  # c 4.0 s
    e, c = busy_edge.estimate(QUALITY), busy_cloud.estimate(QUALITY)
    assert (round(e, 3), round(c, 3)) == (0.35, 4.0)
    assert choose(QUALITY, 5.0, busy_edge, busy_cloud).route is Route.CLOUD  # 4.35 s fits
    # The cloud fell behind: 4.2 s left, still 4.0 s to go. It would fit alone; with the
    # edge's 0.35 s after it, it does not: the edge now, while 4.2 s > 0.35 s.
    assert choose(QUALITY, 4.2, busy_edge, busy_cloud).route is Route.EDGE
    # No edge to fall back to (none ready, or none estimated): the cloud while it fits.
    cold_edge = SideView(workers=1, capacity=2, inflight=0, queued=0, compute_s=0.1, ready=False,
                         eta_s=5.0)  # fmt: skip
    assert choose(QUALITY, 4.2, cold_edge, busy_cloud).route is Route.CLOUD
    unmeasured = SideView(workers=1, capacity=2, inflight=2, queued=4, compute_s=0.01,
                          compute_measured=False)  # fmt: skip
    assert choose(QUALITY, 4.2, unmeasured, busy_cloud).route is Route.CLOUD
