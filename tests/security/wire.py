"""A minimal CCD/1 codec written from docs/PROTOCOL.md alone: pyzmq-free, msgpack and the
standard library only, never `cicada.common.protocol`. What a client or worker in another
language would write after reading the document; shared by the conformance test (its client
and worker speak through it) and the coordinator fuzzer (its independent oracle of what the
coordinator must accept, answer and drop).

Section numbers refer to docs/PROTOCOL.md.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

SIGNATURE = b"CCD1"  # section 2

# Section 3.
REQUEST, REPLY, PARTIAL = 0x01, 0x02, 0x03
READY, HEARTBEAT, DISCONNECT = 0x10, 0x11, 0x12
DISPATCH, RESULT, CANCEL = 0x20, 0x21, 0x22
COMMANDS = {REQUEST, REPLY, PARTIAL, READY, HEARTBEAT, DISCONNECT, DISPATCH, RESULT, CANCEL}
WITH_TENSORS = {REQUEST, REPLY, PARTIAL, DISPATCH, RESULT}

# Section 5 / 4.
STATUSES = {"OK", "TIMEOUT", "REJECTED", "UNAVAILABLE", "BAD_REQUEST", "FAILED"}
ROLES = {"edge", "cloud"}
STATES = {"cold", "loading", "ready", "draining"}

# Section 2: dtype name -> (struct code, itemsize); little-endian on the wire.
DTYPES = {
    "float16": ("e", 2), "float32": ("f", 4), "float64": ("d", 8), "int8": ("b", 1),
    "int16": ("h", 2), "int32": ("i", 4), "int64": ("q", 8), "uint8": ("B", 1),
    "bool": ("?", 1),
}  # fmt: skip

# Section 9.
MAX_FRAMES = 64
MAX_BODY = 256 * 1024
MAX_STR = 64 * 1024
MAX_ITEMS = 4096
MAX_TENSOR = 256 * 1024 * 1024
MAX_DIMS = 8
MAX_MESSAGE = 512 * 1024 * 1024
MAX_TIMEOUT_MS = 86_400_000  # section 4, REQUEST

# Section 4: the fields each command's body may carry, with their kinds; required ones marked.
# Kinds: "str", "int" (integral floats too), "number", "map", "list[str]", "timings",
# "status", "role", "state".
SCHEMA: dict[int, dict[str, tuple[str, bool]]] = {
    REQUEST: {"id": ("str", True), "model": ("str", True), "priority": ("int", False),
              "timeout_ms": ("timeout", False), "options": ("map", False)},
    REPLY: {"id": ("str", True), "status": ("status", True), "error": ("str", False),
            "retry_after_ms": ("int", False), "served_by": ("map", False),
            "timings": ("timings", False)},
    PARTIAL: {"id": ("str", True), "seq": ("int", True), "served_by": ("map", False)},
    READY: {"role": ("role", True), "worker": ("str", True), "models": ("list[str]", True),
            "variant": ("str", False), "capacity": ("int", False), "state": ("state", False),
            "resident_stages": ("int", False), "total_stages": ("int", False),
            "eta_s": ("number", False), "compute_s": ("number", False)},
    HEARTBEAT: {"state": ("state", False), "inflight": ("int", False), "load": ("number", False),
                "resident_stages": ("int", False), "total_stages": ("int", False),
                "eta_s": ("number", False), "compute_s": ("number", False)},
    DISCONNECT: {"reason": ("str", False)},
    DISPATCH: {"id": ("str", True), "model": ("str", True), "timeout_ms": ("timeout", False),
               "options": ("map", False)},
    RESULT: {"id": ("str", True), "status": ("status", True), "error": ("str", False),
             "timings": ("timings", False), "variant": ("str", False)},
    CANCEL: {"id": ("str", True), "reason": ("str", False)},
}  # fmt: skip


class WireError(ValueError):
    """The frames break the document: a receiver drops them."""


@dataclass
class Tensor:
    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def of(cls, dtype: str, shape: list[int], values: list[Any]) -> Tensor:
        code, _ = DTYPES[dtype]
        return cls(dtype, list(shape), struct.pack(f"<{len(values)}{code}", *values))

    def values(self) -> list[Any]:
        code, size = DTYPES[self.dtype]
        return list(struct.unpack(f"<{len(self.data) // size}{code}", self.data))


@dataclass
class Message:
    command: int
    body: dict[str, Any]
    tensors: list[Tensor] = field(default_factory=list)


def encode(command: int, body: dict[str, Any], tensors: Sequence[Tensor] = ()) -> list[bytes]:
    body = dict(body)
    if command in WITH_TENSORS:
        body["tensors"] = [{"dtype": t.dtype, "shape": t.shape} for t in tensors]
    packed = msgpack.packb(body, use_bin_type=True)
    return [SIGNATURE, bytes([command]), packed, *(t.data for t in tensors)]


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        number = int(value)  # section 4: integral floats are integers, within msgpack's
        return number if -(2**63) <= number <= 2**64 - 1 else None
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(kind: str, value: Any) -> Any:
    """`value` as the kind says (an integral float as its int), or WireError."""
    if kind == "str":
        ok = isinstance(value, str)
    elif kind in ("int", "timeout"):
        number = _integer(value)
        if number is None or (kind == "timeout" and abs(number) > MAX_TIMEOUT_MS):
            raise WireError(f"not an integer (or out of range): {value!r}")
        return number
    elif kind == "number":
        ok = _number(value)
    elif kind == "map":
        ok = isinstance(value, dict)
    elif kind == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif kind == "timings":
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and _number(v) for k, v in value.items()
        )
    else:
        ok = isinstance(value, str) and value in {"status": STATUSES, "role": ROLES,
                                                  "state": STATES}[kind]  # fmt: skip
    if not ok:
        raise WireError(f"{kind} expected, got {value!r}")
    return value


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError("ext types are not allowed")


def decode(frames: list[bytes]) -> Message:
    """One message as the document says a receiver must take it, or WireError."""
    if len(frames) < 3 or len(frames) > MAX_FRAMES:
        raise WireError(f"{len(frames)} frames")
    if frames[0] != SIGNATURE:
        raise WireError("another signature")
    if len(frames[1]) != 1 or frames[1][0] not in COMMANDS:
        raise WireError("unknown command")
    if sum(len(f) for f in frames) > MAX_MESSAGE or len(frames[2]) > MAX_BODY:
        raise WireError("too large")
    command = frames[1][0]
    try:
        body = msgpack.unpackb(
            frames[2], raw=False, strict_map_key=True, ext_hook=_refuse_ext,
            max_str_len=MAX_STR, max_bin_len=MAX_BODY, max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
        )  # fmt: skip
    except Exception as exc:
        raise WireError(f"body: {exc}") from None
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise WireError("the body is not a map with string keys")
    for name, (kind, required) in SCHEMA[command].items():
        if body.get(name) is None:
            if required:
                raise WireError(f"missing {name}")
            body.pop(name, None)
            continue
        body[name] = _check(kind, body[name])
    extra = frames[3:]
    tensors: list[Tensor] = []
    if command in WITH_TENSORS:
        specs = body.get("tensors", [])
        if not isinstance(specs, list) or len(specs) != len(extra):
            raise WireError("tensors do not match the frames")
        for spec, data in zip(specs, extra, strict=True):
            tensors.append(_tensor(spec, data))
    elif extra:
        raise WireError("tensor frames on a command without tensors")
    return Message(command, body, tensors)


def _tensor(spec: Any, data: bytes) -> Tensor:
    if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str):
        raise WireError(f"tensor spec {spec!r}")
    if spec["dtype"] not in DTYPES:
        raise WireError(f"dtype {spec['dtype']!r}")
    shape = spec.get("shape")
    dims = [_integer(d) for d in shape] if isinstance(shape, list) else None
    if dims is None or len(dims) > MAX_DIMS or any(d is None or d < 0 for d in dims):
        raise WireError(f"tensor shape {shape!r}")
    if math.prod(d for d in dims if d) > MAX_TENSOR:  # section 2: even of an empty tensor
        raise WireError(f"tensor shape {shape!r}")
    size = math.prod(d for d in dims if d is not None) * DTYPES[spec["dtype"]][1]
    if len(data) > MAX_TENSOR or len(data) != size:
        raise WireError("tensor frame length")
    return Tensor(spec["dtype"], [d for d in dims if d is not None], bytes(data))


# -- the id of a malformed REQUEST (section 5) ---------------------------------------------------


def readable_id(frames: list[bytes]) -> str | None:
    """The id of a REQUEST the coordinator must answer BAD_REQUEST although it is malformed:
    signed CCD1, command REQUEST, the body one well-formed msgpack map of any size whose str key
    "id" holds a UTF-8 str of at most 64 KiB. Walked here byte by byte, without a decoder."""
    if len(frames) < 3 or frames[0] != SIGNATURE or frames[1] != bytes([REQUEST]):
        return None
    raw = bytes(frames[2])
    try:
        head = raw[0]
        if 0x80 <= head <= 0x8F:
            pairs, at = head & 0x0F, 1
        elif head == 0xDE:
            pairs, at = int.from_bytes(raw[1:3], "big"), 3
        elif head == 0xDF:
            pairs, at = int.from_bytes(raw[1:5], "big"), 5
        else:
            return None
        found: str | None = None
        for _ in range(pairs):
            key, _ = _str_at(raw, at)
            at = _skip(raw, at)
            value, _ = _str_at(raw, at)
            end = _skip(raw, at)
            if key == b"id":
                found = None
                if value is not None and len(value) <= MAX_STR:
                    try:
                        found = value.decode()
                    except UnicodeDecodeError:
                        found = None
            at = end
        return found if at == len(raw) else None
    except (IndexError, WireError):
        return None


def _str_at(raw: bytes, at: int) -> tuple[bytes | None, int]:
    head = raw[at]
    if 0xA0 <= head <= 0xBF:
        n, start = head & 0x1F, at + 1
    elif head in (0xD9, 0xDA, 0xDB):
        width = {0xD9: 1, 0xDA: 2, 0xDB: 4}[head]
        n, start = int.from_bytes(raw[at + 1 : at + 1 + width], "big"), at + 1 + width
    else:
        return None, at
    if start + n > len(raw):
        raise WireError("truncated")
    return raw[start : start + n], start + n


# Fixed-size objects: the bytes after the head (nil, bools, floats, ints, fixext).
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9,
          0xD8: 17}  # fmt: skip
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}  # bin, str: length width
_EXT = {0xC7: 1, 0xC8: 2, 0xC9: 4}  # ext: length width, then a type byte


def _skip(raw: bytes, at: int) -> int:
    """Where the msgpack object at `at` ends (WireError if it is not well-formed)."""
    stack = [1]  # objects still to read at each level
    while stack:
        stack[-1] -= 1
        if at >= len(raw):
            raise WireError("truncated")
        head = raw[at]
        at += 1
        count = 0
        if head <= 0x7F or head >= 0xE0:
            pass
        elif 0x80 <= head <= 0x8F:
            count = 2 * (head & 0x0F)
        elif 0x90 <= head <= 0x9F:
            count = head & 0x0F
        elif 0xA0 <= head <= 0xBF:
            at += head & 0x1F
        elif head in _FIXED:
            at += _FIXED[head]
        elif head in _SIZED:
            width = _SIZED[head]
            at += width + int.from_bytes(raw[at : at + width], "big")
        elif head in _EXT:
            width = _EXT[head]
            at += width + 1 + int.from_bytes(raw[at : at + width], "big")
        elif head in (0xDC, 0xDD, 0xDE, 0xDF):
            width = 2 if head in (0xDC, 0xDE) else 4
            count = int.from_bytes(raw[at : at + width], "big") * (2 if head >= 0xDE else 1)
            at += width
        else:
            raise WireError(f"byte 0x{head:02x} starts no msgpack object")
        if at > len(raw):
            raise WireError("truncated")
        if count:
            if count > len(raw):
                raise WireError("more items than bytes")
            stack.append(count)
        while stack and stack[-1] == 0:
            stack.pop()
    return at
