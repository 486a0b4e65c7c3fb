"""Admission, the bounded per-priority queues of each model, and deadlines: the requests the
coordinator holds until they get their one REPLY. Sends nothing: admission answers with a
`Refusal`, expiry with the requests whose time ran out, and the broker replies."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cicada.common.defaults import PRIORITIES
from cicada.common.generation import GenerationError, check_options
from cicada.common.protocol import Reply, Request, Status
from cicada.edge.coordinator.policy import Route, SideView


@dataclass
class Pending:
    key: str
    client: bytes
    request: Request
    arrived: float
    deadline: float | None
    route: Route | None = None
    worker: bytes | None = None
    dispatched_at: float | None = None
    # Generation (options.max_new_tokens): tokens streamed so far, and who produced them.
    tokens: list[int] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0  # the next PARTIAL's number, to the client

    def remaining(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now

    @property
    def generating(self) -> bool:
        return "max_new_tokens" in self.request.options

    def tokens_left(self) -> int:
        return int(self.request.options["max_new_tokens"]) - len(self.tokens)


@dataclass(frozen=True)
class Refusal:
    """Why a request gets no (more) work: the REPLY that answers it instead of a worker."""

    status: Status
    error: str
    retry_after_ms: int | None = None

    def reply(self, request_id: str) -> Reply:
        return Reply(
            id=request_id, status=self.status, error=self.error, retry_after_ms=self.retry_after_ms
        )


class Scheduler:
    def __init__(
        self,
        queue_limit: int,
        retry_after_ms: int,
        serves: Callable[[str], bool],
        unknown: Callable[[str], str | None] = lambda model: None,
    ) -> None:
        self.queue_limit = queue_limit  # per model and priority
        self.retry_after_ms = retry_after_ms  # suggested when nobody can serve a model
        self.serves = serves  # whether anyone (registered or launchable) serves a model
        self.unknown = unknown  # why a model is unknown (BAD_REQUEST); None: it is known
        self.pending: dict[str, Pending] = {}
        # model -> priority -> queue of pending keys (bounded by queue_limit)
        self.queues: dict[str, dict[int, deque[str]]] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._ids = itertools.count()

    # -- admission -----------------------------------------------------------------------------

    def admit(self, client: bytes, request: Request, now: float) -> Pending | Refusal:
        """Queue `request`, or say why not."""
        model = request.model
        if "max_new_tokens" in request.options:
            try:
                check_options(request.options)
            except GenerationError as exc:
                return Refusal(Status.BAD_REQUEST, str(exc))
        if request.priority not in PRIORITIES:
            return Refusal(Status.BAD_REQUEST, f"priority must be one of {PRIORITIES}")
        if not self.serves(model):
            unknown = self.unknown(model)
            if unknown is not None:
                return Refusal(Status.BAD_REQUEST, unknown)
            return Refusal(
                Status.UNAVAILABLE,
                f"no edge agent or cloud worker serves {model!r}",
                self.retry_after_ms,
            )
        queue = self.queues.setdefault(model, {p: deque() for p in PRIORITIES})[request.priority]
        if len(queue) >= self.queue_limit:
            return Refusal(
                Status.REJECTED,
                f"queue for {model} priority {request.priority} is full",
                self.retry_after_ms,
            )
        if request.timeout_ms is not None and request.timeout_ms <= 0:
            return Refusal(Status.TIMEOUT, "deadline passed before the request arrived")
        key = f"{next(self._ids):x}"
        deadline = None if request.timeout_ms is None else now + request.timeout_ms / 1000
        p = self.pending[key] = Pending(key, client, request, now, deadline)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, key))
        queue.append(key)
        return p

    # -- queues --------------------------------------------------------------------------------

    def queue_of(self, p: Pending) -> deque[str]:
        return self.queues[p.request.model][p.request.priority]

    def requeue(self, p: Pending) -> None:
        """Back to the front of its queue, undecided: the next dispatch decides again, or
        answers UNAVAILABLE / TIMEOUT if nobody can take it in time."""
        p.worker, p.dispatched_at, p.route = None, None, None
        self.queue_of(p).appendleft(p.key)

    def forget(self, key: str) -> None:
        self.pending.pop(key, None)

    def withdraw(self, client: bytes, request_id: str) -> Pending | None:
        """Forget `client`'s request `request_id` (out of its queue if still queued); None if
        it is not pending (already answered, or never seen)."""
        p = next(
            (p for p in self.pending.values() if p.client == client and p.request.id == request_id),
            None,
        )  # a linear scan: clients cancel rarely, and nothing else needs the index
        if p is None:
            return None
        del self.pending[p.key]
        if p.worker is None:
            queue = self.queue_of(p)
            if p.key in queue:
                queue.remove(p.key)
        return p

    def queued_for(self, model: str, side: Route) -> int:
        """Requests of `model` waiting that were last routed to `side`."""
        queued = 0
        pending = self.pending
        for q in self.queues.get(model, {}).values():
            for key in q:
                if pending[key].route is side:
                    queued += 1
        return queued

    def cloud_demand(self, model: str) -> int:
        """Requests for `model` that want the large model: queued or running, normal and
        quality-seeking (latency-critical work never waits for a cloud worker to start)."""
        return sum(
            1 for p in self.pending.values() if p.request.model == model and p.request.priority >= 1
        )

    def unroutable(self, route: Route, model: str, cloud: SideView) -> Refusal:
        """The answer for a queued request the policy routed nowhere (UNAVAILABLE: nobody can
        serve it; TOO_LATE: nobody in time)."""
        if route is Route.TOO_LATE:
            return Refusal(Status.TIMEOUT, "no worker can finish before the deadline")
        if cloud.available and cloud.eta_s != float("inf"):
            retry_after_ms = max(1, int(cloud.eta_s * 1000))  # until the cloud is up
        else:
            retry_after_ms = self.retry_after_ms
        return Refusal(Status.UNAVAILABLE, f"no worker can serve {model} now", retry_after_ms)

    # -- deadlines -----------------------------------------------------------------------------

    def expired(self, now: float) -> Iterator[Pending]:
        """The requests whose deadline passed, queued (taken off their queue) or running."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, key = heapq.heappop(self._deadlines)
            p = self.pending.get(key)
            if p is None:
                continue
            if p.worker is None:
                queue = self.queue_of(p)
                if key in queue:
                    queue.remove(key)
            yield p

    def next_deadline(self, default: float) -> float:
        while self._deadlines and self._deadlines[0][1] not in self.pending:
            heapq.heappop(self._deadlines)
        return min(default, self._deadlines[0][0]) if self._deadlines else default
