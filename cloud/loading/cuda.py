"""The CUDA stage source: parallel readers into a ring pinned in place, one device allocation
per stage, a copy stream, an event per stage.

* **Readers** (cloud/loading/ring.py): from `start`, before `import torch`, N reader threads
  (`reader_threads`, by default min(4, CPUs)) read the weights file's pieces in file order with
  `os.preadv` into a ring of `readers + 2` page-aligned host buffers, and check each block's
  xxh3 (both release the GIL). Once torch is imported the ring is registered with the device
  as pinned memory in place (`cudaHostRegister`): what was read during the import needs no
  second copy.
* **One allocation per stage** (cloud/loading/device_layout.py): at attach each stage gets one
  device buffer and its parameters and buffers become views into it (tied slots share one
  Parameter), so a stage arrives in a few large copies; the constructor's own empty tensors are
  dropped as each stage is placed, so the peak is about the model plus one stage.
* the **consumer** takes pieces in order, enqueues their copies on a CUDA stream of its own
  (hashing in order the stages of a package without block checksums), and records the stage's
  event after its last copy, handing it to
* the **watcher**, which waits for each stage's event in turn: a stage is announced resident
  (and its read span ends) only once its copies have *completed*, not when they were queued.
  The compute stream waits on exactly that event before the stage's first module runs.

Every failure on any of these threads, of any type, reaches the pipeline's failure path
(`on_stage` with an error) once: a forward waiting on a stage gets the error, never waits for
ever. Out of device memory and CUDA errors are `DeviceError` (the worker exits for replacement);
anything else is the package's error. The ring is unregistered and unmapped once the last copy
out of it has completed.

Parameters that the constructor makes non-contiguous keep their layout: their bytes land in the
stage buffer and one strided copy follows (in stream order, before the stage's event). A stored
tensor's aliases that the constructor does not tie are tied (the same object in every slot, as
the CPU path does). Slots are set with `setattr`, so a module that tracks its parameters
(`nn.LSTM`'s flat weights) sees the new ones; a constructor that kept its own reference to a
parameter's tensor elsewhere would not (the in-place copy of the earlier loader did).

Device operations go through a `CudaBackend`; `cloud/loading/simulated.py` provides one that
runs on CPU with copies that complete when told, for tests and `benchmarks/gpu_check.py
--device cpu`. Importable without torch or CUDA: torch is imported once the model is attached.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from cicada.cloud.loading.base import StageRead, StageSource, load_error
from cicada.cloud.loading.device_layout import StageLayout, stage_layout
from cicada.cloud.loading.ring import Piece, ReadRing, plan_pieces
from cicada.common.errors import CicadaError, PackageIntegrityError
from cicada.common.package import StageEntry

if TYPE_CHECKING:
    import torch

    from cicada.cloud.miniloader import Slot

log = logging.getLogger("cicada.cloud")

CHUNK = 64 * 1024 * 1024  # a piece (one ring slot): whole blocks up to this many bytes
MAX_READERS = 4


def default_readers() -> int:
    """Reader threads when none are asked for: one per CPU, up to MAX_READERS."""
    return max(1, min(MAX_READERS, os.cpu_count() or 1))


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

    def pin(self, host: torch.Tensor) -> None:
        """Page-lock `host` (the ring, allocated before torch) in place, for async copies."""
        cudart = self.torch.cuda.cudart()
        err = cudart.cudaHostRegister(host.data_ptr(), host.numel(), 0)  # 0: default flags
        if int(err) != 0:  # cudaSuccess
            raise RuntimeError(f"CUDA error: cudaHostRegister of the read ring failed ({err})")

    def unpin(self, host: torch.Tensor) -> None:
        self.torch.cuda.cudart().cudaHostUnregister(host.data_ptr())

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


class CudaStageSource(StageSource):
    kind = "cuda"
    in_place = True
    chunk_bytes = CHUNK
    # Ring slots; None: readers + 2 (the sizing rule in cloud/loading/ring.py).
    ring_slots: int | None = None
    ring_class: type[ReadRing] = ReadRing  # tests inject reader failures through a subclass

    # Makes the device backend from the device name; `using` swaps in another (simulated).
    make_backend: Callable[[str], Any] = CudaBackend

    @classmethod
    def using(cls, backend: Callable[[str], Any], **attrs: Any) -> type[CudaStageSource]:
        """This source on another device backend (e.g. `SimulatedCuda`), for `ColdStart`'s
        `source` argument; `attrs` override class settings (`chunk_bytes`, `ring_slots`,
        `ring_class`)."""
        attrs["make_backend"] = staticmethod(backend)
        return type(f"{cls.__name__}Using", (cls,), attrs)

    def start(self, on_stage: Callable[[StageRead], None]) -> None:
        # Torch-free: the readers fill the ring while torch imports; the kernel is asked to
        # pull the rest of the file into the page cache meanwhile.
        self.on_stage = on_stage
        self._threads: list[threading.Thread] = []  # the loader and watcher, once attached
        self._reported = False
        self._report_lock = threading.Lock()
        self.loaded = threading.Event()  # set once the consumer ended and the ring is released
        self.pieces = plan_pieces(self.manifest, self.chunk_bytes)
        self.readers = self.threads or default_readers()
        slots = self.ring_slots or self.readers + 2
        try:
            self.ring = self.ring_class(
                self.path, self.pieces, slots=slots, readers=self.readers, verify=self.verify,
                clock=self.timeline.now, on_error=self._reader_failed,
            )  # fmt: skip
        except OSError as exc:  # mmap: out of memory or address space
            raise CicadaError(
                f"cannot allocate the GPU loader's read ring ({slots} slots of up to "
                f"{self.chunk_bytes} bytes): {exc}; use fewer reader threads"
            ) from exc
        self.host: list[torch.Tensor] = []  # the ring's buffers as tensors, pinned (after attach)
        self.ring.start()
        prefetch_file(self.path)

    def construction(self) -> AbstractContextManager[Any]:
        import torch

        return torch.device(self.device)

    def attach(self, slots: dict[str, list[Slot]]) -> None:
        import torch

        self.torch = torch
        self.backend = self.make_backend(self.device)
        stages = self.manifest.stages
        self.stream = self.backend.stream()
        self.stage_done = [self.backend.event() for _ in stages]
        self.layouts = [stage_layout(s) for s in stages]
        self.stage_buffers: list[torch.Tensor] = []
        self.strided: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._place(slots)
        # Per piece: how many copies it takes (tests count what the loader may enqueue).
        self.piece_copies = [self._copy_count(p) for p in self.pieces]
        for host in (torch.frombuffer(buf, dtype=torch.uint8) for buf in self.ring.buffers):
            self.host.append(host)
            self.backend.pin(host)
        self.completions: queue.Queue[tuple[StageEntry, float, Any] | None] = queue.Queue()
        self.attached_at = self.timeline.now()
        self._threads = [
            threading.Thread(target=self._watch, name="cicada-gpu-watcher", daemon=True),
            threading.Thread(target=self._run, name="cicada-gpu-loader", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def abandon(self) -> None:
        self.ring.stop()

    def join(self, timeout: float) -> bool:
        # The loader and the watcher run torch (copies, event waits; the simulated device's
        # copies run on the watcher): one still inside an op at interpreter exit can abort the
        # process ("terminate called without an active exception").
        me = threading.current_thread()
        others = [t for t in self._threads if t is not me]
        end = time.monotonic() + timeout
        for thread in others:
            thread.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in others)

    def _place(self, slots: dict[str, list[Slot]]) -> None:
        """One device buffer per stage; every stored tensor (and its aliases) becomes a view
        into it, except a non-contiguous one, which keeps its layout and is copied into
        from its view (`strided`: name -> (view, parameter))."""
        from cicada.cloud.packing import SAFETENSORS_TO_TORCH

        aliases_of: dict[str, list[str]] = {}
        for alias, stored in self.manifest.aliases.items():
            aliases_of.setdefault(stored, []).append(alias)
        for stage, layout in zip(self.manifest.stages, self.layouts, strict=True):
            buf = self.backend.empty(layout.nbytes)
            self.stage_buffers.append(buf)
            for t in stage.tensors:
                at = layout.offsets[t.name]
                dtype = SAFETENSORS_TO_TORCH[t.dtype]
                view = buf[at : at + t.nbytes].view(dtype).view(t.shape)
                constructed = slots[t.name][0].get()
                if constructed.is_contiguous():
                    value = view
                else:
                    self.strided[t.name] = (view, constructed.detach())
                    value = constructed
                for name in (t.name, *aliases_of.get(t.name, ())):
                    for slot in slots[name]:
                        value = _tie(slot, value)
                del constructed, value  # the constructor's empty storage goes now

    def _copy_count(self, piece: Piece) -> int:
        layout = self.layouts[piece.stage.index]
        tails = sum(piece.begin < t.end <= piece.end for t in piece.stage.tensors
                    if t.name in self.strided)  # fmt: skip
        return len(layout.copies(piece.begin, piece.end)) + tails

    def _run(self) -> None:
        """The consumer: take pieces in order, enqueue their copies, record stage events."""
        piece = self.pieces[0]
        start = self.attached_at
        try:
            with self.torch.inference_mode():  # the model may be built under it
                digest: Any = None
                for piece in self.pieces:
                    stage = piece.stage
                    view = self.ring.take(piece.index)
                    if view is None:
                        return  # the ring stopped: its failure is reported already
                    if piece.first:
                        start = self.ring.read_at[piece.index]
                        ordered = self.verify and not stage.blocks
                        digest = xxhash.xxh3_64() if ordered else None
                    if digest is not None:
                        digest.update(view)
                    host = self.host[piece.index % len(self.host)]
                    self._copy_piece(piece, host)
                    done = self.backend.event()
                    self.backend.record(done, self.stream)
                    self.ring.release(piece.index, done)
                    if piece.last:
                        if digest is not None and digest.hexdigest() != stage.xxh3:
                            raise PackageIntegrityError(
                                f"{self.path}: stage {stage.index} ({stage.name}) checksum "
                                "mismatch: the file is corrupt; re-run `cicada pack`"
                            )
                        self.backend.record(self.stage_done[stage.index], self.stream)
                        self.completions.put((stage, start, self.stage_done[stage.index]))
            self.ring.drain()  # the last copies out of the ring have completed
        except BaseException as exc:  # any failure is the load's, reported
            self._report(piece.stage, start, exc)
        finally:
            self.completions.put(None)
            self._release_ring()

    def _copy_piece(self, piece: Piece, host: torch.Tensor) -> None:
        """Enqueue the copies of file bytes [piece.begin, piece.end), now in `host`, into the
        stage's buffer; then a strided copy for each kept layout whose last byte arrived."""
        stage = piece.stage
        buf = self.stage_buffers[stage.index]
        layout: StageLayout = self.layouts[stage.index]
        for lo, hi, at in layout.copies(piece.begin, piece.end):
            self.backend.copy(self.stream, buf[at : at + hi - lo],
                              host[lo - piece.begin : hi - piece.begin])  # fmt: skip
        for t in stage.tensors:
            kept = self.strided.get(t.name)
            if kept is not None and piece.begin < t.end <= piece.end:
                self.backend.copy(self.stream, kept[1], kept[0])

    def _watch(self) -> None:
        """The watcher thread: announce each stage once its copies have completed."""
        stage: StageEntry | None = None
        start = self.timeline.now()
        try:
            while (item := self.completions.get()) is not None:
                stage, start, event = item
                event.synchronize()
                now = self.timeline.now()
                if stage.index == len(self.manifest.stages) - 1:
                    # The link's share of the load: from the first copy enqueued to the last
                    # completed (reading before then overlapped the import and construction).
                    self.timeline.add("transfer", "all stages", self.attached_at, now)
                self.on_stage(StageRead(stage, start, now))
        except BaseException as exc:  # a CUDA error surfaces here, asynchronously
            self._report(stage if stage is not None else self.manifest.stages[0], start, exc)
            self.ring.stop()

    def _reader_failed(self, piece: Piece, start: float, exc: BaseException) -> None:
        self._report(piece.stage, start, exc)

    def _report(self, stage: StageEntry, start: float, exc: BaseException) -> None:
        """Fail the load, once, whichever thread fails first."""
        with self._report_lock:
            if self._reported:
                return
            self._reported = True
        self.on_stage(StageRead(stage, start, self.timeline.now(), load_error(self.path, exc)))

    def _release_ring(self) -> None:
        """Unregister and unmap the ring: the load no longer needs it."""
        pinned: list[torch.Tensor | None] = list(self.host)
        self.host = []
        self.strided.clear()

        def unpin(slot: int) -> None:
            self.backend.unpin(pinned[slot])
            pinned[slot] = None  # the last tensor over the buffer: it can be unmapped

        try:
            self.ring.close(unpin=unpin)
        except Exception as exc:  # the load itself is done: say so, and go on
            log.warning("the read ring could not be released: %s", exc)
        finally:
            self.loaded.set()

    def order_compute_after(self, stages: Sequence[int]) -> None:
        for s in stages:
            self.backend.wait(self.stage_done[s])

    def synchronize(self) -> None:
        self.backend.synchronize()


def _tie(slot: Slot, tensor: torch.Tensor) -> torch.Tensor:
    """Put `tensor` itself in `slot` (a no-op where it is there already), through `setattr`
    so that a module tracking its parameters sees it. Returns what the slot holds: pass it on
    to the tensor's other slots, so that they share one Parameter."""
    from torch import nn

    if slot.get() is tensor:
        return tensor
    value = tensor
    if slot.is_parameter and not isinstance(tensor, nn.Parameter):
        value = nn.Parameter(tensor, requires_grad=False)
    setattr(slot.module, slot.attr, value)
    return value
