"""Coordinator metrics on a Prometheus endpoint (prometheus_client: the exposition format and
histograms we would otherwise write by hand), served by common/httpd.py: idle connections are
closed after a timeout and held in bounded number, not a thread each. The same port serves the
live page and its JSON (live_page.py), fed from here (`live`: live.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from cicada.common.httpd import serve_wsgi
from cicada.common.protocol import PHASES
from cicada.edge.coordinator.live import LiveStatus
from cicada.edge.coordinator.live_page import live_app

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class CoordinatorMetrics:
    """One registry per coordinator, so several can live in one process (tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.live = LiveStatus()  # the last requests, latency over time, workers and queues
        r = self.registry
        self.requests = Counter(
            "cicada_requests",
            "Requests answered, by route and outcome",
            ["model", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "cicada_request_seconds",
            "Request in to reply out",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "cicada_queue_depth",
            "Requests waiting in the coordinator",
            ["model", "priority"],
            registry=r,
        )
        self.workers = Gauge(
            "cicada_workers",
            "Registered workers by role and state",
            ["model", "role", "state"],
            registry=r,
        )
        self.malformed = Counter(
            "cicada_malformed_messages", "Messages dropped as malformed", registry=r
        )
        self.late_results = Counter(
            "cicada_late_results",
            "Results that arrived after their request was answered",
            registry=r,
        )
        self.unauthorized = Counter(
            "cicada_unauthorized_messages",
            "Messages refused because the sender's key is not bound to that role",
            registry=r,
        )
        self.refused_registrations = Counter(
            "cicada_refused_registrations",
            "READYs and HEARTBEATs refused (a field out of bounds, or not allowed for the key)",
            registry=r,
        )
        self.superseded = Counter(
            "cicada_superseded_messages",
            "PARTIALs and RESULTs dropped because another attempt (a re-dispatch, a handoff, a "
            "previous coordinator) owns their request",
            ["kind"],
            registry=r,
        )
        self.violations = Counter(
            "cicada_worker_violations",
            "Worker messages that broke the protocol (an unusable RESULT or PARTIAL, an id "
            "never dispatched); the attempts they touch end FAILED",
            registry=r,
        )
        self.client_backlog = Gauge(
            "cicada_client_backlog_messages",
            "Messages waiting in the coordinator for clients that read slowly",
            registry=r,
        )
        self.replies_discarded = Counter(
            "cicada_replies_discarded",
            "Replies whose outputs were discarded for a client over its backlog bound (it got "
            "REJECTED instead), and messages dropped with a client that was forgotten",
            ["kind"],
            registry=r,
        )
        self.clients_dropped = Counter(
            "cicada_clients_dropped",
            "Clients forgotten (outstanding work withdrawn) for not reading their replies",
            registry=r,
        )
        self.handoffs = Counter(
            "cicada_generation_handoffs",
            "Generations moved from an edge agent to a cloud worker mid-stream",
            registry=r,
        )
        self._dropped = Counter(
            "cicada_requests_dropped",
            "Requests forgotten without a REPLY: withdrawn by their client (cancelled), or "
            "their client is gone (client_gone)",
            ["reason"],
            registry=r,
        )
        self._dropped_by: dict[str, Any] = {}
        self.residency = Gauge(
            "cicada_worker_resident_stages",
            "Stages resident on a cloud worker (of cicada_worker_total_stages)",
            ["worker", "role"],
            registry=r,
        )
        self.total_stages = Gauge(
            "cicada_worker_total_stages", "Stages a worker loads", ["worker", "role"], registry=r
        )
        self.eta = Gauge(
            "cicada_worker_eta_seconds",
            "A worker's estimate of the rest of its load",
            ["worker", "role"],
            registry=r,
        )
        self.read_stages = Gauge(
            "cicada_worker_read_stages",
            "Stages a cloud worker has read and verified (resident once applied to its model)",
            ["worker", "role"],
            registry=r,
        )
        self.read_bytes = Gauge(
            "cicada_worker_read_bytes", "Weight bytes read and verified", ["worker", "role"],
            registry=r,
        )  # fmt: skip
        self.total_bytes = Gauge(
            "cicada_worker_total_bytes", "Weight bytes a worker loads", ["worker", "role"],
            registry=r,
        )  # fmt: skip
        self.phase = Gauge(
            "cicada_worker_phase_seconds",
            "Seconds a cloud worker has been in its current start-up phase (one series per "
            "worker, labelled with the phase: importing, constructing, loading, ready)",
            ["worker", "role", "phase"],
            registry=r,
        )
        self._phase_of: dict[tuple[str, str], str] = {}
        self._worker_labels: set[tuple[str, str, str]] = set()
        self._worker_names: set[tuple[str, str]] = set()
        # Labelled children, looked up once: `labels()` validates and locks on every call, and
        # was most of the metrics' cost per request. (Label sets are bounded by the caller.)
        self._requests: dict[tuple[str, str, str], Any] = {}
        self._latency: dict[tuple[str, str], Any] = {}
        self._depth: dict[tuple[str, int], list[Any]] = {}  # -> [gauge child, last value]

    def observe(
        self,
        model: str,
        route: str,
        status: str,
        seconds: float,
        priority: int | None = None,
        served_by: dict[str, Any] | None = None,
    ) -> None:
        """A request got its REPLY (`served_by`: the reply's, for the live page's worker)."""
        self.live.request_ended(model, route, status, seconds, priority, served_by)
        key = (model, route, status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(model, route, status)
        counter.inc()
        if status == "OK":
            histogram = self._latency.get(key[:2])
            if histogram is None:
                histogram = self._latency[key[:2]] = self.latency.labels(model, route)
            histogram.observe(seconds)

    def dropped(self, reason: str) -> None:
        counter = self._dropped_by.get(reason)
        if counter is None:
            counter = self._dropped_by[reason] = self._dropped.labels(reason)
        counter.inc()

    def set_queue_depth(self, model: str, priority: int, depth: int) -> None:
        entry = self._depth.get((model, priority))
        if entry is None:
            entry = self._depth[(model, priority)] = [
                self.queue_depth.labels(model, str(priority)),
                None,
            ]
        if entry[1] != depth:  # unchanged is the common case: skip the gauge's lock
            entry[0].set(depth)
            entry[1] = depth
            self.live.set_queue_depth(model, priority, depth)

    def set_workers(self, workers: Iterable[Any]) -> None:
        """Recount the registered workers by model, role and state, and drop every series of
        those gone (a registration, a departure or a change of state: not per heartbeat)."""
        workers = list(workers)
        self.live.set_workers(workers)
        counts: dict[tuple[str, str, str], int] = {}
        for w in workers:
            for model in w.models:
                key = (model, w.role.value, w.state.value)
                counts[key] = counts.get(key, 0) + 1
        for key in self._worker_labels - set(counts):  # nobody left there: drop the series
            self.workers.remove(*key)
        for key, n in counts.items():
            self.workers.labels(*key).set(n)
        self._worker_labels = set(counts)
        names: set[tuple[str, str]] = set()
        for w in workers:
            names.add((w.name, w.role.value))
            self.set_worker(w)
        for name in self._worker_names - names:  # gone: drop the series
            for gauge in (self.residency, self.total_stages, self.eta, self.read_stages,
                          self.read_bytes, self.total_bytes):  # fmt: skip
                gauge.remove(*name)
            phase = self._phase_of.pop(name, None)
            if phase is not None:
                self.phase.remove(*name, phase)
        self._worker_names = names

    def set_worker(self, w: Any) -> None:
        """One worker's residency and ETA (a heartbeat that did not change its state)."""
        name = (w.name, w.role.value)
        self.residency.labels(*name).set(w.resident_stages)
        self.total_stages.labels(*name).set(w.total_stages)
        self.eta.labels(*name).set(w.eta_s if w.eta_s is not None else -1)
        self.read_stages.labels(*name).set(w.read_stages)
        self.read_bytes.labels(*name).set(w.read_bytes)
        self.total_bytes.labels(*name).set(w.total_bytes)
        if w.phase is not None:
            # A peer's word becomes a label: only the known ones, so the series stay bounded.
            phase = w.phase if w.phase in PHASES else "other"
            was = self._phase_of.get(name)
            if was is not None and was != phase:
                self.phase.remove(*name, was)
            self._phase_of[name] = phase
            self.phase.labels(*name, phase).set(w.phase_s or 0.0)

    def serve(self, host: str, port: int) -> Any:
        """Serve /metrics, the live page (/) and /status.json on HOST:PORT until the returned
        server's shutdown()."""
        app = live_app(self.live, make_wsgi_app(self.registry))
        return serve_wsgi(host, port, app, "cicada-metrics")
