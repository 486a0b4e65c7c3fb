"""The CUDA stage source: pinned staging ring, a copy stream, an event per stage.

The model is constructed on the GPU by MiniLoader (empty parameters, real buffers); this source
reads each stage with large positional reads into a ring of pinned host buffers, hashes each
chunk while it is in host memory, and copies it into the parameters' storage on a CUDA stream
of its own. Two threads:

* the *loader* reads, hashes and enqueues the copies, then records the stage's event on the
  copy stream after its last copy, and hands the event to
* the *watcher*, which waits for each stage's event in turn: a stage is announced resident (and
  its read span ends) only once its copies have *completed*, not when they were queued. The
  compute stream waits on exactly that event before the stage's first module runs.

Every failure on either thread, of any type, reaches the pipeline's failure path
(`on_stage` with an error): a forward waiting on a stage gets the error, never waits for ever.
Out of device memory and CUDA errors are `DeviceError` (the worker exits for replacement);
anything else is the package's error. The pinned ring is released once the last copy out of it
has completed (and the caching host allocator asked to hand it back).

Parameters that the constructor makes non-contiguous get their bytes into a contiguous device
temporary and one strided copy after it (in stream order, before the stage's event); a stored
tensor's aliases that the constructor does not tie are tied at attach (the same object in every
slot, as the CPU path does), so no slot stays uninitialised.

Device operations go through a `CudaBackend`; `cloud/loading/simulated.py` provides one that
runs on CPU with copies that complete when told, for tests and `benchmarks/gpu_check.py
--device cpu`. Importable without torch or CUDA: torch is imported once the model is attached.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from cicada.cloud.loading.base import StageRead, StageSource, load_error
from cicada.common.errors import PackageIntegrityError
from cicada.common.package import StageEntry

if TYPE_CHECKING:
    import torch

    from cicada.cloud.miniloader import Slot

log = logging.getLogger("cicada.cloud")

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


class CudaBackend:
    """The device operations the loader uses, on a real CUDA device."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def stream(self) -> Any:
        return self.torch.cuda.Stream(self.device)

    def event(self) -> Any:
        return self.torch.cuda.Event()

    def pinned(self, nbytes: int) -> torch.Tensor:
        return self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=True)

    def empty(self, nbytes: int) -> torch.Tensor:
        return self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.device)

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Enqueue dst <- src on `stream` (returns before the copy is done)."""
        with self.torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def wait(self, event: Any) -> None:
        """Make the compute stream wait (on the device) for `event`."""
        self.torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        self.torch.cuda.current_stream(self.device).synchronize()

    def release_pinned(self) -> None:
        """Hand cached pinned blocks back to the system (the ring is dropped by then)."""
        c = self.torch._C
        empty = getattr(c, "_accelerator_emptyHostCache", None) or getattr(
            c, "_host_emptyCache", None
        )
        if empty is not None:
            empty()


class CudaStageSource(StageSource):
    kind = "cuda"
    in_place = True
    chunk_bytes = CHUNK
    ring_size = RING

    # Makes the device backend from the device name; `using` swaps in another (simulated).
    make_backend: Callable[[str], Any] = CudaBackend

    @classmethod
    def using(cls, backend: Callable[[str], Any]) -> type[CudaStageSource]:
        """This source on another device backend (e.g. `SimulatedCuda`), for `ColdStart`'s
        `source` argument."""
        return type(f"{cls.__name__}Using", (cls,), {"make_backend": staticmethod(backend)})

    def start(self, on_stage: Callable[[StageRead], None]) -> None:
        # Pinned buffers and CUDA need torch; until it is imported, let the kernel pull the
        # file into the page cache so the later reads are memory-speed.
        self.on_stage = on_stage
        self.ring: list[torch.Tensor] = []
        self.ring_done: list[Any] = []
        self.loaded = threading.Event()  # set once the loader thread ended, ring released
        prefetch_file(self.path)

    def construction(self) -> AbstractContextManager[Any]:
        import torch

        return torch.device(self.device)

    def attach(self, slots: dict[str, list[Slot]]) -> None:
        import torch

        self.torch = torch
        self.backend = self.make_backend(self.device)
        stages = self.manifest.stages
        self.chunk = min(self.chunk_bytes, max(s.nbytes for s in stages) or 1)
        self.stream = self.backend.stream()
        self.stage_done = [self.backend.event() for _ in stages]
        self.dest, self.strided = self._destinations(slots)
        self.ring = [self.backend.pinned(self.chunk) for _ in range(self.ring_size)]
        self.ring_done = [None] * self.ring_size
        self.completions: queue.Queue[tuple[StageEntry, float, Any] | None] = queue.Queue()
        threading.Thread(target=self._watch, name="cicada-gpu-watcher", daemon=True).start()
        threading.Thread(target=self._run, name="cicada-gpu-loader", daemon=True).start()

    def _destinations(
        self, slots: dict[str, list[Slot]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Where each stored tensor's bytes go: its constructed storage, as flat bytes. A
        non-contiguous parameter gets a contiguous temporary (`strided`: name -> the
        parameter) copied into it after its last byte; aliases are tied to their target."""
        aliases_of: dict[str, list[str]] = {}
        for alias, stored in self.manifest.aliases.items():
            aliases_of.setdefault(stored, []).append(alias)
        dest: dict[str, torch.Tensor] = {}
        strided: dict[str, torch.Tensor] = {}
        for t in self.manifest.tensors():
            target = slots[t.name][0].get()
            for name in (t.name, *aliases_of.get(t.name, ())):
                for slot in slots[name]:
                    _tie(slot, target)
            if target.is_contiguous():
                dest[t.name] = target.detach().view(-1).view(self.torch.uint8)
            else:
                dest[t.name] = self.backend.empty(t.nbytes)
                strided[t.name] = target.detach()
        return dest, strided

    def _run(self) -> None:
        """The loader thread: read, hash and enqueue every stage's copies in order."""
        stage = self.manifest.stages[0]
        start = self.timeline.now()
        fd = -1
        try:
            fd = os.open(self.path, os.O_RDONLY)
            with self.torch.inference_mode():  # the model may be built under it
                slot = 0
                for stage in self.manifest.stages:
                    start = self.timeline.now()
                    slot = self._enqueue_stage(fd, stage, slot)
                    self.completions.put((stage, start, self.stage_done[stage.index]))
            for done in self.ring_done:  # the last copies out of the ring have completed
                if done is not None:
                    done.synchronize()
        except BaseException as exc:  # any failure is the load's, reported
            self.on_stage(StageRead(stage, start, self.timeline.now(), load_error(self.path, exc)))
        finally:
            self.completions.put(None)
            if fd >= 0:
                os.close(fd)
            self._release_ring()

    def _enqueue_stage(self, fd: int, stage: StageEntry, slot: int) -> int:
        """Read, hash and enqueue one stage's copies, then record its event. Returns the next
        ring slot. Raises PackageIntegrityError on a short read or a checksum mismatch."""
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
                    raise PackageIntegrityError(f"{self.path}: short read at {pos + got}")
                got += r
            if self.verify:
                digest.update(view)
            self._copy_range(stage, pos, n, host)
            event = self.backend.event()
            self.backend.record(event, self.stream)
            self.ring_done[i] = event
            pos += n
        if self.verify and digest.hexdigest() != stage.xxh3:
            raise PackageIntegrityError(
                f"{self.path}: stage {stage.index} ({stage.name}) checksum mismatch: "
                "the file is corrupt; re-run `cicada pack`"
            )
        self.backend.record(self.stage_done[stage.index], self.stream)
        return slot

    def _copy_range(self, stage: StageEntry, pos: int, n: int, host: torch.Tensor) -> None:
        """Copy file bytes [pos, pos+n), now in `host`, to every tensor they overlap."""
        end = pos + n
        for t in stage.tensors:
            lo, hi = max(t.begin, pos), min(t.end, end)
            if lo >= hi:
                continue
            dst = self.dest[t.name]
            self.backend.copy(
                self.stream, dst[lo - t.begin : hi - t.begin], host[lo - pos : hi - pos]
            )
            param = self.strided.get(t.name)
            if param is not None and hi == t.end:  # its last byte: one strided copy, in order
                self.backend.copy(self.stream, param, dst.view(param.dtype).view(param.shape))

    def _watch(self) -> None:
        """The watcher thread: announce each stage once its copies have completed."""
        stage: StageEntry | None = None
        start = self.timeline.now()
        try:
            while (item := self.completions.get()) is not None:
                stage, start, event = item
                event.synchronize()
                self.on_stage(StageRead(stage, start, self.timeline.now()))
        except BaseException as exc:  # a CUDA error surfaces here, asynchronously
            failed = stage if stage is not None else self.manifest.stages[0]
            self.on_stage(StageRead(failed, start, self.timeline.now(), load_error(self.path, exc)))

    def _release_ring(self) -> None:
        """Drop the pinned ring and the temporaries: the load no longer needs them."""
        self.ring, self.ring_done = [], []
        self.strided.clear()
        self.dest.clear()
        try:
            self.backend.release_pinned()
        except Exception as exc:  # the load itself is done: say so, and go on
            log.warning("the pinned ring could not be handed back: %s", exc)
        finally:
            self.loaded.set()

    def order_compute_after(self, stages: Sequence[int]) -> None:
        for s in stages:
            self.backend.wait(self.stage_done[s])

    def synchronize(self) -> None:
        self.backend.synchronize()


def _tie(slot: Slot, tensor: torch.Tensor) -> None:
    """Put `tensor` itself in `slot` (a no-op where the constructor already tied it)."""
    from torch import nn

    if slot.get() is tensor:
        return
    if slot.is_parameter:
        value = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
        slot.module._parameters[slot.attr] = value
    else:
        slot.module._buffers[slot.attr] = tensor
