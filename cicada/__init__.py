"""Cicada: edge-cloud cooperative inference that hides serverless cold starts.

The client SDK, imported on first use so that `import cicada` stays cheap (and never reaches
numpy, zmq or torch):

    from cicada import Client
    with Client("tcp://127.0.0.1:5555") as client:
        result = client.invoke("gpt2", ids, deadline=0.5)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cicada.client import AsyncClient, Client, CurveConfig, InvokeResult
    from cicada.errors import (
        BadRequest,
        CallError,
        ClientError,
        Failed,
        Rejected,
        Timeout,
        TransportError,
        Unavailable,
    )

__all__ = [
    "AsyncClient",
    "BadRequest",
    "CallError",
    "Client",
    "ClientError",
    "CurveConfig",
    "Failed",
    "InvokeResult",
    "Rejected",
    "Timeout",
    "TransportError",
    "Unavailable",
]

_HOME = {
    "AsyncClient": "cicada.client",
    "Client": "cicada.client",
    "CurveConfig": "cicada.client",
    "InvokeResult": "cicada.client",
    "BadRequest": "cicada.errors",
    "CallError": "cicada.errors",
    "ClientError": "cicada.errors",
    "Failed": "cicada.errors",
    "Rejected": "cicada.errors",
    "Timeout": "cicada.errors",
    "TransportError": "cicada.errors",
    "Unavailable": "cicada.errors",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'cicada' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
