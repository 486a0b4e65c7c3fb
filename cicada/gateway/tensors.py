"""KServe v2 tensors: JSON `data`, and the binary-data extension (Triton's
`binary_tensor_data`: the JSON header's length in `Inference-Header-Content-Length`, then each
binary tensor's raw bytes in order, sized by its `parameters.binary_data_size`).

Everything here comes from the network: every field is checked before it is used and every
failure is a 400 naming the tensor (`HttpError`), never a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cicada.common.protocol import DEFAULT_LIMITS, too_vast
from cicada.gateway import jsonio
from cicada.gateway.errors import bad_request

HEADER_LENGTH = "inference-header-content-length"
MAX_RANK = 8  # the protocol's bound (docs/PROTOCOL.md section 9)
MAX_TENSORS = 61  # 64 frames less the signature, command and body
MAX_ELEMENTS = DEFAULT_LIMITS.max_tensor_bytes  # no tensor the protocol carries has more

# KServe datatype -> numpy dtype (little-endian, as the wire and the protocol's frames are).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
NAMES: dict[str, str] = {dtype.name: name for name, dtype in DATATYPES.items()}
# numpy kinds a JSON array may parse to, per target kind: ints are floats' subset.
_ACCEPTED_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}


def datatype_of(dtype: np.dtype[Any] | str) -> str:
    """The KServe name of a numpy dtype ("float32" -> "FP32"); "BYTES" for what has none."""
    return NAMES.get(np.dtype(dtype).name, "BYTES")


def decode_inputs(inputs: Any, binary: memoryview | None) -> list[tuple[str, np.ndarray]]:
    """The request's `inputs` as (name, array) pairs, in order."""
    if not isinstance(inputs, list) or not inputs:
        raise bad_request("'inputs' must be a non-empty list of tensors", "inputs")
    if len(inputs) > MAX_TENSORS:
        raise bad_request(f"at most {MAX_TENSORS} input tensors, got {len(inputs)}", "inputs")
    offset = 0
    out = []
    for i, entry in enumerate(inputs):
        name, array, used = _decode_one(entry, i, binary, offset)
        offset += used
        out.append((name, array))
    if binary is not None and offset != len(binary):
        raise bad_request(
            f"the binary section holds {len(binary)} bytes but the inputs claim {offset}"
        )
    return out


def _decode_one(
    entry: Any, i: int, binary: memoryview | None, offset: int
) -> tuple[str, np.ndarray, int]:
    if not isinstance(entry, dict):
        raise bad_request(f"inputs[{i}] must be an object", "inputs")
    name = entry.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 256:
        raise bad_request(f"inputs[{i}].name must be a non-empty string", "inputs")
    where = f"input {name!r}"
    datatype = entry.get("datatype")
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise bad_request(
            f"{where}: datatype {datatype!r} is not one of {sorted(DATATYPES)}", "datatype"
        )
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise bad_request(
            f"{where}: shape must be a list of at most {MAX_RANK} non-negative integers, "
            f"got {str(shape)[:100]}",
            "shape",
        )
    if too_vast(shape):  # even an empty tensor's (the protocol's bound)
        raise bad_request(f"{where}: shape {shape} names more than {MAX_ELEMENTS} elements",
                          "shape")  # fmt: skip
    count = math.prod(shape)
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request(f"{where}: parameters must be an object", "parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        return name, _from_binary(where, dtype, shape, count, size, binary, offset), size
    if "data" not in entry:
        raise bad_request(f"{where} has neither 'data' nor parameters.binary_data_size", "data")
    return name, _from_json(where, dtype, shape, count, entry["data"]), 0


def _from_binary(
    where: str, dtype: np.dtype[Any], shape: list[int], count: int, size: Any,
    binary: memoryview | None, offset: int,
) -> np.ndarray:  # fmt: skip
    if binary is None:
        raise bad_request(
            f"{where} claims binary data but the request has no Inference-Header-Content-Length"
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise bad_request(f"{where}: binary_data_size must be a non-negative integer")
    if size != count * dtype.itemsize:
        raise bad_request(
            f"{where}: binary_data_size {size} does not match shape {shape} of "
            f"{datatype_of(dtype)} ({count * dtype.itemsize} bytes)",
            "shape",
        )
    if offset + size > len(binary):
        raise bad_request(f"{where}: the binary section ends before its {size} bytes")
    return np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)


def _from_json(
    where: str, dtype: np.dtype[Any], shape: list[int], count: int, data: Any
) -> np.ndarray:
    if not isinstance(data, list):
        raise bad_request(f"{where}: data must be a (flat or nested) list", "data")
    try:
        parsed = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise bad_request(f"{where}: data is not a regular array of numbers ({exc})") from None
    if parsed.size != count:
        raise bad_request(
            f"{where}: data holds {parsed.size} values but shape {shape} needs {count}", "shape"
        )
    kind = dtype.kind
    if count and parsed.dtype.kind not in _ACCEPTED_KINDS[kind]:
        raise bad_request(
            f"{where}: data of {parsed.dtype.name} values cannot be {datatype_of(dtype)}",
            "datatype",
        )
    if count and kind in "iu":
        info = np.iinfo(dtype)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise bad_request(f"{where}: a value is outside the range of {datatype_of(dtype)}")
    return parsed.astype(dtype, copy=False).reshape(shape)


def encode_outputs(
    names: Sequence[str], arrays: Sequence[np.ndarray], binary: Sequence[bool]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The response's `outputs` entries and, in order, the raw bytes of those sent binary."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array, as_binary in zip(names, arrays, binary, strict=True):
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        if as_binary:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = jsonio.array_data(array)
        entries.append(entry)
    return entries, chunks
