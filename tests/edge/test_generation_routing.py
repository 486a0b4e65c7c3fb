"""Streaming and mid-generation handoff at the coordinator, step by step on loopback sockets.

The edge and cloud are raw DEALERs speaking CCD/1, so every assertion is about what crosses the
wire: the client sees each token once, numbered without gaps; the edge is cancelled; the cloud
gets the prompt plus the tokens so far and only the tokens still due; one final REPLY.
"""

from __future__ import annotations

import numpy as np

from cicada.common.protocol import (
    Cancel,
    Dispatch,
    Heartbeat,
    Partial,
    Reply,
    Request,
    Result,
    Role,
    Status,
    WorkerState,
)
from tests.edge.test_coordinator import Harness, Peer

PROMPT = np.asarray([[5, 6, 7]], dtype=np.int64)


def generation(rid: str, n: int, **options: object) -> Request:
    return Request(id=rid, model="m", inputs=[PROMPT], priority=1, timeout_ms=60_000,
                   options={"max_new_tokens": n, **options})  # fmt: skip


def token(dispatch_id: str, seq: int, value: int) -> Partial:
    return Partial(id=dispatch_id, seq=seq, outputs=[np.asarray([value], dtype=np.int64)])


def next_dispatch(peer: Peer) -> Dispatch:
    for message in peer.drain():
        if isinstance(message, Dispatch):
            return message
    raise AssertionError("no DISPATCH arrived")


def client_messages(client: Peer) -> list[Partial | Reply]:
    return [m for m in client.drain() if isinstance(m, Partial | Reply)]


def test_tokens_are_relayed_in_order_and_the_reply_carries_them_all(h: Harness) -> None:
    edge = h.worker(Role.EDGE)
    client = h.peer()
    client.send(generation("g1", 3))
    h.pump()
    d = next_dispatch(edge)
    assert d.options["max_new_tokens"] == 3
    for seq, value in enumerate([11, 12, 13]):
        edge.send(token(d.id, seq, value))
    edge.send(Result(id=d.id, status=Status.OK, outputs=[np.asarray([11, 12, 13])]))
    h.pump()
    got = client_messages(client)
    assert [type(m) for m in got] == [Partial, Partial, Partial, Reply]
    pieces = [m for m in got if isinstance(m, Partial)]
    assert [p.seq for p in pieces] == [0, 1, 2]
    assert [int(p.outputs[0][0]) for p in pieces] == [11, 12, 13]
    assert all(p.id == "g1" and p.served_by["role"] == "edge" for p in pieces)
    reply = got[-1]
    assert isinstance(reply, Reply) and reply.status is Status.OK
    assert reply.outputs[0].tolist() == [11, 12, 13]
    assert reply.served_by["segments"] == [
        {"role": "edge", "worker": reply.served_by["worker"], "variant": "edge-v", "tokens": 3}
    ]


def test_generation_moves_to_the_cloud_once_it_is_ready(h: Harness) -> None:
    edge = h.worker(Role.EDGE)
    cloud = h.worker(Role.CLOUD, state=WorkerState.LOADING, eta_s=30.0)
    client = h.peer()
    client.send(generation("g2", 6))
    h.pump()
    d_edge = next_dispatch(edge)  # the cloud is 30 s away: the edge starts
    edge.send(token(d_edge.id, 0, 21))
    edge.send(token(d_edge.id, 1, 22))
    h.pump()
    assert not [m for m in cloud.drain() if isinstance(m, Dispatch)]

    cloud.send(Heartbeat(state=WorkerState.READY, resident_stages=4, total_stages=4))
    h.pump()
    cancels = [m for m in edge.drain() if isinstance(m, Cancel)]
    assert [c.id for c in cancels] == [d_edge.id]
    d_cloud = next_dispatch(cloud)
    assert d_cloud.inputs[0].tolist() == [[5, 6, 7, 21, 22]]  # prompt + tokens so far
    assert d_cloud.options["max_new_tokens"] == 4  # only what is still due

    # The edge's late token and its RESULT are dropped; the cloud finishes the request.
    edge.send(token(d_edge.id, 2, 99))
    edge.send(Result(id=d_edge.id, status=Status.OK, outputs=[np.asarray([21, 22, 99])]))
    for seq, value in enumerate([31, 32, 33, 34]):
        cloud.send(token(d_cloud.id, seq, value))
    cloud.send(Result(id=d_cloud.id, status=Status.OK, outputs=[np.asarray([31, 32, 33, 34])]))
    h.pump()
    got = client_messages(client)
    pieces = [m for m in got if isinstance(m, Partial)]
    replies = [m for m in got if isinstance(m, Reply)]
    assert [p.seq for p in pieces] == [0, 1, 2, 3, 4, 5]
    assert [int(p.outputs[0][0]) for p in pieces] == [21, 22, 31, 32, 33, 34]
    assert [p.served_by["role"] for p in pieces] == ["edge"] * 2 + ["cloud"] * 4
    assert len(replies) == 1 and replies[0].status is Status.OK
    assert replies[0].outputs[0].tolist() == [21, 22, 31, 32, 33, 34]
    assert [(s["role"], s["tokens"]) for s in replies[0].served_by["segments"]] == [
        ("edge", 2), ("cloud", 4)
    ]  # fmt: skip
    assert replies[0].served_by["role"] == "cloud"
    # The edge held its slot until its RESULT for the cancelled dispatch came back.
    assert all(not w.inflight for w in h.coord.workers.values())
    assert not h.coord.pending


def test_a_request_can_stay_on_the_edge(h: Harness) -> None:
    edge = h.worker(Role.EDGE)
    cloud = h.worker(Role.CLOUD, state=WorkerState.LOADING, eta_s=30.0)
    client = h.peer()
    client.send(generation("g4", 5, handoff=False))
    h.pump()
    d = next_dispatch(edge)
    edge.send(token(d.id, 0, 1))
    cloud.send(Heartbeat(state=WorkerState.READY, resident_stages=4, total_stages=4))
    h.pump()
    assert not [m for m in edge.drain() if isinstance(m, Cancel)]
    assert not [m for m in cloud.drain() if isinstance(m, Dispatch)]


def test_a_dead_edge_mid_generation_is_continued_elsewhere(h: Harness) -> None:
    edge = h.worker(Role.EDGE)
    client = h.peer()
    client.send(generation("g5", 4))
    h.pump()
    d = next_dispatch(edge)
    edge.send(token(d.id, 0, 41))
    h.pump()
    h.coord.remove_worker(next(iter(h.coord.workers)), h.clock.now, reason="test: gone")
    other = h.worker(Role.EDGE)
    h.pump()
    d2 = next_dispatch(other)
    assert d2.inputs[0].tolist() == [[5, 6, 7, 41]] and d2.options["max_new_tokens"] == 3
    for seq, value in enumerate([42, 43, 44]):
        other.send(token(d2.id, seq, value))
    other.send(Result(id=d2.id, status=Status.OK))
    h.pump()
    got = client_messages(client)
    assert [int(m.outputs[0][0]) for m in got if isinstance(m, Partial)] == [41, 42, 43, 44]
    reply = got[-1]
    assert isinstance(reply, Reply) and reply.outputs[0].tolist() == [41, 42, 43, 44]


def test_a_malformed_generation_partial_fails_its_attempt_and_serving_goes_on(h: Harness) -> None:
    """A PARTIAL the request cannot take (not one int64 token) ends the attempt FAILED at once,
    naming the problem; the worker's slot is free for the next generation."""
    edge = h.worker(Role.EDGE)
    client = h.peer()
    client.send(generation("g6", 1))
    h.pump()
    d = next_dispatch(edge)
    edge.send(Partial(id=d.id, seq=0, outputs=[np.asarray([1.5], dtype=np.float32)]))
    edge.send(token(d.id, 1, 7))  # (the attempt is over: dropped)
    edge.send(Result(id=d.id, status=Status.OK))
    h.pump()
    got = client_messages(client)
    assert [m for m in got if isinstance(m, Partial)] == []
    assert isinstance(got[-1], Reply) and got[-1].status is Status.FAILED
    assert "int64" in got[-1].error
    assert all(not w.inflight for w in h.coord.workers.values())
    client.send(generation("g7", 1))
    h.pump()
    d = next_dispatch(edge)
    edge.send(token(d.id, 0, 7))
    edge.send(Result(id=d.id, status=Status.OK))
    h.pump()
    got = client_messages(client)
    assert isinstance(got[-1], Reply) and got[-1].outputs[0].tolist() == [7]


BAD_OPTIONS: list[dict[str, object]] = [
    {"max_new_tokens": "many"}, {"max_new_tokens": [3]}, {"max_new_tokens": 0},
    {"max_new_tokens": 4, "eos_token_id": "x"}, {"max_new_tokens": 4, "handoff": "no"},
]  # fmt: skip


def test_bad_generation_options_are_refused_at_the_door(h: Harness) -> None:
    """The coordinator reads a generation's options itself (to track and continue it): bad
    ones are BAD_REQUEST before any worker sees them, and it keeps serving."""
    edge = h.worker(Role.EDGE)
    client = h.peer()
    for i, options in enumerate(BAD_OPTIONS):
        client.send(Request(id=f"bad{i}", model="m", inputs=[PROMPT], options=options))
    h.pump()
    replies = client_messages(client)
    assert [(r.id, r.status) for r in replies] == [
        (f"bad{i}", Status.BAD_REQUEST) for i in range(len(BAD_OPTIONS))
    ]
    assert not [m for m in edge.drain() if isinstance(m, Dispatch)]
    client.send(generation("good", 1))
    h.pump()
    assert next_dispatch(edge).options["max_new_tokens"] == 1
