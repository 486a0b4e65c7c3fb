"""Nobody can take the coordinator down alone: attackers against real processes on loopback.

A `python -m cicada coordinator` and one `cicada edge` agent (capacity 1, the tiny GPT-2's ONNX
model) run as processes (cicada.testing.Stack); attackers are raw DEALER sockets speaking
CCD/1, the honest callers use the SDK. The promises checked (docs/PROTOCOL.md section 13):

* a client that floods thousands of deadline-less requests and leaves does not starve a
  second client: each of the second client's requests ends OK, and the flood's queued work
  is dropped once the coordinator finds the flooder gone (counted in its metrics, never run);
* beyond `max_client_queued_bytes` / `max_queued_bytes` big requests are REJECTED with a
  retry-after naming the cap, and the coordinator's resident memory stays within the cap;
* a request without a deadline gets `default_deadline_s`;
* a client not allowed priority 0 gets BAD_REQUEST naming `critical_clients`.

The edge agent's one slot is held, while a test sets up its queues, by a long generation
(`--token-interval`) that the test then CANCELs: when work starts is decided by the test, not
by timing. Every request sent is accounted for: an outcome its sender received, or the
coordinator's own count of what it answered or dropped. Waits are bounded; nothing here
asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import zmq

from cicada.client import AsyncClient, Client, InvokeResult
from cicada.common.protocol import Cancel, Message, Partial, Reply, Request, Status, decode, encode
from cicada.errors import BadRequest, ClientError
from cicada.testing import Stack

MODEL = "gpt2"
WAIT = 120.0  # a bound on every wait (a stuck coordinator fails the test, never hangs it)
FLOOD = 2000  # requests from the flooding client
HONEST = 30  # requests from the client that must not be starved
CLIENT_QUEUE_LIMIT = 512  # the default: half of the default queue_limit (1024)


class Raw:
    """A DEALER speaking CCD/1 directly: what an attacker (or a test) sends, unfiltered."""

    def __init__(self, ctx: zmq.Context[Any], address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(address)

    def send(self, message: Message) -> None:
        self.sock.send_multipart(encode(message))

    def recv(self, timeout: float = WAIT) -> Message:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"nothing received within {timeout} s")
        return decode(self.sock.recv_multipart())

    def replies(self, n: int) -> list[Reply]:
        out: list[Reply] = []
        while len(out) < n:
            message = self.recv()
            if isinstance(message, Reply):
                out.append(message)
        return out

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def start(stack: Stack, edge_dir: Path, **coordinator: Any) -> None:
    """A coordinator with `[coordinator]` settings from a config file, and one edge agent with
    one slot that streams a token a second (so that a generation holds the slot)."""
    lines = ["[coordinator]"]
    for name, value in coordinator.items():
        lines.append(f"{name} = {value!r}".replace("'", '"').replace("False", "false"))
    config = stack.work / "cicada.toml"
    config.write_text("\n".join(lines) + "\n")
    stack.coordinator("--config", str(config))
    stack.edge(MODEL, edge_dir, "edge", "--capacity", "1", "--token-interval", "1.0")
    stack.wait_workers("edge", 1, state="ready", timeout=WAIT)


def hold_the_slot(ctx: zmq.Context[Any], stack: Stack) -> Raw:
    """Occupy the edge agent's one slot with a long generation; returns once it runs."""
    holder = Raw(ctx, stack.address)
    prompt = np.arange(1, 5, dtype=np.int64)[None]
    holder.send(Request(id="hold", model=MODEL, inputs=[prompt], timeout_ms=int(WAIT * 1000),
                        options={"max_new_tokens": 50}))  # fmt: skip
    assert isinstance(holder.recv(), Partial)  # it is running: the slot is taken
    return holder


def release_the_slot(holder: Raw) -> None:
    """CANCEL the generation: the coordinator withdraws it (no REPLY) and frees the slot once
    the agent's RESULT for it comes back."""
    holder.send(Cancel(id="hold", reason="the test is set up"))
    holder.sock.close(linger=int(WAIT * 1000))  # (linger: the CANCEL is sent before it closes)


def depth(status: dict[str, Any], priority: int) -> int:
    return sum(q["depth"] for q in status["queues"] if q["priority"] == str(priority))


def answered(status: dict[str, Any], state: str | None = None) -> int:
    return sum(r["count"] for r in status["requests"] if state is None or r["status"] == state)


def ids(first: int) -> np.ndarray:
    return ((np.arange(16) * 7 + first) % 90 + 1).astype(np.int64)[None]


def test_a_flood_that_leaves_does_not_starve_the_next_client(
    stack: Stack, tiny_package: dict[str, Path], ctx: zmq.Context[Any]
) -> None:
    # A long default deadline: the flood's work ends because its client is gone, not by time.
    start(stack, tiny_package["edge"], default_deadline_s=600.0)
    holder = hold_the_slot(ctx, stack)

    # The flood: thousands of deadline-less requests, then the client goes away.
    flood = Raw(ctx, stack.address)
    x = ids(3)
    for i in range(FLOOD):
        flood.send(Request(id=f"flood-{i}", model=MODEL, inputs=[x]))  # no timeout_ms
    queued = CLIENT_QUEUE_LIMIT  # its share of the queue; the rest is REJECTED at once
    rejected = flood.replies(FLOOD - queued)
    assert all(r.status is Status.REJECTED for r in rejected)
    assert all("client_queue_limit" in r.error and r.retry_after_ms for r in rejected)
    stack.wait_for(lambda s: depth(s, 1) == queued, what="the flood queued", timeout=WAIT)
    flood.close()

    # The honest client queues behind it, all at once, while the slot is still held.
    outcomes: list[InvokeResult | ClientError] = []

    async def honest() -> None:
        client = AsyncClient(stack.address, timeout=WAIT + 30)
        try:
            calls = [client.invoke(MODEL, ids(i), deadline=WAIT) for i in range(HONEST)]
            for outcome in await asyncio.gather(*calls, return_exceptions=True):
                assert isinstance(outcome, InvokeResult | ClientError), repr(outcome)
                outcomes.append(outcome)
        finally:
            await client.aclose()

    thread = threading.Thread(target=asyncio.run, args=(honest(),))
    thread.start()
    try:
        stack.wait_for(lambda s: depth(s, 1) == queued + HONEST, what="both queued", timeout=WAIT)
        release_the_slot(holder)
    finally:
        thread.join(WAIT + 60)
    assert not thread.is_alive()

    # Every request of the honest client ends OK.
    assert len(outcomes) == HONEST
    assert [type(o).__name__ for o in outcomes] == ["InvokeResult"] * HONEST
    # The flood: at its turn one of its requests ran; its REPLY found no route (the client is
    # gone) and everything else it had queued was dropped, never run.
    status = stack.wait_for(
        lambda s: answered(s) + sum(s["dropped"].values()) == FLOOD + HONEST + 1,
        what="every request answered or dropped", timeout=WAIT,
    )  # fmt: skip
    assert status["dropped"] == {"client_gone": queued - 1, "cancelled": 1}
    assert answered(status, "REJECTED") == FLOOD - queued
    assert answered(status, "OK") == HONEST + 1
    assert depth(status, 1) == 0


MIB = 2**20
BIG = 40 * MIB  # over glibc's largest mmap threshold: freed memory goes back to the system
CLIENT_CAP, TOTAL_CAP = 2 * BIG, 5 * BIG + MIB  # (+ room for the slot holder's prompt)


def test_queued_bytes_are_capped_per_client_and_in_all(
    stack: Stack, tiny_package: dict[str, Path], ctx: zmq.Context[Any]
) -> None:
    start(stack, tiny_package["edge"], max_client_queued_bytes=CLIENT_CAP,
          max_queued_bytes=TOTAL_CAP)  # fmt: skip
    holder = hold_the_slot(ctx, stack)
    coordinator = psutil.Process(stack.procs["coordinator"].pid)
    before = coordinator.memory_info().rss

    big = np.zeros(BIG // 4, dtype=np.float32)  # not this model's input: the agent refuses it
    clients = [Raw(ctx, stack.address) for _ in range(4)]
    per_client = 3
    rejections: list[Reply] = []
    for c, client in enumerate(clients):
        for i in range(per_client):
            client.send(Request(id=f"big-{c}-{i}", model=MODEL, inputs=[big]))
        # Client 0 and 1: two fit their own cap, the third does not. Client 2: one fits what
        # is left of the coordinator's cap. Client 3: nothing fits.
        expected = {0: 1, 1: 1, 2: 2, 3: 3}[c]
        rejections += client.replies(expected)
    assert all(r.status is Status.REJECTED and r.retry_after_ms for r in rejections)
    by_cap = [r.error for r in rejections]
    assert sum("max_client_queued_bytes (80 MiB)" in e for e in by_cap) == 2, by_cap
    assert sum("max_queued_bytes (201 MiB)" in e for e in by_cap) == 5, by_cap

    # 12 x 40 MiB were sent; the coordinator holds 5 of them (its cap), no more.
    held = coordinator.memory_info().rss - before
    assert held <= TOTAL_CAP + 64 * MIB, f"coordinator grew by {held / MIB:.0f} MiB"

    # The admitted ones run once the slot is free: the agent refuses their inputs.
    release_the_slot(holder)
    admitted = {0: 2, 1: 2, 2: 1, 3: 0}
    for c, client in enumerate(clients):
        for reply in client.replies(admitted[c]):
            assert reply.status is Status.BAD_REQUEST, reply
        client.close()
    sent = len(clients) * per_client
    stack.wait_for(lambda s: answered(s) >= sent, what="every big request answered")
    assert answered(stack.status()) == sent


def test_default_deadline_and_priority_zero_for_the_allowed_only(
    stack: Stack, tiny_package: dict[str, Path], ctx: zmq.Context[Any]
) -> None:
    start(stack, tiny_package["edge"], default_deadline_s=1.0, allow_critical=False)
    holder = hold_the_slot(ctx, stack)

    # No timeout_ms: the default deadline passes while it waits behind the held slot.
    patient = Raw(ctx, stack.address)
    patient.send(Request(id="no-deadline", model=MODEL, inputs=[ids(1)]))
    (reply,) = patient.replies(1)
    assert reply.status is Status.TIMEOUT and "while queued" in reply.error
    patient.close()
    release_the_slot(holder)

    # Priority 0 is not for this client (allow_critical = false, no critical_clients).
    with Client(stack.address, timeout=WAIT) as client:
        with pytest.raises(BadRequest, match="critical_clients"):
            client.invoke(MODEL, ids(2), priority=0, deadline=WAIT)
        ok = client.invoke(MODEL, ids(2), priority=1, deadline=WAIT)
        assert isinstance(ok, InvokeResult)
    status = stack.wait_for(lambda s: answered(s) >= 3, what="three answered")
    assert answered(status) == 3  # TIMEOUT, BAD_REQUEST, OK: one each
    assert status["dropped"] == {"cancelled": 1}  # the slot holder


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")
def test_priority_zero_by_curve_key(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    """With CURVE, priority 0 is for the keys in critical_clients: told apart by the key the
    coordinator's ZAP handler accepted (a coordinator on a real loop, in this process)."""
    import zmq.auth

    from cicada.common.protocol import Dispatch, Ready, Result, Role
    from cicada.edge.coordinator.access import WorkerKeys
    from cicada.edge.coordinator.broker import Coordinator, CoordinatorConfig

    allow = tmp_path / "allow"
    allow.mkdir()
    keys = {}
    for name in ("coordinator", "worker", "vip", "other"):
        public_file, secret_file = zmq.auth.create_certificates(str(tmp_path), name)
        keys[name] = zmq.auth.load_certificate(secret_file)
        if name in ("vip", "other"):  # client keys; the worker's is bound to edge for "m"
            shutil.copy(public_file, allow / f"{name}.key")
    node = Coordinator(CoordinatorConfig(
        bind="tcp://127.0.0.1:0", curve_secret_file=tmp_path / "coordinator.key_secret",
        curve_allow_dir=allow, allow_critical=False,
        worker_keys=[WorkerKeys.of("edge", ["m"], tmp_path / "worker.key")],
        critical_clients=frozenset({keys["vip"][0].decode()}),
    ))  # fmt: skip
    endpoint = node.bind()
    thread = threading.Thread(target=node.serve_forever, daemon=True)
    thread.start()

    def peer(name: str) -> Raw:
        raw = Raw.__new__(Raw)
        raw.sock = ctx.socket(zmq.DEALER)
        raw.sock.setsockopt(zmq.LINGER, 0)
        raw.sock.curve_publickey, raw.sock.curve_secretkey = keys[name]
        raw.sock.curve_serverkey = keys["coordinator"][0]
        raw.sock.connect(endpoint)
        return raw

    try:
        worker = peer("worker")
        worker.send(Ready(role=Role.EDGE, worker="w", models=["m"], capacity=4))
        worker.recv()  # the coordinator's greeting: registered
        x = np.zeros(4, np.float32)
        replies = {}
        for name in ("vip", "other"):
            client = peer(name)
            client.send(Request(id=name, model="m", inputs=[x], priority=0, timeout_ms=60_000))
            if name == "vip":
                dispatch = worker.recv()
                assert isinstance(dispatch, Dispatch)
                worker.send(Result(id=dispatch.id, status=Status.OK, outputs=[x]))
            (replies[name],) = client.replies(1)
            client.close()
        assert replies["vip"].status is Status.OK
        assert replies["other"].status is Status.BAD_REQUEST
        assert "critical_clients" in replies["other"].error
        worker.close()
    finally:
        node.stop()
        thread.join(10)
