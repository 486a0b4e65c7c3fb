"""The serverless lifecycle of cloud workers (edge/coordinator/lifecycle.py and config.py).

Three layers:

* **Decisions**, with no process at all: a `Lifecycle` over a fake in-memory launcher (handles
  whose life the test controls; every terminate/kill is recorded) and a real `Coordinator`
  object that is not serving: the test calls `coord.accept_request`, `coord.register_worker`,
  `lifecycle.tick(coord, now)` and `coord.dispatch(now)` with explicit times (the coordinator's
  clock is the same fake clock, so `view()` sees the same "now"). The coordinator's `_send` is
  replaced by a recorder, so dispatches and replies are observed as messages.
* **The config file**: `load_config` errors name the field and say what is wrong.
* **Real processes** on loopback (`cicada.testing`): `cicada coordinator --config` with the tiny
  GPT-2 package launches `cicada cloud` workers (or forks them from `cicada pool`), scales to
  zero and back, and relaunches a SIGKILLed worker. Leaks are checked with psutil (children of
  the coordinator, its open fds and connections) and /dev/shm.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import zmq

from benchmarks.lifecycle import log_times
from cicada.common.launch import LaunchError, WorkerSpec
from cicada.common.protocol import (
    Dispatch,
    Ready,
    Reply,
    Request,
    Result,
    Role,
    Status,
    WorkerState,
    decode,
    encode,
)
from cicada.edge.coordinator.broker import Coordinator, CoordinatorConfig
from cicada.edge.coordinator.config import ConfigError, ModelConfig, load_config
from cicada.edge.coordinator.lifecycle import Lifecycle
from cicada.testing import free_port, process_cmdline, process_running

MODEL = "m"
CLIENT = b"client"

# -- a fake launcher and a coordinator driven by hand ----------------------------------------


@dataclass
class FakeHandle:
    """A worker 'process' whose life the test decides. terminate() only records the request
    (a real worker drains first); kill() ends it at once, as SIGKILL would."""

    name: str
    running: bool = True
    calls: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.running

    def terminate(self) -> None:
        self.calls.append("terminate")

    def kill(self) -> None:
        self.calls.append("kill")
        self.running = False

    def exit(self) -> None:
        """The process ends (drained after a terminate, or crashed)."""
        self.running = False


@dataclass
class FakeLauncher:
    kind: str = "fake"
    handles: list[FakeHandle] = field(default_factory=list)
    specs: list[WorkerSpec] = field(default_factory=list)
    fail: bool = False
    attempts: list[float] = field(default_factory=list)
    clock: Callable[[], float] = lambda: 0.0
    closed: bool = False

    def launch(self, spec: WorkerSpec) -> FakeHandle:
        self.attempts.append(self.clock())
        if self.fail:
            raise LaunchError("no capacity (fake)")
        handle = FakeHandle(spec.name)
        self.handles.append(handle)
        self.specs.append(spec)
        return handle

    def close(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    """A Lifecycle + a non-serving Coordinator, both on one fake clock."""

    def __init__(self, **model: Any) -> None:
        self.clock = FakeClock()
        self.coord = Coordinator(CoordinatorConfig(heartbeat_interval=0.5), clock=self.clock)
        self.sent: list[tuple[bytes, Any]] = []

        def record(identity: bytes, message: Any) -> bool:
            self.sent.append((identity, message))
            return True

        self.coord._send = record  # type: ignore[method-assign]
        self.config = ModelConfig(package=Path("/packages/m"), **model)
        self.launcher = FakeLauncher(clock=self.clock)
        self.lc = Lifecycle({MODEL: self.config}, self.launcher, self._spec)
        self.coord.lifecycle = self.lc
        self._rid = 0

    @staticmethod
    def _spec(model: str, cfg: ModelConfig, name: str) -> WorkerSpec:
        return WorkerSpec(model=model, package=str(cfg.package), coordinator="inproc://x",
                          name=name, device=cfg.device)  # fmt: skip

    @property
    def now(self) -> float:
        return self.clock.now

    @property
    def model(self) -> Any:
        return self.lc.models[MODEL]

    def tick(self, dt: float = 0.0) -> None:
        """Advance the clock, then one round of the coordinator's loop (as serve_forever)."""
        self.clock.now += dt
        self.coord.expire_requests(self.now)
        self.lc.tick(self.coord, self.now)
        self.coord.dispatch(self.now)

    def request(self, priority: int = 2, timeout_s: float = 60.0) -> str:
        self._rid += 1
        rid = f"r{self._rid}"
        self.coord.accept_request(
            CLIENT,
            Request(id=rid, model=MODEL, inputs=[np.zeros(4, np.float32)], priority=priority,
                    timeout_ms=int(timeout_s * 1000)),
            self.now,
        )  # fmt: skip
        return rid

    def register(self, handle: FakeHandle, state: WorkerState = WorkerState.READY,
                 compute_s: float | None = 0.2, eta_s: float | None = None) -> bytes:  # fmt: skip
        identity = handle.name.encode()
        self.coord.register_worker(
            identity,
            Ready(role=Role.CLOUD, worker=handle.name, models=[MODEL], state=state,
                  total_stages=4, resident_stages=4 if state is WorkerState.READY else 0,
                  compute_s=compute_s, eta_s=eta_s),
            self.now,
        )  # fmt: skip
        return identity

    def dispatches(self, identity: bytes | None = None) -> list[Dispatch]:
        return [m for i, m in self.sent
                if isinstance(m, Dispatch) and (identity is None or i == identity)]  # fmt: skip

    def answer_all(self, identity: bytes) -> int:
        """The worker answers OK to everything it was sent and has not answered yet."""
        worker = self.coord.workers.get(identity)
        keys = list(worker.inflight) if worker else []
        for key in keys:
            result = Result(id=key, status=Status.OK, outputs=[np.ones(2, np.float32)])
            self.coord.complete(identity, result, self.now)
        return len(keys)

    def disconnect(self, handle: FakeHandle) -> None:
        """The drained worker says DISCONNECT and its process exits."""
        self.coord.remove_worker(handle.name.encode(), self.now, reason="draining")
        handle.exit()

    def replies(self) -> dict[str, list[Reply]]:
        out: dict[str, list[Reply]] = {}
        for identity, m in self.sent:
            if identity == CLIENT and isinstance(m, Reply):
                out.setdefault(m.id, []).append(m)
        return out

    def serve_first_request(self) -> tuple[FakeHandle, bytes]:
        """From zero: one request, one launch, registration, the answer."""
        self.request()
        self.tick()
        (handle,) = self.launcher.handles
        identity = self.register(handle)
        self.tick()
        assert self.answer_all(identity) == 1
        return handle, identity


def test_no_demand_and_min_workers_zero_launches_nothing() -> None:
    w = World()
    for _ in range(50):
        w.tick(1.0)
    assert w.launcher.handles == []
    assert w.coord.view(MODEL, Role.CLOUD).workers == 0


def test_first_demand_launches_exactly_one_worker() -> None:
    w = World(max_workers=1)
    w.request()
    w.tick()
    assert len(w.launcher.handles) == 1
    spec = w.launcher.specs[0]
    assert (spec.model, spec.package, spec.name) == (MODEL, "/packages/m", "m-cloud-1")
    # More demand and more ticks while it starts: still one (it is capacity on its way).
    for _ in range(20):
        w.request()
        w.tick(0.1)
    assert len(w.launcher.handles) == 1
    assert w.replies() == {}  # nobody was turned away: all wait for the starting worker


def test_a_latency_critical_first_request_launches_a_worker_and_stays_on_the_edge() -> None:
    w = World(keep_alive_s=5.0)
    edge = b"edge-1"
    w.coord.register_worker(edge, Ready(role=Role.EDGE, worker="edge-1", models=[MODEL],
                                        compute_s=0.01), w.now)  # fmt: skip
    rid = w.request(priority=0)
    w.tick()
    assert len(w.launcher.handles) == 1  # priority 0 launched the model's cloud worker...
    assert [d.id for d in w.dispatches(edge)] != []  # ...and went to the edge at once
    cloud = w.register(w.launcher.handles[0])
    w.tick()
    assert w.dispatches(cloud) == []
    w.answer_all(edge)
    assert [(r.status, r.served_by["role"]) for r in w.replies()[rid]] == [(Status.OK, "edge")]
    later = w.request(priority=2)  # what follows finds the cloud up
    w.tick()
    assert len(w.dispatches(cloud)) == 1 and later not in w.replies()
    w.answer_all(cloud)
    w.tick(5.1)  # keep-alive after the last request of any priority: scale to zero
    assert w.launcher.handles[0].calls == ["terminate"]


def test_a_launching_worker_is_cloud_capacity_with_an_eta() -> None:
    w = World(expected_start_s=3.0)
    rid = w.request(priority=2, timeout_s=20.0)
    w.tick()
    view = w.coord.view(MODEL, Role.CLOUD)
    assert (view.workers, view.capacity, view.ready) == (1, 1, False)
    assert view.eta_s == pytest.approx(3.0)
    # The request waits for it (no reply, not sent to anyone) instead of being refused.
    assert len(w.coord.pending) == 1 and not w.replies()
    w.tick(1.0)
    assert w.coord.view(MODEL, Role.CLOUD).eta_s == pytest.approx(2.0)
    w.tick(5.0)  # late: the ETA never goes to zero or below while it is not there
    assert w.coord.view(MODEL, Role.CLOUD).eta_s == pytest.approx(0.05)

    # Once it registers it is counted once, as itself, and gets the request.
    identity = w.register(w.launcher.handles[0])
    w.tick()
    view = w.coord.view(MODEL, Role.CLOUD)
    assert (view.workers, view.capacity, view.ready) == (1, 1, True)
    assert len(w.dispatches(identity)) == 1
    w.answer_all(identity)
    assert [r.status for r in w.replies()[rid]] == [Status.OK]


def test_measured_start_time_replaces_the_configured_estimate() -> None:
    w = World(expected_start_s=3.0, keep_alive_s=1.0)
    w.request()
    w.tick()
    handle = w.launcher.handles[0]
    w.clock.now += 1.5
    identity = w.register(handle)  # registers READY 1.5 s after launch: one sample
    w.tick()
    w.answer_all(identity)
    w.tick(2.0)
    assert handle.calls == ["terminate"]
    w.disconnect(handle)
    w.tick()
    w.request()
    w.tick()
    assert w.coord.view(MODEL, Role.CLOUD).eta_s == pytest.approx(1.5)


def test_idle_past_keep_alive_is_terminated_and_then_forgotten() -> None:
    w = World(keep_alive_s=5.0)
    handle, identity = w.serve_first_request()
    w.tick(4.9)
    assert handle.calls == []
    w.tick(0.2)
    assert handle.calls == ["terminate"]
    w.tick(1.0)
    assert handle.calls == ["terminate"]  # asked once; it drains at its own pace
    # A drained worker exits; the lifecycle notices, forgets it, and does not relaunch.
    handle.exit()
    w.tick()
    assert identity not in w.coord.workers
    assert w.model.stops == 1 and w.model.crashes == 0
    for _ in range(20):
        w.tick(1.0)
    assert len(w.launcher.handles) == 1


def test_a_worker_that_does_not_drain_within_stop_timeout_is_killed() -> None:
    w = World(keep_alive_s=1.0, stop_timeout_s=5.0)
    handle, _ = w.serve_first_request()
    w.tick(1.1)
    assert handle.calls == ["terminate"]
    w.tick(4.9)
    assert handle.calls == ["terminate"]  # still within stop_timeout_s: let it drain
    w.tick(0.2)
    assert handle.calls == ["terminate", "kill"]
    w.tick(10.0)
    assert handle.calls == ["terminate", "kill"]  # killed once
    handle.exit()
    w.tick()
    assert w.model.stops == 1 and w.model.crashes == 0  # asked to stop: not a crash


def test_a_busy_worker_is_not_stopped_past_keep_alive() -> None:
    w = World(keep_alive_s=2.0)
    handle, identity = w.serve_first_request()
    w.request()
    w.tick()
    assert len(w.coord.workers[identity].inflight) == 1
    for _ in range(10):
        w.tick(1.0)  # a long request: 10 s in flight, keep-alive 2 s
    assert handle.calls == []
    w.answer_all(identity)
    w.tick(1.9)
    assert handle.calls == []
    w.tick(0.2)
    assert handle.calls == ["terminate"]


def test_min_workers_prewarms_without_demand_and_never_goes_below() -> None:
    w = World(min_workers=1, max_workers=2, keep_alive_s=1.0)
    w.tick()
    assert len(w.launcher.handles) == 1  # prewarmed, nobody asked
    identity = w.register(w.launcher.handles[0])
    for _ in range(30):
        w.tick(1.0)
    assert w.launcher.handles[0].calls == []  # idle 30 s, keep-alive 1 s: kept
    assert identity in w.coord.workers

    w2 = World(min_workers=2, max_workers=3, keep_alive_s=1.0)
    w2.tick()
    w2.tick()
    w2.tick()
    assert len(w2.launcher.handles) == 2


def test_above_min_workers_idle_extras_stop_down_to_min() -> None:
    w = World(min_workers=1, max_workers=3, keep_alive_s=2.0)
    for _ in range(3):
        w.request()
    for _ in range(5):
        w.tick(0.1)
    assert len(w.launcher.handles) == 3
    ids = [w.register(h) for h in w.launcher.handles]
    w.tick()
    for identity in ids:
        w.answer_all(identity)
    w.tick(2.5)
    stopped = [h for h in w.launcher.handles if "terminate" in h.calls]
    assert len(stopped) == 2
    for h in stopped:
        w.disconnect(h)
    for _ in range(10):
        w.tick(1.0)
    assert sum(h.alive() for h in w.launcher.handles) == 1
    assert len(w.launcher.handles) == 3


def test_max_workers_bounds_launches() -> None:
    w = World(max_workers=2, start_timeout_s=1000.0)
    for _ in range(10):
        w.request()
    for _ in range(30):
        w.tick(0.1)
    assert len(w.launcher.handles) == 2
    assert w.coord.view(MODEL, Role.CLOUD).workers == 2
    ids = [w.register(h) for h in w.launcher.handles]
    for _ in range(10):
        w.tick(0.1)
        for identity in ids:
            w.answer_all(identity)
    assert len(w.launcher.handles) == 2
    replies = w.replies()
    assert len(replies) == 10 and all(len(r) == 1 and r[0].status is Status.OK
                                      for r in replies.values())  # fmt: skip


def test_crash_relaunch_backs_off_exponentially_and_resets_on_registration() -> None:
    w = World(relaunch_backoff_s=1.0, relaunch_backoff_max_s=5.0, keep_alive_s=1000.0,
              start_timeout_s=1000.0)  # fmt: skip
    handle, _ = w.serve_first_request()

    def crash_and_time_relaunch(h: FakeHandle) -> float:
        n = len(w.launcher.handles)
        h.exit()  # dies unasked
        w.tick()
        crashed_at = w.now
        while len(w.launcher.handles) == n:
            w.request()  # requests keep coming (those in the backoff are turned away)
            w.tick(0.05)
            assert w.now - crashed_at < 60, "never relaunched"
        return w.launcher.attempts[-1] - crashed_at

    # Crashes before registering again: 1, 2, 4, then capped at 5.
    waits = []
    h = handle
    for _ in range(4):
        waits.append(crash_and_time_relaunch(h))
        h = w.launcher.handles[-1]
    assert waits == [pytest.approx(x, abs=0.06) for x in (1.0, 2.0, 4.0, 5.0)]
    assert w.model.crashes == 4

    # A successful registration resets the count: the next crash waits the base backoff.
    w.register(h)
    w.tick()
    assert w.model.crashes == 0
    assert crash_and_time_relaunch(h) == pytest.approx(1.0, abs=0.06)


def test_a_crashed_workers_request_ends_exactly_once() -> None:
    w = World(relaunch_backoff_s=1.0)
    handle, identity = w.serve_first_request()
    rid = w.request(timeout_s=30.0)
    w.tick()
    assert len(w.dispatches(identity)) == 2
    handle.exit()
    w.tick()
    # Nobody can take it during the backoff: an explicit UNAVAILABLE with a retry hint.
    replies = w.replies()[rid]
    assert [r.status for r in replies] == [Status.UNAVAILABLE]
    assert replies[0].retry_after_ms and replies[0].retry_after_ms > 0
    # A late RESULT from the dead worker's identity cannot make a second reply.
    w.coord.complete(identity, Result(id=w.dispatches(identity)[-1].id, status=Status.OK), w.now)
    assert len(w.replies()[rid]) == 1


def test_start_timeout_kills_a_worker_that_never_registers() -> None:
    w = World(start_timeout_s=10.0, relaunch_backoff_s=1.0)
    w.request(timeout_s=1000.0)
    w.tick()
    handle = w.launcher.handles[0]
    w.tick(9.9)
    assert handle.calls == []
    w.tick(0.2)
    assert handle.calls == ["kill"]
    w.tick()  # its death is a crash: relaunch after the backoff
    assert w.model.crashes == 1 and len(w.launcher.handles) == 1
    w.request()  # demand goes on (the first request was turned away during the backoff)
    w.tick(0.9)
    assert len(w.launcher.handles) == 1
    w.request()
    w.tick(0.1)
    assert len(w.launcher.handles) == 2


def test_a_failed_launch_backs_off_like_a_crash() -> None:
    w = World(relaunch_backoff_s=1.0, relaunch_backoff_max_s=30.0)
    w.launcher.fail = True
    w.request(timeout_s=1000.0)
    w.tick()
    for _ in range(60):
        w.request()  # requests keep coming (each is turned away: nobody can serve it)
        w.tick(0.05)
    first, second = w.launcher.attempts[:2]
    assert second - first == pytest.approx(1.0, abs=0.06)


def test_workers_that_fail_their_cold_start_still_back_off() -> None:
    w = World(relaunch_backoff_s=1.0, relaunch_backoff_max_s=30.0, start_timeout_s=1000.0)
    w.request(timeout_s=1000.0)
    w.tick()
    gaps = []
    for _ in range(4):
        h = w.launcher.handles[-1]
        w.register(h, state=WorkerState.COLD)  # registers cold...
        w.tick(0.1)
        h.exit()  # ...then its cold start fails
        w.tick()
        died = w.now
        n = len(w.launcher.handles)
        while len(w.launcher.handles) == n:
            w.request()
            w.tick(0.05)
        gaps.append(w.now - died)
    assert gaps[-1] > 2 * gaps[0], gaps


def test_a_request_is_never_dispatched_to_a_worker_asked_to_stop() -> None:
    w = World(keep_alive_s=1.0)
    handle, identity = w.serve_first_request()
    w.tick(1.1)
    assert handle.calls == ["terminate"]
    w.request()
    w.tick()
    assert w.dispatches(identity)[1:] == []


def test_a_live_worker_purged_for_missed_heartbeats_still_counts_as_capacity() -> None:
    w = World()
    rid = w.request(timeout_s=20.0)
    w.tick()
    (handle,) = w.launcher.handles
    identity = w.register(handle, state=WorkerState.COLD, eta_s=1.0)
    w.tick()
    assert len(w.dispatches(identity)) == 1
    w.clock.now += 1.0  # silent past heartbeat_interval (0.5) x liveness (4)? not yet
    w.coord.purge_workers(w.now)
    assert identity in w.coord.workers
    w.clock.now += 1.5  # now it is: purged, while its process is alive and loading
    w.coord.purge_workers(w.now)
    assert identity not in w.coord.workers and handle.alive()
    w.tick()
    assert rid not in w.replies()  # still waits for the live worker (20 s deadline)


# -- lazy keep-warm vs fixed keep-alive ----------------------------------------------------------


@dataclass
class TraceRun:
    launches: int
    terminations: int
    worker_seconds: float
    waited_for_cold_start: int
    warm_targets: list[int]
    replies: dict[str, list[Reply]]


def run_trace(world: World, arrivals: list[float], until: float, start_s: float = 2.0,
              compute_s: float = 0.2, step: float = 0.05) -> TraceRun:  # fmt: skip
    """Simulated workers on the fake clock: a launched worker registers READY `start_s` later,
    answers each request `compute_s` after dispatch, and exits 0.1 s after a terminate."""
    t0 = world.now
    pending = sorted(arrivals)
    born: dict[str, float] = {}
    stop_asked: dict[str, float] = {}
    died: dict[str, float] = {}
    done_at: dict[tuple[bytes, str], float] = {}
    cold_waits = 0
    targets: list[int] = [world.model.warm_target]
    while world.now - t0 < until:
        while pending and pending[0] <= world.now - t0:
            pending.pop(0)
            if not any(w.state is WorkerState.READY for w in world.coord.workers.values()):
                cold_waits += 1
            world.request(priority=2, timeout_s=60.0)
        world.tick(step)
        for h in world.launcher.handles:
            born.setdefault(h.name, world.now)
            if h.name in died:
                continue
            if "terminate" in h.calls:
                stop_asked.setdefault(h.name, world.now)
                if world.now - stop_asked[h.name] >= 0.1:
                    world.disconnect(h)
                    died[h.name] = world.now
                continue
            identity = h.name.encode()
            if identity not in world.coord.workers and world.now - born[h.name] >= start_s:
                world.register(h, compute_s=compute_s)
        for identity, w in list(world.coord.workers.items()):
            for key in list(w.inflight):
                finish = done_at.setdefault((identity, key), world.now + compute_s)
                if world.now >= finish:
                    world.coord.complete(identity, Result(id=key, status=Status.OK), world.now)
        targets.append(world.model.warm_target)
    end = world.now
    seconds = sum(died.get(h.name, end) - born[h.name] for h in world.launcher.handles)
    return TraceRun(
        launches=len(world.launcher.handles),
        terminations=sum("terminate" in h.calls for h in world.launcher.handles),
        worker_seconds=seconds,
        waited_for_cold_start=cold_waits,
        warm_targets=targets,
        replies=world.replies(),
    )


def bursts(starts: list[float], size: int, spacing: float = 0.25) -> list[float]:
    return [s + i * spacing for s in starts for i in range(size)]


def test_lazy_keep_warm_does_not_flap_on_alternating_bursts_where_fixed_restarts() -> None:
    # Bursts of 8 requests, alternately 25 s and 35 s apart; keep-alive 10 s.
    starts = [0.0, 25.0, 60.0, 85.0, 120.0, 145.0]
    trace = bursts(starts, 8)
    fixed = run_trace(World(keep_warm="fixed", keep_alive_s=10.0, max_workers=1), trace, 170)
    lazy = run_trace(World(keep_warm="lazy", keep_alive_s=10.0, max_workers=1), trace, 170)

    # Fixed keep-alive: every burst finds the cloud stopped, starts it, and stops it again.
    assert fixed.launches == len(starts)
    assert fixed.terminations == len(starts)
    assert fixed.waited_for_cold_start == len(trace)  # every burst met a cold cloud
    # Lazy: the warm target rises with the first burst and holds through the gaps.
    assert lazy.launches == 1
    assert lazy.terminations == 0
    assert lazy.waited_for_cold_start == 8  # only the first burst met a cold cloud
    changes = sum(a != b for a, b in zip(lazy.warm_targets, lazy.warm_targets[1:], strict=False))
    assert changes == 1  # 0 -> 1 once, then steady: no flapping
    # Every request of both runs got exactly one OK.
    for run in (fixed, lazy):
        assert len(run.replies) == len(trace)
        assert all([r.status for r in rs] == [Status.OK] for rs in run.replies.values())
    # What lazy pays for it: the worker stays up through the gaps.
    assert lazy.worker_seconds > fixed.worker_seconds


def test_lazy_warm_target_follows_rate_times_compute() -> None:
    # A worker measured at 1 s per request; a steady 3 req/s for ten minutes -> ~3 busy workers.
    w = World(keep_warm="lazy", lazy_threshold=1, max_workers=8, keep_alive_s=5.0)
    w.tick()
    for _ in range(600):
        w.model.observe_request(w.now)
        w.model.observe_request(w.now + 0.05)
        w.model.observe_request(w.now + 0.1)
        w.tick(1.0)
    w.coord.register_worker(b"probe", Ready(role=Role.CLOUD, worker="probe", models=[MODEL],
                                            compute_s=1.0), w.now)  # fmt: skip
    w.tick()
    rate = w.model.rate
    assert rate == pytest.approx(3.0, rel=0.05)
    assert w.model.warm_target == math.ceil(rate * 1.0)
    assert len([h for h in w.launcher.handles if h.alive()]) >= 1
    # Demand stops: the target decays with the rate (half-life 20 s) down to zero.
    seen = []
    for _ in range(400):
        w.tick(1.0)
        seen.append(w.model.warm_target)
    assert seen[-1] == 0
    assert seen == sorted(seen, reverse=True)  # only ever goes down while demand is gone


def test_lazy_threshold_ignores_small_moves_of_the_target() -> None:
    w = World(keep_warm="lazy", lazy_threshold=2, max_workers=8)
    w.coord.register_worker(b"probe", Ready(role=Role.CLOUD, worker="probe", models=[MODEL],
                                            compute_s=1.0), w.now)  # fmt: skip
    lc = w.model

    def settle(rate: float) -> int:
        lc.rate, lc.rate_at = rate, w.now
        w.lc.tick(w.coord, w.now)
        return int(lc.warm_target)

    assert settle(0.5) == 0  # needed 1: a move of 1 < 2, ignored
    assert settle(1.5) == 2  # needed 2: moves
    assert settle(2.5) == 2  # needed 3: ignored
    assert settle(0.9) == 2  # needed 1: ignored
    assert settle(3.5) == 4  # needed 4: moves
    assert settle(1.9) == 2  # needed 2: moves down
    # The same oscillation with threshold 1 follows every step.
    w1 = World(keep_warm="lazy", lazy_threshold=1, max_workers=8)
    w1.coord.register_worker(b"probe", Ready(role=Role.CLOUD, worker="probe", models=[MODEL],
                                             compute_s=1.0), w1.now)  # fmt: skip
    targets = []
    for rate in (0.5, 1.5, 2.5, 0.9):
        w1.model.rate, w1.model.rate_at = rate, w1.now
        w1.lc.tick(w1.coord, w1.now)
        targets.append(w1.model.warm_target)
    assert targets == [1, 2, 3, 1]


def test_fixed_keep_alive_stops_after_keep_alive_idle_even_with_recent_demand() -> None:
    w = World(keep_warm="fixed", keep_alive_s=3.0)
    handle, identity = w.serve_first_request()
    for _ in range(5):  # a steady trickle keeps it alive
        w.tick(2.0)
        w.request()
        w.tick()
        w.tick(0.05)  # the coordinator's loop sees it running...
        w.answer_all(identity)  # ...then it is answered
    assert handle.calls == []
    w.tick(2.9)
    assert handle.calls == []
    w.tick(0.2)
    assert handle.calls == ["terminate"]  # the rate estimate is high, fixed ignores it


def test_keep_alive_counts_from_the_last_request_even_a_fast_one() -> None:
    w = World(keep_warm="fixed", keep_alive_s=3.0)
    handle, identity = w.serve_first_request()
    for _ in range(5):
        w.tick(2.0)
        w.request()
        w.tick()  # lifecycle.tick, then dispatch
        w.answer_all(identity)  # the RESULT arrives before the next tick
    assert handle.calls == []


def test_close_terminates_workers_and_closes_the_launcher() -> None:
    w = World(min_workers=1)
    w.tick()
    w.lc.close()
    assert w.launcher.handles[0].calls == ["terminate"]
    assert w.launcher.closed


# -- the config file ----------------------------------------------------------------------------


@pytest.fixture
def package_dir(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "manifest.json").write_text("{}")
    return pkg


def write(tmp_path: Path, text: str, name: str = "cicada.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_config_loads_and_resolves_relative_paths_against_the_file(
    tmp_path: Path, package_dir: Path
) -> None:
    text = """
[coordinator]
launcher = "pool"
pool_socket = "run/pool.sock"
log_dir = "logs"
[models.gpt2]
package = "pkg"
min_workers = 1
max_workers = 3
keep_alive_s = 0.5
keep_warm = "lazy"
lazy_threshold = 2
row_invariant = "always"
"""
    path = write(tmp_path, text)
    cwd = os.getcwd()
    os.chdir("/")  # resolution must not depend on the working directory
    try:
        config = load_config(path)
    finally:
        os.chdir(cwd)
    m = config.models["gpt2"]
    assert m.package == package_dir.resolve()
    assert (m.min_workers, m.max_workers, m.keep_alive_s, m.keep_warm, m.lazy_threshold) == (
        1, 3, 0.5, "lazy", 2)  # fmt: skip
    # What the launcher starts: `cicada cloud ... --row-invariant always`.
    spec = WorkerSpec(
        "gpt2", str(m.package), "tcp://127.0.0.1:5555", "w", row_invariant=m.row_invariant
    )
    assert spec.cli_args()[-2:] == ["--row-invariant", "always"]
    assert WorkerSpec.from_wire(spec.to_wire()).row_invariant == "always"
    assert "--row-invariant" not in WorkerSpec("gpt2", "/p", "tcp://x:1", "w").cli_args()
    assert config.coordinator.pool_socket == tmp_path.resolve() / "run" / "pool.sock"
    assert config.coordinator.log_dir == tmp_path.resolve() / "logs"
    # An absolute package path is kept as it is.
    path2 = write(tmp_path, f'[models.x]\npackage = "{package_dir}"\n', "abs.toml")
    assert load_config(path2).models["x"].package == package_dir


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ('[models.gpt2]\npackage = "pkg"\nkeep_alive = 3\n', ["models.gpt2.keep_alive", "Extra"]),
        ('[coordinator]\nlauncher = "process"\nbindd = "x"\n', ["coordinator.bindd", "Extra"]),
        ('[modles.gpt2]\npackage = "pkg"\n', ["modles"]),
        ('[models.gpt2]\npackage = "pkg"\nmin_workers = 3\nmax_workers = 2\n',
         ["models.gpt2", "min_workers (3) > max_workers (2)"]),
        ('[models.gpt2]\npackage = "pkg"\nkeep_alive_s = -1\n',
         ["models.gpt2.keep_alive_s", "greater than 0"]),
        ('[models.gpt2]\npackage = "pkg"\nkeep_warm = "eager"\n',
         ["models.gpt2.keep_warm", "'fixed' or 'lazy'"]),
        ('[coordinator]\nlauncher = "k8s"\n', ["coordinator.launcher", "'process'"]),
        ('[models.gpt2]\npackage = "pkg"\nrow_invariant = "sometimes"\n',
         ["models.gpt2.row_invariant", "'auto', 'always' or 'never'"]),
        ("[models.gpt2]\nmax_workers = 1\n", ["models.gpt2.package", "Field required"]),
        ('[models.gpt2]\npackage = "pkg"\nmax_workers = "two"\n', ["models.gpt2.max_workers"]),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(tmp_path: Path, package_dir: Path, body: str,
                                      names: list[str]) -> None:  # fmt: skip
    message = config_error(write(tmp_path, body))
    assert str(tmp_path / "cicada.toml") in message
    for name in names:
        assert name in message, message


def test_config_package_without_manifest_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    message = config_error(write(tmp_path, '[models.gpt2]\npackage = "empty"\n'))
    assert str((tmp_path / "empty").resolve()) in message
    assert "manifest.json" in message and "cicada pack" in message


def test_config_not_toml_and_missing_file(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "[models.gpt2\npackage = pkg\n"))
    assert "not valid TOML" in message and "line 1" in message
    missing = tmp_path / "nope.toml"
    message = config_error(missing)
    assert str(missing) in message and "does not exist" in message


@pytest.mark.parametrize("kind", ["binary", "directory"])
def test_config_unreadable_file_is_a_config_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "cicada.toml"
    if kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    else:
        path.mkdir()
    config_error(path)


# -- real processes ------------------------------------------------------------------------------


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def shm_used_by(
    pids: set[int] | None = None, exclude: frozenset[int] | set[int] = frozenset()
) -> set[str]:
    """/dev/shm entries mapped or open in the given processes (all but `exclude` if None)."""
    out: set[str] = set()
    candidates = pids if pids is not None else {int(d) for d in os.listdir("/proc") if d.isdigit()}
    for pid in candidates - exclude:
        for name in (f"/proc/{pid}/maps",):
            with contextlib.suppress(OSError):
                for line in Path(name).read_text().splitlines():
                    if "/dev/shm/" in line:
                        out.add(line.rsplit("/dev/shm/", 1)[1].split(" ")[0])
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("/dev/shm/"):
                        out.add(target[len("/dev/shm/") :].split(" ")[0])
    return out


def shm_leaks(before: set[str], ours: set[int]) -> set[str]:
    """New /dev/shm entries that stay and that no other process holds. The machine is shared:
    other people's processes create (and usually unlink at once) segments of their own."""
    new = shm_entries() - before
    if new:
        time.sleep(1.0)
        new &= shm_entries()
    return new - shm_used_by(exclude=ours) if new else set()


class LiveCoordinator:
    """`cicada coordinator --config` as a real process, with leak probes."""

    def __init__(self, work: Path, package: Path, launcher: str = "process",
                 **model: Any) -> None:  # fmt: skip
        from cicada.testing import Stack

        self.work = work
        self.stack = Stack(work, heartbeat=0.2)
        options = {"keep_alive_s": 0.7, "relaunch_backoff_s": 0.5, "start_timeout_s": 60.0,
                   "expected_start_s": 3.0, **model}  # fmt: skip
        lines = ["[coordinator]", f'launcher = "{launcher}"', 'log_dir = "logs"']
        if launcher == "pool":
            lines.append('pool_socket = "pool.sock"')
        lines += ["[models.gpt2]", f'package = "{package}"']
        lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"'
                  for k, v in options.items()]  # fmt: skip
        (work / "logs").mkdir()
        self.config = work / "cicada.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc = self.stack.coordinator("--config", str(self.config))
        self.ps = psutil.Process(self.proc.pid)
        self.seen: set[int] = set()
        self.shm_held: set[str] = set()
        self.wait_serving()

    @property
    def address(self) -> str:
        return self.stack.address

    def wait_serving(self, timeout: float = 60.0) -> None:
        """The CLI prints 'coordinator on' after the launcher (a pool too) is ready."""
        deadline = time.monotonic() + timeout
        while "coordinator on" not in self.stack.log("coordinator"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited: {self.stack.log('coordinator')}")
            assert time.monotonic() < deadline, self.stack.log("coordinator")
            time.sleep(0.05)

    def descendants(self) -> list[psutil.Process]:
        try:
            kids = self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update(k.pid for k in kids)
        return [k for k in kids if process_running(k)]

    def wait_descendants(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.descendants()) != count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {count} child processes, have {self.descendants()}\n"
                    + self.stack.log("coordinator"))  # fmt: skip
            time.sleep(0.05)

    def shm_probe(self) -> set[str]:
        """/dev/shm entries the coordinator and its live children hold now (remembered)."""
        held = shm_used_by({self.ps.pid, *(k.pid for k in self.descendants())})
        self.shm_held.update(held)
        return held

    def fds(self) -> tuple[int, int]:
        return self.ps.num_fds(), len(self.ps.net_connections(kind="all"))

    def stop(self) -> int | None:
        """SIGTERM (the coordinator closes its lifecycle and launcher); kill leftovers by pid."""
        self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        code = self.proc.poll()
        leftovers = []
        for pid in self.seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                if process_running(p):
                    leftovers.append(pid)
                    p.kill()
        self.stack.close()
        self.leftovers = leftovers
        return code


@pytest.fixture
def live(tmp_path: Path, tiny_package: dict[str, Path]) -> Iterator[Callable[..., LiveCoordinator]]:
    started: list[LiveCoordinator] = []

    def start(launcher: str = "process", **model: Any) -> LiveCoordinator:
        work = tmp_path / f"{launcher}-{len(started)}"
        work.mkdir()
        c = LiveCoordinator(work, tiny_package["package"], launcher, **model)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


class RawClient:
    """A DEALER speaking the protocol, so every REPLY per request id is counted."""

    def __init__(self, address: str) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.sent: list[str] = []
        self.replies: dict[str, list[Reply]] = {}
        self.at: dict[str, float] = {}
        self.retried: list[Reply] = []

    def send(self, x: np.ndarray, priority: int = 2, deadline_s: float = 20.0) -> str:
        rid = uuid.uuid4().hex[:12]
        self.sock.send_multipart(encode(Request(id=rid, model="gpt2", inputs=[x],
                                                priority=priority,
                                                timeout_ms=int(deadline_s * 1000))))  # fmt: skip
        self.sent.append(rid)
        return rid

    def pump(self, timeout: float = 0.05) -> None:
        while self.sock.poll(int(timeout * 1000)):
            m = decode(self.sock.recv_multipart())
            if isinstance(m, Reply):
                self.replies.setdefault(m.id, []).append(m)
                self.at.setdefault(m.id, time.monotonic())
            timeout = 0

    def wait(self, rid: str, timeout: float = 60.0) -> Reply:
        deadline = time.monotonic() + timeout
        while rid not in self.replies:
            assert time.monotonic() < deadline, f"no reply to {rid} in {timeout} s"
            self.pump(0.1)
        return self.replies[rid][0]

    def call(self, x: np.ndarray, tries: int = 3) -> Reply:
        """One call as an SDK user makes it: UNAVAILABLE is retried after `retry_after`.
        Needed only on a loaded machine, where a cold worker can miss heartbeats (see
        test_a_live_worker_purged_for_missed_heartbeats_still_counts_as_capacity); every
        retry is remembered in `self.retried` and reported."""
        for attempt in range(tries):
            reply = self.wait(self.send(x, priority=2, deadline_s=20.0))
            if reply.status is not Status.UNAVAILABLE or attempt == tries - 1:
                return reply
            self.retried.append(reply)
            time.sleep((reply.retry_after_ms or 1000) / 1000)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def x(tiny_package: dict[str, Path]) -> np.ndarray:
    return np.load(tiny_package["input"])


def test_first_request_launches_a_worker_and_idle_scales_to_zero(
    live: Callable[..., LiveCoordinator], x: np.ndarray
) -> None:
    coord = live("process", keep_alive_s=0.7)
    assert coord.descendants() == []  # min_workers 0: nothing runs before demand
    client = RawClient(coord.address)
    try:
        reply = client.call(x)
        assert reply.status is Status.OK, (reply, client.retried)
        assert reply.served_by["role"] == "cloud"
        assert reply.served_by["worker"] == "gpt2-cloud-1"
        (worker,) = coord.descendants()
        assert worker.ppid() == coord.ps.pid and "cloud" in process_cmdline(worker)
        coord.wait_descendants(0)  # idle past keep-alive: drained and exited
        assert not psutil.pid_exists(worker.pid) or not process_running(worker)
        log = coord.stack.log("coordinator")
        assert "draining (scale down)" in log and "removed: draining" in log
    finally:
        client.close()


def test_a_priority_0_first_request_launches_a_real_worker(
    live: Callable[..., LiveCoordinator], x: np.ndarray
) -> None:
    coord = live("process", keep_alive_s=30.0)
    client = RawClient(coord.address)
    try:
        # No edge agent: nobody can answer priority 0 now (it never waits for a cold
        # cloud), so it is UNAVAILABLE, but the model is in use: its worker is launched.
        reply = client.wait(client.send(x, priority=0, deadline_s=5.0))
        assert reply.status is Status.UNAVAILABLE, reply
        coord.wait_descendants(1)
        (worker,) = coord.descendants()
        assert "cloud" in process_cmdline(worker)
    finally:
        client.close()


@pytest.mark.slow  # ten launches (~35 s); one cycle runs by default
def test_scale_to_zero_and_back_ten_times_leaks_nothing(
    live: Callable[..., LiveCoordinator], x: np.ndarray
) -> None:
    shm_before = shm_entries()
    coord = live("process", keep_alive_s=0.5)
    client = RawClient(coord.address)
    probes: list[tuple[int, int]] = []
    workers: list[str] = []
    try:
        for _ in range(10):
            reply = client.call(x)
            assert reply.status is Status.OK, (reply, coord.stack.log("coordinator"))
            workers.append(reply.served_by["worker"])
            coord.shm_probe()  # what the live worker holds, to check it is gone after
            coord.wait_descendants(0)
            time.sleep(0.1)  # let the coordinator finish its bookkeeping for the exit
            probes.append(coord.fds())
    finally:
        client.close()
    assert len(set(workers)) == 10, workers  # a fresh worker each round
    if client.retried:
        warnings.warn(f"{len(client.retried)} UNAVAILABLE retried (loaded machine)", stacklevel=1)
    fds = [p[0] for p in probes]
    conns = [p[1] for p in probes]
    # Stable: nothing grows round over round (a small constant slack for late closes).
    assert max(fds[1:]) - fds[1] <= 2, fds
    assert max(conns[1:]) - conns[1] <= 2, conns
    assert fds[-1] <= fds[1] + 1 and conns[-1] <= conns[1] + 1, (fds, conns)
    assert coord.stop() == 0
    assert coord.leftovers == []
    # One process per round (one more for a retried round at most), every one of them gone.
    assert 10 <= len(coord.seen) <= 10 + len(client.retried), coord.seen
    assert not (coord.shm_held & shm_entries()), coord.shm_held
    assert shm_leaks(shm_before, {coord.ps.pid, *coord.seen}) == set()


def test_pool_forks_workers_and_stops_with_the_coordinator(
    live: Callable[..., LiveCoordinator], x: np.ndarray
) -> None:
    shm_before = shm_entries()
    coord = live("pool", keep_alive_s=0.5)
    (pool,) = coord.descendants()  # the pool is up (torch imported) before any demand
    assert "pool" in process_cmdline(pool)
    client = RawClient(coord.address)
    try:
        for round_ in range(2):
            rid = client.send(x, priority=2, deadline_s=20.0)  # no retry: a fork is fast
            # The forked worker is the pool's child, not the coordinator's.
            deadline = time.monotonic() + 30
            forked: list[psutil.Process] = []
            while not forked and rid not in client.replies:
                forked = [k for k in coord.descendants() if k.pid != pool.pid]
                client.pump(0.02)
                assert time.monotonic() < deadline
            reply = client.wait(rid)
            assert reply.status is Status.OK, reply.error
            assert reply.served_by == {"role": "cloud", "worker": f"gpt2-cloud-{round_ + 1}",
                                       "variant": reply.served_by["variant"]}  # fmt: skip
            if forked:
                assert forked[0].ppid() == pool.pid
            coord.shm_probe()
            coord.wait_descendants(1)  # back to zero workers; the pool stays
    finally:
        client.close()
    assert coord.stop() == 0
    assert not process_running(pool)  # closing the coordinator stopped the pool
    assert coord.leftovers == []
    assert not (coord.work / "pool.sock").exists()
    assert not (coord.shm_held & shm_entries()), coord.shm_held
    assert shm_leaks(shm_before, {coord.ps.pid, *coord.seen}) == set()


def test_pool_launcher_creates_its_log_dir(tmp_path: Path) -> None:
    from cicada.common.launch import PoolLauncher

    launcher = PoolLauncher(str(tmp_path / "pool.sock"), log_dir=str(tmp_path / "new" / "logs"))
    try:
        launcher.start(timeout=60)
    finally:
        launcher.close()
    assert (tmp_path / "new" / "logs" / "pool.log").exists()


def test_a_killed_worker_is_relaunched_and_every_request_ends_once(
    live: Callable[..., LiveCoordinator], x: np.ndarray
) -> None:
    coord = live("process", keep_alive_s=30.0, relaunch_backoff_s=0.5)
    client = RawClient(coord.address)
    stop = threading.Event()
    try:
        first = client.wait(client.send(x))
        assert first.status is Status.OK, first.error
        (victim,) = coord.descendants()

        killed_at = 0.0  # wall clock (time.time), to compare with a process's create_time
        start = time.monotonic()
        relaunched_ok = False
        while time.monotonic() - start < 60 and not relaunched_ok:
            client.send(x, priority=2, deadline_s=20.0)
            client.pump(0.1)
            if not killed_at and len(client.sent) >= 5:
                killed_at = time.time()
                os.kill(victim.pid, signal.SIGKILL)  # with requests in flight
            relaunched_ok = any(r[0].status is Status.OK and
                                r[0].served_by.get("worker") == "gpt2-cloud-2"
                                for r in client.replies.values())  # fmt: skip
        assert relaunched_ok, coord.stack.log("coordinator")
        # Let everything still in flight end, then listen a little longer for duplicates.
        deadline = time.monotonic() + 30
        while len(client.replies) < len(client.sent) and time.monotonic() < deadline:
            client.pump(0.1)
        client.pump(0.5)
    finally:
        stop.set()
        client.close()
    counts = Counter(len(client.replies.get(rid, [])) for rid in client.sent)
    assert counts == {1: len(client.sent)}, counts  # exactly one reply each, none lost
    statuses = Counter(client.replies[rid][0].status for rid in client.sent)
    assert set(statuses) <= {Status.OK, Status.UNAVAILABLE, Status.TIMEOUT}, statuses
    assert statuses[Status.OK] >= 2
    # The crash was seen as one, the relaunch waited for the backoff, one new process runs.
    log = coord.stack.log("coordinator")
    assert "exited unasked (crash 1)" in log
    live_workers = coord.descendants()
    assert len(live_workers) == 1 and live_workers[0].pid != victim.pid
    assert killed_at, "the worker was never killed"
    # The crash was seen after the kill, and the relaunch waited the backoff (0.5 s) after it:
    # the coordinator's log lines, stamped to the millisecond (hence 2 ms of slack).
    (crashed,) = log_times(log, "exited unasked (crash 1)")
    launched = [t for t in log_times(log, "launched gpt2-cloud-2 ") if t >= crashed]
    assert crashed >= killed_at - 0.002, (crashed - killed_at, log)
    assert launched and launched[0] - crashed >= 0.5 - 0.002, (launched, crashed, log)


def test_the_pool_reports_a_crashed_fork_as_dead_with_its_signal(
    tmp_path: Path, tiny_package: dict[str, Path]
) -> None:
    """A forked worker killed by a signal: the pool reaps it and says so (alive false, the
    exit code of the signal); the handle agrees; a pid the pool never forked is refused."""
    from cicada.common.launch import PoolLauncher, pool_call

    sock = str(tmp_path / "pool.sock")
    launcher = PoolLauncher(sock, log_dir=str(tmp_path / "logs")).start(timeout=60)
    try:
        # A coordinator address nobody listens on: the worker lives on, retrying, until killed.
        spec = WorkerSpec(model="gpt2", package=str(tiny_package["package"]),
                          coordinator=f"tcp://127.0.0.1:{free_port()}", name="doomed",
                          log_dir=str(tmp_path / "logs"))  # fmt: skip
        handle = launcher.launch(spec)
        status = pool_call(sock, {"op": "status", "pid": handle.pid})
        assert status["alive"] is True and status["exit_code"] is None, status
        assert handle.alive()
        os.kill(handle.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30  # a bound on the pool reaping it, not a timing claim
        while (status := pool_call(sock, {"op": "status", "pid": handle.pid}))["alive"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status["exit_code"] == -signal.SIGKILL, status
        assert not handle.alive()
        with pytest.raises(LaunchError, match="no worker with pid"):
            pool_call(sock, {"op": "status", "pid": os.getpid()})
    finally:
        launcher.close()


def test_a_worker_that_never_exits_on_sigterm_is_killed_on_close(
    tmp_path: Path, tiny_package: dict[str, Path]
) -> None:
    """Stopping escalates: a launched worker that ignores SIGTERM (stopped with SIGSTOP, so
    the signal stays pending) outlives `terminate`, and the launcher's close SIGKILLs it."""
    from cicada.common.launch import ProcessLauncher

    launcher = ProcessLauncher()
    spec = WorkerSpec(model="gpt2", package=str(tiny_package["package"]),
                      coordinator=f"tcp://127.0.0.1:{free_port()}", name="stubborn",
                      log_dir=str(tmp_path / "logs"))  # fmt: skip
    handle = launcher.launch(spec)
    log = tmp_path / "logs" / "stubborn.log"
    try:
        # Once it logs, it has its SIGTERM handler (drain); a process still starting would be
        # killed by a pending SIGTERM's default action even while stopped.
        deadline = time.monotonic() + 60
        while not (log.exists() and log.stat().st_size):
            assert handle.alive() and time.monotonic() < deadline, "the worker never started"
            time.sleep(0.05)
        os.killpg(handle.process.pid, signal.SIGSTOP)
        handle.terminate()
        with pytest.raises(subprocess.TimeoutExpired):
            handle.process.wait(1.0)  # a stop that never comes
        assert handle.alive()
    finally:
        launcher.close()
    assert handle.process.poll() == -signal.SIGKILL
    assert launcher.handles == []
