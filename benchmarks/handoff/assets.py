"""The models the handoff benchmark serves: a GPT-2 package with its edge model, and a trivial
ONNX Identity model for the coordinator's own cost."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# -- assets ------------------------------------------------------------------------------------


@dataclass
class Assets:
    model: str
    package: Path
    edge_dir: Path
    inputs: np.ndarray
    description: str
    vocab: int = 50257  # the logits' last axis (what-if stand-in outputs)


def gpt2_assets(quick: bool, cache: Path, work: Path, seq_len: int) -> Assets:
    from cicada.common.package import Manifest

    if quick:
        from cicada.testing import make_assets

        (work / "tiny").mkdir(parents=True, exist_ok=True)
        paths = make_assets(work / "tiny")
        manifest = Manifest.load(paths["package"])
        package, edge_dir = paths["package"], paths["edge"]
        description = "tiny GPT-2 (cicada.testing make_assets: 2x64, fp32 edge model)"
    else:
        from cicada.demos.cold_start import ensure_package

        package = ensure_package("gpt2-medium", cache)
        edge_dir = cache / "edge" / "gpt2-medium-int8"
        if not (edge_dir / "edge_model.json").exists():
            from cicada.cloud.export_edge import export_edge

            print(f"exporting the int8 edge model into {edge_dir} (once, ~30 s)", flush=True)
            export_edge(package, edge_dir, int8=True, force=True)
        manifest = Manifest.load(package)
        edge_info = json.loads((edge_dir / "edge_model.json").read_text())
        description = (
            f"GPT-2-medium package ({manifest.total_bytes / 1e9:.2f} GB, "
            f"{len(manifest.stages)} stages) in the cloud; edge: {edge_info.get('variant')}"
        )
    config = manifest.architecture.config
    vocab = int(config.get("vocab_size", 50257))
    block = int(config.get("block_size", 1024))
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, vocab, size=(1, min(seq_len, block)), dtype=np.int64)
    return Assets("gpt2", package, edge_dir, inputs, description, vocab)


def make_identity_model(out: Path) -> Path:
    """An Identity graph on float32 [1, 16], with the edge_model.json EdgeModel.load reads."""
    import onnx
    from onnx import TensorProto, helper

    out.mkdir(parents=True, exist_ok=True)
    shape = [1, 16]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # old enough for any onnxruntime this project supports
    onnx.checker.check_model(model)
    onnx.save(model, str(out / "model.onnx"))
    spec = {"dtype": "float32", "shape": shape}
    info = {
        "source_factory": "onnx.helper Identity (benchmarks/handoff/assets.py)",
        "source_config": {},
        "edge_config": {},
        "variant": "identity-f32x16",
        "input": {"name": "input", **spec},
        "output": {"name": "output", **spec},
        "int8": False,
        "tolerance": {},
        "copied_tensors": 0,
        "files": {
            "fp32": {
                "path": "model.onnx",
                "variant": "identity-f32x16",
                "bytes": (out / "model.onnx").stat().st_size,
            }
        },
        "measured": {},
        "exporter": "onnx.helper",
        "opset": 17,
    }
    (out / "edge_model.json").write_text(json.dumps(info, indent=1))
    return out
