"""docs/PROTOCOL.md is the contract: a client and a worker written from the document alone
(tests/security/wire.py: pyzmq and msgpack, never `cicada.common.protocol`) against a real
coordinator process (`python -m cicada coordinator`, cicada.testing.Stack).

Covered: registration, heartbeats both ways, request -> dispatch -> result -> reply, generation
PARTIALs, every status, and the places where the document and the coordinator once disagreed
(unknown models, readable oversize requests, other signatures, the coordinator's empty
HEARTBEAT, unknown peers, integral floats, which worker states take work).
Each test uses its own model names: the coordinator is shared by the module.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from cicada.testing import Stack
from tests.security import wire
from tests.security.wire import Message, Tensor

HEARTBEAT_S = 0.5  # the coordinator's; liveness 4 intervals (section 7)
WAIT_S = 10.0  # a bound on every wait (a busy machine), never a timing assertion
QUEUE_LIMIT = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("conformance"), heartbeat=HEARTBEAT_S) as s:
        s.coordinator("--queue-limit", str(QUEUE_LIMIT))
        yield s
        assert s.procs["coordinator"].poll() is None, s.log("coordinator")
        assert "Traceback" not in s.log("coordinator"), s.log("coordinator")


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


class Peer:
    """A DEALER speaking CCD/1 through the document's codec. As a worker it heartbeats while
    it waits (section 7); the coordinator's HEARTBEATs it receives are kept in `beats`."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.worker = False
        self.beats: list[Message] = []
        self.last_sent = 0.0
        self.status: dict[str, Any] = {"state": "ready"}  # what its HEARTBEATs report

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)
        self.last_sent = time.monotonic()

    def send(self, command: int, body: dict[str, Any], tensors: Sequence[Tensor] = ()) -> None:
        self.send_frames(wire.encode(command, body, tensors))

    def register(self, model: str, role: str = "edge", **fields: Any) -> None:
        self.worker = True
        self.status = {k: v for k, v in fields.items() if k in ("state", "eta_s")}
        body = {"role": role, "worker": unique(role), "models": [model], "variant": "v1",
                "capacity": 1, **fields}  # fmt: skip
        self.send(wire.READY, body)
        first = self.recv(timeout=WAIT_S, keep_heartbeats=True)
        assert first is not None and first.command == wire.HEARTBEAT  # the acknowledgement
        assert first.body == {"registered": True}  # section 4: only the acknowledgement

    def recv(self, timeout: float = WAIT_S, keep_heartbeats: bool = False) -> Message | None:
        """The next message (HEARTBEATs skipped unless kept); None after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            if self.worker and time.monotonic() - self.last_sent > HEARTBEAT_S / 2:
                self.send(wire.HEARTBEAT, {"inflight": 0, **self.status})
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.sock.poll(int(min(left, HEARTBEAT_S / 4) * 1000)):
                message = wire.decode(self.sock.recv_multipart())
                if message.command == wire.HEARTBEAT:
                    self.beats.append(message)
                    if not keep_heartbeats:
                        continue
                return message

    def expect(self, command: int, timeout: float = WAIT_S) -> Message:
        message = self.recv(timeout)
        assert message is not None, f"nothing came (expected 0x{command:02x})"
        assert message.command == command, message
        return message

    def silent(self, timeout: float = 1.0) -> None:
        message = self.recv(timeout)
        assert message is None, message


def request(
    rid: str, model: str, tensors: list[Tensor] | None = None, **fields: Any
) -> tuple[int, dict[str, Any], list[Tensor]]:
    body = {"id": rid, "model": model, **fields}
    return (
        wire.REQUEST,
        body,
        [Tensor.of("float32", [4], [1, 2, 3, 4])] if tensors is None else tensors,
    )


def ask(client: Peer, rid: str, model: str, **fields: Any) -> None:
    client.send(*request(rid, model, **fields))


def reply_to(
    client: Peer, rid: str, timeout: float = WAIT_S, alive: Sequence[Peer] = ()
) -> Message:
    """The client's REPLY to `rid`. Workers in `alive` hold work meanwhile and must stay
    registered: they heartbeat while the client waits (a worker peer heartbeats only inside
    its own recv, and a busy machine can stretch the wait past the liveness window)."""
    deadline = time.monotonic() + timeout
    while True:
        for worker in alive:
            unexpected = worker.recv(timeout=0.01)
            assert unexpected is None, unexpected
        reply = client.recv(timeout=0.05)
        if reply is not None:
            break
        assert time.monotonic() < deadline, f"no REPLY to {rid!r}"
    assert reply.command == wire.REPLY, reply
    assert reply.body["id"] == rid, reply
    return reply


def settle(stack: Stack, role: str, state: str, count: int = 1) -> None:
    """Wait until the coordinator reports `count` workers of `role` in `state`: messages from
    different peers have no order, so a worker's news is awaited before a client acts on it."""
    stack.wait_workers(role, count, state=state, timeout=WAIT_S)


@pytest.fixture
def peers(stack: Stack, ctx: zmq.Context[zmq.Socket[bytes]]) -> Any:
    def make() -> Peer:
        return Peer(ctx, stack.address)

    return make


# -- the happy path --------------------------------------------------------------------------


def test_register_and_heartbeat_both_ways(peers: Any) -> None:
    model = unique("m")
    worker, client = peers(), peers()
    worker.register(model)
    time.sleep(0.05)
    # Heartbeating, the worker outlives the liveness window (4 intervals), and the
    # coordinator keeps sending its own empty HEARTBEATs.
    assert worker.recv(timeout=4 * HEARTBEAT_S * 1.5) is None
    acknowledgements = [b for b in worker.beats if b.body == {"registered": True}]
    empty = [b for b in worker.beats if b.body == {}]
    assert len(acknowledgements) == 1 and len(empty) >= 3
    assert len(acknowledgements) + len(empty) == len(worker.beats)
    ask(client, "r", model, timeout_ms=5000)
    dispatch = worker.expect(wire.DISPATCH)
    worker.send(wire.RESULT, {"id": dispatch.body["id"], "status": "OK"}, dispatch.tensors)
    assert reply_to(client, "r").body["status"] == "OK"


def test_request_dispatch_result_reply(peers: Any) -> None:
    model = unique("m")
    worker, client = peers(), peers()
    worker.register(model, compute_s=0.01)
    # timeout_ms as a float with an integral value, as many msgpack encoders write it.
    ask(client, "r1", model, timeout_ms=5000.0, priority=1, options={"x": 1})
    dispatch = worker.expect(wire.DISPATCH)
    assert dispatch.body["model"] == model and dispatch.body["options"] == {"x": 1}
    assert isinstance(dispatch.body["timeout_ms"], int) and 0 < dispatch.body["timeout_ms"] <= 5000
    (x,) = dispatch.tensors
    assert (x.dtype, x.shape, x.values()) == ("float32", [4], [1, 2, 3, 4])
    out = Tensor.of("float32", [4], [2 * v for v in x.values()])
    worker.send(wire.RESULT, {"id": dispatch.body["id"], "status": "OK", "variant": "v2",
                              "timings": {"compute_s": 0.002}}, [out])  # fmt: skip
    reply = reply_to(client, "r1")
    assert reply.body["status"] == "OK"
    assert reply.tensors[0].values() == [2, 4, 6, 8]
    served = reply.body["served_by"]
    assert served["role"] == "edge" and served["variant"] == "v2" and served["worker"]
    timings = reply.body["timings"]
    assert {"queue_s", "compute_s", "worker_s", "total_s", "worker_compute_s"} <= set(timings)
    # A second RESULT for the same dispatch is discarded: exactly one REPLY.
    worker.send(wire.RESULT, {"id": dispatch.body["id"], "status": "OK"}, [out])
    client.silent(0.5)


def test_generation_partials(peers: Any) -> None:
    model = unique("gen")
    worker, client = peers(), peers()
    worker.register(model)
    prompt = Tensor.of("int64", [1, 3], [5, 6, 7])
    client.send(*request("g", model, [prompt], timeout_ms=10_000,
                         options={"max_new_tokens": 3.0, "eos_token_id": 99}))  # fmt: skip
    dispatch = worker.expect(wire.DISPATCH)
    assert dispatch.tensors[0].values() == [5, 6, 7]
    for seq, token in enumerate([11, 12, 13]):
        worker.send(wire.PARTIAL, {"id": dispatch.body["id"], "seq": seq},
                    [Tensor.of("int64", [1], [token])])  # fmt: skip
    worker.send(wire.RESULT, {"id": dispatch.body["id"], "status": "OK"},
                [Tensor.of("int64", [3], [11, 12, 13])])  # fmt: skip
    for seq, token in enumerate([11, 12, 13]):
        piece = client.expect(wire.PARTIAL)
        assert piece.body["id"] == "g" and piece.body["seq"] == seq
        assert piece.tensors[0].values() == [token] and piece.body["served_by"]["role"] == "edge"
    reply = reply_to(client, "g")
    assert reply.body["status"] == "OK" and reply.tensors[0].values() == [11, 12, 13]
    assert [s["tokens"] for s in reply.body["served_by"]["segments"]] == [3]


# -- every status ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["FAILED", "BAD_REQUEST"])
def test_worker_outcomes_pass_through(peers: Any, status: str) -> None:
    model = unique("m")
    worker, client = peers(), peers()
    worker.register(model)
    ask(client, "r", model)
    dispatch = worker.expect(wire.DISPATCH)
    worker.send(wire.RESULT, {"id": dispatch.body["id"], "status": status, "error": "boom"})
    reply = reply_to(client, "r")
    assert reply.body["status"] == status and reply.body["error"] == "boom"


def test_timeout(peers: Any) -> None:
    model = unique("m")
    worker, client = peers(), peers()
    worker.register(model)
    ask(client, "late", model, timeout_ms=300)
    worker.expect(wire.DISPATCH)  # and never answers
    late = reply_to(client, "late", alive=[worker]).body
    assert late["status"] == "TIMEOUT"
    # It ran on a worker: served_by names it, and the error says where (section 4).
    assert late["served_by"]["role"] == "edge" and late["served_by"]["variant"] == "v1"
    assert f"while running on edge worker {late['served_by']['worker']}" in late["error"]
    ask(client, "spent", model, timeout_ms=0)
    spent = reply_to(client, "spent").body
    assert spent["status"] == "TIMEOUT" and not spent.get("served_by")  # it never ran


def test_rejected_when_the_queue_is_full(stack: Stack, peers: Any) -> None:
    model = unique("m")
    worker, client = peers(), peers()
    worker.register(model)
    ask(client, "running", model, timeout_ms=60_000)
    worker.expect(wire.DISPATCH)  # holds its only slot
    # One client may hold half of a queue (section 13): two fill it, a third is turned away.
    sharers = [client, peers()]
    for i in range(QUEUE_LIMIT):
        ask(sharers[i % 2], f"queued-{i}", model, timeout_ms=60_000)
    # Messages from different peers have no order: the late request is sent once the queue is
    # seen full (the worker heartbeats meanwhile; it holds work and must stay registered).
    deadline = time.monotonic() + WAIT_S

    def queued() -> int:
        return sum(q["depth"] for q in stack.status()["queues"] if q.get("model") == model)

    while queued() < QUEUE_LIMIT:
        assert worker.recv(timeout=0.05) is None
        assert time.monotonic() < deadline, "the queue was never seen full"
    late = peers()
    ask(late, "over", model, timeout_ms=60_000)
    reply = reply_to(late, "over", alive=[worker])
    assert reply.body["status"] == "REJECTED" and "is full" in reply.body["error"]


def test_unavailable_for_a_known_model_without_a_worker(stack: Stack, peers: Any) -> None:
    model = unique("m")
    worker, client = peers(), peers()
    worker.register(model, role="cloud")
    worker.worker = False
    worker.send(wire.DISCONNECT, {"reason": "leaving"})
    stack.wait_for(lambda s: not any(w["role"] == "cloud" for w in s["workers"]),
                             what="the worker gone", timeout=WAIT_S)  # fmt: skip
    for priority in (0, 1, 2):
        ask(client, f"r{priority}", model, priority=priority, timeout_ms=5000)
        reply = reply_to(client, f"r{priority}")
        assert reply.body["status"] == "UNAVAILABLE"
        assert reply.body["retry_after_ms"] > 0


def test_bad_request_for_an_unknown_model_names_what_is_served(peers: Any) -> None:
    served = unique("served")
    worker, client = peers(), peers()
    worker.register(served)
    ask(client, "u", unique("never-heard-of"))
    reply = reply_to(client, "u")
    assert reply.body["status"] == "BAD_REQUEST"
    assert "unknown model" in reply.body["error"] and repr(served) in reply.body["error"]
    assert reply.body.get("retry_after_ms") is None
    assert "did you mean" not in reply.body["error"]  # nothing close to it
    ask(client, "typo", served.replace("served", "sevred"))
    typo = reply_to(client, "typo").body
    assert typo["status"] == "BAD_REQUEST" and f"did you mean {served!r}?" in typo["error"]


@pytest.mark.parametrize(
    "defect",
    ["priority 7", "priority is a string", "timeout beyond a day", "tensor frame short",
     "body over 256 KiB", "map of 5000 items", "string of 70 KiB"],
)  # fmt: skip
def test_bad_request_whenever_the_id_is_readable(peers: Any, defect: str) -> None:
    model = unique("m")
    worker, client = peers(), peers()
    worker.register(model)
    body: dict[str, Any] = {"id": "bad", "model": model,
                            "tensors": [{"dtype": "float32", "shape": [4]}]}  # fmt: skip
    frames = [b"\x00" * 16]
    if defect == "priority 7":
        body["priority"] = 7
    elif defect == "priority is a string":
        body["priority"] = "0"
    elif defect == "timeout beyond a day":
        body["timeout_ms"] = 86_400_001
    elif defect == "tensor frame short":
        frames = [b"\x00" * 15]
    elif defect == "body over 256 KiB":
        body["pad"] = b"x" * (300 * 1024)
    elif defect == "map of 5000 items":
        body["options"] = {str(i): i for i in range(5000)}
    else:
        body["note"] = "n" * (70 * 1024)
    client.send_frames([wire.SIGNATURE, bytes([wire.REQUEST]), msgpack.packb(body), *frames])
    reply = reply_to(client, "bad")
    assert reply.body["status"] == "BAD_REQUEST", reply
    worker.silent(0.2)


# -- where the document and the wire once disagreed ---------------------------------------------


def test_another_signature_is_dropped_unanswered(peers: Any) -> None:
    client = peers()
    command, body, tensors = request("v2", "any")
    frames = wire.encode(command, body, tensors)
    client.send_frames([b"CCD2", *frames[1:]])
    client.send_frames([b"CCD2", frames[1], b"\xc1"])
    ask(client, "after", unique("unknown"))  # a peer's messages are handled in order
    assert reply_to(client, "after").body["status"] == "BAD_REQUEST"
    client.silent(0.3)


def test_unknown_peers(peers: Any) -> None:
    """HEARTBEAT, RESULT and PARTIAL from a peer that is not registered draw DISCONNECT; a
    DISCONNECT, a CANCEL and the coordinator's own commands draw nothing (section 7)."""
    stranger = peers()
    for command, body, tensors in [
        (wire.HEARTBEAT, {}, []),
        (wire.RESULT, {"id": "nope", "status": "OK"}, []),
        (wire.PARTIAL, {"id": "nope", "seq": 0}, [Tensor.of("int64", [1], [1])]),
    ]:
        stranger.send(command, body, tensors)
        assert stranger.expect(wire.DISCONNECT).command == wire.DISCONNECT
    for command, body in [
        (wire.DISCONNECT, {"reason": "bye"}),
        (wire.CANCEL, {"id": "nope"}),
        (wire.REPLY, {"id": "x", "status": "OK"}),
        (wire.DISPATCH, {"id": "x", "model": "m"}),
    ]:
        stranger.send(command, body)
    stranger.silent(0.5)


def test_a_forgotten_worker_is_told_to_register_again(peers: Any) -> None:
    model = unique("m")
    worker, client = peers(), peers()
    worker.register(model)
    worker.worker = False  # falls silent past the liveness window
    time.sleep(4 * HEARTBEAT_S * 2)
    worker.send(wire.HEARTBEAT, {"state": "ready"})
    assert worker.expect(wire.DISCONNECT).command == wire.DISCONNECT
    worker.register(model)
    ask(client, "back", model)
    dispatch = worker.expect(wire.DISPATCH)
    worker.send(wire.RESULT, {"id": dispatch.body["id"], "status": "OK"})
    assert reply_to(client, "back").body["status"] == "OK"


@pytest.mark.parametrize("role", ["edge", "cloud"])
def test_worker_states_that_take_work(stack: Stack, peers: Any, role: str) -> None:
    """Section 6: `cold`/`loading` without an ETA take nothing (UNAVAILABLE at once, not a
    TIMEOUT); with an ETA, work that may wait (never latency-critical); `draining` nothing."""
    model = unique("m")
    worker, client = peers(), peers()
    worker.register(model, role=role, state="cold")
    for priority in (0, 1, 2):
        ask(client, f"cold-{priority}", model, priority=priority, timeout_ms=30_000)
        reply = reply_to(client, f"cold-{priority}")
        assert reply.body["status"] == "UNAVAILABLE" and reply.body["retry_after_ms"] > 0
    ask(client, "no-deadline", model)
    assert reply_to(client, "no-deadline").body["status"] == "UNAVAILABLE"

    worker.status = {"state": "loading", "eta_s": 0.2}
    worker.send(wire.READY, {"role": role, "worker": "w", "models": [model], "capacity": 2,
                             **worker.status})  # fmt: skip
    settle(stack, role, "loading")
    ask(client, "now", model, priority=0, timeout_ms=30_000)
    assert reply_to(client, "now").body["status"] == "UNAVAILABLE"
    ask(client, "can-wait", model, priority=1, timeout_ms=30_000)
    dispatch = worker.expect(wire.DISPATCH)
    worker.send(wire.RESULT, {"id": dispatch.body["id"], "status": "OK"})
    assert reply_to(client, "can-wait").body["status"] == "OK"

    worker.status = {"state": "draining"}
    worker.send(wire.HEARTBEAT, worker.status)
    settle(stack, role, "draining")
    ask(client, "drained", model, priority=1, timeout_ms=30_000)
    assert reply_to(client, "drained").body["status"] == "UNAVAILABLE"
    worker.silent(0.2)


def test_the_wire_codec_reads_what_it_writes(tmp_path: Path) -> None:
    frames = wire.encode(wire.REQUEST, {"id": "a", "model": "m", "timeout_ms": 1.0e3},
                         [Tensor.of("int64", [2], [1, 2])])  # fmt: skip
    message = wire.decode(frames)
    assert message.body["timeout_ms"] == 1000 and message.tensors[0].values() == [1, 2]
    assert wire.readable_id(frames) == "a"
    big = msgpack.packb({"pad": b"x" * 300_000, "id": "late", "model": 3})
    assert wire.readable_id([wire.SIGNATURE, b"\x01", big]) == "late"
    assert wire.readable_id([wire.SIGNATURE, b"\x01", big[:-1]]) is None
    assert wire.readable_id([b"CCD2", b"\x01", big]) is None
    with pytest.raises(wire.WireError):
        wire.decode([wire.SIGNATURE, b"\x01", big])
