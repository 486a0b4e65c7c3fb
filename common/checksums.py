"""The package's fast checksums: xxh3-64 of each stage, and of each block of a stage.

A stage's bytes `[begin, end)` are cut into blocks of `block_bytes` from the stage's start (the
last one shorter); the manifest records the xxh3 of each (docs/PACKAGE.md). Blocks let one
large stage be hashed by several readers at once, and a mismatch names the block. Torch-free:
the readers run before `import torch`. xxhash releases the GIL for the length of each call.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cicada.common.errors import PackageIntegrityError

# Bytes hashed per call when a whole range is hashed at once: each call needs the GIL once.
CALL_BYTES = 1024 * 1024 * 1024


def new_xxh3() -> Any:
    """A fresh xxh3-64 hasher. xxhash is imported here, not with the module: the coordinator
    reads manifests (block counts) in an image that ships no xxhash (deploy/, slim_guard)."""
    import xxhash

    return xxhash.xxh3_64()


def xxh3(view: memoryview) -> str:
    """The xxh3-64 of `view`, as the manifest writes it (16 hex digits)."""
    h = new_xxh3()
    for offset in range(0, len(view), CALL_BYTES):
        h.update(view[offset : offset + CALL_BYTES])
    return h.hexdigest()


def block_spans(begin: int, end: int, block_bytes: int) -> Iterator[tuple[int, int]]:
    """The blocks of the byte range [begin, end): [begin + k*block_bytes, ...), the last
    shorter. None for an empty range."""
    for lo in range(begin, end, block_bytes):
        yield lo, min(lo + block_bytes, end)


def block_count(nbytes: int, block_bytes: int) -> int:
    return -(-nbytes // block_bytes)


class StageDigest:
    """Hashes a stage as it is written (`cicada pack`): the stage's xxh3 and its blocks'."""

    def __init__(self, block_bytes: int) -> None:
        self.block_bytes = block_bytes
        self.stage = new_xxh3()
        self.block = new_xxh3()
        self.in_block = 0  # bytes of the current block hashed so far
        self.blocks: list[str] = []

    def update(self, data: bytes | memoryview) -> None:
        self.stage.update(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self.block_bytes - self.in_block)
            self.block.update(view[:take])
            self.in_block += take
            view = view[take:]
            if self.in_block == self.block_bytes:
                self._close_block()

    def _close_block(self) -> None:
        self.blocks.append(self.block.hexdigest())
        self.block, self.in_block = new_xxh3(), 0

    def finish(self) -> tuple[str, tuple[str, ...]]:
        """(stage xxh3, block xxh3s)."""
        if self.in_block:
            self._close_block()
        return self.stage.hexdigest(), tuple(self.blocks)


def block_mismatch(
    path: Path | str, stage_index: int, stage_name: str, block: int, lo: int, hi: int,
    digest: str, recorded: str,
) -> PackageIntegrityError:  # fmt: skip
    """The error for block `block` of a stage (file bytes [lo, hi)) whose xxh3 differs."""
    return PackageIntegrityError(
        f"{path}: stage {stage_index} ({stage_name}) block {block} (bytes {lo}-{hi}) checksum "
        f"mismatch: {digest} != manifest {recorded}: the file is corrupt; re-run `cicada pack`"
    )
