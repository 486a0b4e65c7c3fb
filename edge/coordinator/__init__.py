"""The coordinator: one ROUTER between clients and the edge agents / cloud workers.

One module per concept (docs/PROTOCOL.md describes the wire side):

* `broker`: the Coordinator, its socket loop and CURVE setup
* `policy`: where a request should run, a pure function of snapshots
* `lifecycle`: launching and stopping cloud workers on demand
* `config`: the coordinator's TOML configuration file
* `metrics`: the Prometheus endpoint; `status`: `cicada status`, which reads it

`from cicada.edge.coordinator import Coordinator` works without naming the module, but is
resolved on first use: importing `cicada.edge.coordinator.status` (for `cicada status`) or
`.policy` does not load the broker, its sockets and numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cicada.edge.coordinator.broker import Coordinator, CoordinatorConfig, RawTensor

_EXPORTS = {
    "Coordinator": "cicada.edge.coordinator.broker",
    "CoordinatorConfig": "cicada.edge.coordinator.broker",
    "RawTensor": "cicada.edge.coordinator.broker",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["Coordinator", "CoordinatorConfig", "RawTensor"]
