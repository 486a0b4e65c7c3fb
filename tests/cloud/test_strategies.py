"""Every strategy gives bit-identical outputs to eager PyTorch on the same weights.

Each cold start runs as `python -m cicada run` in a fresh process, as it does in production;
the reference is the factory's eager model in this process.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash

from cicada.cloud.loading.cpu import CpuStageSource
from cicada.cloud.loading.registry import builtin_strategies
from cicada.cloud.packing import pack
from cicada.cloud.pipeline import ColdStart
from cicada.common.errors import CicadaError
from cicada.common.package import MANIFEST_NAME, PAD_PREFIX, WEIGHTS_NAME, Manifest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ["gpt2", "bert", "resnet"]
STRATEGIES = list(builtin_strategies())


def _tiny(name: str) -> tuple[str, dict[str, Any], Any]:
    module = importlib.import_module(f"cicada.cloud.models.{name}")
    config = module.tiny_config()
    kwargs = {"size": 32} if name == "resnet" else {}
    return f"cicada.cloud.models.{name}:build", config, module.example_input(config, **kwargs)


@pytest.fixture(scope="module", params=MODELS)
def packaged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    name = request.param
    factory, config, example = _tiny(name)
    work = tmp_path_factory.mktemp(name)
    pack(factory, work / "pkg", config=config)
    np.save(work / "x.npy", example.numpy())
    module = importlib.import_module(f"cicada.cloud.models.{name}")
    with torch.inference_mode():
        expected = module.build(**config)(example)
    return work, expected


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fresh_process_output_is_bit_identical_to_eager(packaged: Any, strategy: str) -> None:
    work, expected = packaged
    out = work / f"{strategy}.npy"
    subprocess.run(
        [sys.executable, "-m", "cicada", "run", str(work / "pkg"), "--input",
         str(work / "x.npy"), "--strategy", strategy, "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    got = torch.from_numpy(np.load(out))
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


def test_cold_start_is_zero_copy_keeps_ties_and_rebuilds_buffers(tmp_path: Path) -> None:
    factory, config, example = _tiny("gpt2")
    pack(factory, tmp_path / "pkg", config=config)
    cold = ColdStart(tmp_path / "pkg")
    cold.build()
    out = cold.forward(example)
    model = cold.model
    eager = importlib.import_module("cicada.cloud.models.gpt2").build(**config)

    # Tied weights stay one Parameter, as the eager constructor made them.
    assert model.lm_head.weight is model.transformer.wte.weight
    # The non-persistent buffer (not in the package) equals the eager one.
    assert torch.equal(model.pos_ids, eager.pos_ids)
    # Parameters are views of the mapped file: no second copy of the weights.
    assert isinstance(cold.source, CpuStageSource)
    mapped = cold.source.mapped
    base = np.frombuffer(mapped.map, dtype=np.uint8).ctypes.data
    for name, param in model.named_parameters():
        offset = param.data_ptr() - base
        assert 0 <= offset < mapped.size, name
    with torch.inference_mode():
        assert torch.equal(out, eager(example))
    # Hooks are gone once everything is resident: later calls run the plain model.
    assert not cold._hooks
    with torch.inference_mode():
        assert torch.equal(model(example), out)


def test_every_tensor_of_a_fresh_package_is_64_byte_aligned(tmp_path: Path) -> None:
    factory, config, _ = _tiny("resnet")
    manifest = pack(factory, tmp_path / "pkg", config=config)
    # ResNet's 8-byte num_batches_tracked buffers would shift what follows them.
    assert any(t.nbytes % 64 for t in manifest.tensors())
    assert all(t.begin % 64 == 0 for t in manifest.tensors())
    # Padding entries keep the file a valid safetensors file.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "pkg" / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    assert {t.name for t in manifest.tensors()} < keys
    assert all(k.startswith(PAD_PREFIX) for k in keys - {t.name for t in manifest.tensors()})


def _unaligned_copy(src: Path, dest: Path) -> Manifest:
    """`src` as packages were written before alignment: tensors back to back, no padding,
    no manifest_sha256."""
    doc = json.loads((src / MANIFEST_NAME).read_text())
    raw = (src / WEIGHTS_NAME).read_bytes()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for stage in doc["stages"]:
        for t in stage["tensors"]:
            header[t["name"]] = {
                "dtype": t["dtype"],
                "shape": t["shape"],
                "data_offsets": [offset, offset + t["end"] - t["begin"]],
            }
            offset += t["end"] - t["begin"]
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % 64)
    body = bytearray(struct.pack("<Q", len(head)) + head)
    for stage in doc["stages"]:
        stage["begin"] = len(body)
        digest = xxhash.xxh3_64()
        for t in stage["tensors"]:
            data = raw[t["begin"] : t["end"]]
            t["begin"], t["end"] = len(body), len(body) + len(data)
            body += data
            digest.update(data)
        stage["end"], stage["xxh3"] = len(body), digest.hexdigest()
        stage.pop("blocks", None)  # as written before block checksums
        stage.pop("block_bytes", None)
    doc["files"][WEIGHTS_NAME] = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    doc.pop("manifest_sha256")
    dest.mkdir()
    (dest / WEIGHTS_NAME).write_bytes(bytes(body))
    (dest / MANIFEST_NAME).write_text(json.dumps(doc))
    return Manifest.load(dest)


def test_an_older_unaligned_package_is_still_bit_identical(tmp_path: Path) -> None:
    factory, config, example = _tiny("resnet")
    pack(factory, tmp_path / "pkg", config=config)
    old = _unaligned_copy(tmp_path / "pkg", tmp_path / "old")
    assert any(t.begin % 64 for t in old.tensors())  # the copy path is exercised
    cold = ColdStart(tmp_path / "old")
    cold.build()
    out = cold.forward(example)
    eager = importlib.import_module("cicada.cloud.models.resnet").build(**config)
    with torch.inference_mode():
        assert torch.equal(out, eager(example))


def test_forward_starts_before_the_last_stage_is_resident(tmp_path: Path) -> None:
    """Stage-pipelined execution: the compute lane enters stage 0 while later stages are still
    unread. The reader is held back by a gate so the order is deterministic, not timed."""
    import threading

    from cicada.cloud.loading import cpu as reader_module

    factory, config, example = _tiny("gpt2")
    pack(factory, tmp_path / "pkg", config=config)
    gate = threading.Event()
    original = reader_module.stage_checksum
    calls: list[int] = []

    def gated_checksum(view: memoryview) -> str:
        calls.append(len(view))
        if len(calls) == 2:  # let stage 0 through, hold stage 1 until compute has begun
            assert gate.wait(30), "compute never reached stage 0"
        return original(view)

    reader_module.stage_checksum = gated_checksum
    observed: dict[str, Any] = {}
    try:
        cold = ColdStart(tmp_path / "pkg")
        cold.build()

        def watch() -> None:
            deadline = 30.0
            while not gate.is_set() and deadline > 0:
                if cold._segment_stage is not None:  # the compute lane has entered a stage
                    observed["stage"] = cold._segment_stage
                    observed["stage1_resident"] = cold.is_resident(1)
                    gate.set()
                threading.Event().wait(0.001)
                deadline -= 0.001
            gate.set()  # never leave the reader blocked, whatever happened

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        out = cold.forward(example)
        watcher.join(5)
    finally:
        reader_module.stage_checksum = original
    assert "stage" in observed, "the forward never started while stage 1 was unread"
    assert observed["stage1_resident"] is False
    with torch.inference_mode():
        eager = importlib.import_module("cicada.cloud.models.gpt2").build(**config)
        assert torch.equal(out, eager(example))


def test_an_unknown_device_kind_is_refused_by_name(tmp_path: Path) -> None:
    factory, config, _ = _tiny("gpt2")
    pack(factory, tmp_path / "pkg", config=config)
    with pytest.raises(CicadaError, match=r"'mps'.*supported device kinds are cpu, cuda"):
        ColdStart(tmp_path / "pkg", device="mps")


def test_the_cuda_source_imports_without_cuda() -> None:
    code = ("import sys; from cicada.cloud.loading.sources import SOURCES; "
            "assert SOURCES['cuda'].in_place; assert 'torch' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cold_start_matches_eager_on_gpu(tmp_path: Path) -> None:
    factory, config, example = _tiny("gpt2")
    pack(factory, tmp_path / "pkg", config=config)
    cold = ColdStart(tmp_path / "pkg", device="cuda")
    cold.build()
    out = cold.forward(example.cuda())
    eager = importlib.import_module("cicada.cloud.models.gpt2").build(**config).cuda()
    with torch.inference_mode():
        assert torch.equal(out, eager(example.cuda()))
