"""Admission, the bounded per-priority queues of each model, and deadlines: the requests the
coordinator holds until they get their one REPLY. Sends nothing: admission answers with a
`Refusal`, expiry with the requests whose time ran out, and the broker replies.

Nobody can take the coordinator down alone (docs/PROTOCOL.md section 13):

* the bytes of request tensors held (queued or running: the coordinator keeps them to
  re-route) are capped per coordinator and per client;
* within each (model, priority) queue every client has its own FIFO and the clients take
  turns (`FairQueue`), and one client may fill at most `client_queue_limit` of a queue;
* a request without a deadline gets `default_deadline_s`; priority 0 is for the clients
  allowed it;
* `drop_client` forgets everything of a client that is gone (its reply could not be routed).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cicada.common.defaults import PRIORITIES
from cicada.common.generation import GenerationError, check_request_options
from cicada.common.protocol import RawTensor, Reply, Request, Status
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
    # An exact generation (options.exact): how many leading tokens a cloud worker produced or
    # verified, the tokens replaced by rewinds so far, and the length of the draft the current
    # attempt verifies (None: no verdict awaited).
    verified: int = 0
    rewound: int = 0
    draft_len: int | None = None
    # The attempt running now: its DISPATCH id (epoch.key.attempt, unique across coordinator
    # restarts and re-dispatches), None while queued. Only its PARTIALs and RESULT count.
    attempt: int = 0
    dispatch_id: str | None = None
    # After an exact takeover by a cloud worker that verifies drafts: the edge attempt that
    # keeps drafting (its worker's identity, its DISPATCH id), None when no edge drafts.
    drafting: tuple[bytes, str] | None = None

    def remaining(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now

    @property
    def generating(self) -> bool:
        return "max_new_tokens" in self.request.options

    @property
    def exact(self) -> bool:
        return self.request.options.get("exact") is True

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


class FairQueue:
    """One (model, priority) queue: a FIFO per client, and the clients take turns.

    Dispatch walks `order()`: round after round, the next key of each client in turn; a client
    whose key is dispatched (`took`) goes to the back of the turn order, so one free slot at a
    time still rotates among the clients. Costs: append / took O(1); `order()` O(clients with
    queued work) to start, then O(1) per key; `remove` O(that client's queue)."""

    __slots__ = ("_clients", "_len")

    def __init__(self) -> None:
        self._clients: OrderedDict[bytes, deque[str]] = OrderedDict()  # in turn order
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[str]:
        """Every queued key (client by client; `order()` is the dispatch order)."""
        for q in self._clients.values():
            yield from q

    def count(self, client: bytes) -> int:
        q = self._clients.get(client)
        return 0 if q is None else len(q)

    def append(self, client: bytes, key: str) -> None:
        q = self._clients.get(client)
        if q is None:
            q = self._clients[client] = deque()
        q.append(key)
        self._len += 1

    def appendleft(self, client: bytes, key: str) -> None:
        """Back to the front: the client's next key, and the client's turn is next."""
        q = self._clients.get(client)
        if q is None:
            q = self._clients[client] = deque()
        q.appendleft(key)
        self._clients.move_to_end(client, last=False)
        self._len += 1

    def remove(self, client: bytes, key: str) -> bool:
        """Take `key` out; False if it was not queued."""
        q = self._clients.get(client)
        if q is None:
            return False
        if q and q[0] == key:
            q.popleft()
        else:
            try:
                q.remove(key)
            except ValueError:
                return False
        self._len -= 1
        if not q:
            del self._clients[client]
        return True

    def took(self, client: bytes, key: str) -> None:
        """`key` was dispatched: out of the queue, and its client's turn is used."""
        if self.remove(client, key) and client in self._clients:
            self._clients.move_to_end(client)

    def drop(self, client: bytes) -> list[str]:
        """Take out every key of `client`."""
        q = self._clients.pop(client, None)
        if q is None:
            return []
        self._len -= len(q)
        return list(q)

    def order(self) -> Iterator[tuple[bytes, str]]:
        """(client, key) in dispatch order: each client's first key in turn order, then each
        one's second, and so on. The caller may take out the key just yielded (dispatched,
        refused) or leave it queued (skipped for the rest of this walk)."""
        clients = list(self._clients)
        kept: dict[bytes, int] = {}  # per client: its keys yielded and left queued
        while clients:
            still = []
            for client in clients:
                q = self._clients.get(client)
                i = kept.get(client, 0)
                if q is None or i >= len(q):
                    continue
                key = q[i]
                yield client, key
                if i < len(q) and q[i] == key:
                    kept[client] = i + 1
                still.append(client)
            clients = still


@dataclass
class ClientBook:
    """What the coordinator holds for one client: its pending requests and their bytes."""

    pending: dict[str, Pending] = field(default_factory=dict)  # by coordinator key
    held_bytes: int = 0


@dataclass(frozen=True)
class Admission:
    """The coordinator's bounds on what it holds (docs/PROTOCOL.md section 13)."""

    queue_limit: int  # requests per model and priority
    client_queue_limit: int  # of those, per client
    max_queued_bytes: int  # tensor bytes held, all clients together
    max_client_queued_bytes: int  # tensor bytes held for one client
    default_deadline_s: float | None  # for requests that bring none (None: no deadline)


def request_bytes(request: Request) -> int:
    """The tensor bytes a request holds in the coordinator."""
    total = 0
    for x in request.inputs:
        if isinstance(x, RawTensor):
            frame = x.frame
            total += frame.nbytes if isinstance(frame, memoryview) else len(frame)
        else:
            total += int(getattr(x, "nbytes", 0))
    return total


def mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


class Scheduler:
    def __init__(
        self,
        queue_limit: int | Admission,
        retry_after_ms: int,
        serves: Callable[[str], bool],
        unknown: Callable[[str], str | None] = lambda model: None,
    ) -> None:
        if not isinstance(queue_limit, Admission):
            queue_limit = Admission(queue_limit, queue_limit, 2**62, 2**62, None)
        self.limits = queue_limit
        self.queue_limit = queue_limit.queue_limit  # per model and priority
        self.retry_after_ms = retry_after_ms  # suggested when nobody can serve a model
        self.serves = serves  # whether anyone (registered or launchable) serves a model
        self.unknown = unknown  # why a model is unknown (BAD_REQUEST); None: it is known
        self.pending: dict[str, Pending] = {}
        # model -> priority -> queue of pending keys (bounded by queue_limit)
        self.queues: dict[str, dict[int, FairQueue]] = {}
        self.clients: dict[bytes, ClientBook] = {}
        self.held_bytes = 0
        self._sizes: dict[str, int] = {}  # key -> its request's bytes, while pending
        self._deadlines: list[tuple[float, str]] = []
        self._ids = itertools.count()
        self.issued = 0  # keys handed out so far (a key >= issued was never this process's)
        # (client, request id) -> key of its outstanding request: ids are unique per client
        self._by_client: dict[tuple[bytes, str], str] = {}

    # -- admission -----------------------------------------------------------------------------

    def admit(
        self, client: bytes, request: Request, now: float, critical: bool = True
    ) -> Pending | Refusal:
        """Queue `request`, or say why not. `critical`: whether `client` may use priority 0."""
        model = request.model
        limits = self.limits
        try:
            check_request_options(request.options)
        except GenerationError as exc:
            return Refusal(Status.BAD_REQUEST, str(exc))
        if request.priority not in PRIORITIES:
            return Refusal(Status.BAD_REQUEST, f"priority must be one of {PRIORITIES}")
        if request.priority == 0 and not critical:
            return Refusal(
                Status.BAD_REQUEST,
                "priority 0 is reserved for the coordinator's critical_clients; "
                "use priority 1 or 2",
            )
        if not self.serves(model):
            unknown = self.unknown(model)
            if unknown is not None:
                return Refusal(Status.BAD_REQUEST, unknown)
            return Refusal(
                Status.UNAVAILABLE,
                f"no edge agent or cloud worker serves {model!r}",
                self.retry_after_ms,
            )
        queues = self.queues.get(model)
        if queues is None:
            queues = self.queues[model] = {p: FairQueue() for p in PRIORITIES}
        queue = queues[request.priority]
        if len(queue) >= limits.queue_limit:
            return Refusal(
                Status.REJECTED,
                f"queue for {model} priority {request.priority} is full",
                self.retry_after_ms,
            )
        if (client, request.id) in self._by_client:
            return Refusal(
                Status.BAD_REQUEST,
                f"request id {request.id!r} is already outstanding on this connection",
            )
        if request.timeout_ms is not None and request.timeout_ms <= 0:
            return Refusal(Status.TIMEOUT, "deadline passed before the request arrived")
        if queue.count(client) >= limits.client_queue_limit:
            return Refusal(
                Status.REJECTED,
                f"this client already has client_queue_limit ({limits.client_queue_limit}) "
                f"requests queued for {model} priority {request.priority}",
                self.retry_after_ms,
            )
        size = request_bytes(request)
        book = self.clients.get(client)
        held = 0 if book is None else book.held_bytes
        if held + size > limits.max_client_queued_bytes:
            return Refusal(
                Status.REJECTED,
                f"this client's queued bytes would exceed max_client_queued_bytes "
                f"({mib(limits.max_client_queued_bytes)}): {mib(held)} held, "
                f"{mib(size)} more asked",
                self.retry_after_ms,
            )
        if self.held_bytes + size > limits.max_queued_bytes:
            return Refusal(
                Status.REJECTED,
                f"the coordinator's queued bytes would exceed max_queued_bytes "
                f"({mib(limits.max_queued_bytes)})",
                self.retry_after_ms,
            )
        key = f"{next(self._ids):x}"
        self.issued += 1
        self._by_client[(client, request.id)] = key
        if request.timeout_ms is not None:
            deadline: float | None = now + request.timeout_ms / 1000
        elif limits.default_deadline_s is not None:
            deadline = now + limits.default_deadline_s
        else:
            deadline = None
        p = self.pending[key] = Pending(key, client, request, now, deadline)
        if book is None:
            book = self.clients[client] = ClientBook()
        book.pending[key] = p
        book.held_bytes += size
        self.held_bytes += size
        self._sizes[key] = size
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, key))
        queue.append(client, key)
        return p

    # -- queues --------------------------------------------------------------------------------

    def queue_of(self, p: Pending) -> FairQueue:
        return self.queues[p.request.model][p.request.priority]

    def requeue(self, p: Pending) -> None:
        """Back to the front of its queue, undecided: the next dispatch decides again, or
        answers UNAVAILABLE / TIMEOUT if nobody can take it in time."""
        p.worker, p.dispatched_at, p.route, p.dispatch_id = None, None, None, None
        self.queue_of(p).appendleft(p.client, p.key)

    def put_back(self, p: Pending) -> None:
        """Back to the front of its queue, its route kept (a dispatch that was not sent)."""
        self.queue_of(p).appendleft(p.client, p.key)

    def forget(self, key: str) -> None:
        p = self.pending.pop(key, None)
        if p is not None:
            self._by_client.pop((p.client, p.request.id), None)
            self._release(p)

    def _release(self, p: Pending) -> None:
        """Stop counting `p` against its client and the coordinator."""
        size = self._sizes.pop(p.key, 0)
        self.held_bytes -= size
        book = self.clients.get(p.client)
        if book is not None:
            book.pending.pop(p.key, None)
            book.held_bytes -= size
            if not book.pending:
                del self.clients[p.client]

    def of_client(self, client: bytes) -> list[Pending]:
        """`client`'s outstanding requests."""
        book = self.clients.get(client)
        return [] if book is None else list(book.pending.values())

    def withdraw(self, client: bytes, request_id: str) -> Pending | None:
        """Forget `client`'s request `request_id` (out of its queue if still queued); None if
        it is not pending (already answered, or never seen)."""
        key = self._by_client.get((client, request_id))
        p = None if key is None else self.pending.get(key)
        if p is None:
            return None
        self.forget(p.key)
        if p.worker is None:
            self.queue_of(p).remove(client, p.key)
        return p

    def drop_client(self, client: bytes) -> list[Pending]:
        """Forget everything `client` has pending (it is gone): out of the queues, and the
        running ones returned, for the caller to CANCEL at their workers."""
        book = self.clients.get(client)
        if book is None:
            return []
        dropped = list(book.pending.values())
        for p in dropped:
            self.forget(p.key)  # (the client's book goes with its last request)
        for queues in self.queues.values():
            for queue in queues.values():
                queue.drop(client)
        return dropped

    def queued_for(self, model: str, side: Route) -> tuple[int, ...]:
        """Requests of `model` waiting that were last routed to `side`, by priority."""
        counts = []
        pending = self.pending
        queues = self.queues.get(model, {})
        for priority in PRIORITIES:
            queued = 0
            for key in queues.get(priority, ()):
                if pending[key].route is side:
                    queued += 1
            counts.append(queued)
        return tuple(counts)

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
                self.queue_of(p).remove(p.client, key)
            yield p

    def next_deadline(self, default: float) -> float:
        while self._deadlines and self._deadlines[0][1] not in self.pending:
            heapq.heappop(self._deadlines)
        return min(default, self._deadlines[0][0]) if self._deadlines else default
