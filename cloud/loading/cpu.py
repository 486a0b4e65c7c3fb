"""The CPU stage source, and WeightDecoupler's I/O lane: stream a package's stages off storage,
apart from construction.

Torch-free on purpose: `cicada run` starts this thread before `import torch` (~1.25 s here), so
the weights stream in while the interpreter is still importing.

CPU path: the weights file is mapped copy-on-write; the reader walks each stage's byte range
in order of need, which faults the pages in (sequential, kernel readahead ahead of it), and
hashes them with xxh3 on the way (GIL released). A stage is published as *verified* only once
its checksum matches, so no byte that failed the check can reach a tensor. Tensors are later
built zero-copy over the mapping: one copy of the weights in memory, shared with the page cache.

Zero-copy only where the tensor starts 64-byte aligned in the file (every tensor of a package
`cicada pack` writes now): a view that starts elsewhere can send a kernel down another path
than an aligned allocation does, and the result differs in the last bits. A tensor of an older
package that is not aligned is copied once into an aligned buffer instead, so outputs are
bit-identical to eager PyTorch either way.

Where the package records block checksums the stage is still hashed in one call (the import's
GIL again: a 16 MiB block per call would mean a hundred waits per GB); only on a mismatch are
its blocks hashed, to name the corrupt one. The stage's xxh3 covers the same bytes.

A reader thread never dies silently: whatever it raises (BaseException included) is reported
as that stage's failure, which wakes every waiter with the error.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cicada.cloud.loading.base import StageRead, StageSource
from cicada.common.checksums import block_mismatch, xxh3
from cicada.common.errors import CicadaError, PackageIntegrityError
from cicada.common.package import ALIGN, Manifest, StageEntry

if TYPE_CHECKING:
    import torch


def stage_checksum(view: memoryview) -> str:
    """One hashing call per GiB. Each call needs the GIL once, and `import torch` on the main
    thread holds it for up to the 5 ms switch interval: small chunks made the reader wait on
    the GIL (0.69 s instead of 0.15 s for GPT-2-medium)."""
    return xxh3(view)


def stage_error(path: Path, stage: StageEntry, view: memoryview, digest: str) -> CicadaError:
    """The error for a stage whose xxh3 differs: naming its first corrupt block where the
    package records block checksums."""
    for block, ((lo, hi), recorded) in enumerate(
        zip(stage.block_spans(), stage.blocks, strict=True)
    ):
        got = xxh3(view[lo - stage.begin : hi - stage.begin])
        if got != recorded:
            return block_mismatch(path, stage.index, stage.name, block, lo, hi, got, recorded)
    return PackageIntegrityError(
        f"{path}: stage {stage.index} ({stage.name}, bytes {stage.begin}-{stage.end}) checksum "
        f"{digest} != manifest {stage.xxh3}: the file is corrupt; re-run `cicada pack`"
    )


class MappedWeights:
    """The weights file mapped copy-on-write; its buffer backs the CPU tensors zero-copy.

    Copy-on-write (MAP_PRIVATE) keeps the mapping writable, which torch.frombuffer wants, while a
    write by the model can never reach the file. `cicada pack` replaces packages by rename, so
    the inode behind a live mapping is never rewritten in place.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # Never blocks on a FIFO; anything but a regular file is refused on the descriptor.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PackageIntegrityError(f"{path} is not a regular file: refused")
            self.size = st.st_size
            self.map = mmap.mmap(fd, self.size, access=mmap.ACCESS_COPY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        finally:
            os.close(fd)
        if hasattr(self.map, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
            self.map.madvise(mmap.MADV_SEQUENTIAL)
        self.view = memoryview(self.map)


class WeightReader:
    """Reads stages in the given order (order of need) on its own thread(s).

    `on_stage(read)` is called from a reader thread for every stage, verified or not; the
    pipeline applies verified stages in whatever order they arrive.
    """

    def __init__(
        self,
        weights: MappedWeights,
        manifest: Manifest,
        on_stage: Callable[[StageRead], None],
        clock: Callable[[], float],
        order: Sequence[int] | None = None,
        verify: bool = True,
        threads: int = 1,
    ) -> None:
        self.weights = weights
        self.manifest = manifest
        self.on_stage = on_stage
        self.clock = clock
        self.order = list(order if order is not None else range(len(manifest.stages)))
        self.verify = verify
        self._next = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"cicada-reader-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        self._failed = threading.Event()

    def start(self) -> WeightReader:
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout)

    def _claim(self) -> StageEntry | None:
        with self._lock:
            if self._next >= len(self.order) or self._failed.is_set():
                return None
            stage = self.manifest.stages[self.order[self._next]]
            self._next += 1
            return stage

    def _run(self) -> None:
        stage: StageEntry | None = None
        try:
            while (stage := self._claim()) is not None:
                read = self._read(stage)
                if read.error is not None:
                    self._failed.set()
                self.on_stage(read)
        except BaseException as exc:  # reported, never lost with the thread
            self._failed.set()
            failed = stage if stage is not None else self.manifest.stages[0]
            error = PackageIntegrityError(
                f"{self.weights.path}: the reader failed on stage {failed.name}: "
                f"{type(exc).__name__}: {exc}"
            )
            with contextlib.suppress(BaseException):  # the load is failed already
                self.on_stage(StageRead(failed, self.clock(), self.clock(), error))

    def _read(self, stage: StageEntry) -> StageRead:
        start = self.clock()
        error: CicadaError | None = None
        try:
            if stage.end > self.weights.size:
                raise PackageIntegrityError(
                    f"{self.weights.path}: stage {stage.index} ({stage.name}) ends at byte "
                    f"{stage.end}, past the end of the file ({self.weights.size} bytes)"
                )
            view = self.weights.view[stage.begin : stage.end]
            if self.verify:
                digest = stage_checksum(view)
                if digest != stage.xxh3:
                    error = stage_error(self.weights.path, stage, view, digest)
            else:
                touch_pages(view)
        except CicadaError as exc:
            error = exc
        except Exception as exc:  # e.g. the file shrank under the mapping
            error = PackageIntegrityError(
                f"{self.weights.path}: reading {stage.name}: {type(exc).__name__}: {exc}"
            )
        return StageRead(stage, start, self.clock(), error)


def touch_pages(view: memoryview) -> None:
    """Fault a range in without hashing it (used when verification is turned off)."""
    page = mmap.PAGESIZE
    for offset in range(0, len(view), page):
        view[offset]


class CpuStageSource(StageSource):
    """The weights file mapped copy-on-write and read by `WeightReader` threads from the moment
    the source starts (before torch is imported); tensors are zero-copy views of the mapping."""

    kind = "cpu"
    mapped: MappedWeights

    def start(self, on_stage: Callable[[StageRead], None]) -> None:
        self.mapped = MappedWeights(self.path)
        WeightReader(
            self.mapped, self.manifest, on_stage, self.timeline.now,
            verify=self.verify, threads=self.threads or 1,
        ).start()  # fmt: skip

    # construction(): none; a device context costs a dispatch hook on every op.

    def tensors(self, stage: StageEntry) -> Iterator[tuple[str, torch.Tensor]]:
        import torch

        from cicada.cloud.packing import SAFETENSORS_TO_TORCH

        for t in stage.tensors:
            dtype = SAFETENSORS_TO_TORCH[t.dtype]
            itemsize = torch.empty((), dtype=dtype).element_size()
            numel = t.nbytes // itemsize
            if t.end > self.mapped.size:
                raise PackageIntegrityError(
                    f"{self.path}: tensor {t.name} ends past the end of the file"
                )
            if numel == 0:
                yield t.name, torch.empty(t.shape, dtype=dtype)
            elif t.begin % ALIGN == 0:
                # Zero-copy: the tensor is a view of the mapped file (page-cache pages).
                flat = torch.frombuffer(self.mapped.map, dtype=dtype, count=numel, offset=t.begin)
                yield t.name, flat.view(t.shape)
            else:
                # Not aligned (a package written before tensors were): copy once into a
                # fresh (aligned) buffer, so kernels see what they see in eager PyTorch.
                raw = torch.frombuffer(self.mapped.map, dtype=torch.uint8, count=t.nbytes,
                                       offset=t.begin)  # fmt: skip
                yield t.name, raw.clone().view(dtype).view(t.shape)
