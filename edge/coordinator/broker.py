"""The coordinator's broker: one ROUTER between clients and the edge agents / cloud workers.

Majordomo-shaped (docs/PROTOCOL.md). The broker owns the socket (and CURVE), the loop and the
metrics server, and composes what it holds: the `Registry` of workers of each role with their
state and residency, the `Scheduler`'s bounded per-priority queues and deadlines, and the
`GenerationRelay` of streamed tokens; `policy.choose` decides the routes. Every decoded REQUEST
ends in exactly one REPLY: the worker's result, or TIMEOUT / REJECTED / UNAVAILABLE /
BAD_REQUEST, or FAILED when its worker broke the protocol. Each dispatch is one attempt with
an id unique across restarts (`epoch.key.attempt`); only the current attempt's PARTIALs and
RESULT count. A client that reads slowly gets its replies from a bounded backlog. Tensor
frames are validated and forwarded as they are, never copied into arrays here.

Methods are named for intent, after the Majordomo broker: `dispatch` routes queued work,
`purge_workers` drops the silent, `expire_requests` answers what ran out of time.
"""

from __future__ import annotations

import difflib
import logging
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from cicada.common.defaults import (
    CRITICAL,
    DEFAULT_ADDRESS,
    DEFAULT_DEADLINE_S,
    HEARTBEAT_INTERVAL_S,
    LIVENESS,
    MAX_CLIENT_QUEUED_BYTES,
    MAX_QUEUED_BYTES,
    PRIORITIES,
    QUEUE_LIMIT,
)
from cicada.common.errors import ConfigError
from cicada.common.protocol import (
    DEFAULT_LIMITS,
    SIGNATURE,
    Cancel,
    Command,
    Disconnect,
    Dispatch,
    Heartbeat,
    Limits,
    Message,
    Partial,
    ProtocolError,
    RawTensor,
    Ready,
    Reply,
    Request,
    Result,
    Role,
    Status,
    Tokens,
    WorkerState,
    decode,
    encode,
    request_id_of,
    unpack_body,
    worker_report_problem,
)
from cicada.common.signals import StopRequest
from cicada.common.sockets import configure
from cicada.edge.coordinator.access import NO_GRANT, Access, Grant, WorkerKeys, loopback_only
from cicada.edge.coordinator.lifecycle import Lifecycle
from cicada.edge.coordinator.metrics import CoordinatorMetrics
from cicada.edge.coordinator.policy import (
    DEFAULT_CLOUD_COMPUTE_S,
    DEFAULT_EDGE_COMPUTE_S,
    DEFAULT_NETWORK_S,
    Route,
    SideView,
    choose,
)
from cicada.edge.coordinator.registry import Registry, WorkerInfo
from cicada.edge.coordinator.relay import GenerationRelay
from cicada.edge.coordinator.scheduler import Admission, FairQueue, Pending, Refusal, Scheduler

log = logging.getLogger("cicada.coordinator")


@dataclass
class CoordinatorConfig:
    bind: str = DEFAULT_ADDRESS
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S
    liveness: int = LIVENESS
    queue_limit: int = QUEUE_LIMIT  # per model and priority
    # Fair and bounded (docs/PROTOCOL.md section 13; edge/coordinator/config.py):
    client_queue_limit: int | None = None  # of a queue, per client (None: queue_limit // 2)
    max_queued_bytes: int = MAX_QUEUED_BYTES  # request tensor bytes held, all clients
    max_client_queued_bytes: int = MAX_CLIENT_QUEUED_BYTES  # ... held for one client
    default_deadline_s: float | None = DEFAULT_DEADLINE_S  # for requests without timeout_ms
    allow_critical: bool = True  # any client may use priority 0
    critical_clients: frozenset[str] = frozenset()  # else: these CURVE public keys (Z85)
    retry_after_s: float = 1.0  # suggested to callers when nobody can serve a model
    network_s: float = DEFAULT_NETWORK_S
    metrics_bind: tuple[str, int] | None = None  # ("127.0.0.1", 9464) serves /metrics
    curve_secret_file: Path | None = None  # coordinator's .key_secret: turns CURVE on
    curve_allow_dir: Path | None = None  # client public keys (.key files): REQUEST/CANCEL only
    # Worker public keys, each bound to a role and models (see access.py).
    worker_keys: list[WorkerKeys] = field(default_factory=list)
    insecure: bool = False  # allow a non-loopback bind without CURVE
    limits: Limits = DEFAULT_LIMITS
    # A client that does not read: replies wait for it in the coordinator up to this many
    # bytes of tensors (then its replies are REJECTED without outputs), and up to this many
    # messages (then the client is forgotten). docs/PROTOCOL.md section 9.
    client_backlog_bytes: int = 64 * 1024 * 1024
    client_backlog_messages: int = 100_000


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or CoordinatorConfig()
        self.clock = clock
        self.registry = Registry(self.config.heartbeat_interval * self.config.liveness)
        c = self.config
        self.scheduler = Scheduler(
            Admission(
                queue_limit=c.queue_limit,
                client_queue_limit=(
                    max(1, c.queue_limit // 2)
                    if c.client_queue_limit is None
                    else c.client_queue_limit
                ),
                max_queued_bytes=c.max_queued_bytes,
                max_client_queued_bytes=c.max_client_queued_bytes,
                default_deadline_s=c.default_deadline_s or None,
            ),
            int(c.retry_after_s * 1000),
            self._known_model,
            self._unknown_model,
        )
        # Clients whose reply could not be routed (they are gone): their other requests are
        # dropped before the next dispatch.
        self._gone: set[bytes] = set()
        # Priority 0 by CURVE key: the messages' User-Id (the key ZAP accepted) is read.
        self.relay = GenerationRelay(self.config.limits)
        self.metrics = CoordinatorMetrics()
        self.malformed = 0
        # Random per process: DISPATCH ids (epoch.key.attempt) never repeat across restarts.
        self.epoch = secrets.token_hex(4)
        # Clients whose pipe was full: what waits for them, in order, and its tensor bytes.
        self._outbox: dict[bytes, deque[Reply | Partial]] = {}
        self._outbox_bytes: dict[bytes, int] = {}
        self._overflowing: set[bytes] = set()
        self._send_errno = 0  # why the last `_send` failed
        self.stop_event = StopRequest()  # a signal handler sets it: no lock (common/signals.py)
        self.ready = threading.Event()
        self.endpoint = ""
        self._sock: zmq.Socket[bytes] | None = None
        self._auth: Any = None
        self.access: Access | None = None  # None: no CURVE, every peer may do everything
        self._metrics_server: Any = None
        self.lifecycle: Lifecycle | None = None  # set to launch/stop cloud workers on demand

    @property
    def workers(self) -> dict[bytes, WorkerInfo]:
        return self.registry.workers

    @property
    def pending(self) -> dict[str, Pending]:
        return self.scheduler.pending

    @property
    def queues(self) -> dict[str, dict[int, FairQueue]]:
        return self.scheduler.queues

    # -- lifecycle ---------------------------------------------------------------------------

    def bind(self) -> str:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        configure(sock, self.config.limits)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.config.curve_secret_file is not None:
            self._enable_curve(ctx, sock)
        elif not self.config.insecure and not loopback_only(self.config.bind):
            sock.close(linger=0)
            raise ConfigError(
                f"refusing to bind {self.config.bind} without CURVE: anyone who can reach it "
                "could register as a worker and read other clients' requests. Give CURVE keys "
                "(--curve-secret, --allow, --worker-keys), bind loopback, or pass --insecure"
            )
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
        if self.config.curve_allow_dir is None and not self.config.worker_keys:
            raise ValueError("CURVE needs public keys to allow: clients, workers or both")
        # Every key is bound to what it may do; ZAP admits the keys bound to anything and
        # tags each message with its key (User-Id), which `handle` checks against the grant.
        self.access = Access.load(self.config.curve_allow_dir, self.config.worker_keys)
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self.access)
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
        curve = self.access is not None
        self.ready.set()
        try:
            while not self.stop_event.is_set():
                now = self.clock()
                wait = min(next_beat, self.scheduler.next_deadline(now + interval)) - now
                if self._outbox:  # a slow reader's replies wait: try again soon
                    wait = min(wait, 0.005)
                if poller.poll(int(max(0.0, min(wait, 0.1) * 1000))):
                    # Drain what is there before doing the bookkeeping once.
                    for _ in range(256):
                        try:
                            frames, user = _recv_frames(sock, curve)
                        except zmq.Again:
                            break
                        try:
                            self.handle(frames, user)
                        except Exception:  # one bad message must never stop the coordinator
                            log.exception("unexpected error handling a message; dropped")
                            self.malformed += 1
                            self.metrics.malformed.inc()
                now = self.clock()
                if self._outbox:
                    self.flush_clients(now)
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

    def handle(self, frames: list[Any], user: str | None = None) -> None:
        """One message from the ROUTER: identity, then the protocol frames. `user` is the
        sender's CURVE public key (z85, ZAP's User-Id), checked against its grant."""
        if len(frames) < 2:
            self._malformed(b"?", "no identity frame")
            return
        head = frames[0]
        identity, body = bytes(head), frames[1:]
        try:
            message = decode(body, self.config.limits, materialize=False)
        except ProtocolError as exc:
            self._answer_malformed(identity, body, exc)
            return
        now = self.clock()
        worker = self.registry.seen(identity, now)
        grant = None if self.access is None else self.access.grant(user)
        if isinstance(message, Request):
            if grant is not None and not grant.client:
                self._unauthorized(identity, "REQUEST")
                refusal = Refusal(Status.REJECTED, "this key may not send requests")
                self._reply(identity, refusal.reply(message.id), message.model)
                return
            self.accept_request(identity, message, now, user)
        elif isinstance(message, Ready):
            self.register_worker(identity, message, now, grant)
        elif isinstance(message, Heartbeat):
            if worker is None:
                self._send(identity, Disconnect(reason="unknown worker: register again"))
            else:
                self.worker_heartbeat(worker, message, now)
        elif isinstance(message, Result):
            if worker is None:
                self._send(identity, Disconnect(reason="unknown worker: register again"))
            self.complete(identity, message, now)
        elif isinstance(message, Partial):
            if worker is None:
                self._send(identity, Disconnect(reason="unknown worker: register again"))
                self.metrics.superseded.labels("partial").inc()
            else:
                self.forward_partial(worker, message, now)
        elif isinstance(message, Disconnect):
            if worker is not None:
                self.remove_worker(identity, now, reason=message.reason or "worker left")
        elif isinstance(message, Cancel) and worker is None:
            if grant is not None and not grant.client:
                self._unauthorized(identity, "CANCEL")
                return
            self.withdraw_request(identity, message.id)
        else:
            self._malformed(identity, f"unexpected {type(message).__name__} at the coordinator")

    def _answer_malformed(self, identity: bytes, body: list[Any], exc: ProtocolError) -> None:
        """Log and drop; if the frames are a REQUEST whose id is readable, answer BAD_REQUEST;
        if they are a READY, refuse it naming the field (the sender must not register again);
        if they are a registered worker's RESULT or PARTIAL, end the attempt they belong to."""
        self._malformed(identity, str(exc))
        if (
            len(body) >= 3
            and bytes(body[0]) == SIGNATURE
            and bytes(body[1]) == bytes([Ready.command])
        ):
            named = re.search(r"field '(\w+)'", str(exc))
            field_name = named.group(1) if named else "body"
            self.refuse_worker(identity, (field_name, str(exc)), self.clock(), "a malformed READY")
            return
        if (
            len(body) >= 3
            and bytes(body[1]) in (_RESULT, _PARTIAL)
            and self.registry.get(identity) is not None
        ):
            self._unusable(identity, body, exc)
            return
        # Signed CCD1, a REQUEST, its id readable (whatever the body's size): BAD_REQUEST.
        # Another signature is dropped unanswered (section 11).
        readable = request_id_of(body, self.config.limits)
        if readable is not None:
            request_id, model = readable
            refusal = Refusal(Status.BAD_REQUEST, f"malformed request: {exc}")
            self._reply(identity, refusal.reply(request_id), model or "?")

    def _unauthorized(self, identity: bytes, what: str) -> None:
        self.metrics.unauthorized.inc()
        log.warning("refused %s from %s: its key is not a client's", what, identity.hex()[:16])

    def _unusable(self, identity: bytes, body: list[Any], exc: ProtocolError) -> None:
        """A RESULT or PARTIAL from a registered worker that cannot be decoded: its attempt
        ends FAILED at once (its slot is free); if it names no attempt, the worker is in
        breach (see `worker_breach`)."""
        kind = "RESULT" if bytes(body[1]) == _RESULT else "PARTIAL"
        now = self.clock()
        try:
            doc: Any = unpack_body(bytes(body[2]), self.config.limits, tolerate_ext=True)
            dispatch_id = doc.get("id") if isinstance(doc, dict) else None
        except ProtocolError:
            dispatch_id = None
        if not isinstance(dispatch_id, str):
            self.worker_breach(identity, f"an unusable {kind} with no readable id: {exc}", now)
            return
        p = self._attempt(identity, dispatch_id)
        if p is not None:
            self.fail_attempt(p, f"the worker sent an unusable {kind}: {exc}", now)
        elif self._never_dispatched(dispatch_id):
            self.worker_breach(identity, f"an unusable {kind} for an unknown id: {exc}", now)
        else:  # an attempt already superseded or answered: its RESULT still frees its slot
            self.metrics.superseded.labels(kind.lower()).inc()
            if kind == "RESULT":
                self.registry.release(identity, dispatch_id)

    def _malformed(self, identity: bytes, why: str) -> None:
        self.malformed += 1
        self.metrics.malformed.inc()
        log.warning("dropped malformed message from %s: %s", identity.hex()[:16], why)

    # -- requests ----------------------------------------------------------------------------

    def accept_request(
        self, client: bytes, request: Request, now: float, key: str | None = None
    ) -> None:
        """Queue a client's request, or answer why not. `key`: the client's CURVE public key
        (Z85) when it is needed to allow priority 0."""
        if self._gone:
            self._gone.discard(client)  # it is back (a client that sets its routing id)
        if client in self._overflowing:
            refusal = Refusal(
                Status.REJECTED,
                "back-pressure: this client does not read its replies; read them, then retry",
                int(self.config.retry_after_s * 1000),
            )
            self._refuse(client, request, refusal)
            return
        critical = self.config.allow_critical or (
            key is not None and key in self.config.critical_clients
        )
        admitted = self.scheduler.admit(client, request, now, critical)
        if isinstance(admitted, Refusal):
            self._refuse(client, request, admitted)
            return
        if self.lifecycle is not None:
            self.lifecycle.on_request(request.model, now)
        queue = self.scheduler.queue_of(admitted)
        self.metrics.set_queue_depth(request.model, request.priority, len(queue))

    def _refuse(self, client: bytes, request: Request, refusal: Refusal) -> None:
        """Answer a request that was never queued: the one REPLY is the refusal."""
        self._reply(client, refusal.reply(request.id), request.model)

    def withdraw_request(self, client: bytes, request_id: str) -> None:
        """A client's CANCEL: it stopped reading request `request_id`. Forget it without a
        REPLY; a queued request leaves its queue, a running one is CANCELled at its worker
        (which keeps the slot until its RESULT comes back). Unknown ids (already answered)
        are ignored."""
        p = self.scheduler.withdraw(client, request_id)
        if p is None:
            return
        self.metrics.dropped("cancelled")
        self.relay.ended(p.key)
        self._stop_drafting(p, "the client cancelled the request")
        if p.worker is None:
            self.metrics.set_queue_depth(
                p.request.model, p.request.priority, len(self.scheduler.queue_of(p))
            )
        elif p.dispatch_id is not None:
            self._send(
                p.worker, Cancel(id=p.dispatch_id, reason="the client cancelled the request")
            )
        log.debug("request %s withdrawn by its client", request_id)

    def drop_gone_clients(self) -> None:
        """Forget the requests of clients whose reply could not be routed: the ROUTER has no
        connection for them any more (ROUTER_MANDATORY), so no reply of theirs can arrive.
        Queued ones leave their queues, running ones are CANCELled at their workers (which
        keep the slot until their RESULT); none gets a REPLY."""
        gone, self._gone = self._gone, set()
        for client in gone:
            dropped = self.scheduler.drop_client(client)
            for p in dropped:
                self.relay.ended(p.key)
                self._stop_drafting(p, "the client is gone")
                if p.worker is not None and p.dispatch_id is not None:
                    self._send(p.worker, Cancel(id=p.dispatch_id, reason="the client is gone"))
                self.metrics.dropped("client_gone")
            if dropped:
                log.info(
                    "client %s is gone: %d request(s) dropped", client.hex()[:16], len(dropped)
                )
        for model, queues in self.scheduler.queues.items():
            for priority in PRIORITIES:
                self.metrics.set_queue_depth(model, priority, len(queues[priority]))

    def _known_model(self, model: str) -> bool:
        """Whether someone can take `model` now, or will be launched for it."""
        if self.lifecycle is not None and self.lifecycle.manages(model):
            return True
        return self.registry.serves(model)

    def _unknown_model(self, model: str) -> str | None:
        """Why `model` is unknown (configured nowhere, never registered), naming what this
        coordinator serves; None if it is known (with no live worker: UNAVAILABLE instead)."""
        configured = self.lifecycle.models if self.lifecycle is not None else {}
        if model in self.registry.models_seen or model in configured:
            return None
        known = self.registry.models_seen.union(configured)
        served = ", ".join(repr(m[:64]) for m in sorted(known)[:_MODELS_NAMED]) or "none"
        more = f" and {len(known) - _MODELS_NAMED} more" if len(known) > _MODELS_NAMED else ""
        close = difflib.get_close_matches(model[:256], sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0][:64]!r}?" if close else ""
        return f"unknown model {model[:64]!r}; this coordinator serves: {served}{more}{hint}"

    def cloud_demand(self, model: str) -> int:
        """Requests for `model` that want the large model (see Scheduler.cloud_demand)."""
        return self.scheduler.cloud_demand(model)

    def stop_dispatching_to(self, name: str) -> None:
        """A worker told to drain takes no new work, even before it says so itself."""
        self.registry.drain(name)

    def forget_worker_named(self, name: str, now: float, reason: str) -> None:
        for identity in self.registry.named(name):
            self.remove_worker(identity, now, reason=reason)

    def view(self, model: str, role: Role) -> SideView:
        """One side of `model` for the policy: its registered workers, those launching (capacity
        with an ETA), and the requests queued for it."""
        cloud = role is Role.CLOUD
        count, capacity, inflight, compute, ready, eta, marginal = self.registry.side(model, role)
        launching = 0
        if cloud and self.lifecycle is not None:
            # Workers launched but not registered yet are capacity with an ETA.
            launching, launch_eta = self.lifecycle.launching(model, self.clock())
            eta = min(eta, launch_eta)
        measured = compute is not None or not cloud  # (the edge's default is a fair guess)
        if compute is None:
            compute = DEFAULT_CLOUD_COMPUTE_S if cloud else DEFAULT_EDGE_COMPUTE_S
        queued = self.scheduler.queued_for(model, Route.CLOUD if cloud else Route.EDGE)
        return SideView(
            workers=count + launching,
            capacity=capacity + launching,
            inflight=inflight,
            queued=sum(queued),
            queued_by_priority=queued,
            compute_s=compute,
            ready=ready,
            eta_s=eta,
            network_s=self.config.network_s if cloud else 0.0,
            compute_measured=measured,
            batch_marginal=marginal,
        )

    def dispatch(self, now: float) -> None:
        """Route queued requests, highest priority first and the clients of each priority in
        turn, to workers with free slots."""
        if self._gone:
            self.drop_gone_clients()
        for model, queues in self.scheduler.queues.items():
            if not any(queues.values()):
                continue
            if self.registry.all_slots_taken(model):
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
                if not queue:
                    continue
                for client, key in queue.order():
                    if self._no_free_slot(model, edge, cloud):
                        # Nothing can be dispatched; deciding again per queued request would
                        # cost O(queue) per message (deadlines are enforced by expiry).
                        break
                    p = self.scheduler.pending.get(key)
                    if p is None:
                        queue.remove(client, key)
                        continue
                    decision = choose(priority, p.remaining(now), edge, cloud)
                    route = decision.route
                    was_queued_for = p.route
                    if route is not was_queued_for and was_queued_for is not None:
                        stale = True
                    if route is Route.UNAVAILABLE or route is Route.TOO_LATE:
                        queue.remove(client, key)
                        refusal = self.scheduler.unroutable(route, model, cloud)
                        self._finish(p, refusal.reply(p.request.id), now)
                        continue
                    p.route = route
                    role = Role.EDGE if route is Route.EDGE else Role.CLOUD
                    worker = self.registry.pick(model, role, ready_only=priority == CRITICAL)
                    if worker is None:
                        # Stays queued; re-decided next pass (may move sides). Now counted on
                        # `route`'s side.
                        stale = stale or route is not was_queued_for
                        continue
                    queue.took(client, key)  # its client's turn is used
                    self._send_dispatch(worker, p, now)
                    if stale or p.worker is None:  # (not sent: the workers changed)
                        edge, cloud = self.view(model, Role.EDGE), self.view(model, Role.CLOUD)
                        stale = False
                        continue
                    # One more running on `route`, one fewer queued for it if it was counted
                    # there: the views view() would build now, without the rebuild.
                    if route is Route.EDGE:
                        edge = _after_dispatch(edge, was_queued_for is route, priority)
                    else:
                        cloud = _after_dispatch(cloud, was_queued_for is route, priority)
            for priority in PRIORITIES:
                self.metrics.set_queue_depth(model, priority, len(queues[priority]))
        if self.relay.on_edge:
            self.hand_off_generations(now)

    def hand_off_generations(self, now: float) -> None:
        """Move generations running on an edge agent to a cloud worker that is ready and free:
        the edge is told to CANCEL, the cloud gets the prompt plus the tokens so far and
        recomputes its own cache (an exact generation: the prompt, and the tokens as a draft
        the cloud verifies)."""
        for p, edge, cloud in self.relay.handoffs(self.scheduler.pending, self.registry):
            edge_attempt = p.dispatch_id
            # An exact generation whose edge drafts and whose cloud verifies drafts keeps the
            # edge's attempt as a drafting one (section 12); any other edge is CANCELled.
            drafting = p.exact and edge.drafts and cloud.drafts and edge_attempt is not None
            if edge_attempt is not None and not drafting:
                reason = "handed to a cloud worker"
                self._send(edge.identity, Cancel(id=edge_attempt, reason=reason))
            # The edge keeps its slot until its RESULT for this dispatch comes back; what it
            # sends for it from now on belongs to a superseded attempt (or is a draft).
            p.worker, p.dispatched_at, p.route, p.dispatch_id = None, None, Route.CLOUD, None
            self.metrics.handoffs.inc()
            self._send_dispatch(cloud, p, now)
            if drafting and edge_attempt is not None:
                p.drafting = (edge.identity, edge_attempt)
                if p.worker != cloud.identity:  # not dispatched after all
                    self._stop_drafting(p, "handed to a cloud worker")
                else:  # the edge's cue: from now on it drafts (nothing new stands yet)
                    self._send(edge.identity, Tokens(id=edge_attempt, position=0, tokens=[]))

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

    def _send_dispatch(self, worker: WorkerInfo, p: Pending, now: float) -> None:
        remaining = p.remaining(now)
        inputs, options = p.request.inputs, p.request.options
        p.draft_len = None  # (set by an exact takeover's continuation: a verdict is owed)
        if p.generating and p.tokens:
            if p.tokens_left() <= 0:  # everything was streamed; only the RESULT was lost
                reply = self.relay.final_reply(p, None, Status.OK, "", {})
                self._finish(p, reply, now)
                return
            inputs, options = self.relay.continuation(p, worker)
        p.attempt += 1
        dispatch_id = f"{self.epoch}.{p.key}.{p.attempt}"
        message = Dispatch(
            id=dispatch_id,
            model=p.request.model,
            inputs=inputs,
            timeout_ms=None if remaining is None else max(0, int(remaining * 1000)),
            options=options,
        )
        if self._send(worker.identity, message):
            p.worker, p.dispatched_at, p.dispatch_id = worker.identity, now, dispatch_id
            worker.inflight[dispatch_id] = p
            self.relay.started(p, worker)
            if self.lifecycle is not None:
                self.lifecycle.on_busy(worker.name, now)
        else:
            # The worker vanished between its last message and now: drop it, keep the request.
            self.scheduler.put_back(p)
            self.remove_worker(worker.identity, now, reason="unreachable")

    def _attempt(self, identity: bytes, dispatch_id: str) -> Pending | None:
        """The pending request whose current attempt is `dispatch_id`, running on `identity`;
        None for anything else (answered, superseded, another worker's, never dispatched)."""
        worker = self.registry.get(identity)
        p = None if worker is None else worker.inflight.get(dispatch_id)
        return p if p is not None and self._current(p, identity, dispatch_id) else None

    def _current(self, p: Pending, identity: bytes, dispatch_id: str) -> bool:
        """Whether `dispatch_id` on `identity` is `p`'s current attempt, `p` still pending."""
        return (
            p.dispatch_id == dispatch_id
            and p.worker == identity
            and self.scheduler.pending.get(p.key) is p
        )

    def _never_dispatched(self, dispatch_id: str) -> bool:
        """Whether `dispatch_id` cannot be an id this coordinator, or an earlier one, sent:
        not `epoch.key.attempt`, or this epoch with a key it never handed out."""
        parts = dispatch_id.split(".")
        if len(parts) != 3 or not all(parts):
            return True
        epoch, key, attempt = parts
        try:
            number, _ = int(key, 16), int(attempt)
        except ValueError:
            return True
        return epoch == self.epoch and number >= self.scheduler.issued

    def _stale(self, identity: bytes, dispatch_id: str, kind: str) -> None:
        """A PARTIAL or RESULT that no current attempt owns: dropped and counted; an id no
        coordinator ever sent puts its (registered) worker in breach."""
        if self._never_dispatched(dispatch_id) and self.registry.get(identity) is not None:
            self.worker_breach(identity, f"a {kind} for {dispatch_id!r}, never dispatched", None)
            return
        key = dispatch_id.split(".")[1] if dispatch_id.startswith(self.epoch + ".") else None
        if kind == "RESULT" and key is not None and key not in self.scheduler.pending:
            self.metrics.late_results.inc()  # its request was answered (e.g. TIMEOUT)
        else:  # re-dispatched, handed off, or a previous coordinator's
            self.metrics.superseded.labels(kind.lower()).inc()

    def forward_partial(self, worker: WorkerInfo, partial: Partial, now: float) -> None:
        """Relay a streamed piece to the client, numbered across every worker that served the
        request. Pieces of an attempt that is not the request's current one (cancelled,
        re-routed, a previous coordinator's) are dropped and counted: the client sees each
        token once. A piece the request cannot take (not one int64 token, over its budget)
        ends the attempt FAILED."""
        p = self._attempt(worker.identity, partial.id)
        if p is None:
            drafted = self._drafting_for(worker.identity, partial.id)
            if drafted is not None:
                self._forward_draft(drafted, partial)
                return
            self._stale(worker.identity, partial.id, "PARTIAL")
            return
        try:
            piece = self.relay.relay(p, worker, partial)
        except ProtocolError as exc:
            self.fail_attempt(p, f"the worker sent an unusable PARTIAL: {exc}", now)
            return
        if piece is not None:
            self._send_client(p.client, piece)
        if p.drafting is not None and worker.role is Role.CLOUD:
            # The drafting edge learns what stands: after the verdict the kept tokens, then
            # each of the cloud's tokens, so it drafts on from the cloud's sequence.
            if partial.accepted is not None:
                sync = Tokens(id=p.drafting[1], position=0, tokens=list(p.tokens))
            else:
                sync = Tokens(id=p.drafting[1], position=len(p.tokens) - 1, tokens=p.tokens[-1:])
            self._send(p.drafting[0], sync)

    # -- drafting after an exact takeover (section 12) --------------------------------------

    def _drafting_for(self, identity: bytes, dispatch_id: str) -> Pending | None:
        """The pending request whose drafting edge attempt is `dispatch_id` on `identity`."""
        parts = dispatch_id.split(".")
        p = self.scheduler.pending.get(parts[1]) if len(parts) == 3 else None
        return p if p is not None and p.drafting == (identity, dispatch_id) else None

    def _forward_draft(self, p: Pending, partial: Partial) -> None:
        """A drafting edge's token goes to the cloud attempt of the same request as TOKENS
        (never to the client). A draft the request cannot take ends the drafting, not the
        generation: the cloud decodes alone."""
        try:
            tokens = self.relay.draft(p, partial)
        except ProtocolError as exc:
            self.metrics.violations.inc()
            log.warning("request %s: unusable draft: %s", p.request.id, exc)
            self._stop_drafting(p, f"unusable draft: {exc}")
            return
        if tokens is not None and p.worker is not None:
            self._send(p.worker, tokens)

    def _stop_drafting(self, p: Pending, why: str) -> None:
        """End `p`'s drafting edge attempt (CANCEL; it keeps its slot until its RESULT)."""
        if p.drafting is not None:
            identity, dispatch_id = p.drafting
            p.drafting = None
            if self.registry.get(identity) is not None:
                self._send(identity, Cancel(id=dispatch_id, reason=why))

    def fail_attempt(self, p: Pending, why: str, now: float, count: bool = True) -> None:
        """A worker broke the protocol on `p`'s current attempt: it is CANCELled there, its
        slot is free at once, and the request ends FAILED naming the problem."""
        worker = self.registry.get(p.worker) if p.worker is not None else None
        name = worker.name if worker is not None else "?"
        if count:
            self.metrics.violations.inc()
        log.warning("request %s: worker %s broke the protocol: %s", p.request.id, name, why)
        if p.worker is not None and p.dispatch_id is not None:
            self._send(p.worker, Cancel(id=p.dispatch_id, reason=why))
        error = f"worker {name} failed the request: {why}"
        if p.generating:
            reply = self.relay.final_reply(p, worker, Status.FAILED, error, {})
        else:
            reply = Refusal(Status.FAILED, error).reply(p.request.id)
        self._finish(p, reply, now)  # (frees the slot: the status is not TIMEOUT)

    def worker_breach(self, identity: bytes, why: str, now: float | None) -> None:
        """A registered worker sent what cannot be tied to any dispatch (an id never sent, an
        unusable message with no id): nothing it says about its slots can be trusted. Every
        attempt it runs ends FAILED, every slot it held is free, and it is CANCELled."""
        worker = self.registry.get(identity)
        if worker is None:
            return
        now = self.clock() if now is None else now
        self.metrics.violations.inc()
        log.warning("worker %s broke the protocol: %s", worker.name, why)
        for dispatch_id, p in list(worker.inflight.items()):
            if self._attempt(identity, dispatch_id) is p:
                self.fail_attempt(p, f"it sent {why}", now, count=False)
            else:
                self._send(identity, Cancel(id=dispatch_id, reason="protocol breach"))
        worker.inflight.clear()

    def complete(self, identity: bytes, result: Result, now: float) -> None:
        worker = self.registry.get(identity)
        p = self._attempt(identity, result.id)
        if worker is not None:
            # Whatever its attempt's fate, the worker's slot, held until now, is free again.
            worker.inflight.pop(result.id, None)
        if p is None:
            drafted = self._drafting_for(identity, result.id)
            if drafted is not None:  # a drafting attempt ended: no outcome changes
                drafted.drafting = None
                return
            # Already answered (e.g. TIMEOUT while it ran), re-routed, or a previous
            # coordinator's: exactly one outcome.
            if worker is None:
                self.metrics.late_results.inc()
            else:
                self._stale(identity, result.id, "RESULT")
            return
        if worker is not None:
            if self.lifecycle is not None:
                self.lifecycle.on_busy(worker.name, now)
            if result.status is Status.UNAVAILABLE:
                # The worker refused it (draining, or its load failed): not the caller's
                # outcome. Stop sending it work and give the request another chance.
                worker.state = WorkerState.DRAINING
                self.scheduler.requeue(p)
                return
        timings = {f"worker_{k}": float(v) for k, v in result.timings.items()}
        if p.dispatched_at is not None:
            timings["queue_s"] = p.dispatched_at - p.arrived
            timings["worker_s"] = now - p.dispatched_at
        if "worker_compute_s" in timings:
            timings["compute_s"] = timings["worker_compute_s"]
        if p.generating:
            # The tokens are the ones relayed (a worker's PARTIALs precede its RESULT).
            reply = self.relay.final_reply(p, worker, result.status, result.error, timings)
            self._finish(p, reply, now)
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
        self.scheduler.forget(p.key)
        self.relay.ended(p.key)
        self._stop_drafting(p, "the cloud worker answered")
        if p.worker is not None and reply.status is not Status.TIMEOUT:
            # (A request that timed out while running keeps its slot until the worker's late
            # result comes back: the worker is still busy with it.)
            self.registry.release(p.worker, p.dispatch_id or "")
        reply.timings["total_s"] = now - p.arrived
        route = reply.served_by.get("role") or "none"
        self.metrics.observe(
            p.request.model, str(route), reply.status.value, now - p.arrived,
            priority=p.request.priority, served_by=reply.served_by,
        )  # fmt: skip
        self._reply(p.client, reply, p.request.model, count=False)

    def _reply(self, client: bytes, reply: Reply, model: str, count: bool = True) -> None:
        if count:
            # Label by model only for models someone serves: made-up names must not grow
            # the metrics without bound.
            label = model if self._unknown_model(model) is None else "unknown"
            self.metrics.observe(label, "none", reply.status.value, 0.0)
        self._send_client(client, reply)

    # -- clients that read slowly ------------------------------------------------------------

    def _send_client(self, client: bytes, message: Reply | Partial) -> None:
        """Send to a client, or, when its pipe is full (it reads slowly), keep the message in
        its outbox, in order: nothing for a client is dropped silently (PROTOCOL.md 9)."""
        box = self._outbox.get(client)
        if box is None:
            if self._send(client, message):
                return
            if self._send_errno != zmq.EAGAIN:
                log.info("client %s left before its %s", client.hex()[:16], message.id)
                if self._send_errno == zmq.EHOSTUNREACH:
                    self._gone.add(client)  # no route: its connection is closed
                return
            box = self._outbox[client] = deque()
            self._outbox_bytes[client] = 0
        self._backlog(client, box, message)

    def _backlog(
        self, client: bytes, box: deque[Reply | Partial], message: Reply | Partial
    ) -> None:
        if client in self._overflowing:
            shed = _shed(message, self.config.client_backlog_bytes)
            if shed is not message:
                self.metrics.replies_discarded.labels(type(message).__name__.lower()).inc()
            if shed is None:
                return
            message = shed
        box.append(message)
        self._outbox_bytes[client] += _tensor_bytes(message)
        self.metrics.client_backlog.inc()
        if len(box) > self.config.client_backlog_messages:
            self.drop_client(client, f"more than {self.config.client_backlog_messages} "
                                     "messages waited for it")  # fmt: skip
        elif self._outbox_bytes[client] > self.config.client_backlog_bytes:
            self._overflow(client, box)

    def _overflow(self, client: bytes, box: deque[Reply | Partial]) -> None:
        """Over its byte bound: what waits loses its outputs (PARTIALs go; each REPLY becomes
        a REJECTED without outputs), and until its outbox is empty the client's replies go
        the same way and its new REQUESTs are REJECTED."""
        log.warning("client %s reads too slowly: its replies are REJECTED", client.hex()[:16])
        self._overflowing.add(client)
        kept: deque[Reply | Partial] = deque()
        for message in box:
            shed = _shed(message, self.config.client_backlog_bytes)
            if shed is not message:
                self.metrics.replies_discarded.labels(type(message).__name__.lower()).inc()
            if shed is not None:
                kept.append(shed)
        self.metrics.client_backlog.dec(len(box) - len(kept))
        box.clear()
        box.extend(kept)
        self._outbox_bytes[client] = 0

    def drop_client(self, client: bytes, why: str) -> None:
        """The last resort for a client that never reads: forget what waits for it and
        withdraw its outstanding requests (counted: cicada_clients_dropped)."""
        log.warning("client %s dropped: %s", client.hex()[:16], why)
        self.metrics.clients_dropped.inc()
        box = self._forget_outbox(client)
        self.metrics.replies_discarded.labels("dropped").inc(len(box))
        for p in self.scheduler.of_client(client):
            self.withdraw_request(client, p.request.id)

    def _forget_outbox(self, client: bytes) -> deque[Reply | Partial]:
        box = self._outbox.pop(client, deque())
        self._outbox_bytes.pop(client, None)
        self._overflowing.discard(client)
        self.metrics.client_backlog.dec(len(box))
        return box

    def flush_clients(self, now: float) -> None:
        """Send what waits for slow readers, as far as their pipes take it."""
        for client, box in list(self._outbox.items()):
            while box:
                message = box[0]
                sent = self._send(client, message)
                if not sent and self._send_errno == zmq.EAGAIN:
                    break
                box.popleft()
                self.metrics.client_backlog.dec()
                self._outbox_bytes[client] -= _tensor_bytes(message)
                if not sent:  # it left: nothing more can reach it
                    log.info("client %s left with %d replies waiting", client.hex()[:16],
                             len(box) + 1)  # fmt: skip
                    self.metrics.replies_discarded.labels("dropped").inc(len(box) + 1)
                    self._forget_outbox(client)
                    break
            if not box and client in self._outbox:
                self._forget_outbox(client)

    def expire_requests(self, now: float) -> None:
        """Answer TIMEOUT for everything whose deadline passed, queued or running."""
        for p in self.scheduler.expired(now):
            worker = None if p.worker is None else self.registry.get(p.worker)
            if worker is None:
                where = "while queued" if p.worker is None else "while running"
                reply = Refusal(Status.TIMEOUT, f"deadline passed {where}").reply(p.request.id)
            else:  # say where it ran: the client tells a hung worker from a full queue
                role = worker.role.value
                reply = Refusal(
                    Status.TIMEOUT, f"deadline passed while running on {role} worker {worker.name}"
                ).reply(p.request.id)
                reply.served_by = {"role": role, "worker": worker.name, "variant": worker.variant}
            self._finish(p, reply, now)

    # -- workers -----------------------------------------------------------------------------

    def register_worker(
        self, identity: bytes, ready: Ready, now: float, grant: Grant | None = None
    ) -> None:
        """Register (or re-register) the sender, answering HEARTBEAT{registered}; or refuse
        it with DISCONNECT{refused: FIELD}: a field out of bounds, or (with CURVE) a role or
        model its key is not bound to. `grant` None: no CURVE, any role and model."""
        problem = worker_report_problem(ready)
        if problem is None and self.access is not None:
            problem = (grant or NO_GRANT).may_register(ready.role, ready.models)
        if problem is not None:
            self.refuse_worker(identity, problem, now, f"READY from {ready.worker!r}")
            return
        existing = self.registry.get(identity)
        if existing is not None:
            changed = existing.state is not ready.state or existing.models != ready.models
            self._note_ready(existing, ready.state, now)
            self.registry.reregister(existing, ready)
            # READY means "I hold nothing of yours": a worker abandons its dispatches when it
            # registers again, so what it ran is re-routed, as for a worker that died.
            self._reroute_inflight(existing)
            if changed:
                self.metrics.set_workers(self.registry.workers.values())
            self._send(identity, _REGISTERED)
            return
        worker = self.registry.add(identity, ready, now)
        if self.lifecycle is not None and worker.role is Role.CLOUD:
            self.lifecycle.on_registered(worker.name, now)
            self._note_ready(worker, ready.state, now, first=True)
        self.metrics.set_workers(self.registry.workers.values())
        log.info(
            "registered %s %s for %s (%s)",
            ready.role.value,
            ready.worker,
            ready.models,
            worker.state.value,
        )
        self._send(identity, _REGISTERED)

    def refuse_worker(
        self, identity: bytes, problem: tuple[str, str], now: float, what: str
    ) -> None:
        """Answer a READY or HEARTBEAT that cannot stand: DISCONNECT naming the field (the
        worker must not register again), and forget the sender if it was registered."""
        name, why = problem
        self.metrics.refused_registrations.inc()
        log.warning("refused %s (%s): %s", what, name, why)
        self.remove_worker(identity, now, reason=f"refused: {why}")
        self._send(identity, Disconnect(reason=why, refused=name))

    def worker_heartbeat(self, worker: WorkerInfo, beat: Heartbeat, now: float) -> None:
        """A registered worker's state and residency. Only a change of state recounts the
        per-model series; otherwise just this worker's own gauges move."""
        problem = worker_report_problem(beat)
        if problem is not None:
            self.refuse_worker(worker.identity, problem, now, f"HEARTBEAT from {worker.name!r}")
            return
        changed = beat.state is not None and beat.state is not worker.state
        self._note_ready(worker, beat.state, now)
        worker.update(beat)
        if changed:
            self.metrics.set_workers(self.registry.workers.values())
        else:
            self.metrics.set_worker(worker)

    def _note_ready(
        self, worker: WorkerInfo, state: WorkerState | None, now: float, first: bool = False
    ) -> None:
        """Tell the lifecycle when a cloud worker first becomes ready (its cold-start time)."""
        if (
            self.lifecycle is not None
            and worker.role is Role.CLOUD
            and worker.becomes_ready(state, first)
        ):
            self.lifecycle.on_ready(worker.name, now)

    def purge_workers(self, now: float) -> None:
        for identity in self.registry.expired(now):
            self.remove_worker(identity, now, reason="missed heartbeats")  # recounts the metrics

    def remove_worker(self, identity: bytes, now: float, reason: str) -> None:
        """Forget a worker; its in-flight requests are re-routed if they still can be."""
        worker = self.registry.remove(identity)
        if worker is None:
            return
        log.warning("worker %s (%s) removed: %s", worker.name, worker.role.value, reason)
        if self.lifecycle is not None:
            self.lifecycle.on_removed(worker.name)
        self._reroute_inflight(worker)
        self.metrics.set_workers(self.registry.workers.values())

    def _reroute_inflight(self, worker: WorkerInfo) -> None:
        """`worker`'s current attempts go back to their queues (a new attempt, with a new
        DISPATCH id, is decided next pass); its slots are free."""
        for dispatch_id, p in list(worker.inflight.items()):
            if p.drafting == (worker.identity, dispatch_id):
                p.drafting = None  # a drafting edge lost: the cloud decodes alone
            elif self._current(p, worker.identity, dispatch_id):
                # (A cloud lost mid-draft: its drafting edge stops; the re-route decides anew.)
                self._stop_drafting(p, "the cloud worker was lost")
                self.scheduler.requeue(p)
            # (else: already answered or handed over; only its slot was held)
        worker.inflight.clear()

    def send_heartbeats(self) -> None:
        for identity in list(self.registry.workers):
            self._send(identity, _HEARTBEAT)

    def _send(self, identity: bytes, message: Any) -> bool:
        """Whether `message` went; if not, `_send_errno` says why: EAGAIN (the peer's pipe is
        full) or EHOSTUNREACH (the peer is gone, or the socket is closed)."""
        self._send_errno = zmq.EHOSTUNREACH
        if self._sock is None:
            self._send_errno = zmq.ENOTSOCK
            return False
        try:
            # Never block: a peer that stops reading fills its pipe to the HWM, and a blocking
            # send would stall every other peer. Its message is dropped instead (a worker is
            # then treated as unreachable by the caller).
            frames = _HEARTBEAT_FRAMES.get(id(message)) or encode(message)
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
            self._send_errno = int(exc.errno)
            return False


_ZERO_COPY_BYTES = 64 * 1024
_RESULT = bytes([Command.RESULT])
_PARTIAL = bytes([Command.PARTIAL])


def _tensor_bytes(message: Message) -> int:
    outputs = getattr(message, "outputs", ())
    return sum(len(t.frame) if isinstance(t, RawTensor) else t.nbytes for t in outputs)


def _shed(message: Reply | Partial, bound: int) -> Reply | None:
    """What a client over its backlog bound gets instead of `message`: no PARTIAL, and for a
    REPLY with outputs a REJECTED without them (one that carries none is kept)."""
    if isinstance(message, Partial):
        return None
    if not message.outputs:
        return message
    return Reply(
        id=message.id,
        status=Status.REJECTED,
        error=f"reply discarded: the client did not read its replies (over {bound} bytes "
        "waited for it); read them, then retry",
    )


_MODELS_NAMED = 16  # at most this many served models are named in an unknown model's reply
# The coordinator's HEARTBEATs (section 4): an empty body, or `{registered: true}` answering
# an accepted READY; the worker fields mean nothing here, so they are not sent.
_HEARTBEAT = Heartbeat()
_REGISTERED = Heartbeat(registered=True)
_HEARTBEAT_FRAMES: dict[int, list[bytes | memoryview]] = {
    id(beat): [SIGNATURE, bytes([Command.HEARTBEAT]), msgpack.packb(body)]
    for beat, body in ((_HEARTBEAT, {}), (_REGISTERED, {"registered": True}))
}
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_COPIED_FRAMES = 4  # identity, signature, command, body


def _recv_frames(sock: zmq.Socket[bytes], user_id: bool = False) -> tuple[list[Any], str | None]:
    """One message, without blocking (zmq.Again if none): the identity, signature, command and
    body frames as bytes (small; the body is unpacked from bytes anyway), tensor frames as
    zero-copy buffers, which are forwarded as they are. (recv_multipart(copy=False) made a
    Frame object for every frame: ~3 us per message more than this.) With `user_id` (CURVE),
    also the sender's public key, which ZAP attached to the message as its User-Id."""
    recv = sock.recv
    user: str | None = None
    if user_id:
        first = recv(zmq.NOBLOCK, copy=False)
        value = first.get("User-Id")
        user = value if isinstance(value, str) else None
        frames: list[Any] = [first.bytes]
    else:
        frames = [recv(zmq.NOBLOCK)]
    while sock.getsockopt(zmq.RCVMORE):
        if len(frames) < _COPIED_FRAMES:
            frames.append(recv())
        else:
            frames.append(recv(copy=False).buffer)
    return frames, user


def _after_dispatch(view: SideView, was_queued: bool, priority: int) -> SideView:
    """`view` with one more request running and, if it was counted there, one fewer queued.
    (Spelled out: dataclasses.replace costs more than the rest of a dispatch decision.)"""
    by_priority = view.queued_by_priority
    if was_queued and priority < len(by_priority):
        by_priority = (*by_priority[:priority], by_priority[priority] - 1,
                       *by_priority[priority + 1 :])  # fmt: skip
    return SideView(
        workers=view.workers,
        capacity=view.capacity,
        inflight=view.inflight + 1,
        queued=view.queued - was_queued,
        queued_by_priority=by_priority,
        compute_s=view.compute_s,
        ready=view.ready,
        eta_s=view.eta_s,
        network_s=view.network_s,
        compute_measured=view.compute_measured,
        batch_marginal=view.batch_marginal,
    )


__all__ = ["Coordinator", "CoordinatorConfig", "RawTensor", "WorkerKeys"]
