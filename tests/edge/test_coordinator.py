"""The coordinator's bookkeeping, driven step by step on real loopback sockets with a fake clock.

Workers and clients are raw DEALER sockets speaking the protocol, so each assertion is about
what crosses the wire: exactly one reply per request, the right status, nothing run late.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import zmq

from cicada.common.protocol import (
    Disconnect,
    Dispatch,
    Heartbeat,
    Message,
    Ready,
    Reply,
    Request,
    Result,
    Role,
    Status,
    WorkerState,
    decode,
    encode,
)
from cicada.edge.coordinator.broker import Coordinator, CoordinatorConfig


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# A frame the harness passes between its peers and the coordinator's socket to know that all
# sent before it has arrived (ZeroMQ keeps each connection's order); never a CCD1 message, and
# never handed to the coordinator.
MARK = b"harness-mark:"
MARK_WAIT_S = 30.0  # a bound on waiting for a marker, never a latency claim


class Peer:
    """A DEALER that speaks CCD/1 to the coordinator under test."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, harness: Harness | None = None,
                 identity: bytes | None = None) -> None:  # fmt: skip
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.connect(endpoint)
        self.harness, self.identity = harness, identity

    def send(self, message: Message) -> None:
        self.sock.send_multipart(encode(message))

    def recv(self, timeout: float = 2.0) -> Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return decode(self.sock.recv_multipart())

    def drain(self, timeout: float = 0.2) -> list[Message]:
        """What the coordinator has sent this peer. Under a harness, whose coordinator runs only
        in this thread, everything up to the harness's marker: nothing more is on its way.
        Else what arrives until `timeout` passes without a message."""
        marker = self.harness.mark(self) if self.harness is not None else None
        out = []
        if marker is not None:
            while True:
                assert self.sock.poll(int(MARK_WAIT_S * 1000)), "the harness's marker is lost"
                frames = self.sock.recv_multipart()
                if frames == [marker]:
                    return out
                out.append(decode(frames))
        while (m := self.recv(timeout)) is not None:
            out.append(m)
        return out


class Harness:
    def __init__(self, **config: Any) -> None:
        self.clock = FakeClock()
        self.coord = Coordinator(CoordinatorConfig(bind="tcp://127.0.0.1:0", **config), self.clock)
        self.endpoint = self.coord.bind()
        self.ctx: zmq.Context[Any] = zmq.Context()
        assert self.coord._sock is not None
        self.router = self.coord._sock
        self.peers: list[Peer] = []
        self._marks = 0

    def peer(self) -> Peer:
        peer = Peer(self.ctx, self.endpoint, self, b"peer-%d" % len(self.peers))
        self.peers.append(peer)
        return peer

    def _marker(self) -> bytes:
        self._marks += 1
        return MARK + b"%d" % self._marks

    def mark(self, peer: Peer) -> bytes | None:
        """Send `peer` a marker behind what the coordinator has sent it; None when the socket
        does not know the peer yet (it has sent nothing: nothing can be on its way to it)."""
        marker = self._marker()
        try:
            self.router.send_multipart([peer.identity, marker])
        except zmq.ZMQError:  # EHOSTUNREACH under ROUTER_MANDATORY
            return None
        return marker

    def pump(self, rounds: int = 20) -> None:
        """Deliver what has arrived (at most `rounds` messages), then run one round of
        bookkeeping. Every peer sends a marker behind what it sent, so once all are in, all
        it sent is here: no waiting for silence. (A test's own sockets, outside `peer()`, get
        what arrives within 20 ms polls.)"""
        marker = self._marker()
        waiting = {peer.identity for peer in self.peers}
        for peer in self.peers:
            peer.sock.send(marker)
        handled = 0
        while handled < rounds:
            wait_ms = int(MARK_WAIT_S * 1000) if waiting else (20 if not self.peers else 0)
            if not self.router.poll(wait_ms):
                assert not waiting, "a peer's marker is lost"
                break
            frames = self.router.recv_multipart()
            if len(frames) == 2 and frames[1].startswith(MARK):
                if frames[1] == marker:
                    waiting.discard(frames[0])
                continue  # an earlier pump's, left when it stopped at `rounds`
            self.coord.handle(frames)
            handled += 1
        self.coord.expire_requests(self.clock.now)
        self.coord.dispatch(self.clock.now)

    def worker(self, role: Role, state: WorkerState = WorkerState.READY, capacity: int = 1,
               compute_s: float | None = None, eta_s: float | None = None,
               drafts: bool | None = None) -> Peer:  # fmt: skip
        peer = self.peer()
        peer.send(Ready(role=role, worker=f"{role.value}-{id(peer)}", models=["m"],
                        variant=f"{role.value}-v", capacity=capacity, state=state,
                        compute_s=compute_s, eta_s=eta_s, total_stages=4,
                        drafts=drafts))  # fmt: skip
        self.pump()
        assert isinstance(peer.recv(), Heartbeat)  # the coordinator greets a new worker
        return peer

    def close(self) -> None:
        self.coord.close()
        self.ctx.destroy(linger=0)


def request(rid: str, priority: int = 1, timeout_ms: int | None = 5000) -> Request:
    return Request(id=rid, model="m", inputs=[np.arange(4, dtype=np.float32)],
                   priority=priority, timeout_ms=timeout_ms)  # fmt: skip


def test_request_is_dispatched_and_answered_once(h: Harness) -> None:
    edge = h.worker(Role.EDGE)
    client = h.peer()
    client.send(request("r1", priority=0))
    h.pump()
    dispatch = edge.recv()
    assert isinstance(dispatch, Dispatch)
    assert np.array_equal(dispatch.inputs[0], np.arange(4, dtype=np.float32))
    assert dispatch.timeout_ms is not None and dispatch.timeout_ms <= 5000
    edge.send(Result(id=dispatch.id, status=Status.OK, outputs=[dispatch.inputs[0] * 2],
                     timings={"compute_s": 0.001}))  # fmt: skip
    edge.send(Result(id=dispatch.id, status=Status.OK, outputs=[]))  # a duplicate result
    h.pump()
    replies = client.drain()
    assert len(replies) == 1
    reply = replies[0]
    assert isinstance(reply, Reply) and reply.id == "r1" and reply.status is Status.OK
    assert reply.served_by["role"] == "edge" and reply.served_by["variant"] == "edge-v"
    assert np.array_equal(reply.outputs[0], np.arange(4, dtype=np.float32) * 2)
    assert {"queue_s", "worker_s", "total_s", "compute_s"} <= set(reply.timings)
    assert h.coord.pending == {}


def test_unknown_model_is_a_bad_request_naming_what_is_served(h: Harness) -> None:
    client = h.peer()
    client.send(request("r1"))
    h.pump()
    reply = client.recv()
    assert isinstance(reply, Reply) and reply.status is Status.BAD_REQUEST
    assert "unknown model 'm'" in reply.error and reply.retry_after_ms is None
    h.worker(Role.EDGE)  # serves "m"
    client.send(Request(id="r2", model="other", inputs=[]))
    h.pump()
    reply = client.recv()
    assert isinstance(reply, Reply) and reply.status is Status.BAD_REQUEST
    assert "unknown model 'other'" in reply.error and "'m'" in reply.error


def test_known_model_without_a_live_worker_is_unavailable_with_retry_after(h: Harness) -> None:
    edge = h.worker(Role.EDGE)
    edge.send(Disconnect(reason="leaving"))
    h.pump()
    client = h.peer()
    client.send(request("r1"))
    h.pump()
    reply = client.recv()
    assert isinstance(reply, Reply) and reply.status is Status.UNAVAILABLE
    assert reply.retry_after_ms and reply.retry_after_ms > 0


@pytest.mark.parametrize("role", [Role.EDGE, Role.CLOUD])
@pytest.mark.parametrize("priority", [0, 1, 2])
def test_workers_that_cannot_take_work_make_a_model_unavailable(
    h: Harness, role: Role, priority: int
) -> None:
    """`cold` without an ETA takes no work, of either role: UNAVAILABLE at once, not TIMEOUT."""
    worker = h.worker(role, state=WorkerState.COLD)
    client = h.peer()
    client.send(request("r1", priority=priority, timeout_ms=60_000))
    h.pump()
    reply = client.recv()
    assert isinstance(reply, Reply) and reply.status is Status.UNAVAILABLE, reply
    assert reply.retry_after_ms and reply.retry_after_ms > 0
    assert worker.drain(0.05) == []
    client.send(request("r2", priority=priority, timeout_ms=None))
    h.pump()
    reply = client.recv()
    assert isinstance(reply, Reply) and reply.status is Status.UNAVAILABLE, reply


@pytest.mark.parametrize("role", [Role.EDGE, Role.CLOUD])
def test_a_cold_worker_with_an_eta_takes_work_that_can_wait(h: Harness, role: Role) -> None:
    worker = h.worker(role, state=WorkerState.COLD, eta_s=0.5, capacity=2)
    client = h.peer()
    client.send(request("wait", priority=1, timeout_ms=60_000))
    h.pump()
    assert isinstance(worker.recv(), Dispatch)
    client.send(request("now", priority=0, timeout_ms=60_000))
    h.pump()
    reply = client.recv()
    assert isinstance(reply, Reply) and reply.id == "now" and reply.status is Status.UNAVAILABLE


def test_full_queue_rejects_and_loses_nothing() -> None:
    h = Harness(queue_limit=2, client_queue_limit=2)  # one client may fill the whole queue
    try:
        edge = h.worker(Role.EDGE, capacity=1)  # never answers
        client = h.peer()
        for i in range(5):
            client.send(request(f"r{i}"))
        h.pump()  # all five arrive before the dispatch round: two fit the queue
        replies = client.drain()
        rejected = [r for r in replies if isinstance(r, Reply) and r.status is Status.REJECTED]
        assert sorted(r.id for r in rejected) == ["r2", "r3", "r4"]
        assert all(r.retry_after_ms for r in rejected)
        # The two accepted are still owed a reply: one running on the edge, one queued.
        assert sorted(p.request.id for p in h.coord.pending.values()) == ["r0", "r1"]
        assert len([m for m in edge.drain() if isinstance(m, Dispatch)]) == 1
    finally:
        h.close()


def test_expired_requests_are_answered_and_never_run(h: Harness) -> None:
    edge = h.worker(Role.EDGE, capacity=1)
    client = h.peer()
    client.send(request("running", timeout_ms=1000))
    client.send(request("queued", timeout_ms=1000))
    h.pump()
    first = edge.recv()
    assert isinstance(first, Dispatch)
    h.clock.now += 2.0  # both deadlines pass
    h.pump()
    replies = {r.id: r for r in client.drain() if isinstance(r, Reply)}
    assert replies["running"].status is Status.TIMEOUT
    assert replies["queued"].status is Status.TIMEOUT
    assert "queued" in replies["queued"].error
    # The queued one was never dispatched; the late result of the running one is dropped.
    assert not [m for m in edge.drain() if isinstance(m, Dispatch)]
    edge.send(Result(id=first.id, status=Status.OK, outputs=[]))
    h.pump()
    assert client.drain() == []


def test_critical_goes_to_edge_while_quality_waits_for_loading_cloud(h: Harness) -> None:
    edge = h.worker(Role.EDGE, capacity=4)
    cloud = h.worker(Role.CLOUD, state=WorkerState.LOADING, eta_s=1.0, compute_s=0.1)
    client = h.peer()
    client.send(request("crit", priority=0, timeout_ms=500))
    client.send(request("qual", priority=2, timeout_ms=5000))
    client.send(request("qual-short", priority=2, timeout_ms=300))
    h.pump()
    to_edge = {m.id for m in edge.drain() if isinstance(m, Dispatch)}
    to_cloud = {m.id for m in cloud.drain() if isinstance(m, Dispatch)}
    assert len(to_edge) == 2 and len(to_cloud) == 1
    keys = {p.request.id: p.dispatch_id for p in h.coord.pending.values()}
    assert keys["qual"] in to_cloud
    assert keys["crit"] in to_edge and keys["qual-short"] in to_edge


def test_dead_worker_requests_are_rerouted_or_answered(h: Harness) -> None:
    edge = h.worker(Role.EDGE, capacity=4)
    cloud = h.worker(Role.CLOUD, state=WorkerState.READY, compute_s=0.1)
    client = h.peer()
    client.send(request("q", priority=2, timeout_ms=5000))
    h.pump()
    assert [m for m in cloud.drain() if isinstance(m, Dispatch)]
    # The cloud falls silent; liveness runs out and the request moves to the edge.
    for _ in range(6):
        h.clock.now += 0.5
        edge.send(Heartbeat(state=WorkerState.READY))
        h.pump()
        h.coord.purge_workers(h.clock.now)
        h.coord.dispatch(h.clock.now)
    moved = [m for m in edge.drain() if isinstance(m, Dispatch)]
    assert len(moved) == 1
    edge.send(Result(id=moved[0].id, status=Status.OK, outputs=[]))
    h.pump()
    replies = client.drain()
    assert len(replies) == 1 and isinstance(replies[0], Reply)
    assert replies[0].status is Status.OK and replies[0].served_by["role"] == "edge"


def test_unknown_worker_is_told_to_register_again(h: Harness) -> None:
    stranger = h.peer()
    stranger.send(Heartbeat(state=WorkerState.READY))
    h.pump()
    assert isinstance(stranger.recv(), Disconnect)


def test_malformed_frames_are_dropped_and_counted_and_serving_goes_on(h: Harness) -> None:
    edge = h.worker(Role.EDGE)
    client = h.peer()
    client.sock.send_multipart([b"CCD1", b"\x01", b"\xc1"])  # not msgpack
    client.sock.send_multipart([b"junk"])
    client.sock.send_multipart([b"CCD1", b"\x01", b"\x81\xa2id\xa1x"])  # id but no model
    h.pump()
    assert h.coord.malformed == 3
    bad = client.recv()
    assert isinstance(bad, Reply) and bad.id == "x" and bad.status is Status.BAD_REQUEST
    client.send(request("ok", priority=0))
    h.pump()
    assert isinstance(edge.recv(), Dispatch)


def test_serve_forever_answers_over_a_real_loop() -> None:
    """The same path through serve_forever on the real clock (no fake steps)."""
    import threading

    coord = Coordinator(CoordinatorConfig(bind="tcp://127.0.0.1:0", heartbeat_interval=0.05))
    endpoint = coord.bind()
    thread = threading.Thread(target=coord.serve_forever, daemon=True)
    thread.start()
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        edge = Peer(ctx, endpoint)
        edge.send(Ready(role=Role.EDGE, worker="e", models=["m"], capacity=1))
        assert isinstance(edge.recv(), Heartbeat)
        client = Peer(ctx, endpoint)
        client.send(request("r", priority=0))
        dispatch = next(m for m in iter(edge.recv, None) if isinstance(m, Dispatch))
        edge.send(Result(id=dispatch.id, status=Status.OK, outputs=[np.ones(2)]))
        deadline = time.monotonic() + 5
        reply = None
        while reply is None and time.monotonic() < deadline:
            reply = client.recv(0.5)
        assert isinstance(reply, Reply) and reply.status is Status.OK
    finally:
        coord.stop()
        thread.join(5)
        ctx.destroy(linger=0)
