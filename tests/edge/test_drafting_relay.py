"""Drafting after an exact takeover, at the coordinator (docs/PROTOCOL.md section 12), on
loopback sockets: the edge and cloud are raw DEALERs.

An edge and a cloud that both say `drafts: true` keep the edge's attempt as a drafting one:
its tokens go to the cloud attempt of the same request as TOKENS (never to the client), the
cloud's verdict and tokens go back to the edge as TOKENS, and the cloud's RESULT CANCELs the
drafting attempt. Drafts that are garbage end the drafting, never the generation; a peer
posing as the edge with another request's id is never forwarded; a lost edge leaves the cloud
alone; a lost cloud stops the drafting edge.
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
    Tokens,
    WorkerState,
)
from tests.edge.test_coordinator import Harness, Peer
from tests.edge.test_generation_routing import client_messages, generation, next_dispatch, token


def draft(dispatch_id: str, seq: int, position: int, value: int, dtype: str = "int64") -> Partial:
    return Partial(id=dispatch_id, seq=seq, outputs=[np.asarray([value], dtype=dtype)],
                   position=position)  # fmt: skip


def of(peer: Peer, kind: type) -> list:  # type: ignore[type-arg]
    return [m for m in peer.drain() if isinstance(m, kind)]


Drafting = tuple[Peer, Peer, Peer, str, Dispatch]


def drafting(h: Harness, rid: str, n: int, tokens: list[int], edge_drafts: bool = True,
             cloud_drafts: bool = True) -> Drafting:  # fmt: skip
    """An exact generation of `n` streamed `tokens` on the edge, then a ready cloud took it
    over. Returns (edge, cloud, client, the edge's dispatch id, the cloud's DISPATCH)."""
    edge = h.worker(Role.EDGE, drafts=edge_drafts or None)
    cloud = h.worker(Role.CLOUD, state=WorkerState.LOADING, eta_s=30.0,
                     drafts=cloud_drafts or None)  # fmt: skip
    client = h.peer()
    client.send(generation(rid, n, exact=True))
    h.pump()
    d_edge = next_dispatch(edge).id
    for seq, value in enumerate(tokens):
        edge.send(draft(d_edge, seq, seq, value))
    h.pump()
    client.drain()
    cloud.send(Heartbeat(state=WorkerState.READY, resident_stages=4, total_stages=4))
    h.pump()
    d_cloud = next_dispatch(cloud)
    assert d_cloud.options["draft"] == tokens
    return edge, cloud, client, d_edge, d_cloud


def test_drafts_go_to_the_cloud_and_what_stands_goes_back_to_the_edge(h: Harness) -> None:
    edge, cloud, client, d_edge, d = drafting(h, "r1", 8, [21, 22, 23])
    # No CANCEL: the edge's cue to draft is a TOKENS with nothing new standing.
    got = edge.drain()
    assert not any(isinstance(m, Cancel) for m in got)
    assert [(m.id, m.position, m.tokens) for m in got if isinstance(m, Tokens)] == [(d_edge, 0, [])]
    edge.send(draft(d_edge, 3, 3, 24))  # in flight at the takeover: a draft now
    h.pump()
    assert [(m.id, m.position, m.tokens) for m in of(cloud, Tokens)] == [(d.id, 3, [24])]
    assert client_messages(client) == [], "drafts never reach the client"
    cloud.send(Partial(id=d.id, seq=0, accepted=2))
    h.pump()
    assert [(m.id, m.position, m.tokens) for m in of(edge, Tokens)] == [(d_edge, 0, [21, 22])]
    cloud.send(token(d.id, 1, 33))
    h.pump()
    assert [(m.position, m.tokens) for m in of(edge, Tokens)] == [(2, [33])]
    edge.send(draft(d_edge, 4, 1, 22))  # a position that already stands: stale, dropped
    edge.send(draft(d_edge, 5, 3, 34))
    h.pump()
    assert [(m.position, m.tokens) for m in of(cloud, Tokens)] == [(3, [34])]
    for seq, value in enumerate([34, 35, 36, 37, 38], start=2):
        cloud.send(token(d.id, seq, value))
    cloud.send(Result(id=d.id, status=Status.OK, outputs=[np.asarray([33, 34, 35, 36, 37, 38])],
                      timings={"drafted": 2.0, "accepted": 1.0}))  # fmt: skip
    h.pump()
    got = client_messages(client)
    reply = got[-1]
    assert isinstance(reply, Reply) and reply.status is Status.OK
    assert reply.outputs[0].tolist() == [21, 22, 33, 34, 35, 36, 37, 38]
    assert reply.generation == {"exact": True, "kept": 2, "rewound": 1}
    assert reply.timings["worker_accepted"] == 1.0
    assert all(p.served_by["role"] == "cloud" for p in got if isinstance(p, Partial))
    # The cloud answered: the drafting attempt is CANCELled; its RESULT only frees the slot.
    assert [m.id for m in of(edge, Cancel)] == [d_edge]
    edge.send(Result(id=d_edge, status=Status.OK))
    h.pump()
    assert client_messages(client) == []


@pytest.mark.parametrize("edge_drafts, cloud_drafts", [(False, True), (True, False)])
def test_without_drafts_on_either_side_the_edge_is_cancelled(
    h: Harness, edge_drafts: bool, cloud_drafts: bool
) -> None:
    edge, cloud, client, d_edge, d = drafting(h, "r2", 4, [1], edge_drafts, cloud_drafts)
    got = edge.drain()
    assert [m.id for m in got if isinstance(m, Cancel)] == [d_edge]
    assert not any(isinstance(m, Tokens) for m in got)
    edge.send(draft(d_edge, 1, 1, 2))
    h.pump()
    assert of(cloud, Tokens) == []
    cloud.send(Partial(id=d.id, seq=0, accepted=1))
    for seq, value in enumerate([5, 6, 7], start=1):
        cloud.send(token(d.id, seq, value))
    cloud.send(Result(id=d.id, status=Status.OK, outputs=[np.asarray([5, 6, 7])]))
    h.pump()
    assert of(edge, Tokens) == []
    reply = client_messages(client)[-1]
    assert isinstance(reply, Reply) and reply.outputs[0].tolist() == [1, 5, 6, 7]


@pytest.mark.parametrize(
    "bad",
    [
        draft("?", 3, 3, 24, dtype="float32"),  # not int64
        draft("?", 3, 8, 24),  # position past max_new_tokens (8)
        draft("?", 3, 3, -1),  # not a token id
        Partial(id="?", seq=3, outputs=[np.asarray([1, 2], dtype=np.int64)], position=3),
        Partial(id="?", seq=3, outputs=[np.asarray([1], dtype=np.int64)]),  # no position
        Partial(id="?", seq=3, accepted=1),  # a verdict from the edge
    ],
)
def test_a_garbage_draft_ends_the_drafting_not_the_generation(h: Harness, bad: Partial) -> None:
    edge, cloud, client, d_edge, d = drafting(h, "r4", 8, [21])
    edge.drain()
    bad.id = d_edge
    edge.send(bad)
    h.pump()
    assert of(cloud, Tokens) == [], "never forwarded"
    assert [m.id for m in of(edge, Cancel)] == [d_edge], "the drafting attempt ends"
    edge.send(draft(d_edge, 4, 4, 25))  # after that, nothing it sends is a draft
    cloud.send(Partial(id=d.id, seq=0, accepted=1))
    h.pump()
    assert of(cloud, Tokens) == [] and of(edge, Tokens) == []
    for seq, value in enumerate(range(40, 47), start=1):
        cloud.send(token(d.id, seq, value))
    cloud.send(Result(id=d.id, status=Status.OK, outputs=[np.arange(40, 47)]))
    h.pump()
    reply = client_messages(client)[-1]
    assert isinstance(reply, Reply) and reply.status is Status.OK
    assert reply.outputs[0].tolist() == [21, *range(40, 47)]


def test_a_draft_from_anyone_but_the_drafting_edge_is_never_forwarded(h: Harness) -> None:
    edge, cloud, client, d_edge, d = drafting(h, "r5", 8, [21])
    rogue = h.worker(Role.EDGE, drafts=True)  # a registered agent that knows the id
    rogue.send(draft(d_edge, 0, 1, 66))
    stranger = h.peer()  # and a peer that never registered
    stranger.send(draft(d_edge, 0, 1, 67))
    h.pump()
    assert of(cloud, Tokens) == []
    edge.send(draft(d_edge, 1, 1, 69))  # the real one still drafts
    h.pump()
    assert [(m.id, m.tokens) for m in of(cloud, Tokens)] == [(d.id, [69])]
    assert client_messages(client) == []


def test_a_lost_edge_leaves_the_cloud_alone(h: Harness) -> None:
    edge, cloud, client, d_edge, d = drafting(h, "r7", 4, [21])
    edge.send(Heartbeat(state=WorkerState.DRAINING))
    edge.send(draft(d_edge, 1, 1, 22))
    h.pump()
    h.coord.remove_worker(h.coord.registry.named(edge_name(h, edge))[0], h.coord.clock(), "test")
    cloud.drain()
    cloud.send(Partial(id=d.id, seq=0, accepted=1))
    for seq, value in enumerate([7, 8, 9], start=1):
        cloud.send(token(d.id, seq, value))
    cloud.send(Result(id=d.id, status=Status.OK, outputs=[np.asarray([7, 8, 9])]))
    h.pump()
    reply = client_messages(client)[-1]
    assert isinstance(reply, Reply) and reply.outputs[0].tolist() == [21, 7, 8, 9]
    assert reply.generation == {"exact": True, "kept": 1, "rewound": 0}


def test_a_lost_cloud_stops_the_drafting_edge(h: Harness) -> None:
    edge, cloud, _client, d_edge, _d = drafting(h, "r8", 6, [21])
    edge.drain()
    cloud_id = h.coord.registry.named(edge_name(h, cloud))[0]
    h.coord.remove_worker(cloud_id, h.coord.clock(), "test")
    h.pump()
    assert [m.id for m in of(edge, Cancel)] == [d_edge], "the drafting attempt ends"
    edge.send(Result(id=d_edge, status=Status.OK))  # frees its slot; no outcome
    h.pump()
    # The generation is re-routed (only the edge is left): a new attempt, provisional again.
    again = next_dispatch(edge)
    assert again.id != d_edge and again.options["max_new_tokens"] == 5


def edge_name(h: Harness, peer: Peer) -> str:
    """The worker name `Harness.worker` registered `peer` under."""
    names = [w.name for w in h.coord.registry.workers.values() if w.name.endswith(str(id(peer)))]
    assert len(names) == 1
    return names[0]
