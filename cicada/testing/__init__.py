"""Testing helpers that stand on the package: in-memory transports for code that uses the
client, and real processes on loopback for tests and benchmarks.

* `MockTransport`, `AsyncMockTransport` (`cicada.testing.mock`): a client's whole wire path
  with no sockets at all;
* `Stack`, `make_assets`, `free_port`, ... (`cicada.testing.stack`): coordinator, edge agents
  and cloud workers as `python -m cicada ...` processes on free ports;
* `RecordingTransport`, `RecordingAsyncTransport` (`cicada.testing.recording`): the SDK's
  ZeroMQ transports, noting the id of every REPLY that reaches the socket;
* `StandInCoordinator` (`cicada.testing.standin`): a bare ROUTER playing coordinator to one
  real worker process.

Only the mock transports are imported here; the rest load on first use (psutil, zmq), and
nothing here imports torch until a helper that packs a model is called.
"""

from __future__ import annotations

import importlib
from typing import Any

from cicada.testing.mock import AsyncMockTransport, MockTransport

_LAZY = {
    "ROOT": "stack",
    "Stack": "stack",
    "StackError": "stack",
    "curve_handshake": "stack",
    "dump_json": "stack",
    "free_port": "stack",
    "make_assets": "stack",
    "process_cmdline": "stack",
    "process_running": "stack",
    "tiny_gpt2_config": "stack",
    "RecordingAsyncTransport": "recording",
    "RecordingTransport": "recording",
    "StandInCoordinator": "standin",
}

__all__ = ["AsyncMockTransport", "MockTransport", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
