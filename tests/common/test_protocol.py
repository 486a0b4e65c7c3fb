"""The CCD/1 wire protocol (docs/PROTOCOL.md, common/protocol.py): every message type round
trips with tensors of every wire dtype; `decode` rejects each kind of malformed message with
`ProtocolError`; `materialize=False` forwards tensor frames unchanged; and, property-based, any
frames at all (random bytes, random bodies, mutated valid messages) either decode to a
`Message` or raise `ProtocolError`, never another exception: that is what lets the
coordinator drop garbage and keep serving."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cicada.common.errors import CicadaError
from cicada.common.protocol import (
    DEFAULT_LIMITS,
    DTYPES,
    MAX_TIMEOUT_MS,
    MESSAGES,
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
    WorkerState,
    decode,
    encode,
)

Frames = list[bytes]
WIRE_DTYPES = sorted(DTYPES)  # float16 float32 float64 int8 int16 int32 int64 uint8 bool
TENSOR_MESSAGES: list[type[Message]] = [Request, Reply, Partial, Dispatch, Result]
PLAIN_MESSAGES: list[type[Message]] = [Ready, Heartbeat, Disconnect, Cancel]
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers ----------------------------------------------------------------------------------


def as_bytes(frames: Sequence[bytes | memoryview]) -> Frames:
    return [bytes(f) for f in frames]


def frames_of(command: int, body: Any, *tensors: bytes) -> Frames:
    return [SIGNATURE, bytes([command]), msgpack.packb(body, use_bin_type=True), *tensors]


def tensor_message(cls: type[Message], arrays: list[Any]) -> Message:
    """A message of a tensor-carrying type with every field set (optional ones included)."""
    if cls is Request:
        return Request(
            "req-1",
            "gpt2",
            arrays,
            priority=0,
            timeout_ms=1500,
            options={"temperature": 0.5, "stop": ["\n"], "raw": b"\x00\xff"},
        )
    if cls is Reply:
        return Reply(
            "req-1",
            Status.OK,
            arrays,
            error="",
            retry_after_ms=250,
            served_by={"role": "edge", "worker": "e1", "variant": "gpt2-edge-L1"},
            timings={"queue_s": 0.001, "compute_s": 2, "total_s": 0.5},
        )
    if cls is Partial:
        return Partial("req-1", 3, arrays, served_by={"role": "cloud"})
    if cls is Dispatch:
        return Dispatch("7f", "gpt2", arrays, timeout_ms=0, options={"k": {"nested": [1, None]}})
    if cls is Result:
        return Result(
            "7f", Status.FAILED, arrays, error="boom", timings={"compute_s": 0.25}, variant="fp16"
        )
    raise AssertionError(cls)


def plain_messages() -> list[Message]:
    return [
        Ready(Role.EDGE, "edge-1", ["gpt2", "bert"]),
        Ready(
            Role.CLOUD,
            "cloud-1",
            ["gpt2"],
            variant="full",
            capacity=4,
            state=WorkerState.LOADING,
            resident_stages=3,
            total_stages=12,
            eta_s=1.25,
            compute_s=0.02,
            phase="loading",
            phase_s=0.4,
            read_stages=7,
            read_bytes=7_000_000,
            total_bytes=12_000_000,
        ),
        Heartbeat(),
        Heartbeat(
            state=WorkerState.DRAINING,
            inflight=2,
            load=0.75,
            resident_stages=12,
            total_stages=12,
            eta_s=0,
            compute_s=0.5,
        ),
        Disconnect(),
        Disconnect(reason="draining"),
        Cancel(id="d1"),
        Cancel(id="d1", reason="handed to a cloud worker"),
    ]


def le_bytes(array: Any) -> bytes:
    """C-order, little-endian bytes of `array`: what the wire carries."""
    a = np.asarray(array)
    return a.astype(a.dtype.newbyteorder("<")).tobytes(order="C")


def assert_same_array(expected: Any, actual: Any) -> None:
    e = np.asarray(expected)
    assert isinstance(actual, np.ndarray)
    assert actual.dtype.name == e.dtype.name
    assert actual.dtype.byteorder in ("=", "<", "|")
    assert actual.shape == e.shape
    assert actual.tobytes() == le_bytes(e)  # bytes, so NaN payloads and -0.0 count too
    assert actual.flags.c_contiguous and actual.flags.writeable and actual.flags.owndata


def assert_same_message(expected: Message, actual: Message) -> None:
    assert type(actual) is type(expected)
    for f in fields(expected):
        want, got = getattr(expected, f.name), getattr(actual, f.name)
        if f.name == expected.tensor_field:
            assert len(got) == len(want)
            for w, g in zip(want, got, strict=True):
                assert_same_array(w, g)
        else:
            assert got == want, f.name
            if f.name in ("status", "role") or (f.name == "state" and want is not None):
                assert type(got) is type(want)  # decoded back to the enum


def sample_arrays(dtype: str) -> list[np.ndarray]:
    """Ordinary, 0-d, empty and non-contiguous arrays of one dtype (and a big-endian one)."""
    rng = np.random.default_rng(0)
    base = (rng.standard_normal((4, 6)) * 50).astype(dtype)
    arrays = [
        base,
        np.array(7, dtype=dtype),  # 0-d stays 0-d
        np.zeros((0,), dtype=dtype),
        np.zeros((3, 0, 2), dtype=dtype),
        base.T,  # non-contiguous: transposed
        base[::2, ::-3],  # strided, negative step
        np.asfortranarray(base),
        np.broadcast_to(base[:1], (3, 6)),  # zero stride, read-only
        base[1:3, 2],  # a 1-d view into the middle
    ]
    if np.dtype(dtype).itemsize > 1:
        arrays.append(base.astype(np.dtype(dtype).newbyteorder(">")))
    return arrays


def decode_or_reject(frames: Sequence[bytes | memoryview], **kwargs: Any) -> Message | None:
    """The key guarantee: a Message, or ProtocolError (None here). Anything else propagates."""
    try:
        message = decode(frames, **kwargs)
    except ProtocolError:
        return None
    assert isinstance(message, Message)
    assert type(message) in MESSAGES.values()
    return message


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
@pytest.mark.parametrize("cls", TENSOR_MESSAGES, ids=lambda c: c.__name__)
def test_tensor_messages_round_trip_every_dtype(cls: type[Message], dtype: str) -> None:
    arrays = sample_arrays(dtype)
    message = tensor_message(cls, arrays)
    frames = encode(message)
    assert frames[0] == SIGNATURE and frames[1] == bytes([cls.command])
    assert len(frames) == 3 + len(arrays)
    body = msgpack.unpackb(frames[2], raw=False)
    assert body["tensors"] == [{"dtype": dtype, "shape": list(a.shape)} for a in arrays]
    for a, frame in zip(arrays, frames[3:], strict=True):
        assert bytes(frame) == le_bytes(a)
    # As bytes (what a DEALER receives with copy=True) and as memoryviews (the coordinator).
    assert_same_message(message, decode(as_bytes(frames)))
    assert_same_message(message, decode([memoryview(f) for f in frames]))


def test_zero_dim_and_empty_keep_their_shape() -> None:
    out = decode(encode(Request("a", "m", [np.float32(1.5), np.zeros((2, 0), np.int64)])))
    assert isinstance(out, Request)
    assert out.inputs[0].shape == () and out.inputs[0] == np.float32(1.5)
    assert out.inputs[1].shape == (2, 0) and out.inputs[1].dtype == np.int64


def test_scalars_and_lists_are_accepted_as_inputs() -> None:
    out = decode(encode(Request("a", "m", [3, [1.0, 2.0], True])))  # type: ignore[list-item]
    assert isinstance(out, Request)
    assert [a.dtype.name for a in out.inputs] == ["int64", "float64", "bool"]
    assert out.inputs[1].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("message", plain_messages(), ids=lambda m: type(m).__name__)
def test_plain_messages_round_trip(message: Message) -> None:
    frames = encode(message)
    assert len(frames) == 3 and "tensors" not in msgpack.unpackb(frames[2], raw=False)
    assert_same_message(message, decode(as_bytes(frames)))


def test_every_command_has_a_message_type() -> None:
    assert set(MESSAGES) == set(Command)
    for command, cls in MESSAGES.items():
        assert cls.command is command


def test_unknown_fields_are_ignored() -> None:
    """Forward compatibility (section 4): receivers MUST ignore fields they do not know."""
    body = {"id": "a", "model": "m", "tensors": [], "future": {"x": [1, 2]}, "trace": "t"}
    message = decode(frames_of(Command.REQUEST, body))
    assert isinstance(message, Request) and message.id == "a"


def test_optional_fields_may_be_nil() -> None:
    body = {"id": "a", "model": "m", "priority": None, "timeout_ms": None, "options": None}
    message = decode(frames_of(Command.REQUEST, body))
    assert isinstance(message, Request)
    assert (message.priority, message.timeout_ms, message.options) == (1, None, {})


def test_numbers_accept_ints_where_floats_are_expected() -> None:
    body = {"role": "cloud", "worker": "w", "models": [], "eta_s": 2, "compute_s": 0}
    message = decode(frames_of(Command.READY, body))
    assert isinstance(message, Ready) and message.eta_s == 2 and message.compute_s == 0


@pytest.mark.parametrize("dtype", ["complex64", "uint16", "uint32", "uint64", "object", "U3"])
def test_encode_refuses_dtypes_that_cannot_travel(dtype: str) -> None:
    array = np.zeros(3, dtype=dtype)
    with pytest.raises(ProtocolError):
        encode(Request("a", "m", [array]))
    assert issubclass(ProtocolError, CicadaError)


# -- decode rejects malformed messages ---------------------------------------------------------

REQ = {"id": "r1", "model": "m"}
F32_2x3 = np.arange(6, dtype=np.float32).tobytes()


def spec_request(spec: Any, *tensors: bytes) -> Frames:
    return frames_of(Command.REQUEST, {**REQ, "tensors": [spec]}, *tensors)


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]


MALFORMED: dict[str, list[bytes]] = {
    # frame 0: signature and version
    "signature CCD2": [b"CCD2", b"\x01", msgpack.packb(REQ)],
    "signature lowercase": [b"ccd1", b"\x01", msgpack.packb(REQ)],
    "signature empty": [b"", b"\x01", msgpack.packb(REQ)],
    "signature too long": [b"CCD1\x00", b"\x01", msgpack.packb(REQ)],
    "identity in front": [b"\x00k\x8bEg", SIGNATURE, b"\x01", msgpack.packb(REQ)],
    # frame 1: command
    "command 0x00": [SIGNATURE, b"\x00", msgpack.packb(REQ)],
    "command 0x04": [SIGNATURE, b"\x04", msgpack.packb(REQ)],
    "command 0x13": [SIGNATURE, b"\x13", msgpack.packb({})],
    "command 0xff": [SIGNATURE, b"\xff", msgpack.packb(REQ)],
    "command of 2 bytes": [SIGNATURE, b"\x01\x01", msgpack.packb(REQ)],
    "command of 2 bytes, heartbeat": [SIGNATURE, b"\x11\x00", msgpack.packb({})],
    "command empty": [SIGNATURE, b"", msgpack.packb(REQ)],
    # frame count
    "no frames": [],
    "signature only": [SIGNATURE],
    "no body": [SIGNATURE, b"\x11"],
    "65 frames": frames_of(
        Command.REQUEST,
        {**REQ, "tensors": [{"dtype": "uint8", "shape": [1]}] * 62},
        *[b"\x00"] * 62,
    ),
    # frame 2: body
    "body empty": [SIGNATURE, b"\x11", b""],
    "body not msgpack": [SIGNATURE, b"\x11", b"\xc1"],
    "body truncated map": [SIGNATURE, b"\x01", msgpack.packb(REQ)[:-1]],
    "body with trailing bytes": [SIGNATURE, b"\x11", msgpack.packb({}) + b"\x00"],
    "body is a list": [SIGNATURE, b"\x11", msgpack.packb([1, 2])],
    "body is a string": [SIGNATURE, b"\x11", msgpack.packb("id")],
    "body is nil": [SIGNATURE, b"\x11", msgpack.packb(None)],
    "body is an int": [SIGNATURE, b"\x11", msgpack.packb(7)],
    "body is bin": [SIGNATURE, b"\x11", msgpack.packb(b"\x80", use_bin_type=True)],
    "body with int keys": [SIGNATURE, b"\x11", msgpack.packb({1: "a"})],
    "nested int keys": frames_of(Command.REQUEST, {**REQ, "options": {1: 2}}),
    "ext type field": frames_of(Command.REQUEST, {**REQ, "x": msgpack.ExtType(1, b"abc")}),
    "ext type body": [SIGNATURE, b"\x11", msgpack.packb(msgpack.ExtType(5, b""))],
    "timestamp ext": frames_of(Command.REQUEST, {**REQ, "options": {"t": msgpack.Timestamp(1)}}),
    "nested 100000 deep": [SIGNATURE, b"\x11", b"\x81\xa1x" + _nested(100_000)],
    "string over 64 KiB": frames_of(Command.REQUEST, {**REQ, "model": "m" * (64 * 1024 + 1)}),
    "array of 4097 items": frames_of(Command.REQUEST, {**REQ, "options": {"a": [0] * 4097}}),
    "map of 4097 items": frames_of(
        Command.REQUEST, {**REQ, "options": {str(i): 0 for i in range(4097)}}
    ),
    "array32 claiming 2**32-1 items": [SIGNATURE, b"\x11", b"\x81\xa1x\xdd\xff\xff\xff\xff"],
    # tensors
    "2 specs, 1 frame": frames_of(
        Command.REQUEST, {**REQ, "tensors": [{"dtype": "uint8", "shape": [1]}] * 2}, b"\x00"
    ),
    "0 specs, 1 frame": frames_of(Command.REQUEST, {**REQ, "tensors": []}, b"\x00"),
    "no specs, 1 frame": frames_of(Command.REQUEST, REQ, b"\x00"),
    "1 spec, 0 frames": frames_of(
        Command.REPLY, {"id": "a", "status": "OK", "tensors": [{"dtype": "uint8", "shape": []}]}
    ),
    "tensors is a map": frames_of(Command.REQUEST, {**REQ, "tensors": {}}),
    "tensors is nil with a frame": frames_of(Command.REQUEST, {**REQ, "tensors": None}, b"\x00"),
    "spec is a string": spec_request("float32", F32_2x3),
    "spec is a list": spec_request(["float32", [2, 3]], F32_2x3),
    "dtype complex64": spec_request({"dtype": "complex64", "shape": [2, 3]}, b"\x00" * 48),
    "dtype uint16": spec_request({"dtype": "uint16", "shape": [3]}, b"\x00" * 6),
    "dtype <f4": spec_request({"dtype": "<f4", "shape": [2, 3]}, F32_2x3),
    "dtype f": spec_request({"dtype": "f", "shape": [2, 3]}, F32_2x3),
    "dtype object": spec_request({"dtype": "object", "shape": [1]}, b"\x00" * 8),
    "dtype Float32": spec_request({"dtype": "Float32", "shape": [2, 3]}, F32_2x3),
    "dtype empty": spec_request({"dtype": "", "shape": [2, 3]}, F32_2x3),
    "dtype missing": spec_request({"shape": [2, 3]}, F32_2x3),
    "dtype nil": spec_request({"dtype": None, "shape": [2, 3]}, F32_2x3),
    "dtype int": spec_request({"dtype": 5, "shape": [2, 3]}, F32_2x3),
    "dtype bytes": spec_request({"dtype": b"float32", "shape": [2, 3]}, F32_2x3),
    "shape missing": spec_request({"dtype": "float32"}, F32_2x3),
    "shape nil": spec_request({"dtype": "float32", "shape": None}, F32_2x3),
    "shape is an int": spec_request({"dtype": "float32", "shape": 6}, F32_2x3),
    "shape is a map": spec_request({"dtype": "float32", "shape": {"0": 6}}, F32_2x3),
    "negative dim": spec_request({"dtype": "float32", "shape": [-1]}, b""),
    "negative dims cancel": spec_request({"dtype": "float32", "shape": [-2, -3]}, F32_2x3),
    "float dim": spec_request({"dtype": "float32", "shape": [2.5, 3]}, F32_2x3),
    "string dim": spec_request({"dtype": "float32", "shape": ["2", 3]}, F32_2x3),
    "bool dims": spec_request({"dtype": "uint8", "shape": [True, True]}, b"\x00"),
    "nil dim": spec_request({"dtype": "float32", "shape": [None]}, b""),
    "huge dim": spec_request({"dtype": "float32", "shape": [2**63 - 1]}, F32_2x3),
    "huge dims, 0 bytes": spec_request({"dtype": "uint8", "shape": [2**64 - 1] * 8}, b""),
    "huge dims times 0": spec_request({"dtype": "uint8", "shape": [2**64 - 1, 0]}, b"\x00"),
    "frame 1 byte short": spec_request({"dtype": "float32", "shape": [2, 3]}, F32_2x3[:-1]),
    "frame 1 byte long": spec_request({"dtype": "float32", "shape": [2, 3]}, F32_2x3 + b"\x00"),
    "frame a whole item long": spec_request({"dtype": "float32", "shape": [5]}, F32_2x3),
    "0-d without bytes": spec_request({"dtype": "int64", "shape": []}, b""),
    "empty with a byte": spec_request({"dtype": "int64", "shape": [0]}, b"\x00"),
    "9 dims": spec_request({"dtype": "uint8", "shape": [1] * 9}, b"\x00"),
    "second tensor bad": frames_of(
        Command.DISPATCH,
        {"id": "d", "model": "m", "tensors": [{"dtype": "uint8", "shape": [1]}] * 2},
        b"\x00",
        b"",
    ),
    # tensor frames on commands that carry none
    "ready with a frame": frames_of(
        Command.READY, {"role": "edge", "worker": "w", "models": []}, b"\x00"
    ),
    "heartbeat with a frame": frames_of(Command.HEARTBEAT, {}, b""),
    "disconnect with frames": frames_of(Command.DISCONNECT, {"tensors": []}, b"a", b"b"),
    "heartbeat with a described frame": frames_of(
        Command.HEARTBEAT, {"tensors": [{"dtype": "uint8", "shape": [1]}]}, b"\x00"
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_decode_rejects_malformed(name: str) -> None:
    frames = MALFORMED[name]
    with pytest.raises(ProtocolError):
        decode(frames)
    with pytest.raises(ProtocolError):  # forwarding (no copies) validates just the same
        decode([memoryview(f) for f in frames], materialize=False)


def test_frame_limit_boundary() -> None:
    spec = {"dtype": "uint8", "shape": [1]}
    ok = frames_of(Command.REQUEST, {**REQ, "tensors": [spec] * 61}, *[b"\x01"] * 61)
    assert len(ok) == DEFAULT_LIMITS.max_frames
    message = decode(ok)
    assert isinstance(message, Request) and len(message.inputs) == 61
    with pytest.raises(ProtocolError):
        decode(frames_of(Command.REQUEST, {**REQ, "tensors": [spec] * 62}, *[b"\x01"] * 62))


def _body_of_size(size: int) -> bytes:
    pad = 70_000  # bin32 either way, so the overhead is fixed
    overhead = len(msgpack.packb({**REQ, "pad": b"x" * pad}, use_bin_type=True)) - pad
    body = msgpack.packb({**REQ, "pad": b"x" * (size - overhead)}, use_bin_type=True)
    assert len(body) == size
    return body


def test_body_size_boundary() -> None:
    limit = DEFAULT_LIMITS.max_body_bytes
    message = decode([SIGNATURE, b"\x01", _body_of_size(limit)])
    assert isinstance(message, Request) and message.id == "r1"
    with pytest.raises(ProtocolError, match="exceeds"):
        decode([SIGNATURE, b"\x01", _body_of_size(limit + 1)])
    with pytest.raises(ProtocolError):
        decode([SIGNATURE, b"\x01", _body_of_size(2 * limit)])


def test_dims_limit_boundary() -> None:
    eight = decode(spec_request({"dtype": "uint8", "shape": [1] * 8}, b"\x07"))
    assert isinstance(eight, Request) and eight.inputs[0].shape == (1,) * 8
    with pytest.raises(ProtocolError):
        decode(spec_request({"dtype": "uint8", "shape": [1] * 9}, b"\x07"))


def test_tensor_and_message_limits() -> None:
    ok = spec_request({"dtype": "uint8", "shape": [16]}, b"\x00" * 16)
    limits = Limits(max_tensor_bytes=16, max_message_bytes=sum(map(len, ok)))
    assert isinstance(decode(ok, limits), Request)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(spec_request({"dtype": "uint8", "shape": [17]}, b"\x00" * 17), limits)
    spec = {"dtype": "uint8", "shape": [8]}
    two = frames_of(Command.REQUEST, {**REQ, "tensors": [spec] * 2}, *[b"\x00" * 8] * 2)
    assert sum(map(len, two)) > limits.max_message_bytes
    with pytest.raises(ProtocolError, match="size limit"):
        decode(two, limits)


# Base bodies that decode, one per command; each case below breaks exactly one field.
BASE: dict[Command, dict[str, Any]] = {
    Command.REQUEST: {"id": "r1", "model": "m", "tensors": []},
    Command.REPLY: {"id": "r1", "status": "OK", "tensors": []},
    Command.PARTIAL: {"id": "r1", "seq": 0, "tensors": []},
    Command.READY: {"role": "edge", "worker": "w", "models": ["m"]},
    Command.HEARTBEAT: {},
    Command.DISCONNECT: {},
    Command.DISPATCH: {"id": "d1", "model": "m", "tensors": []},
    Command.RESULT: {"id": "d1", "status": "OK", "tensors": []},
    Command.CANCEL: {"id": "d1"},
    Command.TOKENS: {"id": "d1", "position": 0, "tokens": [1, 2]},
}
REQUIRED: dict[Command, list[str]] = {
    Command.REQUEST: ["id", "model"],
    Command.REPLY: ["id", "status"],
    Command.PARTIAL: ["id", "seq"],
    Command.READY: ["role", "worker", "models"],
    Command.HEARTBEAT: [],
    Command.DISCONNECT: [],
    Command.DISPATCH: ["id", "model"],
    Command.RESULT: ["id", "status"],
    Command.CANCEL: ["id"],
    Command.TOKENS: ["id"],  # (position is shared with PARTIAL's optional one: a worker checks)
}
WRONG_TYPES: list[tuple[Command, str, Any]] = [
    (Command.REQUEST, "id", 1),
    (Command.REQUEST, "id", b"r1"),
    (Command.REQUEST, "id", ["r1"]),
    (Command.REQUEST, "model", True),
    (Command.REQUEST, "model", {"name": "m"}),
    (Command.REQUEST, "priority", "1"),
    (Command.REQUEST, "priority", True),
    (Command.REQUEST, "priority", False),
    (Command.REQUEST, "priority", 1.25),
    (Command.REQUEST, "timeout_ms", True),
    (Command.REQUEST, "timeout_ms", 1500.5),
    (Command.REQUEST, "timeout_ms", "1500"),
    (Command.REQUEST, "options", []),
    (Command.REQUEST, "options", "x"),
    (Command.REPLY, "status", 0),
    (Command.REPLY, "status", True),
    (Command.REPLY, "error", 1),
    (Command.REPLY, "retry_after_ms", True),
    (Command.REPLY, "retry_after_ms", 0.5),
    (Command.REPLY, "served_by", ["edge"]),
    (Command.REPLY, "timings", [1.0]),
    (Command.REPLY, "timings", {"queue_s": "fast"}),
    (Command.REPLY, "timings", {"queue_s": None}),
    (Command.REPLY, "timings", {"queue_s": [1]}),
    (Command.REPLY, "timings", {"2": {"s": 1}}),
    (Command.PARTIAL, "seq", "0"),
    (Command.PARTIAL, "seq", True),
    (Command.PARTIAL, "seq", 0.5),
    (Command.READY, "role", 1),
    (Command.READY, "worker", 1),
    (Command.READY, "models", "m"),
    (Command.READY, "models", [1]),
    (Command.READY, "models", ["m", None]),
    (Command.READY, "models", {"m": 1}),
    (Command.READY, "variant", 1),
    (Command.READY, "capacity", True),
    (Command.READY, "capacity", "2"),
    (Command.READY, "capacity", 2.5),
    (Command.READY, "state", 1),
    (Command.READY, "resident_stages", True),
    (Command.READY, "total_stages", 1.5),
    (Command.READY, "eta_s", "1"),
    (Command.READY, "eta_s", True),
    (Command.READY, "compute_s", False),
    (Command.READY, "compute_s", [0.1]),
    (Command.HEARTBEAT, "state", True),
    (Command.HEARTBEAT, "inflight", True),
    (Command.HEARTBEAT, "inflight", float("nan")),
    (Command.HEARTBEAT, "load", "0.5"),
    (Command.HEARTBEAT, "load", True),
    (Command.HEARTBEAT, "eta_s", {}),
    (Command.DISCONNECT, "reason", 1),
    (Command.DISCONNECT, "reason", b"bye"),
    (Command.DISPATCH, "id", 7),
    (Command.DISPATCH, "timeout_ms", False),
    (Command.DISPATCH, "options", [["k", "v"]]),
    (Command.RESULT, "status", None),  # required: nil is missing
    (Command.RESULT, "variant", 1),
    (Command.RESULT, "timings", {"compute_s": "1"}),
]
UNKNOWN_ENUMS: list[tuple[Command, str, str]] = [
    (Command.REPLY, "status", "ok"),
    (Command.REPLY, "status", "DONE"),
    (Command.REPLY, "status", ""),
    (Command.RESULT, "status", "PARTIAL"),
    (Command.READY, "role", "fog"),
    (Command.READY, "role", "EDGE"),
    (Command.READY, "state", "warm"),
    (Command.READY, "state", "READY"),
    (Command.HEARTBEAT, "state", "gone"),
    (Command.HEARTBEAT, "state", ""),
]


@pytest.mark.parametrize("command", list(BASE), ids=lambda c: c.name)
def test_base_bodies_decode(command: Command) -> None:
    message = decode(frames_of(command, BASE[command]))
    assert type(message) is MESSAGES[command]


@pytest.mark.parametrize(
    ("command", "name"),
    [(c, n) for c, names in REQUIRED.items() for n in names],
    ids=lambda v: v.name if isinstance(v, Command) else v,
)
def test_missing_or_nil_required_field(command: Command, name: str) -> None:
    missing = {k: v for k, v in BASE[command].items() if k != name}
    with pytest.raises(ProtocolError, match="missing"):
        decode(frames_of(command, missing))
    with pytest.raises(ProtocolError, match="missing"):
        decode(frames_of(command, {**BASE[command], name: None}))


@pytest.mark.parametrize(
    ("command", "name", "value"),
    WRONG_TYPES,
    ids=[f"{c.name}.{n}={v!r}"[:60] for c, n, v in WRONG_TYPES],
)
def test_wrong_field_type(command: Command, name: str, value: Any) -> None:
    with pytest.raises(ProtocolError):
        decode(frames_of(command, {**BASE[command], name: value}))


@pytest.mark.parametrize("command", [Command.REQUEST, Command.DISPATCH], ids=lambda c: c.name)
def test_timeout_ms_is_bounded(command: Command) -> None:
    """A budget beyond MAX_TIMEOUT_MS (a day) is refused. (Near 2**64 - 1 it once overflowed
    the coordinator's DISPATCH encoding and killed it.)"""
    for value in (MAX_TIMEOUT_MS, -MAX_TIMEOUT_MS, 0):
        message = decode(frames_of(command, {**BASE[command], "timeout_ms": value}))
        assert message.timeout_ms == value  # type: ignore[attr-defined]
    for value in (MAX_TIMEOUT_MS + 1, -MAX_TIMEOUT_MS - 1, 2**63 - 1, 2**64 - 1, -(2**63)):
        with pytest.raises(ProtocolError, match="timeout_ms"):
            decode(frames_of(command, {**BASE[command], "timeout_ms": value}))


@pytest.mark.parametrize(
    ("command", "name", "value"),
    UNKNOWN_ENUMS,
    ids=[f"{c.name}.{n}={v!r}" for c, n, v in UNKNOWN_ENUMS],
)
def test_unknown_enum_value(command: Command, name: str, value: str) -> None:
    with pytest.raises(ProtocolError, match="unknown value"):
        decode(frames_of(command, {**BASE[command], name: value}))


@pytest.mark.parametrize("dtype", [["float32"], {"name": "float32"}])
def test_unhashable_tensor_dtype_is_a_protocol_error(dtype: Any) -> None:
    """Regression: this raised TypeError (DTYPES.get on a list), which killed the coordinator."""
    with pytest.raises(ProtocolError):
        decode(spec_request({"dtype": dtype, "shape": [2, 3]}, F32_2x3), materialize=False)


def test_bool_timing_is_rejected_like_other_numbers() -> None:
    with pytest.raises(ProtocolError):
        decode(frames_of(Command.REPLY, {**BASE[Command.REPLY], "timings": {"queue_s": True}}))


@pytest.mark.parametrize("where", ["field", "options", "served_by"])
def test_empty_ext_types_are_rejected(where: str) -> None:
    ext = msgpack.ExtType(1, b"")
    if where == "field":
        frames = frames_of(Command.REQUEST, {**REQ, "x": ext})
    elif where == "options":
        frames = frames_of(Command.REQUEST, {**REQ, "options": {"e": ext}})
    else:
        frames = frames_of(Command.REPLY, {"id": "a", "status": "OK", "served_by": {"e": ext}})
    with pytest.raises(ProtocolError):
        decode(frames)


# -- materialize=False: RawTensor pass-through -------------------------------------------------


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
@pytest.mark.parametrize("cls", TENSOR_MESSAGES, ids=lambda c: c.__name__)
def test_raw_tensors_reencode_to_identical_frames(cls: type[Message], dtype: str) -> None:
    message = tensor_message(cls, sample_arrays(dtype))
    frames = as_bytes(encode(message))
    raw = decode([memoryview(f) for f in frames], materialize=False)
    tensors = getattr(raw, cls.tensor_field or "")
    assert tensors and all(isinstance(t, RawTensor) for t in tensors)
    for t, frame in zip(tensors, frames[3:], strict=True):
        assert bytes(t.frame) == frame
        assert t.spec["dtype"] == dtype
    assert as_bytes(encode(raw)) == frames
    assert_same_message(message, decode(encode(raw)))


def test_forwarding_a_request_as_a_dispatch_keeps_the_tensors() -> None:
    """What the coordinator does: decode without copies, re-wrap, send on."""
    arrays = [np.arange(12, dtype=np.int64).reshape(3, 4).T, np.float16(2.5), np.zeros(0, bool)]
    request = decode(as_bytes(encode(Request("c1", "gpt2", arrays))), materialize=False)
    assert isinstance(request, Request)
    dispatch = Dispatch("1a", request.model, request.inputs, timeout_ms=100)
    received = decode(as_bytes(encode(dispatch)))
    assert isinstance(received, Dispatch)
    for want, got in zip(arrays, received.inputs, strict=True):
        assert_same_array(want, got)


# -- property-based ------------------------------------------------------------------------------

# msgpack-able values that decode back to themselves (lists stay lists, no NaN so == holds).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=16)
    | st.binary(max_size=16)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ints = st.integers(-(2**63), 2**63 - 1)
timeouts = st.integers(-MAX_TIMEOUT_MS, MAX_TIMEOUT_MS)
numbers = st.floats(allow_nan=False) | ints
texts = st.text(max_size=24)
options = st.dictionaries(st.text(max_size=8), values, max_size=4)
VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as is": lambda a: a,
    "transposed": lambda a: a.T,
    "reversed": lambda a: a[::-1] if a.ndim else a,
    "fortran": np.asfortranarray,
    "big-endian": lambda a: a.astype(a.dtype.newbyteorder(">")),
    "every other": lambda a: a[::2] if a.ndim else a,
}


@st.composite
def wire_arrays(draw: st.DrawFn) -> np.ndarray:
    array = draw(
        hnp.arrays(
            dtype=st.sampled_from(WIRE_DTYPES).map(np.dtype),
            shape=hnp.array_shapes(
                min_dims=0, max_dims=DEFAULT_LIMITS.max_dims, min_side=0, max_side=3
            ),
        )
    )
    view: np.ndarray = VIEWS[draw(st.sampled_from(sorted(VIEWS)))](array)
    return view


tensor_lists = st.lists(wire_arrays(), max_size=4)
statuses = st.sampled_from(Status)
states = st.sampled_from(WorkerState)
timings = st.dictionaries(st.text(max_size=8), numbers, max_size=4)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Request,
        texts,
        texts,
        tensor_lists,
        priority=ints,
        timeout_ms=st.none() | timeouts,
        options=options,
    ),
    st.builds(
        Reply,
        texts,
        statuses,
        tensor_lists,
        error=texts,
        retry_after_ms=st.none() | ints,
        served_by=options,
        timings=timings,
    ),
    st.builds(Partial, texts, ints, tensor_lists, served_by=options),
    st.builds(
        Ready,
        st.sampled_from(Role),
        texts,
        st.lists(texts, max_size=4),
        variant=texts,
        capacity=ints,
        state=states,
        resident_stages=ints,
        total_stages=ints,
        eta_s=st.none() | numbers,
        compute_s=st.none() | numbers,
    ),
    st.builds(
        Heartbeat,
        state=st.none() | states,
        inflight=ints,
        load=numbers,
        resident_stages=ints,
        total_stages=ints,
        eta_s=st.none() | numbers,
        compute_s=st.none() | numbers,
    ),
    st.builds(Disconnect, reason=texts),
    st.builds(
        Dispatch, texts, texts, tensor_lists, timeout_ms=st.none() | timeouts, options=options
    ),
    st.builds(Result, texts, statuses, tensor_lists, error=texts, timings=timings, variant=texts),
)


@PROPERTY
@given(messages)
def test_property_encode_decode_is_identity(message: Message) -> None:
    frames = encode(message)
    assert_same_message(message, decode(as_bytes(frames)))
    # The pass-through path re-encodes to the very same frames.
    raw = decode([memoryview(f) for f in frames], materialize=False)
    assert as_bytes(encode(raw)) == as_bytes(frames)


def check_guarantee(frames: Sequence[bytes | memoryview]) -> None:
    """decode returns a Message or raises ProtocolError; what it accepts encodes again, and
    encoding is then a fixed point (nothing accepted is lost or changed on the way on)."""
    for materialize in (True, False):
        message = decode_or_reject(frames, materialize=materialize)
        if message is None:
            continue
        again = as_bytes(encode(message))
        assert as_bytes(encode(decode(again, materialize=materialize))) == again


command_bytes = st.one_of(
    st.sampled_from([bytes([c]) for c in Command]),
    st.binary(min_size=1, max_size=1),
    st.binary(max_size=2),
)


@PROPERTY
@given(st.lists(st.binary(max_size=64), max_size=70))
def test_property_random_frames_decode_or_raise_protocol_error(frames: Frames) -> None:
    check_guarantee(frames)


@PROPERTY
@given(command_bytes, st.binary(max_size=256), st.lists(st.binary(max_size=32), max_size=6))
def test_property_signed_random_bodies(command: bytes, body: bytes, tensors: Frames) -> None:
    check_guarantee([SIGNATURE, command, body, *tensors])


field_names = st.sampled_from(
    [
        "id",
        "model",
        "priority",
        "timeout_ms",
        "options",
        "status",
        "error",
        "retry_after_ms",
        "served_by",
        "timings",
        "seq",
        "role",
        "worker",
        "models",
        "variant",
        "capacity",
        "state",
        "resident_stages",
        "total_stages",
        "eta_s",
        "compute_s",
        "inflight",
        "load",
        "reason",
    ]
)
enum_values = st.sampled_from([*Status, *Role, *WorkerState]).map(lambda e: e.value)
specs = (
    st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from([*WIRE_DTYPES, "complex64", "uint16", ""]) | scalars,
            "shape": st.lists(st.integers(-2, 4) | scalars, max_size=10) | scalars,
        },
    )
    | scalars
)


@PROPERTY
@given(
    command=st.sampled_from(Command),
    from_base=st.booleans(),
    body=st.dictionaries(field_names, enum_values | values, max_size=10),
    described=st.none() | st.lists(specs, max_size=4),
    tensors=st.lists(st.binary(max_size=48), max_size=4),
)
def test_property_structured_bodies(
    command: Command,
    from_base: bool,
    body: dict[str, Any],
    described: list[Any] | None,
    tensors: Frames,
) -> None:
    if from_base:  # required fields present, so the checks further in are reached too
        body = {**BASE[command], **body}
    if described is not None:
        body = {**body, "tensors": described}
    check_guarantee([SIGNATURE, bytes([command]), msgpack.packb(body, use_bin_type=True), *tensors])


def flip(frames: Frames, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(frames) - 1))
    if frames[i]:
        at = data.draw(st.integers(0, len(frames[i]) - 1))
        xor = data.draw(st.integers(1, 255))
        frames[i] = frames[i][:at] + bytes([frames[i][at] ^ xor]) + frames[i][at + 1 :]


def flip_body(frames: Frames, data: st.DataObject) -> None:
    if len(frames) > 2 and frames[2]:
        at = data.draw(st.integers(0, len(frames[2]) - 1))
        value = data.draw(st.integers(0, 255))
        frames[2] = frames[2][:at] + bytes([value]) + frames[2][at + 1 :]


def truncate(frames: Frames, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(frames) - 1))
    frames[i] = frames[i][: data.draw(st.integers(0, max(0, len(frames[i]) - 1)))]


def extend(frames: Frames, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(frames) - 1))
    frames[i] = frames[i] + data.draw(st.binary(min_size=1, max_size=8))


def swap(frames: Frames, data: st.DataObject) -> None:
    i, j = data.draw(st.integers(0, len(frames) - 1)), data.draw(st.integers(0, len(frames) - 1))
    frames[i], frames[j] = frames[j], frames[i]


def drop(frames: Frames, data: st.DataObject) -> None:
    del frames[data.draw(st.integers(0, len(frames) - 1))]


def duplicate(frames: Frames, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(frames) - 1))
    frames.insert(i, frames[i])


def insert(frames: Frames, data: st.DataObject) -> None:
    frames.insert(data.draw(st.integers(0, len(frames))), data.draw(st.binary(max_size=16)))


def recommand(frames: Frames, data: st.DataObject) -> None:
    if len(frames) > 1:
        frames[1] = data.draw(command_bytes)


def repack_body(frames: Frames, data: st.DataObject) -> None:
    """Keep the body a valid map but change one field to some other value."""
    body = msgpack.unpackb(frames[2], raw=False)
    name = data.draw(st.sampled_from([*body, "tensors"]))
    if name == "tensors" and isinstance(body.get("tensors"), list) and body["tensors"]:
        spec = dict(body["tensors"][0])
        spec[data.draw(st.sampled_from(["dtype", "shape"]))] = data.draw(specs)
        body["tensors"] = [spec, *body["tensors"][1:]]
    else:
        body[name] = data.draw(enum_values | values)
    frames[2] = msgpack.packb(body, use_bin_type=True)


MUTATIONS = [flip, flip_body, truncate, extend, swap, drop, duplicate, insert, recommand]


@PROPERTY
@given(messages, st.data())
def test_property_mutated_valid_messages(message: Message, data: st.DataObject) -> None:
    frames = as_bytes(encode(message))
    for mutate in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        if not frames:
            break
        mutate(frames, data)
    check_guarantee(frames)


@PROPERTY
@given(messages, st.data())
def test_property_mutated_fields(message: Message, data: st.DataObject) -> None:
    frames = as_bytes(encode(message))
    repack_body(frames, data)
    check_guarantee(frames)


def test_integral_floats_are_accepted_for_integer_fields() -> None:
    """1500.0 where an integer is expected (as many msgpack encoders write numbers) is that
    integer (docs/PROTOCOL.md, section 4); 1500.5 is refused above."""
    body = {"id": "r", "model": "m", "priority": 0.0, "timeout_ms": 1500.0,
            "tensors": [{"dtype": "float32", "shape": [2.0, 3.0]}]}  # fmt: skip
    frames = [SIGNATURE, b"\x01", msgpack.packb(body), np.zeros((2, 3), np.float32).tobytes()]
    request = decode(frames)
    assert isinstance(request, Request)
    assert request.timeout_ms == 1500 and type(request.timeout_ms) is int
    assert request.priority == 0 and type(request.priority) is int
    assert request.inputs[0].shape == (2, 3)
    ready = decode([SIGNATURE, b"\x10", msgpack.packb(
        {"role": "cloud", "worker": "w", "models": ["m"], "capacity": 2.0})])  # fmt: skip
    assert isinstance(ready, Ready) and ready.capacity == 2 and type(ready.capacity) is int


@pytest.mark.parametrize("value", [2.0**64, -(2.0**63) - 2048, 1e20, -1e300])
def test_integral_floats_beyond_msgpack_integers_are_refused(value: float) -> None:
    """Regression (hypothesis, in CI): 2.0**64 for HEARTBEAT's inflight decoded as the int
    2**64, which msgpack cannot encode: a message accepted that could not be sent on. An
    integral float is an integer only within -2**63 ... 2**64 - 1 (PROTOCOL.md, section 4)."""
    for field_name in ("inflight", "resident_stages"):
        frames = [SIGNATURE, b"\x11", msgpack.packb({field_name: value})]
        for materialize in (True, False):
            with pytest.raises(ProtocolError, match="must be an integer"):
                decode(frames, materialize=materialize)
    frames = spec_request({"dtype": "uint8", "shape": [value, 0.0]}, b"")
    for materialize in (True, False):
        with pytest.raises(ProtocolError, match="shape"):
            decode(frames, materialize=materialize)
    # The edges themselves are integers, and the largest re-encodes as itself.
    top = decode([SIGNATURE, b"\x11", msgpack.packb({"inflight": float(2**63)})])
    assert isinstance(top, Heartbeat) and top.inflight == 2**63
    assert as_bytes(encode(top))[2] == msgpack.packb({**top.body(), "inflight": 2**63})


@pytest.mark.parametrize("shape", [[2**63, 0], [2**64 - 1, 0], [2**40, 2**40, 0], [0, 2**29]])
def test_an_empty_tensor_cannot_name_an_impossible_shape(shape: list[int]) -> None:
    """Regression: an empty frame matched any shape with a 0 in it, so (2**63, 0) passed the
    coordinator's forwarding decode and raised numpy's ValueError, not ProtocolError, where
    the values were read (a client's SDK). The nonzero dimensions are bounded as a non-empty
    tensor's are: their product at most max_tensor_bytes (PROTOCOL.md, section 2)."""
    frames = spec_request({"dtype": "uint8", "shape": shape}, b"")
    for materialize in (True, False):
        with pytest.raises(ProtocolError, match="names more than"):
            decode(frames, materialize=materialize)
    limit = DEFAULT_LIMITS.max_tensor_bytes
    for edge in ([limit, 0], [0, 1, limit], [2, limit // 2, 0, 1]):
        message = decode(spec_request({"dtype": "float64", "shape": edge}, b""))
        assert isinstance(message, Request) and message.inputs[0].shape == tuple(edge)


def test_start_up_phase_fields_are_optional_and_bounded() -> None:
    """`phase`, `phase_s` and `read_*` were added within version 1: a READY without them (an
    older worker) decodes to their defaults; out of bounds they name the field refused."""
    from cicada.common.protocol import MAX_PHASE_LEN, decode, encode, worker_report_problem

    frames = encode(Ready(Role.CLOUD, "cloud-1", ["gpt2"]))
    body = msgpack.unpackb(frames[2])
    for name in ("phase", "phase_s", "read_stages", "read_bytes", "total_bytes"):
        del body[name]
    old = decode([*frames[:2], msgpack.packb(body)])
    assert isinstance(old, Ready) and old.phase is None and old.read_bytes == 0
    assert worker_report_problem(old) is None
    for bad, field_name in (
        (Heartbeat(phase="x" * (MAX_PHASE_LEN + 1)), "phase"),
        (Heartbeat(phase=""), "phase"),
        (Heartbeat(phase_s=-1.0), "phase_s"),
        (Heartbeat(read_bytes=-1), "read_bytes"),
        (Heartbeat(total_bytes=1 << 60), "total_bytes"),
    ):
        problem = worker_report_problem(bad)
        assert problem is not None and problem[0] == field_name, (bad, problem)


def test_batch_marginal_is_optional_and_a_fraction() -> None:
    """READY/HEARTBEAT `batch_marginal` was added within version 1: without it a READY decodes
    to None (a worker that does not batch); outside 0 ... 1 it is refused by name."""
    from cicada.common.protocol import decode, encode, worker_report_problem

    frames = encode(Ready(Role.CLOUD, "cloud-1", ["gpt2"], capacity=8, batch_marginal=0.3))
    assert decode(frames).batch_marginal == 0.3  # type: ignore[attr-defined]
    body = msgpack.unpackb(frames[2])
    del body["batch_marginal"]
    old = decode([*frames[:2], msgpack.packb(body)])
    assert isinstance(old, Ready) and old.batch_marginal is None
    assert worker_report_problem(old) is None
    for value in (-0.1, 1.5, math.inf, math.nan):
        problem = worker_report_problem(Heartbeat(batch_marginal=value))
        assert problem is not None and problem[0] == "batch_marginal", (value, problem)


def test_tokens_round_trip_and_refuse_what_is_not_token_ids() -> None:
    """TOKENS (section 12, drafting): a dispatch id, a position, token ids (ints >= 0)."""
    from cicada.common.protocol import Tokens

    message = Tokens(id="e.1f.2", position=3, tokens=[5, 0, 96])
    assert_same_message(message, decode(as_bytes(encode(message))))
    for bad in ([1.5], [-1], ["7"], [True], [1 << 40]):
        body = msgpack.packb({"id": "e.1f.2", "position": 0, "tokens": bad})
        with pytest.raises(ProtocolError, match="tokens"):
            decode([SIGNATURE, bytes([Command.TOKENS]), body])
    body = msgpack.packb({"id": "e.1f.2", "position": 5000, "tokens": []})
    with pytest.raises(ProtocolError, match="position"):
        decode([SIGNATURE, bytes([Command.TOKENS]), body])
