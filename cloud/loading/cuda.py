"""The CUDA stage source: pinned staging ring, a copy stream, an event per stage.

The model is constructed on the GPU by MiniLoader (empty parameters, real buffers); this source
reads each stage with large positional reads into a ring of pinned host buffers, hashes each
chunk while it is in host memory, and copies it into the parameters' storage on a CUDA stream
of its own. A stage's event is recorded on that stream after its last copy; the compute
stream waits on the event (on the GPU, not the host) before the stage's first module runs.

Importable without torch or CUDA: torch is imported once the pipeline attaches the model.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from cicada.cloud.loading.base import StageRead, StageSource
from cicada.common.errors import CicadaError, PackageIntegrityError
from cicada.common.package import StageEntry

if TYPE_CHECKING:
    from cicada.cloud.miniloader import Slot

CHUNK = 64 * 1024 * 1024
RING = 3


def prefetch_file(path: Path) -> None:
    """Ask the kernel to read the file into the page cache, from a thread (fadvise may block)."""

    def advise() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    if hasattr(os, "posix_fadvise"):
        threading.Thread(target=advise, name="cicada-prefetch", daemon=True).start()


class CudaStageSource(StageSource):
    kind = "cuda"
    in_place = True
    chunk_bytes = CHUNK
    ring_size = RING

    def start(self, on_stage: Callable[[StageRead], None]) -> None:
        # Pinned buffers and CUDA need torch; until it is imported, let the kernel pull the
        # file into the page cache so the later reads are memory-speed.
        self.on_stage = on_stage
        prefetch_file(self.path)

    def construction(self) -> AbstractContextManager[Any]:
        import torch

        return torch.device(self.device)

    def attach(self, slots: dict[str, list[Slot]]) -> None:
        import torch

        self.torch = torch
        self.cuda_device = torch.device(self.device)
        stages = self.manifest.stages
        self.chunk = min(self.chunk_bytes, max(s.nbytes for s in stages) or 1)
        self.stream = torch.cuda.Stream(self.cuda_device)
        self.ring = [
            torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True)
            for _ in range(self.ring_size)
        ]
        self.ring_done: list[Any] = [None] * self.ring_size
        self.stage_done = [torch.cuda.Event() for _ in stages]
        # Destination bytes of every stored tensor: the constructed (empty) GPU storage.
        self.dest = {
            t.name: slots[t.name][0].get().detach().reshape(-1).view(torch.uint8)
            for t in self.manifest.tensors()
        }
        threading.Thread(target=self._run, name="cicada-gpu-loader", daemon=True).start()

    def _run(self) -> None:
        torch = self.torch
        slot = 0
        stage = self.manifest.stages[0]
        start = self.timeline.now()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            self.on_stage(StageRead(stage, start, self.timeline.now(),
                                    PackageIntegrityError(f"{self.path}: {exc}")))  # fmt: skip
            return
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
                    self.on_stage(StageRead(stage, start, self.timeline.now()))
        except CicadaError as exc:
            self.on_stage(StageRead(stage, start, self.timeline.now(), exc))
        except BaseException as exc:  # any failure is the load's, reported
            error = PackageIntegrityError(f"{self.path}: {type(exc).__name__}: {exc}")
            self.on_stage(StageRead(stage, start, self.timeline.now(), error))
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

    def order_compute_after(self, stages: Sequence[int]) -> None:
        current = self.torch.cuda.current_stream(self.cuda_device)
        for s in stages:
            current.wait_event(self.stage_done[s])

    def synchronize(self) -> None:
        self.torch.cuda.current_stream(self.cuda_device).synchronize()
