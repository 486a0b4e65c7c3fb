"""A small GPT-2 whose greedy output varies with the prompt, packed and exported for tests.

A freshly initialised GPT-2 (std 0.02) has nearly flat logits and greedy decoding repeats one
token; weights scaled up make each step depend on the sequence, so a test that compares token
streams compares something."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHARP_CONFIG: dict[str, Any] = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=97,
                                    block_size=512)  # fmt: skip
SCALE = 12.0


def sharp_gpt2() -> Any:
    import torch

    from cicada.cloud.models import gpt2

    model = gpt2.build(**SHARP_CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:  # LayerNorms stay near identity
                p.mul_(SCALE)
    return model


def make_generation_assets(work: Path) -> dict[str, Path]:
    """Pack the sharp GPT-2 (weights from a .safetensors file) and export its edge model."""
    from safetensors.torch import save_model

    from cicada.cloud.export_edge import export_edge
    from cicada.cloud.packing import pack

    package, edge_dir, weights = work / "gen-pkg", work / "gen-edge", work / "sharp.safetensors"
    if not package.exists():
        work.mkdir(parents=True, exist_ok=True)
        save_model(sharp_gpt2(), str(weights))
        pack("cicada.cloud.models.gpt2:build", package, config=SHARP_CONFIG, weights=weights)
    if not edge_dir.exists():
        export_edge(package, edge_dir)
    return {"package": package, "edge": edge_dir}
