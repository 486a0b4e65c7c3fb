"""The stage source for each device kind, and the check that refuses any other kind by name."""

from __future__ import annotations

from collections.abc import Sequence

from cicada.cloud.loading.base import StageSource
from cicada.cloud.loading.cpu import CpuStageSource
from cicada.cloud.loading.cuda import CudaStageSource
from cicada.common.errors import CicadaError

SOURCES: dict[str, type[StageSource]] = {
    source.kind: source for source in (CpuStageSource, CudaStageSource)
}


def device_kind(device: str, supported: Sequence[str] | None = None, who: str = "Cicada") -> str:
    """The kind of `device` ("cuda" for "cuda:1"), or a CicadaError naming the supported ones."""
    kinds = tuple(SOURCES) if supported is None else tuple(supported)
    kind = device.split(":", 1)[0]
    if kind not in kinds:
        raise CicadaError(
            f"{who} cannot use device {device!r}: the supported device kinds are {', '.join(kinds)}"
        )
    return kind


def source_for(device: str) -> type[StageSource]:
    """The stage source class for `device`; any kind without one is refused by name."""
    return SOURCES[device_kind(device)]
