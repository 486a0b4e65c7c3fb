"""The coordinator: one ROUTER between clients and the edge agents / cloud workers.

One module per concept (docs/PROTOCOL.md describes the wire side):

* `broker`: the Coordinator, its socket loop and CURVE setup; it composes the rest
* `registry`: the registered workers, their state, residency and slots
* `scheduler`: admission, the per-priority queues and deadlines, the refusal replies
* `relay`: streamed generations, and their handoff from an edge agent to the cloud
* `policy`: where a request should run, a pure function of snapshots
* `lifecycle`: launching and stopping cloud workers on demand
* `config`: the coordinator's TOML configuration file
* `metrics`: the Prometheus endpoint; `status`: `cicada status`, which reads it

`from cicada.edge.coordinator import Coordinator` works without naming the module, but is
resolved on first use: importing `cicada.edge.coordinator.status` (for `cicada status`) or
`.policy` does not load the broker, its sockets and numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cicada.edge.coordinator.broker import Coordinator, CoordinatorConfig, RawTensor

__all__ = ["Coordinator", "CoordinatorConfig", "RawTensor"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from cicada.edge.coordinator import broker

    return getattr(broker, name)
