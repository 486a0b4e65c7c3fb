"""Fuzzing a real coordinator process (`python -m cicada coordinator`) with an edge agent.

Thousands of malformed, oversized and mutated messages from raw DEALER sockets are
interleaved with valid requests from the SDK and from a raw socket. The coordinator must stay
up, answer every valid request exactly once with OK, answer BAD_REQUEST to malformed requests
whose id is readable, and count exactly the messages it dropped in
`cicada_malformed_messages_total` (docs/PROTOCOL.md, sections 5 and 9).

What the coordinator does with each message is predicted by an independent oracle: the
minimal codec of tests/security/wire.py, written from docs/PROTOCOL.md alone (never the
coordinator's own decoder). A message the document calls malformed, or a REPLY/DISPATCH (which
only the coordinator sends), is counted as malformed; a malformed REQUEST whose id the document
says is readable is answered BAD_REQUEST as well; HEARTBEAT, RESULT and PARTIAL from a stranger
draw DISCONNECT; a message that decodes as READY is not sent (it would register a fake worker
that takes real requests). Any exception from the oracle fails the test here, before the
message is sent.

At the end: regression tests for bugs this fuzzing found (one message killed the
coordinator; a peer that never reads stalled it; made-up model names grew the metrics), and
regression tests for the ones fixed since.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cicada.client import Client
from cicada.common.protocol import (
    MAX_TIMEOUT_MS,
    SIGNATURE,
    Command,
    Message,
    Reply,
    Request,
    Status,
    decode,
    encode,
)
from cicada.errors import BadRequest
from cicada.testing import Stack
from tests.security import wire

MODEL = "gpt2"
GARBAGE_SOCKETS = 3
MIN_GARBAGE = 3000
EXAMPLES = 230
BATCH = (14, 20)  # garbage messages per example: EXAMPLES * 14 > MIN_GARBAGE
BODY_LIMIT = 256 * 1024

Frames = list[bytes]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def x(tiny_package: dict[str, Path]) -> np.ndarray:
    return np.asarray(np.load(tiny_package["input"]))


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_package: dict[str, Path]
) -> Iterator[Stack]:
    # The default heartbeat (0.5 s): the edge agent must not be purged when this 2-core machine
    # is busy; the fuzzing is not about liveness.
    with Stack(tmp_path_factory.mktemp("fuzz-stack")) as s:
        s.coordinator()
        s.edge(MODEL, tiny_package["edge"])
        s.wait_workers("edge")
        yield s


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def dealer(ctx: zmq.Context[zmq.Socket[bytes]], address: str, **options: int) -> Any:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(address)
    return sock


def drain(sock: Any, wait_s: float = 0.0) -> list[Frames]:
    """Everything waiting on `sock` (after up to `wait_s` for the first message)."""
    out: list[Frames] = []
    if wait_s and not sock.poll(int(wait_s * 1000)):
        return out
    while True:
        try:
            out.append(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return out


# -- what the coordinator will do with a message ----------------------------------------------


def classify(frames: Frames) -> str:
    """What the document says the coordinator does with `frames` from a stranger (section 5 and
    7), by the document's own codec: `malformed` (dropped and counted), `bad` (malformed, its
    id readable: counted and answered BAD_REQUEST), `request` (answered), `result` (a late
    result, counted; draws DISCONNECT), `stranger` (a HEARTBEAT or PARTIAL: draws DISCONNECT),
    `cancel` (withdraws a request of the same peer: no REPLY for it), `other` (a DISCONNECT:
    ignored), `refused` (a signed READY that does not decode: counted, and refused with a
    DISCONNECT naming the field, section 4), or `skip` (a READY that decodes, or no frames at
    all: not sent; a mutation may drop every frame, and ZeroMQ has no empty message)."""
    if not frames:
        return "skip"
    try:
        message = wire.decode(frames)
    except wire.WireError:
        if wire.readable_id(frames) is not None:
            return "bad"
        signed_ready = len(frames) >= 3 and frames[:2] == [wire.SIGNATURE, bytes([wire.READY])]
        return "refused" if signed_ready else "malformed"
    return {
        wire.READY: "skip",
        wire.REPLY: "malformed",  # only the coordinator sends these
        wire.DISPATCH: "malformed",
        wire.REQUEST: "request",
        wire.RESULT: "result",
        wire.HEARTBEAT: "stranger",
        wire.PARTIAL: "stranger",
        wire.CANCEL: "cancel",
        wire.DISCONNECT: "other",
    }[message.command]


# -- garbage ----------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
# fmt: off
FIELDS = ["id", "model", "priority", "timeout_ms", "options", "status", "error", "seq", "role",
          "worker", "models", "state", "inflight", "load", "eta_s", "reason", "tensors"]
# fmt: on
commands = st.one_of(
    st.sampled_from([bytes([c]) for c in Command]),
    st.binary(min_size=1, max_size=1),
    st.binary(max_size=3),
)
specs = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["float32", "int64", "uint8", "bool", "complex64", ""])
        | st.text(max_size=4)
        | st.integers(-(2**63), 2**64 - 1),
        "shape": st.lists(st.integers(-2, 40), max_size=10) | scalars,
    },
)
small_arrays = st.builds(
    lambda dtype, n: np.arange(n).astype(dtype),
    st.sampled_from(["float32", "int64", "uint8", "bool", "float16"]),
    st.integers(0, 8),
)


def raw_garbage() -> st.SearchStrategy[Frames]:
    return st.lists(st.binary(max_size=48), min_size=1, max_size=6)


def signed_garbage() -> st.SearchStrategy[Frames]:
    return st.builds(
        lambda cmd, body, rest: [SIGNATURE, cmd, body, *rest],
        commands,
        st.binary(max_size=96),
        st.lists(st.binary(max_size=24), max_size=3),
    )


def structured_garbage() -> st.SearchStrategy[Frames]:
    def build(cmd: bytes, body: dict[str, Any], described: Any, rest: Frames) -> Frames:
        if described is not None:
            body = {**body, "tensors": described}
        return [SIGNATURE, cmd, msgpack.packb(body, use_bin_type=True), *rest]

    return st.builds(
        build,
        commands,
        st.dictionaries(st.sampled_from(FIELDS), values, max_size=8),
        st.none() | st.lists(specs | scalars, max_size=3),
        st.lists(st.binary(max_size=24), max_size=3),
    )


@st.composite
def valid_request_frames(draw: st.DrawFn, x: np.ndarray) -> Frames:
    inputs = draw(st.sampled_from([[x], []]) | st.lists(small_arrays, max_size=3))
    request = Request(
        draw(st.text(max_size=12)),
        draw(st.sampled_from([MODEL, "nobody"])),
        inputs,
        priority=draw(st.integers(-1, 3)),
        timeout_ms=draw(
            st.none()
            | st.integers(1, 60_000)
            | st.sampled_from([MAX_TIMEOUT_MS, MAX_TIMEOUT_MS + 1, 2**63 - 1, 2**64 - 1])
        ),
        options=draw(st.dictionaries(st.text(max_size=4), scalars, max_size=2)),
    )
    return [bytes(f) for f in encode(request)]


@st.composite
def mutated_request(draw: st.DrawFn, x: np.ndarray) -> Frames:
    frames = draw(valid_request_frames(x))
    for _ in range(draw(st.integers(1, 3))):
        if not frames:
            break
        i = draw(st.integers(0, len(frames) - 1))
        kind = draw(st.sampled_from(["flip", "body", "cut", "grow", "swap", "drop", "dup", "add"]))
        if kind == "body" and len(frames) > 2:
            i = 2
        if kind in ("flip", "body") and frames[i]:
            at = draw(st.integers(0, len(frames[i]) - 1))
            value = frames[i][at] ^ draw(st.integers(1, 255))
            frames[i] = frames[i][:at] + bytes([value]) + frames[i][at + 1 :]
        elif kind == "cut":
            frames[i] = frames[i][: draw(st.integers(0, max(0, len(frames[i]) - 1)))]
        elif kind == "grow":
            frames[i] += draw(st.binary(min_size=1, max_size=8))
        elif kind == "swap":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        elif kind == "drop":
            del frames[i]
        elif kind == "dup":
            frames.insert(i, frames[i])
        elif kind == "add":
            frames.insert(i, draw(st.binary(max_size=16)))
    return frames


def too_many_frames() -> st.SearchStrategy[Frames]:
    spec = {"dtype": "uint8", "shape": [1]}
    return st.integers(62, 90).map(
        lambda n: [SIGNATURE, b"\x01", msgpack.packb({"id": "m", "model": MODEL,
                                                     "tensors": [spec] * n}), *[b"\x00"] * n]
    )  # fmt: skip


def garbage(x: np.ndarray) -> st.SearchStrategy[Frames]:
    return st.one_of(
        raw_garbage(),
        signed_garbage(),
        structured_garbage(),
        mutated_request(x),
        too_many_frames(),
    )


# Malformed requests whose id stays readable: each breaks one thing, the body stays small.
DEFECTS: dict[str, Any] = {
    "extra frame": lambda body, frames: (body, [*frames, b"\x00"]),
    "missing frame": lambda body, frames: (body, frames[:-1]),
    "short frame": lambda body, frames: (body, [frames[0][:-1]]),
    "bad dtype": lambda body, frames: (
        {**body, "tensors": [{"dtype": "complex64", "shape": [1, 32]}]}, frames
    ),
    "negative dim": lambda body, frames: (
        {**body, "tensors": [{"dtype": "int64", "shape": [-1, -32]}]}, frames
    ),
    "9 dims": lambda body, frames: (
        {**body, "tensors": [{"dtype": "int64", "shape": [1, 32, 1, 1, 1, 1, 1, 1, 1]}]}, frames
    ),
    "model is an int": lambda body, frames: ({**body, "model": 5}, frames),
    "model missing": lambda body, frames: ({k: v for k, v in body.items() if k != "model"}, frames),
    "priority is a string": lambda body, frames: ({**body, "priority": "0"}, frames),
    "priority is a bool": lambda body, frames: ({**body, "priority": True}, frames),
    "timeout is a float": lambda body, frames: ({**body, "timeout_ms": 1.5}, frames),
    "options is a list": lambda body, frames: ({**body, "options": []}, frames),
    "tensors is a map": lambda body, frames: ({**body, "tensors": {}}, frames),
    "ext type": lambda body, frames: ({**body, "x": msgpack.ExtType(3, b"ext")}, frames),
    "too many frames": lambda body, frames: (body, [*frames, *[b""] * 70]),
    "priority 7": lambda body, frames: ({**body, "priority": 7}, frames),  # decodes; still bad
}  # fmt: skip


@st.composite
def bad_request(draw: st.DrawFn, x: np.ndarray, request_id: str) -> tuple[str, Frames]:
    frames = [bytes(f) for f in encode(Request(request_id, MODEL, [x], timeout_ms=30_000))]
    body = msgpack.unpackb(frames[2], raw=False)
    name = draw(st.sampled_from(sorted(DEFECTS)))
    body, tensors = DEFECTS[name](body, frames[3:])
    return name, [SIGNATURE, b"\x01", msgpack.packb(body, use_bin_type=True), *tensors]


def oversized_bodies() -> list[Frames]:
    """Bodies over the 256 KiB limit (with a readable id), and a huge map header."""
    out = []
    for extra in (1, 100, 64 * 1024, BODY_LIMIT):
        body = msgpack.packb({"id": "big", "model": MODEL, "pad": b"x" * (BODY_LIMIT + extra)})
        assert len(body) > BODY_LIMIT
        out.append([SIGNATURE, b"\x01", body])
        out.append([SIGNATURE, b"\x11", body])
    out.append([SIGNATURE, b"\x01", b"\xdf\xff\xff\xff\xff"])  # map32 of 2**32-1 pairs
    return out


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    garbage_replies: list[Frames] = field(default_factory=list)
    bad_ids: dict[str, str] = field(default_factory=dict)  # id -> defect
    bad_replies: dict[str, list[wire.Message]] = field(default_factory=lambda: defaultdict(list))
    valid_ids: set[str] = field(default_factory=set)
    valid_replies: dict[str, list[wire.Message]] = field(default_factory=lambda: defaultdict(list))
    bad_sent: Counter[str] = field(default_factory=Counter)
    sdk_calls: int = 0


def read_replies(frames_list: list[Frames], into: dict[str, list[wire.Message]]) -> None:
    for frames in frames_list:
        message = wire.decode(frames)  # the document's codec reads what the coordinator sent
        assert message.command == wire.REPLY, message
        into[message.body["id"]].append(message)


def garbage_answers(tally: Tally) -> list[wire.Message]:
    return [wire.decode(f) for f in tally.garbage_replies]


def most_replies(tally: Tally) -> int:
    """REPLYs the garbage sockets may hear: requests, readable bad ones, the sentinels."""
    return tally.sent["request"] + tally.sent["bad"] + GARBAGE_SOCKETS


def least_replies(tally: Tally) -> int:
    return most_replies(tally) - tally.sent["cancel"]


def metric(stack: Stack, name: str) -> int:
    return int(stack.status()[name])


def test_fuzzed_coordinator_stays_up_and_answers_exactly_once(
    stack: Stack, x: np.ndarray, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    coordinator = stack.procs["coordinator"]
    malformed0, late0 = metric(stack, "malformed"), metric(stack, "late_results")
    trash = [dealer(ctx, stack.address) for _ in range(GARBAGE_SOCKETS)]
    bad, valid = dealer(ctx, stack.address), dealer(ctx, stack.address)
    tally = Tally()
    client = Client(stack.address, timeout=30)

    def send_garbage(index: int, frames: Frames) -> None:
        kind = classify(frames)
        if kind == "skip":
            tally.skipped += 1
            return
        trash[index].send_multipart(frames)
        tally.sent[kind] += 1

    def collect() -> None:
        for sock in trash:
            tally.garbage_replies.extend(drain(sock))
        read_replies(drain(bad), tally.bad_replies)
        read_replies(drain(valid), tally.valid_replies)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        batch=st.lists(garbage(x), min_size=BATCH[0], max_size=BATCH[1]),
        index=st.integers(0, GARBAGE_SOCKETS - 1),
        bad_frames=st.data(),
    )
    def fuzz(batch: list[Frames], index: int, bad_frames: st.DataObject) -> None:
        n = len(tally.valid_ids)
        request_id = f"ok-{n}"
        valid.send_multipart(encode(Request(request_id, MODEL, [x], timeout_ms=30_000)))
        tally.valid_ids.add(request_id)
        for i, frames in enumerate(batch):
            send_garbage((index + i) % GARBAGE_SOCKETS, frames)
        bad_id = f"bad-{n}"
        defect, frames = bad_frames.draw(bad_request(x, bad_id))
        tally.bad_sent[classify(frames)] += 1
        bad.send_multipart(frames)
        tally.bad_ids[bad_id] = defect
        # An SDK call in the middle of it all: one OK reply, from the edge agent.
        result = client.invoke(MODEL, x, priority=n % 3)
        assert result.output.shape == (*x.shape, 97) and result.served_by["role"] == "edge"
        tally.sdk_calls += 1
        collect()

    try:
        for i, frames in enumerate(oversized_bodies()):
            send_garbage(i % GARBAGE_SOCKETS, frames)
        fuzz()
        # Sync: one request per socket after everything it sent; its reply means the
        # coordinator has handled all the rest (it reads each peer in order).
        for i, sock in enumerate([*trash, bad]):
            sock.send_multipart(encode(Request(f"sentinel-{i}", "__sentinel__", [])))
        sentinels = {f"sentinel-{i}" for i in range(len(trash) + 1)}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            collect()
            answers = garbage_answers(tally)
            seen = {m.body["id"] for m in answers if m.command == wire.REPLY}
            seen |= set(tally.bad_replies)
            replied = sum(m.command == wire.REPLY for m in answers)
            if (
                sentinels <= seen
                and tally.valid_ids <= set(tally.valid_replies)
                and replied >= least_replies(tally)
            ):
                break
            time.sleep(0.02)
        time.sleep(0.3)  # a duplicate reply would arrive in this time
        collect()
    finally:
        client.close()

    assert coordinator.poll() is None, stack.log("coordinator")
    assert "Traceback" not in stack.log("coordinator")
    summary = (
        f"garbage sent {dict(tally.sent)}, skipped {tally.skipped}; bad requests "
        f"{dict(tally.bad_sent)}; valid {len(tally.valid_ids)}; sdk calls {tally.sdk_calls}"
    )
    print(summary)
    assert tally.sent["malformed"] + tally.sent["bad"] >= MIN_GARBAGE, summary
    # Every valid request: exactly one reply, OK, with the model's output.
    assert set(tally.valid_replies) == tally.valid_ids, summary
    for request_id, replies in tally.valid_replies.items():
        assert len(replies) == 1, (request_id, replies)
        (reply,) = replies
        assert reply.body["status"] == "OK", reply
        assert reply.tensors[0].shape == [*x.shape, 97]
        assert reply.body["served_by"]["role"] == "edge"
    # Every malformed request with a readable id: exactly one BAD_REQUEST.
    unanswered = {i: d for i, d in tally.bad_ids.items() if i not in tally.bad_replies}
    assert not unanswered, unanswered
    assert set(tally.bad_replies) == {*tally.bad_ids, f"sentinel-{GARBAGE_SOCKETS}"}
    for request_id, defect in tally.bad_ids.items():
        replies = tally.bad_replies[request_id]
        statuses = [r.body["status"] for r in replies]
        assert statuses == ["BAD_REQUEST"], (request_id, defect, replies)
    # Garbage sockets hear well-formed REPLYs, one per request and per malformed request with
    # a readable id (fewer only by those their own CANCELs withdrew), and DISCONNECTs, one
    # per HEARTBEAT, RESULT or PARTIAL from a stranger: exactly.
    received = garbage_answers(tally)
    assert {m.command for m in received} <= {wire.REPLY, wire.DISCONNECT}, summary
    replies_heard = sum(m.command == wire.REPLY for m in received)
    assert least_replies(tally) <= replies_heard <= most_replies(tally), summary
    bad_heard = sum(m.command == wire.REPLY and m.body["status"] == "BAD_REQUEST" for m in received)
    assert bad_heard >= tally.sent["bad"] + GARBAGE_SOCKETS, summary  # (+ the sentinels)
    disconnects = sum(m.command == wire.DISCONNECT for m in received)
    assert disconnects == (
        tally.sent["result"] + tally.sent["stranger"] + tally.sent["refused"]
    ), summary
    # The counters, exactly: the garbage that does not decode (or is not for the
    # coordinator), readable or not, plus the bad requests that do not decode (`priority 7`
    # does: answered BAD_REQUEST without being counted as malformed).
    assert set(tally.bad_sent) <= {"bad", "request"}, tally.bad_sent
    expected = (
        tally.sent["malformed"] + tally.sent["bad"] + tally.sent["refused"] + tally.bad_sent["bad"]
    )
    assert metric(stack, "malformed") - malformed0 == expected, summary
    # Late results: every stranger's RESULT, plus at most one per garbage request that was
    # answered TIMEOUT (its deadline, drawn from 1 ms up, can pass while the edge agent runs it;
    # the agent's RESULT then arrives for a request already answered: counted, not forwarded).
    timed_out = sum(m.command == wire.REPLY and m.body["status"] == "TIMEOUT" for m in received)
    late = metric(stack, "late_results") - late0
    assert tally.sent["result"] <= late <= tally.sent["result"] + timed_out, (late, summary)
    assert stack.workers("edge") == 1
    with Client(stack.address, timeout=10) as after:
        assert after.invoke(MODEL, x).output.shape == (*x.shape, 97)


# -- bugs found here: regressions, and those still open ------------------------------------------


def _wait_reply(sock: Any, proc: Any, timeout_s: float) -> Message | None:
    """The first message on `sock`; None if none comes in time or the process has died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        got = drain(sock, wait_s=0.1)
        if got:
            return decode(got[0])
    return None


def test_unhashable_dtype_does_not_kill_the_coordinator(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Regression: a tensor dtype that is a list raised TypeError in decode, which the
    coordinator does not catch: one 4-frame message from any peer ended the process."""
    with Stack(tmp_path) as s:
        s.coordinator()
        sock = dealer(ctx, s.address)
        body = {"id": "poison", "model": MODEL, "tensors": [{"dtype": ["float32"], "shape": [1]}]}
        sock.send_multipart([SIGNATURE, b"\x01", msgpack.packb(body), b"\x00" * 4])
        reply = _wait_reply(sock, s.procs["coordinator"], 5.0)
        assert s.procs["coordinator"].poll() is None, s.log("coordinator")
        assert isinstance(reply, Reply) and reply.id == "poison"
        assert reply.status is Status.BAD_REQUEST


def test_huge_timeouts_do_not_kill_the_coordinator(
    tmp_path: Path,
    tiny_package: dict[str, Path],
    x: np.ndarray,
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """Regression: timeout_ms near 2**64 - 1 came back from the float round trip in the
    coordinator's DISPATCH as 2**64, msgpack raised OverflowError and the process died. Now
    such a budget is answered (decode refuses it: BAD_REQUEST) and the largest allowed one
    is served."""
    with Stack(tmp_path) as s:
        s.coordinator()
        s.edge(MODEL, tiny_package["edge"])
        s.wait_workers("edge")
        sock = dealer(ctx, s.address)
        sock.send_multipart(encode(Request("far", MODEL, [x], timeout_ms=2**64 - 1)))
        reply = _wait_reply(sock, s.procs["coordinator"], 10.0)
        assert isinstance(reply, Reply) and reply.id == "far", s.log("coordinator")
        assert reply.status in (Status.BAD_REQUEST, Status.OK)  # refused (now), or clamped
        sock.send_multipart(encode(Request("day", MODEL, [x], timeout_ms=MAX_TIMEOUT_MS)))
        reply = _wait_reply(sock, s.procs["coordinator"], 10.0)
        assert isinstance(reply, Reply) and reply.id == "day" and reply.status is Status.OK
        assert reply.outputs[0].shape == (*x.shape, 97)
        assert s.procs["coordinator"].poll() is None


def test_a_client_that_never_reads_does_not_stall_the_coordinator(
    tmp_path: Path, x: np.ndarray, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Regression: replies were sent blocking on a ROUTER_MANDATORY socket, so a peer whose
    pipe reached the high-water mark stalled the whole coordinator."""
    with Stack(tmp_path) as s:
        s.coordinator()
        slow = dealer(ctx, s.address, RCVHWM=1, RCVBUF=4096)
        pad = "i" * 60_000  # each UNAVAILABLE reply echoes the id: ~60 KB
        for i in range(3000):
            slow.send_multipart(encode(Request(f"{i}-{pad}", "nobody", [])))
        time.sleep(1.0)
        with Client(s.address, timeout=3) as client, pytest.raises(BadRequest):
            client.invoke("nobody", x)  # any reply at all proves it still serves others
        assert s.procs["coordinator"].poll() is None


def test_unknown_model_names_do_not_grow_the_metrics(
    stack: Stack, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Regression: every made-up model name (up to 64 KiB) became a new labelled series in
    cicada_requests_total, so any peer could grow the registry and /metrics without bound."""
    sock = dealer(ctx, stack.address)
    for i in range(300):
        sock.send_multipart(encode(Request(f"u{i}", f"made-up-{i}", [])))
    replies: list[Frames] = []
    deadline = time.monotonic() + 10
    while len(replies) < 300 and time.monotonic() < deadline:
        replies.extend(drain(sock, wait_s=0.5))
    assert len(replies) == 300
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
        text = response.read().decode()
    models = set(re.findall(r'^cicada_requests_total\{model="([^"]*)"', text, re.MULTILINE))
    assert not any(m.startswith("made-up-") for m in models), f"{len(models)} model labels"


@pytest.mark.parametrize("case", ["id of 5000 characters", "70 tensors described"])
def test_bad_request_is_answered_whenever_the_id_is_readable(
    stack: Stack, x: np.ndarray, ctx: zmq.Context[zmq.Socket[bytes]], case: str
) -> None:
    if case.startswith("id"):
        request_id, tensors = "r" * 5000, [x]
    else:
        request_id, tensors = "seventy", [np.zeros(1, np.uint8)] * 70
    frames = [bytes(f) for f in encode(Request(request_id, MODEL, tensors))]
    frames.append(b"\x00")  # one frame more than described: malformed
    sock = dealer(ctx, stack.address)
    sock.send_multipart(frames)
    reply = _wait_reply(sock, stack.procs["coordinator"], 3.0)
    assert isinstance(reply, Reply) and reply.id == request_id
    assert reply.status is Status.BAD_REQUEST
