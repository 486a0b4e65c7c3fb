"""The SDK's errors as HTTP statuses (docs/GATEWAY.md, "Errors"): each REPLY status the
coordinator can send, raised by the SDK's own `raise_for_reply`, mapped by the gateway."""

from __future__ import annotations

import pytest

from cicada.common.protocol import Reply, Status
from cicada.errors import (
    CallError,
    KeyRefused,
    NoCoordinator,
    Timeout,
    TransportError,
    raise_for_reply,
)
from cicada.gateway.errors import from_call_error


def _raised(reply: Reply) -> CallError:
    with pytest.raises(CallError) as caught:
        raise_for_reply(reply)
    return caught.value


@pytest.mark.parametrize(
    ("status", "error", "retry_ms", "http", "code", "retry_after"),
    [
        (Status.BAD_REQUEST, "input 'input': expected dtype int64", None, 400, "bad_request", None),
        (Status.BAD_REQUEST, "unknown model 'x'; this coordinator serves: gpt2", None, 404,
         "model_not_found", None),
        (Status.REJECTED, "queue full", 2500, 429, "rejected", "3"),  # rounded up
        (Status.REJECTED, "not allowed", None, 429, "rejected", "1"),
        (Status.UNAVAILABLE, "no worker", 200, 503, "unavailable", "1"),
        (Status.TIMEOUT, "deadline passed", None, 504, "deadline_exceeded", None),
        (Status.FAILED, "AssertionError", None, 500, "model_failed", None),
    ],
)  # fmt: skip
def test_reply_statuses_map_to_http(
    status: Status, error: str, retry_ms: int | None, http: int, code: str,
    retry_after: str | None,
) -> None:  # fmt: skip
    mapped = from_call_error(_raised(Reply("r1", status, error=error, retry_after_ms=retry_ms)))
    assert (mapped.status, mapped.code) == (http, code)
    assert mapped.headers.get("Retry-After") == retry_after
    body = mapped.openai_body()["error"]
    assert error in body["message"] and body["code"] == code


def test_client_side_failures() -> None:
    timeout = Timeout("no reply within 2 s", side="client", request_id="r2")
    assert from_call_error(timeout).status == 504
    broken = TransportError("the connection failed", request_id="r3")
    assert from_call_error(broken).status == 502
    assert from_call_error(broken).kserve_body() == {"error": "the connection failed"}
    nobody = NoCoordinator("nobody answers at tcp://127.0.0.1:9", request_id="r4")
    assert from_call_error(nobody).status == 503
    assert from_call_error(nobody).headers["Retry-After"] == "1"
    refused = KeyRefused("the coordinator refused this client's key", request_id="r5")
    assert from_call_error(refused).status == 502
    assert from_call_error(refused).openai_body()["error"]["code"] == "coordinator_refused_key"
