"""The stage-source protocol: where a cold start's stage bytes come from, and how compute waits
for them.

`ColdStart` (cloud/pipeline.py) keeps residency, hooks and the timeline; a `StageSource` owns
the bytes. One source per device kind (cloud/loading/sources.py):

* ``cpu``  (cloud/loading/cpu.py)  reader threads hash each stage of a copy-on-write mapping,
  before torch is imported; tensors are zero-copy views of the mapping, applied by the pipeline.
* ``cuda`` (cloud/loading/cuda.py) reader threads fill a host ring from before torch; after
  construction each stage's one device buffer is filled on a stream of its own, the
  parameters being views into it; compute waits on a per-stage event.

Torch-free: `cicada run` opens the source before `import torch`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from cicada.common.errors import CicadaError, DeviceError, PackageIntegrityError
from cicada.common.package import Manifest, StageEntry

if TYPE_CHECKING:
    import torch

    from cicada.cloud.miniloader import Slot
    from cicada.cloud.timeline import Timeline


@dataclass(frozen=True)
class StageRead:
    """Outcome of reading one stage: `error` is None when its bytes checked out."""

    stage: StageEntry
    start: float
    end: float
    error: CicadaError | None = None


OnStage = Callable[[StageRead], None]


class StageSource:
    """Where stage bytes come from. Called by the pipeline in this order:

    1. `start(on_stage)` in `ColdStart.__init__`, before torch: begin whatever needs no torch.
       `on_stage` is called (from any thread) once per stage, verified or not.
    2. `construction()`: the context the model is constructed under (a device, or nothing).
    3. `attach(slots)`: the model is built; where each tensor goes is known.
    4. `tensors(stage)` for each verified stage, unless `in_place` (the source already wrote
       the bytes into the model's own storage, and there is nothing to apply).
    5. `abandon()` from any thread if the load fails, whatever failed; `join(timeout)` to wait
       for the source's own threads to end (before a process exits after a failure).
    6. `order_compute_after(stages)` before a module runs whose stages are resident, and
       `synchronize()` when the forward ends.
    """

    kind: ClassVar[str]
    in_place: ClassVar[bool] = False

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        device: str,
        timeline: Timeline,
        *,
        verify: bool = True,
        threads: int | None = None,
    ) -> None:
        """`threads`: reader threads; None: the source's default."""
        self.path, self.manifest, self.device, self.timeline = path, manifest, device, timeline
        self.verify, self.threads = verify, threads

    def start(self, on_stage: OnStage) -> None:
        raise NotImplementedError

    def construction(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def attach(self, slots: dict[str, list[Slot]]) -> None:
        """The model is constructed; `slots` maps every stored tensor to its places in it."""

    def tensors(self, stage: StageEntry) -> Iterator[tuple[str, torch.Tensor]]:
        """A verified stage's tensors, by stored name, to put into the model."""
        return iter(())

    def abandon(self) -> None:
        """The load has failed (from any thread): stop reading. Must not block."""

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the source's threads that run torch to end (they end by
        themselves once the load has finished or failed); True when none runs."""
        return True

    def order_compute_after(self, stages: Sequence[int]) -> None:
        """Make the compute that follows wait for these (host-resident) stages' bytes."""

    def synchronize(self) -> None:
        """Wait for the compute issued so far (the forward's last segment) to finish."""


def device_failure(exc: BaseException) -> bool:
    """Is `exc` the accelerator's failure (out of memory, a CUDA error), after which its
    context may be unusable? Such a worker is replaced rather than kept."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    kinds: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)
    accelerator = getattr(torch, "AcceleratorError", None)  # CUDA errors, torch >= 2.8
    if isinstance(accelerator, type):
        kinds += (accelerator,)
    return isinstance(exc, kinds) or (
        isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error")
    )


def load_error(path: Path, exc: BaseException) -> CicadaError:
    """The load's error for any exception raised while loading `path`."""
    if isinstance(exc, CicadaError):
        return exc
    what = f"{type(exc).__name__}: {exc}"
    if device_failure(exc):
        return DeviceError(f"{path}: the device failed while loading ({what})")
    return PackageIntegrityError(f"{path}: the load failed ({what})")
