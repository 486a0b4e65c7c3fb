"""Every load strategy by name: what `cicada run --strategy` and benchmarks/cold_start.py choose
from. Each is a `Loader` (cloud/loading/loader.py) in a file of its own; adding one is a new
file and one line here.

* ``cicada``  the cold-start pipeline (cloud/pipeline.py).
* ``meta``    what accelerate/transformers do: parameters on meta with init skipped, the
              safetensors mmap loader, `load_state_dict(assign=True)`, run.
* ``naive``   build with init, read the whole weights file, `load_state_dict`, run.
* ``pisel``   layer by layer in lockstep (PISeL-style); nothing overlaps.

Peer loaders (``peer-*``), in the same harness and on the same package: each builds the model
as ``meta`` does (MiniLoader: init skipped; on CPU, or on a GPU with parameters on meta and
buffers on the device), loads the same weights with the peer library in its CPU mode, or its
GPU mode with ``--device cuda``, into a state dict (lane "read"), hands it to
``load_state_dict(strict=True, assign=True)`` (lane "apply") and runs one forward under
``torch.inference_mode`` (lane "compute"). Importing the peer library is timed on the "import"
lane. The libraries are optional (the ``bench`` extra) and imported lazily.

Torch-free, as every strategy module is until `run`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cicada.cloud.loading.cicada import CicadaLoader
from cicada.cloud.loading.loader import Loader
from cicada.cloud.loading.meta import MetaLoader
from cicada.cloud.loading.naive import NaiveLoader
from cicada.cloud.loading.peer_fastsafetensors import FastsafetensorsLoader
from cicada.cloud.loading.peer_runai import RunaiLoader
from cicada.cloud.loading.peer_tensorizer import TensorizerLoader
from cicada.cloud.loading.pisel import PiselLoader
from cicada.cloud.timeline import Timeline
from cicada.common.errors import CicadaError

STRATEGIES: dict[str, type[Loader]] = {}


def register_strategy(loader: type[Loader]) -> type[Loader]:
    if loader.name in STRATEGIES:
        raise ValueError(f"strategy {loader.name!r} is registered twice")
    STRATEGIES[loader.name] = loader
    return loader


for _loader in (
    CicadaLoader, MetaLoader, NaiveLoader, PiselLoader,
    TensorizerLoader, RunaiLoader, FastsafetensorsLoader,
):  # fmt: skip
    register_strategy(_loader)


def strategy_names() -> tuple[str, ...]:
    return tuple(STRATEGIES)


def builtin_strategies() -> tuple[str, ...]:
    """The strategies that need no optional library, ``cicada`` first."""
    return tuple(name for name, loader in STRATEGIES.items() if loader.library is None)


def optional_libraries() -> dict[str, tuple[str, str]]:
    """Strategy -> (import name, pip distribution) of the optional library it needs."""
    return {name: loader.library for name, loader in STRATEGIES.items() if loader.library}


def get_strategy(name: str) -> type[Loader]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise CicadaError(
            f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}"
        ) from None


def open_strategy(
    name: str,
    package_dir: Path | str,
    *,
    device: str = "cpu",
    timeline: Timeline | None = None,
    on_residency: Callable[[Any], None] | None = None,
) -> Loader:
    """Open a cold start of `package_dir` with strategy `name` (before `import torch`)."""
    return get_strategy(name)(
        package_dir, device=device, timeline=timeline, on_residency=on_residency
    )
