"""Exact generations at the coordinator (docs/PROTOCOL.md section 12), on loopback sockets.

The edge and cloud are raw DEALERs speaking CCD/1: the edge's tokens reach the client marked
provisional with their positions; the takeover sends the cloud the original prompt and the
tokens as a draft; the cloud's verdict becomes one rewind event, its tokens follow final, and
the REPLY says how many edge tokens were kept. A worker that breaks the verdict rules fails its
attempt, and a draft only ever holds its own request's tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from cicada.common.protocol import (
    Cancel,
    Dispatch,
    Heartbeat,
    Partial,
    Reply,
    Result,
    Role,
    Status,
    WorkerState,
)
from tests.edge.test_coordinator import Harness, Peer
from tests.edge.test_generation_routing import (
    PROMPT,
    client_messages,
    generation,
    next_dispatch,
    token,
)


def verdict(dispatch_id: str, accepted: int) -> Partial:
    return Partial(id=dispatch_id, seq=0, accepted=accepted)


Started = tuple[Peer, Peer, Peer, str]


def started_on_the_edge(h: Harness, rid: str, n: int, tokens: list[int]) -> Started:
    """An exact generation of `n` running on the edge, which streamed `tokens`; the cloud is
    loading. Returns (edge, cloud, client, the edge's dispatch id)."""
    edge = h.worker(Role.EDGE)
    cloud = h.worker(Role.CLOUD, state=WorkerState.LOADING, eta_s=30.0)
    client = h.peer()
    client.send(generation(rid, n, exact=True))
    h.pump()
    d = next_dispatch(edge)
    assert d.options["exact"] is True and "draft" not in d.options
    for seq, value in enumerate(tokens):
        edge.send(token(d.id, seq, value))
    h.pump()
    return edge, cloud, client, d.id


def take_over(h: Harness, edge: Peer, cloud: Peer) -> Dispatch:
    cloud.send(Heartbeat(state=WorkerState.READY, resident_stages=4, total_stages=4))
    h.pump()
    assert [type(m) for m in edge.drain()].count(Cancel) == 1
    return next_dispatch(cloud)


def test_a_takeover_verifies_the_draft_and_rewinds_to_the_verdict(h: Harness) -> None:
    edge, cloud, client, d_edge = started_on_the_edge(h, "x1", 6, [21, 22, 23])
    shown = client_messages(client)
    assert [(p.position, p.provisional, p.rewind) for p in shown] == [
        (0, True, None), (1, True, None), (2, True, None)
    ]  # fmt: skip
    d = take_over(h, edge, cloud)
    # The original prompt, the tokens so far as the draft, the whole budget.
    assert d.inputs[0].tolist() == PROMPT.tolist()
    assert d.options["draft"] == [21, 22, 23] and d.options["max_new_tokens"] == 6
    edge.send(token(d_edge, 3, 24))  # the edge's late token: a superseded attempt's
    cloud.send(verdict(d.id, 1))
    for seq, value in enumerate([32, 33, 34, 35, 36], start=1):
        cloud.send(token(d.id, seq, value))
    cloud.send(Result(id=d.id, status=Status.OK, outputs=[np.asarray([32, 33, 34, 35, 36])]))
    h.pump()
    got = client_messages(client)
    pieces = [m for m in got if isinstance(m, Partial)]
    assert [p.seq for p in pieces] == [3, 4, 5, 6, 7, 8]
    rewind = pieces[0]
    assert (rewind.rewind, rewind.outputs, rewind.served_by["role"]) == (1, [], "cloud")
    assert [(p.position, p.provisional) for p in pieces[1:]] == [(i, False) for i in range(1, 6)]
    reply = got[-1]
    assert isinstance(reply, Reply) and reply.status is Status.OK
    assert reply.outputs[0].tolist() == [21, 32, 33, 34, 35, 36]
    assert reply.generation == {"exact": True, "kept": 1, "rewound": 2}
    segments = reply.served_by["segments"]
    assert [(s["role"], s["tokens"]) for s in segments] == [("edge", 1), ("cloud", 5)]
    assert segments[0]["verified_by"] == segments[1]["worker"]


def test_a_verdict_that_keeps_everything_still_rewinds(h: Harness) -> None:
    """The rewind is sent at every takeover: it tells the client its tokens are now final."""
    edge, cloud, client, _ = started_on_the_edge(h, "x2", 3, [5, 6])
    client.drain()
    d = take_over(h, edge, cloud)
    cloud.send(verdict(d.id, 2))
    cloud.send(token(d.id, 1, 7))
    cloud.send(Result(id=d.id, status=Status.OK, outputs=[np.asarray([7])]))
    h.pump()
    got = client_messages(client)
    assert [(m.rewind, m.position) for m in got if isinstance(m, Partial)] == [(2, 2), (None, 2)]
    reply = got[-1]
    assert isinstance(reply, Reply) and reply.outputs[0].tolist() == [5, 6, 7]
    assert reply.generation == {"exact": True, "kept": 2, "rewound": 0}


def test_an_exact_generation_the_edge_finishes_is_not_exact(h: Harness) -> None:
    edge = h.worker(Role.EDGE)
    client = h.peer()
    client.send(generation("x3", 2, exact=True))
    h.pump()
    d = next_dispatch(edge)
    edge.send(token(d.id, 0, 1))
    edge.send(token(d.id, 1, 2))
    edge.send(Result(id=d.id, status=Status.OK, outputs=[np.asarray([1, 2])]))
    h.pump()
    reply = client_messages(client)[-1]
    assert isinstance(reply, Reply) and reply.outputs[0].tolist() == [1, 2]
    assert reply.generation == {"exact": False, "kept": 2, "rewound": 0}
    # Without `exact`: no provisional flag and no generation field.
    client.send(generation("x4", 1))
    h.pump()
    d = next_dispatch(edge)
    edge.send(token(d.id, 0, 3))
    edge.send(Result(id=d.id, status=Status.OK))
    h.pump()
    got = client_messages(client)
    assert [(m.position, m.provisional) for m in got if isinstance(m, Partial)] == [(0, None)]
    assert isinstance(got[-1], Reply) and got[-1].generation is None


@pytest.mark.parametrize(
    "breach, why",
    [
        ([token("D", 0, 9)], "before the verdict"),
        ([verdict("D", 3)], "outside 0 ... 2"),
        ([Partial(id="D", seq=0, outputs=[np.asarray([1])], accepted=0)], "carries no tokens"),
    ],
)
def test_a_cloud_that_breaks_the_verdict_rules_fails_the_attempt(
    h: Harness, breach: list[Partial], why: str
) -> None:
    edge, cloud, client, _ = started_on_the_edge(h, "x5", 4, [1, 2])
    client.drain()
    d = take_over(h, edge, cloud)
    for message in breach:
        message.id = d.id
        cloud.send(message)
    h.pump()
    got = client_messages(client)
    assert not [m for m in got if isinstance(m, Partial)], "nothing of it reached the client"
    reply = got[-1]
    assert isinstance(reply, Reply) and reply.status is Status.FAILED and why in reply.error
    assert reply.generation == {"exact": False, "kept": 2, "rewound": 0}


def test_a_verdict_without_a_draft_fails_the_attempt(h: Harness) -> None:
    cloud = h.worker(Role.CLOUD)
    client = h.peer()
    client.send(generation("x6", 3, exact=True))
    h.pump()
    d = next_dispatch(cloud)  # ready at once: no draft, no verdict owed
    assert "draft" not in d.options
    cloud.send(verdict(d.id, 0))
    h.pump()
    reply = client_messages(client)[-1]
    assert isinstance(reply, Reply) and reply.status is Status.FAILED
    assert "verifies no draft" in reply.error


def test_each_draft_holds_its_own_requests_tokens(h: Harness) -> None:
    """Two exact generations on one edge, handed over one after the other: each cloud
    dispatch's draft is exactly what was relayed for that request."""
    edge = h.worker(Role.EDGE, capacity=2)
    cloud = h.worker(Role.CLOUD, state=WorkerState.LOADING, eta_s=30.0, capacity=2)
    client = h.peer()
    client.send(generation("a", 8, exact=True))
    client.send(generation("b", 8, exact=True))
    h.pump()
    dispatches = [m for m in edge.drain() if isinstance(m, Dispatch)]
    assert len(dispatches) == 2
    for i, d in enumerate(dispatches):
        for seq in range(3 + i):
            edge.send(token(d.id, seq, 10 * (i + 1) + seq))
    h.pump()
    cloud.send(Heartbeat(state=WorkerState.READY, resident_stages=4, total_stages=4))
    h.pump()
    drafts = sorted(m.options["draft"] for m in cloud.drain() if isinstance(m, Dispatch))
    assert drafts == [[10, 11, 12], [20, 21, 22, 23]]


@pytest.mark.parametrize(
    "options, why",
    [
        ({"exact": True}, "max_new_tokens"),
        ({"max_new_tokens": 3, "exact": "yes"}, "exact must be"),
        ({"max_new_tokens": 3, "exact": True, "draft": [1]}, "draft is set by the coordinator"),
        ({"draft": [1]}, "max_new_tokens"),
    ],
)
def test_exact_options_are_checked_at_the_door(
    h: Harness, options: dict[str, object], why: str
) -> None:
    from cicada.common.protocol import Request

    h.worker(Role.EDGE)
    client = h.peer()
    client.send(Request(id="bad", model="m", inputs=[PROMPT], options=options))
    h.pump()
    reply = client_messages(client)[-1]
    assert isinstance(reply, Reply) and reply.status is Status.BAD_REQUEST and why in reply.error
