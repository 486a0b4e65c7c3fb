"""The registered edge agents and cloud workers: who serves which model, in what state, with
how many slots taken. Sends nothing: the broker tells the workers, the registry keeps count."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from cicada.common.protocol import Heartbeat, Ready, Role, WorkerState

if TYPE_CHECKING:
    from cicada.edge.coordinator.scheduler import Pending


@dataclass
class WorkerInfo:
    identity: bytes
    role: Role
    name: str
    models: list[str]
    variant: str
    capacity: int
    state: WorkerState
    expires_at: float
    resident_stages: int = 0
    total_stages: int = 0
    eta_s: float | None = None
    compute_s: float | None = None
    # A starting cloud worker's phase and weights read so far (for display: the policy uses
    # state, eta_s and compute_s).
    phase: str | None = None
    phase_s: float | None = None
    read_stages: int = 0
    read_bytes: int = 0
    total_bytes: int = 0
    batch_marginal: float | None = None  # a batching worker's cost per request a batch adds
    drafts: bool = False  # READY's `drafts`: drafts after an exact takeover / verifies drafts
    inflight: dict[str, Pending] = field(default_factory=dict)

    @classmethod
    def from_ready(cls, identity: bytes, ready: Ready, expires_at: float) -> WorkerInfo:
        worker = cls(
            identity=identity,
            role=ready.role,
            name=ready.worker,
            models=list(ready.models),
            variant=ready.variant,
            capacity=max(1, ready.capacity),
            state=ready.state or WorkerState.READY,
            expires_at=expires_at,
            drafts=ready.drafts is True,
        )
        worker.update(ready)
        return worker

    @property
    def accepting(self) -> bool:
        """Whether it takes work (docs/PROTOCOL.md, section 6): `ready`; `cold` or `loading`
        when it reports an ETA (`eta_s`: work that may wait for it); never `draining`."""
        if self.state is WorkerState.READY:
            return True
        return self.state is not WorkerState.DRAINING and self.eta_s is not None

    @property
    def free(self) -> int:
        return self.capacity - len(self.inflight) if self.accepting else 0

    def update(self, m: Ready | Heartbeat) -> None:
        if m.state is not None:
            self.state = m.state
        self.resident_stages, self.total_stages = m.resident_stages, m.total_stages
        self.eta_s = m.eta_s
        if m.compute_s is not None:
            self.compute_s = m.compute_s
        if m.batch_marginal is not None:
            self.batch_marginal = m.batch_marginal
        self.phase, self.phase_s = m.phase, m.phase_s
        self.read_stages, self.read_bytes, self.total_bytes = (
            m.read_stages,
            m.read_bytes,
            m.total_bytes,
        )

    def reregister(self, ready: Ready) -> None:
        """A READY from a worker already registered: what it serves may have changed."""
        self.update(ready)
        self.models, self.capacity = list(ready.models), max(1, ready.capacity)
        self.variant = ready.variant
        self.drafts = ready.drafts is True

    def becomes_ready(self, state: WorkerState | None, first: bool = False) -> bool:
        """Whether reporting `state` makes this worker ready (before `update` applies it)."""
        return state is WorkerState.READY and (first or self.state is not WorkerState.READY)


MODELS_REMEMBERED = 4096


class Side(NamedTuple):
    """The registered workers of one role for one model, summed for the policy's SideView."""

    workers: int
    capacity: int
    inflight: int
    compute_s: float | None  # the fastest worker's, None if none has reported one
    ready: bool
    eta_s: float
    # The largest batch_marginal of those workers (the most pessimistic), None if none batches.
    batch_marginal: float | None = None


class Registry:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s  # heartbeat interval x liveness: silent longer, a worker is gone
        self.workers: dict[bytes, WorkerInfo] = {}
        self.models_seen: set[str] = set()  # every model a worker ever registered for

    def get(self, identity: bytes) -> WorkerInfo | None:
        return self.workers.get(identity)

    def seen(self, identity: bytes, now: float) -> WorkerInfo | None:
        """Any message from a registered worker proves it alive."""
        worker = self.workers.get(identity)
        if worker is not None:
            worker.expires_at = now + self.ttl_s
        return worker

    def add(self, identity: bytes, ready: Ready, now: float) -> WorkerInfo:
        worker = WorkerInfo.from_ready(identity, ready, now + self.ttl_s)
        self.workers[identity] = worker
        self._remember(ready.models)
        return worker

    def reregister(self, worker: WorkerInfo, ready: Ready) -> None:
        worker.reregister(ready)
        self._remember(ready.models)

    def _remember(self, models: list[str]) -> None:
        """Models registered once stay known (UNAVAILABLE, not BAD_REQUEST, once their workers
        are gone); bounded, so that registrations cannot grow it without end."""
        for model in models:
            if len(self.models_seen) >= MODELS_REMEMBERED:
                return
            self.models_seen.add(model)

    def remove(self, identity: bytes) -> WorkerInfo | None:
        return self.workers.pop(identity, None)

    def expired(self, now: float) -> list[bytes]:
        return [identity for identity, w in self.workers.items() if w.expires_at < now]

    def named(self, name: str) -> list[bytes]:
        return [identity for identity, w in self.workers.items() if w.name == name]

    def drain(self, name: str) -> None:
        """A worker told to drain takes no new work, even before it says so itself."""
        for w in self.workers.values():
            if w.name == name:
                w.state = WorkerState.DRAINING

    def release(self, identity: bytes, key: str) -> None:
        """The slot `key` held on `identity` (if both are still there) is free again."""
        worker = self.workers.get(identity)
        if worker is not None:
            worker.inflight.pop(key, None)

    def serves(self, model: str) -> bool:
        return any(model in w.models and w.accepting for w in self.workers.values())

    def side(self, model: str, role: Role) -> Side:
        # One pass over the workers (this runs per dispatch decision: it was a fifth of the
        # coordinator's time as a chain of comprehensions).
        count = capacity = inflight = 0
        ready = False  # some worker is `ready`; else the soonest ETA of those that will be
        eta = float("inf")
        compute: float | None = None
        marginal: float | None = None
        for w in self.workers.values():
            if w.role is not role or model not in w.models or not w.accepting:
                continue
            count += 1
            if w.batch_marginal is not None and (marginal is None or w.batch_marginal > marginal):
                marginal = w.batch_marginal
            capacity += w.capacity
            inflight += len(w.inflight)
            if w.compute_s is not None and (compute is None or w.compute_s < compute):
                compute = w.compute_s
            if w.state is WorkerState.READY:
                ready, eta = True, 0.0
            elif w.eta_s is not None and w.eta_s < eta:
                eta = w.eta_s
        return Side(count, capacity, inflight, compute, ready, eta, marginal)

    def all_slots_taken(self, model: str) -> bool:
        """Some worker serves `model` and none has a free slot: nothing to decide (the cheap
        test before building views; launching workers hold no slot yet)."""
        serving = False
        for w in self.workers.values():
            if model in w.models and w.accepting:
                if len(w.inflight) < w.capacity:
                    return False
                serving = True
        return serving

    def pick(self, model: str, role: Role, ready_only: bool = False) -> WorkerInfo | None:
        """The worker of `role` for `model` with a free slot: ready ones first, then the least
        loaded (`ready_only`: latency-critical work never waits for a worker to load)."""
        best: WorkerInfo | None = None
        for w in self.workers.values():
            if w.role is not role or model not in w.models or w.free <= 0:
                continue
            if ready_only and w.state is not WorkerState.READY:
                continue
            key = (w.state is not WorkerState.READY, len(w.inflight) / w.capacity)
            if best is None or key < (
                best.state is not WorkerState.READY,
                len(best.inflight) / best.capacity,
            ):
                best = w
        return best
