"""Where a stage's tensors sit in its one device allocation, and which file ranges copy there.

The GPU loader allocates one device buffer per stage and makes the stage's parameters views
into it (ServerlessLLM's store and fastsafetensors do the same), so the stage arrives in a few
large host-to-device copies rather than one per tensor. The file keeps tensors 64-byte
aligned; on the device each tensor starts at a multiple of DEVICE_ALIGN, since cuBLASLt picks
its kernel by the operands' pointer alignment (up to 256 bytes) and eager PyTorch's caching
allocator hands out 512-byte aligned blocks: a less aligned view could take another kernel and
differ from eager in the last bits. Each tensor keeps its file offset plus a shift that only
grows; tensors with the same shift form one *run*, copied as one range (padding included).
A stage of fp32 weights whose sizes are multiples of 256 bytes is a single run. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from cicada.common.package import StageEntry

DEVICE_ALIGN = 256


@dataclass(frozen=True)
class Run:
    """File bytes [file_begin, file_end) go to device offset `device_begin` onwards."""

    file_begin: int
    file_end: int
    device_begin: int


@dataclass(frozen=True)
class StageLayout:
    nbytes: int  # the stage's device allocation
    offsets: dict[str, int]  # tensor name -> its device offset in the allocation
    runs: tuple[Run, ...]

    def copies(self, begin: int, end: int) -> list[tuple[int, int, int]]:
        """(file lo, file hi, device offset) of each copy that moves file bytes [begin, end)."""
        out = []
        for r in self.runs:
            lo, hi = max(r.file_begin, begin), min(r.file_end, end)
            if lo < hi:
                out.append((lo, hi, r.device_begin + lo - r.file_begin))
        return out


def stage_layout(stage: StageEntry, align: int = DEVICE_ALIGN) -> StageLayout:
    """Each tensor at its offset in the stage plus the smallest non-decreasing shift that puts
    it on a multiple of `align`."""
    shift, size = 0, 0
    offsets: dict[str, int] = {}
    runs: list[Run] = []
    for t in stage.tensors:
        rel = t.begin - stage.begin
        shift += -(rel + shift) % align
        offsets[t.name] = rel + shift
        size = max(size, rel + shift + t.nbytes)
        if not t.nbytes:
            continue
        last = runs[-1] if runs else None
        if last is not None and last.device_begin - last.file_begin == rel + shift - t.begin:
            runs[-1] = Run(last.file_begin, t.end, last.device_begin)
        else:
            runs.append(Run(t.begin, t.end, rel + shift))
    return StageLayout(size + -size % align, offsets, tuple(runs))
