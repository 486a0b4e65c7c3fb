"""Coordinator metrics on a Prometheus endpoint (prometheus_client: the exposition format,
histograms and an HTTP server we would otherwise write by hand)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class CoordinatorMetrics:
    """One registry per coordinator, so several can live in one process (tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self._worker_labels: set[tuple[str, str, str]] = set()

    def observe(self, model: str, route: str, status: str, seconds: float) -> None:
        self.requests.labels(model, route, status).inc()
        if status == "OK":
            self.latency.labels(model, route).observe(seconds)

    def set_workers(self, workers: Iterable[Any]) -> None:
        counts: dict[tuple[str, str, str], int] = {}
        for w in workers:
            for model in w.models:
                key = (model, w.role.value, w.state.value)
                counts[key] = counts.get(key, 0) + 1
        for key in self._worker_labels - set(counts):
            self.workers.labels(*key).set(0)
        for key, n in counts.items():
            self.workers.labels(*key).set(n)
        self._worker_labels |= set(counts)

    def serve(self, host: str, port: int) -> Any:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
