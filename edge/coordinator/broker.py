"""The coordinator's broker: one ROUTER between clients and the edge agents / cloud workers.

Majordomo-shaped (docs/PROTOCOL.md). The broker owns the socket (and CURVE), the loop and the
metrics server, and composes what it holds: the `Registry` of workers of each role with their
state and residency, the `Scheduler`'s bounded per-priority queues and deadlines, and the
`GenerationRelay` of streamed tokens; `policy.choose` decides the routes. Every decoded REQUEST
ends in exactly one REPLY: the worker's result, or TIMEOUT / REJECTED / UNAVAILABLE /
BAD_REQUEST. Tensor frames are validated and forwarded as they are, never copied into arrays
here.

Methods are named for intent, after the Majordomo broker: `dispatch` routes queued work,
`purge_workers` drops the silent, `expire_requests` answers what ran out of time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq

from cicada.common.defaults import (
    CRITICAL,
    DEFAULT_ADDRESS,
    HEARTBEAT_INTERVAL_S,
    LIVENESS,
    PRIORITIES,
    QUEUE_LIMIT,
)
from cicada.common.protocol import (
    DEFAULT_LIMITS,
    SIGNATURE,
    Cancel,
    Command,
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
    encode,
    request_id_of,
)
from cicada.common.sockets import configure
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
from cicada.edge.coordinator.scheduler import Pending, Refusal, Scheduler

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


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or CoordinatorConfig()
        self.clock = clock
        self.registry = Registry(self.config.heartbeat_interval * self.config.liveness)
        self.scheduler = Scheduler(
            self.config.queue_limit,
            int(self.config.retry_after_s * 1000),
            self._known_model,
            self._unknown_model,
        )
        self.relay = GenerationRelay(self.config.limits)
        self.metrics = CoordinatorMetrics()
        self.malformed = 0
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.endpoint = ""
        self._sock: zmq.Socket[bytes] | None = None
        self._auth: Any = None
        self._metrics_server: Any = None
        self.lifecycle: Lifecycle | None = None  # set to launch/stop cloud workers on demand

    @property
    def workers(self) -> dict[bytes, WorkerInfo]:
        return self.registry.workers

    @property
    def pending(self) -> dict[str, Pending]:
        return self.scheduler.pending

    @property
    def queues(self) -> dict[str, dict[int, deque[str]]]:
        return self.scheduler.queues

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
                wait = min(next_beat, self.scheduler.next_deadline(now + interval)) - now
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
        worker = self.registry.seen(identity, now)
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
                self.metrics.set_workers(self.registry.workers.values())
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
        # Signed CCD1, a REQUEST, its id readable (whatever the body's size): BAD_REQUEST.
        # Another signature is dropped unanswered (section 11).
        readable = request_id_of(body, self.config.limits)
        if readable is not None:
            request_id, model = readable
            refusal = Refusal(Status.BAD_REQUEST, f"malformed request: {exc}")
            self._reply(identity, refusal.reply(request_id), model or "?")

    def _malformed(self, identity: bytes, why: str) -> None:
        self.malformed += 1
        self.metrics.malformed.inc()
        log.warning("dropped malformed message from %s: %s", identity.hex()[:16], why)

    # -- requests ----------------------------------------------------------------------------

    def accept_request(self, client: bytes, request: Request, now: float) -> None:
        admitted = self.scheduler.admit(client, request, now)
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
        self.relay.ended(p.key)
        if p.worker is None:
            self.metrics.set_queue_depth(
                p.request.model, p.request.priority, len(self.scheduler.queue_of(p))
            )
        else:
            self._send(p.worker, Cancel(id=p.key, reason="the client cancelled the request"))
        log.debug("request %s withdrawn by its client", request_id)

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
        return f"unknown model {model[:64]!r}; this coordinator serves: {served}{more}"

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
        count, capacity, inflight, compute, ready, eta = self.registry.side(model, role)
        launching = 0
        if cloud and self.lifecycle is not None:
            # Workers launched but not registered yet are capacity with an ETA.
            launching, launch_eta = self.lifecycle.launching(model, self.clock())
            eta = min(eta, launch_eta)
        if compute is None:
            compute = DEFAULT_CLOUD_COMPUTE_S if cloud else DEFAULT_EDGE_COMPUTE_S
        return SideView(
            workers=count + launching,
            capacity=capacity + launching,
            inflight=inflight,
            queued=self.scheduler.queued_for(model, Route.CLOUD if cloud else Route.EDGE),
            compute_s=compute,
            ready=ready,
            eta_s=eta,
            network_s=self.config.network_s if cloud else 0.0,
        )

    def dispatch(self, now: float) -> None:
        """Route queued requests, highest priority first, to workers with free slots."""
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
                for key in list(queue):
                    if self._no_free_slot(model, edge, cloud):
                        # Nothing can be dispatched; deciding again per queued request would
                        # cost O(queue) per message (deadlines are enforced by expiry).
                        break
                    p = self.scheduler.pending.get(key)
                    if p is None:
                        queue.remove(key)
                        continue
                    decision = choose(priority, p.remaining(now), edge, cloud)
                    route = decision.route
                    was_queued_for = p.route
                    if route is not was_queued_for and was_queued_for is not None:
                        stale = True
                    if route is Route.UNAVAILABLE or route is Route.TOO_LATE:
                        queue.remove(key)
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
        if self.relay.on_edge:
            self.hand_off_generations(now)

    def hand_off_generations(self, now: float) -> None:
        """Move generations running on an edge agent to a cloud worker that is ready and free:
        the edge is told to CANCEL, the cloud gets the prompt plus the tokens so far and
        recomputes its own cache."""
        for p, edge, cloud in self.relay.handoffs(self.scheduler.pending, self.registry):
            self._send(edge.identity, Cancel(id=p.key, reason="handed to a cloud worker"))
            # The edge keeps its slot until its RESULT for this dispatch comes back.
            p.worker, p.dispatched_at, p.route = None, None, Route.CLOUD
            self.metrics.handoffs.inc()
            self._send_dispatch(cloud, p, now)

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
        if p.generating and p.tokens:
            if p.tokens_left() <= 0:  # everything was streamed; only the RESULT was lost
                reply = self.relay.final_reply(p, None, Status.OK, "", {})
                self._finish(p, reply, now)
                return
            inputs, options = self.relay.continuation(p)
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
            self.relay.started(p, worker)
            if self.lifecycle is not None:
                self.lifecycle.on_busy(worker.name, now)
        else:
            # The worker vanished between its last message and now: drop it, keep the request.
            self.scheduler.queue_of(p).appendleft(p.key)
            self.remove_worker(worker.identity, now, reason="unreachable")

    def forward_partial(self, worker: WorkerInfo, partial: Partial) -> None:
        """Relay a streamed piece to the client, numbered across every worker that served the
        request. Pieces from a worker that no longer owns the request (cancelled, re-routed)
        are dropped: the client sees each token once."""
        p = self.scheduler.pending.get(partial.id)
        if p is None or p.worker != worker.identity:
            self.metrics.late_results.inc()
            return
        try:
            piece = self.relay.relay(p, worker, partial)
        except ProtocolError as exc:
            self._malformed(worker.identity, str(exc))
            return
        self._send(p.client, piece)

    def complete(self, identity: bytes, result: Result, now: float) -> None:
        p = self.scheduler.pending.get(result.id)
        worker = self.registry.get(identity)
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
        if p.worker is not None and reply.status is not Status.TIMEOUT:
            # (A request that timed out while running keeps its slot until the worker's late
            # result comes back: the worker is still busy with it.)
            self.registry.release(p.worker, p.key)
        reply.timings["total_s"] = now - p.arrived
        route = reply.served_by.get("role") or "none"
        self.metrics.observe(p.request.model, str(route), reply.status.value, now - p.arrived)
        self._reply(p.client, reply, p.request.model, count=False)

    def _reply(self, client: bytes, reply: Reply, model: str, count: bool = True) -> None:
        if count:
            # Label by model only for models someone serves: made-up names must not grow
            # the metrics without bound.
            label = model if self._unknown_model(model) is None else "unknown"
            self.metrics.observe(label, "none", reply.status.value, 0.0)
        if not self._send(client, reply):
            log.info("client %s left before its reply %s", client.hex()[:16], reply.id)

    def expire_requests(self, now: float) -> None:
        """Answer TIMEOUT for everything whose deadline passed, queued or running."""
        for p in self.scheduler.expired(now):
            where = "while queued" if p.worker is None else "while running"
            self._finish(
                p, Refusal(Status.TIMEOUT, f"deadline passed {where}").reply(p.request.id), now
            )

    # -- workers -----------------------------------------------------------------------------

    def register_worker(self, identity: bytes, ready: Ready, now: float) -> None:
        existing = self.registry.get(identity)
        if existing is not None:
            self._note_ready(existing, ready.state, now)
            self.registry.reregister(existing, ready)
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
        self._send(identity, _HEARTBEAT)

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
            self.remove_worker(identity, now, reason="missed heartbeats")
        self.metrics.set_workers(self.registry.workers.values())

    def remove_worker(self, identity: bytes, now: float, reason: str) -> None:
        """Forget a worker; its in-flight requests are re-routed if they still can be."""
        worker = self.registry.remove(identity)
        if worker is None:
            return
        log.warning("worker %s (%s) removed: %s", worker.name, worker.role.value, reason)
        if self.lifecycle is not None:
            self.lifecycle.on_removed(worker.name)
        for key, p in list(worker.inflight.items()):
            if key not in self.scheduler.pending or p.worker != identity:
                continue  # already answered or handed over; only its slot was held
            self.scheduler.requeue(p)
        worker.inflight.clear()
        self.metrics.set_workers(self.registry.workers.values())

    def send_heartbeats(self) -> None:
        for identity in list(self.registry.workers):
            self._send(identity, _HEARTBEAT)

    def _send(self, identity: bytes, message: Any) -> bool:
        if self._sock is None:
            return False
        try:
            # Never block: a peer that stops reading fills its pipe to the HWM, and a blocking
            # send would stall every other peer. Its message is dropped instead (a worker is
            # then treated as unreachable by the caller).
            frames = _EMPTY_HEARTBEAT if message is _HEARTBEAT else encode(message)
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
_MODELS_NAMED = 16  # at most this many served models are named in an unknown model's reply
# The coordinator's HEARTBEAT has an empty body (section 4): the worker fields mean nothing here.
_HEARTBEAT = Heartbeat()
_EMPTY_HEARTBEAT: list[bytes | memoryview] = [
    SIGNATURE, bytes([Command.HEARTBEAT]), msgpack.packb({})
]  # fmt: skip
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
