"""HTTP outcomes: `HttpError` says what went wrong and with which status; `from_call_error`
maps the SDK's errors (cicada/errors.py) to those statuses (docs/GATEWAY.md, "Errors").

    BadRequest    400 (404 when the coordinator does not know the model)
    Rejected      429 + Retry-After      Unavailable   503 + Retry-After
    Timeout       504                    Failed        500
    NoCoordinator 503 + Retry-After      KeyRefused    502 (the gateway's CURVE key)
    TransportError, any other CallError  502 (the coordinator let the gateway down)
"""

from __future__ import annotations

import math

from cicada.errors import (
    BadRequest,
    CallError,
    Failed,
    KeyRefused,
    NoCoordinator,
    Rejected,
    Timeout,
    Unavailable,
)

# The coordinator's BAD_REQUEST for a model it does not know starts so (docs/PROTOCOL.md
# section 5): that one is a 404, the rest of BAD_REQUEST a 400.
UNKNOWN_MODEL_PREFIX = "unknown model"

# OpenAI's error `type` by status, as its API uses them (the client maps the status itself).
_OPENAI_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class HttpError(Exception):
    """One request's failure as the HTTP client sees it. `code` is a short machine-readable
    name (OpenAI's `code`), `param` the offending field, `retry_after` seconds (429/503)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        # Retry-After takes whole seconds; rounding down would invite a retry that is too early.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def openai_body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": _OPENAI_TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def kserve_body(self) -> dict[str, object]:
        return {"error": self.message}


def bad_request(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, message, code="invalid_request", param=param)


def unknown_model(name: str) -> HttpError:
    return HttpError(404, f"unknown model {name[:256]!r}", code="model_not_found", param="model")


def from_call_error(exc: CallError) -> HttpError:
    """The HTTP answer to a call the SDK ended with an error."""
    message = str(exc)
    if isinstance(exc, BadRequest):
        if message.startswith("BAD_REQUEST") and UNKNOWN_MODEL_PREFIX in message:
            return HttpError(404, message, code="model_not_found", param="model")
        return HttpError(400, message, code="bad_request")
    if isinstance(exc, Rejected):
        return HttpError(429, message, code="rejected", retry_after=exc.retry_after or 1.0)
    if isinstance(exc, Unavailable):
        return HttpError(503, message, code="unavailable", retry_after=exc.retry_after or 1.0)
    if isinstance(exc, Timeout):
        return HttpError(504, message, code="deadline_exceeded")
    if isinstance(exc, Failed):
        return HttpError(500, message, code="model_failed")
    if isinstance(exc, KeyRefused):  # the gateway's own configuration: not the caller's
        return HttpError(502, message, code="coordinator_refused_key")
    if isinstance(exc, NoCoordinator):
        return HttpError(503, message, code="no_coordinator", retry_after=1.0)
    return HttpError(502, message, code="coordinator_error")
