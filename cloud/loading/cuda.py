"""The GPU path of the WeightDecoupler: pinned staging ring, a copy stream, an event per stage.

The model is constructed on the GPU by MiniLoader (empty parameters, real buffers); this loader
reads each stage with large positional reads into a ring of pinned host buffers, hashes each
chunk while it is in host memory, and copies it into the parameters' storage on a CUDA stream
of its own. A stage's event is recorded on that stream after its last copy; the compute
stream waits on the event (on the GPU, not the host) before the stage's first module runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from cicada.common.errors import CicadaError, PackageIntegrityError
from cicada.common.package import Manifest, StageEntry

if TYPE_CHECKING:
    from cicada.cloud.miniloader import Slot
    from cicada.cloud.timeline import Timeline

CHUNK = 64 * 1024 * 1024
RING = 3


def prefetch_file(path: Path) -> None:
    """Ask the kernel to read the file into the page cache, from a thread (fadvise may block)."""

    def advise() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    if hasattr(os, "posix_fadvise"):
        threading.Thread(target=advise, name="cicada-prefetch", daemon=True).start()


class GpuStageLoader:
    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        slots: dict[str, list[Slot]],
        device: str,
        timeline: Timeline,
        on_resident: Callable[[StageEntry], None],
        on_error: Callable[[CicadaError], None],
        verify: bool = True,
        chunk: int = CHUNK,
        ring: int = RING,
    ) -> None:
        import torch

        self.torch = torch
        self.path, self.manifest, self.timeline = path, manifest, timeline
        self.on_resident, self.on_error, self.verify = on_resident, on_error, verify
        self.device = torch.device(device)
        self.chunk = min(chunk, max(s.nbytes for s in manifest.stages) or 1)
        self.stream = torch.cuda.Stream(self.device)
        self.ring = [
            torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True) for _ in range(ring)
        ]
        self.ring_done: list[Any] = [None] * ring
        self.stage_done = [torch.cuda.Event() for _ in manifest.stages]
        # Destination bytes of every stored tensor: the constructed (empty) GPU storage.
        self.dest = {
            t.name: slots[t.name][0].get().detach().reshape(-1).view(torch.uint8)
            for t in manifest.tensors()
        }
        self._thread = threading.Thread(target=self._run, name="cicada-gpu-loader", daemon=True)

    def start(self) -> GpuStageLoader:
        self._thread.start()
        return self

    def _run(self) -> None:
        torch = self.torch
        fd = os.open(self.path, os.O_RDONLY)
        slot = 0
        try:
            with torch.no_grad():
                for stage in self.manifest.stages:
                    start = self.timeline.now()
                    digest = xxhash.xxh3_64()
                    pos = stage.begin
                    while pos < stage.end:
                        n = min(self.chunk, stage.end - pos)
                        i, slot = slot % len(self.ring), slot + 1
                        if self.ring_done[i] is not None:
                            self.ring_done[i].synchronize()  # its last copy has left the buffer
                        host = self.ring[i]
                        view = memoryview(host.numpy())[:n]  # type: ignore[arg-type]
                        got = 0
                        while got < n:
                            r = os.preadv(fd, [view[got:]], pos + got)
                            if r <= 0:
                                raise PackageIntegrityError(
                                    f"{self.path}: short read at {pos + got}"
                                )
                            got += r
                        if self.verify:
                            digest.update(view)
                        with torch.cuda.stream(self.stream):
                            self._copy_range(stage, pos, n, host)
                            event = torch.cuda.Event()
                            event.record(self.stream)
                        self.ring_done[i] = event
                        pos += n
                    if self.verify and digest.hexdigest() != stage.xxh3:
                        raise PackageIntegrityError(
                            f"{self.path}: stage {stage.index} ({stage.name}) checksum mismatch: "
                            "the file is corrupt; re-run `cicada pack`"
                        )
                    self.stage_done[stage.index].record(self.stream)
                    self.timeline.add("read", stage.name, start, self.timeline.now())
                    self.on_resident(stage)
        except CicadaError as exc:
            self.on_error(exc)
        except OSError as exc:
            self.on_error(PackageIntegrityError(f"{self.path}: {exc}"))
        finally:
            os.close(fd)

    def _copy_range(self, stage: StageEntry, pos: int, n: int, host: Any) -> None:
        """Copy file bytes [pos, pos+n), now in `host`, to every tensor they overlap."""
        end = pos + n
        for t in stage.tensors:
            lo, hi = max(t.begin, pos), min(t.end, end)
            if lo >= hi:
                continue
            self.dest[t.name][lo - t.begin : hi - t.begin].copy_(
                host[lo - pos : hi - pos], non_blocking=True
            )

    def order_compute_after(self, stages: list[int]) -> None:
        current = self.torch.cuda.current_stream(self.device)
        for s in stages:
            current.wait_event(self.stage_done[s])

    def synchronize(self) -> None:
        self.torch.cuda.current_stream(self.device).synchronize()
