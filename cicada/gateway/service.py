"""The gateway's state, as every endpoint reaches it (`gateway(request)`): its configuration,
the models' metadata, and the one SDK client (`cicada.AsyncClient`: many calls in flight on one
connection) it talks to the coordinator through."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import Request

from cicada.client import AsyncClient, CurveConfig, InvokeResult
from cicada.common.defaults import DEFAULT_ADDRESS, DEFAULT_TIMEOUT_S
from cicada.errors import CallError
from cicada.gateway.defaults import DEFAULT_MAX_BODY_BYTES
from cicada.gateway.errors import HttpError, bad_request, from_call_error
from cicada.gateway.models import Catalog
from cicada.gateway.requests import Admission


@dataclass(frozen=True)
class GatewayConfig:
    """How one gateway runs (the `cicada gateway` options)."""

    coordinator: str = DEFAULT_ADDRESS
    packages: tuple[tuple[str, Path], ...] = ()
    metrics_url: str | None = None
    curve: CurveConfig | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


@dataclass
class Gateway:
    """What every endpoint reaches through `gateway(request)`."""

    config: GatewayConfig
    catalog: Catalog
    client: AsyncClient | None = field(default=None)

    async def invoke(
        self,
        model: str,
        inputs: list[np.ndarray] | None,
        admission: Admission,
        **call: Any,
    ) -> InvokeResult:
        """One call through the coordinator; its errors become `HttpError`s."""
        with sdk_errors():
            return await self.sdk.invoke(
                model, inputs, priority=admission.priority, deadline=admission.deadline_s, **call
            )

    @property
    def sdk(self) -> AsyncClient:
        if self.client is None:
            raise HttpError(503, "the gateway is starting or stopping", retry_after=1.0)
        return self.client


@contextlib.contextmanager
def sdk_errors() -> Iterator[None]:
    """SDK errors as HTTP answers: a call's status (`from_call_error`), or a ValueError from
    the SDK's own checks of the call (400)."""
    try:
        yield
    except CallError as exc:
        raise from_call_error(exc) from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def gateway(request: Request) -> Gateway:
    found: Gateway = request.app.state.gateway
    return found
