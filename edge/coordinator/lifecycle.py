"""Serverless lifecycle of cloud workers, driven by the coordinator.

* **Start from zero**: the first request for a model with no cloud worker launches one
  (through a `cicada.common.launch.Launcher`), whatever its priority: a latency-critical
  request is still answered by the edge (it never waits for a cold cloud), but it says the
  model is in use, and the worker is then up for what follows. Meanwhile the policy sees a
  cloud side that is "launching" with an ETA (the measured cold start, or
  `expected_start_s` until measured). A request of any priority keeps one worker wanted for
  `keep_alive_s` after it.
* **Keep-alive / scale to zero**: a worker idle for `keep_alive_s` is asked to drain and stop,
  down to `min_workers`.
* **Keep-warm** decides how many workers stay up:
  - ``fixed``: every worker lives `keep_alive_s` past its last request (the classic rule).
  - ``lazy``: the *warm target* follows demand (an exponentially weighted request rate ×
    cloud compute time, i.e. the concurrency the cloud needs), but only moves when the new
    value is at least `lazy_threshold` away from the current one ("lazy switching"): bursts
    and gaps shorter than the averaging window do not make it flap. Workers up to the target
    are kept (and prewarmed) regardless of keep-alive.
* **Crashes**: a worker process that dies unasked is forgotten at once (its requests are
  re-routed or answered, as for any dead worker) and relaunched while there is demand, with
  exponential backoff.

All decisions are made in `tick(now)`, called from the coordinator's loop with its clock.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cicada.common.launch import Launcher, LaunchError, WorkerHandle, WorkerSpec
from cicada.common.protocol import Role
from cicada.edge.coordinator.config import ModelConfig

if TYPE_CHECKING:
    from cicada.edge.coordinator.broker import Coordinator

log = logging.getLogger("cicada.lifecycle")

RATE_HALF_LIFE_S = 20.0  # the demand estimate forgets half of itself in this time


@dataclass
class Managed:
    """One worker this lifecycle launched."""

    name: str
    handle: WorkerHandle
    launched_at: float
    registered_at: float | None = None
    stopping: bool = False
    stop_asked_at: float | None = None  # when scale-down asked it to drain
    last_busy: float = 0.0


@dataclass
class ModelLifecycle:
    name: str
    config: ModelConfig
    workers: dict[str, Managed] = field(default_factory=dict)
    rate: float = 0.0  # requests/s, exponentially weighted
    rate_at: float = 0.0
    warm_target: int = 0
    crashes: int = 0
    next_launch_at: float = 0.0
    start_samples: list[float] = field(default_factory=list)
    launches: int = 0
    stops: int = 0
    last_request_at: float | None = None  # any priority: the model is in use

    def expected_start_s(self) -> float:
        if self.start_samples:
            recent = sorted(self.start_samples[-5:])
            return recent[len(recent) // 2]
        return self.config.expected_start_s

    def observe_request(self, now: float) -> None:
        self._decay(now)
        self.rate += math.log(2) / RATE_HALF_LIFE_S  # each request adds 1/window req/s

    def _decay(self, now: float) -> None:
        if self.rate_at:
            self.rate *= 0.5 ** ((now - self.rate_at) / RATE_HALF_LIFE_S)
        self.rate_at = now


class Lifecycle:
    def __init__(
        self,
        models: dict[str, ModelConfig],
        launcher: Launcher,
        spec_for: Callable[[str, ModelConfig, str], WorkerSpec],
    ) -> None:
        self.models = {name: ModelLifecycle(name, cfg) for name, cfg in models.items()}
        self.launcher = launcher
        self.spec_for = spec_for
        self._seq = itertools.count(1)

    def manages(self, model: str) -> bool:
        return model in self.models

    # -- what the coordinator asks -------------------------------------------------------------

    def on_request(self, model: str, now: float) -> None:
        lc = self.models.get(model)
        if lc is not None:
            lc.observe_request(now)
            lc.last_request_at = now

    def launching(self, model: str, now: float) -> tuple[int, float]:
        """(workers launched but not registered yet, the soonest ETA among them)."""
        lc = self.models.get(model)
        if lc is None:
            return 0, math.inf
        pending = [m for m in lc.workers.values() if m.registered_at is None and not m.stopping]
        if not pending:
            return 0, math.inf
        eta = min(max(0.05, lc.expected_start_s() - (now - m.launched_at)) for m in pending)
        return len(pending), eta

    def _find(self, name: str) -> tuple[ModelLifecycle, Managed] | None:
        for lc in self.models.values():
            m = lc.workers.get(name)
            if m is not None:
                return lc, m
        return None

    def on_registered(self, name: str, now: float) -> None:
        found = self._find(name)
        if found is not None and found[1].registered_at is None:
            found[1].registered_at = now
            found[1].last_busy = now

    def on_ready(self, name: str, now: float) -> None:
        found = self._find(name)
        if found is not None:
            lc, m = found
            lc.start_samples.append(now - m.launched_at)
            lc.crashes = 0  # only a worker that got all the way up proves the package good

    def on_busy(self, name: str, now: float) -> None:
        """A request was dispatched to or answered by `name`: it is not idle."""
        found = self._find(name)
        if found is not None:
            found[1].last_busy = now

    def on_removed(self, name: str) -> None:
        """The coordinator dropped `name` (e.g. missed heartbeats). If its process lives on it
        will register again; until then it counts as launching, not as gone."""
        found = self._find(name)
        if found is not None and not found[1].stopping:
            found[1].registered_at = None

    # -- decisions ------------------------------------------------------------------------------

    def tick(self, coord: Coordinator, now: float) -> None:
        for lc in self.models.values():
            self._reap(lc, coord, now)
            self._scale(lc, coord, now)

    def _reap(self, lc: ModelLifecycle, coord: Coordinator, now: float) -> None:
        for name, m in list(lc.workers.items()):
            if m.handle.alive():
                if m.registered_at is None and now - m.launched_at > lc.config.start_timeout_s:
                    log.warning(
                        "%s did not register within %.0f s: killing it",
                        name,
                        lc.config.start_timeout_s,
                    )
                    m.handle.kill()
                    m.stopping = False  # counts as a crash below, next tick
                elif (
                    m.stop_asked_at is not None
                    and now - m.stop_asked_at > lc.config.stop_timeout_s
                ):
                    log.warning(
                        "%s did not stop within %.0f s of being asked to drain: killing it",
                        name,
                        lc.config.stop_timeout_s,
                    )
                    m.handle.kill()
                    m.stop_asked_at = None  # killed once; its exit counts as a stop
                continue
            del lc.workers[name]
            coord.forget_worker_named(name, now, reason="process exited")
            if m.stopping:
                lc.stops += 1
                continue
            backoff = self._back_off(lc, now)
            log.warning(
                "%s exited unasked (crash %d): relaunch no sooner than %.1f s",
                name,
                lc.crashes,
                backoff,
            )

    def _scale(self, lc: ModelLifecycle, coord: Coordinator, now: float) -> None:
        cfg = lc.config
        lc._decay(now)
        demand = coord.cloud_demand(lc.name)  # queued + running for this model
        registered = {
            w.name: w
            for w in coord.workers.values()
            if w.role is Role.CLOUD and lc.name in w.models
        }
        for name, w in registered.items():
            m = lc.workers.get(name)
            if m is not None and (w.inflight or m.registered_at is None):
                m.last_busy = now
        live = [m for m in lc.workers.values() if not m.stopping]

        # How many workers should be up now.
        compute = coord.view(lc.name, Role.CLOUD).compute_s
        needed = math.ceil(lc.rate * compute) if lc.rate > 1e-3 else 0
        if cfg.keep_warm == "lazy":
            if abs(needed - lc.warm_target) >= cfg.lazy_threshold:
                lc.warm_target = needed
            keep = lc.warm_target
        else:
            keep = 0
        # Queued or running cloud-bound work wants a worker; so does any recent request,
        # latency-critical ones included (they alone never count as cloud demand).
        recent = lc.last_request_at is not None and now - lc.last_request_at < cfg.keep_alive_s
        want = max(cfg.min_workers, keep, 1 if demand or recent else 0)
        if demand > len(live):
            want = max(want, min(cfg.max_workers, demand))  # one per waiting request, bounded
        want = min(want, cfg.max_workers)

        if len(live) < want and now >= lc.next_launch_at:
            self._launch(lc, coord, now)
        elif len(live) > want:
            # Stop the longest-idle workers past their keep-alive, never below `want`.
            idle = sorted(
                (
                    m
                    for m in live
                    if m.registered_at is not None
                    and not registered.get(m.name, _NoWorker).inflight
                    and now - m.last_busy >= cfg.keep_alive_s
                ),
                key=lambda m: m.last_busy,
            )
            for m in idle[: len(live) - want]:
                log.info("%s idle for %.1f s: draining (scale down)", m.name, now - m.last_busy)
                m.stopping = True
                m.stop_asked_at = now
                coord.stop_dispatching_to(m.name)  # before its DISCONNECT arrives
                m.handle.terminate()

    @staticmethod
    def _back_off(lc: ModelLifecycle, now: float) -> float:
        """One more failure: the next launch waits twice as long as the last (capped)."""
        lc.crashes += 1
        backoff = min(
            lc.config.relaunch_backoff_max_s, lc.config.relaunch_backoff_s * 2 ** (lc.crashes - 1)
        )
        lc.next_launch_at = now + backoff
        return backoff

    def _launch(self, lc: ModelLifecycle, coord: Coordinator, now: float) -> None:
        name = f"{_name_part(lc.name)}-cloud-{next(self._seq)}"
        spec = self.spec_for(lc.name, lc.config, name)
        try:
            handle = self.launcher.launch(spec)
        except LaunchError as exc:
            self._back_off(lc, now)
            log.error("launching %s failed: %s", name, exc)
            return
        lc.workers[name] = Managed(name, handle, launched_at=now, last_busy=now)
        lc.launches += 1
        log.info("launched %s via %s", name, self.launcher.kind)

    def close(self) -> None:
        for lc in self.models.values():
            for m in lc.workers.values():
                m.stopping = True
                m.handle.terminate()
        self.launcher.close()

    def snapshot(self) -> dict[str, Any]:
        return {
            name: {
                "workers": sorted(lc.workers),
                "warm_target": lc.warm_target,
                "rate": lc.rate,
                "launches": lc.launches,
                "stops": lc.stops,
                "crashes": lc.crashes,
                "expected_start_s": lc.expected_start_s(),
            }
            for name, lc in self.models.items()
        }


def _name_part(model: str) -> str:
    """A model name as the start of a worker name, which launchers use as a file name (its
    log) and refuse with anything but letters, digits, '.', '_' and '-' (no '..')."""
    part = re.sub(r"[^A-Za-z0-9._-]|\.(?=\.)", "_", model)[:100]
    return part if part[:1].isalnum() else f"m{part}"


class _NoWorkerType:
    inflight: dict[str, Any] = {}  # noqa: RUF012 - read-only sentinel


_NoWorker = _NoWorkerType()
