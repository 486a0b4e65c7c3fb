"""The GPU loader's parallel readers, block checksums and one allocation per stage, on CPU
with the simulated device (cloud/loading/simulated.py): several readers give bit-identical
parameters; a stage's parameters are views into one buffer, filled by a few large copies; a
corrupt block fails the load naming its stage and block; a reader's exception reaches the
failure path (before the model is built too); the ring is read before construction; packages
written before block checksums still load. No test waits on time: every wait is bounded."""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

from cicada.cloud.loading.cpu import CpuStageSource
from cicada.cloud.loading.cuda import CudaBackend, CudaStageSource
from cicada.cloud.loading.device_layout import DEVICE_ALIGN, stage_layout
from cicada.cloud.loading.ring import Piece, ReadRing, plan_pieces
from cicada.cloud.loading.simulated import SimulatedCuda
from cicada.cloud.packing import pack, verify_package
from cicada.cloud.pipeline import ColdStart
from cicada.common.errors import (
    CicadaError,
    LoadStalledError,
    PackageFormatError,
    PackageIntegrityError,
)
from cicada.common.package import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    Manifest,
    StageEntry,
    TensorEntry,
    write_manifest_doc,
)

BOUND_S = 30.0  # a regression that would hang fails with LoadStalledError after this
BLOCK = 4096  # small blocks, so the tiny model's stages have many
CHUNK = 3 * BLOCK  # and several pieces per stage
READERS = 3
_CONFIG = importlib.import_module("cicada.cloud.models.gpt2").tiny_config()


def _package(tmp_path: Path, *, blocks: bool = True) -> tuple[Path, Any, Any, dict[str, Any]]:
    module = importlib.import_module("cicada.cloud.models.gpt2")
    config = module.tiny_config()
    out = tmp_path / "pkg"
    pack("cicada.cloud.models.gpt2:build", out, config=config, block_bytes=BLOCK)
    if not blocks:
        _strip_block_sums(out)
    x = module.example_input(config)
    eager = module.build(**config)
    with torch.inference_mode():
        expected = eager(x)
    return out, x, expected, eager.state_dict()


def _strip_block_sums(package: Path) -> None:
    """The package as written before block checksums: stage sums only, resealed."""
    doc = json.loads((package / MANIFEST_NAME).read_text())
    for stage in doc["stages"]:
        del stage["blocks"], stage["block_bytes"]
    write_manifest_doc(package, doc)


def _cold(package: Path, sim: SimulatedCuda, **attrs: Any) -> ColdStart:
    attrs.setdefault("chunk_bytes", CHUNK)
    source = CudaStageSource.using(lambda _device: sim, **attrs)
    return ColdStart(package, source=source, stall_timeout=BOUND_S, reader_threads=READERS)


def _flip(package: Path, at: int) -> None:
    weights = package / WEIGHTS_NAME
    raw = bytearray(weights.read_bytes())
    raw[at] ^= 0xFF
    weights.write_bytes(raw)


# -- bit-identity, layout --------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [True, False], ids=["block-sums", "stage-sums-only"])
def test_several_readers_give_bit_identical_parameters(tmp_path: Path, blocks: bool) -> None:
    package, x, expected, state = _package(tmp_path, blocks=blocks)
    cold = _cold(package, SimulatedCuda())
    source = cold.source
    assert isinstance(source, CudaStageSource)
    assert len(source.ring.threads) == READERS
    stages = cold.manifest.stages
    assert all(bool(s.blocks) is blocks for s in stages)
    assert len(source.pieces) > len(stages)  # stages are cut into pieces read apart
    assert torch.equal(cold.forward(x), expected)
    got = cold.model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape


def test_a_stage_is_one_allocation_filled_by_a_few_large_copies(tmp_path: Path) -> None:
    package, x, expected, _ = _package(tmp_path)
    sim = SimulatedCuda()
    cold = _cold(package, sim, chunk_bytes=1 << 20)  # one piece per stage
    assert torch.equal(cold.forward(x), expected)
    source = cold.source
    assert isinstance(source, CudaStageSource)
    model_tensors = dict(cold.model.state_dict(keep_vars=True))
    for stage, buf in zip(cold.manifest.stages, source.stage_buffers, strict=True):
        base = buf.untyped_storage().data_ptr()
        for t in stage.tensors:
            tensor = model_tensors[t.name]
            assert tensor.untyped_storage().data_ptr() == base, t.name  # a view into it
            assert (tensor.data_ptr() - base) % DEVICE_ALIGN == 0, t.name
    # Every tensor of GPT-2's stages is a multiple of 256 bytes: one copy per stage.
    assert sim.copies == len(cold.manifest.stages) < len(cold.manifest.tensors())
    # Tied slots share one Parameter, as on the CPU path.
    model = cold.model
    assert model.lm_head.weight is model.transformer.wte.weight  # type: ignore[union-attr]


def test_stage_layout_aligns_each_tensor_and_merges_runs() -> None:
    def entry(name: str, begin: int, nbytes: int) -> TensorEntry:
        return TensorEntry(name, "U8", (nbytes,), begin, begin + nbytes)

    base = 1000 * 64  # a stage starts 64-aligned in the file, not 256-aligned
    tensors = (
        entry("a", base, 512),  # next at +512: same shift
        entry("b", base + 512, 8),  # 8 bytes, then 56 of padding in the file
        entry("c", base + 576, 256),  # +576 is not a multiple of 256: a new run
        entry("d", base + 832, 0),  # empty: no copy
        entry("e", base + 832, 100),
    )
    stage = StageEntry(0, "s", (), tensors, base, base + 932 + 60, "0")
    layout = stage_layout(stage)
    assert all(at % DEVICE_ALIGN == 0 for name, at in layout.offsets.items() if name != "d")
    spans = sorted((layout.offsets[t.name], layout.offsets[t.name] + t.nbytes) for t in tensors)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no overlap
    assert layout.nbytes >= spans[-1][1] and layout.nbytes % DEVICE_ALIGN == 0
    assert [(r.file_begin, r.file_end) for r in layout.runs] == [
        (base, base + 520), (base + 576, base + 932),
    ]  # fmt: skip
    # Copies of any split of the file range put every tensor byte at its device offset.
    for cut in (base + 100, base + 530, base + 700):
        copies = layout.copies(stage.begin, cut) + layout.copies(cut, stage.end)
        for t in tensors:
            for k in range(t.begin, t.end):
                (dev,) = [at + k - lo for lo, hi, at in copies if lo <= k < hi]
                assert dev == layout.offsets[t.name] + k - t.begin


def test_pieces_are_whole_blocks_covering_each_stage_in_order(tmp_path: Path) -> None:
    package, *_ = _package(tmp_path)
    manifest = Manifest.load(package)
    pieces = plan_pieces(manifest, CHUNK)
    assert [p.index for p in pieces] == list(range(len(pieces)))
    for stage in manifest.stages:
        mine = [p for p in pieces if p.stage is stage]
        assert mine[0].begin == stage.begin and mine[-1].end == stage.end
        assert all(a.end == b.begin for a, b in itertools.pairwise(mine))
        assert [b for p in mine for b in p.blocks] == list(range(len(stage.blocks)))
        assert all(p.nbytes <= CHUNK for p in mine) and mine[0].first and mine[-1].last


# -- failures --------------------------------------------------------------------------------


def test_a_corrupt_block_fails_the_load_naming_its_stage_and_block(tmp_path: Path) -> None:
    package, x, _, _ = _package(tmp_path)
    stage = Manifest.load(package).stages[2]
    block = 5
    _flip(package, stage.begin + block * BLOCK + 7)
    cold = _cold(package, SimulatedCuda())
    heard: list[CicadaError] = []
    cold.on_error(heard.append)
    with pytest.raises(PackageIntegrityError) as caught:
        cold.forward(x)
    assert not isinstance(caught.value, LoadStalledError)  # woken by the error, not the bound
    message = str(caught.value)
    assert f"stage 2 ({stage.name}) block {block} " in message and "corrupt" in message
    assert heard == [caught.value]  # reported once, though other readers went on


def test_a_corrupt_stage_of_an_old_package_fails_the_load(tmp_path: Path) -> None:
    package, x, _, _ = _package(tmp_path, blocks=False)
    stage = Manifest.load(package).stages[1]
    _flip(package, stage.end - 3)
    with pytest.raises(PackageIntegrityError, match=rf"stage 1 \({stage.name}\) checksum"):
        _cold(package, SimulatedCuda()).forward(x)


class _FailingRing(ReadRing):
    """A ring whose reader raises on one piece: an I/O error, anything."""

    fail_at = 4
    error: BaseException = OSError(5, "Input/output error (injected)")

    def _fill(self, fd: int, piece: Piece, view: memoryview) -> None:
        if piece.index == self.fail_at:
            raise self.error
        super()._fill(fd, piece, view)


@pytest.mark.parametrize(
    "error", [OSError(5, "Input/output error (injected)"), KeyError("injected")],
    ids=["io-error", "any-type"],
)  # fmt: skip
def test_a_reader_exception_reaches_the_failure_path(
    tmp_path: Path, error: BaseException
) -> None:
    package, x, _, _ = _package(tmp_path)
    ring = type("Ring", (_FailingRing,), {"error": error})
    cold = _cold(package, SimulatedCuda(), ring_class=ring)
    heard: list[CicadaError] = []
    cold.on_error(heard.append)
    with pytest.raises(PackageIntegrityError, match="injected") as caught:
        cold.forward(x)
    assert not isinstance(caught.value, LoadStalledError)
    assert heard == [caught.value]
    source = cold.source
    assert isinstance(source, CudaStageSource)
    assert source.loaded.wait(BOUND_S)  # the consumer ended and released the ring


def test_a_reader_failure_before_construction_fails_the_load_at_once(tmp_path: Path) -> None:
    """Reading starts before `import torch`: its failure is the load's before any build."""
    package, _, _, _ = _package(tmp_path)
    ring = type("Ring", (_FailingRing,), {"fail_at": 0})
    cold = _cold(package, SimulatedCuda(), ring_class=ring)
    with pytest.raises(PackageIntegrityError, match="injected"):
        next(cold.residency(timeout=BOUND_S))  # no build() was called
    assert isinstance(cold.error, PackageIntegrityError)


def test_the_ring_is_read_before_the_model_is_built(tmp_path: Path) -> None:
    package, x, expected, _ = _package(tmp_path)
    sim = SimulatedCuda()
    cold = _cold(package, sim)
    source = cold.source
    assert isinstance(source, CudaStageSource)
    ring = source.ring
    slots = len(ring.buffers)
    with ring.cond:  # the readers fill every slot with no consumer (and no torch) yet
        assert ring.cond.wait_for(lambda: all(ring.ready[:slots]), BOUND_S)
        assert ring.claimed >= slots and not any(ring.ready[slots:])
    assert source.host == [] and sim.ever_pinned == 0  # pinned in place only at attach
    assert torch.equal(cold.forward(x), expected)
    assert sim.ever_pinned == slots


# -- the package format ----------------------------------------------------------------------


def test_pack_writes_block_sums_and_verify_checks_them(tmp_path: Path) -> None:
    package, *_ = _package(tmp_path)
    manifest = Manifest.load(package)
    raw = (package / WEIGHTS_NAME).read_bytes()
    for stage in manifest.stages:
        assert stage.block_bytes == BLOCK
        spans = stage.block_spans()
        assert spans[0][0] == stage.begin and spans[-1][1] == stage.end
        assert list(stage.blocks) == [xxhash.xxh3_64_hexdigest(raw[lo:hi]) for lo, hi in spans]
    verify_package(package)
    stage = manifest.stages[1]
    _flip(package, stage.begin + 2 * BLOCK)
    # The file's sha256 resealed, so that verify gets past it to the fast checksums.
    doc = json.loads((package / MANIFEST_NAME).read_text())
    digest = hashlib.sha256((package / WEIGHTS_NAME).read_bytes()).hexdigest()
    doc["files"][WEIGHTS_NAME]["sha256"] = digest
    write_manifest_doc(package, doc)
    with pytest.raises(PackageIntegrityError, match=rf"stage 1 \({stage.name}\) block 2 "):
        verify_package(package)


def test_the_cpu_loader_names_the_corrupt_block(tmp_path: Path) -> None:
    package, x, _, _ = _package(tmp_path)
    stage = Manifest.load(package).stages[2]
    _flip(package, stage.begin + 3 * BLOCK + 1)
    with pytest.raises(PackageIntegrityError, match=rf"stage 2 \({stage.name}\) block 3 "):
        ColdStart(package, source=CpuStageSource, stall_timeout=BOUND_S).forward(x)


def test_an_old_package_without_block_sums_loads_and_verifies(tmp_path: Path) -> None:
    package, x, expected, _ = _package(tmp_path, blocks=False)
    manifest = verify_package(package)
    assert all(not s.blocks and s.block_bytes == 0 for s in manifest.stages)
    doc = json.loads((package / MANIFEST_NAME).read_text())
    assert not [s for s in doc["stages"] if "blocks" in s or "block_bytes" in s]
    cpu = ColdStart(package, source=CpuStageSource, stall_timeout=BOUND_S)
    assert torch.equal(cpu.forward(x), expected)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.update(blocks=s["blocks"][:-1]), "one xxh3 string per"),
        (lambda s: s.update(blocks=[*s["blocks"][:-1], 7]), "one xxh3 string per"),
        (lambda s: s.update(block_bytes=100), "multiple of 64"),
        (lambda s: s.update(block_bytes=1 << 30), "multiple of 64"),
        (lambda s: s.pop("block_bytes"), "block_bytes"),
    ],
    ids=["too-few", "not-a-string", "unaligned", "too-large", "no-size"],
)
def test_malformed_block_sums_are_refused(tmp_path: Path, edit: Any, match: str) -> None:
    package, *_ = _package(tmp_path)
    doc = json.loads((package / MANIFEST_NAME).read_text())
    edit(doc["stages"][1])
    write_manifest_doc(package, doc)
    with pytest.raises(PackageFormatError, match=match):
        Manifest.load(package)


def test_layouts_kept_across_pieces_strided_and_untied(tmp_path: Path) -> None:
    """A non-contiguous parameter whose bytes span several pieces gets its strided copy after
    its last byte; an alias the constructor leaves untied is tied to the stage's view."""
    from tests.cloud import layout_models

    x = layout_models.example_input()
    pack("tests.cloud.layout_models:build_strided", tmp_path / "strided", block_bytes=64)
    tied = layout_models.build_pair(tie=True)
    pack("tests.cloud.layout_models:build_pair", tmp_path / "pair", config={"tie": False},
         model=tied, block_bytes=64)  # fmt: skip
    for name, eager in (("strided", layout_models.build_strided()), ("pair", tied)):
        source = CudaStageSource.using(lambda _d: SimulatedCuda(), chunk_bytes=64)
        cold = ColdStart(tmp_path / name, source=source, stall_timeout=BOUND_S,
                         reader_threads=READERS, trust_package_code=True)  # fmt: skip
        assert len(cold.source.pieces) > len(cold.manifest.stages)  # type: ignore[attr-defined]
        with torch.inference_mode():
            assert torch.equal(cold.forward(x), eager(x)), name
    model = cold.model
    assert model.b.weight is model.a.weight  # type: ignore[union-attr]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_three_readers_fill_one_pinned_ring_and_one_buffer_per_stage(
    tmp_path: Path,
) -> None:
    """On a real device: the ring registered as pinned memory, each stage one allocation,
    bit-identical to eager on the same device, the ring unregistered after the load."""
    package, x, _, _ = _package(tmp_path)
    source = CudaStageSource.using(CudaBackend, chunk_bytes=CHUNK)
    cold = ColdStart(package, device="cuda", source=source, stall_timeout=BOUND_S,
                     reader_threads=READERS)  # fmt: skip
    cold.build()
    loader = cold.source
    assert isinstance(loader, CudaStageSource)
    assert all(h.is_pinned() for h in loader.host)  # registered in place
    out = cold.forward(x.cuda())
    eager = importlib.import_module("cicada.cloud.models.gpt2").build(**_CONFIG).cuda()
    with torch.inference_mode():
        assert torch.equal(out, eager(x.cuda()))
    for stage, buf in zip(cold.manifest.stages, loader.stage_buffers, strict=True):
        tensors = dict(cold.model.state_dict(keep_vars=True))
        base = buf.untyped_storage().data_ptr()
        assert all(tensors[t.name].untyped_storage().data_ptr() == base for t in stage.tensors)
    assert loader.loaded.wait(BOUND_S) and loader.host == []


def test_blocks_read_and_hashed_a_subchunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each block is read and hashed in sub-chunks (1 MiB normally; here 1000 bytes, which
    divides neither a block nor a piece): still bit-identical, a corrupt byte still found."""
    from cicada.cloud.loading import ring

    monkeypatch.setattr(ring, "SUBCHUNK", 1000)
    package, x, expected, _ = _package(tmp_path)
    assert torch.equal(_cold(package, SimulatedCuda()).forward(x), expected)
    stage = Manifest.load(package).stages[1]
    _flip(package, stage.begin + 7 * BLOCK + 2500)  # the third sub-chunk of block 7
    with pytest.raises(PackageIntegrityError, match=rf"stage 1 \({stage.name}\) block 7 "):
        _cold(package, SimulatedCuda()).forward(x)
