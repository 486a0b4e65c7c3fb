"""What the live page (`/`) and `cicada status` show, as `/status.json` (docs/STATUS.md).

The broker's thread writes, the HTTP server's threads read:

* as each request ends, one tuple goes into a ring of the last `RECENT_REQUESTS` and, for an
  answered one, one point into its (model, route) latency ring: O(1), bounded memory;
* the workers are the registry's own `WorkerInfo` objects, the list replaced whole whenever
  the broker recounts them (their residency, ETA and slots are read as they are now);
* queue depths as the broker last set them (it does on every change).

The JSON is built only when asked. It holds no inputs, outputs or client identities: a request
is its model, priority, who served it, status and latency.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

RECENT_REQUESTS = 50  # the last requests shown
LATENCY_POINTS = 240  # answered requests kept per (model, route) for the chart and percentiles
LATENCY_SERIES = 32  # (model, route) pairs with a chart; the rest are counted, not kept
MAX_MODELS = 64  # models in one snapshot (the rest are counted)
MAX_WORKERS = 128  # workers listed per model (the rest are counted)
VERSION = 1  # of the JSON's shape


class LiveStatus:
    """The coordinator's recent history and a view of its workers and queues (module doc)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        # One lock for the rings and the queue table, held for an append or a copy: cheap
        # uncontended, and it keeps the reader's copies whole without relying on the GIL.
        self._lock = threading.Lock()
        # (at, model, priority, route, worker, handed_off, status, latency_s)
        self._recent: deque[tuple[float, str, int | None, str, str, bool, str, float]] = deque(
            maxlen=RECENT_REQUESTS
        )
        self._latency: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        # Pairs refused a series: counted (up to LATENCY_SERIES, so the set stays bounded).
        self._untracked: set[tuple[str, str]] = set()
        self._workers: list[Any] = []
        self._queues: dict[tuple[str, int], int] = {}

    # -- the broker's side ----------------------------------------------------------------------

    def request_ended(
        self,
        model: str,
        route: str,
        status: str,
        seconds: float,
        priority: int | None = None,
        served_by: dict[str, Any] | None = None,
    ) -> None:
        """One request got its REPLY. `served_by`: the reply's (only the worker's name and
        whether several workers made it are kept)."""
        worker, handed_off = "", False
        if served_by:
            worker = str(served_by.get("worker") or "")
            segments = served_by.get("segments")
            handed_off = isinstance(segments, list) and len(segments) > 1
        now = self.clock()
        with self._lock:
            self._recent.append((now, model, priority, route, worker, handed_off, status, seconds))
            if status != "OK":
                return
            series = self._latency.get((model, route))
            if series is None:
                if len(self._latency) >= LATENCY_SERIES:
                    if len(self._untracked) < LATENCY_SERIES:
                        self._untracked.add((model, route))
                    return
                series = self._latency[(model, route)] = deque(maxlen=LATENCY_POINTS)
            series.append((now, seconds))

    def set_workers(self, workers: Iterable[Any]) -> None:
        self._workers = list(workers)  # replaced whole: a reader holds the old list or this

    def set_queue_depth(self, model: str, priority: int, depth: int) -> None:
        with self._lock:
            self._queues[(model, priority)] = depth

    # -- the reader's side ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The `/status.json` document (fields in docs/STATUS.md)."""
        now = self.clock()
        with self._lock:
            recent = list(self._recent)
            latency = {key: list(points) for key, points in self._latency.items()}
            queues = dict(self._queues)
            untracked = len(self._untracked)
        workers = self._workers
        models: dict[str, dict[str, Any]] = {}

        def model_entry(name: str) -> dict[str, Any] | None:
            entry = models.get(name)
            if entry is None and len(models) < MAX_MODELS:
                entry = models[name] = {
                    "name": name,
                    "workers": [],
                    "workers_omitted": 0,
                    "queues": {},
                    "latency": [],
                }
            return entry

        omitted: set[str] = set()
        for w in workers:
            for name in list(w.models):
                entry = model_entry(name)
                if entry is None:
                    omitted.add(name)
                elif len(entry["workers"]) >= MAX_WORKERS:
                    entry["workers_omitted"] += 1
                else:
                    entry["workers"].append(_worker(w))
        for (name, priority), depth in sorted(queues.items()):
            entry = model_entry(name)
            if entry is None:
                omitted.add(name)
            else:
                entry["queues"][str(priority)] = depth
        for (name, route), points in sorted(latency.items()):
            entry = model_entry(name)
            if entry is None:
                omitted.add(name)
                continue
            values = sorted(s for _, s in points)
            entry["latency"].append(
                {
                    "route": route,
                    "count": len(values),
                    "p50_s": _quantile(values, 0.50),
                    "p99_s": _quantile(values, 0.99),
                    # (to the ms of age and the µs of latency: a third of the bytes to send)
                    "points": [[round(now - at, 3), round(s, 6)] for at, s in points],
                }
            )
        for entry in models.values():
            entry["workers"].sort(key=lambda w: (w["role"], w["name"]))
        return {
            "version": VERSION,
            "uptime_s": round(now - self.started, 3),
            "models": [models[name] for name in sorted(models)],
            "models_omitted": len(omitted),
            "recent": [
                {
                    "age_s": round(now - at, 3),
                    "model": model,
                    "priority": priority,
                    "route": route,
                    "worker": worker,
                    "handed_off": handed_off,
                    "status": status,
                    "latency_s": seconds,
                }
                for at, model, priority, route, worker, handed_off, status, seconds in reversed(
                    recent
                )
            ],
            "latency_series_untracked": untracked,
            "limits": {
                "recent": RECENT_REQUESTS,
                "latency_points": LATENCY_POINTS,
                "latency_series": LATENCY_SERIES,
                "models": MAX_MODELS,
                "workers_per_model": MAX_WORKERS,
            },
        }


def _worker(w: Any) -> dict[str, Any]:
    """One registered worker as the page shows it (attributes read as they are now: a torn read
    across two heartbeats shows one field newer than another, never a wrong type)."""
    return {
        "name": w.name,
        "role": w.role.value,
        "state": w.state.value,
        "variant": w.variant,
        "resident_stages": w.resident_stages,
        "total_stages": w.total_stages,
        # A starting cloud worker's phase (importing, constructing, loading, ready) and the
        # stages read and verified so far: on CPU the read finishes before torch is imported.
        "phase": w.phase,
        "phase_s": _finite(w.phase_s),
        "read_stages": w.read_stages,
        "eta_s": _finite(w.eta_s),
        "capacity": w.capacity,
        "busy": len(w.inflight),
        "compute_s": _finite(w.compute_s),
        "batch_marginal": _finite(w.batch_marginal),
    }


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity (the protocol bounds estimates; this keeps the page whole)."""
    return None if value is None or not math.isfinite(value) else float(value)


def _quantile(values: list[float], q: float) -> float | None:
    """The nearest-rank quantile of sorted `values` (None when empty)."""
    if not values:
        return None
    return values[max(0, math.ceil(q * len(values)) - 1)]
