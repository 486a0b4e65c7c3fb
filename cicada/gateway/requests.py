"""What every endpoint reads from a request before it calls the coordinator: a body no larger
than the cap, JSON that is one object, and the call's priority and deadline (docs/GATEWAY.md,
"Priority and deadline")."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from cicada.common.defaults import NORMAL, PRIORITIES
from cicada.gateway import jsonio
from cicada.gateway.errors import HttpError, bad_request

PRIORITY_PARAM = "priority"
DEADLINE_PARAM = "deadline_ms"
MAX_DEADLINE_MS = 86_400_000  # a day: the protocol's bound on a budget (PROTOCOL.md section 4)


async def read_body(request: Request, cap: int) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed `cap` bytes: from the
    Content-Length header before anything is read, else while it streams in."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length is not a number")
        if int(declared) > cap:
            raise too_large(int(declared), cap)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_large(size, cap)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int, cap: int) -> HttpError:
    return HttpError(
        413,
        f"the request body ({size} bytes or more) exceeds the gateway's cap of {cap} bytes "
        "(--max-body-bytes); send smaller batches",
        code="request_too_large",
    )


def parse_json(raw: bytes | str, what: str = "the request body") -> dict[str, Any]:
    """One JSON object, or 400 naming what is wrong."""
    try:
        doc = jsonio.loads(raw)
    except ValueError as exc:  # orjson.JSONDecodeError: malformed, not UTF-8, too deep
        raise bad_request(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise bad_request(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


@dataclass(frozen=True)
class Admission:
    """How the coordinator is asked to treat a call: its priority (0 latency-critical, 1
    normal, 2 quality-seeking) and its deadline in seconds (None: the gateway's timeout)."""

    priority: int = NORMAL
    deadline_s: float | None = None


def admission(request: Request, params: Mapping[str, Any] | None) -> Admission:
    """Priority and deadline from the headers, overridden by the request's own parameters
    (OpenAI: body fields; KServe: `parameters`). A deadline of 0 or less has passed: 504."""
    params = params or {}
    priority, where = _given(request, params, "X-Cicada-Priority", PRIORITY_PARAM)
    if priority is None:
        priority = NORMAL
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int | float)
        or (priority not in PRIORITIES)
    ):
        raise bad_request(f"{where} must be one of {PRIORITIES}, got {priority!r}", PRIORITY_PARAM)
    deadline, where = _given(request, params, "X-Cicada-Deadline-Ms", DEADLINE_PARAM)
    if deadline is None:
        return Admission(int(priority))
    if (
        isinstance(deadline, bool)
        or not isinstance(deadline, int | float)
        or not (math.isfinite(deadline) and deadline <= MAX_DEADLINE_MS)
    ):
        raise bad_request(
            f"{where} must be a number of milliseconds up to {MAX_DEADLINE_MS}, got {deadline!r}",
            DEADLINE_PARAM,
        )
    if deadline <= 0:
        raise HttpError(504, f"{where} is {deadline:g} ms: the deadline has passed",
                        code="deadline_exceeded")  # fmt: skip
    return Admission(int(priority), deadline / 1000)


def _given(request: Request, params: Mapping[str, Any], header: str, param: str) -> tuple[Any, str]:
    """(the value, where it came from): the parameter if given, else the header as a number."""
    if params.get(param) is not None:
        return params[param], f"parameter {param!r}"
    where = f"header {header}"
    value = request.headers.get(header)
    if value is None:
        return None, where
    try:
        return float(value), where
    except ValueError:
        raise bad_request(f"{where} must be a number, got {value[:64]!r}", param) from None
