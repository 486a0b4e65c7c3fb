"""The coordinator: one ROUTER between clients and the edge agents / cloud workers.

Majordomo-shaped (docs/PROTOCOL.md). Per model it keeps the registered workers of each role
with their state and residency, and bounded per-priority queues. Every decoded REQUEST ends
in exactly one REPLY: the worker's result, or TIMEOUT / REJECTED / UNAVAILABLE / BAD_REQUEST.
Tensor frames are validated and forwarded as they are, never copied into arrays here.

Methods are named for intent, after the Majordomo broker: `dispatch` routes queued work,
`purge_workers` drops the silent, `expire_requests` answers what ran out of time.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from cicada.common.defaults import (
    DEFAULT_ADDRESS,
    HEARTBEAT_INTERVAL_S,
    LIVENESS,
    PRIORITIES,
    QUEUE_LIMIT,
)
from cicada.common.generation import GenerationError, check_options
from cicada.common.protocol import (
    DEFAULT_LIMITS,
    Cancel,
    Disconnect,
    Dispatch,
    Heartbeat,
    Limits,
    Partial,
    ProtocolError,
    RawTensor,
    Ready,
    Reply,
    Request,
    Result,
    Role,
    Status,
    WorkerState,
    decode,
    decode_tensor,
    encode,
    unpack_body,
)
from cicada.common.sockets import configure
from cicada.edge.lifecycle import Lifecycle
from cicada.edge.metrics import CoordinatorMetrics
from cicada.edge.policy import (
    DEFAULT_CLOUD_COMPUTE_S,
    DEFAULT_EDGE_COMPUTE_S,
    DEFAULT_NETWORK_S,
    Route,
    SideView,
    choose,
)

log = logging.getLogger("cicada.coordinator")


@dataclass
class CoordinatorConfig:
    bind: str = DEFAULT_ADDRESS
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S
    liveness: int = LIVENESS
    queue_limit: int = QUEUE_LIMIT  # per model and priority
    retry_after_s: float = 1.0  # suggested to callers when nobody can serve a model
    network_s: float = DEFAULT_NETWORK_S
    metrics_bind: tuple[str, int] | None = None  # ("127.0.0.1", 9464) serves /metrics
    curve_secret_file: Path | None = None  # coordinator's .key_secret: turns CURVE on
    curve_allow_dir: Path | None = None  # directory of allowed public keys (.key files)
    limits: Limits = DEFAULT_LIMITS


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
    inflight: dict[str, Pending] = field(default_factory=dict)

    @property
    def accepting(self) -> bool:
        return self.state is not WorkerState.DRAINING

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


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or CoordinatorConfig()
        self.clock = clock
        self.workers: dict[bytes, WorkerInfo] = {}
        self.pending: dict[str, Pending] = {}
        # model -> priority -> queue of pending keys (bounded by config.queue_limit)
        self.queues: dict[str, dict[int, deque[str]]] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._ids = itertools.count()
        self._edge_generations: set[str] = set()  # keys generating on an edge agent now
        self.metrics = CoordinatorMetrics()
        self.malformed = 0
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.endpoint = ""
        self._sock: zmq.Socket[bytes] | None = None
        self._auth: Any = None
        self._metrics_server: Any = None
        self.lifecycle: Lifecycle | None = None  # set to launch/stop cloud workers on demand

    # -- lifecycle ---------------------------------------------------------------------------

    def bind(self) -> str:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        configure(sock, self.config.limits)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.config.curve_secret_file is not None:
            self._enable_curve(ctx, sock)
        if self.config.bind.endswith(":0"):
            port = sock.bind_to_random_port(self.config.bind.rsplit(":", 1)[0])
            self.endpoint = f"{self.config.bind.rsplit(':', 1)[0]}:{port}"
        else:
            sock.bind(self.config.bind)
            self.endpoint = self.config.bind
        self._sock = sock
        if self.config.metrics_bind is not None:
            self._metrics_server = self.metrics.serve(*self.config.metrics_bind)
        return self.endpoint

    def _enable_curve(self, ctx: zmq.Context[zmq.Socket[bytes]], sock: zmq.Socket[bytes]) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        assert self.config.curve_secret_file is not None
        public, secret = zmq.auth.load_certificate(str(self.config.curve_secret_file))
        if secret is None:
            raise ValueError(f"{self.config.curve_secret_file} holds no secret key")
        if self.config.curve_allow_dir is None:
            raise ValueError("CURVE needs an allow-list directory of public keys")
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(self.config.curve_allow_dir))
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    def serve_forever(self) -> None:
        if self._sock is None:
            self.bind()
        sock = self._sock
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        interval = self.config.heartbeat_interval
        next_beat = self.clock() + interval
        self.ready.set()
        try:
            while not self.stop_event.is_set():
                now = self.clock()
                wait = min(next_beat, self._next_deadline(now + interval)) - now
                if poller.poll(int(max(0.0, min(wait, 0.1) * 1000))):
                    # Drain what is there before doing the bookkeeping once.
                    for _ in range(256):
                        try:
                            frames = _recv_frames(sock)
                        except zmq.Again:
                            break
                        try:
                            self.handle(frames)
                        except Exception:  # one bad message must never stop the coordinator
                            log.exception("unexpected error handling a message; dropped")
                            self.malformed += 1
                            self.metrics.malformed.inc()
                now = self.clock()
                self.expire_requests(now)
                if now >= next_beat:
                    self.purge_workers(now)
                    self.send_heartbeats()
                    next_beat = now + interval
                if self.lifecycle is not None:
                    self.lifecycle.tick(self, now)  # before dispatch: launches count as capacity
                self.dispatch(now)
        finally:
            self.close()

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        if self.lifecycle is not None:
            self.lifecycle.close()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None

    # -- messages ----------------------------------------------------------------------------

    def handle(self, frames: list[Any]) -> None:
        """One message from the ROUTER: identity, then the protocol frames."""
        if len(frames) < 2:
            self._malformed(b"?", "no identity frame")
            return
        identity, body = bytes(frames[0]), frames[1:]
        try:
            message = decode(body, self.config.limits, materialize=False)
        except ProtocolError as exc:
            self._answer_malformed(identity, body, exc)
            return
        now = self.clock()
        worker = self.workers.get(identity)
        if worker is not None:
            worker.expires_at = now + self.config.heartbeat_interval * self.config.liveness
        if isinstance(message, Request):
            self.accept_request(identity, message, now)
        elif isinstance(message, Ready):
            self.register_worker(identity, message, now)
        elif isinstance(message, Heartbeat):
            if worker is None:
                self._send(identity, Disconnect(reason="unknown worker: register again"))
            else:
                self._note_ready(worker, message.state, now)
                worker.update(message)
                self.metrics.set_workers(self.workers.values())
        elif isinstance(message, Result):
            if worker is None:
                self._send(identity, Disconnect(reason="unknown worker: register again"))
            self.complete(identity, message, now)
        elif isinstance(message, Partial):
            if worker is None:
                self._send(identity, Disconnect(reason="unknown worker: register again"))
            else:
                self.forward_partial(worker, message)
        elif isinstance(message, Disconnect):
            if worker is not None:
                self.remove_worker(identity, now, reason=message.reason or "worker left")
        elif isinstance(message, Cancel) and worker is None:
            self.withdraw_request(identity, message.id)
        else:
            self._malformed(identity, f"unexpected {type(message).__name__} at the coordinator")

    def _answer_malformed(self, identity: bytes, body: list[Any], exc: ProtocolError) -> None:
        """Log and drop; if the frames are a REQUEST whose id is readable, answer BAD_REQUEST."""
        self._malformed(identity, str(exc))
        try:
            if len(body) >= 3 and bytes(body[1]) == b"\x01":
                # The protocol's own limits: any request whose id the decoder could have read
                # gets its BAD_REQUEST.
                doc: Any = unpack_body(bytes(body[2]), self.config.limits, tolerate_ext=True)
                if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                    model = doc.get("model") if isinstance(doc.get("model"), str) else "?"
                    self._reply(
                        identity,
                        Reply(
                            id=doc["id"],
                            status=Status.BAD_REQUEST,
                            error=f"malformed request: {exc}",
                        ),
                        str(model),
                    )
        except Exception:  # the frames are garbage: dropping them is the answer
            pass

    def _malformed(self, identity: bytes, why: str) -> None:
        self.malformed += 1
        self.metrics.malformed.inc()
        log.warning("dropped malformed message from %s: %s", identity.hex()[:16], why)

    # -- requests ----------------------------------------------------------------------------

    def accept_request(self, client: bytes, request: Request, now: float) -> None:
        model = request.model
        if "max_new_tokens" in request.options:
            try:
                check_options(request.options)
            except GenerationError as exc:
                reply = Reply(id=request.id, status=Status.BAD_REQUEST, error=str(exc))
                self._reply(client, reply, model)
                return
        if request.priority not in PRIORITIES:
            self._reply(
                client,
                Reply(
                    id=request.id,
                    status=Status.BAD_REQUEST,
                    error=f"priority must be one of {PRIORITIES}",
                ),
                model,
            )
            return
        if not self._known_model(model):
            self._reply(
                client,
                Reply(
                    id=request.id,
                    status=Status.UNAVAILABLE,
                    error=f"no edge agent or cloud worker serves {model!r}",
                    retry_after_ms=int(self.config.retry_after_s * 1000),
                ),
                model,
            )
            return
        queue = self.queues.setdefault(model, {p: deque() for p in PRIORITIES})[request.priority]
        if len(queue) >= self.config.queue_limit:
            self._reply(
                client,
                Reply(
                    id=request.id,
                    status=Status.REJECTED,
                    error=f"queue for {model} priority {request.priority} is full",
                    retry_after_ms=int(self.config.retry_after_s * 1000),
                ),
                model,
            )
            return
        if request.timeout_ms is not None and request.timeout_ms <= 0:
            self._reply(
                client,
                Reply(
                    id=request.id,
                    status=Status.TIMEOUT,
                    error="deadline passed before the request arrived",
                ),
                model,
            )
            return
        if self.lifecycle is not None:
            self.lifecycle.on_request(model, now)
        key = f"{next(self._ids):x}"
        deadline = None if request.timeout_ms is None else now + request.timeout_ms / 1000
        self.pending[key] = Pending(key, client, request, now, deadline)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, key))
        queue.append(key)
        self.metrics.set_queue_depth(model, request.priority, len(queue))

    def withdraw_request(self, client: bytes, request_id: str) -> None:
        """A client's CANCEL: it stopped reading request `request_id`. Forget it without a
        REPLY; a queued request leaves its queue, a running one is CANCELled at its worker
        (which keeps the slot until its RESULT comes back). Unknown ids (already answered)
        are ignored."""
        p = next(
            (p for p in self.pending.values() if p.client == client and p.request.id == request_id),
            None,
        )  # a linear scan: clients cancel rarely, and nothing else needs the index
        if p is None:
            return
        self.pending.pop(p.key, None)
        self._edge_generations.discard(p.key)
        if p.worker is None:
            queue = self.queues[p.request.model][p.request.priority]
            if p.key in queue:
                queue.remove(p.key)
                self.metrics.set_queue_depth(p.request.model, p.request.priority, len(queue))
        else:
            self._send(p.worker, Cancel(id=p.key, reason="the client cancelled the request"))
        log.debug("request %s withdrawn by its client", request_id)

    def _known_model(self, model: str) -> bool:
        if self.lifecycle is not None and self.lifecycle.manages(model):
            return True
        return any(model in w.models and w.accepting for w in self.workers.values())

    def cloud_demand(self, model: str) -> int:
        """Requests for `model` that want the large model: queued or running, normal and
        quality-seeking (latency-critical work never waits for a cloud worker to start)."""
        return sum(
            1 for p in self.pending.values() if p.request.model == model and p.request.priority >= 1
        )

    def stop_dispatching_to(self, name: str) -> None:
        """A worker told to drain takes no new work, even before it says so itself."""
        for w in self.workers.values():
            if w.name == name:
                w.state = WorkerState.DRAINING

    def forget_worker_named(self, name: str, now: float, reason: str) -> None:
        for identity, w in list(self.workers.items()):
            if w.name == name:
                self.remove_worker(identity, now, reason=reason)

    def view(self, model: str, role: Role) -> SideView:
        # One pass over the workers (this runs per dispatch decision: it was a fifth of the
        # coordinator's time as a chain of comprehensions).
        cloud = role is Role.CLOUD
        count = capacity = inflight = 0
        ready = not cloud
        eta = float("inf") if cloud else 0.0
        compute: float | None = None
        for w in self.workers.values():
            if w.role is not role or model not in w.models or not w.accepting:
                continue
            count += 1
            capacity += w.capacity
            inflight += len(w.inflight)
            if w.compute_s is not None and (compute is None or w.compute_s < compute):
                compute = w.compute_s
            if cloud:
                if w.state is WorkerState.READY:
                    ready, eta = True, 0.0
                elif w.eta_s is not None and w.eta_s < eta:
                    eta = w.eta_s
        launching = 0
        if cloud and self.lifecycle is not None:
            # Workers launched but not registered yet are capacity with an ETA.
            launching, launch_eta = self.lifecycle.launching(model, self.clock())
            eta = min(eta, launch_eta)
        side = Route.CLOUD if cloud else Route.EDGE
        queued = 0
        pending = self.pending
        for q in self.queues.get(model, {}).values():
            for key in q:
                if pending[key].route is side:
                    queued += 1
        if compute is None:
            compute = DEFAULT_CLOUD_COMPUTE_S if cloud else DEFAULT_EDGE_COMPUTE_S
        return SideView(
            workers=count + launching,
            capacity=capacity + launching,
            inflight=inflight,
            queued=queued,
            compute_s=compute,
            ready=ready,
            eta_s=eta,
            network_s=self.config.network_s if cloud else 0.0,
        )

    def dispatch(self, now: float) -> None:
        """Route queued requests, highest priority first, to workers with free slots."""
        for model, queues in self.queues.items():
            if not any(queues.values()):
                continue
            if self._all_slots_taken(model):
                for priority in PRIORITIES:  # (expiry may have shortened a queue)
                    self.metrics.set_queue_depth(model, priority, len(queues[priority]))
                continue
            edge, cloud = self.view(model, Role.EDGE), self.view(model, Role.CLOUD)
            # Whether a request counted in the views' queues has been answered or has changed
            # sides since they were built (then the next dispatch rebuilds them, as it always
            # did; otherwise it updates them, which comes to the same views for less).
            stale = False
            for priority in PRIORITIES:
                queue = queues[priority]
                for key in list(queue):
                    if self._no_free_slot(model, edge, cloud):
                        # Nothing can be dispatched; deciding again per queued request would
                        # cost O(queue) per message (deadlines are enforced by expiry).
                        break
                    p = self.pending.get(key)
                    if p is None:
                        queue.remove(key)
                        continue
                    decision = choose(priority, p.remaining(now), edge, cloud)
                    route = decision.route
                    was_queued_for = p.route
                    if route is not was_queued_for and was_queued_for is not None:
                        stale = True
                    if route is Route.UNAVAILABLE:
                        queue.remove(key)
                        self._finish(
                            p,
                            Reply(
                                id=p.request.id,
                                status=Status.UNAVAILABLE,
                                error=f"no worker can serve {model} now",
                                retry_after_ms=self._retry_after_ms(cloud),
                            ),
                            now,
                        )
                        continue
                    if route is Route.TOO_LATE:
                        queue.remove(key)
                        self._finish(
                            p,
                            Reply(
                                id=p.request.id,
                                status=Status.TIMEOUT,
                                error="no worker can finish before the deadline",
                            ),
                            now,
                        )
                        continue
                    p.route = route
                    role = Role.EDGE if route is Route.EDGE else Role.CLOUD
                    worker = self._pick(model, role)
                    if worker is None:
                        # Stays queued; re-decided next pass (may move sides). Now counted on
                        # `route`'s side.
                        stale = stale or route is not was_queued_for
                        continue
                    queue.remove(key)
                    self._send_dispatch(worker, p, now)
                    if stale or p.worker is None:  # (not sent: the workers changed)
                        edge, cloud = self.view(model, Role.EDGE), self.view(model, Role.CLOUD)
                        stale = False
                        continue
                    # One more running on `route`, one fewer queued for it if it was counted
                    # there: the views view() would build now, without the rebuild.
                    if route is Route.EDGE:
                        edge = _after_dispatch(edge, was_queued_for is route)
                    else:
                        cloud = _after_dispatch(cloud, was_queued_for is route)
            for priority in PRIORITIES:
                self.metrics.set_queue_depth(model, priority, len(queues[priority]))
        if self._edge_generations:
            self.hand_off_generations(now)

    def hand_off_generations(self, now: float) -> None:
        """Move generations running on an edge agent to a cloud worker that is ready and free:
        the edge is told to CANCEL, the cloud gets the prompt plus the tokens so far and
        recomputes its own cache. A request may opt out with options.handoff = false."""
        for key in list(self._edge_generations):
            p = self.pending.get(key)
            edge = self.workers.get(p.worker) if p is not None and p.worker else None
            if p is None or edge is None or edge.role is not Role.EDGE:
                self._edge_generations.discard(key)
                continue
            if p.request.options.get("handoff") is False or p.tokens_left() < 2:
                continue
            cloud = self._pick(p.request.model, Role.CLOUD)
            if cloud is None or cloud.state is not WorkerState.READY:
                continue
            self._edge_generations.discard(key)
            self._send(edge.identity, Cancel(id=key, reason="handed to a cloud worker"))
            # The edge keeps its slot until its RESULT for this dispatch comes back.
            p.worker, p.dispatched_at, p.route = None, None, Route.CLOUD
            self.metrics.handoffs.inc()
            self._send_dispatch(cloud, p, now)

    def _all_slots_taken(self, model: str) -> bool:
        """Some worker serves `model` and none has a free slot: nothing to decide (the cheap
        test before building views; launching workers hold no slot yet, see _no_free_slot)."""
        serving = False
        for w in self.workers.values():
            if model in w.models and w.accepting:
                if len(w.inflight) < w.capacity:
                    return False
                serving = True
        return serving

    def _no_free_slot(self, model: str, edge: SideView, cloud: SideView) -> bool:
        if not edge.available and not cloud.available:
            return False  # decide anyway: the answer is UNAVAILABLE
        return (
            edge.inflight >= edge.capacity
            and cloud.inflight >= cloud.capacity - self._launching(model)
        )

    def _launching(self, model: str) -> int:
        if self.lifecycle is None:
            return 0
        return self.lifecycle.launching(model, self.clock())[0]

    def _retry_after_ms(self, cloud: SideView) -> int:
        if cloud.available and cloud.eta_s != float("inf"):
            return max(1, int(cloud.eta_s * 1000))
        return int(self.config.retry_after_s * 1000)

    def _pick(self, model: str, role: Role) -> WorkerInfo | None:
        best: WorkerInfo | None = None
        for w in self.workers.values():
            if w.role is not role or model not in w.models or w.free <= 0:
                continue
            key = (w.state is not WorkerState.READY, len(w.inflight) / w.capacity)
            if best is None or key < (
                best.state is not WorkerState.READY,
                len(best.inflight) / best.capacity,
            ):
                best = w
        return best

    def _array(self, tensor: Any) -> np.ndarray:
        """A tensor as numpy: frames are forwarded raw, and read only where the coordinator
        needs their values (the tokens of a generation)."""
        if isinstance(tensor, RawTensor):
            return decode_tensor(tensor.spec, tensor.frame, self.config.limits)
        return np.asarray(tensor)

    def _continuation(self, p: Pending) -> tuple[list[Any], dict[str, Any]]:
        """A generation that already streamed tokens continues from them: prompt + tokens so
        far as the prompt, and only the tokens still due."""
        prompt = self._array(p.request.inputs[0])
        ids = np.concatenate([prompt.reshape(-1), np.asarray(p.tokens, np.int64)])
        options = {**p.request.options, "max_new_tokens": p.tokens_left()}
        return [ids.astype(np.int64)[None]], options

    def _send_dispatch(self, worker: WorkerInfo, p: Pending, now: float) -> None:
        remaining = p.remaining(now)
        inputs, options = p.request.inputs, p.request.options
        if p.generating and p.tokens:
            if p.tokens_left() <= 0:  # everything was streamed; only the RESULT was lost
                self._finish_generation(p, None, Status.OK, "", {}, now)
                return
            inputs, options = self._continuation(p)
        message = Dispatch(
            id=p.key,
            model=p.request.model,
            inputs=inputs,
            timeout_ms=None if remaining is None else max(0, int(remaining * 1000)),
            options=options,
        )
        if self._send(worker.identity, message):
            p.worker, p.dispatched_at = worker.identity, now
            worker.inflight[p.key] = p
            if p.generating and worker.role is Role.EDGE:
                self._edge_generations.add(p.key)
            if self.lifecycle is not None:
                self.lifecycle.on_busy(worker.name, now)
        else:
            # The worker vanished between its last message and now: drop it, keep the request.
            self.queues[p.request.model][p.request.priority].appendleft(p.key)
            self.remove_worker(worker.identity, now, reason="unreachable")

    def forward_partial(self, worker: WorkerInfo, partial: Partial) -> None:
        """Relay a streamed piece to the client, numbered across every worker that served the
        request. Pieces from a worker that no longer owns the request (cancelled, re-routed)
        are dropped: the client sees each token once."""
        p = self.pending.get(partial.id)
        if p is None or p.worker != worker.identity:
            self.metrics.late_results.inc()
            return
        served_by = {"role": worker.role.value, "worker": worker.name, "variant": worker.variant}
        if p.generating:
            try:
                pieces = [self._array(t) for t in partial.outputs]
            except ProtocolError as exc:
                self._malformed(worker.identity, f"partial for {partial.id}: {exc}")
                return
            if len(pieces) != 1 or pieces[0].dtype != np.int64 or pieces[0].ndim != 1:
                self._malformed(worker.identity, "a generation PARTIAL carries one int64 vector")
                return
            new = [int(t) for t in pieces[0]]
            p.tokens.extend(new)
            last = p.segments[-1] if p.segments else None
            if last is not None and last["worker"] == worker.name:
                last["tokens"] += len(new)
            else:
                p.segments.append({**served_by, "tokens": len(new)})
        seq, p.seq = p.seq, p.seq + 1
        self._send(
            p.client,
            Partial(id=p.request.id, seq=seq, outputs=partial.outputs, served_by=served_by),
        )

    def _finish_generation(
        self,
        p: Pending,
        worker: WorkerInfo | None,
        status: Status,
        error: str,
        timings: dict[str, float],
        now: float,
    ) -> None:
        served_by: dict[str, Any] = {"segments": p.segments}
        if p.segments:
            last = p.segments[-1]
            served_by.update(role=last["role"], worker=last["worker"], variant=last["variant"])
        elif worker is not None:
            served_by.update(role=worker.role.value, worker=worker.name, variant=worker.variant)
        self._finish(
            p,
            Reply(
                id=p.request.id,
                status=status,
                outputs=[np.asarray(p.tokens, dtype=np.int64)] if status is Status.OK else [],
                error=error,
                served_by=served_by,
                timings=timings,
            ),
            now,
        )

    def complete(self, identity: bytes, result: Result, now: float) -> None:
        p = self.pending.get(result.id)
        worker = self.workers.get(identity)
        if p is None or p.worker != identity:
            # Already answered (e.g. TIMEOUT while it ran) or re-routed: exactly one outcome.
            # The worker's slot, held until now, is free again.
            if worker is not None:
                worker.inflight.pop(result.id, None)
            self.metrics.late_results.inc()
            return
        if worker is not None:
            worker.inflight.pop(p.key, None)
            if self.lifecycle is not None:
                self.lifecycle.on_busy(worker.name, now)
            if result.status is Status.UNAVAILABLE:
                # The worker refused it (draining, or its load failed): not the caller's
                # outcome. Stop sending it work and give the request another chance.
                worker.state = WorkerState.DRAINING
                p.worker, p.dispatched_at, p.route = None, None, None
                self.queues[p.request.model][p.request.priority].appendleft(p.key)
                return
        timings = {f"worker_{k}": float(v) for k, v in result.timings.items()}
        if p.dispatched_at is not None:
            timings["queue_s"] = p.dispatched_at - p.arrived
            timings["worker_s"] = now - p.dispatched_at
        if "worker_compute_s" in timings:
            timings["compute_s"] = timings["worker_compute_s"]
        if p.generating:
            # The tokens are the ones relayed (a worker's PARTIALs precede its RESULT).
            self._finish_generation(p, worker, result.status, result.error, timings, now)
            return
        served_by = {
            "role": worker.role.value if worker else (p.route.value if p.route else ""),
            "worker": worker.name if worker else "",
            "variant": result.variant or (worker.variant if worker else ""),
        }
        self._finish(
            p,
            Reply(
                id=p.request.id,
                status=result.status,
                outputs=result.outputs,
                error=result.error,
                served_by=served_by,
                timings=timings,
            ),
            now,
        )

    def _finish(self, p: Pending, reply: Reply, now: float) -> None:
        """Send the one reply for `p` and forget it."""
        self.pending.pop(p.key, None)
        self._edge_generations.discard(p.key)
        if p.worker is not None and p.worker in self.workers and reply.status is not Status.TIMEOUT:
            # (A request that timed out while running keeps its slot until the worker's late
            # result comes back: the worker is still busy with it.)
            self.workers[p.worker].inflight.pop(p.key, None)
        reply.timings["total_s"] = now - p.arrived
        route = reply.served_by.get("role") or "none"
        self.metrics.observe(p.request.model, str(route), reply.status.value, now - p.arrived)
        self._reply(p.client, reply, p.request.model, count=False)

    def _reply(self, client: bytes, reply: Reply, model: str, count: bool = True) -> None:
        if count:
            # Label by model only for models someone serves: made-up names must not grow
            # the metrics without bound.
            label = model if self._known_model(model) else "unknown"
            self.metrics.observe(label, "none", reply.status.value, 0.0)
        if not self._send(client, reply):
            log.info("client %s left before its reply %s", client.hex()[:16], reply.id)

    def expire_requests(self, now: float) -> None:
        """Answer TIMEOUT for everything whose deadline passed, queued or running."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, key = heapq.heappop(self._deadlines)
            p = self.pending.get(key)
            if p is None:
                continue
            if p.worker is None:
                queue = self.queues[p.request.model][p.request.priority]
                if key in queue:
                    queue.remove(key)
            where = "while queued" if p.worker is None else "while running"
            self._finish(
                p,
                Reply(id=p.request.id, status=Status.TIMEOUT, error=f"deadline passed {where}"),
                now,
            )

    def _next_deadline(self, default: float) -> float:
        while self._deadlines and self._deadlines[0][1] not in self.pending:
            heapq.heappop(self._deadlines)
        return min(default, self._deadlines[0][0]) if self._deadlines else default

    # -- workers -----------------------------------------------------------------------------

    def register_worker(self, identity: bytes, ready: Ready, now: float) -> None:
        expires = now + self.config.heartbeat_interval * self.config.liveness
        existing = self.workers.get(identity)
        if existing is not None:
            self._note_ready(existing, ready.state, now)
            existing.update(ready)
            existing.models, existing.capacity = list(ready.models), max(1, ready.capacity)
            existing.variant = ready.variant
            return
        worker = WorkerInfo(
            identity=identity,
            role=ready.role,
            name=ready.worker,
            models=list(ready.models),
            variant=ready.variant,
            capacity=max(1, ready.capacity),
            state=ready.state or WorkerState.READY,
            expires_at=expires,
        )
        worker.update(ready)
        self.workers[identity] = worker
        if self.lifecycle is not None and worker.role is Role.CLOUD:
            self.lifecycle.on_registered(worker.name, now)
            self._note_ready(worker, ready.state, now, first=True)
        self.metrics.set_workers(self.workers.values())
        log.info(
            "registered %s %s for %s (%s)",
            ready.role.value,
            ready.worker,
            ready.models,
            worker.state.value,
        )
        self._send(identity, Heartbeat())

    def _note_ready(
        self, worker: WorkerInfo, state: WorkerState | None, now: float, first: bool = False
    ) -> None:
        """Tell the lifecycle when a cloud worker first becomes ready (its cold-start time)."""
        became_ready = state is WorkerState.READY and (
            first or worker.state is not WorkerState.READY
        )
        if became_ready and self.lifecycle is not None and worker.role is Role.CLOUD:
            self.lifecycle.on_ready(worker.name, now)

    def purge_workers(self, now: float) -> None:
        for identity, worker in list(self.workers.items()):
            if worker.expires_at < now:
                self.remove_worker(identity, now, reason="missed heartbeats")
        self.metrics.set_workers(self.workers.values())

    def remove_worker(self, identity: bytes, now: float, reason: str) -> None:
        """Forget a worker; its in-flight requests are re-routed if they still can be."""
        worker = self.workers.pop(identity, None)
        if worker is None:
            return
        log.warning("worker %s (%s) removed: %s", worker.name, worker.role.value, reason)
        if self.lifecycle is not None:
            self.lifecycle.on_removed(worker.name)
        for key, p in list(worker.inflight.items()):
            if key not in self.pending or p.worker != identity:
                continue  # already answered or handed over; only its slot was held
            p.worker, p.dispatched_at, p.route = None, None, None
            # Back to the front of its queue: dispatch() decides again, or answers
            # UNAVAILABLE / TIMEOUT if nobody can take it in time.
            self.queues[p.request.model][p.request.priority].appendleft(key)
        worker.inflight.clear()
        self.metrics.set_workers(self.workers.values())

    def send_heartbeats(self) -> None:
        for identity in list(self.workers):
            self._send(identity, Heartbeat())

    def _send(self, identity: bytes, message: Any) -> bool:
        if self._sock is None:
            return False
        try:
            # Never block: a peer that stops reading fills its pipe to the HWM, and a blocking
            # send would stall every other peer. Its message is dropped instead (a worker is
            # then treated as unreachable by the caller).
            frames = encode(message)
            # Zero-copy only pays for big frames: for small ones pyzmq's Frame objects cost
            # more than the copy (a tiny request's frames are all small).
            copy = len(frames) == 3 or sum(len(f) for f in frames) < _ZERO_COPY_BYTES
            # Frame by frame with int flags: send_multipart's per-frame checks and IntFlag
            # arithmetic cost ~3 us per message. As there, only the first frame can fail (no
            # route, or the peer's pipe is full); the rest of a started message always goes.
            send = self._sock.send
            send(identity, _MORE_NOBLOCK)
            for frame in frames[:-1]:
                send(frame, _MORE_NOBLOCK, copy=copy)
            send(frames[-1], _NOBLOCK, copy=copy)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH under ROUTER_MANDATORY: peer is gone
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            return False


_ZERO_COPY_BYTES = 64 * 1024
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_COPIED_FRAMES = 4  # identity, signature, command, body


def _recv_frames(sock: zmq.Socket[bytes]) -> list[Any]:
    """One message, without blocking (zmq.Again if none): the identity, signature, command and
    body frames as bytes (small; the body is unpacked from bytes anyway), tensor frames as
    zero-copy buffers, which are forwarded as they are. (recv_multipart(copy=False) made a
    Frame object for every frame: ~3 us per message more than this.)"""
    recv = sock.recv
    frames: list[Any] = [recv(zmq.NOBLOCK)]
    while sock.getsockopt(zmq.RCVMORE):
        if len(frames) < _COPIED_FRAMES:
            frames.append(recv())
        else:
            frames.append(recv(copy=False).buffer)
    return frames


def _after_dispatch(view: SideView, was_queued: bool) -> SideView:
    """`view` with one more request running and, if it was counted there, one fewer queued.
    (Spelled out: dataclasses.replace costs more than the rest of a dispatch decision.)"""
    return SideView(
        workers=view.workers,
        capacity=view.capacity,
        inflight=view.inflight + 1,
        queued=view.queued - was_queued,
        compute_s=view.compute_s,
        ready=view.ready,
        eta_s=view.eta_s,
        network_s=view.network_s,
    )


__all__ = ["Coordinator", "CoordinatorConfig", "RawTensor"]
