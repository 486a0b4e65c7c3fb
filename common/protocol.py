"""Cicada wire protocol (docs/PROTOCOL.md): typed messages, validated frames, no pickle.

Every message is a ZeroMQ multipart message::

    frame 0   b"CCD1"                      protocol signature and version
    frame 1   one byte                     command (`Command`)
    frame 2   msgpack map                  the body, string keys, size-limited
    frame 3.. raw tensor bytes             described, in order, by body["tensors"]

A ROUTER adds (and strips) the peer identity in front. `decode` checks every frame against
`Limits` and raises exactly one exception type, `ProtocolError`, for anything malformed; the
receiving process logs it, drops the message (or answers BAD_REQUEST where it can name the
request) and keeps serving.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack
import numpy as np

from cicada.common.defaults import MAX_NEW_TOKENS
from cicada.common.errors import ProtocolError

SIGNATURE = b"CCD1"
PROTOCOL_VERSION = 1
MAX_TIMEOUT_MS = 86_400_000  # a budget beyond a day is a mistake, not a deadline

# Bounds of what a worker reports in READY and HEARTBEAT (section 4): a registration that
# oversteps one is refused, naming the field.
MAX_MODELS_PER_WORKER = 16
MAX_NAME_LEN = 256  # worker, model and variant names (they become metric labels)
MAX_CAPACITY = 1024
MAX_STAGES = 1 << 20
MAX_ESTIMATE_S = 86_400.0  # eta_s, compute_s, phase_s: finite, 0 ... one day
MAX_BYTES = 1 << 50  # read_bytes, total_bytes: a petabyte is no model's size
MAX_PHASE_LEN = 32  # a cloud worker's `phase`: a short word (PHASES), free for new ones
# What a cloud worker is doing while it starts (section 4): in this order, each once.
PHASES = ("importing", "constructing", "loading", "ready")


class Command(enum.IntEnum):
    REQUEST = 0x01  # client -> coordinator
    REPLY = 0x02  # coordinator -> client: the one final outcome of a request
    PARTIAL = 0x03  # a streamed piece before the final outcome (worker -> coordinator -> client)
    READY = 0x10  # agent/worker -> coordinator: register (also re-register)
    HEARTBEAT = 0x11  # both ways; from a worker it carries state and residency
    DISCONNECT = 0x12  # both ways: leaving, or "you are unknown, register again"
    DISPATCH = 0x20  # coordinator -> agent/worker: run this request
    RESULT = 0x21  # agent/worker -> coordinator: outcome of a DISPATCH
    CANCEL = 0x22  # coordinator -> worker: stop this DISPATCH; client -> coordinator: withdraw
    TOKENS = 0x23  # coordinator -> worker: drafts to verify (cloud), tokens that stand (edge)


class Status(enum.StrEnum):
    OK = "OK"
    TIMEOUT = "TIMEOUT"  # the deadline passed before a result: never run late
    REJECTED = "REJECTED"  # queue full (back-pressure) or the caller is not allowed
    UNAVAILABLE = "UNAVAILABLE"  # nobody can serve it now; retry after `retry_after_ms`
    BAD_REQUEST = "BAD_REQUEST"  # malformed, unknown model, wrong inputs
    FAILED = "FAILED"  # the model raised while running it


class Role(enum.StrEnum):
    EDGE = "edge"
    CLOUD = "cloud"


class WorkerState(enum.StrEnum):
    COLD = "cold"  # registered, nothing resident
    LOADING = "loading"  # some stages resident (serves requests that fit, see residency)
    READY = "ready"  # everything resident
    DRAINING = "draining"  # finishing what it has, taking nothing new


# Tensor dtypes on the wire: names, so that a client in any language can produce them.
DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name)
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                 "uint8", "bool")
}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """Bounds checked before anything is allocated or trusted."""

    max_frames: int = 64
    max_body_bytes: int = 256 * 1024
    max_tensor_bytes: int = 256 * 1024 * 1024
    max_message_bytes: int = 512 * 1024 * 1024  # also the socket's ZMQ_MAXMSGSIZE
    max_dims: int = 8
    max_str_len: int = 64 * 1024
    max_items: int = 4096


DEFAULT_LIMITS = Limits()

# Native-order dtype -> wire name, for the dtypes that travel.
_DTYPE_NAMES: dict[np.dtype[Any], str] = {dtype: name for name, dtype in DTYPES.items()}


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} is not allowed")


def unpack_body(raw: bytes, limits: Limits, tolerate_ext: bool = False) -> dict[str, Any]:
    """The body map, within `limits`. `tolerate_ext` reads past ext types (as None) instead
    of refusing them: only to find the id of a request that is being answered BAD_REQUEST."""
    if len(raw) > limits.max_body_bytes:
        raise ProtocolError(f"body of {len(raw)} bytes exceeds {limits.max_body_bytes}")
    try:
        body = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_body_bytes,
            max_array_len=limits.max_items,
            max_map_len=limits.max_items,
            max_ext_len=limits.max_body_bytes if tolerate_ext else 0,
            ext_hook=(lambda code, data: None) if tolerate_ext else _refuse_ext,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"body is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("body is not a msgpack map")
    for key in body:
        if type(key) is not str:  # (strict_map_key lets bin keys through)
            raise ProtocolError("body keys must be strings")
    return body


def request_id_of(
    frames: Sequence[bytes | memoryview], limits: Limits = DEFAULT_LIMITS
) -> tuple[str, str | None] | None:
    """(id, model or None) of a REQUEST that `decode` refused, if its id can be read: the
    frames are signed CCD1, the command is REQUEST and the body is a well-formed msgpack map
    (of any size or width: the limits bound allocation, and nothing is allocated here but the
    two strings) whose str key "id" holds a UTF-8 str of at most `limits.max_str_len` bytes.
    None otherwise: such a message is dropped, there is nobody to answer."""
    if len(frames) < 3 or frames[0] != SIGNATURE or frames[1] != _COMMAND_BYTES[Command.REQUEST]:
        return None
    raw = bytes(frames[2])
    found: dict[bytes, str | None] = {}
    try:
        unpacker = msgpack.Unpacker(raw=True, max_buffer_size=max(1, len(raw)))
        unpacker.feed(raw)
        for _ in range(unpacker.read_map_header()):
            key = _short_str(unpacker, raw, 8)
            if key is None:
                unpacker.skip()
            if key in (b"id", b"model"):
                value = _short_str(unpacker, raw, limits.max_str_len)
                if value is None:
                    unpacker.skip()
                    found[key] = None
                else:
                    found[key] = _utf8(value)
            else:
                unpacker.skip()
        if unpacker.tell() != len(raw):
            return None
    except Exception:  # not msgpack, truncated, not a map, a str that is not UTF-8
        return None
    request_id = found.get(b"id")
    return None if request_id is None else (request_id, found.get(b"model"))


def _utf8(value: bytes) -> str | None:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


def _short_str(unpacker: msgpack.Unpacker, raw: bytes, most: int) -> bytes | None:
    """The next object, read if it is a msgpack str of at most `most` bytes; otherwise left
    where it is (None)."""
    at = unpacker.tell()
    head = raw[at]
    if 0xA0 <= head <= 0xBF:
        length = head & 0x1F
    elif head in (0xD9, 0xDA, 0xDB):
        width = {0xD9: 1, 0xDA: 2, 0xDB: 4}[head]
        length = int.from_bytes(raw[at + 1 : at + 1 + width], "big")
    else:
        return None
    if length > most:
        return None
    value = unpacker.unpack()
    assert isinstance(value, bytes)
    return value


def encode_tensor(array: np.ndarray) -> tuple[dict[str, Any], memoryview]:
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # (ascontiguousarray would turn 0-d into 1-d)
        array = array.copy(order="C")
    name = _DTYPE_NAMES.get(array.dtype)  # (`dtype.name` is computed in Python each time)
    if name is None:
        name = array.dtype.name
    if name not in DTYPES:
        raise ProtocolError(f"dtype {name} cannot travel; use one of {sorted(DTYPES)}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return {"dtype": name, "shape": list(array.shape)}, array.reshape(-1).view(np.uint8).data


def decode_tensor(spec: Any, frame: bytes | memoryview, limits: Limits) -> np.ndarray:
    raw = check_tensor(spec, frame, limits)
    dtype = DTYPES[raw.spec["dtype"]].newbyteorder("<")
    # Little-endian on the wire; copy so the array owns aligned, writable memory.
    return np.frombuffer(frame, dtype=dtype).reshape(raw.spec["shape"]).copy()


@dataclass(frozen=True)
class RawTensor:
    """A tensor frame checked against its spec but not copied: what the coordinator forwards
    (it never needs the values, so it never materialises them)."""

    spec: dict[str, Any]
    frame: bytes | memoryview


def too_vast(shape: Sequence[int], limits: Limits = DEFAULT_LIMITS) -> bool:
    """Does a shape name more elements, its zero dimensions left out, than a tensor may have
    bytes? An empty tensor's data says nothing of its other dimensions; bounded as a non-empty
    tensor's are, (2**63, 0) never reaches numpy (docs/PROTOCOL.md section 2)."""
    return math.prod(d for d in shape if d) > limits.max_tensor_bytes


def check_tensor(spec: Any, frame: bytes | memoryview, limits: Limits) -> RawTensor:
    if not isinstance(spec, dict):
        raise ProtocolError("tensor spec is not a map")
    name = spec.get("dtype")
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(f"tensor dtype {spec.get('dtype')!r} is not one of {sorted(DTYPES)}")
    shape = spec.get("shape")
    if isinstance(shape, list) and any(type(d) is float for d in shape):
        shape = [_wire_int(d) if type(d) is float else d for d in shape]
    if (
        not isinstance(shape, list)
        or len(shape) > limits.max_dims
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ProtocolError(f"tensor shape {shape!r} is invalid")
    if too_vast(shape, limits):
        raise ProtocolError(
            f"tensor shape {shape!r} names more than {limits.max_tensor_bytes} elements"
        )
    size = len(frame)
    if size > limits.max_tensor_bytes:
        raise ProtocolError(f"tensor of {size} bytes exceeds {limits.max_tensor_bytes}")
    expected = math.prod(shape) * dtype.itemsize
    if expected != size:
        raise ProtocolError(f"tensor frame has {size} bytes; dtype/shape say {expected}")
    return RawTensor({"dtype": name, "shape": shape}, frame)


# -- messages ----------------------------------------------------------------------------------


@dataclass
class Message:
    """Base of every message: body fields are the dataclass fields, minus tensor lists."""

    command: ClassVar[Command]
    tensor_field: ClassVar[str | None] = None

    def body(self) -> dict[str, Any]:
        attrs = self.__dict__
        out = {name: attrs[name] for name in _body_fields(type(self))}
        for name, value in out.items():
            if value.__class__ not in _PLAIN_TYPES and isinstance(value, enum.Enum):
                out[name] = value.value
        return out


# Per message class, the names of its body fields (its dataclass fields minus the tensor list),
# computed once: `dataclasses.fields()` per message was a tenth of the coordinator's time.
_BODY_FIELDS: dict[type[Message], tuple[str, ...]] = {}


def _body_fields(cls: type[Message]) -> tuple[str, ...]:
    names = _BODY_FIELDS.get(cls)
    if names is None:
        names = tuple(f.name for f in fields(cls) if f.name != cls.tensor_field)
        _BODY_FIELDS[cls] = names
    return names


# The integers msgpack carries: an integral float beyond them could not be sent on.
WIRE_INT_MIN, WIRE_INT_MAX = -(2**63), 2**64 - 1


def _wire_int(value: float) -> int | float:
    """An integral float within msgpack's integers as that int; any other float unchanged (the
    caller's type check then refuses it)."""
    if value.is_integer() and WIRE_INT_MIN <= value <= WIRE_INT_MAX:
        return int(value)
    return value


def _check(body: dict[str, Any], name: str, kind: type | tuple[type, ...], optional: bool) -> Any:
    value = body.get(name)
    if value is None:
        if optional:
            return None
        raise ProtocolError(f"missing field {name!r}")
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ProtocolError(f"field {name!r} must be a number, not a bool")
    if kind is int and isinstance(value, float):
        value = _wire_int(value)  # 1500.0: many msgpack encoders write every number as a float
        if isinstance(value, float):
            raise ProtocolError(f"field {name!r} must be an integer, not {value!r}")
    if not isinstance(value, kind):
        raise ProtocolError(f"field {name!r} has type {type(value).__name__}")
    return value


@dataclass
class Request(Message):
    """A client's call: run `model` on `inputs` within `timeout_ms` (None: no deadline)."""

    command: ClassVar[Command] = Command.REQUEST
    tensor_field: ClassVar[str | None] = "inputs"
    id: str
    model: str
    inputs: list[np.ndarray] = field(default_factory=list)
    priority: int = 1
    timeout_ms: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply(Message):
    """The one final outcome of a request."""

    command: ClassVar[Command] = Command.REPLY
    tensor_field: ClassVar[str | None] = "outputs"
    id: str
    status: Status
    outputs: list[np.ndarray] = field(default_factory=list)
    error: str = ""
    retry_after_ms: int | None = None
    served_by: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # Added within version 1: an exact generation's outcome, {exact, kept, rewound}
    # (section 12); absent for every other request.
    generation: dict[str, Any] | None = None


@dataclass
class Partial(Message):
    """A streamed piece of a request's answer (e.g. generated tokens). From a worker, `id` is
    the DISPATCH id and `seq` its own count; to a client, the REQUEST id and one count across
    every worker that served it, with `served_by` naming who produced this piece."""

    command: ClassVar[Command] = Command.PARTIAL
    tensor_field: ClassVar[str | None] = "outputs"
    id: str
    seq: int
    outputs: list[np.ndarray] = field(default_factory=list)
    served_by: dict[str, Any] = field(default_factory=dict)
    # Added within version 1 (section 12). To a client: the token's index in the generation,
    # whether it may still be replaced (an exact generation's edge token), and a rewind event
    # (no outputs: the first `rewind` tokens stand, later ones are replaced). From a cloud
    # worker verifying a draft: how many of the draft's tokens it accepted.
    position: int | None = None
    provisional: bool | None = None
    rewind: int | None = None
    accepted: int | None = None


@dataclass
class Ready(Message):
    """Registration of an edge agent or cloud worker (sent again after a coordinator restart)."""

    command: ClassVar[Command] = Command.READY
    role: Role
    worker: str
    models: list[str]
    variant: str = ""
    capacity: int = 1
    state: WorkerState = WorkerState.READY
    resident_stages: int = 0
    total_stages: int = 0
    eta_s: float | None = None
    compute_s: float | None = None  # measured (or estimated) seconds per request
    # Added within version 1 (section 4): what a starting cloud worker is doing, for how long,
    # and its weights read (verified) so far, apart from the stages resident (applied).
    phase: str | None = None
    phase_s: float | None = None
    read_stages: int = 0
    read_bytes: int = 0
    total_bytes: int = 0
    # Added within version 1: a batching worker's cost of each request a forward adds, as a
    # fraction of `compute_s` (a batch of k costs compute_s x (1 + (k - 1) x batch_marginal)).
    batch_marginal: float | None = None
    # Added within version 1 (section 12): an edge agent that drafts after an exact takeover,
    # a cloud worker that verifies drafts sent with TOKENS.
    drafts: bool | None = None


@dataclass
class Heartbeat(Message):
    command: ClassVar[Command] = Command.HEARTBEAT
    state: WorkerState | None = None
    inflight: int = 0
    load: float = 0.0
    resident_stages: int = 0
    total_stages: int = 0
    eta_s: float | None = None
    compute_s: float | None = None
    phase: str | None = None  # as in Ready
    phase_s: float | None = None
    read_stages: int = 0
    read_bytes: int = 0
    total_bytes: int = 0
    batch_marginal: float | None = None  # as in Ready
    # From the coordinator, in answer to a READY: the registration was accepted.
    registered: bool | None = None


@dataclass
class Disconnect(Message):
    """Leaving, or "register again". With `refused` (from the coordinator): the READY or
    HEARTBEAT was refused because of that field; the worker MUST NOT register again."""

    command: ClassVar[Command] = Command.DISCONNECT
    reason: str = ""
    refused: str | None = None


@dataclass
class Dispatch(Message):
    command: ClassVar[Command] = Command.DISPATCH
    tensor_field: ClassVar[str | None] = "inputs"
    id: str
    model: str
    inputs: list[np.ndarray] = field(default_factory=list)
    timeout_ms: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result(Message):
    command: ClassVar[Command] = Command.RESULT
    tensor_field: ClassVar[str | None] = "outputs"
    id: str
    status: Status
    outputs: list[np.ndarray] = field(default_factory=list)
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    variant: str = ""


@dataclass
class Cancel(Message):
    """To a worker: stop working on a dispatch (its request is answered elsewhere, or was
    withdrawn); its RESULT, if any, is discarded by the coordinator and frees its slot. To the
    coordinator, from a client: withdraw the request `id`; no REPLY follows."""

    command: ClassVar[Command] = Command.CANCEL
    id: str
    reason: str = ""


@dataclass
class Tokens(Message):
    """Section 12, drafting after an exact takeover. To the cloud worker verifying the
    generation: the edge's draft tokens for positions `position`, `position + 1`, ... of the
    dispatch `id` (hints: never trusted). To the drafting edge agent: the tokens that stand
    (cloud-verified) from `position` on, so it drafts on from the cloud's sequence."""

    command: ClassVar[Command] = Command.TOKENS
    id: str
    position: int | None = None  # (optional on the wire like PARTIAL's: a worker drops it absent)
    tokens: list[int] = field(default_factory=list)


MESSAGES: dict[Command, type[Message]] = {
    m.command: m
    for m in (
        Request, Reply, Partial, Ready, Heartbeat, Disconnect, Dispatch, Result, Cancel, Tokens
    )
}  # fmt: skip

# Field name -> (accepted types, optional). Enums are validated by value below.
_SCHEMA: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "id": (str, False), "model": (str, False), "priority": (int, True),
    "timeout_ms": (int, True), "options": (dict, True), "status": (str, False),
    "error": (str, True), "retry_after_ms": (int, True), "served_by": (dict, True),
    "timings": (dict, True), "seq": (int, False), "role": (str, False), "worker": (str, False),
    "models": (list, False), "variant": (str, True), "capacity": (int, True),
    "state": (str, True), "resident_stages": (int, True), "total_stages": (int, True),
    "eta_s": ((int, float), True), "compute_s": ((int, float), True), "inflight": (int, True),
    "load": ((int, float), True), "reason": (str, True), "registered": (bool, True),
    "refused": (str, True), "phase": (str, True), "phase_s": ((int, float), True),
    "read_stages": (int, True), "read_bytes": (int, True), "total_bytes": (int, True),
    "batch_marginal": ((int, float), True), "generation": (dict, True),
    "position": (int, True), "provisional": (bool, True), "rewind": (int, True),
    "accepted": (int, True), "drafts": (bool, True), "tokens": (list, True),
}  # fmt: skip
_ENUMS: dict[str, type[enum.Enum]] = {"status": Status, "role": Role, "state": WorkerState}
# Enum member by value: a dict lookup instead of EnumType.__call__ (~1 us each).
_ENUM_VALUES: dict[type[enum.Enum], dict[Any, enum.Enum]] = {
    e: {m.value: m for m in e} for e in _ENUMS.values()
}
_COMMAND_BYTES: dict[Command, bytes] = {c: bytes([c]) for c in Command}
_COMMANDS: dict[int, Command] = {c.value: c for c in Command}
_PLAIN_TYPES = frozenset((str, int, float, bool, type(None), dict, list, bytes))


def _check_timeout(value: int) -> None:
    if not -MAX_TIMEOUT_MS <= value <= MAX_TIMEOUT_MS:
        raise ProtocolError(f"timeout_ms must be within +-{MAX_TIMEOUT_MS} (one day)")


def _check_models(value: list[Any]) -> None:
    if not all(isinstance(m, str) for m in value):
        raise ProtocolError("field 'models' must be a list of strings")


def _check_timings(value: dict[Any, Any]) -> None:
    if not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise ProtocolError("field 'timings' must map names to numbers")


def _name_problem(field_name: str, value: str, empty_ok: bool = True) -> tuple[str, str] | None:
    if len(value) > MAX_NAME_LEN:
        return field_name, f"{field_name} longer than {MAX_NAME_LEN} characters"
    if not value and not empty_ok:
        return field_name, f"{field_name} is empty"
    return None


def _count_problem(field_name: str, value: int, low: int, high: int) -> tuple[str, str] | None:
    if not low <= value <= high:
        return field_name, f"{field_name} {value} is outside {low} ... {high}"
    return None


def _estimate_problem(field_name: str, value: float | None) -> tuple[str, str] | None:
    if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_ESTIMATE_S):
        why = f"{field_name} {value} is not a finite number in 0 ... {MAX_ESTIMATE_S:g}"
        return field_name, why
    return None


def worker_report_problem(message: Ready | Heartbeat) -> tuple[str, str] | None:
    """The first field of a worker's READY or HEARTBEAT outside its bounds, as (field, why);
    None when every field is within them (section 4)."""
    if isinstance(message, Ready):
        n = len(message.models)
        problem = (
            _name_problem("worker", message.worker)
            or _name_problem("variant", message.variant)
            or _count_problem("models", n, 1, MAX_MODELS_PER_WORKER)
            or _count_problem("capacity", message.capacity, 1, MAX_CAPACITY)
        )
        if problem:
            return problem
        for model in message.models:
            problem = _name_problem("models", model, empty_ok=False)
            if problem:
                return problem
    else:
        problem = _count_problem("inflight", message.inflight, 0, MAX_CAPACITY) or (
            _estimate_problem("load", message.load)
        )
        if problem:
            return problem
    return (
        _count_problem("resident_stages", message.resident_stages, 0, MAX_STAGES)
        or _count_problem("total_stages", message.total_stages, 0, MAX_STAGES)
        or _estimate_problem("eta_s", message.eta_s)
        or _estimate_problem("compute_s", message.compute_s)
        or _phase_problem(message.phase)
        or _estimate_problem("phase_s", message.phase_s)
        or _count_problem("read_stages", message.read_stages, 0, MAX_STAGES)
        or _count_problem("read_bytes", message.read_bytes, 0, MAX_BYTES)
        or _count_problem("total_bytes", message.total_bytes, 0, MAX_BYTES)
        or _fraction_problem("batch_marginal", message.batch_marginal)
    )


def _fraction_problem(field_name: str, value: float | None) -> tuple[str, str] | None:
    if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
        return field_name, f"{field_name} {value} is not a number in 0 ... 1"
    return None


def _phase_problem(phase: str | None) -> tuple[str, str] | None:
    if phase is not None and not 0 < len(phase) <= MAX_PHASE_LEN:
        return "phase", f"phase must be 1 ... {MAX_PHASE_LEN} characters"
    return None


def _check_token_index(value: int) -> None:
    if not 0 <= value <= MAX_NEW_TOKENS:
        raise ProtocolError(f"a token position must be within 0 ... {MAX_NEW_TOKENS}")


MAX_TOKEN_ID = (1 << 31) - 1  # no vocabulary is larger; the receiver checks its own


def _check_tokens(value: list[Any]) -> None:
    if len(value) > MAX_NEW_TOKENS:
        raise ProtocolError(f"at most {MAX_NEW_TOKENS} tokens")
    for t in value:
        if type(t) is not int or not 0 <= t <= MAX_TOKEN_ID:
            raise ProtocolError("field 'tokens' must be a list of token ids (ints >= 0)")


# Checks beyond the type, by field name (run on every decode).
_EXTRA_CHECKS: dict[str, Any] = {
    "timeout_ms": _check_timeout,
    "models": _check_models,
    "timings": _check_timings,
    "position": _check_token_index,
    "rewind": _check_token_index,
    "accepted": _check_token_index,
    "tokens": _check_tokens,
}

# Per message class: (name, accepted types, optional, enum type) of each body field, computed
# once from the dataclass fields and _SCHEMA (decode is the coordinator's hottest function).
_DecodePlan = tuple[tuple[str, Any, bool, "type[enum.Enum] | None"], ...]
_DECODE_PLANS: dict[type[Message], _DecodePlan] = {}


def _decode_plan(cls: type[Message]) -> _DecodePlan:
    plan = _DECODE_PLANS.get(cls)
    if plan is None:
        rows = []
        for name in _body_fields(cls):
            spec = _SCHEMA.get(name)
            if spec is None:  # pragma: no cover - a field added without a schema entry
                raise ProtocolError(f"no schema for field {name}")
            kind, optional = spec
            rows.append((name, kind, optional, _ENUMS.get(name)))
        plan = _DECODE_PLANS[cls] = tuple(rows)
    return plan


def encode(message: Message) -> list[bytes | memoryview]:
    body = message.body()
    frames: list[bytes | memoryview] = []
    if message.tensor_field is not None:
        specs = []
        for array in getattr(message, message.tensor_field):
            if isinstance(array, RawTensor):
                specs.append(array.spec)
                frames.append(array.frame)
                continue
            spec, raw = encode_tensor(np.asarray(array))
            specs.append(spec)
            frames.append(raw)
        body["tensors"] = specs
    packed = msgpack.packb(body, use_bin_type=True)
    return [SIGNATURE, _COMMAND_BYTES[message.command], packed, *frames]


def decode(
    frames: Sequence[bytes | memoryview],
    limits: Limits = DEFAULT_LIMITS,
    materialize: bool = True,
) -> Message:
    """Validate and decode one message (without the ROUTER identity frame).

    With `materialize=False` tensors are validated but left as `RawTensor` frames, to be
    forwarded as they are."""
    if len(frames) < 3:
        raise ProtocolError(f"a message has at least 3 frames, got {len(frames)}")
    if len(frames) > limits.max_frames:
        raise ProtocolError(f"{len(frames)} frames exceed the limit of {limits.max_frames}")
    if frames[0] != SIGNATURE:
        raise ProtocolError(f"bad signature {bytes(frames[0])[:8]!r}; expected {SIGNATURE!r}")
    if len(frames[1]) != 1:
        raise ProtocolError("command frame must be exactly one byte")
    command = _COMMANDS.get(frames[1][0])
    if command is None:
        raise ProtocolError(f"unknown command 0x{bytes(frames[1])[0]:02x}")
    if sum(map(len, frames)) > limits.max_message_bytes:
        raise ProtocolError("message exceeds the size limit")
    body = unpack_body(bytes(frames[2]), limits)
    cls = MESSAGES[command]
    kwargs: dict[str, Any] = {}
    for name, kind, optional, enum_type in _decode_plan(cls):
        value = body.get(name)
        # The common case (present, exactly the expected type) checks one `type() is`; anything
        # else takes the full check, which names the problem.
        if type(value) is not kind:
            if value is None and optional:
                continue
            value = _check(body, name, kind, optional)
        if enum_type is not None:
            member = _ENUM_VALUES[enum_type].get(value)
            if member is None:
                raise ProtocolError(f"field {name!r} has unknown value {value!r}")
            value = member
        elif name in _EXTRA_CHECKS:
            _EXTRA_CHECKS[name](value)
        kwargs[name] = value
    tensor_frames = frames[3:]
    if cls.tensor_field is not None:
        specs = body.get("tensors", [])
        if not isinstance(specs, list) or len(specs) != len(tensor_frames):
            raise ProtocolError(
                f"body describes {len(specs) if isinstance(specs, list) else '?'} tensors, "
                f"message carries {len(tensor_frames)}"
            )
        convert = decode_tensor if materialize else check_tensor
        kwargs[cls.tensor_field] = [
            convert(spec, frame, limits) for spec, frame in zip(specs, tensor_frames, strict=True)
        ]
    elif tensor_frames:
        raise ProtocolError(f"{command.name} carries no tensors, got {len(tensor_frames)} frames")
    return cls(**kwargs)
