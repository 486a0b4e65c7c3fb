"""Exactly one outcome, per attempt: the attacker's (and the unlucky operator's) view.

Real `python -m cicada coordinator|edge` processes on loopback (cicada.testing.Stack); where a
worker misbehaves on purpose it is a raw pyzmq DEALER speaking CCD/1 through
cicada.common.protocol, and where a client does, a raw DEALER too. The promises checked:

* a client gets exactly its own tokens, also when the coordinator restarted under a
  generation that another client had running (DISPATCH ids carry a per-process epoch, and a
  worker that registers again abandons what it ran);
* an edge agent stopped past liveness and resumed does not add its tokens to a generation the
  coordinator re-routed: exactly max_new_tokens in the stream and in the REPLY;
* a worker's unusable PARTIAL or RESULT, or one for an id never dispatched, ends its request
  FAILED at once and frees the slot; the coordinator serves on;
* a second outstanding request with the same id on one connection is refused BAD_REQUEST;
* a client that reads slowly gets every reply, late: requests sent == outcomes received.

Every wait is bounded; nothing asserts how long anything took.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from cicada.client import Client, Piece
from cicada.common.generation import GenerationRequest, generate
from cicada.common.protocol import (
    Dispatch,
    Heartbeat,
    Message,
    Partial,
    ProtocolError,
    Ready,
    Reply,
    Request,
    Result,
    Role,
    Status,
    decode,
    encode,
)
from cicada.edge.onnx_model import EdgeModel
from cicada.errors import ClientError
from cicada.testing import Stack
from tests.generation_assets import make_generation_assets

PROMPT_A = np.asarray([[3, 14, 15, 92, 6, 53]], dtype=np.int64)
PROMPT_B = np.asarray([[27, 18, 28, 18, 28, 45, 90]], dtype=np.int64)
WAIT = 60.0  # a bound on each wait for a condition, never a latency claim


@pytest.fixture(scope="module")
def gen_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_generation_assets(tmp_path_factory.mktemp("one-outcome"))


def edge_greedy(edge_dir: Path, prompt: np.ndarray, n: int) -> list[int]:
    """The reference: greedy decoding of the edge model, as the agent runs it."""
    decoder = EdgeModel.load(edge_dir).new_decoder()
    assert decoder is not None
    request = GenerationRequest.parse({"max_new_tokens": n}, [prompt])
    return generate(decoder, request, lambda t: None).tokens


def edge_count(status: dict[str, Any]) -> int:
    return sum(w["count"] for w in status["workers"] if w["role"] == "edge")


# -- a coordinator restart under a running generation -----------------------------------------


def test_after_a_coordinator_restart_a_client_gets_exactly_its_own_tokens(
    tmp_path: Path, gen_assets: dict[str, Path]
) -> None:
    n_a, n_b = 400, 30
    outcomes: list[str] = []
    with Stack(tmp_path) as stack:
        stack.coordinator()
        # 40 ms a token: A's generation is still running on the agent long after the restart.
        stack.edge("gpt2", gen_assets["edge"], "edge", "--token-interval", "0.04",
                   "--capacity", "2")  # fmt: skip
        stack.wait_workers("edge")
        with Client(stack.address, timeout=8) as client_a:
            stream_a = client_a.stream("gpt2", PROMPT_A, max_new_tokens=n_a, priority=0)
            assert next(stream_a).role == "edge"
            assert next(stream_a).role == "edge"
            stack.kill("coordinator")
            stack.coordinator()
            stack.wait_workers("edge")  # the agent registered again with the new coordinator
            with Client(stack.address, timeout=WAIT) as client_b:
                pieces: list[Piece] = list(
                    stream_b := client_b.stream("gpt2", PROMPT_B, max_new_tokens=n_b, priority=0)
                )
                result_b = stream_b.result
                outcomes.append("B: OK")
            # A's request died with the first coordinator: its call ends with the SDK's
            # explicit client-side error, never with somebody else's tokens, never a hang.
            with pytest.raises(ClientError):
                for _ in stream_a:
                    pass
            outcomes.append("A: error")
    assert outcomes == ["B: OK", "A: error"]  # two requests sent, two outcomes
    assert result_b is not None
    tokens = [int(t) for p in pieces for t in p.tokens]
    assert [p.seq for p in pieces] == list(range(n_b))
    assert len(tokens) == n_b and result_b.output.tolist() == tokens
    assert tokens == edge_greedy(gen_assets["edge"], PROMPT_B, n_b)


# -- an edge agent stopped past liveness ----------------------------------------------------------


def test_an_agent_stopped_past_liveness_adds_no_tokens(
    tmp_path: Path, gen_assets: dict[str, Path]
) -> None:
    n = 60
    with Stack(tmp_path) as stack:
        stack.coordinator()
        first = stack.edge("gpt2", gen_assets["edge"], "edge1", "--token-interval", "0.05")
        stack.wait_workers("edge", 1)
        stack.edge("gpt2", gen_assets["edge"], "edge2", "--token-interval", "0.05")
        stack.wait_workers("edge", 2)
        with Client(stack.address, timeout=WAIT) as client:
            stream = client.stream("gpt2", PROMPT_A, max_new_tokens=n, priority=0,
                                   options={"handoff": False})  # fmt: skip
            pieces: list[Piece] = []
            for piece in stream:
                pieces.append(piece)
                if len(pieces) == 5:
                    os.killpg(first.pid, signal.SIGSTOP)
                    try:
                        # The coordinator drops the silent agent and re-routes the generation.
                        stack.wait_for(lambda s: edge_count(s) == 1, "edge1 dropped", WAIT)
                    finally:
                        os.killpg(first.pid, signal.SIGCONT)
            result = stream.result
        # The agent that came back registers again (having abandoned its dispatch).
        stack.wait_workers("edge", 2)
    assert result is not None
    tokens = [int(t) for p in pieces for t in p.tokens]
    assert [p.seq for p in pieces] == list(range(n))
    assert len(tokens) == n and result.output.tolist() == tokens
    assert tokens == edge_greedy(gen_assets["edge"], PROMPT_A, n)
    segments = result.served_by["segments"]
    assert [s["worker"] for s in segments][:2] == ["edge1", "edge2"]
    assert sum(s["tokens"] for s in segments) == n


# -- a rogue worker, duplicate ids ---------------------------------------------------------------


class Peers:
    """A rogue worker and a raw client, both DEALERs on one coordinator; the rogue heartbeats
    while anything waits, so that liveness never drops it."""

    def __init__(self, address: str) -> None:
        ctx = zmq.Context.instance()
        self.rogue = ctx.socket(zmq.DEALER)
        self.client = ctx.socket(zmq.DEALER)
        for sock in (self.rogue, self.client):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
        self.inbox: dict[zmq.Socket[bytes], list[Message]] = {self.rogue: [], self.client: []}
        self.rogue_send(Ready(role=Role.EDGE, worker="rogue", models=["m"], capacity=1))

    def rogue_send(self, message: Message) -> None:
        self.rogue.send_multipart(encode(message))

    def rogue_raw(self, frames: list[Any]) -> None:
        self.rogue.send_multipart(frames)

    def request(self, rid: str, **options: Any) -> None:
        inputs = [np.asarray([[1, 2, 3]], dtype=np.int64)]
        self.client.send_multipart(encode(Request(id=rid, model="m", inputs=inputs,
                                                  priority=0, options=options)))  # fmt: skip

    def expect(self, sock: zmq.Socket[bytes], where: Callable[[Message], bool]) -> Message:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for i, message in enumerate(self.inbox[sock]):
                if where(message):
                    return self.inbox[sock].pop(i)
            self.rogue_send(Heartbeat(inflight=0))
            poller = zmq.Poller()
            poller.register(self.rogue, zmq.POLLIN)
            poller.register(self.client, zmq.POLLIN)
            for ready, _ in poller.poll(100):
                self.inbox[ready].append(decode(ready.recv_multipart()))
        raise AssertionError("nothing matching arrived")

    def dispatch(self) -> Dispatch:
        d = self.expect(self.rogue, lambda m: isinstance(m, Dispatch))
        assert isinstance(d, Dispatch)
        return d

    def reply(self, rid: str) -> Reply:
        r = self.expect(self.client, lambda m: isinstance(m, Reply) and m.id == rid)
        assert isinstance(r, Reply)
        return r

    def served_after(self, rid: str) -> None:
        """A follow-up request is dispatched to the rogue (its one slot is free) and, answered
        well, is OK."""
        self.request(rid)
        d = self.dispatch()
        self.rogue_send(Result(id=d.id, status=Status.OK, outputs=[np.ones(2, np.float32)]))
        assert self.reply(rid).status is Status.OK

    def close(self) -> None:
        self.rogue.close(0)
        self.client.close(0)


@pytest.fixture
def peers(stack: Stack) -> Iterator[Peers]:
    stack.coordinator()
    p = Peers(stack.address)
    stack.wait_workers("edge")
    yield p
    p.close()


def result_frames(dispatch_id: str, edit: Callable[[dict[str, Any], list[Any]], None]) -> list[Any]:
    """A RESULT for `dispatch_id`, its body and tensor frames edited by `edit`."""
    frames = list(encode(Result(id=dispatch_id, status=Status.OK,
                                outputs=[np.ones(2, np.float32)])))  # fmt: skip
    body = msgpack.unpackb(bytes(frames[2]))
    tensors = [bytes(f) for f in frames[3:]]
    edit(body, tensors)
    return [frames[0], frames[1], msgpack.packb(body), *tensors]


def unusable_results() -> dict[str, Callable[[dict[str, Any], list[Any]], None]]:
    def drop_frame(body: dict[str, Any], tensors: list[Any]) -> None:
        tensors.clear()

    def bad_dtype(body: dict[str, Any], tensors: list[Any]) -> None:
        body["tensors"][0]["dtype"] = "complex128"

    def bad_status(body: dict[str, Any], tensors: list[Any]) -> None:
        body["status"] = "MAYBE"

    def vast_but_empty(body: dict[str, Any], tensors: list[Any]) -> None:
        # Regression: the coordinator forwarded (2**63, 0) with its empty frame, and the
        # client's decode raised numpy's ValueError instead of getting an outcome.
        body["tensors"][0]["shape"] = [2**63, 0]
        tensors[0] = b""

    return {"frame count": drop_frame, "dtype": bad_dtype, "status": bad_status,
            "vast empty shape": vast_but_empty}  # fmt: skip


def test_unusable_results_fail_their_request_and_free_the_slot(stack: Stack, peers: Peers) -> None:
    sent = answered = 0
    for name, edit in unusable_results().items():
        peers.request(f"bad-{name}")
        sent += 1
        d = peers.dispatch()
        peers.rogue_raw(result_frames(d.id, edit))
        reply = peers.reply(f"bad-{name}")
        answered += 1
        assert reply.status is Status.FAILED and "unusable RESULT" in reply.error, reply.error
        peers.served_after(f"after-{name}")
        sent += 1
        answered += 1
    # A RESULT for an id never dispatched: the request the rogue holds ends FAILED.
    peers.request("unknown-id")
    sent += 1
    peers.dispatch()
    peers.rogue_send(Result(id="made-up", status=Status.OK, outputs=[np.ones(2, np.float32)]))
    reply = peers.reply("unknown-id")
    answered += 1
    assert reply.status is Status.FAILED and "never dispatched" in reply.error, reply.error
    peers.served_after("after-unknown")
    sent += 1
    answered += 1
    # A RESULT for another coordinator's dispatch is dropped (counted); the real one counts.
    peers.request("stale")
    sent += 1
    d = peers.dispatch()
    peers.rogue_send(Result(id="00000000.0.1", status=Status.OK, outputs=[np.zeros(2)]))
    peers.rogue_send(Result(id=d.id, status=Status.OK, outputs=[np.ones(2, np.float32)]))
    reply = peers.reply("stale")
    answered += 1
    assert reply.status is Status.OK and reply.outputs[0].tolist() == [1.0, 1.0]
    assert sent == answered
    status = stack.status()
    assert status["violations"] == len(unusable_results()) + 1 and status["superseded"] >= 1
    assert stack.procs["coordinator"].poll() is None


def test_partials_are_checked_against_the_request(stack: Stack, peers: Peers) -> None:
    # 8,388,608 tokens for a request of 1: the attempt fails, nothing reaches the client.
    peers.request("huge", max_new_tokens=1)
    d = peers.dispatch()
    big = np.zeros(8_388_608, dtype=np.int64)
    peers.rogue_send(Partial(id=d.id, seq=0, outputs=[big]))
    reply = peers.reply("huge")
    assert reply.status is Status.FAILED and "shape (1,)" in reply.error, reply.error
    assert not [m for m in peers.inbox[peers.client] if isinstance(m, Partial)]
    peers.served_after("after-huge")
    # One token over the budget: two relayed, then FAILED.
    peers.request("over", max_new_tokens=2)
    d = peers.dispatch()
    for seq in range(3):
        peers.rogue_send(Partial(id=d.id, seq=seq, outputs=[np.asarray([seq + 1], np.int64)]))
    reply = peers.reply("over")
    assert reply.status is Status.FAILED and "max_new_tokens (2)" in reply.error, reply.error
    relayed = [m for m in peers.inbox[peers.client] if isinstance(m, Partial) and m.id == "over"]
    assert [int(m.outputs[0][0]) for m in relayed] == [1, 2]
    peers.served_after("after-over")
    assert stack.status()["violations"] == 2


def test_a_duplicate_outstanding_id_is_refused(stack: Stack, peers: Peers) -> None:
    peers.request("dup")
    d = peers.dispatch()
    peers.request("dup")  # still outstanding on this connection
    refused = peers.reply("dup")
    assert refused.status is Status.BAD_REQUEST and "already outstanding" in refused.error
    peers.rogue_send(Result(id=d.id, status=Status.OK, outputs=[np.ones(2, np.float32)]))
    assert peers.reply("dup").status is Status.OK
    # Answered, the id is free again.
    peers.served_after("dup")


def test_a_worker_that_registers_again_with_a_result_in_flight_counts_once(
    stack: Stack, peers: Peers
) -> None:
    """The rogue registers again while it holds a dispatch, then sends the RESULT of that
    abandoned attempt (as an honest worker's RESULT can cross its own READY on the wire): the
    request is re-dispatched under a new attempt id, the old attempt's RESULT is dropped and
    counted, and the client gets exactly one REPLY, the new attempt's."""
    before = stack.status()["superseded"]
    peers.request("crossed")
    first = peers.dispatch()
    peers.rogue_send(Ready(role=Role.EDGE, worker="rogue", models=["m"], capacity=1))
    second = peers.dispatch()
    assert second.id != first.id
    assert second.id.rsplit(".", 1)[0] == first.id.rsplit(".", 1)[0]  # same epoch and key
    peers.rogue_send(Result(id=first.id, status=Status.OK, outputs=[np.full(2, 9, np.float32)]))
    peers.rogue_send(Result(id=second.id, status=Status.OK, outputs=[np.ones(2, np.float32)]))
    reply = peers.reply("crossed")
    assert reply.status is Status.OK and reply.outputs[0].tolist() == [1.0, 1.0]
    # The slot is free and nothing else for "crossed" arrives after the next request's reply.
    peers.served_after("after-crossed")
    assert not [m for m in peers.inbox[peers.client] if getattr(m, "id", None) == "crossed"]
    status = stack.status()
    assert status["superseded"] == before + 1 and status["violations"] == 0


# -- a slow reader -------------------------------------------------------------------------------


def test_a_slow_reader_gets_every_reply(stack: Stack, tiny_package: dict[str, Path]) -> None:
    """3,000 requests sent before reading any reply, through a receive queue of 10 messages:
    the coordinator's pipe to this client fills, and the replies wait for it there."""
    n = 3000
    stack.coordinator()
    stack.edge("gpt2", tiny_package["edge"], "edge", "--capacity", "2")
    stack.wait_workers("edge")
    x = np.load(tiny_package["input"])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 10)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stack.address)
    try:
        for i in range(n):
            sock.send_multipart(encode(Request(id=f"r{i}", model="gpt2", inputs=[x],
                                               priority=i % 3)))  # fmt: skip

        def answered(s: dict[str, Any]) -> bool:
            return sum(r["count"] for r in s["requests"]) >= n

        status = stack.wait_for(answered, f"{n} requests answered", timeout=600)
        assert status["client_backlog"] > 0  # the pipe was full: replies waited for the reader
        statuses: Counter[str] = Counter()
        ids: list[str] = []
        while len(ids) < n:
            assert sock.poll(int(WAIT * 1000)), f"{len(ids)} of {n} replies arrived"
            try:
                reply = decode(sock.recv_multipart())
            except ProtocolError as exc:  # pragma: no cover - would be a bug
                raise AssertionError(exc) from exc
            assert isinstance(reply, Reply)
            ids.append(reply.id)
            statuses[reply.status.value] += 1
            if reply.status is Status.REJECTED:  # the documented back-pressure outcome
                assert "read" in reply.error
            else:
                assert reply.status is Status.OK
        assert sorted(ids) == sorted(f"r{i}" for i in range(n))  # each exactly once
        assert sum(statuses.values()) == n
        assert stack.status()["client_backlog"] == 0
    finally:
        sock.close(0)


def test_a_client_over_its_backlog_bound_gets_rejected_replies_not_silence() -> None:
    """A coordinator with a 64 KiB backlog bound and a client that reads nothing until every
    request is answered: past its pipe (1,000 messages) the replies wait in the backlog, those
    over the bound are REJECTED without outputs, its new REQUESTs are REJECTED while it
    overflows, and every request still has exactly one REPLY."""
    from tests.edge.test_coordinator import Harness

    n, size = 1600, 1024  # 4 KiB of float32 per reply
    # One client queues them all (client_queue_limit), on the largest worker READY allows.
    h = Harness(client_backlog_bytes=64 * 1024, client_queue_limit=n)
    try:
        worker = h.worker(Role.EDGE, capacity=1024)
        client = h.ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.RCVHWM, 1)
        client.setsockopt(zmq.LINGER, 0)
        client.connect(h.endpoint)
        inputs = [np.arange(4, dtype=np.float32)]
        for i in range(n):
            client.send_multipart(encode(Request(id=f"r{i}", model="m", inputs=inputs)))

        def answer(timeout: float) -> int:
            dispatches = [m for m in worker.drain(timeout) if isinstance(m, Dispatch)]
            for d in dispatches:
                worker.send(Result(id=d.id, status=Status.OK, outputs=[np.ones(size, np.float32)]))
            return len(dispatches)

        answered, deadline = 0, time.monotonic() + WAIT
        while h.coord.pending or answered < n:
            assert time.monotonic() < deadline, f"{answered} of {n} answered"
            h.pump(200)
            answered += answer(0.01)
        assert h.coord._overflowing  # the backlog passed its bound
        client.send_multipart(encode(Request(id="late", model="m", inputs=inputs)))
        h.pump()
        replies: list[Reply] = []
        deadline = time.monotonic() + WAIT
        while len(replies) < n + 1:
            assert time.monotonic() < deadline, f"{len(replies)} of {n + 1} replies arrived"
            h.coord.flush_clients(h.clock.now)
            h.pump(1)
            answer(0.0)
            while client.poll(10):
                reply = decode(client.recv_multipart())
                assert isinstance(reply, Reply)
                replies.append(reply)
        by_id = {r.id: r for r in replies}
        assert len(by_id) == len(replies) == n + 1  # one REPLY each, none twice
        assert by_id["late"].status is Status.REJECTED and "back-pressure" in by_id["late"].error
        rejected = [r for r in replies if r.status is Status.REJECTED and r.id != "late"]
        assert rejected, "some replies went over the bound"
        for r in rejected:
            assert r.outputs == [] and "did not read its replies" in r.error
        for r in replies:
            assert r.status in (Status.OK, Status.REJECTED)
            if r.status is Status.OK:
                assert r.outputs[0].shape == (size,)
        assert not h.coord._outbox and not h.coord._overflowing
    finally:
        h.close()
