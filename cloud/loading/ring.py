"""The read ring of the GPU loader: reader threads fill a ring of host buffers with the weights
file's *pieces*, in file order, while one consumer takes them in order and copies them out.

Torch-free: the ring is allocated and the readers start in `CudaStageSource.start`, before
`import torch`, so the first pieces are read (and hashed) while the interpreter imports; the
buffers are anonymous mappings (page-aligned), registered with the device as pinned memory
once torch is there (`cudaHostRegister`), so a piece read early needs no second copy.

A piece is a run of whole blocks of one stage (common/checksums.py), at most about `chunk`
bytes; a stage without block checksums is cut into `chunk`-sized pieces and hashed by the
consumer in order. Each reader claims the next piece, waits until its slot is free (the
consumer released the slot's previous piece and the device finished copying out of it), reads
it with `os.preadv` and hashes its blocks, both with the GIL released, so N readers read and
hash N pieces at once (each megabyte hashed right after it is read, while in cache).

Sizing rule: `readers + 2` slots. Each reader fills one slot; one slot is being copied to the
device; one is filled and queued behind it, so the link never waits for a reader while the
readers keep up, and the readers never wait for the link while it keeps up. More slots only
add pinned memory (and what is read before the import: `slots * chunk` bytes).

Failures: the first exception of any reader (a short read, a block checksum mismatch, an I/O
error, anything) goes to `on_error` once, with the piece it happened on, and stops the ring:
every reader and the consumer return instead of waiting.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import xxhash

from cicada.common.checksums import block_mismatch
from cicada.common.errors import PackageIntegrityError
from cicada.common.package import Manifest, StageEntry

log = logging.getLogger("cicada.cloud")

# Bytes read, then hashed, at a time: hashing a megabyte just read finds it in the core's
# L2 cache; hashing a 64 MiB piece after reading it reads it from memory again (one thread's
# read+hash rate here: 2.23 GB/s with 64 MiB, 2.65 with 1 MiB, 2.80 with 256 KiB). Each call
# takes the GIL once: 1 MiB keeps that to ~500 takes for a 6-slot ring read during the import.
SUBCHUNK = 1024 * 1024
# Readers left running after the ring was told to stop are waited for this long before the
# buffers are given up (never unmapped under a reader: they are left to the collector).
JOIN_S = 10.0


class Completion(Protocol):
    """What the consumer hands back with a slot: done once the device has read the slot."""

    def synchronize(self) -> None: ...


@dataclass(frozen=True)
class Piece:
    """File bytes [begin, end) of `stage`, read into one ring slot. `blocks`: the indices of
    the stage's blocks it holds (empty where the stage has no block checksums)."""

    index: int
    stage: StageEntry
    begin: int
    end: int
    blocks: tuple[int, ...]
    first: bool  # the stage's first piece
    last: bool  # the stage's last piece

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def plan_pieces(manifest: Manifest, chunk: int) -> list[Piece]:
    """Every stage's pieces in file order. A stage of blocks: whole blocks, as many as fit in
    `chunk` (at least one); otherwise `chunk`-sized pieces. An empty stage is one empty piece
    (its event must still be recorded)."""
    pieces: list[Piece] = []
    for stage in manifest.stages:
        spans = stage.block_spans()
        per = max(1, chunk // stage.block_bytes) if spans else 0
        ranges: list[tuple[int, int, tuple[int, ...]]] = []
        if spans:
            for k in range(0, len(spans), per):
                group = spans[k : k + per]
                ranges.append((group[0][0], group[-1][1], tuple(range(k, k + len(group)))))
        else:
            ranges = [(lo, min(lo + chunk, stage.end), ())
                      for lo in range(stage.begin, stage.end, chunk)]  # fmt: skip
        ranges = ranges or [(stage.begin, stage.end, ())]
        for j, (lo, hi, blocks) in enumerate(ranges):
            pieces.append(Piece(len(pieces), stage, lo, hi, blocks, j == 0, j == len(ranges) - 1))
    return pieces


class ReadRing:
    """`slots` host buffers of `slot_bytes`, filled by `readers` threads with `pieces` in
    order; the consumer calls `take(i)` and `release(i, done)` for i = 0, 1, ... in order."""

    def __init__(
        self,
        path: Path,
        pieces: Sequence[Piece],
        *,
        slots: int,
        readers: int,
        verify: bool,
        clock: Callable[[], float],
        on_error: Callable[[Piece, float, BaseException], None],
        buffers: list[mmap.mmap] | None = None,
    ) -> None:
        """`buffers`: the slots to use (a benchmark reuses faulted-in ones); by default
        `slots` fresh anonymous mappings, each as large as the largest piece."""
        self.path, self.pieces, self.verify, self.clock = path, list(pieces), verify, clock
        self.on_error = on_error
        slot_bytes = max([p.nbytes for p in self.pieces] + [1])
        if buffers is not None and any(len(b) < slot_bytes for b in buffers):
            raise ValueError(f"every ring buffer must hold {slot_bytes} bytes")
        self.buffers = buffers or [mmap.mmap(-1, slot_bytes) for _ in range(max(2, slots))]
        self.cond = threading.Condition()
        self.claimed = 0  # pieces claimed by a reader so far
        self.ready = [False] * len(self.pieces)
        self.read_at = [0.0] * len(self.pieces)  # when a reader claimed each piece
        self.released = 0  # pieces the consumer is done with, in order
        self.slot_done: list[Completion | None] = [None] * len(self.buffers)
        self.stopped = False
        self.failed = False
        self.threads = [
            threading.Thread(target=self._read, name=f"cicada-gpu-reader-{i}", daemon=True)
            for i in range(max(1, readers))
        ]

    def start(self) -> ReadRing:
        for t in self.threads:
            t.start()
        return self

    # -- the consumer's side ---------------------------------------------------------------

    def take(self, i: int) -> memoryview | None:
        """Piece i's bytes, once read and its blocks checked; None once the ring stopped."""
        with self.cond:
            self.cond.wait_for(lambda: self.ready[i] or self.stopped)
            if self.stopped:
                return None
        return memoryview(self.buffers[i % len(self.buffers)])[: self.pieces[i].nbytes]

    def release(self, i: int, done: Completion | None) -> None:
        """The consumer is done with piece i; its slot is free once `done` has completed."""
        with self.cond:
            self.slot_done[i % len(self.buffers)] = done
            self.released = i + 1
            self.cond.notify_all()

    def drain(self) -> None:
        """Wait until the device has finished with every slot (the last copies out of them)."""
        for done in self.slot_done:
            if done is not None:
                done.synchronize()

    def stop(self) -> None:
        """Stop reading: every reader and the consumer return instead of waiting."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def close(self, unpin: Callable[[int], None] | None = None) -> None:
        """Stop, wait for the readers, then `unpin(slot)` each buffer and unmap it. Buffers
        are never unmapped while a reader may still write into them."""
        self.stop()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(JOIN_S)
        if any(t.is_alive() for t in self.threads):
            log.warning("%s: a reader is still running; its ring buffers are left to it", self.path)
            return
        for slot, buf in enumerate(self.buffers):
            if unpin is not None:
                unpin(slot)
            with contextlib.suppress(BufferError):  # a tensor over it lives on: the collector
                buf.close()
        self.buffers = []

    # -- the readers -----------------------------------------------------------------------

    def _claim(self) -> tuple[Piece, memoryview, Completion | None] | None:
        with self.cond:
            if self.stopped or self.claimed >= len(self.pieces):
                return None
            i = self.claimed
            self.claimed += 1
            slots = len(self.buffers)
            self.cond.wait_for(lambda: self.stopped or self.released > i - slots)
            if self.stopped:
                return None
            self.read_at[i] = self.clock()
            done = self.slot_done[i % slots]
            view = memoryview(self.buffers[i % slots])
        return self.pieces[i], view, done

    def _read(self) -> None:
        piece: Piece | None = None
        fd = -1
        try:
            fd = os.open(self.path, os.O_RDONLY)
            while (claim := self._claim()) is not None:
                piece, view, done = claim
                if done is not None:
                    done.synchronize()  # the device has finished copying the slot's last piece
                self._fill(fd, piece, view[: piece.nbytes])
                with self.cond:
                    self.ready[piece.index] = True
                    self.cond.notify_all()
        except BaseException as exc:  # reported once, never lost with the thread
            self._fail(piece, exc)
        finally:
            if fd >= 0:
                os.close(fd)

    def _fill(self, fd: int, piece: Piece, view: memoryview) -> None:
        """Read the piece and check its blocks: each SUBCHUNK is hashed right after it is
        read, while it is still in the core's cache (preadv and xxh3 release the GIL)."""
        stage = piece.stage
        if not (self.verify and piece.blocks):
            self._pread(fd, view, piece.begin)
            return
        spans = stage.block_spans()
        for b in piece.blocks:
            lo, hi = spans[b]
            digest = xxhash.xxh3_64()
            for at in range(lo, hi, SUBCHUNK):
                chunk = view[at - piece.begin : min(at + SUBCHUNK, hi) - piece.begin]
                self._pread(fd, chunk, at)
                digest.update(chunk)
            if digest.hexdigest() != stage.blocks[b]:
                raise block_mismatch(self.path, stage.index, stage.name, b, lo, hi,
                                     digest.hexdigest(), stage.blocks[b])  # fmt: skip

    def _pread(self, fd: int, view: memoryview, offset: int) -> None:
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if n <= 0:
                raise PackageIntegrityError(f"{self.path}: short read at byte {offset + got}")
            got += n

    def _fail(self, piece: Piece | None, exc: BaseException) -> None:
        with self.cond:
            first = not self.failed
            self.failed = True
            self.stopped = True
            self.cond.notify_all()
        if first:
            at = piece if piece is not None else self.pieces[0]
            try:
                self.on_error(at, self.read_at[at.index], exc)
            except BaseException:  # the load is failed already; nothing more to tell
                log.exception("reporting a reader failure failed")

