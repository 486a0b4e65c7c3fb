"""Every error Cicada raises on purpose, as one tree (all importable from here).

    CicadaError                  base of every error raised on purpose
    ├── CallError                a call ended without outputs: `request_id`, `status`, `served_by`
    │   ├── ClientError          the coordinator or a worker said why (the status)
    │   │   ├── Timeout          TIMEOUT from the coordinator, or no reply within the client's
    │   │   │   │                own timeout; `side` says which ("coordinator" or "client")
    │   │   │   └── WorkerHung   TIMEOUT while the request ran on a worker (`served_by` names
    │   │   │                    it): the worker is hung or overloaded
    │   │   ├── Rejected         REJECTED: the priority's queue is full, or the caller is not
    │   │   │                    allowed; back off (`retry_after` seconds, when it is said)
    │   │   ├── Unavailable      UNAVAILABLE: nobody can serve the model now; `retry_after` s
    │   │   ├── BadRequest       BAD_REQUEST: unknown model, inputs the model refuses, a
    │   │   │                    malformed request (also raised before sending inputs that
    │   │   │                    cannot travel)
    │   │   └── Failed           FAILED: the model raised while running
    │   └── TransportError       the connection let the call down: a malformed reply, a send
    │       │                    queue that is full (wraps a `ProtocolError` as __cause__)
    │       ├── NoCoordinator    no coordinator answers at the endpoint (nothing listens, or
    │       │                    something that is not a coordinator); found out in seconds
    │       └── KeyRefused       the coordinator refused this client's CURVE key (or wants
    │                            keys the client has not got): the handshake failed
    ├── ProtocolError            a frame or message does not follow docs/PROTOCOL.md
    ├── EndpointError            an endpoint that cannot be one (also a ValueError)
    ├── GenerationError          generation options or prompt unusable (also a ValueError;
    │                            a worker answers it BAD_REQUEST)
    ├── InputError               inputs the model does not take: dtype, rank, context length
    │                            (also a ValueError; a worker answers it BAD_REQUEST)
    ├── TextError                text cannot become model inputs (no tokenizer, bad `text`)
    ├── PackageError             a model package is missing, malformed or does not match its model
    │   ├── PackageFormatError       manifest unreadable, unknown/newer format version, bad field
    │   ├── PackageIntegrityError    a file's size, hash or a stage checksum does not match
    │   ├── PackageMismatchError     a tensor is missing, extra, or has the wrong shape/dtype
    │   ├── UntrustedCodeError       the factory is outside the allow-list (no trust flag given)
    │   ├── LoadStalledError         a stage did not become resident within the load's bound
    │   ├── MissingExtraError        an optional library (transformers, torchvision) is missing
    │   └── UnknownModelError        the library has no model (class) of that name
    ├── StagingError             a model's stages cannot be determined as declared
    ├── DeviceError              the accelerator failed (out of memory, a CUDA error)
    ├── ConfigError              the coordinator's config file is missing, not TOML, or invalid
    ├── LaunchError              a cloud worker could not be started
    ├── EdgeModelError           an edge (ONNX) model cannot be loaded, or refuses its inputs
    └── EdgeExportError          an edge model cannot be exported as asked

The client's errors (`ClientError`, `TransportError`) are defined here; the rest live in
`cicada.common.errors` (torch-free, so that every role can raise them) and are re-exported.

A `CallError` carries `request_id`, `status` (a `Status`; None where no status applies) and
`served_by` (`{role, worker, variant}`, None when not known), and its message says what to do
next. Programming mistakes (a bad argument, a closed client) raise ValueError/RuntimeError.
"""

from __future__ import annotations

from typing import Any, Literal

from cicada.common.errors import (
    CicadaError,
    ConfigError,
    DeviceError,
    EdgeExportError,
    EdgeModelError,
    EndpointError,
    GenerationError,
    InputError,
    LaunchError,
    LoadStalledError,
    MissingExtraError,
    PackageError,
    PackageFormatError,
    PackageIntegrityError,
    PackageMismatchError,
    ProtocolError,
    RegistrationRefused,
    StagingError,
    TextError,
    UnknownModelError,
    UntrustedCodeError,
)
from cicada.common.protocol import Reply, Status

__all__ = [
    "BadRequest",
    "CallError",
    "CicadaError",
    "ClientError",
    "ConfigError",
    "DeviceError",
    "EdgeExportError",
    "EdgeModelError",
    "EndpointError",
    "Failed",
    "GenerationError",
    "InputError",
    "KeyRefused",
    "LaunchError",
    "LoadStalledError",
    "MissingExtraError",
    "NoCoordinator",
    "PackageError",
    "PackageFormatError",
    "PackageIntegrityError",
    "PackageMismatchError",
    "ProtocolError",
    "RegistrationRefused",
    "Rejected",
    "StagingError",
    "TextError",
    "Timeout",
    "TransportError",
    "Unavailable",
    "UnknownModelError",
    "UntrustedCodeError",
    "WorkerHung",
    "raise_for_reply",
]

TimeoutSide = Literal["coordinator", "client"]


class CallError(CicadaError):
    """A call did not end with outputs; says which request, with which status, served where."""

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        status: Status | None = None,
        served_by: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.status = status
        self.served_by = served_by


class ClientError(CallError):
    """A call ended with a status other than OK (or with no reply in time)."""


class Timeout(ClientError):
    """The deadline passed at the coordinator, or the client stopped waiting (`side`)."""

    def __init__(
        self,
        message: str,
        *,
        side: TimeoutSide,
        request_id: str | None = None,
        served_by: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id, status=Status.TIMEOUT, served_by=served_by)
        self.side: TimeoutSide = side


class WorkerHung(Timeout):
    """The deadline passed while a worker ran the request (`served_by` names it): the worker
    is hung or overloaded. Look at its log and `cicada status`; retry with a larger deadline."""


class Rejected(ClientError):
    """Back-pressure: the priority's queue is full, or the caller is not allowed; back off
    (`retry_after` seconds when the coordinator says)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        request_id: str | None = None,
        served_by: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            message, request_id=request_id, status=Status.REJECTED, served_by=served_by
        )
        self.retry_after = retry_after


class Unavailable(ClientError):
    """Nobody can serve the model now; retry after `retry_after` seconds (None: not said)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        request_id: str | None = None,
        served_by: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            message, request_id=request_id, status=Status.UNAVAILABLE, served_by=served_by
        )
        self.retry_after = retry_after


class BadRequest(ClientError):
    """The request cannot be served as it is: fix it before retrying."""


class Failed(ClientError):
    """The model raised while running the request."""


class TransportError(CallError):
    """The socket let the call down: a malformed reply, or a message that could not be queued."""


class NoCoordinator(TransportError):
    """Nobody answers at the endpoint: nothing listens there, or what listens is not a
    coordinator. Raised within the client's `connect_timeout`, before the request is sent."""


class KeyRefused(TransportError):
    """The coordinator did not accept this client's CURVE handshake: its key is not on the
    coordinator's allow-list, the server key is not the coordinator's, or the coordinator
    wants keys and the client has none."""


_ADVICE: dict[Status, str] = {
    Status.TIMEOUT: "the deadline passed before a result; retry with a larger deadline",
    Status.BAD_REQUEST: "fix the request (model name, input count, dtypes and shapes)",
    Status.FAILED: "the model raised while running; see the worker's log",
}

_BY_STATUS: dict[Status, type[ClientError]] = {
    Status.BAD_REQUEST: BadRequest,
    Status.FAILED: Failed,
}


def raise_for_reply(reply: Reply) -> None:
    """Raise the `ClientError` for a reply's status; return quietly for OK."""
    if reply.status is Status.OK:
        return
    served_by = reply.served_by or None
    where = ""
    if served_by:
        where = f" by {served_by.get('role', '?')} worker {served_by.get('worker', '?')}"
    head = f"{reply.status.value} for request {reply.id}{where}"
    detail = f": {reply.error}" if reply.error else ""
    retry_after = None if reply.retry_after_ms is None else reply.retry_after_ms / 1000
    when = "later" if retry_after is None else f"in {retry_after:g} s"
    if reply.status is Status.UNAVAILABLE:
        raise Unavailable(
            f"{head}{detail}; nobody can serve the model now, retry {when}",
            retry_after=retry_after,
            request_id=reply.id,
            served_by=served_by,
        )
    if reply.status is Status.REJECTED:
        raise Rejected(
            f"{head}{detail}; the queue is full or the caller is not allowed, back off and "
            f"retry {when}",
            retry_after=retry_after,
            request_id=reply.id,
            served_by=served_by,
        )
    message = f"{head}{detail}; {_ADVICE.get(reply.status, 'the call did not succeed')}"
    if reply.status is Status.TIMEOUT:
        if served_by:  # it was running there: the worker did not finish in time
            raise WorkerHung(
                f"{head}{detail}; the worker may be hung or overloaded: see its log and "
                "`cicada status`, or retry with a larger deadline",
                side="coordinator",
                request_id=reply.id,
                served_by=served_by,
            )
        raise Timeout(message, side="coordinator", request_id=reply.id, served_by=served_by)
    cls = _BY_STATUS.get(reply.status, ClientError)  # a status newer than this client: generic
    raise cls(message, request_id=reply.id, status=reply.status, served_by=served_by)
